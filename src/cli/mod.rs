//! The command line, and only `main` uses it: every subcommand's flags, each with its
//! `RINGPUSH_*` variable (flags win), parsed and checked once at start-up — a bad value stops
//! the process with the variable's name — and turned into the plain settings the library's
//! modules take (`worker::Settings`, `feedback::Settings`, `purge::Settings`,
//! `mock::Settings`, `apns::http2::Settings`, `demo::Settings`, a built APNs client, a pool).
//! No module of the library imports this one. Defaults are the library's own, shown by
//! `--help` (`values`); one only the command line has is written beside its flag, once.
//!
//! - this file: the commands, the flag groups they share, the person-facing commands' flags;
//! - `apns`: protocol, endpoints, credentials, timeouts → the APNs client;
//! - `services`: `worker`, `feedback`, `purge`;
//! - `mock`: `mock-apns`;
//! - `values`: value parsers whose errors name the variable, and the defaults.

mod apns;
mod mock;
mod services;
mod values;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use self::apns::{ApnsArgs, ApnsTlsArgs, Secret};
pub use self::mock::MockArgs;
pub use self::services::{FeedbackArgs, PurgeArgs, WorkerArgs};
pub use self::values::ApnsProtocol;
use self::values::{defaults, duration, interval, positive, prefix, protocol};
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
    about = "Gets a doorbell ring onto every phone that should hear it (APNs)"
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
    /// A gateway's own broker identity (RabbitMQ user), through the management API.
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Measure throughput, latency, CPU and memory against the local broker, database and mock.
    Bench(BenchArgs),
}

/// Where the broker is and the prefix of every exchange and queue.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "RINGPUSH_AMQP_URL", default_value = defaults::AMQP_URL)]
    pub amqp_url: String,
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
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL (libpq form; `?options=-csearch_path%3Dname` selects a schema).
    #[arg(long, env = "RINGPUSH_DATABASE_URL", default_value = defaults::DATABASE_URL)]
    pub database_url: String,
    /// Most connections the pool opens.
    #[arg(long, env = "RINGPUSH_DATABASE_POOL_SIZE", default_value = "4", value_parser = positive::<usize>("RINGPUSH_DATABASE_POOL_SIZE"))]
    pub database_pool_size: usize,
    /// How long to wait for a connection from the pool, or a new one.
    #[arg(long, env = "RINGPUSH_DATABASE_TIMEOUT", default_value = "5s", value_parser = duration("RINGPUSH_DATABASE_TIMEOUT"))]
    pub database_timeout: Duration,
}

impl DatabaseArgs {
    /// The pool (connections open on first use).
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
pub struct MetricsArgs {
    /// Where /metrics, /healthz and /readyz listen.
    #[arg(long, env = "RINGPUSH_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// How often queue depths are refreshed for /metrics.
    #[arg(long, env = "RINGPUSH_QUEUE_POLL_INTERVAL", default_value = "5s", value_parser = duration("RINGPUSH_QUEUE_POLL_INTERVAL"))]
    pub queue_poll_interval: Duration,
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
    /// Publish over MQTT (QoS 1, topic `ring/<gateway_id>`, client id = gateway id), as a
    /// gateway speaking MQTT does.
    #[arg(long)]
    pub mqtt: bool,
    /// RabbitMQ's MQTT listener with --mqtt, `mqtt://[user[:password]@]host[:port]`; user and
    /// password default to those of RINGPUSH_AMQP_URL.
    #[arg(
        long,
        env = "RINGPUSH_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,
    /// The broker password, read from this file (its first line), instead of the URL's: a
    /// gateway's own identity (`ringpush gateway add`), which publishes to the rings exchange
    /// the workers declared without declaring anything itself.
    #[arg(long)]
    pub password_file: Option<std::path::PathBuf>,
}

impl RingArgs {
    /// The AMQP URL to use, and how to reach the broker.
    pub fn target(&self) -> anyhow::Result<(String, crate::ops::Via)> {
        let password = match &self.password_file {
            None => None,
            Some(path) => Some(read_password(path)?),
        };
        let amqp_url = match &password {
            Some(p) => crate::ops::with_password(&self.broker.amqp_url, p)?,
            None => self.broker.amqp_url.clone(),
        };
        let via = match self.mqtt {
            // A gateway's own identity may not declare anything.
            false => crate::ops::Via::Amqp {
                declare: password.is_none(),
            },
            true => crate::ops::Via::Mqtt(crate::ops::mqtt_target(
                &self.mqtt_url,
                &self.broker.amqp_url,
                password.as_deref(),
            )?),
        };
        Ok((amqp_url, via))
    }
}

/// A password from a file: its first line (never shown in an error).
fn read_password(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", path.display()))?;
    crate::gateway::password_from_file(&text)
        .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", path.display()))
}

/// `ringpush gateway …`: one broker identity per gateway.
#[derive(Debug, Clone, Subcommand)]
pub enum GatewayCommand {
    /// Create the gateway's broker user and its permissions (nothing changes if it exists);
    /// a generated password is printed on stdout, one line.
    Add(GatewayAddArgs),
    /// Give the gateway a new password (printed on stdout unless --password-file) and close
    /// its open connections.
    Rotate(GatewayPasswordArgs),
    /// Delete the gateway's broker user and close its connections.
    Remove(GatewayIdArgs),
    /// Every gateway identity (users tagged ringpush-gateway) and what it may publish.
    List(ManagementArgs),
}

/// The management API, and the broker whose vhost and rings exchange the permissions name.
#[derive(Debug, Clone, Args)]
pub struct ManagementArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// RabbitMQ's management API, `http://user:pass@host:15672` (an administrator's login).
    #[arg(
        long,
        env = "RINGPUSH_MANAGEMENT_URL",
        default_value = "http://guest:guest@127.0.0.1:15672",
        hide_default_value = true
    )]
    pub management_url: String,
}

impl ManagementArgs {
    pub fn management(&self) -> crate::gateway::Management {
        crate::gateway::Management::new(&self.management_url, &self.broker.amqp_url)
    }
}

#[derive(Debug, Clone, Args)]
pub struct GatewayIdArgs {
    #[command(flatten)]
    pub management: ManagementArgs,
    /// The gateway id (its broker user name): ASCII letters, digits, `-` and `_`.
    pub gateway_id: String,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayPasswordArgs {
    #[command(flatten)]
    pub id: GatewayIdArgs,
    /// Read the password from this file (its first line) instead of generating one.
    #[arg(long)]
    pub password_file: Option<std::path::PathBuf>,
}

impl GatewayPasswordArgs {
    /// The password to set, and whether it was generated (then it is printed, once).
    pub fn password(&self) -> anyhow::Result<(String, bool)> {
        match &self.password_file {
            Some(path) => Ok((read_password(path)?, false)),
            None => Ok((crate::gateway::generate_password(), true)),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GatewayAddArgs {
    #[command(flatten)]
    pub password: GatewayPasswordArgs,
    /// With --password-file: when that file does not exist, write a generated password there
    /// first (mode 0600) — for a one-shot job provisioning a gateway and its simulator.
    #[arg(long, requires = "password_file")]
    pub generate_password: bool,
}

impl GatewayAddArgs {
    /// Writes a generated password to the password file when asked and it does not exist.
    pub fn prepare_password_file(&self) -> anyhow::Result<()> {
        let Some(path) = &self.password.password_file else {
            return Ok(());
        };
        if !self.generate_password || path.exists() {
            return Ok(());
        }
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", path.display()))?;
        writeln!(file, "{}", crate::gateway::generate_password())?;
        Ok(())
    }
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
    #[arg(long, default_value = "2", value_parser = interval)]
    pub interval: Duration,
}

impl QueuesArgs {
    /// How often to refresh: `None` shows the table once.
    pub fn every(&self) -> Option<Duration> {
        self.watch.then_some(self.interval)
    }
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

/// The local broker and database the demo and the bench borrow: they use a queue prefix
/// and a schema of their own and remove both at the end.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// RabbitMQ URL.
    #[arg(long, env = "RINGPUSH_AMQP_URL", default_value = defaults::AMQP_URL)]
    pub amqp_url: String,
    /// PostgreSQL URL.
    #[arg(long, env = "RINGPUSH_DATABASE_URL", default_value = defaults::DATABASE_URL)]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// `http2`, or `binary` to run the demo over the legacy binary interface.
    #[arg(long, env = "RINGPUSH_APNS_PROTOCOL", default_value_t = ApnsProtocol::Http2, value_parser = protocol)]
    pub apns_protocol: ApnsProtocol,
}

impl DemoArgs {
    pub fn settings(&self) -> crate::demo::Settings {
        crate::demo::Settings {
            amqp_url: self.local.amqp_url.clone(),
            database_url: self.local.database_url.clone(),
            binary: self.apns_protocol == ApnsProtocol::Binary,
        }
    }
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
    #[arg(long, env = "RINGPUSH_PREFETCH", default_value_t = defaults::worker().prefetch, value_parser = positive::<u16>("RINGPUSH_PREFETCH"))]
    pub prefetch: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// After the end-to-end drain, keep rings flowing at 80% of the measured rate this long
    /// (e.g. `10m`), sampling the worker's RSS every 10 s.
    #[arg(long, value_parser = duration("--soak"))]
    pub soak: Option<Duration>,
}

impl BenchArgs {
    pub fn settings(&self) -> crate::bench::Settings {
        crate::bench::Settings {
            amqp_url: self.local.amqp_url.clone(),
            database_url: self.local.database_url.clone(),
            rings: self.rings,
            fanout: self.fanout,
            apns_requests: self.apns_requests,
            peers: self.peers,
            peer_requests: self.peer_requests,
            binary_frames: self.binary_frames,
            prefetch: self.prefetch,
            soak: self.soak,
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
    }

    #[test]
    fn with_no_flags_the_worker_runs_with_the_library_defaults() {
        let ours = worker(&[]).settings().unwrap();
        let library = defaults::worker();
        assert_eq!(
            (
                ours.prefetch,
                ours.batch_size,
                ours.ring_ttl,
                ours.max_attempts
            ),
            (
                library.prefetch,
                library.batch_size,
                library.ring_ttl,
                library.max_attempts
            )
        );
        assert_eq!(
            (ours.ring_concurrency, ours.retry_max_bytes, ours.grace),
            (
                library.ring_concurrency,
                library.retry_max_bytes,
                library.grace
            )
        );
        assert_eq!(ours.alert, library.alert);
        assert_eq!(ours.names, library.names);
    }

    #[test]
    fn help_shows_the_defaults_as_the_readme_writes_them() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        cli.build();
        let default = |sub: &str, flag: &str| {
            let sub = cli.find_subcommand(sub).unwrap();
            let arg = sub
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("--{flag}"));
            let values: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            values.join(",")
        };
        for (sub, flag, text) in [
            ("worker", "ring-ttl", "60s"),
            ("worker", "prefetch", "256"),
            ("worker", "batch-size", "64"),
            ("worker", "max-attempts", "5"),
            ("worker", "ring-concurrency", "256"),
            ("worker", "retry-max-bytes", "1048576"),
            ("worker", "shutdown-grace", "25s"),
            ("worker", "alert-title", "{gateway}"),
            ("worker", "alert-body", "Someone is at the door"),
            ("worker", "alert-sound", "default"),
            ("worker", "apns-request-timeout", "10s"),
            ("worker", "apns-connect-timeout", "10s"),
            ("worker", "apns-jwt-refresh", "50m"),
            ("worker", "apns-connections", "2"),
            ("worker", "apns-ping-interval", "60s"),
            ("worker", "apns-binary-quiet", "300ms"),
            ("worker", "apns-protocol", "http2"),
            ("worker", "queue-prefix", "ringpush"),
            ("worker", "log-format", "text"),
            ("mock-apns", "initial-streams", "1"),
            ("mock-apns", "max-streams", "1000"),
            ("mock-apns", "delay", "0s"),
            ("mock-apns", "goaway-debug", "json"),
            ("bench", "prefetch", "256"),
            ("demo", "apns-protocol", "http2"),
        ] {
            assert_eq!(default(sub, flag), text, "{sub} --{flag}");
        }
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
