//! What a worker counts, and how it shows it: counters registered here, where they are
//! counted, as Prometheus families (`ringpush_rings_total{outcome}` and the rest) whose
//! children the worker increments directly — no lock and no translation on the way to
//! `/metrics` — plus the gauges read at scrape time and the readiness check `/readyz` runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{self, ReadyCheck};
use crate::provider::{Answer, Providers, Skip};
use crate::token::{AppId, Kind, Platform};

use metrics::{labelled as child, Family1};
use scrape::Scrape;

mod scrape;

/// Running counts and state, readable by tests, the demo and metrics. Each counter is a
/// child of a registered family (a shared atomic): incrementing it is all there is to do.
#[derive(Debug)]
pub struct Counters {
    rings: Family1,
    notifications: Family1,
    rejected: Family1,
    /// `ringpush_platform_notifications_total{app, platform, outcome}`: the outcomes of
    /// `notifications` per app and platform, children kept by both (created on first use).
    by_platform: Family1,
    by_platform_children: RwLock<HashMap<(AppId, Platform), [Counter; PLATFORM_OUTCOMES.len()]>>,
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
    /// Presses folded into a ring of their switch still ringing (debounce): not pushed.
    pub rings_debounced: Counter,
    /// Rings whose end was known before they were pushed (to the phones not yet reached).
    pub rings_ended_before_push: Counter,
    /// Ends of rings that had ended already: acked, nothing pushed.
    pub rings_already_ended: Counter,
    /// Ends that ended their ring, settled with their follow-ups.
    pub rings_ended: Counter,
    /// `ringpush_ring_ends_total{reason}`: rings ended, by how.
    ring_ends: Family1,
    /// `ringpush_ring_answer_seconds`: from the press to the answer, for rings answered.
    pub ring_answer_seconds: Histogram,
    /// `ringpush_followups_total{platform,kind,outcome}`.
    followups: Family1,
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
    /// From `pressed_at` to APNs's 200, seconds: the number the business cares about.
    pub ring_to_accepted_seconds: Histogram,
    /// Where a ring's time goes, stage by stage (`ringpush_ring_stage_seconds{stage}`).
    pub stages: Stages,
    /// From a ring's arrival to its last token's answer, less that answer's own request:
    /// the part of a ring's time that is the worker's.
    pub ring_worker_seconds: Histogram,
    /// Consuming from the broker right now.
    pub broker_connected: AtomicBool,
    /// Consumption paused because a provider that holds rings (APNs) is unreachable;
    /// `paused_for`: which.
    pub paused_provider: AtomicBool,
    pub paused_for: Mutex<Option<Platform>>,
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
            rings_debounced: ring("debounced"),
            rings_ended_before_push: ring("ended_before_push"),
            rings_already_ended: ring("already_ended"),
            rings_ended: ring("ended"),
            ring_ends: {
                let ends = Family1::default();
                for reason in crate::wire::ring::EndReason::ALL {
                    child(&ends, "reason", reason.as_str());
                }
                ends
            },
            ring_answer_seconds: Histogram::new([
                1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
            ]),
            followups: Family1::default(),
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
            by_platform_children: RwLock::default(),
            feedback_events: Counter::default(),
            pauses: Counter::default(),
            probes_failed: Counter::default(),
            broker_sessions: Counter::default(),
            ring_to_accepted_seconds: metrics::latency_histogram(),
            stages: Stages::default(),
            ring_worker_seconds: metrics::latency_histogram(),
            broker_connected: AtomicBool::default(),
            paused_provider: AtomicBool::default(),
            paused_for: Mutex::default(),
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
        if self.paused_provider.load(Ordering::Relaxed) {
            let name = self
                .paused_for()
                .map_or("a provider", Platform::provider_name);
            return Err(format!("{name} unreachable; consumption paused"));
        }
        if self.paused_database.load(Ordering::Relaxed) {
            return Err("the database could not be used; consumption paused".into());
        }
        Ok(())
    }

    /// [`Counters::ready`] but for a database pause: consuming, and no provider paused.
    fn ready_apart_from_database(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
            && !self.paused_provider.load(Ordering::Relaxed)
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

    /// The provider consumption is paused for, if any.
    pub(crate) fn paused_for(&self) -> Option<Platform> {
        if !self.paused_provider.load(Ordering::Relaxed) {
            return None;
        }
        *self.paused_for.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one answer of `app`'s `platform` under its outcome, per app and platform.
    pub(super) fn count_platform(&self, app: AppId, platform: Platform, answer: &Answer) {
        let outcome = match answer {
            Answer::Accepted => 0,
            Answer::Dead { .. } | Answer::Rejected { .. } => 1,
            Answer::Retry { .. } | Answer::Unreachable { .. } => 2,
            Answer::Skipped(Skip::Unconfigured(_)) => 3,
            Answer::Skipped(Skip::Unsupported(_)) => 4,
            Answer::Doubted { .. } => 5,
        };
        self.platform_children(app, platform, |children| children[outcome].inc());
    }

    /// Runs `f` on `app`'s and `platform`'s children of
    /// `ringpush_platform_notifications_total`, made the first time (a read lock after that).
    fn platform_children<T>(
        &self,
        app: AppId,
        platform: Platform,
        f: impl Fn(&[Counter]) -> T,
    ) -> T {
        let children = self
            .by_platform_children
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = children.get(&(app, platform)) {
            return f(c);
        }
        drop(children);
        let mut children = self
            .by_platform_children
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let made = children.entry((app, platform)).or_insert_with(|| {
            PLATFORM_OUTCOMES.map(|o| {
                self.by_platform.get_or_create_owned(&vec![
                    ("app".to_owned(), app.as_str().to_owned()),
                    ("platform".to_owned(), platform.as_str().to_owned()),
                    ("outcome".to_owned(), o.to_owned()),
                ])
            })
        });
        f(made)
    }

    /// Notifications of `platform` counted under `outcome` (accepted, rejected, failed,
    /// unconfigured, unsupported, doubted), whatever their app; 0 for an outcome it does
    /// not count.
    pub fn platform(&self, platform: Platform, outcome: &str) -> u64 {
        let Some(o) = PLATFORM_OUTCOMES.iter().position(|x| *x == outcome) else {
            return 0;
        };
        let children = self
            .by_platform_children
            .read()
            .unwrap_or_else(|e| e.into_inner());
        children
            .iter()
            .filter(|((_, p), _)| *p == platform)
            .map(|(_, c)| c[o].get())
            .sum()
    }

    /// Notifications of `app`'s `platform` counted under `outcome`.
    pub fn app(&self, app: AppId, platform: Platform, outcome: &str) -> u64 {
        let Some(o) = PLATFORM_OUTCOMES.iter().position(|x| *x == outcome) else {
            return 0;
        };
        self.platform_children(app, platform, |children| children[o].get())
    }

    /// Counts a token that was skipped (no provider for it).
    pub(super) fn count_skipped(&self, skip: crate::provider::Skip) {
        match skip {
            crate::provider::Skip::Unconfigured(_) => self.notifications_unconfigured.inc(),
            crate::provider::Skip::Unsupported(_) => self.notifications_unsupported.inc(),
        };
    }

    /// Counts a ring's end (once, when the end that won is first handled): by reason, and
    /// for an answered ring the time from its press to the answer.
    pub(super) fn count_end(&self, ended: &crate::db::rings::Ended) {
        child(&self.ring_ends, "reason", &ended.state).inc();
        if let (true, Some(pressed), Some(at)) =
            (ended.state == "answered", ended.pressed_at, ended.ended_at)
        {
            self.ring_answer_seconds
                .observe((at - pressed).as_seconds_f64().max(0.0));
        }
    }

    /// Ends counted under `reason` so far.
    pub fn ends(&self, reason: &str) -> u64 {
        child(&self.ring_ends, "reason", reason).get()
    }

    fn followup_child(&self, platform: Platform, kind: Kind, outcome: &str) -> Counter {
        self.followups.get_or_create_owned(&vec![
            ("platform".to_owned(), platform.to_string()),
            ("kind".to_owned(), kind.as_str().to_owned()),
            ("outcome".to_owned(), outcome.to_owned()),
        ])
    }

    /// Counts a follow-up's answer under its outcome (as `notifications_total` names it).
    pub(super) fn count_followup(&self, platform: Platform, kind: Kind, answer: &Answer) {
        let outcome = match answer {
            Answer::Accepted => "accepted",
            Answer::Dead { .. } | Answer::Rejected { .. } => "rejected",
            Answer::Doubted { .. } => "doubted",
            Answer::Skipped(Skip::Unconfigured(_)) => "unconfigured",
            Answer::Skipped(Skip::Unsupported(_)) => "unsupported",
            Answer::Retry { .. } | Answer::Unreachable { .. } => "failed",
        };
        self.followup_child(platform, kind, outcome).inc();
    }

    /// Counts a token that gets no follow-up, under the outcome its provider names.
    pub(super) fn count_followup_skipped(&self, platform: Platform, kind: Kind, outcome: &str) {
        self.followup_child(platform, kind, outcome).inc();
    }

    /// Follow-ups of `platform` and `kind` counted under `outcome` so far.
    pub fn followups(&self, platform: Platform, kind: Kind, outcome: &str) -> u64 {
        self.followup_child(platform, kind, outcome).get()
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
            "Notifications by app, platform (apns, fcm) and outcome (as ringpush_notifications_total)",
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
            "ring_ends",
            "Rings ended, by reason: answered, declined, door_opened, cancelled (a gateway's end), missed (nobody answered within RINGPUSH_RING_TIMEOUT)",
            self.ring_ends.clone(),
        );
        registry.register(
            "ring_answer_seconds",
            "From the button press (pressed_at) to the answer, for rings answered",
            self.ring_answer_seconds.clone(),
        );
        registry.register(
            "followups",
            "Follow-ups (a ring's end, to the phones that took it) by platform, kind and outcome: accepted, rejected, failed, doubted, unconfigured, unsupported (APNs's binary interface), skipped_voip (an iPhone's VoIP token: the app ends its CallKit call itself)",
            self.followups.clone(),
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
        providers.register(registry);
        registry.register_collector(Box::new(Scrape {
            counters: self.clone(),
            providers: providers.clone(),
        }));
    }

    /// `/readyz`: consuming, with APNs, FCM (when configured) and the database answering.
    pub(crate) fn ready_check(
        self: &Arc<Self>,
        pool: deadpool_postgres::Pool,
        providers: &Providers,
    ) -> ReadyCheck {
        let counters = self.clone();
        let providers = providers.clone();
        Arc::new(move || {
            let (counters, pool) = (counters.clone(), pool.clone());
            // A provider that is down: named, unless it is the only one and holds its rings
            // (then consumption pauses, and `ready` says so).
            let alone = providers.len() == 1;
            let down = providers
                .entries()
                .into_iter()
                .find(|(_, p)| !(p.up() || alone && p.holds()))
                .map(|(app, p)| match app {
                    AppId::DEFAULT => p.down(),
                    app => format!("app {app}: {}", p.down()),
                });
            let suspicion = providers.guard.suspicion();
            Box::pin(async move {
                if let Err(why) = counters.ready() {
                    // Paused for the database: say why it cannot be used (a missing schema is
                    // not an unreachable database).
                    if counters.paused_database.load(Ordering::Relaxed)
                        && counters.ready_apart_from_database()
                    {
                        if let Err(e) = crate::db::probe_lookup(&pool).await {
                            return Err(format!("{}; consumption paused", e.summary()));
                        }
                    }
                    return Err(why);
                }
                if let Some(suspicion) = suspicion {
                    return Err(suspicion);
                }
                if let Some(down) = down {
                    return Err(down);
                }
                crate::db::ping(&pool).await.map_err(|e| e.summary())
            })
        })
    }
}
