//! TLS for every connection ringpush opens — APNs and FCM, the broker (`amqps://`),
//! PostgreSQL (`sslmode`) and the management API (`https://`): rustls with the ring
//! provider, Mozilla's roots plus an optional extra CA (the mock's, a private CA's, or a
//! corporate proxy's), and client certificates. There is no switch that turns verification
//! off; PostgreSQL's `verify-ca` (the chain without the host name) is [`ChainOnly`]. A failed
//! handshake is told for a person by [`failure`]: a server certificate from a CA the process
//! does not trust names the setting that adds one (`RINGPUSH_APNS_CA_FILE`, …). A client
//! certificate says when it expires ([`Identity::not_after`]).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// A CA file or TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("CA file {0} holds no certificate")]
    EmptyCaFile(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot read certificate file {path}: {reason}")]
    Identity { path: String, reason: String },
}

impl TlsError {
    /// Whether this is an error of a CA file (else of a client certificate or of rustls).
    pub fn is_ca_file(&self) -> bool {
        matches!(self, TlsError::CaFile { .. } | TlsError::EmptyCaFile(_))
    }
}

/// A client certificate chain and its private key: certificate auth.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads a PEM file (certificate chain and private key) or a PKCS#12 file (.p12, as
    /// Keychain exports it) opened with `password`.
    pub fn from_file(path: &Path, password: &str) -> Result<Self, TlsError> {
        let err = |reason: String| TlsError::Identity {
            path: path.display().to_string(),
            reason,
        };
        let data = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        if data.starts_with(b"-----BEGIN") {
            Self::from_pem(&data).map_err(err)
        } else {
            Self::from_pkcs12(&data, password).map_err(err)
        }
    }

    /// Reads a certificate chain and its private key from two PEM files (as a broker's
    /// client certificate is usually handed out).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let err = |path: &Path, reason: String| TlsError::Identity {
            path: path.display().to_string(),
            reason,
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(err(cert, "no CERTIFICATE in the PEM file".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| err(key, format!("no private key in the PEM file: {e}")))?;
        Ok(Self { chain, key })
    }

    /// When the client's own certificate (the chain's first, the leaf) stops being valid: its
    /// `notAfter`, UTCTime or GeneralizedTime as RFC 5280 has it (what the expiry metric and
    /// alerts watch: APNs refuses an expired certificate, and every ring of that app with
    /// it). `None` when the leaf is not an X.509 certificate that can be read (rustls would
    /// refuse it at the first handshake).
    pub fn not_after(&self) -> Option<time::OffsetDateTime> {
        let leaf = self.chain.first()?;
        let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        Some(certificate.validity().not_after.to_datetime())
    }

    fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        if chain.is_empty() {
            return Err("no CERTIFICATE in the PEM file".into());
        }
        let key = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| format!("no private key in the PEM file: {e}"))?;
        Ok(Self { chain, key })
    }

    fn from_pkcs12(der: &[u8], password: &str) -> Result<Self, String> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            der,
            password,
            p12_keystore::Pkcs12ImportPolicy::Relaxed,
        )
        .map_err(|e| format!("not a PKCS#12 file, or a wrong password: {e}"))?;
        let (_, chain) = store
            .private_key_chain()
            .ok_or("the PKCS#12 file holds no private key with a certificate")?;
        Ok(Self {
            chain: chain
                .certs()
                .iter()
                .map(|c| CertificateDer::from(c.as_der().to_vec()))
                .collect(),
            key: PrivateKeyDer::Pkcs8(chain.key().as_der().to_vec().into()),
        })
    }
}

/// The process-wide crypto provider: ring (one provider per build, see ECOSYSTEM.md).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::CaFile {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCaFile(shown));
    }
    Ok(certs)
}

/// The public roots (Mozilla's, as webpki-roots ships them), plus every certificate of
/// `extra_ca` when given.
pub fn roots(extra_ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        roots = with_certs(roots, path)?;
    }
    Ok(roots)
}

/// Only the certificates of `ca` (PostgreSQL's `sslrootcert`: the server's own CA, not the
/// public ones).
pub fn only(ca: &Path) -> Result<RootCertStore, TlsError> {
    with_certs(RootCertStore::empty(), ca)
}

fn with_certs(mut roots: RootCertStore, path: &Path) -> Result<RootCertStore, TlsError> {
    for cert in read_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A client configuration that verifies servers against `roots` (certificate chain and host
/// name), presents `identity` when given, and offers `alpn`.
pub fn config(
    roots: RootCertStore,
    identity: Option<Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(finish(builder, identity, alpn)?)
}

fn finish(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Client configuration for APNs and FCM (HTTP/2): public roots, plus `extra_ca` when given;
/// with `identity`, the client certificate of certificate auth.
pub fn client_config(
    extra_ca: Option<&Path>,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    config(roots(extra_ca)?, identity, &[b"h2"])
}

/// A client configuration that checks the server's certificate chain against `roots` but
/// not which host it names: PostgreSQL's `verify-ca`, for servers reached by an address
/// their certificate does not list. The handshake's signatures are checked as always.
pub fn chain_only_config(
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = ChainOnly::new(roots)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    Ok(finish(builder, None, alpn)?)
}

/// Verifies a server's certificate chain up to its roots — validity period, key usage,
/// signatures — with rustls's own functions, and not which host the certificate names
/// (`verify-ca`). The handshake's signatures are checked as always.
#[derive(Debug)]
pub struct ChainOnly {
    roots: RootCertStore,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ChainOnly {
    pub fn new(roots: RootCertStore) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::Rustls(rustls::Error::General(
                "no root certificate to verify against".into(),
            )));
        }
        Ok(Self {
            roots,
            algorithms: provider().signature_verification_algorithms,
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether an IO error is a TLS handshake that rustls refused (a certificate, an alert), not
/// a connection that could not be made.
pub fn is_handshake_failure(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some())
}

/// A failed TLS handshake with `host`, told for a person: what is wrong with the server's
/// certificate in words (not rustls's `UnknownIssuer`), and — when it is signed by a CA the
/// process does not trust — the setting that adds that CA (`ca_setting`, e.g.
/// `RINGPUSH_APNS_CA_FILE`).
pub fn failure(error: &std::io::Error, host: &str, ca_setting: Option<&str>) -> String {
    use tokio_rustls::rustls::{CertificateError as C, Error as E};
    let Some(rustls) = error.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return format!("TLS: {error}");
    };
    let certificate = match rustls {
        E::InvalidCertificate(c) => c,
        E::AlertReceived(alert) => {
            return format!("TLS: {host} ended the handshake with the alert {alert:?} (does it want a client certificate, or another TLS version?)")
        }
        other => return format!("TLS: {other}"),
    };
    let problem = match certificate {
        C::UnknownIssuer => {
            let fix = match ca_setting {
                Some(var) => format!(
                    "if it is a private CA's or a mock's (the mock's ca.pem), set {var} to that CA's certificate (PEM)"
                ),
                None => "trust its CA".into(),
            };
            return format!(
                "TLS: the certificate of {host} is signed by a CA this process does not trust (unknown issuer): {fix}"
            );
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("is not valid for the name {host}: is that the right host name?")
        }
        C::Expired | C::ExpiredContext { .. } => {
            "has expired (or this machine's clock is wrong)".into()
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "is not valid yet (or this machine's clock is wrong)".into()
        }
        C::Revoked => "is revoked".into(),
        C::BadSignature => "has a bad signature".into(),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "is not for a TLS server (wrong key usage)".into()
        }
        other => format!("was refused: {other:?}"),
    };
    format!("TLS: the certificate of {host} {problem}")
}

#[cfg(test)]
mod failure_tests {
    use super::*;
    use tokio_rustls::rustls::{CertificateError, Error};

    #[test]
    fn an_unknown_issuer_names_the_ca_setting() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let text = failure(&io, "localhost", Some("RINGPUSH_APNS_CA_FILE"));
        assert!(text.contains("RINGPUSH_APNS_CA_FILE"), "{text}");
        assert!(
            text.contains("localhost") && !text.contains("UnknownIssuer"),
            "{text}"
        );
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::NotValidForName),
        );
        let text = failure(&io, "example.com", None);
        assert!(
            text.contains("not valid for the name example.com"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;
    use rcgen::{CertificateParams, Issuer, KeyPair};
    use time::macros::datetime;
    use time::OffsetDateTime;

    /// A certificate for `name` valid until `not_after`: self-signed, or signed by `issuer`.
    fn certificate(
        name: &str,
        not_after: OffsetDateTime,
        issuer: Option<&Issuer<'_, KeyPair>>,
    ) -> (CertificateDer<'static>, KeyPair) {
        let mut params = CertificateParams::new(vec![name.into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.not_before = datetime!(2024-01-01 00:00 UTC);
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let cert = match issuer {
            Some(issuer) => params.signed_by(&key, issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert.der().clone(), key)
    }

    /// A CA valid until `not_after`: its certificate and its issuer.
    fn ca(not_after: OffsetDateTime) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        (der, Issuer::new(params, key))
    }

    fn identity(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Identity {
        Identity {
            chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// Whether `der` holds `bytes` (an encoded time, tag and length first).
    fn holds(der: &[u8], bytes: &[u8]) -> bool {
        der.windows(bytes.len()).any(|w| w == bytes)
    }

    #[test]
    fn not_after_reads_a_utctime_to_the_second() {
        let at = datetime!(2031-05-17 12:34:56 UTC);
        let (cert, key) = certificate("client", at, None);
        // Before 2050, RFC 5280 says UTCTime (tag 0x17): YYMMDDHHMMSSZ.
        assert!(holds(&cert, b"\x17\x0d310517123456Z"));
        assert_eq!(identity(vec![cert], &key).not_after(), Some(at));
    }

    #[test]
    fn not_after_reads_a_generalizedtime_from_2050_on() {
        let at = datetime!(2051-01-02 03:04:05 UTC);
        let (cert, key) = certificate("client", at, None);
        // From 2050, GeneralizedTime (tag 0x18): YYYYMMDDHHMMSSZ.
        assert!(holds(&cert, b"\x18\x0f20510102030405Z"));
        assert_eq!(identity(vec![cert], &key).not_after(), Some(at));
    }

    #[test]
    fn not_after_is_the_leafs_not_its_issuers() {
        let (ca_der, issuer) = ca(datetime!(2040-01-01 00:00 UTC));
        let at = datetime!(2027-03-01 08:00 UTC);
        let (leaf, key) = certificate("client", at, Some(&issuer));
        assert_eq!(identity(vec![leaf, ca_der], &key).not_after(), Some(at));
    }

    #[test]
    fn not_after_is_the_leafs_in_a_pkcs12_file_as_keychain_exports_it() {
        let (ca_der, issuer) = ca(datetime!(2060-06-01 00:00 UTC));
        let at = datetime!(2026-09-30 17:45:10 UTC);
        let (leaf, key) = certificate("com.example.doorbell", at, Some(&issuer));
        let chain = p12_keystore::PrivateKeyChain::new(
            "key-1",
            p12_keystore::PrivateKey::from_der(&key.serialize_der()).unwrap(),
            [&leaf, &ca_der].map(|c| p12_keystore::Certificate::from_der(c).unwrap()),
        );
        let mut store = p12_keystore::KeyStore::new();
        store.add_entry("apns", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
        let p12 = store.writer("secret").write().unwrap();
        let identity = Identity::from_pkcs12(&p12, "secret").unwrap();
        assert_eq!(identity.chain.len(), 2);
        assert_eq!(identity.not_after(), Some(at));
    }

    #[test]
    fn not_after_of_what_is_not_a_certificate_is_none() {
        let (cert, key) = certificate("client", datetime!(2031-05-17 12:34:56 UTC), None);
        let cut = CertificateDer::from(cert[..cert.len() / 2].to_vec());
        assert_eq!(identity(vec![cut], &key).not_after(), None);
        let junk = CertificateDer::from(b"not a certificate".to_vec());
        assert_eq!(identity(vec![junk], &key).not_after(), None);
        assert_eq!(identity(Vec::new(), &key).not_after(), None);
    }

    #[test]
    fn not_after_is_read_from_a_pem_file_as_the_worker_loads_it() {
        let at = datetime!(2030-12-31 23:59:59 UTC);
        let mut params = CertificateParams::new(vec!["client".into()]).unwrap();
        params.not_after = at;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        let identity = Identity::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(identity.not_after(), Some(at));
    }
}
