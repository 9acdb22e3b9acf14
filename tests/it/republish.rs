//! A gateway's re-publish is the same ring: a gateway whose publisher confirm was lost
//! publishes the ring again, and both copies are first deliveries. Whether the copies reach
//! one worker one after the other, two workers at the same moment, or the second arrives after
//! the first was settled, each phone rings once — the ring's claim and the ledger see to it.

use std::time::Duration;

use ringpush::db::RingKey;
use ringpush::wire::ring::RingEvent;
use ringpush::worker::Counters;

use crate::faults::settled;
use crate::support::{gateway, App};

/// `n` rings of `gateway`, each published twice (the copies one after the other in the
/// queue), as a gateway whose confirms were lost does.
async fn publish_twice(app: &App, gateway: &str, n: usize) -> Vec<RingEvent> {
    let rings: Vec<RingEvent> = (0..n).map(|_| App::ring(gateway, Duration::ZERO)).collect();
    for ring in &rings {
        app.publish(ring).await;
        app.publish(ring).await;
    }
    rings
}

fn already_delivered(app: &App) -> u64 {
    Counters::get(&app.counters.rings_already_delivered)
}

#[tokio::test]
async fn a_republished_ring_consumed_by_one_worker_one_copy_after_the_other_rings_each_phone_once()
{
    // One delivery at a time: the second copy comes only once the first is settled and acked.
    let app = App::spawn_with(|o| {
        o.worker.prefetch = 1;
        o.worker.batch_size = 1;
    })
    .await;
    let tokens = gateway(&app, "gw-again", 3).await;
    let rings = publish_twice(&app, "gw-again", 20).await;
    let duplicates = settled(&app, &rings, &tokens).await;
    app.wait_acked(40).await;
    assert_eq!(duplicates, 0, "a phone rang twice");
    assert_eq!(
        already_delivered(&app),
        20,
        "every second copy was acked as already delivered"
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_republished_ring_in_one_batch_rings_each_phone_once() {
    // Both copies in the same batch of one worker, at the same moment.
    let app = App::spawn_with(|o| {
        o.run_worker = false;
        o.mock.response_delay = Duration::from_millis(100);
    })
    .await;
    let tokens = gateway(&app, "gw-batch", 3).await;
    let rings = publish_twice(&app, "gw-batch", 8).await;
    let mut app = app;
    app.start_worker();
    let duplicates = settled(&app, &rings, &tokens).await;
    app.wait_acked(16).await;
    assert_eq!(duplicates, 0, "a phone rang twice");
    assert_eq!(already_delivered(&app), 8);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_republished_ring_consumed_by_two_workers_at_the_same_moment_rings_each_phone_once() {
    // Two workers, one delivery each at a time, and a slow APNs: the copies of a ring, one
    // after the other in the queue, go one to each worker and are in hand at the same moment.
    let mut app = App::spawn_with(|o| {
        o.run_worker = false;
        o.worker.prefetch = 1;
        o.worker.batch_size = 1;
        o.mock.response_delay = Duration::from_millis(300);
    })
    .await;
    let tokens = gateway(&app, "gw-twice", 3).await;
    let waited = ringpush::db::claims_waited();
    app.start_worker();
    app.start_worker();
    // Both consuming before the first ring, so the copies are shared out between them.
    app.wait_for("two sessions", || {
        Counters::get(&app.counters.broker_sessions) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rings = publish_twice(&app, "gw-twice", 12).await;
    let duplicates = settled(&app, &rings, &tokens).await;
    app.wait_acked(24).await;
    assert_eq!(duplicates, 0, "a phone rang twice");
    assert_eq!(already_delivered(&app), 12);
    assert!(
        ringpush::db::claims_waited() > waited,
        "a copy found its ring in the other worker's hands and waited for it"
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_copy_arriving_after_the_other_was_settled_rings_no_phone_again() {
    let app = App::spawn().await;
    let tokens = gateway(&app, "gw-late", 3).await;
    let rings: Vec<RingEvent> = (0..5)
        .map(|_| App::ring("gw-late", Duration::ZERO))
        .collect();
    for ring in &rings {
        app.publish(ring).await;
    }
    settled(&app, &rings, &tokens).await;
    app.wait_acked(5).await;
    let accepted = app.mock.stats().accepted;
    // A second later, the gateway's copies (their confirms were lost).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for ring in &rings {
        app.publish(ring).await;
    }
    app.wait_acked(10).await;
    assert_eq!(
        app.mock.stats().accepted,
        accepted,
        "no phone took a ring twice"
    );
    assert_eq!(app.ledger(&rings, &tokens), 0);
    assert_eq!(already_delivered(&app), 5);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_ring_claimed_by_a_worker_that_died_waits_for_its_lease_then_rings_each_phone_once() {
    let app = App::spawn().await;
    let tokens = gateway(&app, "gw-dead", 2).await;
    let ring = App::ring("gw-dead", Duration::ZERO);
    // A worker claimed the ring and died before it pushed: its lease runs 2 s more.
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO ring_claims (ring, gateway_id, event_id, holder, lease_until)
             VALUES ($1, $2, $3, 'dead', now() + interval '2 seconds')",
            &[
                &ringpush::db::claim_key(&RingKey {
                    gateway: ring.gateway_id.clone(),
                    event: ring.event_id.clone(),
                }),
                &ring.gateway_id,
                &ring.event_id,
            ],
        )
        .await
        .unwrap();
    app.publish(&ring).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        app.mock.stats().accepted,
        0,
        "the claim is not taken while it lives"
    );
    assert_eq!(Counters::get(&app.counters.rings_acked), 0);
    let duplicates = settled(&app, std::slice::from_ref(&ring), &tokens).await;
    assert_eq!(duplicates, 0);
    let holder: String = client
        .query_one(
            "SELECT holder FROM ring_claims WHERE event_id = $1",
            &[&ring.event_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(holder, "dead", "taken over once the lease lapsed");
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn ring_claims_are_swept_by_age_and_fresh_ones_kept() {
    let db = crate::support::TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 2, Duration::from_secs(5)).unwrap();
    let claims = ringpush::db::Claims::new(pool.clone());
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO ring_claims (ring, gateway_id, event_id, holder, lease_until, claimed_at)
             VALUES (1, 'gw', 'old', 'w', now(), now() - interval '10 minutes'),
                    (2, 'gw', 'fresh', 'w', now(), now())",
        )
        .await
        .unwrap();
    assert_eq!(claims.sweep(Duration::from_secs(120)).await.unwrap(), 1);
    let left: Vec<String> = client
        .query("SELECT event_id FROM ring_claims", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["fresh"]);
}
