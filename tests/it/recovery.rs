//! Pushing resumes within seconds of APNs's return, not after the rest of a long reconnect
//! backoff: while the endpoint refuses TCP connections, the paused worker's probe only tries
//! a TCP connect (every 250 ms doubling to 2 s, jittered), and the first one that succeeds
//! lets a full connection skip its backoff.

use std::time::{Duration, Instant};

use ringpush::worker::Counters;

use crate::proxy::Mode;
use crate::support::{App, TOPIC};

/// Takes APNs down for `outage` (the proxy stops listening: connections refused), publishes
/// a ring meanwhile, brings it back and returns how long the first notification took after
/// the return.
async fn recovery_after(app: &App, outage: Duration, tokens: usize) -> Duration {
    let proxy = app.apns_proxy.as_ref().unwrap();
    let before = app.mock.stats().accepted;
    proxy.set(Mode::Down);
    let down = Instant::now();
    app.publish(&App::ring("gw-back", Duration::ZERO)).await;
    app.wait_for("consumption to pause", || app.counters.ready().is_err())
        .await;
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    proxy.set(Mode::Pass);
    let back = Instant::now();
    let deadline = back + Duration::from_secs(120);
    while app.mock.stats().accepted < before + tokens as u64 {
        assert!(
            Instant::now() < deadline,
            "nothing pushed 120 s after APNs came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    back.elapsed()
}

#[tokio::test]
async fn pushing_resumes_within_seconds_of_apns_return_not_after_the_reconnect_backoff() {
    let app = App::spawn_with(|o| {
        o.apns_proxy = true;
        // Full reconnects back off 60-180 s after the first failure: a worker that waited for
        // them would miss the bound below by far, whatever the machine's load.
        o.apns.backoff_min = Duration::from_secs(120);
        o.apns.backoff_max = Duration::from_secs(240);
        o.worker.ring_ttl = Duration::from_secs(300);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
        // The production probe schedule (the test support's default is faster).
        o.worker.probe_interval = Duration::from_millis(250);
        o.worker.probe_cap = Duration::from_secs(1);
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-back", owner, "Door").await;
    for _ in 0..2 {
        app.add_token(owner, "production", Some(TOPIC)).await;
    }
    app.publish(&App::ring("gw-back", Duration::ZERO)).await;
    app.wait_for("the first ring", || app.mock.stats().accepted == 2)
        .await;

    let mut times = Vec::new();
    for outage in [5, 20, 120].map(Duration::from_secs) {
        let took = recovery_after(&app, outage, 2).await;
        eprintln!("APNs down {outage:?}: first notification {took:?} after its return");
        // The probe runs at most 1.5 s apart (1 s jittered by +50 %); the full-reconnect
        // backoff alone would be 60 s or more. The bound leaves a busy machine room.
        assert!(
            took < Duration::from_secs(30),
            "pushing resumed {took:?} after APNs's return (outage {outage:?})"
        );
        times.push(took);
    }
    assert_eq!(
        Counters::get(&app.counters.rings_requeued)
            + Counters::get(&app.counters.rings_handed_back),
        0,
        "the rings were held, not handed back"
    );
    assert!(app.drain_dead().await.is_empty(), "nothing dead-lettered");
    app.stop_with_nothing_unacked().await;
}
