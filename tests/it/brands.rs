//! Three apps in one deployment (contract v3): the app `default` (the single-app variables)
//! and two brands (folders under `RINGPUSH_APPS_DIR`) with different Apple teams, keys and
//! topics and different Firebase projects, behind one gateway shared by their users. The mocks
//! refuse another app's credentials, so every request is seen to carry its own app's. A
//! brand's key and service account rotated while rings flow — through the folder changing,
//! and through SIGHUP — is used for every request after the reload, with no ring lost, none
//! rung twice and the worker never restarted. A certificate's expiry is a gauge and a warning.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use ringpush::local::{self, AppFolder, Layout};
use ringpush::token::{DeviceToken, Platform};

use crate::apps::{add_app_token, metrics, sample, until};
use crate::fcm::fcm_settings;
use crate::support::{App, Running, TEAM_ID, TOPIC};

/// The Firebase project of the app `default` (the harness's mock FCM account).
const DEFAULT_PROJECT: &str = "ringpush-local";

/// A test's deployment: the harness (mock APNs with the app default's key, mock FCM), two
/// brand folders, a gateway shared by a user of each app with an iPhone and an Android phone.
struct Brands {
    test: App,
    apps: PathBuf,
    a: AppFolder,
    b: AppFolder,
    /// Per app: its iPhone's and its Android phone's tokens.
    phones: Vec<(&'static str, DeviceToken, DeviceToken)>,
}

/// Registers a new Android token of `app` for `user`, bound at the mock FCM to `project` (a
/// send under another project is answered SENDER_ID_MISMATCH).
async fn add_app_fcm_token(test: &App, user: i64, app: &str, project: &str) -> DeviceToken {
    let token = ringpush::db::random_token(Platform::FCM);
    let client = test.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO push_tokens (token, user_id, platform, app) VALUES ($1, $2, 'fcm', $3)",
            &[&token, &user, &app],
        )
        .await
        .unwrap();
    test.fcm.as_ref().unwrap().bind_token(&token, project);
    DeviceToken::parse_fcm(&token).unwrap()
}

impl Brands {
    async fn start() -> Self {
        let test = App::spawn_with(|o| {
            o.run_worker = false;
            o.fcm = Some(fcm_settings());
        })
        .await;
        let apps = test.dir.join("apps");
        std::fs::create_dir_all(&apps).unwrap();
        let fcm = test.fcm.as_ref().unwrap();
        // The app default's topic takes its team's JWTs only, as the brands' do.
        test.mock.set_topic(TOPIC, TEAM_ID);
        let a = local::write_app(
            &apps,
            "brand-a",
            "com.brand-a.bell",
            "BRANDAKEY1",
            "TEAMAAAAAA",
            &test.mock,
            Some((fcm, "brand-a-project")),
            Layout::Files,
        )
        .unwrap();
        let b = local::write_app(
            &apps,
            "brand-b",
            "com.brand-b.bell",
            "BRANDBKEY1",
            "TEAMBBBBBB",
            &test.mock,
            Some((fcm, "brand-b-project")),
            Layout::Secret,
        )
        .unwrap();
        let owner = test.add_user().await;
        test.add_gateway("gw-lobby", owner, "Lobby").await;
        let mut phones = Vec::new();
        for (app, project) in [
            ("default", DEFAULT_PROJECT),
            ("brand-a", "brand-a-project"),
            ("brand-b", "brand-b-project"),
        ] {
            let user = match app {
                "default" => owner,
                _ => {
                    let user = test.add_user().await;
                    test.share("gw-lobby", user).await;
                    user
                }
            };
            let iphone = add_app_token(&test, user, app).await;
            let android = add_app_fcm_token(&test, user, app, project).await;
            phones.push((app, iphone, android));
        }
        Self {
            test,
            apps,
            a,
            b,
            phones,
        }
    }

    /// The worker binary with the app default's FCM variables and the brands' folder.
    fn worker(&self, poll: &str) -> Running {
        worker(&self.test, &self.apps, poll)
    }

    /// Per (event, token): how many times the mocks accepted it.
    fn accepted(&self) -> HashMap<(String, String), usize> {
        let mut accepted = HashMap::new();
        for r in self.test.mock.received() {
            if let (200, Some(token), Some(event)) = (r.status, &r.token, r.collapse_id()) {
                *accepted.entry((event, token.clone())).or_default() += 1;
            }
        }
        for r in self.test.fcm.as_ref().unwrap().received() {
            let event = r.body["message"]["data"]["event_id"].as_str();
            if let (200, Some(token), Some(event)) = (r.status, &r.token, event) {
                *accepted
                    .entry((event.to_owned(), token.clone()))
                    .or_default() += 1;
            }
        }
        accepted
    }

    /// Whether each of `events` was accepted for every phone.
    fn all_accepted(&self, events: &[String]) -> bool {
        let accepted = self.accepted();
        events.iter().all(|e| {
            self.phones.iter().all(|(_, iphone, android)| {
                [iphone, android]
                    .iter()
                    .all(|t| accepted.contains_key(&(e.clone(), t.as_str().to_owned())))
            })
        })
    }

    /// `app`'s tokens.
    fn tokens(&self, app: &str) -> (String, String) {
        let (_, iphone, android) = self.phones.iter().find(|(a, _, _)| *a == app).unwrap();
        (iphone.as_str().to_owned(), android.as_str().to_owned())
    }

    /// The credentials each app's requests carried, from the mocks' records after request
    /// `from_apns` / `from_fcm`: per app, the distinct (key id, team, topic) of its iPhone's
    /// requests and (project, account) of its Android phone's.
    fn seen(&self, app: &str, from_apns: usize, from_fcm: usize) -> Seen {
        let (iphone, android) = self.tokens(app);
        let mut seen = Seen::default();
        for r in self.test.mock.received().into_iter().skip(from_apns) {
            if r.token.as_deref() == Some(iphone.as_str()) {
                let jwt = (r.key_id.clone().unwrap_or_default(), r.team_id.clone());
                let jwt = (jwt.0, jwt.1.unwrap_or_default(), r.topic.clone());
                if !seen
                    .apns
                    .contains(&(jwt.0.clone(), jwt.1.clone(), jwt.2.clone()))
                {
                    seen.apns.push((jwt.0, jwt.1, jwt.2));
                }
                seen.apns_statuses.push(r.status);
            }
        }
        let fcm = self.test.fcm.as_ref().unwrap();
        for r in fcm.received().into_iter().skip(from_fcm) {
            if r.token.as_deref() == Some(android.as_str()) {
                let via = (r.project.clone(), r.account.clone().unwrap_or_default());
                if !seen.fcm.contains(&via) {
                    seen.fcm.push(via);
                }
                seen.fcm_statuses.push(r.status);
            }
        }
        seen
    }
}

/// The worker binary with the app default's FCM variables and the apps folder `apps`.
fn worker(test: &App, apps: &std::path::Path, poll: &str) -> Running {
    let fcm = test.fcm.as_ref().unwrap();
    let account = test.dir.join("fcm-service-account.json");
    Running::start(&mut test.worker_command(&[
        ("RINGPUSH_APPS_DIR", apps.to_str().unwrap()),
        ("RINGPUSH_APPS_POLL", poll),
        ("RINGPUSH_FCM_CREDENTIALS_FILE", account.to_str().unwrap()),
        ("RINGPUSH_FCM_URL", &fcm.url()),
        ("RINGPUSH_FCM_CA_FILE", fcm.ca_file().to_str().unwrap()),
        // No missed ring's follow-up within the test: the mocks see rings only.
        ("RINGPUSH_RING_TTL", "10m"),
        ("RINGPUSH_RING_TIMEOUT", "10m"),
        ("RUST_LOG", "info"),
    ]))
}

#[derive(Debug, Default)]
struct Seen {
    apns: Vec<(String, String, Option<String>)>,
    fcm: Vec<(String, String)>,
    apns_statuses: Vec<u16>,
    fcm_statuses: Vec<u16>,
}

#[tokio::test]
async fn three_apps_behind_one_gateway_each_push_with_their_own_credentials() {
    let brands = Brands::start().await;
    let worker = brands.worker("5s");
    let test = &brands.test;
    let events: Vec<String> = {
        let mut events = Vec::new();
        for _ in 0..3 {
            let ring = App::ring("gw-lobby", Duration::ZERO);
            test.publish(&ring).await;
            events.push(ring.event_id);
        }
        events
    };
    until(&worker, "every phone of every app rang three times", || {
        brands.all_accepted(&events)
    })
    .await;
    let fcm = test.fcm.as_ref().unwrap();
    let default_account = fcm
        .accounts()
        .into_iter()
        .find(|a| a.ends_with(&format!("@{DEFAULT_PROJECT}.iam.gserviceaccount.com")))
        .unwrap();
    for (app, key, team, topic, project, account) in [
        (
            "default",
            crate::support::KEY_ID.to_owned(),
            TEAM_ID,
            TOPIC,
            DEFAULT_PROJECT,
            default_account,
        ),
        (
            "brand-a",
            brands.a.key_id().unwrap().to_owned(),
            "TEAMAAAAAA",
            "com.brand-a.bell",
            "brand-a-project",
            brands.a.client_email().unwrap().to_owned(),
        ),
        (
            "brand-b",
            brands.b.key_id().unwrap().to_owned(),
            "TEAMBBBBBB",
            "com.brand-b.bell",
            "brand-b-project",
            brands.b.client_email().unwrap().to_owned(),
        ),
    ] {
        let seen = brands.seen(app, 0, 0);
        assert_eq!(
            seen.apns,
            [(key, team.to_owned(), Some(topic.to_owned()))],
            "{app}'s iPhone: its own key, team and topic on every request"
        );
        assert_eq!(
            seen.fcm,
            [(project.to_owned(), account)],
            "{app}'s Android phone: its own project and access token"
        );
        assert!(
            seen.apns_statuses
                .iter()
                .chain(&seen.fcm_statuses)
                .all(|s| *s == 200),
            "{app}: nothing refused: {seen:?}"
        );
    }
    assert!(
        brands.accepted().values().all(|n| *n == 1),
        "no phone rang twice for one ring"
    );
    // Per-app labels: each app's notifications counted under its name.
    let addr = worker.metrics_addr().await;
    let text = metrics(&addr).await;
    for app in ["default", "brand-a", "brand-b"] {
        for platform in ["apns", "fcm"] {
            let series = format!(
                r#"ringpush_platform_notifications_total{{app="{app}",platform="{platform}",outcome="accepted"}}"#
            );
            assert_eq!(sample(&text, &series), 3.0, "{series}");
        }
        let connections = format!(r#"ringpush_apns_connections{{app="{app}"}}"#);
        assert!(
            sample(&text, &connections) >= 1.0,
            "{app}: its own connection"
        );
    }
    let log = worker.stop().await;
    for secret in [&brands.a.key().unwrap().pem, &brands.b.key().unwrap().pem] {
        let line = secret.lines().nth(1).unwrap();
        assert!(!log.contains(line), "no key material in the log");
    }
}

/// How a rotation is made known to the worker.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trigger {
    /// The folder changes; the worker reads it on its next poll.
    Poll,
    /// The folder changes and the worker is sent SIGHUP (it polls once an hour).
    Hangup,
}

/// Rings flow through the shared gateway while brand-a's APNs key (a new key id) and
/// service account are rotated; once the worker has read them, the old ones are revoked at
/// the mocks. Every ring reaches every phone exactly once, every request after the
/// revocation carries the new credentials, and the worker is the same process throughout.
async fn rotation_while_rings_flow(trigger: Trigger) {
    let brands = Brands::start().await;
    let poll = match trigger {
        Trigger::Poll => "200ms",
        Trigger::Hangup => "1h",
    };
    let worker = brands.worker(poll);
    let pid = worker.child.id().unwrap();
    let test = &brands.test;
    let fcm = test.fcm.as_ref().unwrap();
    let old_key = brands.a.key_id().unwrap().to_owned();
    let old_account = brands.a.client_email().unwrap().to_owned();
    let mut rotated: Option<AppFolder> = None;
    let mut read_at: Option<Instant> = None;
    let mut revoked_at: Option<(usize, usize)> = None;
    let mut events = Vec::new();
    for i in 0..60 {
        let ring = App::ring("gw-lobby", Duration::ZERO);
        test.publish(&ring).await;
        events.push(ring.event_id);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if i == 15 {
            let next = brands
                .a
                .rotate_key("BRANDAKEY2", &test.mock, Some(fcm))
                .unwrap();
            if trigger == Trigger::Hangup {
                let sent = std::process::Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(sent.success());
            }
            rotated = Some(next);
        }
        if rotated.is_some() && read_at.is_none() {
            let changed = worker
                .text()
                .lines()
                .any(|l| l.contains("app credentials changed") && l.contains("app=brand-a"));
            if changed {
                read_at = Some(Instant::now());
            }
        }
        // A moment after the worker read them (rings it prepared before finish with the old
        // ones), the old key and account are revoked: a request with them would be refused.
        if let (Some(at), None) = (read_at, revoked_at) {
            if at.elapsed() >= Duration::from_millis(500) {
                test.mock.remove_key(&old_key);
                fcm.remove_account(&old_account);
                revoked_at = Some((test.mock.received().len(), fcm.received().len()));
            }
        }
    }
    let (from_apns, from_fcm) = revoked_at.unwrap_or_else(|| {
        panic!(
            "the worker did not read the rotation within the rings' 3 s:\n{}",
            worker.text()
        )
    });
    until(&worker, "every ring reached every phone", || {
        brands.all_accepted(&events)
    })
    .await;
    let accepted = brands.accepted();
    assert_eq!(accepted.len(), 60 * 6, "60 rings, 6 phones: none lost");
    assert!(
        accepted.values().all(|n| *n == 1),
        "no phone rang twice for one ring"
    );
    let after = brands.seen("brand-a", from_apns, from_fcm);
    let rotated = rotated.unwrap();
    assert_eq!(
        after.apns,
        [(
            "BRANDAKEY2".to_owned(),
            "TEAMAAAAAA".to_owned(),
            Some("com.brand-a.bell".to_owned())
        )],
        "every request after the reload carries the new key"
    );
    assert_eq!(
        after.fcm,
        [(
            "brand-a-project".to_owned(),
            rotated.client_email().unwrap().to_owned()
        )],
        "every request after the reload carries the new service account's token"
    );
    assert!(!after.apns_statuses.is_empty() && !after.fcm_statuses.is_empty());
    // The other brand never changed.
    let b = brands.seen("brand-b", 0, 0);
    assert_eq!(b.apns.len(), 1, "{b:?}");
    assert_eq!(b.fcm.len(), 1, "{b:?}");
    if trigger == Trigger::Hangup {
        let log = worker.text();
        assert!(
            log.lines()
                .any(|l| l.contains("app credentials changed") && l.contains("why=\"SIGHUP\"")),
            "{log}"
        );
    }
    let addr = worker.metrics_addr().await;
    let loads = sample(
        &metrics(&addr).await,
        r#"ringpush_app_config_loads_total{app="brand-a"}"#,
    );
    assert_eq!(loads, 2.0, "loaded at start and once rotated");
    assert_eq!(worker.child.id(), Some(pid), "the same process throughout");
    worker.stop().await;
}

#[tokio::test]
async fn a_brand_key_and_service_account_rotated_while_rings_flow_are_read_from_the_folder() {
    rotation_while_rings_flow(Trigger::Poll).await;
}

#[tokio::test]
async fn a_brand_key_and_service_account_rotated_while_rings_flow_are_read_on_sighup() {
    rotation_while_rings_flow(Trigger::Hangup).await;
}

#[tokio::test]
async fn a_certificate_app_is_pushed_over_its_certificate_and_its_expiry_is_a_gauge_and_a_warning()
{
    let test = App::spawn_with(|o| o.run_worker = false).await;
    let apps = test.dir.join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    let in_ten_days = SystemTime::now() + Duration::from_secs(10 * 86_400);
    let folder = local::write_cert_app(
        &apps,
        "installer",
        "com.installer.bell",
        in_ten_days,
        &test.mock,
        None,
        Layout::Files,
    )
    .unwrap();
    let worker = Running::start(&mut test.worker_command(&[
        ("RINGPUSH_APPS_DIR", apps.to_str().unwrap()),
        ("RUST_LOG", "info"),
    ]));
    let addr = worker.metrics_addr().await;
    let owner = test.add_user().await;
    test.add_gateway("gw-site", owner, "Site").await;
    let phone = add_app_token(&test, owner, "installer").await;
    test.publish(&App::ring("gw-site", Duration::ZERO)).await;
    until(&worker, "the installer's phone rang", || {
        test.mock
            .received()
            .iter()
            .any(|r| r.status == 200 && r.token.as_deref() == Some(phone.as_hex()))
    })
    .await;
    let request = test
        .mock
        .received()
        .into_iter()
        .find(|r| r.token.as_deref() == Some(phone.as_hex()))
        .unwrap();
    assert!(request.certificate, "over the app's client certificate");
    assert_eq!(
        request.certificate_topic.as_deref(),
        Some("com.installer.bell")
    );
    assert_eq!(request.key_id, None, "no JWT on a certificate connection");
    let expected = in_ten_days
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let gauge = sample(
        &metrics(&addr).await,
        r#"ringpush_credential_expiry_timestamp_seconds{app="installer",provider="apns"}"#,
    );
    assert!(
        (gauge - expected).abs() <= 1.0,
        "the certificate's notAfter: {gauge} against {expected}"
    );
    let warning = worker.wait_for("expires within 30 days").await;
    assert!(
        warning.contains("WARN") && warning.contains("installer"),
        "{warning}"
    );
    // Renewed in place: the gauge follows, no restart.
    let in_a_year = SystemTime::now() + Duration::from_secs(365 * 86_400);
    folder
        .renew_certificate(in_a_year, &test.mock, None)
        .unwrap();
    let later = in_a_year
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    crate::apps::wait_metrics(&addr, "the renewed certificate's expiry", |m| {
        let g = sample(
            m,
            r#"ringpush_credential_expiry_timestamp_seconds{app="installer",provider="apns"}"#,
        );
        (g - later).abs() <= 1.0
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn one_brand_configured_with_another_firebase_project_keeps_its_tokens_and_the_others_ring() {
    let test = App::spawn_with(|o| {
        o.run_worker = false;
        o.fcm = Some(fcm_settings());
    })
    .await;
    let apps = test.dir.join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    let fcm = test.fcm.as_ref().unwrap();
    // brand-b's folder holds a service account of another Firebase project than its phones'.
    local::write_app(
        &apps,
        "brand-b",
        "com.brand-b.bell",
        "BRANDBKEY1",
        "TEAMBBBBBB",
        &test.mock,
        Some((fcm, "someone-elses-project")),
        Layout::Files,
    )
    .unwrap();
    local::write_app(
        &apps,
        "brand-a",
        "com.brand-a.bell",
        "BRANDAKEY1",
        "TEAMAAAAAA",
        &test.mock,
        Some((fcm, "brand-a-project")),
        Layout::Files,
    )
    .unwrap();
    let test = &test;
    let owner = test.add_user().await;
    test.add_gateway("gw-tower", owner, "Tower").await;
    let ours = add_app_fcm_token(test, owner, "brand-a", "brand-a-project").await;
    let mut theirs = Vec::new();
    for _ in 0..4 {
        let user = test.add_user().await;
        test.share("gw-tower", user).await;
        theirs.push(add_app_fcm_token(test, user, "brand-b", "brand-b-project").await);
    }
    let worker = worker(test, &apps, "5s");
    let addr = worker.metrics_addr().await;
    for _ in 0..2 {
        test.publish(&App::ring("gw-tower", Duration::ZERO)).await;
    }
    let doubted =
        r#"ringpush_platform_notifications_total{app="brand-b",platform="fcm",outcome="doubted"}"#;
    crate::apps::wait_metrics(&addr, "brand-b's answers doubted", |m| {
        sample(m, doubted) >= 8.0
    })
    .await;
    let accepted =
        r#"ringpush_platform_notifications_total{app="brand-a",platform="fcm",outcome="accepted"}"#;
    assert_eq!(sample(&metrics(&addr).await, accepted), 2.0, "brand-a rang");
    let ready = ringpush::http::get(&format!("http://{addr}/readyz"), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        ready.body.contains("app brand-b") && ready.body.contains("fcm.credentials_file"),
        "/readyz names the app and the setting: {}",
        ready.body
    );
    // The purger runs: a doubted token is never reported, so none is deleted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for token in theirs.iter().chain([&ours]) {
        assert!(test.token_exists(token).await, "{token} kept");
    }
    worker.stop().await;
}
