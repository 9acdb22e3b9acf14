//! What a worker counts, and how it shows it: counters registered here, where they are
//! counted, as Prometheus families (`ringpush_rings_total{outcome}` and the rest) whose
//! children the worker increments directly — no lock and no translation on the way to
//! `/metrics` — plus the gauges read at scrape time and the readiness check `/readyz` runs.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{self, encode, ReadyCheck};
use crate::provider::Providers;

use metrics::{labelled as child, Family1};

/// Running counts and state, readable by tests, the demo and metrics. Each counter is a
/// child of a registered family (a shared atomic): incrementing it is all there is to do.
#[derive(Debug)]
pub struct Counters {
    rings: Family1,
    notifications: Family1,
    rejected: Family1,
    pub rings_consumed: Counter,
    /// Rings settled: acked after a push, expiry, unknown gateway, retry or dead-letter.
    pub rings_acked: Counter,
    pub rings_delivered: Counter,
    pub rings_expired: Counter,
    pub rings_unknown_gateway: Counter,
    pub rings_without_tokens: Counter,
    pub rings_retried: Counter,
    pub rings_dead_lettered: Counter,
    /// Rings whose body names another gateway than their routing key (dead-lettered too).
    pub rings_wrong_gateway: Counter,
    /// Rings handed back to the queue with a nack (requeue): only when an outcome could not
    /// be made durable and the ring could not be published again either.
    pub rings_requeued: Counter,
    /// Rings handed back (published again and acked): at shutdown, or when their outcome
    /// could not be made durable.
    pub rings_handed_back: Counter,
    pub notifications_accepted: Counter,
    pub notifications_rejected: Counter,
    pub notifications_failed: Counter,
    /// Tokens of a platform no provider is configured for: not sent, not retried.
    pub notifications_unconfigured: Counter,
    /// Call-style rings to APNs tokens over the legacy binary interface: not sent.
    pub notifications_unsupported: Counter,
    /// Feedback events published for tokens APNs says are dead.
    pub feedback_events: Counter,
    /// Times consumption paused because APNs or the database was unreachable.
    pub pauses: Counter,
    /// Probes of a paused dependency that failed (each followed by a longer wait, up to the
    /// cap).
    pub probes_failed: Counter,
    /// Broker sessions started (1 + reconnects).
    pub broker_sessions: Counter,
    /// APNs request latency, seconds.
    pub apns_request_seconds: Histogram,
    /// From `pressed_at` to APNs's 200, seconds: the number the business cares about.
    pub ring_to_accepted_seconds: Histogram,
    /// Consuming from the broker right now.
    pub broker_connected: AtomicBool,
    /// Consumption paused because APNs, or the database, is unreachable.
    pub paused_apns: AtomicBool,
    pub paused_database: AtomicBool,
}

impl Default for Counters {
    fn default() -> Self {
        let rings = Family1::default();
        let notifications = Family1::default();
        // Every rejection APNs can give for good, at zero from the start: an alert on
        // `increase(…{reason="InvalidProviderToken"})` sees the first one.
        let rejected = Family1::default();
        for reason in crate::apns::Reason::ALL
            .iter()
            .filter(|r| !r.is_retryable())
        {
            child(&rejected, "reason", reason.as_str());
        }
        let ring = |outcome| child(&rings, "outcome", outcome);
        let notification = |outcome| child(&notifications, "outcome", outcome);
        Self {
            rings_consumed: ring("consumed"),
            rings_acked: ring("acked"),
            rings_delivered: ring("delivered"),
            rings_expired: ring("expired"),
            rings_unknown_gateway: ring("unknown_gateway"),
            rings_without_tokens: ring("no_tokens"),
            rings_retried: ring("retried"),
            rings_dead_lettered: ring("dead_lettered"),
            rings_wrong_gateway: ring("wrong_gateway"),
            rings_requeued: ring("requeued"),
            rings_handed_back: ring("handed_back"),
            notifications_accepted: notification("accepted"),
            notifications_rejected: notification("rejected"),
            notifications_failed: notification("failed"),
            notifications_unconfigured: notification("unconfigured"),
            notifications_unsupported: notification("unsupported"),
            rings,
            notifications,
            rejected,
            feedback_events: Counter::default(),
            pauses: Counter::default(),
            probes_failed: Counter::default(),
            broker_sessions: Counter::default(),
            apns_request_seconds: metrics::latency_histogram(),
            ring_to_accepted_seconds: metrics::latency_histogram(),
            broker_connected: AtomicBool::default(),
            paused_apns: AtomicBool::default(),
            paused_database: AtomicBool::default(),
        }
    }
}

impl Counters {
    /// Ready to work: consuming, and neither APNs nor the database known unreachable.
    pub fn ready(&self) -> Result<(), String> {
        if !self.broker_connected.load(Ordering::Relaxed) {
            return Err("not connected to the broker".into());
        }
        if self.paused_apns.load(Ordering::Relaxed) {
            return Err("APNs unreachable; consumption paused".into());
        }
        if self.paused_database.load(Ordering::Relaxed) {
            return Err("database unreachable; consumption paused".into());
        }
        Ok(())
    }

    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }

    pub(super) fn add(counter: &Counter, n: usize) {
        counter.inc_by(n as u64);
    }

    /// Rejections so far for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        child(&self.rejected, "reason", reason).get()
    }

    /// Counts a token that was skipped (no provider for it).
    pub(super) fn count_skipped(&self, skip: crate::provider::Skip) {
        match skip {
            crate::provider::Skip::Unconfigured(_) => self.notifications_unconfigured.inc(),
            crate::provider::Skip::Unsupported => self.notifications_unsupported.inc(),
        };
    }

    /// Counts a rejection under its reason (a read lock on the family, on the rejection path
    /// only: an accepted notification takes none).
    pub(super) fn count_rejected(&self, reason: &str) {
        child(&self.rejected, "reason", reason).inc();
    }

    /// Registers the worker's metrics: the counter families, the two latency histograms,
    /// and the gauges read at scrape time.
    pub fn register(self: &Arc<Self>, registry: &mut Registry, providers: &Providers) {
        registry.register(
            "rings",
            "Rings by what became of them (consumed counts every delivery)",
            self.rings.clone(),
        );
        registry.register(
            "notifications",
            "Notifications by outcome: accepted by the provider, rejected for good, failed for now, or skipped (unconfigured: no provider for the token's platform; unsupported: a call over APNs's binary interface)",
            self.notifications.clone(),
        );
        registry.register(
            "notifications_rejected",
            "Rejections by APNs reason",
            self.rejected.clone(),
        );
        registry.register(
            "feedback_events_published",
            "Feedback events published for dead tokens",
            self.feedback_events.clone(),
        );
        registry.register(
            "consumption_pauses",
            "Times consumption paused (APNs or database unreachable)",
            self.pauses.clone(),
        );
        registry.register(
            "probes_failed",
            "Probes of a paused dependency (the token lookup, an APNs connection) that failed",
            self.probes_failed.clone(),
        );
        registry.register(
            "broker_sessions",
            "Broker connections opened (1 + reconnects)",
            self.broker_sessions.clone(),
        );
        registry.register(
            "apns_request_seconds",
            "APNs request latency, send to answer",
            self.apns_request_seconds.clone(),
        );
        registry.register(
            "ring_to_accepted_seconds",
            "From the button press (pressed_at) to APNs accepting the notification",
            self.ring_to_accepted_seconds.clone(),
        );
        registry.register_collector(Box::new(Scrape {
            counters: self.clone(),
            providers: providers.clone(),
        }));
    }

    /// `/readyz`: consuming, with APNs and the database answering.
    pub fn ready_check(self: &Arc<Self>, pool: deadpool_postgres::Pool) -> ReadyCheck {
        let counters = self.clone();
        Arc::new(move || {
            let (counters, pool) = (counters.clone(), pool.clone());
            Box::pin(async move {
                counters.ready()?;
                crate::db::ping(&pool)
                    .await
                    .map_err(|e| format!("database: {e}"))
            })
        })
    }
}

/// What is only known at scrape time: whether the worker consumes or is paused, and its
/// providers' connections.
#[derive(Debug)]
struct Scrape {
    counters: Arc<Counters>,
    providers: Providers,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        encode::gauge(
            &mut e,
            "broker_connected",
            "1 while consuming from the broker.",
            c.broker_connected.load(Ordering::Relaxed) as i64,
        )?;
        encode::gauge(
            &mut e,
            "paused",
            "1 while consumption is paused (until a probe of what failed succeeds).",
            (c.paused_apns.load(Ordering::Relaxed) || c.paused_database.load(Ordering::Relaxed))
                as i64,
        )?;
        encode::gauge(
            &mut e,
            "apns_connections",
            "Open HTTP/2 connections to APNs.",
            self.providers
                .apns
                .as_ref()
                .map_or(0, |a| a.connections_open()),
        )?;
        encode::gauge(
            &mut e,
            "apns_streams_in_flight",
            "APNs requests awaiting their answer.",
            self.providers.apns.as_ref().map_or(0, |a| a.in_flight()),
        )
    }
}
