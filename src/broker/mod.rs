//! RabbitMQ: the topology docs/design.md names (declared idempotently by every process at
//! start), connecting, publishing with a publisher confirm, and consuming with coalesced
//! acks ([`acks`]).
//!
//! One concern a file: `topology` (the names and their declaration), `publish`
//! (confirmed publishes, message limits, dead letters), `consume` (the shared consume
//! loop and a consuming process's sessions), [`acks`] (coalesced acks). This file holds
//! the error, connecting (to one node of a cluster's list, [`connect`]), and the reconnect
//! loop; `endpoint` says where the broker is and with which TLS ([`Endpoint`]).

pub mod acks;
pub mod cause;
mod consume;
mod endpoint;
mod publish;
mod topology;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

pub use acks::Acks;
pub use consume::{consume_batches, requeue, Consumer, Control, Limit, DEFAULT_MAX_MESSAGE_BYTES};
pub use endpoint::Endpoint;
pub use publish::{
    check_fits, confirm_channel, dead_letter, dead_letter_with, error_header, properties_size,
    publish_checked, publish_confirmed, publish_end, publish_ring, truncate, with_header,
    Publisher, CONFIRM_TIMEOUT, ERROR_HEADER, MAX_BODY_BYTES, MAX_REASON_BYTES,
};
pub use topology::{
    check, declare, declare_or_check, delete, plan, Binding, Names, Plan, Topology, DELIVERY_LIMIT,
    MQTT_EXCHANGE, RETRY_DELAYS, RETRY_KEY,
};

/// The broker failed or refused. Its text holds the cause once (no `source` chain to
/// repeat it when printed with `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {}", cause::describe(.0))]
    Amqp(lapin::Error),
    #[error("RINGPUSH_AMQP_URL: {0} is not an AMQP URL: {1}")]
    Url(String, String),
    /// Connecting to the one node there is failed: told for a person ([`cause`]).
    #[error("{0}")]
    Connect(Box<cause::Refused>),
    #[error("RabbitMQ did not confirm the publish to {0}")]
    NotConfirmed(String),
    #[error("RabbitMQ did not confirm the publish to {} within {}", .0, crate::human::Human(CONFIRM_TIMEOUT))]
    ConfirmTimeout(String),
    #[error("no node of the broker answered: {0}")]
    NoNode(String),
    #[error("the broker ended the consumer of {0}")]
    ConsumerEnded(String),
    /// Publishing this would break an AMQP limit, and the broker would close the whole
    /// connection (and every delivery in flight on it) instead of refusing one message.
    #[error("not published to {target}: {what}")]
    TooLarge { target: String, what: String },
    /// The broker returned a publish that no binding routed (it would have been lost).
    #[error("RabbitMQ routed the publish to {0} nowhere: a binding of the topology is missing (`ringpush service add` declares it)")]
    Unroutable(String),
    /// A name of the topology is not there, and this identity may not declare it.
    #[error("the {0} is not declared, and this broker identity may not declare it: an administrator declares the topology (`ringpush service add`, or any ringpush process with a login that may)")]
    NotDeclared(String),
}

/// The AMQP reply code of a broker's refusal (403 ACCESS_REFUSED, 404 NOT_FOUND, …), if `e`
/// is one.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

impl BrokerError {
    /// Why connecting failed, as far as the process can tell (`Other` for what is not a
    /// failed connect).
    pub fn cause(&self) -> cause::Cause {
        match self {
            BrokerError::Connect(refused) => refused.cause,
            _ => cause::Cause::Other,
        }
    }

    /// The library's own text of the error, for a debug line (a person reads `Display`).
    pub fn detail(&self) -> String {
        match self {
            BrokerError::Connect(refused) => refused.detail.clone(),
            BrokerError::Amqp(e) => e.to_string(),
            other => other.to_string(),
        }
    }

    /// A failed connect to the node at `url`, told for a person.
    fn at_node(self, url: &str) -> BrokerError {
        match self {
            BrokerError::Amqp(e) => BrokerError::Connect(Box::new(cause::refused(url, &e))),
            other => other,
        }
    }
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Amqp(e)
    }
}

/// An AMQP URL (or a comma-separated list of them) fit for logs: the password replaced by
/// `***`.
pub(crate) fn redact(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &u[scheme + 3..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        format!("{}{}:***{}", &u[..scheme + 3], &userinfo[..colon], &u[at..])
                    }
                    None => u.to_owned(),
                }
            }
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The nodes of a broker URL: `RINGPUSH_AMQP_URL` may name a cluster's nodes as a
/// comma-separated list of URLs.
pub fn nodes(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Where a process's next connection starts in its node list: the node it is on (every
/// connection of a process goes to the same node), moved on by [`next_node`] when a session
/// is lost, so a reconnect tries the other nodes first, in turn.
static NODE: AtomicUsize = AtomicUsize::new(0);

/// The node each of the process's connections is on (by connection name), for logs and
/// `ringpush_broker_node_info`.
static CONNECTED: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// How long one node may take to accept a connection before the next is tried.
pub(crate) const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a lost session: the next connection starts with the node after the one it was on.
pub(crate) fn next_node() {
    NODE.fetch_add(1, Ordering::Relaxed);
}

/// The node (`host:port`, no credentials) each open connection of this process is on.
pub fn connected_nodes() -> BTreeMap<String, String> {
    CONNECTED.lock().unwrap().clone()
}

/// `host:port` of a node's URL, for logs and metrics.
pub(crate) fn node_label(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}:{}",
            u.host_str().unwrap_or(""),
            u.port()
                .unwrap_or(if u.scheme() == "amqps" { 5671 } else { 5672 })
        ),
        Err(_) => redact(url),
    }
}

/// Connects with a heartbeat, named so operators see which process holds the connection:
/// to the first node of the list that answers, starting with the one the process is on
/// (see [`next_node`]); each node gets [`NODE_CONNECT_TIMEOUT`]. Logs the node it reached.
/// Every connection ringpush opens to the broker is opened here: `amqps://` nodes over TLS
/// verified with the endpoint's roots (a plain URL given as text is an [`Endpoint`] with
/// the public roots).
pub async fn connect(broker: impl Into<Endpoint>, name: &str) -> Result<Connection, BrokerError> {
    let broker = broker.into();
    let nodes = nodes(broker.url());
    if nodes.is_empty() {
        return Err(BrokerError::NoNode(
            "RINGPUSH_AMQP_URL names no node".into(),
        ));
    }
    let start = NODE.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    for i in 0..nodes.len() {
        let at = (start + i) % nodes.len();
        let node = nodes[at];
        let attempt = tokio::time::timeout(NODE_CONNECT_TIMEOUT, connect_node(&broker, node, name));
        let error = match attempt.await {
            Ok(Ok(connection)) => {
                if at != start % nodes.len() {
                    NODE.store(at, Ordering::Relaxed);
                }
                let label = node_label(node);
                if nodes.len() > 1 {
                    tracing::info!(connection = name, node = %label, "connected to the broker");
                }
                CONNECTED.lock().unwrap().insert(name.to_owned(), label);
                return Ok(connection);
            }
            Ok(Err(e)) if nodes.len() == 1 => return Err(e.at_node(node)),
            Ok(Err(e)) => e.at_node(node).to_string(),
            Err(_) if nodes.len() == 1 => {
                let refused = cause::timed_out(node, NODE_CONNECT_TIMEOUT);
                return Err(BrokerError::Connect(Box::new(refused)));
            }
            Err(_) => cause::timed_out(node, NODE_CONNECT_TIMEOUT).to_string(),
        };
        tracing::warn!(connection = name, node = %node_label(node), %error, "broker node not reachable; trying the next");
        failures.push(error);
    }
    Err(BrokerError::NoNode(failures.join("; ")))
}

async fn connect_node(broker: &Endpoint, url: &str, name: &str) -> Result<Connection, BrokerError> {
    let url = if url.contains("heartbeat=") {
        url.to_owned()
    } else {
        format!(
            "{url}{}heartbeat=15",
            if url.contains('?') { '&' } else { '?' }
        )
    };
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    broker.open(&url, props).await
}

/// The first wait between reconnects while no node accepts the connection, doubling up to
/// [`RECONNECT_CAP`]; each wait jittered by ±50 %.
pub(crate) const RECONNECT_FIRST: Duration = Duration::from_millis(100);

/// The longest wait between two reconnects (1.5 s with its jitter): a worker consumes again
/// within about that long of a node accepting connections, however long the broker was away.
pub(crate) const RECONNECT_CAP: Duration = Duration::from_secs(1);

/// How long a session must have consumed for its loss to start the backoff over (with an
/// immediate first reconnect). A node that accepts connections and then drops them — before
/// they consume, or right after — keeps the backoff growing to its cap instead: about one
/// connection a second per process, never a reconnect storm.
pub(crate) const RECONNECT_PROVEN: Duration = Duration::from_secs(1);

/// How often a broker that stays unreachable is reported again (at error).
const STILL_UNREACHABLE_EVERY: Duration = Duration::from_secs(30);

/// How far one session got, for the reconnect rule and its log lines: a session marks
/// [`Progress::consuming`] once its consumer is on the queue.
#[derive(Debug)]
pub struct Progress {
    process: String,
    /// Since when the process has been away from the queue, and the sessions tried since
    /// (`None`: its first session).
    lost: Option<(Instant, u32)>,
    /// Whether it was on the queue before (else it has not reached the broker yet).
    after_loss: bool,
    consuming: Mutex<Option<Instant>>,
}

impl Progress {
    fn new(process: &str, lost: Option<(Instant, u32)>, after_loss: bool) -> Self {
        Self {
            process: process.to_owned(),
            lost,
            after_loss,
            consuming: Mutex::new(None),
        }
    }

    /// The session's consumer is on the queue (called again after a pause: only the first
    /// call counts). After a lost connection, logs how long the process was away.
    pub fn consuming(&self) {
        let mut consuming = self.consuming.lock().unwrap();
        if consuming.is_some() {
            return;
        }
        *consuming = Some(Instant::now());
        match self.lost {
            Some((lost, attempts)) if self.after_loss => {
                let away_ms = lost.elapsed().as_millis() as u64;
                tracing::info!(
                    process = %self.process,
                    away_ms,
                    attempts,
                    "consuming again after the broker connection was lost"
                );
            }
            Some((since, attempts)) => {
                let waited_ms = since.elapsed().as_millis() as u64;
                tracing::info!(process = %self.process, waited_ms, attempts, "the broker answered; consuming");
            }
            None => {}
        }
    }

    /// How long the session consumed, up to now (`None`: it never did).
    fn consumed_for(&self) -> Option<Duration> {
        self.consuming.lock().unwrap().map(|at| at.elapsed())
    }
}

/// The reconnect rule: the wait before the next session, from how the last one ended.
/// `failures` counts sessions in a row that did not consume for [`RECONNECT_PROVEN`]; a
/// session that did resets it and is replaced at once.
fn reconnect_wait(failures: &mut u32, consumed_for: Option<Duration>) -> Duration {
    if consumed_for.is_some_and(|d| d >= RECONNECT_PROVEN) {
        *failures = 0;
        return Duration::ZERO;
    }
    *failures += 1;
    crate::backoff::jittered(RECONNECT_FIRST, RECONNECT_CAP, *failures)
}

/// Runs `session` (connect, declare, consume) until it ends because `cancel` fired; when the
/// broker connection is lost it reconnects: at once after a session that consumed, then with
/// a short jittered backoff ([`RECONNECT_FIRST`] doubling to [`RECONNECT_CAP`]) while the
/// nodes refuse. One line per event: the loss of a connection that consumed (warn — never
/// for one that was not up), a first connect that failed (error, with its [`cause`]: the
/// login or vhost refused, nothing listening, …), the first failed reconnect (warn, with the
/// real wait), a failure for another cause than the last said (again), the broker still away
/// every 30 s (error), consuming again (info, with how long the process was away); lapin's own
/// text of every failure at debug. `amqp_url` is logged with its password hidden.
pub async fn serve<S, Fut>(
    what: &str,
    amqp_url: &str,
    cancel: &CancellationToken,
    mut session: S,
) -> anyhow::Result<()>
where
    S: FnMut(Arc<Progress>) -> Fut,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let broker = redact(amqp_url);
    let mut failures: u32 = 0;
    let mut ever_consumed = false;
    // Since when the process has been away from the queue, and the sessions tried since.
    let mut away: Option<(Instant, u32)> = None;
    let mut reported = Instant::now();
    // The cause last reported while away: a retry failing for it again logs only at debug.
    let mut shown: Option<(bool, cause::Cause)> = None;
    loop {
        let progress = Arc::new(Progress::new(what, away, ever_consumed));
        match session(progress.clone()).await {
            Ok(()) => return Ok(()),
            Err(_) if cancel.is_cancelled() => return Ok(()),
            Err(e) => {
                // Another node first next time (a cluster's node may be the one that went).
                next_node();
                let consumed_for = progress.consumed_for();
                let wait = reconnect_wait(&mut failures, consumed_for);
                let retry_in_ms = wait.as_millis() as u64;
                // The library's own words, every time, for whoever asks for them.
                tracing::debug!(process = what, error = %e.detail(), retry_in_ms, "broker session ended");
                // A connect that failed, or a session that connected and failed before its
                // consumer got on the queue (a declare refused, a broker still starting).
                let connected = !matches!(e, BrokerError::Connect(_) | BrokerError::NoNode(_));
                let cause = (connected, e.cause());
                if consumed_for.is_some() {
                    ever_consumed = true;
                    away = Some((Instant::now(), 0));
                    reported = Instant::now();
                    shown = None;
                    tracing::warn!(process = what, %broker, error = %e, retry_in_ms, "broker connection lost; reconnecting");
                } else {
                    let first = away.is_none();
                    let (since, tried) = away.get_or_insert((Instant::now(), 0));
                    if !first {
                        *tried += 1;
                    }
                    let (tried, away_ms) = (*tried, since.elapsed().as_millis() as u64);
                    let mut report = true;
                    if tried == 1 && ever_consumed {
                        tracing::warn!(process = what, %broker, error = %e, retry_in_ms, "cannot reach the broker yet; retrying");
                    } else if shown != Some(cause) {
                        // The first failure, or one for another cause than the last reported.
                        if matches!(e, BrokerError::NotDeclared(_)) {
                            tracing::error!(process = what, %broker, error = %e, retry_in_ms, "the topology is not there; waiting for it");
                        } else if connected {
                            tracing::warn!(process = what, %broker, error = %e, retry_in_ms, "the broker session failed before it consumed; retrying");
                        } else {
                            tracing::error!(process = what, %broker, error = %e, retry_in_ms, "cannot connect to the broker; retrying");
                        }
                    } else if reported.elapsed() >= STILL_UNREACHABLE_EVERY {
                        tracing::error!(process = what, %broker, error = %e, away_ms, retry_in_ms, "still no broker; retrying");
                    } else {
                        report = false;
                    }
                    if report {
                        reported = Instant::now();
                        shown = Some(cause);
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// lapin's own error lines about a connection it lost or failed to open — `io_loop` ("error
/// doing IO"), `channels` ("Connection error"), `channel` ("Connection closed"), `heartbeat`,
/// `consumer` — say again, at error, what ringpush says once per event at the level that fits
/// it (`broker connection lost; reconnecting` at warn, …): lapin hands every one of those
/// errors back to ringpush, which logs it. Off unless `RUST_LOG` names `lapin` itself.
pub(crate) const LAPIN_QUIET: &[&str] = &[
    "lapin::io_loop=off",
    "lapin::channels=off",
    "lapin::channel=off",
    "lapin::heartbeat=off",
    "lapin::consumer=off",
    "lapin::returned_messages=off",
    "lapin::socket_state=off",
];

/// The log filter's directives: `RUST_LOG` when set (else `default`), with [`LAPIN_QUIET`]
/// added unless they name lapin.
pub fn log_directives(rust_log: Option<&str>, default: &str) -> String {
    let asked = rust_log.filter(|l| !l.trim().is_empty()).unwrap_or(default);
    if asked.contains("lapin") {
        return asked.to_owned();
    }
    let mut directives = vec![asked];
    directives.extend_from_slice(LAPIN_QUIET);
    directives.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_session_that_consumed_is_replaced_at_once_then_the_backoff_stays_short() {
        let mut failures = 0;
        // The broker went away after a healthy session: at once.
        assert_eq!(
            reconnect_wait(&mut failures, Some(Duration::from_secs(20))),
            Duration::ZERO
        );
        // The nodes refuse: 100 ms doubling to 1 s, ±50 %; never over 1.5 s however long.
        let mut waits = Vec::new();
        for _ in 0..40 {
            let wait = reconnect_wait(&mut failures, None);
            assert!(wait <= Duration::from_millis(1500), "{wait:?}");
            waits.push(wait);
        }
        assert!(waits[0] <= Duration::from_millis(150), "{waits:?}");
        assert!(waits[39] >= Duration::from_millis(500), "{waits:?}");
        // Back and consuming for a while: the count starts over, the next loss at once.
        assert_eq!(
            reconnect_wait(&mut failures, Some(RECONNECT_PROVEN)),
            Duration::ZERO
        );
        assert_eq!(failures, 0);
        // A node that accepts and drops connections right after they consume: the backoff
        // grows as for a refusal (no reconnect storm).
        for _ in 0..10 {
            reconnect_wait(&mut failures, Some(Duration::from_millis(5)));
        }
        assert_eq!(failures, 10);
        assert!(reconnect_wait(&mut failures, Some(Duration::ZERO)) >= Duration::from_millis(500));
    }

    #[test]
    fn lapins_lines_about_a_lost_connection_are_left_to_ringpush() {
        use std::io::Write;
        use std::sync::Arc;
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let emit = |directives: String| {
            let lines = Lines::default();
            let writer = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(directives))
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::error!(target: "lapin::io_loop", "error doing IO");
                tracing::error!(target: "lapin::channels", "Connection error");
                tracing::error!(target: "lapin::channel", "Connection closed");
                tracing::warn!(target: "ringpush::broker", "broker connection lost; reconnecting");
            });
            let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            text
        };
        let default = "info,rustls=error";
        for rust_log in [None, Some("info"), Some("warn"), Some("")] {
            let text = emit(log_directives(rust_log, default));
            assert_eq!(text.lines().count(), 1, "{rust_log:?}: {text}");
            assert!(text.contains("broker connection lost"), "{text}");
        }
        // Asked for by name, lapin's lines are there.
        let text = emit(log_directives(Some("info,lapin=error"), default));
        assert_eq!(text.lines().count(), 4, "{text}");
    }

    #[test]
    fn a_url_list_names_the_nodes_of_a_cluster() {
        let list = "amqp://u:p@h1:5672/%2f, amqp://u:p@h2:5673/%2f,,amqps://u:p@h3/v";
        assert_eq!(
            nodes(list),
            [
                "amqp://u:p@h1:5672/%2f",
                "amqp://u:p@h2:5673/%2f",
                "amqps://u:p@h3/v"
            ]
        );
        let labels: Vec<String> = nodes(list).into_iter().map(node_label).collect();
        assert_eq!(labels, ["h1:5672", "h2:5673", "h3:5671"]);
        assert_eq!(node_label("amqp://127.0.0.1/%2f"), "127.0.0.1:5672");
    }

    #[test]
    fn urls_in_logs_hide_the_password() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact("amqp://a:p@h1:5672,amqp://b:q@h2"),
            "amqp://a:***@h1:5672,amqp://b:***@h2"
        );
        assert_eq!(redact("amqp://h/%2f"), "amqp://h/%2f");
    }
}
