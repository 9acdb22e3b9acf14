//! Configuration: one typed struct per command, each flag with its `RINGPUSH_*` variable
//! (flags win). Everything is parsed and checked here, once, at start-up; a bad value stops
//! the process with the variable's name. Nothing deeper reads the environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::apns::http2::{self, Client};
use crate::apns::jwt::{self, Signer};
use crate::apns::request::{AlertTemplate, Endpoint};
use crate::apns::{self, binary, tls, Apns, Reason};
use crate::broker::Names;
use crate::token::DeviceToken;
use crate::worker;

/// A configuration value that cannot be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn config_error(var: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError {
        var,
        reason: reason.to_string(),
    }
}

/// A value parser for durations (`60s`, `500ms`, `2m`) whose error names the variable.
fn duration(
    var: &'static str,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |s| {
        humantime::parse_duration(s)
            .map_err(|e| format!("{var}: {s:?} is not a duration like 60s or 500ms ({e})"))
    }
}

/// A value parser for positive integers whose error names the variable.
fn positive<T: std::str::FromStr + PartialOrd + Default>(
    var: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s| match s.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => Err(format!("{var}: {s:?} is not a positive whole number")),
    }
}

/// A value parser for APNs base URLs whose error names the variable.
fn endpoint(
    var: &'static str,
) -> impl Fn(&str) -> Result<Endpoint, String> + Clone + Send + Sync + 'static {
    move |s| Endpoint::parse(s).map_err(|e| format!("{var}: {e}"))
}

/// A value parser for queue prefixes.
fn prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "RINGPUSH_QUEUE_PREFIX: {s:?} must be 1-100 letters, digits, '-', '_' or '.'"
        ))
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "ringpush",
    version,
    about = "Gets a doorbell ring onto every phone that should hear it (APNs)"
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, env = "RINGPUSH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations/ to PostgreSQL (a second run is a no-op).
    Migrate(DatabaseArgs),
    /// Consume rings, look up tokens, push to APNs.
    Worker(Box<WorkerArgs>),
    /// Turn token rejections into purge requests (dropping repeats within a window).
    Feedback(FeedbackArgs),
    /// Delete tokens APNs reported invalid, unless re-registered since.
    Purge(PurgeArgs),
    /// Run a local APNs stand-in (HTTP/2 over TLS with its own CA).
    MockApns(MockArgs),
    /// Run the whole pipeline on this machine and print what happened.
    Demo(DemoArgs),
    /// Publish rings as a gateway does: one, or N at a steady rate.
    Ring(RingArgs),
    /// Show every ringpush queue: ready messages, consumers, rate.
    Queues(QueuesArgs),
    /// Show whom a ring from a gateway would reach right now.
    Who(WhoArgs),
    /// Register a gateway with an owner and phones (for trying a deployment against the mock).
    Seed(SeedArgs),
    /// Measure throughput, latency, CPU and memory against the local broker, database and mock.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Rings pre-published for the end-to-end run (and through the bare broker loop).
    #[arg(long, default_value = "20000", value_parser = positive::<usize>("--rings"))]
    pub rings: usize,
    /// Tokens per ring.
    #[arg(long, default_value = "4", value_parser = positive::<usize>("--fanout"))]
    pub fanout: usize,
    /// Requests in the APNs-leg runs (ringpush client and bare h2 loop).
    #[arg(long, default_value = "50000", value_parser = positive::<usize>("--apns-requests"))]
    pub apns_requests: usize,
    /// Run the peer clients (node-apn, aioapns) too; they install on first use.
    #[arg(long, default_value = "true", action = clap::ArgAction::Set)]
    pub peers: bool,
    /// Requests per peer client run.
    #[arg(long, default_value = "5000", value_parser = positive::<usize>("--peer-requests"))]
    pub peer_requests: usize,
    /// Frames sent over the legacy binary interface.
    #[arg(long, default_value = "200000", value_parser = positive::<usize>("--binary-frames"))]
    pub binary_frames: usize,
    /// The worker's prefetch, which the bare broker loop uses too (the ceiling is measured
    /// at the same one).
    #[arg(long, env = "RINGPUSH_PREFETCH", default_value = "256", value_parser = positive::<u16>("RINGPUSH_PREFETCH"))]
    pub prefetch: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// After the end-to-end drain, keep rings flowing at 80% of the measured rate this long
    /// (e.g. `10m`), sampling the worker's RSS every 10 s.
    #[arg(long, value_parser = duration("--soak"))]
    pub soak: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, env = "RINGPUSH_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// How often queue depths are refreshed for /metrics.
    #[arg(long, env = "RINGPUSH_QUEUE_POLL_INTERVAL", default_value = "5s", value_parser = duration("RINGPUSH_QUEUE_POLL_INTERVAL"))]
    pub queue_poll_interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Refresh in place until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// RabbitMQ's management API (`http://user:pass@host:15672`), for unacked counts.
    #[arg(long, env = "RINGPUSH_MANAGEMENT_URL")]
    pub management_url: Option<String>,
    /// Seconds between refreshes with --watch (`1`, `0.5`; a duration like `500ms` too).
    #[arg(long, default_value = "2", value_parser = crate::ops::interval)]
    pub interval: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct WhoArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The gateway whose ring you want to trace.
    pub gateway_id: String,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The gateway to create (nothing changes if it exists).
    pub gateway_id: String,
    /// How many phones its owner has.
    #[arg(long, default_value = "3", value_parser = positive::<u32>("--phones"))]
    pub phones: u32,
    /// The phones' topic.
    #[arg(long, default_value = "com.example.doorbell")]
    pub topic: String,
}

#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "RINGPUSH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "RINGPUSH_QUEUE_PREFIX", default_value = "ringpush", value_parser = prefix)]
    pub queue_prefix: String,
}

impl BrokerArgs {
    pub fn names(&self) -> Names {
        Names::new(&self.queue_prefix)
    }
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL (libpq form; `?options=-csearch_path%3Dname` selects a schema).
    #[arg(
        long,
        env = "RINGPUSH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database_url: String,
    /// Most connections the pool opens.
    #[arg(long, env = "RINGPUSH_DATABASE_POOL_SIZE", default_value = "4", value_parser = positive::<usize>("RINGPUSH_DATABASE_POOL_SIZE"))]
    pub database_pool_size: usize,
    /// How long to wait for a connection from the pool, or a new one.
    #[arg(long, env = "RINGPUSH_DATABASE_TIMEOUT", default_value = "5s", value_parser = duration("RINGPUSH_DATABASE_TIMEOUT"))]
    pub database_timeout: Duration,
}

impl DatabaseArgs {
    pub fn pool(&self) -> Result<deadpool_postgres::Pool, ConfigError> {
        crate::db::pool(
            &self.database_url,
            self.database_pool_size,
            self.database_timeout,
        )
        .map_err(|e| config_error("RINGPUSH_DATABASE_URL", e))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ApnsArgs {
    #[command(flatten)]
    pub tls: ApnsTlsArgs,
    /// HTTP/2 API base for tokens whose environment is production.
    #[arg(long, env = "RINGPUSH_APNS_PRODUCTION_URL", default_value = apns::PRODUCTION_URL, value_parser = endpoint("RINGPUSH_APNS_PRODUCTION_URL"))]
    pub apns_production_url: Endpoint,
    /// HTTP/2 API base for tokens whose environment is sandbox.
    #[arg(long, env = "RINGPUSH_APNS_SANDBOX_URL", default_value = apns::SANDBOX_URL, value_parser = endpoint("RINGPUSH_APNS_SANDBOX_URL"))]
    pub apns_sandbox_url: Endpoint,
    /// Token auth: the team's .p8 key file.
    #[arg(long, env = "RINGPUSH_APNS_KEY_FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// Token auth: the key's 10-character id.
    #[arg(long, env = "RINGPUSH_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// Token auth: the 10-character team id.
    #[arg(long, env = "RINGPUSH_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// Bundle id for tokens whose row has no topic.
    #[arg(long, env = "RINGPUSH_APNS_TOPIC")]
    pub apns_topic: Option<String>,
    /// How long one APNs request may take.
    #[arg(long, env = "RINGPUSH_APNS_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration("RINGPUSH_APNS_REQUEST_TIMEOUT"))]
    pub apns_request_timeout: Duration,
    /// Token auth: re-sign the shared JWT this often (20m to 60m).
    #[arg(long, env = "RINGPUSH_APNS_JWT_REFRESH", default_value = "50m", value_parser = duration("RINGPUSH_APNS_JWT_REFRESH"))]
    pub apns_jwt_refresh: Duration,
    /// Persistent connections per APNs endpoint.
    #[arg(long, env = "RINGPUSH_APNS_CONNECTIONS", default_value = "2", value_parser = positive::<usize>("RINGPUSH_APNS_CONNECTIONS"))]
    pub apns_connections: usize,
    /// PING a connection idle this long (0s: never).
    #[arg(long, env = "RINGPUSH_APNS_PING_INTERVAL", default_value = "60s", value_parser = duration("RINGPUSH_APNS_PING_INTERVAL"))]
    pub apns_ping_interval: Duration,
    /// How long connecting to APNs (TCP, TLS, HTTP/2) may take.
    #[arg(long, env = "RINGPUSH_APNS_CONNECT_TIMEOUT", default_value = "10s", value_parser = duration("RINGPUSH_APNS_CONNECT_TIMEOUT"))]
    pub apns_connect_timeout: Duration,
    /// Binary protocol: the legacy gateway, host:port.
    #[arg(long, env = "RINGPUSH_APNS_BINARY_ADDR", default_value = binary::GATEWAY, value_parser = address("RINGPUSH_APNS_BINARY_ADDR"))]
    pub apns_binary_addr: binary::Address,
    /// Binary protocol: a notification with no error packet this long after its write is
    /// accepted.
    #[arg(long, env = "RINGPUSH_APNS_BINARY_QUIET", default_value = "300ms", value_parser = duration("RINGPUSH_APNS_BINARY_QUIET"))]
    pub apns_binary_quiet: Duration,
}

/// What both protocols' TLS needs: the protocol, an extra CA, and certificate auth.
#[derive(Debug, Clone, Args)]
pub struct ApnsTlsArgs {
    /// `http2` (today's APNs) or `binary` (the legacy protocol).
    #[arg(long, env = "RINGPUSH_APNS_PROTOCOL", default_value = "http2", value_parser = protocol)]
    pub apns_protocol: String,
    /// Extra CA (PEM) to trust besides the public roots, e.g. the mock's.
    #[arg(long, env = "RINGPUSH_APNS_CA_FILE")]
    pub apns_ca_file: Option<PathBuf>,
    /// Certificate auth: a .p12 file, or PEM with the certificate chain and its key.
    #[arg(long, env = "RINGPUSH_APNS_CERT_FILE")]
    pub apns_cert_file: Option<PathBuf>,
    /// Certificate auth: the .p12 file's password.
    #[arg(long, env = "RINGPUSH_APNS_CERT_PASSWORD", hide_env_values = true)]
    pub apns_cert_password: Option<Secret>,
}

impl ApnsTlsArgs {
    pub fn binary(&self) -> bool {
        self.apns_protocol == "binary"
    }

    /// The client certificate, when one is configured.
    pub fn identity(&self) -> Result<Option<tls::Identity>, ConfigError> {
        let Some(file) = &self.apns_cert_file else {
            return Ok(None);
        };
        let password = self.apns_cert_password.as_ref().map_or("", |p| p.expose());
        tls::Identity::from_file(file, password)
            .map(Some)
            .map_err(|e| config_error("RINGPUSH_APNS_CERT_FILE", e))
    }

    /// TLS for the binary interface: the certificate is required there.
    pub fn binary_tls(&self) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, ConfigError> {
        let identity = self.identity()?.ok_or_else(|| {
            config_error(
                "RINGPUSH_APNS_CERT_FILE",
                "the binary protocol needs certificate auth (.p12 or PEM)",
            )
        })?;
        let mut config = (*tls::client_config(self.apns_ca_file.as_deref(), Some(identity))
            .map_err(|e| config_error("RINGPUSH_APNS_CA_FILE", e))?)
        .clone();
        config.alpn_protocols.clear();
        Ok(Arc::new(config))
    }
}

/// A value parser for `RINGPUSH_APNS_PROTOCOL`.
fn protocol(s: &str) -> Result<String, String> {
    match s {
        "http2" | "binary" => Ok(s.to_owned()),
        other => Err(format!(
            "RINGPUSH_APNS_PROTOCOL: {other:?} is not http2 or binary"
        )),
    }
}

/// A value parser for `host:port` addresses whose error names the variable.
fn address(
    var: &'static str,
) -> impl Fn(&str) -> Result<binary::Address, String> + Clone + Send + Sync + 'static {
    move |s| binary::Address::parse(s).map_err(|e| format!("{var}: {e}"))
}

impl ApnsArgs {
    /// Checks the credentials and builds the client (connections open on first use).
    pub fn client(&self) -> Result<Apns, ConfigError> {
        if self.tls.binary() {
            if self.apns_key_file.is_some()
                || self.apns_key_id.is_some()
                || self.apns_team_id.is_some()
            {
                return Err(config_error(
                    "RINGPUSH_APNS_KEY_FILE",
                    "the binary protocol has no token auth: use RINGPUSH_APNS_CERT_FILE only",
                ));
            }
            let mut settings = binary::Settings::new(self.apns_binary_addr.clone());
            settings.connect_timeout = self.apns_connect_timeout;
            settings.request_timeout = self.apns_request_timeout;
            // Callers give up after the request timeout: a stalled write must be noticed first.
            settings.write_timeout = self.apns_request_timeout / 2;
            settings.quiet = self.apns_binary_quiet;
            return Ok(binary::Client::new(settings, self.tls.binary_tls()?).into());
        }
        let (signer, identity) = self.credentials()?;
        let tls = tls::client_config(self.tls.apns_ca_file.as_deref(), identity)
            .map_err(|e| config_error("RINGPUSH_APNS_CA_FILE", e))?;
        let mut settings = http2::Settings::new(
            self.apns_production_url.clone(),
            self.apns_sandbox_url.clone(),
        );
        settings.request_timeout = self.apns_request_timeout;
        settings.connect_timeout = self.apns_connect_timeout;
        settings.connections = self.apns_connections;
        settings.ping_interval = Some(self.apns_ping_interval).filter(|d| !d.is_zero());
        Ok(Client::new(settings, tls, signer.map(Arc::new)).into())
    }

    /// Exactly one of token auth (key file, key id, team id) and certificate auth.
    fn credentials(&self) -> Result<(Option<Signer>, Option<tls::Identity>), ConfigError> {
        let token_vars = [
            ("RINGPUSH_APNS_KEY_FILE", self.apns_key_file.is_some()),
            ("RINGPUSH_APNS_KEY_ID", self.apns_key_id.is_some()),
            ("RINGPUSH_APNS_TEAM_ID", self.apns_team_id.is_some()),
        ];
        let any_token = token_vars.iter().any(|(_, set)| *set);
        match (&self.tls.apns_cert_file, any_token) {
            (Some(_), true) => Err(config_error(
                "RINGPUSH_APNS_CERT_FILE",
                "set either certificate auth (RINGPUSH_APNS_CERT_FILE) or token auth (RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_KEY_ID, RINGPUSH_APNS_TEAM_ID), not both",
            )),
            (Some(_), false) => Ok((None, self.tls.identity()?)),
            (None, _) => {
                let missing: Vec<&str> = token_vars
                    .iter()
                    .filter_map(|(var, set)| (!set).then_some(*var))
                    .collect();
                if !missing.is_empty() {
                    return Err(config_error(
                        "RINGPUSH_APNS_KEY_FILE",
                        format!("APNs needs token auth (RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_KEY_ID, RINGPUSH_APNS_TEAM_ID) or certificate auth (RINGPUSH_APNS_CERT_FILE); missing: {}", missing.join(", ")),
                    ));
                }
                Ok((Some(self.signer()?), None))
            }
        }
    }

    fn signer(&self) -> Result<Signer, ConfigError> {
        let (Some(file), Some(key_id), Some(team_id)) =
            (&self.apns_key_file, &self.apns_key_id, &self.apns_team_id)
        else {
            unreachable!("credentials() checked all three are set");
        };
        for (var, value) in [
            ("RINGPUSH_APNS_KEY_ID", key_id),
            ("RINGPUSH_APNS_TEAM_ID", team_id),
        ] {
            if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(config_error(
                    var,
                    format!("{value:?} is not a 10-character Apple id"),
                ));
            }
        }
        let refresh = self.apns_jwt_refresh;
        if !(jwt::MIN_REFRESH..=Duration::from_secs(3600)).contains(&refresh) {
            return Err(config_error(
                "RINGPUSH_APNS_JWT_REFRESH",
                format!("{refresh:?} is outside 20m..60m (APNs refuses older tokens and more frequent changes)"),
            ));
        }
        let pem = std::fs::read(file).map_err(|e| {
            config_error("RINGPUSH_APNS_KEY_FILE", format!("{}: {e}", file.display()))
        })?;
        Signer::from_pem(&pem, key_id, team_id, refresh)
            .map_err(|e| config_error("RINGPUSH_APNS_KEY_FILE", format!("{}: {e}", file.display())))
    }
}

/// A secret from the environment: never printed, not even by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub apns: ApnsArgs,
    /// How long a ring is worth delivering after it was pressed.
    #[arg(long, env = "RINGPUSH_RING_TTL", default_value = "60s", value_parser = duration("RINGPUSH_RING_TTL"))]
    pub ring_ttl: Duration,
    /// Unacked rings the broker may hand this worker at once.
    #[arg(long, env = "RINGPUSH_PREFETCH", default_value = "256", value_parser = positive::<u16>("RINGPUSH_PREFETCH"))]
    pub prefetch: u16,
    /// Most rings looked up by one database query.
    #[arg(long, env = "RINGPUSH_BATCH_SIZE", default_value = "64", value_parser = positive::<usize>("RINGPUSH_BATCH_SIZE"))]
    pub batch_size: usize,
    /// Attempts before a ring that keeps failing goes to the dead queue.
    #[arg(long, env = "RINGPUSH_MAX_ATTEMPTS", default_value = "5", value_parser = positive::<u32>("RINGPUSH_MAX_ATTEMPTS"))]
    pub max_attempts: u32,
    /// Most requests one ring has in flight at once (a building's ring shares the streams).
    #[arg(long, env = "RINGPUSH_RING_CONCURRENCY", default_value = "256", value_parser = positive::<usize>("RINGPUSH_RING_CONCURRENCY"))]
    pub ring_concurrency: usize,
    /// Largest body of one retry envelope; a ring with more pending tokens is split.
    #[arg(long, env = "RINGPUSH_RETRY_MAX_BYTES", default_value = "1048576", value_parser = positive::<usize>("RINGPUSH_RETRY_MAX_BYTES"))]
    pub retry_max_bytes: usize,
    /// On SIGTERM, how long rings in flight may take before they are handed back.
    #[arg(long, env = "RINGPUSH_SHUTDOWN_GRACE", default_value = "25s", value_parser = duration("RINGPUSH_SHUTDOWN_GRACE"))]
    pub shutdown_grace: Duration,
    /// Alert title; `{gateway}` becomes the gateway's name.
    #[arg(long, env = "RINGPUSH_ALERT_TITLE", default_value = "{gateway}")]
    pub alert_title: String,
    /// Alert body; `{gateway}` becomes the gateway's name.
    #[arg(
        long,
        env = "RINGPUSH_ALERT_BODY",
        default_value = "Someone is at the door"
    )]
    pub alert_body: String,
    /// `aps.sound`: `default` or a sound file in the app bundle.
    #[arg(long, env = "RINGPUSH_ALERT_SOUND", default_value = "default")]
    pub alert_sound: String,
}

impl WorkerArgs {
    pub fn settings(&self) -> Result<worker::Settings, ConfigError> {
        for (var, text) in [
            ("RINGPUSH_ALERT_TITLE", &self.alert_title),
            ("RINGPUSH_ALERT_BODY", &self.alert_body),
        ] {
            if text.len() > 1024 {
                return Err(config_error(
                    var,
                    "is over 1024 bytes; APNs payloads are limited to 4096",
                ));
            }
        }
        if self.ring_ttl.is_zero() {
            return Err(config_error("RINGPUSH_RING_TTL", "must be more than zero"));
        }
        if self.retry_max_bytes > crate::broker::MAX_BODY_BYTES {
            return Err(config_error(
                "RINGPUSH_RETRY_MAX_BYTES",
                format!("must be at most {} bytes", crate::broker::MAX_BODY_BYTES),
            ));
        }
        Ok(worker::Settings {
            names: self.broker.names(),
            prefetch: self.prefetch,
            batch_size: self.batch_size,
            ring_ttl: self.ring_ttl,
            default_topic: self.apns.apns_topic.clone(),
            alert: AlertTemplate {
                title: self.alert_title.clone(),
                body: self.alert_body.clone(),
                sound: self.alert_sound.clone(),
            },
            max_attempts: self.max_attempts,
            ring_concurrency: self.ring_concurrency,
            retry_max_bytes: self.retry_max_bytes,
            grace: self.shutdown_grace,
            ..worker::Settings::new(self.broker.names())
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct FeedbackArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// A token reported again within this window produces no second purge request.
    #[arg(long, env = "RINGPUSH_FEEDBACK_DEDUP_WINDOW", default_value = "10m", value_parser = duration("RINGPUSH_FEEDBACK_DEDUP_WINDOW"))]
    pub dedup_window: Duration,
    /// Unacked feedback events held at once.
    #[arg(long, env = "RINGPUSH_FEEDBACK_PREFETCH", default_value = "100", value_parser = positive::<u16>("RINGPUSH_FEEDBACK_PREFETCH"))]
    pub prefetch: u16,
    /// With the binary protocol: also poll the legacy feedback service.
    #[command(flatten)]
    pub tls: ApnsTlsArgs,
    /// Binary protocol: the legacy feedback service, host:port.
    #[arg(long, env = "RINGPUSH_APNS_FEEDBACK_ADDR", default_value = binary::FEEDBACK, value_parser = address("RINGPUSH_APNS_FEEDBACK_ADDR"))]
    pub apns_feedback_addr: binary::Address,
    /// Binary protocol: how often the feedback service is polled (Apple advised daily).
    #[arg(long, env = "RINGPUSH_APNS_FEEDBACK_INTERVAL", default_value = "1h", value_parser = duration("RINGPUSH_APNS_FEEDBACK_INTERVAL"))]
    pub apns_feedback_interval: Duration,
}

impl FeedbackArgs {
    pub fn settings(&self) -> Result<crate::feedback::Settings, ConfigError> {
        let service = match self.tls.binary() {
            false => None,
            true => Some(crate::feedback::Service {
                address: self.apns_feedback_addr.clone(),
                tls: self.tls.binary_tls()?,
                every: self.apns_feedback_interval,
            }),
        };
        Ok(crate::feedback::Settings {
            names: self.broker.names(),
            prefetch: self.prefetch,
            dedup_window: self.dedup_window,
            service,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Most purge requests per DELETE statement.
    #[arg(long, env = "RINGPUSH_PURGE_BATCH_SIZE", default_value = "100", value_parser = positive::<usize>("RINGPUSH_PURGE_BATCH_SIZE"))]
    pub batch_size: usize,
}

impl PurgeArgs {
    pub fn settings(&self) -> crate::purge::Settings {
        crate::purge::Settings {
            names: self.broker.names(),
            prefetch: (self.batch_size * 2).min(u16::MAX as usize) as u16,
            batch_size: self.batch_size,
            db_retry_delay: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Address the mock listens on.
    #[arg(long, env = "RINGPUSH_MOCK_LISTEN", default_value = "127.0.0.1:2197")]
    pub listen: SocketAddr,
    /// Directory of the mock's CA and server certificate (generated on first start).
    #[arg(
        long,
        env = "RINGPUSH_MOCK_CERT_DIR",
        default_value = "mock-apns-certs"
    )]
    pub cert_dir: PathBuf,
    /// Public key (PEM) or .p8 key that JWTs must verify with; without it JWTs are not checked.
    #[arg(long, env = "RINGPUSH_MOCK_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,
    /// Create RINGPUSH_MOCK_JWT_KEY_FILE as a new .p8 key when it does not exist (for
    /// local setups with no Apple key; workers then sign with the same file).
    #[arg(long, env = "RINGPUSH_MOCK_GENERATE_KEY")]
    pub generate_key: bool,
    /// Key id JWTs must carry, when set.
    #[arg(long, env = "RINGPUSH_MOCK_KEY_ID")]
    pub key_id: Option<String>,
    /// Team id JWTs must carry, when set.
    #[arg(long, env = "RINGPUSH_MOCK_TEAM_ID")]
    pub team_id: Option<String>,
    /// Tokens (hex, comma-separated) answered with 410 Unregistered.
    #[arg(long, env = "RINGPUSH_MOCK_UNREGISTERED", value_delimiter = ',')]
    pub unregistered: Vec<String>,
    /// MAX_CONCURRENT_STREAMS announced when a connection opens (APNs: 1).
    #[arg(long, env = "RINGPUSH_MOCK_INITIAL_STREAMS", default_value = "1", value_parser = positive::<u32>("RINGPUSH_MOCK_INITIAL_STREAMS"))]
    pub initial_streams: u32,
    /// MAX_CONCURRENT_STREAMS announced after the first accepted request.
    #[arg(long, env = "RINGPUSH_MOCK_MAX_STREAMS", default_value = "1000", value_parser = positive::<u32>("RINGPUSH_MOCK_MAX_STREAMS"))]
    pub max_streams: u32,
    /// Announce the initial limit again after each rejection, as APNs does.
    #[arg(long, env = "RINGPUSH_MOCK_DROP_STREAMS_AFTER_REJECTION")]
    pub drop_streams_after_rejection: bool,
    /// Wait this long before each answer.
    #[arg(long, env = "RINGPUSH_MOCK_DELAY", default_value = "0s", value_parser = duration("RINGPUSH_MOCK_DELAY"))]
    pub delay: Duration,
    /// Fault: GOAWAY after this many streams on each connection.
    #[arg(long, env = "RINGPUSH_MOCK_GOAWAY_AFTER")]
    pub goaway_after: Option<u64>,
    /// The GOAWAY's debug data: json, text or empty.
    #[arg(long, env = "RINGPUSH_MOCK_GOAWAY_DEBUG", default_value = "json")]
    pub goaway_debug: String,
    /// Fault: reset every n-th stream with REFUSED_STREAM.
    #[arg(long, env = "RINGPUSH_MOCK_REFUSE_EVERY")]
    pub refuse_every: Option<u64>,
    /// Fault: after this many streams, answer 503 Shutdown and send GOAWAY.
    #[arg(long, env = "RINGPUSH_MOCK_SHUTDOWN_AFTER")]
    pub shutdown_after: Option<u64>,
    /// Fault: drop the TCP connection once this many streams have arrived on it.
    #[arg(long, env = "RINGPUSH_MOCK_CLOSE_AFTER")]
    pub close_after: Option<u64>,
    /// Also serve the legacy binary gateway here (certificate auth), e.g. 127.0.0.1:2195.
    #[arg(
        long,
        env = "RINGPUSH_MOCK_BINARY_LISTEN",
        requires = "feedback_listen"
    )]
    pub binary_listen: Option<SocketAddr>,
    /// And the legacy feedback service here, e.g. 127.0.0.1:2196.
    #[arg(
        long,
        env = "RINGPUSH_MOCK_FEEDBACK_LISTEN",
        requires = "binary_listen"
    )]
    pub feedback_listen: Option<SocketAddr>,
    /// Fault: answer this share of requests (per mille) with RINGPUSH_MOCK_ERROR_REASON.
    #[arg(long, env = "RINGPUSH_MOCK_ERROR_PER_MILLE", default_value = "0")]
    pub error_per_mille: u32,
    /// The reason of those answers (its status follows APNs's table).
    #[arg(
        long,
        env = "RINGPUSH_MOCK_ERROR_REASON",
        default_value = "ServiceUnavailable"
    )]
    pub error_reason: String,
}

impl MockArgs {
    pub fn settings(&self) -> Result<(crate::mock::Settings, Vec<DeviceToken>), ConfigError> {
        let public_key = match &self.jwt_key_file {
            None if self.generate_key => {
                return Err(config_error(
                    "RINGPUSH_MOCK_GENERATE_KEY",
                    "needs RINGPUSH_MOCK_JWT_KEY_FILE: where to write the key",
                ))
            }
            None => None,
            Some(path) => {
                if self.generate_key && !path.exists() {
                    write_new_key(path)?;
                }
                Some(read_public_key(path)?)
            }
        };
        let unregistered = self
            .unregistered
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| {
                DeviceToken::parse(t).map_err(|e| config_error("RINGPUSH_MOCK_UNREGISTERED", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let auth = crate::mock::AuthCheck {
            public_key,
            key_id: self.key_id.clone(),
            team_id: self.team_id.clone(),
            ..crate::mock::AuthCheck::default()
        };
        let error_rate = match (self.error_per_mille, &self.error_reason) {
            (0, _) => None,
            (per_mille, reason) if per_mille <= 1000 => {
                let reason = Reason::parse(reason);
                if reason.status() == 0 {
                    return Err(config_error(
                        "RINGPUSH_MOCK_ERROR_REASON",
                        format!("{reason} is not an APNs reason"),
                    ));
                }
                Some(crate::mock::ErrorRate {
                    per_mille,
                    status: reason.status(),
                    reason,
                })
            }
            _ => {
                return Err(config_error(
                    "RINGPUSH_MOCK_ERROR_PER_MILLE",
                    "must be 0 to 1000",
                ))
            }
        };
        let goaway_debug = match self.goaway_debug.as_str() {
            "json" => crate::mock::GoAwayDebug::Json,
            "text" => crate::mock::GoAwayDebug::Text,
            "empty" => crate::mock::GoAwayDebug::Empty,
            other => {
                return Err(config_error(
                    "RINGPUSH_MOCK_GOAWAY_DEBUG",
                    format!("{other:?} is not json, text or empty"),
                ))
            }
        };
        let settings = crate::mock::Settings {
            initial_streams: self.initial_streams,
            max_concurrent_streams: self.max_streams,
            drop_streams_after_rejection: self.drop_streams_after_rejection,
            keep_requests: 10_000,
            response_delay: self.delay,
            faults: crate::mock::Faults {
                goaway_after: self.goaway_after,
                goaway_debug,
                refuse_every: self.refuse_every,
                shutdown_after: self.shutdown_after,
                close_after: self.close_after,
                error_rate,
            },
            listen: self.listen,
            binary: self.binary_listen.zip(self.feedback_listen),
            ..crate::mock::Settings::local(self.cert_dir.clone(), auth)
        };
        Ok((settings, unregistered))
    }
}

/// Writes a new P-256 PKCS#8 key (a .p8 like Apple's), readable by its owner only.
fn write_new_key(path: &Path) -> Result<(), ConfigError> {
    let var = "RINGPUSH_MOCK_JWT_KEY_FILE";
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| config_error(var, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| config_error(var, format!("{}: {e}", dir.display())))?;
    }
    crate::mock::certs::write_private(path, &key.serialize_pem())
        .map_err(|e| config_error(var, format!("{}: {e}", path.display())))
}

fn read_public_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let var = "RINGPUSH_MOCK_JWT_KEY_FILE";
    let pem =
        std::fs::read(path).map_err(|e| config_error(var, format!("{}: {e}", path.display())))?;
    jwt::public_key_from_pem(&pem)
        .map_err(|e| config_error(var, format!("{}: {e}", path.display())))
}

#[derive(Debug, Clone, Args)]
pub struct RingArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The gateway that rings.
    pub gateway_id: String,
    /// How many rings to publish.
    #[arg(long, default_value = "1", value_parser = positive::<u64>("--count"))]
    pub count: u64,
    /// Rings per second when publishing more than one.
    #[arg(long, default_value = "1", value_parser = positive::<u32>("--per-second"))]
    pub per_second: u32,
}

/// The local broker and database the demo and the bench borrow: they use a queue prefix
/// and a schema of their own and remove both at the end.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "RINGPUSH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "RINGPUSH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// `http2`, or `binary` to run the demo over the legacy binary interface.
    #[arg(long, env = "RINGPUSH_APNS_PROTOCOL", default_value = "http2", value_parser = protocol)]
    pub apns_protocol: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            (
                vec!["ringpush", "worker", "--ring-ttl", "soon"],
                "RINGPUSH_RING_TTL",
            ),
            (
                vec!["ringpush", "worker", "--prefetch", "0"],
                "RINGPUSH_PREFETCH",
            ),
            (
                vec!["ringpush", "worker", "--queue-prefix", "a b"],
                "RINGPUSH_QUEUE_PREFIX",
            ),
            (
                vec!["ringpush", "worker", "--apns-production-url", "http://x"],
                "RINGPUSH_APNS_PRODUCTION_URL",
            ),
        ];
        for (args, var) in cases {
            let err = parse(&args).unwrap_err();
            assert!(err.contains(var), "{args:?}: {err}");
        }
    }

    #[test]
    fn exactly_one_kind_of_credentials_is_accepted() {
        let worker = |args: &[&str]| {
            let mut all = vec!["ringpush", "worker"];
            all.extend_from_slice(args);
            match parse(&all).unwrap().command {
                Command::Worker(w) => w,
                _ => panic!("not a worker"),
            }
        };
        let both = worker(&["--apns-cert-file", "/x.p12", "--apns-key-file", "/k.p8"]);
        let err = both.apns.client().err().unwrap().to_string();
        assert!(
            err.starts_with("RINGPUSH_APNS_CERT_FILE") && err.contains("not both"),
            "{err}"
        );
        let none = worker(&[]);
        let err = none.apns.client().err().unwrap().to_string();
        assert!(
            err.contains("RINGPUSH_APNS_CERT_FILE") && err.contains("RINGPUSH_APNS_KEY_FILE"),
            "{err}"
        );
        let unreadable = worker(&[
            "--apns-cert-file",
            "/nonexistent.p12",
            "--apns-cert-password",
            "hunter2",
        ]);
        let err = unreadable.apns.client().err().unwrap().to_string();
        assert!(
            err.starts_with("RINGPUSH_APNS_CERT_FILE") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(
            !format!("{unreadable:?}").contains("hunter2"),
            "the password never shows"
        );
        let refresh = worker(&[
            "--apns-key-file",
            "/k.p8",
            "--apns-key-id",
            "ABCDEFGHIJ",
            "--apns-team-id",
            "ABCDEFGHIJ",
            "--apns-jwt-refresh",
            "10m",
        ]);
        let err = refresh.apns.client().err().unwrap().to_string();
        assert!(err.starts_with("RINGPUSH_APNS_JWT_REFRESH"), "{err}");
    }

    #[test]
    fn missing_credentials_are_named_at_start() {
        let Command::Worker(w) = parse(&["ringpush", "worker", "--apns-key-id", "ABCDEFGHIJ"])
            .unwrap()
            .command
        else {
            panic!("not a worker")
        };
        let err = w.apns.client().err().unwrap().to_string();
        assert!(
            err.contains("RINGPUSH_APNS_KEY_FILE") && err.contains("RINGPUSH_APNS_TEAM_ID"),
            "{err}"
        );
        assert!(
            !err.contains("missing: RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_KEY_ID"),
            "{err}"
        );
        let err = parse(&["ringpush", "worker", "--apns-protocol", "smoke"]).unwrap_err();
        assert!(err.contains("RINGPUSH_APNS_PROTOCOL"), "{err}");
    }
}
