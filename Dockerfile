# syntax=docker/dockerfile:1
# Build: a full Rust toolchain; run: a small Debian with only the binary, as a non-root user.
#
# Two images from one build:
#   the default target — the production binary: `--no-default-features`, so no mock, demo,
#     bench or their crates (rcgen, rsa) are in it; `ringpush mock-apns` says it has no such
#     command. What Kubernetes runs.
#   `--target kit` — the same with the test kit (`mock-apns`, `mock-fcm`, `demo`, `bench`):
#     what docker-compose.yml runs the mocks from.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin ringpush --no-default-features \
 && cp target/release/ringpush /ringpush \
 && cargo build --release --locked --bin ringpush \
 && cp target/release/ringpush /ringpush-kit

FROM debian:bookworm-slim AS base
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin ringpush \
 && mkdir -p /certs /gateway && chown ringpush /certs /gateway
# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001
# Exec form: SIGTERM reaches ringpush itself, which drains and exits 0.
ENTRYPOINT ["/usr/local/bin/ringpush"]
CMD ["worker"]

FROM base AS kit
COPY --from=build /ringpush-kit /usr/local/bin/ringpush

FROM base AS production
COPY --from=build /ringpush /usr/local/bin/ringpush
