//! Ring event v1: what a gateway publishes when the doorbell is pressed (docs/design.md); the
//! version rules are in [`crate::wire`].
//!
//! [`RingEvent::parse`] is the only way to get one; everything that is not a valid v1 ring
//! comes back as a [`RingError`] whose text goes into the dead queue's `x-ringpush-error`.

use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;

use super::time::{format_rfc3339, parse_rfc3339};

/// Longest `event_id`, in bytes: it becomes `apns-collapse-id`, which APNs caps at 64 bytes.
pub(crate) const MAX_EVENT_ID_BYTES: usize = 64;
/// Longest `gateway_id`, in bytes.
pub(crate) const MAX_GATEWAY_ID_BYTES: usize = 128;

/// A valid ring event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingEvent {
    /// Unique per press; the idempotency key and the APNs collapse id.
    pub event_id: String,
    /// The gateway that heard the switch; its owner and sharees get the ring.
    pub gateway_id: String,
    /// When the button was pressed (from the event, else the AMQP timestamp, else receipt).
    pub pressed_at: OffsetDateTime,
    /// Which switch of the gateway, when it has several.
    pub switch_id: Option<String>,
}

/// Why a message is not a ring event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("not a JSON ring event: {0}")]
    Json(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("unknown ring event version {0} (this worker reads v 1)")]
    Version(String),
    #[error("`{field}` must be 1 to {max} bytes (got {len})")]
    Length {
        field: &'static str,
        max: usize,
        len: usize,
    },
    #[error("`pressed_at` is not an RFC 3339 time in the years 1 to 9999 (UTC): {0}")]
    PressedAt(String),
    #[error("`{0}` must be printable ASCII (it becomes an HTTP/2 header)")]
    NotAscii(&'static str),
    #[error("`{0}` must not contain a NUL character")]
    Nul(&'static str),
}

#[derive(Deserialize)]
struct Wire {
    v: Option<serde_json::Value>,
    event_id: Option<String>,
    gateway_id: Option<String>,
    pressed_at: Option<String>,
    switch_id: Option<String>,
}

impl RingEvent {
    /// Parses a message body. `fallback_pressed_at` stands in when the event has no
    /// `pressed_at` (the AMQP timestamp, else the time the worker received it).
    pub fn parse(body: &[u8], fallback_pressed_at: OffsetDateTime) -> Result<Self, RingError> {
        let wire: Wire =
            serde_json::from_slice(body).map_err(|e| RingError::Json(e.to_string()))?;
        match wire.v {
            None => return Err(RingError::Missing("v")),
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(1) => {}
            Some(other) => return Err(RingError::Version(other.to_string())),
        }
        let event_id = wire.event_id.ok_or(RingError::Missing("event_id"))?;
        check_len("event_id", &event_id, MAX_EVENT_ID_BYTES)?;
        if !event_id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(RingError::NotAscii("event_id"));
        }
        let gateway_id = wire.gateway_id.ok_or(RingError::Missing("gateway_id"))?;
        check_gateway_id(&gateway_id)?;
        let pressed_at = match wire.pressed_at {
            Some(s) => {
                parse_rfc3339(&s).map_err(|e| RingError::PressedAt(format!("{s:?}: {e}")))?
            }
            None => fallback_pressed_at,
        };
        Ok(Self {
            event_id,
            gateway_id,
            pressed_at,
            switch_id: wire.switch_id,
        })
    }

    /// How long ago the button was pressed (zero if `pressed_at` is in the future).
    pub fn age(&self, now: OffsetDateTime) -> Duration {
        let age = now - self.pressed_at;
        age.try_into().unwrap_or(Duration::ZERO)
    }

    /// The moment after which the ring is worth nothing: `pressed_at + ttl`, in Unix seconds
    /// (this is `apns-expiration`).
    pub fn expires_at(&self, ttl: Duration) -> i64 {
        // In nanoseconds, so that a ring pressed at the very end of the year 9999 cannot
        // overflow the calendar.
        let nanos = self.pressed_at.unix_timestamp_nanos() + ttl.as_nanos() as i128;
        nanos.div_euclid(1_000_000_000) as i64
    }

    /// `pressed_at` in RFC 3339 with milliseconds, as it goes into the payload.
    pub fn pressed_at_rfc3339(&self) -> String {
        format_rfc3339(self.pressed_at)
    }

    /// Serialises the event as a gateway would publish it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::json!({
            "v": 1,
            "event_id": self.event_id,
            "gateway_id": self.gateway_id,
            "pressed_at": self.pressed_at_rfc3339(),
        });
        if let Some(s) = &self.switch_id {
            v["switch_id"] = serde_json::Value::String(s.clone());
        }
        serde_json::to_vec(&v).expect("a JSON value serialises")
    }
}

/// Checks a gateway id as a ring event would. PostgreSQL's `text` cannot hold a NUL: such an
/// id names no gateway, and the lookup of a batch holding it would fail every time (the
/// worker would pause and hand the batch back in a loop), so it is refused here.
pub(crate) fn check_gateway_id(id: &str) -> Result<(), RingError> {
    check_len("gateway_id", id, MAX_GATEWAY_ID_BYTES)?;
    if id.contains('\0') {
        return Err(RingError::Nul("gateway_id"));
    }
    Ok(())
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), RingError> {
    if value.is_empty() || value.len() > max {
        return Err(RingError::Length {
            field,
            max,
            len: value.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-28 09:15:10 UTC);

    #[test]
    fn parses_ring_events_as_the_table_says() {
        let long_event = "e".repeat(65);
        let long_gw = "g".repeat(129);
        type Want = Result<(&'static str, &'static str, OffsetDateTime), RingError>;
        let cases: Vec<(String, Want)> = vec![
            (
                r#"{"v":1,"event_id":"e1","gateway_id":"gw-042","pressed_at":"2026-11-28T09:15:02.120Z","switch_id":"front"}"#.into(),
                Ok(("e1", "gw-042", datetime!(2026-11-28 09:15:02.120 UTC))),
            ),
            (
                r#"{"v":1,"event_id":"e2","gateway_id":"gw","pressed_at":"2026-11-28T10:15:02+01:00","extra":[1]}"#.into(),
                Ok(("e2", "gw", datetime!(2026-11-28 09:15:02 UTC))),
            ),
            (
                r#"{"v":1,"event_id":"e3","gateway_id":"gw"}"#.into(),
                Ok(("e3", "gw", NOW)),
            ),
            ("not json".into(), Err(RingError::Json(String::new()))),
            (r#"[1,2]"#.into(), Err(RingError::Json(String::new()))),
            (r#"{"event_id":"e","gateway_id":"g"}"#.into(), Err(RingError::Missing("v"))),
            (r#"{"v":2,"event_id":"e","gateway_id":"g"}"#.into(), Err(RingError::Version("2".into()))),
            (r#"{"v":"1","event_id":"e","gateway_id":"g"}"#.into(), Err(RingError::Version("\"1\"".into()))),
            (r#"{"v":1,"gateway_id":"g"}"#.into(), Err(RingError::Missing("event_id"))),
            (r#"{"v":1,"event_id":"e"}"#.into(), Err(RingError::Missing("gateway_id"))),
            (r#"{"v":1,"event_id":"","gateway_id":"g"}"#.into(), Err(RingError::Length { field: "event_id", max: 64, len: 0 })),
            (format!(r#"{{"v":1,"event_id":"{long_event}","gateway_id":"g"}}"#), Err(RingError::Length { field: "event_id", max: 64, len: 65 })),
            (format!(r#"{{"v":1,"event_id":"e","gateway_id":"{long_gw}"}}"#), Err(RingError::Length { field: "gateway_id", max: 128, len: 129 })),
            (r#"{"v":1,"event_id":"e","gateway_id":"g\u0000"}"#.into(), Err(RingError::Nul("gateway_id"))),
            (r#"{"v":1,"event_id":"e","gateway_id":"g","pressed_at":"yesterday"}"#.into(), Err(RingError::PressedAt(String::new()))),
            // Past the calendar's end in UTC, and before the year 1.
            (r#"{"v":1,"event_id":"e","gateway_id":"g","pressed_at":"9999-12-31T23:59:59-01:00"}"#.into(), Err(RingError::PressedAt(String::new()))),
            (r#"{"v":1,"event_id":"e","gateway_id":"g","pressed_at":"0000-06-01T00:00:00Z"}"#.into(), Err(RingError::PressedAt(String::new()))),
            (
                r#"{"v":1,"event_id":"e","gateway_id":"g","pressed_at":"9999-12-31T23:59:30Z"}"#.into(),
                Ok(("e", "g", datetime!(9999-12-31 23:59:30 UTC))),
            ),
            (r#"{"v":1,"event_id":5,"gateway_id":"g"}"#.into(), Err(RingError::Json(String::new()))),
            (r#"{"v":1,"event_id":"a\nb","gateway_id":"g"}"#.into(), Err(RingError::NotAscii("event_id"))),
            (r#"{"v":1,"event_id":"café","gateway_id":"g"}"#.into(), Err(RingError::NotAscii("event_id"))),
        ];
        for (body, want) in cases {
            let got = RingEvent::parse(body.as_bytes(), NOW);
            match (got, want) {
                (Ok(ring), Ok((event, gw, at))) => {
                    assert_eq!(
                        (
                            ring.event_id.as_str(),
                            ring.gateway_id.as_str(),
                            ring.pressed_at
                        ),
                        (event, gw, at),
                        "{body}"
                    );
                }
                // Messages from serde and time are theirs to word; the variant is ours.
                (Err(RingError::Json(_)), Err(RingError::Json(_))) => {}
                (Err(RingError::PressedAt(_)), Err(RingError::PressedAt(_))) => {}
                (got, want) => assert_eq!(got.map(|_| ()), want.map(|_| ()), "{body}"),
            }
        }
    }

    #[test]
    fn age_expiry_and_round_trip() {
        let ring = RingEvent {
            event_id: "e".into(),
            gateway_id: "g".into(),
            pressed_at: datetime!(2026-11-28 09:15:02.120 UTC),
            switch_id: Some("front".into()),
        };
        assert_eq!(ring.age(NOW), Duration::from_millis(7_880));
        assert_eq!(
            ring.age(ring.pressed_at - Duration::from_secs(5)),
            Duration::ZERO
        );
        assert_eq!(
            ring.expires_at(Duration::from_secs(60)),
            ring.pressed_at.unix_timestamp() + 60
        );
        assert_eq!(ring.pressed_at_rfc3339(), "2026-11-28T09:15:02.12Z");
        assert_eq!(RingEvent::parse(&ring.to_json(), NOW).unwrap(), ring);

        // A ring pressed at the calendar's end still has an expiration (no overflow).
        let late = RingEvent {
            pressed_at: datetime!(9999-12-31 23:59:30 UTC),
            ..ring
        };
        assert_eq!(
            late.expires_at(Duration::from_secs(60)),
            late.pressed_at.unix_timestamp() + 60
        );
        assert_eq!(late.pressed_at_rfc3339(), "9999-12-31T23:59:30Z");
    }
}
