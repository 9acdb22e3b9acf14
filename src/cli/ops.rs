//! The flags of the commands a person types — `ring`, `gateway …`, `queues`, `who`, `seed` —
//! and what they read before the command runs (a password file).

use std::time::Duration;

use clap::{Args, Subcommand};

use super::values::{interval, positive};
use super::{BrokerArgs, ConfigError, DatabaseArgs, ManagementTlsArgs};

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
        hide_env_values = true,
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: String,
    /// The broker password, read from this file (its first line), instead of the URL's: a
    /// gateway's own identity (`ringpush gateway add`), which publishes to the rings exchange
    /// the workers declared without declaring anything itself.
    #[arg(long)]
    pub password_file: Option<std::path::PathBuf>,
    /// Publish the end of the ring with this event id instead of a ring (ring event v2,
    /// `type: ended`), as the gateway does when someone answers.
    #[arg(long, value_name = "RING_ID")]
    pub end: Option<String>,
    /// With --end: how the ring ended — answered, declined, door_opened or cancelled.
    #[arg(long, requires = "end", default_value = "answered", value_parser = end_reason)]
    pub reason: crate::wire::ring::EndReason,
    /// With --end: the user (users.id) who answered or declined.
    #[arg(long, requires = "end")]
    pub by_user: Option<i64>,
}

/// An end's reason as a gateway may send it (`missed` is ringpush's own).
fn end_reason(s: &str) -> Result<crate::wire::ring::EndReason, String> {
    use crate::wire::ring::EndReason;
    match EndReason::from_name(s) {
        Some(EndReason::Missed) => Err(
            "missed is decided by ringpush (RINGPUSH_RING_TIMEOUT), not sent by a gateway".into(),
        ),
        Some(r) => Ok(r),
        None => Err(format!(
            "{s:?}: one of answered, declined, door_opened, cancelled"
        )),
    }
}

#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub database: super::DatabaseArgs,
    /// The gateway whose rings to show.
    pub gateway_id: String,
    /// How many rings, newest first.
    #[arg(long, default_value = "20", value_parser = positive::<i64>("--limit"))]
    pub limit: i64,
}

impl RingArgs {
    /// The end to publish (with --end): its own event id is new.
    pub fn end_event(&self) -> Option<crate::wire::ring::EndEvent> {
        let ring_id = self.end.clone()?;
        Some(crate::wire::ring::EndEvent {
            event_id: crate::token::random_hex(16),
            ring_id,
            gateway_id: self.gateway_id.clone(),
            reason: self.reason,
            by_user: self.by_user,
            at: Some(time::OffsetDateTime::now_utc()),
        })
    }

    /// The broker to use (with the gateway's password when given), and how to reach it.
    pub fn target(&self) -> anyhow::Result<(crate::broker::Endpoint, crate::ops::Via)> {
        let password = match &self.password_file {
            None => None,
            Some(path) => Some(read_password(path)?),
        };
        let endpoint = self.broker.endpoint()?;
        let amqp_url = match &password {
            Some(p) => endpoint.with_url(crate::ops::with_password(&self.broker.amqp_url, p)?),
            None => endpoint,
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

/// `ringpush service …`: one broker identity per ringpush process, least privilege per role.
#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCommand {
    /// Declare the topology and create the identity of a role — worker, feedback, purge or
    /// monitor — with exactly its permissions (nothing changes if it exists); a generated
    /// password is printed on stdout, one line.
    Add(ServiceAddArgs),
    /// Delete a service identity and close its connections.
    Remove(ServiceNameArgs),
    /// Every service identity (users tagged ringpush-<role>) and what it may do here.
    List(ManagementArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServiceNameArgs {
    #[command(flatten)]
    pub management: ManagementArgs,
    /// The identity's broker user name: ASCII letters, digits, `-` and `_`.
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServiceAddArgs {
    /// `worker`, `feedback`, `purge` or `monitor`.
    #[arg(value_parser = role)]
    pub role: crate::service::Role,
    #[command(flatten)]
    pub name: ServiceNameArgs,
    /// Read the password from this file (its first line) instead of generating one.
    #[arg(long)]
    pub password_file: Option<std::path::PathBuf>,
}

fn role(s: &str) -> Result<crate::service::Role, String> {
    crate::service::Role::parse(s).map_err(|e| e.to_string())
}

impl ServiceAddArgs {
    /// The password to set, and whether it was generated (then it is printed, once).
    pub fn password(&self) -> anyhow::Result<(String, bool)> {
        match &self.password_file {
            Some(path) => Ok((read_password(path)?, false)),
            None => Ok((crate::gateway::generate_password(), true)),
        }
    }
}

/// The management API, and the broker whose vhost and rings exchange the permissions name.
#[derive(Debug, Clone, Args)]
pub struct ManagementArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// RabbitMQ's management API, `http://user:pass@host:15672` or `https://…:15671` (an
    /// administrator's login: it creates users and declares the topology).
    #[arg(
        long,
        env = "RINGPUSH_MANAGEMENT_URL",
        hide_env_values = true,
        default_value = "http://guest:guest@127.0.0.1:15672",
        hide_default_value = true
    )]
    pub management_url: String,
    #[command(flatten)]
    pub tls: ManagementTlsArgs,
}

impl ManagementArgs {
    /// The management API, an `https://` one verified with RINGPUSH_MANAGEMENT_CA_FILE.
    pub fn management(&self) -> Result<crate::gateway::Management, ConfigError> {
        let http = self.tls.client(&self.management_url)?;
        Ok(
            crate::gateway::Management::new(&self.management_url, &self.broker.amqp_url)
                .with_client(http),
        )
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
    /// Delete every queue and the rings exchange of RINGPUSH_QUEUE_PREFIX instead (a
    /// walkthrough's or a trial's teardown), over AMQP; refused while a queue has consumers.
    #[arg(long, conflicts_with = "watch")]
    pub delete: bool,
    /// RabbitMQ's management API (`http://user:pass@host:15672` or `https://…`): every count
    /// is read from it, unacked ones included, and no AMQP connection is opened (a monitor
    /// identity's way).
    #[arg(long, env = "RINGPUSH_MANAGEMENT_URL", hide_env_values = true)]
    pub management_url: Option<String>,
    #[command(flatten)]
    pub tls: ManagementTlsArgs,
    /// Seconds between refreshes with --watch (`1`, `0.5`; a duration like `500ms` too).
    #[arg(long, default_value = "2", value_parser = interval)]
    pub interval: Duration,
}

impl QueuesArgs {
    /// How often to refresh: `None` shows the table once.
    pub fn every(&self) -> Option<Duration> {
        self.watch.then_some(self.interval)
    }

    /// The management API unacked counts come from, when RINGPUSH_MANAGEMENT_URL is set.
    pub fn management(&self) -> Result<Option<crate::ops::ManagementApi>, ConfigError> {
        let Some(url) = &self.management_url else {
            return Ok(None);
        };
        Ok(Some(crate::ops::ManagementApi {
            url: url.clone(),
            http: self.tls.client(url)?,
        }))
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
    /// How many iPhones (alert rings) its owner has.
    #[arg(long, default_value = "3")]
    pub phones: u32,
    /// How many iPhones that ring as a call (PushKit) its owner has.
    #[arg(long, default_value = "0")]
    pub call_phones: u32,
    /// How many Android phones (alert rings, through FCM) its owner has.
    #[arg(long, default_value = "0")]
    pub android: u32,
    /// How many Android phones that ring as a call its owner has.
    #[arg(long, default_value = "0")]
    pub android_call: u32,
    /// The phones' topic.
    #[arg(long, default_value = "com.example.doorbell")]
    pub topic: String,
}

impl SeedArgs {
    /// The phones to create: at least one.
    pub fn phones(&self) -> Result<crate::db::Phones, super::ConfigError> {
        let phones = crate::db::Phones {
            apns_alert: self.phones,
            apns_call: self.call_phones,
            fcm_alert: self.android,
            fcm_call: self.android_call,
        };
        if phones.total() == 0 {
            return Err(super::config_error(
                "--phones",
                "a seeded gateway needs at least one phone (--phones, --call-phones, --android, --android-call)",
            ));
        }
        Ok(phones)
    }
}
