//! Reconnect backoff, one rule for every connection ringpush keeps (APNs over HTTP/2, the
//! legacy gateway, the broker): exponential from a first delay up to a cap, jittered so that
//! many workers that lost the same peer at once do not come back at once.

use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};

/// The wait after `failures` consecutive failures (the first is 1): `first · 2^(failures-1)`,
/// capped at `cap`, times a random factor in 0.5–1.5.
pub fn jittered(first: Duration, cap: Duration, failures: u32) -> Duration {
    let exp = first
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(cap);
    let mut b = [0u8; 1];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system RNG works");
    exp.mul_f64(0.5 + f64::from(b[0]) / 255.0)
}

/// When a connection may be opened again. Failures in a row are failed connects and used
/// connections that ended before they proved themselves (nothing answered or confirmed on
/// them); a connection that proves itself resets the count. A failed connect waits the
/// backoff at once; a connection that dies unproved is replaced at once the first time and
/// waits the backoff from the second in a row — so a peer that accepts and then drops every
/// connection is not met with a handshake per request.
#[derive(Debug)]
pub(crate) struct Reconnect {
    first: Duration,
    cap: Duration,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Reconnect {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
        }
    }

    /// `Err((wait, last error))` while a backoff runs.
    pub fn check(&self) -> Result<(), (Duration, String)> {
        match self.retry_at {
            Some(at) if Instant::now() < at => Err((at - Instant::now(), self.last_error.clone())),
            _ => Ok(()),
        }
    }

    /// A connect failed: returns the wait before the next try.
    pub(crate) fn connect_failed(&mut self, reason: &str) -> Duration {
        self.failures += 1;
        let wait = jittered(self.first, self.cap, self.failures);
        self.retry_at = Some(Instant::now() + wait);
        self.last_error = reason.to_owned();
        wait
    }

    /// A connection opened; the count stays until it proves itself or ends.
    pub fn connected(&mut self) {
        self.retry_at = None;
    }

    /// A connection worked (an answer, a confirmation, an error packet naming a frame).
    pub fn proved(&mut self) {
        self.failures = 0;
    }

    /// A connection ended: returns the wait if this made a backoff start.
    pub fn ended(&mut self, proved: bool, used: bool, why: &str) -> Option<Duration> {
        if proved {
            self.failures = 0;
            return None;
        }
        if !used {
            // Only probed, then closed (an idle timeout, say): that says nothing.
            return None;
        }
        self.failures += 1;
        self.last_error = why.to_owned();
        (self.failures > 1).then(|| {
            let wait = jittered(self.first, self.cap, self.failures - 1);
            self.retry_at = Some(Instant::now() + wait);
            wait
        })
    }

    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let (first, cap) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut seen = std::collections::HashSet::new();
        for (failures, base) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            for _ in 0..20 {
                let d = jittered(first, cap, failures).as_millis() as u64;
                assert!((base / 2..=base * 3 / 2).contains(&d), "{failures}: {d} ms");
                seen.insert(d);
            }
        }
        assert!(seen.len() > 6, "jittered, not fixed: {seen:?}");
    }

    #[test]
    fn reconnect_counts_failed_connects_and_unproved_deaths() {
        let mut r = Reconnect::new(Duration::from_secs(10), Duration::from_secs(60));
        assert!(r.check().is_ok());
        // A failed connect waits at once.
        assert!(r.connect_failed("refused") >= Duration::from_secs(5));
        let (_, why) = r.check().unwrap_err();
        assert_eq!(why, "refused");
        // The next connect works: free to try, the count stays.
        r.connected();
        assert!(r.check().is_ok());
        assert_eq!(r.failures(), 1);
        // A probed-only connection closing says nothing.
        assert_eq!(r.ended(false, false, "idle"), None);
        assert_eq!(r.failures(), 1);
        // A used one dying unproved: a failure, and (the second in a row) a backoff.
        assert!(r.ended(false, true, "dropped").is_some());
        assert_eq!(r.check().unwrap_err().1, "dropped");
        // A connection that proves itself starts the count again; then one unproved death
        // is free.
        r.connected();
        assert_eq!(r.ended(true, true, "bye"), None);
        assert_eq!(r.failures(), 0);
        assert_eq!(r.ended(false, true, "dropped"), None);
        assert!(r.check().is_ok());
        r.proved();
        assert_eq!(r.failures(), 0);
    }
}
