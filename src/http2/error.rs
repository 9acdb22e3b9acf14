//! [`SendError`]: why a notification got no answer from its push service — the one error
//! the HTTP/2 clients (APNs's and FCM's, over [`super::Pool`]) and APNs's binary client
//! return, so the worker decides on it alike.

use std::time::Duration;

/// Why a notification got no answer from its push service. All of these are transient: the
/// notification was not accepted and may be sent again.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("{endpoint} is unreachable; next try in {} (last error: {reason})", crate::human::Human(*wait))]
    Backoff {
        endpoint: String,
        wait: Duration,
        reason: String,
    },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("no answer within {}", crate::human::Human(*.0))]
    Timeout(Duration),
    #[error("connection lost before confirmation: {0}")]
    Lost(String),
}

impl SendError {
    /// The service could not be reached at all (no connection): the request never left.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::Backoff { .. })
    }

    /// A copy for each notification waiting on the same failure (the binary client answers
    /// them all with it; the error is only text and numbers).
    pub(crate) fn clone_error(&self) -> SendError {
        match self {
            SendError::Connect { endpoint, reason } => SendError::Connect {
                endpoint: endpoint.clone(),
                reason: reason.clone(),
            },
            SendError::Backoff {
                endpoint,
                wait,
                reason,
            } => SendError::Backoff {
                endpoint: endpoint.clone(),
                wait: *wait,
                reason: reason.clone(),
            },
            other => SendError::Lost(other.to_string()),
        }
    }
}
