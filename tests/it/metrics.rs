//! What operators see: /metrics matches what the mock received, queue-depth gauges follow
//! the queue, /healthz and /readyz answer.

use std::time::Duration;

use ringpush::apns::Reason;
use ringpush::mock::Script;
use ringpush::worker::Counters;

use crate::support::{App, TOPIC};

/// The value of one sample line (`name{labels} value`) in a Prometheus text body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn metrics_match_what_the_mock_received() {
    let app = App::spawn_with(|o| o.metrics = true).await;
    let owner = app.add_user().await;
    app.add_gateway("gw-m", owner, "Door").await;
    for _ in 0..3 {
        app.add_token(owner, "production", Some(TOPIC)).await;
    }
    let gone = app.add_token(owner, "production", Some(TOPIC)).await;
    app.mock.script(
        &gone,
        Script {
            status: 410,
            reason: Reason::Unregistered,
            timestamp_ms: Some(1),
        },
    );
    for _ in 0..10 {
        app.publish(&App::ring("gw-m", Duration::ZERO)).await;
    }
    app.publish(&App::ring("gw-unknown", Duration::ZERO)).await;
    app.wait_acked(11).await;

    let (status, body) = app.scrape("/metrics").await;
    assert_eq!(status, 200);
    let stats = app.mock.stats();
    let accepted = sample(&body, r#"ringpush_notifications_total{outcome="accepted"}"#);
    assert_eq!(accepted, Some(stats.accepted as f64), "{body}");
    assert_eq!(
        sample(
            &body,
            r#"ringpush_notifications_rejected_total{reason="Unregistered"}"#
        ),
        Some(10.0)
    );
    assert_eq!(
        sample(&body, r#"ringpush_rings_total{outcome="delivered"}"#),
        Some(10.0)
    );
    assert_eq!(
        sample(&body, r#"ringpush_rings_total{outcome="unknown_gateway"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "ringpush_apns_request_seconds_count"),
        Some(stats.processed() as f64)
    );
    assert_eq!(
        sample(&body, "ringpush_ring_to_accepted_seconds_count"),
        Some(stats.accepted as f64)
    );
    assert_eq!(
        sample(&body, "ringpush_feedback_events_published_total"),
        Some(10.0)
    );
    assert_eq!(
        sample(&body, r#"ringpush_apns_connections{app="default"}"#),
        Some(2.0),
        "two connections per endpoint, one endpoint used"
    );
    assert_eq!(sample(&body, "ringpush_broker_connected"), Some(1.0));

    assert_eq!(app.scrape("/healthz").await.0, 200);
    let (ready, why) = app.scrape("/readyz").await;
    assert_eq!(ready, 200, "{why}");
    app.stop().await;
}

#[tokio::test]
async fn stage_histograms_say_where_a_rings_time_went() {
    // APNs answers each request after 150 ms; the rings were pressed 400 ms before they
    // are published.
    let delay = 0.15;
    let app = App::spawn_with(|o| {
        o.metrics = true;
        o.mock.response_delay = Duration::from_secs_f64(delay);
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-s", owner, "Door").await;
    for _ in 0..2 {
        app.add_token(owner, "production", Some(TOPIC)).await;
    }
    let age = 0.4;
    for _ in 0..4 {
        app.publish(&App::ring("gw-s", Duration::from_secs_f64(age)))
            .await;
    }
    // Not pushed: in none of the stages.
    app.publish(&App::ring("gw-unknown", Duration::ZERO)).await;
    app.wait_acked(5).await;

    // A ring's stages are observed once it is settled, as its ack is handed over.
    let settled = r#"ringpush_ring_stage_seconds_count{stage="settle"}"#;
    let mut body = String::new();
    for _ in 0..200 {
        body = app.scrape("/metrics").await.1;
        if sample(&body, settled) == Some(4.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let stage = |name: &str, what: &str| {
        let series = format!("ringpush_ring_stage_seconds_{what}{{stage=\"{name}\"}}");
        sample(&body, &series).unwrap_or_else(|| panic!("no {series} in {body}"))
    };
    let mean = |name: &str| stage(name, "sum") / stage(name, "count");
    for name in ["queued", "lookup_wait", "lookup", "push", "settle"] {
        assert_eq!(stage(name, "count"), 4.0, "{name}: one per pushed ring");
    }
    assert!(mean("queued") >= age, "{}", mean("queued"));
    assert!(mean("lookup") > 0.0);
    // The push waited for APNs; the worker's own share leaves the request out.
    assert!(mean("push") >= delay, "{}", mean("push"));
    let own = sample(&body, "ringpush_ring_worker_seconds_sum").unwrap()
        / sample(&body, "ringpush_ring_worker_seconds_count").unwrap();
    assert_eq!(
        sample(&body, "ringpush_ring_worker_seconds_count"),
        Some(4.0)
    );
    assert!(own < delay, "the request is not the worker's: {own}");
    assert!(own >= mean("lookup"), "the lookup is: {own}");
    // From arrival to the last answer the stages leave no gap: the worker's share and the
    // request it leaves out are within the lookup's wait, the lookup and the push.
    let arrival_to_answer = mean("lookup_wait") + mean("lookup") + mean("push");
    assert!(
        own + delay <= arrival_to_answer + 1e-3,
        "{own} + {delay} > {arrival_to_answer}"
    );
    // The stages follow each other: together, at least the press to the last answer.
    let total: f64 = ["queued", "lookup_wait", "lookup", "push", "settle"]
        .iter()
        .map(|s| mean(s))
        .sum();
    let to_accepted = sample(&body, "ringpush_ring_to_accepted_seconds_sum").unwrap()
        / sample(&body, "ringpush_ring_to_accepted_seconds_count").unwrap();
    assert!(total >= to_accepted, "{total} < {to_accepted}");
    assert!(total < to_accepted + 1.0, "{total} ≫ {to_accepted}");
    app.stop().await;
}

#[tokio::test]
async fn queue_depth_gauges_follow_a_queue_filled_while_no_worker_consumes() {
    let mut app = App::spawn_with(|o| {
        o.metrics = true;
        o.run_worker = false;
    })
    .await;
    let series = format!(r#"ringpush_queue_messages{{queue="{}"}}"#, app.names.rings);
    for _ in 0..25 {
        app.publish(&App::ring("gw-nobody", Duration::ZERO)).await;
    }
    let mut seen = None;
    for _ in 0..300 {
        seen = sample(&app.scrape("/metrics").await.1, &series);
        if seen == Some(25.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, Some(25.0));
    let (ready, _) = app.scrape("/readyz").await;
    assert_eq!(ready, 503, "not ready without a consumer");

    app.start_worker();
    app.wait_acked(25).await;
    let mut seen = None;
    for _ in 0..300 {
        let body = app.scrape("/metrics").await.1;
        seen = sample(&body, &series);
        let consumers = sample(
            &body,
            &format!(r#"ringpush_queue_consumers{{queue="{}"}}"#, app.names.rings),
        );
        if seen == Some(0.0) && consumers == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, Some(0.0));
    assert_eq!(Counters::get(&app.counters.rings_unknown_gateway), 25);
    app.stop().await;
}

#[tokio::test]
async fn queues_reads_unacked_counts_from_the_management_api() {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    for _ in 0..5 {
        app.publish(&App::ring("gw-held", Duration::ZERO)).await;
    }
    // A consumer that holds two deliveries without acking them.
    let mut held = Vec::new();
    for _ in 0..2 {
        let msg = app
            .channel
            .basic_get(
                app.names.rings.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
            .expect("a ring is there");
        held.push(msg);
    }
    let management = ringpush::ops::ManagementApi {
        url: std::env::var("RINGPUSH_MANAGEMENT_URL")
            .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into()),
        http: ringpush::http::Client::default(),
    };
    let vhost = ringpush::ops::vhost_of(&crate::support::amqp_url());
    // The management API refreshes its statistics every few seconds.
    let mut seen = None;
    for _ in 0..120 {
        let lines = ringpush::ops::management_lines(&management, &vhost, &app.names)
            .await
            .expect("the management API answers");
        seen = lines
            .iter()
            .find(|l| l.queue == app.names.rings)
            .and_then(|l| l.unacked);
        if seen == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(seen, Some(2), "two deliveries held, not acked");
    drop(held);
    app.stop().await;
}
