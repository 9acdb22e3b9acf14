//! A building's intercom: one gateway shared with thousands of people. A ring that APNs
//! fails for thousands of tokens must retry only those, without a retry message too big for
//! the broker (an oversize header once closed the worker's whole connection, every ring in
//! flight came back and phones were pushed twice), and the token lookup stays one query.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ringpush::apns::Reason;
use ringpush::mock::FailFirst;
use ringpush::token::DeviceToken;
use ringpush::wire::ring::RingEvent;
use ringpush::worker::Counters;

use crate::support::{App, TOPIC};

/// Seeds `gateway`, owned by a new user with `owner_phones` phones and shared with
/// `sharees` new users with `phones` phones each, in one set-based statement (thousands of
/// round trips would take longer than the test); returns every token. Tokens are 64
/// lower-case hex digits, unique by construction: the user id, the phone's number, then
/// random digits.
async fn building(
    app: &App,
    gateway: &str,
    owner_phones: i32,
    sharees: i32,
    phones: i32,
) -> Vec<DeviceToken> {
    const SEED: &str = "
WITH owner AS (INSERT INTO users DEFAULT VALUES RETURNING id),
gateway AS (INSERT INTO gateways (id, owner_id, name) SELECT $1, id, 'Building' FROM owner),
sharees AS (
    INSERT INTO users (created_at) SELECT now() FROM generate_series(1, $2::int) RETURNING id
),
shares AS (INSERT INTO gateway_shares (gateway_id, user_id) SELECT $1, id FROM sharees),
everyone AS (
    SELECT id, $3::int AS phones FROM owner UNION ALL SELECT id, $4::int FROM sharees
)
INSERT INTO push_tokens (token, user_id, environment, topic)
SELECT lpad(to_hex(e.id), 16, '0') || lpad(to_hex(k), 4, '0')
       || substr(md5(random()::text) || md5(random()::text), 1, 44),
       e.id, 'production', $5::text
FROM everyone e, generate_series(1, e.phones) k
RETURNING token";
    let client = app.pool.get().await.unwrap();
    let rows = client
        .query(SEED, &[&gateway, &sharees, &owner_phones, &phones, &TOPIC])
        .await
        .unwrap();
    let tokens: Vec<DeviceToken> = rows
        .iter()
        .map(|row| DeviceToken::parse(row.get::<_, &str>(0)).unwrap())
        .collect();
    let expected = owner_phones + sharees * phones;
    assert_eq!(tokens.len(), usize::try_from(expected).unwrap());
    tokens
}

/// Waits (bounded, generously: thousands of requests on a small, busy machine) until
/// `done` holds; fails with `what` and the worker's counters otherwise.
async fn wait_long(app: &App, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; mock {:?}; counters: {:?}",
            app.mock.stats(),
            app.counters
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages waiting in the rings queue and every retry tier.
async fn waiting(app: &App) -> u32 {
    let mut waiting = app.depth(&app.names.rings).await;
    for tier in &app.names.retry {
        waiting += app.depth(tier).await;
    }
    waiting
}

/// The end of a building test: every (ring, token) pair accepted exactly once, nothing
/// waiting in the rings queue or a retry tier, nothing dead, and the worker's first broker
/// connection never lost.
async fn every_phone_once(app: &App, rings: &[RingEvent], tokens: &[DeviceToken]) {
    let pairs = u64::try_from(rings.len() * tokens.len()).unwrap();
    wait_long(app, "every (ring, token) accepted", || {
        app.mock.stats().accepted >= pairs
    })
    .await;
    // The last acks (and any retry message still on its way) follow the last answers: let
    // the tiers drain — up to their longest delay, twice over — before judging.
    let deadline = Instant::now() + Duration::from_secs(40);
    while waiting(app).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A moment more for a duplicate to show, if one were coming.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let duplicates = app.ledger(rings, tokens);
    assert_eq!(
        duplicates,
        0,
        "a phone was pushed the same ring twice ({} broker sessions)",
        Counters::get(&app.counters.broker_sessions)
    );
    assert_eq!(
        app.mock.stats().accepted,
        pairs,
        "APNs accepted each (ring, token) pair once and nothing else"
    );
    crate::support::nothing_waiting_or_dead(app).await;
    assert_eq!(
        Counters::get(&app.counters.broker_sessions),
        1,
        "the worker's broker connection was never closed"
    );
}

/// APNs answers 503 ServiceUnavailable to its first `count` requests, then recovers.
fn failing_first(app: &App, count: u64) {
    app.mock.fail_first(Some(FailFirst {
        count,
        status: 503,
        reason: Reason::ServiceUnavailable,
    }));
}

/// Checks the fault happened as scripted: exactly `count` requests failed, all 503.
fn failed_exactly(app: &App, count: u64) {
    assert_eq!(app.mock.fail_first_left(), 0, "the fault was spent");
    let rejected = app.mock.stats().rejected;
    assert_eq!(
        rejected.into_iter().collect::<Vec<_>>(),
        [("ServiceUnavailable".to_owned(), count)],
        "the only failures were the scripted ones"
    );
}

#[tokio::test]
async fn a_building_ring_reaches_3000_phones_once_each_while_apns_fails_its_first_2500_requests() {
    let app = App::spawn_with(|o| {
        o.worker.ring_ttl = Duration::from_secs(600);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
        o.worker.max_attempts = 10;
    })
    .await;
    // The owner's 2 phones and 1,500 sharees' 2 each.
    let tokens = building(&app, "gw-building", 2, 1500, 2).await;
    failing_first(&app, 2500);
    // Two rings: 6,004 pairs, 8,504 requests, well within the mock's 100,000 kept.
    let rings = vec![
        App::ring("gw-building", Duration::ZERO),
        App::ring("gw-building", Duration::ZERO),
    ];
    for ring in &rings {
        app.publish(ring).await;
    }
    every_phone_once(&app, &rings, &tokens).await;
    failed_exactly(&app, 2500);
    assert!(
        Counters::get(&app.counters.rings_retried) >= 1,
        "the failed tokens went through a retry tier"
    );
    eprintln!(
        "consumed {} deliveries, {} retried",
        Counters::get(&app.counters.rings_consumed),
        Counters::get(&app.counters.rings_retried)
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_building_ring_split_over_several_retry_messages_reaches_every_phone_once() {
    let app = App::spawn_with(|o| {
        o.worker.ring_ttl = Duration::from_secs(600);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
        o.worker.max_attempts = 10;
        // 2,500 pending tokens need far more than 4 KiB: many retry messages.
        o.worker.retry_max_bytes = 4096;
    })
    .await;
    let tokens = building(&app, "gw-split", 2, 1500, 2).await;
    failing_first(&app, 2500);
    let ring = App::ring("gw-split", Duration::ZERO);
    app.publish(&ring).await;
    every_phone_once(&app, std::slice::from_ref(&ring), &tokens).await;
    failed_exactly(&app, 2500);
    // The ring itself, then its retry messages: at least two of them.
    let consumed = Counters::get(&app.counters.rings_consumed);
    assert!(
        consumed >= 3,
        "the pending tokens came back in several retry messages ({consumed} deliveries)"
    );
    eprintln!(
        "consumed {consumed} deliveries, {} retried",
        Counters::get(&app.counters.rings_retried)
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_lookup_of_a_gateway_shared_with_20000_users_is_timed() {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    let tokens = building(&app, "gw-stadium", 0, 20_000, 1).await;
    let started = Instant::now();
    let found = ringpush::db::lookup(&app.pool, &["gw-stadium"])
        .await
        .expect("the lookup answers");
    let took = started.elapsed();
    // A second lookup, with the statement prepared and the pages cached.
    let started = Instant::now();
    let again = ringpush::db::lookup(&app.pool, &["gw-stadium"])
        .await
        .expect("the lookup answers again");
    let took_again = started.elapsed();
    eprintln!(
        "lookup of a gateway shared with 20,000 users: {took:?} (first), {took_again:?} (again)"
    );
    let gateway = &found["gw-stadium"];
    assert_eq!(gateway.name, "Building");
    assert_eq!(gateway.recipients.len(), 20_000);
    let expected: HashSet<&str> = tokens.iter().map(DeviceToken::as_hex).collect();
    let got: HashSet<&str> = gateway
        .recipients
        .iter()
        .map(|r| r.token.as_hex())
        .collect();
    assert_eq!(got, expected, "every sharee's token, each once");
    assert_eq!(again["gw-stadium"].recipients.len(), 20_000);
    app.stop().await;
}

/// The one retry that could never fit: a gateway that sent its ring with headers filling the
/// frame (the broker took them; a copy with ringpush's own properties added would not fit).
/// The worker does not send it — RabbitMQ would close its whole connection — but
/// dead-letters the ring with the reason, without those headers, and the rings around it
/// are delivered.
#[tokio::test]
async fn a_ring_whose_retry_could_never_fit_a_frame_is_dead_lettered_with_the_reason() {
    let app = App::spawn_with(|o| {
        o.worker.ring_ttl = Duration::from_secs(600);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-heavy", owner, "Door").await;
    let heavy_phone = app.add_token(owner, "production", Some(TOPIC)).await;
    let other = app.add_user().await;
    app.add_gateway("gw-light", other, "Door").await;
    let light_phone = app.add_token(other, "production", Some(TOPIC)).await;
    // APNs fails the heavy ring's phone, so that ring needs a retry.
    app.mock.script(
        &heavy_phone,
        ringpush::mock::Script {
            status: 503,
            reason: Reason::ServiceUnavailable,
            timestamp_ms: None,
        },
    );
    let heavy = App::ring("gw-heavy", Duration::ZERO);
    // Headers as large as a content header frame allows the gateway (131,072 bytes, less
    // the frame's own 20 and room for the other properties).
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-gateway-diagnostics".into(),
        lapin::types::AMQPValue::LongString("d".repeat(130_900).into()),
    );
    let properties = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    assert!(ringpush::broker::check_fits(131_072, b"", &properties).is_ok());
    ringpush::broker::publish_confirmed(
        &app.channel,
        &app.names.rings,
        &ringpush::broker::Names::ring_key("gw-heavy"),
        &heavy.to_json(),
        properties,
    )
    .await
    .expect("the broker takes the gateway's ring");
    let light = App::ring("gw-light", Duration::ZERO);
    app.publish(&light).await;

    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while dead.is_empty() {
        let c = &app.counters;
        assert!(
            Instant::now() < deadline,
            "the heavy ring was never settled: retried {} dead {} handed back {} requeued {} sessions {} consumed {}",
            Counters::get(&c.rings_retried),
            Counters::get(&c.rings_dead_lettered),
            Counters::get(&c.rings_handed_back),
            Counters::get(&c.rings_requeued),
            Counters::get(&c.broker_sessions),
            Counters::get(&c.rings_consumed),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        dead = app.drain_dead().await;
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = &dead[0].1;
    assert!(reason.starts_with("cannot be retried"), "{reason}");
    assert!(reason.contains("frame_max"), "{reason}");
    assert!(
        reason.contains("headers were too large to keep"),
        "{reason}"
    );
    let (light, light_phone) = ([light], [light_phone]);
    app.wait_for("the ring beside it to ring", || {
        app.unaccepted(&light, &light_phone) == 0
    })
    .await;
    assert_eq!(
        Counters::get(&app.counters.broker_sessions),
        1,
        "the worker's broker connection never closed"
    );
    app.stop().await;
}
