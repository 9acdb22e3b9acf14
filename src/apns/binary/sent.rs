//! The buffer of sent notifications: each written notification waits here, oldest first,
//! until it is confirmed — by the quiet period, or by an error packet naming a later one.
//! An error packet settles the buffer (those before the named one accepted, the named one
//! rejected, the rest resent); a lost connection puts everything unconfirmed back in the
//! queue, in order.

use std::time::Instant;

use tracing::{info, warn};

use super::client::Job;
use super::codec::Status;
use super::driver::{Driver, Event};
use super::reason_of;
use crate::apns::{Answer, Rejection};

/// A notification written on the current connection and not yet confirmed.
pub(super) struct Sent {
    pub(super) job: Job,
    pub(super) flushed_at: Instant,
}

impl Driver {
    /// Confirms, oldest first, every notification flushed at least `quiet` ago.
    pub(super) fn confirm(&mut self) {
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

    pub(super) fn on_event(&mut self, event: Event) {
        match event {
            Event::Error(packet) => {
                self.drop_connection();
                let position = self
                    .sent
                    .iter()
                    .position(|s| s.job.frame.identifier == packet.identifier);
                let Some(p) = position else {
                    warn!(
                        status = packet.status.byte(),
                        identifier = packet.identifier,
                        "error packet for an unknown notification; resending all unconfirmed"
                    );
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
    pub(super) fn resend_all(&mut self) {
        for s in self.sent.drain(..).rev() {
            self.queue.push_front(s.job);
        }
    }
}
