//! What the bench reads and how it paces: CPU seconds and RSS from `/proc`, a worker's
//! Prometheus page (samples, histogram buckets, their deltas and quantiles), exact
//! percentiles of measured latencies, and paced or bounded publishing.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};

use crate::broker::BrokerError;

/// CPU seconds (user + system) of a process, from /proc.
pub(super) fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of every process named `beam.smp` (RabbitMQ) or `postgres`, by pid.
pub(super) fn service_cpu() -> HashMap<u32, (&'static str, f64)> {
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
pub(super) fn machine_busy_seconds() -> f64 {
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
pub(super) fn service_cores(
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
pub(super) fn peak_rss_mb(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident set size of a process now, MB.
pub(super) fn current_rss_mb(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Scrapes a process's Prometheus text page.
pub(super) async fn scrape(port: u16) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    Ok(crate::http::get(&url, Duration::from_secs(30)).await?.body)
}

pub(super) fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The sum of a family's samples in a scrape whose series begins with `series` (e.g.
/// `ringpush_followups_total{`) and whose labels hold `label` (e.g. `outcome="accepted"`).
pub(super) fn sum_samples(body: &str, series: &str, label: &str) -> f64 {
    body.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|l| l.split_once("} "))
        .filter(|(labels, _)| labels.split(',').any(|l| l == label))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum::<f64>()
        // An empty sum is -0.0: none counted reads 0.
        + 0.0
}

/// The cumulative buckets of a histogram in a scrape.
pub(super) fn buckets(body: &str, name: &str) -> Vec<(f64, f64)> {
    labelled_buckets(body, name, "")
}

/// [`buckets`] of the child of a histogram family whose labels (after `le`, as the worker's
/// registry writes them) read `labels`, as `stage="push"`.
pub(super) fn labelled_buckets(body: &str, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let suffix = match labels {
        "" => "} ".to_owned(),
        labels => format!(",{labels}}} "),
    };
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once('"')?;
            let count = rest.strip_prefix(&suffix)?;
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
pub(super) async fn publish_all<Fut>(
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
pub(super) async fn paced<T, F, Fut>(rate: f64, n: usize, mut task: F) -> anyhow::Result<Vec<T>>
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
pub(super) fn p50_p99(mut latencies: Vec<f64>) -> (Option<f64>, Option<f64>) {
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().checked_sub(1)?);
        latencies.get(i).copied()
    };
    (at(0.5), at(0.99))
}

/// The cumulative buckets of what a histogram counted between two scrapes.
pub(super) fn delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
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
pub(super) fn quantiles_of(buckets: &[(f64, f64)]) -> (Option<f64>, Option<f64>) {
    let q = |p| crate::metrics::quantile(buckets, p).map(|s| s * 1000.0);
    (q(0.5), q(0.99))
}

pub(super) fn quantiles_ms(
    before: &[(f64, f64)],
    after: &[(f64, f64)],
) -> (Option<f64>, Option<f64>) {
    quantiles_of(&delta(before, after))
}

/// Takes `n` observations out of the `+Inf` bucket (never below the last finite bucket's
/// count): the notifications of rings pressed so far back that each of them is there.
pub(super) fn leave_out_above_last_bucket(buckets: &mut [(f64, f64)], n: f64) {
    if let [.., (_, last_finite), (le, inf)] = buckets {
        if le.is_infinite() {
            *inf = (*inf - n).max(*last_finite);
        }
    }
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS; false if it cannot.
pub(super) fn reset_peak_rss(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

pub(super) fn self_cpu() -> f64 {
    cpu_seconds("self")
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
    fn samples_of_a_family_are_summed_by_one_label() {
        let body = "# TYPE ringpush_followups_total counter
ringpush_followups_total{platform=\"apns\",kind=\"alert\",outcome=\"accepted\"} 12
ringpush_followups_total{platform=\"fcm\",kind=\"call\",outcome=\"accepted\"} 3
ringpush_followups_total{platform=\"apns\",kind=\"voip\",outcome=\"skipped_voip\"} 5
ringpush_followups_totally{outcome=\"accepted\"} 100
";
        let accepted = r#"outcome="accepted""#;
        assert_eq!(
            sum_samples(body, "ringpush_followups_total{", accepted),
            15.0
        );
        let skipped = r#"outcome="skipped_voip""#;
        assert_eq!(sum_samples(body, "ringpush_followups_total{", skipped), 5.0);
        assert_eq!(sum_samples("", "ringpush_followups_total{", accepted), 0.0);
    }

    #[test]
    fn exact_percentiles_of_measured_latencies() {
        let latencies: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(p50_p99(latencies), (Some(51.0), Some(100.0)));
        assert_eq!(p50_p99(vec![7.0]), (Some(7.0), Some(7.0)));
        assert_eq!(p50_p99(Vec::new()), (None, None));
    }

    #[test]
    fn a_family_child_is_read_from_the_text_the_registry_writes() {
        let family = crate::metrics::histogram_family();
        let mut registry = prometheus_client::registry::Registry::with_prefix("ringpush");
        registry.register("ring_stage_seconds", "stages", family.clone());
        let plain = crate::metrics::latency_histogram();
        registry.register("ring_worker_seconds", "own", plain.clone());
        crate::metrics::labelled_histogram(&family, "stage", "push").observe(0.002);
        crate::metrics::labelled_histogram(&family, "stage", "lookup").observe(0.0001);
        plain.observe(0.0001);
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).unwrap();

        let push = labelled_buckets(&body, "ringpush_ring_stage_seconds", "stage=\"push\"");
        assert_eq!(push.len(), 28, "{body}");
        assert_eq!(push[0], (0.0005, 0.0));
        assert_eq!(push.last(), Some(&(f64::INFINITY, 1.0)));
        let lookup = labelled_buckets(&body, "ringpush_ring_stage_seconds", "stage=\"lookup\"");
        assert_eq!(lookup[0], (0.0005, 1.0));
        assert!(labelled_buckets(&body, "ringpush_ring_stage_seconds", "stage=\"x\"").is_empty());
        let own = buckets(&body, "ringpush_ring_worker_seconds");
        assert_eq!((own.len(), own[0]), (28, (0.0005, 1.0)));
    }
}
