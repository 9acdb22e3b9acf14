//! Pushing one ring: its tokens fanned out to the provider, at most `ring_concurrency`
//! requests in flight (a building's ring shares the streams with the rings around it), the
//! payload built once and shared; the answers counted and handed to `decide`. While no
//! provider can be reached at all the ring is held (paused, probing) and pushed again when
//! it can, or dead-lettered once its TTL has passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::decide::{decide, Disposition, Step, Target};
use super::pause::{pause, Paused};
use super::read::Incoming;
use super::settle::settle;
use super::{Context, Counters};
use crate::db::Gateway;
use crate::provider::{Answer, Messages};

/// Pushes one ring and settles it; holds it while its provider cannot be reached at all.
pub(super) async fn push_holding(
    ctx: &Arc<Context>,
    incoming: &Incoming,
    gateway: Option<&Gateway>,
    abort: &CancellationToken,
) {
    loop {
        let disposition = tokio::select! {
            disposition = push(ctx, incoming, gateway) => disposition,
            _ = abort.cancelled() => decide(Step::Stopping),
        };
        let Disposition::Hold {
            environments,
            error,
        } = disposition
        else {
            settle(ctx, incoming, disposition).await;
            return;
        };
        warn!(gateway = incoming.gateway(), event = incoming.event(), %error, "APNs unreachable; holding the ring");
        for env in environments {
            pause(&ctx.shared, Paused::Apns(env), &error);
        }
        let left = incoming.time_left(ctx.settings.ring_ttl);
        tokio::select! {
            _ = ctx.pause.opened() => {}
            _ = tokio::time::sleep(left + Duration::from_millis(1)) => {
                let step = Step::ExpiredWhileHeld {
                    ttl: ctx.settings.ring_ttl,
                    attempt: incoming.attempt,
                    why: format!("APNs unreachable: {error}"),
                };
                settle(ctx, incoming, decide(step)).await;
                return;
            }
            _ = abort.cancelled() => {
                settle(ctx, incoming, decide(Step::Stopping)).await;
                return;
            }
        }
    }
}

/// Pushes one ring to every token of its gateway (or, on a retry, to the tokens still
/// pending) and decides what becomes of it.
async fn push(ctx: &Context, incoming: &Incoming, gateway: Option<&Gateway>) -> Disposition {
    let (ring, pending) = (&incoming.ring, incoming.pending.as_ref());
    let recipients: Vec<_> = gateway
        .map(|g| {
            g.recipients
                .iter()
                .filter(|r| pending.is_none_or(|p| p.contains(r.token.as_hex())))
                .collect()
        })
        .unwrap_or_default();
    let looked_up = decide(Step::LookedUp {
        known: gateway.is_some(),
        recipients: recipients.len(),
        retry: pending.is_some(),
    });
    let (Disposition::Continue, Some(gateway)) = (&looked_up, gateway) else {
        return looked_up;
    };
    let messages = Messages {
        alert: &ctx.settings.alert,
        default_topic: ctx.settings.default_topic.as_deref(),
        ring_ttl: ctx.settings.ring_ttl,
    };
    let prepared = match ctx
        .providers
        .prepare(ring, &gateway.name, &recipients, &messages)
    {
        Ok(p) => p,
        Err(e) => {
            return decide(Step::Unpushable {
                error: e.to_string(),
            })
        }
    };
    // Collected first: a stream over a lazy `map` of borrowing closures trips the compiler's
    // `Send` check for higher-ranked lifetimes.
    let sends: Vec<_> = recipients
        .iter()
        .map(|r| {
            let prepared = &prepared;
            async move {
                let target = Target {
                    token: r.token.clone(),
                    environment: r.environment,
                    topic: prepared.topic(r),
                };
                let sent = Instant::now();
                let answer = ctx.providers.send(prepared, r).await;
                observe(ctx, incoming, &answer);
                let seconds = sent.elapsed().as_secs_f64();
                ctx.counters
                    .count_platform(r.token.platform(), &answer, seconds);
                log_rejection(incoming, &r.token, &answer);
                (target, answer)
            }
        })
        .collect();
    // At most `ring_concurrency` at once, in order. An ordinary ring (a few tokens) takes the
    // cheaper `join_all`: a stream of futures costs an allocation and a waker per token.
    let limit = ctx.settings.ring_concurrency.max(1);
    let answers: Vec<(Target, Answer)> = if sends.len() <= limit {
        futures_util::future::join_all(sends).await
    } else {
        futures_util::stream::iter(sends)
            .buffered(limit)
            .collect()
            .await
    };
    decide(Step::Pushed {
        answers,
        attempt: incoming.attempt,
        max_attempts: ctx.settings.max_attempts,
    })
}

/// Logs a token's rejection at the level an operator needs, with the ring it belongs to: a
/// dead token at info, our credentials or topic refused at error (no phone will ring), another
/// rejection for good at warn.
fn log_rejection(incoming: &Incoming, token: &crate::token::DeviceToken, answer: &Answer) {
    let (gateway, event) = (incoming.gateway(), incoming.event());
    match answer {
        Answer::Dead { reason, .. } => {
            info!(gateway, event, %token, reason, "the provider reports the token invalid")
        }
        Answer::Rejected { reason, ours: true } => {
            error!(gateway, event, %token, reason, "the provider refused our credentials or topic")
        }
        Answer::Rejected {
            reason,
            ours: false,
        } => {
            warn!(gateway, event, %token, reason, "the provider rejected the notification")
        }
        _ => {}
    }
}

/// Counts one answer: notifications by outcome, rejections by reason, press-to-accepted
/// (per platform, and request latency, in `Counters::count_platform`).
fn observe(ctx: &Context, incoming: &Incoming, answer: &Answer) {
    let c = &ctx.counters;
    match answer {
        Answer::Accepted => {
            Counters::add(&c.notifications_accepted, 1);
            let since_press = OffsetDateTime::now_utc() - incoming.ring.pressed_at;
            c.ring_to_accepted_seconds
                .observe(since_press.as_seconds_f64().max(0.0));
        }
        Answer::Dead { reason, .. } | Answer::Rejected { reason, .. } => {
            Counters::add(&c.notifications_rejected, 1);
            c.count_rejected(reason);
        }
        Answer::Skipped(skip) => c.count_skipped(*skip),
        Answer::Retry { .. } | Answer::Unreachable { .. } => {
            Counters::add(&c.notifications_failed, 1)
        }
    }
}
