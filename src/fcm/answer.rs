//! What an FCM HTTP v1 answer means (docs/design.md, "What the answers mean"): the error codes
//! of the `google.rpc.Status` body, one enum with the decisions on it, and the reading of a whole
//! answer into a [`Verdict`] — no network, table-tested.
//!
//! ```json
//! {"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
//!   "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
//!                "errorCode": "UNREGISTERED"}]}}
//! ```

use std::fmt;
use std::time::Duration;

/// FCM's error codes (`FcmError.errorCode`, else the status's `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// The token is no longer valid (the app was uninstalled, the token expired): dead.
    Unregistered,
    /// The token belongs to another sender (project): dead for us.
    SenderIdMismatch,
    /// The request is invalid: the token's fault only when the error names the token.
    InvalidArgument,
    /// The project's (or a device's) sending quota is exceeded: retry after `Retry-After`.
    QuotaExceeded,
    /// FCM is overloaded: retry.
    Unavailable,
    /// FCM failed internally: retry.
    Internal,
    /// The APNs certificate or web push key of the project is invalid (iOS through FCM):
    /// not cured by a new access token — retry, logged as an error.
    ThirdPartyAuthError,
    /// The access token is missing, expired or invalid: renew it and resend.
    Unauthenticated,
    /// The service account may not send for this project: ours to fix.
    PermissionDenied,
    /// Anything else FCM may answer (kept as it came).
    Other(String),
}

impl Code {
    pub fn parse(s: &str) -> Self {
        match s {
            "UNREGISTERED" => Code::Unregistered,
            "SENDER_ID_MISMATCH" => Code::SenderIdMismatch,
            "INVALID_ARGUMENT" => Code::InvalidArgument,
            "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" => Code::QuotaExceeded,
            "UNAVAILABLE" => Code::Unavailable,
            "INTERNAL" => Code::Internal,
            "THIRD_PARTY_AUTH_ERROR" => Code::ThirdPartyAuthError,
            "UNAUTHENTICATED" => Code::Unauthenticated,
            "PERMISSION_DENIED" => Code::PermissionDenied,
            other => Code::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Code::Unregistered => "UNREGISTERED",
            Code::SenderIdMismatch => "SENDER_ID_MISMATCH",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::QuotaExceeded => "QUOTA_EXCEEDED",
            Code::Unavailable => "UNAVAILABLE",
            Code::Internal => "INTERNAL",
            Code::ThirdPartyAuthError => "THIRD_PARTY_AUTH_ERROR",
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::Other(s) => s,
        }
    }

    /// The code of a bare HTTP status, when the body says nothing.
    fn of_status(status: u16) -> Self {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unregistered,
            429 => Code::QuotaExceeded,
            500 => Code::Internal,
            503 => Code::Unavailable,
            other => Code::Other(format!("HTTP {other}")),
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an answer means for the token it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// 200.
    Accepted,
    /// The token is dead: a feedback event (its reason is the code).
    Dead(Code),
    /// Refused for good (logged, not retried); `ours`: our project or credentials.
    Rejected { code: Code, ours: bool },
    /// Try again, not before `after` when FCM said so (`Retry-After`); `error`: log it as an
    /// error (a retry that will not cure itself, such as THIRD_PARTY_AUTH_ERROR).
    Retry {
        code: Code,
        after: Option<Duration>,
        error: bool,
    },
    /// 401 UNAUTHENTICATED: renew the access token and resend once.
    Unauthenticated,
}

/// Reads an answer: its status, its `Retry-After` header and its body.
pub fn verdict(status: u16, retry_after: Option<&str>, body: &[u8]) -> Verdict {
    if status == 200 {
        return Verdict::Accepted;
    }
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &json["error"];
    let details = error["details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let fcm_code = details
        .iter()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("FcmError")))
        .and_then(|d| d["errorCode"].as_str());
    let code = match (fcm_code, error["status"].as_str()) {
        (Some(c), _) => Code::parse(c),
        (None, Some(s)) => Code::parse(s),
        (None, None) => Code::of_status(status),
    };
    let after = retry_after.and_then(parse_retry_after);
    match code {
        Code::Unregistered | Code::SenderIdMismatch => Verdict::Dead(code),
        Code::InvalidArgument if names_the_token(error) => Verdict::Dead(code),
        Code::ThirdPartyAuthError => Verdict::Retry {
            code,
            after,
            error: true,
        },
        Code::Unauthenticated => Verdict::Unauthenticated,
        Code::QuotaExceeded | Code::Unavailable | Code::Internal => Verdict::Retry {
            code,
            after,
            error: false,
        },
        _ if status == 429 || status >= 500 => Verdict::Retry {
            code,
            after,
            error: false,
        },
        Code::PermissionDenied => Verdict::Rejected { code, ours: true },
        _ => Verdict::Rejected { code, ours: false },
    }
}

/// Whether an INVALID_ARGUMENT is about the token: a `google.rpc.BadRequest` field violation
/// on `message.token`, or a message saying the registration token is not valid.
fn names_the_token(error: &serde_json::Value) -> bool {
    let details = error["details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let violation = details.iter().any(|d| {
        d["fieldViolations"].as_array().is_some_and(|violations| {
            violations
                .iter()
                .any(|v| v["field"].as_str() == Some("message.token"))
        })
    });
    let message = error["message"].as_str().unwrap_or("").to_ascii_lowercase();
    violation || (message.contains("registration token") && message.contains("not a valid"))
}

/// `Retry-After` in whole seconds (FCM sends seconds; an HTTP date is not honoured).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(status: &str, code: Option<&str>, extra: serde_json::Value) -> Vec<u8> {
        let mut details = vec![];
        if let Some(code) = code {
            details.push(serde_json::json!({
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": code
            }));
        }
        if !extra.is_null() {
            details.push(extra);
        }
        serde_json::to_vec(&serde_json::json!({"error": {
            "code": 0, "message": "m", "status": status, "details": details
        }}))
        .unwrap()
    }

    #[test]
    fn every_code_is_decided_as_design_says() {
        let retry = |code, after| Verdict::Retry {
            code,
            after,
            error: false,
        };
        let cases: Vec<(u16, Option<&str>, Vec<u8>, Verdict)> = vec![
            (
                200,
                None,
                b"{\"name\":\"projects/p/messages/1\"}".to_vec(),
                Verdict::Accepted,
            ),
            (
                404,
                None,
                body("NOT_FOUND", Some("UNREGISTERED"), serde_json::Value::Null),
                Verdict::Dead(Code::Unregistered),
            ),
            (
                403,
                None,
                body(
                    "PERMISSION_DENIED",
                    Some("SENDER_ID_MISMATCH"),
                    serde_json::Value::Null,
                ),
                Verdict::Dead(Code::SenderIdMismatch),
            ),
            (
                400,
                None,
                body(
                    "INVALID_ARGUMENT",
                    Some("INVALID_ARGUMENT"),
                    serde_json::Value::Null,
                ),
                Verdict::Rejected {
                    code: Code::InvalidArgument,
                    ours: false,
                },
            ),
            (
                429,
                Some("7"),
                body(
                    "RESOURCE_EXHAUSTED",
                    Some("QUOTA_EXCEEDED"),
                    serde_json::Value::Null,
                ),
                retry(Code::QuotaExceeded, Some(Duration::from_secs(7))),
            ),
            (
                503,
                None,
                body("UNAVAILABLE", Some("UNAVAILABLE"), serde_json::Value::Null),
                retry(Code::Unavailable, None),
            ),
            (
                500,
                Some("2"),
                body("INTERNAL", Some("INTERNAL"), serde_json::Value::Null),
                retry(Code::Internal, Some(Duration::from_secs(2))),
            ),
            (
                502,
                None,
                b"<html>bad gateway</html>".to_vec(),
                retry(Code::Other("HTTP 502".into()), None),
            ),
            (
                401,
                None,
                body("UNAUTHENTICATED", None, serde_json::Value::Null),
                Verdict::Unauthenticated,
            ),
            (
                401,
                None,
                body(
                    "UNAUTHENTICATED",
                    Some("THIRD_PARTY_AUTH_ERROR"),
                    serde_json::Value::Null,
                ),
                Verdict::Retry {
                    code: Code::ThirdPartyAuthError,
                    after: None,
                    error: true,
                },
            ),
            (
                403,
                None,
                body("PERMISSION_DENIED", None, serde_json::Value::Null),
                Verdict::Rejected {
                    code: Code::PermissionDenied,
                    ours: true,
                },
            ),
            (
                413,
                None,
                b"".to_vec(),
                Verdict::Rejected {
                    code: Code::Other("HTTP 413".into()),
                    ours: false,
                },
            ),
            (404, None, b"".to_vec(), Verdict::Dead(Code::Unregistered)),
            (
                429,
                Some("soon"),
                b"".to_vec(),
                retry(Code::QuotaExceeded, None),
            ),
        ];
        for (status, retry_after, body, want) in cases {
            assert_eq!(verdict(status, retry_after, &body), want, "{status}");
        }
    }

    #[test]
    fn invalid_argument_is_a_dead_token_only_when_it_names_the_token() {
        let violation = serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]
        });
        let b = body("INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), violation);
        assert_eq!(verdict(400, None, &b), Verdict::Dead(Code::InvalidArgument));
        let other_field = serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.android.ttl", "description": "Invalid duration"}]
        });
        let b = body("INVALID_ARGUMENT", Some("INVALID_ARGUMENT"), other_field);
        assert!(matches!(
            verdict(400, None, &b),
            Verdict::Rejected { ours: false, .. }
        ));
        let said = serde_json::to_vec(&serde_json::json!({"error": {"code": 400,
            "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT"}}))
        .unwrap();
        assert_eq!(
            verdict(400, None, &said),
            Verdict::Dead(Code::InvalidArgument)
        );
    }
}
