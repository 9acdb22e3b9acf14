//! The Google service account FCM sends as: its JSON file (`RINGPUSH_FCM_CREDENTIALS_FILE`),
//! read and checked once at start — every field present, the key an RSA PKCS#8 key `ring`
//! can sign with, `token_uri` https — and the RS256 JWT assertion it signs for the OAuth 2.0
//! token endpoint. The key never leaves this file's types and never reaches a log.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

/// The OAuth 2.0 scope FCM HTTP v1 needs.
pub(crate) const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The longest an assertion may be valid (Google refuses `exp` more than an hour after `iat`).
pub(crate) const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// Why a service-account file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("not a service-account JSON file: {0}")]
    Json(String),
    #[error("the service account has no `{0}`")]
    Missing(&'static str),
    #[error("`private_key` is not an RSA private key in PEM PKCS#8 (\"BEGIN PRIVATE KEY\"): {0}")]
    Key(String),
    #[error("`token_uri` {0:?} is not an https:// URL")]
    TokenUri(String),
    #[error("`client_email` {0:?} is not an e-mail address")]
    Email(String),
}

/// A checked service account.
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    /// Where assertions are exchanged for access tokens (`https://…`, from the file).
    pub token_uri: String,
    /// The key's id (`private_key_id`), sent as the assertion's `kid` when given.
    key_id: Option<String>,
    /// The RSA key; never logged, never leaves this struct.
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct File {
    project_id: Option<String>,
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

impl ServiceAccount {
    /// Reads and checks a service-account JSON file's contents.
    pub fn parse(json: &[u8]) -> Result<Self, CredentialsError> {
        let file: File =
            serde_json::from_slice(json).map_err(|e| CredentialsError::Json(e.to_string()))?;
        let field = |value: Option<String>, name| {
            value
                .filter(|v| !v.trim().is_empty())
                .ok_or(CredentialsError::Missing(name))
        };
        let project_id = field(file.project_id, "project_id")?;
        let client_email = field(file.client_email, "client_email")?;
        let private_key = field(file.private_key, "private_key")?;
        let token_uri = field(file.token_uri, "token_uri")?;
        if !client_email.contains('@') {
            return Err(CredentialsError::Email(client_email));
        }
        match url::Url::parse(&token_uri) {
            Ok(u) if u.scheme() == "https" && u.host_str().is_some() => {}
            _ => return Err(CredentialsError::TokenUri(token_uri)),
        }
        let key = match PrivateKeyDer::from_pem_slice(private_key.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(der)) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                .map_err(|e| CredentialsError::Key(e.to_string()))?,
            Ok(_) => {
                return Err(CredentialsError::Key(
                    "a PKCS#1 or SEC1 key, not PKCS#8".into(),
                ))
            }
            Err(e) => return Err(CredentialsError::Key(e.to_string())),
        };
        Ok(Self {
            project_id,
            client_email,
            token_uri,
            key_id: file.private_key_id.filter(|k| !k.is_empty()),
            key,
            rng: SystemRandom::new(),
        })
    }

    /// The RS256 JWT assertion for the token endpoint, issued at `iat` (Unix seconds):
    /// `iss` = `client_email`, `scope`, `aud` = `token_uri`, `exp` = `iat` + one hour.
    pub(crate) fn assertion_at(&self, iat: u64) -> String {
        self.assertion_with_scope_at(iat, SCOPE)
    }

    /// [`ServiceAccount::assertion_at`] asking for `scope` (space-separated scopes), as
    /// other OAuth clients do (the mock's tests).
    pub(crate) fn assertion_with_scope_at(&self, iat: u64, scope: &str) -> String {
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.as_str().into();
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &self.rng,
                signing_input.as_bytes(),
                &mut sig,
            )
            .expect("an RSA key that parsed signs");
        format!("{signing_input}.{}", B64.encode(sig))
    }

    /// [`ServiceAccount::assertion_at`] now.
    pub fn assertion(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.assertion_at(now)
    }

    /// The public key, DER `RSAPublicKey` (what the mock verifies assertions with).
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }
}

#[cfg(feature = "kit")]
/// The claims of an RS256 assertion whose signature verifies with `public_key` (DER
/// `RSAPublicKey`); `None` when it is not a compact JWS, not RS256, or does not verify.
pub(crate) fn verify_assertion(assertion: &str, public_key: &[u8]) -> Option<serde_json::Value> {
    let mut parts = assertion.split('.');
    let (header, claims, sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: serde_json::Value = serde_json::from_slice(&B64.decode(header).ok()?).ok()?;
    if header["alg"] != "RS256" {
        return None;
    }
    let key = signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, public_key);
    let signed = &assertion[..header_len(assertion)?];
    key.verify(signed.as_bytes(), &B64.decode(sig).ok()?).ok()?;
    serde_json::from_slice(&B64.decode(claims).ok()?).ok()
}

#[cfg(feature = "kit")]
/// The length of `header.claims` in a compact JWS.
fn header_len(jws: &str) -> Option<usize> {
    jws.rfind('.')
}

/// A new service-account JSON for local use (the mock, tests, the demo): a fresh 2048-bit
/// RSA key (generated by the `rsa` crate: `ring` signs with RSA but cannot make keys) in
/// PEM PKCS#8, with `token_uri` pointing where the caller says.
#[cfg(feature = "kit")]
pub fn generate(project_id: &str, client_email: &str, token_uri: &str) -> Result<String, String> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::PrivateKey::new(&mut RingRng(SystemRandom::new()), 2048)
        .map_err(|e| format!("generating an RSA key: {e}"))?;
    let der = key
        .to_pkcs8_der()
        .map_err(|e| format!("encoding the RSA key: {e}"))?;
    let pem = pem_private_key(der.as_bytes());
    Ok(serde_json::to_string_pretty(&serde_json::json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": crate::token::random_hex(20),
        "private_key": pem,
        "client_email": client_email,
        "client_id": "100000000000000000000",
        "token_uri": token_uri,
    }))
    .expect("a JSON value serialises"))
}

/// DER PKCS#8 as PEM (`BEGIN PRIVATE KEY`, 64 characters a line).
#[cfg(feature = "kit")]
fn pem_private_key(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

/// ring's system RNG as the `rand_core` RNG the `rsa` crate takes.
#[cfg(feature = "kit")]
struct RingRng(SystemRandom);

#[cfg(feature = "kit")]
impl rsa::rand_core::TryRng for RingRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        use ring::rand::SecureRandom;
        self.0.fill(dst).expect("the system RNG works");
        Ok(())
    }
}

#[cfg(feature = "kit")]
impl rsa::rand_core::TryCryptoRng for RingRng {}

// The tests make service accounts with the kit's generator.
#[cfg(all(test, feature = "kit"))]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// One generated account for every test here (RSA generation takes a while).
    fn account_json() -> &'static str {
        static JSON: OnceLock<String> = OnceLock::new();
        JSON.get_or_init(|| {
            generate(
                "proj-1",
                "ringpush@proj-1.iam.gserviceaccount.com",
                "https://oauth2.example:8443/token",
            )
            .unwrap()
        })
    }

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(account_json()).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn the_assertion_carries_the_claims_google_wants_and_verifies() {
        let account = ServiceAccount::parse(account_json().as_bytes()).unwrap();
        let jwt = account.assertion_at(1_800_000_000);
        assert!(
            !format!("{account:?}").contains("PRIVATE"),
            "the key never shows"
        );
        let claims = verify_assertion(&jwt, &account.public_key()).expect("verifies");
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": "ringpush@proj-1.iam.gserviceaccount.com",
                "scope": "https://www.googleapis.com/auth/firebase.messaging",
                "aud": "https://oauth2.example:8443/token",
                "iat": 1_800_000_000u64,
                "exp": 1_800_003_600u64,
            })
        );
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(
            (header["alg"].as_str(), header["typ"].as_str()),
            (Some("RS256"), Some("JWT"))
        );
        assert!(header["kid"].is_string());
        // Another account's key, or a changed claim, does not verify.
        let parts: Vec<&str> = jwt.split('.').collect();
        let mut claims = claims.clone();
        claims["iss"] = "someone@else".into();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(claims.to_string()),
            parts[2]
        );
        assert!(verify_assertion(&forged, &account.public_key()).is_none());
        let other =
            ServiceAccount::parse(generate("p", "a@b", "https://x/token").unwrap().as_bytes())
                .unwrap();
        assert!(verify_assertion(&jwt, &other.public_key()).is_none());
    }

    #[test]
    fn a_service_account_that_cannot_be_used_is_refused_with_the_reason() {
        let ec_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        let cases: Vec<(Vec<u8>, CredentialsError)> = vec![
            (b"not json".to_vec(), CredentialsError::Json(String::new())),
            (
                edited(|v| {
                    v.as_object_mut().unwrap().remove("project_id");
                }),
                CredentialsError::Missing("project_id"),
            ),
            (
                edited(|v| v["client_email"] = "".into()),
                CredentialsError::Missing("client_email"),
            ),
            (
                edited(|v| {
                    v.as_object_mut().unwrap().remove("private_key");
                }),
                CredentialsError::Missing("private_key"),
            ),
            (
                edited(|v| {
                    v.as_object_mut().unwrap().remove("token_uri");
                }),
                CredentialsError::Missing("token_uri"),
            ),
            (
                edited(|v| v["token_uri"] = "http://oauth2.example/token".into()),
                CredentialsError::TokenUri("http://oauth2.example/token".into()),
            ),
            (
                edited(|v| v["client_email"] = "nobody".into()),
                CredentialsError::Email("nobody".into()),
            ),
            (
                edited(|v| v["private_key"] = ec_key.clone().into()),
                CredentialsError::Key(String::new()),
            ),
            (
                edited(|v| {
                    v["private_key"] =
                        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into()
                }),
                CredentialsError::Key(String::new()),
            ),
        ];
        for (json, want) in cases {
            let got = ServiceAccount::parse(&json).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{got}"
            );
            if !matches!(want, CredentialsError::Json(_) | CredentialsError::Key(_)) {
                assert_eq!(got, want);
            }
        }
    }
}
