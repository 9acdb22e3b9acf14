//! `ringpush worker`: consume rings, look up their tokens (one query per batch), push one
//! notification per token, and settle each ring only when every token has an outcome.
//!
//! The unit of work is [`handle_ring`], which returns a [`RingOutcome`]; [`run`] is the
//! loop around it: consume with a bounded prefetch and manual acks, batch what is ready,
//! and stop between deliveries when `cancel` fires. What the loop guarantees:
//! - a ring is acked only once its outcome is durable: pushed, or confirmed into the retry
//!   tiers, the dead queue or the feedback queue;
//! - a retry carries only the tokens APNs has not yet taken (`x-ringpush-pending`), through
//!   retry tiers of growing delay, until `max_attempts` or the ring's TTL sends it to the
//!   dead queue with the reason;
//! - when APNs is unreachable or the database fails, rings are handed back (nack, requeue)
//!   without spending an attempt, and consumption pauses — rings wait in the queue, visible
//!   as depth — until a probe with backoff finds the way clear;
//! - a lost broker connection is re-established with backoff (acks only ever go to the
//!   channel a delivery came on; the broker redelivers the rest, and the collapse id makes a
//!   duplicate one banner);
//! - on `cancel` the consumer is cancelled, rings in flight get the grace period, and what
//!   is left is handed back.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldArray, LongString, ShortString};
use lapin::Channel;
use prometheus_client::metrics::histogram::Histogram;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apns::request::{build_payload, AlertTemplate, Notification};
use crate::apns::{Answer, Apns, Environment, Reason};
use crate::broker::{self, Acks, BrokerError, Names};
use crate::db::{self, Gateway};
use crate::feedback::Invalidation;
use crate::ring::RingEvent;
use crate::token::DeviceToken;

pub use broker::ERROR_HEADER;
/// Header counting how many times a ring has been sent to the retry tiers.
pub const ATTEMPT_HEADER: &str = "x-ringpush-attempt";
/// Header listing the tokens (hex) a retried ring still has to reach.
pub const PENDING_HEADER: &str = "x-ringpush-pending";

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub names: Names,
    /// Unacked deliveries the broker may hand this worker at once.
    pub prefetch: u16,
    /// Most rings looked up by one query.
    pub batch_size: usize,
    /// How long a ring is worth delivering after `pressed_at`.
    pub ring_ttl: Duration,
    /// `apns-topic` for tokens whose row has none.
    pub default_topic: Option<String>,
    pub alert: AlertTemplate,
    /// Attempts (first delivery included) before a ring with transient failures is
    /// dead-lettered instead of retried.
    pub max_attempts: u32,
    /// First wait between probes of a failed database or APNs (doubling up to 30 s).
    pub probe_interval: Duration,
    /// How long rings in flight may take to finish after `cancel`.
    pub grace: Duration,
}

impl Settings {
    /// The defaults `ringpush worker` runs with, for `names`.
    pub fn new(names: Names) -> Self {
        Self {
            names,
            prefetch: 256,
            batch_size: 64,
            ring_ttl: Duration::from_secs(60),
            default_topic: None,
            alert: AlertTemplate::default(),
            max_attempts: 5,
            probe_interval: Duration::from_millis(500),
            grace: Duration::from_secs(25),
        }
    }
}

/// What became of one ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingOutcome {
    /// Every token has an answer from APNs (accepted or rejected for good).
    Delivered {
        accepted: usize,
        rejected: usize,
        /// Tokens APNs says are dead: feedback events to publish before the ack.
        invalid: Vec<Invalidation>,
    },
    /// Older than the ring TTL before any attempt: not pushed.
    Expired,
    /// No gateway with this id.
    UnknownGateway,
    /// The gateway exists but nobody has a phone registered.
    NoTokens,
    /// Some tokens failed for a transient reason; the ring goes to a retry tier with them.
    Retry {
        accepted: usize,
        rejected: usize,
        /// The tokens still to reach.
        pending: Vec<DeviceToken>,
        error: String,
        invalid: Vec<Invalidation>,
    },
    /// No token got any answer because APNs could not be reached: hand the ring back
    /// without spending an attempt, and pause.
    Unreachable {
        environments: Vec<Environment>,
        error: String,
    },
    /// The ring cannot be delivered; it goes to the dead queue with this reason.
    Dead(String),
}

/// The outcome of one token of a ring.
enum TokenResult {
    Accepted,
    /// Rejected for good: APNs will not take this notification, however often it is sent;
    /// with the invalidation to report when the reason says the token is dead.
    Rejected(Reason, Option<Invalidation>),
    /// Transient: no answer, or an answer that says "try again". `unreachable`: no
    /// connection to APNs could be had at all.
    Failed {
        error: String,
        unreachable: bool,
    },
}

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
    /// Rings handed back to the queue (nack with requeue): APNs unreachable, database down,
    /// shutdown, or an outcome that could not be made durable.
    pub rings_requeued: AtomicU64,
    pub notifications_accepted: AtomicU64,
    pub notifications_rejected: AtomicU64,
    pub notifications_failed: AtomicU64,
    /// Feedback events published for tokens APNs says are dead.
    pub feedback_events: AtomicU64,
    /// Times consumption paused because APNs or the database was unreachable.
    pub pauses: AtomicU64,
    /// Broker sessions started (1 + reconnects).
    pub broker_sessions: AtomicU64,
    /// Rejections by APNs reason.
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
            rings_requeued: AtomicU64::default(),
            notifications_accepted: AtomicU64::default(),
            notifications_rejected: AtomicU64::default(),
            notifications_failed: AtomicU64::default(),
            feedback_events: AtomicU64::default(),
            pauses: AtomicU64::default(),
            broker_sessions: AtomicU64::default(),
            rejected_by_reason: Mutex::default(),
            apns_request_seconds: crate::metrics::latency_histogram(),
            ring_to_accepted_seconds: crate::metrics::latency_histogram(),
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
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Whether consumption may run (the reasons it may not are flags in [`Counters`]).
struct Pause {
    open: watch::Sender<bool>,
}

impl Pause {
    fn new() -> Self {
        Self {
            open: watch::Sender::new(true),
        }
    }

    fn update(&self, counters: &Counters) {
        let open = !counters.paused_apns.load(Ordering::SeqCst)
            && !counters.paused_database.load(Ordering::SeqCst);
        self.open
            .send_if_modified(|o| std::mem::replace(o, open) != open);
    }
}

/// What lives as long as the worker: everything but the broker session.
struct Shared {
    settings: Settings,
    pool: Pool,
    /// The token lookups of concurrent batches, grouped.
    lookups: Arc<db::Lookups>,
    apns: Apns,
    counters: Arc<Counters>,
    pause: Pause,
}

/// One broker session's view: the shared parts and the confirm-mode publishing channel.
struct Context {
    shared: Arc<Shared>,
    /// Confirm-mode channel for dead-letter, retry and feedback publishes.
    publisher: Channel,
    /// The consuming channel's acks.
    acks: Acks,
}

impl std::ops::Deref for Context {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// Consumes rings until `cancel`, then finishes the rings in flight (within the grace
/// period) and closes the channel; reconnects when the broker connection is lost.
pub async fn run(
    settings: Settings,
    amqp_url: &str,
    pool: Pool,
    apns: impl Into<Apns>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let apns = apns.into();
    let shared = Arc::new(Shared {
        settings,
        lookups: db::Lookups::new(pool.clone()),
        pool,
        apns,
        counters,
        pause: Pause::new(),
    });
    let s = &shared.settings;
    let consumer = broker::Consumer {
        process: "worker",
        amqp_url,
        names: &s.names,
        queue: &s.names.rings,
        prefetch: s.prefetch,
        batch_size: s.batch_size,
        control: broker::Control {
            cancel,
            grace: s.grace,
            open: Some(shared.pause.open.subscribe()),
        },
        connected: &shared.counters.broker_connected,
        sessions: Some(&shared.counters.broker_sessions),
        acked: Some(&shared.counters.rings_acked),
    };
    consumer
        .run(|publisher, acks, batch, abort| {
            let ctx = Arc::new(Context {
                shared: shared.clone(),
                publisher,
                acks,
            });
            async move { handle_batch(&ctx, batch, abort).await }
        })
        .await?;
    info!("worker stopped");
    Ok(())
}

/// Parses a batch, looks up all its gateways in one query, and handles each ring; when
/// `abort` fires, rings still in flight are handed back.
async fn handle_batch(ctx: &Arc<Context>, batch: Vec<Delivery>, abort: CancellationToken) {
    Counters::add(&ctx.counters.rings_consumed, batch.len());
    let now = OffsetDateTime::now_utc();
    let mut rings = Vec::with_capacity(batch.len());
    for delivery in batch {
        let fallback = delivery
            .properties
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(crate::ring::in_range)
            .unwrap_or(now);
        let outcome = match RingEvent::parse(&delivery.data, fallback) {
            Ok(ring) if ring.age(now) > ctx.settings.ring_ttl => {
                let attempt = attempt_of(&delivery);
                if attempt == 0 && !delivery.redelivered {
                    RingOutcome::Expired
                } else {
                    let pending =
                        pending_of(&delivery).map_or("all".into(), |p| p.len().to_string());
                    RingOutcome::Dead(format!(
                        "expired ({:?} old) after {attempt} retries; {pending} token(s) pending",
                        ctx.settings.ring_ttl
                    ))
                }
            }
            Ok(ring) => {
                rings.push((delivery, ring));
                continue;
            }
            Err(e) => RingOutcome::Dead(e.to_string()),
        };
        settle(ctx, &delivery, None, outcome, Instant::now()).await;
    }
    if rings.is_empty() {
        return;
    }
    let ids: Vec<String> = rings
        .iter()
        .map(|(_, r)| r.gateway_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let found = ctx.lookups.lookup(ids).await;
    let gateways = match &*found {
        Ok(found) => found,
        Err(e) => {
            error!(error = %e, rings = rings.len(), "token lookup failed; handing the rings back and pausing");
            pause(ctx, Paused::Database);
            for (delivery, _) in &rings {
                requeue(ctx, delivery).await;
            }
            return;
        }
    };
    join_all(rings.iter().map(|(delivery, ring)| async {
        let started = Instant::now();
        let work = async {
            let pending = pending_of(delivery);
            let outcome = handle_ring(ctx, ring, gateways.get(&ring.gateway_id), pending.as_ref()).await;
            settle(ctx, delivery, Some(ring), outcome, started).await;
        };
        tokio::select! {
            _ = work => {}
            _ = abort.cancelled() => {
                warn!(gateway = %ring.gateway_id, event = %ring.event_id, "shutting down: handing the ring back");
                requeue(ctx, delivery).await;
            }
        }
    }))
    .await;
}

/// Pushes one ring to every token of its gateway (or, on a retry, to the tokens still
/// pending) and says what became of it.
async fn handle_ring(
    ctx: &Context,
    ring: &RingEvent,
    gateway: Option<&Gateway>,
    pending: Option<&HashSet<String>>,
) -> RingOutcome {
    let Some(gateway) = gateway else {
        return RingOutcome::UnknownGateway;
    };
    let recipients: Vec<_> = gateway
        .recipients
        .iter()
        .filter(|r| pending.is_none_or(|p| p.contains(r.token.as_hex())))
        .collect();
    if recipients.is_empty() {
        if pending.is_some() {
            // The tokens still pending have been deleted since: nothing is left to do.
            return RingOutcome::Delivered {
                accepted: 0,
                rejected: 0,
                invalid: Vec::new(),
            };
        }
        return RingOutcome::NoTokens;
    }
    let payload = match build_payload(ring, &gateway.name, &ctx.settings.alert) {
        Ok(p) => p,
        Err(e) => return RingOutcome::Dead(e.to_string()),
    };
    let expiration = ring.expires_at(ctx.settings.ring_ttl);
    let sends = recipients.iter().map(|r| {
        let payload = payload.clone();
        async move {
            let topic = r.topic.clone().or_else(|| ctx.settings.default_topic.clone());
            let Some(topic) = topic else {
                warn!(token = %r.token, "token has no topic and RINGPUSH_APNS_TOPIC is not set");
                return TokenResult::Rejected(Reason::MissingTopic, None);
            };
            let n = Notification {
                token: r.token.clone(),
                topic,
                collapse_id: ring.event_id.clone(),
                expiration,
                payload,
            };
            let sent = Instant::now();
            let answer = ctx.apns.send(r.environment, &n).await;
            if answer.is_ok() {
                ctx.counters.apns_request_seconds.observe(sent.elapsed().as_secs_f64());
            }
            match answer {
                Ok(Answer::Accepted) => {
                    let since_press = OffsetDateTime::now_utc() - ring.pressed_at;
                    ctx.counters.ring_to_accepted_seconds.observe(since_press.as_seconds_f64().max(0.0));
                    TokenResult::Accepted
                }
                Ok(Answer::Rejected(rej)) => {
                    if rej.reason.is_token_invalid() {
                        info!(token = %r.token, reason = %rej.reason, "APNs reports the token invalid");
                    } else if rej.reason.is_provider_error() {
                        error!(token = %r.token, status = rej.status, reason = %rej.reason, "APNs refused our credentials or topic");
                    } else if !rej.reason.is_retryable() {
                        warn!(token = %r.token, status = rej.status, reason = %rej.reason, "APNs rejected the notification");
                    }
                    if rej.reason.is_retryable() {
                        return TokenResult::Failed {
                            error: format!("APNs {} {}", rej.status, rej.reason),
                            unreachable: false,
                        };
                    }
                    let invalid = rej.reason.is_token_invalid().then(|| {
                        let now = OffsetDateTime::now_utc();
                        let since = rej
                            .timestamp_ms
                            .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok())
                            .and_then(crate::ring::in_range)
                            .unwrap_or(now);
                        Invalidation {
                            token: r.token.clone(),
                            environment: r.environment,
                            topic: Some(n.topic.clone()),
                            reason: rej.reason.to_string(),
                            invalid_since: since,
                            observed_at: now,
                        }
                    });
                    TokenResult::Rejected(rej.reason, invalid)
                }
                Err(e) => TokenResult::Failed {
                    unreachable: e.is_unreachable(),
                    error: e.to_string(),
                },
            }
        }
    });
    let (mut accepted, mut rejected, mut last_error) = (0, 0, String::new());
    let mut invalid = Vec::new();
    let mut pending = Vec::new();
    let mut unreachable = Vec::new();
    for (r, result) in recipients.iter().zip(join_all(sends).await) {
        match result {
            TokenResult::Accepted => accepted += 1,
            TokenResult::Failed {
                error,
                unreachable: u,
            } => {
                pending.push(r.token.clone());
                if u && !unreachable.contains(&r.environment) {
                    unreachable.push(r.environment);
                }
                last_error = error;
            }
            TokenResult::Rejected(reason, invalidation) => {
                rejected += 1;
                invalid.extend(invalidation);
                *ctx.counters
                    .rejected_by_reason
                    .lock()
                    .unwrap()
                    .entry(reason.to_string())
                    .or_default() += 1;
            }
        }
    }
    Counters::add(&ctx.counters.notifications_accepted, accepted);
    Counters::add(&ctx.counters.notifications_rejected, rejected);
    Counters::add(&ctx.counters.notifications_failed, pending.len());
    if pending.is_empty() {
        return RingOutcome::Delivered {
            accepted,
            rejected,
            invalid,
        };
    }
    if accepted == 0
        && rejected == 0
        && unreachable.len()
            == recipients
                .iter()
                .map(|r| r.environment)
                .collect::<HashSet<_>>()
                .len()
    {
        return RingOutcome::Unreachable {
            environments: unreachable,
            error: last_error,
        };
    }
    RingOutcome::Retry {
        accepted,
        rejected,
        pending,
        error: last_error,
        invalid,
    }
}

/// What consumption waits for.
#[derive(Debug, Clone, Copy)]
enum Paused {
    Apns(Environment),
    Database,
}

/// Pauses consumption and, unless one runs already, starts a probe that lifts the pause
/// when the database or APNs answers again (backing off between tries).
fn pause(ctx: &Arc<Context>, why: Paused) {
    let flag = match why {
        Paused::Apns(_) => &ctx.counters.paused_apns,
        Paused::Database => &ctx.counters.paused_database,
    };
    if flag.swap(true, Ordering::SeqCst) {
        return;
    }
    Counters::add(&ctx.counters.pauses, 1);
    ctx.pause.update(&ctx.counters);
    warn!(?why, "pausing consumption until it answers again");
    let shared = ctx.shared.clone();
    tokio::spawn(async move {
        let mut wait = shared.settings.probe_interval;
        loop {
            tokio::time::sleep(wait).await;
            let ok = match why {
                Paused::Apns(env) => shared.apns.probe(env).await.is_ok(),
                Paused::Database => db::ping(&shared.pool).await.is_ok(),
            };
            if ok {
                break;
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        info!(?why, "answering again; resuming consumption");
        match why {
            Paused::Apns(_) => shared.counters.paused_apns.store(false, Ordering::SeqCst),
            Paused::Database => shared
                .counters
                .paused_database
                .store(false, Ordering::SeqCst),
        }
        shared.pause.update(&shared.counters);
    });
}

/// Makes a ring's outcome durable, then acks it: nothing is acked before its retry,
/// dead-letter or feedback copy is confirmed by the broker.
async fn settle(
    ctx: &Arc<Context>,
    delivery: &Delivery,
    ring: Option<&RingEvent>,
    outcome: RingOutcome,
    started: Instant,
) {
    let c = &ctx.counters;
    let latency_ms = started.elapsed().as_millis() as u64;
    let (gateway, event) = ring.map_or(("", ""), |r| (r.gateway_id.as_str(), r.event_id.as_str()));
    if let RingOutcome::Delivered { invalid, .. } | RingOutcome::Retry { invalid, .. } = &outcome {
        if let Err(e) = report_invalid(ctx, invalid).await {
            error!(error = %e, gateway, event, "cannot publish feedback; handing the ring back");
            requeue(ctx, delivery).await;
            return;
        }
    }
    let durable = match &outcome {
        RingOutcome::Delivered {
            accepted, rejected, ..
        } => {
            Counters::add(&c.rings_delivered, 1);
            let tokens = accepted + rejected;
            info!(
                gateway,
                event, tokens, accepted, rejected, latency_ms, "ring delivered"
            );
            Ok(())
        }
        RingOutcome::Expired => {
            Counters::add(&c.rings_expired, 1);
            info!(gateway, event, "ring expired before delivery; not pushed");
            Ok(())
        }
        RingOutcome::UnknownGateway => {
            Counters::add(&c.rings_unknown_gateway, 1);
            info!(gateway, event, "ring for an unknown gateway");
            Ok(())
        }
        RingOutcome::NoTokens => {
            Counters::add(&c.rings_without_tokens, 1);
            info!(gateway, event, "ring for a gateway without phones");
            Ok(())
        }
        RingOutcome::Unreachable {
            environments,
            error,
        } => {
            warn!(gateway, event, error = %error, "APNs unreachable; handing the ring back");
            for env in environments {
                pause(ctx, Paused::Apns(*env));
            }
            requeue(ctx, delivery).await;
            return;
        }
        RingOutcome::Retry {
            accepted,
            rejected,
            pending,
            error,
            ..
        } => {
            let attempts = attempt_of(delivery).saturating_add(1);
            if attempts >= ctx.settings.max_attempts {
                let reason = format!("gave up after {attempts} attempts: {error}");
                dead_letter(ctx, delivery, &reason, Some(pending), gateway, event).await
            } else {
                warn!(gateway, event, accepted, rejected, pending = pending.len(), attempts, error = %error, "ring goes to a retry tier");
                let r = retry(ctx, delivery, attempts, pending).await;
                if r.is_ok() {
                    Counters::add(&c.rings_retried, 1);
                }
                r
            }
        }
        RingOutcome::Dead(reason) => {
            let pending = pending_of(delivery).map(|p| {
                p.into_iter()
                    .filter_map(|t| DeviceToken::parse(&t).ok())
                    .collect::<Vec<_>>()
            });
            dead_letter(ctx, delivery, reason, pending.as_deref(), gateway, event).await
        }
    };
    match durable {
        // Acked with the rings settled around it (counted in `rings_acked` once sent).
        Ok(()) => ctx.acks.ack(delivery),
        Err(e) => {
            error!(error = %e, gateway, event, "cannot make the outcome durable; handing the ring back");
            requeue(ctx, delivery).await;
        }
    }
}

async fn dead_letter(
    ctx: &Context,
    delivery: &Delivery,
    reason: &str,
    pending: Option<&[DeviceToken]>,
    gateway: &str,
    event: &str,
) -> Result<(), BrokerError> {
    warn!(gateway, event, reason, "ring goes to the dead queue");
    let properties = match pending {
        Some(pending) => {
            broker::with_header(&delivery.properties, PENDING_HEADER, pending_value(pending))
        }
        None => delivery.properties.clone(),
    };
    let dead = &ctx.settings.names.dead;
    broker::dead_letter_with(&ctx.publisher, dead, &delivery.data, &properties, reason).await?;
    Counters::add(&ctx.counters.rings_dead_lettered, 1);
    Ok(())
}

/// Publishes a feedback event per dead token, all confirmed.
async fn report_invalid(ctx: &Context, invalid: &[Invalidation]) -> Result<(), BrokerError> {
    let queue = &ctx.settings.names.feedback;
    for result in join_all(invalid.iter().map(|i| i.publish(&ctx.publisher, queue))).await {
        result?;
    }
    Counters::add(&ctx.counters.feedback_events, invalid.len());
    Ok(())
}

/// Publishes the ring to the retry tier of its attempt, with the tokens still pending.
async fn retry(
    ctx: &Context,
    delivery: &Delivery,
    attempts: u32,
    pending: &[DeviceToken],
) -> Result<(), BrokerError> {
    let properties = broker::with_header(
        &delivery.properties,
        ATTEMPT_HEADER,
        AMQPValue::LongUInt(attempts),
    );
    let properties = broker::with_header(&properties, PENDING_HEADER, pending_value(pending));
    let tier = ctx.settings.names.retry_tier(attempts);
    broker::publish_confirmed(&ctx.publisher, "", tier, &delivery.data, properties).await
}

async fn requeue(ctx: &Context, delivery: &Delivery) {
    match ctx.acks.nack(delivery, broker::requeue()).await {
        Ok(_) => Counters::add(&ctx.counters.rings_requeued, 1),
        Err(e) => error!(error = %e, "nack failed; the broker will redeliver the ring"),
    }
}

fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(&ShortString::from(name))
}

/// How many attempts this ring has had before this delivery.
fn attempt_of(delivery: &Delivery) -> u32 {
    match header(delivery, ATTEMPT_HEADER) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        _ => 0,
    }
}

/// The tokens a retried ring still has to reach (`None`: a first delivery, all of them).
fn pending_of(delivery: &Delivery) -> Option<HashSet<String>> {
    match header(delivery, PENDING_HEADER)? {
        AMQPValue::FieldArray(tokens) => Some(
            tokens
                .as_slice()
                .iter()
                .filter_map(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

fn pending_value(pending: &[DeviceToken]) -> AMQPValue {
    let tokens: Vec<AMQPValue> = pending
        .iter()
        .map(|t| AMQPValue::LongString(LongString::from(t.as_hex())))
        .collect();
    AMQPValue::FieldArray(FieldArray::from(tokens))
}
