//! PostgreSQL over TLS, with libpq's `sslmode` and `sslrootcert` read from the URL —
//! tokio-postgres knows neither `verify-ca`, `verify-full` nor `sslrootcert`, so they are
//! taken out of the URL here and the rest is its to parse — and a rustls connector
//! (ring, as every TLS of ringpush). A certificate is never accepted unverified:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it and its certificate verifies as under `require`; else plain (an info line says why, once) | as `require` |
//! | `require` | always | with `sslrootcert`: the chain to that CA (libpq's `verify-ca`, as libpq does when a root file is there); without: the public roots and the host name |
//! | `verify-ca` | always | the chain to `sslrootcert` (required) |
//! | `verify-full` | always | the chain to `sslrootcert` (or, without it or with `system`, the public roots) and the host name |
//!
//! libpq's `prefer` and `require` encrypt without checking the certificate unless a root
//! file is present; ringpush checks it always, so where libpq would accept anything it
//! checks what can be checked: the public roots and the name. `sslrootcert=system` (the
//! public roots, PostgreSQL 16's spelling) goes with `verify-full` only, as in libpq.
//!
//! The TLS session carries `tls-server-end-point` channel binding, so SCRAM logins bind to
//! it (`channel_binding=require` works).

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode as DriverMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, NoTls};
use tokio_rustls::rustls::ClientConfig;

use crate::tls::{self as roots, TlsError};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow (plain first, TLS only if the server insists) is not supported: use prefer or require"
                        .into(),
                )
            }
            other => return Err(format!("sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full")),
        })
    }
}

/// Where `sslrootcert` points.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCert {
    /// Not given.
    None,
    /// `system`: the public roots.
    System,
    File(PathBuf),
}

/// A PostgreSQL URL made ready to connect: the driver's configuration (without the TLS
/// settings it does not know) and the TLS the URL asks for. Cheap to clone.
#[derive(Clone)]
pub struct Target {
    pub(crate) config: Config,
    mode: SslMode,
    tls: Option<MakeRustls>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Reads `url` (the URL form, or libpq's `key=value` form): `sslmode` and
    /// `sslrootcert` here, the rest by tokio-postgres; the root file is read now.
    pub fn parse(url: &str) -> Result<Self, super::DbError> {
        let (rest, mode, root) = split(url).map_err(super::DbError::Tls)?;
        let mut config: Config = rest.parse().map_err(super::DbError::Url)?;
        let mode = mode.unwrap_or(SslMode::Prefer);
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(MakeRustls::new(
                client_config(mode, &root).map_err(super::DbError::Tls)?,
            )),
        };
        config.ssl_mode(match mode {
            SslMode::Disable => DriverMode::Disable,
            SslMode::Prefer => DriverMode::Prefer,
            _ => DriverMode::Require,
        });
        if let Some(tls) = &tls {
            let mut by_host = BY_HOST.lock().unwrap();
            for host in config.get_hosts() {
                if let tokio_postgres::config::Host::Tcp(name) = host {
                    by_host.insert(name.clone(), tls.clone());
                }
            }
        }
        Ok(Self { config, mode, tls })
    }

    /// The `sslmode` in force (`prefer` when the URL names none).
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Opens one connection as the URL says and spawns its driver. Under `prefer`, a server
    /// whose TLS handshake fails (its certificate does not verify) is connected to again
    /// without TLS, as libpq does after a failed handshake, and an info line says so once per
    /// process and server — `prefer`'s documented way, not a fault (libpq's `prefer` checks no
    /// certificate at all).
    pub async fn connect(&self) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
        let Some(tls) = &self.tls else {
            return drive(self.config.connect(NoTls).await?);
        };
        let tls = tls.observed();
        match self.config.connect(tls.clone()).await {
            Ok(pair) => drive(pair),
            Err(e) if self.mode == SslMode::Prefer && tls.failed() => {
                tell_plain(&self.config, &e);
                let mut plain = self.config.clone();
                plain.ssl_mode(DriverMode::Disable);
                drive(plain.connect(NoTls).await?)
            }
            Err(e) => Err(e),
        }
    }
}

/// Spawns a connection's driver.
fn drive<S, T>(
    (client, connection): (Client, tokio_postgres::Connection<S, T>),
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok((client, driver))
}

/// The servers already told about (`prefer` fell back to plain).
static TOLD: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Says once per process and server that `prefer` connected without TLS, why, and how to
/// require it. At info, not warn: it is what `prefer` promises (as libpq's, which would take
/// the unverified session and say nothing), and a start without faults logs no warning — a
/// local PostgreSQL with Debian's self-signed certificate gets here on every start.
fn tell_plain(config: &Config, error: &tokio_postgres::Error) {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let hosts = hosts.join(",");
    if TOLD.lock().unwrap().insert(hosts.clone()) {
        // In words (`the certificate of … is signed by a CA this process does not trust`),
        // not rustls's `invalid peer certificate: UnknownIssuer`.
        let mut source = std::error::Error::source(error);
        let mut cause = error.to_string();
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                let host = hosts.split(',').next().unwrap_or_default();
                cause = crate::tls::failure(io, host, Some("sslrootcert in RINGPUSH_DATABASE_URL"));
                break;
            }
            cause = s.to_string();
            source = s.source();
        }
        tracing::info!(
            %hosts,
            reason = %cause,
            require_tls = "sslmode=verify-full&sslrootcert=/path/to/the-server-ca.pem in the URL (sslmode=disable says plain is meant)",
            "PostgreSQL offered TLS but its certificate does not verify, so sslmode=prefer connected without TLS"
        );
    }
}

/// `url` without `sslmode` and `sslrootcert`, and their values.
fn split(url: &str) -> Result<(String, Option<SslMode>, RootCert), String> {
    let mut mode = None;
    let mut root = RootCert::None;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => mode = Some(SslMode::parse(value)?),
            "sslrootcert" if value == "system" => root = RootCert::System,
            "sslrootcert" if value.is_empty() => root = RootCert::None,
            "sslrootcert" => root = RootCert::File(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let rest = if is_url {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let decode = |s: &str| {
                        percent_encoding::percent_decode_str(s)
                            .decode_utf8()
                            .map(|c| c.into_owned())
                            .map_err(|e| format!("{k}: {e}"))
                    };
                    if !take(&decode(k)?, &decode(v)?)? {
                        kept.push(pair);
                    }
                }
                match kept.is_empty() {
                    true => base.to_owned(),
                    false => format!("{base}?{}", kept.join("&")),
                }
            }
        }
    } else {
        // libpq's `key=value` form: these two keys' values need no quoting.
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            match word.split_once('=') {
                Some((k, v)) if take(k.trim(), v.trim_matches('\''))? => {}
                _ => kept.push(word),
            }
        }
        kept.join(" ")
    };
    Ok((rest, mode, root))
}

/// The rustls configuration for `mode` and `root` (see the table in this file's header).
fn client_config(mode: SslMode, root: &RootCert) -> Result<Arc<ClientConfig>, String> {
    let read =
        |path: &PathBuf| roots::only(path).map_err(|e: TlsError| format!("sslrootcert: {e}"));
    let public = || roots::roots(None).map_err(|e| e.to_string());
    // ALPN `postgresql`: what a server taking TLS directly (sslnegotiation=direct) requires.
    let alpn: &[&[u8]] = &[b"postgresql"];
    let full = |store| roots::config(store, None, alpn).map_err(|e| e.to_string());
    let chain = |store| roots::chain_only_config(store, alpn).map_err(|e| e.to_string());
    match (mode, root) {
        (SslMode::Disable, _) => unreachable!("no TLS"),
        (SslMode::VerifyFull, RootCert::File(path)) => full(read(path)?),
        (SslMode::VerifyFull, RootCert::System | RootCert::None) => full(public()?),
        (SslMode::VerifyCa, RootCert::File(path)) => chain(read(path)?),
        (SslMode::VerifyCa, RootCert::None) => Err(
            "sslmode=verify-ca needs sslrootcert (the server's CA): it checks the chain only, which against the public roots would accept anyone's certificate; or use sslmode=verify-full"
                .into(),
        ),
        (_, RootCert::System) => Err(format!(
            "sslrootcert=system goes with sslmode=verify-full only (sslmode={}), as in libpq",
            match mode {
                SslMode::Prefer => "prefer",
                SslMode::Require => "require",
                _ => "verify-ca",
            }
        )),
        (SslMode::Prefer | SslMode::Require, RootCert::File(path)) => chain(read(path)?),
        (SslMode::Prefer | SslMode::Require, RootCert::None) => full(public()?),
    }
}

/// The TLS of the URLs parsed in this process, by host name: what a query's cancel request
/// (a connection of its own, opened by the driver from the host name alone) is sent with.
static BY_HOST: Mutex<std::collections::BTreeMap<String, MakeRustls>> =
    Mutex::new(std::collections::BTreeMap::new());

/// TLS for cancel requests ([`tokio_postgres::CancelToken::cancel_query`]): the connector of
/// the URL that named the host; none known (a host no URL with TLS named), a cancel that
/// needs TLS fails (one without, under `disable` or to a server without TLS, is sent).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CancelTls;

impl<S> MakeTlsConnect<S> for CancelTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let known = BY_HOST.lock().unwrap().get(domain).cloned();
        match known {
            Some(mut tls) => MakeTlsConnect::<S>::make_tls_connect(&mut tls, domain),
            None => Ok(RustlsConnect {
                target: Err(format!("no PostgreSQL URL with TLS named {domain}")),
                failed: Arc::default(),
            }),
        }
    }
}

/// Makes a TLS connector per host for tokio-postgres; remembers whether a handshake failed
/// (for `prefer`'s plain retry).
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Arc<ClientConfig>,
    failed: Arc<AtomicBool>,
}

impl MakeRustls {
    fn new(config: Arc<ClientConfig>) -> Self {
        Self {
            config,
            failed: Arc::default(),
        }
    }

    /// The same configuration with a fresh handshake record, for one connect.
    fn observed(&self) -> Self {
        Self::new(self.config.clone())
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    /// Never fails: tokio-postgres asks for a connector before it knows whether TLS will be
    /// spoken (`disable`, a server without TLS, a host given only as `hostaddr`); a host
    /// name that cannot be checked fails the handshake instead.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_owned()).map_err(|e| {
            format!("no host name to check the certificate against ({domain:?}: {e})")
        });
        Ok(RustlsConnect {
            target: name.map(|name| (self.config.clone(), name)),
            failed: self.failed.clone(),
        })
    }
}

/// One TLS handshake with one host.
pub(crate) struct RustlsConnect {
    /// The configuration and the name checked, or why there is none.
    target: Result<(Arc<ClientConfig>, ServerName<'static>), String>,
    failed: Arc<AtomicBool>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let result = match self.target {
                Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
                Ok((config, name)) => tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map(TlsStream),
            };
            if result.is_err() {
                self.failed.store(true, Ordering::Relaxed);
            }
            result
        })
    }
}

/// A TLS session with a PostgreSQL server.
pub struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the hash of the server's certificate, with the
    /// hash of its signature algorithm (SHA-256 for MD5 and SHA-1).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        let Some(cert) = session.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        match signature_hash(cert.as_ref()) {
            Some(algorithm) => ChannelBinding::tls_server_end_point(
                ring::digest::digest(algorithm, cert.as_ref())
                    .as_ref()
                    .to_vec(),
            ),
            None => ChannelBinding::none(),
        }
    }
}

/// The hash RFC 5929 binds a certificate with, from its signature algorithm: `None` for an
/// algorithm it does not define one for (Ed25519, RSA-PSS), and then no binding is offered.
fn signature_hash(der: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, … }, … }
    let (_, certificate, _) = der_element(der, 0x30)?;
    let (_, _, after_tbs) = der_element(certificate, 0x30)?;
    let (_, algorithm, _) = der_element(after_tbs, 0x30)?;
    let (_, oid, _) = der_element(algorithm, 0x06)?;
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    use ring::digest::{SHA256, SHA384, SHA512};
    match oid {
        // md5, sha1, sha256 WithRSAEncryption
        [r @ .., 0x04 | 0x05 | 0x0b] if r == RSA => Some(&SHA256),
        [r @ .., 0x0c] if r == RSA => Some(&SHA384),
        [r @ .., 0x0d] if r == RSA => Some(&SHA512),
        // ecdsa-with-SHA1, ecdsa-with-SHA256/384/512
        [e @ .., 0x01] if e == ECDSA => Some(&SHA256),
        [e @ .., 0x03, 0x02] if e == ECDSA => Some(&SHA256),
        [e @ .., 0x03, 0x03] if e == ECDSA => Some(&SHA384),
        [e @ .., 0x03, 0x04] if e == ECDSA => Some(&SHA512),
        _ => None,
    }
}

/// One DER element of `tag` at the start of `input`: (its header length, its content, what
/// follows it).
fn der_element(input: &[u8], tag: u8) -> Option<(usize, &[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (len, header): (usize, usize) = match first {
        n if n < 0x80 => (n as usize, 2),
        0x81 => (*input.get(2)? as usize, 3),
        0x82 => (
            u16::from_be_bytes([*input.get(2)?, *input.get(3)?]) as usize,
            4,
        ),
        0x83 => (
            u32::from_be_bytes([0, *input.get(2)?, *input.get(3)?, *input.get(4)?]) as usize,
            5,
        ),
        _ => return None,
    };
    let content = input.get(header..header.checked_add(len)?)?;
    Some((header, content, &input[header + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_settings_leave_the_url_and_the_rest_stays_for_the_driver() {
        let (rest, mode, root) = split(
            "postgres://u:p@h1:5432,h2:5433/db?sslmode=verify-full&target_session_attrs=read-write&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write"
        );
        assert_eq!(mode, Some(SslMode::VerifyFull));
        assert_eq!(root, RootCert::File("/etc/ca.pem".into()));
        let (rest, mode, root) = split("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), mode, root),
            ("postgres://h/db", Some(SslMode::Require), RootCert::None)
        );
        let (rest, mode, root) =
            split("host=h dbname=db sslmode=verify-ca sslrootcert='/ca.pem'").unwrap();
        assert_eq!(
            (rest.as_str(), mode, root),
            (
                "host=h dbname=db",
                Some(SslMode::VerifyCa),
                RootCert::File("/ca.pem".into())
            )
        );
        assert_eq!(split("postgres://h/db").unwrap().1, None);
        assert!(split("postgres://h/db?sslmode=allow").is_err());
        assert!(split("postgres://h/db?sslmode=verify").is_err());
    }

    #[test]
    fn every_sslmode_verifies_or_is_refused() {
        let parse = |url: &str| Target::parse(url).map(|t| t.mode);
        assert_eq!(parse("postgres://h/db").unwrap(), SslMode::Prefer);
        assert_eq!(
            parse("postgres://h/db?sslmode=disable").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            parse("postgres://h/db?sslmode=require").unwrap(),
            SslMode::Require
        );
        assert_eq!(
            parse("postgres://h/db?sslmode=verify-full").unwrap(),
            SslMode::VerifyFull
        );
        assert_eq!(
            parse("postgres://h/db?sslmode=verify-full&sslrootcert=system").unwrap(),
            SslMode::VerifyFull
        );
        for (url, why) in [
            ("postgres://h/db?sslmode=verify-ca", "needs sslrootcert"),
            (
                "postgres://h/db?sslmode=require&sslrootcert=system",
                "verify-full only",
            ),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem",
                "sslrootcert",
            ),
            ("postgres://h/db?sslmode=allow", "not supported"),
        ] {
            let err = Target::parse(url).unwrap_err().to_string();
            assert!(
                err.starts_with("RINGPUSH_DATABASE_URL") && err.contains(why),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn channel_binding_hashes_with_the_certificates_signature_hash() {
        use rcgen::{CertificateParams, KeyPair};
        let cases: [(&rcgen::SignatureAlgorithm, Option<usize>); 3] = [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Some(32)),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Some(48)),
            (&rcgen::PKCS_ED25519, None),
        ];
        for (alg, len) in cases {
            let key = KeyPair::generate_for(alg).unwrap();
            let cert = CertificateParams::new(vec!["db.example".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let hash = signature_hash(cert.der());
            assert_eq!(hash.map(|h| h.output_len()), len, "{alg:?}");
        }
        assert_eq!(signature_hash(b"\x30\x05junk"), None);
        assert_eq!(signature_hash(b""), None);
    }
}
