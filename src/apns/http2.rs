//! The APNs HTTP/2 client: a few persistent connections per endpoint, shared by every
//! request, each with as many streams in flight as the server's SETTINGS allow.
//!
//! `send` is a thin wrapper around [`super::request::build_request`]. Around it:
//! - requests are spread round-robin over `connections` persistent connections per endpoint;
//!   `ready()` waits for the server's stream limit, which `h2` follows as it changes;
//! - a stream APNs never processed — refused with REFUSED_STREAM, above a GOAWAY's
//!   last-stream-id, or never sent because the connection had gone — is resent at once on
//!   another connection (RFC 7540 §8.1.4), invisibly to the caller;
//! - a connection that fails, gets GOAWAY, or answers `Shutdown`, `IdleTimeout`,
//!   `ExpiredProviderToken`, `UnrelatedKeyIdInToken` or `TooManyProviderTokenUpdates` is
//!   dropped and replaced on next use; after `ExpiredProviderToken` the JWT is re-signed and
//!   the request sent once more;
//! - reconnecting backs off exponentially with jitter, so an unreachable APNs is probed, not
//!   hammered; requests meanwhile fail fast with [`SendError::Backoff`]. A connection that
//!   ends before answering anything counts as a failed connect (the first such is replaced at
//!   once, later ones wait the backoff): a peer that accepts and then drops every connection
//!   is not met with a handshake per request;
//! - an idle connection is PINGed, and dropped if the PING goes unanswered.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::jwt::Signer;
use super::request::{build_request, Endpoint, Notification};
use super::{Answer, Environment, Reason, Rejection, SendError};
use crate::backoff::Reconnect;

/// How many times a never-processed request is resent before giving up (the request
/// timeout bounds it too). A busy connection that goes away can send dozens of waiting
/// requests back at once, each to be placed on the next connection.
const MAX_RESENDS: usize = 32;

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct Settings {
    pub production: Endpoint,
    pub sandbox: Endpoint,
    /// How long one request may take, from the first try to the answer.
    pub request_timeout: Duration,
    /// How long a TCP connect plus TLS and HTTP/2 handshake may take.
    pub connect_timeout: Duration,
    /// Persistent connections per endpoint.
    pub connections: usize,
    /// PING a connection idle for this long; `None` never pings.
    pub ping_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is dropped.
    pub ping_timeout: Duration,
    /// Reconnect backoff: the first delay, doubled per failure up to the cap, jittered.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Settings {
    /// The defaults `ringpush worker` uses, for two endpoints.
    pub fn new(production: Endpoint, sandbox: Endpoint) -> Self {
        Self {
            production,
            sandbox,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            connections: 2,
            ping_interval: Some(Duration::from_secs(60)),
            ping_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The APNs client of one worker. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    gauges: Arc<Gauges>,
    production: Pool,
    sandbox: Pool,
    /// Token auth: the shared JWT signer (one token for every connection). `None` with
    /// certificate auth, where the TLS configuration carries the client certificate.
    signer: Option<Arc<Signer>>,
    request_timeout: Duration,
}

/// What the client has open right now, for metrics.
#[derive(Debug, Default)]
struct Gauges {
    connections: AtomicI64,
    streams: AtomicI64,
}

/// Counts one stream in flight while alive.
struct InFlight(Arc<Gauges>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connections to one endpoint.
struct Pool {
    slots: Vec<Arc<Slot>>,
    /// Round-robin position.
    next: AtomicUsize,
}

/// One persistent connection, opened on first use and replaced when it fails.
struct Slot {
    gauges: Arc<Gauges>,
    /// When a connection to this endpoint last logged that it cannot connect (ms since the
    /// epoch), shared by the endpoint's connections: one line per endpoint per attempt.
    warned: Arc<AtomicU64>,
    endpoint: Endpoint,
    tls: TlsConnector,
    settings: Arc<Settings>,
    state: Mutex<SlotState>,
}

struct SlotState {
    live: Option<Live>,
    /// When the next connection may be opened.
    reconnect: Reconnect,
    /// The last connect failed before a TCP connection was up (refused, unreachable, timed
    /// out): the endpoint is down, and a TCP connect alone tells when it is back.
    tcp_down: bool,
}

/// A live HTTP/2 connection.
#[derive(Clone)]
struct Live {
    sender: SendRequest<Bytes>,
    /// Set on the first answer: the connection worked (see [`Slot::live`]).
    proved: Arc<AtomicBool>,
    /// Set on the first request (a connection only probed proves nothing either way).
    used: Arc<AtomicBool>,
    /// Cancelled when the connection ends or must not take new requests.
    retired: CancellationToken,
    /// When a request last went out, in ms since the client's epoch (for idle PINGs).
    last_used: Arc<AtomicU64>,
}

/// A stream that failed; `sent` says whether its request reached the connection.
struct StreamError {
    error: h2::Error,
    sent: bool,
}

impl StreamError {
    /// APNs certainly did not process it: it may be resent at once.
    fn unprocessed(&self) -> bool {
        let e = &self.error;
        !self.sent
            || e.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
    }

    /// The connection is unusable for new streams.
    fn connection_gone(&self) -> bool {
        !self.sent || self.error.is_go_away() || self.error.is_io()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connections_open", &self.connections_open())
            .field("streams_in_flight", &self.streams_in_flight())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client that connects lazily, on the first notification for each endpoint.
    pub fn new(settings: Settings, tls: Arc<ClientConfig>, signer: Option<Arc<Signer>>) -> Self {
        let settings = Arc::new(settings);
        let gauges = Arc::new(Gauges::default());
        let pool = |endpoint: &Endpoint| {
            let warned = Arc::new(AtomicU64::new(0));
            Pool {
                slots: (0..settings.connections.max(1))
                    .map(|_| {
                        Arc::new(Slot {
                            gauges: gauges.clone(),
                            warned: warned.clone(),
                            endpoint: endpoint.clone(),
                            tls: TlsConnector::from(tls.clone()),
                            settings: settings.clone(),
                            state: Mutex::new(SlotState {
                                live: None,
                                reconnect: Reconnect::new(
                                    settings.backoff_min,
                                    settings.backoff_max,
                                ),
                                tcp_down: false,
                            }),
                        })
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            }
        };
        Self {
            inner: Arc::new(Inner {
                gauges: gauges.clone(),
                production: pool(&settings.production),
                sandbox: pool(&settings.sandbox),
                signer,
                request_timeout: settings.request_timeout,
            }),
        }
    }

    /// HTTP/2 connections open now (both endpoints).
    pub fn connections_open(&self) -> i64 {
        self.inner.gauges.connections.load(Ordering::Relaxed)
    }

    /// Requests awaiting their answer now.
    pub fn streams_in_flight(&self) -> i64 {
        self.inner.gauges.streams.load(Ordering::Relaxed)
    }

    /// Sends one notification and returns APNs's answer.
    pub async fn send(&self, env: Environment, n: &Notification) -> Result<Answer, SendError> {
        self.inner.gauges.streams.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(self.inner.gauges.clone());
        let pool = match env {
            Environment::Production => &self.inner.production,
            Environment::Sandbox => &self.inner.sandbox,
        };
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, self.send_on(pool, n)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout(timeout)),
        }
    }

    /// Makes sure a connection to `env`'s endpoint is up — TLS and the HTTP/2 handshake
    /// done — opening one if the backoff allows: how a worker that found APNs unreachable
    /// learns it is back. Cheap to call often: while every connection waits out its backoff
    /// after the endpoint stopped accepting TCP connections, it only tries a TCP connect
    /// (no TLS), and when that succeeds the endpoint is back: one connection skips the rest
    /// of its backoff. Full reconnects to an endpoint that accepts TCP but fails later (TLS,
    /// HTTP/2) keep their backoff.
    pub async fn probe(&self, env: Environment) -> Result<(), SendError> {
        let pool = match env {
            Environment::Production => &self.inner.production,
            Environment::Sandbox => &self.inner.sandbox,
        };
        let mut last = None;
        for slot in &pool.slots {
            match slot.live().await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        let last = last.expect("a pool has at least one connection");
        let slot = &pool.slots[0];
        if matches!(last, SendError::Backoff { .. }) && slot.state.lock().await.tcp_down {
            let endpoint = &slot.endpoint;
            let timeout = slot.settings.connect_timeout.min(Duration::from_secs(2));
            let tcp = tokio::time::timeout(
                timeout,
                TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
            )
            .await;
            if matches!(tcp, Ok(Ok(_))) {
                info!(endpoint = %endpoint.base, "APNs accepts TCP connections again; reconnecting now");
                slot.state.lock().await.reconnect.connected();
                return slot.live().await.map(|_| ());
            }
        }
        Err(last)
    }

    async fn send_on(&self, pool: &Pool, n: &Notification) -> Result<Answer, SendError> {
        let mut renewed = false;
        let mut last_error = None;
        for attempt in 0..MAX_RESENDS + pool.slots.len() {
            let slot = pool.pick();
            let live = match slot.live().await {
                Ok(live) => live,
                // Try the other connections before giving up.
                Err(e) if attempt + 1 < pool.slots.len() => {
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let bearer = self.inner.signer.as_ref().map(|s| s.bearer());
            let request = build_request(&slot.endpoint, n, bearer.as_ref());
            match live.send(request, n.payload.clone()).await {
                Ok(Answer::Rejected(rejection)) => {
                    if retires_connection(&rejection.reason) {
                        live.retire(&slot.endpoint, rejection.reason.as_str());
                    }
                    if rejection.reason == Reason::ExpiredProviderToken && !renewed {
                        if let Some(signer) = &self.inner.signer {
                            if signer.renew() {
                                renewed = true;
                                continue;
                            }
                        }
                    }
                    return Ok(Answer::Rejected(rejection));
                }
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    if e.connection_gone() {
                        live.retire(&slot.endpoint, &e.error.to_string());
                    }
                    if !e.unprocessed() {
                        return Err(e.error.into());
                    }
                    debug!(error = %e.error, "stream not processed by APNs; resending");
                    last_error = Some(e.error.into());
                }
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }
}

/// Answers after which APNs wants a new connection.
fn retires_connection(reason: &Reason) -> bool {
    matches!(
        reason,
        Reason::Shutdown
            | Reason::IdleTimeout
            | Reason::ExpiredProviderToken
            | Reason::UnrelatedKeyIdInToken
            | Reason::TooManyProviderTokenUpdates
    )
}

impl Pool {
    fn pick(&self) -> &Arc<Slot> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.slots[i % self.slots.len()]
    }
}

impl Slot {
    /// The live connection, opening one if there is none (and the backoff allows).
    async fn live(self: &Arc<Self>) -> Result<Live, SendError> {
        let mut state = self.state.lock().await;
        if let Some(live) = state.live.take() {
            if !live.retired.is_cancelled() {
                state.live = Some(live.clone());
                return Ok(live);
            }
            let (proved, used) = (
                live.proved.load(Ordering::Relaxed),
                live.used.load(Ordering::Relaxed),
            );
            let why = "the connection ended before answering anything";
            if let Some(wait) = state.reconnect.ended(proved, used, why) {
                warn!(endpoint = %self.endpoint.base, failures = state.reconnect.failures(), backoff_ms = wait.as_millis() as u64, "APNs connections keep ending before answering; backing off");
            }
        }
        if let Err((wait, reason)) = state.reconnect.check() {
            return Err(SendError::Backoff {
                endpoint: self.endpoint.base.clone(),
                wait,
                reason,
            });
        }
        let timeout = self.settings.connect_timeout;
        let tcp_up = AtomicBool::new(false);
        let connected = match tokio::time::timeout(timeout, self.connect(&tcp_up)).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        match connected {
            Ok(live) => {
                state.reconnect.connected();
                state.tcp_down = false;
                state.live = Some(live.clone());
                Ok(live)
            }
            Err(reason) => {
                let wait = state.reconnect.connect_failed(&reason);
                state.tcp_down = !tcp_up.load(Ordering::Relaxed);
                let now = now_ms();
                if now.saturating_sub(self.warned.swap(now, Ordering::Relaxed)) >= 1000 {
                    // The next full try waits the backoff, or — when the endpoint refused TCP —
                    // until a probe finds it accepting again, whichever comes first.
                    warn!(endpoint = %self.endpoint.base, error = %reason, failures = state.reconnect.failures(), backoff_ms = wait.as_millis() as u64, "cannot connect to APNs");
                }
                Err(SendError::Connect {
                    endpoint: self.endpoint.base.clone(),
                    reason,
                })
            }
        }
    }

    /// Opens a connection; `tcp_up` is set once the TCP connection is there (what failed
    /// after it was TLS or HTTP/2).
    async fn connect(&self, tcp_up: &AtomicBool) -> Result<Live, String> {
        let endpoint = &self.endpoint;
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| e.to_string())?;
        tcp_up.store(true, Ordering::Relaxed);
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| e.to_string())?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, mut connection) = h2::client::Builder::new()
            // APNs allows one stream until the first authenticated request; its SETTINGS
            // frame then raises the limit.
            .initial_max_send_streams(1)
            .handshake::<_, Bytes>(super::cork::Cork::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let retired = CancellationToken::new();
        let last_used = Arc::new(AtomicU64::new(now_ms()));
        if let (Some(interval), Some(ping_pong)) =
            (self.settings.ping_interval, connection.ping_pong())
        {
            tokio::spawn(keep_alive(
                ping_pong,
                interval,
                self.settings.ping_timeout,
                last_used.clone(),
                retired.clone(),
                endpoint.base.clone(),
            ));
        }
        let (base, done, gauges) = (endpoint.base.clone(), retired.clone(), self.gauges.clone());
        gauges.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(endpoint = %base, "APNs connection closed"),
                Err(e) => warn!(endpoint = %base, error = %e, "APNs connection ended"),
            }
            gauges.connections.fetch_sub(1, Ordering::Relaxed);
            done.cancel();
        });
        info!(endpoint = %endpoint.base, "APNs connection open");
        Ok(Live {
            sender,
            proved: Arc::default(),
            used: Arc::default(),
            retired,
            last_used,
        })
    }
}

/// PINGs the connection when it has been idle for `interval`; retires it when a PING goes
/// unanswered.
async fn keep_alive(
    mut ping_pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
    last_used: Arc<AtomicU64>,
    retired: CancellationToken,
    endpoint: String,
) {
    loop {
        tokio::select! {
            _ = retired.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let idle = now_ms().saturating_sub(last_used.load(Ordering::Relaxed));
        if idle < interval.as_millis() as u64 {
            continue;
        }
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => debug!(endpoint = %endpoint, "PING answered"),
            Ok(Err(e)) => {
                warn!(endpoint = %endpoint, error = %e, "PING failed; dropping the connection");
                retired.cancel();
            }
            Err(_) => {
                warn!(endpoint = %endpoint, "PING unanswered; dropping the connection");
                retired.cancel();
            }
        }
    }
}

impl Live {
    /// No new requests on this connection; streams in flight finish.
    fn retire(&self, endpoint: &Endpoint, why: &str) {
        if !self.retired.is_cancelled() {
            info!(endpoint = %endpoint.base, reason = why, "replacing the APNs connection");
            self.retired.cancel();
        }
    }

    async fn send(
        &self,
        request: http::Request<()>,
        payload: Bytes,
    ) -> Result<Answer, StreamError> {
        self.last_used.store(now_ms(), Ordering::Relaxed);
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        let unsent = |error| StreamError { error, sent: false };
        let sent = |error| StreamError { error, sent: true };
        let mut sender = self.sender.clone().ready().await.map_err(unsent)?;
        let (response, mut stream) = sender.send_request(request, false).map_err(unsent)?;
        stream.send_data(payload, true).map_err(sent)?;
        let response = response.await.map_err(sent)?;
        if !self.proved.load(Ordering::Relaxed) {
            self.proved.store(true, Ordering::Relaxed);
        }
        let status = response.status().as_u16();
        // Kept only for a rejection: an accepted notification allocates nothing for it.
        let apns_id = (status != 200)
            .then(|| response.headers().get("apns-id"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = response.into_body();
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(sent)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        if status == 200 {
            return Ok(Answer::Accepted);
        }
        Ok(Answer::Rejected(parse_rejection(status, &bytes, apns_id)))
    }
}

/// Reads an error answer: `{"reason": "...", "timestamp": <ms>}`, leniently.
fn parse_rejection(status: u16, body: &[u8], apns_id: Option<String>) -> Rejection {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = match json.get("reason").and_then(|r| r.as_str()) {
        Some(r) => Reason::parse(r),
        None => Reason::Unknown(format!("HTTP {status} without a reason")),
    };
    Rejection {
        status,
        reason,
        timestamp_ms: json.get("timestamp").and_then(|t| t.as_i64()),
        apns_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_read_leniently() {
        let r = parse_rejection(
            410,
            br#"{"reason":"Unregistered","timestamp":1795857362120}"#,
            None,
        );
        assert_eq!(
            (r.reason, r.timestamp_ms),
            (Reason::Unregistered, Some(1_795_857_362_120))
        );
        let r = parse_rejection(400, br#"{"reason":"BrandNew"}"#, Some("id".into()));
        assert_eq!(r.reason, Reason::Unknown("BrandNew".into()));
        let r = parse_rejection(500, b"", None);
        assert!(matches!(r.reason, Reason::Unknown(_)));
    }
}
