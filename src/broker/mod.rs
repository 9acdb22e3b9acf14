//! RabbitMQ: the topology DESIGN.md names (declared idempotently by every process at
//! start), connecting, publishing with a publisher confirm, and consuming with coalesced
//! acks ([`acks`]).
//!
//! One concern a file: `topology` (the names and their declaration), `publish`
//! (confirmed publishes, message limits, dead letters), `consume` (the shared consume
//! loop and a consuming process's sessions), [`acks`] (coalesced acks). This file holds
//! the error, connecting (to one node of a cluster's list, [`connect`]), and the reconnect
//! loop.

pub mod acks;
mod consume;
mod publish;
mod topology;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

pub use acks::Acks;
pub use consume::{consume_batches, requeue, Consumer, Control};
pub use publish::{
    check_fits, confirm_channel, dead_letter, dead_letter_with, error_header, properties_size,
    publish_checked, publish_confirmed, publish_ring, truncate, with_header, Publisher,
    CONFIRM_TIMEOUT, ERROR_HEADER, MAX_BODY_BYTES, MAX_REASON_BYTES,
};
pub use topology::{
    declare, delete, Names, DELIVERY_LIMIT, MQTT_EXCHANGE, RETRY_DELAYS, RETRY_KEY,
};

/// The broker failed or refused. Its text holds the cause once (no `source` chain to
/// repeat it when printed with `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(lapin::Error),
    #[error("RabbitMQ did not confirm the publish to {0}")]
    NotConfirmed(String),
    #[error("RabbitMQ did not confirm the publish to {0} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout(String),
    #[error("no node of the broker answered: {0}")]
    NoNode(String),
    #[error("the broker ended the consumer of {0}")]
    ConsumerEnded(String),
    /// Publishing this would break an AMQP limit, and the broker would close the whole
    /// connection (and every delivery in flight on it) instead of refusing one message.
    #[error("not published to {target}: {what}")]
    TooLarge { target: String, what: String },
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Amqp(e)
    }
}

/// An AMQP URL (or a comma-separated list of them) fit for logs: the password replaced by
/// `***`.
pub fn redact(url: &str) -> String {
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
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a lost session: the next connection starts with the node after the one it was on.
pub fn next_node() {
    NODE.fetch_add(1, Ordering::Relaxed);
}

/// The node (`host:port`, no credentials) each open connection of this process is on.
pub fn connected_nodes() -> BTreeMap<String, String> {
    CONNECTED.lock().unwrap().clone()
}

/// `host:port` of a node's URL, for logs and metrics.
pub fn node_label(url: &str) -> String {
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
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let nodes = nodes(url);
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
        let attempt = tokio::time::timeout(NODE_CONNECT_TIMEOUT, connect_node(node, name));
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
            Ok(Err(e)) if nodes.len() == 1 => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection within {NODE_CONNECT_TIMEOUT:?}"),
        };
        if nodes.len() == 1 {
            return Err(BrokerError::NoNode(error));
        }
        tracing::warn!(connection = name, node = %node_label(node), %error, "broker node not reachable; trying the next");
        failures.push(format!("{}: {error}", node_label(node)));
    }
    Err(BrokerError::NoNode(failures.join("; ")))
}

async fn connect_node(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let url = if url.contains("heartbeat=") {
        url.to_owned()
    } else {
        format!(
            "{url}{}heartbeat=15",
            if url.contains('?') { '&' } else { '?' }
        )
    };
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Ok(Connection::connect(&url, props).await?)
}

/// Runs `session` (connect, declare, consume) until it ends because `cancel` fired;
/// when the broker connection is lost it reconnects with jittered exponential backoff,
/// logging where it tried (`amqp_url`, password hidden) and the real wait.
pub async fn serve<S, Fut>(
    what: &str,
    amqp_url: &str,
    cancel: &CancellationToken,
    mut session: S,
) -> anyhow::Result<()>
where
    S: FnMut() -> Fut,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let mut failures: u32 = 0;
    loop {
        let started = Instant::now();
        match session().await {
            Ok(()) => return Ok(()),
            Err(_) if cancel.is_cancelled() => return Ok(()),
            Err(e) => {
                // Another node first next time (a cluster's node may be the one that went).
                next_node();
                // A session that ran a while was healthy: start the backoff again.
                if started.elapsed() > Duration::from_secs(30) {
                    failures = 0;
                }
                failures += 1;
                let wait = crate::backoff::jittered(
                    Duration::from_millis(250),
                    Duration::from_secs(30),
                    failures,
                );
                let broker = redact(amqp_url);
                let retry_in_ms = wait.as_millis() as u64;
                if failures == 1 && started.elapsed() < Duration::from_secs(1) {
                    tracing::error!(process = what, %broker, error = %e, retry_in_ms, hint = "is RabbitMQ running there? Locally: rabbitmq-server -detached", "cannot connect to the broker; retrying");
                } else {
                    tracing::error!(process = what, %broker, error = %e, retry_in_ms, "broker connection lost; reconnecting");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
