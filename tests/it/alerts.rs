//! The alert rules (deploy/prometheus/ringpush.rules.yml) are checked and unit-tested by
//! promtool, the Prometheus operator's copy is the same rules word for word, and a real
//! Prometheus scraping a real worker under the mock APNs evaluates every expression of the
//! rules and of the Grafana dashboard — then pages when APNs goes down while rings flow, and
//! resolves when it is back. Prometheus and promtool come from Debian's `prometheus` package
//! (`.ci/run` installs it); without them these tests fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use ringpush::broker;
use yaml_rust2::{Yaml, YamlLoader};

use crate::proxy::Mode;
use crate::support::{amqp_url, App, TOPIC};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Runs a Prometheus tool, failing the test with its output (or with how to install it).
fn run(tool: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} cannot be run ({e}): install Debian's prometheus package (.ci/run does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_every_alert_passes_its_unit_tests() {
    let dir = deploy("prometheus");
    let checked = run("promtool", &["check", "rules", "ringpush.rules.yml"], &dir);
    assert!(checked.contains("SUCCESS: 14 rules found"), "{checked}");
    let tested = run(
        "promtool",
        &["test", "rules", "ringpush.rules.test.yml"],
        &dir,
    );
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test that fires it.
    let tests = std::fs::read_to_string(dir.join("ringpush.rules.test.yml")).unwrap();
    for alert in alerts() {
        let fired = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}")) && case.contains("exp_labels")
        });
        assert!(fired, "no unit test fires {alert}");
    }
}

fn load(path: &Path) -> Yaml {
    YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .remove(0)
}

/// Every rule of the rules file: (alert name, expression).
fn rules() -> Vec<(String, String)> {
    let file = load(&deploy("prometheus/ringpush.rules.yml"));
    let mut out = Vec::new();
    for group in file["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_owned();
            for key in ["summary", "description", "runbook_url"] {
                assert!(
                    rule["annotations"][key]
                        .as_str()
                        .is_some_and(|s| !s.is_empty()),
                    "{name} has a {key}"
                );
            }
            assert!(rule["labels"]["severity"].as_str().is_some(), "{name}");
            out.push((name, rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

fn alerts() -> Vec<String> {
    rules().into_iter().map(|(name, _)| name).collect()
}

#[test]
fn the_prometheus_rule_manifest_holds_the_rules_file_word_for_word() {
    let file = load(&deploy("prometheus/ringpush.rules.yml"));
    let manifest = load(&deploy("kubernetes/prometheus-rule.yaml"));
    assert_eq!(manifest["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(manifest["spec"]["groups"], file["groups"]);
    // And the alerts table of docs/operators.md (where every runbook_url points) names every
    // alert.
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operators.md"))
            .unwrap();
    for alert in alerts() {
        assert!(
            guide.contains(&format!("`{alert}`")),
            "docs/operators.md's alerts table names {alert}"
        );
    }
    for group in file["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            assert_eq!(
                rule["annotations"]["runbook_url"].as_str(),
                Some("docs/operators.md#alerts"),
                "{:?}'s runbook_url",
                rule["alert"].as_str()
            );
        }
    }
}

/// A Prometheus of this test's own: scraping `target` every second, evaluating the rules
/// every second, on a free port, its data in `dir`; killed when dropped.
struct Prometheus {
    url: String,
    _process: tokio::process::Child,
}

impl Prometheus {
    async fn start(dir: &Path, target: std::net::SocketAddr) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [{:?}]\n\
                 scrape_configs:\n  - job_name: ringpush\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
                deploy("prometheus/ringpush.rules.yml")
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus runs: install Debian's prometheus package (.ci/run does)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) =
                ringpush::http::get(&format!("{url}/-/ready"), Duration::from_secs(2)).await
            {
                if r.status == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "Prometheus ready within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Self {
            url,
            _process: process,
        }
    }

    /// Evaluates `expr` now: the result vector (an error fails the test).
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let q = utf8_percent_encode(expr, NON_ALPHANUMERIC);
        let r = ringpush::http::get(
            &format!("{}/api/v1/query?query={q}", self.url),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            (r.status, body["status"].as_str()),
            (200, Some("success")),
            "{expr}: {body}"
        );
        match &body["data"]["result"] {
            serde_json::Value::Array(v) => v.clone(),
            // A scalar result.
            other => vec![other.clone()],
        }
    }

    /// The state of alert `name` now: "pending", "firing", or `None`.
    async fn alert(&self, name: &str) -> Option<String> {
        let r = ringpush::http::get(
            &format!("{}/api/v1/alerts", self.url),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        body["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .map(|a| a["state"].as_str().unwrap().to_owned())
    }
}

#[tokio::test]
async fn a_real_prometheus_evaluates_every_expression_and_pages_while_apns_is_down() {
    let app = App::spawn_with(|o| {
        o.metrics = true;
        o.apns_proxy = true;
        // Rings published during the outage are still worth pushing after it.
        o.worker.ring_ttl = Duration::from_secs(600);
        // Nor missed while it is retried (a ring nobody answered ends at its timeout).
        o.worker.ring_timeout = o.worker.ring_ttl;
        o.worker.probe_interval = Duration::from_millis(250);
        o.worker.probe_cap = Duration::from_secs(1);
    })
    .await;
    let owner = app.add_user().await;
    app.add_gateway("gw-alerts", owner, "Door").await;
    for _ in 0..2 {
        app.add_token(owner, "production", Some(TOPIC)).await;
    }
    let prometheus =
        Prometheus::start(&app.dir.join("prometheus"), app.metrics_addr.unwrap()).await;

    // Rings flow throughout: one every 500 ms, as a gateway publishes them.
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = tokio::spawn({
        let (names, flowing) = (app.names.clone(), flowing.clone());
        async move {
            let connection = broker::connect(&amqp_url(), "alerts test gateway")
                .await
                .unwrap();
            let channel = broker::confirm_channel(&connection).await.unwrap();
            while flowing.load(Ordering::Relaxed) {
                let ring = App::ring("gw-alerts", Duration::ZERO);
                broker::publish_ring(&channel, &names, &ring).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let _ = connection.close(200, "done".into()).await;
        }
    });

    // Wait for the series the core panels plot (rates need two scrapes of a moving counter).
    let deadline = Instant::now() + Duration::from_secs(60);
    while prometheus
        .query("sum(increase(ringpush_notifications_total{outcome=\"accepted\"}[1m])) > 0")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus sees accepted notifications"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every expression of the rules parses and returns.
    for (name, expr) in rules() {
        prometheus.query(&expr).await;
        eprintln!("rule {name}: evaluated");
    }
    // Every expression of the dashboard parses and returns; the core panels return data.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("kubernetes/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let core = [
        "Ring to phone",
        "Rings waiting",
        "Rings by outcome",
        "Notifications by outcome",
        "APNs request latency",
        "Workers: consuming, paused",
        "Where a ring's time goes",
    ];
    let mut evaluated = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let result = prometheus.query(expr).await;
            evaluated += 1;
            if core.iter().any(|c| title.starts_with(c)) {
                assert!(!result.is_empty(), "core panel {title:?} has data: {expr}");
            }
        }
    }
    assert!(evaluated >= 15, "{evaluated} dashboard expressions");
    assert_eq!(
        prometheus.alert("RingpushRingsNotReachingPhones").await,
        None
    );

    // APNs down (connections refused) while rings go on arriving: the worker pauses, the
    // rings wait in the queue, and the page follows — pending once a minute passed without an
    // accepted notification, firing 30 s later (docs/operators.md, "Alerts").
    let proxy = app.apns_proxy.as_ref().unwrap();
    proxy.set(Mode::Down);
    let down = Instant::now();
    let (mut pending, mut firing) = (None, None);
    while firing.is_none() {
        match prometheus
            .alert("RingpushRingsNotReachingPhones")
            .await
            .as_deref()
        {
            Some("pending") if pending.is_none() => pending = Some(down.elapsed()),
            Some("firing") => firing = Some(down.elapsed()),
            _ => {}
        }
        assert!(
            down.elapsed() < Duration::from_secs(150),
            "the page fires within 150 s of APNs going down (pending after {pending:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (pending, firing) = (pending.expect("pending before firing"), firing.unwrap());
    eprintln!("APNs down: RingpushRingsNotReachingPhones pending after {pending:.1?}, firing after {firing:.1?}");
    assert!(
        pending >= Duration::from_secs(55),
        "not pending before a minute without phones: {pending:?}"
    );
    assert!(
        firing >= pending + Duration::from_secs(29),
        "{pending:?} → {firing:?}"
    );
    assert_eq!(
        prometheus.alert("RingpushPaused").await.as_deref(),
        Some("firing"),
        "the cause pages beside the symptom"
    );

    // APNs back: the rings held and queued are pushed, and the page resolves.
    proxy.set(Mode::Pass);
    let back = Instant::now();
    while prometheus
        .alert("RingpushRingsNotReachingPhones")
        .await
        .is_some()
    {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "resolved within 30 s of APNs's return"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("APNs back: resolved after {:.1?}", back.elapsed());
    flowing.store(false, Ordering::Relaxed);
    publisher.await.unwrap();
    app.stop().await;
}
