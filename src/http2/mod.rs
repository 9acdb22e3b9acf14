//! Persistent HTTP/2 connections to one push endpoint, shared by every request: what the APNs
//! client ([`crate::apns::http2`]) and the FCM client ([`crate::fcm`]) both stand on.
//!
//! - a [`Pool`] holds `connections` persistent connections to one [`Endpoint`], each opened
//!   on first use and replaced when it fails; requests are spread round-robin over them, and
//!   `ready()` waits for the server's stream limit, which `h2` follows as it changes;
//! - [`Pool::request`] sends one request and reads its whole answer; a stream the server
//!   never processed — refused with REFUSED_STREAM, above a GOAWAY's last-stream-id, or never
//!   sent because the connection had gone — comes back as [`StreamError::unprocessed`], for
//!   the caller to resend on another connection (RFC 9113 §8.7);
//! - reconnecting backs off exponentially with jitter, so an unreachable endpoint is probed,
//!   not hammered; requests meanwhile fail fast with [`SendError::Backoff`]. A connection
//!   that ends before answering anything counts as a failed connect (the first such is
//!   replaced at once, later ones wait the backoff);
//! - an idle connection is PINGed, and dropped if the PING goes unanswered;
//! - [`Pool::probe`]: whether a connection can be had now (a TCP connect alone while the
//!   endpoint refuses TCP).

mod cork;
mod error;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::uri::Authority;
use http::{HeaderMap, Uri};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use error::SendError;

use crate::backoff::Reconnect;

/// Where requests go: scheme and authority of an HTTPS base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://host:port`, the prefix of every request URI.
    pub base: String,
    pub host: String,
    pub port: u16,
    /// `host:port`, parsed once: every request's URI is built from it.
    pub authority: Authority,
}

impl Endpoint {
    /// Parses `https://host[:port]`; the port defaults to 443.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!(
                "{url:?} must start with https:// (push services are TLS only)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?;
        if !matches!(uri.path(), "" | "/") {
            return Err(format!("{url:?} must have no path"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let with_port = format!("{}:{port}", authority.host());
        Ok(Self {
            base: format!("https://{with_port}"),
            host: host.to_owned(),
            port,
            authority: with_port
                .parse()
                .map_err(|e| format!("{url:?} has no valid authority: {e}"))?,
        })
    }
}

/// How a pool's connections behave.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Persistent connections per endpoint.
    pub connections: usize,
    /// How long a TCP connect plus TLS and HTTP/2 handshake may take.
    pub connect_timeout: Duration,
    /// PING a connection idle for this long; `None` never pings.
    pub ping_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is dropped.
    pub ping_timeout: Duration,
    /// Reconnect backoff: the first delay, doubled per failure up to the cap, jittered.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a pool has open right now, for metrics (shared by a client's pools).
#[derive(Debug, Default)]
pub struct Gauges {
    connections: AtomicI64,
    streams: AtomicI64,
}

impl Gauges {
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn streams(&self) -> i64 {
        self.streams.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.streams.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// Counts one stream in flight while alive.
pub struct InFlight(Arc<Gauges>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connections to one endpoint.
pub struct Pool {
    slots: Vec<Arc<Slot>>,
    /// Round-robin position.
    next: AtomicUsize,
}

/// One persistent connection, opened on first use and replaced when it fails.
pub(crate) struct Slot {
    /// The service's name, for logs (`APNs`, `FCM`).
    service: &'static str,
    gauges: Arc<Gauges>,
    /// When a connection to this endpoint last logged that it cannot connect (ms since the
    /// epoch), shared by the endpoint's connections: one line per endpoint per attempt.
    warned: Arc<AtomicU64>,
    endpoint: Endpoint,
    tls: TlsConnector,
    /// The setting that adds a CA to trust for this endpoint (`RINGPUSH_APNS_CA_FILE`), named
    /// when the server's certificate comes from a CA the process does not trust.
    ca_setting: Option<&'static str>,
    tuning: Arc<Tuning>,
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
pub(crate) struct Live {
    service: &'static str,
    sender: SendRequest<Bytes>,
    /// Set on the first answer: the connection worked (see [`Slot::live`]).
    proved: Arc<AtomicBool>,
    /// Set on the first request (a connection only probed proves nothing either way).
    used: Arc<AtomicBool>,
    /// Cancelled when the connection ends or must not take new requests.
    retired: CancellationToken,
    /// When a request last went out, in ms since the process's epoch (for idle PINGs).
    last_used: Arc<AtomicU64>,
}

/// A stream that failed; `sent` says whether its request reached the connection.
pub(crate) struct StreamError {
    pub error: h2::Error,
    pub sent: bool,
}

impl StreamError {
    /// The server certainly did not process it: it may be resent at once.
    pub(crate) fn unprocessed(&self) -> bool {
        let e = &self.error;
        !self.sent
            || e.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
    }

    /// The connection is unusable for new streams.
    pub(crate) fn connection_gone(&self) -> bool {
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

/// How many times a never-processed request is resent before giving up (the request
/// timeout bounds it too). A busy connection that goes away can send dozens of waiting
/// requests back at once, each to be placed on the next connection.
pub(crate) const MAX_RESENDS: usize = 32;

/// A service's answer to one request, with the connection that carried it (a client retires
/// it after an answer that asks for a new connection).
pub(crate) struct Answered {
    pub response: Response,
    pub live: Live,
    pub endpoint: Endpoint,
}

impl Pool {
    /// Sends one request — built by `request` for the connection it goes on, so a resend
    /// carries fresh values (a bearer, a ttl) — and reads its answer: the one send-and-resend
    /// loop of every push service's client. A connection that cannot be had sends the
    /// request to the next; a stream the service certainly did not process (refused, above a
    /// GOAWAY's last stream, never sent because the connection had just gone) is resent at
    /// once on another connection, up to [`MAX_RESENDS`] times; a connection that is gone is
    /// retired. Anything else is the caller's: the answer, or the error.
    pub(crate) async fn send_resending(
        &self,
        mut request: impl FnMut(&Endpoint) -> (http::Request<()>, Bytes),
    ) -> Result<Answered, SendError> {
        let mut last_error = None;
        for attempt in 0..MAX_RESENDS + self.size() {
            let slot = self.pick();
            let live = match slot.live().await {
                Ok(live) => live,
                // Try the other connections before giving up.
                Err(e) if attempt + 1 < self.size() => {
                    last_error = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (head, body) = request(slot.endpoint());
            match live.send(head, body).await {
                Ok(response) => {
                    return Ok(Answered {
                        response,
                        endpoint: slot.endpoint().clone(),
                        live,
                    })
                }
                Err(e) => {
                    if e.connection_gone() {
                        live.retire(slot.endpoint(), &e.error.to_string());
                    }
                    if !e.unprocessed() {
                        return Err(e.error.into());
                    }
                    debug!(error = %e.error, "stream not processed by {}; resending", live.service);
                    last_error = Some(e.error.into());
                }
            }
        }
        Err(last_error.expect("the loop ran at least once"))
    }

    /// `tuning.connections` connections (at least one) to `endpoint`, none open yet.
    pub fn new(
        service: &'static str,
        endpoint: &Endpoint,
        tls: Arc<ClientConfig>,
        tuning: Arc<Tuning>,
        gauges: Arc<Gauges>,
    ) -> Self {
        let warned = Arc::new(AtomicU64::new(0));
        Pool {
            slots: (0..tuning.connections.max(1))
                .map(|_| {
                    Arc::new(Slot {
                        service,
                        gauges: gauges.clone(),
                        warned: warned.clone(),
                        endpoint: endpoint.clone(),
                        tls: TlsConnector::from(tls.clone()),
                        ca_setting: None,
                        tuning: tuning.clone(),
                        state: Mutex::new(SlotState {
                            live: None,
                            reconnect: Reconnect::new(tuning.backoff_min, tuning.backoff_max),
                            tcp_down: false,
                        }),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Names `var` as the setting that adds a CA to trust, in the error of a handshake with a
    /// server whose certificate comes from an unknown CA.
    pub fn with_ca_setting(mut self, var: &'static str) -> Self {
        for slot in &mut self.slots {
            if let Some(slot) = Arc::get_mut(slot) {
                slot.ca_setting = Some(var);
            }
        }
        self
    }

    /// How many connections the pool keeps.
    pub(crate) fn size(&self) -> usize {
        self.slots.len()
    }

    /// The next connection, round-robin.
    pub(crate) fn pick(&self) -> &Arc<Slot> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.slots[i % self.slots.len()]
    }

    /// Makes sure a connection is up — TLS and the HTTP/2 handshake done — opening one if
    /// the backoff allows. Cheap to call often: while every connection waits out its backoff
    /// after the endpoint stopped accepting TCP connections, it only tries a TCP connect (no
    /// TLS), and when that succeeds the endpoint is back: one connection skips the rest of
    /// its backoff. Full reconnects to an endpoint that accepts TCP but fails later (TLS,
    /// HTTP/2) keep their backoff.
    pub async fn probe(&self) -> Result<(), SendError> {
        let mut last = None;
        for slot in &self.slots {
            match slot.live().await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        let last = last.expect("a pool has at least one connection");
        let slot = &self.slots[0];
        if matches!(last, SendError::Backoff { .. }) && slot.state.lock().await.tcp_down {
            let endpoint = &slot.endpoint;
            let timeout = slot.tuning.connect_timeout.min(Duration::from_secs(2));
            let tcp = tokio::time::timeout(
                timeout,
                TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
            )
            .await;
            if matches!(tcp, Ok(Ok(_))) {
                info!(endpoint = %endpoint.base, "{} accepts TCP connections again; reconnecting now", slot.service);
                slot.state.lock().await.reconnect.connected();
                return slot.live().await.map(|_| ());
            }
        }
        Err(last)
    }

    /// Whether a connection is open now, or the next request may open one (no backoff):
    /// what a readiness check reads without connecting.
    pub fn up(&self) -> bool {
        self.slots.iter().any(|slot| match slot.state.try_lock() {
            Ok(state) => {
                state
                    .live
                    .as_ref()
                    .is_some_and(|l| !l.retired.is_cancelled())
                    || state.reconnect.check().is_ok()
            }
            Err(_) => true,
        })
    }
}

impl Slot {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The live connection, opening one if there is none (and the backoff allows).
    pub async fn live(self: &Arc<Self>) -> Result<Live, SendError> {
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
                warn!(endpoint = %self.endpoint.base, failures = state.reconnect.failures(), backoff_ms = wait.as_millis() as u64, "{} connections keep ending before answering; backing off", self.service);
            }
        }
        if let Err((wait, reason)) = state.reconnect.check() {
            return Err(SendError::Backoff {
                endpoint: self.endpoint.base.clone(),
                wait,
                reason,
            });
        }
        let timeout = self.tuning.connect_timeout;
        let tcp_up = AtomicBool::new(false);
        let connected = match tokio::time::timeout(timeout, self.connect(&tcp_up)).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {}", crate::human::Human(timeout))),
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
                    warn!(endpoint = %self.endpoint.base, error = %reason, failures = state.reconnect.failures(), backoff_ms = wait.as_millis() as u64, "cannot connect to {}", self.service);
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
            .map_err(|e| crate::tls::failure(&e, &endpoint.host, self.ca_setting))?;
        let (sender, mut connection) = h2::client::Builder::new()
            // APNs allows one stream until the first authenticated request; its SETTINGS
            // frame then raises the limit (any server's SETTINGS does).
            .initial_max_send_streams(1)
            .handshake::<_, Bytes>(cork::Cork::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let retired = CancellationToken::new();
        let last_used = Arc::new(AtomicU64::new(now_ms()));
        if let (Some(interval), Some(ping_pong)) =
            (self.tuning.ping_interval, connection.ping_pong())
        {
            tokio::spawn(keep_alive(
                ping_pong,
                interval,
                self.tuning.ping_timeout,
                last_used.clone(),
                retired.clone(),
                endpoint.base.clone(),
            ));
        }
        let (base, done, gauges) = (endpoint.base.clone(), retired.clone(), self.gauges.clone());
        let service = self.service;
        gauges.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(endpoint = %base, "{service} connection closed"),
                Err(e) => warn!(endpoint = %base, error = %e, "{service} connection ended"),
            }
            gauges.connections.fetch_sub(1, Ordering::Relaxed);
            done.cancel();
        });
        info!(endpoint = %endpoint.base, "{service} connection open");
        Ok(Live {
            service,
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
    pub(crate) fn retire(&self, endpoint: &Endpoint, why: &str) {
        if !self.retired.is_cancelled() {
            info!(endpoint = %endpoint.base, reason = why, "replacing the {} connection", self.service);
            self.retired.cancel();
        }
    }

    /// Sends one request with `payload` as its body and reads the whole answer.
    pub async fn send(
        &self,
        request: http::Request<()>,
        payload: Bytes,
    ) -> Result<Response, StreamError> {
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
        let (parts, mut body) = response.into_parts();
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(sent)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        Ok(Response {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: bytes.freeze(),
        })
    }
}
