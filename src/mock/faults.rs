//! Fault injection: the fault modes ([`Faults`], changeable while running), the exact
//! failures of [`FailFirst`], and the decision, in arrival order, of each stream's fate
//! ([`decide`]): processed, refused, cut, held above a GOAWAY, or answered with an error.

use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};

use super::server::Conn;
use super::{shim, State};
use crate::apns::Reason;

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
    pub(super) fn bytes(self) -> Bytes {
        match self {
            GoAwayDebug::Json => Bytes::from_static(br#"{"reason":"Shutdown"}"#),
            GoAwayDebug::Text => Bytes::from_static(b"Server is shutting down"),
            GoAwayDebug::Empty => Bytes::new(),
        }
    }
}

/// What the accept loop decided for one stream.
pub(super) enum Plan {
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

/// Decides a stream's fate in arrival order, so GOAWAY and counts are exact.
pub(super) fn decide(
    state: &State,
    conn: &Conn,
    n: u64,
    id: u32,
    gone_away: &mut Option<u32>,
) -> Plan {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
