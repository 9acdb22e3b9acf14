//! `ringpush purge`: deletes tokens that APNs says are dead, in batches, one statement per
//! batch, and only where the phone has not registered the token again since.
//!
//! Acks follow the commit; a purger that dies between the two gets the batch again and
//! deletes nothing more (the statement is idempotent).
//!
//! A batch whose DELETE fails because of its data (SQLSTATE class 22 or 23) is tried again
//! request by request: a request the database refuses on its own goes to the dead queue with
//! the database's reason in `x-ringpush-error`, and the others are purged. (The purge queue
//! has no delivery limit: handed back, such a request would fail its batch forever, and the
//! valid requests beside it with it.) Any other failure hands the batch back after
//! `db_retry_delay`.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{self, Acks, Names, Publisher};
use crate::db::DbError;
use crate::wire::feedback::PurgeRequest;
use crate::wire::time::format_rfc3339;
use time::OffsetDateTime;

/// How the purger behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub names: Names,
    pub prefetch: u16,
    /// Most purge requests per DELETE.
    pub batch_size: usize,
    /// Wait before handing a batch back when the database fails.
    pub db_retry_delay: Duration,
    /// Largest purge request read (`RINGPUSH_MAX_MESSAGE_BYTES`); a larger one goes to the
    /// dead queue unread.
    pub max_message_bytes: usize,
}

impl Settings {
    /// The defaults `ringpush purge` runs with (prefetch twice the batch).
    pub fn new(names: Names) -> Self {
        Self {
            names,
            prefetch: 200,
            batch_size: 100,
            db_retry_delay: Duration::from_secs(1),
            max_message_bytes: broker::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Running counts of the purger.
/// What the purger counts: children of the families registered in [`Counters::register`],
/// incremented directly.
#[derive(Debug)]
pub struct Counters {
    requests_by_outcome: crate::metrics::Family1,
    tokens_by_outcome: crate::metrics::Family1,
    /// Purge requests read.
    pub requests: Counter,
    /// Tokens deleted.
    pub purged: Counter,
    /// Tokens kept: registered again after they were reported, or already gone.
    pub kept: Counter,
    /// Requests sent to the dead queue: malformed, or refused by the database on their own.
    pub dead_lettered: Counter,
    /// Requests acked after their batch committed (or was dead-lettered).
    pub acked: Counter,
    /// Consuming from the broker right now.
    pub broker_connected: std::sync::atomic::AtomicBool,
}

impl Default for Counters {
    fn default() -> Self {
        let requests = crate::metrics::Family1::default();
        let tokens = crate::metrics::Family1::default();
        let request = |o| crate::metrics::labelled(&requests, "outcome", o);
        let token = |o| crate::metrics::labelled(&tokens, "outcome", o);
        Self {
            requests: request("read"),
            dead_lettered: request("dead_lettered"),
            acked: request("acked"),
            purged: token("purged"),
            kept: token("kept"),
            requests_by_outcome: requests.clone(),
            tokens_by_outcome: tokens.clone(),
            broker_connected: Default::default(),
        }
    }
}

impl Counters {
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }
}

/// What one DELETE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    pub purged: u64,
    pub kept: u64,
}

/// How far ahead of this purger's clock a request's `observed_at` may lie (the worker's clock
/// may run a little ahead); further, the request is not trusted.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Whether a purge request may delete anything (docs/design.md, Guarantees): its `invalid_since`
/// not later than its `observed_at`, which is not later than now + [`CLOCK_SKEW`]. A request
/// dated in the future would delete a token the phone registered a second ago.
pub fn trusted(request: &PurgeRequest, now: OffsetDateTime) -> Result<(), String> {
    if request.invalid_since > request.observed_at {
        return Err(format!(
            "not purged: invalid_since {} lies after observed_at {} (a token is not invalid before anyone saw it so)",
            format_rfc3339(request.invalid_since),
            format_rfc3339(request.observed_at)
        ));
    }
    if request.observed_at > now + CLOCK_SKEW {
        return Err(format!(
            "not purged: observed_at {} lies in the future (now {}, {}s of clock skew allowed)",
            format_rfc3339(request.observed_at),
            format_rfc3339(now),
            CLOCK_SKEW.as_secs()
        ));
    }
    Ok(())
}

/// Deletes every requested token of the request's platform whose `updated_at` is not later
/// than its `invalid_since`, in one statement (one transaction); a request that is not
/// [`trusted`] deletes nothing. Repeats in a batch are harmless; so is running it twice.
pub async fn delete_batch(pool: &Pool, requests: &[PurgeRequest]) -> Result<Purged, DbError> {
    const DELETE: &str = "
        DELETE FROM push_tokens t
        USING unnest($1::text[], $2::text[]::timestamptz[], $3::text[])
            AS r(token, invalid_since, platform)
        WHERE t.token = r.token AND t.platform = r.platform AND t.updated_at <= r.invalid_since
        RETURNING t.token";
    let now = OffsetDateTime::now_utc();
    let trusted: Vec<&PurgeRequest> = requests
        .iter()
        .filter(|r| trusted(r, now).is_ok())
        .collect();
    let tokens: Vec<&str> = trusted.iter().map(|r| r.token.as_str()).collect();
    let since: Vec<String> = trusted
        .iter()
        .map(|r| format_rfc3339(r.invalid_since))
        .collect();
    let platforms: Vec<&str> = trusted
        .iter()
        .map(|r| r.token.platform().as_str())
        .collect();
    let distinct: HashSet<&str> = requests.iter().map(|r| r.token.as_str()).collect();
    if tokens.is_empty() {
        return Ok(Purged {
            purged: 0,
            kept: distinct.len() as u64,
        });
    }
    let client = pool.get().await?;
    let statement = client.prepare_cached(DELETE).await?;
    let rows = client
        .query(&statement, &[&tokens, &since, &platforms])
        .await?;
    let purged = rows.len() as u64;
    Ok(Purged {
        purged,
        kept: distinct.len() as u64 - purged,
    })
}

struct Context {
    settings: Settings,
    pool: Pool,
    counters: Arc<Counters>,
}

/// A purger, assembled in one place: what `ringpush purge`, the demo and the tests run.
pub struct Process {
    pub settings: Settings,
    /// The broker (`RINGPUSH_AMQP_URL` and its TLS).
    pub amqp_url: broker::Endpoint,
    pub pool: Pool,
    pub counters: Arc<Counters>,
}

impl Process {
    /// Serves its metrics and readiness; where it listens.
    pub async fn observe(
        &self,
        serve: &crate::metrics::Serve,
        cancel: &CancellationToken,
    ) -> anyhow::Result<std::net::SocketAddr> {
        let mut registry = crate::metrics::registry();
        self.counters.register(&mut registry);
        let ready = self.counters.ready_check(self.pool.clone());
        let names = self.settings.names.clone();
        serve
            .start(registry, &self.amqp_url, names, ready, cancel)
            .await
    }

    /// Runs it until `cancel` ([`run`]).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        run(
            self.settings,
            &self.amqp_url,
            self.pool,
            self.counters,
            cancel,
        )
        .await
    }
}

/// `ringpush purge`: consumes purge requests until `cancel`.
async fn run(
    settings: Settings,
    amqp_url: &broker::Endpoint,
    pool: Pool,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Context {
        settings,
        pool,
        counters,
    });
    let s = &ctx.settings;
    let consumer = broker::Consumer {
        process: "purge",
        amqp_url,
        names: &s.names,
        queue: &s.names.purge,
        prefetch: s.prefetch,
        batch_size: s.batch_size,
        control: broker::Control::new(cancel, Duration::from_secs(10)),
        connected: &ctx.counters.broker_connected,
        sessions: None,
        acked: Some(ctx.counters.acked.inner()),
        limit: {
            let counters = ctx.counters.clone();
            broker::Limit {
                counted: Arc::new(move || {
                    counters.requests.inc();
                    counters.dead_lettered.inc();
                }),
                ..broker::Limit::new(s.max_message_bytes, &s.names.purge_dead)
            }
        },
    };
    consumer
        .run(|publisher, acks, batch, _abort| {
            let ctx = ctx.clone();
            async move { handle_batch(&ctx, &publisher, &acks, batch).await }
        })
        .await?;
    info!("purger stopped");
    Ok(())
}

async fn handle_batch(ctx: &Context, publisher: &Publisher, acks: &Acks, batch: Vec<Delivery>) {
    let c = &ctx.counters;
    c.requests.inc_by(batch.len() as u64);
    let mut requests = Vec::with_capacity(batch.len());
    let mut valid = Vec::with_capacity(batch.len());
    for delivery in &batch {
        match PurgeRequest::parse(&delivery.data) {
            Ok(r) => match trusted(&r, OffsetDateTime::now_utc()) {
                Ok(()) => {
                    requests.push(r);
                    valid.push(delivery);
                }
                Err(reason) => {
                    warn!(token = %r.token.short(), reason, "purge request not trusted; it goes to the dead queue and deletes nothing");
                    dead_letter(ctx, publisher, acks, delivery, &reason).await;
                }
            },
            Err(e) => {
                let reason = e.to_string();
                warn!(
                    reason = crate::wire::logged(&reason),
                    "malformed purge request goes to the dead queue"
                );
                dead_letter(ctx, publisher, acks, delivery, &reason).await;
            }
        }
    }
    if requests.is_empty() {
        return;
    }
    let e = match delete_batch(&ctx.pool, &requests).await {
        Ok(done) => {
            count(c, done);
            info!(
                requests = requests.len(),
                purged = done.purged,
                kept = done.kept,
                "purge batch committed"
            );
            for delivery in valid {
                acks.ack(delivery);
            }
            return;
        }
        Err(e) => e,
    };
    if !e.is_data_error() {
        error!(
            error = %e,
            sqlstate = e.sqlstate(),
            requests = requests.len(),
            "purge failed; handing the batch back"
        );
        hand_back(ctx, acks, &valid).await;
        return;
    }
    if let ([request], [delivery]) = (&requests[..], &valid[..]) {
        refused(ctx, publisher, acks, request, delivery, &e).await;
        return;
    }
    warn!(
        error = %e,
        sqlstate = e.sqlstate(),
        requests = requests.len(),
        "the database refused the purge batch for its data; purging its requests one by one"
    );
    one_by_one(ctx, publisher, acks, &requests, &valid).await;
}

/// After a batch's DELETE failed for the data it was given: each request alone, so the one
/// the database refuses goes to the dead queue (it would fail the same way every time it
/// came back) and the others are purged. A request that fails alone for another reason is
/// handed back; if the database could not be reached at all (no SQLSTATE), the requests not
/// tried yet are handed back with it.
async fn one_by_one(
    ctx: &Context,
    publisher: &Publisher,
    acks: &Acks,
    requests: &[PurgeRequest],
    deliveries: &[&Delivery],
) {
    let c = &ctx.counters;
    let mut total = Purged::default();
    let mut dead = 0;
    let mut back: Vec<&Delivery> = Vec::new();
    for (i, (request, delivery)) in requests.iter().zip(deliveries).enumerate() {
        match delete_batch(&ctx.pool, std::slice::from_ref(request)).await {
            Ok(done) => {
                count(c, done);
                total.purged += done.purged;
                total.kept += done.kept;
                acks.ack(delivery);
            }
            Err(e) if e.is_data_error() => {
                refused(ctx, publisher, acks, request, delivery, &e).await;
                dead += 1;
            }
            Err(e) => {
                let unreachable = e.sqlstate().is_none();
                error!(
                    error = %e,
                    sqlstate = e.sqlstate(),
                    token = %request.token.short(),
                    untried = if unreachable { deliveries.len() - i - 1 } else { 0 },
                    "purge of one request failed; handing it back"
                );
                back.push(delivery);
                if unreachable {
                    back.extend(&deliveries[i + 1..]);
                    break;
                }
            }
        }
    }
    info!(
        requests = requests.len(),
        purged = total.purged,
        kept = total.kept,
        refused = dead,
        handed_back = back.len(),
        "purge batch done one by one"
    );
    hand_back(ctx, acks, &back).await;
}

/// A request the database refuses on its own, for its data: to the dead queue, with the
/// database's reason.
async fn refused(
    ctx: &Context,
    publisher: &Publisher,
    acks: &Acks,
    request: &PurgeRequest,
    delivery: &Delivery,
    e: &DbError,
) {
    let reason = format!("purge failed: {e}");
    warn!(
        reason = crate::wire::logged(&reason),
        sqlstate = e.sqlstate(),
        token = %request.token.short(),
        "the database refuses this purge request; it goes to the dead queue"
    );
    dead_letter(ctx, publisher, acks, delivery, &reason).await;
}

/// To the purge dead queue with `reason` (confirmed), then ack; handed back if the broker
/// does not take it.
async fn dead_letter(
    ctx: &Context,
    publisher: &Publisher,
    acks: &Acks,
    delivery: &Delivery,
    reason: &str,
) {
    match broker::dead_letter(publisher, &ctx.settings.names.purge_dead, delivery, reason).await {
        Ok(()) => {
            ctx.counters.dead_lettered.inc();
            acks.ack(delivery);
        }
        Err(e) => {
            error!(error = %e, "cannot dead-letter; handing the request back");
            requeue(acks, delivery).await;
        }
    }
}

fn count(c: &Counters, done: Purged) {
    c.purged.inc_by(done.purged);
    c.kept.inc_by(done.kept);
}

/// Waits `db_retry_delay` (so a failing database is not asked again at once), then hands
/// `deliveries` back to the queue.
async fn hand_back(ctx: &Context, acks: &Acks, deliveries: &[&Delivery]) {
    if deliveries.is_empty() {
        return;
    }
    tokio::time::sleep(ctx.settings.db_retry_delay).await;
    for delivery in deliveries {
        requeue(acks, delivery).await;
    }
}

async fn requeue(acks: &Acks, delivery: &Delivery) {
    if let Err(e) = acks.nack(delivery, broker::requeue()).await {
        error!(error = %e, "nack failed; the broker will redeliver");
    }
}

impl Counters {
    /// Registers the purger's metrics.
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "purge_requests",
            "Purge requests by what became of them",
            self.requests_by_outcome.clone(),
        );
        registry.register(
            "tokens",
            "Tokens the purger deleted, or kept (registered again since, or already gone)",
            self.tokens_by_outcome.clone(),
        );
    }

    /// `/readyz`: consuming, with the database answering.
    pub(crate) fn ready_check(self: &Arc<Self>, pool: Pool) -> crate::metrics::ReadyCheck {
        let counters = self.clone();
        Arc::new(move || {
            let connected = counters
                .broker_connected
                .load(std::sync::atomic::Ordering::Relaxed);
            let pool = pool.clone();
            Box::pin(async move {
                if !connected {
                    return Err("not connected to the broker".into());
                }
                crate::db::ping(&pool).await.map_err(|e| e.summary())
            })
        })
    }
}
