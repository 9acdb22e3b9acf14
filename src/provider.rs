//! The seam between the worker and the push services. The worker prepares a ring once
//! ([`Providers::prepare`]: one payload per platform and kind among its tokens), hands each
//! token to [`Providers::send`] and gets back an [`Answer`] that means the same whatever the
//! service (APNs over HTTP/2 or the legacy binary interface; FCM HTTP v1): accepted, the
//! token is dead, rejected for good, skipped (no provider for it), try again, or the service
//! could not be reached. Which service a token goes to, what request its kind becomes and
//! what each service's status codes and reasons mean is decided here, once; what becomes of
//! the ring is decided in `worker::decide` from these answers alone.

mod apns_answer;
mod fcm_answer;
pub mod guard;
mod prepare;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use tracing::warn;

use crate::apns::request::{Notification, PushType};
use crate::apns::{self, Apns, Environment};
use crate::db::Recipient;
use crate::fcm;
use crate::token::{DeviceToken, Kind, Platform};

pub use prepare::{Messages, PrepareError, Prepared};

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
        /// What it says of ringpush's configuration if every token gets it (a reason no
        /// phone can cause for all its tokens at once; [`guard`]).
        mistake: Option<guard::Mistake>,
    },
    /// The provider said the token is dead, but so it says of most tokens of the scope, or
    /// of tokens it took lately: a configuration mistake is suspected ([`guard`]). Not
    /// reported for the purge; the token goes on the retry path without spending an attempt.
    Doubted { error: String },
    /// Refused for good for another reason (a payload it will not take; with `ours`, our
    /// credentials or topic — no phone will ring until someone fixes them): counted under
    /// `reason`, not retried.
    Rejected { reason: String, ours: bool },
    /// Not sent, and never will be by this worker: no provider is configured for the token's
    /// platform, or the one configured cannot carry its kind. Counted, not retried.
    Skipped(Skip),
    /// No answer, or one that says "try again" (`answered`: the provider did answer; `after`:
    /// how long it asked to wait first — FCM's `Retry-After`).
    Retry {
        error: String,
        answered: bool,
        after: Option<std::time::Duration>,
    },
    /// No connection to the provider could be had at all: the worker's trouble, not the
    /// ring's.
    Unreachable { error: String },
}

/// Why a token was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No credentials for its platform (`RINGPUSH_FCM_CREDENTIALS_FILE`, or APNs's).
    Unconfigured(Platform),
    /// A call-style ring to an APNs token while speaking the legacy binary interface, which
    /// has no VoIP pushes.
    Unsupported,
}

impl Skip {
    /// The `outcome` label it is counted under.
    pub fn outcome(self) -> &'static str {
        match self {
            Skip::Unconfigured(_) => "unconfigured",
            Skip::Unsupported => "unsupported",
        }
    }
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

/// The providers a worker pushes through: at least one of them configured (the command line
/// checks it at start).
#[derive(Clone, Debug)]
pub struct Providers {
    /// iPhones: APNs over HTTP/2 or the legacy binary interface; `None`: not configured.
    pub apns: Option<Apns>,
    /// Android phones: FCM HTTP v1; `None`: not configured.
    pub fcm: Option<fcm::Client>,
    /// When a skipped token was last warned about, per reason (seconds since the epoch): at
    /// most one warning a minute each.
    warned: Arc<[AtomicU64; 3]>,
    /// Judges "dead" answers against the rest before they may delete a token.
    pub guard: Arc<guard::Guard>,
}

impl Providers {
    pub fn new(apns: Option<Apns>, fcm: Option<fcm::Client>) -> Self {
        Self {
            apns,
            fcm,
            warned: Arc::default(),
            guard: Arc::default(),
        }
    }

    /// Prepares a ring for `recipients`: the payload of each platform and kind among them,
    /// built once and shared by their tokens.
    pub fn prepare(
        &self,
        ring: &crate::wire::ring::RingEvent,
        gateway_name: &str,
        recipients: &[&Recipient],
        messages: &prepare::Messages<'_>,
    ) -> Result<Prepared, PrepareError> {
        let channel = self.fcm.as_ref().map(|f| f.channel());
        Prepared::new(ring, gateway_name, recipients, messages, channel)
    }

    /// Sends the ring to one token through its platform's provider and says what it means.
    pub async fn send(&self, ring: &Prepared, r: &Recipient) -> Answer {
        match r.token.platform() {
            Platform::Apns => self.send_apns(ring, r).await,
            Platform::Fcm => self.send_fcm(ring, r).await,
        }
    }

    async fn send_fcm(&self, ring: &Prepared, r: &Recipient) -> Answer {
        let (Some(fcm), Some(message)) = (&self.fcm, ring.fcm_message(r.kind)) else {
            return self.skipped(Skip::Unconfigured(Platform::Fcm));
        };
        fcm_answer::answer_of(fcm.send(message, &r.token, ring.expiration()).await)
    }

    async fn send_apns(&self, ring: &Prepared, r: &Recipient) -> Answer {
        let Some(apns) = &self.apns else {
            return self.skipped(Skip::Unconfigured(Platform::Apns));
        };
        if r.kind == Kind::Call && matches!(apns, Apns::Binary(_)) {
            return self.skipped(Skip::Unsupported);
        }
        let Some(topic) = ring.topic(r) else {
            let reason = apns::Reason::MissingTopic.to_string();
            return Answer::Rejected { reason, ours: true };
        };
        let n = Notification {
            token: r.token.clone(),
            push_type: match r.kind {
                Kind::Alert => PushType::Alert,
                Kind::Call => PushType::Voip,
            },
            topic,
            collapse_id: ring.event_id().to_owned(),
            expiration: ring.expiration(),
            payload: ring.apns_payload(r.kind),
        };
        apns_answer::answer_of(apns.send(r.environment, &n).await)
    }

    /// Counts a skipped token, warning about its reason at most once a minute.
    fn skipped(&self, skip: Skip) -> Answer {
        let slot = match skip {
            Skip::Unconfigured(Platform::Apns) => 0,
            Skip::Unconfigured(Platform::Fcm) => 1,
            Skip::Unsupported => 2,
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let last = self.warned[slot].load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60
            && self.warned[slot]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            match skip {
                Skip::Unconfigured(Platform::Fcm) => warn!("an FCM token was not pushed: FCM is not configured (RINGPUSH_FCM_CREDENTIALS_FILE); such tokens are counted as unconfigured, not retried (warned once a minute)"),
                Skip::Unconfigured(Platform::Apns) => warn!("an APNs token was not pushed: APNs is not configured (RINGPUSH_APNS_KEY_FILE or RINGPUSH_APNS_CERT_FILE); such tokens are counted as unconfigured, not retried (warned once a minute)"),
                Skip::Unsupported => warn!("a call-style ring to an APNs token was not pushed: the legacy binary interface has no VoIP pushes; counted as unsupported, not retried (warned once a minute)"),
            }
        }
        Answer::Skipped(skip)
    }

    /// The scope a token's request went under: what its answers are weighed against
    /// ([`guard`]). `topic`: the APNs topic the request was sent with.
    pub fn scope(
        &self,
        token: &DeviceToken,
        environment: Environment,
        topic: Option<&str>,
    ) -> guard::Scope {
        match token.platform() {
            Platform::Apns => guard::Scope::apns(environment, topic),
            Platform::Fcm => guard::Scope::fcm(self.fcm.as_ref().map_or("", |f| f.project())),
        }
    }

    /// Whether FCM is up as far as this worker knows (`None`: not configured).
    pub fn fcm_up(&self) -> Option<bool> {
        self.fcm.as_ref().map(fcm::Client::up)
    }

    /// Whether `environment`'s APNs endpoint can be reached now (a connection that completes
    /// its handshake): what a paused worker probes.
    pub async fn probe(&self, environment: Environment) -> Result<(), String> {
        match &self.apns {
            Some(apns) => apns.probe(environment).await.map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl From<Apns> for Providers {
    fn from(apns: Apns) -> Self {
        Providers::new(Some(apns), None)
    }
}

impl From<apns::http2::Client> for Providers {
    fn from(c: apns::http2::Client) -> Self {
        Apns::from(c).into()
    }
}

impl From<apns::binary::Client> for Providers {
    fn from(c: apns::binary::Client) -> Self {
        Apns::from(c).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::request::AlertTemplate;
    use crate::token::DeviceToken;

    fn recipient(token: DeviceToken, kind: Kind, topic: Option<&str>) -> Recipient {
        Recipient {
            token,
            kind,
            environment: Environment::Production,
            topic: topic.map(str::to_owned),
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

    #[tokio::test]
    async fn a_platform_without_a_provider_is_skipped_as_unconfigured() {
        let apns_alert = recipient(DeviceToken::parse("ab01").unwrap(), Kind::Alert, Some("t"));
        let fcm_call = recipient(DeviceToken::parse_fcm("x:y").unwrap(), Kind::Call, None);
        let alert = AlertTemplate::default();
        let messages = Messages {
            alert: &alert,
            default_topic: None,
            ring_ttl: std::time::Duration::from_secs(60),
        };
        let providers = Providers::new(None, None);
        let prepared = providers
            .prepare(&ring(), "Door", &[&apns_alert, &fcm_call], &messages)
            .unwrap();
        assert_eq!(
            providers.send(&prepared, &apns_alert).await,
            Answer::Skipped(Skip::Unconfigured(Platform::Apns))
        );
        assert_eq!(
            providers.send(&prepared, &fcm_call).await,
            Answer::Skipped(Skip::Unconfigured(Platform::Fcm))
        );
        assert!(!Answer::Skipped(Skip::Unsupported).answered());
    }

    #[test]
    fn a_call_goes_to_the_voip_topic_and_fcm_has_none() {
        let alert = AlertTemplate::default();
        let messages = Messages {
            alert: &alert,
            default_topic: Some("com.example.doorbell"),
            ring_ttl: std::time::Duration::from_secs(60),
        };
        let token = || DeviceToken::parse("ab01").unwrap();
        let cases = [
            (
                recipient(token(), Kind::Alert, None),
                Some("com.example.doorbell"),
            ),
            (
                recipient(token(), Kind::Call, None),
                Some("com.example.doorbell.voip"),
            ),
            (
                recipient(token(), Kind::Call, Some("a.b.voip")),
                Some("a.b.voip"),
            ),
            (recipient(token(), Kind::Alert, Some("a.b")), Some("a.b")),
            (
                recipient(
                    DeviceToken::parse_fcm("x:y").unwrap(),
                    Kind::Call,
                    Some("a.b"),
                ),
                None,
            ),
        ];
        let all: Vec<&Recipient> = cases.iter().map(|(r, _)| r).collect();
        let prepared = Prepared::new(&ring(), "Door", &all, &messages, Some("doorbell")).unwrap();
        for (r, want) in &cases {
            assert_eq!(prepared.topic(r).as_deref(), *want, "{r:?}");
        }
        assert_eq!(prepared.expiration(), ring().expires_at(messages.ring_ttl));
        let call: serde_json::Value =
            serde_json::from_slice(&prepared.apns_payload(Kind::Call)).unwrap();
        assert_eq!(call["gateway_name"], "Door");
        assert_eq!(call["aps"], serde_json::json!({}));
        let now = time::macros::datetime!(2026-11-28 09:15:05.900 UTC);
        assert_eq!(prepared.ttl_left(now), 57, "whole seconds left");
        let late = time::macros::datetime!(2026-11-28 09:20:00 UTC);
        assert_eq!(prepared.ttl_left(late), 1, "at least 1");
    }
}
