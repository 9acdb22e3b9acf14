//! The seam between the worker and the push services. The worker hands a notification for
//! one token to [`Providers::send`] and gets back an [`Answer`] that means the same whatever
//! the service (APNs over HTTP/2 or the legacy binary interface today; FCM next):
//! accepted, the token is dead, rejected for good, try again, or the service could not be
//! reached. What each service's status codes and reasons mean is decided here, once; what
//! becomes of the ring is decided in `worker::decide` from these answers alone.

use time::OffsetDateTime;

use crate::apns::request::Notification;
use crate::apns::{self, Apns, Environment};

/// One token's answer, whatever the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The provider took the notification (not proof the phone showed it).
    Accepted,
    /// The provider says the token is dead (the app was deleted, the token expired): report
    /// it for the purge, never retry it. `since`: when the provider last knew it invalid.
    Dead {
        reason: String,
        since: OffsetDateTime,
        observed_at: OffsetDateTime,
    },
    /// Refused for good for another reason (a payload it will not take; with `ours`, our
    /// credentials or topic — no phone will ring until someone fixes them): counted under
    /// `reason`, not retried.
    Rejected { reason: String, ours: bool },
    /// No answer, or one that says "try again" (`answered`: the provider did answer).
    Retry { error: String, answered: bool },
    /// No connection to the provider could be had at all: the worker's trouble, not the
    /// ring's.
    Unreachable { error: String },
}

impl Answer {
    /// Whether the provider answered this request (its latency is a request's latency).
    pub fn answered(&self) -> bool {
        match self {
            Answer::Retry { answered, .. } => *answered,
            Answer::Unreachable { .. } => false,
            _ => true,
        }
    }
}

/// The providers a worker pushes through.
#[derive(Clone, Debug)]
pub struct Providers {
    pub apns: Apns,
}

impl Providers {
    /// Sends one notification to an APNs token of `environment` and says what it means.
    pub async fn send(&self, environment: Environment, n: &Notification) -> Answer {
        answer_of(self.apns.send(environment, n).await)
    }

    /// Whether `environment`'s endpoint can be reached now (a connection that completes its
    /// handshake): what a paused worker probes.
    pub async fn probe(&self, environment: Environment) -> Result<(), String> {
        self.apns
            .probe(environment)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What an APNs answer means (the worker logs it, with the ring it belongs to).
fn answer_of(result: Result<apns::Answer, apns::SendError>) -> Answer {
    let rejection = match result {
        Ok(apns::Answer::Accepted) => return Answer::Accepted,
        Ok(apns::Answer::Rejected(rejection)) => rejection,
        Err(e) if e.is_unreachable() => {
            return Answer::Unreachable {
                error: e.to_string(),
            }
        }
        Err(e) => {
            return Answer::Retry {
                error: e.to_string(),
                answered: false,
            }
        }
    };
    let (reason, status) = (&rejection.reason, rejection.status);
    if reason.is_retryable() {
        return Answer::Retry {
            error: format!("APNs {status} {reason}"),
            answered: true,
        };
    }
    if reason.is_token_invalid() {
        let now = OffsetDateTime::now_utc();
        let since = rejection
            .timestamp_ms
            .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok())
            .and_then(crate::wire::time::in_range)
            .unwrap_or(now);
        return Answer::Dead {
            reason: reason.to_string(),
            since,
            observed_at: now,
        };
    }
    Answer::Rejected {
        reason: format!("{reason}"),
        ours: reason.is_provider_error(),
    }
}
