//! Live-publishing windows: rings published at a fixed rate while a worker process runs
//! (with building rings beside them, if asked), read back from the worker's histograms and
//! `/proc` as a [`Window`], and windows pooled ([`Counted`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::broker::{self, Names};
use crate::wire::ring::RingEvent;

use super::measure::{
    buckets, cpu_seconds, delta, labelled_buckets, leave_out_above_last_bucket,
    machine_busy_seconds, paced, quantiles_of, sample, scrape, self_cpu, service_cores,
    service_cpu,
};
use super::processes::MockProcess;
use super::report::{Quantiles, Stage, Window};

/// The worker's stages of a ring (`ringpush_ring_stage_seconds{stage}`), in their order.
pub(super) const STAGES: [&str; 5] = ["queued", "lookup_wait", "lookup", "push", "settle"];

/// Every histogram a window reads from the worker's scrape: ring-to-accepted, the APNs
/// request, each stage and the worker's own share, by name.
fn histograms(body: &str) -> BTreeMap<&'static str, Vec<(f64, f64)>> {
    let mut all = BTreeMap::from([
        (
            "ring_to_accepted",
            buckets(body, "ringpush_ring_to_accepted_seconds"),
        ),
        ("apns", buckets(body, "ringpush_apns_request_seconds")),
        ("worker", buckets(body, "ringpush_ring_worker_seconds")),
    ]);
    for stage in STAGES {
        let labels = format!("stage=\"{stage}\"");
        all.insert(
            stage,
            labelled_buckets(body, "ringpush_ring_stage_seconds", &labels),
        );
    }
    all
}

/// What a live-publishing window needs from the end-to-end run.
pub(super) struct Live<'a> {
    pub(super) channel: &'a lapin::Channel,
    pub(super) names: &'a Names,
    pub(super) metrics_port: u16,
    pub(super) pid: &'a str,
    pub(super) mock: &'a MockProcess,
    pub(super) fanout: usize,
}

/// Rings published beside a window's measured ones (the building rings): `per_s` rings of
/// `tokens` tokens each, made by `ring` with a `pressed_at` [`BESIDE_PRESSED_BEFORE`] back.
/// Their notifications fall above the last bucket of the worker's ring-to-accepted
/// histogram, so the window's latency leaves them out and is that of the measured rings.
pub(super) struct Beside<'a> {
    pub(super) per_s: f64,
    pub(super) tokens: usize,
    pub(super) ring: &'a (dyn Fn(usize) -> RingEvent + Sync),
}

/// How far back a ring beside the measured ones is pressed: beyond the histogram's last
/// bucket (about 19 s), well within the bench workers' ring TTL (an hour).
pub(super) const BESIDE_PRESSED_BEFORE: time::Duration = time::Duration::seconds(60);

impl Live<'_> {
    /// Publishes rings at `rate` for 5 s, waits until the worker has every notification
    /// accepted (at most 60 s), and reads the worker's histograms over the window.
    pub(super) async fn window(
        &self,
        rate: f64,
        ring: impl Fn(usize) -> RingEvent,
    ) -> anyhow::Result<Window> {
        Ok(self.window_with(rate, 5.0, ring, None).await?.window())
    }

    /// [`Live::window`] for `secs`, with `beside` rings published at their own pace over
    /// the same time (their notifications are waited for too, but not in the latency; the
    /// APNs request latency is of every request).
    pub(super) async fn window_with(
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
        let before = histograms(&body_before);
        let count_before = sample(&body_before, accepted);
        // Every ring's stages are observed once it is settled, a little after its last
        // answer: the window waits for those too.
        let settled = r#"ringpush_ring_stage_seconds_count{stage="settle"}"#;
        let settled_before = sample(&body_before, settled);
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
            if sample(&after, accepted) >= target
                && sample(&after, settled) >= settled_before + (n + n_beside) as f64
            {
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
        let mut histograms: BTreeMap<_, _> = histograms(&after)
            .into_iter()
            .map(|(name, after)| (name, delta(&before[name], &after)))
            .collect();
        if let Some(h) = histograms.get_mut("ring_to_accepted") {
            leave_out_above_last_bucket(h, beside_notifications);
        }
        // The rings beside were pressed before the last bucket too.
        if let Some(h) = histograms.get_mut("queued") {
            leave_out_above_last_bucket(h, n_beside as f64);
        }
        Ok(Counted {
            rate,
            secs,
            histograms,
            cpu,
        })
    }
}

/// What one or more windows at the same rate counted: histogram buckets (deltas, by the
/// names [`histograms`] gives) and CPU seconds by process, over `secs`.
#[derive(Debug, Default)]
pub(super) struct Counted {
    rate: f64,
    secs: f64,
    histograms: BTreeMap<&'static str, Vec<(f64, f64)>>,
    cpu: BTreeMap<String, f64>,
}

impl Counted {
    /// Pools another window's counts into these (the same histograms, the same buckets).
    pub(super) fn add(&mut self, other: Counted) {
        let sum = |mine: &mut Vec<(f64, f64)>, theirs: Vec<(f64, f64)>| {
            if mine.is_empty() {
                *mine = theirs;
            } else {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    m.1 += t.1;
                }
            }
        };
        for (name, theirs) in other.histograms {
            sum(self.histograms.entry(name).or_default(), theirs);
        }
        for (name, seconds) in other.cpu {
            *self.cpu.entry(name).or_default() += seconds;
        }
        self.rate = other.rate;
        self.secs += other.secs;
    }

    pub(super) fn window(&self) -> Window {
        let of = |name| {
            let (p50_ms, p99_ms) = self
                .histograms
                .get(name)
                .map_or((None, None), |h| quantiles_of(h));
            Quantiles { p50_ms, p99_ms }
        };
        let (ring_to_accepted, apns, worker) = (of("ring_to_accepted"), of("apns"), of("worker"));
        let secs = self.secs.max(f64::MIN_POSITIVE);
        Window {
            rings_per_s: self.rate,
            p50_ms: ring_to_accepted.p50_ms,
            p99_ms: ring_to_accepted.p99_ms,
            apns_p50_ms: apns.p50_ms,
            apns_p99_ms: apns.p99_ms,
            broker_beside_p50_ms: None,
            broker_beside_p99_ms: None,
            worker_p50_ms: worker.p50_ms,
            worker_p99_ms: worker.p99_ms,
            stages: STAGES
                .iter()
                .map(|&stage| {
                    let Quantiles { p50_ms, p99_ms } = of(stage);
                    Stage {
                        stage: stage.to_owned(),
                        p50_ms,
                        p99_ms,
                    }
                })
                .collect(),
            cores: self
                .cpu
                .iter()
                .map(|(k, v)| (k.clone(), v / secs))
                .collect(),
        }
    }
}
