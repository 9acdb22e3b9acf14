//! The retry envelope: how a ring that still has tokens to reach travels through the retry
//! tiers (and, when it is given up, into the dead queue).
//!
//! A building's entrance panel may be shared with thousands of phones, so the tokens still
//! pending cannot ride in an AMQP header: a header must fit in one frame (`frame_max`,
//! 131,072 bytes by default), and a larger one makes the broker close the whole connection.
//! They go in the message body instead, next to the ring event exactly as the gateway sent
//! it:
//!
//! ```json
//! {"v":"ringpush-retry/1","attempt":2,"routing_key":"ring.gw-042",
//!  "ring":{"v":1,"event_id":"5f0c…","gateway_id":"gw-042",…},
//!  "pending":["ab12…","cd34…"]}
//! ```
//!
//! - `v` names the envelope and its version. A worker of the release before the envelope reads
//!   the body as a ring event and refuses it with a clear dead-letter reason (`unknown ring
//!   event version "ringpush-retry/1"`); a worker that meets an envelope version it does not
//!   know refuses it the same way ([`EnvelopeError::Version`]).
//! - `attempt`: attempts the ring has had (the first delivery counts as one).
//! - `routing_key`: the key the gateway published with (`ring.<gateway_id>`).
//! - `ring`: the ring event, untouched.
//! - `pending`: the tokens not yet reached. One envelope holds at most `max_bytes` of body
//!   (the worker's `RINGPUSH_RETRY_MAX_BYTES`); a ring with more pending tokens than that is
//!   split over several envelopes, each carrying a part of them, each retried on its own.
//!
//! What gateways publish (ring event v1) does not change.

use serde::Deserialize;

/// The envelope's `v`.
pub(crate) const VERSION: &str = "ringpush-retry/1";
/// Header of the previous release counting how many times a ring had been sent to the retry
/// tiers; still read, so that retries published before an upgrade go on where they were.
pub const ATTEMPT_HEADER: &str = "x-ringpush-attempt";
/// Header of the previous release listing the tokens a retried ring still had to reach (an
/// AMQP header must fit in one frame, so it could not hold a building's phones: retries now
/// carry them in the body, in the envelope). Still read, never written.
pub const PENDING_HEADER: &str = "x-ringpush-pending";
/// Every envelope version starts with this.
const FAMILY: &str = "ringpush-retry/";

/// A ring on its way through the retry tiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Attempts so far (the first delivery counts as one).
    pub attempt: u32,
    /// The routing key the gateway published the ring with.
    pub routing_key: String,
    /// The ring event's JSON, as the gateway sent it.
    pub ring: Vec<u8>,
    /// The tokens still to reach.
    pub pending: Vec<String>,
}

/// A body that says it is a retry envelope but cannot be read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("unknown retry envelope version {0:?} (this worker reads {VERSION:?})")]
    Version(String),
    #[error("not a valid retry envelope: {0}")]
    Json(String),
}

#[derive(Deserialize)]
struct Wire {
    v: String,
    attempt: u32,
    routing_key: String,
    ring: serde_json::Value,
    pending: Vec<String>,
}

/// Reads a message body: `Ok(None)` when it is not an envelope (a ring event as a gateway
/// publishes it).
pub fn read(body: &[u8]) -> Result<Option<Envelope>, EnvelopeError> {
    // Cheap test first: a gateway's ring event never carries the family name (and if one
    // does in some field, the `v` check below tells them apart).
    if !contains(body, FAMILY.as_bytes()) {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct Version {
        v: serde_json::Value,
    }
    match serde_json::from_slice::<Version>(body) {
        Ok(Version {
            v: serde_json::Value::String(v),
        }) if v.starts_with(FAMILY) => {
            if v != VERSION {
                return Err(EnvelopeError::Version(v));
            }
        }
        _ => return Ok(None),
    }
    let wire: Wire =
        serde_json::from_slice(body).map_err(|e| EnvelopeError::Json(e.to_string()))?;
    if !wire.ring.is_object() {
        return Err(EnvelopeError::Json("`ring` is not a JSON object".into()));
    }
    let ring = serde_json::to_vec(&wire.ring).map_err(|e| EnvelopeError::Json(e.to_string()))?;
    debug_assert_eq!(wire.v, VERSION);
    Ok(Some(Envelope {
        attempt: wire.attempt,
        routing_key: wire.routing_key,
        ring,
        pending: wire.pending,
    }))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Writes the envelopes for a ring with `pending` tokens: one, or as many as it takes to keep
/// each body within `max_bytes` (every envelope carries at least one token). `ring` must be
/// the ring event's JSON object.
pub fn write(
    ring: &[u8],
    attempt: u32,
    routing_key: &str,
    pending: &[&str],
    max_bytes: usize,
) -> Vec<Vec<u8>> {
    let head = {
        let mut head = format!(r#"{{"v":"{VERSION}","attempt":{attempt},"routing_key":"#);
        head.push_str(&serde_json::to_string(routing_key).expect("a string serialises"));
        head.push_str(r#","ring":"#);
        head.into_bytes()
    };
    let fixed = head.len() + ring.len() + r#","pending":[]}"#.len();
    let mut bodies = Vec::new();
    let mut tokens = pending.iter().peekable();
    while tokens.peek().is_some() {
        let mut body = Vec::with_capacity(max_bytes.min(1 << 20));
        body.extend_from_slice(&head);
        body.extend_from_slice(ring);
        body.extend_from_slice(br#","pending":["#);
        let mut size = fixed;
        let mut first = true;
        while let Some(token) = tokens.peek() {
            let quoted = serde_json::to_string(token).expect("a string serialises");
            let cost = quoted.len() + usize::from(!first);
            if !first && size + cost > max_bytes {
                break;
            }
            if !first {
                body.push(b',');
            }
            body.extend_from_slice(quoted.as_bytes());
            size += cost;
            first = false;
            tokens.next();
        }
        body.extend_from_slice(b"]}");
        bodies.push(body);
    }
    bodies
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: &[u8] =
        br#"{"v":1,"event_id":"e-1","gateway_id":"gw-042","pressed_at":"2026-11-28T09:15:02.120Z","extra":[1,2]}"#;

    fn tokens(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:064x}")).collect()
    }

    #[test]
    fn ten_thousand_pending_tokens_round_trip_in_one_envelope() {
        let pending = tokens(10_000);
        let refs: Vec<&str> = pending.iter().map(String::as_str).collect();
        let bodies = write(RING, 3, "ring.gw-042", &refs, 1 << 20);
        assert_eq!(
            bodies.len(),
            1,
            "10,000 tokens of 64 hex digits fit in 1 MiB"
        );
        let envelope = read(&bodies[0]).unwrap().expect("an envelope");
        assert_eq!(envelope.attempt, 3);
        assert_eq!(envelope.routing_key, "ring.gw-042");
        assert_eq!(envelope.pending, pending);
        let ring: serde_json::Value = serde_json::from_slice(&envelope.ring).unwrap();
        assert_eq!(
            ring,
            serde_json::from_slice::<serde_json::Value>(RING).unwrap()
        );
    }

    #[test]
    fn ten_thousand_pending_tokens_split_over_envelopes_within_the_size_bound() {
        let pending = tokens(10_000);
        let refs: Vec<&str> = pending.iter().map(String::as_str).collect();
        let max = 64 * 1024;
        let bodies = write(RING, 1, "ring.gw-042", &refs, max);
        assert!(bodies.len() > 10, "split into many: {}", bodies.len());
        let mut seen = Vec::new();
        for body in &bodies {
            assert!(body.len() <= max, "{} bytes over {max}", body.len());
            let envelope = read(body).unwrap().unwrap();
            assert!(!envelope.pending.is_empty());
            assert_eq!(envelope.attempt, 1);
            seen.extend(envelope.pending);
        }
        assert_eq!(seen, pending, "every token once, in order");
    }

    #[test]
    fn a_bound_smaller_than_one_token_still_carries_one_token_per_envelope() {
        let pending = tokens(3);
        let refs: Vec<&str> = pending.iter().map(String::as_str).collect();
        let bodies = write(RING, 1, "ring.x", &refs, 10);
        assert_eq!(bodies.len(), 3);
    }

    #[test]
    fn a_gateway_ring_event_is_not_an_envelope() {
        assert_eq!(read(RING).unwrap(), None);
        // Mentioning the family name in some field does not make it one.
        let sneaky = br#"{"v":1,"event_id":"ringpush-retry/1","gateway_id":"g"}"#;
        assert_eq!(read(sneaky).unwrap(), None);
        assert_eq!(read(b"not json ringpush-retry/").unwrap(), None);
    }

    #[test]
    fn an_unknown_envelope_version_is_refused_with_its_name() {
        let body =
            br#"{"v":"ringpush-retry/9","attempt":1,"routing_key":"r","ring":{},"pending":[]}"#;
        let e = read(body).unwrap_err();
        assert!(e.to_string().contains("ringpush-retry/9"), "{e}");
        let broken = br#"{"v":"ringpush-retry/1","attempt":"x"}"#;
        assert!(matches!(read(broken), Err(EnvelopeError::Json(_))));
    }

    #[test]
    fn a_worker_of_the_previous_release_refuses_an_envelope_with_a_clear_reason() {
        // The previous release reads every body as a ring event: the envelope's `v` is
        // refused by name (as this release's ring parser refuses it).
        let body = write(RING, 1, "ring.gw-042", &["ab"], 1 << 20).remove(0);
        let e = crate::wire::ring::RingEvent::parse(&body, time::OffsetDateTime::now_utc())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown ring event version \"ringpush-retry/1\" (this worker reads v 1 and 2)"
        );
    }

    #[test]
    fn routing_keys_and_tokens_are_escaped() {
        let bodies = write(RING, 1, "ring.\"q\"", &["a\"b"], 1 << 20);
        let envelope = read(&bodies[0]).unwrap().unwrap();
        assert_eq!(envelope.routing_key, "ring.\"q\"");
        assert_eq!(envelope.pending, vec!["a\"b".to_string()]);
    }
}
