//! RabbitMQ: the topology DESIGN.md names (declared idempotently by every process at
//! start), connecting, publishing with a publisher confirm, and consuming with coalesced
//! acks ([`acks`]).

pub mod acks;

use std::time::{Duration, Instant};

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;

pub use acks::Acks;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// Header carrying why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-ringpush-error";

/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Deliveries of one ring before RabbitMQ dead-letters it: a backstop against a message
/// that kills the worker every time.
pub const DELIVERY_LIMIT: i64 = 20;
/// The retry tiers: a ring's n-th retry waits in tier min(n, last) (a classic queue without
/// consumers, one TTL each) before it is dead-lettered back to the rings exchange.
pub const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// The broker failed or refused.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the publish to {0}")]
    NotConfirmed(String),
    #[error("RabbitMQ did not confirm the publish to {0} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout(String),
    #[error("the broker ended the consumer of {0}")]
    ConsumerEnded(String),
}

/// The names of every exchange and queue, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
    /// Topic exchange gateways publish to, and the quorum work queue bound to it.
    pub rings: String,
    /// The retry tiers, one per delay of [`RETRY_DELAYS`]: `<prefix>.rings.retry.<n>s`.
    pub retry: Vec<String>,
    pub dead: String,
    pub feedback: String,
    pub purge: String,
    /// Feedback events and purge requests that cannot be read, with the reason.
    pub feedback_dead: String,
    pub purge_dead: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            rings: format!("{prefix}.rings"),
            retry: RETRY_DELAYS
                .iter()
                .map(|d| format!("{prefix}.rings.retry.{}s", d.as_secs()))
                .collect(),
            dead: format!("{prefix}.rings.dead"),
            feedback: format!("{prefix}.feedback"),
            purge: format!("{prefix}.purge"),
            feedback_dead: format!("{prefix}.feedback.dead"),
            purge_dead: format!("{prefix}.purge.dead"),
        }
    }

    /// Every queue, in the order operators read them.
    pub fn queues(&self) -> Vec<&str> {
        let mut all = vec![self.rings.as_str()];
        all.extend(self.retry.iter().map(String::as_str));
        all.extend([
            self.dead.as_str(),
            self.feedback.as_str(),
            self.feedback_dead.as_str(),
            self.purge.as_str(),
            self.purge_dead.as_str(),
        ]);
        all
    }

    /// The retry tier for a ring's `retry`-th retry (1-based).
    pub fn retry_tier(&self, retry: u32) -> &str {
        let i = (retry.max(1) as usize - 1).min(self.retry.len() - 1);
        &self.retry[i]
    }

    /// The routing key of a ring from a gateway.
    pub fn ring_key(gateway_id: &str) -> String {
        format!("ring.{gateway_id}")
    }
}

/// Connects with a heartbeat, named so operators see which process holds the connection.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
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

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares the whole topology; identical arguments in every process (a mismatch would be
/// 406 PRECONDITION_FAILED).
pub async fn declare(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let quorum = || ("x-queue-type", string("quorum"));
    channel
        .exchange_declare(
            names.rings.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // Every queue of `names.queues()`, so `delete` removes exactly what this declares.
    for queue in names.queues() {
        let arguments = if queue == names.rings {
            table(&[
                quorum(),
                ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                ("x-dead-letter-exchange", string("")),
                ("x-dead-letter-routing-key", string(&names.dead)),
            ])
        } else if let Some(tier) = names.retry.iter().position(|r| r == queue) {
            // A classic queue without consumers: messages wait out the TTL, then return.
            table(&[
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(RETRY_DELAYS[tier].as_millis() as i64),
                ),
                ("x-dead-letter-exchange", string(&names.rings)),
                ("x-dead-letter-routing-key", string("ring.retry")),
            ])
        } else {
            table(&[quorum()])
        };
        channel
            .queue_declare(queue.into(), durable, arguments)
            .await?;
    }
    channel
        .queue_bind(
            names.rings.as_str().into(),
            names.rings.as_str().into(),
            "ring.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Deletes every queue and the exchange of a prefix (the demo's and tests' clean-up).
pub async fn delete(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    for queue in names.queues() {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(
            names.rings.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    Ok(())
}

/// A channel in confirm mode, for publishes that stand in for an ack.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes persistently and waits for the broker's confirm (bounded by a timeout).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let target = if exchange.is_empty() {
        routing_key
    } else {
        exchange
    };
    let confirm = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Err(_) => Err(BrokerError::ConfirmTimeout(target.to_owned())),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(_))) => Ok(()),
        Ok(Ok(_)) => Err(BrokerError::NotConfirmed(target.to_owned())),
    }
}

/// Publishes a ring as a gateway does: to the rings exchange, keyed by gateway, JSON,
/// persistent, confirmed.
pub async fn publish_ring(
    channel: &Channel,
    names: &Names,
    ring: &crate::ring::RingEvent,
) -> Result<(), BrokerError> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_timestamp(ring.pressed_at.unix_timestamp() as u64);
    publish_confirmed(
        channel,
        &names.rings,
        &Names::ring_key(&ring.gateway_id),
        &ring.to_json(),
        properties,
    )
    .await
}

/// Copies `properties` with one header added or replaced.
pub fn with_header(properties: &BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(ShortString::from(name), value);
    properties.clone().with_headers(headers)
}

/// Publishes a copy of `delivery` to `dead_queue` with the reason in `x-ringpush-error`,
/// confirmed. The caller acks the original only after this returns `Ok`.
pub async fn dead_letter(
    publisher: &Channel,
    dead_queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), BrokerError> {
    dead_letter_with(
        publisher,
        dead_queue,
        &delivery.data,
        &delivery.properties,
        reason,
    )
    .await
}

/// [`dead_letter`] for a body and properties of the caller's choosing.
pub async fn dead_letter_with(
    publisher: &Channel,
    dead_queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    reason: &str,
) -> Result<(), BrokerError> {
    let properties = with_header(
        properties,
        ERROR_HEADER,
        AMQPValue::LongString(LongString::from(reason)),
    );
    publish_confirmed(publisher, "", dead_queue, body, properties).await
}

/// The `x-ringpush-error` of a dead-lettered message, if any.
pub fn error_header(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(ERROR_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// How a consume loop stops and pauses.
#[derive(Clone)]
pub struct Control {
    /// Stop taking deliveries, finish what is in flight, then close.
    pub cancel: CancellationToken,
    /// How long the batches in flight may take after `cancel` before they are handed back.
    pub grace: Duration,
    /// While this holds `false` the consumer is cancelled (deliveries wait in the queue) and
    /// re-created when it turns `true` again.
    pub open: Option<watch::Receiver<bool>>,
}

impl Control {
    pub fn new(cancel: CancellationToken, grace: Duration) -> Self {
        Self {
            cancel,
            grace,
            open: None,
        }
    }
}

/// The consume loop every consumer shares: a channel with a bounded prefetch and manual
/// acks, coalesced by [`Acks`] (`acked` counts them as they are sent); each batch of the deliveries that are ready (at most `batch_size`) is handed to
/// `handle` on a tracked task, with a token that fires when the batch must be handed back
/// at once. On `cancel` it cancels the consumer, gives the batches in flight the grace
/// period, then aborts them (their handlers nack), and closes the channel. It returns an
/// error when the channel or connection fails (the caller reconnects).
pub async fn consume_batches<F, Fut>(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    batch_size: usize,
    control: Control,
    acked: Option<&AtomicU64>,
    handle: F,
) -> Result<(), BrokerError>
where
    F: Fn(Acks, Vec<Delivery>, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    tracing::info!(queue, prefetch, "consuming with coalesced acks");
    let acks = Acks::new();
    let consume = consume(&channel, queue, batch_size, &control, &acks, handle);
    let (result, ()) = tokio::join!(consume, acks.flush(acked));
    let _ = channel.close(200, "stopping".into()).await;
    result
}

/// The consuming half of [`consume_batches`]: closes `acks` when it is done.
async fn consume<F, Fut>(
    channel: &Channel,
    queue: &str,
    batch_size: usize,
    control: &Control,
    acks: &Acks,
    handle: F,
) -> Result<(), BrokerError>
where
    F: Fn(Acks, Vec<Delivery>, CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let mut open = control.open.clone();
    let result = 'session: loop {
        // Paused: no consumer, so rings wait in the queue where operators see them.
        if let Some(open) = open.as_mut() {
            tokio::select! {
                _ = control.cancel.cancelled() => break 'session Ok(()),
                ready = open.wait_for(|o| *o) => if ready.is_err() { break 'session Ok(()) },
            }
        }
        let mut consumer = match channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => break 'session Err(e.into()),
        };
        let stop = loop {
            let paused = async {
                match open.as_mut() {
                    Some(open) => {
                        let _ = open.wait_for(|o| !*o).await;
                    }
                    None => std::future::pending().await,
                }
            };
            let first = tokio::select! {
                _ = control.cancel.cancelled() => break Ok(true),
                _ = paused => break Ok(false),
                next = consumer.next() => next,
            };
            let first = match first {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => break Err(BrokerError::from(e)),
                None => break Err(BrokerError::ConsumerEnded(queue.to_owned())),
            };
            acks.received(&first);
            let mut batch = vec![first];
            while batch.len() < batch_size.max(1) {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => {
                        acks.received(&delivery);
                        batch.push(delivery);
                    }
                    _ => break,
                }
            }
            // A handler that panics must not strand its deliveries in flight.
            let ackers: Vec<(u64, Acker)> = batch
                .iter()
                .map(|d| (d.delivery_tag, d.acker.clone()))
                .collect();
            let work = std::panic::AssertUnwindSafe(handle(acks.clone(), batch, abort.clone()));
            let acks = acks.clone();
            tracker.spawn(async move {
                if work.catch_unwind().await.is_err() {
                    // Not at once: a message that fails every time would come straight back.
                    tokio::time::sleep(PANIC_HAND_BACK_DELAY).await;
                    let handed = acks.hand_back_in_flight(&ackers).await;
                    tracing::error!(
                        deliveries = handed,
                        "a batch handler panicked; its unsettled deliveries are handed back"
                    );
                }
            });
        };
        match stop {
            Err(e) => break 'session Err(e),
            Ok(stopping) => {
                // Cancel the consumer; what it still hands over goes back to the queue.
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                while let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
                {
                    acks.received(&delivery);
                    let _ = acks.nack(&delivery, requeue()).await;
                }
                if stopping {
                    tracing::info!(
                        queue,
                        "consumer cancelled; finishing the deliveries in flight"
                    );
                    break 'session Ok(());
                }
                tracing::warn!(queue, "consumption paused");
            }
        }
    };
    // An error means the channel is gone: acks cannot be sent, and the broker redelivers
    // what was in flight. Leave the handlers to finish on their own.
    if result.is_err() {
        acks.close();
        return result;
    }
    tracker.close();
    if tokio::time::timeout(control.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(queue, grace = ?control.grace, "grace period over; handing the rest back");
        abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    acks.close();
    Ok(())
}

/// How long the deliveries a panicking handler left unsettled wait before they are handed
/// back, so that one that fails every time loops slowly, with an error each time.
const PANIC_HAND_BACK_DELAY: Duration = Duration::from_secs(1);

/// Nack options that put a delivery back in its queue.
pub fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

/// A consuming process as the broker sees it: which queue, how many deliveries at once, how
/// it stops and pauses, and where it reports that it is connected.
pub struct Consumer<'a> {
    /// `worker`, `feedback`, `purge`: in the connection name and the logs.
    pub process: &'a str,
    pub amqp_url: &'a str,
    pub names: &'a Names,
    pub queue: &'a str,
    pub prefetch: u16,
    pub batch_size: usize,
    pub control: Control,
    /// True while a session consumes.
    pub connected: &'a AtomicBool,
    /// Counts sessions (1 + reconnects), when the process keeps that count.
    pub sessions: Option<&'a AtomicU64>,
    /// Counts deliveries acked (sent to the broker, not just settled).
    pub acked: Option<&'a AtomicU64>,
}

impl Consumer<'_> {
    /// Consumes until `control.cancel`, reconnecting when the connection is lost. Each session
    /// connects, opens a confirm-mode channel for the handlers' publishes, declares the
    /// topology and consumes; `handle` gets that channel and the session's [`Acks`] with each
    /// batch.
    pub async fn run<F, Fut>(&self, handle: F) -> anyhow::Result<()>
    where
        F: Fn(Channel, Acks, Vec<Delivery>, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = format!("ringpush {} {}", self.process, self.names.prefix);
        serve(self.process, &self.control.cancel, || {
            self.session(&name, &handle)
        })
        .await
    }

    async fn session<F, Fut>(&self, name: &str, handle: &F) -> Result<(), BrokerError>
    where
        F: Fn(Channel, Acks, Vec<Delivery>, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Some(sessions) = self.sessions {
            sessions.fetch_add(1, Ordering::Relaxed);
        }
        let connection = connect(self.amqp_url, name).await?;
        let publisher = confirm_channel(&connection).await?;
        declare(&publisher, self.names).await?;
        self.connected.store(true, Ordering::Relaxed);
        let result = consume_batches(
            &connection,
            self.queue,
            self.prefetch,
            self.batch_size,
            self.control.clone(),
            self.acked,
            |acks, batch, abort| handle(publisher.clone(), acks, batch, abort),
        )
        .await;
        self.connected.store(false, Ordering::Relaxed);
        let _ = connection
            .close(200, format!("{} stopping", self.process).as_str().into())
            .await;
        result
    }
}

/// Runs `session` (connect, declare, consume) until it ends because `cancel` fired;
/// when the broker connection is lost it reconnects with jittered exponential backoff.
pub async fn serve<S, Fut>(
    what: &str,
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
                tracing::error!(process = what, error = %e, retry_in = ?wait, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
