//! A ring reaches every phone: fan-out, request shape, and the rings that are not pushed.

use std::collections::HashSet;
use std::time::Duration;

use ringpush::apns::jwt;
use ringpush::apns::Reason;
use ringpush::mock::Script;
use ringpush::worker::Counters;

use crate::support::{App, KEY_ID, TEAM_ID, TOPIC};

#[tokio::test]
async fn a_ring_reaches_each_distinct_token_of_owner_and_sharees_once() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    let (bob, carol) = (app.add_user().await, app.add_user().await);
    app.add_gateway("gw-front", owner, "Front door").await;
    app.share("gw-front", bob).await;
    app.share("gw-front", carol).await;
    app.share("gw-front", owner).await; // the owner listed as a sharee by mistake
    let owner_phones = [
        app.add_token(owner, "production", Some(TOPIC)).await,
        app.add_token(owner, "production", None).await,
    ];
    let bob_phone = app
        .add_token(bob, "production", Some("com.example.other"))
        .await;
    let carol_phone = app.add_token(carol, "sandbox", Some(TOPIC)).await;
    // Someone else's phone must not ring.
    let stranger = app.add_user().await;
    let stranger_phone = app.add_token(stranger, "production", Some(TOPIC)).await;

    let ring = App::ring("gw-front", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_acked(1).await;

    let received = app.mock.received();
    assert_eq!(
        received.len(),
        4,
        "one request per distinct token: {received:#?}"
    );
    let tokens: HashSet<String> = received.iter().map(|r| r.token.clone().unwrap()).collect();
    let want: HashSet<String> = owner_phones
        .iter()
        .chain([&bob_phone, &carol_phone])
        .map(|t| t.as_hex().to_owned())
        .collect();
    assert_eq!(tokens, want);
    assert!(!tokens.contains(stranger_phone.as_hex()));

    let expiration = (ring.pressed_at.unix_timestamp() + 60).to_string();
    for r in &received {
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.path, format!("/3/device/{}", r.token.as_ref().unwrap()));
        let header = |name: &str| r.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        let topic = if r.token.as_deref() == Some(bob_phone.as_hex()) {
            "com.example.other"
        } else {
            TOPIC
        };
        assert_eq!(header("apns-topic").as_deref(), Some(topic));
        assert_eq!(header("apns-push-type").as_deref(), Some("alert"));
        assert_eq!(header("apns-priority").as_deref(), Some("10"));
        assert_eq!(
            header("apns-collapse-id").as_deref(),
            Some(ring.event_id.as_str())
        );
        assert_eq!(header("apns-expiration"), Some(expiration.clone()));
        // The bearer token is an ES256 JWT of our key and team (the mock verified its signature).
        let bearer = header("authorization").unwrap();
        let jwt = bearer.strip_prefix("bearer ").unwrap();
        let claims =
            jwt::verify(jwt, &app.jwt_public_key).expect("the JWT verifies with the public key");
        assert_eq!(
            (claims.key_id.as_str(), claims.team_id.as_str()),
            (KEY_ID, TEAM_ID)
        );
        assert!(
            (jwt::unix_now() - claims.issued_at).abs() < 60,
            "iat is now: {claims:?}"
        );
        let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({
                "aps": {
                    "alert": {"title": "Front door", "body": "Someone is at the door"},
                    "sound": "default",
                    "interruption-level": "time-sensitive",
                    "thread-id": "gw-front",
                },
                "event_id": ring.event_id,
                "gateway_id": "gw-front",
                "pressed_at": ring.pressed_at_rfc3339(),
            })
        );
    }
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 4);
    assert_eq!(Counters::get(&app.counters.rings_delivered), 1);
    app.stop().await;
}

#[tokio::test]
async fn one_connection_carries_many_rings_with_streams_in_flight_together() {
    let app = App::spawn_with(|o| {
        o.mock.response_delay = Duration::from_millis(50);
        o.apns.connections = 1;
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-busy", owner, "Hall").await;
    for _ in 0..10 {
        app.add_token(owner, "production", Some(TOPIC)).await;
    }
    for _ in 0..5 {
        app.publish(&App::ring("gw-busy", Duration::ZERO)).await;
    }
    app.wait_acked(5).await;
    let stats = app.mock.stats();
    assert_eq!(stats.accepted, 50);
    assert_eq!(
        stats.connections, 1,
        "one persistent connection, reused across rings"
    );
    assert!(
        stats.max_in_flight > 1,
        "streams were sent one at a time: {stats:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn malformed_rings_go_to_the_dead_queue_with_their_reason_and_the_next_ring_still_rings() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-1", owner, "Door").await;
    let phone = app.add_token(owner, "production", Some(TOPIC)).await;

    app.publish_raw(b"{not json").await;
    app.publish_raw(br#"{"v":1,"event_id":"e-1"}"#).await;
    app.publish_raw(br#"{"v":3,"event_id":"e-2","gateway_id":"gw-1"}"#)
        .await;
    // A gateway id PostgreSQL cannot take as text: the lookup would fail on it every time.
    let nul = br#"{"v":1,"event_id":"e-3","gateway_id":"gw\u0000-1"}"#;
    app.publish_raw(nul).await;
    // A time RFC 3339 can write, but not in UTC: past the end of the year 9999.
    let late =
        br#"{"v":1,"event_id":"e-4","gateway_id":"gw-1","pressed_at":"9999-12-31T23:59:59-01:00"}"#;
    app.publish_raw(late).await;
    app.publish(&App::ring("gw-1", Duration::ZERO)).await;
    app.wait_acked(6).await;

    // Dead-lettering runs concurrently: match reasons to bodies, not to positions.
    let dead: std::collections::HashMap<Vec<u8>, String> =
        app.drain_dead().await.into_iter().collect();
    assert_eq!(dead.len(), 5, "{dead:?}");
    let reason = |body: &[u8]| {
        dead.get(body)
            .unwrap_or_else(|| panic!("{body:?} not dead-lettered"))
            .as_str()
    };
    assert!(
        reason(b"{not json").starts_with("not a JSON ring event"),
        "{dead:?}"
    );
    assert_eq!(
        reason(br#"{"v":1,"event_id":"e-1"}"#),
        "missing field `gateway_id`"
    );
    assert!(
        reason(br#"{"v":3,"event_id":"e-2","gateway_id":"gw-1"}"#)
            .starts_with("unknown ring event version 3"),
        "{dead:?}"
    );
    assert_eq!(reason(nul), "`gateway_id` must not contain a NUL character");
    assert!(
        reason(late).starts_with("`pressed_at` is not an RFC 3339 time in the years 1 to 9999"),
        "{dead:?}"
    );

    let received = app.mock.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].token.as_deref(), Some(phone.as_hex()));
    assert_eq!(
        Counters::get(&app.counters.rings_requeued),
        0,
        "nothing is handed back to loop"
    );
    assert_eq!(app.depth(&app.names.rings).await, 0);
    for tier in &app.names.retry {
        assert_eq!(app.depth(tier).await, 0);
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_gateways_and_gateways_without_phones_are_acked_and_push_nothing() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-empty", owner, "Nobody's phone").await;
    app.publish(&App::ring("gw-nowhere", Duration::ZERO)).await;
    app.publish(&App::ring("gw-empty", Duration::ZERO)).await;
    app.wait_acked(2).await;
    assert_eq!(Counters::get(&app.counters.rings_unknown_gateway), 1);
    assert_eq!(Counters::get(&app.counters.rings_without_tokens), 1);
    assert!(app.mock.received().is_empty());
    assert!(app.drain_dead().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_ring_older_than_its_ttl_is_acked_and_not_pushed() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-late", owner, "Door").await;
    app.add_token(owner, "production", Some(TOPIC)).await;
    app.publish(&App::ring("gw-late", Duration::from_secs(61)))
        .await;
    app.publish(&App::ring("gw-late", Duration::from_secs(30)))
        .await;
    app.wait_acked(2).await;
    assert_eq!(Counters::get(&app.counters.rings_expired), 1);
    assert_eq!(
        app.mock.stats().accepted,
        1,
        "only the fresh ring is pushed"
    );
    assert!(app.drain_dead().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn rejected_tokens_settle_the_ring_and_other_phones_still_ring() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-mixed", owner, "Door").await;
    let gone = app.add_token(owner, "production", Some(TOPIC)).await;
    let wrong_env = app.add_token(owner, "production", Some(TOPIC)).await;
    let fine = app.add_token(owner, "production", Some(TOPIC)).await;
    app.mock.unregister(&gone, 1_795_857_362_120);
    app.mock.script(
        &wrong_env,
        Script {
            status: 400,
            reason: Reason::BadDeviceToken,
            timestamp_ms: None,
        },
    );

    app.publish(&App::ring("gw-mixed", Duration::ZERO)).await;
    app.wait_acked(1).await;
    assert_eq!(Counters::get(&app.counters.rings_delivered), 1);
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 1);
    assert_eq!(Counters::get(&app.counters.notifications_rejected), 2);
    assert_eq!(app.counters.rejected("Unregistered"), 1);
    assert_eq!(app.counters.rejected("BadDeviceToken"), 1);
    let accepted: Vec<_> = app
        .mock
        .received()
        .into_iter()
        .filter(|r| r.status == 200)
        .collect();
    assert_eq!(accepted[0].token.as_deref(), Some(fine.as_hex()));
    app.stop().await;
}

#[tokio::test]
async fn a_ring_apns_cannot_take_now_is_retried_then_dead_lettered_with_the_reason() {
    let app = App::spawn_with(|o| o.worker.max_attempts = 2).await;
    let owner = app.add_user().await;
    app.add_gateway("gw-flaky", owner, "Door").await;
    let phone = app.add_token(owner, "production", Some(TOPIC)).await;
    app.mock.script(
        &phone,
        Script {
            status: 503,
            reason: Reason::ServiceUnavailable,
            timestamp_ms: None,
        },
    );

    app.publish(&App::ring("gw-flaky", Duration::ZERO)).await;
    // First delivery → retry queue → back after the retry delay → second attempt → dead.
    app.wait_acked(2).await;
    assert_eq!(Counters::get(&app.counters.rings_retried), 1);
    assert_eq!(Counters::get(&app.counters.rings_dead_lettered), 1);
    assert_eq!(app.mock.received().len(), 2, "one request per attempt");
    let dead = app.drain_dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].1,
        "gave up after 2 attempts: APNs 503 ServiceUnavailable"
    );
    app.stop().await;
}
