//! The seam between the worker and the push services. A push service is a [`Provider`]: it
//! prepares a ring's message for a kind of phone once, sends it to one token and says what
//! the answer means in the provider-neutral [`Answer`] — accepted, the token is dead,
//! rejected for good, skipped, try again, or the service could not be reached. It also says
//! whether it is up, how to probe it, whether a ring it cannot reach may be held, and what
//! it shows at `/metrics`. [`Providers`] is the registry the worker pushes through, keyed by
//! [`Platform`] (the `platform` column): APNs (`crate::apns::Provider`) and FCM
//! (`crate::fcm::Provider`) are two entries, assembled by the command line; a provider
//! defined outside this crate registers the same way (`tests/it/seam.rs`).
//!
//! Nothing here knows a particular service: what its status codes mean lives in its own
//! folder; what becomes of the ring is decided in `worker::decide` from the answers alone.

pub mod guard;
mod prepare;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tracing::warn;

use crate::db::Recipient;
use crate::token::{Environment, Kind, Platform};

pub use prepare::{followup_text, AlertTemplate, Ending, Messages, Prepared, Ring};

/// One token's answer, whatever the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The provider took the notification (not proof the phone showed it).
    Accepted,
    /// The provider says the token is dead (the app was deleted, the token expired): report
    /// it for the purge, never retry it. `since`: when the provider last knew it invalid.
    Dead {
        reason: String,
        since: OffsetDateTime,
        observed_at: OffsetDateTime,
        /// When the answer says "this token was never valid here" — the answer a
        /// configuration mistake gives every token —, the setting to check ([`guard`]).
        mistake: Option<&'static str>,
    },
    /// The provider said the token is dead, but so it says of most tokens of the scope, or
    /// of tokens it took lately: a configuration mistake is suspected ([`guard`]). Not
    /// reported for the purge; the token goes on the retry path without spending an attempt.
    Doubted { error: String },
    /// Refused for good for another reason (a payload it will not take; with `ours`, our
    /// credentials or topic — no phone will ring until someone fixes them): counted under
    /// `reason`, not retried.
    Rejected { reason: String, ours: bool },
    /// Not sent, and never will be by this worker: no provider is registered for the
    /// token's platform, or the one registered cannot carry its kind. Counted, not retried.
    Skipped(Skip),
    /// No answer, or one that says "try again" (`answered`: the provider did answer; `after`:
    /// how long it asked to wait first — FCM's `Retry-After`).
    Retry {
        error: String,
        answered: bool,
        after: Option<Duration>,
    },
    /// No connection to the provider could be had at all: the worker's trouble, not the
    /// ring's. `holds`: the provider's [`Provider::holds`].
    Unreachable { error: String, holds: bool },
}

/// Why a token was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No provider is registered for its platform (its credentials are not configured).
    Unconfigured(Platform),
    /// Its provider cannot carry its kind (a call-style ring over APNs's legacy binary
    /// interface, which has no VoIP pushes).
    Unsupported(Platform),
}

impl Answer {
    /// Whether the provider answered this request (its latency is a request's latency).
    pub fn answered(&self) -> bool {
        match self {
            Answer::Retry { answered, .. } => *answered,
            Answer::Unreachable { .. } | Answer::Skipped(_) => false,
            // Only a `Dead` answer is doubted: the provider did answer.
            Answer::Doubted { .. } => true,
            _ => true,
        }
    }
}

/// What [`Provider::send`] returns: the answer, later.
pub type Sending<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;
/// What [`Provider::probe`] returns: whether it can be reached, later.
pub type Probing<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
/// A message a provider prepared for one kind of phone, shared by every token of that kind
/// (the provider that made it reads it back with `downcast_ref`).
pub type Message = Arc<dyn Any + Send + Sync>;
/// Why a ring cannot be sent to anyone of a kind (its payload would be too large).
pub type PrepareError = Box<dyn std::error::Error + Send + Sync>;

/// A push service, as the worker uses it. Object-safe: the registry holds `Arc<dyn Provider>`.
pub trait Provider: Send + Sync + fmt::Debug + 'static {
    /// The platform whose tokens it pushes (their `platform` column).
    fn platform(&self) -> Platform;

    /// Builds the ring's message for its tokens of `kind`, once per ring and kind — for a
    /// follow-up ([`Ring::ending`] set), the message that tells the phone the ring ended.
    fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError>;

    /// Whether its tokens of `kind` get a follow-up when a ring ends; `Err` names the outcome
    /// they are counted under instead (`ringpush_followups_total{outcome}`), e.g.
    /// `skipped_voip` (Apple requires every VoIP push to report a new call).
    fn follow_up(&self, _kind: Kind) -> Result<(), &'static str> {
        Ok(())
    }

    /// Sends the prepared `message` to one token and says what the answer means.
    fn send<'a>(
        &'a self,
        ring: &'a Prepared,
        message: &'a Message,
        to: &'a Recipient,
    ) -> Sending<'a>;

    /// The topic a request for `to` goes under, when the service has topics (APNs): what a
    /// feedback event about the token names.
    fn topic(&self, _ring: &Prepared, _to: &Recipient) -> Option<String> {
        None
    }

    /// What its answers are weighed against when they say a token is dead (`guard`): the
    /// credentials and addressing the request went under.
    fn scope(&self, ring: &Prepared, to: &Recipient) -> guard::Scope;

    /// Whether a ring none of whose tokens could be reached may be held (consumption paused
    /// and this provider probed) when it is the only provider registered. A provider that
    /// says no has its unreachable tokens wait on the retry path instead.
    fn holds(&self) -> bool {
        false
    }

    /// Whether it is usable as far as this worker knows.
    fn up(&self) -> bool {
        true
    }

    /// What `/readyz` says while it is not [`up`](Provider::up).
    fn down(&self) -> String {
        format!(
            "{} unreachable; its tokens wait on the retry path",
            self.platform().provider_name()
        )
    }

    /// Whether it can be reached now (for `environment`, where that matters): what a worker
    /// paused for it probes.
    fn probe(&self, environment: Environment) -> Probing<'_>;

    /// Encodes what is known only at scrape time (connections, streams in flight).
    fn collect(&self, _e: &mut DescriptorEncoder) -> fmt::Result {
        Ok(())
    }
}

/// The providers a worker pushes through, one per platform; the guard that judges their
/// "dead" answers; the once-a-minute warnings for tokens no provider takes.
#[derive(Clone)]
pub struct Providers {
    by_platform: Arc<[Arc<dyn Provider>]>,
    /// `ringpush_<platform>_request_seconds`: each provider's request latency, send to
    /// answer (FCM's with a `Retry-After` wait included).
    request_seconds: Arc<[Histogram]>,
    /// When a skipped token was last warned about, per reason and platform (seconds since
    /// the epoch): at most one warning a minute each.
    warned: Arc<Mutex<HashMap<(Platform, bool), u64>>>,
    /// Judges "dead" answers against the rest before they may delete a token.
    pub guard: Arc<guard::Guard>,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_platform.iter()).finish()
    }
}

impl Providers {
    /// The registry of `providers`, one per platform (a second one for a platform is a
    /// mistake in the assembly: refused, naming it).
    pub fn new(providers: Vec<Arc<dyn Provider>>) -> Result<Self, String> {
        for (i, p) in providers.iter().enumerate() {
            if providers[..i].iter().any(|q| q.platform() == p.platform()) {
                return Err(format!("two providers for the platform {}", p.platform()));
            }
        }
        Ok(Self {
            request_seconds: providers
                .iter()
                .map(|_| crate::metrics::latency_histogram())
                .collect(),
            by_platform: providers.into(),
            warned: Arc::default(),
            guard: Arc::default(),
        })
    }

    /// The provider of `platform`, when one is registered.
    pub fn get(&self, platform: Platform) -> Option<&Arc<dyn Provider>> {
        self.by_platform.iter().find(|p| p.platform() == platform)
    }

    /// Registers each provider's request latency histogram,
    /// `ringpush_<platform>_request_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        for (p, h) in self.by_platform.iter().zip(self.request_seconds.iter()) {
            registry.register(
                format!("{}_request_seconds", p.platform()),
                format!(
                    "{} request latency, send to answer (a wait the service asked for included)",
                    p.platform().provider_name()
                ),
                h.clone(),
            );
        }
    }

    /// Every provider registered.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.by_platform.iter()
    }

    /// How many providers are registered.
    pub fn len(&self) -> usize {
        self.by_platform.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_platform.is_empty()
    }

    /// Prepares a ring for `recipients`: each registered provider's message for each kind
    /// among its tokens, built once and shared by them.
    pub fn prepare(
        &self,
        event: &crate::wire::ring::RingEvent,
        gateway_name: &str,
        recipients: &[&Recipient],
        messages: &Messages<'_>,
        ending: Option<&Ending>,
    ) -> Result<Prepared, PrepareError> {
        Prepared::new(self, event, gateway_name, recipients, messages, ending)
    }

    /// Whether `to` gets a follow-up when a ring ends (`Err`: the outcome it is counted under
    /// instead). A platform without a provider: `Ok` (its tokens are then skipped as
    /// unconfigured, as for a ring).
    pub fn follows_up(&self, to: &Recipient) -> Result<(), &'static str> {
        match self.get(to.token.platform()) {
            Some(p) => p.follow_up(to.kind),
            None => Ok(()),
        }
    }

    /// Sends the ring to one token through its platform's provider and says what it means.
    pub async fn send(&self, ring: &Prepared, to: &Recipient) -> Answer {
        let platform = to.token.platform();
        let at = self
            .by_platform
            .iter()
            .position(|p| p.platform() == platform);
        let (Some(at), Some(message)) = (at, ring.message(platform, to.kind)) else {
            return self.skipped(Skip::Unconfigured(platform));
        };
        let sent = Instant::now();
        let answer = self.by_platform[at].send(ring, message, to).await;
        if answer.answered() {
            self.request_seconds[at].observe(sent.elapsed().as_secs_f64());
        }
        if let Answer::Skipped(skip) = answer {
            return self.skipped(skip);
        }
        answer
    }

    /// The topic a request for `to` goes under (APNs), for the feedback event.
    pub fn topic(&self, ring: &Prepared, to: &Recipient) -> Option<String> {
        self.get(to.token.platform())?.topic(ring, to)
    }

    /// The scope `to`'s request went under (what the guard weighs its answer against).
    pub fn scope(&self, ring: &Prepared, to: &Recipient) -> guard::Scope {
        match self.get(to.token.platform()) {
            Some(p) => p.scope(ring, to),
            None => guard::Scope::new(to.token.platform(), "(no provider)"),
        }
    }

    /// Whether `platform`'s provider can be reached now: what a paused worker probes.
    pub async fn probe(&self, platform: Platform, environment: Environment) -> Result<(), String> {
        match self.get(platform) {
            Some(p) => p.probe(environment).await,
            None => Ok(()),
        }
    }

    /// Counts a skipped token, warning about its reason at most once a minute per platform.
    fn skipped(&self, skip: Skip) -> Answer {
        let (platform, unsupported) = match skip {
            Skip::Unconfigured(p) => (p, false),
            Skip::Unsupported(p) => (p, true),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let due = {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            let last = warned.entry((platform, unsupported)).or_insert(0);
            let due = now.saturating_sub(*last) >= 60;
            if due {
                *last = now;
            }
            due
        };
        if due {
            let name = platform.provider_name();
            if unsupported {
                warn!(platform = %platform, "a call-style ring to a {name} token was not pushed: {name} as configured cannot carry calls (APNs's legacy binary interface has no VoIP pushes); counted as unsupported, not retried (warned once a minute)");
            } else {
                warn!(platform = %platform, "a {name} token was not pushed: {name} is not configured ({}); such tokens are counted as unconfigured, not retried (warned once a minute)", configured_by(platform));
            }
        }
        Answer::Skipped(skip)
    }
}

/// What configures a platform's provider, for the warning about its skipped tokens.
fn configured_by(platform: Platform) -> &'static str {
    match platform {
        Platform::APNS => "RINGPUSH_APNS_KEY_FILE or RINGPUSH_APNS_CERT_FILE",
        Platform::FCM => "RINGPUSH_FCM_CREDENTIALS_FILE",
        _ => "no provider is registered for this platform",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::DeviceToken;

    fn recipient(token: DeviceToken, kind: Kind) -> Recipient {
        Recipient {
            token,
            kind,
            environment: Environment::Production,
            topic: None,
        }
    }

    fn ring() -> crate::wire::ring::RingEvent {
        crate::wire::ring::RingEvent {
            event_id: "ev-1".into(),
            gateway_id: "gw-1".into(),
            pressed_at: time::macros::datetime!(2026-11-28 09:15:02.120 UTC),
            switch_id: None,
        }
    }

    /// A provider that takes every notification and remembers the message it prepared.
    #[derive(Debug)]
    struct Echo;

    impl Provider for Echo {
        fn platform(&self) -> Platform {
            Platform::named("echo").unwrap()
        }
        fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError> {
            Ok(Arc::new(format!(
                "{} {}",
                ring.event.event_id,
                kind.as_str()
            )))
        }
        fn send<'a>(
            &'a self,
            _ring: &'a Prepared,
            message: &'a Message,
            _to: &'a Recipient,
        ) -> Sending<'a> {
            let text = message.downcast_ref::<String>().unwrap().clone();
            Box::pin(async move {
                match text.as_str() {
                    "ev-1 alert" => Answer::Accepted,
                    other => Answer::Rejected {
                        reason: other.to_owned(),
                        ours: false,
                    },
                }
            })
        }
        fn scope(&self, _ring: &Prepared, _to: &Recipient) -> guard::Scope {
            guard::Scope::new(self.platform(), "echo")
        }
        fn probe(&self, _environment: Environment) -> Probing<'_> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_platform_without_a_provider_is_skipped_and_a_registered_one_sends() {
        let echo = Platform::named("echo").unwrap();
        let apns_alert = recipient(DeviceToken::parse("ab01").unwrap(), Kind::Alert);
        let fcm_call = recipient(DeviceToken::parse_fcm("x:y").unwrap(), Kind::Call);
        let echoed = recipient(DeviceToken::parse_for(echo, "e/1").unwrap(), Kind::Alert);
        let called = recipient(DeviceToken::parse_for(echo, "e/2").unwrap(), Kind::Call);
        let alert = AlertTemplate::default();
        let messages = Messages {
            alert: &alert,
            default_topic: None,
            ring_ttl: Duration::from_secs(60),
        };
        let providers = Providers::new(vec![Arc::new(Echo)]).unwrap();
        let all = [&apns_alert, &fcm_call, &echoed, &called];
        let prepared = providers
            .prepare(&ring(), "Door", &all, &messages, None)
            .unwrap();
        assert_eq!(
            providers.send(&prepared, &apns_alert).await,
            Answer::Skipped(Skip::Unconfigured(Platform::APNS))
        );
        assert_eq!(
            providers.send(&prepared, &fcm_call).await,
            Answer::Skipped(Skip::Unconfigured(Platform::FCM))
        );
        assert_eq!(providers.send(&prepared, &echoed).await, Answer::Accepted);
        assert_eq!(
            providers.send(&prepared, &called).await,
            Answer::Rejected {
                reason: "ev-1 call".into(),
                ours: false
            },
            "each kind prepared once, from the ring"
        );
        assert!(!Answer::Skipped(Skip::Unsupported(Platform::APNS)).answered());
        assert!(Providers::new(vec![Arc::new(Echo), Arc::new(Echo)]).is_err());
    }
}
