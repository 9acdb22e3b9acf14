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
use crate::provider::{Answer, Providers, Skip};
use crate::token::Platform;

use metrics::{labelled as child, Family1};

/// Running counts and state, readable by tests, the demo and metrics. Each counter is a
/// child of a registered family (a shared atomic): incrementing it is all there is to do.
#[derive(Debug)]
pub struct Counters {
    rings: Family1,
    notifications: Family1,
    rejected: Family1,
    /// `ringpush_platform_notifications_total{platform, outcome}`: the outcomes of
    /// `notifications` per platform, children kept by platform and outcome.
    by_platform: Family1,
    by_platform_children: [[Counter; PLATFORM_OUTCOMES.len()]; 2],
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
    /// Rings seen again whose every pending token had taken them already (the ledger says).
    pub rings_already_delivered: Counter,
    pub notifications_accepted: Counter,
    pub notifications_rejected: Counter,
    pub notifications_failed: Counter,
    /// "Dead" answers not believed: a configuration mistake is suspected (`provider::guard`);
    /// the token is kept and retried.
    pub notifications_doubted: Counter,
    /// Pushes not made because the ledger says the token took the ring already.
    pub notifications_suppressed: Counter,
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
    /// FCM request latency, seconds (a `Retry-After` wait included).
    pub fcm_request_seconds: Histogram,
    /// From `pressed_at` to APNs's 200, seconds: the number the business cares about.
    pub ring_to_accepted_seconds: Histogram,
    /// Where a ring's time goes, stage by stage (`ringpush_ring_stage_seconds{stage}`).
    pub stages: Stages,
    /// From a ring's arrival to its last token's answer, less that answer's own request:
    /// the part of a ring's time that is the worker's.
    pub ring_worker_seconds: Histogram,
    /// Consuming from the broker right now.
    pub broker_connected: AtomicBool,
    /// Consumption paused because APNs, or the database, is unreachable.
    pub paused_apns: AtomicBool,
    pub paused_database: AtomicBool,
}

/// `ringpush_ring_stage_seconds{stage}`: one latency histogram per stage of a ring inside
/// the worker, children kept so observing one takes no lock. The stages follow each other,
/// so their sums add up to a pushed ring's time from the press to its settlement.
#[derive(Debug)]
pub struct Stages {
    family: metrics::HistogramFamily,
    /// `pressed_at` (else the AMQP timestamp) to the delivery's arrival at this worker.
    pub queued: Histogram,
    /// Arrival to the statement of the grouped query that looked its gateway up being sent.
    pub lookup_wait: Histogram,
    /// That statement, to its batch awake with the rows.
    pub lookup: Histogram,
    /// Looked up to the last token's answer: the payload and the requests.
    pub push: Histogram,
    /// The last answer to the ack handed to the acker: ledger, publishes, confirms.
    pub settle: Histogram,
}

impl Default for Stages {
    fn default() -> Self {
        let family = metrics::histogram_family();
        let stage = |name: &str| metrics::labelled_histogram(&family, "stage", name);
        Self {
            queued: stage("queued"),
            lookup_wait: stage("lookup_wait"),
            lookup: stage("lookup"),
            push: stage("push"),
            settle: stage("settle"),
            family,
        }
    }
}

/// The outcomes counted per platform, in the order of `by_platform_children`.
const PLATFORM_OUTCOMES: [&str; 6] = [
    "accepted",
    "rejected",
    "failed",
    "unconfigured",
    "unsupported",
    "doubted",
];

impl Default for Counters {
    fn default() -> Self {
        let by_platform = Family1::default();
        let by_platform_children = Platform::ALL.map(|p| {
            PLATFORM_OUTCOMES.map(|o| {
                by_platform.get_or_create_owned(&vec![
                    ("platform".to_owned(), p.as_str().to_owned()),
                    ("outcome".to_owned(), o.to_owned()),
                ])
            })
        });
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
            rings_already_delivered: ring("already_delivered"),
            notifications_accepted: notification("accepted"),
            notifications_rejected: notification("rejected"),
            notifications_failed: notification("failed"),
            notifications_suppressed: notification("suppressed"),
            notifications_doubted: notification("doubted"),
            notifications_unconfigured: notification("unconfigured"),
            notifications_unsupported: notification("unsupported"),
            rings,
            notifications,
            rejected,
            by_platform,
            by_platform_children,
            feedback_events: Counter::default(),
            pauses: Counter::default(),
            probes_failed: Counter::default(),
            broker_sessions: Counter::default(),
            apns_request_seconds: metrics::latency_histogram(),
            fcm_request_seconds: metrics::latency_histogram(),
            ring_to_accepted_seconds: metrics::latency_histogram(),
            stages: Stages::default(),
            ring_worker_seconds: metrics::latency_histogram(),
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

    /// Counts one answer of `platform` under its outcome, per platform.
    pub(super) fn count_platform(&self, platform: Platform, answer: &Answer) {
        let outcome = match answer {
            Answer::Accepted => 0,
            Answer::Dead { .. } | Answer::Rejected { .. } => 1,
            Answer::Retry { .. } | Answer::Unreachable { .. } => 2,
            Answer::Skipped(Skip::Unconfigured(_)) => 3,
            Answer::Skipped(Skip::Unsupported) => 4,
            Answer::Doubted { .. } => 5,
        };
        self.by_platform_children[platform as usize][outcome].inc();
    }

    /// Observes one request's latency (an answer the provider gave).
    pub(super) fn observe_request(&self, platform: Platform, seconds: f64) {
        match platform {
            Platform::Apns => self.apns_request_seconds.observe(seconds),
            Platform::Fcm => self.fcm_request_seconds.observe(seconds),
        }
    }

    /// Notifications of `platform` counted under `outcome` (accepted, rejected, failed,
    /// unconfigured, unsupported).
    pub fn platform(&self, platform: Platform, outcome: &str) -> u64 {
        let o = PLATFORM_OUTCOMES
            .iter()
            .position(|x| *x == outcome)
            .expect("an outcome");
        self.by_platform_children[platform as usize][o].get()
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
            "Notifications by outcome: accepted by the provider, rejected for good, failed for now, doubted (the provider called the token dead, but so it calls most tokens of the scope: a configuration mistake is suspected; kept and retried), suppressed (the ledger says the token took the ring already), or skipped (unconfigured: no provider for the token's platform; unsupported: a call over APNs's binary interface)",
            self.notifications.clone(),
        );
        registry.register(
            "platform_notifications",
            "Notifications by platform (apns, fcm) and outcome (as ringpush_notifications_total)",
            self.by_platform.clone(),
        );
        registry.register(
            "notifications_rejected",
            "Rejections by reason: APNs's reason strings, FCM's error codes (UNREGISTERED, …)",
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
            "fcm_request_seconds",
            "FCM request latency, send to answer (a Retry-After wait included)",
            self.fcm_request_seconds.clone(),
        );
        registry.register(
            "ring_to_accepted_seconds",
            "From the button press (pressed_at) to APNs accepting the notification",
            self.ring_to_accepted_seconds.clone(),
        );
        registry.register(
            "ring_stage_seconds",
            "Where a pushed ring's time goes, by stage (each observed once per ring pushed): queued (pressed_at, else the AMQP timestamp, to its arrival at a worker; a retried ring's time in the retry tiers included), lookup_wait (arrival to its token lookup's statement sent: reading, lookups queued, a pooled connection, a ring held while the database is down), lookup (the statement to its batch awake with the rows), push (the payload and every token's request until the last answer; a ring held while its provider is down included), settle (the ledger write, publishes confirmed, the ack handed over)",
            self.stages.family.clone(),
        );
        registry.register(
            "ring_worker_seconds",
            "A pushed ring's arrival at the worker to its last token's answer, less that answer's own request: the worker's share of a ring's time",
            self.ring_worker_seconds.clone(),
        );
        registry.register_collector(Box::new(Scrape {
            counters: self.clone(),
            providers: providers.clone(),
        }));
    }

    /// `/readyz`: consuming, with APNs, FCM (when configured) and the database answering.
    pub fn ready_check(
        self: &Arc<Self>,
        pool: deadpool_postgres::Pool,
        providers: &Providers,
    ) -> ReadyCheck {
        let counters = self.clone();
        let providers = providers.clone();
        Arc::new(move || {
            let (counters, pool) = (counters.clone(), pool.clone());
            let fcm_up = providers.fcm_up();
            // With FCM configured too, a down APNs does not pause consumption: say so here.
            let apns_down =
                providers.fcm.is_some() && providers.apns.as_ref().is_some_and(|a| !a.up());
            let suspicion = providers.guard.suspicion();
            Box::pin(async move {
                counters.ready()?;
                if let Some(suspicion) = suspicion {
                    return Err(suspicion);
                }
                if fcm_up == Some(false) {
                    return Err("FCM unreachable, or its token endpoint refusing the service account; Android tokens wait on the retry path".into());
                }
                if apns_down {
                    return Err("APNs unreachable; iPhone tokens wait on the retry path".into());
                }
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
        )?;
        let p = &self.providers;
        let mut up = Vec::new();
        if let Some(apns) = &p.apns {
            let usable = !c.paused_apns.load(Ordering::Relaxed) && apns.up();
            up.push(("apns", i64::from(usable)));
        }
        if let Some(fcm_up) = p.fcm_up() {
            up.push(("fcm", i64::from(fcm_up)));
        }
        encode::gauges(
            &mut e,
            "provider_up",
            "1 while a configured push service is usable as far as this worker knows (APNs: consumption not paused for it; FCM: a connection can be had and the last access-token exchange worked).",
            "platform",
            &up,
        )?;
        let suspected: Vec<_> = Platform::ALL
            .iter()
            .filter(|platform| match platform {
                Platform::Apns => p.apns.is_some(),
                Platform::Fcm => p.fcm.is_some(),
            })
            .map(|&platform| (platform.as_str(), i64::from(p.guard.suspected(platform))))
            .collect();
        encode::gauges(
            &mut e,
            "config_suspected",
            "1 while a configured push service answers \"dead\" to most tokens of a scope (an APNs environment and topic, an FCM project), or to tokens it took lately: a configuration mistake is suspected, the tokens are kept and their rings retried (README, 'A configuration mistake never deletes the fleet's tokens').",
            "platform",
            &suspected,
        )?;
        let Some(fcm) = &p.fcm else { return Ok(()) };
        encode::gauge(
            &mut e,
            "fcm_connections",
            "Open HTTP/2 connections to FCM.",
            fcm.connections_open(),
        )?;
        encode::gauge(
            &mut e,
            "fcm_streams_in_flight",
            "FCM requests awaiting their answer.",
            fcm.streams_in_flight(),
        )?;
        let tokens = fcm.tokens();
        encode::counters(
            &mut e,
            "fcm_token_renewals",
            "OAuth 2.0 access-token exchanges at the service account's token_uri, by outcome.",
            "outcome",
            &[
                ("ok", tokens.renewals.load(Ordering::Relaxed)),
                ("failed", tokens.renewal_failures.load(Ordering::Relaxed)),
            ],
        )
    }
}
