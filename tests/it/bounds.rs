//! Bounded input: a message body over `RINGPUSH_MAX_MESSAGE_BYTES` is dead-lettered before it
//! is parsed — a copy cut to that size, with the reason — once, and the messages behind it go
//! on. The worker runs as its own process (the binary), so its peak memory is its own.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use ringpush::broker;
use ringpush::feedback;
use ringpush::purge;
use ringpush::wire::feedback::Invalidation;
use time::OffsetDateTime;

use crate::support::{gateway, terminate, App};

/// `RINGPUSH_MAX_MESSAGE_BYTES`'s default.
const MAX: usize = 64 << 10;

/// A body of `n` bytes that no parser takes, whose every prefix is its own.
fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A process's peak resident set (VmHWM), MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb / 1024.0
}

#[tokio::test]
async fn bodies_of_1_mib_and_20_mib_are_dead_lettered_once_cut_and_the_rings_behind_them_are_delivered(
) {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    let tokens = gateway(&app, "gw-big", 1).await;
    let mut worker = app.worker_process(&[]);
    // One ring first: the worker is up and consuming; its peak so far is its baseline.
    app.publish(&App::ring("gw-big", Duration::ZERO)).await;
    let accepted = || {
        app.mock
            .received()
            .iter()
            .filter(|r| r.status == 200 && r.token.as_deref() == Some(tokens[0].as_hex()))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted() < 1 {
        assert!(Instant::now() < deadline, "the worker delivers a ring");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = worker.id().unwrap();
    let baseline = peak_rss_mib(pid);

    let big = [body(1 << 20), body(20 << 20)];
    let props = BasicProperties::default().with_content_type("application/json".into());
    for b in &big {
        broker::publish_confirmed(
            &app.channel,
            &app.names.rings,
            "ring.gw-big",
            b,
            props.clone(),
        )
        .await
        .unwrap();
    }
    let rings: Vec<_> = (0..20)
        .map(|_| App::ring("gw-big", Duration::ZERO))
        .collect();
    for ring in &rings {
        app.publish(ring).await;
    }
    while accepted() < 21 || app.depth(&app.names.dead).await < 2 {
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "rings delivered ({}/21) and both bodies dead-lettered",
            accepted()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once: nothing comes back and nothing more is dead-lettered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.depth(&app.names.rings).await, 0, "nothing requeued");
    assert_eq!(app.unaccepted(&rings, &tokens), 0);
    let peak = peak_rss_mib(pid);
    eprintln!(
        "worker VmHWM: {baseline:.1} MiB after its first ring, {peak:.1} MiB after a 1 MiB and a 20 MiB body"
    );
    // About the 20 MiB body once (22.5 MiB measured, BENCHMARKS.md): a second whole copy of
    // it (a clone on the way to the dead queue) would cross this.
    assert!(
        peak - baseline < 40.0,
        "the worker held the 20 MiB body more than once: VmHWM {baseline:.1} → {peak:.1} MiB"
    );
    let dead = app.drain_dead().await;
    assert_eq!(dead.len(), 2, "each body dead-lettered once");
    for ((cut, reason), original) in dead.iter().zip(&big) {
        assert_eq!(cut.len(), MAX, "a copy cut to RINGPUSH_MAX_MESSAGE_BYTES");
        assert_eq!(&cut[..], &original[..MAX], "its first bytes");
        assert_eq!(
            reason,
            &format!(
                "the message body of {} bytes is over RINGPUSH_MAX_MESSAGE_BYTES ({MAX}); dead-lettered unread, cut to its first {MAX} bytes",
                original.len()
            )
        );
    }
    terminate(&mut worker).await;
    app.stop().await;
}

#[tokio::test]
async fn a_feedback_event_and_a_purge_request_over_the_bound_go_to_their_dead_queues_and_the_next_purges(
) {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    let token = app.add_token(owner, "production", None).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&token, now - Duration::from_secs(86_400))
        .await;
    let props = BasicProperties::default;
    let big = body(1 << 20);
    for queue in [&app.names.feedback, &app.names.purge] {
        broker::publish_confirmed(&app.channel, "", queue, &big, props())
            .await
            .unwrap();
    }
    // Behind them, an ordinary feedback event: its token is purged.
    let event = Invalidation {
        token: token.clone(),
        environment: ringpush::token::Environment::Production,
        topic: None,
        reason: "Unregistered".into(),
        invalid_since: now - Duration::from_secs(3_600),
        observed_at: now,
    };
    broker::publish_confirmed(
        &app.channel,
        "",
        &app.names.feedback,
        &event.to_json(),
        props(),
    )
    .await
    .unwrap();
    app.wait_for("both dead-lettered and the token purged", || {
        feedback::Counters::get(&app.feedback_counters.dead_lettered) == 1
            && purge::Counters::get(&app.purge_counters.dead_lettered) == 1
            && purge::Counters::get(&app.purge_counters.purged) == 1
    })
    .await;
    assert!(!app.token_exists(&token).await);
    for queue in [&app.names.feedback_dead, &app.names.purge_dead] {
        let dead = app.drain(queue).await;
        assert_eq!(dead.len(), 1, "{queue}");
        assert_eq!(dead[0].0, &big[..MAX]);
        assert!(
            dead[0].1.starts_with(
                "the message body of 1048576 bytes is over RINGPUSH_MAX_MESSAGE_BYTES"
            ),
            "{}",
            dead[0].1
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn three_hundred_half_sent_requests_leave_metrics_answering_and_are_closed_after_the_header_timeout(
) {
    use ringpush::metrics::server::{HEADER_TIMEOUT, MAX_CONNECTIONS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = App::spawn_with(|o| o.metrics = true).await;
    let addr = app.metrics_addr.unwrap();
    // 300 clients that send half a request and then nothing.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: ringpush\r\n")
            .await
            .unwrap();
        slow.push((Instant::now(), s));
    }
    // A scrape that sends its request whole is answered — within a second, a liveness bound
    // with a wide margin (it takes milliseconds).
    for _ in 0..3 {
        let r = ringpush::http::get(&format!("http://{addr}/metrics"), Duration::from_secs(1))
            .await
            .expect("/metrics answers within a second beside 300 slow connections");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("ringpush_rings_total"), "{}", r.body);
    }
    // Every slow connection is closed: most evicted by the ones after them (the server keeps
    // 64 open at most), the last ones when their headers have not come within the timeout.
    let closes = slow.into_iter().map(|(opened, mut s)| async move {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(HEADER_TIMEOUT + Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a slow connection is still open");
        opened.elapsed()
    });
    let after = futures_util::future::join_all(closes).await;
    let timed_out = after
        .iter()
        .filter(|d| **d >= HEADER_TIMEOUT - Duration::from_millis(500))
        .count();
    eprintln!(
        "300 slow connections: {} closed early (evicted), {timed_out} at the header timeout",
        300 - timed_out
    );
    assert!(
        (MAX_CONNECTIONS - 10..=MAX_CONNECTIONS).contains(&timed_out),
        "about the last {MAX_CONNECTIONS} wait out the header timeout: {timed_out}"
    );
    app.stop().await;
}
