//! The building part (see [`Building`]): ordinary rings at a quarter of the drain rate,
//! alone and beside one 3,000-token ring a second, in turns, with a worker process of its
//! own whose `ring delivered` lines time the building rings.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::token::random_hex;
use crate::wire::ring::RingEvent;

use super::live::{Beside, Counted, Live, BESIDE_PRESSED_BEFORE};
use super::measure::{peak_rss_mb, reset_peak_rss, scrape};
use super::processes::{free_port, stop, WorkerOf};
use super::report::{Building, Round};

/// The building gateway, its sharees and phones each.
const BUILDING: &str = "bench-building";
const BUILDING_SHAREES: i32 = 1_500;
const BUILDING_PHONES: i32 = 2;
/// Length of each window of the building part, and how many of each kind (A, B) it runs,
/// in turns.
const BUILDING_WINDOW_SECS: f64 = 5.0;
const BUILDING_ROUNDS: usize = 3;

/// The building part (see [`Building`]): seeds the building gateway beside the fleet,
/// starts a worker of its own, warms it up with 2 s of ordinary rings, then runs (A) and
/// (B) at `rate` ordinary rings a second.
pub(super) async fn building(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    channel: &lapin::Channel,
    rate: f64,
    ring: &impl Fn(usize) -> RingEvent,
    dir: &Path,
) -> anyhow::Result<Building> {
    let tokens = {
        let client = pool.get().await?;
        // Shares of a fleet first: each ordinary gateway lists its own owner as a sharee
        // (`UNION` drops the repeat: its rings still reach the same 4 phones). With the
        // building's 1,500 shares the only ones, the statistics say every gateway has 1,500
        // sharees and PostgreSQL's generic plan for the lookup turns into a hash join over
        // every token: 15 ms per lookup instead of 0.1 ms, for ordinary rings too (see
        // BENCHMARKS.md).
        client
            .execute(
                "INSERT INTO gateway_shares (gateway_id, user_id) SELECT id, owner_id FROM gateways",
                &[],
            )
            .await?;
        client
            .execute(
                "WITH owner AS (INSERT INTO users DEFAULT VALUES RETURNING id)
                 INSERT INTO gateways (id, owner_id, name) SELECT $1::text, id, 'Building' FROM owner",
                &[&BUILDING],
            )
            .await?;
        client
            .execute(
                "WITH u AS (INSERT INTO users SELECT FROM generate_series(1, $2::int) RETURNING id),
                      s AS (INSERT INTO gateway_shares (gateway_id, user_id)
                            SELECT $1::text, id FROM u RETURNING user_id)
                 INSERT INTO push_tokens (token, user_id, topic)
                 SELECT md5(random()::text) || md5(random()::text), s.user_id, 'com.example.doorbell'
                 FROM s, generate_series(1, $3::int)",
                &[&BUILDING, &BUILDING_SHAREES, &BUILDING_PHONES],
            )
            .await?;
        super::e2e::analyze(&client).await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM push_tokens t JOIN gateway_shares s USING (user_id)
                 WHERE s.gateway_id = $1::text",
                &[&BUILDING],
            )
            .await?;
        row.get::<_, i64>(0) as usize
    };

    let metrics_port = free_port();
    let log = dir.join("building-worker.log");
    let mut worker = worker_of.spawn(metrics_port, Some(&log))?;
    let pid = worker.id().expect("a running worker").to_string();
    let started = Instant::now();
    while scrape(metrics_port).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the building part's worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let live = Live {
        channel,
        names: worker_of.names,
        metrics_port,
        pid: &pid,
        mock: worker_of.mock,
        fanout: worker_of.args.fanout,
    };
    // Connections up, stream limits raised, pools filled: not measured.
    live.window_with(rate, 2.0, ring, None).await?;

    let mut report = Building {
        tokens,
        building_rings_per_s: 1.0,
        window_seconds: BUILDING_WINDOW_SECS,
        rounds: BUILDING_ROUNDS,
        ..Building::default()
    };
    let presses = std::sync::Mutex::new(HashMap::new());
    let building_ring = |_| {
        let now = OffsetDateTime::now_utc();
        let ring = RingEvent {
            event_id: random_hex(16),
            gateway_id: BUILDING.into(),
            pressed_at: now - BESIDE_PRESSED_BEFORE,
            switch_id: None,
        };
        presses.lock().unwrap().insert(ring.event_id.clone(), now);
        ring
    };
    // (A) and (B) in turns, pooled: the host's slow spells fall on both.
    let (mut alone, mut beside) = (Counted::default(), Counted::default());
    report.rss_peak_per_window = true;
    for _ in 0..BUILDING_ROUNDS {
        report.rss_peak_per_window &= reset_peak_rss(&pid);
        let a = live
            .window_with(rate, BUILDING_WINDOW_SECS, ring, None)
            .await?;
        let alone_peak_rss_mb = peak_rss_mb(&pid);
        report.rss_peak_per_window &= reset_peak_rss(&pid);
        let building = Beside {
            per_s: report.building_rings_per_s,
            tokens,
            ring: &building_ring,
        };
        let b = live
            .window_with(rate, BUILDING_WINDOW_SECS, ring, Some(building))
            .await?;
        report.each_round.push(Round {
            alone_p99_ms: a.window().p99_ms,
            beside_p99_ms: b.window().p99_ms,
            alone_peak_rss_mb,
            beside_peak_rss_mb: peak_rss_mb(&pid),
        });
        alone.add(a);
        beside.add(b);
    }
    stop(&mut worker).await;
    report.alone = alone.window();
    report.beside_building = beside.window();
    // The first (A) window is before any building ring; later ones keep what the
    // allocator kept.
    report.worker_peak_rss_alone_mb = report.each_round[0].alone_peak_rss_mb;
    report.worker_peak_rss_beside_mb = report
        .each_round
        .iter()
        .map(|r| r.beside_peak_rss_mb)
        .fold(0.0, f64::max);

    if let (Some(a), Some(b)) = (report.alone.p99_ms, report.beside_building.p99_ms) {
        report.p99_ratio = Some(b / a);
        report.target_met = Some(b / a <= 2.0);
    }
    let presses = presses.into_inner().unwrap();
    let mut done = delivered_at(&std::fs::read_to_string(&log)?, BUILDING)
        .into_iter()
        .filter_map(|(event, at)| {
            let pressed = presses.get(&event)?;
            Some((*pressed, (at - *pressed).as_seconds_f64() * 1000.0))
        })
        .collect::<Vec<_>>();
    done.sort_by_key(|d| d.0);
    report.building_last_accepted_ms = done.into_iter().map(|d| d.1).collect();
    Ok(report)
}

/// `(event_id, time)` of each `ring delivered` line of `gateway` in a worker's JSON log.
fn delivered_at(log: &str, gateway: &str) -> Vec<(String, OffsetDateTime)> {
    log.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = v.get("fields")?;
            if fields.get("message")?.as_str()? != "ring delivered"
                || fields.get("gateway")?.as_str()? != gateway
            {
                return None;
            }
            let at = OffsetDateTime::parse(
                v.get("timestamp")?.as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?;
            Some((fields.get("event")?.as_str()?.to_owned(), at))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn building_rings_are_timed_by_their_delivered_lines() {
        let log = concat!(
            r#"{"timestamp":"2026-11-29T07:20:24.250000Z","level":"INFO","fields":{"message":"ring delivered","gateway":"bench-building","event":"e1","tokens":3000},"target":"ringpush::worker"}"#,
            "\n",
            r#"{"timestamp":"2026-11-29T07:20:24.260000Z","level":"INFO","fields":{"message":"ring delivered","gateway":"bench-7","event":"e2","tokens":4},"target":"ringpush::worker"}"#,
            "\nnot json\n"
        );
        let got = delivered_at(log, BUILDING);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "e1");
        assert_eq!(
            got[0].1,
            time::macros::datetime!(2026-11-29 07:20:24.25 UTC)
        );
    }
}
