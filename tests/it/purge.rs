//! Invalid tokens leave the database: worker → feedback → purge, end to end.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use ringpush::apns::Reason;
use ringpush::broker;
use ringpush::feedback;
use ringpush::mock::Script;
use ringpush::purge;
use ringpush::token::{DeviceToken, Environment};
use ringpush::wire::feedback::Invalidation;
use ringpush::wire::time::format_rfc3339;
use ringpush::worker::Counters;
use time::OffsetDateTime;

use crate::support::{amqp_url, App, TOPIC};

const DAY: Duration = Duration::from_secs(86_400);

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

#[tokio::test]
async fn an_unregistered_token_is_deleted_after_one_ring_through_the_three_processes() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-p", owner, "Door").await;
    let gone = app.add_token(owner, "production", Some(TOPIC)).await;
    let kept = app.add_token(owner, "production", Some(TOPIC)).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&gone, now - 30 * DAY).await;
    app.mock.unregister(&gone, ms(now - DAY));

    app.publish(&App::ring("gw-p", Duration::ZERO)).await;
    app.wait_for("the purge", || {
        purge::Counters::get(&app.purge_counters.acked) == 1
    })
    .await;
    assert_eq!(purge::Counters::get(&app.purge_counters.purged), 1);
    assert!(
        !app.token_exists(&gone).await,
        "the unregistered token is deleted"
    );
    assert!(app.token_exists(&kept).await, "the good token stays");
    assert_eq!(Counters::get(&app.counters.feedback_events), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_token_registered_again_after_the_rejection_is_kept() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-r", owner, "Door").await;
    let token = app.add_token(owner, "production", Some(TOPIC)).await;
    // APNs saw the app gone an hour ago; the phone registered again since (updated_at = now).
    app.mock
        .unregister(&token, ms(OffsetDateTime::now_utc()) - 3_600_000);

    app.publish(&App::ring("gw-r", Duration::ZERO)).await;
    app.wait_for("the purge", || {
        purge::Counters::get(&app.purge_counters.acked) == 1
    })
    .await;
    assert_eq!(purge::Counters::get(&app.purge_counters.purged), 0);
    assert_eq!(purge::Counters::get(&app.purge_counters.kept), 1);
    assert!(app.token_exists(&token).await);
    app.stop().await;
}

#[tokio::test]
async fn fifty_rejections_of_one_token_in_a_burst_make_one_purge_request() {
    let app = App::spawn_with(|o| o.run_purger = false).await;
    let owner = app.add_user().await;
    app.add_gateway("gw-burst", owner, "Door").await;
    let token = app.add_token(owner, "production", Some(TOPIC)).await;
    // Beside a phone that takes every ring: a token answered BadDeviceToken while no phone of
    // the scope takes a ring looks like a configuration mistake, and is kept (mistake.rs).
    app.add_token(owner, "production", Some(TOPIC)).await;
    // BadDeviceToken carries no timestamp: each rejection has its own invalid_since.
    app.mock.script(
        &token,
        Script {
            status: 400,
            reason: Reason::BadDeviceToken,
            timestamp_ms: None,
        },
    );
    for _ in 0..50 {
        app.publish(&App::ring("gw-burst", Duration::ZERO)).await;
    }
    app.wait_acked(50).await;
    assert_eq!(Counters::get(&app.counters.feedback_events), 50);
    app.wait_for("50 feedback events", || {
        feedback::Counters::get(&app.feedback_counters.acked) == 50
    })
    .await;
    assert_eq!(
        feedback::Counters::get(&app.feedback_counters.purge_requests),
        1
    );
    assert_eq!(
        feedback::Counters::get(&app.feedback_counters.duplicates),
        49
    );
    assert_eq!(app.depth(&app.names.purge).await, 1);
    let requests = app.drain(&app.names.purge).await;
    let request = Invalidation::parse(&requests[0].0).unwrap();
    assert_eq!(
        (request.token, request.reason.as_str()),
        (token, "BadDeviceToken")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_purger_that_dies_between_commit_and_ack_redoes_the_delete_harmlessly() {
    let mut app = App::spawn_with(|o| o.run_purger = false).await;
    let owner = app.add_user().await;
    let stale = app.add_token(owner, "production", Some(TOPIC)).await;
    let other = app.add_token(owner, "production", Some(TOPIC)).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&stale, now - 30 * DAY).await;
    app.registered_at(&other, now - 30 * DAY).await;
    let request = Invalidation {
        token: stale.clone(),
        environment: Environment::Production,
        topic: Some(TOPIC.into()),
        reason: "Unregistered".into(),
        invalid_since: now - DAY,
        observed_at: now,
    };
    request
        .publish(&app.publisher, &app.names.purge)
        .await
        .unwrap();

    // A purger takes the request, commits the delete, and dies before its ack.
    let doomed = broker::connect(&amqp_url(), "doomed purger").await.unwrap();
    let channel = doomed.create_channel().await.unwrap();
    let taken = channel
        .basic_get(
            app.names.purge.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the request is there");
    let parsed = Invalidation::parse(&taken.data).unwrap();
    let done = purge::delete_batch(&app.pool, &[parsed]).await.unwrap();
    assert_eq!(done, purge::Purged { purged: 1, kept: 0 });
    drop(taken);
    channel.close(200, "dying".into()).await.unwrap();
    let _ = doomed.close(200, "dying".into()).await;

    // The broker redelivers it to the next purger, which finds nothing more to delete.
    app.start_purger();
    app.wait_for("the redelivered request", || {
        purge::Counters::get(&app.purge_counters.acked) == 1
    })
    .await;
    assert_eq!(purge::Counters::get(&app.purge_counters.purged), 0);
    assert_eq!(purge::Counters::get(&app.purge_counters.kept), 1);
    assert_eq!(purge::Counters::get(&app.purge_counters.dead_lettered), 0);
    assert!(!app.token_exists(&stale).await, "still gone");
    assert!(app.token_exists(&other).await, "nothing else deleted");
    assert_eq!(app.depth(&app.names.purge).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn bad_device_token_and_not_for_topic_purge_but_topic_disallowed_and_500_do_not() {
    // One attempt: the 500 sends the ring to the dead queue instead of the retry queue.
    let app = App::spawn_with(|o| o.worker.max_attempts = 1).await;
    let owner = app.add_user().await;
    app.add_gateway("gw-reasons", owner, "Door").await;
    let scripted = [
        (Reason::BadDeviceToken, true),
        (Reason::DeviceTokenNotForTopic, true),
        (Reason::TopicDisallowed, false),
        (Reason::InternalServerError, false),
    ];
    let mut tokens = Vec::new();
    for (reason, _) in &scripted {
        let token = app.add_token(owner, "production", Some(TOPIC)).await;
        app.registered_at(&token, OffsetDateTime::now_utc() - DAY)
            .await;
        app.mock.script(
            &token,
            Script {
                status: reason.status(),
                reason: reason.clone(),
                timestamp_ms: None,
            },
        );
        tokens.push(token);
    }
    // Two phones that take the ring: the two "never valid here" answers do not outnumber the
    // accepted ones, so they are no suspected configuration mistake (mistake.rs).
    for _ in 0..2 {
        app.add_token(owner, "production", Some(TOPIC)).await;
    }
    app.publish(&App::ring("gw-reasons", Duration::ZERO)).await;
    app.wait_acked(1).await;
    assert_eq!(Counters::get(&app.counters.feedback_events), 2);
    app.wait_for("two purges", || {
        purge::Counters::get(&app.purge_counters.acked) == 2
    })
    .await;
    for ((reason, purged), token) in scripted.iter().zip(&tokens) {
        assert_eq!(!app.token_exists(token).await, *purged, "{reason}");
    }
    assert_eq!(app.depth(&app.names.feedback).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn malformed_feedback_events_and_purge_requests_go_to_their_dead_queues() {
    let app = App::spawn().await;
    let props = || lapin::BasicProperties::default();
    broker::publish_confirmed(&app.channel, "", &app.names.feedback, b"{\"v\":1}", props())
        .await
        .unwrap();
    broker::publish_confirmed(&app.channel, "", &app.names.purge, b"[]", props())
        .await
        .unwrap();
    app.wait_for("dead letters", || {
        feedback::Counters::get(&app.feedback_counters.dead_lettered) == 1
            && purge::Counters::get(&app.purge_counters.dead_lettered) == 1
    })
    .await;
    let dead_feedback = app.drain(&app.names.feedback_dead).await;
    let dead_purge = app.drain(&app.names.purge_dead).await;
    assert_eq!(dead_feedback.len(), 1);
    assert!(
        dead_feedback[0]
            .1
            .starts_with("not a JSON token invalidation"),
        "{dead_feedback:?}"
    );
    assert_eq!(dead_purge[0].0, b"[]");
    assert!(
        dead_purge[0].1.starts_with("not a JSON token invalidation"),
        "{dead_purge:?}"
    );
    assert_eq!(app.depth(&app.names.purge).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_purge_request_postgresql_cannot_take_is_dead_lettered_and_the_rest_are_purged() {
    let mut app = App::spawn_with(|o| o.run_purger = false).await;
    let owner = app.add_user().await;
    let gone = app.add_token(owner, "production", Some(TOPIC)).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&gone, now - 30 * DAY).await;
    let request = |token: &str, since: &str| {
        format!(
            r#"{{"v":1,"token":"{token}","environment":"production","topic":null,"reason":"Unregistered","invalid_since":"{since}","observed_at":"{}"}}"#,
            format_rfc3339(now)
        )
    };
    // RFC 3339 allows the year 0000; PostgreSQL's timestamptz does not: a batch holding this
    // request would fail as a whole, every time it came back.
    let year_zero = request(&"ab".repeat(32), "0000-06-01T00:00:00Z");
    let valid = request(gone.as_hex(), &format_rfc3339(now - DAY));
    for body in [&year_zero, &valid] {
        broker::publish_confirmed(
            &app.channel,
            "",
            &app.names.purge,
            body.as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    app.start_purger();
    app.wait_for("the valid request purged, the other dead", || {
        purge::Counters::get(&app.purge_counters.purged) == 1
            && purge::Counters::get(&app.purge_counters.dead_lettered) == 1
    })
    .await;
    assert!(
        !app.token_exists(&gone).await,
        "the valid request's token is deleted"
    );
    let dead = app.drain(&app.names.purge_dead).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, year_zero.as_bytes());
    assert!(dead[0].1.contains("`invalid_since`"), "{dead:?}");
    assert_eq!(app.depth(&app.names.purge).await, 0);
    app.stop().await;
}

/// Makes the database refuse to delete `token` with `sqlstate`: a trigger in the test's own
/// schema (the pool's search path), as a row PostgreSQL cannot take would.
async fn refuse_to_purge(app: &App, token: &DeviceToken, sqlstate: &str) {
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE FUNCTION refuse_purge() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF OLD.token = '{}' THEN
                     RAISE EXCEPTION 'test: this token refuses to go' USING ERRCODE = '{sqlstate}';
                 END IF;
                 RETURN OLD;
             END $$;
             CREATE TRIGGER refuse_purge BEFORE DELETE ON push_tokens
                 FOR EACH ROW EXECUTE FUNCTION refuse_purge();",
            token.as_hex()
        ))
        .await
        .unwrap();
}

/// Publishes a purge request for each token, invalid since a day ago.
async fn publish_purge_requests(app: &App, tokens: &[&DeviceToken]) {
    let now = OffsetDateTime::now_utc();
    for token in tokens {
        Invalidation {
            token: (*token).clone(),
            environment: Environment::Production,
            topic: Some(TOPIC.into()),
            reason: "Unregistered".into(),
            invalid_since: now - DAY,
            observed_at: now,
        }
        .publish(&app.publisher, &app.names.purge)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_request_the_database_refuses_for_its_data_is_dead_lettered_with_the_reason_and_its_batch_purged(
) {
    let mut app = App::spawn_with(|o| o.run_purger = false).await;
    let owner = app.add_user().await;
    let now = OffsetDateTime::now_utc();
    let mut stale = Vec::new();
    for _ in 0..5 {
        let token = app.add_token(owner, "production", Some(TOPIC)).await;
        app.registered_at(&token, now - 30 * DAY).await;
        stale.push(token);
    }
    // Registered again since APNs's rejection: kept, also when its batch goes one by one.
    let registered_again = app.add_token(owner, "production", Some(TOPIC)).await;
    let refusing = stale[2].clone();
    refuse_to_purge(&app, &refusing, "22023").await;

    // All ready before the purger starts, so they share a batch (of up to 50).
    let mut tokens: Vec<&DeviceToken> = stale.iter().collect();
    tokens.push(&registered_again);
    publish_purge_requests(&app, &tokens).await;
    app.start_purger();
    app.wait_for("every request settled", || {
        purge::Counters::get(&app.purge_counters.acked) == 6
    })
    .await;

    assert_eq!(
        purge::Counters::get(&app.purge_counters.requests),
        6,
        "nothing was handed back: the batch went one by one, not back to the queue"
    );
    assert_eq!(purge::Counters::get(&app.purge_counters.purged), 4);
    assert_eq!(purge::Counters::get(&app.purge_counters.kept), 1);
    assert_eq!(purge::Counters::get(&app.purge_counters.dead_lettered), 1);
    for token in &stale {
        assert_eq!(
            app.token_exists(token).await,
            *token == refusing,
            "only the refusing token is left of the stale ones"
        );
    }
    assert!(app.token_exists(&registered_again).await);
    let dead = app.drain(&app.names.purge_dead).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(Invalidation::parse(&dead[0].0).unwrap().token, refusing);
    let reason = &dead[0].1;
    assert!(reason.starts_with("purge failed: "), "{reason}");
    assert!(reason.contains("22023"), "the SQLSTATE: {reason}");
    assert!(
        reason.contains("test: this token refuses to go"),
        "the database's message: {reason}"
    );
    assert_eq!(app.depth(&app.names.purge).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_that_fails_for_a_reason_other_than_its_data_is_handed_back_until_it_can_be_purged()
{
    let mut app = App::spawn_with(|o| o.run_purger = false).await;
    let owner = app.add_user().await;
    let now = OffsetDateTime::now_utc();
    let mut stale = Vec::new();
    for _ in 0..3 {
        let token = app.add_token(owner, "production", Some(TOPIC)).await;
        app.registered_at(&token, now - 30 * DAY).await;
        stale.push(token);
    }
    // 40001 (serialization failure) says nothing about the request: it is tried again.
    refuse_to_purge(&app, &stale[1], "40001").await;
    publish_purge_requests(&app, &stale.iter().collect::<Vec<_>>()).await;
    app.start_purger();
    app.wait_for("the requests handed back and read again", || {
        purge::Counters::get(&app.purge_counters.requests) >= 9
            || purge::Counters::get(&app.purge_counters.dead_lettered) > 0
    })
    .await;
    assert_eq!(purge::Counters::get(&app.purge_counters.dead_lettered), 0);
    assert!(app.token_exists(&stale[1]).await);

    // Once the database takes the delete, the handed-back requests are purged.
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute("DROP TRIGGER refuse_purge ON push_tokens")
        .await
        .unwrap();
    app.wait_for("every request purged", || {
        purge::Counters::get(&app.purge_counters.acked) == 3
    })
    .await;
    for token in &stale {
        assert!(!app.token_exists(token).await);
    }
    assert_eq!(purge::Counters::get(&app.purge_counters.dead_lettered), 0);
    assert_eq!(app.depth(&app.names.purge).await, 0);
    assert_eq!(app.depth(&app.names.purge_dead).await, 0);
    app.stop().await;
}

/// Publishes a purge request for `token` straight to the purge queue.
async fn request_purge(
    app: &App,
    token: DeviceToken,
    invalid_since: OffsetDateTime,
    observed_at: OffsetDateTime,
) {
    Invalidation {
        token,
        environment: Environment::Production,
        topic: Some(TOPIC.into()),
        reason: "Unregistered".into(),
        invalid_since,
        observed_at,
    }
    .publish(&app.publisher, &app.names.purge)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_purge_request_dated_in_the_future_deletes_nothing() {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    let owner = app.add_user().await;
    // Registered a second ago; the requests claim the token invalid in the year 9999, or seen
    // invalid an hour from now: either would delete it if `invalid_since` were trusted.
    let fresh = app.add_token(owner, "production", Some(TOPIC)).await;
    let also = app.add_token(owner, "production", Some(TOPIC)).await;
    let now = OffsetDateTime::now_utc();
    let year_9999 = time::macros::datetime!(9999-01-01 00:00 UTC);
    let hour = time::Duration::hours(1);
    request_purge(&app, fresh.clone(), year_9999, now).await;
    request_purge(&app, also.clone(), now + hour, now + hour).await;
    // A sound request beside them still purges.
    let stale = app.add_token(owner, "production", Some(TOPIC)).await;
    app.registered_at(&stale, now - 30 * DAY).await;
    request_purge(&app, stale.clone(), now - DAY, now).await;
    app.wait_for("the requests judged", || {
        purge::Counters::get(&app.purge_counters.dead_lettered) == 2
            && purge::Counters::get(&app.purge_counters.purged) == 1
    })
    .await;
    assert!(
        app.token_exists(&fresh).await,
        "invalid_since in the future"
    );
    assert!(app.token_exists(&also).await, "observed_at in the future");
    assert!(!app.token_exists(&stale).await, "the sound request purges");
    let dead = app.drain(&app.names.purge_dead).await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("invalid_since 9999-01-01") && r.contains("lies after observed_at")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("observed_at") && r.contains("lies in the future")),
        "{reasons:?}"
    );
    // And through the function the tests and tools call directly, too.
    let request = Invalidation::parse(&dead[0].0).unwrap();
    let done = purge::delete_batch(&app.pool, &[request]).await.unwrap();
    assert_eq!(done, purge::Purged { purged: 0, kept: 1 });
    app.stop().await;
}

#[tokio::test]
async fn a_purge_request_for_another_platform_than_the_rows_deletes_nothing() {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    let owner = app.add_user().await;
    let iphone = app.add_token(owner, "production", Some(TOPIC)).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&iphone, now - 30 * DAY).await;
    // The same string read as an FCM token (its characters are valid there too): a request
    // about an Android phone must not delete an iPhone's row.
    let as_android = DeviceToken::parse_fcm(iphone.as_hex()).unwrap();
    request_purge(&app, as_android, now - DAY, now).await;
    app.wait_for("the request judged", || {
        purge::Counters::get(&app.purge_counters.acked) == 1
    })
    .await;
    assert_eq!(purge::Counters::get(&app.purge_counters.purged), 0);
    assert_eq!(purge::Counters::get(&app.purge_counters.kept), 1);
    assert!(app.token_exists(&iphone).await, "the iPhone's row stays");
    // The request of the row's own platform purges it.
    request_purge(&app, iphone.clone(), now - DAY, now).await;
    app.wait_for("the second request", || {
        purge::Counters::get(&app.purge_counters.acked) == 2
    })
    .await;
    assert!(!app.token_exists(&iphone).await);
    app.stop().await;
}
