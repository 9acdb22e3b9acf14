//! Every reason string APNs answers with (protocol sheet A7), and what each one means for us.
//!
//! Call sites never compare strings: they ask the enum (`is_token_invalid`, `is_retryable`,
//! `is_provider_error`). New reasons appear over the years, so an unknown string parses into
//! [`Reason::Unknown`] instead of failing.

use std::fmt;

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])* $variant:ident = $status:literal, $text:literal; )*) => {
        /// The `reason` of an APNs error response.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[doc = $doc])* $variant, )*
            /// `BadEnvironmentKeyInToken`: the spelling APNs has been seen to send for
            /// `BadEnvironmentKeyIdInToken` (sheet X1); both mean the same thing.
            BadEnvironmentKeyInToken,
            /// Binary interface, status 8: the token is invalid (sheet B5). HTTP/2 says
            /// `BadDeviceToken` or `Unregistered` instead.
            InvalidToken,
            /// Binary interface, status 5: the token is not 32 bytes (reported, not sent).
            InvalidTokenSize,
            /// A reason this version does not know yet (Apple keeps adding them).
            Unknown(String),
        }

        impl Reason {
            /// Every known reason, for table-driven tests and the mock's scripts.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)* Reason::BadEnvironmentKeyInToken];

            /// Parses a reason string; unknown strings are kept in [`Reason::Unknown`].
            pub fn parse(s: &str) -> Self {
                match s {
                    $( $text => Reason::$variant, )*
                    "BadEnvironmentKeyInToken" => Reason::BadEnvironmentKeyInToken,
                    "InvalidToken" => Reason::InvalidToken,
                    "InvalidTokenSize" => Reason::InvalidTokenSize,
                    other => Reason::Unknown(other.to_owned()),
                }
            }

            /// The string APNs sends.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Reason::$variant => $text, )*
                    Reason::BadEnvironmentKeyInToken => "BadEnvironmentKeyInToken",
                    Reason::InvalidToken => "InvalidToken",
                    Reason::InvalidTokenSize => "InvalidTokenSize",
                    Reason::Unknown(s) => s,
                }
            }

            /// The HTTP status APNs pairs with this reason (0 when unknown or binary-only).
            pub fn status(&self) -> u16 {
                match self {
                    $( Reason::$variant => $status, )*
                    Reason::BadEnvironmentKeyInToken => 403,
                    // The binary interface has statuses of its own, not HTTP ones.
                    Reason::InvalidToken | Reason::InvalidTokenSize | Reason::Unknown(_) => 0,
                }
            }
        }
    };
}

reasons! {
    /// The collapse id is over 64 bytes.
    BadCollapseId = 400, "BadCollapseId";
    /// The token is malformed or belongs to the other environment.
    BadDeviceToken = 400, "BadDeviceToken";
    /// `apns-expiration` is not valid.
    BadExpirationDate = 400, "BadExpirationDate";
    /// `apns-id` is not a canonical UUID.
    BadMessageId = 400, "BadMessageId";
    /// `apns-priority` is not 1, 5 or 10.
    BadPriority = 400, "BadPriority";
    /// `apns-topic` is not valid.
    BadTopic = 400, "BadTopic";
    /// The token belongs to another topic (another app, or a VoIP token).
    DeviceTokenNotForTopic = 400, "DeviceTokenNotForTopic";
    /// A header was repeated.
    DuplicateHeaders = 400, "DuplicateHeaders";
    /// The connection idled out; reconnect and retry.
    IdleTimeout = 400, "IdleTimeout";
    /// `apns-push-type` is not a known value.
    InvalidPushType = 400, "InvalidPushType";
    /// No token in `:path`.
    MissingDeviceToken = 400, "MissingDeviceToken";
    /// `apns-topic` is required and absent.
    MissingTopic = 400, "MissingTopic";
    /// The body is empty.
    PayloadEmpty = 400, "PayloadEmpty";
    /// Pushing to this topic is not allowed.
    TopicDisallowed = 400, "TopicDisallowed";
    /// The client certificate is bad.
    BadCertificate = 403, "BadCertificate";
    /// The client certificate is for the other environment.
    BadCertificateEnvironment = 403, "BadCertificateEnvironment";
    /// The JWT's `iat` is more than an hour old: re-sign and reconnect.
    ExpiredProviderToken = 403, "ExpiredProviderToken";
    /// The action is not allowed; do not retry.
    Forbidden = 403, "Forbidden";
    /// The JWT is bad: signature, `alg`, `kid` or `iss`.
    InvalidProviderToken = 403, "InvalidProviderToken";
    /// Neither a certificate nor an `authorization` header.
    MissingProviderToken = 403, "MissingProviderToken";
    /// The key id differs from the one first used on this connection.
    UnrelatedKeyIdInToken = 403, "UnrelatedKeyIdInToken";
    /// An environment-restricted key was used against the other environment (Apple's spelling).
    BadEnvironmentKeyIdInToken = 403, "BadEnvironmentKeyIdInToken";
    /// `:path` is not `/3/device/<token>`.
    BadPath = 404, "BadPath";
    /// The method was not POST.
    MethodNotAllowed = 405, "MethodNotAllowed";
    /// The device token has expired.
    ExpiredToken = 410, "ExpiredToken";
    /// The token is no longer active for the topic (the app was removed).
    Unregistered = 410, "Unregistered";
    /// The payload is over the size limit.
    PayloadTooLarge = 413, "PayloadTooLarge";
    /// The JWT changed more than once in 20 minutes on one connection.
    TooManyProviderTokenUpdates = 429, "TooManyProviderTokenUpdates";
    /// Too many pushes to one device in a row; retry after a delay.
    TooManyRequests = 429, "TooManyRequests";
    /// APNs had an internal error; retry.
    InternalServerError = 500, "InternalServerError";
    /// APNs is unavailable; retry on another connection.
    ServiceUnavailable = 503, "ServiceUnavailable";
    /// This APNs server is shutting down; retry on a new connection.
    Shutdown = 503, "Shutdown";
}

impl Reason {
    /// The token is dead or not ours: stop using it (feedback → purge).
    pub(crate) fn is_token_invalid(&self) -> bool {
        matches!(
            self,
            Reason::Unregistered
                | Reason::ExpiredToken
                | Reason::BadDeviceToken
                | Reason::DeviceTokenNotForTopic
                | Reason::InvalidToken
        )
    }

    /// A transient failure: the same request may succeed later.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            Reason::TooManyRequests
                | Reason::InternalServerError
                | Reason::ServiceUnavailable
                | Reason::Shutdown
                | Reason::IdleTimeout
        )
    }

    /// A credential or configuration problem of ours: an operator must act.
    pub(crate) fn is_provider_error(&self) -> bool {
        matches!(
            self,
            Reason::BadCertificate
                | Reason::BadCertificateEnvironment
                | Reason::ExpiredProviderToken
                | Reason::Forbidden
                | Reason::InvalidProviderToken
                | Reason::MissingProviderToken
                | Reason::UnrelatedKeyIdInToken
                | Reason::BadEnvironmentKeyIdInToken
                | Reason::BadEnvironmentKeyInToken
                | Reason::TooManyProviderTokenUpdates
                | Reason::TopicDisallowed
                | Reason::BadTopic
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_round_trips_and_has_a_status() {
        for r in Reason::ALL {
            assert_eq!(&Reason::parse(r.as_str()), r);
            assert!(
                [400, 403, 404, 405, 410, 413, 429, 500, 503].contains(&r.status()),
                "{r}"
            );
        }
        assert_eq!(
            Reason::parse("SomethingNew"),
            Reason::Unknown("SomethingNew".into())
        );
        assert_eq!(Reason::ALL.len(), 33);
    }

    #[test]
    fn every_reason_maps_to_the_decision_of_the_protocol_sheet() {
        use Reason::*;
        // (reason, status, token invalid, retryable, provider error) — sheet A7.
        let table = [
            (BadCollapseId, 400, false, false, false),
            (BadDeviceToken, 400, true, false, false),
            (BadExpirationDate, 400, false, false, false),
            (BadMessageId, 400, false, false, false),
            (BadPriority, 400, false, false, false),
            (BadTopic, 400, false, false, true),
            (DeviceTokenNotForTopic, 400, true, false, false),
            (DuplicateHeaders, 400, false, false, false),
            (IdleTimeout, 400, false, true, false),
            (InvalidPushType, 400, false, false, false),
            (MissingDeviceToken, 400, false, false, false),
            (MissingTopic, 400, false, false, false),
            (PayloadEmpty, 400, false, false, false),
            (TopicDisallowed, 400, false, false, true),
            (BadCertificate, 403, false, false, true),
            (BadCertificateEnvironment, 403, false, false, true),
            (ExpiredProviderToken, 403, false, false, true),
            (Forbidden, 403, false, false, true),
            (InvalidProviderToken, 403, false, false, true),
            (MissingProviderToken, 403, false, false, true),
            (UnrelatedKeyIdInToken, 403, false, false, true),
            (BadEnvironmentKeyIdInToken, 403, false, false, true),
            (BadEnvironmentKeyInToken, 403, false, false, true),
            (BadPath, 404, false, false, false),
            (MethodNotAllowed, 405, false, false, false),
            (ExpiredToken, 410, true, false, false),
            (Unregistered, 410, true, false, false),
            (PayloadTooLarge, 413, false, false, false),
            (TooManyProviderTokenUpdates, 429, false, false, true),
            (TooManyRequests, 429, false, true, false),
            (InternalServerError, 500, false, true, false),
            (ServiceUnavailable, 503, false, true, false),
            (Shutdown, 503, false, true, false),
        ];
        assert_eq!(
            table.len(),
            Reason::ALL.len(),
            "the table covers every reason"
        );
        for (r, status, invalid, retry, provider) in table {
            assert_eq!(
                (
                    r.status(),
                    r.is_token_invalid(),
                    r.is_retryable(),
                    r.is_provider_error()
                ),
                (status, invalid, retry, provider),
                "{r}"
            );
            assert_eq!(Reason::parse(r.as_str()), r);
        }
    }

    #[test]
    fn the_binary_reasons_parse_and_decide() {
        assert_eq!(Reason::parse("InvalidToken"), Reason::InvalidToken);
        assert!(Reason::InvalidToken.is_token_invalid());
        assert_eq!(
            Reason::parse(Reason::InvalidTokenSize.as_str()),
            Reason::InvalidTokenSize
        );
        assert!(
            !Reason::InvalidTokenSize.is_token_invalid()
                && !Reason::InvalidTokenSize.is_retryable()
        );
    }

    #[test]
    fn an_unknown_reason_is_kept_and_decides_nothing() {
        let r = Reason::parse("SomeReasonFrom2030");
        assert_eq!(r, Reason::Unknown("SomeReasonFrom2030".into()));
        assert_eq!(r.as_str(), "SomeReasonFrom2030");
        assert!(!r.is_token_invalid() && !r.is_retryable() && !r.is_provider_error());
    }
}
