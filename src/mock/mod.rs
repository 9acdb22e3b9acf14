//! `ringpush mock-apns`: a local APNs for development, tests, the demo and the benchmark.
//!
//! An HTTP/2 server over TLS with its own CA ([`certs`]) that checks requests the way APNs
//! does ([`validate`]), answers 200, or the scripted rejection of a token (410 Unregistered
//! with a millisecond `timestamp`, or any status and reason), and counts what it saw. Like
//! APNs (protocol sheet A8/A9) it announces one stream per connection until the first
//! accepted request, locks a connection to its first team and key, refuses a JWT that changes
//! too often or is over an hour old, and accepts client certificates signed by its CA. Fault
//! modes ([`Faults`]) inject GOAWAY, REFUSED_STREAM, 503 Shutdown, a TCP close mid-stream and
//! a rate of errors; a frame-level [`shim`] lets it change SETTINGS and write GOAWAY frames
//! the `h2` server cannot.

pub mod binary;
pub mod certs;
pub mod shim;
pub mod validate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpListener;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
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
    /// MAX_CONCURRENT_STREAMS announced when a connection opens (APNs: 1).
    pub initial_streams: u32,
    /// MAX_CONCURRENT_STREAMS announced after the first accepted request.
    pub max_concurrent_streams: u32,
    /// Announce `initial_streams` again after a rejection (and the maximum after the next
    /// acceptance), as APNs does.
    pub drop_streams_after_rejection: bool,
    /// A connection may change its JWT at most once in this window (APNs: 20 minutes).
    pub token_update_window: Duration,
    /// How many requests are kept for inspection (oldest dropped first).
    pub keep_requests: usize,
    /// Wait this long before answering each request (a slow APNs).
    pub response_delay: Duration,
    pub faults: Faults,
    /// Also serve the legacy binary gateway and feedback service on these addresses.
    pub binary: Option<(SocketAddr, SocketAddr)>,
}

impl Settings {
    /// A mock on an ephemeral loopback port that checks JWTs against `auth`.
    pub fn local(cert_dir: PathBuf, auth: AuthCheck) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_dir,
            auth,
            initial_streams: 1,
            max_concurrent_streams: 1000,
            drop_streams_after_rejection: false,
            token_update_window: Duration::from_secs(20 * 60),
            keep_requests: 100_000,
            response_delay: Duration::ZERO,
            faults: Faults::default(),
            binary: None,
        }
    }
}

/// Faults to inject, per connection unless said otherwise. Changeable while running.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// After this many streams on a connection: GOAWAY naming the last of them; later
    /// streams are not processed.
    pub goaway_after: Option<u64>,
    /// The GOAWAY's debug data.
    pub goaway_debug: GoAwayDebug,
    /// Every n-th stream is reset with REFUSED_STREAM (not processed).
    pub refuse_every: Option<u64>,
    /// After this many streams: answer the next with 503 Shutdown, then GOAWAY.
    pub shutdown_after: Option<u64>,
    /// When this many streams have arrived on a connection, drop the TCP connection at once;
    /// streams still unanswered are cut.
    pub close_after: Option<u64>,
    /// Answer this share of requests (per mille) with an error, e.g. 429, 500 or 503.
    pub error_rate: Option<ErrorRate>,
}

/// Answer the first `count` requests with one status and reason (e.g. 503
/// ServiceUnavailable), then every later one normally: an APNs that fails for a while and
/// recovers, with an exact number of failures. Set with [`Mock::fail_first`]; the count is
/// over all connections of the HTTP/2 interface, from that call, in the order streams are
/// decided: one is spent for each stream given the error (a stream refused, dropped by
/// `close_after` or above a GOAWAY's last-stream-id spends none). It lives apart from
/// [`Faults`], whose every field `ringpush mock-apns` sets by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailFirst {
    pub count: u64,
    pub status: u16,
    pub reason: Reason,
}

impl FailFirst {
    /// Spends one failure, if any are left: the status and reason to answer with.
    fn take(&mut self) -> Option<(u16, Reason)> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        Some((self.status, self.reason.clone()))
    }
}

/// A share of requests answered with one status and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRate {
    pub per_mille: u32,
    pub status: u16,
    pub reason: Reason,
}

/// What a GOAWAY frame's debug data holds (APNs has sent all three).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GoAwayDebug {
    /// `{"reason":"Shutdown"}`, as Apple documents.
    #[default]
    Json,
    /// Plain text, as seen in the field.
    Text,
    /// Nothing.
    Empty,
}

impl GoAwayDebug {
    fn bytes(self) -> Bytes {
        match self {
            GoAwayDebug::Json => Bytes::from_static(br#"{"reason":"Shutdown"}"#),
            GoAwayDebug::Text => Bytes::from_static(b"Server is shutting down"),
            GoAwayDebug::Empty => Bytes::new(),
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
    /// Which connection (1, 2, …) and stream carried it.
    pub connection: u64,
    pub stream_id: u32,
    /// Whether the connection presented a client certificate.
    pub certificate: bool,
}

impl Received {
    /// The `apns-collapse-id` it carried (the ring's `event_id`), if any.
    pub fn collapse_id(&self) -> Option<String> {
        let value = self.headers.get("apns-collapse-id")?;
        value.to_str().ok().map(str::to_owned)
    }
}

/// Counts of what the mock did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered 200.
    pub accepted: u64,
    /// Requests answered with an error, by reason string.
    pub rejected: BTreeMap<String, u64>,
    /// TLS connections accepted.
    pub connections: u64,
    /// The most requests the mock was answering at the same moment (all connections).
    pub max_in_flight: u64,
    /// Streams opened while the connection already had as many open as it announced.
    pub limit_violations: u64,
    /// Streams reset with REFUSED_STREAM.
    pub refused: u64,
    /// Streams above a GOAWAY's last-stream-id, never processed.
    pub unprocessed: u64,
    /// Streams lost to a TCP close before their answer.
    pub cut: u64,
    /// GOAWAY frames sent.
    pub goaways: u64,
    /// PING frames received.
    pub pings: u64,
}

impl Stats {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Requests processed: answered, accepted or not.
    pub fn processed(&self) -> u64 {
        self.accepted + self.rejected_total()
    }
}

/// Shared state of a running mock.
struct State {
    settings: Settings,
    faults: Mutex<Faults>,
    /// The failures [`FailFirst`] has left to answer.
    fail_first: Mutex<Option<FailFirst>>,
    /// Requests being answered right now.
    in_flight: AtomicU64,
    pings: Arc<AtomicU64>,
    connections: AtomicU64,
    /// Per-token answers; tokens not listed are accepted.
    scripts: Mutex<HashMap<String, Script>>,
    stats: Mutex<Stats>,
    received: Mutex<VecDeque<Received>>,
    /// Tokens the binary gateway rejected, offered once by the feedback service.
    binary_feedback: Mutex<Vec<crate::apns::binary::codec::FeedbackTuple>>,
}

/// One client connection, as the stream handlers see it.
struct Conn {
    number: u64,
    shim: shim::Handle,
    /// The client presented a certificate signed by the mock's CA.
    certificate: bool,
    /// The stream limit has been raised after an accepted request.
    raised: AtomicBool,
    /// Streams open on this connection now.
    open: AtomicU64,
    /// Which team and key the connection is locked to, and its current JWT.
    jwt: Mutex<JwtState>,
    /// Cancelled when the connection ends; held streams wait for it.
    closed: CancellationToken,
}

#[derive(Default)]
struct JwtState {
    team_id: Option<String>,
    key_id: Option<String>,
    token: Option<(String, Instant)>,
}

/// What the accept loop decided for one stream.
enum Plan {
    Process,
    /// Answer 503 Shutdown, then GOAWAY naming this stream.
    Shutdown,
    /// Answer with this error whatever the request.
    Error(u16, Reason),
    /// Above a GOAWAY's last-stream-id: hold it unanswered until the connection ends.
    Unprocessed,
    Refuse,
    /// Drop the connection now.
    Close,
}

/// A running mock. Dropping it does not stop it: cancel the token given to `start`.
#[derive(Clone)]
pub struct Mock {
    addr: SocketAddr,
    ca_file: PathBuf,
    cert_dir: PathBuf,
    state: Arc<State>,
    /// The binary gateway's and feedback service's addresses, when served.
    binary: Option<(SocketAddr, SocketAddr)>,
}

impl Mock {
    /// Binds, loads or generates the certificates, and serves until `cancel`.
    pub async fn start(settings: Settings, cancel: CancellationToken) -> anyhow::Result<Self> {
        let certs = certs::Certs::load_or_generate(&settings.cert_dir)?;
        let mut roots = RootCertStore::empty();
        for ca in tls::read_certs(&certs.ca_file)? {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        // The binary interface knows only certificate auth: a certificate is required.
        let binary_tls = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::provider())
                    .build()?,
            )
            .with_single_cert(certs.chain.clone(), certs.key.clone_key())?;
        // Client certificates are optional (token auth sends none) but, when presented, must
        // chain to the mock's CA.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
            .allow_unauthenticated()
            .build()?;
        let mut config = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.chain, certs.key)?;
        // ALPN h2, and also clients that offer none (HTTP/2 with prior knowledge).
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            faults: Mutex::new(settings.faults.clone()),
            fail_first: Mutex::default(),
            settings: settings.clone(),
            in_flight: AtomicU64::new(0),
            pings: Arc::new(AtomicU64::new(0)),
            connections: AtomicU64::new(0),
            scripts: Mutex::default(),
            stats: Mutex::default(),
            received: Mutex::default(),
            binary_feedback: Mutex::default(),
        });
        let accept_state = state.clone();
        let binary_cancel = cancel.clone();
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
                    if let Err(e) = serve_connection(acceptor, tcp, state, cancel).await {
                        debug!(%peer, error = %e, "mock APNs connection ended");
                    }
                });
            }
        });
        let binary = match settings.binary {
            None => None,
            Some((gateway, feedback)) => {
                let acceptor = TlsAcceptor::from(Arc::new(binary_tls));
                let addrs =
                    binary::start(acceptor, gateway, feedback, state.clone(), binary_cancel)
                        .await?;
                info!(gateway = %addrs.0, feedback = %addrs.1, "mock binary gateway and feedback service listening");
                Some(addrs)
            }
        };
        info!(%addr, ca_file = %certs.ca_file.display(), "mock APNs listening");
        Ok(Self {
            addr,
            ca_file: certs.ca_file,
            cert_dir: settings.cert_dir,
            state,
            binary,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The binary gateway's address, when served.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.binary.map(|b| b.0)
    }

    /// The binary feedback service's address, when served.
    pub fn feedback_addr(&self) -> Option<SocketAddr> {
        self.binary.map(|b| b.1)
    }

    /// The base URL clients use (`https://localhost:<port>`; the certificate names localhost).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The CA certificate clients must trust.
    pub fn ca_file(&self) -> &std::path::Path {
        &self.ca_file
    }

    /// A client certificate and key (PEM) signed by the mock's CA, for certificate auth.
    pub fn issue_client_certificate(
        &self,
        name: &str,
    ) -> Result<(String, String), certs::CertError> {
        certs::issue_client_certificate(&self.cert_dir, name)
    }

    /// An APNs client (token auth) that sends both environments here, trusting the mock's CA.
    pub fn client(&self, signer: Arc<crate::apns::jwt::Signer>) -> Result<Client, tls::TlsError> {
        let config = tls::client_config(Some(self.ca_file()), None)?;
        Ok(Client::new(self.client_settings(), config, Some(signer)))
    }

    /// Client settings that send both environments here.
    pub fn client_settings(&self) -> http2::Settings {
        let endpoint = Endpoint::parse(&self.url()).expect("the mock's URL parses");
        http2::Settings::new(endpoint.clone(), endpoint)
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

    /// Lists `token` on the binary feedback service (once), as removed at `time` (Unix s).
    pub fn offer_feedback(&self, token: &DeviceToken, time: u32) {
        let bytes = (0..token.as_hex().len() / 2)
            .map(|i| u8::from_str_radix(&token.as_hex()[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        self.state
            .binary_feedback
            .lock()
            .unwrap()
            .push(crate::apns::binary::codec::FeedbackTuple { time, token: bytes });
    }

    /// Answers `token` normally again.
    pub fn unscript(&self, token: &DeviceToken) {
        self.state.scripts.lock().unwrap().remove(token.as_hex());
    }

    /// Replaces the fault modes; new streams follow them at once.
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock().unwrap() = faults;
    }

    /// Answers the next `fail.count` requests (all connections) with `fail`'s status and
    /// reason, then every later one normally; `None` stops it. Replaces what was left of an
    /// earlier call.
    pub fn fail_first(&self, fail: Option<FailFirst>) {
        *self.state.fail_first.lock().unwrap() = fail;
    }

    /// How many failures [`Mock::fail_first`] still has to answer.
    pub fn fail_first_left(&self) -> u64 {
        let left = self.state.fail_first.lock().unwrap();
        left.as_ref().map_or(0, |f| f.count)
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.state.stats.lock().unwrap().clone();
        stats.pings = self.state.pings.load(Ordering::Relaxed);
        stats.connections = self.state.connections.load(Ordering::Relaxed);
        stats
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
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let settings = &state.settings;
    let (io, shim) = shim::spawn(tls, settings.initial_streams, state.pings.clone());
    let mut h2 = h2::server::Builder::new()
        .max_concurrent_streams(
            settings
                .max_concurrent_streams
                .max(settings.initial_streams),
        )
        .handshake::<_, Bytes>(io)
        .await?;
    let number = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let conn = Arc::new(Conn {
        number,
        shim,
        certificate,
        raised: AtomicBool::new(false),
        open: AtomicU64::new(0),
        jwt: Mutex::default(),
        closed: CancellationToken::new(),
    });
    let _closed = conn.closed.clone().drop_guard();
    let mut streams = 0u64;
    let mut gone_away: Option<u32> = None;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => { h2.graceful_shutdown(); None }
            next = h2.accept() => next,
        };
        let Some(next) = next else { break };
        let (request, respond) = next?;
        streams += 1;
        let id = respond.stream_id().as_u32();
        let open = conn.open.fetch_add(1, Ordering::SeqCst) + 1;
        if open > u64::from(conn.shim.limit()) {
            state.stats.lock().unwrap().limit_violations += 1;
        }
        let plan = decide(&state, &conn, streams, id, &mut gone_away);
        let (state, conn) = (state.clone(), conn.clone());
        tokio::spawn(async move {
            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            {
                let mut stats = state.stats.lock().unwrap();
                stats.max_in_flight = stats.max_in_flight.max(now);
            }
            let result = handle_stream(plan, request, respond, id, &state, &conn).await;
            if let Err(e) = result {
                debug!(error = %e, "mock APNs stream failed");
                state.stats.lock().unwrap().cut += 1;
            }
            conn.open.fetch_sub(1, Ordering::SeqCst);
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Let streams in flight finish after a graceful shutdown.
    std::future::poll_fn(|cx| h2.poll_closed(cx)).await?;
    Ok(())
}

/// Decides a stream's fate in arrival order, so GOAWAY and counts are exact.
fn decide(state: &State, conn: &Conn, n: u64, id: u32, gone_away: &mut Option<u32>) -> Plan {
    if gone_away.is_some_and(|last| id > last) {
        return Plan::Unprocessed;
    }
    let faults = state.faults.lock().unwrap().clone();
    if faults.close_after.is_some_and(|after| n > after) {
        return Plan::Close;
    }
    if faults
        .refuse_every
        .is_some_and(|k| k > 0 && n.is_multiple_of(k))
    {
        return Plan::Refuse;
    }
    if faults.shutdown_after.is_some_and(|after| n == after + 1) {
        *gone_away = Some(id);
        return Plan::Shutdown;
    }
    if faults.goaway_after.is_some_and(|after| n == after) {
        // GOAWAY goes out before this stream is answered: it and the ones before it may be
        // processed, the ones after are not.
        *gone_away = Some(id);
        conn.shim.inject(shim::Inject::GoAway {
            last_stream_id: id,
            error_code: 0,
            debug: faults.goaway_debug.bytes(),
        });
        state.stats.lock().unwrap().goaways += 1;
    }
    if let Some((status, reason)) = state
        .fail_first
        .lock()
        .unwrap()
        .as_mut()
        .and_then(FailFirst::take)
    {
        return Plan::Error(status, reason);
    }
    if let Some(rate) = &faults.error_rate {
        let mut b = [0u8; 2];
        SystemRandom::new()
            .fill(&mut b)
            .expect("the system RNG works");
        if u32::from(u16::from_be_bytes(b)) % 1000 < rate.per_mille {
            return Plan::Error(rate.status, rate.reason.clone());
        }
    }
    Plan::Process
}

async fn handle_stream(
    plan: Plan,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    id: u32,
    state: &State,
    conn: &Conn,
) -> Result<(), h2::Error> {
    match plan {
        Plan::Unprocessed => {
            state.stats.lock().unwrap().unprocessed += 1;
            // Hold the stream, unanswered, until the client gives up the connection.
            conn.closed.cancelled().await;
            return Ok(());
        }
        Plan::Refuse => {
            state.stats.lock().unwrap().refused += 1;
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            return Ok(());
        }
        Plan::Close => {
            conn.shim.inject(shim::Inject::Close);
            state.stats.lock().unwrap().cut += 1;
            return Ok(());
        }
        Plan::Process | Plan::Shutdown | Plan::Error(..) => {}
    }
    let (parts, mut body) = request.into_parts();
    let mut payload = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        payload.extend_from_slice(&chunk);
    }
    let payload = payload.freeze();
    if !state.settings.response_delay.is_zero() {
        tokio::time::sleep(state.settings.response_delay).await;
    }
    let apns_id = parts
        .headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(new_apns_id);
    let now = crate::apns::jwt::unix_now();
    let token = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .map(str::to_ascii_lowercase);
    let shutdown = matches!(plan, Plan::Shutdown);
    let answer: Result<(), (u16, Reason)> = match plan {
        Plan::Shutdown => Err((503, Reason::Shutdown)),
        Plan::Error(status, reason) => Err((status, reason)),
        _ => validate::validate(
            &parts,
            &payload,
            &state.settings.auth,
            conn.certificate,
            now,
        )
        .and_then(|valid| {
            check_connection_jwt(&conn.jwt, valid.jwt, state.settings.token_update_window)
                .map(|()| valid.token)
        })
        .and_then(
            |token| match state.scripts.lock().unwrap().get(token.as_hex()) {
                Some(s) => Err((s.status, s.reason.clone())),
                None => Ok(()),
            },
        ),
    };
    let (status, reason) = match &answer {
        Ok(()) => (200, None),
        Err((status, reason)) => (*status, Some(reason.clone())),
    };
    let response = Response::builder()
        .status(status)
        .header("apns-id", apns_id);
    match &reason {
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
                // Milliseconds, as APNs sends them (whole seconds would date the answer
                // before a registration earlier in the same second).
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(now * 1000, |d| d.as_millis() as i64);
                body["timestamp"] = scripted.unwrap_or(now_ms).into();
            }
            let response = response
                .header("content-type", "application/json")
                .body(())
                .expect("valid response");
            let mut stream = respond.send_response(response, false)?;
            stream.send_data(Bytes::from(body.to_string()), true)?;
        }
    }
    // Answered: count it as processed.
    {
        let mut stats = state.stats.lock().unwrap();
        match &reason {
            None => stats.accepted += 1,
            Some(r) => *stats.rejected.entry(r.as_str().to_owned()).or_default() += 1,
        }
    }
    if state.settings.keep_requests > 0 {
        let mut received = state.received.lock().unwrap();
        if received.len() == state.settings.keep_requests {
            received.pop_front();
        }
        received.push_back(Received {
            token,
            status,
            reason: reason.clone(),
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            payload,
            connection: conn.number,
            stream_id: id,
            certificate: conn.certificate,
        });
    }
    // The stream limit: raised after the first accepted request, lowered after a rejection.
    let settings = &state.settings;
    if reason.is_none() && !conn.raised.swap(true, Ordering::SeqCst) {
        conn.shim
            .inject(shim::Inject::MaxStreams(settings.max_concurrent_streams));
    } else if reason.is_some()
        && settings.drop_streams_after_rejection
        && conn.raised.swap(false, Ordering::SeqCst)
    {
        conn.shim
            .inject(shim::Inject::MaxStreams(settings.initial_streams));
    }
    if shutdown {
        conn.shim.inject(shim::Inject::GoAway {
            last_stream_id: id,
            error_code: 0,
            debug: GoAwayDebug::Json.bytes(),
        });
        state.stats.lock().unwrap().goaways += 1;
    }
    Ok(())
}

/// APNs binds a connection to the team and key of its first JWT and lets the JWT change
/// at most once per window.
fn check_connection_jwt(
    connection: &Mutex<JwtState>,
    jwt: Option<(String, crate::apns::jwt::Claims)>,
    window: Duration,
) -> Result<(), (u16, Reason)> {
    let Some((token, claims)) = jwt else {
        return Ok(());
    };
    let mut state = connection.lock().unwrap();
    if state.key_id.as_ref().is_some_and(|k| *k != claims.key_id) {
        return Err((403, Reason::UnrelatedKeyIdInToken));
    }
    if state.team_id.as_ref().is_some_and(|t| *t != claims.team_id) {
        return Err((403, Reason::InvalidProviderToken));
    }
    state.key_id = Some(claims.key_id);
    state.team_id = Some(claims.team_id);
    match &state.token {
        Some((current, _)) if *current == token => {}
        Some((_, since)) if since.elapsed() < window => {
            return Err((429, Reason::TooManyProviderTokenUpdates));
        }
        _ => state.token = Some((token, Instant::now())),
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
    let hex = crate::token::hex(&b);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apns::jwt::Claims;

    fn jwt(token: &str, key: &str, team: &str) -> Option<(String, Claims)> {
        let claims = Claims {
            key_id: key.into(),
            team_id: team.into(),
            issued_at: 0,
        };
        Some((token.into(), claims))
    }

    #[test]
    fn fail_first_answers_exactly_its_count_with_its_error_then_nothing() {
        let mut fail = FailFirst {
            count: 3,
            status: 503,
            reason: Reason::ServiceUnavailable,
        };
        let taken: Vec<_> = std::iter::from_fn(|| fail.take()).take(10).collect();
        assert_eq!(taken, vec![(503, Reason::ServiceUnavailable); 3]);
        assert_eq!(fail.count, 0);
        assert_eq!(fail.take(), None, "spent: every later request is processed");
    }

    #[test]
    fn a_connection_is_locked_to_its_first_key_and_team_and_its_token_changes_slowly() {
        // A window no test run outlasts; waiting it out is a zero window (no sleeping, so a
        // slow machine cannot let the window pass early).
        let window = Duration::from_secs(3600);
        let conn = Mutex::default();
        assert_eq!(
            check_connection_jwt(&conn, jwt("t1", "K1", "T1"), window),
            Ok(())
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t1", "K1", "T1"), window),
            Ok(())
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K2", "T1"), window),
            Err((403, Reason::UnrelatedKeyIdInToken))
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K1", "T2"), window),
            Err((403, Reason::InvalidProviderToken))
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K1", "T1"), window),
            Err((429, Reason::TooManyProviderTokenUpdates))
        );
        assert_eq!(
            check_connection_jwt(&conn, jwt("t2", "K1", "T1"), Duration::ZERO),
            Ok(())
        );
        assert_eq!(
            check_connection_jwt(&conn, None, window),
            Ok(()),
            "certificate connections carry no JWT"
        );
    }
}
