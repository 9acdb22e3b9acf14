//! Reconnect backoff, one rule for every connection ringpush keeps (APNs over HTTP/2, the
//! legacy gateway, the broker): exponential from a first delay up to a cap, jittered so that
//! many workers that lost the same peer at once do not come back at once.

use std::time::Duration;

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
}
