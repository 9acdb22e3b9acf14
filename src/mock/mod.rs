//! `ringpush mock-apns`: a local APNs for development, tests, the demo and the benchmark.
//!
//! An HTTP/2 server over TLS with its own CA ([`certs`]) that checks requests the way APNs
//! does ([`validate`]), answers 200, or the scripted rejection of a token (410 Unregistered
//! with a millisecond `timestamp`, or any status and reason), and counts what it saw. Like
//! APNs (protocol sheet A8/A9) it announces one stream per connection until the first
//! accepted request, locks a connection to its first team and key, refuses a JWT that changes
//! too often or is over an hour old, and accepts client certificates signed by its CA. It
//! serves many apps at once: several keys, each for its team, told apart by `kid` (added and
//! revoked while it runs); topics that take one team's JWTs only; a certificate that names
//! its topic sends to that topic only. Fault
//! modes ([`Faults`]) inject GOAWAY, REFUSED_STREAM, 503 Shutdown, a TCP close mid-stream and
//! a rate of errors; a frame-level [`shim`] lets it change SETTINGS and write GOAWAY frames
//! the `h2` server cannot.
//!
//! One concern a file: `server` (the listener, its TLS and the HTTP/2 streams), `faults`
//! (what to inject and each stream's fate), `auth` (a connection's JWT lock), `control`
//! (what tests, the demo and the benchmark set and read on a running [`Mock`]), beside
//! [`certs`], [`validate`], [`shim`] and [`binary`], and `apps` (an apps folder as both
//! mocks read it). This file holds the settings, the state they share, and `ringpush
//! mock-apns`.

pub(crate) mod apps;
pub mod binary;
pub mod certs;
pub mod shim;
pub mod validate;

mod auth;
mod control;
mod faults;
mod server;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::token::DeviceToken;
pub use control::{Received, Script, Stats};
pub use faults::{ErrorRate, FailFirst, Faults, GoAwayDebug};
pub use validate::{AuthCheck, KeyCheck};

/// How the mock is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Where the CA and server certificate live (generated on first start).
    pub cert_dir: PathBuf,
    /// JWT checks (keys, topics' teams); with no key every request is taken as authorised.
    /// The start; [`Mock::add_key`], [`Mock::remove_key`] and [`Mock::set_topic`] change it.
    pub auth: AuthCheck,
    /// MAX_CONCURRENT_STREAMS announced when a connection opens (APNs: 1).
    pub initial_streams: u32,
    /// MAX_CONCURRENT_STREAMS announced after the first accepted request.
    pub max_concurrent_streams: u32,
    /// Announce `initial_streams` again after a rejection (and the maximum after the next
    /// acceptance), as APNs does.
    pub drop_streams_after_rejection: bool,
    /// A connection may change its JWT at most once in this window (APNs: 20 minutes).
    pub token_update_window: Duration,
    /// How many requests are kept for inspection (oldest dropped first).
    pub keep_requests: usize,
    /// Wait this long before answering each request (a slow APNs).
    pub response_delay: Duration,
    pub faults: Faults,
    /// Also serve the legacy binary gateway and feedback service on these addresses.
    pub binary: Option<(SocketAddr, SocketAddr)>,
    /// Append one line per answered HTTP/2 request to this file — `<unix ms> <status>
    /// <apns-collapse-id> <token> <ring|followup>` — the record a test outside the process (the cluster
    /// test) checks deliveries against. It holds full tokens: a test artifact, not a log.
    pub record: Option<PathBuf>,
}

impl Settings {
    /// A mock on an ephemeral loopback port that checks JWTs against `auth`.
    pub fn local(cert_dir: PathBuf, auth: AuthCheck) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_dir,
            auth,
            initial_streams: 1,
            max_concurrent_streams: 1000,
            drop_streams_after_rejection: false,
            token_update_window: Duration::from_secs(20 * 60),
            keep_requests: 100_000,
            response_delay: Duration::ZERO,
            faults: Faults::default(),
            binary: None,
            record: None,
        }
    }
}

/// Shared state of a running mock.
struct State {
    settings: Settings,
    /// The keys and topics checked now: `settings.auth`, changed while running.
    auth: RwLock<AuthCheck>,
    faults: Mutex<Faults>,
    /// The failures [`FailFirst`] has left to answer.
    fail_first: Mutex<Option<FailFirst>>,
    /// Requests being answered right now.
    in_flight: AtomicU64,
    pings: Arc<AtomicU64>,
    connections: AtomicU64,
    /// Per-token answers; tokens not listed are accepted.
    scripts: Mutex<HashMap<String, Script>>,
    stats: Mutex<Stats>,
    received: Mutex<VecDeque<Received>>,
    /// `settings.record`, open for appending.
    record: Option<Mutex<std::fs::File>>,
    /// Tokens the binary gateway rejected, offered once by the feedback service.
    binary_feedback: Mutex<Vec<crate::apns::binary::codec::FeedbackTuple>>,
}

/// A running mock. Dropping it does not stop it: cancel the token given to `start`.
#[derive(Clone)]
pub struct Mock {
    addr: SocketAddr,
    ca_file: PathBuf,
    cert_dir: PathBuf,
    state: Arc<State>,
    /// The binary gateway's and feedback service's addresses, when served.
    binary: Option<(SocketAddr, SocketAddr)>,
}

/// `ringpush mock-apns`: serve until `cancel`, logging the counts every 10 s when they move.
pub async fn run(
    settings: Settings,
    scripts: Vec<(DeviceToken, Script)>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mock = Mock::start(settings, cancel.clone()).await?;
    for (token, script) in scripts {
        mock.script(&token, script);
    }
    let mut last = Stats::default();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let stats = mock.stats();
        if stats != last {
            info!(
                accepted = stats.accepted,
                rejected = stats.rejected_total(),
                connections = stats.connections,
                "mock APNs counts"
            );
            last = stats;
        }
    }
    let stats = mock.stats();
    info!(accepted = stats.accepted, rejected = ?stats.rejected, "mock APNs stopped");
    Ok(())
}
