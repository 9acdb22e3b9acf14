//! A ring's life (issue 26, see [`LifeCost`]): the end-to-end drain again, by a fresh worker
//! process each time, ring-only and with every ring ended a second after its press, in turns
//! (ring-only, with ends, with ends, ring-only, …: a drift of the host weighs on both alike);
//! the ratio of the medians of notifications per second, the rings' and the follow-ups'
//! together, and PostgreSQL's CPU per ring.
//!
//! The ends are published as gateways would publish them: each `answered` (by the gateway's
//! owner) [`END_AFTER`] after its ring's press, on the ring's gateway's routing key, naming
//! the ring's event id — by a publisher of their own that keeps to that schedule while the
//! rings are still being published. Then the worker starts on the queue as it stands (the
//! rings and their ends interleaved, as a second of traffic leaves them) and drains it.

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;

use crate::broker::{self, Names};
use crate::token::random_hex;
use crate::wire::ring::{EndEvent, EndReason, RingEvent};

use super::ledger::{measure_drain, median_of};
use super::measure::publish_all;
use super::processes::WorkerOf;
use super::report::{Drain, LifeCost};

/// How long after its press each ring's end is published.
pub(super) const END_AFTER: Duration = Duration::from_secs(1);

/// Drains of each kind, in turns: ring-only, with ends, with ends, ring-only, ….
const LIFE_ROUNDS: usize = 3;

/// The target: with ends / ring-only, notifications per second.
const TARGET: f64 = 0.8;

/// Publishes `rings` rings (with their ends, in turns) and drains them with a fresh worker,
/// [`LIFE_ROUNDS`] times each way; `e2e` is the run's end-to-end notifications/s.
#[allow(clippy::too_many_arguments)]
pub(super) async fn life_cost(
    worker_of: &WorkerOf<'_>,
    pool: &deadpool_postgres::Pool,
    channel: &lapin::Channel,
    names: &Names,
    rings: usize,
    fanout: usize,
    ring: &impl Fn(usize) -> RingEvent,
    e2e: f64,
) -> anyhow::Result<LifeCost> {
    let mut cost = LifeCost {
        rings,
        end_after_s: END_AFTER.as_secs_f64(),
        ..LifeCost::default()
    };
    let (mut only, mut with) = (Vec::new(), Vec::new());
    for round in 0..LIFE_ROUNDS * 2 {
        // ring-only, with ends, with ends, ring-only, …
        let ends = matches!(round % 4, 1 | 2);
        let want = if ends {
            publish_with_ends(channel, names, rings, ring).await?;
            // Each phone that took a ring takes its follow-up.
            (rings * fanout * 2) as f64
        } else {
            publish_all(
                (0..rings).map(|i| {
                    let r = ring(i);
                    async move { broker::publish_ring(channel, names, &r).await }
                }),
                500,
            )
            .await?;
            (rings * fanout) as f64
        };
        let mut drain = measure_drain(worker_of, pool, rings, want, &[]).await?;
        drain.ends = ends;
        cost.drains.push(drain.clone());
        if ends {
            with.push(drain);
        } else {
            anyhow::ensure!(
                drain.followups_per_ring.unwrap_or(0.0) == 0.0,
                "follow-ups were sent in a ring-only drain"
            );
            only.push(drain);
        }
    }
    let notifications = |d: &Drain| d.notifications_per_s;
    cost.ring_only_notifications_per_s = median_of(&only, notifications);
    cost.with_ends_notifications_per_s = median_of(&with, notifications);
    cost.throughput_ratio = cost.with_ends_notifications_per_s / cost.ring_only_notifications_per_s;
    cost.target_met = cost.throughput_ratio >= TARGET;
    cost.ratio_to_e2e = cost.with_ends_notifications_per_s / e2e;
    let postgresql = |d: &Drain| d.postgresql_cpu_ms_per_ring;
    cost.postgresql_cpu_ms_per_ring_only = median_of(&only, postgresql);
    cost.postgresql_cpu_ms_per_ring_with_end = median_of(&with, postgresql);
    let backends = |d: &[Drain]| {
        let listed = d
            .iter()
            .all(|d| d.worker_backends_cpu_ms_per_ring.is_some());
        listed.then(|| median_of(d, |d| d.worker_backends_cpu_ms_per_ring.unwrap_or(0.0)))
    };
    cost.worker_backends_cpu_ms_per_ring_only = backends(&only);
    cost.worker_backends_cpu_ms_per_ring_with_end = backends(&with);
    let followups = with.iter().filter_map(|d| d.followups_per_ring);
    cost.followups_per_ring = followups.clone().reduce(f64::min);
    Ok(cost)
}

/// Publishes `rings` rings as fast as the broker confirms them (as the end-to-end part
/// does), and each ring's end [`END_AFTER`] after its press, by a publisher of their own
/// that keeps to that schedule; returns once every one is confirmed.
async fn publish_with_ends(
    channel: &lapin::Channel,
    names: &Names,
    rings: usize,
    ring: &impl Fn(usize) -> RingEvent,
) -> anyhow::Result<()> {
    let (due, mut scheduled) = mpsc::unbounded_channel::<(Instant, EndEvent)>();
    let publish_rings = async move {
        let published = publish_all(
            (0..rings).map(|i| {
                let r = ring(i);
                let end = EndEvent {
                    event_id: random_hex(16),
                    ring_id: r.event_id.clone(),
                    gateway_id: r.gateway_id.clone(),
                    reason: EndReason::Answered,
                    by_user: owner(&r.gateway_id),
                    at: Some(r.pressed_at + END_AFTER),
                };
                let _ = due.send((Instant::now() + END_AFTER, end));
                async move { broker::publish_ring(channel, names, &r).await }
            }),
            500,
        )
        .await;
        // `due` is dropped here: the ends' publisher stops after the last one.
        published
    };
    let publish_ends = async {
        // In the order of their presses, each when it is due.
        let ends = stream::poll_fn(|cx| scheduled.poll_recv(cx)).then(|(at, end)| async move {
            tokio::time::sleep_until(at.into()).await;
            end
        });
        let published: Vec<_> = ends
            .map(|end| async move { broker::publish_end(channel, names, &end).await })
            .buffer_unordered(500)
            .collect()
            .await;
        published.into_iter().collect::<Result<(), _>>()
    };
    let (rings, ends) = tokio::join!(publish_rings, publish_ends);
    rings?;
    ends?;
    Ok(())
}

/// The owner of a bench gateway (`bench-N` is owned by user N, who answers its rings).
fn owner(gateway: &str) -> Option<i64> {
    gateway.strip_prefix("bench-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_gateway_is_answered_by_its_owner() {
        assert_eq!(owner("bench-17"), Some(17));
        assert_eq!(owner("bench-building"), None);
        assert_eq!(owner("gw-1"), None);
    }
}
