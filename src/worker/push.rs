//! Pushing one ring: its tokens fanned out to the provider, at most `ring_concurrency`
//! requests in flight (a building's ring shares the streams with the rings around it), the
//! payload built once and shared; the answers counted and handed to `decide`. A token the
//! ledger says took the ring before is not pushed again (counted `suppressed`). While no
//! provider can be reached at all the ring is held (paused, probing) and pushed again when
//! it can, or dead-lettered once its TTL has passed. When the worker stops mid-push, no new
//! request starts, the ones in flight get [`STOP_DRAIN`] to answer, and only the tokens not
//! reached are handed back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::decide::{decide, Disposition, Outcome, Step, Target};
use super::pause::{pause, Paused};
use super::read::{followup_key, Incoming, Life};
use super::settle::{settle, settle_recorded};
use super::{Context, Counters};
use crate::db::Recipient;
use crate::db::{ledger_hash, Gateway, TokenHash};
use crate::provider::guard::Judged;
use crate::provider::{Answer, Ending, Messages, Prepared};
use crate::wire::ring::{EndReason, RingEvent};

/// How long requests in flight may still answer once the worker stops (their answers are
/// kept; the tokens without one are handed back). Well within the time the consumer gives
/// the hand-back after the grace period.
pub(super) const STOP_DRAIN: Duration = Duration::from_secs(3);

/// When a batch was looked up: the statement of the grouped query that answered it sent
/// (`None`: looked up gateway by gateway, no one statement), and its answer in hand.
#[derive(Debug, Clone, Copy)]
pub(super) struct LookedUp {
    pub(super) sent: Option<Instant>,
    pub(super) at: Instant,
}

/// Pushes one ring and settles it; holds it while its provider cannot be reached at all.
pub(super) async fn push_holding(
    ctx: &Arc<Context>,
    incoming: &Incoming,
    gateway: Option<&Gateway>,
    looked_up: LookedUp,
    abort: &CancellationToken,
) {
    loop {
        let (disposition, accepted, last) = push(ctx, incoming, gateway, abort).await;
        let Disposition::Hold { unreachable, error } = disposition else {
            settle_recorded(ctx, incoming, &accepted, disposition, abort).await;
            if let Some(last) = last {
                observe_stages(ctx, incoming, looked_up, last);
            }
            return;
        };
        let names = unreachable.first().map_or("", |(p, _)| p.provider_name());
        warn!(gateway = crate::wire::logged(incoming.gateway()), event = crate::wire::logged(incoming.event()), %error, "{names} unreachable; holding the ring");
        for (platform, env) in unreachable {
            pause(&ctx.shared, Paused::Provider(platform, env), &error);
        }
        let left = incoming.time_left(ctx.settings.ring_ttl);
        tokio::select! {
            _ = ctx.pause.opened() => {}
            _ = tokio::time::sleep(left + Duration::from_millis(1)) => {
                let step = Step::ExpiredWhileHeld {
                    ttl: ctx.settings.ring_ttl,
                    attempt: incoming.attempt,
                    why: format!("{names} unreachable: {error}"),
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

/// When a token's answer came, and how long its request took.
#[derive(Debug, Clone, Copy)]
struct Answered {
    at: Instant,
    took: Duration,
}

/// Pushes one ring to every token of its gateway (or, on a retry, to the tokens still
/// pending), but never to one the ledger says took it already, and decides what becomes of
/// it; with the decision, the hashes of the tokens that took it now (for the ledger) and
/// the last answer (`None` when nothing was sent).
async fn push(
    ctx: &Context,
    incoming: &Incoming,
    gateway: Option<&Gateway>,
    abort: &CancellationToken,
) -> (Disposition, Vec<TokenHash>, Option<Answered>) {
    let not_pushed = |outcome| (decide(Step::NotPushed { outcome }), Vec::new(), None);
    let followup = match &incoming.life {
        Life::Folded(into) => {
            info!(
                gateway = crate::wire::logged(incoming.gateway()),
                event = crate::wire::logged(incoming.event()),
                into = crate::wire::logged(into),
                "a press while its switch's ring still rings: folded into it, not pushed"
            );
            return not_pushed(Outcome::Debounced);
        }
        Life::Ended if incoming.end.is_none() => {
            info!(
                gateway = crate::wire::logged(incoming.gateway()),
                event = crate::wire::logged(incoming.event()),
                "the ring has ended already: not pushed (to the phones it had not reached)"
            );
            return not_pushed(Outcome::EndedBeforePush);
        }
        Life::AlreadyEnded(state) => {
            info!(
                gateway = crate::wire::logged(incoming.gateway()),
                event = crate::wire::logged(incoming.own_event()),
                ring = crate::wire::logged(incoming.event()),
                state,
                "the ring had ended already: this end changes nothing"
            );
            return not_pushed(Outcome::AlreadyEnded);
        }
        Life::FollowUp(ended) => match followup(ctx, incoming, ended).await {
            Ok(f) => Some(f),
            Err(e) => {
                let step = Step::NotDurable {
                    error: format!("the delivery ledger could not be read: {e}"),
                };
                return (decide(step), Vec::new(), None);
            }
        },
        _ => None,
    };
    let (recipients, suppressed) = match &followup {
        Some(f) => to_follow_up(ctx, incoming, gateway, f),
        None => to_push(ctx, incoming, gateway),
    };
    let looked_up = decide(Step::LookedUp {
        known: gateway.is_some(),
        recipients: recipients.len(),
        retry: incoming.pending.is_some() || followup.is_some(),
        suppressed,
    });
    let (Disposition::Continue, Some(gateway)) = (&looked_up, gateway) else {
        return (looked_up, Vec::new(), None);
    };
    let messages = Messages {
        alert: &ctx.settings.alert,
        default_topic: ctx.settings.default_topic.as_deref(),
        ring_ttl: ctx.settings.ring_ttl,
    };
    let (ring, ending) = match &followup {
        Some(f) => (&f.ring, Some(&f.ending)),
        None => (&incoming.ring, None),
    };
    let prepared = match ctx
        .providers
        .prepare(ring, &gateway.name, &recipients, &messages, ending)
    {
        Ok(p) => p,
        Err(e) => {
            let step = Step::Unpushable {
                error: e.to_string(),
            };
            return (decide(step), Vec::new(), None);
        }
    };
    let mut sent = send_all(ctx, incoming, &prepared, &recipients, abort).await;
    judge(ctx, incoming, &prepared, &mut sent);
    for s in &sent {
        if let Some(answer) = &s.answer {
            count(ctx, s.recipient.app, s.target.token.platform(), answer);
            if followup.is_some() {
                ctx.counters
                    .count_followup(s.target.token.platform(), s.recipient.kind, answer);
            }
            log_rejection(incoming, s.recipient, answer);
        }
    }
    let (answers, answered): (Vec<_>, Vec<_>) = sent
        .into_iter()
        .map(|s| ((s.target, s.answer), s.answered))
        .unzip();
    let last = answered
        .into_iter()
        .flatten()
        .max_by_key(|a: &Answered| a.at);
    let accepted = answers
        .iter()
        .filter(|(_, a)| matches!(a, Some(Answer::Accepted)))
        .map(|(t, _)| ledger_hash(t.token.as_str()))
        .collect();
    let step = if answers.iter().all(|(_, a)| a.is_some()) {
        Step::Pushed {
            answers: answers
                .into_iter()
                .map(|(t, a)| (t, a.expect("all answered")))
                .collect(),
            attempt: incoming.attempt,
            max_attempts: ctx.settings.max_attempts,
            // With two providers or more (platforms or apps), a down one never pauses the
            // others' rings.
            may_hold: ctx.providers.len() == 1,
        }
    } else {
        Step::Interrupted {
            answers,
            attempt: incoming.attempt,
        }
    };
    (decide(step), accepted, last)
}

/// A follow-up about to go out: the ring as it goes into the payload (its own event id, when
/// it was pressed), how it ended, and the tokens that took it.
pub(super) struct FollowUp {
    ring: RingEvent,
    ending: Ending,
    took: std::collections::HashSet<TokenHash>,
    /// The tokens that have their follow-up already (the ledger's follow-up entries).
    recorded: std::collections::HashSet<TokenHash>,
}

/// What the follow-up of an end that ended its ring needs: read once the end holds the ring's
/// claim, so every token that took the ring is in the ledger by now (a push of the ring in
/// flight elsewhere finished, and wrote its entry, before the claim was had).
async fn followup(
    ctx: &Context,
    incoming: &Incoming,
    ended: &crate::db::rings::Ended,
) -> Result<FollowUp, String> {
    let gateway = incoming.gateway();
    let ring_key = crate::db::RingKey {
        gateway: gateway.to_owned(),
        event: ended.target.clone(),
    };
    let own_key = followup_key(gateway, &ended.target);
    let mut seen = ctx
        .ledger
        .seen(&[ring_key.clone(), own_key.clone()])
        .await
        .map_err(|e| e.to_string())?;
    let state = EndReason::from_name(&ended.state).unwrap_or(EndReason::Cancelled);
    let ended_at = ended.ended_at.unwrap_or_else(OffsetDateTime::now_utc);
    Ok(FollowUp {
        ring: RingEvent {
            event_id: ended.target.clone(),
            gateway_id: gateway.to_owned(),
            pressed_at: ended.pressed_at.unwrap_or(ended_at),
            switch_id: None,
        },
        ending: Ending {
            state,
            ended_at,
            text: crate::provider::followup_text(state, ended.by_name.as_deref()),
            ttl: ctx.settings.followup_ttl,
        },
        took: seen.remove(&ring_key).unwrap_or_default(),
        recorded: seen.remove(&own_key).unwrap_or_default(),
    })
}

/// The phones a follow-up goes to: those that took the ring (on a retry, only those still
/// pending), but none that has its follow-up already (counted `suppressed`), and none whose
/// provider sends no follow-up to its kind (an iPhone's VoIP token: counted under the
/// provider's outcome, e.g. `skipped_voip`).
fn to_follow_up<'g>(
    ctx: &Context,
    incoming: &Incoming,
    gateway: Option<&'g Gateway>,
    f: &FollowUp,
) -> (Vec<&'g Recipient>, usize) {
    let pending = incoming.pending.as_ref();
    let mut suppressed = 0;
    let recipients = gateway
        .map(|g| {
            g.recipients
                .iter()
                .filter(|r| pending.is_none_or(|p| p.contains(r.token.as_hex())))
                .filter(|r| {
                    let hash = ledger_hash(r.token.as_str());
                    if !f.took.contains(&hash) {
                        return false;
                    }
                    if f.recorded.contains(&hash) {
                        suppressed += 1;
                        return false;
                    }
                    match ctx.providers.follows_up(r) {
                        Ok(()) => true,
                        Err(outcome) => {
                            // Counted once: on the end's first push (a retry's pending
                            // tokens never hold one).
                            ctx.counters.count_followup_skipped(
                                r.token.platform(),
                                r.kind,
                                outcome,
                            );
                            false
                        }
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if suppressed > 0 {
        Counters::add(&ctx.counters.notifications_suppressed, suppressed);
    }
    (recipients, suppressed)
}

/// The gateway's tokens this delivery goes to — on a retry, only those still pending — but
/// none the ledger says took the ring already (counted `suppressed`, and how many).
fn to_push<'g>(
    ctx: &Context,
    incoming: &Incoming,
    gateway: Option<&'g Gateway>,
) -> (Vec<&'g Recipient>, usize) {
    let pending = incoming.pending.as_ref();
    let mut suppressed = 0;
    let recipients: Vec<_> = gateway
        .map(|g| {
            g.recipients
                .iter()
                .filter(|r| pending.is_none_or(|p| p.contains(r.token.as_hex())))
                .filter(|r| {
                    let taken = !incoming.recorded.is_empty()
                        && incoming.recorded.contains(&ledger_hash(r.token.as_str()));
                    suppressed += usize::from(taken);
                    !taken
                })
                .collect()
        })
        .unwrap_or_default();
    if suppressed > 0 {
        Counters::add(&ctx.counters.notifications_suppressed, suppressed);
        info!(
            gateway = crate::wire::logged(incoming.gateway()),
            event = crate::wire::logged(incoming.event()),
            suppressed,
            left = recipients.len(),
            "seen before: the tokens that took this ring already are not pushed again"
        );
    }
    (recipients, suppressed)
}

/// One token's push: whom, its answer (`None`: not sent, or no answer before the stop), and
/// when it came.
struct Sent<'r> {
    recipient: &'r Recipient,
    target: Target,
    answer: Option<Answer>,
    answered: Option<Answered>,
}

/// Sends the prepared ring to each recipient, at most `ring_concurrency` requests at once;
/// once the worker stops, no new request starts and those in flight get [`STOP_DRAIN`].
async fn send_all<'r>(
    ctx: &Context,
    incoming: &Incoming,
    prepared: &Prepared,
    recipients: &[&'r Recipient],
    abort: &CancellationToken,
) -> Vec<Sent<'r>> {
    // Collected first: a stream over a lazy `map` of borrowing closures trips the compiler's
    // `Send` check for higher-ranked lifetimes.
    let sends: Vec<_> = recipients
        .iter()
        .map(|&recipient| send_one(ctx, incoming, prepared, recipient, abort))
        .collect();
    // An ordinary ring (a few tokens) takes the cheaper `join_all`: a stream of futures
    // costs an allocation and a waker per token.
    let limit = ctx.settings.ring_concurrency.max(1);
    if sends.len() <= limit {
        futures_util::future::join_all(sends).await
    } else {
        // Unordered: a token that waits (an FCM Retry-After) must not hold the next sends
        // back, and `buffered` counts answers waiting for their turn against the limit.
        futures_util::stream::iter(sends)
            .buffer_unordered(limit)
            .collect()
            .await
    }
}

/// Sends the ring to one token (unless the worker is stopping) and observes the answer.
async fn send_one<'r>(
    ctx: &Context,
    incoming: &Incoming,
    prepared: &Prepared,
    recipient: &'r Recipient,
    abort: &CancellationToken,
) -> Sent<'r> {
    let mut sent = Sent {
        recipient,
        target: Target {
            token: recipient.token.clone(),
            environment: recipient.environment,
            topic: ctx.providers.topic(prepared, recipient),
        },
        answer: None,
        answered: None,
    };
    if abort.is_cancelled() {
        // Stopping: not sent; handed back.
        return sent;
    }
    let start = Instant::now();
    let answer = tokio::select! {
        biased;
        answer = ctx.providers.send(prepared, recipient) => answer,
        // The worker stopped and the answer did not come in time: whether the provider took
        // it is unknown, so it is handed back.
        _ = async {
            abort.cancelled().await;
            tokio::time::sleep(STOP_DRAIN).await;
        } => return sent,
    };
    // Only a provider's answer times the push: a token not sent (no provider for it) or
    // whose provider could not be reached made no request.
    if !matches!(answer, Answer::Skipped(_) | Answer::Unreachable { .. }) {
        sent.answered = Some(Answered {
            at: Instant::now(),
            took: start.elapsed(),
        });
    }
    if answer == Answer::Accepted {
        let since_press = OffsetDateTime::now_utc() - incoming.ring.pressed_at;
        ctx.counters
            .ring_to_accepted_seconds
            .observe(since_press.as_seconds_f64().max(0.0));
    }
    sent.answer = Some(answer);
    sent
}

/// Weighs the ring's "dead" answers against the others of their scope before any may become
/// a feedback event (`provider::guard`): a suspected configuration mistake turns them into
/// `Doubted` (kept, retried). The answers of a first push count towards the scope's judgement.
fn judge(ctx: &Context, incoming: &Incoming, prepared: &Prepared, sent: &mut [Sent<'_>]) {
    if !sent
        .iter()
        .any(|s| matches!(s.answer, Some(Answer::Accepted | Answer::Dead { .. })))
    {
        return;
    }
    let providers = &ctx.providers;
    let first = incoming.pending.is_none() && incoming.recorded.is_empty();
    let judged = sent
        .iter_mut()
        .filter_map(|s| {
            let answer = s.answer.as_mut()?;
            if !matches!(answer, Answer::Accepted | Answer::Dead { .. }) {
                return None;
            }
            Some(Judged {
                scope: providers.scope(prepared, s.recipient),
                token: &s.target.token,
                first,
                answer,
            })
        })
        .collect();
    providers.guard.review(judged);
}

/// Observes a pushed ring's stages, one after the other from its press to its settlement
/// (now), and the worker's own share: arrival to the last answer, less that answer's request.
fn observe_stages(ctx: &Context, incoming: &Incoming, looked_up: LookedUp, last: Answered) {
    let (c, arrived) = (&ctx.counters, incoming.arrived);
    let sent = looked_up.sent.map_or(arrived, |sent| sent.max(arrived));
    let between = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64();
    for (stage, seconds) in [
        (&c.stages.queued, incoming.queued),
        (&c.stages.lookup_wait, between(arrived, sent)),
        (&c.stages.lookup, between(sent, looked_up.at)),
        (&c.stages.push, between(looked_up.at, last.at)),
        (&c.stages.settle, between(last.at, Instant::now())),
    ] {
        stage.observe(seconds);
    }
    let own = last.at.saturating_duration_since(arrived);
    c.ring_worker_seconds
        .observe(own.saturating_sub(last.took).as_secs_f64());
}

/// Logs a token's rejection at the level an operator needs, with the ring it belongs to: a
/// dead token at info, our credentials or topic refused at error (no phone will ring), another
/// rejection for good at warn.
fn log_rejection(incoming: &Incoming, to: &Recipient, answer: &Answer) {
    use crate::wire::logged;
    let (gateway, event) = (logged(incoming.gateway()), logged(incoming.event()));
    let (token, app) = (&to.token, to.app.as_str());
    match answer {
        Answer::Dead { reason, .. } => {
            let reason = logged(reason);
            info!(gateway, event, app, %token, reason, "the provider reports the token invalid")
        }
        Answer::Rejected { reason, ours: true } => {
            let reason = logged(reason);
            error!(gateway, event, app, %token, reason, "the provider refused our credentials or topic")
        }
        Answer::Rejected {
            reason,
            ours: false,
        } => {
            let reason = logged(reason);
            warn!(gateway, event, app, %token, reason, "the provider rejected the notification")
        }
        _ => {}
    }
}

/// Counts one answer once it is judged: notifications by outcome (and per platform),
/// rejections by reason.
fn count(
    ctx: &Context,
    app: crate::token::AppId,
    platform: crate::token::Platform,
    answer: &Answer,
) {
    let c = &ctx.counters;
    match answer {
        Answer::Accepted => Counters::add(&c.notifications_accepted, 1),
        Answer::Dead { reason, .. } | Answer::Rejected { reason, .. } => {
            Counters::add(&c.notifications_rejected, 1);
            c.count_rejected(reason);
        }
        Answer::Doubted { .. } => Counters::add(&c.notifications_doubted, 1),
        Answer::Skipped(skip) => c.count_skipped(*skip),
        Answer::Retry { .. } | Answer::Unreachable { .. } => {
            Counters::add(&c.notifications_failed, 1)
        }
    }
    c.count_platform(app, platform, answer);
}
