//! APNs: what a notification is, how the HTTP/2 request for it is built, and the client
//! that sends it.
//!
//! - [`request`]: pure request and payload building (no network), tested byte for byte;
//! - [`reason`]: every reason string APNs answers with, and the decisions on it;
//! - [`jwt`]: ES256 provider tokens;
//! - [`http2`]: the persistent HTTP/2 client, over the connections of [`crate::http2`];
//! - [`binary`]: the legacy binary interface's client;
//! - [`provider`]: APNs as the worker's provider — payloads per kind, requests, and what
//!   each answer means;
//! - [`SendError`] (from [`crate::http2`]): what either client returns when APNs gave no
//!   answer.

pub mod binary;
pub mod http2;
pub mod jwt;
pub mod provider;
pub mod reason;
pub mod request;

pub use crate::http2::SendError;
pub use crate::token::Environment;
pub use provider::Provider;
pub use reason::Reason;

/// Apple's production HTTP/2 endpoint.
pub(crate) const PRODUCTION_URL: &str = "https://api.push.apple.com:443";
/// Apple's sandbox (development) HTTP/2 endpoint.
pub(crate) const SANDBOX_URL: &str = "https://api.sandbox.push.apple.com:443";

/// What APNs answered to one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200: APNs took the notification (not proof of delivery to the phone).
    Accepted,
    /// Any other status, with the full response.
    Rejected(Rejection),
}

/// An APNs error response, kept whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: Reason,
    /// With 410 only: when APNs last confirmed the token invalid, in Unix milliseconds.
    pub timestamp_ms: Option<i64>,
    pub apns_id: Option<String>,
}

/// The APNs a worker pushes through: today's HTTP/2 API, or the legacy binary interface.
#[derive(Clone, Debug)]
pub enum Apns {
    Http2(http2::Client),
    Binary(binary::Client),
}

impl Apns {
    /// Sends one notification (the binary interface has one gateway for both environments).
    pub async fn send(
        &self,
        env: Environment,
        n: &request::Notification,
    ) -> Result<Answer, SendError> {
        match self {
            Apns::Http2(c) => c.send(env, n).await,
            Apns::Binary(c) => c.send(n).await,
        }
    }

    /// Whether a connection can be had now (respecting the reconnect backoff).
    pub async fn probe(&self, env: Environment) -> Result<(), SendError> {
        match self {
            Apns::Http2(c) => c.probe(env).await,
            Apns::Binary(c) => c.probe().await,
        }
    }

    /// Whether APNs is usable as far as this client knows (HTTP/2: no endpoint in reconnect
    /// backoff; the binary interface: always — its trouble pauses consumption).
    pub fn up(&self) -> bool {
        match self {
            Apns::Http2(c) => c.up(),
            Apns::Binary(_) => true,
        }
    }

    pub fn connections_open(&self) -> i64 {
        match self {
            Apns::Http2(c) => c.connections_open(),
            Apns::Binary(c) => c.connections_open(),
        }
    }

    /// Notifications awaiting their answer (binary: written or queued, not yet confirmed).
    pub fn in_flight(&self) -> i64 {
        match self {
            Apns::Http2(c) => c.streams_in_flight(),
            Apns::Binary(c) => c.in_flight(),
        }
    }
}

impl From<http2::Client> for Apns {
    fn from(c: http2::Client) -> Self {
        Apns::Http2(c)
    }
}

impl From<binary::Client> for Apns {
    fn from(c: binary::Client) -> Self {
        Apns::Binary(c)
    }
}
