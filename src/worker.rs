//! `ringpush worker`: consume rings, look up their tokens (one query per batch), push one
//! notification per token, and settle each ring only when every token has an outcome.
//!
//! [`run`] consumes with a bounded prefetch and manual acks, batches what is ready, and stops
//! between deliveries when `cancel` fires; every ring's fate is one [`decide::Disposition`].
//! What the loop guarantees:
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
//!
//! The tree: [`decide`] is the one place that chooses what becomes of a ring (a pure
//! function, table-tested); `read` reads a delivery, `lookup` looks up a batch (holding it
//! while the database fails), `push` fans a ring out through [`crate::provider`] (holding it
//! while no provider can be reached), `settle` carries a decision out, `pause` pauses
//! consumption and probes, `counters` counts and registers the metrics.

mod counters;
pub mod decide;
mod lookup;
mod pause;
mod push;
mod read;
mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use lapin::message::Delivery;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use counters::Counters;

use crate::apns::request::AlertTemplate;
use crate::apns::Environment;
use crate::broker::{self, Acks, Names, Publisher};
use crate::db;
use crate::provider::Providers;
use crate::token::DeviceToken;
use crate::wire::feedback::Invalidation;
use pause::{pause, Pause, Paused};
use read::{read, Read};

pub use crate::wire::retry::{ATTEMPT_HEADER, PENDING_HEADER};
pub use crate::wire::{ERROR_HEADER, HANDBACK_HEADER};

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
    /// Whether the delivery ledger is kept (`RINGPUSH_LEDGER`): off only to measure what it
    /// costs — without it a ring seen again (redelivered after a lost ack, handed back) is
    /// pushed again to the phones that took it.
    pub ledger: bool,
    /// Whether rings are claimed before they are pushed (`RINGPUSH_CLAIMS`, with the ledger
    /// on): a gateway's re-publish of a ring is then the same ring, whichever worker gets
    /// each copy and when. Off only to measure what it costs.
    pub claims: bool,
    /// A ring still ringing this long after `pressed_at` ends `missed`
    /// (`RINGPUSH_RING_TIMEOUT`).
    pub ring_timeout: Duration,
    /// A press less than this after a ring of its switch still ringing folds into it
    /// (`RINGPUSH_RING_DEBOUNCE`; zero: off).
    pub ring_debounce: Duration,
    /// How long a follow-up is worth delivering after the end (`RINGPUSH_FOLLOWUP_TTL`).
    pub followup_ttl: Duration,
    /// How long a ring's history is kept (`RINGPUSH_RING_HISTORY`).
    pub ring_history: Duration,
    /// Largest message body read (`RINGPUSH_MAX_MESSAGE_BYTES`); a larger one is
    /// dead-lettered unread ([`broker::Limit`]). The worker's own retry envelopes, back from a
    /// retry tier, may be as large as `retry_max_bytes`.
    pub max_message_bytes: usize,
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
            ledger: true,
            claims: true,
            ring_timeout: Duration::from_secs(30),
            ring_debounce: Duration::from_secs(5),
            followup_ttl: Duration::from_secs(3600),
            ring_history: Duration::from_secs(30 * 24 * 3600),
            max_message_bytes: broker::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// What the rings consumer reads: gateways' messages up to `max_message_bytes`; the
    /// retry envelopes this worker's kind wrote, back from a retry tier (routing key
    /// `ring.retry`, which no gateway may use), up to `retry_max_bytes` — or a little over
    /// `max_message_bytes`, for a ring that size with one token in its envelope.
    fn limit(&self, counters: &Arc<Counters>) -> broker::Limit {
        let own = self
            .retry_max_bytes
            .max(self.max_message_bytes + ENVELOPE_ROOM);
        let counters = counters.clone();
        broker::Limit {
            own: Some((broker::RETRY_KEY.to_owned(), own)),
            counted: Arc::new(move || {
                Counters::add(&counters.rings_consumed, 1);
                Counters::add(&counters.rings_dead_lettered, 1);
            }),
            ..broker::Limit::new(self.max_message_bytes, &self.names.dead)
        }
    }
}

/// What a retry envelope adds to the ring it carries with one token: its head, the routing
/// key and one quoted token (FCM's are up to 512 bytes), with room to spare.
const ENVELOPE_ROOM: usize = 4096;

/// The worker's databases: the primary (the ledger is written there) and where the token
/// lookups go (a standby, with `RINGPUSH_DATABASE_READ_URL`; else the primary too).
#[derive(Clone)]
pub struct Pools {
    pub primary: Pool,
    pub lookups: Pool,
}

impl From<Pool> for Pools {
    fn from(pool: Pool) -> Self {
        Self {
            primary: pool.clone(),
            lookups: pool,
        }
    }
}

/// What lives as long as the worker: everything but the broker session.
struct Shared {
    settings: Settings,
    /// Where the lookups go (and their probe).
    pool: Pool,
    /// The primary: the ledger.
    primary: Pool,
    /// The token lookups of concurrent batches, grouped.
    lookups: Arc<db::Lookups>,
    /// Which tokens took which ring (written grouped, read for rings seen before).
    ledger: Arc<db::Ledger>,
    /// Which rings this worker has in hand (claimed before they are pushed).
    claims: Arc<db::Claims>,
    /// The rings' lives: registered before they are pushed, ended, missed.
    rings: Arc<db::rings::Rings>,
    providers: Providers,
    counters: Arc<Counters>,
    pause: Pause,
}

impl Shared {
    /// Whether rings are claimed before they are pushed (the ledger on, and claims on).
    fn claims_on(&self) -> bool {
        self.settings.ledger && self.settings.claims
    }
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

/// The providers of a worker from its configured services: APNs and FCM, either absent when
/// its credentials are not configured (their tokens are then counted unconfigured).
pub fn providers(apns: Option<crate::apns::Apns>, fcm: Option<crate::fcm::Client>) -> Providers {
    Providers::new(providers_of(apns, fcm, None)).expect("one provider per platform")
}

/// One app's providers: APNs (with the app's topic) and FCM, when configured.
pub fn providers_of(
    apns: Option<crate::apns::Apns>,
    fcm: Option<crate::fcm::Client>,
    topic: Option<String>,
) -> Vec<Arc<dyn crate::provider::Provider>> {
    let mut list: Vec<Arc<dyn crate::provider::Provider>> = Vec::new();
    if let Some(apns) = apns {
        list.push(Arc::new(crate::apns::Provider::new(apns).with_topic(topic)));
    }
    if let Some(fcm) = fcm {
        list.push(Arc::new(crate::fcm::Provider::new(fcm)));
    }
    list
}

/// A worker process, assembled in one place: what `ringpush worker`, the demo and the tests
/// run (the bench runs the binary).
pub struct Process {
    pub settings: Settings,
    /// The broker (`RINGPUSH_AMQP_URL` and its TLS).
    pub amqp_url: broker::Endpoint,
    pub pools: Pools,
    pub providers: Providers,
    pub counters: Arc<Counters>,
    /// The apps whose providers `providers` are, read again every `RINGPUSH_APPS_POLL` and on
    /// SIGHUP while it runs (`None`: the providers are fixed, as a test or the demo gives).
    pub apps: Option<Apps>,
}

/// The apps a worker process reads again, and how often.
#[derive(Clone)]
pub struct Apps {
    pub apps: Arc<crate::apps::Apps>,
    pub poll: Duration,
}

impl Process {
    /// Serves its metrics (its counters and providers) and readiness; where it listens.
    pub async fn observe(
        &self,
        serve: &crate::metrics::Serve,
        cancel: &CancellationToken,
    ) -> anyhow::Result<std::net::SocketAddr> {
        let mut registry = crate::metrics::registry();
        self.counters.register(&mut registry, &self.providers);
        if let Some(apps) = &self.apps {
            apps.apps.register(&mut registry);
        }
        let ready = self
            .counters
            .ready_check(self.pools.primary.clone(), &self.providers);
        let names = self.settings.names.clone();
        serve
            .start(registry, &self.amqp_url, names, ready, cancel)
            .await
    }

    /// Runs it until `cancel` ([`run`]).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        if let Some(Apps { apps, poll }) = self.apps {
            tokio::spawn(apps.watch(poll, cancel.clone()));
        }
        run(
            self.settings,
            &self.amqp_url,
            self.pools,
            self.providers,
            self.counters,
            cancel,
        )
        .await
    }
}

/// Consumes rings until `cancel`, then finishes the rings in flight (within the grace
/// period) and closes the channel; reconnects when the broker connection is lost. Before it
/// consumes, it checks that the lookup can run (a worker started before `ringpush migrate`
/// waits, paused and probing, and starts on its own when the schema appears).
async fn run(
    settings: Settings,
    amqp_url: &broker::Endpoint,
    pools: impl Into<Pools>,
    providers: impl Into<Providers>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let Pools { primary, lookups } = pools.into();
    let timing = db::rings::Timing {
        timeout: settings.ring_timeout,
        debounce: settings.ring_debounce,
    };
    let shared = Arc::new(Shared {
        settings,
        lookups: db::Lookups::new(lookups.clone()),
        ledger: db::Ledger::new(primary.clone()),
        claims: db::Claims::new(primary.clone()),
        rings: db::rings::Rings::new(primary.clone(), timing),
        pool: lookups,
        primary,
        providers: providers.into(),
        counters,
        pause: Pause::new(),
    });
    if let Err(e) = pause::probe_database(&shared).await {
        pause(&shared, Paused::Database, &e);
    }
    if shared.settings.ledger {
        tokio::spawn(sweep_ledger(shared.clone(), cancel.clone()));
    }
    tokio::spawn(sweep_missed(
        shared.clone(),
        amqp_url.clone(),
        cancel.clone(),
    ));
    if shared.claims_on() {
        shared.ledger.end_claims(shared.claims.clone());
        tokio::spawn(renew_claims(shared.clone(), cancel.clone()));
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
        sessions: Some(shared.counters.broker_sessions.inner()),
        acked: Some(shared.counters.rings_acked.inner()),
        limit: s.limit(&shared.counters),
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

/// How much longer than the ring TTL a ledger entry is kept: room for clocks that differ
/// between workers and the database, and for a ring held at the edge of its TTL.
pub(crate) const LEDGER_MARGIN: Duration = Duration::from_secs(60);

/// Every half minute or so (jittered, so replicas spread out), deletes the ledger entries
/// older than the ring TTL plus [`LEDGER_MARGIN`]: a ring that old is never pushed again.
/// Every worker sweeps; a sweep with nothing to delete reads only the BRIN index's summary.
async fn sweep_ledger(shared: Arc<Shared>, cancel: CancellationToken) {
    let keep = shared.settings.ring_ttl + LEDGER_MARGIN;
    loop {
        let wait = crate::backoff::jittered(Duration::from_secs(30), Duration::from_secs(30), 1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match shared.ledger.sweep(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(entries = n, "swept old ledger entries"),
            Err(e) => tracing::warn!(error = %e, "could not sweep the delivery ledger"),
        }
        let orphan_ends = shared.settings.ring_ttl + LEDGER_MARGIN;
        match shared
            .rings
            .sweep(shared.settings.ring_history, orphan_ends)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rings = n, "swept old ring history"),
            Err(e) => tracing::warn!(error = %e, "could not sweep the ring history"),
        }
        if shared.claims_on() {
            match shared.claims.sweep(keep).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(claims = n, "swept old ring claims"),
                Err(e) => tracing::warn!(error = %e, "could not sweep the ring claims"),
            }
        }
    }
}

/// Most rings one missed sweep ends (the rest are left to the next one, a moment later).
const MISSED_PER_SWEEP: i64 = 500;

/// Every half second or so (jittered, so replicas spread out), ends `missed` the rings still
/// ringing past their deadline and publishes their ends — a worker-only message (routing key
/// `ring.retry`, which no gateway may publish) that a worker then handles as any end: the
/// phones that took the ring get their follow-up. The rings' rows stay locked until the ends
/// are confirmed; a worker that dies in between leaves them to the next sweep, here or on
/// another worker. Every worker sweeps; the rows one sweeps, the others skip.
async fn sweep_missed(shared: Arc<Shared>, amqp_url: broker::Endpoint, cancel: CancellationToken) {
    let mut channel: Option<(lapin::Connection, lapin::Channel)> = None;
    let mut failing = false;
    loop {
        let wait =
            crate::backoff::jittered(Duration::from_millis(250), Duration::from_millis(500), 1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if !channel
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected())
        {
            channel = match connect_for_missed(&amqp_url).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "the missed sweep waits for the broker");
                    continue;
                }
            };
        }
        let Some((_, ch)) = channel.as_ref() else {
            continue;
        };
        let names = &shared.settings.names;
        let announce = |missed: Vec<db::rings::Missed>| async move {
            let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
            let properties = lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_timestamp(now);
            let publishes = missed.iter().map(|m| {
                let body = db::rings::missed_end(m).to_json();
                let properties = properties.clone();
                async move {
                    broker::publish_confirmed(
                        ch,
                        &names.rings,
                        crate::broker::RETRY_KEY,
                        &body,
                        properties,
                    )
                    .await
                }
            });
            for result in join_all(publishes).await {
                result.map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        match shared.rings.sweep_missed(MISSED_PER_SWEEP, announce).await {
            Ok(n) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("the missed sweep works again");
                }
                if n > 0 {
                    tracing::debug!(rings = n, "rings nobody answered in time end missed");
                }
            }
            // Said once (the database or the broker is down: the worker says so elsewhere),
            // then quietly retried twice a second.
            Err(e) if failing => tracing::debug!(error = %e, "the missed sweep failed again"),
            Err(e) => {
                failing = true;
                tracing::warn!(error = %e, "the missed sweep failed; it runs again shortly");
            }
        }
    }
}

async fn connect_for_missed(
    amqp_url: &broker::Endpoint,
) -> Result<(lapin::Connection, lapin::Channel), broker::BrokerError> {
    let connection = broker::connect(amqp_url, "ringpush worker (missed rings)").await?;
    let channel = broker::confirm_channel(&connection).await?;
    Ok((connection, channel))
}

/// Renews the leases of the claims this worker holds (the rings in hand a while: held while
/// a dependency fails, a building's many phones), so another copy of such a ring waits for
/// it instead of taking it over. A renewal that fails is tried again at the next turn; the
/// lease outlasts two of them.
async fn renew_claims(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(db::CLAIM_RENEW_EVERY) => {}
        }
        if let Err(e) = shared.claims.renew().await {
            tracing::warn!(error = %e, "could not renew the ring claims in hand");
        }
    }
}

/// Reads a batch, looks up all its gateways in one query (holding the rings while the
/// database is in trouble), and pushes each ring; when `abort` fires, rings still in flight
/// are handed back.
async fn handle_batch(ctx: &Arc<Context>, batch: Vec<Delivery>, abort: CancellationToken) {
    Counters::add(&ctx.counters.rings_consumed, batch.len());
    let (now, arrived) = (OffsetDateTime::now_utc(), Instant::now());
    let mut rings = Vec::with_capacity(batch.len());
    for delivery in batch {
        match read(delivery, now, arrived, ctx.settings.ring_ttl) {
            Read::Ring(incoming) => rings.push(incoming),
            Read::Decided(delivery, ids, disposition) => {
                let (gateway, event) = ids.unwrap_or_default();
                settle::settle_delivery(ctx, &delivery, None, &gateway, &event, disposition).await;
            }
        }
    }
    if rings.is_empty() {
        return;
    }
    let Some(looked) = lookup::lookup_holding(ctx, &mut rings, &abort).await else {
        return;
    };
    let (gateways, mut waiting) = (&looked.gateways, looked.waiting);
    let looked_up = push::LookedUp {
        sent: looked.sent,
        at: Instant::now(),
    };
    let abort = &abort;
    // Each ring's claim is released once it is settled (its ledger entry written). A ring
    // another copy of which is in hand (a gateway's re-publish) waits for that copy's claim.
    let ready = join_all(rings.iter_mut().map(|incoming| async move {
        let gateway = gateways.get(incoming.gateway());
        push::push_holding(ctx, incoming, gateway, looked_up, abort).await;
        incoming.claim.take();
    }));
    let waited = join_all(waiting.iter_mut().map(|incoming| async move {
        if lookup::wait_for_claim(ctx, incoming, abort).await {
            let gateway = gateways.get(incoming.gateway());
            let looked_up = push::LookedUp {
                sent: None,
                at: Instant::now(),
            };
            push::push_holding(ctx, incoming, gateway, looked_up, abort).await;
        }
        incoming.claim.take();
    }));
    tokio::join!(ready, waited);
}
