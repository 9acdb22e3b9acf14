//! ES256 provider tokens (protocol sheet A2.1): signed once, shared by every connection,
//! re-signed only when older than the refresh interval.
//!
//! The signer emits the raw 64-byte R‖S signature RFC 7518 asks for; the verifier (used by
//! the mock) accepts that and the DER form, as APNs does.
//!
//! Why not the `jsonwebtoken` crate (measured 2026-12-05, version 12): it signs only through
//! a crypto backend of its own choosing — `rust_crypto` (97 crates in its tree, among them
//! `rsa`, whose private-key operations carry the unfixed timing advisory RUSTSEC-2023-0071,
//! and which the production build otherwise keeps out) or `aws_lc_rs` (AWS-LC compiled from
//! C beside the `ring` that already signs our TLS). Two JWTs — this ES256 one, FCM's RS256
//! assertion (`crate::fcm::credentials`) — are ~40 lines each over `ring`, tested against
//! the mocks' verifiers and Apple's and Google's documented claims; one crypto library stays.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

/// How often a shared token is re-signed by default (Apple: between 20 and 60 minutes).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(50 * 60);
/// The least time between two signatures: APNs answers 429 TooManyProviderTokenUpdates to
/// a connection whose token changes more often.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(20 * 60);

/// The DER prefix of a P-256 SubjectPublicKeyInfo; the uncompressed point follows it.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A key, a token or a claim that is not what APNs expects.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the key is not a PEM PKCS#8 P-256 private key (.p8): {0}")]
    Key(String),
    #[error("the key is not a PEM P-256 public key: {0}")]
    PublicKey(String),
    #[error("the token is not a compact JWS")]
    Malformed,
    #[error("the token's algorithm is not ES256")]
    Algorithm,
    #[error("the token's signature does not verify")]
    Signature,
}

/// Signs and caches the provider token of one key. Cheap to share behind an `Arc`.
pub struct Signer {
    /// The team's .p8 key; never logged, never leaves this struct.
    key: EcdsaKeyPair,
    key_id: String,
    team_id: String,
    rng: SystemRandom,
    /// How old the cached token may grow before it is re-signed.
    refresh: Duration,
    /// How young a token may be and still be replaced on demand ([`Signer::renew`]).
    min_interval: Duration,
    /// The token every connection sends, and when it was signed.
    cached: Mutex<Option<Cached>>,
}

/// A signed token, its `authorization` header value (built once per token), and when it
/// was signed.
struct Cached {
    token: Arc<str>,
    bearer: http::HeaderValue,
    at: Instant,
}

impl Cached {
    fn new(token: String) -> Self {
        Self {
            bearer: super::request::bearer(&token),
            token: token.into(),
            at: Instant::now(),
        }
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

/// The claims a verified token carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub key_id: String,
    pub team_id: String,
    pub issued_at: i64,
}

impl Signer {
    /// Loads a .p8 key (PEM PKCS#8, P-256).
    pub fn from_pem(
        pem: &[u8],
        key_id: &str,
        team_id: &str,
        refresh: Duration,
    ) -> Result<Self, JwtError> {
        let der =
            PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| JwtError::Key(e.to_string()))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| JwtError::Key(e.to_string()))?;
        Ok(Self {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            rng,
            refresh,
            min_interval: MIN_REFRESH,
            cached: Mutex::new(None),
        })
    }

    /// Sets the least age at which [`Signer::renew`] replaces a token (default 20 minutes;
    /// tests shorten it).
    pub fn with_min_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    /// Re-signs now, unless the current token is younger than the minimum interval (APNs
    /// would refuse a change that soon). Returns whether a new token was signed.
    pub fn renew(&self) -> bool {
        let mut cached = self.cached.lock().expect("jwt cache poisoned");
        if cached
            .as_ref()
            .is_some_and(|c| c.at.elapsed() < self.min_interval)
        {
            return false;
        }
        *cached = Some(Cached::new(self.sign(unix_now())));
        true
    }

    /// Runs `f` on the current token: the cached one, or a fresh one when the cache is
    /// older than the refresh interval.
    fn current<T>(&self, f: impl FnOnce(&Cached) -> T) -> T {
        let mut cached = self.cached.lock().expect("jwt cache poisoned");
        match cached.as_ref() {
            Some(c) if c.at.elapsed() < self.refresh => f(c),
            _ => f(cached.insert(Cached::new(self.sign(unix_now())))),
        }
    }

    /// The current token.
    pub fn token(&self) -> Arc<str> {
        self.current(|c| c.token.clone())
    }

    /// The current token as an `authorization` header value, shared by every request until
    /// the token changes.
    pub fn bearer(&self) -> http::HeaderValue {
        self.current(|c| c.bearer.clone())
    }

    /// Signs a token with the given `iat`.
    pub fn sign(&self, issued_at: i64) -> String {
        let header = format!(r#"{{"alg":"ES256","kid":"{}"}}"#, self.key_id);
        let claims = format!(r#"{{"iss":"{}","iat":{issued_at}}}"#, self.team_id);
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ECDSA signing with a valid key does not fail");
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }

    /// The uncompressed public point, for a verifier.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

/// Reads a P-256 public key for verification from PEM: a `PUBLIC KEY` (SPKI) or the .p8
/// private key itself, from which the public half is taken.
pub fn public_key_from_pem(pem: &[u8]) -> Result<Vec<u8>, JwtError> {
    if let Ok(spki) = SubjectPublicKeyInfoDer::from_pem_slice(pem) {
        let der = spki.as_ref();
        return match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) if point.len() == 65 => Ok(point.to_vec()),
            _ => Err(JwtError::PublicKey("not a P-256 key".into())),
        };
    }
    Signer::from_pem(pem, "", "", DEFAULT_REFRESH)
        .map(|s| s.public_key())
        .map_err(|e| JwtError::PublicKey(e.to_string()))
}

/// Verifies an ES256 token against a public point and returns its claims. Accepts raw R‖S
/// and DER signatures. Claim checks (age, team, key id) are the caller's.
pub fn verify(token: &str, public_key: &[u8]) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header: serde_json::Value = decode_json(h)?;
    if header["alg"] != "ES256" {
        return Err(JwtError::Algorithm);
    }
    let claims: serde_json::Value = decode_json(c)?;
    let sig = B64.decode(s).map_err(|_| JwtError::Malformed)?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    let alg: &dyn signature::VerificationAlgorithm = if sig.len() == 64 {
        &signature::ECDSA_P256_SHA256_FIXED
    } else {
        &signature::ECDSA_P256_SHA256_ASN1
    };
    UnparsedPublicKey::new(alg, public_key)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| JwtError::Signature)?;
    Ok(Claims {
        key_id: header["kid"].as_str().unwrap_or_default().to_owned(),
        team_id: claims["iss"].as_str().unwrap_or_default().to_owned(),
        issued_at: claims["iat"].as_i64().ok_or(JwtError::Malformed)?,
    })
}

fn decode_json(part: &str) -> Result<serde_json::Value, JwtError> {
    let bytes = B64.decode(part).map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_pem() -> String {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem()
    }

    #[test]
    fn a_signed_token_verifies_with_the_public_key() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signer = Signer::from_pem(
            pair.serialize_pem().as_bytes(),
            "KEY1234567",
            "TEAM123456",
            DEFAULT_REFRESH,
        )
        .unwrap();
        let token = signer.sign(1_800_000_000);
        let public = public_key_from_pem(pair.public_key_pem().as_bytes()).unwrap();
        assert_eq!(public, signer.public_key());
        let claims = verify(&token, &public).unwrap();
        assert_eq!(
            claims,
            Claims {
                key_id: "KEY1234567".into(),
                team_id: "TEAM123456".into(),
                issued_at: 1_800_000_000
            }
        );
        // The header is exactly what APNs expects.
        let header = B64.decode(token.split('.').next().unwrap()).unwrap();
        assert_eq!(header, br#"{"alg":"ES256","kid":"KEY1234567"}"#);
    }

    #[test]
    fn a_token_from_another_key_or_tampered_does_not_verify() {
        let signer = Signer::from_pem(key_pem().as_bytes(), "K", "T", DEFAULT_REFRESH).unwrap();
        let other = Signer::from_pem(key_pem().as_bytes(), "K", "T", DEFAULT_REFRESH).unwrap();
        let token = signer.sign(1);
        assert!(matches!(
            verify(&token, &other.public_key()),
            Err(JwtError::Signature)
        ));
        let tampered = token.replacen('.', ".e30", 1);
        assert!(verify(&tampered, &signer.public_key()).is_err());
        assert!(matches!(
            verify("a.b", &signer.public_key()),
            Err(JwtError::Malformed)
        ));
    }

    #[test]
    fn the_token_is_signed_once_and_reused() {
        let signer = Signer::from_pem(key_pem().as_bytes(), "K", "T", DEFAULT_REFRESH).unwrap();
        let a = signer.token();
        let b = signer.token();
        assert!(Arc::ptr_eq(&a, &b));
        let eager = Signer::from_pem(key_pem().as_bytes(), "K", "T", Duration::ZERO).unwrap();
        let a = eager.token();
        assert!(!Arc::ptr_eq(&a, &eager.token()));
    }

    #[test]
    fn the_bearer_value_is_built_once_per_token_and_follows_a_renewal() {
        let signer = Signer::from_pem(key_pem().as_bytes(), "K", "T", DEFAULT_REFRESH)
            .unwrap()
            .with_min_interval(Duration::ZERO);
        let first = signer.bearer();
        assert_eq!(first, format!("bearer {}", signer.token()).as_str());
        assert_eq!(
            first.as_bytes().as_ptr(),
            signer.bearer().as_bytes().as_ptr(),
            "the same bytes, shared, not rebuilt"
        );
        assert!(signer.renew());
        let second = signer.bearer();
        assert_ne!(first, second, "a renewed token gets a new header value");
        assert_eq!(second, format!("bearer {}", signer.token()).as_str());
    }

    /// Makes the cached token look `by` older than it is (no sleeping, so a slow machine
    /// cannot move a check across a threshold).
    fn age(signer: &Signer, by: Duration) {
        let mut cached = signer.cached.lock().unwrap();
        let c = cached.as_mut().expect("a token is cached");
        c.at =
            c.at.checked_sub(by)
                .expect("the clock reaches back that far");
    }

    #[test]
    fn the_token_is_re_signed_after_its_age_and_never_sooner_than_the_minimum() {
        let signer = Signer::from_pem(key_pem().as_bytes(), "K", "T", Duration::from_secs(60))
            .unwrap()
            .with_min_interval(Duration::from_secs(30));
        let first = signer.token();
        assert!(!signer.renew(), "a token younger than the minimum is kept");
        assert!(Arc::ptr_eq(&first, &signer.token()));
        age(&signer, Duration::from_secs(31));
        assert!(
            Arc::ptr_eq(&first, &signer.token()),
            "not re-signed before its age"
        );
        assert!(signer.renew(), "renewed on demand once old enough");
        let second = signer.token();
        assert!(!Arc::ptr_eq(&first, &second));
        age(&signer, Duration::from_secs(61));
        assert!(
            !Arc::ptr_eq(&second, &signer.token()),
            "re-signed after its age"
        );
    }

    #[test]
    fn a_der_signature_verifies_too() {
        // pushy signs with Java's SHA256withECDSA, which yields DER; APNs takes it.
        let pem = key_pem();
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let rng = SystemRandom::new();
        let asn1 = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .unwrap();
        let input = format!(
            "{}.{}",
            B64.encode(r#"{"alg":"ES256","kid":"K"}"#),
            B64.encode(r#"{"iss":"T","iat":5}"#)
        );
        let sig = asn1.sign(&rng, input.as_bytes()).unwrap();
        assert_ne!(sig.as_ref().len(), 64);
        let token = format!("{input}.{}", B64.encode(sig.as_ref()));
        let public = Signer::from_pem(pem.as_bytes(), "K", "T", DEFAULT_REFRESH)
            .unwrap()
            .public_key();
        assert_eq!(verify(&token, &public).unwrap().issued_at, 5);
    }

    #[test]
    fn a_token_with_another_algorithm_is_refused() {
        let input = format!(
            "{}.{}.AAAA",
            B64.encode(r#"{"alg":"HS256","kid":"K"}"#),
            B64.encode(r#"{"iss":"T","iat":5}"#)
        );
        let public = Signer::from_pem(key_pem().as_bytes(), "K", "T", DEFAULT_REFRESH)
            .unwrap()
            .public_key();
        assert!(matches!(verify(&input, &public), Err(JwtError::Algorithm)));
    }

    #[test]
    fn a_key_that_is_not_p8_is_refused() {
        assert!(matches!(
            Signer::from_pem(b"nonsense", "K", "T", DEFAULT_REFRESH),
            Err(JwtError::Key(_))
        ));
    }
}
