//! OAuth 2.0 access tokens for FCM: the service account's RS256 assertion exchanged at its
//! `token_uri` (form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=…`,
//! over HTTP/2 on a pool of its own) for an access token shared by every request and
//! connection.
//!
//! - one exchange at a time (single flight): requests that find no usable token, and every
//!   request that met the same 401, wait for the one exchange under way instead of each
//!   starting its own;
//! - one task renews the token ahead of its expiry (at three quarters of its lifetime), so
//!   requests never wait for an exchange while the token endpoint answers;
//! - a token is never logged; the assertion neither.
//!
//! Why not a Google auth crate (`gcp_auth`, `yup-oauth2`): each brings an HTTP client and a
//! TLS setup of its own (another connection pool beside `crate::http2`'s, its own roots and
//! crypto backend), and none follows the worker's rules here — one renewal task, single
//! flight on a 401, the mock's CA passed explicitly, backoff while the endpoint refuses.
//! The exchange itself is one form POST (`exchange`); the assertion is signed with `ring`
//! (see `crate::apns::jwt` for why not `jsonwebtoken`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use tokio_rustls::rustls::ClientConfig;
use tracing::{info, warn};

use super::credentials::ServiceAccount;
use crate::http2::{Endpoint, Gauges, Pool, SendError, Tuning};

/// A usable token is renewed by the background task at this share of its lifetime.
const RENEW_AT: f64 = 0.75;
/// A token this close to its expiry is not used for a new request.
const MARGIN: Duration = Duration::from_secs(10);

/// An access token and when it expires.
pub struct AccessToken {
    /// `Bearer <token>`, built once.
    bearer: HeaderValue,
    issued: Instant,
    expires: Instant,
    /// Which exchange made it (1, 2, …): a 401 names the token it met.
    pub generation: u64,
}

impl AccessToken {
    pub fn bearer(&self) -> &HeaderValue {
        &self.bearer
    }

    fn usable(&self, now: Instant) -> bool {
        now + MARGIN.min((self.expires - self.issued) / 10) < self.expires
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why no access token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint could not be reached or did not answer.
    #[error("token endpoint {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    /// The token endpoint refused the assertion (wrong key, disabled account, clock skew):
    /// no phone on FCM rings until someone fixes the credentials.
    #[error(
        "token endpoint {endpoint} refused the service account's assertion: HTTP {status} {error}"
    )]
    Refused {
        endpoint: String,
        status: u16,
        error: String,
    },
}

/// The access tokens of one service account. Shared by every FCM request.
pub struct Tokens {
    account: Arc<ServiceAccount>,
    endpoint: Endpoint,
    /// `token_uri`'s path and query.
    path: String,
    pool: Pool,
    request_timeout: Duration,
    current: RwLock<Option<Arc<AccessToken>>>,
    /// Held while an exchange runs: the single flight.
    exchanging: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Exchanges that produced a token, and those that failed (metrics).
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    /// Whether the last exchange failed (readiness).
    failing: AtomicBool,
    /// The last failed exchange, when, and how many failed in a row: until its backoff has
    /// passed, requests get its error at once instead of an exchange each (a token endpoint
    /// that refuses the credentials is not hammered by every Android token of every ring).
    failed: std::sync::Mutex<Option<(Instant, TokenError, u32)>>,
    /// Whether the renewing task runs.
    started: AtomicBool,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("token_uri", &self.account.token_uri)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens for `account`, exchanged at its `token_uri` (checked https when the account
    /// was parsed) through `tls`.
    pub fn new(
        account: Arc<ServiceAccount>,
        tls: Arc<ClientConfig>,
        tuning: &Tuning,
        request_timeout: Duration,
    ) -> Result<Self, String> {
        let url = url::Url::parse(&account.token_uri).map_err(|e| e.to_string())?;
        let host = url.host_str().ok_or("token_uri has no host")?;
        let port = url.port_or_known_default().unwrap_or(443);
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let endpoint = Endpoint::parse(&format!("https://{host}:{port}"))?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let tuning = Arc::new(Tuning {
            connections: 1,
            ..tuning.clone()
        });
        let pool = Pool::new(
            "FCM token endpoint",
            &endpoint,
            tls,
            tuning,
            Arc::new(Gauges::default()),
        )
        .with_ca_setting("RINGPUSH_FCM_CA_FILE");
        Ok(Self {
            account,
            endpoint,
            path,
            pool,
            request_timeout,
            current: RwLock::new(None),
            exchanging: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            renewal_failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            failed: std::sync::Mutex::new(None),
            started: AtomicBool::new(false),
        })
    }

    /// Whether the last exchange worked (or none was needed yet).
    pub(crate) fn healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    /// A usable token: the shared one, or — when there is none — the one the exchange under
    /// way (started here if none is) brings.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<AccessToken>, TokenError> {
        self.start_renewing();
        if let Some(token) = self.usable() {
            return Ok(token);
        }
        self.renew(None).await
    }

    /// A new token instead of `stale` (the generation a 401 met); when another request
    /// already replaced it, that replacement — one exchange for all the requests that met it.
    pub async fn renew(&self, stale: Option<u64>) -> Result<Arc<AccessToken>, TokenError> {
        self.renew_inner(stale, false).await
    }

    /// [`Tokens::renew`]; `force`: exchange even within the backoff after a failure (the
    /// renewing task, which waits that backoff itself).
    async fn renew_inner(
        &self,
        stale: Option<u64>,
        force: bool,
    ) -> Result<Arc<AccessToken>, TokenError> {
        let _flight = self.exchanging.lock().await;
        if let Some(token) = self.usable() {
            if stale.is_none_or(|g| token.generation != g) {
                return Ok(token);
            }
        }
        if let (Some(g), false) = (stale, force) {
            // FCM refused this token: it is not offered again. (A renewal ahead of expiry,
            // `force`, keeps the current token in use until the new one is in hand: requests
            // go on meanwhile, and a failed exchange leaves them the token's remaining life.)
            let mut current = self.current.write().unwrap();
            if current.as_ref().is_some_and(|t| t.generation == g) {
                *current = None;
            }
        }
        if !force {
            if let Some((at, error, failures)) = &*self.failed.lock().unwrap() {
                let wait = crate::backoff::jittered(
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                    *failures,
                );
                if at.elapsed() < wait {
                    return Err(error.clone());
                }
            }
        }
        match self.exchange().await {
            Ok(token) => {
                let token = Arc::new(token);
                *self.current.write().unwrap() = Some(token.clone());
                *self.failed.lock().unwrap() = None;
                self.renewals.fetch_add(1, Ordering::Relaxed);
                self.failing.store(false, Ordering::Relaxed);
                Ok(token)
            }
            Err(e) => {
                self.renewal_failures.fetch_add(1, Ordering::Relaxed);
                self.failing.store(true, Ordering::Relaxed);
                let mut failed = self.failed.lock().unwrap();
                let failures = failed.as_ref().map_or(0, |f| f.2) + 1;
                *failed = Some((Instant::now(), e.clone(), failures));
                warn!(error = %e, failures, "cannot get an FCM access token");
                Err(e)
            }
        }
    }

    fn usable(&self) -> Option<Arc<AccessToken>> {
        let current = self.current.read().unwrap();
        current
            .as_ref()
            .filter(|t| t.usable(Instant::now()))
            .cloned()
    }

    /// Starts the task that renews the token ahead of its expiry (once; it ends with the
    /// last handle on these tokens).
    fn start_renewing(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(keep_fresh(weak));
    }

    /// One exchange: the assertion for an access token.
    async fn exchange(&self) -> Result<AccessToken, TokenError> {
        let unreachable = |reason: String| TokenError::Unreachable {
            endpoint: self.endpoint.base.clone(),
            reason,
        };
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
            .append_pair("assertion", &self.account.assertion())
            .finish();
        let body = Bytes::from(body);
        let sent = async {
            let mut last = None;
            for _ in 0..3 {
                let slot = self.pool.pick();
                let live = slot.live().await.map_err(|e| e.to_string())?;
                let mut request = Request::new(());
                *request.method_mut() = Method::POST;
                *request.uri_mut() = format!("{}{}", self.endpoint.base, self.path)
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| e.to_string())?;
                request.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
                match live.send(request, body.clone()).await {
                    Ok(response) => return Ok(response),
                    Err(e) => {
                        if e.connection_gone() {
                            live.retire(slot.endpoint(), &e.error.to_string());
                        }
                        if !e.unprocessed() {
                            return Err(SendError::from(e.error).to_string());
                        }
                        last = Some(e.error.to_string());
                    }
                }
            }
            Err(last.unwrap_or_default())
        };
        let started = Instant::now();
        let response = tokio::time::timeout(self.request_timeout, sent)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no answer within {}",
                    crate::human::Human(self.request_timeout)
                ))
            })?
            .map_err(unreachable)?;
        let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        if response.status != 200 {
            let error = [&json["error"], &json["error_description"]]
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(": ");
            if response.status >= 500 || response.status == 429 {
                return Err(unreachable(format!("HTTP {} {error}", response.status)));
            }
            return Err(TokenError::Refused {
                endpoint: self.endpoint.base.clone(),
                status: response.status,
                error,
            });
        }
        let token = json["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unreachable("the answer has no access_token".into()))?;
        let lifetime = Duration::from_secs(json["expires_in"].as_u64().unwrap_or(3600).max(1));
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| unreachable("the access token is not a header value".into()))?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            generation,
            lifetime_s = lifetime.as_secs(),
            took_ms = started.elapsed().as_millis() as u64,
            "FCM access token obtained"
        );
        Ok(AccessToken {
            bearer,
            issued: started,
            expires: started + lifetime,
            generation,
        })
    }

    /// Whether the token endpoint can be reached now.
    pub async fn probe(&self) -> Result<(), SendError> {
        self.pool.probe().await
    }
}

/// Renews the token at three quarters of its lifetime; after a failed exchange, tries again
/// with backoff (1 s doubling to 30 s, jittered). Ends when the tokens are dropped.
async fn keep_fresh(tokens: Weak<Tokens>) {
    let mut failures = 0;
    loop {
        let wait = {
            let Some(tokens) = tokens.upgrade() else {
                return;
            };
            let current = tokens.current.read().unwrap().clone();
            match (current, failures) {
                (_, f) if f > 0 => {
                    crate::backoff::jittered(Duration::from_secs(1), Duration::from_secs(30), f)
                }
                (Some(t), _) => {
                    let at = t.issued + (t.expires - t.issued).mul_f64(RENEW_AT);
                    at.saturating_duration_since(Instant::now())
                }
                (None, _) => Duration::ZERO,
            }
        };
        tokio::time::sleep(wait).await;
        let Some(tokens) = tokens.upgrade() else {
            return;
        };
        let stale = tokens
            .current
            .read()
            .unwrap()
            .as_ref()
            .map(|t| t.generation);
        failures = match tokens.renew_inner(stale.or(Some(0)), true).await {
            Ok(_) => 0,
            Err(_) => failures + 1,
        };
    }
}
