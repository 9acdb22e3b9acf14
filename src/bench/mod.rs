//! `ringpush bench`: how fast, measured against the limits of the parts it is made of, in
//! one run on this machine (see BENCHMARKS.md). Against the local RabbitMQ and PostgreSQL
//! and the in-crate mock on loopback:
//!
//! 1. end to end: N rings pre-published (fan-out F), one `ringpush worker` process, time to
//!    drain; worker CPU and peak RSS from /proc; ring-to-accepted latency at a fixed half rate;
//! 2. the broker's ceiling: a bare lapin consume-and-ack loop over the same messages;
//! 3. the APNs leg: ringpush's client against a bare `h2` loop and the peers
//!    (`@parse/node-apn`, `aioapns`, driven by `bench/peers/`), each against a mock process;
//! 4. the legacy binary interface: frames/s to the mock's gateway port;
//! 5. building rings (after 1, with a worker of its own): ring-to-accepted of ordinary rings
//!    at a quarter of the drain rate, alone and while a 3,000-token ring is published every
//!    second, the building rings' own time to their last token, and the worker's peak RSS.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::json;
use time::OffsetDateTime;

use crate::apns::request::{build_payload, build_request, AlertTemplate, Endpoint, Notification};
use crate::apns::{binary, http2, jwt, tls, Answer};
use crate::broker::{self, BrokerError, Names};
use crate::config::BenchArgs;
use crate::token::{random_hex, DeviceToken, Environment};
use crate::wire::ring::RingEvent;

/// Everything one run measured; `None` where a part was skipped or failed (with the reason).
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub machine: String,
    pub rings: usize,
    pub fanout: usize,
    pub e2e_rings_per_s: f64,
    pub e2e_notifications_per_s: f64,
    pub e2e_worker_cpu_s_per_10k: f64,
    pub e2e_worker_cores: f64,
    pub e2e_worker_peak_rss_mb: f64,
    /// Cores used while draining, by process: worker, mock, rabbitmq, postgresql, and
    /// `machine` (all processes; 2.0 is every core of a 2-core machine busy).
    pub e2e_cores: BTreeMap<String, f64>,
    pub e2e_backlog_p50_ms: Option<f64>,
    pub e2e_backlog_p99_ms: Option<f64>,
    /// Rings published live at half the drain rate: the target's latency.
    pub half_rate: Window,
    /// The same at a quarter of the drain rate: how the latency falls when the machine is
    /// less busy.
    pub quarter_rate: Window,
    pub broker_rings_per_s: f64,
    /// Publish → bare consumer through the same queue type at the half rate: the part of
    /// ring-to-accepted that is the broker's.
    pub broker_half_rate_p50_ms: Option<f64>,
    pub broker_half_rate_p99_ms: Option<f64>,
    pub apns_requests: usize,
    pub ringpush_client_per_s: f64,
    pub ringpush_client_cpu_us: f64,
    /// The client alone at the end-to-end half rate (× fan-out notifications/s): send →
    /// answer latency without the broker, database and worker around it.
    pub ringpush_client_half_rate_p50_ms: Option<f64>,
    pub ringpush_client_half_rate_p99_ms: Option<f64>,
    pub bare_h2_per_s: f64,
    pub bare_h2_cpu_us: f64,
    pub peers: Vec<Peer>,
    pub binary_frames: usize,
    pub binary_frames_per_s: f64,
    /// With `--soak`: the soak's length, rate, and the worker's RSS samples (MB, every 10 s).
    pub soak_seconds: Option<f64>,
    pub soak_rings_per_s: Option<f64>,
    pub soak_rss_mb: Vec<f64>,
    /// Ordinary rings alone and beside building rings (see [`Building`]).
    pub building: Option<Building>,
    pub notes: Vec<String>,
}

/// Is a ring of thousands of tokens shared fairly? Ordinary rings published live at a
/// quarter of the drain rate, (A) alone and (B) while one building ring a second is
/// published beside them: [`BUILDING_ROUNDS`] windows of each, [`BUILDING_WINDOW_SECS`]
/// each, in turns (A, B, A, B, …), each kind's histograms pooled; a worker process of its
/// own (whose per-ring log lines time the building rings).
#[derive(Debug, Default, serde::Serialize)]
pub struct Building {
    /// Tokens of the building's ring (1,500 sharees × 2 phones; the owner has none).
    pub tokens: usize,
    pub building_rings_per_s: f64,
    pub window_seconds: f64,
    /// Windows of each kind.
    pub rounds: usize,
    /// (A) the ordinary rings alone, pooled over its windows.
    pub alone: Window,
    /// (B) the same beside the building rings: `p50_ms`/`p99_ms` are the ordinary rings'
    /// ring-to-accepted alone; `apns_*` and `cores` are of everything.
    pub beside_building: Window,
    /// p99 (B) / p99 (A), pooled: the target is ≤ 2.
    pub p99_ratio: Option<f64>,
    pub target_met: Option<bool>,
    /// Each round on its own: how much the host moved between windows, and whether the
    /// worker's memory grows with the building rings.
    pub each_round: Vec<Round>,
    /// Each building ring of (B), in order: from its publishing (its `pressed_at` is set
    /// [`BESIDE_PRESSED_BEFORE`] earlier) to the worker's `ring delivered` line, written
    /// once its last token has its answer, ms.
    pub building_last_accepted_ms: Vec<f64>,
    /// The worker's peak RSS (`VmHWM`) over the first (A) window, before any building ring,
    /// and over the (B) windows, MB.
    pub worker_peak_rss_alone_mb: f64,
    pub worker_peak_rss_beside_mb: f64,
    /// Whether each peak is its window's own (`VmHWM` reset through `/proc/<pid>/clear_refs`
    /// before each window) or the process's since it started.
    pub rss_peak_per_window: bool,
}

/// One (A) window and the (B) window after it.
#[derive(Debug, Default, serde::Serialize)]
pub struct Round {
    pub alone_p99_ms: Option<f64>,
    pub beside_p99_ms: Option<f64>,
    /// The worker's peak RSS over each of the two windows, MB.
    pub alone_peak_rss_mb: f64,
    pub beside_peak_rss_mb: f64,
}

/// The building gateway, its sharees and phones each.
const BUILDING: &str = "bench-building";
const BUILDING_SHAREES: i32 = 1_500;
const BUILDING_PHONES: i32 = 2;
/// Length of each window of the building part, and how many of each kind (A, B) it runs,
/// in turns.
const BUILDING_WINDOW_SECS: f64 = 5.0;
const BUILDING_ROUNDS: usize = 3;

/// Rings published live (with confirms, as gateways do) at a fixed rate for 5 s while the
/// worker runs: its ring-to-accepted latency and who used the cores.
#[derive(Debug, Default, serde::Serialize)]
pub struct Window {
    pub rings_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The worker's APNs request latency (send → answer) over the same window.
    pub apns_p50_ms: Option<f64>,
    pub apns_p99_ms: Option<f64>,
    /// Cores busy over the window, by process (as `e2e_cores`; `bench` publishes).
    pub cores: BTreeMap<String, f64>,
}

/// One peer client's run.
#[derive(Debug, serde::Serialize)]
pub struct Peer {
    pub name: String,
    pub per_s: Option<f64>,
    pub cpu_us: Option<f64>,
    pub note: Option<String>,
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of every process named `beam.smp` (RabbitMQ) or `postgres`, by pid.
fn service_cpu() -> HashMap<u32, (&'static str, f64)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let service = match comm.trim() {
            "beam.smp" => "rabbitmq",
            "postgres" => "postgresql",
            _ => continue,
        };
        out.insert(pid, (service, cpu_seconds(&pid.to_string())));
    }
    out
}

/// Busy CPU seconds of the whole machine (all cores), from /proc/stat.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).unwrap_or(&0.0) + f.get(4).unwrap_or(&0.0);
    (total - idle) / 100.0
}

/// Cores each service used between two [`service_cpu`] snapshots `secs` apart.
fn service_cores(
    before: &HashMap<u32, (&'static str, f64)>,
    after: &HashMap<u32, (&'static str, f64)>,
    secs: f64,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (pid, (service, cpu)) in after {
        let start = before.get(pid).map_or(0.0, |b| b.1);
        *out.entry((*service).to_owned()).or_default() += (cpu - start) / secs;
    }
    out
}

/// Peak resident set size of a process, MB.
fn peak_rss_mb(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident set size of a process now, MB.
fn current_rss_mb(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes a process's Prometheus text page.
async fn scrape(port: u16) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    Ok(crate::http::get(&url, Duration::from_secs(30)).await?.body)
}

fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The cumulative buckets of a histogram in a scrape.
fn buckets(body: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Awaits every publish, `at_once` in flight; the first failure is the answer.
async fn publish_all<Fut>(
    publishes: impl Iterator<Item = Fut>,
    at_once: usize,
) -> Result<(), BrokerError>
where
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let results: Vec<_> = stream::iter(publishes)
        .buffer_unordered(at_once)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Starts `task(i)` for each `i` in `0..n` at `rate` per second, each on a task of its own
/// (so a slow one does not hold back the pace), and returns their outputs in order.
async fn paced<T, F, Fut>(rate: f64, n: usize, mut task: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut started = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        started.push(tokio::spawn(task(i)));
    }
    let mut out = Vec::with_capacity(n);
    for t in started {
        out.push(t.await?);
    }
    Ok(out)
}

/// The exact median and 99th percentile of measured latencies (`None` if there are none).
fn p50_p99(mut latencies: Vec<f64>) -> (Option<f64>, Option<f64>) {
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().checked_sub(1)?);
        latencies.get(i).copied()
    };
    (at(0.5), at(0.99))
}

/// The cumulative buckets of what a histogram counted between two scrapes.
fn delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            (
                le,
                n - before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1),
            )
        })
        .collect()
}

/// Median and 99th percentile (ms) of cumulative buckets in seconds, interpolated.
fn quantiles_of(buckets: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    let q = |p| crate::metrics::quantile(buckets, p).map(|s| s * 1000.0);
    (q(0.5), q(0.99))
}

fn quantiles_ms(before: &[(f64, f64)], after: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    quantiles_of(&delta(before, after))
}

/// Takes `n` observations out of the `+Inf` bucket (never below the last finite bucket's
/// count): the notifications of rings pressed so far back that each of them is there.
fn leave_out_above_last_bucket(buckets: &mut [(f64, f64)], n: f64) {
    if let [.., (_, last_finite), (le, inf)] = buckets {
        if le.is_infinite() {
            *inf = (*inf - n).max(*last_finite);
        }
    }
}

/// Runs the benchmark and cleans up after it.
///
/// It runs on a runtime worker thread, as the worker's batches do: on the main thread (the
/// runtime's `block_on`) every request of the APNs-leg loops would cross threads twice.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let args = args.clone();
    tokio::spawn(async move { run_here(&args).await }).await?
}

async fn run_here(args: &BenchArgs) -> anyhow::Result<Report> {
    let id = random_hex(4);
    let names = Names::new(&format!("ringpush-bench-{id}"));
    let schema = format!("ringpush_bench_{id}");
    let dir = std::env::temp_dir().join(format!("ringpush-bench-{id}"));
    std::fs::create_dir_all(&dir)?;
    let mut report = Report {
        machine: format!(
            "{} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::env::consts::ARCH
        ),
        rings: args.rings,
        fanout: args.fanout,
        apns_requests: args.apns_requests,
        binary_frames: args.binary_frames,
        ..Report::default()
    };
    let result = async {
        end_to_end(args, &names, &schema, &dir, &mut report).await?;
        broker_ceiling(args, &names, &mut report).await?;
        apns_leg(args, &dir, &mut report).await?;
        binary_leg(args, &dir, &mut report).await?;
        anyhow::Ok(())
    }
    .await;
    // Clean up whatever happened.
    if let Ok(connection) = broker::connect(&args.local.amqp_url, "ringpush bench cleanup").await {
        if let Ok(channel) = connection.create_channel().await {
            let _ = broker::delete(&channel, &names).await;
            let _ = channel
                .queue_delete(
                    format!("{}.bench", names.prefix).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = connection.close(200, "done".into()).await;
    }
    let _ = crate::db::drop_schema(&args.local.database_url, &schema).await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(report)
}

/// A mock APNs in a child process (so its CPU is not counted with the client's).
struct MockProcess {
    /// Killed when dropped.
    _child: tokio::process::Child,
    port: u16,
    binary_port: u16,
    cert_dir: PathBuf,
}

impl MockProcess {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let (port, binary_port, feedback_port) = (free_port(), free_port(), free_port());
        let cert_dir = dir.join("mock-certs");
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("mock-apns")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--binary-listen", &format!("127.0.0.1:{binary_port}")])
            .args(["--feedback-listen", &format!("127.0.0.1:{feedback_port}")])
            .arg("--cert-dir")
            .arg(&cert_dir)
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .stdout(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the mock did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            _child: child,
            port,
            binary_port,
            cert_dir,
        })
    }

    /// CPU seconds the mock has used.
    fn cpu(&self) -> f64 {
        self._child
            .id()
            .map_or(0.0, |pid| cpu_seconds(&pid.to_string()))
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::parse(&format!("https://localhost:{}", self.port)).expect("a valid URL")
    }
}

fn signer(dir: &Path) -> anyhow::Result<(Arc<jwt::Signer>, PathBuf)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let file = dir.join("bench-key.p8");
    crate::mock::certs::write_private(&file, &key.serialize_pem())?;
    let signer = jwt::Signer::from_pem(
        key.serialize_pem().as_bytes(),
        "BENCHKEY01",
        "BENCHTEAM1",
        jwt::DEFAULT_REFRESH,
    )?;
    Ok((Arc::new(signer), file))
}

async fn end_to_end(
    args: &BenchArgs,
    names: &Names,
    schema: &str,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    // The database: gateways of F phones each.
    crate::db::create_schema(&args.local.database_url, schema).await?;
    let db_url = crate::db::url_with_schema(&args.local.database_url, schema);
    crate::db::migrate(&db_url).await?;
    let pool = crate::db::pool(&db_url, 2, Duration::from_secs(5))?;
    // A fleet, not a handful: with a few hundred gateways (and no statistics) the generic
    // plan of the prepared lookup scans whole tables instead of using the indexes, and the
    // bench would measure a toy database (see BENCHMARKS.md).
    let gateways = 10_000;
    {
        let client = pool.get().await?;
        client
            .execute(
                "WITH u AS (INSERT INTO users SELECT FROM generate_series(1, $1::int) RETURNING id)
                 INSERT INTO gateways (id, owner_id, name) SELECT 'bench-' || id, id, 'Door ' || id FROM u",
                &[&gateways],
            )
            .await?;
        client
            .execute(
                "INSERT INTO push_tokens (token, user_id, topic)
                 SELECT md5(random()::text) || md5(random()::text), u.id, 'com.example.doorbell'
                 FROM users u, generate_series(1, $1::int)",
                &[&(args.fanout as i32)],
            )
            .await?;
        // Statistics, as a database in service has them (autovacuum would, a minute later).
        client.batch_execute("ANALYZE").await?;
    }
    let mock = MockProcess::start(dir).await?;
    let (_, key_file) = signer(dir)?;
    // The rings, pre-published as gateways would.
    let connection = broker::connect(&args.local.amqp_url, "ringpush bench gateway").await?;
    let channel = broker::confirm_channel(&connection).await?;
    broker::declare(&channel, names).await?;
    let ring = |i: usize| RingEvent {
        event_id: random_hex(16),
        gateway_id: format!("bench-{}", 1 + i % gateways as usize),
        pressed_at: OffsetDateTime::now_utc(),
        switch_id: None,
    };
    publish_all(
        (0..args.rings).map(|i| {
            let (channel, r) = (&channel, ring(i));
            async move { broker::publish_ring(channel, names, &r).await }
        }),
        500,
    )
    .await?;

    // One worker process.
    let metrics_port = free_port();
    let worker_of = WorkerOf {
        args,
        names,
        db_url: &db_url,
        mock: &mock,
        key_file: &key_file,
    };
    let mut worker = worker_of.spawn(metrics_port, None)?;
    let pid = worker.id().expect("a running worker").to_string();
    let (services0, machine0, mock0) = (service_cpu(), machine_busy_seconds(), mock.cpu());
    let started = Instant::now();
    let want = (args.rings * args.fanout) as f64;
    let accepted = r#"ringpush_notifications_total{outcome="accepted"}"#;
    let body = loop {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Ok(body) = scrape(metrics_port).await {
            if sample(&body, accepted) >= want {
                break body;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the worker did not drain the rings in 10 minutes"
        );
    };
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pid);
    report.e2e_cores = service_cores(&services0, &service_cpu(), elapsed);
    report.e2e_cores.insert("worker".into(), cpu / elapsed);
    report
        .e2e_cores
        .insert("mock".into(), (mock.cpu() - mock0) / elapsed);
    report.e2e_cores.insert(
        "machine".into(),
        (machine_busy_seconds() - machine0) / elapsed,
    );
    report.e2e_rings_per_s = args.rings as f64 / elapsed;
    report.e2e_notifications_per_s = want / elapsed;
    report.e2e_worker_cpu_s_per_10k = cpu / want * 10_000.0;
    report.e2e_worker_cores = cpu / elapsed;
    let full = buckets(&body, "ringpush_ring_to_accepted_seconds");
    (report.e2e_backlog_p50_ms, report.e2e_backlog_p99_ms) = quantiles_ms(&[], &full);

    // Half the rate, steady, for a few seconds: the latency a person at the door sees; then a
    // quarter, to show how much of it is the machine being busy.
    let live = Live {
        channel: &channel,
        names,
        metrics_port,
        pid: &pid,
        mock: &mock,
        fanout: args.fanout,
    };
    report.half_rate = live.window(report.e2e_rings_per_s / 2.0, &ring).await?;
    report.quarter_rate = live.window(report.e2e_rings_per_s / 4.0, &ring).await?;
    report.e2e_worker_peak_rss_mb = peak_rss_mb(&pid);

    if let Some(length) = args.soak {
        // Steady load at 80% of the drain rate, publishing in 100 ms slices.
        let rate = report.e2e_rings_per_s * 0.8;
        let per_slice = ((rate / 10.0) as usize).max(1);
        let started = Instant::now();
        let mut next_sample = Instant::now();
        let mut slice = tokio::time::interval(Duration::from_millis(100));
        let mut i = 0;
        while started.elapsed() < length {
            slice.tick().await;
            publish_all(
                (0..per_slice).map(|_| {
                    i += 1;
                    let (channel, r) = (&channel, ring(i));
                    async move { broker::publish_ring(channel, names, &r).await }
                }),
                200,
            )
            .await?;
            if Instant::now() >= next_sample {
                report.soak_rss_mb.push(current_rss_mb(&pid));
                next_sample += Duration::from_secs(10);
            }
        }
        report.soak_seconds = Some(started.elapsed().as_secs_f64());
        report.soak_rings_per_s = Some(rate);
        report.e2e_worker_peak_rss_mb = peak_rss_mb(&pid);
    }

    stop(&mut worker).await;

    // Building rings beside ordinary ones, with a worker of its own (see `building`).
    let quarter = report.e2e_rings_per_s / 4.0;
    report.building = Some(building(&worker_of, &pool, &channel, quarter, &ring, dir).await?);
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The building part (see [`Building`]): seeds the building gateway beside the fleet,
/// starts a worker of its own, warms it up with 2 s of ordinary rings, then runs (A) and
/// (B) at `rate` ordinary rings a second.
async fn building(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    channel: &lapin::Channel,
    rate: f64,
    ring: &impl Fn(usize) -> RingEvent,
    dir: &Path,
) -> anyhow::Result<Building> {
    let tokens = {
        let client = pool.get().await?;
        // Shares of a fleet first: each ordinary gateway lists its own owner as a sharee
        // (`UNION` drops the repeat: its rings still reach the same 4 phones). With the
        // building's 1,500 shares the only ones, the statistics say every gateway has 1,500
        // sharees and PostgreSQL's generic plan for the lookup turns into a hash join over
        // every token: 15 ms per lookup instead of 0.1 ms, for ordinary rings too (see
        // BENCHMARKS.md).
        client
            .execute(
                "INSERT INTO gateway_shares (gateway_id, user_id) SELECT id, owner_id FROM gateways",
                &[],
            )
            .await?;
        client
            .execute(
                "WITH owner AS (INSERT INTO users DEFAULT VALUES RETURNING id)
                 INSERT INTO gateways (id, owner_id, name) SELECT $1::text, id, 'Building' FROM owner",
                &[&BUILDING],
            )
            .await?;
        client
            .execute(
                "WITH u AS (INSERT INTO users SELECT FROM generate_series(1, $2::int) RETURNING id),
                      s AS (INSERT INTO gateway_shares (gateway_id, user_id)
                            SELECT $1::text, id FROM u RETURNING user_id)
                 INSERT INTO push_tokens (token, user_id, topic)
                 SELECT md5(random()::text) || md5(random()::text), s.user_id, 'com.example.doorbell'
                 FROM s, generate_series(1, $3::int)",
                &[&BUILDING, &BUILDING_SHAREES, &BUILDING_PHONES],
            )
            .await?;
        client.batch_execute("ANALYZE").await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM push_tokens t JOIN gateway_shares s USING (user_id)
                 WHERE s.gateway_id = $1::text",
                &[&BUILDING],
            )
            .await?;
        row.get::<_, i64>(0) as usize
    };

    let metrics_port = free_port();
    let log = dir.join("building-worker.log");
    let mut worker = worker_of.spawn(metrics_port, Some(&log))?;
    let pid = worker.id().expect("a running worker").to_string();
    let started = Instant::now();
    while scrape(metrics_port).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the building part's worker did not start"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let live = Live {
        channel,
        names: worker_of.names,
        metrics_port,
        pid: &pid,
        mock: worker_of.mock,
        fanout: worker_of.args.fanout,
    };
    // Connections up, stream limits raised, pools filled: not measured.
    live.window_with(rate, 2.0, ring, None).await?;

    let mut report = Building {
        tokens,
        building_rings_per_s: 1.0,
        window_seconds: BUILDING_WINDOW_SECS,
        rounds: BUILDING_ROUNDS,
        ..Building::default()
    };
    let presses = std::sync::Mutex::new(HashMap::new());
    let building_ring = |_| {
        let now = OffsetDateTime::now_utc();
        let ring = RingEvent {
            event_id: random_hex(16),
            gateway_id: BUILDING.into(),
            pressed_at: now - BESIDE_PRESSED_BEFORE,
            switch_id: None,
        };
        presses.lock().unwrap().insert(ring.event_id.clone(), now);
        ring
    };
    // (A) and (B) in turns, pooled: the host's slow spells fall on both.
    let (mut alone, mut beside) = (Counted::default(), Counted::default());
    report.rss_peak_per_window = true;
    for _ in 0..BUILDING_ROUNDS {
        report.rss_peak_per_window &= reset_peak_rss(&pid);
        let a = live
            .window_with(rate, BUILDING_WINDOW_SECS, ring, None)
            .await?;
        let alone_peak_rss_mb = peak_rss_mb(&pid);
        report.rss_peak_per_window &= reset_peak_rss(&pid);
        let building = Beside {
            per_s: report.building_rings_per_s,
            tokens,
            ring: &building_ring,
        };
        let b = live
            .window_with(rate, BUILDING_WINDOW_SECS, ring, Some(building))
            .await?;
        report.each_round.push(Round {
            alone_p99_ms: a.window().p99_ms,
            beside_p99_ms: b.window().p99_ms,
            alone_peak_rss_mb,
            beside_peak_rss_mb: peak_rss_mb(&pid),
        });
        alone.add(a);
        beside.add(b);
    }
    stop(&mut worker).await;
    report.alone = alone.window();
    report.beside_building = beside.window();
    // The first (A) window is before any building ring; later ones keep what the
    // allocator kept.
    report.worker_peak_rss_alone_mb = report.each_round[0].alone_peak_rss_mb;
    report.worker_peak_rss_beside_mb = report
        .each_round
        .iter()
        .map(|r| r.beside_peak_rss_mb)
        .fold(0.0, f64::max);

    if let (Some(a), Some(b)) = (report.alone.p99_ms, report.beside_building.p99_ms) {
        report.p99_ratio = Some(b / a);
        report.target_met = Some(b / a <= 2.0);
    }
    let presses = presses.into_inner().unwrap();
    let mut done = delivered_at(&std::fs::read_to_string(&log)?, BUILDING)
        .into_iter()
        .filter_map(|(event, at)| {
            let pressed = presses.get(&event)?;
            Some((*pressed, (at - *pressed).as_seconds_f64() * 1000.0))
        })
        .collect::<Vec<_>>();
    done.sort_by_key(|d| d.0);
    report.building_last_accepted_ms = done.into_iter().map(|d| d.1).collect();
    Ok(report)
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS; false if it cannot.
fn reset_peak_rss(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// `(event_id, time)` of each `ring delivered` line of `gateway` in a worker's JSON log.
fn delivered_at(log: &str, gateway: &str) -> Vec<(String, OffsetDateTime)> {
    log.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = v.get("fields")?;
            if fields.get("message")?.as_str()? != "ring delivered"
                || fields.get("gateway")?.as_str()? != gateway
            {
                return None;
            }
            let at = OffsetDateTime::parse(
                v.get("timestamp")?.as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?;
            Some((fields.get("event")?.as_str()?.to_owned(), at))
        })
        .collect()
}

/// Stops a worker process as Kubernetes would (SIGTERM) and waits for it (at most 30 s).
async fn stop(worker: &mut tokio::process::Child) {
    if let Some(pid) = worker.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
}

/// What a `ringpush worker` process of the bench is started with.
struct WorkerOf<'a> {
    args: &'a BenchArgs,
    names: &'a Names,
    db_url: &'a str,
    mock: &'a MockProcess,
    key_file: &'a Path,
}

impl WorkerOf<'_> {
    /// Starts one worker against the mock, serving `/metrics` on `metrics_port`. Its logs
    /// are warnings only, or — with `info_log` — its per-ring lines too, as JSON, into that
    /// file. The worker's other variables come from the bench's environment.
    fn spawn(
        &self,
        metrics_port: u16,
        info_log: Option<&Path>,
    ) -> anyhow::Result<tokio::process::Child> {
        let mock = self.mock;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("worker")
            .env("RINGPUSH_AMQP_URL", &self.args.local.amqp_url)
            .env("RINGPUSH_QUEUE_PREFIX", &self.names.prefix)
            .env("RINGPUSH_DATABASE_URL", self.db_url)
            .env(
                "RINGPUSH_APNS_PRODUCTION_URL",
                format!("https://localhost:{}", mock.port),
            )
            .env(
                "RINGPUSH_APNS_SANDBOX_URL",
                format!("https://localhost:{}", mock.port),
            )
            .env("RINGPUSH_APNS_CA_FILE", mock.cert_dir.join("ca.pem"))
            .env("RINGPUSH_APNS_KEY_FILE", self.key_file)
            .env("RINGPUSH_APNS_KEY_ID", "BENCHKEY01")
            .env("RINGPUSH_APNS_TEAM_ID", "BENCHTEAM1")
            .env("RINGPUSH_RING_TTL", "600s")
            .env("RINGPUSH_PREFETCH", self.args.prefetch.to_string())
            .env("RINGPUSH_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        if let Some(file) = info_log {
            command
                .env("RUST_LOG", "warn,ringpush::worker=info")
                .env("RINGPUSH_LOG_FORMAT", "json")
                .stderr(std::fs::File::create(file)?);
        }
        Ok(command.spawn()?)
    }
}

/// What a live-publishing window needs from the end-to-end run.
struct Live<'a> {
    channel: &'a lapin::Channel,
    names: &'a Names,
    metrics_port: u16,
    pid: &'a str,
    mock: &'a MockProcess,
    fanout: usize,
}

/// Rings published beside a window's measured ones (the building rings): `per_s` rings of
/// `tokens` tokens each, made by `ring` with a `pressed_at` [`BESIDE_PRESSED_BEFORE`] back.
/// Their notifications fall above the last bucket of the worker's ring-to-accepted
/// histogram, so the window's latency leaves them out and is that of the measured rings.
struct Beside<'a> {
    per_s: f64,
    tokens: usize,
    ring: &'a (dyn Fn(usize) -> RingEvent + Sync),
}

/// How far back a ring beside the measured ones is pressed: beyond the histogram's last
/// bucket (about 19 s), well within the bench worker's 600 s ring TTL.
const BESIDE_PRESSED_BEFORE: time::Duration = time::Duration::seconds(60);

impl Live<'_> {
    /// Publishes rings at `rate` for 5 s, waits until the worker has every notification
    /// accepted (at most 60 s), and reads the worker's histograms over the window.
    async fn window(&self, rate: f64, ring: impl Fn(usize) -> RingEvent) -> anyhow::Result<Window> {
        Ok(self.window_with(rate, 5.0, ring, None).await?.window())
    }

    /// [`Live::window`] for `secs`, with `beside` rings published at their own pace over
    /// the same time (their notifications are waited for too, but not in the latency; the
    /// APNs request latency is of every request).
    async fn window_with(
        &self,
        rate: f64,
        secs: f64,
        ring: impl Fn(usize) -> RingEvent,
        beside: Option<Beside<'_>>,
    ) -> anyhow::Result<Counted> {
        let rate = rate.max(1.0);
        let n = (rate * secs) as usize;
        let accepted = r#"ringpush_notifications_total{outcome="accepted"}"#;
        let body_before = scrape(self.metrics_port).await?;
        let before = buckets(&body_before, "ringpush_ring_to_accepted_seconds");
        let apns_before = buckets(&body_before, "ringpush_apns_request_seconds");
        let count_before = sample(&body_before, accepted);
        let (services0, machine0, mock0) = (service_cpu(), machine_busy_seconds(), self.mock.cpu());
        let (worker0, bench0, started) = (cpu_seconds(self.pid), self_cpu(), Instant::now());
        let publish = |r: RingEvent| {
            let (channel, names) = (self.channel.clone(), self.names.clone());
            async move { broker::publish_ring(&channel, &names, &r).await }
        };
        let n_beside = beside.as_ref().map_or(0, |b| (b.per_s * secs) as usize);
        let (published, published_beside) =
            tokio::join!(paced(rate, n, |i| publish(ring(i))), async {
                match &beside {
                    Some(b) if n_beside > 0 => {
                        paced(b.per_s, n_beside, |i| publish((b.ring)(i))).await
                    }
                    _ => Ok(Vec::new()),
                }
            });
        published?.into_iter().collect::<Result<(), _>>()?;
        published_beside?.into_iter().collect::<Result<(), _>>()?;
        let beside_notifications = (n_beside * beside.as_ref().map_or(0, |b| b.tokens)) as f64;
        let target = count_before + (n * self.fanout) as f64 + beside_notifications;
        let mut after = String::new();
        while started.elapsed() < Duration::from_secs(65) {
            after = scrape(self.metrics_port).await?;
            if sample(&after, accepted) >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        // CPU seconds by process (cores × seconds), so that windows can be pooled.
        let mut cpu: BTreeMap<String, f64> = service_cores(&services0, &service_cpu(), 1.0);
        for (name, used) in [
            ("worker", cpu_seconds(self.pid) - worker0),
            ("mock", self.mock.cpu() - mock0),
            ("bench", self_cpu() - bench0),
            ("machine", machine_busy_seconds() - machine0),
        ] {
            cpu.insert(name.into(), used);
        }
        let mut ring_to_accepted = delta(
            &before,
            &buckets(&after, "ringpush_ring_to_accepted_seconds"),
        );
        leave_out_above_last_bucket(&mut ring_to_accepted, beside_notifications);
        Ok(Counted {
            rate,
            secs,
            ring_to_accepted,
            apns: delta(
                &apns_before,
                &buckets(&after, "ringpush_apns_request_seconds"),
            ),
            cpu,
        })
    }
}

/// What one or more windows at the same rate counted: histogram buckets (deltas) and CPU
/// seconds by process, over `secs`.
#[derive(Debug, Default)]
struct Counted {
    rate: f64,
    secs: f64,
    ring_to_accepted: Vec<(f64, f64)>,
    apns: Vec<(f64, f64)>,
    cpu: BTreeMap<String, f64>,
}

impl Counted {
    /// Pools another window's counts into these (the same histograms, the same buckets).
    fn add(&mut self, other: Counted) {
        let sum = |mine: &mut Vec<(f64, f64)>, theirs: Vec<(f64, f64)>| {
            if mine.is_empty() {
                *mine = theirs;
            } else {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    m.1 += t.1;
                }
            }
        };
        sum(&mut self.ring_to_accepted, other.ring_to_accepted);
        sum(&mut self.apns, other.apns);
        for (name, seconds) in other.cpu {
            *self.cpu.entry(name).or_default() += seconds;
        }
        self.rate = other.rate;
        self.secs += other.secs;
    }

    fn window(&self) -> Window {
        let (p50_ms, p99_ms) = quantiles_of(&self.ring_to_accepted);
        let (apns_p50_ms, apns_p99_ms) = quantiles_of(&self.apns);
        let secs = self.secs.max(f64::MIN_POSITIVE);
        Window {
            rings_per_s: self.rate,
            p50_ms,
            p99_ms,
            apns_p50_ms,
            apns_p99_ms,
            cores: self
                .cpu
                .iter()
                .map(|(k, v)| (k.clone(), v / secs))
                .collect(),
        }
    }
}

/// A ring of gateway `bench-1` pressed now (the broker and APNs legs' message).
fn ring_now() -> RingEvent {
    RingEvent {
        event_id: random_hex(16),
        gateway_id: "bench-1".into(),
        pressed_at: OffsetDateTime::now_utc(),
        switch_id: None,
    }
}

async fn broker_ceiling(
    args: &BenchArgs,
    names: &Names,
    report: &mut Report,
) -> anyhow::Result<()> {
    let connection = broker::connect(&args.local.amqp_url, "ringpush bench broker").await?;
    let channel = broker::confirm_channel(&connection).await?;
    let queue = format!("{}.bench", names.prefix);
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    let body = ring_now().to_json();
    publish_all(
        (0..args.rings).map(|_| {
            broker::publish_confirmed(&channel, "", &queue, &body, BasicProperties::default())
        }),
        500,
    )
    .await?;
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut got = 0;
    while got < args.rings {
        let delivery = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        got += 1;
    }
    report.broker_rings_per_s = args.rings as f64 / started.elapsed().as_secs_f64();

    // The broker's own latency at the end-to-end run's half rate: publish (with confirm, as
    // gateways do) → this bare consumer, measured from the ring's `pressed_at`.
    let rate = report.half_rate.rings_per_s.max(1.0);
    let n = (rate * 5.0) as usize;
    let publisher = {
        let (channel, queue) = (channel.clone(), queue.clone());
        tokio::spawn(async move {
            let published = paced(rate, n, move |_| {
                let body = ring_now().to_json();
                let (channel, queue) = (channel.clone(), queue.clone());
                async move {
                    let properties = BasicProperties::default();
                    broker::publish_confirmed(&channel, "", &queue, &body, properties).await
                }
            })
            .await?;
            anyhow::Ok(published.into_iter().collect::<Result<(), _>>()?)
        })
    };
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        let now = OffsetDateTime::now_utc();
        let ring = RingEvent::parse(&delivery.data, now)?;
        latencies.push((now - ring.pressed_at).as_seconds_f64() * 1000.0);
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    publisher.await??;
    (
        report.broker_half_rate_p50_ms,
        report.broker_half_rate_p99_ms,
    ) = p50_p99(latencies);
    let _ = consumer_channel
        .basic_cancel(
            consumer.tag(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await;
    let _ = consumer_channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

fn self_cpu() -> f64 {
    cpu_seconds("self")
}

async fn apns_leg(args: &BenchArgs, dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mock = MockProcess::start(&dir.join("leg")).await?;
    let (signer, key_file) = signer(dir)?;
    let ca = mock.cert_dir.join("ca.pem");
    let ring = ring_now();
    let payload = build_payload(&ring, "Front door", &AlertTemplate::default())?;
    let tokens: Vec<DeviceToken> = (0..1000)
        .map(|_| DeviceToken::parse(&random_hex(32)).unwrap())
        .collect();
    let notification = |i: usize| Notification {
        token: tokens[i % tokens.len()].clone(),
        topic: "com.example.doorbell".into(),
        collapse_id: ring.event_id.clone(),
        expiration: ring.expires_at(Duration::from_secs(60)),
        payload: payload.clone(),
    };
    let n = args.apns_requests;

    // ringpush's client, one connection.
    let mut settings = http2::Settings::new(mock.endpoint(), mock.endpoint());
    settings.connections = 1;
    let client = http2::Client::new(
        settings,
        tls::client_config(Some(&ca), None)?,
        Some(signer.clone()),
    );
    client
        .send(Environment::Production, &notification(0))
        .await?; // connect, raise the stream limit
    let (cpu0, t0) = (self_cpu(), Instant::now());
    // Unconstrained: with a thousand futures in one `buffer_unordered`, tokio's cooperative
    // budget would make the driving task re-poll them all over and over (a harness cost,
    // not the client's).
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|i| {
                let (client, n) = (&client, notification(i));
                async move {
                    matches!(
                        client.send(Environment::Production, &n).await,
                        Ok(Answer::Accepted)
                    )
                }
            })
            .buffer_unordered(1000)
            .filter(|ok| std::future::ready(*ok))
            .count(),
    )
    .await;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), self_cpu() - cpu0);
    anyhow::ensure!(ok == n, "ringpush client: {ok} of {n} accepted");
    report.ringpush_client_per_s = n as f64 / secs;
    report.ringpush_client_cpu_us = cpu / n as f64 * 1e6;

    // The same client at the end-to-end half rate, for 3 s.
    let rate = report.half_rate.rings_per_s * args.fanout as f64;
    if rate >= 1.0 {
        let answered = paced(rate, (rate * 3.0) as usize, |i| {
            let (client, n) = (client.clone(), notification(i));
            async move {
                let t = Instant::now();
                let answer = client.send(Environment::Production, &n).await;
                matches!(answer, Ok(Answer::Accepted)).then(|| t.elapsed().as_secs_f64() * 1e3)
            }
        })
        .await?;
        let latencies = answered
            .into_iter()
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| anyhow::anyhow!("a request failed"))?;
        (
            report.ringpush_client_half_rate_p50_ms,
            report.ringpush_client_half_rate_p99_ms,
        ) = p50_p99(latencies);
    }

    // A bare h2 loop: the wire's ceiling in this stack (one connection, the same request).
    let (per_s, cpu_us) = bare_h2(&mock.endpoint(), &ca, &signer, &notification(0), n).await?;
    report.bare_h2_per_s = per_s;
    report.bare_h2_cpu_us = cpu_us;

    if args.peers {
        for (name, script) in [
            ("@parse/node-apn", "node-apn.sh"),
            ("aioapns", "aioapns.sh"),
        ] {
            report
                .peers
                .push(peer(name, script, &mock, &key_file, &payload, args.peer_requests).await);
        }
    }
    Ok(())
}

async fn bare_h2(
    endpoint: &Endpoint,
    ca: &Path,
    signer: &jwt::Signer,
    n0: &Notification,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let tls = tokio_rustls::TlsConnector::from(tls::client_config(Some(ca), None)?);
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
    tcp.set_nodelay(true)?;
    let tls = tls
        .connect(
            rustls_pki_types::ServerName::try_from(endpoint.host.clone())?,
            tcp,
        )
        .await?;
    let (sender, connection) = h2::client::Builder::new()
        .initial_max_send_streams(1)
        .handshake::<_, Bytes>(tls)
        .await?;
    tokio::spawn(connection);
    let request = build_request(endpoint, n0, Some(&signer.bearer()));
    let send = |sender: h2::client::SendRequest<Bytes>| {
        let (request, payload) = (request.clone(), n0.payload.clone());
        async move {
            let mut sender = sender.ready().await?;
            let (response, mut stream) = sender.send_request(request, false)?;
            stream.send_data(payload, true)?;
            let status = response.await?.status();
            anyhow::Ok(status.as_u16() == 200)
        }
    };
    send(sender.clone()).await?;
    let (cpu0, t0) = (self_cpu(), Instant::now());
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|_| send(sender.clone()))
            .buffer_unordered(1000)
            .filter(|r| std::future::ready(matches!(r, Ok(true))))
            .count(),
    )
    .await;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), self_cpu() - cpu0);
    anyhow::ensure!(ok == n, "bare h2: {ok} of {n} accepted");
    Ok((n as f64 / secs, cpu / n as f64 * 1e6))
}

/// Runs a peer's script (which installs its package on first use) against the mock.
async fn peer(
    name: &str,
    script: &str,
    mock: &MockProcess,
    key_file: &Path,
    payload: &[u8],
    n: usize,
) -> Peer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers");
    let output = tokio::process::Command::new("bash")
        .arg(dir.join(script))
        .env("MOCK_HOST", "localhost")
        .env("MOCK_PORT", mock.port.to_string())
        .env("MOCK_CA", mock.cert_dir.join("ca.pem"))
        .env("KEY_FILE", key_file)
        .env("KEY_ID", "BENCHKEY01")
        .env("TEAM_ID", "BENCHTEAM1")
        .env("REQUESTS", n.to_string())
        // The doorbell payload ringpush sends, byte for byte.
        .env("PAYLOAD", String::from_utf8_lossy(payload).as_ref())
        .stderr(Stdio::piped())
        .output()
        .await;
    let failed = |note: String| Peer {
        name: name.into(),
        per_s: None,
        cpu_us: None,
        note: Some(note),
    };
    let output = match output {
        Ok(o) => o,
        Err(e) => return failed(format!("could not run {script}: {e}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    let parsed: Result<HashMap<String, f64>, _> = serde_json::from_str(line);
    match parsed {
        Ok(m) if m.get("accepted").copied() == Some(n as f64) => {
            let secs = m["seconds"];
            Peer {
                name: name.into(),
                per_s: Some(n as f64 / secs),
                cpu_us: Some(m["cpu_seconds"] / n as f64 * 1e6),
                note: None,
            }
        }
        _ => {
            let err = String::from_utf8_lossy(&output.stderr);
            failed(format!(
                "{script} gave no result: {}",
                err.lines().last().unwrap_or("no output")
            ))
        }
    }
}

async fn binary_leg(args: &BenchArgs, dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    let mock = MockProcess::start(&dir.join("binary")).await?;
    let (cert, key) = crate::mock::certs::issue_client_certificate(&mock.cert_dir, "bench")?;
    let pem = dir.join("bench-client.pem");
    std::fs::write(&pem, format!("{cert}{key}"))?;
    let mut config = (*tls::client_config(
        Some(&mock.cert_dir.join("ca.pem")),
        Some(tls::Identity::from_file(&pem, "")?),
    )?)
    .clone();
    config.alpn_protocols.clear();
    let mut settings = binary::Settings::new(
        binary::Address::parse(&format!("localhost:{}", mock.binary_port))
            .map_err(anyhow::Error::msg)?,
    );
    settings.quiet = Duration::from_millis(100);
    let quiet = settings.quiet;
    settings.request_timeout = Duration::from_secs(120);
    let client = binary::Client::new(settings, Arc::new(config));
    let payload = build_payload(&ring_now(), "Front door", &AlertTemplate::default())?;
    let tokens: Vec<DeviceToken> = (0..1000)
        .map(|_| DeviceToken::parse(&random_hex(32)).unwrap())
        .collect();
    let n = args.binary_frames;
    let t0 = Instant::now();
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|i| {
                let n = Notification {
                    token: tokens[i % tokens.len()].clone(),
                    topic: "com.example.doorbell".into(),
                    collapse_id: String::new(),
                    expiration: 0,
                    payload: payload.clone(),
                };
                let client = &client;
                async move { matches!(client.send(&n).await, Ok(Answer::Accepted)) }
            })
            .buffer_unordered(50_000)
            .filter(|ok| std::future::ready(*ok))
            .count(),
    )
    .await;
    anyhow::ensure!(ok == n, "binary: {ok} of {n} accepted");
    // Confirmation waits for the quiet period after the last write: count it out.
    let secs = (t0.elapsed() - quiet).as_secs_f64();
    report.binary_frames_per_s = n as f64 / secs;
    Ok(())
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        json!(self)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
        writeln!(
            f,
            "ringpush bench — {}, {} rings × {} tokens",
            self.machine, self.rings, self.fanout
        )?;
        writeln!(f)?;
        writeln!(f, "end to end (one worker process)")?;
        writeln!(
            f,
            "  rings/s                      {:>10.0}",
            self.e2e_rings_per_s
        )?;
        writeln!(
            f,
            "  notifications/s              {:>10.0}",
            self.e2e_notifications_per_s
        )?;
        writeln!(
            f,
            "  worker CPU s / 10k notif.    {:>10.3}",
            self.e2e_worker_cpu_s_per_10k
        )?;
        writeln!(
            f,
            "  worker cores used            {:>10.2}",
            self.e2e_worker_cores
        )?;
        writeln!(
            f,
            "  worker peak RSS              {:>7.1} MB",
            self.e2e_worker_peak_rss_mb
        )?;
        writeln!(
            f,
            "  ring→accepted, backlog       p50 {} p99 {}",
            ms(self.e2e_backlog_p50_ms),
            ms(self.e2e_backlog_p99_ms)
        )?;
        let cores = |by: &BTreeMap<String, f64>| {
            let each: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
            each.join(", ")
        };
        writeln!(
            f,
            "  cores while draining         {}",
            cores(&self.e2e_cores)
        )?;
        for (name, w) in [("half", &self.half_rate), ("quarter", &self.quarter_rate)] {
            writeln!(
                f,
                "  ring→accepted at {:.0} rings/s ({name} rate) p50 {} p99 {}",
                w.rings_per_s,
                ms(w.p50_ms),
                ms(w.p99_ms)
            )?;
            writeln!(
                f,
                "    of which APNs request      p50 {} p99 {}",
                ms(w.apns_p50_ms),
                ms(w.apns_p99_ms)
            )?;
            writeln!(f, "    cores                      {}", cores(&w.cores))?;
        }
        writeln!(f, "broker ceiling (bare consume + ack)")?;
        writeln!(
            f,
            "  rings/s                      {:>10.0}",
            self.broker_rings_per_s
        )?;
        writeln!(
            f,
            "  publish→consume at {:.0}/s   p50 {} p99 {}",
            self.half_rate.rings_per_s,
            ms(self.broker_half_rate_p50_ms),
            ms(self.broker_half_rate_p99_ms)
        )?;
        writeln!(
            f,
            "APNs leg ({} requests, one connection)",
            self.apns_requests
        )?;
        writeln!(
            f,
            "  ringpush client              {:>10.0}/s {:>7.1} µs CPU each",
            self.ringpush_client_per_s, self.ringpush_client_cpu_us
        )?;
        writeln!(
            f,
            "  ringpush client at {:.0}/s    p50 {} p99 {}",
            self.half_rate.rings_per_s * self.fanout as f64,
            ms(self.ringpush_client_half_rate_p50_ms),
            ms(self.ringpush_client_half_rate_p99_ms)
        )?;
        writeln!(
            f,
            "  bare h2 loop                 {:>10.0}/s {:>7.1} µs CPU each",
            self.bare_h2_per_s, self.bare_h2_cpu_us
        )?;
        for p in &self.peers {
            match (p.per_s, p.cpu_us) {
                (Some(r), Some(c)) => {
                    writeln!(f, "  {:<28} {:>10.0}/s {:>7.1} µs CPU each", p.name, r, c)?
                }
                _ => writeln!(
                    f,
                    "  {:<28} not measured: {}",
                    p.name,
                    p.note.as_deref().unwrap_or("?")
                )?,
            }
        }
        if let (Some(secs), Some(rate)) = (self.soak_seconds, self.soak_rings_per_s) {
            let rss: Vec<String> = self.soak_rss_mb.iter().map(|m| format!("{m:.0}")).collect();
            writeln!(
                f,
                "  soak {secs:.0} s at {rate:.0} rings/s: worker RSS every 10 s (MB) {}",
                rss.join(" ")
            )?;
        }
        writeln!(f, "legacy binary interface ({} frames)", self.binary_frames)?;
        writeln!(
            f,
            "  frames/s                     {:>10.0}",
            self.binary_frames_per_s
        )?;
        if let Some(b) = &self.building {
            writeln!(
                f,
                "building rings ({} tokens, {:.0}/s) beside ordinary rings at {:.0}/s, {} × {:.0} s each, own worker",
                b.tokens, b.building_rings_per_s, b.alone.rings_per_s, b.rounds, b.window_seconds
            )?;
            for (name, w) in [("alone", &b.alone), ("beside building", &b.beside_building)] {
                writeln!(
                    f,
                    "  ordinary ring→accepted, {name:<16} p50 {} p99 {}",
                    ms(w.p50_ms),
                    ms(w.p99_ms)
                )?;
                writeln!(
                    f,
                    "    every APNs request           p50 {} p99 {}",
                    ms(w.apns_p50_ms),
                    ms(w.apns_p99_ms)
                )?;
                writeln!(f, "    cores                        {}", cores(&w.cores))?;
            }
            let verdict = match b.target_met {
                Some(true) => "met",
                Some(false) => "missed",
                None => "not measured",
            };
            writeln!(
                f,
                "  p99 beside / alone             {} (target ≤ 2: {verdict})",
                b.p99_ratio.map_or("-".to_owned(), |r| format!("{r:.2}"))
            )?;
            let rounds: Vec<String> = b
                .each_round
                .iter()
                .map(|r| {
                    format!(
                        "{} / {} ({:.0} / {:.0} MB)",
                        ms(r.alone_p99_ms),
                        ms(r.beside_p99_ms),
                        r.alone_peak_rss_mb,
                        r.beside_peak_rss_mb
                    )
                })
                .collect();
            writeln!(
                f,
                "  each round: p99 alone / beside (worker peak RSS) {}",
                rounds.join(", ")
            )?;
            let last: Vec<String> = b
                .building_last_accepted_ms
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect();
            writeln!(
                f,
                "  building ring pressed → last token (ms) {}",
                if last.is_empty() {
                    "-".to_owned()
                } else {
                    last.join(" ")
                }
            )?;
            writeln!(
                f,
                "  worker peak RSS alone / beside {:.1} / {:.1} MB{}",
                b.worker_peak_rss_alone_mb,
                b.worker_peak_rss_beside_mb,
                if b.rss_peak_per_window {
                    ""
                } else {
                    " (since start)"
                }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_pressed_long_ago_are_left_out_of_the_last_bucket() {
        let mut b = vec![
            (0.001, 90.0),
            (0.01, 99.0),
            (20.0, 100.0),
            (f64::INFINITY, 3100.0),
        ];
        leave_out_above_last_bucket(&mut b, 3000.0);
        assert_eq!(b[3], (f64::INFINITY, 100.0));
        let p99 = quantiles_of(&b).1.unwrap();
        assert!((p99 - 10.0).abs() < 1e-9, "{p99}");
        // Never below the finite buckets: what is measured stays.
        leave_out_above_last_bucket(&mut b, 3000.0);
        assert_eq!(b[3], (f64::INFINITY, 100.0));
    }

    #[test]
    fn building_rings_are_timed_by_their_delivered_lines() {
        let log = concat!(
            r#"{"timestamp":"2026-11-29T07:20:24.250000Z","level":"INFO","fields":{"message":"ring delivered","gateway":"bench-building","event":"e1","tokens":3000},"target":"ringpush::worker"}"#,
            "\n",
            r#"{"timestamp":"2026-11-29T07:20:24.260000Z","level":"INFO","fields":{"message":"ring delivered","gateway":"bench-7","event":"e2","tokens":4},"target":"ringpush::worker"}"#,
            "\nnot json\n"
        );
        let got = delivered_at(log, BUILDING);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "e1");
        assert_eq!(
            got[0].1,
            time::macros::datetime!(2026-11-29 07:20:24.25 UTC)
        );
    }

    #[test]
    fn exact_percentiles_of_measured_latencies() {
        let latencies: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(p50_p99(latencies), (Some(51.0), Some(100.0)));
        assert_eq!(p50_p99(vec![7.0]), (Some(7.0), Some(7.0)));
        assert_eq!(p50_p99(Vec::new()), (None, None));
    }
}
