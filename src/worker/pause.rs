//! Pausing consumption while the worker cannot work, and the probe that lifts the pause. The
//! probe does what failed — the token lookup itself, or a connection to the provider — so a
//! database that answers `SELECT 1` but lacks a table does not make the worker resume and
//! fail again; between probes it waits `probe_interval`, doubling up to `probe_cap`,
//! jittered.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Counters, Environment, Shared};
use crate::db;
use crate::token::Platform;

/// Whether consumption may run (the reasons it may not are flags in [`Counters`]).
pub(super) struct Pause {
    pub(super) open: watch::Sender<bool>,
}

impl Pause {
    pub(super) fn new() -> Self {
        Self {
            open: watch::Sender::new(true),
        }
    }

    fn update(&self, counters: &Counters) {
        let open = !counters.paused_provider.load(Ordering::SeqCst)
            && !counters.paused_database.load(Ordering::SeqCst);
        self.open
            .send_if_modified(|o| std::mem::replace(o, open) != open);
    }

    /// Waits until consumption may run (at once when it may).
    pub(super) async fn opened(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
}

/// What consumption waits for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Paused {
    /// A provider that holds its rings (APNs) cannot be reached, for that environment.
    Provider(Platform, Environment),
    Database,
}

impl std::fmt::Display for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Paused::Provider(platform, env) => write!(f, "{} ({env})", platform.provider_name()),
            Paused::Database => f.write_str("PostgreSQL (token lookup, delivery ledger)"),
        }
    }
}

/// Pauses consumption and, unless one runs already, starts the probe that lifts the pause.
/// Each failed probe is logged with the real wait until the next one (every step while the
/// wait grows, then every 30 s) and counted; the pause (`ringpush_paused`) holds until a
/// probe succeeds.
pub(super) fn pause(shared: &Arc<Shared>, why: Paused, error: &str) {
    let flag = flag_of(&shared.counters, why);
    if let Paused::Provider(platform, _) = why {
        *shared
            .counters
            .paused_for
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(platform);
    }
    if flag.swap(true, Ordering::SeqCst) {
        return;
    }
    Counters::add(&shared.counters.pauses, 1);
    shared.pause.update(&shared.counters);
    let shared = shared.clone();
    let (first, cap) = (shared.settings.probe_interval, shared.settings.probe_cap);
    let mut wait = crate::backoff::jittered(first, cap, 1);
    warn!(what = %why, %error, next_probe_in = %Millis(wait), "pausing consumption until it works again");
    tokio::spawn(async move {
        let mut failures = 1;
        let mut logged = Instant::now();
        loop {
            tokio::time::sleep(wait).await;
            let probe = match why {
                Paused::Provider(platform, env) => shared.providers.probe(platform, env).await,
                Paused::Database => probe_database(&shared).await,
            };
            let Err(error) = probe else { break };
            Counters::add(&shared.counters.probes_failed, 1);
            failures += 1;
            wait = crate::backoff::jittered(first, cap, failures);
            let growing = first.saturating_mul(1 << (failures - 1).min(20)) <= cap;
            if growing || logged.elapsed() >= Duration::from_secs(30) {
                logged = Instant::now();
                warn!(what = %why, %error, failed_probes = failures - 1, next_probe_in = %Millis(wait), "still failing; consumption stays paused");
            }
        }
        info!(what = %why, "works again; resuming consumption");
        flag_of(&shared.counters, why).store(false, Ordering::SeqCst);
        shared.pause.update(&shared.counters);
    });
}

/// What a worker needs of the database, tried: the token lookup, and (when kept) a write to
/// the delivery ledger — of nothing.
pub(super) async fn probe_database(shared: &Shared) -> Result<(), String> {
    // Each failure said by its cause (`schema missing (42P01 …): run `ringpush migrate``).
    db::probe_lookup(&shared.pool)
        .await
        .map_err(|e| format!("the token lookup failed: {}", e.summary()))?;
    if shared.settings.ledger {
        db::Ledger::probe(&shared.primary)
            .await
            .map_err(|e| format!("the delivery ledger could not be written: {}", e.summary()))?;
    }
    if shared.claims_on() {
        db::Claims::probe(&shared.primary)
            .await
            .map_err(|e| format!("the rings could not be claimed: {}", e.summary()))?;
    }
    Ok(())
}

fn flag_of(counters: &Counters, why: Paused) -> &std::sync::atomic::AtomicBool {
    match why {
        Paused::Provider(..) => &counters.paused_provider,
        Paused::Database => &counters.paused_database,
    }
}

/// A duration in whole milliseconds, for logs (`1250ms`).
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}
