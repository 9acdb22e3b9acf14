//! What becomes of a ring: one pure function, [`decide`], from where the ring stands
//! ([`Step`]) to what the worker does with it ([`Disposition`]). `settle` only carries a
//! disposition out (publish, then ack); nothing else in the worker chooses between ack,
//! retry, dead letter, hold and hand-back. No broker, database or provider here: the table of
//! unit tests below covers every row.

use std::time::Duration;

use super::{DeviceToken, Environment, Invalidation};
use crate::provider::guard::DOUBT_RETRY;
use crate::provider::Answer;
use crate::token::Platform;

/// Whom an answer is about: the token, and what a feedback event about it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub token: DeviceToken,
    pub environment: Environment,
    /// The topic the notification went to.
    pub topic: Option<String>,
}

/// Where a ring stands when the worker decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The delivery is not a ring event (or an envelope that cannot be read).
    Unreadable { error: String },
    /// Read, before its lookup. `sender`: who the routing key says published it, and
    /// `claimed`: the gateway its body names; `retry`: it came from a retry tier (it names
    /// its pending tokens); `redelivered`: the broker delivered it before; `returned`: how
    /// often it came back unsettled (the quorum queue's `x-delivery-count`), against the
    /// queue's `limit`.
    Arrived {
        sender: Sender,
        claimed: String,
        age: Duration,
        ttl: Duration,
        attempt: u32,
        retry: bool,
        redelivered: bool,
        returned: u32,
        limit: u32,
    },
    /// Its gateway's lookup failed alone, for the ring's own input (or kept timing out).
    LookupRefused { reason: String },
    /// The ring's life says it is not pushed (folded into a ring still ringing; ended before
    /// its push; an end of a ring that had ended already).
    NotPushed { outcome: Outcome },
    /// Looked up: whether the gateway exists, and how many of its tokens this delivery goes
    /// to (on a retry, only those still pending and still registered; never those the
    /// ledger says took the ring already — `suppressed` counts those).
    LookedUp {
        known: bool,
        recipients: usize,
        retry: bool,
        suppressed: usize,
    },
    /// Its payload cannot be built (too large for the provider).
    Unpushable { error: String },
    /// Every token it went to has an answer.
    Pushed {
        answers: Vec<(Target, Answer)>,
        attempt: u32,
        max_attempts: u32,
        /// Whether a ring none of whose tokens could be reached may be held (consumption
        /// paused): only when its provider is the only one configured. With APNs and FCM
        /// both configured, a down provider's rings wait on the retry path instead (no
        /// attempt spent), so the other platform's rings keep flowing.
        may_hold: bool,
    },
    /// The worker stopped while pushing it: the tokens with an answer, and those without one
    /// (`None`: never sent, or no answer within the drain after the stop).
    Interrupted {
        answers: Vec<(Target, Option<Answer>)>,
        attempt: u32,
    },
    /// Held while the worker could not work (database, provider), until its TTL passed.
    ExpiredWhileHeld {
        ttl: Duration,
        attempt: u32,
        why: String,
    },
    /// The worker is stopping with the ring in hand.
    Stopping,
    /// Its outcome could not be made durable (a publish failed or was not confirmed).
    NotDurable { error: String },
    /// A publish for it was refused before it went out, for breaking an AMQP limit.
    TooLarge { error: String },
}

/// Who published a ring, as its routing key says: the authority on which gateway rang (the
/// broker lets a gateway's identity publish only its own key, `ring.<gateway_id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// `ring.<gateway_id>`: that gateway (or a worker handing its ring back, with its key).
    Gateway(String),
    /// A worker: a retry of the previous release back from a retry tier (`ring.retry`, a key
    /// no gateway identity may publish); the body names the gateway.
    Worker,
    /// A key that names no gateway, or a retry envelope published under another gateway's
    /// key than the one it carries: never trusted.
    Unknown { why: String },
}

/// What was counted for a ring that is acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every token answered: accepted, rejected for good, or skipped (no provider for its
    /// platform, or none for its kind: `unconfigured`, `unsupported`).
    Delivered {
        accepted: usize,
        rejected: usize,
        skipped: usize,
    },
    /// Older than the ring TTL on its first delivery: not pushed.
    Expired,
    UnknownGateway,
    NoTokens,
    /// Seen before (redelivered, retried, handed back) and every token it still had to reach
    /// took it already, as the ledger says: nothing pushed again.
    AlreadyDelivered {
        suppressed: usize,
    },
    /// A press folded into a ring of its switch still ringing (debounce): not pushed.
    Debounced,
    /// The ring's end was known before it was pushed (to these phones): not pushed.
    EndedBeforePush,
    /// An end of a ring that had ended already: nothing pushed.
    AlreadyEnded,
}

/// What the worker does with a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Nothing decided yet: go on (look it up, push it).
    Continue,
    /// Publish `feedback` (confirmed), then ack.
    Ack {
        outcome: Outcome,
        feedback: Vec<Invalidation>,
    },
    /// Publish `feedback`, then the ring to the retry tier of `attempt` with its pending
    /// tokens (confirmed), then ack. `spent`: whether this used up an attempt.
    Retry {
        attempt: u32,
        pending: Vec<DeviceToken>,
        feedback: Vec<Invalidation>,
        error: String,
        accepted: usize,
        rejected: usize,
        spent: bool,
        /// The longest wait the provider asked for (FCM's `Retry-After`): the ring goes to a
        /// tier at least that long.
        not_before: Option<Duration>,
    },
    /// The ring's body names another gateway than its routing key (a gateway's credentials
    /// used to ring someone else's door, or a confused firmware): publish it to the dead
    /// queue with `reason` (confirmed), then ack; counted apart.
    WrongGateway { reason: String },
    /// Publish `feedback`, then the ring to the dead queue with `reason` (and, when given,
    /// the tokens it never reached, at `attempt`), confirmed, then ack.
    Dead {
        reason: String,
        pending: Option<(u32, Vec<DeviceToken>)>,
        feedback: Vec<Invalidation>,
    },
    /// Keep it, unacked, pause consumption and probe what failed; push again when it works.
    /// Spends no attempt and none of the queue's delivery budget.
    Hold {
        /// The providers (and environments) none of whose tokens could be reached.
        unreachable: Vec<(Platform, Environment)>,
        error: String,
    },
    /// Publish `feedback`, then the ring again to the rings exchange — as it came, or, with
    /// `pending`, as a retry envelope of the tokens not yet reached at its `attempt` (none
    /// spent) — confirmed, and ack (never a nack: that would spend the delivery budget).
    HandBack {
        pending: Option<(u32, Vec<DeviceToken>)>,
        feedback: Vec<Invalidation>,
    },
}

/// The one place that decides.
pub(crate) fn decide(step: Step) -> Disposition {
    use Disposition as D;
    match step {
        Step::Unreadable { error } => D::Dead {
            reason: error,
            pending: None,
            feedback: Vec::new(),
        },
        Step::Arrived {
            sender,
            claimed,
            age,
            ttl,
            attempt,
            retry,
            redelivered,
            returned,
            limit,
        } => {
            // The routing key is the authority: a body naming another gateway is refused
            // before anything else (a forged ring is never counted as expired or pushed).
            if let Some(wrong) = wrong_gateway(sender, &claimed) {
                return wrong;
            }
            arrived(
                age,
                ttl,
                attempt,
                retry || redelivered,
                retry,
                returned,
                limit,
            )
        }
        Step::LookupRefused { reason } => D::Dead {
            reason,
            pending: None,
            feedback: Vec::new(),
        },
        Step::NotPushed { outcome } => ack(outcome),
        Step::LookedUp {
            known,
            recipients,
            retry,
            suppressed,
        } => looked_up(known, recipients, retry, suppressed),
        Step::Unpushable { error } => D::Dead {
            reason: error,
            pending: None,
            feedback: Vec::new(),
        },
        Step::Pushed {
            answers,
            attempt,
            max_attempts,
            may_hold,
        } => pushed(answers, attempt, max_attempts, may_hold),
        Step::Interrupted { answers, attempt } => interrupted(answers, attempt),
        Step::ExpiredWhileHeld { ttl, attempt, why } => D::Dead {
            reason: format!(
                "expired ({} old) while held after {attempt} attempt(s): {why}",
                crate::human::Human(ttl)
            ),
            pending: None,
            feedback: Vec::new(),
        },
        Step::Stopping | Step::NotDurable { .. } => D::HandBack {
            pending: None,
            feedback: Vec::new(),
        },
        Step::TooLarge { error } => D::Dead {
            reason: format!("cannot be retried: {error}"),
            pending: None,
            feedback: Vec::new(),
        },
    }
}

/// A body naming another gateway than its routing key, or a key naming none: refused.
fn wrong_gateway(sender: Sender, claimed: &str) -> Option<Disposition> {
    match sender {
        Sender::Gateway(keyed) if keyed != claimed => Some(Disposition::WrongGateway {
            reason: format!(
                "routing key ring.{keyed} names gateway {keyed:?}, but the body names {claimed:?}: the routing key decides who rang"
            ),
        }),
        Sender::Unknown { why } => Some(Disposition::WrongGateway {
            reason: format!("the routing key names no gateway: {why}"),
        }),
        Sender::Gateway(_) | Sender::Worker => None,
    }
}

/// A ring read from a trusted sender: dead when it came back unsettled too often, on when
/// fresh, else expired (acked, on its first delivery) or dead (after an attempt or a fault).
/// `seen`: retried or redelivered; `retry`: it names pending tokens.
fn arrived(
    age: Duration,
    ttl: Duration,
    attempt: u32,
    seen: bool,
    retry: bool,
    returned: u32,
    limit: u32,
) -> Disposition {
    // Worker processes took it and never settled it, again and again (they died or
    // panicked with it): dead-lettered here, with the reason, before the broker's delivery
    // limit would dead-letter it there with only `x-death` to say why.
    if returned.saturating_add(1) >= limit {
        return Disposition::Dead {
            reason: format!(
                "delivered {} times without being settled: the worker stopped or crashed with it each time (the queue's delivery limit is {limit})",
                returned.saturating_add(1)
            ),
            pending: None,
            feedback: Vec::new(),
        };
    }
    if age <= ttl {
        return Disposition::Continue;
    }
    if attempt == 0 && !seen {
        return ack(Outcome::Expired);
    }
    let pending = if retry { "some" } else { "all" };
    Disposition::Dead {
        reason: format!(
            "expired ({} old) after {attempt} attempt(s); {pending} token(s) pending",
            crate::human::Human(ttl)
        ),
        pending: None,
        feedback: Vec::new(),
    }
}

/// Looked up: an unknown gateway or one without phones is acked; a ring whose every token
/// took it already, or whose pending tokens are all gone, too; else it is pushed.
fn looked_up(known: bool, recipients: usize, retry: bool, suppressed: usize) -> Disposition {
    match (known, recipients, retry) {
        (false, _, _) => ack(Outcome::UnknownGateway),
        (true, 0, _) if suppressed > 0 => ack(Outcome::AlreadyDelivered { suppressed }),
        // The tokens still pending have been deleted since: nothing is left to do.
        (true, 0, true) => ack(Outcome::Delivered {
            accepted: 0,
            rejected: 0,
            skipped: 0,
        }),
        (true, 0, false) => ack(Outcome::NoTokens),
        (true, _, _) => Disposition::Continue,
    }
}

fn ack(outcome: Outcome) -> Disposition {
    Disposition::Ack {
        outcome,
        feedback: Vec::new(),
    }
}

/// The answers of one push, added up.
#[derive(Default)]
struct Tally {
    accepted: usize,
    rejected: usize,
    /// Not pushed: no provider for the token's platform or kind (counted `unconfigured`,
    /// `unsupported`, never `rejected`), settled like a rejection.
    skipped: usize,
    feedback: Vec<Invalidation>,
    /// Tokens to try again: answered "retry", their provider unreachable, or a "dead" answer
    /// doubted.
    pending: Vec<DeviceToken>,
    /// The providers (and environments) that could not be reached at all.
    unreachable: Vec<(Platform, Environment)>,
    /// Whether every pending token failed only because its provider was unreachable (or its
    /// answer was doubted): no attempt spent.
    only_unreachable: bool,
    /// The longest wait a provider asked for before a pending token is sent again.
    not_before: Option<Duration>,
    /// Whether the ring may be held for them: only a provider that holds its rings (APNs)
    /// — another's unreachable tokens wait on the retry path (no attempt spent), so a down
    /// FCM never pauses the consumption iPhones need.
    holdable: bool,
    error: String,
}

fn tally(answers: impl IntoIterator<Item = (Target, Answer)>) -> Tally {
    let mut t = Tally {
        only_unreachable: true,
        holdable: true,
        ..Tally::default()
    };
    for (target, answer) in answers {
        match answer {
            Answer::Accepted => t.accepted += 1,
            Answer::Dead {
                reason,
                since,
                observed_at,
                ..
            } => {
                t.rejected += 1;
                t.feedback.push(Invalidation {
                    token: target.token,
                    environment: target.environment,
                    topic: target.topic,
                    reason,
                    invalid_since: since,
                    observed_at,
                });
            }
            Answer::Rejected { .. } => t.rejected += 1,
            // No provider for it (or none that carries its kind): settled like a rejection.
            Answer::Skipped(_) => t.skipped += 1,
            Answer::Retry { error, after, .. } => {
                t.pending.push(target.token);
                t.only_unreachable = false;
                t.error = error;
                t.not_before = t.not_before.max(after);
            }
            // A "dead" answer the guard does not believe (a configuration mistake is
            // suspected): kept, not reported, retried without spending an attempt — like an
            // unreachable provider — and never held (the provider answers: a probe would
            // succeed at once), after a pause long enough not to hammer it.
            Answer::Doubted { error } => {
                t.holdable = false;
                t.pending.push(target.token);
                t.not_before = t.not_before.max(Some(DOUBT_RETRY));
                t.error = error;
            }
            Answer::Unreachable { error, holds } => {
                let which = (target.token.platform(), target.environment);
                if !holds {
                    t.holdable = false;
                } else if !t.unreachable.contains(&which) {
                    t.unreachable.push(which);
                }
                t.pending.push(target.token);
                t.error = error;
            }
        }
    }
    t
}

/// Every token answered: delivered, retried (only the tokens not taken; no attempt spent
/// when they failed only because their provider was unreachable), dead after the last
/// attempt, or held when nothing could be reached at all.
fn pushed(
    answers: Vec<(Target, Answer)>,
    attempt: u32,
    max_attempts: u32,
    may_hold: bool,
) -> Disposition {
    let total = answers.len();
    let Tally {
        accepted,
        rejected,
        skipped,
        feedback,
        pending,
        unreachable,
        only_unreachable,
        holdable,
        not_before,
        error,
    } = tally(answers);
    if pending.is_empty() {
        return Disposition::Ack {
            outcome: Outcome::Delivered {
                accepted,
                rejected,
                skipped,
            },
            feedback,
        };
    }
    if only_unreachable && holdable && may_hold && pending.len() == total {
        return Disposition::Hold { unreachable, error };
    }
    let spent = !only_unreachable;
    let attempt = if spent {
        attempt.saturating_add(1)
    } else {
        attempt
    };
    if spent && attempt >= max_attempts {
        return Disposition::Dead {
            reason: format!("gave up after {attempt} attempts: {error}"),
            pending: Some((attempt, pending)),
            feedback,
        };
    }
    Disposition::Retry {
        attempt,
        pending,
        feedback,
        error,
        accepted,
        rejected,
        spent,
        not_before,
    }
}

/// Stopped mid-push: what was answered is kept (dead tokens reported), and the ring is
/// handed back with only the tokens still to reach — those never sent, never answered, or
/// answered "try again" — at the same attempt: a shutdown spends none. When every token
/// had its final answer before the stop, the ring is simply delivered.
fn interrupted(answers: Vec<(Target, Option<Answer>)>, attempt: u32) -> Disposition {
    let mut unanswered = Vec::new();
    let answered: Vec<(Target, Answer)> = answers
        .into_iter()
        .filter_map(|(target, answer)| match answer {
            Some(answer) => Some((target, answer)),
            None => {
                unanswered.push(target.token);
                None
            }
        })
        .collect();
    let Tally {
        accepted,
        rejected,
        skipped,
        feedback,
        mut pending,
        ..
    } = tally(answered);
    pending.extend(unanswered);
    if pending.is_empty() {
        return Disposition::Ack {
            outcome: Outcome::Delivered {
                accepted,
                rejected,
                skipped,
            },
            feedback,
        };
    }
    Disposition::HandBack {
        pending: Some((attempt, pending)),
        feedback,
    }
}

#[cfg(test)]
mod tests;
