//! The mock's own CA and server certificate, generated with rcgen on first start and
//! reused after. Clients trust `ca.pem` explicitly (`RINGPUSH_APNS_CA_FILE`).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The CA's private key, beside `ca.pem`.
const CA_KEY_FILE: &str = "ca-key.pem";

/// Names the server certificate is valid for.
const SERVER_NAMES: [&str; 5] = ["localhost", "127.0.0.1", "::1", "mock-apns", "mock-fcm"];

/// The files of a certificate directory.
pub(crate) struct Certs {
    /// The CA certificate clients must trust.
    pub ca_file: PathBuf,
    /// The server's chain (its certificate, then the CA).
    pub chain: Vec<CertificateDer<'static>>,
    /// The server's private key.
    pub key: PrivateKeyDer<'static>,
}

/// Cannot create or read the certificate directory.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("reading {path}: {reason}")]
    Pem { path: String, reason: String },
}

impl Certs {
    /// Loads `ca.pem`, `server.pem` and `server-key.pem` from `dir`, generating all three
    /// when any is missing.
    pub(crate) fn load_or_generate(dir: &Path) -> Result<Self, CertError> {
        let ca_file = dir.join("ca.pem");
        let cert_file = dir.join("server.pem");
        let key_file = dir.join("server-key.pem");
        let complete = [&ca_file, &cert_file, &key_file, &dir.join(CA_KEY_FILE)]
            .iter()
            .all(|f| f.exists());
        if !complete {
            generate(dir, &ca_file, &cert_file, &key_file)?;
        }
        let pem_err = |path: &Path, e: rustls_pki_types::pem::Error| CertError::Pem {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let chain = CertificateDer::pem_file_iter(&cert_file)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| pem_err(&cert_file, e))?;
        let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| pem_err(&key_file, e))?;
        Ok(Self {
            ca_file,
            chain,
            key,
        })
    }
}

/// The mock CA's certificate parameters.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "ringpush mock APNs CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn generate(
    dir: &Path,
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> Result<(), CertError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CertError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ringpush mock APNs CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(
        SERVER_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
    )?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ringpush mock APNs");
    let server_cert = params.signed_by(&server_key, &issuer)?;

    std::fs::write(ca_file, ca_cert.pem()).map_err(io(ca_file))?;
    // The CA key stays beside it so client certificates can be issued for certificate auth.
    let ca_key_file = dir.join(CA_KEY_FILE);
    write_private(&ca_key_file, &issuer.key().serialize_pem()).map_err(io(&ca_key_file))?;
    std::fs::write(cert_file, format!("{}{}", server_cert.pem(), ca_cert.pem()))
        .map_err(io(cert_file))?;
    write_private(key_file, &server_key.serialize_pem()).map_err(io(key_file))?;
    Ok(())
}

/// Issues a client certificate signed by the CA of `dir` (which must exist): the PEM
/// certificate and its PKCS#8 PEM key, for APNs certificate auth against the mock.
pub fn issue_client_certificate(dir: &Path, name: &str) -> Result<(String, String), CertError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| CertError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    // The same name and key as `ca.pem`: what a verifier matches the issued certificate to.
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&read(CA_KEY_FILE)?)?);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The OID of a subject's `UID` attribute, where Apple's push certificates name their topic.
const UID: [u64; 7] = [0, 9, 2342, 19_200_300, 100, 1, 1];

/// What Apple's push certificates' common names say before their topic.
const APPLE_CN_PREFIX: &str = "Apple Push Services: ";

/// Issues a client identity for `topic` signed by the CA of `dir` (which must exist), named
/// as Apple names its push certificates (subject `UID=<topic>`, `CN=Apple Push Services:
/// <topic>`) and valid until `not_after`, and writes it to `file` — its PEM certificate, the
/// CA's, then its PKCS#8 key, readable by its owner only: a `RINGPUSH_APNS_CERT_FILE` (or an
/// app's `cert_file`) the mock takes for `topic` and `<topic>.voip` only.
pub fn issue_topic_identity(
    dir: &Path,
    topic: &str,
    not_after: std::time::SystemTime,
    file: &Path,
) -> Result<(), CertError> {
    let pem = topic_identity_pem(dir, topic, not_after)?;
    write_private(file, &pem).map_err(|source| CertError::Io {
        path: file.display().to_string(),
        source,
    })
}

/// [`issue_topic_identity`]'s PEM, not written.
pub(crate) fn topic_identity_pem(
    dir: &Path,
    topic: &str,
    not_after: std::time::SystemTime,
) -> Result<String, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&read(CA_KEY_FILE)?)?);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CustomDnType(UID.to_vec()), topic);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{APPLE_CN_PREFIX}{topic}"));
    params.distinguished_name.push(DnType::CountryName, "US");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let not_after = time::OffsetDateTime::from(not_after);
    params.not_before = not_after.min(time::OffsetDateTime::now_utc()) - time::Duration::days(1);
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(format!(
        "{}{}{}",
        cert.pem(),
        read("ca.pem")?,
        key.serialize_pem()
    ))
}

/// The topic a client certificate (DER) is issued for: its subject's `UID`, else the topic
/// in a common name `Apple Push Services: <topic>`; `None` when it names none.
pub(crate) fn certificate_topic(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let uid = x509_parser::der_parser::Oid::from(&UID).ok()?;
    let value = |a: &x509_parser::x509::AttributeTypeAndValue| a.as_str().ok().map(str::to_owned);
    let uid = subject.iter_by_oid(&uid).find_map(value);
    let topic = uid.or_else(|| {
        let cn = subject.iter_common_name().find_map(value)?;
        cn.strip_prefix(APPLE_CN_PREFIX).map(str::to_owned)
    });
    topic.filter(|t| !t.is_empty())
}

/// Writes a private key readable by its owner only.
pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_topic_identity_names_its_topic_as_apples_do_and_expires_when_asked() {
        let dir =
            std::env::temp_dir().join(format!("ringpush-certs-{}", crate::token::random_hex(6)));
        Certs::load_or_generate(&dir).unwrap();
        let file = dir.join("apns.pem");
        let not_after = SystemTime::now() + Duration::from_secs(10 * 86_400);
        issue_topic_identity(&dir, "com.brand.doorbell", not_after, &file).unwrap();
        let identity = crate::tls::Identity::from_file(&file, "").unwrap();
        let pem = std::fs::read(&file).unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chain.len(), 2, "the certificate, then the CA");
        assert_eq!(
            certificate_topic(&chain[0]).as_deref(),
            Some("com.brand.doorbell")
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let expiry = cert.validity().not_after.timestamp();
        let wanted = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((expiry - wanted).abs() <= 1, "{expiry} against {wanted}");
        drop(identity);
        // A certificate with neither a UID nor Apple's name names no topic.
        let (plain, _) = issue_client_certificate(&dir, "com.example.doorbell").unwrap();
        let plain = CertificateDer::from_pem_slice(plain.as_bytes()).unwrap();
        assert_eq!(certificate_topic(&plain), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
