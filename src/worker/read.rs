//! Reading a delivery once: unwrapping a retry envelope (or a retry of the previous release,
//! its tokens in headers), parsing the ring event, and what needs no lookup decided at once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};
use time::OffsetDateTime;

use super::decide::{decide, Disposition, Sender, Step};
use super::HANDBACK_HEADER;
use super::{ATTEMPT_HEADER, PENDING_HEADER};
use crate::broker::RETRY_KEY;
use crate::db::rings::Ended;
use crate::db::{ClaimGuard, RingKey, TokenHash};
use crate::wire::ring::{EndEvent, EndReason, Event, RingEvent};

/// What the database says of a delivery's ring's life (asked before it is pushed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Life {
    /// Not asked yet.
    Unknown,
    /// A ring still ringing: pushed to the phones it has not reached.
    Ringing,
    /// A press folded into the ring named, still ringing (debounce): not pushed.
    Folded(String),
    /// A ring whose end is known: not pushed (no more).
    Ended,
    /// An end that ended its ring: the phones that took the ring get a follow-up.
    FollowUp(Ended),
    /// An end of a ring that had ended already (its state): nothing pushed.
    AlreadyEnded(String),
}

/// A ring as it came off the queue, read once.
pub(super) struct Incoming {
    pub(super) delivery: Delivery,
    /// The ring — for an end, the ring it names, pressed (as far as this delivery knows) when
    /// it ended: its claim is the ring's, and its freshness counts from the end.
    pub(super) ring: RingEvent,
    /// Set when the delivery is a ring's end (ring event v2, `type: ended`).
    pub(super) end: Option<EndEvent>,
    /// What the database says of the ring's life.
    pub(super) life: Life,
    /// The ring event's JSON as the gateway sent it (unwrapped from a retry envelope).
    pub(super) body: Vec<u8>,
    /// The key the gateway published with (a retry's from its envelope: it comes back from
    /// the tier with `ring.retry`).
    pub(super) routing_key: String,
    /// Attempts before this delivery (0 on a first delivery).
    pub(super) attempt: u32,
    /// The tokens a retried ring still has to reach (`None`: a first delivery, all of them).
    pub(super) pending: Option<HashSet<String>>,
    /// Whether a worker may have pushed this ring before: the broker redelivered it, it came
    /// back from a retry tier or was handed back, or it returned unsettled. Only such a ring
    /// is looked up in the ledger.
    pub(super) maybe_seen: bool,
    /// The tokens that took the ring before, as the ledger says (hashes; filled in with the
    /// lookup for a ring that `maybe_seen`, or with its claim for one claimed before).
    pub(super) recorded: HashSet<TokenHash>,
    /// The ring's claim (reserved in this process, then held in the database): one copy of a
    /// ring in hand at a time, across workers. Released when it is dropped, once the ring is
    /// settled.
    pub(super) claim: Option<ClaimGuard>,
    /// When its batch reached the worker: where the worker's share of its time begins.
    pub(super) arrived: Instant,
    /// From `pressed_at` to `arrived`, seconds: its time queued (observed once it is pushed).
    pub(super) queued: f64,
}

impl Incoming {
    pub(super) fn gateway(&self) -> &str {
        &self.ring.gateway_id
    }
    pub(super) fn event(&self) -> &str {
        &self.ring.event_id
    }
    /// The ring as the ledger and the claims name it (for an end: the ring it names).
    pub(super) fn key(&self) -> RingKey {
        RingKey {
            gateway: self.ring.gateway_id.clone(),
            event: self.ring.event_id.clone(),
        }
    }
    /// Under what the ledger records the tokens this delivery reached: the ring's key, or for
    /// a follow-up its own ([`followup_key`]).
    pub(super) fn ledger_key(&self) -> RingKey {
        match &self.life {
            Life::FollowUp(ended) => followup_key(&self.ring.gateway_id, &ended.target),
            _ => self.key(),
        }
    }
    /// The event id of the delivery as its logs name it (an end's own id).
    pub(super) fn own_event(&self) -> &str {
        self.end
            .as_ref()
            .map_or(&self.ring.event_id, |e| &e.event_id)
    }
    /// How long until the ring is no longer worth delivering.
    pub(super) fn time_left(&self, ttl: Duration) -> Duration {
        ttl.saturating_sub(self.ring.age(OffsetDateTime::now_utc()))
    }
}

/// A delivery read: a ring to push, or one whose fate is already decided (with its gateway
/// and event when it could be read, for the logs).
// Both variants carry a delivery; a `Read` lives only until it is sorted.
#[allow(clippy::large_enum_variant)]
pub(super) enum Read {
    Ring(Incoming),
    Decided(Delivery, Option<(String, String)>, Disposition),
}

/// Reads one delivery, which arrived at `arrived` (`now` on the wall clock): unwraps a retry
/// envelope, parses the ring event, and decides at once what needs no lookup (malformed →
/// dead, too old → expired or dead).
pub(super) fn read(
    delivery: Delivery,
    now: OffsetDateTime,
    arrived: Instant,
    ttl: Duration,
) -> Read {
    let fallback = delivery
        .properties
        .timestamp()
        .and_then(|t| i64::try_from(t).ok())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(crate::wire::time::in_range)
        .unwrap_or(now);
    // Logged with what could be read of it: the gateway of its routing key, its `event_id`.
    let unreadable = |delivery, ids, error: String| {
        Read::Decided(delivery, Some(ids), decide(Step::Unreadable { error }))
    };
    let delivered_with = delivery.routing_key.as_str();
    let (body, routing_key, sender, attempt, pending) =
        match crate::wire::retry::read(&delivery.data) {
            Ok(Some(envelope)) => (
                envelope.ring,
                envelope.routing_key.clone(),
                sender(delivered_with, Some(&envelope.routing_key)),
                envelope.attempt,
                Some(envelope.pending.into_iter().collect()),
            ),
            Ok(None) => (
                delivery.data.clone(),
                delivered_with.to_owned(),
                sender(delivered_with, None),
                legacy_attempt(&delivery),
                legacy_pending(&delivery),
            ),
            Err(e) => {
                let ids = readable_ids(delivered_with, &delivery.data);
                return unreadable(delivery, ids, e.to_string());
            }
        };
    let (ring, end) = match Event::parse(&body, fallback) {
        Ok(Event::Ring(ring)) => (ring, None),
        Ok(Event::Ended(end)) => {
            if end.reason == EndReason::Missed && sender != Sender::Worker {
                let error = "an end with reason `missed` is ringpush's own verdict (a ring nobody answered in time); a gateway ends a ring answered, declined, door_opened or cancelled".to_owned();
                return Read::Decided(
                    delivery,
                    Some((end.gateway_id, end.event_id)),
                    decide(Step::Unreadable { error }),
                );
            }
            // The ring it ends, "pressed" when the end was published (its AMQP timestamp,
            // else now — not the gateway's `at`, whose clock may be off): a follow-up is
            // fresh for the ring TTL after that.
            let ring = RingEvent {
                event_id: end.ring_id.clone(),
                gateway_id: end.gateway_id.clone(),
                pressed_at: fallback,
                switch_id: None,
            };
            (ring, Some(end))
        }
        Err(e) => {
            let ids = readable_ids(&routing_key, &body);
            return unreadable(delivery, ids, e.to_string());
        }
    };
    let step = Step::Arrived {
        sender,
        claimed: ring.gateway_id.clone(),
        age: ring.age(now),
        ttl,
        attempt,
        retry: pending.is_some(),
        redelivered: delivery.redelivered,
        returned: returned(&delivery),
        limit: crate::broker::DELIVERY_LIMIT as u32,
    };
    match decide(step) {
        Disposition::Continue => Read::Ring(Incoming {
            maybe_seen: delivery.redelivered
                || pending.is_some()
                || returned(&delivery) > 0
                || header(&delivery, HANDBACK_HEADER).is_some(),
            recorded: HashSet::new(),
            claim: None,
            arrived,
            queued: (now - ring.pressed_at).as_seconds_f64().max(0.0),
            delivery,
            ring,
            end,
            life: Life::Unknown,
            body,
            routing_key,
            attempt,
            pending,
        }),
        decided => {
            let event = end.map_or(ring.event_id, |e| e.event_id);
            let ids = Some((ring.gateway_id, event));
            Read::Decided(delivery, ids, decided)
        }
    }
}

/// The ledger's name for the follow-ups of ring `event` of `gateway`: the event id and a
/// control character no event id may hold, so it never names a ring.
pub(super) fn followup_key(gateway: &str, event: &str) -> RingKey {
    RingKey {
        gateway: gateway.to_owned(),
        event: format!("{event}\u{1}ended"),
    }
}

/// Who published a delivery, as its routing key says. A gateway's ring comes with
/// `ring.<gateway_id>`; a worker's retry comes back from its tier with `ring.retry` and carries
/// the gateway's key in its envelope; a ring handed back keeps its key (a retry, envelope or
/// not, goes back under `ring.retry`, as a retry tier returns it). An
/// envelope arriving under another key than the one it carries was published by a gateway
/// (the only key it may use is its own), so it is not trusted.
fn sender(delivered_with: &str, envelope_key: Option<&str>) -> Sender {
    match envelope_key {
        None => keyed(delivered_with),
        Some(carried) if delivered_with == RETRY_KEY || delivered_with == carried => keyed(carried),
        Some(carried) => Sender::Unknown {
            why: format!(
                "a retry envelope carrying {carried:?} arrived with routing key {delivered_with:?}"
            ),
        },
    }
}

fn keyed(key: &str) -> Sender {
    if key == RETRY_KEY {
        return Sender::Worker;
    }
    match key.strip_prefix("ring.") {
        Some(gateway) if !gateway.is_empty() => Sender::Gateway(gateway.to_owned()),
        _ => Sender::Unknown {
            why: format!("{key:?} is not ring.<gateway_id>"),
        },
    }
}

/// What can be read of a message that is not a ring, for its log line: the gateway its
/// routing key names (`ring.<gateway_id>`), and the `event_id` its body holds when the body is
/// a JSON object with a string there (each cut to 128 bytes); empty when unknown.
fn readable_ids(routing_key: &str, body: &[u8]) -> (String, String) {
    let cut = |s: &str| {
        let mut end = s.len().min(128);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_owned()
    };
    let gateway = match routing_key.strip_prefix("ring.") {
        Some(g) if routing_key != RETRY_KEY => cut(g),
        _ => String::new(),
    };
    let event = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("event_id")?.as_str().map(cut))
        .unwrap_or_default();
    (gateway, event)
}

pub(super) fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(&ShortString::from(name))
}

/// How often the quorum queue got this delivery back unsettled (`x-delivery-count`).
fn returned(delivery: &Delivery) -> u32 {
    match header(delivery, "x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(*n),
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

/// Attempts before this delivery, from a retry of the previous release.
fn legacy_attempt(delivery: &Delivery) -> u32 {
    match header(delivery, ATTEMPT_HEADER) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        _ => 0,
    }
}

/// The tokens a retry of the previous release still had to reach.
fn legacy_pending(delivery: &Delivery) -> Option<HashSet<String>> {
    match header(delivery, PENDING_HEADER)? {
        AMQPValue::FieldArray(tokens) => Some(
            tokens
                .as_slice()
                .iter()
                .filter_map(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_is_not_a_ring_is_logged_with_what_can_be_read_of_it() {
        let ids = |key: &str, body: &str| readable_ids(key, body.as_bytes());
        let no_gateway = r#"{"v":1,"event_id":"ev-7","pressed_at":"2026-11-28T09:15:02Z"}"#;
        assert_eq!(ids("ring.gw-1", no_gateway), ("gw-1".into(), "ev-7".into()));
        assert_eq!(ids("ring.gw-1", "not json"), ("gw-1".into(), String::new()));
        assert_eq!(
            ids("ring.retry", r#"{"event_id":5}"#),
            (String::new(), String::new())
        );
        let long = format!(r#"{{"event_id":"{}"}}"#, "é".repeat(100));
        assert!(ids("ring.x", &long).1.len() <= 128);
    }

    #[test]
    fn the_sender_comes_from_the_routing_key_and_an_envelope_only_from_a_retry_tier() {
        let gw = |id: &str| Sender::Gateway(id.into());
        assert_eq!(sender("ring.gw-a", None), gw("gw-a"));
        assert_eq!(sender("ring.gw.1", None), gw("gw.1"));
        assert_eq!(sender("ring.retry", None), Sender::Worker);
        // A worker's retry, back from its tier; a retry handed back with its own key.
        assert_eq!(sender("ring.retry", Some("ring.gw-a")), gw("gw-a"));
        assert_eq!(sender("ring.gw-a", Some("ring.gw-a")), gw("gw-a"));
        assert_eq!(sender("ring.retry", Some("ring.retry")), Sender::Worker);
        // A gateway publishing an envelope that names another gateway's key.
        assert!(matches!(
            sender("ring.gw-b", Some("ring.gw-a")),
            Sender::Unknown { .. }
        ));
        for key in ["ring", "ring.", "t-1.rings", ""] {
            assert!(matches!(sender(key, None), Sender::Unknown { .. }), "{key}");
        }
    }
}
