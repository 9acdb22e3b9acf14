//! A ring prepared for its tokens: each payload it needs — APNs alert, APNs call (VoIP),
//! FCM alert, FCM call (templates with the token and ttl left open) — built once per ring
//! and kind and shared by every token of that kind, with what every request of the ring
//! carries (collapse id, expiration).

use std::time::Duration;

use bytes::Bytes;
use time::OffsetDateTime;

use crate::apns::request::{build_call_payload, build_payload, voip_topic, AlertTemplate};
use crate::db::Recipient;
use crate::fcm::message::{Style, Template};
use crate::token::{Kind, Platform};
use crate::wire::ring::RingEvent;

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

/// Why a ring cannot be sent to anyone of a kind (its payload would be too large).
pub type PrepareError = crate::apns::request::PayloadError;

/// A ring ready to be sent to its tokens.
#[derive(Debug, Clone)]
pub struct Prepared {
    event_id: String,
    /// `pressed_at + ring TTL` in whole Unix seconds: APNs's `apns-expiration`, and what
    /// FCM's `ttl` counts down to.
    expiration: i64,
    default_topic: Option<String>,
    apns_alert: Option<Bytes>,
    apns_call: Option<Bytes>,
    fcm_alert: Option<Template>,
    fcm_call: Option<Template>,
}

impl Prepared {
    pub(super) fn new(
        ring: &RingEvent,
        gateway_name: &str,
        recipients: &[&Recipient],
        messages: &Messages<'_>,
        fcm_channel: Option<&str>,
    ) -> Result<Self, PrepareError> {
        let wants = |platform: Platform, kind: Kind| {
            recipients
                .iter()
                .any(|r| r.token.platform() == platform && r.kind == kind)
        };
        let apns_alert = match wants(Platform::Apns, Kind::Alert) {
            true => Some(build_payload(ring, gateway_name, messages.alert)?),
            false => None,
        };
        let apns_call = match wants(Platform::Apns, Kind::Call) {
            true => Some(build_call_payload(ring, gateway_name)?),
            false => None,
        };
        // FCM's templates only when FCM is configured (else its tokens are skipped).
        let fcm = |kind| {
            let channel = fcm_channel?;
            wants(Platform::Fcm, kind).then(|| {
                let style = Style {
                    alert: messages.alert,
                    channel,
                };
                Template::new(ring, gateway_name, kind, &style)
            })
        };
        Ok(Self {
            fcm_alert: fcm(Kind::Alert),
            fcm_call: fcm(Kind::Call),
            event_id: ring.event_id.clone(),
            expiration: ring.expires_at(messages.ring_ttl),
            default_topic: messages.default_topic.map(str::to_owned),
            apns_alert,
            apns_call,
        })
    }

    /// The ring's `event_id` (`apns-collapse-id`, FCM's `tag`).
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// `apns-expiration`: when the ring stops being worth delivering, in whole Unix seconds.
    pub fn expiration(&self) -> i64 {
        self.expiration
    }

    /// The whole seconds left until the ring expires, at least 1: FCM's `ttl` for a request
    /// sent now (each send, and each retry, counts it again).
    pub fn ttl_left(&self, now: OffsetDateTime) -> u64 {
        (self.expiration - now.unix_timestamp()).max(1) as u64
    }

    /// The topic an APNs request for `r` goes to (its row's, else the default; `.voip` for a
    /// call), `None` for an FCM token or when there is none.
    pub fn topic(&self, r: &Recipient) -> Option<String> {
        if r.token.platform() != Platform::Apns {
            return None;
        }
        let topic = r.topic.as_deref().or(self.default_topic.as_deref())?;
        Some(match r.kind {
            Kind::Alert => topic.to_owned(),
            Kind::Call => voip_topic(topic),
        })
    }

    /// The FCM message of `kind`, when FCM is configured.
    pub(super) fn fcm_message(&self, kind: Kind) -> Option<&Template> {
        match kind {
            Kind::Alert => self.fcm_alert.as_ref(),
            Kind::Call => self.fcm_call.as_ref(),
        }
    }

    /// The APNs payload of `kind` (prepared for every kind among the ring's APNs tokens).
    pub(super) fn apns_payload(&self, kind: Kind) -> Bytes {
        let payload = match kind {
            Kind::Alert => &self.apns_alert,
            Kind::Call => &self.apns_call,
        };
        payload.clone().unwrap_or_default()
    }
}
