//! The delivery ledger's cost (see [`LedgerCost`]): the same drain of pre-published rings by
//! a fresh worker process with `RINGPUSH_LEDGER=on` and `off`, in turns (on, off, off, on,
//! …: a drift of the host over the run weighs on both alike), in the same run; the ratio of
//! the medians. With the ledger off nothing is claimed either, so that ratio is the whole
//! "a phone rings once" machinery's. And the cost of recognising a gateway's re-publish alone
//! ([`claims_cost`]): the same drains with the ledger on and `RINGPUSH_CLAIMS=on` and `off`.

use std::time::{Duration, Instant};

use crate::broker::{self, Names};
use crate::wire::ring::RingEvent;

use super::measure::{cpu_seconds, publish_all, sample, scrape, service_cores, service_cpu};
use super::processes::{free_port, stop, WorkerOf};
use super::report::{Drain, LedgerCost};

/// Drains of each kind (on, off), in turns: on, off, off, on, on, off, off, on.
const LEDGER_ROUNDS: usize = 4;

/// Publishes `rings` rings, then drains them with a worker whose ledger is on, and the same
/// with it off, [`LEDGER_ROUNDS`] times each in turns.
pub(super) async fn ledger_cost(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    channel: &lapin::Channel,
    names: &Names,
    rings: usize,
    fanout: usize,
    ring: &impl Fn(usize) -> RingEvent,
) -> anyhow::Result<LedgerCost> {
    let mut cost = LedgerCost {
        rings,
        ..LedgerCost::default()
    };
    for round in 0..LEDGER_ROUNDS * 2 {
        // on, off, off, on, on, off, off, on
        let on = matches!(round % 4, 0 | 3);
        let before = rows_of(pool, "ring_ledger").await?;
        let switch = [("RINGPUSH_LEDGER", if on { "on" } else { "off" })];
        let mut drain = drain(worker_of, channel, names, rings, fanout, ring, &switch).await?;
        drain.ledger = on;
        drain.claims = on;
        let rows = rows_of(pool, "ring_ledger").await? - before;
        cost.drains.push(drain.clone());
        if on {
            cost.ledger_rows_per_ring = Some(rows as f64 / rings as f64);
            cost.on.push(drain);
        } else {
            anyhow::ensure!(rows == 0, "the ledger was written with RINGPUSH_LEDGER=off");
            cost.off.push(drain);
        }
    }
    cost.throughput_ratio = median(&cost.on) / median(&cost.off);
    cost.target_met = cost.throughput_ratio >= 0.9;
    Ok(cost)
}

/// The median notifications/s of some drains.
fn median(d: &[Drain]) -> f64 {
    let mut v: Vec<f64> = d.iter().map(|d| d.notifications_per_s).collect();
    v.sort_by(f64::total_cmp);
    (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
}

/// What recognising a gateway's re-publish costs: the same drains as [`ledger_cost`], the
/// ledger on throughout, with `RINGPUSH_CLAIMS=on` and `off` in turns (on, off, off, on, …).
/// Its budget is the ledger's: on / off ≥ 0.9.
pub(super) async fn claims_cost(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    channel: &lapin::Channel,
    names: &Names,
    rings: usize,
    fanout: usize,
    ring: &impl Fn(usize) -> RingEvent,
) -> anyhow::Result<LedgerCost> {
    let mut cost = LedgerCost {
        rings,
        ..LedgerCost::default()
    };
    for round in 0..LEDGER_ROUNDS * 2 {
        let on = matches!(round % 4, 0 | 3);
        let before = rows_of(pool, "ring_claims").await?;
        let switch = [
            ("RINGPUSH_LEDGER", "on"),
            ("RINGPUSH_CLAIMS", if on { "on" } else { "off" }),
        ];
        let mut drain = drain(worker_of, channel, names, rings, fanout, ring, &switch).await?;
        drain.ledger = true;
        drain.claims = on;
        let rows = rows_of(pool, "ring_claims").await? - before;
        cost.drains.push(drain.clone());
        if on {
            cost.claim_rows_per_ring = Some(rows as f64 / rings as f64);
            cost.on.push(drain);
        } else {
            anyhow::ensure!(rows == 0, "rings were claimed with RINGPUSH_CLAIMS=off");
            cost.off.push(drain);
        }
    }
    cost.throughput_ratio = median(&cost.on) / median(&cost.off);
    cost.target_met = cost.throughput_ratio >= 0.9;
    Ok(cost)
}

async fn rows_of(pool: &deadpool_postgres::Pool, table: &str) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    Ok(client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0))
}

/// One drain: `rings` published first, then a worker started that pushes them all.
async fn drain(
    worker_of: &WorkerOf<'_>,
    channel: &lapin::Channel,
    names: &Names,
    rings: usize,
    fanout: usize,
    ring: &impl Fn(usize) -> RingEvent,
    env: &[(&str, &str)],
) -> anyhow::Result<Drain> {
    publish_all(
        (0..rings).map(|i| {
            let r = ring(i);
            async move { broker::publish_ring(channel, names, &r).await }
        }),
        500,
    )
    .await?;
    let port = free_port();
    let mut worker = worker_of.spawn_with(port, None, env)?;
    let pid = worker.id().expect("a running worker").to_string();
    let services0 = service_cpu();
    let started = Instant::now();
    let want = (rings * fanout) as f64;
    let accepted = r#"ringpush_notifications_total{outcome="accepted"}"#;
    loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Ok(body) = scrape(port).await {
            if sample(&body, accepted) >= want {
                break;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the worker did not drain the rings in 10 minutes"
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pid);
    let cores = service_cores(&services0, &service_cpu(), elapsed);
    stop(&mut worker).await;
    Ok(Drain {
        ledger: true,
        claims: true,
        rings_per_s: rings as f64 / elapsed,
        notifications_per_s: want / elapsed,
        worker_cpu_s_per_10k: cpu / want * 10_000.0,
        postgresql_cores: cores.get("postgresql").copied().unwrap_or_default(),
        rabbitmq_cores: cores.get("rabbitmq").copied().unwrap_or_default(),
    })
}
