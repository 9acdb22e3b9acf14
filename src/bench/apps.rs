//! Many apps in one deployment (issue 29, see [`AppsCost`]): the same workload drained by a
//! fresh worker process with every token in the app `default`, and with the same number of
//! tokens spread evenly over three apps — `default` and two brands, each with its own APNs
//! key, team and topic and its own Firebase project — in turns (one, three, three, one, …:
//! a drift of the host weighs on both alike); the ratio of the medians.
//!
//! Both kinds run against the same two mock processes, which read the brands' folders
//! (`--apps-dir`) beside the app `default`'s key and service account, and with the same
//! worker settings (`RINGPUSH_APPS_DIR` set in both): the only difference is which app each
//! token belongs to. The mocks check every app's credentials — a brand's topic takes its
//! own team's JWTs only, an access token sends for its own project only — and the worker's
//! per-app counts (`ringpush_platform_notifications_total{app}`) must show each app's share
//! of the tokens accepted, or the part fails.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;
use time::OffsetDateTime;

use crate::broker::{self, Names};
use crate::local::Key;
use crate::token::random_hex;
use crate::wire::ring::RingEvent;

use super::e2e::analyze;
use super::ledger::{measure_drain_scraped, median_of};
use super::measure::publish_all;
use super::processes::{free_port, FcmMockProcess, MockProcess, WorkerOf};
use super::report::Drain;
use super::Settings;

/// The brands beside `default`: id, APNs topic, key id, team id, Firebase project.
const BRANDS: [[&str; 5]; 2] = [
    [
        "brand-a",
        "com.brand-a.doorbell",
        "BRANDAKEY1",
        "BRANDATEAM",
        "brand-a-bell",
    ],
    [
        "brand-b",
        "com.brand-b.doorbell",
        "BRANDBKEY1",
        "BRANDBTEAM",
        "brand-b-bell",
    ],
];

/// The app `default`'s topic, as the end-to-end part's tokens carry it.
const DEFAULT_TOPIC: &str = "com.example.doorbell";

/// Gateways of each kind (as the end-to-end part's fleet), each owned by a user of its own.
const GATEWAYS: i32 = 10_000;

/// Drains of each kind, in turns: one app, three, three, one, one, three, three, one (a
/// drain of 20,000 rings moves by ±10 % from one to the next on a shared host).
const APPS_ROUNDS: usize = 4;

/// The budget: three apps / one app, notifications per second, within 10 %.
const TARGET: f64 = 0.9;

/// The gateways of the one-app drains and of the three-app drains.
const ONE: &str = "apps1-";
const THREE: &str = "apps3-";

/// What serving several apps costs (issue 29): `rings` pre-published rings (fan-out and
/// Android share as the end-to-end part's) drained by a fresh worker process with every
/// token in the app `default`, and with the same number spread evenly over three apps, in
/// turns, in the same run.
#[derive(Debug, Default, serde::Serialize)]
pub struct AppsCost {
    pub rings: usize,
    /// The apps of the spread drains (`default` first).
    pub apps: Vec<String>,
    /// Every drain, in the order they ran.
    pub drains: Vec<AppsDrain>,
    /// Median notifications/s with one app and with three.
    pub one_app_notifications_per_s: f64,
    pub three_apps_notifications_per_s: f64,
    /// Three apps / one app (medians): the budget is ≥ 0.9 (within 10 %).
    pub throughput_ratio: f64,
    pub target_met: bool,
    /// The worker's CPU seconds per 10,000 notifications (medians), and three / one.
    pub one_app_worker_cpu_s_per_10k: f64,
    pub three_apps_worker_cpu_s_per_10k: f64,
    pub worker_cpu_ratio: f64,
}

/// One drain of the apps part.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AppsDrain {
    /// Whether the tokens were spread over three apps.
    pub three_apps: bool,
    #[serde(flatten)]
    pub drain: Drain,
    /// Cores the mock APNs and mock-fcm processes used over the drain.
    pub mock_apns_cores: f64,
    pub mock_fcm_cores: f64,
    /// The worker's accepted notifications by `app/platform`
    /// (`ringpush_platform_notifications_total{outcome="accepted"}`).
    pub accepted: BTreeMap<String, f64>,
    /// Notifications that failed for now (retried) by `app/platform`: none, usually.
    pub failed: BTreeMap<String, f64>,
    /// Open connections at the drain's end by `app/platform`
    /// (`ringpush_apns_connections`, `ringpush_fcm_connections`).
    pub connections: BTreeMap<String, f64>,
}

/// Seeds both fleets, writes the brands' folders, starts the mocks on them and drains
/// `args.rings` rings with one app and with three, [`APPS_ROUNDS`] times each, in turns.
pub(super) async fn apps_cost(
    args: &Settings,
    names: &Names,
    db_url: &str,
    pool: &deadpool_postgres::Pool,
    channel: &lapin::Channel,
    dir: &Path,
) -> anyhow::Result<AppsCost> {
    let dir = dir.join("apps-part");
    let apps_dir = dir.join("apps");
    std::fs::create_dir_all(&apps_dir)?;
    // The app `default`: the single-app variables (as the other parts' workers have them),
    // its key accepted by the mock for its team.
    let default_key = Key::generate("BENCHKEY01", "BENCHTEAM1")?;
    let key_file = dir.join("default.p8");
    default_key.write_p8(&key_file)?;
    // The brands' folders, their service accounts' token_uri at the mock-fcm to come.
    let fcm_port = free_port();
    for brand in BRANDS {
        write_brand(&apps_dir, brand, fcm_port)?;
    }
    let mut apns_flags: Vec<OsString> = vec!["--jwt-key-file".into(), key_file.clone().into()];
    for flag in ["--key-id", "BENCHKEY01", "--team-id", "BENCHTEAM1"] {
        apns_flags.push(flag.into());
    }
    let apps_flag = ["--apps-dir".into(), apps_dir.clone().into()];
    apns_flags.extend(apps_flag.clone());
    let apns_dir = dir.join("mock-apns");
    std::fs::create_dir_all(&apns_dir)?;
    let mock = MockProcess::start_with(&apns_dir, &apns_flags).await?;
    let fcm = FcmMockProcess::start_with(&dir.join("mock-fcm"), fcm_port, &apps_flag).await?;

    let apps: Vec<&str> = std::iter::once("default")
        .chain(BRANDS.iter().map(|b| b[0]))
        .collect();
    let topics: Vec<&str> = std::iter::once(DEFAULT_TOPIC)
        .chain(BRANDS.iter().map(|b| b[1]))
        .collect();
    {
        let client = pool.get().await?;
        seed(&client, ONE, &["default"], &[DEFAULT_TOPIC], args).await?;
        seed(&client, THREE, &apps, &topics, args).await?;
        analyze(&client).await?;
    }
    let expected_one = expected(pool, ONE, args.rings).await?;
    let expected_three = expected(pool, THREE, args.rings).await?;

    let worker_of = WorkerOf {
        args,
        names,
        db_url,
        mock: &mock,
        key_file: &key_file,
        fcm: Some(&fcm),
    };
    let apps_dir_env = apps_dir.to_string_lossy().into_owned();
    let env = [("RINGPUSH_APPS_DIR", apps_dir_env.as_str())];
    let want = (args.rings * args.fanout) as f64;
    let mut cost = AppsCost {
        rings: args.rings,
        apps: apps.iter().map(|a| a.to_string()).collect(),
        ..AppsCost::default()
    };
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for round in 0..APPS_ROUNDS * 2 {
        // one, three, three, one, one, three, three, one
        let spread = matches!(round % 4, 1 | 2);
        let (prefix, expected) = match spread {
            false => (ONE, &expected_one),
            true => (THREE, &expected_three),
        };
        publish_all(
            (0..args.rings).map(|i| {
                let r = ring_of(prefix, i);
                async move { broker::publish_ring(channel, names, &r).await }
            }),
            500,
        )
        .await?;
        let (mock0, fcm0) = (mock.cpu(), fcm.cpu());
        let (drain, body) = measure_drain_scraped(&worker_of, pool, args.rings, want, &env)
            .await
            .with_context(|| {
                format!(
                    "apps part, {} drain: a mock refusing an app's credentials shows as \
                     rejected notifications, and the worker never reaches its count",
                    if spread { "three-app" } else { "one-app" }
                )
            })?;
        let elapsed = args.rings as f64 / drain.rings_per_s;
        let drain = AppsDrain {
            three_apps: spread,
            mock_apns_cores: (mock.cpu() - mock0) / elapsed,
            mock_fcm_cores: (fcm.cpu() - fcm0) / elapsed,
            accepted: by_app(
                &body,
                "ringpush_platform_notifications_total",
                Some("accepted"),
            ),
            failed: by_app(
                &body,
                "ringpush_platform_notifications_total",
                Some("failed"),
            ),
            connections: by_app(&body, "ringpush_apns_connections", None)
                .into_iter()
                .chain(by_app(&body, "ringpush_fcm_connections", None))
                .collect(),
            drain,
        };
        check(&drain, &body, expected)?;
        cost.drains.push(drain.clone());
        match spread {
            false => one.push(drain.drain),
            true => three.push(drain.drain),
        }
    }
    let notifications = |d: &Drain| d.notifications_per_s;
    let cpu = |d: &Drain| d.worker_cpu_s_per_10k;
    cost.one_app_notifications_per_s = median_of(&one, notifications);
    cost.three_apps_notifications_per_s = median_of(&three, notifications);
    cost.throughput_ratio = cost.three_apps_notifications_per_s / cost.one_app_notifications_per_s;
    cost.target_met = cost.throughput_ratio >= TARGET;
    cost.one_app_worker_cpu_s_per_10k = median_of(&one, cpu);
    cost.three_apps_worker_cpu_s_per_10k = median_of(&three, cpu);
    cost.worker_cpu_ratio =
        cost.three_apps_worker_cpu_s_per_10k / cost.one_app_worker_cpu_s_per_10k;
    Ok(cost)
}

/// A brand's folder under `apps_dir`: its .p8 key, its service account (`token_uri` at
/// the mock-fcm on `fcm_port`) and `app.json`, as an operator writes one.
fn write_brand(apps_dir: &Path, brand: [&str; 5], fcm_port: u16) -> anyhow::Result<()> {
    let [id, topic, key_id, team_id, project] = brand;
    let folder = apps_dir.join(id);
    std::fs::create_dir_all(&folder)?;
    Key::generate(key_id, team_id)?.write_p8(&folder.join("apns.p8"))?;
    let email = format!("ringpush-bench@{project}.iam.gserviceaccount.com");
    let token_uri = format!("https://localhost:{fcm_port}/token");
    let account = crate::fcm::credentials::generate(project, &email, &token_uri)
        .map_err(anyhow::Error::msg)?;
    crate::mock::certs::write_private(&folder.join("fcm.json"), &account)?;
    let app_json = serde_json::json!({
        "apns": {"topic": topic, "key_file": "apns.p8", "key_id": key_id, "team_id": team_id},
        "fcm": {"credentials_file": "fcm.json"},
    });
    std::fs::write(folder.join("app.json"), app_json.to_string())?;
    Ok(())
}

/// [`GATEWAYS`] gateways `<prefix>1…`, each owned by a user of its own with `fanout` phones
/// (the first `android_share` percent Android, as the end-to-end part's), token `t` of the
/// fleet in app `apps[t % apps.len()]` — each ring's tokens in as many apps as it has
/// phones, up to all of them — an iPhone's topic its app's.
async fn seed(
    client: &deadpool_postgres::Client,
    prefix: &str,
    apps: &[&str],
    topics: &[&str],
    args: &Settings,
) -> anyhow::Result<()> {
    client
        .execute(
            "WITH u AS (INSERT INTO users (name) SELECT 'Resident ' || g FROM generate_series(1, $1::int) g RETURNING id)
             INSERT INTO gateways (id, owner_id, name)
             SELECT $2::text || row_number() OVER (ORDER BY id), id, 'Door ' || id FROM u",
            &[&GATEWAYS, &prefix],
        )
        .await?;
    client
        .execute(
            "INSERT INTO push_tokens (token, user_id, topic, platform, app)
             SELECT CASE WHEN android THEN 'c' || gw.owner_id || '-' || g || ':APA91b' || md5(random()::text)
                         ELSE md5(random()::text) || md5(random()::text) END,
                    gw.owner_id,
                    CASE WHEN android THEN NULL ELSE ($5::text[])[i] END,
                    CASE WHEN android THEN 'fcm' ELSE 'apns' END,
                    ($4::text[])[i]
             FROM (SELECT owner_id, substr(id, length($1::text) + 1)::int AS k
                   FROM gateways WHERE starts_with(id, $1::text)) gw,
                  generate_series(1, $2::int) g,
                  LATERAL (SELECT (g - 1) * 100 / $2::int < $3::int AS android,
                                  1 + ((gw.k - 1) * $2::int + g - 1) % cardinality($4::text[]) AS i) a",
            &[
                &prefix,
                &(args.fanout as i32),
                &(args.android_share as i32),
                &apps,
                &topics,
            ],
        )
        .await?;
    Ok(())
}

/// The notifications each `app/platform` takes when `rings` rings go round the gateways
/// `<prefix>1…` ([`ring_of`]), from the tokens as seeded.
async fn expected(
    pool: &deadpool_postgres::Pool,
    prefix: &str,
    rings: usize,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let (full, rem) = (
        (rings / GATEWAYS as usize) as i64,
        (rings % GATEWAYS as usize) as i64,
    );
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT t.app || '/' || t.platform,
                    sum($2::bigint + CASE WHEN gw.k <= $3::bigint THEN 1 ELSE 0 END)::float8
             FROM (SELECT owner_id, substr(id, length($1::text) + 1)::int AS k
                   FROM gateways WHERE starts_with(id, $1::text)) gw
             JOIN push_tokens t ON t.user_id = gw.owner_id
             GROUP BY 1",
            &[&prefix, &full, &rem],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Ring `i` of a drain: gateway `<prefix>{1 + i % GATEWAYS}`, pressed now.
fn ring_of(prefix: &str, i: usize) -> RingEvent {
    RingEvent {
        event_id: random_hex(16),
        gateway_id: format!("{prefix}{}", 1 + i % GATEWAYS as usize),
        pressed_at: OffsetDateTime::now_utc(),
        switch_id: None,
    }
}

/// A family's samples in a scrape by `app/platform` (each series' `app` and `platform`
/// labels), those with `outcome` only when given.
fn by_app(body: &str, family: &str, outcome: Option<&str>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let prefix = format!("{family}{{");
    for (labels, value) in body
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| l.split_once("} "))
    {
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        if outcome.is_some_and(|o| label("outcome").as_deref() != Some(o)) {
            continue;
        }
        let platform = label("platform").unwrap_or_else(|| family_platform(family).to_owned());
        let (Some(app), Ok(value)) = (label("app"), value.trim().parse::<f64>()) else {
            continue;
        };
        *out.entry(format!("{app}/{platform}")).or_default() += value;
    }
    out
}

/// The platform a family without a `platform` label is of, by its name.
fn family_platform(family: &str) -> &'static str {
    if family.contains("_fcm_") {
        "fcm"
    } else {
        "apns"
    }
}

/// Fails the part unless the worker accepted exactly what each `app/platform` was due and
/// counted nothing rejected, skipped or doubted: the proof that every app's own credentials
/// were taken by the mocks.
fn check(drain: &AppsDrain, body: &str, expected: &BTreeMap<String, f64>) -> anyhow::Result<()> {
    let kind = if drain.three_apps {
        "three-app"
    } else {
        "one-app"
    };
    for outcome in ["rejected", "unconfigured", "unsupported", "doubted"] {
        let counted = by_app(body, "ringpush_platform_notifications_total", Some(outcome));
        let counted: BTreeMap<_, _> = counted.into_iter().filter(|(_, n)| *n > 0.0).collect();
        anyhow::ensure!(
            counted.is_empty(),
            "apps part, {kind} drain: the worker counted notifications {outcome}: {counted:?} \
             (ringpush_platform_notifications_total)"
        );
    }
    anyhow::ensure!(
        drain.accepted == *expected,
        "apps part, {kind} drain: the worker accepted {:?} by app/platform, not the {:?} the \
         tokens are due (ringpush_platform_notifications_total)",
        drain.accepted,
        expected
    );
    if drain.three_apps {
        let apps: std::collections::BTreeSet<_> = expected
            .keys()
            .filter_map(|k| k.split_once('/').map(|(app, _)| app))
            .collect();
        anyhow::ensure!(
            apps.len() == 1 + BRANDS.len(),
            "apps part: the three-app fleet has tokens in {apps:?} only"
        );
    }
    Ok(())
}

/// The apps part's lines of the table.
pub(super) fn write_apps(f: &mut std::fmt::Formatter<'_>, a: &AppsCost) -> std::fmt::Result {
    writeln!(
        f,
        "many apps: {} rings drained by a fresh worker, every token in app default and spread over {} apps ({}), in turns",
        a.rings,
        a.apps.len(),
        a.apps.join(", ")
    )?;
    let each = |m: &BTreeMap<String, f64>| {
        let v: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
        v.join(", ")
    };
    for d in &a.drains {
        writeln!(
            f,
            "  {:<10} notifications/s {:>8.0}  worker CPU s/10k {:.3}  cores: mock APNs {:.2}, mock-fcm {:.2}, postgresql {:.2}, rabbitmq {:.2}",
            if d.three_apps { "three apps" } else { "one app" },
            d.drain.notifications_per_s,
            d.drain.worker_cpu_s_per_10k,
            d.mock_apns_cores,
            d.mock_fcm_cores,
            d.drain.postgresql_cores,
            d.drain.rabbitmq_cores
        )?;
        writeln!(f, "    accepted by app/platform  {}", each(&d.accepted))?;
        writeln!(f, "    connections at the end    {}", each(&d.connections))?;
        if d.failed.values().any(|n| *n > 0.0) {
            writeln!(f, "    failed for now (retried)  {}", each(&d.failed))?;
        }
    }
    writeln!(
        f,
        "  notifications/s three apps / one (medians)  {:.0} / {:.0} = {:.3} (budget: within 10 %, ≥ 0.9: {})",
        a.three_apps_notifications_per_s,
        a.one_app_notifications_per_s,
        a.throughput_ratio,
        if a.target_met { "met" } else { "missed" }
    )?;
    writeln!(
        f,
        "  worker CPU s/10k three apps / one (medians)  {:.3} / {:.3} = {:.3}",
        a.three_apps_worker_cpu_s_per_10k, a.one_app_worker_cpu_s_per_10k, a.worker_cpu_ratio
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_reads_by_app_and_platform() {
        let body = "\
ringpush_platform_notifications_total{app=\"default\",platform=\"apns\",outcome=\"accepted\"} 10
ringpush_platform_notifications_total{app=\"default\",platform=\"apns\",outcome=\"failed\"} 1
ringpush_platform_notifications_total{app=\"brand-a\",platform=\"fcm\",outcome=\"accepted\"} 4
ringpush_apns_connections{app=\"brand-a\"} 2
ringpush_fcm_connections{app=\"brand-a\"} 1
";
        let family = "ringpush_platform_notifications_total";
        let accepted = by_app(body, family, Some("accepted"));
        let want = [
            ("brand-a/fcm".to_owned(), 4.0),
            ("default/apns".into(), 10.0),
        ];
        assert_eq!(accepted, BTreeMap::from(want));
        assert_eq!(by_app(body, family, Some("failed")).len(), 1);
        let connections = by_app(body, "ringpush_apns_connections", None);
        assert_eq!(connections, BTreeMap::from([("brand-a/apns".into(), 2.0)]));
        let connections = by_app(body, "ringpush_fcm_connections", None);
        assert_eq!(connections, BTreeMap::from([("brand-a/fcm".into(), 1.0)]));
    }
}
