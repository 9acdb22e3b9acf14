//! The client a worker holds: cheap to clone, it hands each notification to the connection
//! task (`driver`) and waits for its answer, bounded by the request timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

use super::codec::{self, Frame, Status};
use super::driver::Driver;
use super::Settings;
use crate::apns::request::Notification;
use crate::apns::SendError;
use crate::apns::{Answer, Reason, Rejection};
use crate::backoff::Reconnect;

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
pub(super) struct Gauges {
    pub(super) connections: AtomicI64,
    pub(super) unconfirmed: AtomicI64,
}

pub(super) type Reply = oneshot::Sender<Result<Answer, SendError>>;

/// A notification on its way: written, or waiting to be (again).
pub(super) struct Job {
    pub(super) frame: Frame,
    pub(super) reply: Reply,
    pub(super) writes: u32,
}

/// What the client asks of its connection task.
pub(super) enum Request {
    Send(Job),
    /// Answer once a connection is up (or the connect failed).
    Probe(Reply),
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
pub(super) fn token_bytes(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}
