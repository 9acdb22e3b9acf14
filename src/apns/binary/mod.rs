//! The legacy binary provider interface (protocol sheet B): the seed protocol ringpush
//! replaces, spoken correctly. Selected with `RINGPUSH_APNS_PROTOCOL=binary`.
//!
//! One persistent TLS connection (client certificate) per worker, driven by one task:
//! notifications queue up, and each turn writes everything queued as one batch — many frames,
//! one write. A reader watches for the error packet. Every notification carries a unique
//! identifier and waits in a bounded buffer of sent notifications until it is confirmed.
//!
//! **When is a frame delivered?** The gateway never says "ok". A notification counts as
//! accepted once `quiet` has passed since its batch was flushed with no error packet on the
//! connection (APNs answers a bad frame within milliseconds; the quiet period defaults to
//! 300 ms), or once a notification sent after it on the same connection is confirmed — the
//! gateway processes frames in order. Its ring is acked only then.
//!
//! On an error packet the gateway closes the connection and discards everything written
//! after the failed frame: that frame gets its outcome (status 8 → the token is invalid →
//! a feedback event), the ones before it are accepted, and every one after it is resent on a
//! new connection — none lost, none before it sent twice. Status 10 (Shutdown) names the
//! last frame processed: it and those before it are accepted, the rest resent. A connection
//! that drops without an error packet sends its unconfirmed notifications again (at least
//! once; the collapse-free legacy interface may show such a duplicate).
//!
//! A write that does not finish within `write_timeout` (a peer that stopped reading) drops
//! the connection and resends, like a close; a notification whose caller has given up is not
//! written again. A write that fails because the gateway closed after an error packet is
//! decided by that packet. Reconnecting after an error packet is immediate — that is the
//! protocol. A used connection that dies before it has proved itself (no notification
//! confirmed on it, no error packet) counts as a failure: one such death is retried at once,
//! the next ones wait the jittered reconnect backoff, so a gateway that accepts and then
//! drops connections is not hammered with handshakes.

pub mod codec;
pub mod feedback;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::http2::SendError;
use super::request::Notification;
use super::{Answer, Reason, Rejection};
use crate::backoff::Reconnect;
use codec::{ErrorResponse, Frame, Status};

/// Apple's legacy gateway (retired in 2021; for the systems and rigs that still speak it).
pub const GATEWAY: &str = "gateway.push.apple.com:2195";
/// Apple's legacy feedback service.
pub const FEEDBACK: &str = "feedback.push.apple.com:2196";

/// A `host:port` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl Address {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    pub(crate) async fn connect_tls(
        &self,
        tls: &TlsConnector,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, String> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
            tls.connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("timed out after {timeout:?}"))?
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Settings of the binary client.
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: Address,
    pub connect_timeout: Duration,
    /// How long after its flush a notification with no error packet counts as accepted.
    pub quiet: Duration,
    /// How long one notification may take, queue to confirmation.
    pub request_timeout: Duration,
    /// Longest one write may wait for the gateway to take it.
    pub write_timeout: Duration,
    /// Most notifications per write.
    pub max_batch: usize,
    /// Most sent-but-unconfirmed notifications kept for resending; writing waits beyond it.
    pub max_unconfirmed: usize,
    /// Times one notification is written before it is reported as failed.
    pub max_writes: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Settings {
    pub fn new(gateway: Address) -> Self {
        Self {
            gateway,
            connect_timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_batch: 1000,
            max_unconfirmed: 100_000,
            max_writes: 5,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The binary client of one worker. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    jobs: mpsc::UnboundedSender<Request>,
    gauges: Arc<Gauges>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("binary::Client").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Gauges {
    connections: AtomicI64,
    unconfirmed: AtomicI64,
}

type Reply = oneshot::Sender<Result<Answer, SendError>>;

/// A notification on its way: written, or waiting to be (again).
struct Job {
    frame: Frame,
    reply: Reply,
    writes: u32,
}

/// What the client asks of its connection task.
enum Request {
    Send(Job),
    /// Answer once a connection is up (or the connect failed).
    Probe(Reply),
}

/// A notification written on the current connection and not yet confirmed.
struct Sent {
    job: Job,
    flushed_at: Instant,
}

enum Event {
    /// The gateway's error packet.
    Error(ErrorResponse),
    /// The connection ended without one.
    Closed(String),
}

struct Connection {
    write: WriteHalf<TlsStream<TcpStream>>,
    events: mpsc::UnboundedReceiver<Event>,
    /// The task reading the error packet: it holds the other half of the socket, so it is
    /// stopped with the connection (or a dropped connection would stay open).
    reader: tokio::task::AbortHandle,
    /// A notification was confirmed on it, or the gateway answered with an error packet.
    proved: bool,
    /// Frames were written on it (a connection only probed proves nothing either way).
    used: bool,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Starts the client's connection task (it connects on the first notification).
    pub fn new(settings: Settings, tls: Arc<ClientConfig>) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let gauges = Arc::new(Gauges::default());
        let request_timeout = settings.request_timeout;
        let reconnect = Reconnect::new(settings.backoff_min, settings.backoff_max);
        let driver = Driver {
            settings,
            tls: TlsConnector::from(tls),
            gauges: gauges.clone(),
            next_id: 1,
            queue: VecDeque::new(),
            probes: Vec::new(),
            sent: VecDeque::new(),
            connection: None,
            reconnect,
        };
        tokio::spawn(driver.run(rx));
        Self {
            jobs,
            gauges,
            request_timeout,
        }
    }

    /// Connections open (0 or 1).
    pub fn connections_open(&self) -> i64 {
        self.gauges.connections.load(Ordering::Relaxed)
    }

    /// Notifications written or queued and not yet confirmed.
    pub fn in_flight(&self) -> i64 {
        self.gauges.unconfirmed.load(Ordering::Relaxed)
    }

    /// Sends one notification; answers once it is confirmed, rejected or failed.
    pub async fn send(&self, n: &Notification) -> Result<Answer, SendError> {
        let reject = |status: u8, reason: Reason| {
            Ok(Answer::Rejected(Rejection {
                status: u16::from(status),
                reason,
                timestamp_ms: None,
                apns_id: None,
            }))
        };
        let Some(token) = token_bytes(n.token.as_hex()) else {
            // Only 32-byte tokens exist on this interface: report, do not send.
            return reject(Status::InvalidTokenSize.byte(), Reason::InvalidTokenSize);
        };
        if n.payload.len() > codec::MAX_PAYLOAD {
            return reject(Status::InvalidPayloadSize.byte(), Reason::PayloadTooLarge);
        }
        let frame = Frame {
            token,
            payload: n.payload.clone(),
            identifier: 0,
            expiration: n.expiration.clamp(0, u32::MAX as i64) as u32,
            priority: 10,
        };
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Request::Send(Job {
                frame,
                reply,
                writes: 0,
            }))
            .map_err(|_| SendError::Lost("the binary client has stopped".into()))?;
        match tokio::time::timeout(self.request_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(SendError::Lost(
                "the binary client dropped the notification".into(),
            )),
            Err(_) => Err(SendError::Timeout(self.request_timeout)),
        }
    }

    /// Makes sure the gateway can be reached: sends nothing, so it only tells whether a
    /// connection is up or can be opened now (the reconnect backoff still applies).
    pub async fn probe(&self) -> Result<(), SendError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Request::Probe(reply))
            .map_err(|_| SendError::Lost("the binary client has stopped".into()))?;
        match answer.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SendError::Lost(
                "the binary client dropped the probe".into(),
            )),
        }
    }
}

/// A 64-hex-digit token as 32 bytes.
fn token_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The connection task's state.
struct Driver {
    settings: Settings,
    tls: TlsConnector,
    gauges: Arc<Gauges>,
    /// The next notification identifier (unique per client, so per connection too).
    next_id: u32,
    /// To write, in order: new notifications and the ones to resend (resends first).
    queue: VecDeque<Job>,
    /// Probes waiting for a connection.
    probes: Vec<Reply>,
    /// Written on the current connection, oldest first, awaiting confirmation.
    sent: VecDeque<Sent>,
    connection: Option<Connection>,
    /// When the next connection may be opened.
    reconnect: Reconnect,
}

impl Driver {
    async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Request>) {
        // (A zero quiet period would make a zero interval, which tokio refuses.)
        let mut tick =
            tokio::time::interval((self.settings.quiet / 4).max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = async {
                match self.connection.as_mut() {
                    Some(c) => c.events.recv().await,
                    None => std::future::pending().await,
                }
            };
            // More queued than one write takes: write again at once, not at the next event
            // (a burst of thousands would otherwise go out one batch per tick).
            let more = !self.queue.is_empty() && self.sent.len() < self.settings.max_unconfirmed;
            // Biased, the gateway's error packet first: confirming by the quiet period while
            // an error packet waits would accept frames the gateway discarded.
            tokio::select! {
                biased;
                Some(event) = event => self.on_event(event),
                _ = std::future::ready(()), if more => {}
                request = jobs.recv() => match request {
                    Some(request) => {
                        self.take(request);
                        while let Ok(request) = jobs.try_recv() {
                            self.take(request);
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.confirm(),
            }
            self.write().await;
            self.gauges.unconfirmed.store(
                (self.queue.len() + self.sent.len()) as i64,
                Ordering::Relaxed,
            );
        }
    }

    fn take(&mut self, request: Request) {
        match request {
            Request::Send(job) => self.queue.push_back(job),
            Request::Probe(reply) => self.probes.push(reply),
        }
    }

    /// Confirms, oldest first, every notification flushed at least `quiet` ago.
    fn confirm(&mut self) {
        let quiet = self.settings.quiet;
        while self
            .sent
            .front()
            .is_some_and(|s| s.flushed_at.elapsed() >= quiet)
        {
            let s = self.sent.pop_front().expect("checked above");
            let _ = s.job.reply.send(Ok(Answer::Accepted));
            if let Some(c) = self.connection.as_mut() {
                c.proved = true;
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Error(packet) => {
                self.drop_connection();
                let position = self
                    .sent
                    .iter()
                    .position(|s| s.job.frame.identifier == packet.identifier);
                let Some(p) = position else {
                    warn!(status = ?packet.status, identifier = packet.identifier, "error packet for an unknown notification; resending all unconfirmed");
                    self.resend_all();
                    return;
                };
                // The gateway processed frames and said why it stopped: it works, and
                // reconnecting at once to resend the rest is the protocol.
                self.reconnect.proved();
                // Those before the named one were processed; with Shutdown, the named one too.
                let accepted = if packet.status == Status::Shutdown {
                    p + 1
                } else {
                    p
                };
                for s in self.sent.drain(..accepted) {
                    let _ = s.job.reply.send(Ok(Answer::Accepted));
                }
                if packet.status != Status::Shutdown {
                    let failed = self.sent.pop_front().expect("the named notification");
                    let (status, reason) = (packet.status.byte(), reason_of(packet.status));
                    info!(status, reason = %reason, "the gateway rejected a notification; resending the ones after it");
                    let _ = failed.job.reply.send(Ok(Answer::Rejected(Rejection {
                        status: u16::from(status),
                        reason,
                        timestamp_ms: None,
                        apns_id: None,
                    })));
                } else {
                    info!("the gateway is shutting down; resending what it did not process");
                }
                self.resend_all();
            }
            Event::Closed(why) => {
                // No error packet: what was flushed a quiet period ago stands (the tick
                // that would have confirmed it may not have run yet).
                self.confirm();
                warn!(error = %why, unconfirmed = self.sent.len(), "gateway connection closed; resending what was unconfirmed");
                self.lost(why);
                self.resend_all();
            }
        }
    }

    /// Puts every unconfirmed notification back at the front of the queue, in order.
    fn resend_all(&mut self) {
        for s in self.sent.drain(..).rev() {
            self.queue.push_front(s.job);
        }
    }

    fn drop_connection(&mut self) {
        if self.connection.take().is_some() {
            self.gauges.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The connection failed (closed, or a write failed or stalled); [`Reconnect::ended`]
    /// decides whether reconnecting waits.
    fn lost(&mut self, why: String) {
        let (proved, used) = self
            .connection
            .as_ref()
            .map_or((false, false), |c| (c.proved, c.used));
        self.drop_connection();
        if let Some(wait) = self.reconnect.ended(proved, used, &why) {
            warn!(gateway = %self.settings.gateway, failures = self.reconnect.failures(), retry_in = ?wait, "the gateway keeps dropping new connections; backing off");
        }
    }

    /// Writes everything queued (up to the batch and buffer limits) in one write.
    async fn write(&mut self) {
        if self.queue.is_empty() && self.probes.is_empty() {
            return;
        }
        if self.connection.is_none() {
            if let Err(e) = self.connect().await {
                // Unreachable: fail what waits, so the caller can pause and hand rings back.
                let waiting = self
                    .queue
                    .drain(..)
                    .map(|job| job.reply)
                    .chain(self.probes.drain(..));
                for reply in waiting {
                    let _ = reply.send(Err(e.clone_error()));
                }
                return;
            }
        }
        // Probes only needed the connection.
        for probe in self.probes.drain(..) {
            let _ = probe.send(Ok(Answer::Accepted));
        }
        let room = self
            .settings
            .max_unconfirmed
            .saturating_sub(self.sent.len());
        let n = self.queue.len().min(self.settings.max_batch).min(room);
        if n == 0 {
            return;
        }
        let mut buf = BytesMut::new();
        let mut batch = Vec::with_capacity(n);
        for mut job in self.queue.drain(..n) {
            if job.reply.is_closed() {
                // Its caller gave up (request timeout) and has decided what to do with the
                // ring: writing it now would only make a duplicate.
                continue;
            }
            job.writes += 1;
            if job.writes > self.settings.max_writes {
                let _ = job.reply.send(Err(SendError::Lost(format!(
                    "written {} times without confirmation",
                    self.settings.max_writes
                ))));
                continue;
            }
            job.frame.identifier = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            codec::encode_frame(&job.frame, &mut buf);
            batch.push(job);
        }
        if batch.is_empty() {
            return;
        }
        let connection = self.connection.as_mut().expect("connected above");
        connection.used = true;
        let written = async {
            connection.write.write_all(&buf).await?;
            connection.write.flush().await
        };
        let timeout = self.settings.write_timeout;
        let written = match tokio::time::timeout(timeout, written).await {
            Ok(written) => written.map_err(|e| (e.to_string(), true)),
            Err(_) => Err((format!("a write did not finish within {timeout:?}"), false)),
        };
        // Written, or perhaps partly: either way these frames are on this connection now,
        // after the ones before them, and an error packet may name one of them.
        let flushed_at = Instant::now();
        self.sent
            .extend(batch.into_iter().map(|job| Sent { job, flushed_at }));
        let Err((e, io_error)) = written else {
            return;
        };
        // A write fails when the gateway has closed the connection — most often right after
        // an error packet, which the reader then has or is about to have: that packet, not
        // the failed write, says what became of each frame.
        let connection = self.connection.as_mut().expect("connected above");
        let event = if io_error {
            tokio::time::timeout(Duration::from_secs(1), connection.events.recv())
                .await
                .ok()
                .flatten()
        } else {
            connection.events.try_recv().ok()
        };
        match event {
            Some(event @ Event::Error(_)) => self.on_event(event),
            _ => {
                warn!(error = %e, "writing to the gateway failed; resending");
                self.confirm();
                self.lost(e);
                self.resend_all();
            }
        }
    }

    async fn connect(&mut self) -> Result<(), SendError> {
        let gateway = self.settings.gateway.to_string();
        if let Err((wait, reason)) = self.reconnect.check() {
            return Err(SendError::Backoff {
                endpoint: gateway,
                wait,
                reason,
            });
        }
        match self
            .settings
            .gateway
            .connect_tls(&self.tls, self.settings.connect_timeout)
            .await
        {
            Ok(tls) => {
                let (mut read, write) = tokio::io::split(tls);
                let (tx, events) = mpsc::unbounded_channel();
                let reader = tokio::spawn(async move {
                    let mut packet = [0u8; codec::ERROR_LEN];
                    let event = match read.read_exact(&mut packet).await {
                        Ok(_) => match ErrorResponse::decode(&packet) {
                            Ok(p) => Event::Error(p),
                            Err(c) => {
                                Event::Closed(format!("unexpected command {c} from the gateway"))
                            }
                        },
                        Err(e) => Event::Closed(e.to_string()),
                    };
                    let _ = tx.send(event);
                });
                self.connection = Some(Connection {
                    write,
                    events,
                    reader: reader.abort_handle(),
                    proved: false,
                    used: false,
                });
                self.gauges.connections.fetch_add(1, Ordering::Relaxed);
                self.reconnect.connected();
                info!(gateway = %gateway, "gateway connection open");
                Ok(())
            }
            Err(reason) => {
                let wait = self.reconnect.connect_failed(&reason);
                warn!(gateway = %gateway, error = %reason, failures = self.reconnect.failures(), retry_in = ?wait, "cannot connect to the gateway");
                Err(SendError::Connect {
                    endpoint: gateway,
                    reason,
                })
            }
        }
    }
}

impl SendError {
    /// A copy for each waiting notification (the error is only text and numbers).
    fn clone_error(&self) -> SendError {
        match self {
            SendError::Connect { endpoint, reason } => SendError::Connect {
                endpoint: endpoint.clone(),
                reason: reason.clone(),
            },
            SendError::Backoff {
                endpoint,
                wait,
                reason,
            } => SendError::Backoff {
                endpoint: endpoint.clone(),
                wait: *wait,
                reason: reason.clone(),
            },
            other => SendError::Lost(other.to_string()),
        }
    }
}

/// The reason a binary status stands for (the decisions then live on [`Reason`]).
pub fn reason_of(status: Status) -> Reason {
    match status {
        Status::InvalidToken => Reason::InvalidToken,
        Status::MissingDeviceToken => Reason::MissingDeviceToken,
        Status::MissingTopic => Reason::MissingTopic,
        Status::MissingPayload => Reason::PayloadEmpty,
        Status::InvalidTokenSize => Reason::InvalidTokenSize,
        Status::InvalidTopicSize => Reason::BadTopic,
        Status::InvalidPayloadSize => Reason::PayloadTooLarge,
        Status::Shutdown => Reason::Shutdown,
        Status::ProcessingError | Status::Unknown => Reason::InternalServerError,
        Status::ProtocolError => Reason::Unknown("ProtocolError".into()),
        Status::NoErrors | Status::Other(_) => {
            Reason::Unknown(format!("binary status {}", status.byte()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_tokens_parse() {
        assert_eq!(
            Address::parse("gateway.push.apple.com:2195").unwrap().port,
            2195
        );
        assert_eq!(Address::parse("[::1]:2195").unwrap().host, "::1");
        assert!(Address::parse("nohost").is_err() && Address::parse(":1").is_err());
        assert_eq!(token_bytes(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(token_bytes(&"ab".repeat(16)), None, "only 32-byte tokens");
    }

    #[test]
    fn status_8_means_the_token_is_invalid_and_1_is_retried() {
        assert!(reason_of(Status::InvalidToken).is_token_invalid());
        assert!(reason_of(Status::ProcessingError).is_retryable());
        assert!(reason_of(Status::Unknown).is_retryable());
        assert!(!reason_of(Status::InvalidTokenSize).is_token_invalid());
    }
}
