//! The delivery ledger's cost (see [`LedgerCost`]): the same drain of pre-published rings by
//! a fresh worker process with `RINGPUSH_LEDGER=on` and `off`, in turns (on, off, off, on,
//! …: a drift of the host over the run weighs on both alike), in the same run; the ratio of
//! the medians. With the ledger off nothing is claimed either, so that ratio is the whole
//! "a phone rings once" machinery's. And the cost of recognising a gateway's re-publish alone
//! ([`claims_cost`]): the same drains with the ledger on and `RINGPUSH_CLAIMS=on` and `off`.

use std::time::{Duration, Instant};

use crate::broker::{self, Names};
use crate::wire::ring::RingEvent;

use super::measure::{
    cpu_seconds, publish_all, sample, scrape, service_cores, service_cpu, sum_samples,
};
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
        let mut drain = drain(
            worker_of, pool, channel, names, rings, fanout, ring, &switch,
        )
        .await?;
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
    median_of(d, |d| d.notifications_per_s)
}

/// The median of a figure of some drains (0 if there are none).
pub(super) fn median_of(d: &[Drain], figure: impl Fn(&Drain) -> f64) -> f64 {
    let mut v: Vec<f64> = d.iter().map(figure).collect();
    if v.is_empty() {
        return 0.0;
    }
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
        let mut drain = drain(
            worker_of, pool, channel, names, rings, fanout, ring, &switch,
        )
        .await?;
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
#[allow(clippy::too_many_arguments)]
async fn drain(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
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
    measure_drain(worker_of, pool, rings, (rings * fanout) as f64, env).await
}

/// A worker started (with `env` on top) on what the queue holds, timed until it has `want`
/// notifications accepted; `rings` is what the per-ring figures divide by. A worker whose
/// count stops moving for [`STALLED_AFTER`] fails the drain (with what it had counted),
/// instead of waiting out the 10 minutes.
pub(super) async fn measure_drain(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    rings: usize,
    want: f64,
    env: &[(&str, &str)],
) -> anyhow::Result<Drain> {
    let (drain, _) = measure_drain_scraped(worker_of, pool, rings, want, env).await?;
    Ok(drain)
}

/// [`measure_drain`], and the worker's `/metrics` page as it stood once the drain was done
/// (scraped again after the count was reached, before the worker stops: every counter of
/// the drain's last answers is in it).
pub(super) async fn measure_drain_scraped(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    rings: usize,
    want: f64,
    env: &[(&str, &str)],
) -> anyhow::Result<(Drain, String)> {
    let port = free_port();
    let mut worker = worker_of.spawn_with(port, None, env)?;
    let pid = worker.id().expect("a running worker").to_string();
    let services0 = service_cpu();
    let started = Instant::now();
    let accepted = r#"ringpush_notifications_total{outcome="accepted"}"#;
    let (mut last, mut moved) = (0.0, Instant::now());
    let body = loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Ok(body) = scrape(port).await {
            let now = sample(&body, accepted);
            if now >= want {
                break body;
            }
            if now > last {
                (last, moved) = (now, Instant::now());
            }
        }
        if moved.elapsed() > STALLED_AFTER || started.elapsed() > Duration::from_secs(600) {
            stop(&mut worker).await;
            anyhow::bail!(
                "the worker did not drain the rings: {last} of {want} notifications accepted, \
                 none for {:.0} s",
                moved.elapsed().as_secs_f64()
            );
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pid);
    let services1 = service_cpu();
    let backends = backends_cpu(pool, &WorkerOf::application_name(port)).await;
    let cores = service_cores(&services0, &services1, elapsed);
    let body = scrape(port).await.unwrap_or(body);
    stop(&mut worker).await;
    let postgresql_cores = cores.get("postgresql").copied().unwrap_or_default();
    let per_ring_ms = |cpu_s: f64| cpu_s / rings as f64 * 1000.0;
    let drain = Drain {
        ledger: true,
        claims: true,
        ends: false,
        rings_per_s: rings as f64 / elapsed,
        notifications_per_s: want / elapsed,
        worker_cpu_s_per_10k: cpu / want * 10_000.0,
        postgresql_cores,
        rabbitmq_cores: cores.get("rabbitmq").copied().unwrap_or_default(),
        postgresql_cpu_ms_per_ring: per_ring_ms(postgresql_cores * elapsed),
        worker_backends_cpu_ms_per_ring: backends.map(per_ring_ms),
        followups_per_ring: Some(
            sum_samples(&body, "ringpush_followups_total{", r#"outcome="accepted""#) / rings as f64,
        ),
    };
    Ok((drain, body))
}

/// How long a drain's accepted count may stand still before the drain fails.
const STALLED_AFTER: Duration = Duration::from_secs(30);

/// CPU seconds of the PostgreSQL backends serving connections named `application_name` (a
/// bench worker's: [`WorkerOf::application_name`]), from `/proc`; `None` if they cannot be
/// listed.
pub(super) async fn backends_cpu(
    pool: &deadpool_postgres::Pool,
    application_name: &str,
) -> Option<f64> {
    let client = pool.get().await.ok()?;
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .ok()?;
    Some(
        rows.iter()
            .map(|row| cpu_seconds(&row.get::<_, i32>(0).to_string()))
            .sum(),
    )
}
