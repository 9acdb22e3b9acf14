//! The long-running services' own flags — `worker`, `feedback`, `purge` — and the settings
//! they become.

use std::time::Duration;

use clap::Args;

use super::apns::{ApnsArgs, ApnsTlsArgs};
use super::values::{address, defaults, duration, positive, shown, switch};
use super::{config_error, ApnsProtocol, BrokerArgs, ConfigError, DatabaseArgs, MetricsArgs};
use crate::apns::binary;
use crate::apns::request::AlertTemplate;
use crate::{feedback, purge, worker};

/// Bounded input, for every consumer.
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Largest message body read; a larger one goes to the dead queue unread, cut to this
    /// size, with the reason (1024 to 8388608).
    #[arg(long, env = "RINGPUSH_MAX_MESSAGE_BYTES", default_value_t = crate::broker::DEFAULT_MAX_MESSAGE_BYTES, value_parser = max_message_bytes)]
    pub max_message_bytes: usize,
}

/// A value parser for `RINGPUSH_MAX_MESSAGE_BYTES`: at least 1 KiB (a ring event with the
/// longest ids fits), at most what ringpush publishes itself (the cut copy goes to a dead
/// queue).
fn max_message_bytes(s: &str) -> Result<usize, String> {
    let max = crate::broker::MAX_BODY_BYTES;
    match s.parse::<usize>() {
        Ok(n) if (1024..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "RINGPUSH_MAX_MESSAGE_BYTES: {s:?} is not a whole number of bytes from 1024 to {max}"
        )),
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub apns: ApnsArgs,
    #[command(flatten)]
    pub fcm: super::FcmArgs,
    /// One folder per app (named by the app's id) with its `app.json` and credential files,
    /// as Kubernetes mounts one Secret per app; read again on change and on SIGHUP.
    #[arg(long, env = "RINGPUSH_APPS_DIR")]
    pub apps_dir: Option<std::path::PathBuf>,
    /// How often the app folders (and the app `default`'s certificate and service account
    /// files) are read for changes.
    #[arg(long, env = "RINGPUSH_APPS_POLL", default_value = "5s", value_parser = duration("RINGPUSH_APPS_POLL"))]
    pub apps_poll: Duration,
    /// How long a ring is worth delivering after it was pressed.
    #[arg(long, env = "RINGPUSH_RING_TTL", default_value = shown!(defaults::worker().ring_ttl), value_parser = duration("RINGPUSH_RING_TTL"))]
    pub ring_ttl: Duration,
    /// A ring nobody answered ends `missed` this long after it was pressed (at most the
    /// ring TTL).
    #[arg(long, env = "RINGPUSH_RING_TIMEOUT", default_value = shown!(defaults::worker().ring_timeout), value_parser = duration("RINGPUSH_RING_TIMEOUT"))]
    pub ring_timeout: Duration,
    /// A press of a switch less than this after its ring still ringing is folded into it,
    /// not pushed (0s: off).
    #[arg(long, env = "RINGPUSH_RING_DEBOUNCE", default_value = shown!(defaults::worker().ring_debounce), value_parser = duration("RINGPUSH_RING_DEBOUNCE"))]
    pub ring_debounce: Duration,
    /// How long a follow-up (a ring's end) is worth delivering after the end.
    #[arg(long, env = "RINGPUSH_FOLLOWUP_TTL", default_value = shown!(defaults::worker().followup_ttl), value_parser = duration("RINGPUSH_FOLLOWUP_TTL"))]
    pub followup_ttl: Duration,
    /// How long each ring's history is kept.
    #[arg(long, env = "RINGPUSH_RING_HISTORY", default_value = shown!(defaults::worker().ring_history), value_parser = duration("RINGPUSH_RING_HISTORY"))]
    pub ring_history: Duration,
    /// Unacked rings the broker may hand this worker at once.
    #[arg(long, env = "RINGPUSH_PREFETCH", default_value_t = defaults::worker().prefetch, value_parser = positive::<u16>("RINGPUSH_PREFETCH"))]
    pub prefetch: u16,
    /// Most rings looked up by one database query.
    #[arg(long, env = "RINGPUSH_BATCH_SIZE", default_value_t = defaults::worker().batch_size, value_parser = positive::<usize>("RINGPUSH_BATCH_SIZE"))]
    pub batch_size: usize,
    /// Attempts before a ring that keeps failing goes to the dead queue.
    #[arg(long, env = "RINGPUSH_MAX_ATTEMPTS", default_value_t = defaults::worker().max_attempts, value_parser = positive::<u32>("RINGPUSH_MAX_ATTEMPTS"))]
    pub max_attempts: u32,
    /// Most requests one ring has in flight at once (a building's ring shares the streams).
    #[arg(long, env = "RINGPUSH_RING_CONCURRENCY", default_value_t = defaults::worker().ring_concurrency, value_parser = positive::<usize>("RINGPUSH_RING_CONCURRENCY"))]
    pub ring_concurrency: usize,
    /// Largest body of one retry envelope; a ring with more pending tokens is split.
    #[arg(long, env = "RINGPUSH_RETRY_MAX_BYTES", default_value_t = defaults::worker().retry_max_bytes, value_parser = positive::<usize>("RINGPUSH_RETRY_MAX_BYTES"))]
    pub retry_max_bytes: usize,
    /// On SIGTERM, how long rings in flight may take before they are handed back.
    #[arg(long, env = "RINGPUSH_SHUTDOWN_GRACE", default_value = shown!(defaults::worker().grace), value_parser = duration("RINGPUSH_SHUTDOWN_GRACE"))]
    pub shutdown_grace: Duration,
    /// The delivery ledger (`on`): which tokens took which ring, so a ring seen again never
    /// rings a phone twice. `off` only to measure its cost.
    #[arg(long, env = "RINGPUSH_LEDGER", default_value = "on", value_parser = switch("RINGPUSH_LEDGER"), action = clap::ArgAction::Set)]
    pub ledger: bool,
    /// Ring claims (`on`, with the ledger): a ring is claimed before it is pushed, so a
    /// gateway's re-publish of it rings no phone twice. `off` only to measure their cost.
    #[arg(long, env = "RINGPUSH_CLAIMS", default_value = "on", value_parser = switch("RINGPUSH_CLAIMS"), action = clap::ArgAction::Set)]
    pub claims: bool,
    /// Alert title; `{gateway}` becomes the gateway's name.
    #[arg(long, env = "RINGPUSH_ALERT_TITLE", default_value_t = defaults::worker().alert.title)]
    pub alert_title: String,
    /// Alert body; `{gateway}` becomes the gateway's name.
    #[arg(long, env = "RINGPUSH_ALERT_BODY", default_value_t = defaults::worker().alert.body)]
    pub alert_body: String,
    /// `aps.sound`: `default` or a sound file in the app bundle.
    #[arg(long, env = "RINGPUSH_ALERT_SOUND", default_value_t = defaults::worker().alert.sound)]
    pub alert_sound: String,
}

impl WorkerArgs {
    /// The providers the worker pushes through now, each checked; at least one must be
    /// configured ([`WorkerArgs::apps`]).
    pub fn providers(&self) -> Result<crate::provider::Providers, ConfigError> {
        Ok(self.apps()?.providers().clone())
    }

    /// Every app: the app `default` from the single-app variables (checked here: a mistake
    /// stops the start, naming its variable) and the folders of `RINGPUSH_APPS_DIR` (a
    /// broken one is logged and counted, and waits for a good one); at least one provider.
    pub fn apps(&self) -> Result<std::sync::Arc<crate::apps::Apps>, ConfigError> {
        use crate::apps::{Apps, Built, FromEnv};
        use std::sync::Arc;
        if self.apps_poll < Duration::from_millis(100) {
            return Err(config_error("RINGPUSH_APPS_POLL", "must be at least 100ms"));
        }
        // The app default exists when a single-app credential is set — or, with no apps
        // folder, when the binary protocol is asked for (its certificate is then required).
        let credentials = self.apns.apns_key_file.is_some()
            || self.apns.apns_key_id.is_some()
            || self.apns.apns_team_id.is_some()
            || self.apns.tls.apns_cert_file.is_some()
            || self.fcm.fcm_credentials_file.is_some();
        let configured = credentials || (self.apns.configured() && self.apps_dir.is_none());
        // The deployment-wide settings are checked when something uses them.
        let refresh = match configured || self.apps_dir.is_some() {
            true => self.apns.jwt_refresh()?,
            false => self.apns.apns_jwt_refresh,
        };
        if self.fcm.fcm_credentials_file.is_some() || self.apps_dir.is_some() {
            self.fcm.check()?;
        }
        let env = match configured {
            false => None,
            true => {
                let (apns, fcm) = (self.apns.clone(), self.fcm.clone());
                let build = move || -> Result<Built, ConfigError> {
                    let topic = apns.apns_topic.clone();
                    let providers = crate::worker::providers_of(
                        apns.client_if_configured()?,
                        fcm.client()?,
                        topic,
                    );
                    Ok(Built {
                        providers,
                        expires: apns.certificate_expiry()?,
                    })
                };
                // Checked now: a mistake in the variables stops the start, naming the variable.
                build()?;
                // Read again to tell a change: the certificate and the service account, which
                // say what they are. Not the .p8 key: its key id is a variable read at start,
                // and a new key always has a new id — signing it under the old id would have
                // APNs refuse every request until the restart that reads the new id.
                let files = [
                    &self.apns.tls.apns_cert_file,
                    &self.fcm.fcm_credentials_file,
                ]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
                Some(FromEnv {
                    files,
                    build: Arc::new(move || build().map_err(|e| e.to_string())),
                })
            }
        };
        let (apns, fcm) = (self.apns.clone(), self.fcm.clone());
        let build = Arc::new(move |_app, c: &crate::apps::Credentials| {
            super::apps::build(&apns, &fcm, refresh, c)
        });
        Apps::start(self.apps_dir.clone(), env, build).map_err(|e| config_error(e.var, e.reason))
    }

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
        if self.ring_timeout.is_zero() || self.ring_timeout > self.ring_ttl {
            return Err(config_error(
                "RINGPUSH_RING_TIMEOUT",
                format!(
                    "must be more than zero and at most RINGPUSH_RING_TTL ({}): a ring is missed while it can still be followed up",
                    super::values::duration_text(self.ring_ttl)
                ),
            ));
        }
        for (var, value) in [
            ("RINGPUSH_FOLLOWUP_TTL", self.followup_ttl),
            ("RINGPUSH_RING_HISTORY", self.ring_history),
        ] {
            if value < Duration::from_secs(1) {
                return Err(config_error(var, "must be at least 1s"));
            }
        }
        if self.retry_max_bytes > crate::broker::MAX_BODY_BYTES {
            return Err(config_error(
                "RINGPUSH_RETRY_MAX_BYTES",
                format!("must be at most {} bytes", crate::broker::MAX_BODY_BYTES),
            ));
        }
        Ok(worker::Settings {
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
            ledger: self.ledger,
            claims: self.claims,
            ring_timeout: self.ring_timeout,
            ring_debounce: self.ring_debounce,
            followup_ttl: self.followup_ttl,
            ring_history: self.ring_history,
            max_message_bytes: self.input.max_message_bytes,
            ..worker::Settings::new(self.broker.names())
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct FeedbackArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// A token reported again within this window produces no second purge request.
    #[arg(long, env = "RINGPUSH_FEEDBACK_DEDUP_WINDOW", default_value = shown!(defaults::feedback().dedup_window), value_parser = duration("RINGPUSH_FEEDBACK_DEDUP_WINDOW"))]
    pub dedup_window: Duration,
    /// Unacked feedback events held at once.
    #[arg(long, env = "RINGPUSH_FEEDBACK_PREFETCH", default_value_t = defaults::feedback().prefetch, value_parser = positive::<u16>("RINGPUSH_FEEDBACK_PREFETCH"))]
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
    pub fn settings(&self) -> Result<feedback::Settings, ConfigError> {
        let service = match self.tls.apns_protocol {
            ApnsProtocol::Http2 => None,
            ApnsProtocol::Binary => Some(feedback::Service {
                address: self.apns_feedback_addr.clone(),
                tls: self.tls.binary_tls()?,
                every: self.apns_feedback_interval,
            }),
        };
        Ok(feedback::Settings {
            prefetch: self.prefetch,
            dedup_window: self.dedup_window,
            service,
            max_message_bytes: self.input.max_message_bytes,
            ..feedback::Settings::new(self.broker.names())
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Most purge requests per DELETE statement.
    #[arg(long, env = "RINGPUSH_PURGE_BATCH_SIZE", default_value_t = defaults::purge().batch_size, value_parser = positive::<usize>("RINGPUSH_PURGE_BATCH_SIZE"))]
    pub batch_size: usize,
}

impl PurgeArgs {
    pub fn settings(&self) -> purge::Settings {
        purge::Settings {
            prefetch: (self.batch_size * 2).min(u16::MAX as usize) as u16,
            batch_size: self.batch_size,
            max_message_bytes: self.input.max_message_bytes,
            ..purge::Settings::new(self.broker.names())
        }
    }
}
