//! Coalesced acks for one consuming channel.
//!
//! Acking every delivery on its own costs one frame per message on both sides of the wire,
//! and RabbitMQ spends more on an ack than on the delivery. A handler here only *settles* a
//! delivery ([`Acks::ack`]); one flusher per channel acks, with a single `multiple` ack, the
//! longest run of settled deliveries starting at the oldest one outstanding. A `multiple`
//! ack covers every unacked tag up to its own, so it is only ever sent for a run with no
//! delivery still in flight: a ring that is still being pushed is never acked by accident.
//!
//! A slow delivery (a token whose APNs request times out) must not hold back the acks of
//! every delivery behind it, or the prefetch window fills and consumption stalls: deliveries
//! settled more than [`STRAGGLER`] ago behind one still in flight are acked one by one.
//! Nacks (hand-backs) are sent at once, one by one. When the session ends the flusher sends
//! what is settled and stops; what is still in flight is handed back when the channel
//! closes, as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Acker;
use tokio::sync::Notify;

/// How long a settled delivery waits behind one still in flight before it is acked alone.
pub(crate) const STRAGGLER: Duration = Duration::from_millis(50);

/// The coalescing acker of one consuming channel. Cheap to clone.
#[derive(Clone, Default)]
pub struct Acks {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    ledger: Mutex<Ledger<Acker>>,
    wake: Notify,
    /// Ack frames sent (each covering one or more deliveries).
    frames: AtomicU64,
}

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acks").finish_non_exhaustive()
    }
}

impl Acks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a delivery as outstanding; call in the order the channel delivered them.
    pub fn received(&self, delivery: &Delivery) {
        self.inner
            .ledger
            .lock()
            .unwrap()
            .received(delivery.delivery_tag);
    }

    /// Settles a delivery for acking: the flusher acks it (usually with others) shortly.
    pub fn ack(&self, delivery: &Delivery) {
        let known = self.inner.ledger.lock().unwrap().settle(
            delivery.delivery_tag,
            delivery.acker.clone(),
            Instant::now(),
        );
        if known {
            self.inner.wake.notify_one();
        } else {
            // Acked already (a second call after a `multiple` ack covered it) or never
            // recorded: acking again would name a tag the broker no longer knows, which closes
            // the channel. Every delivery comes through `consume_batches`, which records it.
            debug_assert!(false, "ack of an unrecorded delivery");
            tracing::warn!(
                tag = delivery.delivery_tag,
                "ack of a delivery already acked or never recorded; ignored"
            );
        }
    }

    /// Hands a delivery back to its queue, now.
    pub async fn nack(
        &self,
        delivery: &Delivery,
        options: BasicNackOptions,
    ) -> lapin::Result<bool> {
        let sent = delivery.acker.nack(options).await;
        // Only once the nack is on its way may a `multiple` ack reach past it.
        self.inner
            .ledger
            .lock()
            .unwrap()
            .done(delivery.delivery_tag);
        self.inner.wake.notify_one();
        sent
    }

    /// Hands back (nack with requeue), now, each of `deliveries` still in flight: what a
    /// handler that panicked left unsettled. Left alone, those deliveries would hold their
    /// prefetch slots and every `multiple` ack behind them until the channel closed; handed
    /// back, they come again (on the rings queue a message that panics every time meets the
    /// delivery limit; the feedback and purge queues have none). A delivery whose acker was
    /// already used is skipped by lapin (clones of an `Acker` share its single use), so no
    /// second frame goes out. Returns how many were handed back.
    pub(crate) async fn hand_back_in_flight(&self, deliveries: &[(u64, Acker)]) -> usize {
        let mut handed = 0;
        for (tag, acker) in deliveries {
            let in_flight = matches!(
                self.inner.ledger.lock().unwrap().find(*tag),
                Some(Mark::InFlight)
            );
            if !in_flight {
                continue;
            }
            let options = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            match acker.nack(options).await {
                Ok(true) => handed += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "nack failed; the broker will redeliver"),
            }
            self.inner.ledger.lock().unwrap().done(*tag);
            self.inner.wake.notify_one();
        }
        handed
    }

    /// Ack frames sent so far.
    pub fn frames(&self) -> u64 {
        self.inner.frames.load(Ordering::Relaxed)
    }

    /// Sends acks as deliveries settle, until [`Acks::close`]; then sends what is settled
    /// and returns. `acked` counts the deliveries acked.
    pub(crate) async fn flush(&self, acked: Option<&AtomicU64>) {
        loop {
            let closing = {
                let ledger = self.inner.ledger.lock().unwrap();
                ledger.closed
            };
            if !closing {
                // The straggler timer only runs while something settled waits behind a
                // delivery in flight; otherwise only a settle, a nack or `close` wakes us.
                let waiting = self.inner.ledger.lock().unwrap().settled_waiting();
                let straggler = async {
                    match waiting {
                        true => tokio::time::sleep(STRAGGLER).await,
                        false => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = self.inner.wake.notified() => {}
                    _ = straggler => {}
                }
            }
            let (run, stragglers) = {
                let mut ledger = self.inner.ledger.lock().unwrap();
                let straggler_age = if ledger.closed {
                    Duration::ZERO
                } else {
                    STRAGGLER
                };
                let run = ledger.take_run();
                let stragglers = ledger.take_stragglers(Instant::now(), straggler_age);
                (run, stragglers)
            };
            if let Some((acker, n)) = run {
                self.send(&acker, true, n, acked).await;
            }
            for acker in stragglers {
                self.send(&acker, false, 1, acked).await;
            }
            if closing {
                return;
            }
        }
    }

    /// Stops the flusher after one last pass.
    pub fn close(&self) {
        self.inner.ledger.lock().unwrap().closed = true;
        self.inner.wake.notify_one();
    }

    async fn send(&self, acker: &Acker, multiple: bool, n: usize, acked: Option<&AtomicU64>) {
        self.inner.frames.fetch_add(1, Ordering::Relaxed);
        match acker.ack(BasicAckOptions { multiple }).await {
            Ok(true) => {
                if let Some(acked) = acked {
                    acked.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            // The channel is gone: the broker redelivers what was not acked.
            Ok(false) => tracing::warn!(deliveries = n, "channel closed before the ack"),
            Err(e) => {
                tracing::error!(error = %e, deliveries = n, "ack failed; the broker will redeliver")
            }
        }
    }
}

/// Where each outstanding delivery of a channel stands, oldest first.
#[derive(Debug)]
struct Ledger<A> {
    entries: VecDeque<(u64, Mark<A>)>,
    closed: bool,
}

impl<A> Default for Ledger<A> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            closed: false,
        }
    }
}

#[derive(Debug)]
enum Mark<A> {
    /// In a handler's hands.
    InFlight,
    /// To be acked.
    Settled(A, Instant),
    /// Acked alone or nacked: nothing more to send, but a `multiple` ack may reach past it.
    Done,
}

impl<A> Ledger<A> {
    fn received(&mut self, tag: u64) {
        debug_assert!(self.entries.back().is_none_or(|(t, _)| *t < tag));
        self.entries.push_back((tag, Mark::InFlight));
    }

    fn find(&mut self, tag: u64) -> Option<&mut Mark<A>> {
        let i = self.entries.binary_search_by_key(&tag, |(t, _)| *t).ok()?;
        Some(&mut self.entries[i].1)
    }

    /// Marks a delivery settled; false if it was never recorded.
    fn settle(&mut self, tag: u64, acker: A, at: Instant) -> bool {
        match self.find(tag) {
            Some(mark @ Mark::InFlight) => {
                *mark = Mark::Settled(acker, at);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    fn done(&mut self, tag: u64) {
        if let Some(mark) = self.find(tag) {
            *mark = Mark::Done;
        }
    }

    /// Whether a settled delivery waits (behind one in flight) to be acked.
    fn settled_waiting(&self) -> bool {
        self.entries
            .iter()
            .any(|(_, mark)| matches!(mark, Mark::Settled(..)))
    }

    /// Takes the run of settled (or done) deliveries at the front: the acker of the last
    /// settled one, for a `multiple` ack, and how many deliveries that ack settles.
    fn take_run(&mut self) -> Option<(A, usize)> {
        let mut last = None;
        let mut n = 0;
        while let Some((_, mark)) = self.entries.front() {
            if matches!(mark, Mark::InFlight) {
                break;
            }
            if let Some((_, Mark::Settled(acker, _))) = self.entries.pop_front() {
                last = Some(acker);
                n += 1;
            }
        }
        last.map(|acker| (acker, n))
    }

    /// Takes the deliveries settled at least `age` ago that wait behind one in flight, to be
    /// acked one by one.
    fn take_stragglers(&mut self, now: Instant, age: Duration) -> Vec<A> {
        let mut out = Vec::new();
        for (_, mark) in self.entries.iter_mut() {
            if matches!(mark, Mark::Settled(_, at) if now.duration_since(*at) >= age) {
                if let Mark::Settled(acker, _) = std::mem::replace(mark, Mark::Done) {
                    out.push(acker);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(tags: std::ops::RangeInclusive<u64>) -> Ledger<u64> {
        let mut l = Ledger::default();
        for t in tags {
            l.received(t);
        }
        l
    }

    #[test]
    fn a_multiple_ack_covers_only_the_settled_run_at_the_front() {
        let now = Instant::now();
        let mut l = ledger(1..=5);
        for t in [2, 3, 5] {
            assert!(l.settle(t, t, now));
        }
        assert_eq!(l.take_run(), None, "1 is in flight: nothing may be acked");
        l.settle(1, 1, now);
        assert_eq!(l.take_run(), Some((3, 3)), "one ack of 3 covers 1, 2, 3");
        assert_eq!(l.take_run(), None, "4 is in flight; 5 waits behind it");
        l.settle(4, 4, now);
        assert_eq!(l.take_run(), Some((5, 2)));
        assert!(l.entries.is_empty());
        assert!(!l.settle(9, 9, now), "an unknown tag is reported");
    }

    #[test]
    fn stragglers_are_acked_alone_and_never_again() {
        let t0 = Instant::now();
        let mut l = ledger(1..=4);
        l.settle(2, 2, t0);
        l.settle(3, 3, t0 + STRAGGLER);
        let later = t0 + STRAGGLER;
        assert_eq!(
            l.take_stragglers(later, STRAGGLER),
            vec![2],
            "only 2 is old enough"
        );
        assert_eq!(l.take_stragglers(later, Duration::ZERO), vec![3]);
        l.settle(1, 1, later);
        // 2 and 3 are acked already: the run's ack must name 1, the last one not yet acked.
        assert_eq!(l.take_run(), Some((1, 1)));
        l.settle(4, 4, later);
        assert_eq!(l.take_run(), Some((4, 1)));
    }

    #[test]
    fn a_nacked_delivery_does_not_block_the_run_and_is_not_counted() {
        let now = Instant::now();
        let mut l = ledger(1..=3);
        l.done(1);
        l.settle(2, 2, now);
        assert_eq!(l.take_run(), Some((2, 1)));
        l.done(3);
        assert_eq!(l.take_run(), None, "a run of nacks alone needs no ack");
        assert!(l.entries.is_empty());
    }
}
