//! The mock's request checks, in roughly the order APNs applies them (protocol sheet A9):
//! a pure function of the request, so each rule is tested without a network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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

/// One signing key the mock accepts (an Apple team's .p8, by its public half).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    /// The P-256 public point its JWTs verify with.
    pub public_key: Vec<u8>,
    /// The `kid` its JWTs carry; `None` takes any (`mock-apns` without `--key-id`).
    pub key_id: Option<String>,
    /// The team its JWTs must name as `iss`; `None` takes any.
    pub team_id: Option<String>,
}

impl KeyCheck {
    /// A key with its id and team.
    pub fn new(public_key: Vec<u8>, key_id: &str, team_id: &str) -> Self {
        Self {
            public_key,
            key_id: Some(key_id.to_owned()),
            team_id: Some(team_id.to_owned()),
        }
    }

    /// A key from PEM — a public key (SPKI) or the .p8 itself — with its id and team.
    pub fn from_pem(pem: &[u8], key_id: &str, team_id: &str) -> Result<Self, jwt::JwtError> {
        Ok(Self::new(jwt::public_key_from_pem(pem)?, key_id, team_id))
    }
}

/// What the mock checks a provider token against.
#[derive(Debug, Clone)]
pub struct AuthCheck {
    /// The keys JWTs may be signed with, told apart by `kid`; none: JWTs are not checked.
    pub keys: Vec<KeyCheck>,
    /// The team each topic belongs to (a topic `T` also covers `T.voip`): a JWT of another
    /// team is `TopicDisallowed` for it. Topics not listed take any team.
    pub topics: HashMap<String, String>,
    /// Tokens whose `iat` is older than this are `ExpiredProviderToken` (APNs: one hour).
    pub max_age: Duration,
    /// Signatures verified already.
    verified: Verified,
}

impl Default for AuthCheck {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            topics: HashMap::new(),
            max_age: Duration::from_secs(3600),
            verified: Verified::default(),
        }
    }
}

/// The JWTs whose signature verified, each with the public key it verified with and its
/// claims: a client sends one token for many requests (ringpush: for 20 to 60 minutes), and
/// verifying its ECDSA signature on every request made the mock several times dearer per
/// request than a client (60 µs against 20), the limit of any bench run against it. Exact:
/// a signature that verified with a key always does; a remembered token is taken only while
/// that key is accepted under the token's `kid`, and its team and age are checked on every
/// request as before. Shared by the clones of an [`AuthCheck`].
#[derive(Clone, Default)]
struct Verified(Arc<Mutex<HashMap<String, Remembered>>>);

/// A verified token's public key and claims.
type Remembered = (Vec<u8>, jwt::Claims);

/// Tokens remembered at most (then forgotten all at once: clients change tokens rarely).
const VERIFIED_MAX: usize = 4096;

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        write!(f, "Verified({n} tokens)")
    }
}

impl Verified {
    /// The accepted key `token` verified with before, and its claims.
    fn get<'a>(&self, token: &str, keys: &'a [KeyCheck]) -> Option<(&'a KeyCheck, jwt::Claims)> {
        let memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (public_key, claims) = memo.get(token)?;
        let key = keys.iter().find(|k| {
            k.public_key == *public_key && k.key_id.as_deref().is_none_or(|id| id == claims.key_id)
        })?;
        Some((key, claims.clone()))
    }

    fn put(&self, token: &str, public_key: &[u8], claims: &jwt::Claims) {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= VERIFIED_MAX {
            memo.clear();
        }
        memo.insert(token.to_owned(), (public_key.to_owned(), claims.clone()));
    }
}

impl AuthCheck {
    /// Checks JWTs against one key.
    pub fn key(key: KeyCheck) -> Self {
        Self {
            keys: vec![key],
            ..Self::default()
        }
    }

    /// Accepts `key` from now on, in place of an accepted key with the same id.
    pub(crate) fn add_key(&mut self, key: KeyCheck) {
        self.keys
            .retain(|k| key.key_id.is_none() || k.key_id != key.key_id);
        self.keys.push(key);
    }

    /// The team `topic` belongs to, when listed (itself, or the app of a `.voip` topic).
    fn team_of(&self, topic: &str) -> Option<&str> {
        self.topics
            .get(topic)
            .or_else(|| topic.strip_suffix(".voip").and_then(|t| self.topics.get(t)))
            .map(String::as_str)
    }
}

/// What a client certificate says about the connection it opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientCert {
    /// The topic it is issued for (its UID, or its CN `Apple Push Services: <topic>`), when
    /// it names one: requests for other topics are `TopicDisallowed`.
    pub topic: Option<String>,
}

impl ClientCert {
    /// Whether the certificate may send to `topic`: its own, and its `.voip` topic.
    fn covers(&self, topic: &str) -> bool {
        self.topic
            .as_deref()
            .is_none_or(|own| topic == own || topic.strip_suffix(".voip") == Some(own))
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
/// answer. `certificate` is the client certificate the connection presented, if any.
pub(crate) fn validate(
    parts: &Parts,
    body: &[u8],
    auth: &AuthCheck,
    certificate: Option<&ClientCert>,
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
    let topic = match text("apns-topic") {
        Some(t) if !t.is_empty() => t,
        _ => return bad(Reason::MissingTopic),
    };
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
    let jwt = match certificate {
        Some(cert) if !cert.covers(topic) => return bad(Reason::TopicDisallowed),
        None if !auth.keys.is_empty() => {
            let (token, claims) = check_jwt(text("authorization"), auth, now_unix)?;
            if auth.team_of(topic).is_some_and(|t| t != claims.team_id) {
                return bad(Reason::TopicDisallowed);
            }
            Some((token, claims))
        }
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

/// Verifies the JWT with the accepted key its `kid` names, and its `iss` against that
/// key's team.
fn check_jwt(
    header: Option<&str>,
    auth: &AuthCheck,
    now_unix: i64,
) -> Result<(String, jwt::Claims), (u16, Reason)> {
    let bad = |r: Reason| Err((r.status(), r));
    let Some(token) = header.and_then(|v| v.strip_prefix("bearer ")) else {
        return bad(Reason::MissingProviderToken);
    };
    let verified = match auth.verified.get(token, &auth.keys) {
        Some(hit) => Some(hit),
        None => {
            let Some((kid, _)) = carried(token) else {
                return bad(Reason::InvalidProviderToken);
            };
            let found = auth
                .keys
                .iter()
                .filter(|k| k.key_id.as_deref().is_none_or(|id| id == kid))
                .find_map(|k| jwt::verify(token, &k.public_key).ok().map(|c| (k, c)));
            if let Some((key, claims)) = &found {
                auth.verified.put(token, &key.public_key, claims);
            }
            found
        }
    };
    let Some((key, claims)) = verified else {
        return bad(Reason::InvalidProviderToken);
    };
    if key.team_id.as_deref().is_some_and(|t| t != claims.team_id) {
        return bad(Reason::InvalidProviderToken);
    }
    if now_unix - claims.issued_at > auth.max_age.as_secs() as i64 {
        return bad(Reason::ExpiredProviderToken);
    }
    Ok((token.to_owned(), claims))
}

/// The `kid` and `iss` a JWT carries, read without verifying it (what a request claimed,
/// kept with it for tests).
pub(crate) fn carried(token: &str) -> Option<(String, String)> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let mut parts = token.split('.');
    let mut json = || -> Option<serde_json::Value> {
        serde_json::from_slice(&B64.decode(parts.next()?).ok()?).ok()
    };
    let (header, claims) = (json()?, json()?);
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    Some((
        text(&header["kid"])?,
        text(&claims["iss"]).unwrap_or_default(),
    ))
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
            let got = validate(&parts, body, &AuthCheck::default(), None, NOW)
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
            validate(&parts, b"{}", &AuthCheck::default(), None, NOW).err()
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
        let auth = AuthCheck::key(KeyCheck::new(
            signer.public_key(),
            "KEY1234567",
            "TEAM123456",
        ));
        let with = |jwt: Option<String>| {
            let parts = request(|b| match jwt {
                Some(j) => b.header("authorization", format!("bearer {j}")),
                None => b,
            });
            validate(&parts, b"{}", &auth, None, NOW)
                .err()
                .map(|(_, r)| r)
        };
        assert_eq!(with(Some(signer.sign(NOW - 10))), None);
        assert_eq!(with(None), Some(Reason::MissingProviderToken));
        // On a certificate connection APNs ignores `authorization`.
        assert!(validate(
            &request(|b| b),
            b"{}",
            &auth,
            Some(&ClientCert::default()),
            NOW
        )
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

    /// A new key's PEM, a signer with it, and the key as the mock accepts it.
    fn team_key(key_id: &str, team_id: &str) -> (String, Signer, KeyCheck) {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        let signer = Signer::from_pem(pem.as_bytes(), key_id, team_id, DEFAULT_REFRESH).unwrap();
        let check = KeyCheck::from_pem(pem.as_bytes(), key_id, team_id).unwrap();
        (pem, signer, check)
    }

    fn answer(auth: &AuthCheck, topic: &str, jwt: &str) -> Option<Reason> {
        let mut parts = request(|b| b.header("authorization", format!("bearer {jwt}")));
        parts.headers.insert("apns-topic", topic.parse().unwrap());
        validate(&parts, b"{}", auth, None, NOW)
            .err()
            .map(|(_, r)| r)
    }

    #[test]
    fn a_token_verified_once_is_still_checked_against_the_keys_teams_and_clock_of_now() {
        let (_, a, key_a) = team_key("KEYAAAAAAA", "TEAMAAAAAA");
        let (_, _, key_b) = team_key("KEYBBBBBBB", "TEAMBBBBBB");
        let mut auth = AuthCheck::key(key_a.clone());
        let token = a.sign(NOW);
        assert_eq!(answer(&auth, "com.a", &token), None);
        assert_eq!(answer(&auth, "com.a", &token), None, "remembered");
        // Its topic given to another team.
        auth.topics.insert("com.a".into(), "TEAMBBBBBB".into());
        assert_eq!(
            answer(&auth, "com.a", &token),
            Some(Reason::TopicDisallowed)
        );
        auth.topics.clear();
        // Too old by now.
        let mut parts = request(|b| b.header("authorization", format!("bearer {token}")));
        parts.headers.insert("apns-topic", "com.a".parse().unwrap());
        let later = validate(&parts, b"{}", &auth, None, NOW + 3601).err();
        assert_eq!(later.map(|(_, r)| r), Some(Reason::ExpiredProviderToken));
        // Its key replaced under its id (another public key), then removed: refused, as a
        // token never seen would be.
        auth.add_key(KeyCheck::new(
            key_b.public_key.clone(),
            "KEYAAAAAAA",
            "TEAMAAAAAA",
        ));
        assert_eq!(
            answer(&auth, "com.a", &token),
            Some(Reason::InvalidProviderToken)
        );
        auth.keys.clear();
        auth.add_key(key_b);
        assert_eq!(
            answer(&auth, "com.a", &token),
            Some(Reason::InvalidProviderToken)
        );
        // Its key back: taken again.
        auth.add_key(key_a);
        assert_eq!(answer(&auth, "com.a", &token), None);
    }

    #[test]
    fn each_key_verifies_the_jwts_of_its_kid_and_its_team_only() {
        let (pem_a, a, key_a) = team_key("KEYAAAAAAA", "TEAMAAAAAA");
        let (_, b, key_b) = team_key("KEYBBBBBBB", "TEAMBBBBBB");
        let (_, c, _) = team_key("KEYCCCCCCC", "TEAMAAAAAA");
        let mut auth = AuthCheck::key(key_a.clone());
        auth.add_key(key_b.clone());
        assert_eq!(answer(&auth, "com.a", &a.sign(NOW)), None);
        assert_eq!(answer(&auth, "com.b", &b.sign(NOW)), None);
        // A key the mock does not know, even of a known team.
        assert_eq!(
            answer(&auth, "com.a", &c.sign(NOW)),
            Some(Reason::InvalidProviderToken)
        );
        // Signed with A's key but naming B's: verified with B's, which fails.
        let forged = Signer::from_pem(
            pem_a.as_bytes(),
            "KEYBBBBBBB",
            "TEAMBBBBBB",
            DEFAULT_REFRESH,
        )
        .unwrap();
        assert_eq!(
            answer(&auth, "com.b", &forged.sign(NOW)),
            Some(Reason::InvalidProviderToken)
        );
        // A's key and id, naming B's team.
        let other_team = Signer::from_pem(
            pem_a.as_bytes(),
            "KEYAAAAAAA",
            "TEAMBBBBBB",
            DEFAULT_REFRESH,
        )
        .unwrap();
        assert_eq!(
            answer(&auth, "com.a", &other_team.sign(NOW)),
            Some(Reason::InvalidProviderToken)
        );
        // A key added again replaces the one of its id.
        auth.add_key(KeyCheck::new(
            key_b.public_key.clone(),
            "KEYAAAAAAA",
            "TEAMAAAAAA",
        ));
        assert_eq!(auth.keys.len(), 2);
        assert_eq!(
            answer(&auth, "com.a", &a.sign(NOW)),
            Some(Reason::InvalidProviderToken)
        );
        // A key of no id and team (`mock-apns` without --key-id, --team-id) takes any.
        let any = AuthCheck::key(KeyCheck {
            key_id: None,
            team_id: None,
            ..key_b
        });
        assert_eq!(answer(&any, "com.b", &b.sign(NOW)), None);
        assert_eq!(
            answer(&any, "com.a", &a.sign(NOW)),
            Some(Reason::InvalidProviderToken)
        );
    }

    #[test]
    fn a_topic_takes_only_its_teams_jwts_and_a_certificate_only_its_topic() {
        let (_, a, key_a) = team_key("KEYAAAAAAA", "TEAMAAAAAA");
        let (_, b, key_b) = team_key("KEYBBBBBBB", "TEAMBBBBBB");
        let mut auth = AuthCheck::key(key_a);
        auth.add_key(key_b);
        auth.topics.insert("com.a".into(), "TEAMAAAAAA".into());
        assert_eq!(answer(&auth, "com.a", &a.sign(NOW)), None);
        assert_eq!(answer(&auth, "com.a.voip", &a.sign(NOW)), None);
        assert_eq!(
            answer(&auth, "com.a", &b.sign(NOW)),
            Some(Reason::TopicDisallowed)
        );
        assert_eq!(
            answer(&auth, "com.a.voip", &b.sign(NOW)),
            Some(Reason::TopicDisallowed)
        );
        // Topics not listed take any team.
        assert_eq!(answer(&auth, "com.b", &a.sign(NOW)), None);
        assert_eq!(
            Reason::TopicDisallowed.status(),
            400,
            "APNs answers 400 TopicDisallowed"
        );

        let on_cert = |cert: &ClientCert, topic: &str| {
            let mut parts = request(|b| b);
            parts.headers.insert("apns-topic", topic.parse().unwrap());
            validate(&parts, b"{}", &auth, Some(cert), NOW)
                .err()
                .map(|(_, r)| r)
        };
        let cert = ClientCert {
            topic: Some("com.c".into()),
        };
        assert_eq!(on_cert(&cert, "com.c"), None);
        assert_eq!(on_cert(&cert, "com.c.voip"), None);
        assert_eq!(on_cert(&cert, "com.a"), Some(Reason::TopicDisallowed));
        assert_eq!(on_cert(&cert, "com.cc"), Some(Reason::TopicDisallowed));
        // A certificate naming no topic sends to any (no JWT is asked for).
        assert_eq!(on_cert(&ClientCert::default(), "com.a"), None);
    }

    #[test]
    fn what_a_jwt_carries_is_read_without_verifying_it() {
        let (_, a, _) = team_key("KEYAAAAAAA", "TEAMAAAAAA");
        assert_eq!(
            carried(&a.sign(NOW)),
            Some(("KEYAAAAAAA".into(), "TEAMAAAAAA".into()))
        );
        assert_eq!(carried("a.b.c"), None);
        assert_eq!(carried(""), None);
    }
}
