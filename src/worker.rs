//! `ringpush worker`: consume rings, look up their tokens (one query per batch), push one
//! notification per token, and settle each ring only when every token has an outcome.
//!
//! The unit of work is [`handle_ring`], which returns a [`RingOutcome`]; [`run`] is the
//! loop around it: consume with a bounded prefetch and manual acks, batch what is ready,
//! and stop between deliveries when `cancel` fires.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::join_all;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::Channel;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apns::http2::Client;
use crate::apns::request::{build_payload, AlertTemplate, Notification};
use crate::apns::{Answer, Reason};
use crate::broker::{self, BrokerError, Names};
use crate::db::{self, Gateway};
use crate::feedback::Invalidation;
use crate::ring::RingEvent;

pub use broker::ERROR_HEADER;
/// Header counting how many times a ring has been sent to the retry queue.
pub const ATTEMPT_HEADER: &str = "x-ringpush-attempt";

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
    /// Wait before handing rings back when the database lookup fails.
    pub db_retry_delay: Duration,
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
            db_retry_delay: Duration::from_secs(1),
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
    /// Older than the ring TTL: not pushed.
    Expired,
    /// No gateway with this id.
    UnknownGateway,
    /// The gateway exists but nobody has a phone registered.
    NoTokens,
    /// Some tokens failed for a transient reason; the ring goes to the retry queue.
    Retry {
        accepted: usize,
        rejected: usize,
        failed: usize,
        error: String,
        invalid: Vec<Invalidation>,
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
    /// Transient: no answer, or an answer that says "try again".
    Failed(String),
}

/// Running counts, readable by tests, the demo and (later) metrics.
#[derive(Debug, Default)]
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
    /// Rings handed back to the queue (nack with requeue) because the database failed.
    pub rings_requeued: AtomicU64,
    pub notifications_accepted: AtomicU64,
    pub notifications_rejected: AtomicU64,
    pub notifications_failed: AtomicU64,
    /// Feedback events published for tokens APNs says are dead.
    pub feedback_events: AtomicU64,
    /// Rejections by APNs reason.
    pub rejected_by_reason: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Everything a ring's handling needs, shared by the worker's tasks.
struct Context {
    settings: Settings,
    pool: Pool,
    apns: Client,
    /// Confirm-mode channel for dead-letter and retry publishes.
    publisher: Channel,
    counters: Arc<Counters>,
}

/// Consumes rings until `cancel`, then finishes the rings in flight and closes the channel.
pub async fn run(
    settings: Settings,
    amqp_url: &str,
    pool: Pool,
    apns: Client,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let connection = broker::connect(amqp_url, "ringpush worker").await?;
    let publisher = broker::confirm_channel(&connection).await?;
    broker::declare(&publisher, &settings.names).await?;
    let (queue, prefetch, batch_size) = (
        settings.names.rings.clone(),
        settings.prefetch,
        settings.batch_size,
    );
    let ctx = Arc::new(Context {
        settings,
        pool,
        apns,
        publisher,
        counters,
    });
    let result =
        broker::consume_batches(&connection, &queue, prefetch, batch_size, cancel, |batch| {
            let ctx = ctx.clone();
            async move { handle_batch(&ctx, batch).await }
        })
        .await;
    let _ = connection.close(200, "worker stopping".into()).await;
    info!("worker stopped");
    Ok(result?)
}

/// Parses a batch, looks up all its gateways in one query, and handles each ring.
async fn handle_batch(ctx: &Context, batch: Vec<Delivery>) {
    Counters::add(&ctx.counters.rings_consumed, batch.len());
    let now = OffsetDateTime::now_utc();
    let mut rings = Vec::with_capacity(batch.len());
    for delivery in batch {
        let fallback = delivery
            .properties
            .timestamp()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t as i64).ok())
            .unwrap_or(now);
        match RingEvent::parse(&delivery.data, fallback) {
            Ok(ring) if ring.age(now) > ctx.settings.ring_ttl => {
                settle(ctx, &delivery, None, RingOutcome::Expired, Instant::now()).await;
            }
            Ok(ring) => rings.push((delivery, ring)),
            Err(e) => {
                settle(
                    ctx,
                    &delivery,
                    None,
                    RingOutcome::Dead(e.to_string()),
                    Instant::now(),
                )
                .await
            }
        }
    }
    if rings.is_empty() {
        return;
    }
    let ids: Vec<&str> = rings
        .iter()
        .map(|(_, r)| r.gateway_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let gateways = match db::lookup(&ctx.pool, &ids).await {
        Ok(found) => found,
        Err(e) => {
            error!(error = %e, rings = rings.len(), "token lookup failed; handing the rings back");
            tokio::time::sleep(ctx.settings.db_retry_delay).await;
            for (delivery, _) in &rings {
                requeue(ctx, delivery).await;
            }
            return;
        }
    };
    join_all(rings.iter().map(|(delivery, ring)| async {
        let started = Instant::now();
        let outcome = handle_ring(ctx, ring, gateways.get(&ring.gateway_id)).await;
        settle(ctx, delivery, Some(ring), outcome, started).await;
    }))
    .await;
}

/// Pushes one ring to every token of its gateway and says what became of it.
async fn handle_ring(ctx: &Context, ring: &RingEvent, gateway: Option<&Gateway>) -> RingOutcome {
    let Some(gateway) = gateway else {
        return RingOutcome::UnknownGateway;
    };
    if gateway.recipients.is_empty() {
        return RingOutcome::NoTokens;
    }
    let payload = match build_payload(ring, &gateway.name, &ctx.settings.alert) {
        Ok(p) => p,
        Err(e) => return RingOutcome::Dead(e.to_string()),
    };
    let expiration = ring.expires_at(ctx.settings.ring_ttl);
    let sends = gateway.recipients.iter().map(|r| {
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
            match ctx.apns.send(r.environment, &n).await {
                Ok(Answer::Accepted) => TokenResult::Accepted,
                Ok(Answer::Rejected(rej)) => {
                    if rej.reason.is_token_invalid() {
                        info!(token = %r.token, reason = %rej.reason, "APNs reports the token invalid");
                    } else if rej.reason.is_provider_error() {
                        error!(token = %r.token, status = rej.status, reason = %rej.reason, "APNs refused our credentials or topic");
                    } else if !rej.reason.is_retryable() {
                        warn!(token = %r.token, status = rej.status, reason = %rej.reason, "APNs rejected the notification");
                    }
                    if rej.reason.is_retryable() {
                        return TokenResult::Failed(format!("APNs {} {}", rej.status, rej.reason));
                    }
                    let invalid = rej.reason.is_token_invalid().then(|| {
                        let now = OffsetDateTime::now_utc();
                        let since = rej
                            .timestamp_ms
                            .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok())
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
                Err(e) => TokenResult::Failed(e.to_string()),
            }
        }
    });
    let (mut accepted, mut rejected, mut failed, mut last_error) = (0, 0, 0, String::new());
    let mut invalid = Vec::new();
    for result in join_all(sends).await {
        match result {
            TokenResult::Accepted => accepted += 1,
            TokenResult::Failed(transient) => {
                failed += 1;
                last_error = transient;
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
    Counters::add(&ctx.counters.notifications_failed, failed);
    if failed > 0 {
        return RingOutcome::Retry {
            accepted,
            rejected,
            failed,
            error: last_error,
            invalid,
        };
    }
    RingOutcome::Delivered {
        accepted,
        rejected,
        invalid,
    }
}

/// Makes a ring's outcome durable, then acks it: nothing is acked before its retry or
/// dead-letter copy is confirmed by the broker.
async fn settle(
    ctx: &Context,
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
            info!(
                gateway,
                event, accepted, rejected, latency_ms, "ring delivered"
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
        RingOutcome::Retry {
            accepted,
            rejected,
            failed,
            error,
            ..
        } => {
            let attempt = attempt_of(delivery) + 1;
            if attempt >= ctx.settings.max_attempts {
                let reason = format!("gave up after {attempt} attempts: {error}");
                dead_letter(ctx, delivery, &reason, gateway, event).await
            } else {
                warn!(gateway, event, accepted, rejected, failed, attempt, error = %error, "ring goes to the retry queue");
                let r = retry(ctx, delivery, attempt).await;
                if r.is_ok() {
                    Counters::add(&c.rings_retried, 1);
                }
                r
            }
        }
        RingOutcome::Dead(reason) => dead_letter(ctx, delivery, reason, gateway, event).await,
    };
    match durable {
        Ok(()) => match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(_) => Counters::add(&c.rings_acked, 1),
            Err(e) => error!(error = %e, "ack failed; the broker will redeliver the ring"),
        },
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
    gateway: &str,
    event: &str,
) -> Result<(), BrokerError> {
    warn!(gateway, event, reason, "ring goes to the dead queue");
    broker::dead_letter(&ctx.publisher, &ctx.settings.names.dead, delivery, reason).await?;
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

async fn retry(ctx: &Context, delivery: &Delivery, attempt: u32) -> Result<(), BrokerError> {
    let properties = broker::with_header(
        &delivery.properties,
        ATTEMPT_HEADER,
        AMQPValue::LongUInt(attempt),
    );
    broker::publish_confirmed(
        &ctx.publisher,
        "",
        &ctx.settings.names.retry,
        &delivery.data,
        properties,
    )
    .await
}

async fn requeue(ctx: &Context, delivery: &Delivery) {
    let nack = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    match delivery.acker.nack(nack).await {
        Ok(_) => Counters::add(&ctx.counters.rings_requeued, 1),
        Err(e) => error!(error = %e, "nack failed; the broker will redeliver the ring"),
    }
}

/// How many times this ring has been through the retry queue.
fn attempt_of(delivery: &Delivery) -> u32 {
    let headers = delivery.properties.headers().as_ref();
    match headers.and_then(|h| h.inner().get(&ShortString::from(ATTEMPT_HEADER))) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        _ => 0,
    }
}
