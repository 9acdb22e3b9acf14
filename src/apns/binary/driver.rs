//! The connection task: one persistent TLS connection to the gateway, driven by one task.
//! Each turn writes everything queued as one batch; a reader task waits for the error
//! packet; a connection that closes, or a write that fails or stalls, is lost and what was
//! unconfirmed is resent (the reconnect backoff decides whether reconnecting waits).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::client::{Gauges, Job, Reply, Request};
use super::codec::{self, ErrorResponse};
use super::sent::Sent;
use super::Settings;
use crate::apns::Answer;
use crate::apns::SendError;
use crate::backoff::Reconnect;

pub(super) enum Event {
    /// The gateway's error packet.
    Error(ErrorResponse),
    /// The connection ended without one.
    Closed(String),
}

pub(super) struct Connection {
    write: WriteHalf<TlsStream<TcpStream>>,
    events: mpsc::UnboundedReceiver<Event>,
    /// The task reading the error packet: it holds the other half of the socket, so it is
    /// stopped with the connection (or a dropped connection would stay open).
    reader: tokio::task::AbortHandle,
    /// A notification was confirmed on it, or the gateway answered with an error packet.
    pub(super) proved: bool,
    /// Frames were written on it (a connection only probed proves nothing either way).
    used: bool,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The connection task's state.
pub(super) struct Driver {
    pub(super) settings: Settings,
    pub(super) tls: TlsConnector,
    pub(super) gauges: Arc<Gauges>,
    /// The next notification identifier (unique per client, so per connection too).
    pub(super) next_id: u32,
    /// To write, in order: new notifications and the ones to resend (resends first).
    pub(super) queue: VecDeque<Job>,
    /// Probes waiting for a connection.
    pub(super) probes: Vec<Reply>,
    /// Written on the current connection, oldest first, awaiting confirmation.
    pub(super) sent: VecDeque<Sent>,
    pub(super) connection: Option<Connection>,
    /// When the next connection may be opened.
    pub(super) reconnect: Reconnect,
}

impl Driver {
    pub(super) async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Request>) {
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

    pub(super) fn drop_connection(&mut self) {
        if self.connection.take().is_some() {
            self.gauges.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The connection failed (closed, or a write failed or stalled); [`Reconnect::ended`]
    /// decides whether reconnecting waits.
    pub(super) fn lost(&mut self, why: String) {
        let (proved, used) = self
            .connection
            .as_ref()
            .map_or((false, false), |c| (c.proved, c.used));
        self.drop_connection();
        if let Some(wait) = self.reconnect.ended(proved, used, &why) {
            warn!(gateway = %self.settings.gateway, failures = self.reconnect.failures(), retry_in = %crate::human::Human(wait), "the gateway keeps dropping new connections; backing off");
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
            Err(_) => Err((
                format!(
                    "a write did not finish within {}",
                    crate::human::Human(timeout)
                ),
                false,
            )),
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
                warn!(gateway = %gateway, error = %reason, failures = self.reconnect.failures(), retry_in = %crate::human::Human(wait), "cannot connect to the gateway");
                Err(SendError::Connect {
                    endpoint: gateway,
                    reason,
                })
            }
        }
    }
}
