//! Metrics and health for operators: Prometheus text at `/metrics` (names prefixed
//! `ringpush_`), `/healthz` (the process is alive: cheap, broker-independent) and `/readyz`
//! (200 when the process can do its work, 503 with the reason when not), on
//! `RINGPUSH_METRICS_ADDR`.
//!
//! Each process registers collectors that read its counters at scrape time, plus the
//! queue-depth gauges a [`QueueDepth`] poller refreshes by passive declares, so a dashboard
//! needs no broker plugin.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{self, Names};
use crate::{feedback, purge, worker};

/// A readiness check: `Ok` when the process can do its work.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A latency histogram in seconds: 0.5 ms to about 20 s in steps of 1.5×, fine enough to
/// tell a 10 ms p99 from a 15 ms one.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 1.5, 27))
}

/// Estimates a quantile from cumulative Prometheus buckets `(upper bound, count)` by
/// linear interpolation inside the bucket (as `histogram_quantile` does).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
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

/// A registry with the `ringpush` prefix.
pub fn registry() -> Registry {
    Registry::with_prefix("ringpush")
}

struct Http {
    registry: Registry,
    ready: ReadyCheck,
}

/// Binds `addr` (so a bad address fails at start) and serves until `cancel`. Returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: ReadyCheck,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Http { registry, ready }));
    tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(error = %e, "metrics server stopped");
        }
    });
    info!(addr = %bound, "metrics, /healthz and /readyz listening");
    Ok(bound)
}

async fn metrics(State(http): State<Arc<Http>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &http.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding failed: {e}\n"),
        ),
    }
}

async fn readyz(State(http): State<Arc<Http>>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), (http.ready)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: checks timed out\n".into(),
        ),
    }
}

/// Serves the registry with the queue-depth gauges added and kept fresh; returns the bound
/// address.
pub async fn observe(
    addr: SocketAddr,
    mut registry: Registry,
    amqp_url: &str,
    names: Names,
    poll_every: Duration,
    ready: ReadyCheck,
    cancel: &CancellationToken,
) -> std::io::Result<SocketAddr> {
    let depth = QueueDepth::default();
    depth.register(&mut registry);
    depth.spawn(amqp_url.to_owned(), names, poll_every, cancel.clone());
    serve(addr, registry, ready, cancel.clone()).await
}

/// A worker is ready while consuming, with APNs and the database answering.
pub fn worker_ready(counters: Arc<worker::Counters>, pool: deadpool_postgres::Pool) -> ReadyCheck {
    Arc::new(move || {
        let (counters, pool) = (counters.clone(), pool.clone());
        Box::pin(async move {
            counters.ready()?;
            crate::db::ping(&pool)
                .await
                .map_err(|e| format!("database: {e}"))
        })
    })
}

/// The feedback consumer is ready while consuming.
pub fn feedback_ready(counters: Arc<feedback::Counters>) -> ReadyCheck {
    Arc::new(move || {
        let connected = counters.broker_connected.load(Ordering::Relaxed);
        Box::pin(async move {
            connected
                .then_some(())
                .ok_or_else(|| "not connected to the broker".to_owned())
        })
    })
}

/// The purger is ready while consuming, with the database answering.
pub fn purge_ready(counters: Arc<purge::Counters>, pool: deadpool_postgres::Pool) -> ReadyCheck {
    Arc::new(move || {
        let (connected, pool) = (
            counters.broker_connected.load(Ordering::Relaxed),
            pool.clone(),
        );
        Box::pin(async move {
            if !connected {
                return Err("not connected to the broker".into());
            }
            crate::db::ping(&pool)
                .await
                .map_err(|e| format!("database: {e}"))
        })
    })
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One counter family with a single label.
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut family = e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The worker's counters, and its APNs client's connections, at scrape time.
#[derive(Debug)]
pub struct WorkerCollector {
    pub counters: Arc<worker::Counters>,
    pub apns: crate::apns::Apns,
}

impl Collector for WorkerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        use worker::Counters as C;
        let c = &self.counters;
        let get = C::get;
        counters(
            &mut e,
            "rings",
            "Rings by what became of them (consumed counts every delivery).",
            "outcome",
            &[
                ("consumed", get(&c.rings_consumed)),
                ("acked", get(&c.rings_acked)),
                ("delivered", get(&c.rings_delivered)),
                ("retried", get(&c.rings_retried)),
                ("dead_lettered", get(&c.rings_dead_lettered)),
                ("expired", get(&c.rings_expired)),
                ("unknown_gateway", get(&c.rings_unknown_gateway)),
                ("no_tokens", get(&c.rings_without_tokens)),
                ("requeued", get(&c.rings_requeued)),
                ("handed_back", get(&c.rings_handed_back)),
            ],
        )?;
        counters(
            &mut e,
            "notifications",
            "Notifications by outcome: accepted by APNs, rejected for good, or failed for now.",
            "outcome",
            &[
                ("accepted", get(&c.notifications_accepted)),
                ("rejected", get(&c.notifications_rejected)),
                ("failed", get(&c.notifications_failed)),
            ],
        )?;
        let by_reason: Vec<(String, u64)> = c
            .rejected_by_reason
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let by_reason: Vec<(&str, u64)> = by_reason.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        counters(
            &mut e,
            "notifications_rejected",
            "Rejections by APNs reason.",
            "reason",
            &by_reason,
        )?;
        counter(
            &mut e,
            "feedback_events_published",
            "Feedback events published for dead tokens.",
            get(&c.feedback_events),
        )?;
        counter(
            &mut e,
            "consumption_pauses",
            "Times consumption paused (APNs or database unreachable).",
            get(&c.pauses),
        )?;
        counter(
            &mut e,
            "probes_failed",
            "Probes of a paused dependency (the token lookup, an APNs connection) that failed.",
            get(&c.probes_failed),
        )?;
        counter(
            &mut e,
            "broker_sessions",
            "Broker connections opened (1 + reconnects).",
            get(&c.broker_sessions),
        )?;
        gauge(
            &mut e,
            "broker_connected",
            "1 while consuming from the broker.",
            c.broker_connected.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "paused",
            "1 while consumption is paused.",
            (c.paused_apns.load(Ordering::Relaxed) || c.paused_database.load(Ordering::Relaxed))
                as i64,
        )?;
        gauge(
            &mut e,
            "apns_connections",
            "Open HTTP/2 connections to APNs.",
            self.apns.connections_open(),
        )?;
        gauge(
            &mut e,
            "apns_streams_in_flight",
            "APNs requests awaiting their answer.",
            self.apns.in_flight(),
        )?;
        Ok(())
    }
}

/// Registers the worker's metrics: counters, the two latency histograms, queue depths.
pub fn register_worker(
    registry: &mut Registry,
    counters: &Arc<worker::Counters>,
    apns: &crate::apns::Apns,
) {
    registry.register(
        "apns_request_seconds",
        "APNs request latency, send to answer",
        counters.apns_request_seconds.clone(),
    );
    registry.register(
        "ring_to_accepted_seconds",
        "From the button press (pressed_at) to APNs accepting the notification",
        counters.ring_to_accepted_seconds.clone(),
    );
    registry.register_collector(Box::new(WorkerCollector {
        counters: counters.clone(),
        apns: apns.clone(),
    }));
}

/// The feedback consumer's counters at scrape time.
#[derive(Debug)]
pub struct FeedbackCollector(pub Arc<feedback::Counters>);

impl Collector for FeedbackCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.0;
        let get = feedback::Counters::get;
        counters(
            &mut e,
            "feedback_events",
            "Feedback events by what became of them.",
            "outcome",
            &[
                ("read", get(&c.events)),
                ("duplicate", get(&c.duplicates)),
                ("dead_lettered", get(&c.dead_lettered)),
                ("acked", get(&c.acked)),
            ],
        )?;
        counter(
            &mut e,
            "purge_requests_published",
            "Purge requests published.",
            get(&c.purge_requests),
        )
    }
}

/// The purger's counters at scrape time.
#[derive(Debug)]
pub struct PurgeCollector(pub Arc<purge::Counters>);

impl Collector for PurgeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let c = &self.0;
        let get = purge::Counters::get;
        counters(
            &mut e,
            "purge_requests",
            "Purge requests by what became of them.",
            "outcome",
            &[
                ("read", get(&c.requests)),
                ("dead_lettered", get(&c.dead_lettered)),
                ("acked", get(&c.acked)),
            ],
        )?;
        counters(
            &mut e,
            "tokens",
            "Tokens the purger deleted, or kept (registered again since, or already gone).",
            "outcome",
            &[("purged", get(&c.purged)), ("kept", get(&c.kept))],
        )
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
    pub fn spawn(self, amqp_url: String, names: Names, every: Duration, cancel: CancellationToken) {
        tokio::spawn(async move {
            let mut connection: Option<lapin::Connection> = None;
            loop {
                if connection.is_none() {
                    connection = broker::connect(&amqp_url, "ringpush queue depth")
                        .await
                        .ok();
                    // The process declares the topology too, but maybe not yet: a passive
                    // declare of a queue not there yet closes its channel (and lapin logs
                    // that as an error). Declaring is idempotent, with the same arguments.
                    if let Some(conn) = &connection {
                        let declared = match conn.create_channel().await {
                            Ok(channel) => {
                                let done = broker::declare(&channel, &names).await.is_ok();
                                let _ = channel.close(200, "declared".into()).await;
                                done
                            }
                            Err(_) => false,
                        };
                        if !declared {
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
