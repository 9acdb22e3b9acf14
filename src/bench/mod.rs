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
//!    second, the building rings' own time to their last token, and the worker's peak RSS;
//! 6. the FCM leg: ringpush's FCM client against a bare `h2` loop, one connection each, and
//!    the peer sender (`firebase-admin` for Python, driven by `bench/peers/`), to a
//!    `mock-fcm` process;
//! 7. a ring's life (after 1, before the ledger's and the claims' parts, a fresh worker per
//!    drain): the drain of 1 again, ring-only and with every ring ended a second after its
//!    press, in turns — notifications/s (rings and follow-ups together) with ends against
//!    ring-only, and PostgreSQL's CPU per ring;
//! 8. many apps (after the claims' part, a fresh worker per drain): the same workload with
//!    every token in the app `default` and spread evenly over three apps, each with its own
//!    credentials, in turns — notifications/s three apps against one, within 10 %.
//!
//! The tree: [`e2e`] (1 and 2; its windows in [`live`]), [`building`] (5), [`apns_leg`] (3),
//! [`binary_leg`] (4), [`fcm_leg`] (6), [`life`] (7; its drains and the ledger's and claims'
//! parts' in [`ledger`]), [`apps`] (8); what they share: [`measure`] (`/proc`, scrapes,
//! quantiles, pacing), [`processes`] (the mock and worker processes), [`peers`] (the peer
//! clients' scripts); [`report`] (what a run measured, as a table and as JSON).

mod apns_leg;
mod apps;
mod bare;
mod binary_leg;
mod building;
mod e2e;
mod fcm_leg;
mod ledger;
mod life;
mod live;
mod measure;
mod peers;
mod processes;
mod report;

use time::OffsetDateTime;

use crate::broker::Names;
use crate::local::Local;
use crate::token::random_hex;
use crate::wire::ring::RingEvent;

use apns_leg::apns_leg;
use binary_leg::binary_leg;
use e2e::{broker_ceiling, end_to_end};
use fcm_leg::fcm_leg;

pub use apps::{AppsCost, AppsDrain};
pub use report::{Building, Drain, LedgerCost, LifeCost, Peer, Report, Round, Window};

/// What `ringpush bench` runs, and against which broker and database.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The local RabbitMQ: the bench declares queues of its own there and deletes them.
    pub amqp_url: String,
    /// The local PostgreSQL: the bench migrates a schema of its own there and drops it.
    pub database_url: String,
    /// Rings pre-published for the end-to-end run (and through the bare broker loop).
    pub rings: usize,
    /// Tokens per ring.
    pub fanout: usize,
    /// Share of each ring's tokens (percent) that are Android phones, pushed through a
    /// mock-fcm process in the end-to-end part; 0: iOS only.
    pub android_share: u32,
    /// Requests in the APNs-leg runs (ringpush client and bare h2 loop), and in the FCM
    /// leg's (ringpush's FCM client, bare h2 loop, firebase-admin).
    pub apns_requests: usize,
    /// Run the peer clients (node-apn, aioapns; firebase-admin in the FCM leg) too.
    pub peers: bool,
    /// Requests per APNs peer client run (the FCM peer sends as many as the FCM leg's
    /// client: `apns_requests`).
    pub peer_requests: usize,
    /// Frames sent over the legacy binary interface.
    pub binary_frames: usize,
    /// The worker's prefetch, which the bare broker loop uses too.
    pub prefetch: u16,
    /// Keep rings flowing at 80% of the measured rate this long after the drain.
    pub soak: Option<std::time::Duration>,
    /// Parts left out.
    pub skip: Vec<Part>,
}

/// A part of the bench that `--skip` can leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// A ring's life: ring-only and with ends, in turns.
    Life,
    /// The delivery ledger on and off.
    Ledger,
    /// Ring claims on and off.
    Claims,
    /// Building rings beside ordinary ones.
    Building,
    /// The broker's ceiling.
    Broker,
    /// The APNs leg and its peers.
    Apns,
    /// The legacy binary interface.
    Binary,
    /// The FCM leg and its peer.
    Fcm,
    /// Many apps: one app against three, in turns.
    Apps,
}

impl Part {
    /// The part's name, as `--skip` takes it.
    fn name(&self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned())
    }
}

impl Settings {
    /// Whether `part` runs.
    fn runs(&self, part: Part) -> bool {
        !self.skip.contains(&part)
    }
}

/// Runs the benchmark and cleans up after it.
///
/// It runs on a runtime worker thread, as the worker's batches do: on the main thread (the
/// runtime's `block_on`) every request of the APNs-leg loops would cross threads twice.
pub async fn run(args: &Settings) -> anyhow::Result<Report> {
    let args = args.clone();
    tokio::spawn(async move { run_here(&args).await }).await?
}

async fn run_here(args: &Settings) -> anyhow::Result<Report> {
    let local = Local::new("bench", &args.amqp_url, &args.database_url);
    let (names, dir) = (&local.names, &local.dir);
    std::fs::create_dir_all(dir)?;
    let mut report = Report {
        machine: format!(
            "{} cores, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::env::consts::ARCH
        ),
        rings: args.rings,
        fanout: args.fanout,
        android_share: args.android_share,
        apns_requests: args.apns_requests,
        binary_frames: args.binary_frames,
        skipped: args.skip.iter().map(Part::name).collect(),
        ..Report::default()
    };
    let result = async {
        end_to_end(args, &local, &mut report).await?;
        if args.runs(Part::Broker) {
            broker_ceiling(args, names, &mut report).await?;
        }
        if args.runs(Part::Apns) {
            apns_leg(args, dir, &mut report).await?;
        }
        if args.runs(Part::Binary) {
            binary_leg(args, dir, &mut report).await?;
        }
        if args.runs(Part::Fcm) {
            fcm_leg(args, dir, &mut report).await?;
        }
        anyhow::Ok(())
    }
    .await;
    // Clean up whatever happened: the broker ceiling's queue too.
    let _ = local.clean_up(&[broker_queue(names)]).await;
    result?;
    Ok(report)
}

/// The queue of the broker ceiling's bare loop (outside the topology).
fn broker_queue(names: &Names) -> String {
    format!("{}.bench", names.prefix)
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
