//! A ring prepared for its tokens: each registered provider's message for each kind of phone
//! among them — built once per ring, platform and kind, and shared by every token of that
//! kind — with what every request of the ring carries (collapse id, expiration).

use std::time::Duration;

use time::OffsetDateTime;

use std::sync::Arc;

use super::{Message, PrepareError, Provider};
use crate::db::Recipient;
use crate::token::{AppId, Kind, Platform};
use crate::wire::ring::{EndReason, RingEvent};

/// How a ring ended, as its follow-up tells the phones that took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub state: EndReason,
    /// The end's `at`, else when a worker consumed it; for `missed`, the deadline.
    pub ended_at: OffsetDateTime,
    /// The alert's body ([`followup_text`]).
    pub text: String,
    /// How long the follow-up is worth delivering after the end (`RINGPUSH_FOLLOWUP_TTL`).
    pub ttl: Duration,
}

impl Ending {
    /// `ended_at` in RFC 3339 with milliseconds, as it goes into the payload.
    pub fn ended_at_rfc3339(&self) -> String {
        crate::wire::time::format_rfc3339(self.ended_at)
    }
}

/// The follow-up's text for a ring that ended in `state` (answered or declined by the user
/// named `by`, when the end says who and the user has a name).
pub fn followup_text(state: EndReason, by: Option<&str>) -> String {
    let by = by.map(str::trim).filter(|n| !n.is_empty());
    match (state, by) {
        (EndReason::Answered, Some(name)) => format!("Answered by {name}"),
        (EndReason::Answered, None) => "Answered".into(),
        (EndReason::Declined, Some(name)) => format!("Declined by {name}"),
        (EndReason::Declined, None) => "Declined".into(),
        (EndReason::DoorOpened, _) => "Door opened".into(),
        (EndReason::Cancelled, _) => "Ring cancelled".into(),
        (EndReason::Missed, _) => "Missed ring".into(),
    }
}

/// The alert text of a ring; `{gateway}` in either template becomes the gateway's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertTemplate {
    pub title: String,
    pub body: String,
    /// The alert's sound: `default` or a sound bundled in the app.
    pub sound: String,
}

impl Default for AlertTemplate {
    fn default() -> Self {
        Self {
            title: "{gateway}".into(),
            body: "Someone is at the door".into(),
            sound: "default".into(),
        }
    }
}

/// What the worker's settings say about every notification.
#[derive(Debug, Clone, Copy)]
pub struct Messages<'a> {
    /// The alert's title, body and sound.
    pub alert: &'a AlertTemplate,
    /// `apns-topic` for APNs tokens whose row has none.
    pub default_topic: Option<&'a str>,
    /// How long a ring is worth delivering after `pressed_at`.
    pub ring_ttl: Duration,
}

/// A ring as a provider sees it while preparing its messages.
#[derive(Debug, Clone, Copy)]
pub struct Ring<'a> {
    pub event: &'a RingEvent,
    /// The gateway's name (its id when it has none): the alert's title.
    pub gateway_name: &'a str,
    pub messages: &'a Messages<'a>,
    /// Set for a follow-up: the ring has ended, and this tells the phones that took it.
    pub ending: Option<&'a Ending>,
}

/// One app's message for its tokens of a platform and kind, and the provider that made it.
type ForKind = (AppId, Platform, Kind, Arc<dyn Provider>, Message);

/// A ring ready to be sent to its tokens.
#[derive(Clone)]
pub struct Prepared {
    event_id: String,
    gateway_id: String,
    /// `pressed_at + ring TTL` in whole Unix seconds: APNs's `apns-expiration`, and what
    /// FCM's `ttl` counts down to.
    expiration: i64,
    default_topic: Option<String>,
    /// Per app, platform and kind among the tokens: the provider that prepared the message
    /// (the one its tokens are sent through, whatever a reload does meanwhile) and the
    /// message.
    messages: Vec<ForKind>,
    followup: bool,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("event_id", &self.event_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    pub(super) fn new(
        providers: &dyn Fn(AppId, Platform) -> Option<Arc<dyn Provider>>,
        event: &RingEvent,
        gateway_name: &str,
        recipients: &[&Recipient],
        messages: &Messages<'_>,
        ending: Option<&Ending>,
    ) -> Result<Self, PrepareError> {
        let ring = Ring {
            event,
            gateway_name,
            messages,
            ending,
        };
        let mut prepared: Vec<ForKind> = Vec::new();
        let mut missing: Vec<(AppId, Platform)> = Vec::new();
        for r in recipients {
            let (app, platform, kind) = (r.app, r.token.platform(), r.kind);
            if missing.contains(&(app, platform))
                || prepared
                    .iter()
                    .any(|(a, p, k, _, _)| (*a, *p, *k) == (app, platform, kind))
            {
                continue;
            }
            // An app without a provider for the platform gets no message: its tokens are
            // skipped.
            match providers(app, platform) {
                Some(provider) => {
                    let message = provider.prepare(&ring, kind)?;
                    prepared.push((app, platform, kind, provider, message));
                }
                None => missing.push((app, platform)),
            }
        }
        Ok(Self {
            event_id: event.event_id.clone(),
            gateway_id: event.gateway_id.clone(),
            // A follow-up is worth delivering its own TTL after the end.
            expiration: match ending {
                Some(e) => (e.ended_at.unix_timestamp_nanos() + e.ttl.as_nanos() as i128)
                    .div_euclid(1_000_000_000) as i64,
                None => event.expires_at(messages.ring_ttl),
            },
            default_topic: messages.default_topic.map(str::to_owned),
            messages: prepared,
            followup: ending.is_some(),
        })
    }

    /// Whether this is a ring's follow-up.
    pub fn is_followup(&self) -> bool {
        self.followup
    }

    /// The ring's `event_id` (`apns-collapse-id`, FCM's `tag`).
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The gateway that rang.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// When the ring stops being worth delivering, in whole Unix seconds
    /// (`apns-expiration`).
    pub fn expiration(&self) -> i64 {
        self.expiration
    }

    /// The topic for tokens whose row has none (`RINGPUSH_APNS_TOPIC`).
    pub fn default_topic(&self) -> Option<&str> {
        self.default_topic.as_deref()
    }

    /// The provider and the message prepared for `app`'s tokens of `platform` and `kind`
    /// (none: the app has no provider for the platform).
    pub(super) fn message(
        &self,
        app: AppId,
        platform: Platform,
        kind: Kind,
    ) -> Option<(&Arc<dyn Provider>, &Message)> {
        self.messages
            .iter()
            .find(|(a, p, k, _, _)| (*a, *p, *k) == (app, platform, kind))
            .map(|(_, _, _, provider, m)| (provider, m))
    }
}
