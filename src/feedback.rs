//! `ringpush feedback`: from token rejections to purge requests.
//!
//! A worker that hears from APNs that a token is dead publishes a *feedback event*; the
//! feedback consumer drops repeats of the same token within a window and turns the rest into
//! *purge requests* for the purger. Both messages are v1 of the same JSON shape
//! ([`crate::wire::feedback`]).

use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::message::Delivery;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{self, Acks, Names};
use crate::token::{DeviceToken, Environment};
use crate::wire::feedback::Invalidation;

/// How the feedback consumer behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub names: Names,
    pub prefetch: u16,
    /// A token seen again within this window produces no second purge request.
    pub dedup_window: Duration,
    /// With the binary protocol: the legacy feedback service to poll.
    pub service: Option<Service>,
    /// Largest feedback event read (`RINGPUSH_MAX_MESSAGE_BYTES`); a larger one goes to the
    /// dead queue unread.
    pub max_message_bytes: usize,
}

impl Settings {
    /// The defaults `ringpush feedback` runs with (HTTP/2: no feedback service to poll).
    pub fn new(names: Names) -> Self {
        Self {
            names,
            prefetch: 100,
            dedup_window: Duration::from_secs(600),
            service: None,
            max_message_bytes: broker::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// The legacy feedback service and how often to read it.
#[derive(Debug, Clone)]
pub struct Service {
    pub address: crate::apns::binary::Address,
    /// TLS with the client certificate.
    pub tls: Arc<tokio_rustls::rustls::ClientConfig>,
    pub every: Duration,
}

/// Running counts of the feedback consumer.
/// What the feedback consumer counts: children of the families registered in
/// [`Counters::register`], incremented directly.
#[derive(Debug)]
pub struct Counters {
    events_by_outcome: crate::metrics::Family1,
    /// Feedback events read.
    pub events: Counter,
    /// Events dropped as repeats of a token already sent to the purger within the window.
    pub duplicates: Counter,
    /// Purge requests published (confirmed).
    pub purge_requests: Counter,
    pub dead_lettered: Counter,
    /// Events acked (after their outcome was durable).
    pub acked: Counter,
    /// Consuming from the broker right now.
    pub broker_connected: std::sync::atomic::AtomicBool,
    /// Reads of the legacy feedback service, and the tokens it listed.
    pub service_polls: Counter,
    pub service_tokens: Counter,
}

impl Default for Counters {
    fn default() -> Self {
        let family = crate::metrics::Family1::default();
        let outcome = |o| crate::metrics::labelled(&family, "outcome", o);
        Self {
            events: outcome("read"),
            duplicates: outcome("duplicate"),
            dead_lettered: outcome("dead_lettered"),
            acked: outcome("acked"),
            events_by_outcome: family.clone(),
            purge_requests: Counter::default(),
            broker_connected: Default::default(),
            service_polls: Counter::default(),
            service_tokens: Counter::default(),
        }
    }
}

impl Counters {
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }
}

struct Context {
    settings: Settings,
    counters: Arc<Counters>,
    /// Tokens sent to the purger, and when: the de-duplication window.
    seen: Mutex<HashMap<DeviceToken, Instant>>,
}

/// A feedback consumer, assembled in one place: what `ringpush feedback`, the demo and the
/// tests run.
pub struct Process {
    pub settings: Settings,
    /// The broker (`RINGPUSH_AMQP_URL` and its TLS).
    pub amqp_url: broker::Endpoint,
    pub counters: Arc<Counters>,
}

impl Process {
    /// Serves its metrics and readiness; where it listens.
    pub async fn observe(
        &self,
        serve: &crate::metrics::Serve,
        cancel: &CancellationToken,
    ) -> anyhow::Result<std::net::SocketAddr> {
        let mut registry = crate::metrics::registry();
        self.counters.register(&mut registry);
        let ready = self.counters.ready_check();
        let names = self.settings.names.clone();
        serve
            .start(registry, &self.amqp_url, names, ready, cancel)
            .await
    }

    /// Runs it until `cancel` ([`run`]).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        run(self.settings, &self.amqp_url, self.counters, cancel).await
    }
}

/// `ringpush feedback`: consumes feedback events until `cancel`.
async fn run(
    settings: Settings,
    amqp_url: &broker::Endpoint,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Context {
        settings,
        counters,
        seen: Mutex::new(HashMap::new()),
    });
    if let Some(service) = ctx.settings.service.clone() {
        let (ctx, url, cancel) = (ctx.clone(), amqp_url.clone(), cancel.clone());
        tokio::spawn(async move { poll_service(&ctx, &service, &url, cancel).await });
    }
    let consumer = broker::Consumer {
        process: "feedback",
        amqp_url,
        names: &ctx.settings.names,
        queue: &ctx.settings.names.feedback,
        prefetch: ctx.settings.prefetch,
        batch_size: 100,
        control: broker::Control::new(cancel, Duration::from_secs(10)),
        connected: &ctx.counters.broker_connected,
        sessions: None,
        acked: Some(ctx.counters.acked.inner()),
        limit: {
            let counters = ctx.counters.clone();
            broker::Limit {
                counted: Arc::new(move || {
                    counters.events.inc();
                    counters.dead_lettered.inc();
                }),
                ..broker::Limit::new(
                    ctx.settings.max_message_bytes,
                    &ctx.settings.names.feedback_dead,
                )
            }
        },
    };
    consumer
        .run(|publisher, acks, batch, _abort| {
            let ctx = ctx.clone();
            async move { handle_batch(&ctx, &publisher, &acks, batch).await }
        })
        .await?;
    info!("feedback consumer stopped");
    Ok(())
}

/// Reads the legacy feedback service on an interval and publishes a feedback event per
/// tuple (reason `FeedbackService`, `invalid_since` the tuple's time — its whole second, so
/// a token registered later within that second counts as older, as Apple's seconds-based
/// rule has it) into the same path.
/// The service forgets what it listed once read, so tuples are published with confirms and
/// retried until the broker takes them.
async fn poll_service(
    ctx: &Context,
    service: &Service,
    amqp_url: &broker::Endpoint,
    cancel: CancellationToken,
) {
    let tls = tokio_rustls::TlsConnector::from(service.tls.clone());
    loop {
        match crate::apns::binary::feedback::read(&service.address, &tls, Duration::from_secs(30))
            .await
        {
            Ok(tuples) => {
                ctx.counters.service_polls.inc();
                let observed_at = OffsetDateTime::now_utc();
                let events: Vec<Invalidation> = tuples
                    .iter()
                    .filter_map(|t| {
                        Some(Invalidation {
                            token: DeviceToken::parse(&crate::token::hex(&t.token)).ok()?,
                            environment: Environment::Production,
                            topic: None,
                            reason: "FeedbackService".into(),
                            // Tuple times are whole seconds and Apple compares registration
                            // times at that precision: the end of the tuple's second — but
                            // never after we read it (the purger trusts no `invalid_since`
                            // later than `observed_at`; a phone registered after the read
                            // was not in the tuple).
                            invalid_since: (OffsetDateTime::from_unix_timestamp(i64::from(t.time))
                                .ok()?
                                + Duration::from_micros(999_999))
                            .min(observed_at),
                            observed_at,
                        })
                    })
                    .collect();
                if !events.is_empty() {
                    info!(
                        tokens = events.len(),
                        "the feedback service lists tokens of removed apps"
                    );
                }
                let mut failures = 0;
                while !events.is_empty() {
                    match publish_all(
                        amqp_url,
                        &ctx.settings.names,
                        &ctx.settings.names.feedback,
                        &events,
                    )
                    .await
                    {
                        Ok(()) => {
                            ctx.counters.service_tokens.inc_by(events.len() as u64);
                            break;
                        }
                        Err(e) => {
                            // The one jittered backoff every reconnect uses.
                            failures += 1;
                            let wait = crate::backoff::jittered(
                                Duration::from_millis(500),
                                Duration::from_secs(30),
                                failures,
                            );
                            let retry_in_ms = wait.as_millis() as u64;
                            error!(error = %e, retry_in_ms, "cannot publish feedback-service tokens; retrying");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(wait) => {}
                            }
                        }
                    }
                }
            }
            Err(e) => {
                warn!(service = %service.address, error = %e, "cannot read the feedback service")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(service.every) => {}
        }
    }
}

async fn publish_all(
    amqp_url: &broker::Endpoint,
    names: &Names,
    queue: &str,
    events: &[Invalidation],
) -> Result<(), broker::BrokerError> {
    let connection = broker::connect(amqp_url, "ringpush feedback service").await?;
    let result = async {
        let publisher = broker::Publisher::open(&connection, names).await?;
        for r in join_all(events.iter().map(|e| e.publish(&publisher, queue))).await {
            r?;
        }
        Ok(())
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    result
}

/// What to do with one feedback event.
enum Step {
    Purge(Invalidation),
    Duplicate,
    Dead(String),
}

async fn handle_batch(
    ctx: &Context,
    publisher: &broker::Publisher,
    acks: &Acks,
    batch: Vec<Delivery>,
) {
    let c = &ctx.counters;
    c.events.inc_by(batch.len() as u64);
    // Parsed before the dedup map is locked: nothing that reads a message runs under the
    // lock (a panic there would poison it for every later batch).
    let parsed: Vec<_> = batch.iter().map(|d| Invalidation::parse(&d.data)).collect();
    let steps: Vec<Step> = {
        let mut seen = ctx.seen.lock().unwrap();
        let window = ctx.settings.dedup_window;
        if seen.len() > 10_000 {
            seen.retain(|_, at| at.elapsed() < window);
        }
        parsed
            .into_iter()
            .map(|parsed| match parsed {
                Err(e) => Step::Dead(e.to_string()),
                Ok(event) => match seen.get(&event.token) {
                    Some(at) if at.elapsed() < window => Step::Duplicate,
                    _ => {
                        seen.insert(event.token.clone(), Instant::now());
                        Step::Purge(event)
                    }
                },
            })
            .collect()
    };
    join_all(batch.iter().zip(steps).map(|(delivery, step)| async move {
        let durable = match &step {
            Step::Duplicate => {
                c.duplicates.inc();
                Ok(())
            }
            Step::Dead(reason) => {
                warn!(
                    reason = crate::wire::logged(reason),
                    "malformed feedback event goes to the dead queue"
                );
                let r = broker::dead_letter(
                    publisher,
                    &ctx.settings.names.feedback_dead,
                    delivery,
                    reason,
                )
                .await;
                if r.is_ok() {
                    c.dead_lettered.inc();
                }
                r
            }
            Step::Purge(event) => {
                let r = event.publish(publisher, &ctx.settings.names.purge).await;
                match &r {
                    Ok(()) => {
                        c.purge_requests.inc();
                        let reason = crate::wire::logged(&event.reason);
                        info!(token = %event.token, reason, "purge requested");
                    }
                    // Not sent: forget it, so the redelivered event is not taken as a repeat.
                    Err(_) => {
                        ctx.seen.lock().unwrap().remove(&event.token);
                    }
                }
                r
            }
        };
        match durable {
            Ok(()) => acks.ack(delivery),
            Err(e) => {
                error!(error = %e, "cannot publish; handing the feedback event back");
                let _ = acks.nack(delivery, broker::requeue()).await;
            }
        }
    }))
    .await;
}

impl Counters {
    /// Registers the feedback consumer's metrics.
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "feedback_events",
            "Feedback events by what became of them",
            self.events_by_outcome.clone(),
        );
        registry.register(
            "purge_requests_published",
            "Purge requests published",
            self.purge_requests.clone(),
        );
    }

    /// `/readyz`: consuming.
    pub(crate) fn ready_check(self: &Arc<Self>) -> crate::metrics::ReadyCheck {
        let counters = self.clone();
        Arc::new(move || {
            let connected = counters
                .broker_connected
                .load(std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                connected
                    .then_some(())
                    .ok_or_else(|| "not connected to the broker".to_owned())
            })
        })
    }
}
