//! `ringpush mock-fcm`: a local FCM HTTP v1 with its OAuth 2.0 token endpoint, for
//! development, tests, the demo and the benchmark.
//!
//! HTTP/2 over TLS with its own CA (the same kind of certificate directory as `mock-apns`,
//! [`crate::mock::certs`]). `POST /token` takes the RS256 assertion of any service account
//! it was given (several apps' at once; added, rotated and removed while it runs) —
//! signature, `iss`, `scope`, `aud`, `iat`/`exp` checked ([`check`]) — and issues access
//! tokens bound to that account and its project; `POST /v1/projects/<project_id>/messages:send`
//! checks the bearer token is one it issued, still valid and of that project (403
//! PERMISSION_DENIED), that a registration token bound to a project is sent under it (403
//! SENDER_ID_MISMATCH), checks the message's shape, and answers 200 or FCM's error JSON.
//! Fault modes ([`Faults`], and [`MockFcm`]'s control methods): tokens answered
//! UNREGISTERED, a share of errors by code, 429/503 with `Retry-After`, the next n requests
//! failing, access tokens expiring early, connections dropped after n streams, GOAWAY after
//! n streams. `--generate-credentials FILE` writes a service-account JSON whose `token_uri`
//! points at the mock.
//!
//! One concern a file: `server` (the listener, TLS, HTTP/2 streams, both endpoints),
//! [`check`] (what a request must be); this file holds the settings, the state and control.

pub mod check;
mod server;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::info;

pub use check::Account;

/// How the mock is set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Where the CA and server certificate live (generated on first start).
    pub cert_dir: PathBuf,
    /// The service accounts whose assertions the token endpoint takes at start (more are
    /// added later with [`MockFcm::new_account`] when their `token_uri` must name the
    /// mock's port).
    pub accounts: Vec<Account>,
    /// `expires_in` of the access tokens it issues.
    pub token_lifetime: Duration,
    /// MAX_CONCURRENT_STREAMS announced.
    pub max_concurrent_streams: u32,
    pub faults: Faults,
}

impl Settings {
    /// A mock on an ephemeral loopback port.
    pub fn local(cert_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert_dir,
            accounts: Vec::new(),
            token_lifetime: Duration::from_secs(3600),
            max_concurrent_streams: 1000,
            faults: Faults::default(),
        }
    }
}

/// What the mock answers wrongly on purpose.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Tokens answered 404 UNREGISTERED.
    pub unregistered: HashSet<String>,
    /// This share of sends (per mille) answered with `code` (status from FCM's table).
    pub error_rate: Option<(u32, String)>,
    /// `Retry-After` (seconds) on every 429 and 503 the mock answers.
    pub retry_after: Option<u64>,
    /// Access tokens stop working this long after they were issued, whatever `expires_in`
    /// said (a revoked or rotated token).
    pub token_valid_for: Option<Duration>,
    /// GOAWAY (graceful) once this many streams arrived on a connection.
    pub goaway_after: Option<u64>,
    /// Drop the TCP connection, unanswered, when this many streams arrived on it.
    pub close_after: Option<u64>,
}

/// One `messages:send` the mock answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// `message.token`, when the body had one.
    pub token: Option<String>,
    /// The project of the URL (`/v1/projects/<project>/messages:send`).
    pub project: String,
    /// The service account (`client_email`) the bearer token was issued to, when it is one
    /// the mock issued.
    pub account: Option<String>,
    pub status: u16,
    /// FCM's error code of the answer, when it was an error.
    pub code: Option<String>,
    /// The request body as JSON (`Null` when it was not JSON).
    pub body: serde_json::Value,
    /// Which connection (1, 2, …) carried it.
    pub connection: u64,
    pub at: Instant,
}

/// A scripted answer for a token: `status` with FCM's `code`, `times` times.
#[derive(Debug, Clone)]
pub struct Script {
    pub status: u16,
    pub code: String,
    pub retry_after: Option<u64>,
    pub times: u32,
}

/// Counts of what the mock did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub rejected: u64,
    /// Access tokens issued, and token requests refused.
    pub tokens_issued: u64,
    pub token_refusals: u64,
    /// Sends refused for their bearer token (401).
    pub unauthenticated: u64,
    pub connections: u64,
    /// Connections dropped or sent away by a fault.
    pub cut: u64,
    pub goaways: u64,
}

struct State {
    settings: Settings,
    /// The service accounts taken, by `client_email`.
    accounts: Mutex<HashMap<String, Account>>,
    faults: Mutex<Faults>,
    /// Access tokens issued, with whom to and until when.
    tokens: Mutex<HashMap<String, Issued>>,
    /// Registration tokens bound to the project that registered them.
    bound: Mutex<HashMap<String, String>>,
    scripts: Mutex<HashMap<String, Script>>,
    /// The next sends, whatever their token, answered so (a 503 burst).
    fail_next: Mutex<VecDeque<Script>>,
    stats: Mutex<Stats>,
    received: Mutex<Vec<Received>>,
    /// Cancelled to drop every open connection.
    cut: Mutex<CancellationToken>,
}

/// An access token the mock issued.
#[derive(Debug, Clone)]
struct Issued {
    /// The service account's `client_email`.
    account: String,
    /// Its project: the only one the token may send for.
    project: String,
    valid_until: Instant,
}

/// A running mock. Dropping it does not stop it: cancel the token given to `start`.
#[derive(Clone)]
pub struct MockFcm {
    addr: SocketAddr,
    ca_file: PathBuf,
    state: Arc<State>,
}

impl MockFcm {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA clients must trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// `https://localhost:<port>`: the API base clients use.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// `https://localhost:<port>/token`: the `token_uri` of accounts it serves.
    pub(crate) fn token_uri(&self) -> String {
        format!("{}/token", self.url())
    }

    /// Takes assertions from `account` from now on, beside the accounts already taken (in
    /// place of one with the same `client_email`: its key replaced).
    pub(crate) fn add_account(&self, account: Account) {
        let mut accounts = self.state.accounts.lock().unwrap();
        accounts.insert(account.client_email.clone(), account);
    }

    /// A new service account of `project_id` (a `client_email` of its own), whose
    /// `token_uri` is this mock's, accepted from now on beside the others: its JSON, for a
    /// client. Its access tokens send for `project_id` only.
    pub fn new_account(&self, project_id: &str) -> anyhow::Result<String> {
        let email = format!(
            "ringpush-{}@{project_id}.iam.gserviceaccount.com",
            crate::token::random_hex(3)
        );
        let json = crate::fcm::credentials::generate(project_id, &email, &self.token_uri())
            .map_err(anyhow::Error::msg)?;
        self.add_account(account_of(json.as_bytes())?);
        Ok(json)
    }

    /// A new key for the account `client_email` (its JSON, same account and project): the
    /// old key's assertions are refused from now on; access tokens already issued keep
    /// working until they expire, as Google's do when a key is deleted.
    pub fn rotate_key(&self, client_email: &str) -> anyhow::Result<String> {
        let account = self
            .state
            .accounts
            .lock()
            .unwrap()
            .get(client_email)
            .cloned();
        let account = account.ok_or_else(|| anyhow::anyhow!("no account {client_email}"))?;
        let json = crate::fcm::credentials::generate(
            &account.project_id,
            client_email,
            &account.token_uri,
        )
        .map_err(anyhow::Error::msg)?;
        self.add_account(account_of(json.as_bytes())?);
        Ok(json)
    }

    /// Deletes the account `client_email`: its assertions are refused and its access tokens
    /// answered 401 UNAUTHENTICATED from now on.
    pub fn remove_account(&self, client_email: &str) {
        self.state.accounts.lock().unwrap().remove(client_email);
        let mut tokens = self.state.tokens.lock().unwrap();
        tokens.retain(|_, issued| issued.account != client_email);
    }

    /// The `client_email` of every account taken, sorted.
    pub fn accounts(&self) -> Vec<String> {
        let mut emails: Vec<_> = self
            .state
            .accounts
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        emails.sort();
        emails
    }

    /// Binds the registration token `token` to `project` (the one its app registered with):
    /// sent under another project it is answered 403 SENDER_ID_MISMATCH. Tokens not bound go
    /// to any project.
    pub fn bind_token(&self, token: &str, project: &str) {
        let mut bound = self.state.bound.lock().unwrap();
        bound.insert(token.to_owned(), project.to_owned());
    }

    /// Changes the faults.
    pub fn faults(&self, edit: impl FnOnce(&mut Faults)) {
        edit(&mut self.state.faults.lock().unwrap());
    }

    /// Answers `token` with `script` (its `times` times, then normally).
    pub fn script(&self, token: &str, script: Script) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(token.to_owned(), script);
    }

    /// The next `n` sends, whatever their token, answered with `status` and `code`.
    pub fn fail_next(&self, n: u32, status: u16, code: &str, retry_after: Option<u64>) {
        let mut next = self.state.fail_next.lock().unwrap();
        for _ in 0..n {
            next.push_back(Script {
                status,
                code: code.to_owned(),
                retry_after,
                times: 1,
            });
        }
    }

    /// Every access token issued so far stops working now (answered 401).
    pub fn expire_access_tokens(&self) {
        let now = Instant::now();
        for issued in self.state.tokens.lock().unwrap().values_mut() {
            issued.valid_until = now;
        }
    }

    pub fn stats(&self) -> Stats {
        self.state.stats.lock().unwrap().clone()
    }

    /// Every `messages:send` answered, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

/// The account the mock takes assertions from, read from a service-account JSON.
pub(crate) fn account_of(json: &[u8]) -> anyhow::Result<Account> {
    let account = crate::fcm::ServiceAccount::parse(json)?;
    Ok(Account {
        public_key: account.public_key(),
        client_email: account.client_email.clone(),
        token_uri: account.token_uri.clone(),
        project_id: account.project_id.clone(),
    })
}

/// The service-account file `ringpush mock-fcm` takes assertions from.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub path: PathBuf,
    /// Write a new account there first, unless the file exists.
    pub generate: bool,
    /// The base URL clients reach the mock at (`https://mock-fcm:2198`), for the written
    /// `token_uri`; default `https://localhost:<port>`.
    pub public_url: Option<String>,
}

/// `ringpush mock-fcm`: with `generate` (and no credentials file yet) writes a new
/// service-account JSON there whose `token_uri` is the mock's; serves until `cancel`,
/// logging the counts every 10 s when they move.
pub async fn run(
    settings: Settings,
    credentials: Option<Credentials>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mock = MockFcm::start(settings, cancel.clone()).await?;
    if let Some(Credentials {
        path,
        generate,
        public_url,
    }) = credentials
    {
        if generate && !path.exists() {
            let base = public_url.unwrap_or_else(|| mock.url());
            let token_uri = format!("{}/token", base.trim_end_matches('/'));
            let json = crate::fcm::credentials::generate(
                "ringpush-mock",
                "ringpush@ringpush-mock.iam.gserviceaccount.com",
                &token_uri,
            )
            .map_err(anyhow::Error::msg)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            crate::mock::certs::write_private(&path, &json)?;
            info!(file = %path.display(), %token_uri, "wrote a new service account for the mock");
        }
        let json = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        mock.add_account(account_of(&json)?);
    }
    let mut last = Stats::default();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let stats = mock.stats();
        if stats != last {
            info!(
                accepted = stats.accepted,
                rejected = stats.rejected,
                tokens_issued = stats.tokens_issued,
                connections = stats.connections,
                "mock FCM counts"
            );
            last = stats;
        }
    }
    info!(accepted = mock.stats().accepted, "mock FCM stopped");
    Ok(())
}
