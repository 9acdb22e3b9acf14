//! The seed protocol, done right: the legacy binary gateway and feedback service, end to end
//! with the real broker and database and the mock's binary ports (TLS, client certificates).

use std::collections::HashMap;
use std::time::Duration;

use ringpush::apns::{binary, Reason};
use ringpush::feedback;
use ringpush::mock::{Faults, Script};
use ringpush::purge;
use ringpush::token::DeviceToken;
use ringpush::worker::Counters;

use crate::proxy::{Mode, Proxy};
use crate::support::{App, TOPIC};

/// The owner of `gateway` with `n` phones (sorted as the lookup returns them).
async fn phones(app: &App, gateway: &str, n: usize) -> Vec<DeviceToken> {
    let owner = app.add_user().await;
    app.add_gateway(gateway, owner, "Door").await;
    let mut tokens = Vec::new();
    for _ in 0..n {
        tokens.push(app.add_token(owner, "production", Some(TOPIC)).await);
    }
    tokens.sort();
    tokens
}

fn received_per_token(app: &App) -> HashMap<String, Vec<u16>> {
    let mut per = HashMap::new();
    for r in app.mock.received() {
        per.entry(r.token.unwrap())
            .or_insert_with(Vec::new)
            .push(r.status);
    }
    per
}

#[tokio::test]
async fn two_invalid_tokens_among_200_lose_no_other_phone_and_are_purged() {
    let app = App::spawn_with(|o| o.binary = true).await;
    let tokens = phones(&app, "gw-bin", 200).await;
    let invalid = [&tokens[37], &tokens[151]];
    for t in invalid {
        app.mock.script(
            t,
            Script {
                status: 8,
                reason: Reason::InvalidToken,
                timestamp_ms: None,
            },
        );
    }
    app.publish(&App::ring("gw-bin", Duration::ZERO)).await;
    app.wait_acked(1).await;

    let per = received_per_token(&app);
    for (i, t) in tokens.iter().enumerate() {
        let statuses = per
            .get(t.as_hex())
            .unwrap_or_else(|| panic!("token #{i} never reached the gateway"));
        if invalid.contains(&t) {
            assert_eq!(statuses, &[8], "token #{i}");
        } else {
            assert_eq!(statuses, &[200], "token #{i} must be received exactly once");
        }
    }
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 198);
    assert_eq!(Counters::get(&app.counters.notifications_rejected), 2);
    assert!(
        app.mock.stats().connections >= 3,
        "a new connection after each error packet"
    );

    app.wait_for("both purged", || {
        purge::Counters::get(&app.purge_counters.purged) == 2
    })
    .await;
    for t in invalid {
        assert!(!app.token_exists(t).await);
    }
    assert!(app.token_exists(&tokens[0]).await);
    app.stop().await;
}

#[tokio::test]
async fn a_scripted_shutdown_mid_batch_delivers_every_notification_exactly_once() {
    let app = App::spawn_with(|o| {
        o.binary = true;
        o.mock.faults = Faults {
            shutdown_after: Some(50),
            ..Faults::default()
        };
    })
    .await;
    let tokens = phones(&app, "gw-shut", 200).await;
    app.publish(&App::ring("gw-shut", Duration::ZERO)).await;
    app.wait_acked(1).await;
    let per = received_per_token(&app);
    for t in &tokens {
        assert_eq!(
            per.get(t.as_hex()).map(Vec::as_slice),
            Some(&[200][..]),
            "{t}"
        );
    }
    assert_eq!(per.len(), 200);
    assert!(
        app.mock.stats().goaways >= 3,
        "the gateway shut down every 50 frames"
    );
    assert_eq!(
        Counters::get(&app.counters.rings_retried),
        0,
        "resent invisibly, not retried"
    );
    app.stop().await;
}

#[tokio::test]
async fn tokens_listed_by_the_feedback_service_are_purged_once() {
    let app = App::spawn_with(|o| o.binary = true).await;
    let tokens = phones(&app, "gw-fb", 3).await;
    let now = ringpush::apns::jwt::unix_now();
    app.registered_at(
        &tokens[0],
        time::OffsetDateTime::from_unix_timestamp(now - 86_400).unwrap(),
    )
    .await;
    app.mock.offer_feedback(&tokens[0], (now - 3600) as u32);
    // Registered again after the service saw the app gone: kept.
    app.mock.offer_feedback(&tokens[1], (now - 3600) as u32);

    app.wait_for("the purge", || {
        purge::Counters::get(&app.purge_counters.acked) == 2
    })
    .await;
    assert_eq!(
        feedback::Counters::get(&app.feedback_counters.service_tokens),
        2
    );
    assert!(!app.token_exists(&tokens[0]).await);
    assert!(app.token_exists(&tokens[1]).await);
    assert!(app.token_exists(&tokens[2]).await);
    // The service forgets what it listed: later polls publish nothing more.
    let polls = feedback::Counters::get(&app.feedback_counters.service_polls);
    app.wait_for("more polls", || {
        feedback::Counters::get(&app.feedback_counters.service_polls) >= polls + 2
    })
    .await;
    assert_eq!(
        feedback::Counters::get(&app.feedback_counters.service_tokens),
        2
    );
    app.stop().await;
}

#[tokio::test]
async fn the_probe_tells_an_unreachable_gateway_from_a_reachable_one() {
    let (app, tls) = client_app().await;
    let client = |port: u16| client_to(port, &tls, |_| {});
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = client(closed);
    assert!(down.probe().await.is_err(), "nothing listens there");
    let token = DeviceToken::parse(&ringpush::token::random_hex(32)).unwrap();
    let notification = ringpush::apns::request::Notification {
        push_type: ringpush::apns::request::PushType::Alert,
        token,
        topic: TOPIC.into(),
        collapse_id: String::new(),
        expiration: 0,
        payload: bytes::Bytes::from_static(b"{}"),
    };
    let failed = down.send(&notification).await.unwrap_err();
    assert!(failed.is_unreachable(), "{failed}");
    let up = client(app.mock.gateway_addr().unwrap().port());
    up.probe().await.expect("the gateway is up");
    assert_eq!(up.connections_open(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_burst_larger_than_one_write_goes_out_without_waiting_for_a_tick() {
    let (app, tls) = client_app().await;
    // 10 frames per write, and a quiet period (so a confirmation tick) of a minute: if the
    // 200 frames went out one write per tick, the gateway would see 10 of them for minutes.
    let client = client_to(app.mock.gateway_addr().unwrap().port(), &tls, |s| {
        s.max_batch = 10;
        s.quiet = Duration::from_secs(60);
        s.request_timeout = Duration::from_secs(120);
    });
    let sends: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            let n = padded_notification(0);
            tokio::spawn(async move { client.send(&n).await })
        })
        .collect();
    app.wait_for("all 200 frames at the gateway", || {
        app.mock.stats().accepted == 200
    })
    .await;
    assert_eq!(
        client.in_flight(),
        200,
        "written, waiting for the quiet period"
    );
    for s in sends {
        s.abort();
    }
    app.stop().await;
}

/// An app without a worker, to drive a binary client by hand: the app, and the TLS (client
/// certificate) its mock gateway wants.
async fn client_app() -> (App, std::sync::Arc<tokio_rustls::rustls::ClientConfig>) {
    let app = App::spawn_with(|o| {
        o.binary = true;
        o.run_worker = false;
    })
    .await;
    let tls = app
        .binary_tls
        .clone()
        .expect("a binary app has gateway TLS");
    (app, tls)
}

/// A binary client of the gateway at `localhost:port`, with the app's gateway TLS and the
/// settings `edit` makes.
fn client_to(
    port: u16,
    tls: &std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    edit: impl FnOnce(&mut binary::Settings),
) -> binary::Client {
    let address = binary::Address::parse(&format!("localhost:{port}")).unwrap();
    let mut settings = binary::Settings::new(address);
    edit(&mut settings);
    binary::Client::new(settings, tls.clone())
}

fn padded_notification(pad: usize) -> ringpush::apns::request::Notification {
    let payload = format!("{{\"aps\":{{}},\"pad\":\"{}\"}}", "x".repeat(pad));
    ringpush::apns::request::Notification {
        push_type: ringpush::apns::request::PushType::Alert,
        token: DeviceToken::parse(&ringpush::token::random_hex(32)).unwrap(),
        topic: TOPIC.into(),
        collapse_id: String::new(),
        expiration: 0,
        payload: bytes::Bytes::from(payload),
    }
}

/// Sends small notifications until one is accepted, for at most `limit`.
async fn accepted_within(
    client: &ringpush::apns::binary::Client,
    limit: Duration,
) -> Result<(), tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, async {
        loop {
            if let Ok(ringpush::apns::Answer::Accepted) = client.send(&padded_notification(0)).await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// A gateway that accepts connections and drops each before anything on it is confirmed
/// (50 ms after it opens; the quiet period is 3 s, so that no stall of a busy machine lets
/// one pass for confirmed): the client backs off instead of
/// reconnecting at once for every resend, and comes back when the gateway does.
#[tokio::test]
async fn a_gateway_that_drops_new_connections_is_not_hammered() {
    use ringpush::apns::SendError;
    let (app, tls) = client_app().await;
    let proxy = Proxy::start(app.mock.gateway_addr().unwrap()).await;
    proxy.set(Mode::PassFor(Duration::from_millis(50)));
    let client = client_to(proxy.addr.port(), &tls, |s| {
        s.backoff_min = Duration::from_millis(200);
        s.backoff_max = Duration::from_secs(1);
        s.quiet = Duration::from_secs(3);
    });
    let before = app.mock.stats().connections;
    let started = std::time::Instant::now();
    let (mut backed_off, mut accepted) = (0, 0);
    while started.elapsed() < Duration::from_secs(2) {
        match client.send(&padded_notification(0)).await {
            Err(SendError::Backoff { .. }) => backed_off += 1,
            Ok(ringpush::apns::Answer::Accepted) => accepted += 1,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handshakes = app.mock.stats().connections - before;
    assert_eq!(accepted, 0, "no connection lived through a quiet period");
    assert!(backed_off > 0, "the client never backed off");
    // Reconnecting at once for every resend (5 writes per notification, a new connection
    // each 50 ms) makes ~40 handshakes in 2 s; backing off 200 ms, 400 ms, 800 ms… after the
    // second death makes at most 6.
    assert!(handshakes <= 8, "{handshakes} handshakes in 2 s");

    proxy.set(Mode::Pass);
    accepted_within(&client, Duration::from_secs(30))
        .await
        .expect("the client connects again once the gateway keeps its connections");
    app.stop().await;
}

/// A gateway that stops reading (TCP open, nothing taken): the write that fills the socket
/// buffers times out, the connection is dropped, and the client is not stuck — every
/// notification gets an answer and, once the way is clear, new ones are accepted.
#[tokio::test]
async fn a_gateway_that_stops_reading_does_not_wedge_the_client() {
    let (app, tls) = client_app().await;
    let proxy = Proxy::start(app.mock.gateway_addr().unwrap()).await;
    let client = client_to(proxy.addr.port(), &tls, |s| {
        s.write_timeout = Duration::from_millis(500);
        s.connect_timeout = Duration::from_millis(500);
        s.request_timeout = Duration::from_secs(60);
        s.backoff_min = Duration::from_millis(50);
        s.backoff_max = Duration::from_millis(200);
    });
    accepted_within(&client, Duration::from_secs(30))
        .await
        .expect("the gateway takes notifications before it stalls");

    proxy.freeze();
    // ~30 MB of frames: far more than the loopback socket buffers hold.
    let sends: Vec<_> = (0..15_000)
        .map(|_| {
            let client = client.clone();
            let n = padded_notification(1_900);
            tokio::spawn(async move { client.send(&n).await })
        })
        .collect();
    let all = futures_util::future::join_all(sends);
    let answers = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("every notification answered, long before its 60 s request timeout");
    let failed = answers
        .into_iter()
        .map(|a| a.expect("the send task"))
        .filter(Result::is_err)
        .count();
    assert!(
        failed > 0,
        "the stalled frames were reported, not confirmed"
    );

    proxy.thaw();
    accepted_within(&client, Duration::from_secs(30))
        .await
        .expect("a new connection once the gateway reads again");
    assert_eq!(
        client.connections_open(),
        1,
        "the stalled connection is gone"
    );
    proxy.cut();
    app.stop().await;
}

/// The gateway answers a bad token with an error packet and closes while the client is still
/// writing the frames after it: the write fails, but the packet — not the failed write —
/// says what became of each frame. Nothing before the bad token is sent twice, nothing after
/// it is lost, and the token is reported invalid (once), not retried as a lost connection.
#[tokio::test]
async fn an_error_packet_behind_a_failed_write_still_decides_every_frame() {
    let (app, tls) = client_app().await;
    let client = client_to(app.mock.gateway_addr().unwrap().port(), &tls, |s| {
        s.max_batch = 100;
        s.request_timeout = Duration::from_secs(60);
    });
    let notifications: Vec<_> = (0..6_000).map(|_| padded_notification(1_500)).collect();
    let bad = notifications[40].token.clone();
    app.mock.script(
        &bad,
        Script {
            status: 8,
            reason: Reason::InvalidToken,
            timestamp_ms: None,
        },
    );
    let answers = futures_util::future::join_all(notifications.iter().map(|n| {
        let client = client.clone();
        async move { client.send(n).await }
    }))
    .await;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(ringpush::apns::Answer::Rejected(r)) if i == 40 => {
                assert_eq!(r.reason, Reason::InvalidToken)
            }
            Ok(ringpush::apns::Answer::Accepted) if i != 40 => {}
            other => panic!("notification #{i}: {other:?}"),
        }
    }
    let per = received_per_token(&app);
    for (i, n) in notifications.iter().enumerate().take(40) {
        assert_eq!(
            per.get(n.token.as_hex()).map(Vec::len),
            Some(1),
            "#{i}, before the bad token, reached the gateway once"
        );
    }
    assert_eq!(per.get(bad.as_hex()).map(Vec::as_slice), Some(&[8][..]));
    app.stop().await;
}
