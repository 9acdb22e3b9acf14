//! Carrying out a [`Disposition`]: record in the ledger which tokens took the ring, publish
//! what stands in for the ack (feedback events, the retry envelopes, the dead letter, the
//! ring again), confirmed, then ack. Nothing here decides; a publish that fails is handed
//! back to `decide` (`NotDurable`, `TooLarge`). While the ledger cannot be written the ring
//! is held, unacked, and consumption pauses, as for a failed lookup.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;
use std::collections::BTreeMap;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use futures_util::future::join_all;

use super::decide::{decide, Disposition, Outcome, Step};
use super::pause::{pause, Paused};
use super::read::{header, Incoming};
use super::{Context, Counters, ATTEMPT_HEADER, HANDBACK_HEADER, PENDING_HEADER};
use crate::broker::{self, BrokerError, Names};
use crate::db::TokenHash;
use crate::token::DeviceToken;
use crate::wire::feedback::Invalidation;
use crate::wire::logged;

/// Settles a ring that was pushed: first the ledger entry of the tokens that took it
/// (`accepted`), then the disposition. A ring is acked only once its entry is written; while
/// it cannot be, the ring is held and consumption paused (the probe writes nothing to the
/// ledger until it works), unless the ring's TTL passes — a ring that old is never pushed
/// again, so the entry no longer matters — or the worker stops (the disposition then goes
/// out without it: its retry or hand-back names only the tokens not reached).
pub(super) async fn settle_recorded(
    ctx: &Arc<Context>,
    incoming: &Incoming,
    accepted: &[TokenHash],
    disposition: Disposition,
    abort: &CancellationToken,
) {
    if ctx.settings.ledger && !accepted.is_empty() {
        record(ctx, incoming, accepted, abort).await;
    }
    settle(ctx, incoming, disposition).await;
}

async fn record(
    ctx: &Arc<Context>,
    incoming: &Incoming,
    accepted: &[TokenHash],
    abort: &CancellationToken,
) {
    let (gateway, event) = (logged(incoming.gateway()), logged(incoming.event()));
    loop {
        let Err(e) = ctx.ledger.record(incoming.ledger_key(), accepted).await else {
            return;
        };
        let why = format!("the delivery ledger could not be written: {e}");
        if abort.is_cancelled() {
            warn!(gateway, event, error = %why, "stopping: the ring is settled without its ledger entry");
            return;
        }
        error!(gateway, event, error = %why, "holding the ring and pausing consumption");
        pause(&ctx.shared, Paused::Database, &why);
        let left = incoming.time_left(ctx.settings.ring_ttl);
        tokio::select! {
            _ = ctx.pause.opened() => {}
            _ = tokio::time::sleep(left + Duration::from_millis(1)) => {
                warn!(gateway, event, error = %why, "the ring's TTL passed while held: settled without its ledger entry (it is never pushed again)");
                return;
            }
            _ = abort.cancelled() => {
                warn!(gateway, event, error = %why, "stopping: the ring is settled without its ledger entry");
                return;
            }
        }
    }
}

/// Settles a ring that was read.
pub(super) async fn settle(ctx: &Context, incoming: &Incoming, disposition: Disposition) {
    let (gateway, event) = (incoming.gateway(), incoming.event());
    settle_delivery(
        ctx,
        &incoming.delivery,
        Some(incoming),
        gateway,
        event,
        disposition,
    )
    .await;
}

/// Carries out `disposition` for a delivery (`incoming` is `None` when it could not be read
/// as a ring).
pub(super) async fn settle_delivery(
    ctx: &Context,
    delivery: &Delivery,
    incoming: Option<&Incoming>,
    gateway: &str,
    event: &str,
    disposition: Disposition,
) {
    // Logged below, as every line here logs them: cut (they came in the message).
    let (gateway, event) = (logged(gateway), logged(event));
    let mut disposition = disposition;
    // At most three tries: a publish that fails turns into a hand-back (or, for its size, a
    // dead letter without the part that did not fit), and a failed hand-back into a nack.
    for _ in 0..3 {
        match carry_out(ctx, delivery, incoming, gateway, event, &disposition).await {
            Ok(()) => return,
            Err(e @ BrokerError::TooLarge { .. })
                if !matches!(
                    disposition,
                    Disposition::Dead { pending: None, .. } | Disposition::WrongGateway { .. }
                ) =>
            {
                disposition = decide(Step::TooLarge {
                    error: e.to_string(),
                });
            }
            Err(e) => {
                error!(error = %e, gateway, event, "cannot make the outcome durable; handing the ring back");
                if matches!(disposition, Disposition::HandBack { pending: None, .. }) {
                    break;
                }
                disposition = decide(Step::NotDurable {
                    error: e.to_string(),
                });
            }
        }
    }
    // Even the hand-back could not be published: the nack is left (it spends a delivery).
    requeue(ctx, delivery).await;
}

async fn carry_out(
    ctx: &Context,
    delivery: &Delivery,
    incoming: Option<&Incoming>,
    gateway: &str,
    event: &str,
    disposition: &Disposition,
) -> Result<(), BrokerError> {
    let c = &ctx.counters;
    match disposition {
        Disposition::Continue | Disposition::Hold { .. } => {
            // `push_holding` and `read` act on these; settling one is a bug: hand it back.
            error!(
                gateway,
                event,
                ?disposition,
                "nothing to settle; handing the ring back"
            );
            give_back(ctx, delivery, incoming, None).await?;
            return Ok(());
        }
        Disposition::Ack { outcome, feedback } => {
            report_invalid(ctx, feedback).await?;
            count_acked(ctx, incoming, gateway, event, *outcome);
        }
        Disposition::Retry {
            attempt,
            pending,
            feedback,
            not_before,
            ..
        } => {
            report_invalid(ctx, feedback).await?;
            let incoming = incoming.expect("only a read ring is retried");
            log_retry(gateway, event, disposition);
            retry(ctx, incoming, *attempt, pending, *not_before).await?;
            Counters::add(&c.rings_retried, 1);
        }
        Disposition::Dead {
            reason,
            pending,
            feedback,
        } => {
            report_invalid(ctx, feedback).await?;
            let bodies = match (incoming, pending) {
                (Some(incoming), Some((attempt, pending))) => {
                    envelopes(ctx, incoming, *attempt, pending)
                }
                _ => vec![delivery.data.clone()],
            };
            warn!(
                gateway,
                event,
                reason = logged(reason),
                "ring goes to the dead queue"
            );
            to_dead(ctx, delivery, &bodies, reason).await?;
        }
        Disposition::WrongGateway { reason } => {
            warn!(
                gateway,
                event,
                routing_key = logged(delivery.routing_key.as_str()),
                reason = logged(reason),
                "ring names another gateway than its routing key; to the dead queue"
            );
            to_dead(ctx, delivery, std::slice::from_ref(&delivery.data), reason).await?;
            Counters::add(&c.rings_wrong_gateway, 1);
        }
        Disposition::HandBack { pending, feedback } => {
            report_invalid(ctx, feedback).await?;
            let bodies = match (incoming, pending) {
                (Some(incoming), Some((attempt, pending))) => {
                    info!(
                        gateway,
                        event,
                        pending = pending.len(),
                        "handing back the tokens not yet reached"
                    );
                    Some(envelopes(ctx, incoming, *attempt, pending))
                }
                _ => None,
            };
            give_back(ctx, delivery, incoming, bodies).await?;
            Counters::add(&c.rings_handed_back, 1);
        }
    }
    // Acked with the rings settled around it (counted in `rings_acked` once sent).
    ctx.acks.ack(delivery);
    Ok(())
}

/// Counts and logs a ring acked with `outcome`.
fn count_acked(
    ctx: &Context,
    incoming: Option<&Incoming>,
    gateway: &str,
    event: &str,
    outcome: Outcome,
) {
    let c = &ctx.counters;
    if let Some(end) = incoming.and_then(|i| i.end.as_ref()) {
        let (accepted, rejected) = match outcome {
            Outcome::Delivered {
                accepted, rejected, ..
            } => (accepted, rejected),
            _ => (0, 0),
        };
        match outcome {
            Outcome::AlreadyEnded => {
                Counters::add(&c.rings_already_ended, 1);
            }
            Outcome::Expired => {
                Counters::add(&c.rings_expired, 1);
                info!(
                    gateway,
                    event, "end expired before its follow-ups; none sent"
                );
            }
            _ => {
                Counters::add(&c.rings_ended, 1);
                info!(
                    gateway,
                    event,
                    ring = %end.ring_id,
                    reason = %end.reason,
                    followups = accepted,
                    rejected,
                    "ring ended; the phones that took it have their follow-up"
                );
            }
        }
        return;
    }
    match outcome {
        Outcome::Debounced => Counters::add(&c.rings_debounced, 1),
        Outcome::EndedBeforePush => Counters::add(&c.rings_ended_before_push, 1),
        Outcome::AlreadyEnded => Counters::add(&c.rings_already_ended, 1),
        Outcome::Delivered {
            accepted,
            rejected,
            skipped,
        } => {
            Counters::add(&c.rings_delivered, 1);
            let pressed_to_settled_ms = incoming.map_or(0, |i| {
                (OffsetDateTime::now_utc() - i.ring.pressed_at)
                    .whole_milliseconds()
                    .max(0) as u64
            });
            info!(
                gateway,
                event,
                tokens = accepted + rejected + skipped,
                accepted,
                rejected,
                skipped,
                pressed_to_settled_ms,
                "ring delivered"
            );
        }
        Outcome::Expired => {
            Counters::add(&c.rings_expired, 1);
            info!(gateway, event, "ring expired before delivery; not pushed");
        }
        Outcome::UnknownGateway => {
            Counters::add(&c.rings_unknown_gateway, 1);
            info!(gateway, event, "ring for an unknown gateway");
        }
        Outcome::NoTokens => {
            Counters::add(&c.rings_without_tokens, 1);
            info!(gateway, event, "ring for a gateway without phones");
        }
        Outcome::AlreadyDelivered { suppressed } => {
            Counters::add(&c.rings_already_delivered, 1);
            info!(
                gateway,
                event, suppressed, "ring seen before: every token it had to reach took it already"
            );
        }
    }
}

/// Logs why a ring goes to a retry tier: at warn when it spends an attempt; at info when it
/// does not — the worker's own trouble (a provider down, a configuration mistake suspected),
/// said once where it is found.
fn log_retry(gateway: &str, event: &str, retry: &Disposition) {
    let Disposition::Retry {
        attempt,
        pending,
        error,
        accepted,
        rejected,
        spent,
        not_before,
        ..
    } = retry
    else {
        return;
    };
    let wait_ms = not_before.map_or(0, |w| w.as_millis() as u64);
    let error = logged(error);
    if *spent {
        warn!(gateway, event, accepted, rejected, pending = pending.len(), attempt, spent, wait_ms, %error, "ring goes to a retry tier");
    } else {
        info!(gateway, event, accepted, rejected, pending = pending.len(), attempt, spent, wait_ms, %error, "ring goes to a retry tier");
    }
}

/// Publishes `bodies` to the dead queue with `reason` (confirmed) and counts the ring.
async fn to_dead(
    ctx: &Context,
    delivery: &Delivery,
    bodies: &[Vec<u8>],
    reason: &str,
) -> Result<(), BrokerError> {
    let dead = &ctx.settings.names.dead;
    let properties = plain_properties(&delivery.properties);
    for body in bodies {
        broker::dead_letter_with(&ctx.publisher, dead, body, &properties, reason).await?;
    }
    Counters::add(&ctx.counters.rings_dead_lettered, 1);
    Ok(())
}

/// Publishes a feedback event per dead token, all confirmed: the publishes go out together
/// and their confirms are awaited together (no round trip each).
async fn report_invalid(ctx: &Context, invalid: &[Invalidation]) -> Result<(), BrokerError> {
    if invalid.is_empty() {
        return Ok(());
    }
    let queue = &ctx.settings.names.feedback;
    for result in join_all(invalid.iter().map(|i| i.publish(&ctx.publisher, queue))).await {
        result?;
    }
    Counters::add(&ctx.counters.feedback_events, invalid.len());
    Ok(())
}

/// The retry envelopes of a ring with `pending` tokens at `attempt`.
fn envelopes(
    ctx: &Context,
    incoming: &Incoming,
    attempt: u32,
    pending: &[DeviceToken],
) -> Vec<Vec<u8>> {
    let tokens: Vec<&str> = pending.iter().map(DeviceToken::as_hex).collect();
    crate::wire::retry::write(
        &incoming.body,
        attempt,
        &incoming.routing_key,
        &tokens,
        ctx.settings.retry_max_bytes,
    )
}

/// A delivery's properties for a copy ringpush publishes: the previous release's retry
/// headers dropped (the envelope carries what they held).
fn plain_properties(properties: &BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let kept: BTreeMap<ShortString, AMQPValue> = headers
        .inner()
        .iter()
        .filter(|(k, _)| k.as_str() != PENDING_HEADER && k.as_str() != ATTEMPT_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    properties.clone().with_headers(kept.into())
}

/// Publishes the ring to the retry tier of its attempt, in as many envelopes as its pending
/// tokens need, every one confirmed.
async fn retry(
    ctx: &Context,
    incoming: &Incoming,
    attempt: u32,
    pending: &[DeviceToken],
    not_before: Option<std::time::Duration>,
) -> Result<(), BrokerError> {
    let tier = ctx
        .settings
        .names
        .retry_tier_waiting(attempt.max(1), not_before);
    let properties = plain_properties(&incoming.delivery.properties)
        .with_content_type("application/json".into());
    let bodies = envelopes(ctx, incoming, attempt, pending);
    for result in join_all(
        bodies
            .iter()
            .map(|body| ctx.publisher.to_queue(tier, body, properties.clone())),
    )
    .await
    {
        result?;
    }
    Ok(())
}

/// Publishes the ring again to the rings exchange with its routing key (confirmed, the
/// hand-back counted in a header, which also tells the next worker to read the ledger) —
/// as it came, or as `bodies` (retry envelopes of the tokens not reached); the caller acks.
/// A nack would spend the ring's delivery budget.
async fn give_back(
    ctx: &Context,
    delivery: &Delivery,
    incoming: Option<&Incoming>,
    bodies: Option<Vec<Vec<u8>>>,
) -> Result<(), BrokerError> {
    let handbacks = match header(delivery, HANDBACK_HEADER) {
        Some(AMQPValue::LongUInt(n)) => n.saturating_add(1),
        _ => 1,
    };
    let properties = broker::with_header(
        &delivery.properties,
        HANDBACK_HEADER,
        AMQPValue::LongUInt(handbacks),
    );
    let key = incoming.map_or_else(
        || delivery.routing_key.to_string(),
        |i| i.routing_key.clone(),
    );
    let key = if key.starts_with("ring.") {
        key
    } else {
        Names::ring_key("handed-back")
    };
    let names = &ctx.settings.names;
    let Some(bodies) = bodies else {
        // A retry goes back as a retry tier returns it, under `ring.retry`: its envelope may
        // be larger than a gateway's message may be (RINGPUSH_MAX_MESSAGE_BYTES), and only a
        // worker's own routing key is read with that larger bound.
        let key = match incoming {
            Some(i) if i.pending.is_some() => broker::RETRY_KEY.to_owned(),
            _ => key,
        };
        return broker::publish_checked(
            &ctx.publisher,
            &names.rings,
            &key,
            &delivery.data,
            properties,
        )
        .await;
    };
    // Retry envelopes written here: under `ring.retry` (see above); each carries the ring's
    // own routing key.
    let key = broker::RETRY_KEY;
    let properties = plain_properties(&properties).with_content_type("application/json".into());
    for result in join_all(bodies.iter().map(|body| {
        broker::publish_checked(&ctx.publisher, &names.rings, key, body, properties.clone())
    }))
    .await
    {
        result?;
    }
    Ok(())
}

async fn requeue(ctx: &Context, delivery: &Delivery) {
    match ctx.acks.nack(delivery, broker::requeue()).await {
        Ok(_) => Counters::add(&ctx.counters.rings_requeued, 1),
        Err(e) => error!(error = %e, "nack failed; the broker will redeliver the ring"),
    }
}
