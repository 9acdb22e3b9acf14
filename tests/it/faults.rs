//! No ring is lost: faults injected for real (connections cut, APNs failing, the broker
//! closing the worker's connection, PostgreSQL unreachable, SIGTERM mid-burst), each test
//! ending with a ledger check of every (ring, token) pair at the mock.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use ringpush::apns::Reason;
use ringpush::mock::{ErrorRate, Faults, Script};
use ringpush::token::DeviceToken;
use ringpush::wire::ring::RingEvent;
use ringpush::worker::Counters;

use crate::proxy::Mode;
use crate::support::{gateway, App};

pub(crate) async fn publish_all(app: &App, gateway: &str, n: usize) -> Vec<RingEvent> {
    let rings: Vec<RingEvent> = (0..n).map(|_| App::ring(gateway, Duration::ZERO)).collect();
    for chunk in rings.chunks(100) {
        join_all(chunk.iter().map(|r| app.publish(r))).await;
    }
    rings
}

/// The end of every fault test: nothing waiting, nothing dead, every pair accepted.
pub(crate) async fn settled(app: &App, rings: &[RingEvent], tokens: &[DeviceToken]) -> usize {
    app.wait_for("every (ring, token) accepted", || {
        app.unaccepted(rings, tokens) == 0
    })
    .await;
    // The last acks follow the last answers. A ring whose 200s were lost to a cut may still
    // wait in a retry tier although APNs has every pair (it comes back as duplicates only):
    // give the tiers up to their longest delay, twice over, to drain before judging.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let mut waiting = app.depth(&app.names.rings).await;
        for tier in &app.names.retry {
            waiting += app.depth(tier).await;
        }
        if waiting == 0 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let duplicates = app.ledger(rings, tokens);
    crate::support::nothing_waiting_or_dead(app).await;
    duplicates
}

/// While a fault lasts: the worker pauses consumption; the rings it holds stay unacked in its
/// hands (no hand-back spends their delivery budget) and the others wait in the queue. Waits
/// (bounded) for the pause and at least until `until`, so that what the caller asserts next
/// (nothing delivered, no retry spent) has had that long to go wrong; a slow machine only
/// makes the wait longer.
async fn paused_with_rings_waiting(app: &App, until: Instant) {
    app.wait_for("consumption to pause", || {
        Counters::get(&app.counters.pauses) >= 1
    })
    .await;
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    assert!(app.counters.ready().is_err(), "still paused");
    assert_eq!(
        Counters::get(&app.counters.rings_requeued)
            + Counters::get(&app.counters.rings_handed_back),
        0,
        "nothing handed back while paused"
    );
    assert!(app.drain_dead().await.is_empty(), "nothing dead-lettered");
}

#[tokio::test]
async fn apns_connections_cut_mid_batch_again_and_again_lose_no_ring() {
    let app = App::spawn_with(|o| {
        o.apns_proxy = true;
        o.worker.prefetch = 200;
        o.worker.batch_size = 50;
        // A slow, busy machine must not turn cuts into dead letters: plenty of attempts and
        // of time (a ring cut again and again waits out several retry tiers).
        o.worker.max_attempts = 10;
        o.worker.ring_ttl = Duration::from_secs(600);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
    })
    .await;
    let tokens = gateway(&app, "gw-cut", 4).await;
    let proxy = app.apns_proxy.as_ref().unwrap();
    let rings = publish_all(&app, "gw-cut", 2000).await;
    // Cut every connection to APNs every 250 ms while the rings flow (at most 12 times).
    let mut cuts = 0;
    while Counters::get(&app.counters.rings_delivered) < 2000 && cuts < 12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        proxy.cut();
        cuts += 1;
    }
    assert!(
        cuts >= 3,
        "the connections were cut while rings flowed ({cuts} cuts)"
    );
    let duplicates = settled(&app, &rings, &tokens).await;
    eprintln!(
        "{cuts} cuts, {duplicates} duplicates, {} retries",
        Counters::get(&app.counters.rings_retried)
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn apns_answering_503_for_5_s_then_recovering_delivers_every_ring() {
    let app = App::spawn_with(|o| {
        o.worker.max_attempts = 5;
        o.worker.ring_ttl = Duration::from_secs(600);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
    })
    .await;
    let tokens = gateway(&app, "gw-503", 2).await;
    let failing = Faults {
        error_rate: Some(ErrorRate {
            per_mille: 1000,
            status: 503,
            reason: Reason::ServiceUnavailable,
        }),
        ..Faults::default()
    };
    app.mock.set_faults(failing);
    let rings = publish_all(&app, "gw-503", 20).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        Counters::get(&app.counters.rings_delivered),
        0,
        "nothing got through while APNs failed"
    );
    app.mock.set_faults(Faults::default());
    settled(&app, &rings, &tokens).await;
    // No ring used more attempts than allowed: at most 5 requests per (ring, token).
    let mut per_pair = std::collections::HashMap::new();
    for r in app.mock.received() {
        let event = r.collapse_id().unwrap();
        *per_pair.entry((event, r.token.unwrap())).or_insert(0) += 1;
    }
    assert!(
        per_pair.values().all(|n| *n <= 5),
        "{:?}",
        per_pair.values().max()
    );
    assert_eq!(Counters::get(&app.counters.rings_dead_lettered), 0);
    app.stop_with_nothing_unacked().await;
}

/// Has the broker close the in-process worker's connection (`rabbitmqctl close_connection`).
fn close_worker_connection(app: &App) {
    let name = format!("ringpush worker {}", app.names.prefix);
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let line = listing
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("{name} not in {listing}"));
    let pid = line.split_whitespace().next().unwrap();
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", pid, "the test closes it"])
        .status()
        .unwrap();
    assert!(closed.success());
}

#[tokio::test]
async fn the_worker_reconnects_after_the_broker_closes_its_connection() {
    let app = App::spawn().await;
    let tokens = gateway(&app, "gw-broker", 2).await;
    let mut rings = publish_all(&app, "gw-broker", 100).await;
    app.wait_for("the first rings", || {
        Counters::get(&app.counters.rings_delivered) >= 100
    })
    .await;

    close_worker_connection(&app);

    rings.extend(publish_all(&app, "gw-broker", 100).await);
    settled(&app, &rings, &tokens).await;
    assert!(
        Counters::get(&app.counters.broker_sessions) >= 2,
        "the worker reconnected"
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn postgresql_unreachable_for_5_s_loses_nothing_and_dead_letters_nothing() {
    let app = App::spawn_with(|o| o.db_proxy = true).await;
    let tokens = gateway(&app, "gw-db", 2).await;
    let proxy = app.db_proxy.as_ref().unwrap();
    proxy.set(Mode::Refuse);
    proxy.cut();
    let published = Instant::now();
    let rings = publish_all(&app, "gw-db", 30).await;
    paused_with_rings_waiting(&app, published + Duration::from_secs(5)).await;
    assert_eq!(Counters::get(&app.counters.rings_delivered), 0);
    proxy.set(Mode::Pass);
    settled(&app, &rings, &tokens).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn an_unreachable_apns_pauses_consumption_instead_of_burning_retries() {
    let app = App::spawn_with(|o| {
        o.apns_proxy = true;
        o.apns.backoff_min = Duration::from_millis(100);
    })
    .await;
    let tokens = gateway(&app, "gw-down", 2).await;
    let proxy = app.apns_proxy.as_ref().unwrap();
    proxy.set(Mode::Refuse);
    let published = Instant::now();
    let rings = publish_all(&app, "gw-down", 30).await;
    paused_with_rings_waiting(&app, published + Duration::from_secs(3)).await;
    assert_eq!(
        Counters::get(&app.counters.rings_retried),
        0,
        "no retries spent while APNs is unreachable"
    );
    proxy.set(Mode::Pass);
    settled(&app, &rings, &tokens).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn sigterm_during_a_burst_exits_0_in_the_grace_period_and_a_second_worker_delivers_the_rest()
{
    let mut app = App::spawn_with(|o| {
        o.run_worker = false;
        o.mock.response_delay = Duration::from_millis(200);
    })
    .await;
    let tokens = gateway(&app, "gw-term", 2).await;
    let rings = publish_all(&app, "gw-term", 500).await;
    let mut worker = app.worker_process(&[("RINGPUSH_SHUTDOWN_GRACE", "3s")]);
    app.wait_for("the burst to start", || app.mock.stats().accepted >= 100)
        .await;
    let signalled = Instant::now();
    crate::support::terminate(&mut worker).await;
    // The grace (3 s), the bounded wait for aborted handlers (5 s) and room for a busy
    // machine; a worker that ignored the grace and hung would not make it.
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    let delivered_by_first = app.mock.stats().accepted;
    assert!(
        delivered_by_first < 1000,
        "the burst was interrupted ({delivered_by_first} accepted)"
    );

    app.start_worker();
    settled(&app, &rings, &tokens).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_ring_whose_tokens_are_all_rejected_for_good_is_acked_and_not_retried() {
    let app = App::spawn().await;
    let tokens = gateway(&app, "gw-topic", 3).await;
    for t in &tokens {
        app.mock.script(
            t,
            Script {
                status: 400,
                reason: Reason::TopicDisallowed,
                timestamp_ms: None,
            },
        );
    }
    app.publish(&App::ring("gw-topic", Duration::ZERO)).await;
    app.wait_acked(1).await;
    assert_eq!(Counters::get(&app.counters.rings_delivered), 1);
    assert_eq!(Counters::get(&app.counters.notifications_rejected), 3);
    assert_eq!(Counters::get(&app.counters.rings_retried), 0);
    assert_eq!(app.mock.received().len(), 3, "each token asked once");
    assert!(app.drain_dead().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn an_undeliverable_ring_goes_dead_after_max_attempts_and_only_pending_tokens_were_retried() {
    let app = App::spawn_with(|o| o.worker.max_attempts = 3).await;
    let tokens = gateway(&app, "gw-stuck", 3).await;
    let stuck = &tokens[2];
    app.mock.script(
        stuck,
        Script {
            status: 500,
            reason: Reason::InternalServerError,
            timestamp_ms: None,
        },
    );
    let ring = App::ring("gw-stuck", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_for("the dead letter", || {
        Counters::get(&app.counters.rings_dead_lettered) == 1
    })
    .await;
    let per_token = |t: &DeviceToken| {
        app.mock
            .received()
            .iter()
            .filter(|r| r.token.as_deref() == Some(t.as_hex()))
            .count()
    };
    assert_eq!(
        (
            per_token(&tokens[0]),
            per_token(&tokens[1]),
            per_token(stuck)
        ),
        (1, 1, 3)
    );
    assert_eq!(Counters::get(&app.counters.rings_retried), 2);
    let dead = app
        .channel
        .basic_get(
            app.names.dead.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ringpush::broker::error_header(&dead.properties).as_deref(),
        Some("gave up after 3 attempts: APNs 500 InternalServerError")
    );
    let envelope = ringpush::wire::retry::read(&dead.data)
        .unwrap()
        .expect("the dead ring is a retry envelope");
    assert_eq!(
        envelope.pending,
        [stuck.as_hex()],
        "the dead ring names the token it never reached"
    );
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(
        json(&envelope.ring),
        json(&ring.to_json()),
        "the original ring is kept"
    );
    assert_eq!(envelope.attempt, 3);
    assert_eq!(envelope.routing_key, format!("ring.{}", ring.gateway_id));
    app.stop().await;
}

#[tokio::test]
async fn a_ring_that_keeps_coming_back_is_dead_lettered_with_its_reason_before_the_delivery_limit()
{
    let mut app = App::spawn_with(|o| o.run_worker = false).await;
    // A gateway with a phone, so that "not pushed" below is the worker's decision.
    gateway(&app, "gw-poison", 1).await;
    app.publish(&App::ring("gw-poison", Duration::ZERO)).await;
    // Workers that die on this ring every time: take it, hand it back, 19 times.
    for _ in 0..19 {
        let msg = app
            .channel
            .basic_get(
                app.names.rings.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("the ring is back in the queue");
        msg.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // The 20th delivery reaches a worker: it dead-letters the ring itself, saying why,
    // instead of leaving the broker's limit to drop it there with only `x-death`.
    app.start_worker();
    let mut dead = Vec::new();
    for _ in 0..300 {
        dead = app.drain_dead().await;
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .1
            .starts_with("delivered 20 times without being settled"),
        "{:?}",
        dead[0].1
    );
    assert!(
        app.mock.received().is_empty(),
        "a poison ring is not pushed"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_stalled_apns_times_out_and_the_rings_wait_until_it_answers_again() {
    let app = App::spawn_with(|o| {
        o.apns_proxy = true;
        o.apns.connect_timeout = Duration::from_millis(300);
        o.apns.request_timeout = Duration::from_millis(500);
        o.apns.backoff_min = Duration::from_millis(100);
    })
    .await;
    let tokens = gateway(&app, "gw-stall", 2).await;
    let proxy = app.apns_proxy.as_ref().unwrap();
    proxy.set(Mode::Stall);
    let published = Instant::now();
    let rings = publish_all(&app, "gw-stall", 10).await;
    // A stall counts as unreachable: consumption pauses.
    paused_with_rings_waiting(&app, published + Duration::from_secs(2)).await;
    assert_eq!(app.mock.stats().accepted, 0);
    proxy.set(Mode::Pass);
    proxy.cut();
    settled(&app, &rings, &tokens).await;
    app.stop_with_nothing_unacked().await;
}
