//! The decision table: one test per row of `decide`, no broker, database or provider.

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
        mistake: None,
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
        after: None,
    }
}

/// A provider that holds its rings (APNs) could not be reached.
fn unreachable() -> Answer {
    Answer::Unreachable {
        error: "refused".into(),
        holds: true,
    }
}

/// A provider that never holds a ring (FCM) could not be reached.
fn unreachable_never_holding() -> Answer {
    Answer::Unreachable {
        error: "refused".into(),
        holds: false,
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
        may_hold: true,
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
    for (attempt, retry, redelivered) in [(0, false, true), (0, true, false), (2, true, false)] {
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
            suppressed: 0,
        })
    };
    assert_eq!(looked(false, 0, false), ack(Outcome::UnknownGateway));
    assert_eq!(looked(true, 0, false), ack(Outcome::NoTokens));
    assert_eq!(
        looked(true, 0, true),
        ack(Outcome::Delivered {
            accepted: 0,
            rejected: 0,
            skipped: 0
        }),
        "a retry whose pending tokens were deleted since is done"
    );
    assert_eq!(looked(true, 3, false), Disposition::Continue);
    assert_eq!(looked(true, 1, true), Disposition::Continue);
    // Seen before, and the ledger says every token it still had to reach took it already.
    for retry in [false, true] {
        assert_eq!(
            decide(Step::LookedUp {
                known: true,
                recipients: 0,
                retry,
                suppressed: 2
            }),
            ack(Outcome::AlreadyDelivered { suppressed: 2 })
        );
    }
    // Some taken before, some not: the others are pushed.
    assert_eq!(
        decide(Step::LookedUp {
            known: true,
            recipients: 1,
            retry: false,
            suppressed: 2
        }),
        Disposition::Continue
    );
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
                rejected: 2,
                skipped: 0
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
            not_before,
        } => {
            assert_eq!((attempt, accepted, rejected, spent), (1, 1, 1, true));
            assert_eq!(not_before, None, "APNs asks for no wait");
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
            unreachable: vec![
                (crate::token::Platform::APNS, Production),
                (crate::token::Platform::APNS, Sandbox)
            ],
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
            reason:
                "expired (60s old) while held after 1 attempt(s): the token lookup failed: 42P01"
                    .into(),
            pending: None,
            feedback: vec![]
        }
    );
}

#[test]
fn stopping_or_failing_to_make_an_outcome_durable_hands_back_and_oversize_goes_dead() {
    let as_it_came = Disposition::HandBack {
        pending: None,
        feedback: vec![],
    };
    assert_eq!(decide(Step::Stopping), as_it_came);
    assert_eq!(
        decide(Step::NotDurable {
            error: "not confirmed".into()
        }),
        as_it_came
    );
    assert!(matches!(
        decide(Step::TooLarge { error: "over frame_max".into() }),
        Disposition::Dead { reason, .. } if reason == "cannot be retried: over frame_max"
    ));
}

#[test]
fn a_push_interrupted_by_the_stop_hands_back_only_the_tokens_not_yet_reached() {
    let interrupted = |answers: Vec<Option<Answer>>, attempt| {
        let answers = answers
            .into_iter()
            .enumerate()
            .map(|(i, a)| (target(i as u8, Environment::Production), a))
            .collect();
        decide(Step::Interrupted { answers, attempt })
    };
    // 0 accepted, 1 dead, 2 never sent, 3 answered "try again", 4 unreachable: tokens 2, 3
    // and 4 go back, at the same attempt, and the dead one is reported.
    assert_eq!(
        interrupted(
            vec![
                Some(Answer::Accepted),
                Some(dead_answer()),
                None,
                Some(retry("500")),
                Some(unreachable()),
            ],
            2
        ),
        Disposition::HandBack {
            pending: Some((2, vec![token(3), token(4), token(2)])),
            feedback: vec![dead(1)],
        }
    );
    // Nothing answered: all of it goes back.
    assert_eq!(
        interrupted(vec![None, None], 0),
        Disposition::HandBack {
            pending: Some((0, vec![token(0), token(1)])),
            feedback: vec![],
        }
    );
    // Every token had its final answer before the stop: delivered, not handed back.
    assert_eq!(
        interrupted(vec![Some(Answer::Accepted), Some(dead_answer())], 1),
        Disposition::Ack {
            outcome: Outcome::Delivered {
                accepted: 1,
                rejected: 1,
                skipped: 0
            },
            feedback: vec![dead(1)],
        }
    );
}
fn fcm_target(n: u8) -> Target {
    Target {
        token: DeviceToken::parse_fcm(&format!("fcm-{n}:APA91b")).unwrap(),
        environment: Environment::Production,
        topic: None,
    }
}

#[test]
fn skipped_tokens_settle_like_rejections_are_never_retried_and_not_called_rejected() {
    use crate::provider::Skip;
    let answers = vec![
        (target(0, Environment::Production), Answer::Accepted),
        (
            fcm_target(1),
            Answer::Skipped(Skip::Unconfigured(Platform::FCM)),
        ),
        (
            target(2, Environment::Production),
            Answer::Skipped(Skip::Unsupported(crate::token::Platform::APNS)),
        ),
    ];
    let d = decide(Step::Pushed {
        answers,
        attempt: 0,
        max_attempts: 3,
        may_hold: true,
    });
    assert_eq!(
        d,
        Disposition::Ack {
            outcome: Outcome::Delivered {
                accepted: 1,
                rejected: 0,
                skipped: 2
            },
            feedback: vec![]
        }
    );
}

#[test]
fn an_unreachable_fcm_waits_on_the_retry_path_and_never_holds_the_consumption() {
    let answers = vec![
        (fcm_target(1), unreachable_never_holding()),
        (fcm_target(2), unreachable_never_holding()),
    ];
    match decide(Step::Pushed {
        answers,
        attempt: 2,
        max_attempts: 3,
        may_hold: true,
    }) {
        Disposition::Retry {
            attempt,
            pending,
            spent,
            ..
        } => {
            assert_eq!((attempt, spent), (2, false), "no attempt spent");
            assert_eq!(pending, vec![fcm_target(1).token, fcm_target(2).token]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retry_waits_at_least_the_longest_wait_the_provider_asked_for() {
    let after = |secs| Answer::Retry {
        error: "FCM QUOTA_EXCEEDED".into(),
        answered: true,
        after: Some(Duration::from_secs(secs)),
    };
    match pushed(
        vec![after(3), retry("APNs 503"), after(7), Answer::Accepted],
        0,
    ) {
        Disposition::Retry { not_before, .. } => {
            assert_eq!(not_before, Some(Duration::from_secs(7)))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn with_both_providers_configured_a_down_one_sends_its_rings_down_the_retry_path_unspent() {
    let answers = vec![
        (target(0, Environment::Production), unreachable()),
        (target(1, Environment::Production), unreachable()),
    ];
    let step = |may_hold| Step::Pushed {
        answers: answers.clone(),
        attempt: 2,
        max_attempts: 3,
        may_hold,
    };
    assert!(matches!(decide(step(true)), Disposition::Hold { .. }));
    match decide(step(false)) {
        Disposition::Retry {
            attempt,
            pending,
            spent,
            ..
        } => {
            assert_eq!((attempt, spent), (2, false), "no attempt spent");
            assert_eq!(pending, vec![token(0), token(1)]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn doubted_tokens_wait_on_the_retry_path_unreported_without_spending_an_attempt() {
    let doubted = || Answer::Doubted {
        error: "APNs answered BadDeviceToken for 4 of the 4 tokens".into(),
    };
    // Every token doubted, at the last attempt: retried (never held: APNs answers), none
    // reported for the purge, no attempt spent, not before the guard's pause.
    match pushed(vec![doubted(), doubted()], 2) {
        Disposition::Retry {
            attempt,
            pending,
            feedback,
            spent,
            not_before,
            ..
        } => {
            assert_eq!((attempt, spent), (2, false));
            assert_eq!(pending, vec![token(0), token(1)]);
            assert!(feedback.is_empty(), "no token reported dead");
            assert_eq!(not_before, Some(crate::provider::guard::DOUBT_RETRY));
        }
        other => panic!("{other:?}"),
    }
    // Beside an accepted token and a truly dead one: only the doubted one is pending.
    match pushed(vec![Answer::Accepted, doubted(), dead_answer()], 0) {
        Disposition::Retry {
            pending,
            feedback,
            spent,
            accepted,
            ..
        } => {
            assert_eq!((pending, spent, accepted), (vec![token(1)], false, 1));
            assert_eq!(feedback, vec![dead(2)]);
        }
        other => panic!("{other:?}"),
    }
}
