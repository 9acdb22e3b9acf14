//! A fresh ring is never dead-lettered for the worker's own trouble, and every dead letter
//! says why. While the database or APNs cannot serve a ring, the worker holds the
//! deliveries it has (unacked: no nack, so no delivery of the quorum queue's limit is
//! spent), stops consuming, and probes with backoff; once they answer, the held rings are
//! delivered. What is dead-lettered — a ring whose TTL passed while held, a ring whose
//! gateway's own rows make the lookup fail — carries `x-ringpush-error`; nothing reaches
//! the dead queue with only the broker's `x-death`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use ringpush::token::{random_hex, DeviceToken};
use ringpush::wire::ring::RingEvent;
use ringpush::worker::Counters;
use time::OffsetDateTime;

use crate::proxy::Mode;
use crate::support::{gateway, App, TestDb, TOPIC};

/// Publishes `n` fresh rings at once (confirmed).
async fn burst(app: &App, gateway: &str, n: usize) -> Vec<RingEvent> {
    let rings: Vec<RingEvent> = (0..n).map(|_| App::ring(gateway, Duration::ZERO)).collect();
    join_all(rings.iter().map(|r| app.publish(r))).await;
    rings
}

/// Publishes `n` fresh rings, one every `every`, calling `each` after each publish with the
/// ring's index.
async fn paced(
    app: &App,
    gateway: &str,
    n: usize,
    every: Duration,
    mut each: impl FnMut(usize),
) -> Vec<RingEvent> {
    let mut ticks = tokio::time::interval(every);
    let mut rings = Vec::with_capacity(n);
    for i in 0..n {
        ticks.tick().await;
        let ring = App::ring(gateway, Duration::ZERO);
        app.publish(&ring).await;
        rings.push(ring);
        each(i);
    }
    rings
}

/// One message of the rings' dead queue.
#[derive(Debug)]
struct Dead {
    /// The ring's `event_id`, when the body is a ring event.
    event_id: Option<String>,
    /// `x-ringpush-error`: why the worker dead-lettered it. `None`: the broker did (the
    /// delivery limit), which the worker must never leave it to.
    reason: Option<String>,
    /// The broker's `x-death` header is present.
    x_death: bool,
    /// The quorum queue's `x-delivery-count` when the worker took it: deliveries spent.
    delivery_count: Option<i64>,
}

/// Takes every message now in the rings' dead queue.
async fn take_dead(app: &App) -> Vec<Dead> {
    let mut out = Vec::new();
    while let Some(msg) = app
        .channel
        .basic_get(
            app.names.dead.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let headers = msg.properties.headers().as_ref().map(|h| h.inner().clone());
        let header = |name: &str| headers.as_ref().and_then(|h| h.get(name).cloned());
        let delivery_count = header("x-delivery-count").and_then(|v| match v {
            AMQPValue::ShortShortInt(n) => Some(n.into()),
            AMQPValue::ShortShortUInt(n) => Some(n.into()),
            AMQPValue::ShortInt(n) => Some(n.into()),
            AMQPValue::ShortUInt(n) => Some(n.into()),
            AMQPValue::LongInt(n) => Some(n.into()),
            AMQPValue::LongUInt(n) => Some(n.into()),
            AMQPValue::LongLongInt(n) => Some(n),
            _ => None,
        });
        out.push(Dead {
            event_id: RingEvent::parse(&msg.data, OffsetDateTime::now_utc())
                .ok()
                .map(|r| r.event_id),
            reason: ringpush::broker::error_header(&msg.properties),
            x_death: header("x-death").is_some(),
            delivery_count,
        });
    }
    out
}

/// Collects dead letters until there are at least `n` (bounded), then a little longer, so
/// that a dead letter too many has a chance to show.
async fn dead_letters(app: &App, n: usize) -> Vec<Dead> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut dead = take_dead(app).await;
    while dead.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} dead letters; have {dead:?}; counters: {:?}",
            app.counters
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        dead.extend(take_dead(app).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    dead.extend(take_dead(app).await);
    dead
}

/// Every dead letter says why, in `x-ringpush-error`.
fn assert_every_dead_letter_says_why(dead: &[Dead]) {
    let silent: Vec<&Dead> = dead
        .iter()
        .filter(|d| d.reason.as_deref().is_none_or(|r| r.trim().is_empty()))
        .collect();
    assert!(
        silent.is_empty(),
        "{} of {} dead letters have no x-ringpush-error (dead-lettered by the broker's \
         delivery limit when x_death is true): {silent:?}",
        silent.len(),
        dead.len()
    );
}

/// Rings the worker gave back to the queue, by nack or by publishing them again: each is a
/// ring it did not hold (a nack also spends one of the quorum queue's 20 deliveries).
fn given_back(app: &App) -> u64 {
    Counters::get(&app.counters.rings_requeued) + Counters::get(&app.counters.rings_handed_back)
}

fn ids(rings: &[RingEvent]) -> HashSet<String> {
    rings.iter().map(|r| r.event_id.clone()).collect()
}

#[tokio::test]
async fn push_tokens_renamed_away_for_15_s_loses_no_ring_and_probes_back_off() {
    let app = App::spawn_with(|o| {
        o.worker.ring_ttl = Duration::from_secs(120);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
        o.worker.probe_interval = Duration::from_millis(100);
        o.worker.probe_cap = Duration::from_secs(2);
    })
    .await;
    // Four phones: two of the owner's, two of a sharee's (the lookup joins every table).
    let owner = app.add_user().await;
    app.add_gateway("gw-away", owner, "Front door").await;
    let sharee = app.add_user().await;
    app.share("gw-away", sharee).await;
    let mut tokens = Vec::new();
    for user in [owner, owner, sharee, sharee] {
        tokens.push(app.add_token(user, "production", Some(TOPIC)).await);
    }
    let every = Duration::from_millis(100);

    // Rings flow.
    let mut rings = paced(&app, "gw-away", 30, every, |_| {}).await;
    app.wait_for("the first rings delivered", || {
        app.unaccepted(&rings, &tokens) == 0
    })
    .await;

    // A migration renames the table the lookup needs, for 15 s; rings keep coming, and one
    // malformed message (the one dead letter expected).
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute("ALTER TABLE push_tokens RENAME TO push_tokens_away")
        .await
        .unwrap();
    let renamed = Instant::now();
    let (probes_before, pauses_before) = (
        Counters::get(&app.counters.probes_failed),
        Counters::get(&app.counters.pauses),
    );
    app.publish_raw(br#"{"v":1,"event_id":"malformed-on-purpose"}"#)
        .await;
    let mut paused_seen = false;
    let during = paced(&app, "gw-away", 150, every, |_| {
        paused_seen |= app
            .counters
            .paused_database
            .load(std::sync::atomic::Ordering::Relaxed);
    })
    .await;
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(renamed.elapsed())).await;
    let probes_failed = Counters::get(&app.counters.probes_failed) - probes_before;
    let pauses = Counters::get(&app.counters.pauses) - pauses_before;
    let delivered_during = during.len() * tokens.len() - app.unaccepted(&during, &tokens);
    client
        .batch_execute("ALTER TABLE push_tokens_away RENAME TO push_tokens")
        .await
        .unwrap();
    let outage = renamed.elapsed();
    rings.extend(during);

    rings.extend(paced(&app, "gw-away", 20, every, |_| {}).await);
    app.wait_for("every (ring, token) accepted", || {
        app.unaccepted(&rings, &tokens) == 0
    })
    .await;
    let dead = dead_letters(&app, 1).await;
    eprintln!(
        "outage {outage:?}: {probes_failed} failed probes, {pauses} pauses, \
         {delivered_during} pairs delivered during it; dead: {dead:?}; counters: {:?}",
        app.counters
    );
    assert_every_dead_letter_says_why(&dead);
    assert_eq!(
        dead.len(),
        1,
        "only the malformed message is dead-lettered: {dead:?}"
    );
    assert_eq!(
        dead[0].event_id, None,
        "the dead letter is the malformed one"
    );
    assert!(paused_seen, "consumption paused for the database");
    assert_eq!(
        delivered_during, 0,
        "no ring published during the outage was delivered during it"
    );
    // Backing off to 2 s (jittered 1-3 s): about one probe per 2 s of outage, the first few
    // sooner; a longer outage on a slow machine allows proportionally more.
    let most = 5 + outage.as_secs();
    assert!(
        (2..=most).contains(&probes_failed),
        "{probes_failed} failed probes in a {outage:?} outage: at least 2 (probing), at most \
         {most} (backing off to 2 s; a probe every pause cycle would be far more)"
    );
    assert!(
        pauses <= 3,
        "{pauses} pauses in the outage: consumption must stay paused, not flap"
    );
    assert_eq!(
        given_back(&app),
        0,
        "no ring given back while the lookup failed: held (nacked or published again: {:?}, {:?})",
        app.counters.rings_requeued,
        app.counters.rings_handed_back
    );
    app.ledger(&rings, &tokens);
    app.stop_with_nothing_unacked().await;
}

/// Migrates a staging schema of its own, seeds a gateway there (owner with two phones, a
/// sharee with one), then moves every table into the test's schema in one transaction, so
/// the worker sees no tables, then migrated and seeded ones — never migrated and empty.
async fn migrate_and_seed_at_once(app: &App, gateway: &str) -> Vec<DeviceToken> {
    let stage = TestDb::new().await;
    ringpush::db::migrate(&stage.url).await.expect("migrate");
    let mut tokens = Vec::new();
    {
        let pool = ringpush::db::pool(&stage.url, 1, Duration::from_secs(5)).unwrap();
        let client = pool.get().await.unwrap();
        let mut users = Vec::new();
        for _ in 0..2 {
            let row = client
                .query_one("INSERT INTO users DEFAULT VALUES RETURNING id", &[])
                .await
                .unwrap();
            users.push(row.get::<_, i64>(0));
        }
        client
            .execute(
                "INSERT INTO gateways (id, owner_id, name) VALUES ($1, $2, 'Front door')",
                &[&gateway, &users[0]],
            )
            .await
            .unwrap();
        client
            .execute(
                "INSERT INTO gateway_shares (gateway_id, user_id) VALUES ($1, $2)",
                &[&gateway, &users[1]],
            )
            .await
            .unwrap();
        for user in [users[0], users[0], users[1]] {
            let token = DeviceToken::parse(&random_hex(32)).unwrap();
            client
                .execute(
                    "INSERT INTO push_tokens (token, user_id, environment, topic) \
                     VALUES ($1, $2, 'production', $3)",
                    &[&token.as_hex(), &user, &TOPIC],
                )
                .await
                .unwrap();
            tokens.push(token);
        }
    }
    let client = app.pool.get().await.unwrap();
    let schema: String = client
        .query_one("SELECT current_schema()", &[])
        .await
        .unwrap()
        .get(0);
    let moves: String = [
        "refinery_schema_history",
        "users",
        "gateways",
        "gateway_shares",
        "push_tokens",
        "ring_ledger",
        "ring_claims",
        "rings",
    ]
    .iter()
    .map(|t| {
        format!(
            "ALTER TABLE \"{}\".{t} SET SCHEMA \"{schema}\";",
            stage.schema
        )
    })
    .chain([
        format!(
            "ALTER VIEW \"{}\".ring_history SET SCHEMA \"{schema}\";",
            stage.schema
        ),
        format!(
            "ALTER FUNCTION \"{}\".ringpush_end_ring(text, text, text, text, bigint, timestamptz) SET SCHEMA \"{schema}\";",
            stage.schema
        ),
    ])
    .collect();
    client
        .batch_execute(&format!("BEGIN; {moves} COMMIT;"))
        .await
        .unwrap();
    tokens
}

#[tokio::test]
async fn a_worker_started_before_migrate_waits_and_delivers_every_ring_after_it() {
    let mut app = App::spawn_with(|o| {
        o.migrate = false;
        o.run_worker = false;
        o.run_purger = false;
        o.metrics = true;
        o.worker.ring_ttl = Duration::from_secs(120);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
    })
    .await;
    app.start_worker();
    let started = Instant::now();
    let mut rings = burst(&app, "gw-early", 10).await;
    app.wait_for("the worker to pause for the database", || {
        app.counters
            .paused_database
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let (status, body) = app.scrape("/readyz").await;
    assert_eq!(status, 503, "not ready before the schema exists: {body}");
    rings.extend(paced(&app, "gw-early", 10, Duration::from_secs(2), |_| {}).await);
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;

    // 20 s on: still paused, not ready, probing, and every ring waits in the queue.
    let (status, body) = app.scrape("/readyz").await;
    let dead = take_dead(&app).await;
    eprintln!(
        "before migrate: readyz {status} {body:?}; dead {dead:?}; counters {:?}",
        app.counters
    );
    assert_every_dead_letter_says_why(&dead);
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    assert_eq!(status, 503, "still not ready: {body}");
    assert!(
        app.counters
            .paused_database
            .load(std::sync::atomic::Ordering::Relaxed),
        "still paused for the database"
    );
    assert!(
        Counters::get(&app.counters.probes_failed) >= 2,
        "the worker probes the database"
    );
    assert_eq!(
        app.depth(&app.names.rings).await as usize,
        rings.len(),
        "every ring waits in the queue (the worker does not consume while paused)"
    );

    // The deploy's migration, and the phones, arrive at once (see migrate_and_seed_at_once:
    // a worker that saw the tables before the rows would ack the rings as unknown gateway).
    let tokens = migrate_and_seed_at_once(&app, "gw-early").await;
    assert_eq!(
        ringpush::db::migrate(&app.db_url).await.expect("migrate"),
        Vec::<String>::new(),
        "the test's schema is migrated"
    );
    rings.extend(burst(&app, "gw-early", 5).await);
    app.wait_for("every (ring, token) accepted", || {
        app.unaccepted(&rings, &tokens) == 0
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = app.scrape("/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ready once the schema exists: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = take_dead(&app).await;
    assert_every_dead_letter_says_why(&dead);
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    assert_eq!(Counters::get(&app.counters.rings_unknown_gateway), 0);
    assert_eq!(given_back(&app), 0, "no ring given back");
    app.ledger(&rings, &tokens);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_ring_whose_lookup_fails_with_a_data_error_alone_is_dead_lettered_with_the_database_message(
) {
    let mut app = App::spawn_with(|o| o.run_worker = false).await;
    let bad_tokens = gateway(&app, "gw-bad", 2).await;
    let good_1 = gateway(&app, "gw-good-1", 2).await;
    let good_2 = gateway(&app, "gw-good-2", 3).await;
    // gw-bad's row cannot be read: its name divides by zero (22012), evaluated only when
    // the row is selected, and never folded into a constant by the planner.
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute(
            "BEGIN;
             ALTER TABLE gateways RENAME TO gateways_real;
             CREATE VIEW gateways AS
               SELECT id, owner_id,
                      CASE WHEN id = 'gw-bad'
                           THEN (length(id) / (length(id) - length(id)))::text
                           ELSE name END AS name,
                      created_at
               FROM gateways_real;
             COMMIT;",
        )
        .await
        .unwrap();
    let e = client
        .query("SELECT name FROM gateways WHERE id = 'gw-bad'", &[])
        .await
        .expect_err("gw-bad's row fails to read");
    assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e}");

    // One burst, published before the worker starts, so the gateways share a lookup.
    let (mut bad, mut ok_1, mut ok_2) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        bad.push(App::ring("gw-bad", Duration::ZERO));
        ok_1.push(App::ring("gw-good-1", Duration::ZERO));
        ok_2.push(App::ring("gw-good-2", Duration::ZERO));
    }
    for ((b, o1), o2) in bad.iter().zip(&ok_1).zip(&ok_2) {
        app.publish(o1).await;
        app.publish(b).await;
        app.publish(o2).await;
    }
    app.start_worker();

    app.wait_for("every valid (ring, token) accepted", || {
        app.unaccepted(&ok_1, &good_1) + app.unaccepted(&ok_2, &good_2) == 0
    })
    .await;
    let dead = dead_letters(&app, bad.len()).await;
    eprintln!("dead: {dead:?}; counters: {:?}", app.counters);
    assert_every_dead_letter_says_why(&dead);
    let dead_ids: HashSet<String> = dead.iter().filter_map(|d| d.event_id.clone()).collect();
    assert_eq!(
        dead.len(),
        bad.len(),
        "only gw-bad's rings are dead: {dead:?}"
    );
    assert_eq!(dead_ids, ids(&bad), "exactly gw-bad's rings are dead");
    for d in &dead {
        let reason = d.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("division by zero") && reason.contains("22012"),
            "the dead letter carries the database's message and SQLSTATE: {reason:?}"
        );
    }
    assert_eq!(
        app.unaccepted(&bad, &bad_tokens),
        bad.len() * bad_tokens.len(),
        "gw-bad's rings were not pushed"
    );
    assert_eq!(given_back(&app), 0, "no ring given back");
    app.ledger(&ok_1, &good_1);
    app.ledger(&ok_2, &good_2);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn apns_refusing_connections_longer_than_20_pause_cycles_spends_no_delivery_budget() {
    let ttl = Duration::from_secs(20);
    let mut app = App::spawn_with(|o| {
        o.apns_proxy = true;
        o.run_worker = false;
        o.worker.ring_ttl = ttl;
        // The client's own reconnect backoff, short, so that APNs's return is seen soon.
        o.apns.backoff_min = Duration::from_millis(100);
        o.apns.backoff_max = Duration::from_secs(2);
    })
    .await;
    let tokens = gateway(&app, "gw-refused", 2).await;
    app.apns_proxy.as_ref().unwrap().set(Mode::Refuse);

    // Batch A waits in the queue before the worker starts, so the worker takes all of it
    // (fewer than its prefetch) at once and holds it.
    let batch_a = burst(&app, "gw-refused", 12).await;
    let published_a = Instant::now();
    app.start_worker();
    app.wait_for("the worker to pause for APNs", || {
        app.counters
            .paused_provider
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;

    // Past A's TTL, still refused: A is dead-lettered as expired while held.
    tokio::time::sleep((ttl + Duration::from_secs(5)).saturating_sub(published_a.elapsed())).await;
    let mut dead = Vec::new();
    // Bounded generously: the proxy keeps refusing, so waiting longer cannot let a ring
    // through, only give a slow machine time to expire the held ones.
    let deadline = published_a + ttl + Duration::from_secs(60);
    while dead.len() < batch_a.len() && Instant::now() < deadline {
        dead.extend(take_dead(&app).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead_while_refused = dead.len();
    let requeued = given_back(&app);
    assert_eq!(
        app.mock.stats().accepted,
        0,
        "nothing got through the refusal"
    );

    let batch_b = burst(&app, "gw-refused", 12).await;
    app.apns_proxy.as_ref().unwrap().set(Mode::Pass);
    app.wait_for("every (ring, token) of batch B accepted", || {
        app.unaccepted(&batch_b, &tokens) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    dead.extend(take_dead(&app).await);
    eprintln!(
        "{dead_while_refused} dead letters while refused, {requeued} rings handed back; \
         dead: {dead:?}; counters: {:?}",
        app.counters
    );
    assert_every_dead_letter_says_why(&dead);
    let dead_ids: HashSet<String> = dead.iter().filter_map(|d| d.event_id.clone()).collect();
    assert_eq!(dead.len(), batch_a.len(), "only batch A is dead: {dead:?}");
    assert_eq!(dead_ids, ids(&batch_a), "exactly batch A is dead");
    for d in &dead {
        let reason = d.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("expired"), "dead as expired: {reason:?}");
        assert!(
            !d.x_death && d.delivery_count.unwrap_or(0) == 0,
            "dead-lettered by the worker from its first delivery: {d:?}"
        );
    }
    assert_eq!(
        requeued, 0,
        "no ring given back (nacked or published again) while APNs refused: held"
    );
    assert_eq!(
        dead_while_refused,
        batch_a.len(),
        "batch A dead-lettered while held, before APNs came back"
    );
    let duplicates = app.ledger(&batch_b, &tokens);
    eprintln!("batch B: {duplicates} duplicates");
    app.stop_with_nothing_unacked().await;
}
