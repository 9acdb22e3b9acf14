//! Metrics and health for operators: Prometheus text at `/metrics` (names prefixed
//! `ringpush_`), `/healthz` (the process is alive: cheap, broker-independent) and `/readyz`
//! (200 when the process can do its work, 503 with the reason when not), on
//! `RINGPUSH_METRICS_ADDR`.
//!
//! Each process registers its own metrics where it counts them (`worker::Counters::register`,
//! `feedback::Counters::register`, `purge::Counters::register`: counter families whose children
//! the process increments, [`labelled`]); this module serves them, with the
//! queue-depth gauges a [`QueueDepth`] poller refreshes by passive declares, so a dashboard
//! needs no broker plugin. [`server`] is the HTTP server, bounded against clients that hold
//! connections open.

pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{self, Names};

/// A readiness check: `Ok` when the process can do its work.
pub(crate) type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A latency histogram in seconds: 0.5 ms to about 20 s in steps of 1.5×, fine enough to
/// tell a 10 ms p99 from a 15 ms one.
pub(crate) fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 1.5, 27))
}

#[cfg(feature = "kit")]
/// Estimates a quantile from cumulative Prometheus buckets `(upper bound, count)` by
/// linear interpolation inside the bucket (as `histogram_quantile` does).
pub(crate) fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    None
}

/// A counter family with one label, e.g. `ringpush_rings_total{outcome}`.
pub(crate) type Family1 =
    Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter>;

/// A family of [`latency_histogram`]s, one per label set.
pub(crate) type HistogramFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// An empty [`HistogramFamily`].
pub(crate) fn histogram_family() -> HistogramFamily {
    Family::new_with_constructor(latency_histogram)
}

/// The child of `family` for `label=value`, kept by the caller (observing it takes no lock).
pub(crate) fn labelled_histogram(family: &HistogramFamily, label: &str, value: &str) -> Histogram {
    family
        .get_or_create(&vec![(label.to_owned(), value.to_owned())])
        .clone()
}

/// The child of `family` for `label=value`: a shared counter the caller keeps and increments
/// without touching the family (no lock) again.
pub(crate) fn labelled(
    family: &Family1,
    label: &str,
    value: &str,
) -> prometheus_client::metrics::counter::Counter {
    family.get_or_create_owned(&vec![(label.to_owned(), value.to_owned())])
}

/// A registry with the `ringpush` prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("ringpush")
}

/// Binds `addr` (so a bad address fails at start) and serves until `cancel`, bounded
/// ([`server`]: header timeout, connection cap, `/readyz` refreshed at most once a second).
/// Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: ReadyCheck,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let bound = server::serve(addr, registry, ready, cancel).await?;
    info!(addr = %bound, "metrics, /healthz and /readyz listening");
    Ok(bound)
}

/// Where a process serves `/metrics`, `/healthz` and `/readyz`, and how often it refreshes
/// the queue-depth gauges (`RINGPUSH_METRICS_ADDR`, `RINGPUSH_QUEUE_POLL_INTERVAL`).
#[derive(Debug, Clone, Copy)]
pub struct Serve {
    pub addr: SocketAddr,
    pub poll_every: Duration,
}

impl Serve {
    /// Serves `registry` and `ready` with the queue depths of `names` kept fresh; the
    /// address it listens on (an error names `RINGPUSH_METRICS_ADDR`).
    pub async fn start(
        &self,
        registry: Registry,
        amqp_url: &broker::Endpoint,
        names: Names,
        ready: ReadyCheck,
        cancel: &CancellationToken,
    ) -> anyhow::Result<SocketAddr> {
        observe(
            self.addr,
            registry,
            amqp_url,
            names,
            self.poll_every,
            ready,
            cancel,
        )
        .await
        .map_err(|e| anyhow::anyhow!("RINGPUSH_METRICS_ADDR: cannot listen on {}: {e}", self.addr))
    }
}

/// Serves the registry with the queue-depth gauges added and kept fresh; returns the bound
/// address.
pub async fn observe(
    addr: SocketAddr,
    mut registry: Registry,
    amqp_url: &broker::Endpoint,
    names: Names,
    poll_every: Duration,
    ready: ReadyCheck,
    cancel: &CancellationToken,
) -> std::io::Result<SocketAddr> {
    let depth = QueueDepth::default();
    depth.register(&mut registry);
    registry.register_collector(Box::new(BrokerNodes));
    depth.spawn(amqp_url.clone(), names, poll_every, cancel.clone());
    serve(addr, registry, ready, cancel.clone()).await
}

/// `ringpush_broker_node_info{connection, node} 1`: the broker node (`host:port`) each of
/// the process's connections went to last — on a cluster, which node it is on.
#[derive(Debug)]
struct BrokerNodes;

impl prometheus_client::collector::Collector for BrokerNodes {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let family: Family<QueueLabels, Gauge<i64, AtomicI64>> = Family::default();
        for (connection, node) in broker::connected_nodes() {
            family
                .get_or_create(&vec![
                    ("connection".to_owned(), connection),
                    ("node".to_owned(), node),
                ])
                .set(1);
        }
        let m = e.encode_descriptor(
            "broker_node_info",
            "The broker node (host:port) each of the process's connections is on",
            None,
            family.metric_type(),
        )?;
        family.encode(m)
    }
}

/// Encoding what is only known at scrape time (a worker's connection and pause gauges);
/// counters are families registered where they are counted.
pub mod encode {
    use std::fmt;

    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::gauge::ConstGauge;

    pub(crate) fn gauge(
        e: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: i64,
    ) -> fmt::Result {
        let g = ConstGauge::new(value);
        g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
    }

    /// One gauge family with a child per `(label, value)` pair given.
    pub fn gauges(
        e: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        label: &str,
        values: &[(&str, i64)],
    ) -> fmt::Result {
        let mut family = e.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (value_of_label, value) in values {
            let labels = [(label.to_owned(), (*value_of_label).to_owned())];
            ConstGauge::new(*value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// One gauge or counter family with a child per set of labels given (values read at
    /// scrape time).
    pub fn family(
        e: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        counter: bool,
        children: &[(Vec<(String, String)>, i64)],
    ) -> fmt::Result {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::MetricType;
        let kind = if counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        };
        let mut family = e.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in children {
            let child = family.encode_family(labels)?;
            if counter {
                ConstCounter::new((*value).max(0) as u64).encode(child)?;
            } else {
                ConstGauge::new(*value).encode(child)?;
            }
        }
        Ok(())
    }

    /// One counter family with a child per `(label, value)` pair given (counts read at
    /// scrape time).
    pub fn counters(
        e: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) -> fmt::Result {
        use prometheus_client::metrics::counter::ConstCounter;
        let mut family = e.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (value_of_label, value) in values {
            let labels = [(label.to_owned(), (*value_of_label).to_owned())];
            ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

type QueueLabels = Vec<(String, String)>;

/// Depth and consumer count of every ringpush queue, refreshed on an interval by passive
/// declares over a connection of its own.
#[derive(Clone, Default)]
pub struct QueueDepth {
    messages: Family<QueueLabels, Gauge<i64, AtomicI64>>,
    consumers: Family<QueueLabels, Gauge<i64, AtomicI64>>,
}

impl QueueDepth {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "queue_messages",
            "Messages ready in each ringpush queue",
            self.messages.clone(),
        );
        registry.register(
            "queue_consumers",
            "Consumers of each ringpush queue",
            self.consumers.clone(),
        );
    }

    /// Records one queue's depth and consumer count.
    pub fn set(&self, queue: &str, messages: u32, consumers: u32) {
        let labels = vec![("queue".to_owned(), queue.to_owned())];
        self.messages
            .get_or_create(&labels)
            .set(i64::from(messages));
        self.consumers
            .get_or_create(&labels)
            .set(i64::from(consumers));
    }

    /// Polls until `cancel`; a failed poll drops the connection and tries again next time.
    pub fn spawn(
        self,
        amqp_url: broker::Endpoint,
        names: Names,
        every: Duration,
        cancel: CancellationToken,
    ) {
        tokio::spawn(async move {
            let mut connection: Option<lapin::Connection> = None;
            loop {
                if connection.is_none() {
                    connection = broker::connect(&amqp_url, "ringpush queue depth")
                        .await
                        .ok();
                    // The process declares the topology too, but maybe not yet: a passive
                    // declare of a queue not there yet closes its channel (and lapin logs
                    // that as an error). Declaring is idempotent, with the same arguments;
                    // an identity that may not declare checks that it is there.
                    if let Some(conn) = &connection {
                        if broker::declare_or_check(conn, &names).await.is_err() {
                            connection = None;
                        }
                    }
                }
                if let Some(conn) = &connection {
                    if let Err(e) = self.poll(conn, &names).await {
                        warn!(error = %e, "queue depth poll failed");
                        connection = None;
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            if let Some(conn) = connection {
                let _ = conn.close(200, "done".into()).await;
            }
        });
    }

    async fn poll(
        &self,
        connection: &lapin::Connection,
        names: &Names,
    ) -> Result<(), lapin::Error> {
        for line in crate::ops::queue_lines(connection, names).await? {
            if !line.missing {
                self.set(&line.queue, line.ready, line.consumers);
            }
        }
        Ok(())
    }
}
