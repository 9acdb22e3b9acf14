//! The mock's request checks, in roughly the order APNs applies them (protocol sheet A9):
//! a pure function of the request, so each rule is tested without a network.

use std::time::Duration;

use http::request::Parts;
use http::Method;

use crate::apns::jwt;
use crate::apns::Reason;
use crate::token::DeviceToken;

/// Push types APNs knows (an unknown one is `InvalidPushType`).
const PUSH_TYPES: [&str; 11] = [
    "alert",
    "background",
    "location",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "pushtotalk",
    "widgets",
    "controls",
];

/// What the mock checks a provider token against.
#[derive(Debug, Clone)]
pub struct AuthCheck {
    /// The P-256 public point JWTs must verify with; `None` skips JWT checks.
    pub public_key: Option<Vec<u8>>,
    /// The key id and team id a token must carry, when set.
    pub key_id: Option<String>,
    pub team_id: Option<String>,
    /// Tokens whose `iat` is older than this are `ExpiredProviderToken` (APNs: one hour).
    pub max_age: Duration,
}

impl Default for AuthCheck {
    fn default() -> Self {
        Self {
            public_key: None,
            key_id: None,
            team_id: None,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub(crate) struct Valid {
    pub token: DeviceToken,
    /// The provider token and its claims, when JWTs are checked (not on certificate
    /// connections, where APNs ignores `authorization`).
    pub jwt: Option<(String, jwt::Claims)>,
}

/// Checks one request; returns its device token (and JWT), or the status and reason to
/// answer. `certificate` says the connection presented a client certificate.
pub(crate) fn validate(
    parts: &Parts,
    body: &[u8],
    auth: &AuthCheck,
    certificate: bool,
    now_unix: i64,
) -> Result<Valid, (u16, Reason)> {
    let h = &parts.headers;
    let bad = |r: Reason| Err((r.status(), r));
    if h.keys().any(|k| h.get_all(k).iter().count() > 1) {
        return bad(Reason::DuplicateHeaders);
    }
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if let Some(id) = text("apns-id") {
        if !is_uuid(id) {
            return bad(Reason::BadMessageId);
        }
    }
    if parts.method != Method::POST {
        return bad(Reason::MethodNotAllowed);
    }
    if text("apns-topic").is_none_or(str::is_empty) {
        return bad(Reason::MissingTopic);
    }
    if text("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return bad(Reason::BadCollapseId);
    }
    if let Some(p) = h.get("apns-priority") {
        if !matches!(p.as_bytes(), b"1" | b"5" | b"10") {
            return bad(Reason::BadPriority);
        }
    }
    let push_type = text("apns-push-type");
    if push_type.is_some_and(|t| !PUSH_TYPES.contains(&t)) {
        return bad(Reason::InvalidPushType);
    }
    if let Some(e) = h.get("apns-expiration") {
        if std::str::from_utf8(e.as_bytes())
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_none()
        {
            return bad(Reason::BadExpirationDate);
        }
    }
    let Some(token) = parts.uri.path().strip_prefix("/3/device/") else {
        return bad(Reason::BadPath);
    };
    if token.is_empty() {
        return bad(Reason::MissingDeviceToken);
    }
    let Ok(token) = DeviceToken::parse(token) else {
        return bad(Reason::BadDeviceToken);
    };
    let jwt = match &auth.public_key {
        Some(key) if !certificate => Some(check_jwt(text("authorization"), key, auth, now_unix)?),
        _ => None,
    };
    if body.is_empty() {
        return bad(Reason::PayloadEmpty);
    }
    let limit = if push_type == Some("voip") {
        5120
    } else {
        4096
    };
    if body.len() > limit {
        return bad(Reason::PayloadTooLarge);
    }
    Ok(Valid { token, jwt })
}

fn check_jwt(
    header: Option<&str>,
    key: &[u8],
    auth: &AuthCheck,
    now_unix: i64,
) -> Result<(String, jwt::Claims), (u16, Reason)> {
    let bad = |r: Reason| Err((r.status(), r));
    let Some(token) = header.and_then(|v| v.strip_prefix("bearer ")) else {
        return bad(Reason::MissingProviderToken);
    };
    let Ok(claims) = jwt::verify(token, key) else {
        return bad(Reason::InvalidProviderToken);
    };
    let mismatch = |want: &Option<String>, got: &str| want.as_deref().is_some_and(|w| w != got);
    if mismatch(&auth.key_id, &claims.key_id) || mismatch(&auth.team_id, &claims.team_id) {
        return bad(Reason::InvalidProviderToken);
    }
    if now_unix - claims.issued_at > auth.max_age.as_secs() as i64 {
        return bad(Reason::ExpiredProviderToken);
    }
    Ok((token.to_owned(), claims))
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::jwt::{Signer, DEFAULT_REFRESH};

    const NOW: i64 = 1_800_000_000;

    fn request(edit: impl FnOnce(http::request::Builder) -> http::request::Builder) -> Parts {
        let builder = http::Request::builder()
            .method("POST")
            .uri(format!("https://localhost/3/device/{}", "ab".repeat(32)))
            .header("apns-topic", "com.example.doorbell")
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", "1800000060")
            .header("apns-collapse-id", "e1");
        edit(builder).body(()).unwrap().into_parts().0
    }

    #[test]
    fn each_rule_answers_with_its_reason() {
        let long = "c".repeat(65);
        let cases: Vec<(Parts, &[u8], Option<Reason>)> = vec![
            (request(|b| b), b"{}", None),
            (
                request(|b| b.header("apns-id", "not-a-uuid")),
                b"{}",
                Some(Reason::BadMessageId),
            ),
            (
                request(|b| b.header("apns-id", "123e4567-e89b-12d3-a456-426614174000")),
                b"{}",
                None,
            ),
            (
                request(|b| b.method("GET")),
                b"{}",
                Some(Reason::MethodNotAllowed),
            ),
            (
                request(|b| b.header("apns-collapse-id", long.as_str())),
                b"{}",
                Some(Reason::DuplicateHeaders),
            ),
            (
                request(|b| b.header("apns-priority", "10")),
                b"{}",
                Some(Reason::DuplicateHeaders),
            ),
            (
                request(|b| b.uri("https://localhost/3/device/")),
                b"{}",
                Some(Reason::MissingDeviceToken),
            ),
            (
                request(|b| b.uri("https://localhost/3/devices/ab")),
                b"{}",
                Some(Reason::BadPath),
            ),
            (
                request(|b| b.uri("https://localhost/3/device/xyz")),
                b"{}",
                Some(Reason::BadDeviceToken),
            ),
            (request(|b| b), b"", Some(Reason::PayloadEmpty)),
            (request(|b| b), &[b' '; 4097], Some(Reason::PayloadTooLarge)),
        ];
        for (i, (parts, body, want)) in cases.into_iter().enumerate() {
            let got = validate(&parts, body, &AuthCheck::default(), false, NOW)
                .err()
                .map(|(_, r)| r);
            assert_eq!(got, want, "case {i}");
        }
        // Single-header rules, built without the default header.
        let single = |name: &str, value: &str| {
            let mut parts = request(|b| b);
            parts.headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            validate(&parts, b"{}", &AuthCheck::default(), false, NOW).err()
        };
        assert_eq!(
            single("apns-collapse-id", &long),
            Some((400, Reason::BadCollapseId))
        );
        assert_eq!(
            single("apns-priority", "7"),
            Some((400, Reason::BadPriority))
        );
        assert_eq!(
            single("apns-push-type", "ring"),
            Some((400, Reason::InvalidPushType))
        );
        assert_eq!(
            single("apns-expiration", "soon"),
            Some((400, Reason::BadExpirationDate))
        );
        assert_eq!(single("apns-topic", ""), Some((400, Reason::MissingTopic)));
    }

    #[test]
    fn provider_tokens_are_checked_when_a_key_is_given() {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        let signer =
            Signer::from_pem(pem.as_bytes(), "KEY1234567", "TEAM123456", DEFAULT_REFRESH).unwrap();
        let auth = AuthCheck {
            public_key: Some(signer.public_key()),
            key_id: Some("KEY1234567".into()),
            team_id: Some("TEAM123456".into()),
            ..AuthCheck::default()
        };
        let with = |jwt: Option<String>| {
            let parts = request(|b| match jwt {
                Some(j) => b.header("authorization", format!("bearer {j}")),
                None => b,
            });
            validate(&parts, b"{}", &auth, false, NOW)
                .err()
                .map(|(_, r)| r)
        };
        assert_eq!(with(Some(signer.sign(NOW - 10))), None);
        assert_eq!(with(None), Some(Reason::MissingProviderToken));
        // On a certificate connection APNs ignores `authorization`.
        assert!(validate(&request(|b| b), b"{}", &auth, true, NOW)
            .unwrap()
            .jwt
            .is_none());
        assert_eq!(
            with(Some(signer.sign(NOW - 3601))),
            Some(Reason::ExpiredProviderToken)
        );
        assert_eq!(
            with(Some("a.b.c".into())),
            Some(Reason::InvalidProviderToken)
        );
        let other_team =
            Signer::from_pem(pem.as_bytes(), "KEY1234567", "OTHERTEAM1", DEFAULT_REFRESH).unwrap();
        assert_eq!(
            with(Some(other_team.sign(NOW))),
            Some(Reason::InvalidProviderToken)
        );
    }
}
