//! What one run of `ringpush bench` measured: [`Report`] and its parts, printed as the
//! table `ringpush bench` shows and serialised as its `--json`.

use std::collections::BTreeMap;

use serde_json::json;

use super::apps::{write_apps, AppsCost};

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
    /// PostgreSQL's CPU per ring while draining, ms: every `postgres` process (the host's
    /// other users of the server included), and the worker's own backends alone.
    pub e2e_postgresql_cpu_ms_per_ring: f64,
    pub e2e_worker_backends_cpu_ms_per_ring: Option<f64>,
    /// Cores used while draining, by process: worker, mock, rabbitmq, postgresql, and
    /// `machine` (all processes; 2.0 is every core of a 2-core machine busy).
    pub e2e_cores: BTreeMap<String, f64>,
    pub e2e_backlog_p50_ms: Option<f64>,
    pub e2e_backlog_p99_ms: Option<f64>,
    /// Rings published live at half the drain rate: the target's latency.
    pub half_rate: Window,
    /// Share of the fleet's tokens (percent) that were Android phones.
    pub android_share: u32,
    /// The same at a quarter of the drain rate: how the latency falls when the machine is
    /// less busy.
    pub quarter_rate: Window,
    pub broker_rings_per_s: f64,
    /// Publish → bare consumer through the same queue type at the half rate: the part of
    /// ring-to-accepted that is the broker's.
    pub broker_half_rate_p50_ms: Option<f64>,
    pub broker_half_rate_p99_ms: Option<f64>,
    /// The same at the quarter rate: a quarter-rate ring-to-accepted p99 is held to 10 ms
    /// in a run where this p99 is ≤ 5 ms.
    pub broker_quarter_rate_p50_ms: Option<f64>,
    pub broker_quarter_rate_p99_ms: Option<f64>,
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
    /// The FCM leg (as many requests as the APNs leg): ringpush's FCM client and a bare h2
    /// loop, one connection each, to a mock-fcm process.
    pub fcm_client_per_s: f64,
    pub fcm_client_cpu_us: f64,
    pub fcm_bare_h2_per_s: f64,
    pub fcm_bare_h2_cpu_us: f64,
    /// The FCM peer sender (`firebase-admin`, Python), as many messages to the same mock.
    pub fcm_peers: Vec<Peer>,
    /// Per FCM peer measured: ringpush's FCM client's notifications per CPU-second ÷ the
    /// peer's (the target is ≥ 10).
    pub fcm_client_cpu_ratio: BTreeMap<String, f64>,
    /// With `--soak`: the soak's length, rate, and the worker's RSS samples (MB, every 10 s).
    pub soak_seconds: Option<f64>,
    pub soak_rings_per_s: Option<f64>,
    pub soak_rss_mb: Vec<f64>,
    /// Ordinary rings alone and beside building rings (see [`Building`]).
    pub building: Option<Building>,
    /// The same drain with the delivery ledger on and off (see [`LedgerCost`]).
    pub ledger: Option<LedgerCost>,
    /// The same drain, the ledger on, with re-publish recognition (ring claims) on and off.
    pub claims: Option<LedgerCost>,
    /// A ring's life: the same drain with every ring ended a second after its press, and
    /// without (see [`LifeCost`]).
    pub life: Option<LifeCost>,
    /// The same workload in one app and spread over three (see [`AppsCost`]).
    pub apps: Option<AppsCost>,
    pub notes: Vec<String>,
    /// The parts left out (`--skip`).
    pub skipped: Vec<String>,
}

/// Is a ring of thousands of tokens shared fairly? Ordinary rings published live at a
/// quarter of the drain rate, (A) alone and (B) while one building ring a second is
/// published beside them: [`BUILDING_ROUNDS`] windows of each, [`BUILDING_WINDOW_SECS`]
/// each, in turns (A, B, A, B, …), each kind's histograms pooled; a worker process of its
/// own (whose per-ring log lines time the building rings).
///
/// [`BUILDING_ROUNDS`]: super::building::BUILDING_ROUNDS
/// [`BUILDING_WINDOW_SECS`]: super::building::BUILDING_WINDOW_SECS
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
    ///
    /// [`BESIDE_PRESSED_BEFORE`]: super::live::BESIDE_PRESSED_BEFORE
    pub building_last_accepted_ms: Vec<f64>,
    /// The worker's peak RSS (`VmHWM`) over the first (A) window, before any building ring,
    /// and over the (B) windows, MB.
    pub worker_peak_rss_alone_mb: f64,
    pub worker_peak_rss_beside_mb: f64,
    /// Whether each peak is its window's own (`VmHWM` reset through `/proc/<pid>/clear_refs`
    /// before each window) or the process's since it started.
    pub rss_peak_per_window: bool,
}

/// What the delivery ledger costs: `rings` pre-published rings drained by a fresh worker
/// process with the ledger on and off, in turns (on, off, off, on, …), in the same run.
#[derive(Debug, Default, serde::Serialize)]
pub struct LedgerCost {
    pub rings: usize,
    /// Every drain, in the order they ran.
    pub drains: Vec<Drain>,
    #[serde(skip)]
    pub on: Vec<Drain>,
    #[serde(skip)]
    pub off: Vec<Drain>,
    /// Median notifications/s with the ledger on / the same off: the target is ≥ 0.9.
    pub throughput_ratio: f64,
    pub target_met: bool,
    /// Ledger rows written per ring (one per settled ring: the writes are grouped into few
    /// statements, not fewer rows).
    pub ledger_rows_per_ring: Option<f64>,
    /// Ring claims written per ring (the claims part: one per ring, claimed in one
    /// statement per batch).
    pub claim_rows_per_ring: Option<f64>,
}

/// A ring's life (issue 26): `rings` pre-published rings drained by a fresh worker process,
/// ring-only and with every ring's end (`answered`, by the gateway's owner) published
/// [`end_after_s`](LifeCost::end_after_s) after its press, in turns (ring-only, with ends,
/// with ends, ring-only, …), in the same run. A drain with ends counts the rings' and the
/// follow-ups' notifications together.
#[derive(Debug, Default, serde::Serialize)]
pub struct LifeCost {
    pub rings: usize,
    /// How long after its press each ring's end is published, seconds.
    pub end_after_s: f64,
    /// Every drain, in the order they ran (`ends`: with ends).
    pub drains: Vec<Drain>,
    /// Median notifications/s of the ring-only drains, and of the drains with ends (rings'
    /// and follow-ups' notifications together).
    pub ring_only_notifications_per_s: f64,
    pub with_ends_notifications_per_s: f64,
    /// With ends / ring-only (medians): the target is ≥ 0.8.
    pub throughput_ratio: f64,
    pub target_met: bool,
    /// The medians with ends against this run's end-to-end figure
    /// (`e2e_notifications_per_s`).
    pub ratio_to_e2e: f64,
    /// PostgreSQL's CPU per ring (median over the drains of each kind), ms: all of its
    /// processes (other users of the same server included), and the worker's own backends.
    pub postgresql_cpu_ms_per_ring_only: f64,
    pub postgresql_cpu_ms_per_ring_with_end: f64,
    pub worker_backends_cpu_ms_per_ring_only: Option<f64>,
    pub worker_backends_cpu_ms_per_ring_with_end: Option<f64>,
    /// Follow-ups accepted per ring in the drains with ends (the fan-out, if every phone
    /// that took a ring got its follow-up).
    pub followups_per_ring: Option<f64>,
}

/// One drain of the ledger, claims or life part.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Drain {
    pub ledger: bool,
    /// Whether rings were claimed (re-publish recognition).
    pub claims: bool,
    /// Whether every ring's end was published too (the life part).
    pub ends: bool,
    pub rings_per_s: f64,
    /// Notifications accepted per second: the rings', and the follow-ups' with ends.
    pub notifications_per_s: f64,
    pub worker_cpu_s_per_10k: f64,
    /// Cores PostgreSQL and RabbitMQ used over the drain.
    pub postgresql_cores: f64,
    pub rabbitmq_cores: f64,
    /// PostgreSQL's CPU per ring over the drain, ms: every `postgres` process (the host's
    /// other users of the server included) …
    pub postgresql_cpu_ms_per_ring: f64,
    /// … and the worker's own backends alone (`None`: not listed).
    pub worker_backends_cpu_ms_per_ring: Option<f64>,
    /// Follow-ups accepted per ring (the worker's `ringpush_followups_total`).
    pub followups_per_ring: Option<f64>,
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
    /// The broker alone over the same seconds: rings published (with confirms) at a trickle
    /// to a quorum queue of the bench's and taken by a bare consumer — how long a ring waits
    /// in the broker while the machine is as busy as it is for the worker.
    pub broker_beside_p50_ms: Option<f64>,
    pub broker_beside_p99_ms: Option<f64>,
    /// The worker's own share of a ring (`ringpush_ring_worker_seconds`: its arrival to its
    /// last token's answer, less that answer's request): the target is p50 ≤ 1 ms, p99 ≤ 5 ms
    /// at a quarter rate and ≤ 10 ms at half.
    pub worker_p50_ms: Option<f64>,
    pub worker_p99_ms: Option<f64>,
    /// Where the rings' time went, stage by stage (`ringpush_ring_stage_seconds`), in the
    /// order queued, lookup_wait, lookup, push, settle — of every ring pushed in the window.
    pub stages: Vec<Stage>,
    /// Cores busy over the window, by process (as `e2e_cores`; `bench` publishes).
    pub cores: BTreeMap<String, f64>,
}

/// One stage of a window's rings: its p50 and p99, ms.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stage {
    pub stage: String,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A latency's p50 and p99, ms.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub(crate) struct Quantiles {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// One peer client's run.
#[derive(Debug, serde::Serialize)]
pub struct Peer {
    pub name: String,
    pub per_s: Option<f64>,
    pub cpu_us: Option<f64>,
    pub note: Option<String>,
}
impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        json!(self)
    }

    /// Whether the part named so ran (was not left out).
    fn ran(&self, part: &str) -> bool {
        !self.skipped.iter().any(|p| p == part)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} ms"));
        writeln!(
            f,
            "ringpush bench — {}, {} rings × {} tokens{}",
            self.machine,
            self.rings,
            self.fanout,
            match self.android_share {
                0 => String::new(),
                share => format!(" ({share}% of them Android, through mock-fcm)"),
            }
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
            "  PostgreSQL CPU per ring      {:>7.3} ms (the worker's backends {})",
            self.e2e_postgresql_cpu_ms_per_ring,
            self.e2e_worker_backends_cpu_ms_per_ring
                .map_or("-".to_owned(), |v| format!("{v:.3} ms"))
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
            writeln!(
                f,
                "    broker alone, beside it    p50 {} p99 {}",
                ms(w.broker_beside_p50_ms),
                ms(w.broker_beside_p99_ms)
            )?;
            writeln!(
                f,
                "    worker's own share         p50 {} p99 {}",
                ms(w.worker_p50_ms),
                ms(w.worker_p99_ms)
            )?;
            for stage in &w.stages {
                writeln!(
                    f,
                    "    stage {:<20} p50 {} p99 {}",
                    stage.stage,
                    ms(stage.p50_ms),
                    ms(stage.p99_ms)
                )?;
            }
            writeln!(f, "    cores                      {}", cores(&w.cores))?;
        }
        if self.ran("broker") {
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
                "  publish→consume at {:.0}/s   p50 {} p99 {}",
                self.quarter_rate.rings_per_s,
                ms(self.broker_quarter_rate_p50_ms),
                ms(self.broker_quarter_rate_p99_ms)
            )?;
        }
        if self.ran("apns") {
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
        }
        if let (Some(secs), Some(rate)) = (self.soak_seconds, self.soak_rings_per_s) {
            let rss: Vec<String> = self.soak_rss_mb.iter().map(|m| format!("{m:.0}")).collect();
            writeln!(
                f,
                "  soak {secs:.0} s at {rate:.0} rings/s: worker RSS every 10 s (MB) {}",
                rss.join(" ")
            )?;
        }
        if self.ran("binary") {
            writeln!(f, "legacy binary interface ({} frames)", self.binary_frames)?;
            writeln!(
                f,
                "  frames/s                     {:>10.0}",
                self.binary_frames_per_s
            )?;
        }
        if self.ran("fcm") {
            writeln!(
                f,
                "FCM leg ({} requests, one connection, mock-fcm)",
                self.apns_requests
            )?;
            writeln!(
                f,
                "  ringpush FCM client          {:>10.0}/s {:>7.1} µs CPU each",
                self.fcm_client_per_s, self.fcm_client_cpu_us
            )?;
            writeln!(
                f,
                "  bare h2 loop                 {:>10.0}/s {:>7.1} µs CPU each",
                self.fcm_bare_h2_per_s, self.fcm_bare_h2_cpu_us
            )?;
            for p in &self.fcm_peers {
                match (p.per_s, p.cpu_us) {
                    (Some(r), Some(c)) => writeln!(
                        f,
                        "  {:<28} {:>10.0}/s {:>7.1} µs CPU each; client {} per CPU-second (target ≥ 10)",
                        p.name,
                        r,
                        c,
                        self.fcm_client_cpu_ratio
                            .get(&p.name)
                            .map_or("-".to_owned(), |x| format!("{x:.1}×"))
                    )?,
                    _ => writeln!(
                        f,
                        "  {:<28} not measured: {}",
                        p.name,
                        p.note.as_deref().unwrap_or("?")
                    )?,
                }
            }
        }
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
        if let Some(l) = &self.ledger {
            writeln!(
                f,
                "delivery ledger: {} rings drained by a fresh worker, on and off in turns",
                l.rings
            )?;
            for d in &l.drains {
                writeln!(
                    f,
                    "  ledger {:<3} notifications/s {:>8.0}  worker CPU s/10k {:.3}  cores: postgresql {:.2}, rabbitmq {:.2}",
                    if d.ledger { "on" } else { "off" },
                    d.notifications_per_s,
                    d.worker_cpu_s_per_10k,
                    d.postgresql_cores,
                    d.rabbitmq_cores
                )?;
            }
            writeln!(
                f,
                "  throughput on / off (medians)  {:.3} (target ≥ 0.9: {}); ledger rows per ring {}",
                l.throughput_ratio,
                if l.target_met { "met" } else { "missed" },
                l.ledger_rows_per_ring
                    .map_or("-".to_owned(), |r| format!("{r:.2}"))
            )?;
        }
        if let Some(l) = &self.life {
            write_life(f, l)?;
        }
        if let Some(c) = &self.claims {
            writeln!(
                f,
                "re-publish recognition (ring claims, ledger on): {} rings drained by a fresh worker, on and off in turns",
                c.rings
            )?;
            for d in &c.drains {
                writeln!(
                    f,
                    "  claims {:<3} notifications/s {:>8.0}  rings/s {:>7.0}  worker CPU s/10k {:.3}  cores: postgresql {:.2}, rabbitmq {:.2}",
                    if d.claims { "on" } else { "off" },
                    d.notifications_per_s,
                    d.rings_per_s,
                    d.worker_cpu_s_per_10k,
                    d.postgresql_cores,
                    d.rabbitmq_cores
                )?;
            }
            writeln!(
                f,
                "  throughput on / off (medians)  {:.3} (the ledger's budget, ≥ 0.9: {}); claims per ring {}",
                c.throughput_ratio,
                if c.target_met { "met" } else { "missed" },
                c.claim_rows_per_ring
                    .map_or("-".to_owned(), |r| format!("{r:.2}"))
            )?;
        }
        if let Some(a) = &self.apps {
            write_apps(f, a)?;
        }
        Ok(())
    }
}

/// The life part's lines of the table.
fn write_life(f: &mut std::fmt::Formatter<'_>, l: &LifeCost) -> std::fmt::Result {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
    writeln!(
        f,
        "a ring's life: {} rings drained by a fresh worker, ring-only and with each ring ended {:.0} s after its press, in turns",
        l.rings, l.end_after_s
    )?;
    for d in &l.drains {
        writeln!(
            f,
            "  {:<9} notifications/s {:>8.0}  rings/s {:>7.0}  worker CPU s/10k {:.3}  PostgreSQL ms/ring {:.3} (worker's backends {})  follow-ups/ring {}",
            if d.ends { "with ends" } else { "ring-only" },
            d.notifications_per_s,
            d.rings_per_s,
            d.worker_cpu_s_per_10k,
            d.postgresql_cpu_ms_per_ring,
            ms(d.worker_backends_cpu_ms_per_ring),
            d.followups_per_ring.map_or("-".to_owned(), |r| format!("{r:.2}"))
        )?;
    }
    writeln!(
        f,
        "  notifications/s with ends / ring-only (medians)  {:.0} / {:.0} = {:.3} (target ≥ 0.8: {}); against the end-to-end figure {:.3}",
        l.with_ends_notifications_per_s,
        l.ring_only_notifications_per_s,
        l.throughput_ratio,
        if l.target_met { "met" } else { "missed" },
        l.ratio_to_e2e
    )?;
    writeln!(
        f,
        "  PostgreSQL CPU per ring, ring-only / with its end: {:.3} / {:.3} ms (the worker's backends {} / {} ms)",
        l.postgresql_cpu_ms_per_ring_only,
        l.postgresql_cpu_ms_per_ring_with_end,
        ms(l.worker_backends_cpu_ms_per_ring_only),
        ms(l.worker_backends_cpu_ms_per_ring_with_end)
    )
}
