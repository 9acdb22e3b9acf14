//! A ring's life (docs/design.md, "A ring's life"), against the real broker and database and
//! the mocks recording what they were sent: an end stops every phone that took the ring —
//! one follow-up per alert and Android token, none to an iPhone's VoIP token, none again for a
//! second end —; a ring nobody answers ends `missed` exactly once, also when the worker that
//! pushed it was killed; debounce; an end before its ring; an end under another gateway's key;
//! an unknown type; the broker closing the connection mid-follow-up; the history; a missed
//! sweep whose process stops running it does not hold its rings.

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use ringpush::broker;
use ringpush::token::{DeviceToken, Kind, Platform};
use ringpush::wire::ring::{EndEvent, EndReason, RingEvent};
use ringpush::worker::Counters;
use time::OffsetDateTime;

use crate::calls::add_apns_token;
use crate::fcm::{add_fcm_token, fcm_settings};
use crate::support::{App, TOPIC};

/// An end of `ring`, now.
fn end_of(ring: &RingEvent, reason: EndReason, by_user: Option<i64>) -> EndEvent {
    EndEvent {
        event_id: format!("end-{}", ringpush::token::random_hex(8)),
        ring_id: ring.event_id.clone(),
        gateway_id: ring.gateway_id.clone(),
        reason,
        by_user,
        at: Some(OffsetDateTime::now_utc()),
    }
}

async fn publish_end(app: &App, end: &EndEvent) {
    broker::publish_end(&app.channel, &app.names, end)
        .await
        .expect("publish end");
}

/// Publishes `body` under `ring.<key_gateway>`, as that gateway would.
async fn publish_as(app: &App, key_gateway: &str, body: &[u8]) {
    let props = BasicProperties::default().with_content_type("application/json".into());
    broker::publish_confirmed(
        &app.channel,
        &app.names.rings,
        &broker::Names::ring_key(key_gateway),
        body,
        props,
    )
    .await
    .unwrap();
}

/// The APNs requests for `event` (its collapse id) per token, payloads parsed.
fn apns_requests(app: &App, event: &str) -> HashMap<String, Vec<(String, serde_json::Value)>> {
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for r in app.mock.received() {
        if r.status != 200 || r.collapse_id().as_deref() != Some(event) {
            continue;
        }
        let push_type = r.headers["apns-push-type"].to_str().unwrap().to_owned();
        let body: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        out.entry(r.token.clone().unwrap())
            .or_default()
            .push((push_type, body));
    }
    out
}

/// The FCM messages accepted for ring `event` per token.
fn fcm_messages(app: &App, event: &str) -> HashMap<String, Vec<serde_json::Value>> {
    let mut out: HashMap<String, Vec<_>> = HashMap::new();
    for r in app.fcm.as_ref().unwrap().received() {
        if r.status == 200 && r.body["message"]["data"]["event_id"] == event {
            out.entry(r.token.clone().unwrap())
                .or_default()
                .push(r.body["message"].clone());
        }
    }
    out
}

/// The follow-ups among `messages` (FCM: `data.kind` ended; APNs: a `state`).
fn followups_fcm(messages: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    messages
        .iter()
        .filter(|m| m["data"]["kind"] == "ended")
        .collect()
}
fn followups_apns(requests: &[(String, serde_json::Value)]) -> Vec<&serde_json::Value> {
    requests
        .iter()
        .filter(|(_, b)| b.get("state").is_some())
        .map(|(_, b)| b)
        .collect()
}

/// A front door shared by alice (owner; an iPhone alert, an Android alert), bob (named Bob,
/// an Android call) and carol (an iPhone call: VoIP).
struct House {
    gateway: String,
    bob: i64,
    iphone: DeviceToken,
    android: DeviceToken,
    android_call: DeviceToken,
    voip: DeviceToken,
}

async fn house(app: &App, gateway: &str) -> House {
    let alice = app.add_user().await;
    let bob = app.add_user().await;
    let carol = app.add_user().await;
    let client = app.pool.get().await.unwrap();
    client
        .execute("UPDATE users SET name = 'Bob' WHERE id = $1", &[&bob])
        .await
        .unwrap();
    app.add_gateway(gateway, alice, "Front door").await;
    app.share(gateway, bob).await;
    app.share(gateway, carol).await;
    House {
        gateway: gateway.to_owned(),
        bob,
        iphone: add_apns_token(app, alice, "alert", Some(TOPIC)).await,
        android: add_fcm_token(app, alice, "alert").await,
        android_call: add_fcm_token(app, bob, "call").await,
        voip: add_apns_token(app, carol, "call", Some(TOPIC)).await,
    }
}

/// Waits until every phone of `h` took `ring` (one request each, accepted).
async fn rung(app: &App, h: &House, ring: &RingEvent) {
    app.wait_for("every phone took the ring", || {
        let apns = apns_requests(app, &ring.event_id);
        let fcm = fcm_messages(app, &ring.event_id);
        apns.get(h.iphone.as_str()).is_some_and(|r| !r.is_empty())
            && apns.get(h.voip.as_str()).is_some_and(|r| !r.is_empty())
            && fcm.get(h.android.as_str()).is_some_and(|r| !r.is_empty())
            && fcm
                .get(h.android_call.as_str())
                .is_some_and(|r| !r.is_empty())
    })
    .await;
}

async fn with_fcm(edit: impl FnOnce(&mut crate::support::Options)) -> App {
    App::spawn_with(|o| {
        o.fcm = Some(fcm_settings());
        edit(o);
    })
    .await
}

#[tokio::test]
async fn an_answered_ring_ends_on_every_phone_that_took_it_and_a_second_end_sends_nothing() {
    let mut app = with_fcm(|o| o.run_worker = false).await;
    let h = house(&app, "gw-life").await;
    app.start_worker();
    app.start_worker();
    let ring = App::ring(&h.gateway, Duration::ZERO);
    app.publish(&ring).await;
    rung(&app, &h, &ring).await;
    let end = end_of(&ring, EndReason::Answered, Some(h.bob));
    publish_end(&app, &end).await;
    app.wait_for("the follow-ups", || {
        Counters::get(&app.counters.rings_ended) >= 1
    })
    .await;
    // A second end of the same ring (declined at another phone): nothing more.
    publish_end(&app, &end_of(&ring, EndReason::Declined, None)).await;
    app.wait_for("the second end acked", || {
        Counters::get(&app.counters.rings_already_ended) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let apns = apns_requests(&app, &ring.event_id);
    let iphone = &apns[h.iphone.as_str()];
    let follow = followups_apns(iphone);
    assert_eq!(follow.len(), 1, "one follow-up to the iPhone: {iphone:?}");
    let f = follow[0];
    assert_eq!(f["state"], "answered");
    assert_eq!(f["aps"]["alert"]["body"], "Answered by Bob");
    assert_eq!(f["aps"]["alert"]["title"], "Front door");
    assert_eq!(f["aps"]["interruption-level"], "passive");
    assert!(f["aps"].get("sound").is_none(), "no sound: {f}");
    assert_eq!(f["event_id"], ring.event_id.as_str());
    assert_eq!(f["pressed_at"], ring.pressed_at_rfc3339().as_str());
    assert!(f["ended_at"].is_string());
    assert_eq!(
        iphone.iter().filter(|(t, _)| t == "alert").count(),
        2,
        "the ring and its follow-up, both alerts under the ring's collapse id"
    );
    assert_eq!(
        apns[h.voip.as_str()].len(),
        1,
        "the VoIP token got the ring and no follow-up"
    );

    let fcm = fcm_messages(&app, &ring.event_id);
    let android = followups_fcm(&fcm[h.android.as_str()]);
    assert_eq!(android.len(), 1, "one follow-up to the Android alert token");
    let a = android[0];
    assert_eq!(a["notification"]["body"], "Answered by Bob");
    assert_eq!(a["android"]["notification"]["tag"], ring.event_id.as_str());
    assert_eq!(a["android"]["notification"]["channel_id"], "doorbell_quiet");
    assert!(a["android"]["notification"].get("sound").is_none());
    assert!(a["android"]["notification"].get("default_sound").is_none());
    assert_eq!(a["android"]["priority"], "HIGH");
    assert_eq!(a["android"]["collapse_key"], h.gateway.as_str());
    assert_eq!(a["data"]["state"], "answered");
    let call = followups_fcm(&fcm[h.android_call.as_str()]);
    assert_eq!(call.len(), 1, "one follow-up to the Android call token");
    assert!(call[0].get("notification").is_none(), "data only");
    assert!(call[0]["android"].get("notification").is_none());
    assert_eq!(call[0]["data"]["kind"], "ended");

    let c = &app.counters;
    assert_eq!(c.ends("answered"), 1);
    assert_eq!(c.followups(Platform::APNS, Kind::Call, "skipped_voip"), 1);
    assert_eq!(c.followups(Platform::APNS, Kind::Alert, "accepted"), 1);
    assert_eq!(c.followups(Platform::FCM, Kind::Alert, "accepted"), 1);
    assert_eq!(c.followups(Platform::FCM, Kind::Call, "accepted"), 1);
    let row = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT state, by_user, phones, presses FROM ring_history WHERE gateway_id = $1 AND event_id = $2",
            &[&h.gateway, &ring.event_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "answered");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(h.bob));
    assert_eq!(row.get::<_, i32>(2), 4, "four phones reached");
    assert_eq!(row.get::<_, i32>(3), 1);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_ring_nobody_answers_is_missed_once_also_when_the_worker_that_pushed_it_was_killed() {
    let app = App::spawn_with(|o| {
        o.run_worker = false;
        o.worker.ring_timeout = Duration::from_secs(3);
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-missed", owner, "Garage").await;
    let iphone = app.add_token(owner, "production", Some(TOPIC)).await;
    let timeout = [("RINGPUSH_RING_TIMEOUT", "3s")];
    let mut first = app.worker_process(&timeout);
    let ring = App::ring("gw-missed", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_for("the ring pushed", || {
        apns_requests(&app, &ring.event_id).contains_key(iphone.as_str())
    })
    .await;
    // The worker that pushed it dies at once (SIGKILL); two others come up.
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let mut second = app.worker_process(&timeout);
    let mut third = app.worker_process(&timeout);
    let deadline = ring.pressed_at + Duration::from_secs(3);
    app.wait_for("the missed follow-up", || {
        apns_requests(&app, &ring.event_id)
            .get(iphone.as_str())
            .is_some_and(|r| !followups_apns(r).is_empty())
    })
    .await;
    let late = OffsetDateTime::now_utc() - deadline;
    assert!(
        late < time::Duration::seconds(2),
        "the missed follow-up came {late} after the deadline"
    );
    // Time for a second one, were there any.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = &apns_requests(&app, &ring.event_id)[iphone.as_str()];
    let follow = followups_apns(requests);
    assert_eq!(follow.len(), 1, "missed exactly once: {requests:?}");
    assert_eq!(follow[0]["state"], "missed");
    assert_eq!(follow[0]["aps"]["alert"]["body"], "Missed ring");
    let client = app.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT state, ended_at FROM ring_history WHERE event_id = $1",
            &[&ring.event_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "missed");
    let ended: OffsetDateTime = row.get(1);
    assert!((ended - deadline).abs() < time::Duration::milliseconds(5));
    crate::support::terminate(&mut second).await;
    crate::support::terminate(&mut third).await;
    app.stop().await;
}

#[tokio::test]
async fn a_held_button_rings_once_and_the_end_of_any_press_ends_the_ring() {
    let app = App::spawn_with(|o| o.worker.ring_debounce = Duration::from_secs(5)).await;
    let owner = app.add_user().await;
    app.add_gateway("gw-held", owner, "Door").await;
    let iphone = app.add_token(owner, "production", Some(TOPIC)).await;
    let now = OffsetDateTime::now_utc();
    let press = |event: &str, after_ms: i64, switch: &str| RingEvent {
        event_id: event.into(),
        gateway_id: "gw-held".into(),
        pressed_at: now + time::Duration::milliseconds(after_ms),
        switch_id: Some(switch.into()),
    };
    // Three presses within the debounce (5 s), one of another switch.
    let first = press("p1", 0, "front");
    app.publish(&first).await;
    app.wait_acked(1).await;
    for p in [
        press("p2", 1_000, "front"),
        press("p3", 2_000, "front"),
        press("q1", 2_500, "back"),
    ] {
        app.publish(&p).await;
    }
    app.wait_acked(4).await;
    assert_eq!(Counters::get(&app.counters.rings_debounced), 2);
    let rang: Vec<String> = app
        .mock
        .received()
        .iter()
        .filter_map(|r| r.collapse_id())
        .collect();
    assert_eq!(rang.len(), 2, "one push per switch: {rang:?}");
    // The end names the last press: the first ring (the one that rang) ends.
    publish_end(
        &app,
        &end_of(&press("p3", 2_000, "front"), EndReason::DoorOpened, None),
    )
    .await;
    app.wait_acked(5).await;
    let follow = followups_apns(&apns_requests(&app, "p1")[iphone.as_str()])
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(follow.len(), 1);
    assert_eq!(follow[0]["state"], "door_opened");
    let client = app.pool.get().await.unwrap();
    let rows = client
        .query(
            "SELECT event_id, state, presses FROM ring_history WHERE gateway_id = 'gw-held' ORDER BY pressed_at",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("p1".to_owned(), "door_opened".to_owned(), 3),
            ("q1".to_owned(), "ringing".to_owned(), 1)
        ]
    );
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn an_end_consumed_before_its_ring_keeps_the_ring_from_ringing() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-early", owner, "Door").await;
    app.add_token(owner, "production", Some(TOPIC)).await;
    let ring = App::ring("gw-early", Duration::ZERO);
    publish_end(&app, &end_of(&ring, EndReason::Cancelled, None)).await;
    app.wait_acked(1).await;
    app.publish(&ring).await;
    app.wait_acked(2).await;
    assert_eq!(
        app.mock.stats().accepted,
        0,
        "no phone rang for an ended ring"
    );
    assert_eq!(Counters::get(&app.counters.rings_ended_before_push), 1);
    assert_eq!(app.counters.ends("cancelled"), 1);
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn an_end_under_another_gateways_key_and_an_unknown_type_are_dead_lettered() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-a", owner, "A").await;
    app.add_token(owner, "production", Some(TOPIC)).await;
    let ring = App::ring("gw-a", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_acked(1).await;
    // gw-b's credentials publishing an end of gw-a's ring.
    let forged = end_of(&ring, EndReason::Answered, None);
    publish_as(&app, "gw-b", &forged.to_json()).await;
    publish_as(
        &app,
        "gw-a",
        br#"{"v":2,"type":"knock","event_id":"k1","gateway_id":"gw-a"}"#,
    )
    .await;
    // A gateway may not say "missed".
    let missed = end_of(&ring, EndReason::Missed, None);
    publish_as(&app, "gw-a", &missed.to_json()).await;
    app.wait_acked(4).await;
    let dead = app.drain_dead().await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead[0].1.contains("routing key"), "{}", dead[0].1);
    assert!(
        dead[1].1.contains("unknown ring event type"),
        "{}",
        dead[1].1
    );
    assert!(dead[2].1.contains("missed"), "{}", dead[2].1);
    let state: String = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT state FROM rings WHERE event_id = $1",
            &[&ring.event_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "ringing", "nothing of gw-a's ended");
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn the_broker_closing_the_connection_mid_follow_up_sends_no_follow_up_twice() {
    let app = App::spawn_with(|o| {
        o.amqp_proxy = true;
        o.mock.response_delay = Duration::from_millis(400);
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-cut", owner, "Door").await;
    let mut phones = Vec::new();
    for _ in 0..6 {
        phones.push(app.add_token(owner, "production", Some(TOPIC)).await);
    }
    let ring = App::ring("gw-cut", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_acked(1).await;
    publish_end(&app, &end_of(&ring, EndReason::Answered, None)).await;
    // The end consumed, its follow-ups in flight (the mock answers after 400 ms): the
    // broker closes the connection, so the end's ack never reaches it.
    app.wait_for("the end consumed", || {
        Counters::get(&app.counters.rings_consumed) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    app.amqp_proxy.as_ref().unwrap().cut();
    app.wait_for("the end settled after the reconnect", || {
        Counters::get(&app.counters.rings_ended) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let apns = apns_requests(&app, &ring.event_id);
    for phone in &phones {
        let follow = followups_apns(&apns[phone.as_str()]);
        assert_eq!(follow.len(), 1, "one follow-up per phone");
    }
    assert!(
        Counters::get(&app.counters.rings_consumed) >= 3,
        "the end was delivered again after the cut"
    );
    assert_eq!(
        Counters::get(&app.counters.notifications_suppressed),
        6,
        "the redelivered end found every follow-up in the ledger"
    );
    app.stop().await;
}

#[tokio::test]
async fn ringpush_ring_end_and_history_as_a_person_uses_them() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-cli", owner, "Door").await;
    app.add_token(owner, "production", Some(TOPIC)).await;
    let ring = App::ring("gw-cli", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_acked(1).await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
            .args(args)
            .env("RINGPUSH_AMQP_URL", crate::support::amqp_url())
            .env("RINGPUSH_QUEUE_PREFIX", &app.names.prefix)
            .env("RINGPUSH_DATABASE_URL", &app.db_url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let said = run(&[
        "ring",
        "gw-cli",
        "--end",
        &ring.event_id,
        "--reason",
        "declined",
        "--by-user",
        &owner.to_string(),
    ]);
    assert!(said.contains("declined"), "{said}");
    app.wait_acked(2).await;
    let history = run(&["history", "gw-cli", "--limit", "5"]);
    let line = history
        .lines()
        .find(|l| l.contains(&ring.event_id))
        .unwrap_or_else(|| panic!("{history}"));
    assert!(line.contains("declined"), "{line}");
    assert!(line.contains(&format!("user {owner}")), "{line}");
    let none = run(&["history", "gw-nobody"]);
    assert!(none.contains("no rings"), "{none}");
    app.stop_with_nothing_unacked().await;
}

/// The ends of concurrent batches go into one statement (one commit) together: within it and
/// across two at once the first end of a ring still wins, each answer is its own end's, an
/// end of a ring not known yet is kept, and an end naming a folded press ends its ring.
#[tokio::test]
async fn ends_recorded_together_the_first_end_of_each_ring_wins() {
    use ringpush::db::rings::{Begin, Begun, Rings, Timing};
    let db = crate::support::TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 4, Duration::from_secs(5)).unwrap();
    // Rings of a known gateway only have a life kept.
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "WITH u AS (INSERT INTO users DEFAULT VALUES RETURNING id)
             INSERT INTO gateways (id, owner_id, name) SELECT 'gw', id, 'Door' FROM u",
        )
        .await
        .unwrap();
    let rings = Rings::new(
        pool.clone(),
        Timing {
            timeout: Duration::from_secs(30),
            debounce: Duration::from_secs(5),
        },
    );
    let now = OffsetDateTime::now_utc();
    let press = |event: &str, after: i64| Begin {
        gateway: "gw".into(),
        event: event.into(),
        switch: Some("front".into()),
        pressed_at: now + time::Duration::milliseconds(after),
    };
    let begun = rings
        .begin(vec![press("a", 0), press("a-again", 100)])
        .await
        .unwrap();
    assert_eq!(begun, [Begun::Ringing, Begun::Folded("a".into())]);
    rings
        .begin(vec![Begin {
            switch: Some("back".into()),
            ..press("b", 0)
        }])
        .await
        .unwrap();
    let end = |id: &str, ring: &str, reason| EndEvent {
        event_id: id.into(),
        ring_id: ring.into(),
        gateway_id: "gw".into(),
        reason,
        by_user: None,
        at: Some(now + time::Duration::seconds(1)),
    };
    // One call: two ends of `a` (one naming its folded press), an end of a ring not seen yet.
    let first = vec![
        end("e1", "a", EndReason::Answered),
        end("e2", "a-again", EndReason::Declined),
        end("e3", "unknown", EndReason::Cancelled),
    ];
    // Beside it, at the same time, two more ends of `b`.
    let second = vec![
        end("e4", "b", EndReason::DoorOpened),
        end("e5", "b", EndReason::Answered),
    ];
    let (first, second) = tokio::join!(rings.end(first), rings.end(second));
    let (first, second) = (first.unwrap(), second.unwrap());
    let view = |e: &ringpush::db::rings::Ended| (e.won, e.target.clone(), e.state.clone());
    assert_eq!(
        first.iter().map(view).collect::<Vec<_>>(),
        [
            (true, "a".into(), "answered".into()),
            (false, "a".into(), "answered".into()),
            (true, "unknown".into(), "cancelled".into()),
        ]
    );
    assert_eq!(
        second.iter().map(view).collect::<Vec<_>>(),
        [
            (true, "b".into(), "door_opened".into()),
            (false, "b".into(), "door_opened".into()),
        ]
    );
    // Asked again (a redelivered end), the winner still says so; nothing changes.
    let again = rings
        .end(vec![
            end("e1", "a", EndReason::Answered),
            end("e5", "b", EndReason::Answered),
        ])
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|e| e.won).collect::<Vec<_>>(),
        [true, false]
    );
    assert!(rings.end(Vec::new()).await.unwrap().is_empty());
    // The ring whose end came first is not pushed when it comes.
    let late = rings
        .begin(vec![Begin {
            switch: None,
            ..press("unknown", 0)
        }])
        .await
        .unwrap();
    assert_eq!(late, [Begun::Ended("cancelled".into())]);
}

/// A missed sweep whose process stops running it — its rows locked, their ends being
/// published — does not hold them for ever: the server ends the sweep's transaction once it
/// sits idle past its bound, the rings are ringing again, and the next sweep ends them.
/// (Found as a test whose teardown waited for ever: its `DROP SCHEMA` behind a sweep the
/// blocked runtime never ran again.)
#[tokio::test]
async fn a_missed_sweep_that_stops_running_does_not_hold_its_rings() {
    use ringpush::db::rings::{Begin, Rings, Timing};
    let db = crate::support::TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 4, Duration::from_secs(5)).unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute(
            "WITH u AS (INSERT INTO users DEFAULT VALUES RETURNING id)
             INSERT INTO gateways (id, owner_id, name) SELECT 'gw', id, 'Door' FROM u",
        )
        .await
        .unwrap();
    let rings = Rings::new(
        pool.clone(),
        Timing {
            timeout: Duration::from_secs(1),
            debounce: Duration::ZERO,
        },
    );
    // Pressed a minute ago: past its deadline.
    rings
        .begin(vec![Begin {
            gateway: "gw".into(),
            event: "r1".into(),
            switch: None,
            pressed_at: OffsetDateTime::now_utc() - time::Duration::minutes(1),
        }])
        .await
        .unwrap();
    // The sweep takes the ring and starts publishing its end; from then on nothing runs
    // the sweep (its future kept, never polled again), as in a process stopped there.
    let (entered, announcing) = tokio::sync::oneshot::channel::<Vec<String>>();
    let announce = |missed: Vec<ringpush::db::rings::Missed>| async move {
        let _ = entered.send(missed.into_iter().map(|m| m.event).collect());
        std::future::pending::<Result<(), String>>().await
    };
    let mut sweep = std::pin::pin!(rings.sweep_missed(10, announce));
    let taken = tokio::select! {
        done = &mut sweep => panic!("the sweep ended without publishing: {done:?}"),
        taken = announcing => taken.unwrap(),
    };
    assert_eq!(taken, ["r1"]);
    // Another session waits for the ring's row (a guard against waiting for ever if the
    // bound is gone, far above it): it gets it once the server has ended the sweep's
    // transaction, and the sweep's change is gone with it.
    let other = pool.get().await.unwrap();
    other
        .batch_execute("SET lock_timeout = '120s'")
        .await
        .unwrap();
    let state: String = other
        .query_one(
            "SELECT state FROM rings WHERE event_id = 'r1' FOR UPDATE",
            &[],
        )
        .await
        .expect("the ring's row, once the idle sweep is ended")
        .get(0);
    assert_eq!(state, "ringing");
    drop(other);
    // The next sweep ends it missed.
    let (entered, announcing) = tokio::sync::oneshot::channel::<Vec<String>>();
    let announce = |missed: Vec<ringpush::db::rings::Missed>| async move {
        let _ = entered.send(missed.into_iter().map(|m| m.event).collect());
        Ok(())
    };
    assert_eq!(rings.sweep_missed(10, announce).await, Ok(1));
    assert_eq!(announcing.await.unwrap(), ["r1"]);
    let state: String = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT state FROM rings WHERE event_id = 'r1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "missed");
}
