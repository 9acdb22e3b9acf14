//! Android phones through FCM HTTP v1, against `mock-fcm` over real TLS and HTTP/2, with
//! the real broker and database: every platform and kind gets exactly its request; a 401
//! renews the access token once and loses nothing; `Retry-After` delays only the tokens it
//! was about; UNREGISTERED purges (a re-registered token is kept); a cut connection loses
//! nothing; without FCM credentials Android tokens are counted unconfigured and iPhones
//! still ring.

use std::collections::HashMap;
use std::time::Duration;

use ringpush::mock_fcm::Script;
use ringpush::token::DeviceToken;
use ringpush::worker::Counters;
use time::OffsetDateTime;

use crate::calls::add_apns_token;
use crate::support::{nothing_waiting_or_dead, App, TOPIC};

pub(crate) fn fcm_settings() -> ringpush::fcm::Settings {
    let placeholder = ringpush::http2::Endpoint::parse("https://localhost").unwrap();
    ringpush::fcm::Settings::new(placeholder)
}

async fn with_fcm() -> App {
    App::spawn_with(|o| o.fcm = Some(fcm_settings())).await
}

/// Registers an Android token of `kind` for `user`.
pub(crate) async fn add_fcm_token(app: &App, user: i64, kind: &str) -> DeviceToken {
    let token = ringpush::db::random_token(ringpush::token::Platform::FCM);
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO push_tokens (token, user_id, platform, kind) VALUES ($1, $2, 'fcm', $3)",
            &[&token, &user, &kind],
        )
        .await
        .unwrap();
    DeviceToken::parse_fcm(&token).unwrap()
}

/// The FCM mock's accepted (event, token) pairs, with how often each was accepted.
pub(crate) fn fcm_accepted(app: &App) -> HashMap<(String, String), usize> {
    let mut accepted = HashMap::new();
    for r in app.fcm.as_ref().unwrap().received() {
        if r.status == 200 {
            let event = r.body["message"]["data"]["event_id"]
                .as_str()
                .unwrap()
                .to_owned();
            *accepted.entry((event, r.token.unwrap())).or_default() += 1;
        }
    }
    accepted
}

#[tokio::test]
async fn every_phone_of_owner_and_sharees_gets_exactly_its_request() {
    let app = with_fcm().await;
    let (owner, bob, carol) = (
        app.add_user().await,
        app.add_user().await,
        app.add_user().await,
    );
    app.add_gateway("gw-mixed", owner, "Front door").await;
    app.share("gw-mixed", bob).await;
    app.share("gw-mixed", carol).await;
    let ios_alert = add_apns_token(&app, owner, "alert", Some(TOPIC)).await;
    let ios_call = add_apns_token(&app, bob, "call", Some(TOPIC)).await;
    let android_alert = add_fcm_token(&app, carol, "alert").await;
    let android_call = add_fcm_token(&app, bob, "call").await;
    let ring = App::ring("gw-mixed", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_for("the ring delivered", || {
        Counters::get(&app.counters.rings_delivered) == 1
    })
    .await;
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 4);

    let apns: HashMap<String, _> = app
        .mock
        .received()
        .into_iter()
        .map(|r| (r.token.clone().unwrap(), r))
        .collect();
    assert_eq!(apns.len(), 2, "one APNs request per iPhone");
    let push_type = |t: &DeviceToken| apns[t.as_str()].headers["apns-push-type"].clone();
    assert_eq!(push_type(&ios_alert), "alert");
    assert_eq!(push_type(&ios_call), "voip");
    assert_eq!(
        apns[ios_call.as_str()].headers["apns-topic"],
        format!("{TOPIC}.voip").as_str()
    );

    let fcm = app.fcm.as_ref().unwrap().received();
    assert_eq!(fcm.len(), 2, "one FCM request per Android phone");
    let by_token: HashMap<String, serde_json::Value> = fcm
        .into_iter()
        .map(|r| (r.token.unwrap(), r.body))
        .collect();
    let alert = &by_token[android_alert.as_str()]["message"];
    let call = &by_token[android_call.as_str()]["message"];
    let pressed_at = ring.pressed_at_rfc3339();
    for (m, kind) in [(alert, "alert"), (call, "call")] {
        assert_eq!(
            m["data"],
            serde_json::json!({"kind": kind, "event_id": ring.event_id, "gateway_id": "gw-mixed",
                               "gateway_name": "Front door", "pressed_at": pressed_at})
        );
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["android"]["collapse_key"], "gw-mixed");
        let ttl: u64 = m["android"]["ttl"]
            .as_str()
            .unwrap()
            .trim_end_matches('s')
            .parse()
            .unwrap();
        assert!(
            (50..=60).contains(&ttl),
            "ttl {ttl}s is the ring's time left"
        );
    }
    assert_eq!(alert["notification"]["title"], "Front door");
    assert_eq!(
        alert["android"]["notification"],
        serde_json::json!({"channel_id": "doorbell", "tag": ring.event_id, "sound": "default"})
    );
    assert!(call.get("notification").is_none() && call["android"].get("notification").is_none());
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_401_mid_run_renews_the_access_token_once_and_loses_nothing() {
    let app = with_fcm().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-401", owner, "Door").await;
    let mut tokens = Vec::new();
    for _ in 0..6 {
        tokens.push(add_fcm_token(&app, owner, "alert").await);
    }
    let first = App::ring("gw-401", Duration::ZERO);
    app.publish(&first).await;
    app.wait_acked(1).await;
    let mock = app.fcm.as_ref().unwrap();
    assert_eq!(mock.stats().tokens_issued, 1, "one token for every request");
    // The token stops working while the worker still thinks it good.
    mock.expire_access_tokens();
    let rings: Vec<_> = (0..3)
        .map(|_| App::ring("gw-401", Duration::ZERO))
        .collect();
    for ring in &rings {
        app.publish(ring).await;
    }
    app.wait_acked(4).await;
    let stats = mock.stats();
    assert!(stats.unauthenticated >= 1, "{stats:?}");
    assert_eq!(
        stats.tokens_issued, 2,
        "renewed once for every request that met the 401"
    );
    let accepted = fcm_accepted(&app);
    for ring in std::iter::once(&first).chain(&rings) {
        for t in &tokens {
            assert!(
                accepted.contains_key(&(ring.event_id.clone(), t.as_str().to_owned())),
                "{} never reached {t}",
                ring.event_id
            );
        }
    }
    assert_eq!(
        Counters::get(&app.counters.rings_retried),
        0,
        "resent at once, no retry tier"
    );
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn retry_after_delays_only_the_tokens_it_was_about() {
    let app = with_fcm().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-429", owner, "Door").await;
    let busy = add_fcm_token(&app, owner, "alert").await;
    let free = add_fcm_token(&app, owner, "call").await;
    let mock = app.fcm.as_ref().unwrap();
    mock.script(
        busy.as_str(),
        Script {
            status: 429,
            code: "QUOTA_EXCEEDED".into(),
            retry_after: Some(2),
            times: 1,
        },
    );
    app.publish(&App::ring("gw-429", Duration::ZERO)).await;
    app.wait_for("the ring delivered", || {
        Counters::get(&app.counters.rings_delivered) == 1
    })
    .await;
    let received = mock.received();
    let at = |token: &DeviceToken, status: u16| {
        received
            .iter()
            .find(|r| r.token.as_deref() == Some(token.as_str()) && r.status == status)
            .unwrap_or_else(|| panic!("{token} answered {status}"))
            .at
    };
    let (refused, accepted) = (at(&busy, 429), at(&busy, 200));
    let waited = accepted - refused;
    assert!(
        waited >= Duration::from_secs(2),
        "waited {waited:?}, Retry-After said 2 s"
    );
    assert!(at(&free, 200) < accepted, "the other token did not wait");
    assert_eq!(Counters::get(&app.counters.rings_retried), 0);
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 2);
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn an_unregistered_android_token_is_purged_and_a_re_registered_one_kept() {
    let app = with_fcm().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-stale", owner, "Door").await;
    let stale = add_fcm_token(&app, owner, "alert").await;
    let back = add_fcm_token(&app, owner, "call").await;
    let alive = add_fcm_token(&app, owner, "alert").await;
    // `back` was registered again after FCM's answer will be given.
    app.registered_at(&back, OffsetDateTime::now_utc() + time::Duration::hours(1))
        .await;
    app.fcm.as_ref().unwrap().faults(|f| {
        f.unregistered.insert(stale.as_str().to_owned());
        f.unregistered.insert(back.as_str().to_owned());
    });
    app.publish(&App::ring("gw-stale", Duration::ZERO)).await;
    app.wait_for("two tokens judged by the purger", || {
        let c = &app.purge_counters;
        ringpush::purge::Counters::get(&c.purged) + ringpush::purge::Counters::get(&c.kept) >= 2
    })
    .await;
    assert!(!app.token_exists(&stale).await, "the stale token is purged");
    assert!(
        app.token_exists(&back).await,
        "the re-registered token is kept"
    );
    assert!(app.token_exists(&alive).await);
    assert_eq!(app.counters.rejected("UNREGISTERED"), 2);
    assert_eq!(Counters::get(&app.counters.feedback_events), 2);
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn a_cut_connection_loses_no_android_ring() {
    let app = with_fcm().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-cut", owner, "Door").await;
    let mut tokens = Vec::new();
    for _ in 0..8 {
        tokens.push(add_fcm_token(&app, owner, "alert").await);
    }
    let mock = app.fcm.as_ref().unwrap();
    // The first send opens the access token; from then on a connection is dropped, with
    // whatever it carries, when its third stream arrives.
    mock.faults(|f| f.close_after = Some(3));
    let ring = App::ring("gw-cut", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_for("a connection cut", || mock.stats().cut >= 1)
        .await;
    mock.faults(|f| f.close_after = None);
    app.wait_for("the ring delivered", || {
        Counters::get(&app.counters.rings_delivered) == 1
    })
    .await;
    let accepted = fcm_accepted(&app);
    for t in &tokens {
        assert!(
            accepted.contains_key(&(ring.event_id.clone(), t.as_str().to_owned())),
            "{t} lost"
        );
    }
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn without_fcm_credentials_android_is_unconfigured_and_iphones_still_ring() {
    let app = App::spawn().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-ios-only", owner, "Door").await;
    add_apns_token(&app, owner, "alert", Some(TOPIC)).await;
    add_fcm_token(&app, owner, "alert").await;
    add_fcm_token(&app, owner, "call").await;
    app.publish(&App::ring("gw-ios-only", Duration::ZERO)).await;
    app.wait_for("the ring delivered", || {
        Counters::get(&app.counters.rings_delivered) == 1
    })
    .await;
    assert_eq!(Counters::get(&app.counters.notifications_accepted), 1);
    assert_eq!(Counters::get(&app.counters.notifications_unconfigured), 2);
    assert_eq!(
        Counters::get(&app.counters.rings_retried),
        0,
        "never retried"
    );
    assert_eq!(app.mock.received().len(), 1);
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn metrics_count_per_platform_and_readyz_says_when_fcm_refuses_the_credentials() {
    let app = App::spawn_with(|o| {
        o.fcm = Some(fcm_settings());
        o.metrics = true;
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-ops", owner, "Door").await;
    add_apns_token(&app, owner, "alert", Some(TOPIC)).await;
    add_fcm_token(&app, owner, "alert").await;
    app.publish(&App::ring("gw-ops", Duration::ZERO)).await;
    app.wait_acked(1).await;
    let (_, metrics) = app.scrape("/metrics").await;
    for line in [
        r#"ringpush_platform_notifications_total{app="default",platform="apns",outcome="accepted"} 1"#,
        r#"ringpush_platform_notifications_total{app="default",platform="fcm",outcome="accepted"} 1"#,
        r#"ringpush_provider_up{platform="fcm"} 1"#,
        r#"ringpush_provider_up{platform="apns"} 1"#,
        r#"ringpush_fcm_token_renewals_total{app="default",outcome="ok"} 1"#,
        "ringpush_fcm_request_seconds_count 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    let (status, _) = app.scrape("/readyz").await;
    assert_eq!(status, 200);
    // The project's service account is deleted: the token endpoint refuses the worker's
    // assertions, and its access token is answered 401.
    let mock = app.fcm.as_ref().unwrap();
    for account in mock.accounts() {
        mock.remove_account(&account);
    }
    let ring = App::ring("gw-ops", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_for("the iPhone rang again", || {
        Counters::get(&app.counters.notifications_accepted) >= 3
    })
    .await;
    // `/readyz` answers from a state at most a second old.
    let since = std::time::Instant::now();
    let (status, body) = loop {
        let (status, body) = app.scrape("/readyz").await;
        if status == 503 || since.elapsed() > Duration::from_secs(5) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("FCM"), "{body}");
    let (_, metrics) = app.scrape("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"ringpush_provider_up{platform="fcm"} 0"#),
        "{metrics}"
    );
    assert_eq!(Counters::get(&app.counters.rings_dead_lettered), 0);
    app.stop().await;
}

#[tokio::test]
async fn goaway_resends_what_fcm_did_not_process_and_a_503_burst_is_retried() {
    let app = with_fcm().await;
    let owner = app.add_user().await;
    app.add_gateway("gw-away", owner, "Door").await;
    let mut tokens = Vec::new();
    for _ in 0..6 {
        tokens.push(add_fcm_token(&app, owner, "alert").await);
    }
    let mock = app.fcm.as_ref().unwrap();
    mock.faults(|f| f.goaway_after = Some(2));
    let first = App::ring("gw-away", Duration::ZERO);
    app.publish(&first).await;
    app.wait_acked(1).await;
    assert!(mock.stats().goaways >= 1, "{:?}", mock.stats());
    assert_eq!(
        Counters::get(&app.counters.rings_retried),
        0,
        "streams sent away are resent at once, on a new connection"
    );
    mock.faults(|f| f.goaway_after = None);
    // The next three sends answer 503 UNAVAILABLE: those tokens go to a retry tier.
    mock.fail_next(3, 503, "UNAVAILABLE", None);
    let second = App::ring("gw-away", Duration::ZERO);
    app.publish(&second).await;
    app.wait_for("the second ring delivered after its retry", || {
        Counters::get(&app.counters.rings_delivered) == 2
    })
    .await;
    assert!(Counters::get(&app.counters.rings_retried) >= 1);
    let accepted = fcm_accepted(&app);
    for ring in [&first, &second] {
        for t in &tokens {
            let n = accepted.get(&(ring.event_id.clone(), t.as_str().to_owned()));
            assert_eq!(n, Some(&1), "{} to {t}: accepted once", ring.event_id);
        }
    }
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn the_mock_token_endpoint_answers_over_http1_as_real_oauth_clients_speak_it() {
    use http_body_util::{BodyExt, Full};
    let dir =
        std::env::temp_dir().join(format!("ringpush-test-{}", ringpush::token::random_hex(6)));
    let cancel = tokio_util::sync::CancellationToken::new();
    let mock = ringpush::mock_fcm::MockFcm::start(
        ringpush::mock_fcm::Settings::local(dir.join("certs")),
        cancel.clone(),
    )
    .await
    .unwrap();
    let json = mock.new_account("p-http1").unwrap();
    let account = ringpush::fcm::ServiceAccount::parse(json.as_bytes()).unwrap();
    let tls = ringpush::tls::client_config(Some(mock.ca_file()), None).unwrap();
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(mock.addr()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let post = |path: &str, body: String| {
        hyper::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
        .append_pair("assertion", &account.assertion())
        .finish();
    let response = sender.send_request(post("/token", form)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        v["access_token"].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(v["token_type"], "Bearer");
    let refused = sender
        .send_request(post("/token", "grant_type=password".into()))
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert_eq!(mock.stats().tokens_issued, 1);
    cancel.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An FCM client alone against a mock whose access tokens live `lifetime`, for `project`,
/// with one alert message and token to send: what the access-token tests drive.
struct OAuthRig {
    dir: std::path::PathBuf,
    cancel: tokio_util::sync::CancellationToken,
    mock: ringpush::mock_fcm::MockFcm,
    client: ringpush::fcm::Client,
    message: ringpush::fcm::message::Template,
    token: DeviceToken,
    expiration: i64,
}

impl OAuthRig {
    async fn start(lifetime: Duration, project: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ringpush-test-{}", ringpush::token::random_hex(6)));
        let cancel = tokio_util::sync::CancellationToken::new();
        let mock = ringpush::mock_fcm::MockFcm::start(
            ringpush::mock_fcm::Settings {
                token_lifetime: lifetime,
                ..ringpush::mock_fcm::Settings::local(dir.join("certs"))
            },
            cancel.clone(),
        )
        .await
        .unwrap();
        let json = mock.new_account(project).unwrap();
        let account = ringpush::fcm::ServiceAccount::parse(json.as_bytes()).unwrap();
        let tls = ringpush::tls::client_config(Some(mock.ca_file()), None).unwrap();
        let url = ringpush::http2::Endpoint::parse(&mock.url()).unwrap();
        let client =
            ringpush::fcm::Client::new(ringpush::fcm::Settings::new(url), account, tls).unwrap();
        let ring = App::ring("gw-oauth", Duration::ZERO);
        let alert = ringpush::apns::request::AlertTemplate::default();
        let style = ringpush::fcm::message::Style {
            alert: &alert,
            channel: "doorbell",
        };
        let message = ringpush::fcm::message::Template::new(
            &ring,
            "Door",
            ringpush::token::Kind::Alert,
            &style,
        );
        Self {
            dir,
            cancel,
            mock,
            client,
            message,
            token: DeviceToken::parse_fcm("oauth:APA91b").unwrap(),
            expiration: ring.expires_at(Duration::from_secs(60)),
        }
    }
}

impl Drop for OAuthRig {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn one_task_renews_the_access_token_ahead_of_its_expiry() {
    let rig = OAuthRig::start(Duration::from_secs(4), "p-renew").await;
    let (mock, client) = (&rig.mock, &rig.client);
    let (message, token, expiration) = (&rig.message, &rig.token, rig.expiration);
    // Many sends at once before any token exists: one exchange for all of them.
    let sends =
        futures_util::future::join_all((0..20).map(|_| client.send(message, token, expiration)))
            .await;
    assert!(sends
        .iter()
        .all(|s| matches!(s, Ok(ringpush::fcm::answer::Verdict::Accepted))));
    assert_eq!(mock.stats().tokens_issued, 1, "single flight");
    // At three quarters of its 4 s lifetime the task renews it, with no request waiting.
    tokio::time::sleep(Duration::from_millis(3800)).await;
    assert_eq!(mock.stats().tokens_issued, 2, "renewed ahead of expiry");
    let renewals = client
        .tokens()
        .renewals
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(renewals, 2);
    assert!(matches!(
        client.send(message, token, expiration).await,
        Ok(ringpush::fcm::answer::Verdict::Accepted)
    ));
    assert_eq!(
        mock.stats().unauthenticated,
        0,
        "no request met an expired token"
    );
}

#[tokio::test]
async fn a_renewal_ahead_of_expiry_that_fails_keeps_the_current_token_in_use() {
    // A 20 s token: renewed at 15 s, usable (with its last tenth kept back) until 18 s.
    let rig = OAuthRig::start(Duration::from_secs(20), "p-keep").await;
    let (mock, client) = (&rig.mock, &rig.client);
    let (message, token, expiration) = (&rig.message, &rig.token, rig.expiration);
    let accepted = |v: &Result<ringpush::fcm::answer::Verdict, _>| {
        matches!(v, Ok(ringpush::fcm::answer::Verdict::Accepted))
    };
    assert!(accepted(&client.send(message, token, expiration).await));
    // The token endpoint stops taking this client's assertions (the account's key was
    // rotated; its access tokens live on): the renewal at three quarters of the lifetime
    // fails.
    for account in mock.accounts() {
        mock.rotate_key(&account).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(17);
    while mock.stats().token_refusals == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewal was never tried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The current token still has seconds to live, and is still used.
    let again = client.send(message, token, expiration).await;
    assert!(
        accepted(&again),
        "a failed renewal ahead of expiry must not throw the valid token away: {again:?}"
    );
}

#[tokio::test]
async fn with_apns_down_android_rings_keep_flowing_and_iphones_ring_once_it_is_back() {
    let app = App::spawn_with(|o| {
        o.fcm = Some(fcm_settings());
        o.apns_proxy = true;
        o.apns.backoff_min = Duration::from_millis(100);
        o.apns.backoff_max = Duration::from_millis(500);
    })
    .await;
    // One door with only an iPhone, one with only an Android phone.
    let (alice, bob) = (app.add_user().await, app.add_user().await);
    app.add_gateway("gw-ios", alice, "Door").await;
    app.add_gateway("gw-android", bob, "Door").await;
    let iphone = add_apns_token(&app, alice, "alert", Some(TOPIC)).await;
    let android = add_fcm_token(&app, bob, "alert").await;
    let proxy = app.apns_proxy.as_ref().unwrap();
    proxy.set(crate::proxy::Mode::Down);
    // The iPhone's rings first: held, they would pause consumption and keep the Android
    // rings behind them waiting.
    let ios: Vec<_> = (0..5)
        .map(|_| App::ring("gw-ios", Duration::ZERO))
        .collect();
    let droid: Vec<_> = (0..5)
        .map(|_| App::ring("gw-android", Duration::ZERO))
        .collect();
    for ring in ios.iter().chain(&droid) {
        app.publish(ring).await;
    }
    app.wait_for("the Android phone rang for every ring", || {
        let accepted = fcm_accepted(&app);
        droid
            .iter()
            .all(|r| accepted.contains_key(&(r.event_id.clone(), android.as_str().to_owned())))
    })
    .await;
    assert_eq!(app.mock.stats().accepted, 0, "APNs is down");
    assert_eq!(Counters::get(&app.counters.pauses), 0, "never paused");
    proxy.set(crate::proxy::Mode::Pass);
    app.wait_for("the iPhone rang for every ring", || {
        app.unaccepted(&ios, std::slice::from_ref(&iphone)) == 0
    })
    .await;
    app.wait_for("every ring settled", || {
        Counters::get(&app.counters.rings_delivered) >= 10
    })
    .await;
    assert_eq!(Counters::get(&app.counters.pauses), 0, "never paused");
    let accepted = fcm_accepted(&app);
    assert!(
        accepted.values().all(|&n| n == 1),
        "no Android phone rang twice: {accepted:?}"
    );
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}
