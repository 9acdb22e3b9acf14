# syntax=docker/dockerfile:1
# Build: a full Rust toolchain; run: a small Debian with only the binary, as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin ringpush

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin ringpush \
 && mkdir -p /certs /gateway && chown ringpush /certs /gateway
COPY --from=build /src/target/release/ringpush /usr/local/bin/ringpush
# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001
# Exec form: SIGTERM reaches ringpush itself, which drains and exits 0.
ENTRYPOINT ["/usr/local/bin/ringpush"]
CMD ["worker"]
