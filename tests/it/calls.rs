//! Call-style rings to iPhones: a VoIP push to `<topic>.voip` with the call payload, beside
//! an alert to the same gateway's other phones; over the legacy binary interface (no VoIP) a
//! call token is counted unsupported and the ring settles on its other tokens.

use std::time::Duration;

use ringpush::token::{random_hex, DeviceToken};
use ringpush::worker::Counters;

use crate::support::{nothing_waiting_or_dead, App, TOPIC};

/// Registers an APNs token of `kind` for `user` (the row's topic: `topic`).
pub async fn add_apns_token(app: &App, user: i64, kind: &str, topic: Option<&str>) -> DeviceToken {
    let token = DeviceToken::parse(&random_hex(32)).unwrap();
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO push_tokens (token, user_id, topic, platform, kind) VALUES ($1, $2, $3, 'apns', $4)",
            &[&token.as_str(), &user, &topic, &kind],
        )
        .await
        .unwrap();
    token
}

#[tokio::test]
async fn an_iphone_that_rings_as_a_call_gets_a_voip_push_to_the_voip_topic() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-call", owner, "Front door").await;
    let alert = add_apns_token(&app, owner, "alert", Some(TOPIC)).await;
    let call = add_apns_token(&app, owner, "call", None).await;
    let voip_row = add_apns_token(&app, owner, "call", Some("com.example.doorbell.voip")).await;
    let ring = App::ring("gw-call", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_acked(1).await;
    let received = app.mock.received();
    assert_eq!(received.len(), 3, "one request per phone");
    for r in &received {
        assert_eq!(r.status, 200, "{:?}", r.reason);
        let header = |name: &str| r.headers[name].to_str().unwrap().to_owned();
        let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(header("apns-collapse-id"), ring.event_id);
        assert_eq!(header("apns-priority"), "10");
        let token = r.token.clone().unwrap();
        if token == alert.as_str() {
            assert_eq!(header("apns-push-type"), "alert");
            assert_eq!(header("apns-topic"), TOPIC);
            assert_eq!(body["aps"]["alert"]["title"], "Front door");
        } else {
            assert!(token == call.as_str() || token == voip_row.as_str());
            assert_eq!(header("apns-push-type"), "voip");
            assert_eq!(
                header("apns-topic"),
                format!("{TOPIC}.voip"),
                "never .voip.voip"
            );
            assert_eq!(
                body,
                serde_json::json!({
                    "aps": {},
                    "event_id": ring.event_id,
                    "gateway_id": "gw-call",
                    "gateway_name": "Front door",
                    "pressed_at": ring.pressed_at_rfc3339(),
                })
            );
        }
    }
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 3);
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn over_the_binary_interface_a_call_token_is_unsupported_and_the_ring_settles() {
    let app = App::spawn_with(|o| o.binary = true).await;
    let owner = app.add_user().await;
    app.add_gateway("gw-bin-call", owner, "Door").await;
    let alert = add_apns_token(&app, owner, "alert", Some(TOPIC)).await;
    add_apns_token(&app, owner, "call", Some(TOPIC)).await;
    app.publish(&App::ring("gw-bin-call", Duration::ZERO)).await;
    app.wait_for("the ring delivered", || {
        Counters::get(&app.counters.rings_delivered) == 1
    })
    .await;
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 1);
    assert_eq!(Counters::get(&app.counters.notifications_unsupported), 1);
    assert_eq!(
        Counters::get(&app.counters.rings_retried),
        0,
        "never retried"
    );
    let tokens: Vec<String> = app
        .mock
        .received()
        .into_iter()
        .filter_map(|r| r.token)
        .collect();
    assert_eq!(
        tokens,
        [alert.as_str().to_owned()],
        "only the alert token is sent"
    );
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}
