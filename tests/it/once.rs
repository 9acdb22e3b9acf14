//! A phone rings once: after a broker closing the worker's connection, a cut between worker
//! and broker, a SIGTERM mid-push and a worker killed with its acks unsent, no (ring, token)
//! pair is accepted twice by the mock — the delivery ledger tells the worker that sees a ring
//! again which phones took it already. And the ledger itself: written before the ack (a write
//! that fails holds the ring and pauses consumption), swept by age through its index.

use std::time::{Duration, Instant};

use ringpush::db::{ledger_hash, Ledger, RingKey};
use ringpush::worker::Counters;

use crate::faults::{publish_all, settled};
use crate::support::{gateway, App, TestDb};

/// Waits until the mock has accepted nothing new for a second: every push in flight answered.
async fn quiet(app: &App) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = app.mock.stats().accepted;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = app.mock.stats().accepted;
        if now == last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the mock kept accepting for 60 s"
        );
        last = now;
    }
}

fn management_url() -> String {
    std::env::var("RINGPUSH_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// The name the management API knows the in-process worker's broker connection by (waits
/// for its statistics to list it).
async fn management_connection(app: &App) -> String {
    let want = format!("ringpush worker {}", app.names.prefix);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ringpush::http::get(
            &format!(
                "{}/api/connections?columns=name,client_properties",
                management_url()
            ),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let listed: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        let found = listed.as_array().into_iter().flatten().find_map(|c| {
            (c["client_properties"]["connection_name"].as_str() == Some(&want))
                .then(|| c["name"].as_str().map(str::to_owned))
                .flatten()
        });
        if let Some(name) = found {
            return name;
        }
        assert!(
            Instant::now() < deadline,
            "{want} not listed by the management API"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn ledger_rows(app: &App) -> i64 {
    let client = app.pool.get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM ring_ledger", &[])
        .await
        .unwrap()
        .get(0)
}

fn suppressed(app: &App) -> u64 {
    Counters::get(&app.counters.notifications_suppressed)
}

#[tokio::test]
async fn the_broker_closing_the_workers_connection_mid_push_rings_no_phone_twice() {
    // Slow answers (well within the 3 s a stopped push waits for them), and every ring in the
    // worker's hands at once: when the broker closes the connection, all of them are mid-push,
    // and the broker gives them back before their answers come in.
    let app = App::spawn_with(|o| o.mock.response_delay = Duration::from_millis(1000)).await;
    let tokens = gateway(&app, "gw-close", 5).await;
    // The connection's name, before anything is pushed: the management API lists a new
    // connection only with its next statistics, and the close must be quick.
    let connection = management_connection(&app).await;
    let rings = publish_all(&app, "gw-close", 60).await;
    app.wait_for("every ring in hand", || {
        Counters::get(&app.counters.rings_consumed) >= 60
    })
    .await;
    // Their requests sent (a loaded machine may still be looking the rings up): the close
    // must find them mid-push, not before it.
    app.wait_for("requests in flight", || app.mock.stats().max_in_flight > 0)
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = format!(
        "{}/api/connections/{}",
        management_url(),
        percent_encoding::utf8_percent_encode(&connection, percent_encoding::NON_ALPHANUMERIC)
    );
    let closed = ringpush::http::delete(&url, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(closed.status < 300, "DELETE {url}: {}", closed.status);
    assert_eq!(
        app.mock.stats().accepted,
        0,
        "closed before the first answer"
    );
    let duplicates = settled(&app, &rings, &tokens).await;
    assert_eq!(duplicates, 0, "a phone rang twice");
    assert!(Counters::get(&app.counters.broker_sessions) >= 2);
    assert!(
        suppressed(&app) > 0,
        "the rings in the worker's hands came back and the ledger kept them from ringing again"
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_cut_between_worker_and_broker_rings_no_phone_twice() {
    let app = App::spawn_with(|o| {
        o.amqp_proxy = true;
        o.mock.response_delay = Duration::from_millis(50);
    })
    .await;
    let tokens = gateway(&app, "gw-cut", 5).await;
    let rings = publish_all(&app, "gw-cut", 200).await;
    app.wait_for("pushing", || app.mock.stats().accepted >= 150)
        .await;
    // The acks of the rings pushed from now on stop on the way; then the line is cut, and the
    // broker gives every unacked ring back.
    let proxy = app.amqp_proxy.as_ref().unwrap();
    proxy.freeze();
    quiet(&app).await;
    proxy.thaw();
    proxy.cut();
    let duplicates = settled(&app, &rings, &tokens).await;
    assert_eq!(duplicates, 0, "a phone rang twice");
    assert!(Counters::get(&app.counters.broker_sessions) >= 2);
    assert!(suppressed(&app) > 0, "rings came back already delivered");
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn sigterm_while_apns_answers_slowly_hands_back_only_the_phones_not_reached() {
    let mut app = App::spawn_with(|o| {
        o.run_worker = false;
        o.mock.response_delay = Duration::from_millis(400);
    })
    .await;
    let tokens = gateway(&app, "gw-slow", 5).await;
    let rings = publish_all(&app, "gw-slow", 20).await;
    // One request at a time per ring: when the grace runs out, each ring has reached some of
    // its phones, has one request in flight, and has phones it never tried.
    let mut worker = app.worker_process(&[
        ("RINGPUSH_RING_CONCURRENCY", "1"),
        ("RINGPUSH_SHUTDOWN_GRACE", "1s"),
    ]);
    app.wait_for("a phone of every ring", || app.mock.stats().accepted >= 20)
        .await;
    crate::support::terminate(&mut worker).await;
    let by_first = app.mock.stats().accepted;
    assert!(
        by_first < 100,
        "the first worker was stopped mid-push ({by_first} of 100 accepted)"
    );
    let handed_back = app.depth(&app.names.rings).await;
    assert!(handed_back > 0, "the rest was handed back");

    app.start_worker();
    let duplicates = settled(&app, &rings, &tokens).await;
    assert_eq!(duplicates, 0, "a phone rang twice");
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_worker_killed_with_its_acks_unsent_leaves_the_other_only_the_phones_not_recorded() {
    let mut app = App::spawn_with(|o| {
        o.run_worker = false;
        o.amqp_proxy = true;
        o.mock.response_delay = Duration::from_millis(20);
    })
    .await;
    let tokens = gateway(&app, "gw-kill", 4).await;
    let rings = publish_all(&app, "gw-kill", 300).await;
    // Worker A, a process, reaches the broker through the proxy; worker B, in this test,
    // directly. A starts alone, and its acks stop on the way once it is pushing (it holds a
    // prefetch window of rings, pushes them and records them); B then shares the queue and
    // does the rest.
    let through_proxy = app.worker_amqp_url();
    let mut a = app.worker_process(&[("RINGPUSH_AMQP_URL", &through_proxy)]);
    app.wait_for("A pushing", || app.mock.stats().accepted >= 100)
        .await;
    app.amqp_proxy.as_ref().unwrap().freeze();
    app.start_worker_at(crate::support::amqp_url());
    quiet(&app).await;
    let proxy = app.amqp_proxy.as_ref().unwrap();
    assert!(ledger_rows(&app).await > 0);
    a.kill().await.unwrap();
    // The broker sees A's connection go and gives its unacked rings to B.
    proxy.cut();
    let duplicates = settled(&app, &rings, &tokens).await;
    assert_eq!(
        duplicates, 0,
        "B pushed a phone that A had recorded (A was killed only after every answer was recorded)"
    );
    assert!(
        suppressed(&app) > 0,
        "A's unacked rings came to B, already delivered"
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_ledger_that_cannot_be_written_holds_the_rings_and_pauses_until_it_can() {
    let app = App::spawn().await;
    let tokens = gateway(&app, "gw-ledger", 2).await;
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'the ledger is closed for the test'; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON ring_ledger
               FOR EACH STATEMENT EXECUTE FUNCTION refuse();",
        )
        .await
        .unwrap();
    let published = Instant::now();
    let rings = publish_all(&app, "gw-ledger", 10).await;
    app.wait_for("consumption to pause", || {
        Counters::get(&app.counters.pauses) >= 1
    })
    .await;
    tokio::time::sleep(
        (published + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert_eq!(
        Counters::get(&app.counters.rings_acked),
        0,
        "no ring is acked before its ledger entry is written"
    );
    assert_eq!(Counters::get(&app.counters.rings_retried), 0);
    client
        .batch_execute("DROP TRIGGER refuse ON ring_ledger")
        .await
        .unwrap();
    let duplicates = settled(&app, &rings, &tokens).await;
    assert_eq!(duplicates, 0, "the held rings were not pushed again");
    app.wait_acked(10).await;
    assert_eq!(ledger_rows(&app).await, 10);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn the_ledger_sweep_removes_old_entries_through_its_index_and_keeps_fresh_ones() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 2, Duration::from_secs(5)).unwrap();
    let ledger = Ledger::new(pool.clone());
    let ring = |event: &str| RingKey {
        gateway: "gw".into(),
        event: event.into(),
    };
    ledger
        .record(ring("fresh"), &[ledger_hash("aa"), ledger_hash("bb")])
        .await
        .unwrap();
    let client = pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO ring_ledger (gateway_id, event_id, accepted, recorded_at)
             VALUES ('gw', 'old', $1, now() - interval '10 minutes')",
            &[&ledger_hash("aa").to_vec()],
        )
        .await
        .unwrap();
    assert_eq!(ledger.sweep(Duration::from_secs(120)).await.unwrap(), 1);
    let seen = ledger.seen(&[ring("fresh"), ring("old")]).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let fresh = &seen[&ring("fresh")];
    assert!(fresh.contains(&ledger_hash("aa")) && fresh.contains(&ledger_hash("bb")));
    assert!(!fresh.contains(&ledger_hash("cc")));
    // Callers asking at once share a read; each is answered about its own rings only.
    let (asked, asked_too) = ([ring("fresh"), ring("never")], [ring("old")]);
    let (mine, theirs) = tokio::join!(ledger.seen(&asked), ledger.seen(&asked_too));
    assert_eq!(mine.unwrap().keys().collect::<Vec<_>>(), [&ring("fresh")]);
    assert!(theirs.unwrap().is_empty());
    // The sweep can run on the BRIN index of recorded_at (on a small table the planner may
    // prefer a scan; forbidden one, it must still find a plan through the index).
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query(
            "EXPLAIN DELETE FROM ring_ledger WHERE recorded_at < now() - make_interval(secs => 120)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("ring_ledger_recorded_at")),
        "{plan:#?}"
    );
}
