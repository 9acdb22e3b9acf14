//! Ring events: what a gateway publishes when the doorbell is pressed, and (v2) when the ring
//! ends (docs/design.md, "A ring's life"); the version rules are in [`crate::wire`].
//!
//! [`Event::parse`] reads v1 (a ring) and v2 (`type`: `ring` or `ended`); everything that is
//! not a valid event comes back as a [`RingError`] whose text goes into the dead queue's
//! `x-ringpush-error`. [`RingEvent::parse`] reads only rings.

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
    #[error("unknown ring event version {0} (this worker reads v 1 and 2)")]
    Version(String),
    #[error("unknown ring event type {0} (v 2 has `ring` and `ended`)")]
    Type(String),
    #[error("unknown end reason {0} (one of answered, declined, door_opened, cancelled)")]
    Reason(String),
    #[error("`by_user` must be a user id (a whole number)")]
    ByUser,
    #[error("`at` is not an RFC 3339 time in the years 1 to 9999 (UTC): {0}")]
    At(String),
    #[error("an end, not a ring: {0}")]
    NotARing(&'static str),
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

/// How a ring ended: the end's `reason`, or `missed` (ringpush's own verdict when nobody
/// answered within the ring timeout; no gateway may send it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    Answered,
    Declined,
    DoorOpened,
    Cancelled,
    Missed,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::Answered,
        EndReason::Declined,
        EndReason::DoorOpened,
        EndReason::Cancelled,
        EndReason::Missed,
    ];

    /// Its name on the wire, in the database (`rings.state`) and in the follow-up (`state`).
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Answered => "answered",
            EndReason::Declined => "declined",
            EndReason::DoorOpened => "door_opened",
            EndReason::Cancelled => "cancelled",
            EndReason::Missed => "missed",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The end of a ring (ring event v2, `type: ended`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndEvent {
    /// This message's own id (1–64 bytes).
    pub event_id: String,
    /// The `event_id` of the ring it ends (a ring of the same gateway).
    pub ring_id: String,
    pub gateway_id: String,
    pub reason: EndReason,
    /// Who answered or declined (`users.id`).
    pub by_user: Option<i64>,
    /// When it ended, as the gateway says.
    pub at: Option<OffsetDateTime>,
}

impl EndEvent {
    /// Serialises the end as a gateway would publish it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::json!({
            "v": 2,
            "type": "ended",
            "event_id": self.event_id,
            "ring_id": self.ring_id,
            "gateway_id": self.gateway_id,
            "reason": self.reason.as_str(),
        });
        if let Some(by) = self.by_user {
            v["by_user"] = by.into();
        }
        if let Some(at) = self.at {
            v["at"] = format_rfc3339(at).into();
        }
        serde_json::to_vec(&v).expect("a JSON value serialises")
    }
}

/// A ring event of any version and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ring(RingEvent),
    Ended(EndEvent),
}

#[derive(Deserialize)]
struct Wire {
    v: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    event_id: Option<String>,
    gateway_id: Option<String>,
    pressed_at: Option<String>,
    switch_id: Option<String>,
    ring_id: Option<String>,
    reason: Option<String>,
    by_user: Option<serde_json::Value>,
    at: Option<String>,
}

impl Event {
    /// Parses a message body: v1 (a ring), or v2 with its `type`. `fallback` stands in for a
    /// ring's `pressed_at` when it has none (the AMQP timestamp, else the time the worker
    /// received it).
    pub fn parse(body: &[u8], fallback: OffsetDateTime) -> Result<Self, RingError> {
        let wire: Wire =
            serde_json::from_slice(body).map_err(|e| RingError::Json(e.to_string()))?;
        let v = match &wire.v {
            None => return Err(RingError::Missing("v")),
            Some(serde_json::Value::Number(n)) if matches!(n.as_u64(), Some(1 | 2)) => n.as_u64(),
            Some(other) => return Err(RingError::Version(other.to_string())),
        };
        let event_id = wire.event_id.ok_or(RingError::Missing("event_id"))?;
        check_event_id("event_id", &event_id)?;
        let gateway_id = wire.gateway_id.ok_or(RingError::Missing("gateway_id"))?;
        check_gateway_id(&gateway_id)?;
        let kind = match v {
            Some(1) => "ring".to_owned(),
            _ => wire.kind.ok_or(RingError::Missing("type"))?,
        };
        match kind.as_str() {
            "ring" => {
                let pressed_at = match wire.pressed_at {
                    Some(s) => parse_rfc3339(&s)
                        .map_err(|e| RingError::PressedAt(format!("{s:?}: {e}")))?,
                    None => fallback,
                };
                Ok(Event::Ring(RingEvent {
                    event_id,
                    gateway_id,
                    pressed_at,
                    switch_id: wire.switch_id,
                }))
            }
            "ended" => {
                let ring_id = wire.ring_id.ok_or(RingError::Missing("ring_id"))?;
                check_event_id("ring_id", &ring_id)?;
                let reason = wire.reason.ok_or(RingError::Missing("reason"))?;
                let reason = EndReason::from_name(&reason)
                    .ok_or_else(|| RingError::Reason(format!("{reason:?}")))?;
                let by_user = match wire.by_user {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::Number(n)) => {
                        Some(n.as_i64().ok_or(RingError::ByUser)?)
                    }
                    Some(_) => return Err(RingError::ByUser),
                };
                let at = match wire.at {
                    Some(s) => {
                        Some(parse_rfc3339(&s).map_err(|e| RingError::At(format!("{s:?}: {e}")))?)
                    }
                    None => None,
                };
                Ok(Event::Ended(EndEvent {
                    event_id,
                    ring_id,
                    gateway_id,
                    reason,
                    by_user,
                    at,
                }))
            }
            other => Err(RingError::Type(format!("{other:?}"))),
        }
    }

    pub fn gateway_id(&self) -> &str {
        match self {
            Event::Ring(r) => &r.gateway_id,
            Event::Ended(e) => &e.gateway_id,
        }
    }

    pub fn event_id(&self) -> &str {
        match self {
            Event::Ring(r) => &r.event_id,
            Event::Ended(e) => &e.event_id,
        }
    }
}

fn check_event_id(field: &'static str, id: &str) -> Result<(), RingError> {
    check_len(field, id, MAX_EVENT_ID_BYTES)?;
    if !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(RingError::NotAscii(field));
    }
    Ok(())
}

impl RingEvent {
    /// Parses a message body that must be a ring (v1, or v2 `type: ring`). `fallback_pressed_at`
    /// stands in when the event has no `pressed_at` (the AMQP timestamp, else the time the
    /// worker received it).
    pub fn parse(body: &[u8], fallback_pressed_at: OffsetDateTime) -> Result<Self, RingError> {
        match Event::parse(body, fallback_pressed_at)? {
            Event::Ring(ring) => Ok(ring),
            Event::Ended(_) => Err(RingError::NotARing("type ended")),
        }
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
            (r#"{"v":3,"event_id":"e","gateway_id":"g"}"#.into(), Err(RingError::Version("3".into()))),
            (r#"{"v":2,"event_id":"e","gateway_id":"g"}"#.into(), Err(RingError::Missing("type"))),
            (r#"{"v":2,"type":"ring","event_id":"e4","gateway_id":"g"}"#.into(), Ok(("e4", "g", NOW))),
            (r#"{"v":2,"type":"knock","event_id":"e","gateway_id":"g"}"#.into(), Err(RingError::Type("\"knock\"".into()))),
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

    #[test]
    fn parses_ends_as_the_table_says() {
        let end = |body: &str| Event::parse(body.as_bytes(), NOW);
        let got = end(r#"{"v":2,"type":"ended","event_id":"x1","ring_id":"e1","gateway_id":"gw","reason":"answered","by_user":17,"at":"2026-11-28T09:15:09Z"}"#).unwrap();
        let want = EndEvent {
            event_id: "x1".into(),
            ring_id: "e1".into(),
            gateway_id: "gw".into(),
            reason: EndReason::Answered,
            by_user: Some(17),
            at: Some(datetime!(2026-11-28 09:15:09 UTC)),
        };
        assert_eq!(got, Event::Ended(want.clone()));
        assert_eq!(
            Event::parse(&want.to_json(), NOW).unwrap(),
            Event::Ended(want)
        );
        for reason in ["declined", "door_opened", "cancelled", "missed"] {
            let body = format!(
                r#"{{"v":2,"type":"ended","event_id":"x","ring_id":"e","gateway_id":"g","reason":"{reason}"}}"#
            );
            match end(&body).unwrap() {
                Event::Ended(e) => {
                    assert_eq!((e.reason.as_str(), e.by_user, e.at), (reason, None, None))
                }
                other => panic!("{other:?}"),
            }
        }
        let refused = [
            (
                r#"{"v":2,"type":"ended","event_id":"x","gateway_id":"g","reason":"answered"}"#,
                RingError::Missing("ring_id"),
            ),
            (
                r#"{"v":2,"type":"ended","event_id":"x","ring_id":"e","gateway_id":"g"}"#,
                RingError::Missing("reason"),
            ),
            (
                r#"{"v":2,"type":"ended","event_id":"x","ring_id":"e","gateway_id":"g","reason":"hung up"}"#,
                RingError::Reason("\"hung up\"".into()),
            ),
            (
                r#"{"v":2,"type":"ended","event_id":"x","ring_id":"e","gateway_id":"g","reason":"answered","by_user":"bob"}"#,
                RingError::ByUser,
            ),
            (
                r#"{"v":2,"type":"ended","event_id":"x","ring_id":"","gateway_id":"g","reason":"answered"}"#,
                RingError::Length {
                    field: "ring_id",
                    max: 64,
                    len: 0,
                },
            ),
            // A v1 body is a ring whatever its `type` says.
        ];
        for (body, want) in refused {
            assert_eq!(end(body), Err(want), "{body}");
        }
        assert!(matches!(
            end(
                r#"{"v":2,"type":"ended","event_id":"x","ring_id":"e","gateway_id":"g","reason":"answered","at":"soon"}"#
            ),
            Err(RingError::At(_))
        ));
        assert!(matches!(
            end(r#"{"v":1,"type":"ended","event_id":"x","gateway_id":"g"}"#),
            Ok(Event::Ring(_))
        ));
        assert_eq!(
            RingEvent::parse(br#"{"v":2,"type":"ended","event_id":"x","ring_id":"e","gateway_id":"g","reason":"answered"}"#, NOW),
            Err(RingError::NotARing("type ended"))
        );
    }
}
