//! `ringpush worker`: consume rings, look up their tokens (one query per batch), push one
//! notification per token, and settle each ring only when every token has an outcome.
//!
//! The unit of work is [`handle_ring`], which returns a [`RingOutcome`]; [`run`] is the
//! loop around it: consume with a bounded prefetch and manual acks, batch what is ready,
//! and stop between deliveries when `cancel` fires. What the loop guarantees:
//! - a ring is acked only once its outcome is durable: pushed, or confirmed into the retry
//!   tiers, the dead queue or the feedback queue;
//! - a retry carries only the tokens APNs has not yet taken, in a retry envelope in the
//!   message body ([`crate::wire::retry`]; split over several messages when large), through retry
//!   tiers of growing delay, until `max_attempts` or the ring's TTL sends it to the dead
//!   queue with the reason; nothing it publishes can break an AMQP limit
//!   ([`broker::publish_checked`]);
//! - the worker's own trouble never spends a ring's delivery budget: when the database or
//!   APNs cannot be used, the rings in hand are *held* (not handed back), consumption pauses
//!   — further rings wait in the queue, visible as depth — and a probe that does what failed
//!   (the lookup itself; a connection to APNs) runs with jittered backoff until it succeeds.
//!   Held rings then go on; one whose TTL passes while held is dead-lettered with the reason;
//! - a lookup that fails because of its input (SQLSTATE class 22/23), or that keeps timing
//!   out, is retried gateway by gateway, and only the rings whose gateway fails alone are
//!   dead-lettered, with the database's message;
//! - one ring holds at most `ring_concurrency` requests in flight, so a building's ring with
//!   thousands of phones shares the connections' streams with the ordinary rings around it;
//! - a lost broker connection is re-established with backoff (acks only ever go to the
//!   channel a delivery came on; the broker redelivers the rest, and the collapse id makes a
//!   duplicate one banner);
//! - on `cancel` the consumer is cancelled, rings in flight get the grace period, and what
//!   is left is handed back by publishing it again (confirmed) and acking the delivery, so a
//!   shutdown does not count towards the queue's delivery limit either.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;
use prometheus_client::metrics::histogram::Histogram;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apns::request::{build_payload, AlertTemplate, Notification};
use crate::apns::{Answer, Apns, Reason};
use crate::broker::{self, Acks, BrokerError, Names, Publisher};
use crate::db::{self, Found, Gateway, LookupError};
use crate::token::{DeviceToken, Environment};
use crate::wire::feedback::Invalidation;
use crate::wire::ring::RingEvent;

pub use crate::wire::ERROR_HEADER;
/// Header of the previous release counting how many times a ring had been sent to the retry
/// tiers; still read, so that retries published before an upgrade go on where they were.
pub const ATTEMPT_HEADER: &str = "x-ringpush-attempt";
/// Header of the previous release listing the tokens a retried ring still had to reach (an
/// AMQP header must fit in one frame, so it could not hold a building's phones: retries now
/// carry them in the body, [`crate::wire::retry`]). Still read, never written.
pub const PENDING_HEADER: &str = "x-ringpush-pending";
/// Header counting how often a ring was handed back at shutdown (published again).
pub const HANDBACK_HEADER: &str = "x-ringpush-handbacks";

/// Timeouts of one grouped lookup before its gateways are looked up one by one, and of one
/// gateway's lookup alone before its rings are dead-lettered.
const MAX_LOOKUP_TIMEOUTS: u32 = 2;

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
    /// First wait between probes of a failed database or APNs (doubling, jittered, up to
    /// `probe_cap`).
    pub probe_interval: Duration,
    /// Longest wait between two probes: how long pushing may lag behind the dependency's
    /// return.
    pub probe_cap: Duration,
    /// Most requests one ring has in flight at once: a ring with thousands of tokens shares
    /// the connections' streams with the rings around it instead of taking them all.
    pub ring_concurrency: usize,
    /// Largest body of one retry envelope (or dead letter); a ring with more pending tokens
    /// is split over several.
    pub retry_max_bytes: usize,
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
            probe_interval: Duration::from_millis(250),
            probe_cap: Duration::from_secs(1),
            ring_concurrency: 256,
            retry_max_bytes: 1 << 20,
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
        /// Whether this spends an attempt: not when every pending token failed only because
        /// its APNs endpoint could not be reached (the worker's trouble, not the ring's).
        spend: bool,
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
            probes_failed: AtomicU64::default(),
            rings_handed_back: AtomicU64::default(),
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
    /// Confirm-mode channel for dead-letter, retry, feedback and hand-back publishes.
    publisher: Publisher,
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
/// period) and closes the channel; reconnects when the broker connection is lost. Before it
/// consumes, it checks that the lookup can run (a worker started before `ringpush migrate`
/// waits, paused and probing, and starts on its own when the schema appears).
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
    if let Err(e) = db::probe_lookup(&shared.pool).await {
        pause(&shared, Paused::Database, &e.to_string());
    }
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

/// A ring as it came off the queue, read once.
struct Incoming {
    delivery: Delivery,
    ring: RingEvent,
    /// The ring event's JSON as the gateway sent it (unwrapped from a retry envelope).
    body: Vec<u8>,
    /// The key the gateway published with.
    routing_key: String,
    /// Attempts before this delivery (0 on a first delivery).
    attempt: u32,
    /// The tokens a retried ring still has to reach (`None`: a first delivery, all of them).
    pending: Option<HashSet<String>>,
}

impl Incoming {
    fn gateway(&self) -> &str {
        &self.ring.gateway_id
    }
    fn event(&self) -> &str {
        &self.ring.event_id
    }
    /// How long until the ring is no longer worth delivering.
    fn time_left(&self, ttl: Duration) -> Duration {
        ttl.saturating_sub(self.ring.age(OffsetDateTime::now_utc()))
    }
}

/// A delivery read: a ring to push, or an outcome already decided (and the ring, if it
/// could be read).
enum Read {
    Ring(Incoming),
    Settled(Delivery, Option<(String, String)>, RingOutcome),
}

/// Reads one delivery: unwraps a retry envelope, parses the ring event, and decides at once
/// what needs no lookup (malformed → dead, too old → expired or dead).
fn read(delivery: Delivery, now: OffsetDateTime, ttl: Duration) -> Read {
    let fallback = delivery
        .properties
        .timestamp()
        .and_then(|t| i64::try_from(t).ok())
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(crate::wire::time::in_range)
        .unwrap_or(now);
    let (body, routing_key, attempt, pending) = match crate::wire::retry::read(&delivery.data) {
        Ok(Some(envelope)) => (
            envelope.ring,
            envelope.routing_key,
            envelope.attempt,
            Some(envelope.pending.into_iter().collect()),
        ),
        Ok(None) => (
            delivery.data.clone(),
            delivery.routing_key.to_string(),
            legacy_attempt(&delivery),
            legacy_pending(&delivery),
        ),
        Err(e) => return Read::Settled(delivery, None, RingOutcome::Dead(e.to_string())),
    };
    let ring = match RingEvent::parse(&body, fallback) {
        Ok(ring) => ring,
        Err(e) => return Read::Settled(delivery, None, RingOutcome::Dead(e.to_string())),
    };
    if ring.age(now) > ttl {
        let ids = Some((ring.gateway_id.clone(), ring.event_id.clone()));
        let outcome = if attempt == 0 && pending.is_none() && !delivery.redelivered {
            RingOutcome::Expired
        } else {
            let pending = pending
                .as_ref()
                .map_or("all".into(), |p| p.len().to_string());
            RingOutcome::Dead(format!(
                "expired ({ttl:?} old) after {attempt} attempt(s); {pending} token(s) pending"
            ))
        };
        return Read::Settled(delivery, ids, outcome);
    }
    Read::Ring(Incoming {
        delivery,
        ring,
        body,
        routing_key,
        attempt,
        pending,
    })
}

/// Reads a batch, looks up all its gateways in one query (holding the rings while the
/// database is in trouble), and pushes each ring; when `abort` fires, rings still in flight
/// are handed back.
async fn handle_batch(ctx: &Arc<Context>, batch: Vec<Delivery>, abort: CancellationToken) {
    Counters::add(&ctx.counters.rings_consumed, batch.len());
    let now = OffsetDateTime::now_utc();
    let mut rings = Vec::with_capacity(batch.len());
    for delivery in batch {
        match read(delivery, now, ctx.settings.ring_ttl) {
            Read::Ring(incoming) => rings.push(incoming),
            Read::Settled(delivery, ids, outcome) => {
                let (gateway, event) = ids.unwrap_or_default();
                settle_delivery(ctx, &delivery, None, &gateway, &event, outcome).await;
            }
        }
    }
    if rings.is_empty() {
        return;
    }
    let Some(gateways) = lookup_holding(ctx, &mut rings, &abort).await else {
        return;
    };
    join_all(
        rings
            .iter()
            .map(|incoming| push_holding(ctx, incoming, gateways.get(incoming.gateway()), &abort)),
    )
    .await;
}

/// The gateways a batch's rings go to: one grouped answer, or answers put together gateway
/// by gateway.
enum Gateways {
    Grouped(Found),
    Each(HashMap<String, Gateway>),
}

impl Gateways {
    fn get(&self, id: &str) -> Option<&Gateway> {
        match self {
            Gateways::Grouped(found) => found.as_ref().as_ref().ok()?.get(id),
            Gateways::Each(map) => map.get(id),
        }
    }
}

/// Looks up the gateways of `rings`. While the database cannot be used, the rings are held
/// (consumption paused, a probe running) and looked up again when it answers; rings that
/// expire meanwhile, or whose gateway fails alone with a data error or keeps timing out, are
/// settled and leave `rings`. `None` when `abort` fired (every ring left was handed back).
async fn lookup_holding(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    abort: &CancellationToken,
) -> Option<Gateways> {
    let mut timeouts = 0;
    loop {
        if rings.is_empty() {
            return Some(Gateways::Each(HashMap::new()));
        }
        let ids: Vec<String> = rings
            .iter()
            .map(Incoming::gateway)
            .collect::<HashSet<_>>()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let found = ctx.lookups.lookup(ids.clone()).await;
        let trouble = match &*found {
            Ok(_) => return Some(Gateways::Grouped(found)),
            Err(LookupError::Timeout(_)) if timeouts + 1 < MAX_LOOKUP_TIMEOUTS => {
                timeouts += 1;
                warn!(rings = rings.len(), error = %found.as_ref().as_ref().unwrap_err(), "token lookup timed out; trying again");
                continue;
            }
            Err(LookupError::Data(_) | LookupError::Timeout(_)) => {
                match lookup_one_by_one(ctx, rings, &ids).await {
                    Ok(each) => return Some(Gateways::Each(each)),
                    Err(trouble) => trouble,
                }
            }
            Err(LookupError::Unavailable(e)) => e.clone(),
        };
        error!(rings = rings.len(), error = %trouble, "token lookup failed; holding the rings and pausing consumption");
        pause(&ctx.shared, Paused::Database, &trouble);
        if !hold(
            ctx,
            rings,
            abort,
            &format!("the token lookup failed: {trouble}"),
        )
        .await
        {
            return None;
        }
    }
}

/// After a grouped lookup failed for its input or kept timing out: each gateway alone, so
/// that only the rings of the gateway that fails alone are dead-lettered (with the
/// database's message) and the others go on. `Err` when the database itself is in trouble.
async fn lookup_one_by_one(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    ids: &[String],
) -> Result<HashMap<String, Gateway>, String> {
    // A few at a time, as grouped lookups run: one each at once would queue on the pool and
    // time out there, and turn the ring's trouble into the database's.
    let answers: Vec<_> = ids.iter().map(|id| async move {
        let mut timeouts = 0;
        loop {
            match &*ctx.lookups.lookup_alone(id).await {
                Err(LookupError::Timeout(_)) if timeouts + 1 < MAX_LOOKUP_TIMEOUTS => {
                    timeouts += 1;
                }
                Err(LookupError::Timeout(t)) => {
                    return Err(Ok(format!(
                        "the token lookup of this gateway took longer than {t:?}, {MAX_LOOKUP_TIMEOUTS} times"
                    )))
                }
                Err(LookupError::Data(e)) => return Err(Ok(format!("the token lookup failed: {e}"))),
                Err(LookupError::Unavailable(e)) => return Err(Err(e.clone())),
                Ok(found) => return Ok(found.get(id.as_str()).cloned()),
            }
        }
    }).collect();
    let answers: Vec<_> = futures_util::stream::iter(answers)
        .buffered(ctx.lookups.concurrency())
        .collect()
        .await;
    let mut each = HashMap::new();
    let mut refused = HashMap::new();
    for (id, answer) in ids.iter().zip(answers) {
        match answer {
            Ok(Some(gateway)) => {
                each.insert(id.clone(), gateway);
            }
            Ok(None) => {}
            Err(Ok(reason)) => {
                refused.insert(id.as_str(), reason);
            }
            Err(Err(trouble)) => return Err(trouble),
        }
    }
    let (dead, keep): (Vec<_>, Vec<_>) = std::mem::take(rings)
        .into_iter()
        .partition(|r| refused.contains_key(r.gateway()));
    *rings = keep;
    for incoming in dead {
        let reason = refused[incoming.gateway()].clone();
        warn!(gateway = incoming.gateway(), event = incoming.event(), %reason, "the ring's own lookup fails");
        settle(ctx, &incoming, RingOutcome::Dead(reason)).await;
    }
    Ok(each)
}

/// Holds `rings` while consumption is paused: returns `true` when it opens again (the
/// caller tries again), having settled the rings whose TTL passed meanwhile (dead-lettered,
/// `why` in the reason); `false` when `abort` fired and every ring was handed back.
async fn hold(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    abort: &CancellationToken,
    why: &str,
) -> bool {
    let mut open = ctx.pause.open.subscribe();
    loop {
        let ttl = ctx.settings.ring_ttl;
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(rings)
            .into_iter()
            .partition(|r| r.time_left(ttl).is_zero());
        *rings = waiting;
        for incoming in expired {
            let reason = format!(
                "expired ({ttl:?} old) while held after {} attempt(s): {why}",
                incoming.attempt
            );
            settle(ctx, &incoming, RingOutcome::Dead(reason)).await;
        }
        if rings.is_empty() {
            return true;
        }
        let next_expiry = rings
            .iter()
            .map(|r| r.time_left(ttl))
            .min()
            .unwrap_or_default();
        tokio::select! {
            _ = async { let _ = open.wait_for(|o| *o).await; } => return true,
            _ = tokio::time::sleep(next_expiry + Duration::from_millis(1)) => {}
            _ = abort.cancelled() => {
                for incoming in rings.drain(..) {
                    hand_back(ctx, &incoming).await;
                }
                return false;
            }
        }
    }
}

/// Pushes one ring and settles it; while APNs cannot be reached at all, holds it (paused,
/// probing) and pushes again when APNs is back, or dead-letters it once its TTL has passed.
async fn push_holding(
    ctx: &Arc<Context>,
    incoming: &Incoming,
    gateway: Option<&Gateway>,
    abort: &CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            outcome = handle_ring(ctx, incoming, gateway) => outcome,
            _ = abort.cancelled() => {
                hand_back(ctx, incoming).await;
                return;
            }
        };
        let RingOutcome::Unreachable {
            environments,
            error,
        } = outcome
        else {
            settle(ctx, incoming, outcome).await;
            return;
        };
        warn!(gateway = incoming.gateway(), event = incoming.event(), %error, "APNs unreachable; holding the ring");
        for env in environments {
            pause(&ctx.shared, Paused::Apns(env), &error);
        }
        let why = format!("APNs unreachable: {error}");
        if !hold_one(ctx, incoming, abort, &why).await {
            return;
        }
    }
}

/// [`hold`] for the one ring of `push_holding`: `true` when consumption opens again,
/// `false` when the ring was settled (expired) or handed back (`abort`).
async fn hold_one(
    ctx: &Arc<Context>,
    incoming: &Incoming,
    abort: &CancellationToken,
    why: &str,
) -> bool {
    let mut open = ctx.pause.open.subscribe();
    let left = incoming.time_left(ctx.settings.ring_ttl);
    tokio::select! {
        _ = async { let _ = open.wait_for(|o| *o).await; } => true,
        _ = tokio::time::sleep(left + Duration::from_millis(1)) => {
            let reason = format!(
                "expired ({:?} old) while held after {} attempt(s): {why}",
                ctx.settings.ring_ttl, incoming.attempt
            );
            settle(ctx, incoming, RingOutcome::Dead(reason)).await;
            false
        }
        _ = abort.cancelled() => {
            hand_back(ctx, incoming).await;
            false
        }
    }
}

/// Pushes one ring to every token of its gateway (or, on a retry, to the tokens still
/// pending) and says what became of it. At most `ring_concurrency` of its requests are in
/// flight at once; the payload is built once and shared by every token.
async fn handle_ring(ctx: &Context, incoming: &Incoming, gateway: Option<&Gateway>) -> RingOutcome {
    let ring = &incoming.ring;
    let pending = incoming.pending.as_ref();
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
    // Collected first: a stream over a lazy `map` of borrowing closures trips the compiler's
    // `Send` check for higher-ranked lifetimes.
    let sends: Vec<_> = recipients.iter().map(|r| {
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
                Ok(Answer::Rejected(rej)) => token_rejected(r, &n.topic, rej),
                Err(e) => TokenResult::Failed {
                    unreachable: e.is_unreachable(),
                    error: e.to_string(),
                },
            }
        }
    }).collect();
    // In order (`buffered`), so that answers line up with `recipients`.
    let results: Vec<TokenResult> = futures_util::stream::iter(sends)
        .buffered(ctx.settings.ring_concurrency.max(1))
        .collect()
        .await;
    let (mut accepted, mut rejected, mut last_error) = (0, 0, String::new());
    let mut invalid = Vec::new();
    let mut pending = Vec::new();
    let mut unreachable = Vec::new();
    let mut only_unreachable = true;
    for (r, result) in recipients.iter().zip(results) {
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
                only_unreachable &= u;
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
        spend: !only_unreachable,
    }
}

/// What a rejection means for one token: retry, rejected for good, or dead (with the
/// invalidation to report).
fn token_rejected(r: &db::Recipient, topic: &str, rej: crate::apns::Rejection) -> TokenResult {
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
            .and_then(crate::wire::time::in_range)
            .unwrap_or(now);
        Invalidation {
            token: r.token.clone(),
            environment: r.environment,
            topic: Some(topic.to_owned()),
            reason: rej.reason.to_string(),
            invalid_since: since,
            observed_at: now,
        }
    });
    TokenResult::Rejected(rej.reason, invalid)
}

/// What consumption waits for.
#[derive(Debug, Clone, Copy)]
enum Paused {
    Apns(Environment),
    Database,
}

impl std::fmt::Display for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Paused::Apns(env) => write!(f, "APNs ({env})"),
            Paused::Database => f.write_str("PostgreSQL (token lookup)"),
        }
    }
}

/// Pauses consumption and, unless one runs already, starts a probe that lifts the pause
/// when what failed works again. The probe does what failed — the token lookup itself, or
/// a connection to APNs that completes its handshake — so a database that answers `SELECT 1`
/// but lacks a table does not make the worker resume and fail again. Between probes it waits
/// `probe_interval`, doubling up to `probe_cap`, jittered; each failure is logged with the
/// real wait until the next probe (every step while the wait grows, then every 30 s).
fn pause(shared: &Arc<Shared>, why: Paused, error: &str) {
    let flag = match why {
        Paused::Apns(_) => &shared.counters.paused_apns,
        Paused::Database => &shared.counters.paused_database,
    };
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
                Paused::Apns(env) => shared.apns.probe(env).await.map_err(|e| e.to_string()),
                Paused::Database => db::probe_lookup(&shared.pool)
                    .await
                    .map_err(|e| e.to_string()),
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

/// A duration in whole milliseconds, for logs (`1250ms`).
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

/// [`settle_delivery`] for a ring that was read.
async fn settle(ctx: &Arc<Context>, incoming: &Incoming, outcome: RingOutcome) {
    let (gateway, event) = (incoming.gateway(), incoming.event());
    settle_delivery(
        ctx,
        &incoming.delivery,
        Some(incoming),
        gateway,
        event,
        outcome,
    )
    .await;
}

/// Makes a ring's outcome durable, then acks it: nothing is acked before its retry,
/// dead-letter or feedback copy is confirmed by the broker. `incoming` is `None` for a
/// delivery that could not be read as a ring.
async fn settle_delivery(
    ctx: &Arc<Context>,
    delivery: &Delivery,
    incoming: Option<&Incoming>,
    gateway: &str,
    event: &str,
    outcome: RingOutcome,
) {
    let c = &ctx.counters;
    if let RingOutcome::Delivered { invalid, .. } | RingOutcome::Retry { invalid, .. } = &outcome {
        if let Err(e) = report_invalid(ctx, invalid).await {
            error!(error = %e, gateway, event, "cannot publish feedback; handing the ring back");
            give_back(ctx, delivery, incoming).await;
            return;
        }
    }
    let durable = match &outcome {
        RingOutcome::Delivered {
            accepted, rejected, ..
        } => {
            Counters::add(&c.rings_delivered, 1);
            let tokens = accepted + rejected;
            let pressed_to_settled_ms = incoming.map_or(0, |i| {
                (OffsetDateTime::now_utc() - i.ring.pressed_at)
                    .whole_milliseconds()
                    .max(0) as u64
            });
            info!(
                gateway,
                event, tokens, accepted, rejected, pressed_to_settled_ms, "ring delivered"
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
        RingOutcome::Unreachable { error, .. } => {
            // `push_holding` holds these; an unreachable outcome never gets here.
            error!(gateway, event, %error, "APNs unreachable; handing the ring back");
            give_back(ctx, delivery, incoming).await;
            return;
        }
        RingOutcome::Retry {
            accepted,
            rejected,
            pending,
            error,
            spend,
            ..
        } => {
            let incoming = incoming.expect("only a read ring is pushed");
            let attempts = if *spend {
                incoming.attempt.saturating_add(1)
            } else {
                incoming.attempt
            };
            if *spend && attempts >= ctx.settings.max_attempts {
                let reason = format!("gave up after {attempts} attempts: {error}");
                let envelopes = envelopes(ctx, incoming, attempts, pending);
                dead_letter(ctx, delivery, Some(envelopes), &reason, gateway, event).await
            } else {
                warn!(gateway, event, accepted, rejected, pending = pending.len(), attempts, %error, "ring goes to a retry tier");
                let r = retry(ctx, incoming, attempts, pending).await;
                if r.is_ok() {
                    Counters::add(&c.rings_retried, 1);
                }
                r
            }
        }
        RingOutcome::Dead(reason) => {
            // The delivery as it came (a retry envelope keeps its pending tokens).
            dead_letter(ctx, delivery, None, reason, gateway, event).await
        }
    };
    let durable = match durable {
        // Never handed back to come round again: what cannot be published is dead-lettered
        // with the reason (a dead letter drops headers that leave no room for the reason).
        Err(e @ BrokerError::TooLarge { .. }) => {
            let reason = format!("cannot be retried: {e}");
            dead_letter(ctx, delivery, None, &reason, gateway, event).await
        }
        other => other,
    };
    match durable {
        // Acked with the rings settled around it (counted in `rings_acked` once sent).
        Ok(()) => ctx.acks.ack(delivery),
        Err(e) => {
            error!(error = %e, gateway, event, "cannot make the outcome durable; handing the ring back");
            give_back(ctx, delivery, incoming).await;
        }
    }
}

/// Dead-letters a ring with `reason`: the delivery as it came, or `bodies` — the ring in
/// retry envelopes naming the tokens it never reached (several when they are many).
async fn dead_letter(
    ctx: &Context,
    delivery: &Delivery,
    bodies: Option<Vec<Vec<u8>>>,
    reason: &str,
    gateway: &str,
    event: &str,
) -> Result<(), BrokerError> {
    warn!(gateway, event, reason, "ring goes to the dead queue");
    let dead = &ctx.settings.names.dead;
    let bodies = bodies.unwrap_or_else(|| vec![delivery.data.clone()]);
    let properties = plain_properties(&delivery.properties);
    for body in &bodies {
        broker::dead_letter_with(&ctx.publisher, dead, body, &properties, reason).await?;
    }
    Counters::add(&ctx.counters.rings_dead_lettered, 1);
    Ok(())
}

/// Publishes a feedback event per dead token, all confirmed: the publishes go out together
/// and their confirms are awaited together (no round trip each).
async fn report_invalid(ctx: &Context, invalid: &[Invalidation]) -> Result<(), BrokerError> {
    let queue = &ctx.settings.names.feedback;
    for result in join_all(invalid.iter().map(|i| i.publish(&ctx.publisher, queue))).await {
        result?;
    }
    Counters::add(&ctx.counters.feedback_events, invalid.len());
    Ok(())
}

/// The retry envelopes of a ring with `pending` tokens at `attempt`.
fn envelopes(
    ctx: &Context,
    incoming: &Incoming,
    attempt: u32,
    pending: &[DeviceToken],
) -> Vec<Vec<u8>> {
    let tokens: Vec<&str> = pending.iter().map(DeviceToken::as_hex).collect();
    crate::wire::retry::write(
        &incoming.body,
        attempt,
        &incoming.routing_key,
        &tokens,
        ctx.settings.retry_max_bytes,
    )
}

/// A delivery's properties for a copy ringpush publishes: the previous release's retry
/// headers dropped (the envelope carries what they held).
fn plain_properties(properties: &BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let mut kept = headers.clone();
    let inner: BTreeMap<ShortString, AMQPValue> = kept
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != PENDING_HEADER && k.as_str() != ATTEMPT_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kept = inner.into();
    properties.clone().with_headers(kept)
}

/// Publishes the ring to the retry tier of its attempt, in as many envelopes as its pending
/// tokens need, every one confirmed.
async fn retry(
    ctx: &Context,
    incoming: &Incoming,
    attempts: u32,
    pending: &[DeviceToken],
) -> Result<(), BrokerError> {
    let tier = ctx.settings.names.retry_tier(attempts.max(1));
    let properties = plain_properties(&incoming.delivery.properties)
        .with_content_type("application/json".into());
    let bodies = envelopes(ctx, incoming, attempts, pending);
    for result in
        join_all(bodies.iter().map(|body| {
            broker::publish_checked(&ctx.publisher, "", tier, body, properties.clone())
        }))
        .await
    {
        result?;
    }
    Ok(())
}

/// Hands a ring back at shutdown without spending its delivery budget: publishes it again
/// (to the rings exchange with its routing key, confirmed, a hand-back counted in a header),
/// then acks the delivery. If that publish fails, the delivery is nacked with requeue.
async fn hand_back(ctx: &Context, incoming: &Incoming) {
    give_back(ctx, &incoming.delivery, Some(incoming)).await;
}

async fn give_back(ctx: &Context, delivery: &Delivery, incoming: Option<&Incoming>) {
    let handbacks = match header(delivery, HANDBACK_HEADER) {
        Some(AMQPValue::LongUInt(n)) => n.saturating_add(1),
        _ => 1,
    };
    let properties = broker::with_header(
        &delivery.properties,
        HANDBACK_HEADER,
        AMQPValue::LongUInt(handbacks),
    );
    let key = incoming.map_or_else(
        || delivery.routing_key.to_string(),
        |i| i.routing_key.clone(),
    );
    let key = if key.starts_with("ring.") {
        key
    } else {
        Names::ring_key("handed-back")
    };
    let names = &ctx.settings.names;
    match broker::publish_checked(
        &ctx.publisher,
        &names.rings,
        &key,
        &delivery.data,
        properties,
    )
    .await
    {
        Ok(()) => {
            Counters::add(&ctx.counters.rings_handed_back, 1);
            ctx.acks.ack(delivery);
        }
        Err(e) => {
            warn!(error = %e, "cannot publish the ring again; nacking it back to the queue");
            requeue(ctx, delivery).await;
        }
    }
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

/// Attempts before this delivery, from a retry of the previous release.
fn legacy_attempt(delivery: &Delivery) -> u32 {
    match header(delivery, ATTEMPT_HEADER) {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        _ => 0,
    }
}

/// The tokens a retry of the previous release still had to reach.
fn legacy_pending(delivery: &Delivery) -> Option<HashSet<String>> {
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
