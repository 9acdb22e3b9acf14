//! `ringpush mock-fcm`'s flags: where it listens, the service account it takes (written
//! when asked), the faults it injects.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::values::{duration, shown};
use super::{config_error, ConfigError};
use crate::mock_fcm;

#[derive(Debug, Clone, Args)]
pub struct MockFcmArgs {
    /// Address the mock listens on.
    #[arg(
        long,
        env = "RINGPUSH_MOCK_FCM_LISTEN",
        default_value = "127.0.0.1:2198"
    )]
    pub listen: SocketAddr,
    /// Directory of the mock's CA and server certificate (generated on first start).
    #[arg(
        long,
        env = "RINGPUSH_MOCK_FCM_CERT_DIR",
        default_value = "mock-fcm-certs"
    )]
    pub cert_dir: PathBuf,
    /// The service-account JSON whose assertions the token endpoint takes.
    #[arg(
        long,
        env = "RINGPUSH_MOCK_FCM_CREDENTIALS_FILE",
        conflicts_with = "generate_credentials"
    )]
    pub credentials: Option<PathBuf>,
    /// Write a new service-account JSON here (unless the file exists), its token_uri at the
    /// mock, and take its assertions; workers read the same file.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_GENERATE_CREDENTIALS")]
    pub generate_credentials: Option<PathBuf>,
    /// An apps folder (`<app>/app.json`, as RINGPUSH_APPS_DIR): every app's service account
    /// is taken too, each sending for its own project. Read once, at start.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_APPS_DIR")]
    pub apps_dir: Option<PathBuf>,
    /// The base URL clients reach the mock at, for the written token_uri (default:
    /// https://localhost:<port>).
    #[arg(long, env = "RINGPUSH_MOCK_FCM_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// `expires_in` of the access tokens it issues.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_TOKEN_LIFETIME", default_value = shown!(Duration::from_secs(3600)), value_parser = duration("RINGPUSH_MOCK_FCM_TOKEN_LIFETIME"))]
    pub token_lifetime: Duration,
    /// Fault: access tokens stop working this long after they were issued (401), whatever
    /// `expires_in` said.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_TOKEN_VALID_FOR", value_parser = duration("RINGPUSH_MOCK_FCM_TOKEN_VALID_FOR"))]
    pub token_valid_for: Option<Duration>,
    /// Tokens (comma-separated) answered 404 UNREGISTERED.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_UNREGISTERED", value_delimiter = ',')]
    pub unregistered: Vec<String>,
    /// Fault: answer this share of sends (per mille) with RINGPUSH_MOCK_FCM_ERROR_CODE.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_ERROR_PER_MILLE", default_value = "0")]
    pub error_per_mille: u32,
    /// The FCM error code of those answers (its status follows FCM's table).
    #[arg(
        long,
        env = "RINGPUSH_MOCK_FCM_ERROR_CODE",
        default_value = "UNAVAILABLE"
    )]
    pub error_code: String,
    /// `Retry-After` seconds on its 429 and 503 answers.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_RETRY_AFTER")]
    pub retry_after: Option<u64>,
    /// Fault: GOAWAY once this many streams arrived on a connection.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_GOAWAY_AFTER")]
    pub goaway_after: Option<u64>,
    /// Fault: drop the TCP connection when this many streams have arrived on it.
    #[arg(long, env = "RINGPUSH_MOCK_FCM_CLOSE_AFTER")]
    pub close_after: Option<u64>,
}

const CODES: [&str; 7] = [
    "UNREGISTERED",
    "SENDER_ID_MISMATCH",
    "INVALID_ARGUMENT",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "THIRD_PARTY_AUTH_ERROR",
];

impl MockFcmArgs {
    /// The mock's settings, and the credentials file with whether to write it.
    pub fn settings(
        &self,
    ) -> Result<(mock_fcm::Settings, Option<mock_fcm::Credentials>), ConfigError> {
        if self.error_per_mille > 1000 {
            return Err(config_error(
                "RINGPUSH_MOCK_FCM_ERROR_PER_MILLE",
                "must be 0 to 1000",
            ));
        }
        if !CODES.contains(&self.error_code.as_str()) {
            return Err(config_error(
                "RINGPUSH_MOCK_FCM_ERROR_CODE",
                format!("{:?} is not one of {}", self.error_code, CODES.join(", ")),
            ));
        }
        let faults = mock_fcm::Faults {
            unregistered: self
                .unregistered
                .iter()
                .filter(|t| !t.is_empty())
                .cloned()
                .collect::<HashSet<_>>(),
            error_rate: (self.error_per_mille > 0)
                .then(|| (self.error_per_mille, self.error_code.clone())),
            retry_after: self.retry_after,
            token_valid_for: self.token_valid_for,
            goaway_after: self.goaway_after,
            close_after: self.close_after,
        };
        let accounts = match &self.apps_dir {
            Some(dir) => apps_accounts(dir)?,
            None => Vec::new(),
        };
        let settings = mock_fcm::Settings {
            listen: self.listen,
            token_lifetime: self.token_lifetime,
            accounts,
            faults,
            ..mock_fcm::Settings::local(self.cert_dir.clone())
        };
        let credentials = match (&self.credentials, &self.generate_credentials) {
            (Some(path), _) => Some(mock_fcm::Credentials {
                path: path.clone(),
                generate: false,
                public_url: None,
            }),
            (None, Some(path)) => Some(mock_fcm::Credentials {
                path: path.clone(),
                generate: true,
                public_url: self.public_url.clone(),
            }),
            (None, None) => None,
        };
        Ok((settings, credentials))
    }
}

/// The service account of every app of `dir` that has one.
fn apps_accounts(dir: &Path) -> Result<Vec<mock_fcm::Account>, ConfigError> {
    let var = "RINGPUSH_MOCK_FCM_APPS_DIR";
    let apps = crate::mock::apps::read(dir).map_err(|e| config_error(var, e))?;
    apps.into_iter()
        .filter_map(|app| app.fcm_credentials)
        .map(|file| {
            let json = std::fs::read(&file)
                .map_err(|e| config_error(var, format!("{}: {e}", file.display())))?;
            mock_fcm::account_of(&json)
                .map_err(|e| config_error(var, format!("{}: {e}", file.display())))
        })
        .collect()
}
