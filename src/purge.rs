//! `ringpush purge`: deletes tokens that APNs says are dead, in batches, one statement per
//! batch, and only where the phone has not registered the token again since.
//!
//! Acks follow the commit; a purger that dies between the two gets the batch again and
//! deletes nothing more (the statement is idempotent).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::message::Delivery;
use lapin::Channel;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{self, Acks, Names};
use crate::db::DbError;
use crate::feedback::PurgeRequest;
use crate::ring::format_rfc3339;

/// How the purger behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub names: Names,
    pub prefetch: u16,
    /// Most purge requests per DELETE.
    pub batch_size: usize,
    /// Wait before handing a batch back when the database fails.
    pub db_retry_delay: Duration,
}

/// Running counts of the purger.
#[derive(Debug, Default)]
pub struct Counters {
    /// Purge requests read.
    pub requests: AtomicU64,
    /// Tokens deleted.
    pub purged: AtomicU64,
    /// Tokens kept: registered again after they were reported, or already gone.
    pub kept: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Requests acked after their batch committed (or was dead-lettered).
    pub acked: AtomicU64,
    /// Consuming from the broker right now.
    pub broker_connected: std::sync::atomic::AtomicBool,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What one DELETE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Purged {
    pub purged: u64,
    pub kept: u64,
}

/// Deletes every requested token whose `updated_at` is not later than its `invalid_since`,
/// in one statement (one transaction). Repeats in a batch are harmless; so is running it
/// twice.
pub async fn delete_batch(pool: &Pool, requests: &[PurgeRequest]) -> Result<Purged, DbError> {
    const DELETE: &str = "
        DELETE FROM push_tokens t
        USING unnest($1::text[], $2::text[]::timestamptz[]) AS r(token, invalid_since)
        WHERE t.token = r.token AND t.updated_at <= r.invalid_since
        RETURNING t.token";
    let tokens: Vec<&str> = requests.iter().map(|r| r.token.as_hex()).collect();
    let since: Vec<String> = requests
        .iter()
        .map(|r| format_rfc3339(r.invalid_since))
        .collect();
    let client = pool.get().await?;
    let statement = client.prepare_cached(DELETE).await?;
    let rows = client.query(&statement, &[&tokens, &since]).await?;
    let distinct: HashSet<&str> = tokens.into_iter().collect();
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

/// `ringpush purge`: consumes purge requests until `cancel`.
pub async fn run(
    settings: Settings,
    amqp_url: &str,
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
        acked: Some(&ctx.counters.acked),
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

async fn handle_batch(ctx: &Context, publisher: &Channel, acks: &Acks, batch: Vec<Delivery>) {
    let c = &ctx.counters;
    c.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
    let mut requests = Vec::with_capacity(batch.len());
    let mut valid = Vec::with_capacity(batch.len());
    for delivery in &batch {
        match PurgeRequest::parse(&delivery.data) {
            Ok(r) => {
                requests.push(r);
                valid.push(delivery);
            }
            Err(e) => {
                let reason = e.to_string();
                warn!(reason, "malformed purge request goes to the dead queue");
                match broker::dead_letter(
                    publisher,
                    &ctx.settings.names.purge_dead,
                    delivery,
                    &reason,
                )
                .await
                {
                    Ok(()) => {
                        c.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        acks.ack(delivery);
                    }
                    Err(e) => {
                        error!(error = %e, "cannot dead-letter; handing the request back");
                        requeue(acks, delivery).await;
                    }
                }
            }
        }
    }
    if requests.is_empty() {
        return;
    }
    match delete_batch(&ctx.pool, &requests).await {
        Ok(done) => {
            c.purged.fetch_add(done.purged, Ordering::Relaxed);
            c.kept.fetch_add(done.kept, Ordering::Relaxed);
            info!(
                requests = requests.len(),
                purged = done.purged,
                kept = done.kept,
                "purge batch committed"
            );
            for delivery in valid {
                acks.ack(delivery);
            }
        }
        Err(e) => {
            error!(error = %e, requests = requests.len(), "purge failed; handing the batch back");
            tokio::time::sleep(ctx.settings.db_retry_delay).await;
            for delivery in valid {
                requeue(acks, delivery).await;
            }
        }
    }
}

async fn requeue(acks: &Acks, delivery: &Delivery) {
    if let Err(e) = acks.nack(delivery, broker::requeue()).await {
        error!(error = %e, "nack failed; the broker will redeliver");
    }
}
