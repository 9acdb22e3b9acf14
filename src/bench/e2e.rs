//! End to end: rings pre-published, one `ringpush worker` process drains them (rate, CPU,
//! RSS, backlog latency), then live windows at half and a quarter of the drain rate and an
//! optional soak; and the broker's ceiling, a bare consume-and-ack loop over the same
//! messages.

use std::time::{Duration, Instant};

use futures_util::stream::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use time::OffsetDateTime;

use super::Settings;
use crate::broker::{self, Names};
use crate::local::Local;
use crate::token::random_hex;
use crate::wire::ring::RingEvent;

use super::apps::apps_cost;
use super::building::building;
use super::ledger::{backends_cpu, claims_cost, ledger_cost};
use super::life::life_cost;
use super::live::Live;
use super::measure::{
    buckets, cpu_seconds, current_rss_mb, machine_busy_seconds, p50_p99, paced, peak_rss_mb,
    publish_all, quantiles_ms, sample, scrape, service_cores, service_cpu,
};
use super::processes::{free_port, signer, stop, FcmMockProcess, MockProcess, WorkerOf};
use super::report::Report;
use super::{broker_queue, ring_now, Part};

pub(super) async fn end_to_end(
    args: &Settings,
    local: &Local,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (names, dir) = (&local.names, local.dir.as_path());
    // The database: gateways of F phones each.
    local.create_migrated_schema().await?;
    let db_url = local.db_url();
    let pool = local.pool(2, Duration::from_secs(5))?;
    // A fleet, not a handful: with a few hundred gateways (and no statistics) the generic
    // plan of the prepared lookup scans whole tables instead of using the indexes, and the
    // bench would measure a toy database (see BENCHMARKS.md).
    let gateways = 10_000;
    {
        let client = pool.get().await?;
        client
            .execute(
                "WITH u AS (INSERT INTO users (name) SELECT 'Resident ' || g FROM generate_series(1, $1::int) g RETURNING id)
                 INSERT INTO gateways (id, owner_id, name) SELECT 'bench-' || id, id, 'Door ' || id FROM u",
                &[&gateways],
            )
            .await?;
        // The first `android_share` percent of each gateway's phones are Android.
        client
            .execute(
                "INSERT INTO push_tokens (token, user_id, topic, platform)
                 SELECT CASE WHEN android THEN 'b' || u.id || '-' || g || ':APA91b' || md5(random()::text)
                             ELSE md5(random()::text) || md5(random()::text) END,
                        u.id,
                        CASE WHEN android THEN NULL ELSE 'com.example.doorbell' END,
                        CASE WHEN android THEN 'fcm' ELSE 'apns' END
                 FROM users u, generate_series(1, $1::int) g,
                      LATERAL (SELECT (g - 1) * 100 / $1::int < $2::int AS android) a",
                &[&(args.fanout as i32), &(args.android_share as i32)],
            )
            .await?;
        // Statistics, as a database in service has them (autovacuum would, a minute later).
        analyze(&client).await?;
    }
    let mock = MockProcess::start(dir).await?;
    let fcm = match args.android_share {
        0 => None,
        _ => Some(FcmMockProcess::start(&dir.join("e2e-fcm")).await?),
    };
    report.android_share = args.android_share;
    let (_, key_file) = signer(dir)?;
    // The rings, pre-published as gateways would.
    let connection = broker::connect(&args.amqp_url, "ringpush bench gateway").await?;
    let channel = broker::confirm_channel(&connection).await?;
    broker::declare(&channel, names).await?;
    let ring = |i: usize| RingEvent {
        event_id: random_hex(16),
        gateway_id: format!("bench-{}", 1 + i % gateways as usize),
        pressed_at: OffsetDateTime::now_utc(),
        switch_id: None,
    };
    publish_all(
        (0..args.rings).map(|i| {
            let (channel, r) = (&channel, ring(i));
            async move { broker::publish_ring(channel, names, &r).await }
        }),
        500,
    )
    .await?;

    // One worker process.
    let metrics_port = free_port();
    let worker_of = WorkerOf {
        args,
        names,
        db_url: &db_url,
        mock: &mock,
        key_file: &key_file,
        fcm: fcm.as_ref(),
    };
    let mut worker = worker_of.spawn(metrics_port, None)?;
    let pid = worker.id().expect("a running worker").to_string();
    let fcm_cpu = || fcm.as_ref().map_or(0.0, |f| f.cpu());
    let (services0, machine0, mock0, fcm0) =
        (service_cpu(), machine_busy_seconds(), mock.cpu(), fcm_cpu());
    let started = Instant::now();
    let want = (args.rings * args.fanout) as f64;
    let accepted = r#"ringpush_notifications_total{outcome="accepted"}"#;
    let body = loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Ok(body) = scrape(metrics_port).await {
            if sample(&body, accepted) >= want {
                break body;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the worker did not drain the rings in 10 minutes"
        );
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pid);
    let backends = backends_cpu(&pool, &WorkerOf::application_name(metrics_port)).await;
    report.e2e_cores = service_cores(&services0, &service_cpu(), elapsed);
    report.e2e_cores.insert("worker".into(), cpu / elapsed);
    report
        .e2e_cores
        .insert("mock".into(), (mock.cpu() - mock0) / elapsed);
    if fcm.is_some() {
        report
            .e2e_cores
            .insert("mock-fcm".into(), (fcm_cpu() - fcm0) / elapsed);
    }
    report.e2e_cores.insert(
        "machine".into(),
        (machine_busy_seconds() - machine0) / elapsed,
    );
    report.e2e_rings_per_s = args.rings as f64 / elapsed;
    report.e2e_notifications_per_s = want / elapsed;
    report.e2e_worker_cpu_s_per_10k = cpu / want * 10_000.0;
    report.e2e_worker_cores = cpu / elapsed;
    let postgresql_cpu = report.e2e_cores.get("postgresql").copied().unwrap_or(0.0) * elapsed;
    report.e2e_postgresql_cpu_ms_per_ring = postgresql_cpu / args.rings as f64 * 1000.0;
    report.e2e_worker_backends_cpu_ms_per_ring =
        backends.map(|cpu_s| cpu_s / args.rings as f64 * 1000.0);
    let full = buckets(&body, "ringpush_ring_to_accepted_seconds");
    (report.e2e_backlog_p50_ms, report.e2e_backlog_p99_ms) = quantiles_ms(&[], &full);

    // Half the rate, steady, for a few seconds: the latency a person at the door sees; then a
    // quarter, to show how much of it is the machine being busy.
    let live = Live {
        channel: &channel,
        names,
        metrics_port,
        pid: &pid,
        mock: &mock,
        fanout: args.fanout,
    };
    // Beside each window, the broker alone at a trickle through a queue of its own: how long
    // a ring waits in the broker while the machine is as busy as it is for the worker.
    let drain_rate = report.e2e_rings_per_s;
    for (share, window) in [
        (2.0, &mut report.half_rate),
        (4.0, &mut report.quarter_rate),
    ] {
        let (measured, beside) = tokio::join!(
            live.window(drain_rate / share, &ring),
            broker_beside(&connection, names, BESIDE_PROBE_PER_S, 5.0)
        );
        *window = measured?;
        (window.broker_beside_p50_ms, window.broker_beside_p99_ms) = beside?;
    }
    report.e2e_worker_peak_rss_mb = peak_rss_mb(&pid);

    if let Some(length) = args.soak {
        // Steady load at 80% of the drain rate, publishing in 100 ms slices.
        let rate = report.e2e_rings_per_s * 0.8;
        let per_slice = ((rate / 10.0) as usize).max(1);
        let started = Instant::now();
        let mut next_sample = Instant::now();
        let mut slice = tokio::time::interval(Duration::from_millis(100));
        let mut i = 0;
        while started.elapsed() < length {
            slice.tick().await;
            publish_all(
                (0..per_slice).map(|_| {
                    i += 1;
                    let (channel, r) = (&channel, ring(i));
                    async move { broker::publish_ring(channel, names, &r).await }
                }),
                200,
            )
            .await?;
            if Instant::now() >= next_sample {
                report.soak_rss_mb.push(current_rss_mb(&pid));
                next_sample += Duration::from_secs(10);
            }
        }
        report.soak_seconds = Some(started.elapsed().as_secs_f64());
        report.soak_rings_per_s = Some(rate);
        report.e2e_worker_peak_rss_mb = peak_rss_mb(&pid);
    }

    stop(&mut worker).await;

    // A ring's life: the same drain ring-only and with every ring ended, in turns.
    if args.runs(Part::Life) {
        report.life = Some(
            life_cost(
                &worker_of,
                &pool,
                &channel,
                names,
                args.rings,
                args.fanout,
                &ring,
                report.e2e_notifications_per_s,
            )
            .await?,
        );
    }

    // The delivery ledger on and off, in turns (before the building seeds its shares).
    if args.runs(Part::Ledger) {
        report.ledger = Some(
            ledger_cost(
                &worker_of,
                &pool,
                &channel,
                names,
                args.rings,
                args.fanout,
                &ring,
            )
            .await?,
        );
    }
    // Recognising a gateway's re-publish (ring claims) on and off, the ledger on.
    if args.runs(Part::Claims) {
        report.claims = Some(
            claims_cost(
                &worker_of,
                &pool,
                &channel,
                names,
                args.rings,
                args.fanout,
                &ring,
            )
            .await?,
        );
    }

    // One app against three, in turns, with mocks of its own (before the building seeds
    // its shares: both of its fleets alike without them).
    if args.runs(Part::Apps) {
        report.apps = Some(apps_cost(args, names, &db_url, &pool, &channel, dir).await?);
    }
    // Building rings beside ordinary ones, with a worker of its own (see `building`).
    if args.runs(Part::Building) {
        let quarter = report.e2e_rings_per_s / 4.0;
        report.building = Some(building(&worker_of, &pool, &channel, quarter, &ring, dir).await?);
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

pub(super) async fn broker_ceiling(
    args: &Settings,
    names: &Names,
    report: &mut Report,
) -> anyhow::Result<()> {
    let connection = broker::connect(&args.amqp_url, "ringpush bench broker").await?;
    let channel = broker::confirm_channel(&connection).await?;
    let queue = broker_queue(names);
    declare_quorum(&channel, &queue).await?;
    let body = ring_now().to_json();
    publish_all(
        (0..args.rings).map(|_| {
            broker::publish_confirmed(&channel, "", &queue, &body, BasicProperties::default())
        }),
        500,
    )
    .await?;
    let (consumer_channel, mut consumer) = consume(&connection, &queue, args.prefetch).await?;
    let started = Instant::now();
    let mut got = 0;
    while got < args.rings {
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        got += 1;
    }
    report.broker_rings_per_s = args.rings as f64 / started.elapsed().as_secs_f64();

    // The broker's own latency at the end-to-end run's half and quarter rates: publish
    // (with confirm, as gateways do) → this bare consumer, measured from the ring's
    // `pressed_at`.
    (
        report.broker_half_rate_p50_ms,
        report.broker_half_rate_p99_ms,
    ) = broker_latency(
        &channel,
        &queue,
        &mut consumer,
        report.half_rate.rings_per_s,
        5.0,
    )
    .await?;
    (
        report.broker_quarter_rate_p50_ms,
        report.broker_quarter_rate_p99_ms,
    ) = broker_latency(
        &channel,
        &queue,
        &mut consumer,
        report.quarter_rate.rings_per_s,
        5.0,
    )
    .await?;
    let _ = consumer_channel
        .basic_cancel(
            consumer.tag(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await;
    let _ = consumer_channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// Rings a second published beside a live window to measure the broker alone: few enough
/// to add little to the window's load (2–3 % of its rings at a quarter of the drain rate).
const BESIDE_PROBE_PER_S: f64 = 50.0;

/// The bench's own quorum queue (as `rings` is), declared.
async fn declare_quorum(channel: &lapin::Channel, queue: &str) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), options, arguments)
        .await?;
    Ok(())
}

/// A bare consumer of `queue` on a channel of its own.
async fn consume(
    connection: &lapin::Connection,
    queue: &str,
    prefetch: u16,
) -> anyhow::Result<(lapin::Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// The broker alone while a live window runs: `rate` rings a second for `secs` through the
/// bench's own quorum queue to a bare consumer in this process (see [`broker_latency`]).
async fn broker_beside(
    connection: &lapin::Connection,
    names: &Names,
    rate: f64,
    secs: f64,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let queue = broker_queue(names);
    let channel = broker::confirm_channel(connection).await?;
    declare_quorum(&channel, &queue).await?;
    let (consumer_channel, mut consumer) = consume(connection, &queue, 256).await?;
    let measured = broker_latency(&channel, &queue, &mut consumer, rate, secs).await;
    let _ = consumer_channel.close(200, "done".into()).await;
    let _ = channel.close(200, "done".into()).await;
    measured
}

/// Rings published at `rate` for `secs` (with confirms) through `queue` to `consumer`, which
/// acks each: p50 and p99 of `pressed_at` → delivery, ms.
async fn broker_latency(
    channel: &lapin::Channel,
    queue: &str,
    consumer: &mut lapin::Consumer,
    rate: f64,
    secs: f64,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let rate = rate.max(1.0);
    let n = (rate * secs) as usize;
    let publisher = {
        let (channel, queue) = (channel.clone(), queue.to_owned());
        tokio::spawn(async move {
            let published = paced(rate, n, move |_| {
                let body = ring_now().to_json();
                let (channel, queue) = (channel.clone(), queue.clone());
                async move {
                    let properties = BasicProperties::default();
                    broker::publish_confirmed(&channel, "", &queue, &body, properties).await
                }
            })
            .await?;
            anyhow::Ok(published.into_iter().collect::<Result<(), _>>()?)
        })
    };
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        let now = OffsetDateTime::now_utc();
        let ring = RingEvent::parse(&delivery.data, now)?;
        latencies.push((now - ring.pressed_at).as_seconds_f64() * 1000.0);
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    publisher.await??;
    Ok(p50_p99(latencies))
}

/// `ANALYZE` of every table of the bench's own schema (the first on its search path) — not
/// of the whole database, whose other schemas' tables may be locked for minutes by whatever
/// else uses the server (a database-wide `ANALYZE` queues behind any of them).
pub(super) async fn analyze(client: &deadpool_postgres::Client) -> anyhow::Result<()> {
    let tables: Option<String> = client
        .query_one(
            "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')
             FROM pg_tables WHERE schemaname = current_schema()",
            &[],
        )
        .await?
        .get(0);
    if let Some(tables) = tables {
        client.batch_execute(&format!("ANALYZE {tables}")).await?;
    }
    Ok(())
}
