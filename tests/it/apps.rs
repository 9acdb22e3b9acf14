//! Many apps in one deployment (contract v3): each token pushed with its own app's
//! credentials; app folders under `RINGPUSH_APPS_DIR` read again while the worker runs (a new
//! one serves, a broken one keeps its last good credentials and is counted, a removed one's
//! tokens count unconfigured), without a restart; what refuses to start.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringpush::token::{random_hex, DeviceToken};

use crate::support::{App, Running, KEY_ID, TEAM_ID, TOPIC};

/// Registers a new APNs alert token of `app` for `user`.
pub(crate) async fn add_app_token(test: &App, user: i64, app: &str) -> DeviceToken {
    let token = DeviceToken::parse(&random_hex(32)).unwrap();
    let client = test.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO push_tokens (token, user_id, environment, app) VALUES ($1, $2, 'production', $3)",
            &[&token.as_hex(), &user, &app],
        )
        .await
        .unwrap();
    token
}

/// Scrapes a worker process's `/metrics`.
pub(crate) async fn metrics(addr: &str) -> String {
    let r = ringpush::http::get(&format!("http://{addr}/metrics"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    r.body
}

/// The value of the sample whose name and labels start as `prefix` says (0 when absent).
pub(crate) fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits up to 60 s for `done` on the worker's metrics.
pub(crate) async fn wait_metrics(addr: &str, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics(addr).await;
        if done(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a file as a Secret update does: a new file, then a rename over the old one.
pub(crate) fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp-{}", random_hex(3)));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits up to 60 s for `done`; fails with the worker's log.
pub(crate) async fn until(worker: &Running, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the worker's log:\n{}",
            worker.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An app folder signing with the test's key (the mock's), under `topic`.
fn token_app(apps: &Path, name: &str, key_pem: &str, topic: &str) -> PathBuf {
    let dir = apps.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("apns.p8"), key_pem).unwrap();
    let json = format!(
        r#"{{"apns": {{"topic": "{topic}", "key_file": "apns.p8", "key_id": "{KEY_ID}", "team_id": "{TEAM_ID}"}}}}"#
    );
    write_atomically(&dir.join("app.json"), &json);
    dir
}

/// The topics the mock saw `token`'s accepted requests under.
fn topics_of(test: &App, token: &DeviceToken) -> Vec<String> {
    test.mock
        .received()
        .iter()
        .filter(|r| r.status == 200 && r.token.as_deref() == Some(token.as_hex()))
        .filter_map(|r| Some(r.headers.get("apns-topic")?.to_str().ok()?.to_owned()))
        .collect()
}

#[tokio::test]
async fn an_app_folder_added_broken_and_removed_while_the_worker_runs_never_restarts_it() {
    let test = App::spawn_with(|o| o.run_worker = false).await;
    let apps = test.dir.join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    let apps_dir = apps.to_str().unwrap().to_owned();
    let worker = Running::start(&mut test.worker_command(&[
        ("RINGPUSH_APPS_DIR", &apps_dir),
        ("RINGPUSH_APPS_POLL", "200ms"),
        ("RUST_LOG", "info"),
    ]));
    let pid = worker.child.id();
    let addr = worker.metrics_addr().await;
    let owner = test.add_user().await;
    test.add_gateway("gw-apps", owner, "Door").await;
    let ours = add_app_token(&test, owner, "default").await;
    let brands = add_app_token(&test, owner, "brand-c").await;
    let unconfigured = r#"ringpush_platform_notifications_total{app="brand-c",platform="apns",outcome="unconfigured"}"#;

    // No folder yet: the brand's token is skipped as unconfigured, the app default's rings.
    test.publish(&App::ring("gw-apps", Duration::ZERO)).await;
    wait_metrics(&addr, "the brand's token counted unconfigured", |m| {
        sample(m, unconfigured) == 1.0
    })
    .await;
    until(&worker, "the default app's token rang", || {
        topics_of(&test, &ours) == [TOPIC]
    })
    .await;

    // A new folder serves without a restart, under its own topic.
    let folder = token_app(&apps, "brand-c", &test.key_pem, "com.brand-c.bell");
    worker.wait_for("app credentials loaded app=brand-c").await;
    test.publish(&App::ring("gw-apps", Duration::ZERO)).await;
    until(&worker, "the brand's token rang under its topic", || {
        topics_of(&test, &brands) == ["com.brand-c.bell"]
    })
    .await;

    // A broken app.json: counted once, the app keeps its last good credentials.
    let errors = r#"ringpush_app_config_errors_total{app="brand-c"}"#;
    write_atomically(&folder.join("app.json"), "{\"apns\": ");
    wait_metrics(&addr, "the broken folder counted", |m| {
        sample(m, errors) == 1.0
    })
    .await;
    test.publish(&App::ring("gw-apps", Duration::ZERO)).await;
    until(
        &worker,
        "the brand's token rang with its last good credentials",
        || topics_of(&test, &brands).len() == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        sample(&metrics(&addr).await, errors),
        1.0,
        "the same mistake read again is counted once"
    );

    // Fixed under another topic: every ring from now on uses it.
    token_app(&apps, "brand-c", &test.key_pem, "com.brand-c.bell2");
    worker.wait_for("app credentials changed").await;
    test.publish(&App::ring("gw-apps", Duration::ZERO)).await;
    until(
        &worker,
        "the brand's token rang under the new topic",
        || topics_of(&test, &brands).last().map(String::as_str) == Some("com.brand-c.bell2"),
    )
    .await;

    // Removed: its tokens count unconfigured again.
    std::fs::remove_dir_all(&folder).unwrap();
    worker.wait_for("folder is gone").await;
    test.publish(&App::ring("gw-apps", Duration::ZERO)).await;
    wait_metrics(&addr, "the removed app's token counted unconfigured", |m| {
        sample(m, unconfigured) == 2.0
    })
    .await;
    assert_eq!(
        topics_of(&test, &brands).len(),
        3,
        "not pushed once removed"
    );
    assert_eq!(
        topics_of(&test, &ours).len(),
        5,
        "the app default rang every time"
    );
    let loads = sample(
        &metrics(&addr).await,
        r#"ringpush_app_config_loads_total{app="brand-c"}"#,
    );
    assert_eq!(loads, 2.0, "loaded when added and when fixed");
    assert_eq!(worker.child.id(), pid, "the same process throughout");
    let log = worker.stop().await;
    assert!(log.contains("brand-c"), "{log}");
    assert!(!log.contains(&test.key_pem), "no key in the log");
}

#[tokio::test]
async fn what_refuses_to_start_names_its_variable() {
    let test = App::spawn_with(|o| o.run_worker = false).await;
    let apps = test.dir.join("apps");
    std::fs::create_dir_all(apps.join("default")).unwrap();
    let apps_dir = apps.to_str().unwrap().to_owned();
    // A folder `default` beside the single-app variables: both named.
    let out = test
        .worker_command(&[("RINGPUSH_APPS_DIR", &apps_dir)])
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("RINGPUSH_APPS_DIR") && text.contains("RINGPUSH_APNS_KEY_FILE"),
        "{text}"
    );
    // A folder that is not there.
    let missing = test.dir.join("no-such-apps");
    let out = test
        .worker_command(&[("RINGPUSH_APPS_DIR", missing.to_str().unwrap())])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        text.contains("RINGPUSH_APPS_DIR") && text.contains("no-such-apps"),
        "{text}"
    );
}
