//! What a worker counts, and how it shows it: the counters tests, the demo and `/metrics`
//! read, registered here where they are counted (the Prometheus text is encoded from them at
//! scrape time), and the readiness check `/readyz` runs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::apns::Apns;
use crate::metrics::{self, encode, ReadyCheck};

/// Running counts and state, readable by tests, the demo and metrics.
#[derive(Debug)]
pub struct Counters {
    pub rings_consumed: AtomicU64,
    /// Rings settled: acked after a push, expiry, unknown gateway, retry or dead-letter.
    pub rings_acked: AtomicU64,
    pub rings_delivered: AtomicU64,
    pub rings_expired: AtomicU64,
    pub rings_unknown_gateway: AtomicU64,
    pub rings_without_tokens: AtomicU64,
    pub rings_retried: AtomicU64,
    pub rings_dead_lettered: AtomicU64,
    /// Rings whose body names another gateway than their routing key (dead-lettered too).
    pub rings_wrong_gateway: AtomicU64,
    /// Rings handed back to the queue with a nack (requeue): only when an outcome could not
    /// be made durable and the ring could not be published again either.
    pub rings_requeued: AtomicU64,
    pub notifications_accepted: AtomicU64,
    pub notifications_rejected: AtomicU64,
    pub notifications_failed: AtomicU64,
    /// Feedback events published for tokens APNs says are dead.
    pub feedback_events: AtomicU64,
    /// Times consumption paused because APNs or the database was unreachable.
    pub pauses: AtomicU64,
    /// Probes of a paused dependency that failed (each followed by a longer wait, up to the
    /// cap).
    pub probes_failed: AtomicU64,
    /// Rings handed back at shutdown (published again and acked).
    pub rings_handed_back: AtomicU64,
    /// Broker sessions started (1 + reconnects).
    pub broker_sessions: AtomicU64,
    /// Rejections by reason (only rejections take this lock, never an accepted push).
    pub rejected_by_reason: Mutex<BTreeMap<String, u64>>,
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
        Self {
            rings_consumed: AtomicU64::default(),
            rings_acked: AtomicU64::default(),
            rings_delivered: AtomicU64::default(),
            rings_expired: AtomicU64::default(),
            rings_unknown_gateway: AtomicU64::default(),
            rings_without_tokens: AtomicU64::default(),
            rings_retried: AtomicU64::default(),
            rings_dead_lettered: AtomicU64::default(),
            rings_wrong_gateway: AtomicU64::default(),
            rings_requeued: AtomicU64::default(),
            notifications_accepted: AtomicU64::default(),
            notifications_rejected: AtomicU64::default(),
            notifications_failed: AtomicU64::default(),
            feedback_events: AtomicU64::default(),
            pauses: AtomicU64::default(),
            probes_failed: AtomicU64::default(),
            rings_handed_back: AtomicU64::default(),
            broker_sessions: AtomicU64::default(),
            rejected_by_reason: Mutex::default(),
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

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(super) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Registers the worker's metrics: counters and gauges read at scrape time, the two
    /// latency histograms.
    pub fn register(self: &Arc<Self>, registry: &mut Registry, apns: &Apns) {
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
            apns: apns.clone(),
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

/// The worker's counters, and its APNs client's connections, at scrape time.
#[derive(Debug)]
struct Scrape {
    counters: Arc<Counters>,
    apns: Apns,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        let get = Counters::get;
        encode::counters(
            &mut e,
            "rings",
            "Rings by what became of them (consumed counts every delivery).",
            "outcome",
            &[
                ("consumed", get(&c.rings_consumed)),
                ("acked", get(&c.rings_acked)),
                ("delivered", get(&c.rings_delivered)),
                ("retried", get(&c.rings_retried)),
                ("dead_lettered", get(&c.rings_dead_lettered)),
                ("wrong_gateway", get(&c.rings_wrong_gateway)),
                ("expired", get(&c.rings_expired)),
                ("unknown_gateway", get(&c.rings_unknown_gateway)),
                ("no_tokens", get(&c.rings_without_tokens)),
                ("requeued", get(&c.rings_requeued)),
                ("handed_back", get(&c.rings_handed_back)),
            ],
        )?;
        encode::counters(
            &mut e,
            "notifications",
            "Notifications by outcome: accepted by APNs, rejected for good, or failed for now.",
            "outcome",
            &[
                ("accepted", get(&c.notifications_accepted)),
                ("rejected", get(&c.notifications_rejected)),
                ("failed", get(&c.notifications_failed)),
            ],
        )?;
        let by_reason: Vec<(String, u64)> = c
            .rejected_by_reason
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let by_reason: Vec<(&str, u64)> = by_reason.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        encode::counters(
            &mut e,
            "notifications_rejected",
            "Rejections by APNs reason.",
            "reason",
            &by_reason,
        )?;
        encode::counter(
            &mut e,
            "feedback_events_published",
            "Feedback events published for dead tokens.",
            get(&c.feedback_events),
        )?;
        encode::counter(
            &mut e,
            "consumption_pauses",
            "Times consumption paused (APNs or database unreachable).",
            get(&c.pauses),
        )?;
        encode::counter(
            &mut e,
            "probes_failed",
            "Probes of a paused dependency (the token lookup, an APNs connection) that failed.",
            get(&c.probes_failed),
        )?;
        encode::counter(
            &mut e,
            "broker_sessions",
            "Broker connections opened (1 + reconnects).",
            get(&c.broker_sessions),
        )?;
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
            self.apns.connections_open(),
        )?;
        encode::gauge(
            &mut e,
            "apns_streams_in_flight",
            "APNs requests awaiting their answer.",
            self.apns.in_flight(),
        )?;
        Ok(())
    }
}
