//! What an APNs answer means, in the provider-neutral [`Answer`] (the worker logs it, with
//! the ring it belongs to).

use time::OffsetDateTime;

use super::guard::Mistake;
use super::Answer;
use crate::apns;

pub(super) fn answer_of(result: Result<apns::Answer, apns::SendError>) -> Answer {
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
                after: None,
            }
        }
    };
    let (reason, status) = (&rejection.reason, rejection.status);
    if reason.is_retryable() {
        return Answer::Retry {
            error: format!("APNs {status} {reason}"),
            answered: true,
            after: None,
        };
    }
    if reason.is_token_invalid() {
        let now = OffsetDateTime::now_utc();
        let since = rejection
            .timestamp_ms
            .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok())
            .and_then(crate::wire::time::in_range)
            .unwrap_or(now);
        let mistake = match reason {
            apns::Reason::BadDeviceToken => Some(Mistake::Environment),
            apns::Reason::DeviceTokenNotForTopic => Some(Mistake::Topic),
            apns::Reason::InvalidToken => Some(Mistake::BinaryEndpoint),
            _ => None,
        };
        return Answer::Dead {
            reason: reason.to_string(),
            // Never later than the answer: a purge request's `invalid_since` in the future
            // is refused by the purger.
            since: since.min(now),
            observed_at: now,
            mistake,
        };
    }
    Answer::Rejected {
        reason: format!("{reason}"),
        ours: reason.is_provider_error(),
    }
}
