//! One broker identity per gateway (`ringpush gateway`), the routing key as the authority on
//! who rang, and MQTT ingress — against the real broker (its management API and MQTT plugin,
//! which `.ci/run` enables), database and mock. Each test makes its own gateway users
//! (`t-gw-<hex>-…`), removed at the end even when it fails; no other user is touched.

use std::time::Duration;

use ringpush::broker::{self, Names};
use ringpush::gateway::{Added, Management};
use ringpush::ops::{MqttGateway, MqttTarget};
use ringpush::token::{random_hex, DeviceToken};
use ringpush::worker::Counters;

use crate::support::{amqp_url, App, TOPIC};

fn management_url() -> String {
    std::env::var("RINGPUSH_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// RabbitMQ's MQTT listener (`.ci/run` puts it on 1884: a mosquitto may hold 1883).
fn mqtt_addr() -> (String, u16) {
    let url = std::env::var("RINGPUSH_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1884".into());
    let url = url::Url::parse(&url).unwrap();
    (
        url.host_str().unwrap().to_owned(),
        url.port().unwrap_or(1883),
    )
}

/// The test's gateway users, removed when dropped (also on a panic).
struct Users {
    management: Management,
    ids: Vec<String>,
}

impl Users {
    fn new() -> Self {
        Self {
            management: Management::new(&management_url(), &amqp_url()),
            ids: Vec::new(),
        }
    }

    /// Creates gateway `id`'s identity; returns its password.
    async fn add(&mut self, names: &Names, id: &str) -> String {
        self.ids.push(id.to_owned());
        let password = ringpush::gateway::generate_password();
        let added = self.management.add(names, id, &password).await.unwrap();
        assert_eq!(added, Added::Created);
        password
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let (management, ids) = (self.management.clone(), std::mem::take(&mut self.ids));
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    for id in ids {
                        let _ = management.remove(&id).await;
                    }
                })
        })
        .join()
        .unwrap();
    }
}

/// Publishes `body` as gateway `id` with its own identity, under its own routing key
/// (confirmed); returns the connection, for the caller to close.
async fn publish_as(app: &App, id: &str, password: &str, body: &[u8]) -> lapin::Connection {
    let connection = broker::connect(&gateway_url(id, password), "t gateway")
        .await
        .unwrap();
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let props = lapin::BasicProperties::default().with_content_type("application/json".into());
    broker::publish_confirmed(
        &channel,
        &app.names.rings,
        &Names::ring_key(id),
        body,
        props,
    )
    .await
    .unwrap();
    connection
}

/// The AMQP URL of a gateway's identity.
fn gateway_url(id: &str, password: &str) -> String {
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_username(id).unwrap();
    url.set_password(Some(password)).unwrap();
    url.to_string()
}

fn mqtt_target(id: &str, password: &str) -> MqttTarget {
    let (host, port) = mqtt_addr();
    MqttTarget {
        host,
        port,
        user: id.to_owned(),
        password: password.to_owned(),
    }
}

/// Two gateways with their phones: (id, tokens) each; `a` has an owner with two phones and
/// a sharee with one.
async fn two_gateways(app: &App) -> ((String, Vec<DeviceToken>), (String, Vec<DeviceToken>)) {
    let hex = random_hex(4);
    let (a, b) = (format!("t-gw-{hex}-a"), format!("t-gw-{hex}-b"));
    let owner = app.add_user().await;
    let sharee = app.add_user().await;
    app.add_gateway(&a, owner, "Front door").await;
    app.share(&a, sharee).await;
    let tokens_a = vec![
        app.add_token(owner, "production", Some(TOPIC)).await,
        app.add_token(owner, "production", Some(TOPIC)).await,
        app.add_token(sharee, "production", Some(TOPIC)).await,
    ];
    let other = app.add_user().await;
    app.add_gateway(&b, other, "Garage").await;
    let tokens_b = vec![app.add_token(other, "production", Some(TOPIC)).await];
    ((a, tokens_a), (b, tokens_b))
}

/// The tokens the mock has accepted a notification for.
fn accepted_tokens(app: &App) -> Vec<String> {
    app.mock
        .received()
        .into_iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.token)
        .collect()
}

fn none_of(app: &App, tokens: &[DeviceToken]) {
    let accepted = accepted_tokens(app);
    for t in tokens {
        assert!(
            !accepted.iter().any(|a| a == t.as_hex()),
            "{} rang: {accepted:?}",
            t.short()
        );
    }
}

async fn wait_connected(app: &App) {
    app.wait_for("the worker consuming (topology declared)", || {
        app.counters
            .broker_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
}

#[tokio::test]
async fn a_gateway_identity_rings_its_own_door_over_amqp_and_the_broker_refuses_another() {
    let app = App::spawn().await;
    let ((a, tokens_a), (b, tokens_b)) = two_gateways(&app).await;
    let mut users = Users::new();
    let password = users.add(&app.names, &a).await;

    let connection = broker::connect(&gateway_url(&a, &password), "t gateway")
        .await
        .expect("the gateway's own identity connects");
    // Another gateway's routing key: the broker closes the channel with ACCESS_REFUSED.
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let refused = broker::publish_ring(&channel, &app.names, &App::ring(&b, Duration::ZERO)).await;
    let error = format!(
        "{:?}",
        refused.expect_err("ring.<b> is not gateway a's to publish")
    );
    assert!(error.contains("ACCESS_REFUSED"), "{error}");
    // It may not declare anything either.
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let declared = broker::declare(&channel, &Names::new(&format!("t-{}", random_hex(4)))).await;
    assert!(format!("{:?}", declared.unwrap_err()).contains("ACCESS_REFUSED"));

    // Its own key rings every phone of its gateway.
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let ring = App::ring(&a, Duration::ZERO);
    broker::publish_ring(&channel, &app.names, &ring)
        .await
        .expect("ring.<a> is gateway a's to publish");
    app.wait_acked(1).await;
    assert_eq!(app.ledger(std::slice::from_ref(&ring), &tokens_a), 0);
    none_of(&app, &tokens_b);
    assert_eq!(
        Counters::get(&app.counters.rings_consumed),
        1,
        "b's ring never got in"
    );
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

#[tokio::test]
async fn a_ring_whose_body_names_another_gateway_is_dead_lettered_and_rings_nobody() {
    let app = App::spawn().await;
    let ((a, tokens_a), (b, tokens_b)) = two_gateways(&app).await;
    let mut users = Users::new();
    let password = users.add(&app.names, &a).await;

    // Gateway a's stolen credentials, a body claiming gateway b, under a's own key (the only
    // key the broker lets it use).
    let forged = App::ring(&b, Duration::ZERO);
    let connection = publish_as(&app, &a, &password, &forged.to_json()).await;
    app.wait_acked(1).await;

    let dead = app.drain_dead().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, forged.to_json(), "the body as it came");
    assert!(
        dead[0].1.starts_with(&format!(
            "routing key ring.{a} names gateway {a:?}, but the body names {b:?}"
        )),
        "{}",
        dead[0].1
    );
    assert_eq!(Counters::get(&app.counters.rings_wrong_gateway), 1);
    assert_eq!(Counters::get(&app.counters.rings_dead_lettered), 1);
    none_of(&app, &tokens_a);
    none_of(&app, &tokens_b);
    assert!(app.mock.received().is_empty());
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

/// A retry envelope is trusted only from a retry tier (or handed back under the key it
/// carries): one a gateway publishes under its own key, naming another gateway's, rings nobody.
#[tokio::test]
async fn a_retry_envelope_forged_by_a_gateway_is_dead_lettered_and_rings_nobody() {
    let app = App::spawn().await;
    let ((a, tokens_a), (b, tokens_b)) = two_gateways(&app).await;
    let mut users = Users::new();
    let password = users.add(&app.names, &a).await;
    let ring = App::ring(&b, Duration::ZERO);
    let pending: Vec<&str> = tokens_b.iter().map(DeviceToken::as_hex).collect();
    let envelope =
        ringpush::wire::retry::write(&ring.to_json(), 1, &Names::ring_key(&b), &pending, 1 << 20)
            .remove(0);
    let connection = publish_as(&app, &a, &password, &envelope).await;
    app.wait_acked(1).await;
    let dead = app.drain_dead().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0]
            .1
            .starts_with("the routing key names no gateway: a retry envelope carrying"),
        "{}",
        dead[0].1
    );
    assert_eq!(Counters::get(&app.counters.rings_wrong_gateway), 1);
    none_of(&app, &tokens_a);
    none_of(&app, &tokens_b);
    let _ = connection.close(200, "done".into()).await;
    app.stop().await;
}

#[tokio::test]
async fn over_mqtt_a_gateway_rings_its_own_door_and_is_refused_anothers() {
    let app = App::spawn_with(|o| o.worker.names.mqtt_ingress = true).await;
    let ((a, tokens_a), (b, tokens_b)) = two_gateways(&app).await;
    let mut users = Users::new();
    let password = users.add(&app.names, &a).await;
    // The worker binds amq.topic → its rings exchange when it declares.
    wait_connected(&app).await;

    // `ringpush ring --mqtt`'s client: QoS 1 to ring/<a>, PUBACKed.
    let mut gateway = MqttGateway::connect(&mqtt_target(&a, &password), &a);
    let ring = App::ring(&a, Duration::ZERO);
    gateway
        .publish(&ring)
        .await
        .expect("PUBACK for its own topic");
    gateway.disconnect().await;
    app.wait_acked(1).await;
    assert_eq!(app.ledger(std::slice::from_ref(&ring), &tokens_a), 0);

    // Another gateway's topic: no PUBACK, the broker closes the connection.
    let mut gateway = MqttGateway::connect(&mqtt_target(&a, &password), &a);
    let refused = gateway.publish(&App::ring(&b, Duration::ZERO)).await;
    assert!(refused.is_err(), "ring/<b> is not gateway a's to publish");
    // Its own ring after it arrives; the refused one never did.
    let mut gateway = MqttGateway::connect(&mqtt_target(&a, &password), &a);
    gateway
        .publish(&App::ring(&a, Duration::ZERO))
        .await
        .unwrap();
    gateway.disconnect().await;
    app.wait_acked(2).await;
    none_of(&app, &tokens_b);
    assert_eq!(Counters::get(&app.counters.rings_consumed), 2);
    assert_eq!(Counters::get(&app.counters.rings_dead_lettered), 0);

    // A wrong password gets no MQTT connection at all.
    let mut intruder = MqttGateway::connect(&mqtt_target(&a, "not-the-password"), &a);
    assert!(intruder
        .publish(&App::ring(&a, Duration::ZERO))
        .await
        .is_err());
    app.stop().await;
}

#[tokio::test]
async fn add_is_idempotent_rotate_replaces_the_password_and_remove_closes_the_door() {
    let names = Names::new(&format!("t-{}", random_hex(4)));
    let mut users = Users::new();
    let id = format!("t-gw-{}", random_hex(4));
    let first = users.add(&names, &id).await;
    let connects = |password: String| {
        let url = gateway_url(&id, &password);
        async move {
            match broker::connect(&url, "t gateway").await {
                Ok(c) => {
                    let _ = c.close(200, "done".into()).await;
                    true
                }
                Err(_) => false,
            }
        }
    };
    assert!(connects(first.clone()).await);

    // A second add changes nothing: the first password still works, the second never did.
    let m = &users.management;
    assert_eq!(m.add(&names, &id, "other").await.unwrap(), Added::Exists);
    assert!(connects(first.clone()).await);
    assert!(!connects("other".into()).await);
    let listed = m.list().await.unwrap();
    let me = listed.iter().find(|i| i.gateway_id == id).expect("listed");
    let key = format!("^ring\\.{}$", id.replace('-', "\\-"));
    assert_eq!(me.may_publish.len(), 2, "{me:?}");
    assert!(me.may_publish.iter().all(|(_, k)| *k == key), "{me:?}");
    assert!(
        !listed.iter().any(|i| i.gateway_id == "guest"),
        "only gateways are listed"
    );

    // Rotate: the old password is refused, the new one works, and a connection opened with
    // the old one is closed.
    let open = broker::connect(&gateway_url(&id, &first), "t gateway")
        .await
        .unwrap();
    let second = ringpush::gateway::generate_password();
    m.rotate(&id, &second).await.unwrap();
    let closed = async {
        while open.status().connected() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the connection with the old password is closed");
    assert!(!connects(first).await);
    assert!(connects(second.clone()).await);

    // Remove: the door is closed.
    assert!(m.remove(&id).await.unwrap());
    assert!(!connects(second).await);
    assert!(
        !m.remove(&id).await.unwrap(),
        "a second remove changes nothing"
    );
    assert!(!m.list().await.unwrap().iter().any(|i| i.gateway_id == id));

    // Ids that are not gateway ids, and users that are not gateways, are refused.
    for bad in ["a.b", "ring/x", "retry", ""] {
        assert!(m.add(&names, bad, "pw").await.is_err(), "{bad:?}");
    }
    assert!(m.add(&names, "guest", "pw").await.is_err());
    assert!(m.rotate("guest", "pw").await.is_err());
    assert!(m.remove("guest").await.is_err());
    // guest still works.
    assert!(broker::connect(&amqp_url(), "t guest").await.is_ok());
}

/// `ringpush ring --password-file` as a gateway: publishes with its own identity, declaring
/// nothing (it may not).
#[tokio::test]
async fn ringpush_ring_publishes_as_a_gateway_identity() {
    let app = App::spawn().await;
    let ((a, tokens_a), _) = two_gateways(&app).await;
    let mut users = Users::new();
    let password = users.add(&app.names, &a).await;
    let url = gateway_url(&a, &password);
    ringpush::ops::ring(
        &url,
        &app.names,
        &a,
        1,
        1,
        &ringpush::ops::Via::Amqp { declare: false },
        None,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("rings without configure permission");
    app.wait_acked(1).await;
    app.wait_for("every phone of a rang", || {
        accepted_tokens(&app).len() >= tokens_a.len()
    })
    .await;
    app.stop().await;
}
