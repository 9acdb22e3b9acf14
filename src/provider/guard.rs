//! The guard against a configuration mistake (docs/design.md, Guarantees: "A configuration mistake
//! never deletes the fleet's tokens"). A push service that answers "this token is dead" to
//! every token at once is not reporting dead phones: it is telling ringpush that ringpush asks
//! the wrong way — production and sandbox swapped (`BadDeviceToken`), a wrong topic
//! (`DeviceTokenNotForTopic`), another Firebase project's service account
//! (`SENDER_ID_MISMATCH`). Taken at its word, that deletes every customer's tokens.
//!
//! So every "dead" answer is judged against the other answers of its **scope** — the
//! provider, and what the request was sent under: an APNs environment and topic, an FCM
//! project — before it may become a feedback event. A dead answer is **doubted** (not
//! reported; the token goes on the retry path without spending an attempt, so its ring is
//! delivered once the answers make sense again within its TTL) when either:
//!
//! Only the answers that say "this token was never valid here" are judged — `BadDeviceToken`,
//! `DeviceTokenNotForTopic`, `SENDER_ID_MISMATCH`, binary status 8 (an [`Answer::Dead`] with a
//! `mistake`, the setting to check, which each provider gives its own such answers): the ones a
//! configuration mistake gives every token. `Unregistered`, `ExpiredToken` and FCM's
//! `UNREGISTERED` say the app left that phone (APNs even says when); no setting of ours
//! produces them, and they are always reported. A judged answer is **doubted** when either:
//!
//! 1. **They outnumber the accepted.** Among the scope's answers of the last [`WINDOW`], the
//!    judged dead ones outnumber the accepted ones (a retry concentrates the tokens that
//!    failed, so its dead answers are not counted again; its accepted ones are). A ring's own answers count
//!    before it is judged. A few dead phones among many live ones never trip it; a scope
//!    whose every answer is "never valid" trips it from its first ring.
//! 2. **An answer contradicts one before.** A token this worker saw accepted within the last
//!    [`REMEMBER`] in the same scope is now answered "never valid here" — which it was within
//!    the hour. That is the service or the configuration changing under a running worker:
//!    every judged answer of the scope is doubted for the next [`WINDOW`].
//!
//! While a scope doubts, `/readyz` answers 503 naming the suspicion and the setting to check,
//! one warning is logged when it starts (and once a minute while it lasts), and
//! `ringpush_config_suspected{platform}` is 1. A doubted token costs a retry; a wrongly
//! trusted one costs a customer's phone — the rule leans towards doubt.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Answer;
use crate::token::{DeviceToken, Platform};

/// How far back the answers of a scope are weighed, and how long a contradiction keeps the
/// scope doubting.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// How long a token accepted in a scope is remembered (for rule 2).
pub(crate) const REMEMBER: Duration = Duration::from_secs(3600);
/// How many accepted tokens a scope remembers at most (64-bit hashes; the oldest go first):
/// about half a megabyte, whatever the rate; a contradiction is still seen at the first
/// token of the last 16,384 accepted.
const REMEMBER_MAX: usize = 16_384;
/// How soon a doubted token is tried again (the retry tier at least this long).
pub(crate) const DOUBT_RETRY: Duration = Duration::from_secs(4);
/// How long `/readyz` keeps saying so after the last doubted answer.
const READY_HOLD: Duration = Duration::from_secs(30);

/// What a request was sent under: answers are weighed against those of the same scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub platform: Platform,
    /// Which credentials and addressing: APNs's environment and topic
    /// (`production com.example.doorbell`), FCM's project (`project my-project`).
    pub what: String,
}

impl Scope {
    /// The scope `what` of `platform` (each provider says what its scopes are: APNs an
    /// environment and topic, FCM a project).
    pub fn new(platform: Platform, what: impl Into<String>) -> Self {
        Self {
            platform,
            what: what.into(),
        }
    }
}

/// One answer to judge: its scope, its token, whether it answered a first push, and the
/// answer (a `Dead` one may become `Doubted`).
pub(crate) struct Judged<'a> {
    pub scope: Scope,
    pub token: &'a DeviceToken,
    pub first: bool,
    pub answer: &'a mut Answer,
}

/// The guard of one worker: per scope, the recent answers and the tokens accepted lately.
#[derive(Debug, Default)]
pub struct Guard {
    scopes: Mutex<HashMap<Scope, State>>,
}

#[derive(Debug, Default)]
struct State {
    /// The answers counted over the last `WINDOW`, per second (at most 61 buckets: the
    /// memory does not grow with the rate): the second, and the dead and accepted ones.
    recent: VecDeque<(u64, usize, usize)>,
    dead: usize,
    accepted: usize,
    /// Tokens accepted lately (hash → when), and their order of arrival for eviction.
    accepted_tokens: HashMap<u64, Instant>,
    accepted_order: VecDeque<(u64, Instant)>,
    /// A contradiction (rule 2) keeps the scope doubting until then.
    contradicted_until: Option<Instant>,
    /// Doubting now: since when, why, and when it was last warned about.
    doubt: Option<Doubt>,
}

#[derive(Debug, Clone)]
struct Doubt {
    since: Instant,
    last: Instant,
    warned: Instant,
    reason: String,
    /// The setting to check.
    mistake: &'static str,
    doubted: u64,
}

/// A token's key among the accepted (SipHash: cheap, and a collision only makes a
/// contradiction a little likelier).
fn hash(token: &DeviceToken) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.as_str().hash(&mut h);
    h.finish()
}

/// Whole seconds since this process's first answer: the buckets' clock.
fn second(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_secs()
}

/// The state of `scope`, made on first use (the scope cloned only then).
fn state_of<'s>(scopes: &'s mut HashMap<Scope, State>, scope: &Scope) -> &'s mut State {
    if !scopes.contains_key(scope) {
        scopes.insert(scope.clone(), State::default());
    }
    scopes.get_mut(scope).expect("just made")
}

impl State {
    fn prune(&mut self, now: Instant) {
        let oldest = second(now).saturating_sub(WINDOW.as_secs());
        while let Some(&(at, dead, accepted)) = self.recent.front() {
            if at >= oldest {
                break;
            }
            self.recent.pop_front();
            self.dead -= dead;
            self.accepted -= accepted;
        }
        while let Some(&(h, at)) = self.accepted_order.front() {
            if now.duration_since(at) <= REMEMBER && self.accepted_order.len() <= REMEMBER_MAX {
                break;
            }
            self.accepted_order.pop_front();
            if self.accepted_tokens.get(&h) == Some(&at) {
                self.accepted_tokens.remove(&h);
            }
        }
    }

    /// Records one answer: a "never valid here" one for a token accepted lately is a
    /// contradiction; an accepted token is remembered. A retry concentrates the tokens that
    /// failed: its "never valid" answers are not counted (they were at the first push); its
    /// accepted ones are.
    fn record_answer(&mut self, now: Instant, token: u64, dead: bool, first: bool) {
        self.prune(now);
        if dead {
            if self.accepted_tokens.contains_key(&token) {
                self.contradicted_until = Some(now + WINDOW);
            }
        } else {
            self.accepted_tokens.insert(token, now);
            self.accepted_order.push_back((token, now));
        }
        if first || !dead {
            self.record(now, dead);
        }
    }

    /// Whether a "never valid here" answer (`reason`, with the setting to check) is doubted
    /// now, and then why: the scope's doubt is noted, and warned about when it starts and once
    /// a minute.
    fn doubts(
        &mut self,
        now: Instant,
        scope: &Scope,
        reason: String,
        mistake: &'static str,
    ) -> Option<String> {
        let contradiction = self.contradicted_until.is_some_and(|until| now < until);
        if !contradiction && self.dead <= self.accepted {
            return None;
        }
        let name = scope.platform.provider_name();
        let why = if contradiction {
            format!("{name} answered {reason} for tokens it accepted within the hour")
        } else {
            format!(
                "{name} answered {reason} for {} of the {} tokens of the last {}s",
                self.dead,
                self.dead + self.accepted,
                WINDOW.as_secs()
            )
        };
        let doubt = self.doubt.get_or_insert_with(|| Doubt {
            since: now,
            last: now,
            warned: now,
            reason: reason.clone(),
            mistake,
            doubted: 0,
        });
        let first = doubt.doubted == 0;
        (doubt.last, doubt.reason, doubt.mistake) = (now, reason, mistake);
        doubt.doubted += 1;
        if first || now.duration_since(doubt.warned) >= Duration::from_secs(60) {
            doubt.warned = now;
            warn!(
                platform = scope.platform.as_str(),
                scope = scope.what,
                doubted = doubt.doubted,
                "a configuration mistake is suspected: {why}; {mistake}; the tokens are kept (not purged) and their rings retried until the answers make sense again"
            );
        }
        Some(format!(
            "{why}: a configuration mistake is suspected; {mistake}"
        ))
    }

    /// Ends the scope's doubt, saying so once, when its answers make sense again and nothing
    /// was doubted for [`READY_HOLD`].
    fn settle_doubt(&mut self, now: Instant, scope: &Scope) {
        let Some(doubt) = &self.doubt else { return };
        let still =
            self.dead > self.accepted || self.contradicted_until.is_some_and(|until| now < until);
        if !still && now.duration_since(doubt.last) >= READY_HOLD {
            info!(
                platform = scope.platform.as_str(),
                scope = scope.what,
                doubted = doubt.doubted,
                lasted_s = now.duration_since(doubt.since).as_secs(),
                "the provider's answers make sense again; dead tokens are reported as before"
            );
            self.doubt = None;
        }
    }

    fn record(&mut self, now: Instant, dead: bool) {
        let at = second(now);
        if self.recent.back().is_none_or(|b| b.0 != at) {
            self.recent.push_back((at, 0, 0));
        }
        let bucket = self.recent.back_mut().expect("just made");
        if dead {
            bucket.1 += 1;
            self.dead += 1;
        } else {
            bucket.2 += 1;
            self.accepted += 1;
        }
    }
}

impl Guard {
    /// Judges the answers of one push: records them, then doubts each dead answer whose
    /// scope looks misconfigured (module docs), turning it into [`Answer::Doubted`].
    pub(crate) fn review(&self, answers: Vec<Judged<'_>>) {
        if answers.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        // Record every answer first: a ring's own answers count before it is judged. Only
        // the answers that say "never valid here" weigh against the accepted ones.
        for j in &answers {
            let dead = match &*j.answer {
                Answer::Accepted => false,
                Answer::Dead {
                    mistake: Some(_), ..
                } => true,
                _ => continue,
            };
            state_of(&mut scopes, &j.scope).record_answer(now, hash(j.token), dead, j.first);
        }
        for j in answers {
            let Answer::Dead {
                reason,
                mistake: Some(mistake),
                ..
            } = &*j.answer
            else {
                continue;
            };
            let (reason, mistake) = (reason.clone(), *mistake);
            let state = state_of(&mut scopes, &j.scope);
            if let Some(error) = state.doubts(now, &j.scope, reason, mistake) {
                *j.answer = Answer::Doubted { error };
            }
        }
        // A scope that doubts no more says so once.
        for (scope, state) in scopes.iter_mut() {
            state.settle_doubt(now, scope);
        }
    }

    /// The suspicion `/readyz` names, if a scope doubted an answer within the last 30 s.
    pub fn suspicion(&self) -> Option<String> {
        let now = Instant::now();
        let scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        let mut found: Vec<String> = scopes
            .iter()
            .filter_map(|(scope, state)| {
                let doubt = state.doubt.as_ref()?;
                (now.duration_since(doubt.last) < READY_HOLD).then(|| {
                    format!(
                        "{} answers {} to most tokens of {} — a configuration mistake is suspected; {}; the tokens are kept and their rings retried",
                        scope.platform.provider_name(),
                        doubt.reason,
                        scope.what,
                        doubt.mistake
                    )
                })
            })
            .collect();
        found.sort();
        (!found.is_empty()).then(|| found.join("; "))
    }

    /// Whether a scope of `platform` doubted an answer within the last 30 s.
    pub fn suspected(&self, platform: Platform) -> bool {
        let now = Instant::now();
        let scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
        scopes.iter().any(|(scope, state)| {
            scope.platform == platform
                && state
                    .doubt
                    .as_ref()
                    .is_some_and(|d| now.duration_since(d.last) < READY_HOLD)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    fn dead(mistake: Option<&'static str>) -> Answer {
        let now = OffsetDateTime::now_utc();
        Answer::Dead {
            reason: "BadDeviceToken".into(),
            since: now,
            observed_at: now,
            mistake,
        }
    }

    fn token(i: u32) -> DeviceToken {
        DeviceToken::parse(&format!("{i:08x}")).unwrap()
    }

    fn push(guard: &Guard, scope: &Scope, answers: &mut [(DeviceToken, Answer)], first: bool) {
        guard.review(
            answers
                .iter_mut()
                .map(|(t, a)| Judged {
                    scope: scope.clone(),
                    token: t,
                    first,
                    answer: a,
                })
                .collect(),
        );
    }

    fn doubted(answers: &[(DeviceToken, Answer)]) -> usize {
        answers
            .iter()
            .filter(|(_, a)| matches!(a, Answer::Doubted { .. }))
            .count()
    }

    #[test]
    fn every_token_dead_is_doubted_from_the_first_ring() {
        let guard = Guard::default();
        let scope = Scope::new(Platform::APNS, "production com.example");
        let mut ring: Vec<_> = (0..4)
            .map(|i| (token(i), dead(Some("check the environment"))))
            .collect();
        push(&guard, &scope, &mut ring, true);
        assert_eq!(doubted(&ring), 4);
        let why = guard.suspicion().expect("suspected");
        assert!(why.contains("check the environment"), "{why}");
        assert!(guard.suspected(Platform::APNS));
        assert!(!guard.suspected(Platform::FCM));
        // A single-phone ring into the mistake is doubted too.
        let other = Scope::new(Platform::FCM, "project p");
        let mut one = vec![(token(9), dead(Some("check the project")))];
        push(&guard, &other, &mut one, true);
        assert_eq!(doubted(&one), 1);
    }

    #[test]
    fn a_few_dead_phones_among_live_ones_are_trusted() {
        let guard = Guard::default();
        let scope = Scope::new(Platform::APNS, "production com.example");
        for r in 0..50u32 {
            let mut ring: Vec<_> = (0..4)
                .map(|i| {
                    let t = token(r * 4 + i);
                    let a = if r % 10 == 0 && i == 0 {
                        dead(Some("check the environment"))
                    } else {
                        Answer::Accepted
                    };
                    (t, a)
                })
                .collect();
            push(&guard, &scope, &mut ring, true);
            assert_eq!(doubted(&ring), 0, "ring {r}");
        }
        // Even a ring whose only phone is dead, alone, on a quiet day with one live phone.
        let quiet = Guard::default();
        let mut ring = vec![
            (token(1), Answer::Accepted),
            (token(2), dead(Some("check the topic"))),
        ];
        push(&quiet, &scope, &mut ring, true);
        assert_eq!(doubted(&ring), 0);
        assert_eq!(quiet.suspicion(), None);
        // Retries are judged but not counted: the dead token retried does not tip the scale.
        for _ in 0..5 {
            let mut retry = vec![(token(2), dead(Some("check the topic")))];
            push(&quiet, &scope, &mut retry, false);
            assert_eq!(doubted(&retry), 0);
        }
    }

    #[test]
    fn a_token_accepted_lately_and_now_never_valid_makes_the_scope_doubt() {
        let guard = Guard::default();
        let scope = Scope::new(Platform::APNS, "sandbox com.example");
        let mut before: Vec<_> = (0..100).map(|i| (token(i), Answer::Accepted)).collect();
        push(&guard, &scope, &mut before, true);
        // The endpoint changes under the running worker: the first contradiction trips it,
        // though the accepted answers of the last minute still outnumber the dead ones.
        let mut after = vec![(token(7), dead(Some("check the environment")))];
        push(&guard, &scope, &mut after, true);
        assert_eq!(doubted(&after), 1);
        // And the other dead answers of the scope are doubted too for a while.
        let mut unseen = vec![(token(1000), dead(Some("check the topic")))];
        push(&guard, &scope, &mut unseen, true);
        assert_eq!(doubted(&unseen), 1);
        // An Unregistered answer (no mistake) is reported all the same.
        let mut gone = vec![(token(1001), dead(None))];
        push(&guard, &scope, &mut gone, true);
        assert_eq!(doubted(&gone), 0);
        // Another scope is not touched.
        let elsewhere = Scope::new(Platform::APNS, "production com.example");
        let mut ok: Vec<_> = (0..3).map(|i| (token(i), Answer::Accepted)).collect();
        ok.push((token(2000), dead(Some("check the environment"))));
        push(&guard, &elsewhere, &mut ok, true);
        assert_eq!(doubted(&ok), 0);
    }

    #[test]
    fn an_app_removed_is_never_doubted() {
        // Unregistered carries no mistake: reported even when every phone says it, and after
        // the token was accepted (the app deleted since).
        let guard = Guard::default();
        let scope = Scope::new(Platform::APNS, "production com.example");
        let mut alone: Vec<_> = (0..4).map(|i| (token(i), dead(None))).collect();
        push(&guard, &scope, &mut alone, true);
        assert_eq!(doubted(&alone), 0);
        let mut before: Vec<_> = (10..20).map(|i| (token(i), Answer::Accepted)).collect();
        push(&guard, &scope, &mut before, true);
        let mut after = vec![(token(13), dead(None))];
        push(&guard, &scope, &mut after, true);
        assert_eq!(doubted(&after), 0);
        assert_eq!(guard.suspicion(), None);
    }
}
