//! The APNs client's TLS: rustls with the ring provider, ALPN `h2`, Mozilla's roots plus
//! an optional extra CA (the mock's, or a corporate proxy's). There is no switch that turns
//! verification off.

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

/// Client configuration for APNs: public roots, plus `extra_ca` when given; with
/// `identity`, the client certificate of certificate auth.
pub fn client_config(
    extra_ca: Option<&Path>,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in read_certs(path)? {
            roots.add(cert)?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
