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
