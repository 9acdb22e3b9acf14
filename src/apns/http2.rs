//! The APNs HTTP/2 client: a few persistent connections per endpoint ([`crate::http2::Pool`],
//! which FCM's client shares), each with as many streams in flight as the server's SETTINGS
//! allow.
//!
//! `send` is a thin wrapper around [`super::request::build_request`]. Around it:
//! - requests are spread round-robin over `connections` persistent connections per endpoint;
//!   `ready()` waits for the server's stream limit, which `h2` follows as it changes;
//! - a stream APNs never processed — refused with REFUSED_STREAM, above a GOAWAY's
//!   last-stream-id, or never sent because the connection had gone — is resent at once on
//!   another connection (RFC 7540 §8.1.4), invisibly to the caller;
//! - a connection that fails, gets GOAWAY, or answers `Shutdown`, `IdleTimeout`,
//!   `ExpiredProviderToken`, `UnrelatedKeyIdInToken` or `TooManyProviderTokenUpdates` is
//!   dropped and replaced on next use; after `ExpiredProviderToken` the JWT is re-signed and
//!   the request sent once more;
//! - reconnecting backs off exponentially with jitter, so an unreachable APNs is probed, not
//!   hammered; requests meanwhile fail fast with [`SendError::Backoff`]. A connection that
//!   ends before answering anything counts as a failed connect (the first such is replaced at
//!   once, later ones wait the backoff): a peer that accepts and then drops every connection
//!   is not met with a handshake per request;
//! - an idle connection is PINGed, and dropped if the PING goes unanswered.

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::ClientConfig;

use super::jwt::Signer;
use super::request::{build_request, Endpoint, Notification};
use super::{Answer, Environment, Reason, Rejection, SendError};
use crate::http2::{Gauges, Pool, Tuning};

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct Settings {
    pub production: Endpoint,
    pub sandbox: Endpoint,
    /// How long one request may take, from the first try to the answer.
    pub request_timeout: Duration,
    /// How long a TCP connect plus TLS and HTTP/2 handshake may take.
    pub connect_timeout: Duration,
    /// Persistent connections per endpoint.
    pub connections: usize,
    /// PING a connection idle for this long; `None` never pings.
    pub ping_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is dropped.
    pub ping_timeout: Duration,
    /// Reconnect backoff: the first delay, doubled per failure up to the cap, jittered.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Settings {
    /// The defaults `ringpush worker` uses, for two endpoints.
    pub fn new(production: Endpoint, sandbox: Endpoint) -> Self {
        Self {
            production,
            sandbox,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            connections: 2,
            ping_interval: Some(Duration::from_secs(60)),
            ping_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }

    /// How the connections behave.
    pub(crate) fn tuning(&self) -> Tuning {
        Tuning {
            connections: self.connections,
            connect_timeout: self.connect_timeout,
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
        }
    }
}

/// The APNs client of one worker. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    gauges: Arc<Gauges>,
    production: Pool,
    sandbox: Pool,
    /// Token auth: the shared JWT signer (one token for every connection). `None` with
    /// certificate auth, where the TLS configuration carries the client certificate.
    signer: Option<Arc<Signer>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connections_open", &self.connections_open())
            .field("streams_in_flight", &self.streams_in_flight())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client that connects lazily, on the first notification for each endpoint.
    pub fn new(settings: Settings, tls: Arc<ClientConfig>, signer: Option<Arc<Signer>>) -> Self {
        let tuning = Arc::new(settings.tuning());
        let gauges = Arc::new(Gauges::default());
        let pool = |endpoint: &Endpoint| {
            Pool::new(
                "APNs",
                endpoint,
                tls.clone(),
                tuning.clone(),
                gauges.clone(),
            )
            .with_ca_setting("RINGPUSH_APNS_CA_FILE")
        };
        Self {
            inner: Arc::new(Inner {
                gauges: gauges.clone(),
                production: pool(&settings.production),
                sandbox: pool(&settings.sandbox),
                signer,
                request_timeout: settings.request_timeout,
            }),
        }
    }

    /// HTTP/2 connections open now (both endpoints).
    pub fn connections_open(&self) -> i64 {
        self.inner.gauges.connections()
    }

    /// Requests awaiting their answer now.
    pub(crate) fn streams_in_flight(&self) -> i64 {
        self.inner.gauges.streams()
    }

    /// Whether both environments' endpoints are usable as far as this client knows: a
    /// connection is open, or the next request may open one (no reconnect backoff running).
    pub fn up(&self) -> bool {
        self.pool(Environment::Production).up() && self.pool(Environment::Sandbox).up()
    }

    fn pool(&self, env: Environment) -> &Pool {
        match env {
            Environment::Production => &self.inner.production,
            Environment::Sandbox => &self.inner.sandbox,
        }
    }

    /// Sends one notification and returns APNs's answer.
    pub async fn send(&self, env: Environment, n: &Notification) -> Result<Answer, SendError> {
        let _in_flight = self.inner.gauges.in_flight();
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, self.send_on(self.pool(env), n)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout(timeout)),
        }
    }

    /// Makes sure a connection to `env`'s endpoint is up ([`Pool::probe`]): how a worker
    /// that found APNs unreachable learns it is back.
    pub async fn probe(&self, env: Environment) -> Result<(), SendError> {
        self.pool(env).probe().await
    }

    /// One notification, with the resends of unprocessed streams ([`Pool::send_resending`])
    /// and, after 403 `ExpiredProviderToken`, once more with a new JWT.
    async fn send_on(&self, pool: &Pool, n: &Notification) -> Result<Answer, SendError> {
        let mut renewed = false;
        loop {
            let answered = pool
                .send_resending(|endpoint| {
                    let bearer = self.inner.signer.as_ref().map(|s| s.bearer());
                    (
                        build_request(endpoint, n, bearer.as_ref()),
                        n.payload.clone(),
                    )
                })
                .await?;
            let response = &answered.response;
            if response.status == 200 {
                return Ok(Answer::Accepted);
            }
            let apns_id = response
                .headers
                .get("apns-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let rejection = parse_rejection(response.status, &response.body, apns_id);
            if retires_connection(&rejection.reason) {
                answered
                    .live
                    .retire(&answered.endpoint, rejection.reason.as_str());
            }
            let renew = rejection.reason == Reason::ExpiredProviderToken && !renewed;
            if renew && self.inner.signer.as_ref().is_some_and(|s| s.renew()) {
                renewed = true;
                continue;
            }
            return Ok(Answer::Rejected(rejection));
        }
    }
}

/// Answers after which APNs wants a new connection.
fn retires_connection(reason: &Reason) -> bool {
    matches!(
        reason,
        Reason::Shutdown
            | Reason::IdleTimeout
            | Reason::ExpiredProviderToken
            | Reason::UnrelatedKeyIdInToken
            | Reason::TooManyProviderTokenUpdates
    )
}

/// Reads an error answer: `{"reason": "...", "timestamp": <ms>}`, leniently.
fn parse_rejection(status: u16, body: &[u8], apns_id: Option<String>) -> Rejection {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let reason = match json.get("reason").and_then(|r| r.as_str()) {
        Some(r) => Reason::parse(r),
        None => Reason::Unknown(format!("HTTP {status} without a reason")),
    };
    Rejection {
        status,
        reason,
        timestamp_ms: json.get("timestamp").and_then(|t| t.as_i64()),
        apns_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_read_leniently() {
        let r = parse_rejection(
            410,
            br#"{"reason":"Unregistered","timestamp":1795857362120}"#,
            None,
        );
        assert_eq!(
            (r.reason, r.timestamp_ms),
            (Reason::Unregistered, Some(1_795_857_362_120))
        );
        let r = parse_rejection(400, br#"{"reason":"BrandNew"}"#, Some("id".into()));
        assert_eq!(r.reason, Reason::Unknown("BrandNew".into()));
        let r = parse_rejection(500, b"", None);
        assert!(matches!(r.reason, Reason::Unknown(_)));
    }
}
