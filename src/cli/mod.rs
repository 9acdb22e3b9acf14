//! The command line, and only `main` uses it: every subcommand's flags, each with its
//! `RINGPUSH_*` variable (flags win), parsed and checked once at start-up — a bad value stops
//! the process with the variable's name — and turned into the plain settings the library's
//! modules take (`worker::Settings`, `feedback::Settings`, `purge::Settings`,
//! `mock::Settings`, `apns::http2::Settings`, `demo::Settings`, a built APNs client, a pool).
//! No module of the library imports this one. Defaults are the library's own, shown by
//! `--help` (`values`); one only the command line has is written beside its flag, once.
//!
//! - this file: the commands, the flag groups they share, the demo's and the bench's flags;
//! - `apns`: protocol, endpoints, credentials, timeouts → the APNs client;
//! - `fcm`: the service account, the API base, CA and channel → the FCM client;
//! - `services`: `worker`, `feedback`, `purge`;
//! - `mock`: `mock-apns`; `mock_fcm`: `mock-fcm`;
//! - `ops`: the commands a person types — `ring`, `gateway …`, `queues`, `who`, `seed`;
//! - `tls`: the TLS of the hops to RabbitMQ (`amqps://` nodes, an `https://` management API);
//! - `values`: value parsers whose errors name the variable, and the defaults;
//! - `env`: a bad value from the environment named by its variable; unknown `RINGPUSH_*`
//!   variables warned about.

mod apns;
mod apps;
mod env;
mod fcm;
#[cfg(feature = "kit")]
mod mock;
#[cfg(feature = "kit")]
mod mock_fcm;
mod ops;
mod services;
mod tls;
mod values;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use self::apns::{ApnsArgs, ApnsTlsArgs, Secret};
pub use self::env::{known_variables, unknown_variables, warn_unknown_variables};
pub use self::fcm::FcmArgs;
#[cfg(feature = "kit")]
pub use self::mock::MockArgs;
#[cfg(feature = "kit")]
pub use self::mock_fcm::MockFcmArgs;
pub use self::ops::{
    GatewayAddArgs, GatewayCommand, GatewayIdArgs, GatewayPasswordArgs, HistoryArgs,
    ManagementArgs, QueuesArgs, RingArgs, SeedArgs, ServiceAddArgs, ServiceCommand,
    ServiceNameArgs, WhoArgs,
};
pub use self::services::{FeedbackArgs, PurgeArgs, WorkerArgs};
pub use self::tls::{AmqpTlsArgs, ManagementTlsArgs};
#[cfg(feature = "kit")]
use self::values::protocol;
pub use self::values::ApnsProtocol;
use self::values::{defaults, duration, listen, positive, prefix};
use crate::broker::Names;

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

#[derive(Debug, Parser)]
#[command(
    name = "ringpush",
    version,
    about = "Gets a doorbell ring onto every phone that should hear it (APNs, FCM)"
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, env = "RINGPUSH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    // No doc comments here: they would turn `--help`'s one line of values into a list.
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations/ to PostgreSQL (a second run is a no-op).
    Migrate(DatabaseArgs),
    /// Consume rings, look up tokens, push to APNs and FCM.
    Worker(Box<WorkerArgs>),
    /// Turn token rejections into purge requests (dropping repeats within a window).
    Feedback(FeedbackArgs),
    /// Delete tokens APNs reported invalid, unless re-registered since.
    Purge(PurgeArgs),
    /// Run a local APNs stand-in (HTTP/2 over TLS with its own CA).
    #[cfg(feature = "kit")]
    MockApns(MockArgs),
    /// Run a local FCM HTTP v1 stand-in with its OAuth 2.0 token endpoint (HTTP/2 over TLS
    /// with its own CA).
    #[cfg(feature = "kit")]
    MockFcm(MockFcmArgs),
    /// Run the whole pipeline on this machine and print what happened.
    #[cfg(feature = "kit")]
    Demo(DemoArgs),
    /// Publish rings as a gateway does: one, or N at a steady rate — or, with --end, a
    /// ring's end.
    Ring(RingArgs),
    /// Show a gateway's last rings: pressed, how they ended, who answered, phones reached.
    History(HistoryArgs),
    /// Show every ringpush queue: ready messages, consumers, rate.
    Queues(QueuesArgs),
    /// Show whom a ring from a gateway would reach right now.
    Who(WhoArgs),
    /// Register a gateway with an owner and phones (for trying a deployment against the mock).
    Seed(SeedArgs),
    /// A gateway's own broker identity (RabbitMQ user), through the management API.
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// A ringpush process's own broker identity, least privilege per role, through the
    /// management API.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Measure throughput, latency, CPU and memory against the local broker, database and mock.
    #[cfg(feature = "kit")]
    Bench(BenchArgs),
}

/// Where the broker is and the prefix of every exchange and queue.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (`amqps://` for TLS); a comma-separated list names a cluster's nodes.
    #[arg(long, env = "RINGPUSH_AMQP_URL", hide_env_values = true, default_value = defaults::AMQP_URL)]
    pub amqp_url: String,
    #[command(flatten)]
    pub tls: AmqpTlsArgs,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "RINGPUSH_QUEUE_PREFIX", default_value = defaults::QUEUE_PREFIX, value_parser = prefix)]
    pub queue_prefix: String,
    /// Also bind `amq.topic` to the rings exchange for `ring.#` when declaring the topology,
    /// for gateways publishing MQTT to `ring/<gateway_id>`.
    #[arg(long, env = "RINGPUSH_MQTT_INGRESS")]
    pub mqtt_ingress: bool,
}

impl BrokerArgs {
    pub fn names(&self) -> Names {
        Names::new(&self.queue_prefix).with_mqtt_ingress(self.mqtt_ingress)
    }

    /// The broker with its TLS, checked ([`AmqpTlsArgs::endpoint`]).
    pub fn endpoint(&self) -> Result<crate::broker::Endpoint, ConfigError> {
        self.tls.endpoint(&self.amqp_url)
    }
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL (libpq form; `?options=-csearch_path%3Dname` selects a schema).
    #[arg(long, env = "RINGPUSH_DATABASE_URL", hide_env_values = true, default_value = defaults::DATABASE_URL)]
    pub database_url: String,
    /// Most connections the pool opens.
    #[arg(long, env = "RINGPUSH_DATABASE_POOL_SIZE", default_value = "4", value_parser = positive::<usize>("RINGPUSH_DATABASE_POOL_SIZE"))]
    pub database_pool_size: usize,
    /// How long to wait for a connection from the pool, or a new one.
    #[arg(long, env = "RINGPUSH_DATABASE_TIMEOUT", default_value = "5s", value_parser = duration("RINGPUSH_DATABASE_TIMEOUT"))]
    pub database_timeout: Duration,
    /// Where the worker's token lookups go (a standby), in the same forms; unset: the
    /// database URL. Ledger writes and purges always go to RINGPUSH_DATABASE_URL.
    #[arg(long, env = "RINGPUSH_DATABASE_READ_URL", hide_env_values = true)]
    pub database_read_url: Option<String>,
}

impl DatabaseArgs {
    /// A command's error as a person should read it: a database error says why the database
    /// could not be used and where (`RINGPUSH_DATABASE_URL`, without its password); any other
    /// error is left as it is.
    pub fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        match error.downcast_ref::<crate::db::DbError>() {
            Some(e) => anyhow::anyhow!(e.explain(&self.database_url, "RINGPUSH_DATABASE_URL")),
            None => error,
        }
    }

    /// The pool (connections open on first use).
    pub fn pool(&self) -> Result<deadpool_postgres::Pool, ConfigError> {
        crate::db::pool(
            &self.database_url,
            self.database_pool_size,
            self.database_timeout,
        )
        .map_err(|e| config_error("RINGPUSH_DATABASE_URL", e))
    }

    /// The pool the worker's lookups use: on `RINGPUSH_DATABASE_READ_URL` when it is set.
    pub fn read_pool(&self) -> Result<Option<deadpool_postgres::Pool>, ConfigError> {
        let Some(url) = &self.database_read_url else {
            return Ok(None);
        };
        crate::db::pool(url, self.database_pool_size, self.database_timeout)
            .map(Some)
            .map_err(|e| config_error("RINGPUSH_DATABASE_READ_URL", e))
    }
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, env = "RINGPUSH_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = listen("RINGPUSH_METRICS_ADDR"))]
    pub metrics_addr: SocketAddr,
    /// How often queue depths are refreshed for /metrics.
    #[arg(long, env = "RINGPUSH_QUEUE_POLL_INTERVAL", default_value = "5s", value_parser = duration("RINGPUSH_QUEUE_POLL_INTERVAL"))]
    pub queue_poll_interval: Duration,
}

impl MetricsArgs {
    pub fn serve(&self) -> crate::metrics::Serve {
        crate::metrics::Serve {
            addr: self.metrics_addr,
            poll_every: self.queue_poll_interval,
        }
    }
}

/// The local broker and database the demo and the bench borrow: they use a queue prefix
/// and a schema of their own and remove both at the end.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "RINGPUSH_AMQP_URL", hide_env_values = true, default_value = defaults::AMQP_URL)]
    pub amqp_url: String,
    /// PostgreSQL URL.
    #[arg(long, env = "RINGPUSH_DATABASE_URL", hide_env_values = true, default_value = defaults::DATABASE_URL)]
    pub database_url: String,
}

#[cfg(feature = "kit")]
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    #[command(flatten)]
    pub tls: AmqpTlsArgs,
    /// `http2`, or `binary` to run the demo over the legacy binary interface.
    #[arg(long, env = "RINGPUSH_APNS_PROTOCOL", default_value_t = ApnsProtocol::Http2, value_parser = protocol)]
    pub apns_protocol: ApnsProtocol,
}

#[cfg(feature = "kit")]
impl DemoArgs {
    pub fn settings(&self) -> Result<crate::demo::Settings, ConfigError> {
        Ok(crate::demo::Settings {
            amqp_url: self.tls.endpoint(&self.local.amqp_url)?,
            database_url: self.local.database_url.clone(),
            binary: self.apns_protocol == ApnsProtocol::Binary,
        })
    }
}

#[cfg(feature = "kit")]
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
    /// Percent of each ring's tokens that are Android phones (through a mock-fcm process) in
    /// the end-to-end part; 0: iOS only.
    #[arg(long, default_value = "0", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub android_share: u32,
    /// Requests in the APNs-leg runs (ringpush client and bare h2 loop), and in the FCM
    /// leg's (ringpush's FCM client, bare h2 loop, firebase-admin).
    #[arg(long, default_value = "50000", value_parser = positive::<usize>("--apns-requests"))]
    pub apns_requests: usize,
    /// Run the peer clients (node-apn, aioapns; firebase-admin in the FCM leg) too; they
    /// install on first use.
    #[arg(long, default_value = "true", action = clap::ArgAction::Set)]
    pub peers: bool,
    /// Requests per APNs peer client run (the FCM peer, firebase-admin, sends as many as the
    /// FCM leg's client: --apns-requests).
    #[arg(long, default_value = "5000", value_parser = positive::<usize>("--peer-requests"))]
    pub peer_requests: usize,
    /// Frames sent over the legacy binary interface.
    #[arg(long, default_value = "200000", value_parser = positive::<usize>("--binary-frames"))]
    pub binary_frames: usize,
    /// The worker's prefetch, which the bare broker loop uses too (the ceiling is measured
    /// at the same one).
    #[arg(long, env = "RINGPUSH_PREFETCH", default_value_t = defaults::worker().prefetch, value_parser = positive::<u16>("RINGPUSH_PREFETCH"))]
    pub prefetch: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// After the end-to-end drain, keep rings flowing at 80% of the measured rate this long
    /// (e.g. `10m`), sampling the worker's RSS every 10 s.
    #[arg(long, value_parser = duration("--soak"))]
    pub soak: Option<Duration>,
    /// Parts to leave out (comma-separated), for a shorter run of the others; the
    /// end-to-end part and its live windows always run.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub skip: Vec<crate::bench::Part>,
}

#[cfg(feature = "kit")]
impl BenchArgs {
    pub fn settings(&self) -> crate::bench::Settings {
        crate::bench::Settings {
            amqp_url: self.local.amqp_url.clone(),
            database_url: self.local.database_url.clone(),
            rings: self.rings,
            fanout: self.fanout,
            android_share: self.android_share,
            apns_requests: self.apns_requests,
            peers: self.peers,
            peer_requests: self.peer_requests,
            binary_frames: self.binary_frames,
            prefetch: self.prefetch,
            soak: self.soak,
            skip: self.skip.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(args).map_err(|e| e.to_string())
    }

    fn worker(args: &[&str]) -> Box<WorkerArgs> {
        let mut all = vec!["ringpush", "worker"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Worker(w) => w,
            _ => panic!("not a worker"),
        }
    }

    #[cfg(feature = "kit")]
    #[test]
    fn the_bench_leaves_out_the_parts_named() {
        use crate::bench::Part;
        let skip = |args: &[&str]| {
            let mut all = vec!["ringpush", "bench"];
            all.extend_from_slice(args);
            match parse(&all).map(|c| c.command) {
                Ok(Command::Bench(b)) => Ok(b.settings().skip),
                Ok(_) => panic!("not the bench"),
                Err(e) => Err(e),
            }
        };
        assert_eq!(skip(&[]).unwrap(), []);
        assert_eq!(
            skip(&["--skip", "ledger,claims", "--skip", "fcm"]).unwrap(),
            [Part::Ledger, Part::Claims, Part::Fcm]
        );
        assert_eq!(skip(&["--skip", "apps"]).unwrap(), [Part::Apps]);
        let e = skip(&["--skip", "e2e"]).unwrap_err();
        assert!(e.contains("--skip") && e.contains("life"), "{e}");
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
            (
                vec!["ringpush", "mock-apns", "--goaway-debug", "yaml"],
                "RINGPUSH_MOCK_GOAWAY_DEBUG",
            ),
            (
                vec!["ringpush", "worker", "--max-message-bytes", "100"],
                "RINGPUSH_MAX_MESSAGE_BYTES",
            ),
            (
                vec!["ringpush", "purge", "--max-message-bytes", "16777216"],
                "RINGPUSH_MAX_MESSAGE_BYTES",
            ),
        ];
        for (args, var) in cases {
            let err = parse(&args).unwrap_err();
            assert!(err.contains(var), "{args:?}: {err}");
        }
    }

    #[test]
    fn exactly_one_kind_of_credentials_is_accepted() {
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
    fn a_worker_without_any_provider_is_refused_naming_the_variables() {
        let err = worker(&[]).providers().err().unwrap().to_string();
        for var in [
            "RINGPUSH_APNS_KEY_FILE",
            "RINGPUSH_APNS_CERT_FILE",
            "RINGPUSH_FCM_CREDENTIALS_FILE",
        ] {
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    #[cfg(feature = "kit")]
    fn a_service_account_that_cannot_be_used_stops_the_worker_naming_the_variable() {
        let dir =
            std::env::temp_dir().join(format!("ringpush-cli-{}", crate::token::random_hex(4)));
        std::fs::create_dir_all(&dir).unwrap();
        let plain_http = dir.join("http.json");
        let json =
            crate::fcm::credentials::generate("p", "a@p.iam", "http://127.0.0.1/token").unwrap();
        std::fs::write(&plain_http, json).unwrap();
        let cases = [
            (dir.join("missing.json"), "missing.json"),
            (plain_http, "is not an https:// URL"),
        ];
        for (path, why) in cases {
            let w = worker(&["--fcm-credentials-file", path.to_str().unwrap()]);
            let err = w.providers().err().unwrap().to_string();
            assert!(
                err.starts_with("RINGPUSH_FCM_CREDENTIALS_FILE") && err.contains(why),
                "{err}"
            );
            assert!(!err.contains("PRIVATE KEY"), "the key never shows: {err}");
        }
        let good = dir.join("good.json");
        let json =
            crate::fcm::credentials::generate("p", "a@p.iam", "https://127.0.0.1/token").unwrap();
        std::fs::write(&good, json).unwrap();
        let w = worker(&["--fcm-credentials-file", good.to_str().unwrap()]);
        let providers = w.providers().expect("FCM alone is a provider");
        use crate::token::{AppId, Platform};
        let default = AppId::DEFAULT;
        assert!(
            providers.get(default, Platform::APNS).is_none()
                && providers.get(default, Platform::FCM).is_some()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_credentials_are_named_at_start() {
        let w = worker(&["--apns-key-id", "ABCDEFGHIJ"]);
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
        // A missing key id is reported under its own variable.
        let w = worker(&["--apns-key-file", "/k.p8", "--apns-team-id", "ABCDEFGHIJ"]);
        let err = w.apns.client().err().unwrap().to_string();
        assert!(err.starts_with("RINGPUSH_APNS_KEY_ID: "), "{err}");
    }

    #[test]
    fn a_url_that_cannot_be_used_is_named_once() {
        let w = worker(&["--database-url", "postgres://u@h/db?nonsense=1"]);
        let err = w.database.pool().err().unwrap().to_string();
        assert!(
            err.starts_with("RINGPUSH_DATABASE_URL: not a PostgreSQL URL"),
            "{err}"
        );
        assert_eq!(err.matches("RINGPUSH_DATABASE_URL").count(), 1, "{err}");
        let args: Vec<std::ffi::OsString> = [
            "ringpush",
            "queues",
            "--amqp-url",
            "http://u:secret@h:15672/",
        ]
        .map(Into::into)
        .to_vec();
        let err = Cli::try_parse_env(&args).err().unwrap().to_string();
        assert!(
            err.contains("RINGPUSH_AMQP_URL") && err.contains("amqp://"),
            "{err}"
        );
        assert!(!err.contains("secret"), "the password never shows: {err}");
        let err = parse(&["ringpush", "purge", "--metrics-addr", "9464"]).unwrap_err();
        assert!(
            err.contains("RINGPUSH_METRICS_ADDR") && err.contains("127.0.0.1:9464"),
            "{err}"
        );
    }

    /// The defaults the documentation's configuration tables give (README.md and docs/):
    /// variable → the default cell, for rows whose default is one backticked value (a row
    /// naming two variables, `A` / `B`, gives each its own).
    fn documented_defaults() -> std::collections::HashMap<String, String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![root.join("README.md")];
        if let Ok(dir) = std::fs::read_dir(root.join("docs")) {
            files.extend(dir.flatten().map(|e| e.path()));
        }
        let ticked = |cell: &str| -> Vec<String> {
            cell.split(" / ")
                .map(|part| {
                    let part = part.trim();
                    match part.strip_prefix('`').and_then(|p| p.strip_suffix('`')) {
                        Some(v) if !v.contains('`') => v.to_owned(),
                        _ => String::new(),
                    }
                })
                .collect()
        };
        let mut out = std::collections::HashMap::new();
        for file in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "md"))
        {
            for line in std::fs::read_to_string(file).unwrap().lines() {
                let cells: Vec<&str> = line.split(" | ").collect();
                if !line.starts_with("| `RINGPUSH_") || cells.len() < 3 {
                    continue;
                }
                let vars = ticked(cells[0].trim_start_matches("| "));
                let defaults = ticked(cells[cells.len() - 1].trim_end_matches(" |"));
                if vars.len() != defaults.len() {
                    continue;
                }
                for (var, default) in vars.into_iter().zip(defaults) {
                    if !var.is_empty() && !default.is_empty() {
                        out.insert(var, default);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn with_no_flags_the_worker_runs_with_the_documented_defaults() {
        let doc = documented_defaults();
        let documented = |var: &str| {
            doc.get(var)
                .unwrap_or_else(|| panic!("the configuration table gives {var}'s default"))
                .clone()
        };
        let seconds = |var: &str| humantime::parse_duration(&documented(var)).unwrap();
        let number = |var: &str| documented(var).parse::<u64>().unwrap();
        let ours = worker(&[]).settings().unwrap();
        assert_eq!(ours.prefetch as u64, number("RINGPUSH_PREFETCH"));
        assert_eq!(ours.batch_size as u64, number("RINGPUSH_BATCH_SIZE"));
        assert_eq!(ours.max_attempts as u64, number("RINGPUSH_MAX_ATTEMPTS"));
        assert_eq!(
            ours.ring_concurrency as u64,
            number("RINGPUSH_RING_CONCURRENCY")
        );
        assert_eq!(
            ours.retry_max_bytes as u64,
            number("RINGPUSH_RETRY_MAX_BYTES")
        );
        assert_eq!(
            ours.max_message_bytes as u64,
            number("RINGPUSH_MAX_MESSAGE_BYTES")
        );
        assert_eq!(ours.ring_ttl, seconds("RINGPUSH_RING_TTL"));
        assert_eq!(ours.grace, seconds("RINGPUSH_SHUTDOWN_GRACE"));
        assert_eq!(ours.ring_timeout, seconds("RINGPUSH_RING_TIMEOUT"));
        assert_eq!(ours.ring_debounce, seconds("RINGPUSH_RING_DEBOUNCE"));
        assert_eq!(ours.followup_ttl, seconds("RINGPUSH_FOLLOWUP_TTL"));
        assert_eq!(ours.ring_history, seconds("RINGPUSH_RING_HISTORY"));
        assert_eq!(ours.ledger, documented("RINGPUSH_LEDGER") == "on");
        assert_eq!(ours.alert.title, documented("RINGPUSH_ALERT_TITLE"));
        assert_eq!(ours.alert.body, documented("RINGPUSH_ALERT_BODY"));
        assert_eq!(ours.alert.sound, documented("RINGPUSH_ALERT_SOUND"));
        assert_eq!(
            ours.names,
            crate::broker::Names::new(&documented("RINGPUSH_QUEUE_PREFIX"))
        );
    }

    #[test]
    fn help_shows_the_defaults_the_documentation_gives() {
        use clap::CommandFactory;
        let doc = documented_defaults();
        let mut cli = Cli::command();
        cli.build();
        let mut checked = 0;
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(var) = arg.get_env().and_then(|v| v.to_str()) else {
                    continue;
                };
                let help: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                let (Some(written), false) = (doc.get(var), help.is_empty()) else {
                    continue;
                };
                assert_eq!(
                    &help.join(","),
                    written,
                    "`ringpush {} --help` and the documentation disagree on {var}'s default",
                    sub.get_name()
                );
                checked += 1;
            }
        }
        // Most variables with a default are in the tables (a row that stops parsing would
        // make this test check nothing).
        assert!(checked >= 40, "only {checked} defaults checked");
    }

    #[test]
    fn queues_interval_as_the_command_line_takes_it() {
        let parse = |args: &[&str]| match parse(args)?.command {
            Command::Queues(q) => Ok(q.every()),
            _ => Err("not queues".to_owned()),
        };
        let watch = ["ringpush", "queues", "--watch", "--interval"];
        assert_eq!(
            parse(&[&watch[..], &["1"]].concat()),
            Ok(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            parse(&[&watch[..], &["2s"]].concat()),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            parse(&["ringpush", "queues", "--watch"]),
            Ok(Some(Duration::from_secs(2)))
        );
        assert_eq!(parse(&["ringpush", "queues"]), Ok(None));
        assert!(parse(&[&watch[..], &["0"]].concat()).is_err());
    }
}
