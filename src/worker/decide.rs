//! What becomes of a ring: one pure function, [`decide`], from where the ring stands
//! ([`Step`]) to what the worker does with it ([`Disposition`]). `settle` only carries a
//! disposition out (publish, then ack); nothing else in the worker chooses between ack,
//! retry, dead letter, hold and hand-back. No broker, database or provider here: the table of
//! unit tests below covers every row.

use std::time::Duration;

use super::{DeviceToken, Environment, Invalidation};
use crate::provider::Answer;
use crate::token::Platform;

/// Whom an answer is about: the token, and what a feedback event about it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub token: DeviceToken,
    pub environment: Environment,
    /// The topic the notification went to.
    pub topic: Option<String>,
}

/// Where a ring stands when the worker decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
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
    /// Looked up: whether the gateway exists, and how many of its tokens this delivery goes
    /// to (on a retry, only those still pending and still registered).
    LookedUp {
        known: bool,
        recipients: usize,
        retry: bool,
    },
    /// Its payload cannot be built (too large for the provider).
    Unpushable { error: String },
    /// Every token it went to has an answer.
    Pushed {
        answers: Vec<(Target, Answer)>,
        attempt: u32,
        max_attempts: u32,
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
pub enum Outcome {
    Delivered {
        accepted: usize,
        rejected: usize,
    },
    /// Older than the ring TTL on its first delivery: not pushed.
    Expired,
    UnknownGateway,
    NoTokens,
}

/// What the worker does with a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
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
        environments: Vec<Environment>,
        error: String,
    },
    /// Publish it again to the rings exchange and ack (never a nack: that would spend the
    /// delivery budget).
    HandBack,
}

/// The one place that decides.
pub fn decide(step: Step) -> Disposition {
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
            match sender {
                Sender::Gateway(keyed) if keyed != claimed => {
                    return D::WrongGateway {
                        reason: format!(
                            "routing key ring.{keyed} names gateway {keyed:?}, but the body names {claimed:?}: the routing key decides who rang"
                        ),
                    }
                }
                Sender::Unknown { why } => {
                    return D::WrongGateway {
                        reason: format!("the routing key names no gateway: {why}"),
                    }
                }
                Sender::Gateway(_) | Sender::Worker => {}
            }
            // Worker processes took it and never settled it, again and again (they died or
            // panicked with it): dead-lettered here, with the reason, before the broker's
            // delivery limit would dead-letter it there with only `x-death` to say why.
            if returned.saturating_add(1) >= limit {
                D::Dead {
                    reason: format!(
                        "delivered {} times without being settled: the worker stopped or crashed with it each time (the queue's delivery limit is {limit})",
                        returned.saturating_add(1)
                    ),
                    pending: None,
                    feedback: Vec::new(),
                }
            } else if age <= ttl {
                D::Continue
            } else if attempt == 0 && !retry && !redelivered {
                ack(Outcome::Expired)
            } else {
                let pending = if retry { "some" } else { "all" };
                D::Dead {
                    reason: format!(
                        "expired ({ttl:?} old) after {attempt} attempt(s); {pending} token(s) pending"
                    ),
                    pending: None,
                    feedback: Vec::new(),
                }
            }
        }
        Step::LookupRefused { reason } => D::Dead {
            reason,
            pending: None,
            feedback: Vec::new(),
        },
        Step::LookedUp {
            known,
            recipients,
            retry,
        } => match (known, recipients, retry) {
            (false, _, _) => ack(Outcome::UnknownGateway),
            // The tokens still pending have been deleted since: nothing is left to do.
            (true, 0, true) => ack(Outcome::Delivered {
                accepted: 0,
                rejected: 0,
            }),
            (true, 0, false) => ack(Outcome::NoTokens),
            (true, _, _) => D::Continue,
        },
        Step::Unpushable { error } => D::Dead {
            reason: error,
            pending: None,
            feedback: Vec::new(),
        },
        Step::Pushed {
            answers,
            attempt,
            max_attempts,
        } => pushed(answers, attempt, max_attempts),
        Step::ExpiredWhileHeld { ttl, attempt, why } => D::Dead {
            reason: format!("expired ({ttl:?} old) while held after {attempt} attempt(s): {why}"),
            pending: None,
            feedback: Vec::new(),
        },
        Step::Stopping | Step::NotDurable { .. } => D::HandBack,
        Step::TooLarge { error } => D::Dead {
            reason: format!("cannot be retried: {error}"),
            pending: None,
            feedback: Vec::new(),
        },
    }
}

fn ack(outcome: Outcome) -> Disposition {
    Disposition::Ack {
        outcome,
        feedback: Vec::new(),
    }
}

/// Every token answered: delivered, retried (only the tokens not taken; no attempt spent
/// when they failed only because their provider was unreachable), dead after the last
/// attempt, or held when nothing could be reached at all.
fn pushed(answers: Vec<(Target, Answer)>, attempt: u32, max_attempts: u32) -> Disposition {
    let (mut accepted, mut rejected) = (0, 0);
    let mut feedback = Vec::new();
    let mut pending = Vec::new();
    let mut unreachable: Vec<Environment> = Vec::new();
    let mut only_unreachable = true;
    let mut holdable = true;
    let mut error = String::new();
    let total = answers.len();
    for (target, answer) in answers {
        match answer {
            Answer::Accepted => accepted += 1,
            Answer::Dead {
                reason,
                since,
                observed_at,
            } => {
                rejected += 1;
                feedback.push(Invalidation {
                    token: target.token,
                    environment: target.environment,
                    topic: target.topic,
                    reason,
                    invalid_since: since,
                    observed_at,
                });
            }
            // No provider for it (or none that carries its kind): settled like a rejection.
            Answer::Rejected { .. } | Answer::Skipped(_) => rejected += 1,
            Answer::Retry { error: e, .. } => {
                pending.push(target.token);
                only_unreachable = false;
                error = e;
            }
            Answer::Unreachable { error: e } => {
                // Only APNs holds a ring: an FCM token waits on the retry path (no attempt
                // spent), so a down FCM never pauses the consumption iPhones need.
                if target.token.platform() == Platform::Fcm {
                    holdable = false;
                } else if !unreachable.contains(&target.environment) {
                    unreachable.push(target.environment);
                }
                pending.push(target.token);
                error = e;
            }
        }
    }
    if pending.is_empty() {
        return Disposition::Ack {
            outcome: Outcome::Delivered { accepted, rejected },
            feedback,
        };
    }
    if only_unreachable && holdable && pending.len() == total {
        return Disposition::Hold {
            environments: unreachable,
            error,
        };
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
    }
}

#[cfg(test)]
mod tests;
