//! FCM HTTP v1: Android phones (and call-style data messages), as docs/design.md specifies.
//!
//! - [`credentials`]: the service-account JSON, checked at start, and its RS256 assertion;
//! - [`oauth`]: access tokens — exchanged at the account's `token_uri`, shared, renewed
//!   ahead of expiry by one task, renewed once for all on a 401;
//! - [`message`]: the message of a ring, built once per kind with holes for token and ttl;
//! - [`answer`]: FCM's error codes and what each means ([`answer::Verdict`]);
//! - [`client`]: the HTTP/2 client over [`crate::http2`]'s connections;
//! - [`provider`]: FCM as the worker's provider — messages per kind, sends, and what each
//!   answer means.

pub mod answer;
pub mod client;
pub mod credentials;
pub mod message;
pub mod oauth;
pub mod provider;

pub use client::{Client, FcmError, Settings};
pub use credentials::{CredentialsError, ServiceAccount};
pub use provider::Provider;

/// Google's FCM HTTP v1 endpoint.
pub const URL: &str = "https://fcm.googleapis.com:443";
/// The Android notification channel of alert rings unless configured.
pub(crate) const DEFAULT_CHANNEL: &str = "doorbell";
/// The Android notification channel of follow-ups (`RINGPUSH_FCM_QUIET_CHANNEL`): one the app
/// creates without a sound.
pub(crate) const DEFAULT_QUIET_CHANNEL: &str = "doorbell_quiet";
