//! The FCM HTTP v1 client: `POST /v1/projects/<project_id>/messages:send` over persistent
//! HTTP/2 connections ([`crate::http2::Pool`], as APNs's), with the shared OAuth 2.0 access
//! token ([`super::oauth`]).
//!
//! Around each request:
//! - a stream FCM never processed (REFUSED_STREAM, above a GOAWAY, never sent) is resent at
//!   once on another connection;
//! - a 401 renews the access token — once for all the requests that met the same token —
//!   and the request is sent once more;
//! - an answer that says "retry" with `Retry-After` is sent again after that wait when the
//!   ring still has the time (only this token waits; every other send goes on), else handed
//!   back as a retry;
//! - the body is rendered for each try, with the ring's whole seconds left as its `ttl`.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Uri};
use time::OffsetDateTime;
use tokio_rustls::rustls::ClientConfig;
use tracing::debug;

use super::answer::{verdict, Verdict};
use super::credentials::ServiceAccount;
use super::message::Template;
use super::oauth::{TokenError, Tokens};
use crate::http2::{Endpoint, Gauges, Pool, SendError, Tuning};
use crate::token::DeviceToken;

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The FCM HTTP v1 API base (`RINGPUSH_FCM_URL`).
    pub url: Endpoint,
    /// The Android notification channel of alert rings (`RINGPUSH_FCM_CHANNEL`).
    pub channel: String,
    /// The Android notification channel of follow-ups, one the app creates without a sound
    /// (`RINGPUSH_FCM_QUIET_CHANNEL`).
    pub quiet_channel: String,
    /// How long one request may take, from the first try to the answer (a `Retry-After`
    /// wait not included).
    pub request_timeout: Duration,
    pub tuning: Tuning,
}

impl Settings {
    /// The defaults `ringpush worker` uses, for `url`.
    pub fn new(url: Endpoint) -> Self {
        Self {
            url,
            channel: super::DEFAULT_CHANNEL.into(),
            quiet_channel: super::DEFAULT_QUIET_CHANNEL.into(),
            request_timeout: Duration::from_secs(10),
            tuning: Tuning {
                connections: 2,
                connect_timeout: Duration::from_secs(10),
                ping_interval: Some(Duration::from_secs(60)),
                ping_timeout: Duration::from_secs(10),
                backoff_min: Duration::from_millis(250),
                backoff_max: Duration::from_secs(30),
            },
        }
    }
}

/// Why a message got no answer from FCM.
#[derive(Debug, thiserror::Error)]
pub enum FcmError {
    #[error("FCM: {0}")]
    Send(#[from] SendError),
    #[error("FCM access token: {0}")]
    Token(#[from] TokenError),
}

impl FcmError {
    /// FCM could not be used at all: no connection, or no access token. The worker's
    /// trouble: the token waits on the retry path without spending an attempt.
    pub fn is_unreachable(&self) -> bool {
        match self {
            FcmError::Send(e) => e.is_unreachable(),
            FcmError::Token(_) => true,
        }
    }
}

/// The FCM client of one worker. Cheap to clone; clones share connections and the token.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    gauges: Arc<Gauges>,
    tokens: Arc<Tokens>,
    endpoint: Endpoint,
    /// `/v1/projects/<project_id>/messages:send`, parsed once.
    path: PathAndQuery,
    /// The service account's Firebase project.
    project: String,
    channel: String,
    quiet_channel: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("fcm::Client")
            .field("endpoint", &self.inner.endpoint.base)
            .field("connections_open", &self.connections_open())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `account` that connects lazily, on the first message.
    pub fn new(
        settings: Settings,
        account: ServiceAccount,
        tls: Arc<ClientConfig>,
    ) -> Result<Self, String> {
        let path = format!("/v1/projects/{}/messages:send", account.project_id);
        let path = PathAndQuery::try_from(path.as_str())
            .map_err(|e| format!("project_id {:?}: {e}", account.project_id))?;
        let account_project = account.project_id.clone();
        let tokens = Tokens::new(
            Arc::new(account),
            tls.clone(),
            &settings.tuning,
            settings.request_timeout,
        )?;
        let gauges = Arc::new(Gauges::default());
        let pool = Pool::new(
            "FCM",
            &settings.url,
            tls,
            Arc::new(settings.tuning.clone()),
            gauges.clone(),
        )
        .with_ca_setting("RINGPUSH_FCM_CA_FILE");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                gauges,
                tokens: Arc::new(tokens),
                endpoint: settings.url,
                path,
                project: account_project,
                channel: settings.channel,
                quiet_channel: settings.quiet_channel,
                request_timeout: settings.request_timeout,
            }),
        })
    }

    /// The Android notification channel of alert rings.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The Android notification channel of follow-ups.
    pub fn quiet_channel(&self) -> &str {
        &self.inner.quiet_channel
    }

    /// The Firebase project the service account is of.
    pub fn project(&self) -> &str {
        &self.inner.project
    }

    /// The access tokens (renewals, health).
    pub fn tokens(&self) -> &Arc<Tokens> {
        &self.inner.tokens
    }

    pub fn connections_open(&self) -> i64 {
        self.inner.gauges.connections()
    }

    pub(crate) fn streams_in_flight(&self) -> i64 {
        self.inner.gauges.streams()
    }

    /// Whether FCM is usable as far as this worker knows: a connection is open or may be
    /// opened now, and the last token exchange worked.
    pub fn up(&self) -> bool {
        self.inner.pool.up() && self.inner.tokens.healthy()
    }

    /// Whether a connection to FCM can be had now.
    pub async fn probe(&self) -> Result<(), FcmError> {
        self.inner.pool.probe().await?;
        self.inner.tokens.get().await?;
        Ok(())
    }

    /// Sends `message` to `token` for a ring that expires at `expiration` (Unix seconds) and
    /// says what FCM answered.
    pub async fn send(
        &self,
        message: &Template,
        token: &DeviceToken,
        expiration: i64,
    ) -> Result<Verdict, FcmError> {
        let _in_flight = self.inner.gauges.in_flight();
        let verdict = self.send_timed(message, token, expiration).await?;
        let Verdict::Retry {
            after: Some(after), ..
        } = &verdict
        else {
            return Ok(verdict);
        };
        // FCM asked for a wait: this token waits (the ring's other sends go on), if the ring
        // is still worth sending after it.
        let left = expiration - OffsetDateTime::now_utc().unix_timestamp();
        if after.as_secs_f64() >= left as f64 - 1.0 {
            return Ok(verdict);
        }
        debug!(
            wait_ms = after.as_millis() as u64,
            "FCM asked to retry after a wait"
        );
        tokio::time::sleep(*after).await;
        self.send_timed(message, token, expiration).await
    }

    async fn send_timed(
        &self,
        message: &Template,
        token: &DeviceToken,
        expiration: i64,
    ) -> Result<Verdict, FcmError> {
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, self.send_once(message, token, expiration)).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout(timeout).into()),
        }
    }

    /// One send, with the resends of unprocessed streams ([`Pool::send_resending`]) and
    /// the renewal after a 401.
    async fn send_once(
        &self,
        message: &Template,
        token: &DeviceToken,
        expiration: i64,
    ) -> Result<Verdict, FcmError> {
        let mut renewed = false;
        let mut access = self.inner.tokens.get().await?;
        loop {
            let answered = self
                .inner
                .pool
                .send_resending(|_| {
                    let ttl =
                        (expiration - OffsetDateTime::now_utc().unix_timestamp()).max(1) as u64;
                    (self.request(access.bearer()), message.render(token, ttl))
                })
                .await?;
            let response = &answered.response;
            let retry_after = response
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            let v = verdict(response.status, retry_after, &response.body);
            if v == Verdict::Unauthenticated && !renewed {
                renewed = true;
                access = self.inner.tokens.renew(Some(access.generation)).await?;
                continue;
            }
            return Ok(v);
        }
    }

    /// The request's headers (the body is the rendered message).
    fn request(&self, bearer: &HeaderValue) -> Request<()> {
        build_request(&self.inner.endpoint, &self.inner.path, bearer)
    }
}

/// The HTTP/2 request of a message (headers only).
pub(crate) fn build_request(
    endpoint: &Endpoint,
    path: &PathAndQuery,
    bearer: &HeaderValue,
) -> Request<()> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(endpoint.authority.clone());
    uri.path_and_query = Some(path.clone());
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path");
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    h.insert(http::header::AUTHORIZATION, bearer.clone());
    req
}
