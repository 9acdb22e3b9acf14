//! What becomes of a ring: one pure function, [`decide`], from where the ring stands
//! ([`Step`]) to what the worker does with it ([`Disposition`]). `settle` only carries a
//! disposition out (publish, then ack); nothing else in the worker chooses between ack,
//! retry, dead letter, hold and hand-back. No broker, database or provider here: the table of
//! unit tests below covers every row.

use std::time::Duration;

use super::{DeviceToken, Environment, Invalidation};
use crate::provider::Answer;

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
            // delivery limit would drop it there without one.
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
            Answer::Rejected { .. } => rejected += 1,
            Answer::Retry { error: e, .. } => {
                pending.push(target.token);
                only_unreachable = false;
                error = e;
            }
            Answer::Unreachable { error: e } => {
                pending.push(target.token);
                if !unreachable.contains(&target.environment) {
                    unreachable.push(target.environment);
                }
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
    if only_unreachable && pending.len() == total {
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
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn token(n: u8) -> DeviceToken {
        DeviceToken::parse(&format!("{n:02x}").repeat(32)).unwrap()
    }

    const WHEN: OffsetDateTime = time::macros::datetime!(2026-11-28 09:00 UTC);

    fn target(n: u8, environment: Environment) -> Target {
        Target {
            token: token(n),
            environment,
            topic: Some("t".into()),
        }
    }

    fn dead_answer() -> Answer {
        Answer::Dead {
            reason: "Unregistered".into(),
            since: WHEN,
            observed_at: WHEN,
        }
    }

    fn dead(n: u8) -> Invalidation {
        Invalidation {
            token: token(n),
            environment: Environment::Production,
            topic: Some("t".into()),
            reason: "Unregistered".into(),
            invalid_since: WHEN,
            observed_at: WHEN,
        }
    }

    fn retry(e: &str) -> Answer {
        Answer::Retry {
            error: e.into(),
            answered: true,
        }
    }

    fn unreachable() -> Answer {
        Answer::Unreachable {
            error: "refused".into(),
        }
    }

    fn pushed_in(answers: Vec<(Environment, Answer)>, attempt: u32) -> Disposition {
        let answers = answers
            .into_iter()
            .enumerate()
            .map(|(i, (env, a))| (target(i as u8, env), a))
            .collect();
        decide(Step::Pushed {
            answers,
            attempt,
            max_attempts: 3,
        })
    }

    fn pushed(answers: Vec<Answer>, attempt: u32) -> Disposition {
        let production = answers
            .into_iter()
            .map(|a| (Environment::Production, a))
            .collect();
        pushed_in(production, attempt)
    }

    const MIN: Duration = Duration::from_secs(60);

    fn arrived(age: u64, attempt: u32, retry: bool, redelivered: bool) -> Disposition {
        decide(Step::Arrived {
            sender: Sender::Gateway("gw".into()),
            claimed: "gw".into(),
            age: Duration::from_secs(age),
            ttl: MIN,
            attempt,
            retry,
            redelivered,
            returned: u32::from(redelivered),
            limit: 20,
        })
    }

    #[test]
    fn a_delivery_that_is_not_a_ring_is_dead_with_its_parse_error() {
        assert_eq!(
            decide(Step::Unreadable {
                error: "missing field `v`".into()
            }),
            Disposition::Dead {
                reason: "missing field `v`".into(),
                pending: None,
                feedback: vec![]
            }
        );
    }

    #[test]
    fn a_fresh_ring_goes_on_and_a_stale_one_is_expired_or_dead() {
        assert_eq!(arrived(59, 0, false, false), Disposition::Continue);
        assert_eq!(arrived(60, 2, true, true), Disposition::Continue);
        assert_eq!(arrived(61, 0, false, false), ack(Outcome::Expired));
        for (attempt, retry, redelivered) in [(0, false, true), (0, true, false), (2, true, false)]
        {
            match arrived(61, attempt, retry, redelivered) {
                Disposition::Dead { reason, .. } => {
                    assert!(reason.starts_with("expired (60s old) after"), "{reason}")
                }
                other => panic!("{attempt} {retry} {redelivered}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_routing_key_decides_who_rang_and_a_body_naming_another_gateway_is_refused() {
        let arrived = |sender, claimed: &str, age| {
            decide(Step::Arrived {
                sender,
                claimed: claimed.into(),
                age: Duration::from_secs(age),
                ttl: MIN,
                attempt: 0,
                retry: false,
                redelivered: false,
                returned: 0,
                limit: 20,
            })
        };
        let gateway = |id: &str| Sender::Gateway(id.into());
        assert_eq!(arrived(gateway("gw-a"), "gw-a", 1), Disposition::Continue);
        assert_eq!(
            arrived(Sender::Worker, "gw-a", 1),
            Disposition::Continue,
            "a retry of the previous release names its gateway in the body"
        );
        assert_eq!(
            arrived(gateway("gw-b"), "gw-a", 1),
            Disposition::WrongGateway {
                reason: "routing key ring.gw-b names gateway \"gw-b\", but the body names \"gw-a\": the routing key decides who rang".into()
            }
        );
        // Refused before its age is looked at: never counted as merely expired.
        assert!(matches!(
            arrived(gateway("gw-b"), "gw-a", 3600),
            Disposition::WrongGateway { .. }
        ));
        match arrived(
            Sender::Unknown {
                why: "forged envelope".into(),
            },
            "gw-a",
            1,
        ) {
            Disposition::WrongGateway { reason } => {
                assert!(reason.contains("forged envelope"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_ring_returned_unsettled_until_the_delivery_limit_is_dead_with_the_reason() {
        let returned = |returned| {
            decide(Step::Arrived {
                sender: Sender::Worker,
                claimed: "gw".into(),
                age: Duration::ZERO,
                ttl: MIN,
                attempt: 0,
                retry: false,
                redelivered: true,
                returned,
                limit: 20,
            })
        };
        assert_eq!(returned(18), Disposition::Continue);
        match returned(19) {
            Disposition::Dead { reason, .. } => {
                assert!(
                    reason.starts_with("delivered 20 times without being settled"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_lookup_decides_unknown_gateways_and_gateways_without_phones() {
        let looked = |known, recipients, retry| {
            decide(Step::LookedUp {
                known,
                recipients,
                retry,
            })
        };
        assert_eq!(looked(false, 0, false), ack(Outcome::UnknownGateway));
        assert_eq!(looked(true, 0, false), ack(Outcome::NoTokens));
        assert_eq!(
            looked(true, 0, true),
            ack(Outcome::Delivered {
                accepted: 0,
                rejected: 0
            }),
            "a retry whose pending tokens were deleted since is done"
        );
        assert_eq!(looked(true, 3, false), Disposition::Continue);
        assert_eq!(looked(true, 1, true), Disposition::Continue);
        assert!(matches!(
            decide(Step::LookupRefused { reason: "22012 division by zero".into() }),
            Disposition::Dead { reason, pending: None, .. } if reason == "22012 division by zero"
        ));
        assert!(matches!(
            decide(Step::Unpushable {
                error: "payload too large".into()
            }),
            Disposition::Dead { .. }
        ));
    }

    #[test]
    fn every_token_answered_is_delivered_with_feedback_for_the_dead_ones() {
        assert_eq!(
            pushed(
                vec![
                    Answer::Accepted,
                    dead_answer(),
                    Answer::Rejected {
                        reason: "TopicDisallowed".into(),
                        ours: true
                    }
                ],
                0
            ),
            Disposition::Ack {
                outcome: Outcome::Delivered {
                    accepted: 1,
                    rejected: 2
                },
                feedback: vec![dead(1)]
            }
        );
    }

    #[test]
    fn tokens_that_failed_are_retried_alone_and_spend_an_attempt() {
        match pushed(vec![Answer::Accepted, retry("APNs 503"), dead_answer()], 0) {
            Disposition::Retry {
                attempt,
                pending,
                feedback,
                error,
                accepted,
                rejected,
                spent,
            } => {
                assert_eq!((attempt, accepted, rejected, spent), (1, 1, 1, true));
                assert_eq!(pending, vec![token(1)]);
                assert_eq!(feedback, vec![dead(2)], "reported before the retry");
                assert_eq!(error, "APNs 503");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_last_attempt_goes_dead_naming_the_tokens_never_reached() {
        assert_eq!(
            pushed(vec![Answer::Accepted, retry("APNs 500")], 2),
            Disposition::Dead {
                reason: "gave up after 3 attempts: APNs 500".into(),
                pending: Some((3, vec![token(1)])),
                feedback: vec![]
            }
        );
    }

    #[test]
    fn nothing_reachable_holds_the_ring_without_spending_anything() {
        use Environment::{Production, Sandbox};
        assert_eq!(
            pushed_in(
                vec![
                    (Production, unreachable()),
                    (Sandbox, unreachable()),
                    (Production, unreachable())
                ],
                4
            ),
            Disposition::Hold {
                environments: vec![Production, Sandbox],
                error: "refused".into()
            },
            "held even at the last attempt: the worker's trouble"
        );
    }

    #[test]
    fn tokens_of_an_unreachable_provider_wait_on_the_retry_path_without_spending_an_attempt() {
        match pushed_in(
            vec![
                (Environment::Production, Answer::Accepted),
                (Environment::Sandbox, unreachable()),
            ],
            2,
        ) {
            Disposition::Retry {
                attempt,
                pending,
                spent,
                ..
            } => {
                assert_eq!(
                    (attempt, spent),
                    (2, false),
                    "not dead at max attempts either"
                );
                assert_eq!(pending, vec![token(1)]);
            }
            other => panic!("{other:?}"),
        }
        // A real failure beside it spends the attempt.
        assert!(matches!(
            pushed(vec![retry("503"), unreachable()], 0),
            Disposition::Retry {
                attempt: 1,
                spent: true,
                ..
            }
        ));
    }

    #[test]
    fn held_rings_that_expire_are_dead_with_why_they_were_held() {
        assert_eq!(
            decide(Step::ExpiredWhileHeld {
                ttl: MIN,
                attempt: 1,
                why: "the token lookup failed: 42P01".into()
            }),
            Disposition::Dead {
                reason: "expired (60s old) while held after 1 attempt(s): the token lookup failed: 42P01"
                    .into(),
                pending: None,
                feedback: vec![]
            }
        );
    }

    #[test]
    fn stopping_or_failing_to_make_an_outcome_durable_hands_back_and_oversize_goes_dead() {
        assert_eq!(decide(Step::Stopping), Disposition::HandBack);
        assert_eq!(
            decide(Step::NotDurable {
                error: "not confirmed".into()
            }),
            Disposition::HandBack
        );
        assert!(matches!(
            decide(Step::TooLarge { error: "over frame_max".into() }),
            Disposition::Dead { reason, .. } if reason == "cannot be retried: over frame_max"
        ));
    }
}
