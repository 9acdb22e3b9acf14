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

/// A confirm-mode channel for publishes that stand in for an ack, with the connection's
/// negotiated `frame_max`: what [`publish_checked`] measures a message against before it
/// goes out.
#[derive(Clone)]
pub struct Publisher {
    pub channel: Channel,
    pub frame_max: u32,
}

impl std::ops::Deref for Publisher {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.channel
    }
}

/// Largest message body ringpush publishes. RabbitMQ refuses bodies over its
/// `max_message_size` (128 MiB in 3.x, 16 MiB from 4.0) by closing the channel; staying far
/// below it keeps any broker version's default out of reach.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Bytes a content header frame adds around the properties: frame header (7), class id,
/// weight and body size (12) and the frame end (1).
const CONTENT_HEADER_OVERHEAD: usize = 20;

/// Encoded size of `properties` in a content header frame (AMQP 0-9-1 §4.2.6.1): the flags
/// word and each property present.
pub fn properties_size(properties: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let mut size = 2;
    size += short(properties.content_type());
    size += short(properties.content_encoding());
    size += properties.headers().as_ref().map_or(0, table_size);
    size += properties.delivery_mode().map_or(0, |_| 1);
    size += properties.priority().map_or(0, |_| 1);
    size += short(properties.correlation_id());
    size += short(properties.reply_to());
    size += short(properties.expiration());
    size += short(properties.message_id());
    size += properties.timestamp().map_or(0, |_| 8);
    size += short(properties.kind());
    size += short(properties.user_id());
    size += short(properties.app_id());
    size += short(properties.cluster_id());
    size
}

fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
    }
}

/// Whether a message fits the limits the broker enforces by closing the connection or the
/// channel: its content header in one frame of `frame_max`, its body under
/// [`MAX_BODY_BYTES`]. Says which limit it breaks.
pub fn check_fits(frame_max: u32, body: &[u8], properties: &BasicProperties) -> Result<(), String> {
    let header = properties_size(properties) + CONTENT_HEADER_OVERHEAD;
    if header > frame_max as usize {
        return Err(format!(
            "its properties need a {header}-byte content header, over the connection's frame_max of {frame_max} bytes"
        ));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(format!(
            "its body of {} bytes is over the {MAX_BODY_BYTES}-byte limit",
            body.len()
        ));
    }
    Ok(())
}

/// [`publish_confirmed`] after [`check_fits`]: a message that would break a limit is not
/// sent (the broker would close the connection, taking every delivery in flight with it);
/// the caller gets [`BrokerError::TooLarge`] and decides (split it, or dead-letter it).
pub async fn publish_checked(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let properties = properties.with_delivery_mode(2);
    if let Err(what) = check_fits(publisher.frame_max, body, &properties) {
        let target = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        return Err(BrokerError::TooLarge {
            target: target.to_owned(),
            what,
        });
    }
    publish_confirmed(&publisher.channel, exchange, routing_key, body, properties).await
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
    publisher: &Publisher,
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

/// Longest `x-ringpush-error`, in bytes: a reason is for a person to read, and it must never
/// be what makes a dead letter too large to publish.
pub const MAX_REASON_BYTES: usize = 1024;

/// [`dead_letter`] for a body and properties of the caller's choosing. The reason is cut to
/// [`MAX_REASON_BYTES`]; if the message's own headers leave no room for it in a frame, they
/// are dropped (the reason says so) rather than the dead letter being lost.
pub async fn dead_letter_with(
    publisher: &Publisher,
    dead_queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    reason: &str,
) -> Result<(), BrokerError> {
    let reason = truncate(reason, MAX_REASON_BYTES);
    let with_reason = |properties: &BasicProperties, reason: &str| {
        with_header(
            properties,
            ERROR_HEADER,
            AMQPValue::LongString(LongString::from(reason)),
        )
    };
    let mut dead = with_reason(properties, reason);
    if check_fits(
        publisher.frame_max,
        body,
        &dead.clone().with_delivery_mode(2),
    )
    .is_err()
    {
        let stripped = properties.clone().with_headers(FieldTable::default());
        let reason = format!("{reason} (the message's own headers were too large to keep)");
        dead = with_reason(&stripped, &reason);
    }
    publish_checked(publisher, "", dead_queue, body, dead).await
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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
    let dispatch = |batch: Vec<Delivery>| {
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
            dispatch(batch);
        };
        match stop {
            Err(e) => break 'session Err(e),
            Ok(stopping) => {
                // Cancel the consumer. What it still hands over is handled like any batch
                // (not nacked: a requeue would count towards the delivery limit, and a
                // worker that pauses often must not spend the rings' budget).
                let _ = channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await;
                let mut late = Vec::new();
                while let Ok(Some(Ok(delivery))) =
                    tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
                {
                    acks.received(&delivery);
                    late.push(delivery);
                }
                if !late.is_empty() {
                    dispatch(late);
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
        F: Fn(Publisher, Acks, Vec<Delivery>, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = format!("ringpush {} {}", self.process, self.names.prefix);
        serve(self.process, self.amqp_url, &self.control.cancel, || {
            self.session(&name, &handle)
        })
        .await
    }

    async fn session<F, Fut>(&self, name: &str, handle: &F) -> Result<(), BrokerError>
    where
        F: Fn(Publisher, Acks, Vec<Delivery>, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Some(sessions) = self.sessions {
            sessions.fetch_add(1, Ordering::Relaxed);
        }
        let connection = connect(self.amqp_url, name).await?;
        let publisher = Publisher {
            channel: confirm_channel(&connection).await?,
            frame_max: connection.configuration().frame_max(),
        };
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
    fn properties_are_measured_as_amqp_encodes_them() {
        assert_eq!(properties_size(&BasicProperties::default()), 2);
        let p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(1);
        assert_eq!(properties_size(&p), 2 + (1 + 16) + 1 + 8);
        let mut headers = FieldTable::default();
        headers.insert("x".into(), string("abc"));
        headers.insert("n".into(), AMQPValue::LongUInt(7));
        headers.insert(
            "a".into(),
            AMQPValue::FieldArray(vec![string("ab"), AMQPValue::Boolean(true)].into()),
        );
        // table length + ("x": 1+1, LongString 1+4+3) + ("n": 1+1, 1+4)
        //   + ("a": 1+1, array 1+4 + (1+4+2) + (1+1))
        let table = 4 + (2 + 8) + (2 + 5) + (2 + 5 + 7 + 2);
        assert_eq!(
            properties_size(&BasicProperties::default().with_headers(headers)),
            2 + table
        );
    }

    #[test]
    fn a_header_of_a_buildings_tokens_does_not_fit_a_default_frame() {
        let tokens: Vec<AMQPValue> = (0..2_499).map(|i| string(&format!("{i:064x}"))).collect();
        let p = with_header(
            &BasicProperties::default(),
            "x-ringpush-pending",
            AMQPValue::FieldArray(tokens.into()),
        );
        let e = check_fits(131_072, b"{}", &p).unwrap_err();
        assert!(
            e.contains("over the connection's frame_max of 131072"),
            "{e}"
        );
        assert!(check_fits(131_072, b"{}", &BasicProperties::default()).is_ok());
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(check_fits(131_072, &body, &BasicProperties::default()).is_err());
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

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(
            truncate(&"x".repeat(2000), MAX_REASON_BYTES).len(),
            MAX_REASON_BYTES
        );
    }
}
