//! What an FCM answer means, in the provider-neutral [`Answer`] (DESIGN.md "FCM answers"):
//! a dead token is reported with FCM's code as its reason; a retry FCM asked for is a retry
//! (THIRD_PARTY_AUTH_ERROR logged as an error: a new access token does not cure it); no
//! connection or no access token is FCM being unreachable.

use time::OffsetDateTime;
use tracing::error;

use super::guard::Mistake;
use super::Answer;
use crate::fcm::answer::{Code, Verdict};
use crate::fcm::FcmError;

pub(super) fn answer_of(result: Result<Verdict, FcmError>) -> Answer {
    match result {
        Ok(Verdict::Accepted) => Answer::Accepted,
        Ok(Verdict::Dead(code)) => {
            let now = OffsetDateTime::now_utc();
            Answer::Dead {
                reason: code.to_string(),
                since: now,
                observed_at: now,
                mistake: (code == Code::SenderIdMismatch).then_some(Mistake::Project),
            }
        }
        Ok(Verdict::Rejected { code, ours }) => Answer::Rejected {
            reason: code.to_string(),
            ours,
        },
        Ok(Verdict::Retry { code, error, after }) => {
            if error {
                error!(code = %code, "FCM cannot deliver for the project's third-party credentials (APNs certificate or web push key); retrying");
            }
            Answer::Retry {
                error: format!("FCM {code}"),
                answered: true,
                after,
            }
        }
        Ok(Verdict::Unauthenticated) => Answer::Retry {
            error: "FCM UNAUTHENTICATED after renewing the access token".into(),
            answered: true,
            after: None,
        },
        Err(e) if e.is_unreachable() => Answer::Unreachable {
            error: e.to_string(),
        },
        Err(e) => Answer::Retry {
            error: e.to_string(),
            answered: false,
            after: None,
        },
    }
}
