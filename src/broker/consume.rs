//! Consuming: the loop every consumer shares ([`consume_batches`]: bounded prefetch, batches
//! of ready deliveries on tracked tasks, coalesced [`Acks`], pause and graceful stop), and a
//! consuming process's sessions ([`Consumer`]), reconnected by [`serve`](super::serve). A
//! session's deliveries pass its [`Limit`] before its handler sees them: a body over the
//! bound is dead-lettered unread.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    connect, dead_letter_with, declare_or_check, serve, Acks, BrokerError, Endpoint, Names,
    Progress, Publisher, Topology,
};

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
/// period, then aborts them (their handlers hand them back), and closes the channel. It returns an
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
    consume_reporting(
        connection,
        queue,
        prefetch,
        batch_size,
        control,
        acked,
        &|| {},
        handle,
    )
    .await
}

/// [`consume_batches`], calling `consuming` each time its consumer is on the queue.
#[allow(clippy::too_many_arguments)]
async fn consume_reporting<F, Fut>(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    batch_size: usize,
    control: Control,
    acked: Option<&AtomicU64>,
    consuming: &(dyn Fn() + Sync),
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
    // Said once the consumer is on the queue (a process paused at start is not consuming
    // yet), once a session; `pausing` and `resuming` say the rest.
    let announced = AtomicBool::new(false);
    let announce = || {
        if !announced.swap(true, Ordering::Relaxed) {
            tracing::info!(queue, prefetch, "consuming with coalesced acks");
        }
        consuming();
    };
    let acks = Acks::new();
    let consume = consume(
        &channel, queue, batch_size, &control, &acks, &announce, handle,
    );
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
    consuming: &(dyn Fn() + Sync),
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
        consuming();
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
    // what was in flight — perhaps to this process's next session. Before that session
    // consumes, the handlers in flight stop (no new push starts; the answers in flight are
    // awaited briefly) and settle what they did — a worker records in its ledger which
    // tokens took a ring — so a redelivery is not pushed again to the phones that have it.
    if result.is_err() {
        acks.close();
        abort.cancel();
        tracker.close();
        if tokio::time::timeout(ABORT_WAIT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                queue,
                "handlers still busy after the session ended; reconnecting anyway"
            );
        }
        return result;
    }
    tracker.close();
    if tokio::time::timeout(control.grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(queue, grace = %crate::human::Human(control.grace), "grace period over; handing the rest back");
        abort.cancel();
        let _ = tokio::time::timeout(ABORT_WAIT, tracker.wait()).await;
    }
    acks.close();
    Ok(())
}

/// How long handlers get to hand back or settle their deliveries once aborted.
const ABORT_WAIT: Duration = Duration::from_secs(5);

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

/// Says once per process that its identity may not declare the topology and found it there
/// (a role's least-privilege identity): after that, each session checks it quietly.
fn checked_once(process: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::info!(
            process,
            "this broker identity may not declare the topology; it is declared (checked by passive declares)"
        );
    }
}

/// `RINGPUSH_MAX_MESSAGE_BYTES` by default: 64 KiB, a hundred times a ring event's size.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 10;

/// Bounded input: the largest message body a consumer reads. A delivery over it is
/// dead-lettered before anything parses it — a copy cut to `max_bytes`, with the reason in
/// `x-ringpush-error` — and acked, so it is neither read whole by a parser nor requeued in a
/// loop. (The body is in memory by then: the broker's own `max_message_size` is what keeps a
/// larger one from reaching the process at all; docs/operators.md.)
#[derive(Clone)]
pub struct Limit {
    /// `RINGPUSH_MAX_MESSAGE_BYTES`.
    pub max_bytes: usize,
    /// A routing key only ringpush's own processes publish with, and the larger bound its
    /// messages may have: the workers' retry envelopes come back from the retry tiers with
    /// `ring.retry`, which no gateway identity may publish.
    pub own: Option<(String, usize)>,
    /// Where a message over its bound goes.
    pub dead_queue: String,
    /// Called for each message dead-lettered here (the process's counters).
    pub counted: Arc<dyn Fn() + Send + Sync>,
}

impl Limit {
    /// `max_bytes` for every message, over it to `dead_queue`.
    pub fn new(max_bytes: usize, dead_queue: &str) -> Self {
        Self {
            max_bytes,
            own: None,
            dead_queue: dead_queue.to_owned(),
            counted: Arc::new(|| {}),
        }
    }

    /// The bound of one delivery.
    fn bound(&self, delivery: &Delivery) -> usize {
        match &self.own {
            Some((key, bound)) if delivery.routing_key.as_str() == key => *bound,
            _ => self.max_bytes,
        }
    }

    /// The deliveries within their bound, and those over it.
    fn split(&self, batch: Vec<Delivery>) -> (Vec<Delivery>, Vec<Delivery>) {
        batch
            .into_iter()
            .partition(|d| d.data.len() <= self.bound(d))
    }

    /// Dead-letters deliveries over their bound: a copy cut to `max_bytes` with the reason,
    /// confirmed, then the ack (the body is freed first). One the broker does not take is
    /// handed back (counted towards the queue's delivery limit).
    async fn dead_letter(self, publisher: Publisher, acks: Acks, over: Vec<Delivery>) {
        for mut delivery in over {
            let bound = self.bound(&delivery);
            let body = std::mem::take(&mut delivery.data);
            let bytes = body.len();
            let cut = body[..self.max_bytes.min(bytes)].to_vec();
            drop(body);
            let reason = if bound == self.max_bytes {
                format!(
                    "the message body of {bytes} bytes is over RINGPUSH_MAX_MESSAGE_BYTES ({bound}); dead-lettered unread, cut to its first {} bytes",
                    cut.len()
                )
            } else {
                format!(
                    "the message body of {bytes} bytes is over the {bound} bytes a message with this routing key may have; dead-lettered unread, cut to its first {} bytes",
                    cut.len()
                )
            };
            let routing_key = crate::wire::logged(delivery.routing_key.as_str());
            let published = dead_letter_with(
                &publisher,
                &self.dead_queue,
                &cut,
                &delivery.properties,
                &reason,
            )
            .await;
            match published {
                Ok(()) => {
                    tracing::warn!(
                        queue = %self.dead_queue,
                        routing_key,
                        bytes,
                        max_bytes = bound,
                        "message too large: dead-lettered unread"
                    );
                    (self.counted)();
                    acks.ack(&delivery);
                }
                Err(e) => {
                    tracing::error!(error = %e, routing_key, bytes, "cannot dead-letter a message too large; handing it back");
                    let _ = acks.nack(&delivery, requeue()).await;
                }
            }
        }
    }
}

/// A consuming process as the broker sees it: which queue, how many deliveries at once, how
/// it stops and pauses, and where it reports that it is connected.
pub struct Consumer<'a> {
    /// `worker`, `feedback`, `purge`: in the connection name and the logs.
    pub process: &'a str,
    pub amqp_url: &'a Endpoint,
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
    /// The largest body the handler is given; larger ones are dead-lettered unread.
    pub limit: Limit,
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
        serve(
            self.process,
            self.amqp_url.url(),
            &self.control.cancel,
            |progress| self.session(&name, &handle, progress),
        )
        .await
    }

    async fn session<F, Fut>(
        &self,
        name: &str,
        handle: &F,
        progress: Arc<Progress>,
    ) -> Result<(), BrokerError>
    where
        F: Fn(Publisher, Acks, Vec<Delivery>, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Some(sessions) = self.sessions {
            sessions.fetch_add(1, Ordering::Relaxed);
        }
        let connection = connect(self.amqp_url, name).await?;
        let publisher = Publisher::open(&connection, self.names).await?;
        if declare_or_check(&connection, self.names).await? == Topology::Checked {
            checked_once(self.process);
        }
        self.connected.store(true, Ordering::Relaxed);
        // The reconnect rule goes by whether the session's consumer got on the queue.
        let consuming = || progress.consuming();
        let result = consume_reporting(
            &connection,
            self.queue,
            self.prefetch,
            self.batch_size,
            self.control.clone(),
            self.acked,
            &consuming,
            |acks, batch, abort| {
                // Bounded input, before any handler parses a body.
                let (batch, over) = self.limit.split(batch);
                let over = (!over.is_empty()).then(|| {
                    self.limit
                        .clone()
                        .dead_letter(publisher.clone(), acks.clone(), over)
                });
                let handled =
                    (!batch.is_empty()).then(|| handle(publisher.clone(), acks, batch, abort));
                async move {
                    if let Some(over) = over {
                        over.await;
                    }
                    if let Some(handled) = handled {
                        handled.await;
                    }
                }
            },
        )
        .await;
        self.connected.store(false, Ordering::Relaxed);
        let _ = connection
            .close(200, format!("{} stopping", self.process).as_str().into())
            .await;
        result
    }
}
