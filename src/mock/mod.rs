//! `ringpush mock-apns`: a local APNs for development, tests, the demo and the benchmark.
//!
//! An HTTP/2 server over TLS with its own CA ([`certs`]) that checks requests the way APNs
//! does ([`validate`]), answers 200, or the scripted rejection of a token (410 Unregistered
//! with a millisecond `timestamp`, or any status and reason), and counts what it saw.

pub mod certs;
pub mod validate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::apns::http2::{self, Client};
use crate::apns::request::Endpoint;
use crate::apns::{tls, Reason};
use crate::token::DeviceToken;
pub use validate::AuthCheck;

/// How the mock is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Where the CA and server certificate live (generated on first start).
    pub cert_dir: PathBuf,
    /// JWT checks; without a public key every request is taken as authorised.
    pub auth: AuthCheck,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced to clients.
    pub max_concurrent_streams: u32,
    /// How many requests are kept for inspection (oldest dropped first).
    pub keep_requests: usize,
    /// Wait this long before answering each request (a slow APNs).
    pub response_delay: Duration,
}

impl Settings {
    /// A mock on an ephemeral loopback port that checks JWTs against `auth`.
    pub fn local(cert_dir: PathBuf, auth: AuthCheck) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_dir,
            auth,
            max_concurrent_streams: 1000,
            keep_requests: 100_000,
            response_delay: Duration::ZERO,
        }
    }
}

/// A scripted answer for one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub status: u16,
    pub reason: Reason,
    /// With 410: the `timestamp` (Unix ms) APNs reports.
    pub timestamp_ms: Option<i64>,
}

/// One request the mock answered, as tests and the demo read it back.
#[derive(Debug, Clone)]
pub struct Received {
    /// The token from the path (lower-case hex), when the path had one.
    pub token: Option<String>,
    pub status: u16,
    pub reason: Option<Reason>,
    pub path: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Counts of what the mock answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    /// Rejections by reason string.
    pub rejected: BTreeMap<String, u64>,
    /// TLS connections accepted.
    pub connections: u64,
    /// The most requests the mock was answering at the same moment.
    pub max_in_flight: u64,
}

impl Stats {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// Shared state of a running mock.
#[derive(Default)]
struct State {
    auth: AuthCheck,
    keep_requests: usize,
    response_delay: Duration,
    /// Requests being answered right now.
    in_flight: AtomicU64,
    /// Per-token answers; tokens not listed are accepted.
    scripts: Mutex<HashMap<String, Script>>,
    stats: Mutex<Stats>,
    received: Mutex<VecDeque<Received>>,
}

/// A running mock. Dropping it does not stop it: cancel the token given to `start`.
#[derive(Clone)]
pub struct Mock {
    addr: SocketAddr,
    ca_file: PathBuf,
    state: Arc<State>,
}

impl Mock {
    /// Binds, loads or generates the certificates, and serves until `cancel`.
    pub async fn start(settings: Settings, cancel: CancellationToken) -> anyhow::Result<Self> {
        let certs = certs::Certs::load_or_generate(&settings.cert_dir)?;
        let mut config = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs.chain, certs.key)?;
        // ALPN h2, and also clients that offer none (HTTP/2 with prior knowledge).
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            auth: settings.auth,
            keep_requests: settings.keep_requests,
            response_delay: settings.response_delay,
            ..State::default()
        });
        let max_streams = settings.max_concurrent_streams;
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = cancel.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => { warn!(error = %e, "mock APNs accept failed"); continue; }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, state, cancel) =
                    (acceptor.clone(), accept_state.clone(), cancel.clone());
                tokio::spawn(async move {
                    if let Err(e) =
                        serve_connection(acceptor, tcp, state, max_streams, cancel).await
                    {
                        debug!(%peer, error = %e, "mock APNs connection ended");
                    }
                });
            }
        });
        info!(%addr, ca_file = %certs.ca_file.display(), "mock APNs listening");
        Ok(Self {
            addr,
            ca_file: certs.ca_file,
            state,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL clients use (`https://localhost:<port>`; the certificate names localhost).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The CA certificate clients must trust.
    pub fn ca_file(&self) -> &std::path::Path {
        &self.ca_file
    }

    /// An APNs client that sends both environments here, trusting the mock's CA.
    pub fn client(&self, signer: Arc<crate::apns::jwt::Signer>) -> Result<Client, tls::TlsError> {
        let endpoint = Endpoint::parse(&self.url()).expect("the mock's URL parses");
        let settings = http2::Settings {
            production: endpoint.clone(),
            sandbox: endpoint,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        };
        Ok(Client::new(
            settings,
            tls::client_config(Some(self.ca_file()))?,
            Some(signer),
        ))
    }

    /// Answers every request for `token` with 410 Unregistered and this `timestamp`.
    pub fn unregister(&self, token: &DeviceToken, timestamp_ms: i64) {
        self.script(
            token,
            Script {
                status: 410,
                reason: Reason::Unregistered,
                timestamp_ms: Some(timestamp_ms),
            },
        );
    }

    /// Answers every request for `token` as scripted.
    pub fn script(&self, token: &DeviceToken, script: Script) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(token.as_hex().to_owned(), script);
    }

    pub fn stats(&self) -> Stats {
        self.state.stats.lock().unwrap().clone()
    }

    /// The requests answered so far (at most `keep_requests`, oldest first).
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect()
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<State>,
    max_streams: u32,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let mut conn = h2::server::Builder::new()
        .max_concurrent_streams(max_streams)
        .handshake::<_, Bytes>(tls)
        .await?;
    state.stats.lock().unwrap().connections += 1;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => { conn.graceful_shutdown(); None }
            next = conn.accept() => next,
        };
        let Some(request) = next else { break };
        let (request, respond) = request?;
        let state = state.clone();
        tokio::spawn(async move {
            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            {
                let mut stats = state.stats.lock().unwrap();
                stats.max_in_flight = stats.max_in_flight.max(now);
            }
            if let Err(e) = handle_request(request, respond, &state).await {
                debug!(error = %e, "mock APNs stream failed");
            }
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Let streams in flight finish after a graceful shutdown.
    std::future::poll_fn(|cx| conn.poll_closed(cx)).await?;
    Ok(())
}

async fn handle_request(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    state: &State,
) -> Result<(), h2::Error> {
    let (parts, mut body) = request.into_parts();
    let mut payload = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        payload.extend_from_slice(&chunk);
    }
    let payload = payload.freeze();
    if !state.response_delay.is_zero() {
        tokio::time::sleep(state.response_delay).await;
    }
    let apns_id = parts
        .headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(new_apns_id);
    let now = crate::apns::jwt::unix_now();
    let answer =
        validate::validate(&parts, &payload, &state.auth, now).and_then(|token| {
            match state.scripts.lock().unwrap().get(token.as_hex()) {
                Some(s) => Err((s.status, s.reason.clone())),
                None => Ok(token),
            }
        });
    let token = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .map(str::to_ascii_lowercase);
    let (status, reason) = match &answer {
        Ok(_) => (200, None),
        Err((status, reason)) => (*status, Some(reason.clone())),
    };
    {
        let mut stats = state.stats.lock().unwrap();
        match &reason {
            None => stats.accepted += 1,
            Some(r) => *stats.rejected.entry(r.as_str().to_owned()).or_default() += 1,
        }
    }
    if state.keep_requests > 0 {
        let mut received = state.received.lock().unwrap();
        if received.len() == state.keep_requests {
            received.pop_front();
        }
        received.push_back(Received {
            token: token.clone(),
            status,
            reason: reason.clone(),
            path: parts.uri.path().to_owned(),
            headers: parts.headers.clone(),
            payload,
        });
    }
    let response = Response::builder()
        .status(status)
        .header("apns-id", apns_id);
    match reason {
        None => {
            respond.send_response(response.body(()).expect("valid response"), true)?;
        }
        Some(reason) => {
            let mut body = serde_json::json!({ "reason": reason.as_str() });
            if status == 410 {
                let scripted = token.as_deref().and_then(|t| {
                    state
                        .scripts
                        .lock()
                        .unwrap()
                        .get(t)
                        .and_then(|s| s.timestamp_ms)
                });
                body["timestamp"] = scripted.unwrap_or(now * 1000).into();
            }
            let response = response
                .header("content-type", "application/json")
                .body(())
                .expect("valid response");
            let mut stream = respond.send_response(response, false)?;
            stream.send_data(Bytes::from(body.to_string()), true)?;
        }
    }
    Ok(())
}

/// A random lower-case UUID (version 4 layout), as APNs makes up when none is sent.
fn new_apns_id() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system RNG works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `ringpush mock-apns`: serve until `cancel`, logging the counts every 10 s when they move.
pub async fn run(
    settings: Settings,
    scripts: Vec<(DeviceToken, Script)>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mock = Mock::start(settings, cancel.clone()).await?;
    for (token, script) in scripts {
        mock.script(&token, script);
    }
    let mut last = Stats::default();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let stats = mock.stats();
        if stats != last {
            info!(
                accepted = stats.accepted,
                rejected = stats.rejected_total(),
                connections = stats.connections,
                "mock APNs counts"
            );
            last = stats;
        }
    }
    let stats = mock.stats();
    info!(accepted = stats.accepted, rejected = ?stats.rejected, "mock APNs stopped");
    Ok(())
}
