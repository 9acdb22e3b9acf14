//! Each ringpush process's own broker identity (`ringpush service`), least privilege per
//! role, against the real broker and its management API (which `.ci/run` enables): each
//! role's identity does its job — the real process runs with it — and nothing else. Each
//! test makes its own users (`t-svc-<hex>-<role>`) for its own queue prefix, removed at the
//! end even when it fails; no other user is touched.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use ringpush::broker::{self, Names};
use ringpush::gateway::Management;
use ringpush::mock::FailFirst;
use ringpush::service::{self, Added, Role};
use ringpush::token::random_hex;
use ringpush::wire::feedback::Invalidation;
use ringpush::{feedback, purge};
use time::OffsetDateTime;

use crate::support::{amqp_url, gateway, terminate, App, TestQueues};

fn management_url() -> String {
    std::env::var("RINGPUSH_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// The test's service users, removed when dropped (also on a panic).
struct Identities {
    management: Management,
    names: Vec<String>,
    hex: String,
}

impl Identities {
    fn new() -> Self {
        Self {
            management: Management::new(&management_url(), &amqp_url()),
            names: Vec::new(),
            hex: random_hex(4),
        }
    }

    /// Creates `role`'s identity for `names` (declaring their topology); returns its AMQP URL.
    async fn add(&mut self, names: &Names, role: Role) -> String {
        let name = format!("t-svc-{}-{role}", self.hex);
        self.names.push(name.clone());
        let password = ringpush::gateway::generate_password();
        let added = service::add(&self.management, names, role, &name, &password)
            .await
            .unwrap();
        assert_eq!(added, Added::Created);
        url_of(&name, &password)
    }
}

impl Drop for Identities {
    fn drop(&mut self) {
        let (management, names) = (self.management.clone(), std::mem::take(&mut self.names));
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    for name in names {
                        let _ = service::remove(&management, &name).await;
                    }
                })
        })
        .join()
        .unwrap();
    }
}

/// The AMQP URL of a user.
fn url_of(user: &str, password: &str) -> String {
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_username(user).unwrap();
    url.set_password(Some(password)).unwrap();
    url.to_string()
}

/// Something an identity may try on the broker.
#[derive(Debug, Clone, Copy)]
enum Try<'a> {
    /// Take a message off a queue (`basic.get`).
    Read(&'a str),
    /// Publish to an exchange with a routing key (confirmed).
    Publish(&'a str, &'a str),
    /// Declare a queue (that exists, with the same arguments) or delete one.
    Declare(&'a str),
    Delete(&'a str),
}

/// Tries `what` as the identity of `url` on a connection of its own: `Err` with the broker's
/// refusal (a refused connection's starts with `connect:`).
async fn attempt(url: &str, what: Try<'_>) -> Result<(), String> {
    let connection = broker::connect(url, "t service identity")
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let channel = broker::confirm_channel(&connection)
        .await
        .map_err(|e| e.to_string())?;
    let result = match what {
        Try::Read(queue) => channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Try::Publish(exchange, key) => {
            let props = BasicProperties::default();
            broker::publish_confirmed(&channel, exchange, key, b"{}", props)
                .await
                .map_err(|e| e.to_string())
        }
        Try::Declare(queue) => {
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            let quorum = FieldTable::from(std::collections::BTreeMap::from([(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString("quorum".into()),
            )]));
            channel
                .queue_declare(queue.into(), durable, quorum)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Try::Delete(queue) => channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let _ = connection.close(200, "done".into()).await;
    result
}

/// Checks the identity of `url` logs in and may do `allowed` (reading its own queue), and
/// that the broker refuses it every one of `refused`.
async fn allowed_only(url: &str, allowed: Try<'_>, refused: &[Try<'_>]) {
    attempt(url, allowed)
        .await
        .unwrap_or_else(|e| panic!("{allowed:?} is allowed: {e}"));
    for what in refused {
        let e = attempt(url, *what)
            .await
            .expect_err(&format!("{what:?} is refused"));
        assert!(
            e.contains("ACCESS_REFUSED") && !e.starts_with("connect:"),
            "{what:?}: {e}"
        );
    }
}

/// Waits (60 s at most) for `done`.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_worker_identity_delivers_retries_dead_letters_and_reports_and_can_do_nothing_else() {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    let mut ids = Identities::new();
    let url = ids.add(&app.names, Role::Worker).await;
    let n = &app.names;
    let tokens = gateway(&app, "gw-w", 2).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&tokens[1], now - Duration::from_secs(86_400))
        .await;
    app.mock
        .unregister(&tokens[1], (now.unix_timestamp() - 3_600) * 1_000);
    // Its first push fails: the ring goes through a retry tier and comes back.
    app.mock.fail_first(Some(FailFirst {
        count: 1,
        status: 500,
        reason: ringpush::apns::Reason::InternalServerError,
    }));
    // The real `ringpush worker`, as this identity.
    let mut worker = app.worker_process(&[("RINGPUSH_AMQP_URL", &url)]);
    let ring = App::ring("gw-w", Duration::ZERO);
    app.publish(&ring).await;
    app.publish_raw(b"not a ring").await;
    until(
        "the ring delivered, the token purged, the malformed one dead",
        async || {
            app.unaccepted(std::slice::from_ref(&ring), &tokens[..1]) == 0
                && purge::Counters::get(&app.purge_counters.purged) == 1
                && app.depth(&n.dead).await == 1
        },
    )
    .await;
    assert!(
        app.mock.received().iter().any(|r| r.status == 500),
        "the first push failed and was retried"
    );
    // Nothing else: no other queue to read, no queue reached but through its own keys, no
    // default exchange, nothing to declare or delete.
    allowed_only(
        &url,
        Try::Read(&n.rings),
        &[
            Try::Read(&n.purge),
            Try::Read(&n.feedback),
            Try::Read(&n.dead),
            Try::Publish(&n.internal, &n.purge),
            Try::Publish(&n.internal, &n.purge_dead),
            Try::Publish("", &n.purge),
            Try::Publish("", &n.rings),
            Try::Publish(broker::MQTT_EXCHANGE, "ring.gw-w"),
            Try::Publish(&n.rings, "ringpush.purge"),
            Try::Declare(&n.purge),
            Try::Delete(&n.rings),
        ],
    )
    .await;
    terminate(&mut worker).await;
    app.stop().await;
}

#[tokio::test]
async fn a_feedback_identity_turns_events_into_purge_requests_and_cannot_publish_a_ring() {
    let mut app = App::spawn_with(|o| o.run_feedback = false).await;
    let mut ids = Identities::new();
    let url = ids.add(&app.names, Role::Feedback).await;
    let n = app.names.clone();
    app.start_feedback_at(url.clone());
    let owner = app.add_user().await;
    let token = app.add_token(owner, "production", None).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&token, now - Duration::from_secs(86_400))
        .await;
    let event = Invalidation {
        token: token.clone(),
        environment: ringpush::token::Environment::Production,
        topic: None,
        reason: "Unregistered".into(),
        invalid_since: now - Duration::from_secs(3_600),
        observed_at: now,
    };
    event.publish(&app.publisher, &n.feedback).await.unwrap();
    app.publisher
        .to_queue(&n.feedback, b"[]", BasicProperties::default())
        .await
        .unwrap();
    app.wait_for("the purge request purged, the malformed event dead", || {
        purge::Counters::get(&app.purge_counters.purged) == 1
            && feedback::Counters::get(&app.feedback_counters.dead_lettered) == 1
    })
    .await;
    assert!(!app.token_exists(&token).await);
    allowed_only(
        &url,
        Try::Read(&n.feedback),
        &[
            Try::Publish(&n.rings, "ring.gw-x"),
            Try::Publish("", &n.rings),
            Try::Publish(&n.internal, &n.rings),
            Try::Publish(&n.internal, &n.retry[0]),
            Try::Publish(&n.internal, &n.dead),
            Try::Read(&n.rings),
            Try::Read(&n.purge),
            Try::Declare(&n.feedback),
            Try::Delete(&n.purge),
        ],
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_purge_identity_deletes_reported_tokens_and_cannot_publish_a_ring_or_a_purge_request() {
    let mut app = App::spawn_with(|o| o.run_purger = false).await;
    let mut ids = Identities::new();
    let url = ids.add(&app.names, Role::Purge).await;
    let n = app.names.clone();
    app.start_purger_at(url.clone());
    let owner = app.add_user().await;
    let token = app.add_token(owner, "production", None).await;
    let now = OffsetDateTime::now_utc();
    app.registered_at(&token, now - Duration::from_secs(86_400))
        .await;
    let request = Invalidation {
        token: token.clone(),
        environment: ringpush::token::Environment::Production,
        topic: None,
        reason: "Unregistered".into(),
        invalid_since: now - Duration::from_secs(3_600),
        observed_at: now,
    };
    request.publish(&app.publisher, &n.purge).await.unwrap();
    app.publisher
        .to_queue(&n.purge, b"[]", BasicProperties::default())
        .await
        .unwrap();
    app.wait_for("the token purged, the malformed request dead", || {
        purge::Counters::get(&app.purge_counters.purged) == 1
            && purge::Counters::get(&app.purge_counters.dead_lettered) == 1
    })
    .await;
    assert!(!app.token_exists(&token).await);
    assert_eq!(app.drain(&n.purge_dead).await.len(), 1);
    allowed_only(
        &url,
        Try::Read(&n.purge),
        &[
            // No ring: not to the rings exchange, nor to the rings queue by another way.
            Try::Publish(&n.rings, "ring.gw-x"),
            Try::Publish("", &n.rings),
            Try::Publish(&n.internal, &n.rings),
            Try::Publish(&n.internal, &n.retry[0]),
            Try::Publish(broker::MQTT_EXCHANGE, "ring.gw-x"),
            // No purge request of its own making.
            Try::Publish(&n.internal, &n.purge),
            Try::Publish("", &n.purge),
            Try::Read(&n.feedback),
            Try::Read(&n.rings),
            Try::Declare(&n.purge),
            Try::Delete(&n.purge),
        ],
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_monitor_identity_reads_queue_depths_through_the_management_api_and_nothing_else() {
    let app = App::spawn_with(|o| o.run_worker = false).await;
    let n = &app.names;
    // Made as an operator does: the command, its generated password alone on stdout.
    let mut ids = Identities::new();
    let name = format!("t-svc-{}-monitor", ids.hex);
    ids.names.push(name.clone());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .args(["service", "add", "monitor", &name])
        .env("RINGPUSH_QUEUE_PREFIX", &n.prefix)
        .env("RINGPUSH_MANAGEMENT_URL", management_url())
        .env("RINGPUSH_AMQP_URL", amqp_url())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let password = String::from_utf8(out.stdout).unwrap().trim_end().to_owned();
    assert_eq!(password.len(), 40, "one line: the password");
    for _ in 0..3 {
        app.publish(&App::ring("gw-depth", Duration::ZERO)).await;
    }
    // What KEDA's rabbitmq scaler asks (protocol http): the rings queue's depth.
    let mut base = url::Url::parse(&management_url()).unwrap();
    base.set_username(&name).unwrap();
    base.set_password(Some(&password)).unwrap();
    let base = base.as_str().trim_end_matches('/').to_owned();
    let vhost = ringpush::ops::vhost_of(&amqp_url());
    let get = |path: String| {
        let url = format!("{base}/api/{path}");
        async move {
            ringpush::http::get(&url, Duration::from_secs(10))
                .await
                .unwrap()
        }
    };
    until("the management API shows 3 rings", async || {
        let r = get(format!("queues/{vhost}/{}", n.rings)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let q: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        q["messages"] == 3
    })
    .await;
    // `ringpush queues` as this identity: from the management API alone.
    let monitor_url = url_of(&name, &password);
    until("ringpush queues shows them", async || {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
            .arg("queues")
            .env("RINGPUSH_QUEUE_PREFIX", &n.prefix)
            .env("RINGPUSH_AMQP_URL", &monitor_url)
            .env("RINGPUSH_MANAGEMENT_URL", &base)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let table = String::from_utf8(out.stdout).unwrap();
        table.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.first() == Some(&n.rings.as_str()) && cells.get(1) == Some(&"3")
        })
    })
    .await;
    // Nothing else: no AMQP connection at all, no message through the management API, no
    // other API.
    let e = attempt(&monitor_url, Try::Read(&n.rings))
        .await
        .unwrap_err();
    assert!(
        e.contains("not allowed") || e.contains("NOT_ALLOWED"),
        "{e}"
    );
    let peek = format!("{base}/api/queues/{vhost}/{}/get", n.rings);
    let body = serde_json::json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"});
    let r = ringpush::http::request(
        hyper::Method::POST,
        &peek,
        Some(&body),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(r.status, 401 | 403), "{}: {}", r.status, r.body);
    let publish = format!("{base}/api/exchanges/{vhost}/{}/publish", n.rings);
    let body = serde_json::json!({"properties": {}, "routing_key": "ring.gw-depth", "payload": "{}", "payload_encoding": "string"});
    let r = ringpush::http::request(
        hyper::Method::POST,
        &publish,
        Some(&body),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(r.status, 401 | 403), "{}: {}", r.status, r.body);
    for path in [
        "users",
        "definitions",
        &format!("permissions/{vhost}/guest"),
    ] {
        let r = get(path.to_owned()).await;
        assert!(matches!(r.status, 401 | 403), "{path}: {}", r.status);
    }
    assert_eq!(app.depth(&n.rings).await, 3, "nothing taken");
    app.stop().await;
}

#[tokio::test]
async fn service_add_declares_the_topology_a_role_waits_for_and_repairs_what_drifted() {
    let names = Names::new(&format!("t-{}", random_hex(6)));
    let _queues = TestQueues(names.clone());
    let mut ids = Identities::new();
    let url = ids.add(&names, Role::Purge).await;
    // The processes declare the very same topology over AMQP (no argument differs).
    let connection = broker::connect(&amqp_url(), "t guest").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    broker::declare(&channel, &names).await.unwrap();
    // Without it, a role's process waits, then starts once an administrator declares it.
    broker::delete(&channel, &names).await.unwrap();
    let counters = std::sync::Arc::new(purge::Counters::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let pool =
        ringpush::db::pool(&crate::support::database_url(), 1, Duration::from_secs(5)).unwrap();
    let purger = purge::Process {
        settings: purge::Settings::new(names.clone()),
        amqp_url: url.clone().into(),
        pool,
        counters: counters.clone(),
    };
    let running = tokio::spawn(purger.run(cancel.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connected = || {
        counters
            .broker_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(!connected(), "no topology: the purger waits");
    let name = ids.names[0].clone();
    let again = service::add(&ids.management, &names, Role::Purge, &name, "unused")
        .await
        .unwrap();
    assert_eq!(again, Added::Exists, "the identity is unchanged");
    until("the purger consumes", async || connected()).await;
    // A permission changed by hand is set back by `add`, the password kept.
    let vhost = ringpush::ops::vhost_of(&amqp_url());
    let widened = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    let put = format!("{}/api/permissions/{vhost}/{name}", management_url());
    let r = ringpush::http::request(
        hyper::Method::PUT,
        &put,
        Some(&widened),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(r.status < 300, "{r:?}");
    let again = service::add(&ids.management, &names, Role::Purge, &name, "unused")
        .await
        .unwrap();
    assert_eq!(again, Added::Repaired);
    // Its password still works; what was widened is not.
    allowed_only(&url, Try::Read(&names.purge), &[Try::Read(&names.rings)]).await;
    let listed = service::list(&ids.management).await.unwrap();
    let me = listed.iter().find(|i| i.name == name).unwrap();
    assert_eq!(me.role, Role::Purge);
    assert_eq!(
        me.permissions.as_ref().unwrap().2,
        format!(
            r"^({})$",
            names.purge.replace('-', r"\-").replace('.', r"\.")
        )
    );
    cancel.cancel();
    running.await.unwrap().unwrap();
    let _ = connection.close(200, "done".into()).await;
}
