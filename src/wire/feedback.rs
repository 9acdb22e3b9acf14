//! Feedback event v1 (worker → `ringpush.feedback`) and purge request v1 (feedback consumer
//! → `ringpush.purge`): one JSON shape under two names (docs/design.md), read only through
//! [`Invalidation::parse`]; the version rules are in [`crate::wire`]. (Publishing one is the
//! broker's: `Invalidation::publish` is in [`crate::broker`].)
//!
//! ```json
//! {"v": 1, "token": "ab12…", "environment": "production", "topic": "com.example.doorbell",
//!  "reason": "Unregistered", "invalid_since": "2026-11-28T09:00:00Z",
//!  "observed_at": "2026-11-28T09:15:02.300Z"}
//! ```

use serde::Deserialize;
use time::OffsetDateTime;

use super::time::{format_rfc3339, parse_rfc3339, TimeError};
use crate::token::{DeviceToken, Environment, Platform};

/// A token APNs (or the legacy feedback service) or FCM says is no longer valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// The token, with its platform (the optional `"platform"`: `apns` when absent, so v1
    /// events read as they always did; written for every platform but APNs).
    pub token: DeviceToken,
    pub environment: Environment,
    /// The topic the rejected notification was sent with.
    pub topic: Option<String>,
    /// The APNs reason (`Unregistered`, `BadDeviceToken`, …), `InvalidToken` (binary status
    /// 8), `FeedbackService`, or FCM's error code (`UNREGISTERED`, `SENDER_ID_MISMATCH`,
    /// `INVALID_ARGUMENT`).
    pub reason: String,
    /// Since when the token is invalid: APNs's 410 timestamp, else the time of the answer.
    /// A token registered again after this moment is kept.
    pub invalid_since: OffsetDateTime,
    /// When ringpush heard about it.
    pub observed_at: OffsetDateTime,
}

/// A purge request (feedback consumer → `ringpush.purge`).
pub(crate) type PurgeRequest = Invalidation;

/// Why a message is not a v1 invalidation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidationError {
    #[error("not a JSON token invalidation: {0}")]
    Json(String),
    #[error("unknown version {0} (this consumer reads v 1)")]
    Version(String),
    #[error("`token`: {0}")]
    Token(String),
    #[error("`platform`: {0}")]
    Platform(String),
    #[error("`environment`: {0}")]
    Environment(String),
    #[error("`reason` is empty")]
    Reason,
    #[error("`{field}` is not an RFC 3339 time: {value:?}")]
    Time { field: &'static str, value: String },
    #[error("`{field}` is outside the years 1 to 9999 in UTC (the range both RFC 3339 and PostgreSQL hold): {value:?}")]
    OutOfRange { field: &'static str, value: String },
}

#[derive(Deserialize)]
struct Wire {
    v: serde_json::Value,
    token: String,
    #[serde(default)]
    platform: Option<String>,
    environment: String,
    topic: Option<String>,
    reason: String,
    invalid_since: String,
    observed_at: String,
}

impl Invalidation {
    pub fn parse(body: &[u8]) -> Result<Self, InvalidationError> {
        let w: Wire =
            serde_json::from_slice(body).map_err(|e| InvalidationError::Json(e.to_string()))?;
        if w.v.as_u64() != Some(1) {
            return Err(InvalidationError::Version(w.v.to_string()));
        }
        // RFC 3339 reads the year 0000 (and an offset can carry a time past either end);
        // PostgreSQL's timestamptz starts at the year 1. Refused here, such a time would fail
        // the purge of every request batched with it, each time the batch came back.
        let time = |field: &'static str, value: String| {
            parse_rfc3339(&value).map_err(|e| match e {
                TimeError::Rfc3339(_) => InvalidationError::Time { field, value },
                TimeError::OutOfRange => InvalidationError::OutOfRange { field, value },
            })
        };
        if w.reason.is_empty() {
            return Err(InvalidationError::Reason);
        }
        let platform = match &w.platform {
            None => Platform::APNS,
            Some(p) => p.parse().map_err(InvalidationError::Platform)?,
        };
        Ok(Self {
            token: DeviceToken::parse_for(platform, &w.token)
                .map_err(|e| InvalidationError::Token(e.to_string()))?,
            environment: w
                .environment
                .parse()
                .map_err(InvalidationError::Environment)?,
            topic: w.topic,
            reason: w.reason,
            invalid_since: time("invalid_since", w.invalid_since)?,
            observed_at: time("observed_at", w.observed_at)?,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::json!({
            "v": 1,
            "token": self.token.as_str(),
            "environment": self.environment.as_str(),
            "topic": self.topic,
            "reason": self.reason,
            "invalid_since": format_rfc3339(self.invalid_since),
            "observed_at": format_rfc3339(self.observed_at),
        });
        if self.token.platform() != Platform::APNS {
            json["platform"] = self.token.platform().as_str().into();
        }
        serde_json::to_vec(&json).expect("a JSON value serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn invalidations_round_trip_and_bad_ones_say_why() {
        let event = Invalidation {
            token: DeviceToken::parse(&"ab".repeat(32)).unwrap(),
            environment: Environment::Sandbox,
            topic: Some("com.example.doorbell".into()),
            reason: "Unregistered".into(),
            invalid_since: datetime!(2026-11-28 09:00:00 UTC),
            observed_at: datetime!(2026-11-28 09:15:02.3 UTC),
        };
        assert_eq!(Invalidation::parse(&event.to_json()).unwrap(), event);
        let json: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert!(
            json.get("platform").is_none(),
            "an APNs event stays v1 as it was"
        );
        let fcm = Invalidation {
            token: DeviceToken::parse_fcm("dGVz:APA91b-X").unwrap(),
            environment: Environment::Production,
            topic: None,
            reason: "UNREGISTERED".into(),
            ..event.clone()
        };
        let json: serde_json::Value = serde_json::from_slice(&fcm.to_json()).unwrap();
        assert_eq!(
            (json["platform"].as_str(), json["topic"].is_null()),
            (Some("fcm"), true)
        );
        assert_eq!(Invalidation::parse(&fcm.to_json()).unwrap(), fcm);

        let ok = r#""token":"abcd","environment":"production","topic":null,"reason":"BadDeviceToken","invalid_since":"2026-11-28T09:00:00Z","observed_at":"2026-11-28T09:00:00Z""#;
        let since = |t: &str| format!(r#"{{"v":1,{}}}"#, ok.replacen("2026-11-28T09:00:00Z", t, 1));
        let cases: &[(String, Option<&str>)] = &[
            (format!(r#"{{"v":1,{ok}}}"#), None),
            ("nope".into(), Some("not a JSON")),
            (format!(r#"{{"v":2,{ok}}}"#), Some("unknown version 2")),
            (
                format!(r#"{{"v":1,{}}}"#, ok.replace("abcd", "xyz")),
                Some("`token`"),
            ),
            (
                format!(r#"{{"v":1,{}}}"#, ok.replace("production", "staging")),
                Some("`environment`"),
            ),
            (
                format!(
                    r#"{{"v":1,"platform":"fcm",{}}}"#,
                    ok.replace("abcd", "A:b-c_d.E")
                ),
                None,
            ),
            (
                format!(r#"{{"v":1,"platform":"GCM",{ok}}}"#),
                Some("`platform`"),
            ),
            (
                format!(r#"{{"v":1,{}}}"#, ok.replace("BadDeviceToken", "")),
                Some("`reason`"),
            ),
            (since("monday"), Some("`invalid_since`")),
            (
                since("0000-12-31T23:00:00Z"),
                Some("`invalid_since` is outside the years 1 to 9999"),
            ),
            (
                since("0001-01-01T00:30:00+01:00"),
                Some("`invalid_since` is outside the years 1 to 9999"),
            ),
            (since("0001-01-01T00:00:00Z"), None),
            (
                since("9999-12-31T23:59:59-00:01"),
                Some("`invalid_since` is outside the years 1 to 9999"),
            ),
            (since("9999-12-31T23:59:59.999Z"), None),
            (
                format!(
                    r#"{{"v":1,{}}}"#,
                    ok.rsplit_once("2026-11-28T09:00:00Z")
                        .map(|(a, b)| format!("{a}9999-12-31T23:59:59-01:00{b}"))
                        .unwrap()
                ),
                Some("`observed_at` is outside the years 1 to 9999"),
            ),
        ];
        for (body, want) in cases {
            match (Invalidation::parse(body.as_bytes()), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{body}: {e}"),
                (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
            }
        }
    }
}
