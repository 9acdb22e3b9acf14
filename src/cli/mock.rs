//! `ringpush mock-apns`'s flags: where it listens, what it checks, the faults it injects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::values::{defaults, duration, goaway_debug, goaway_debug_name, positive, shown};
use super::{config_error, ConfigError};
use crate::apns::{jwt, Reason};
use crate::mock::{self, GoAwayDebug};
use crate::token::DeviceToken;

#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Address the mock listens on.
    #[arg(long, env = "RINGPUSH_MOCK_LISTEN", default_value = "127.0.0.1:2197")]
    pub listen: SocketAddr,
    /// Directory of the mock's CA and server certificate (generated on first start).
    #[arg(
        long,
        env = "RINGPUSH_MOCK_CERT_DIR",
        default_value = "mock-apns-certs"
    )]
    pub cert_dir: PathBuf,
    /// Public key (PEM) or .p8 key that JWTs must verify with; without it JWTs are not checked.
    #[arg(long, env = "RINGPUSH_MOCK_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,
    /// Create RINGPUSH_MOCK_JWT_KEY_FILE as a new .p8 key when it does not exist (for
    /// local setups with no Apple key; workers then sign with the same file).
    #[arg(long, env = "RINGPUSH_MOCK_GENERATE_KEY")]
    pub generate_key: bool,
    /// Key id JWTs must carry, when set.
    #[arg(long, env = "RINGPUSH_MOCK_KEY_ID")]
    pub key_id: Option<String>,
    /// Team id JWTs must carry, when set.
    #[arg(long, env = "RINGPUSH_MOCK_TEAM_ID")]
    pub team_id: Option<String>,
    /// An apps folder (`<app>/app.json`, as RINGPUSH_APPS_DIR): each app's key is accepted
    /// for its team and its topic takes that team's JWTs only; certificate apps need nothing
    /// beyond the mock's CA. Read once, at start.
    #[arg(long, env = "RINGPUSH_MOCK_APPS_DIR")]
    pub apps_dir: Option<PathBuf>,
    /// Tokens (hex, comma-separated) answered with 410 Unregistered.
    #[arg(long, env = "RINGPUSH_MOCK_UNREGISTERED", value_delimiter = ',')]
    pub unregistered: Vec<String>,
    /// MAX_CONCURRENT_STREAMS announced when a connection opens (APNs: 1).
    #[arg(long, env = "RINGPUSH_MOCK_INITIAL_STREAMS", default_value_t = defaults::mock().initial_streams, value_parser = positive::<u32>("RINGPUSH_MOCK_INITIAL_STREAMS"))]
    pub initial_streams: u32,
    /// MAX_CONCURRENT_STREAMS announced after the first accepted request.
    #[arg(long, env = "RINGPUSH_MOCK_MAX_STREAMS", default_value_t = defaults::mock().max_concurrent_streams, value_parser = positive::<u32>("RINGPUSH_MOCK_MAX_STREAMS"))]
    pub max_streams: u32,
    /// Announce the initial limit again after each rejection, as APNs does.
    #[arg(long, env = "RINGPUSH_MOCK_DROP_STREAMS_AFTER_REJECTION")]
    pub drop_streams_after_rejection: bool,
    /// Wait this long before each answer.
    #[arg(long, env = "RINGPUSH_MOCK_DELAY", default_value = shown!(defaults::mock().response_delay), value_parser = duration("RINGPUSH_MOCK_DELAY"))]
    pub delay: Duration,
    /// Fault: GOAWAY after this many streams on each connection.
    #[arg(long, env = "RINGPUSH_MOCK_GOAWAY_AFTER")]
    pub goaway_after: Option<u64>,
    /// The GOAWAY's debug data: json, text or empty.
    #[arg(long, env = "RINGPUSH_MOCK_GOAWAY_DEBUG", default_value = goaway_debug_name(GoAwayDebug::default()), value_parser = goaway_debug)]
    pub goaway_debug: GoAwayDebug,
    /// Fault: reset every n-th stream with REFUSED_STREAM.
    #[arg(long, env = "RINGPUSH_MOCK_REFUSE_EVERY")]
    pub refuse_every: Option<u64>,
    /// Fault: after this many streams, answer 503 Shutdown and send GOAWAY.
    #[arg(long, env = "RINGPUSH_MOCK_SHUTDOWN_AFTER")]
    pub shutdown_after: Option<u64>,
    /// Fault: drop the TCP connection once this many streams have arrived on it.
    #[arg(long, env = "RINGPUSH_MOCK_CLOSE_AFTER")]
    pub close_after: Option<u64>,
    /// Also serve the legacy binary gateway here (certificate auth), e.g. 127.0.0.1:2195.
    #[arg(
        long,
        env = "RINGPUSH_MOCK_BINARY_LISTEN",
        requires = "feedback_listen"
    )]
    pub binary_listen: Option<SocketAddr>,
    /// And the legacy feedback service here, e.g. 127.0.0.1:2196.
    #[arg(
        long,
        env = "RINGPUSH_MOCK_FEEDBACK_LISTEN",
        requires = "binary_listen"
    )]
    pub feedback_listen: Option<SocketAddr>,
    /// Fault: answer this share of requests (per mille) with RINGPUSH_MOCK_ERROR_REASON.
    #[arg(long, env = "RINGPUSH_MOCK_ERROR_PER_MILLE", default_value = "0")]
    pub error_per_mille: u32,
    /// The reason of those answers (its status follows APNs's table).
    #[arg(
        long,
        env = "RINGPUSH_MOCK_ERROR_REASON",
        default_value = "ServiceUnavailable"
    )]
    pub error_reason: String,
    /// Append one line per answered request to this file (`<unix ms> <status>
    /// <collapse-id> <token>`): what a test outside the process checks deliveries against.
    #[arg(long, env = "RINGPUSH_MOCK_RECORD")]
    pub record: Option<std::path::PathBuf>,
}

impl MockArgs {
    /// The mock's settings and the tokens it answers with 410. With
    /// RINGPUSH_MOCK_GENERATE_KEY, writes the JWT key first when it does not exist.
    pub fn settings(&self) -> Result<(mock::Settings, Vec<DeviceToken>), ConfigError> {
        let public_key = match &self.jwt_key_file {
            None if self.generate_key => {
                return Err(config_error(
                    "RINGPUSH_MOCK_GENERATE_KEY",
                    "needs RINGPUSH_MOCK_JWT_KEY_FILE: where to write the key",
                ))
            }
            None => None,
            Some(path) => {
                if self.generate_key && !path.exists() {
                    write_new_key(path)?;
                }
                Some(read_public_key(path)?)
            }
        };
        let unregistered = self
            .unregistered
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| {
                DeviceToken::parse(t).map_err(|e| config_error("RINGPUSH_MOCK_UNREGISTERED", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut auth = mock::AuthCheck::default();
        if let Some(public_key) = public_key {
            auth.keys.push(mock::KeyCheck {
                public_key,
                key_id: self.key_id.clone(),
                team_id: self.team_id.clone(),
            });
        }
        if let Some(dir) = &self.apps_dir {
            add_apps(&mut auth, dir)?;
        }
        let error_rate = match (self.error_per_mille, &self.error_reason) {
            (0, _) => None,
            (per_mille, reason) if per_mille <= 1000 => {
                let reason = Reason::parse(reason);
                if reason.status() == 0 {
                    return Err(config_error(
                        "RINGPUSH_MOCK_ERROR_REASON",
                        format!("{reason} is not an APNs reason"),
                    ));
                }
                Some(mock::ErrorRate {
                    per_mille,
                    status: reason.status(),
                    reason,
                })
            }
            _ => {
                return Err(config_error(
                    "RINGPUSH_MOCK_ERROR_PER_MILLE",
                    "must be 0 to 1000",
                ))
            }
        };
        let settings = mock::Settings {
            initial_streams: self.initial_streams,
            max_concurrent_streams: self.max_streams,
            drop_streams_after_rejection: self.drop_streams_after_rejection,
            keep_requests: 10_000,
            response_delay: self.delay,
            faults: mock::Faults {
                goaway_after: self.goaway_after,
                goaway_debug: self.goaway_debug,
                refuse_every: self.refuse_every,
                shutdown_after: self.shutdown_after,
                close_after: self.close_after,
                error_rate,
            },
            listen: self.listen,
            binary: self.binary_listen.zip(self.feedback_listen),
            record: self.record.clone(),
            ..mock::Settings::local(self.cert_dir.clone(), auth)
        };
        Ok((settings, unregistered))
    }
}

/// Writes a new P-256 PKCS#8 key (a .p8 like Apple's), readable by its owner only.
fn write_new_key(path: &Path) -> Result<(), ConfigError> {
    let var = "RINGPUSH_MOCK_JWT_KEY_FILE";
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| config_error(var, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| config_error(var, format!("{}: {e}", dir.display())))?;
    }
    mock::certs::write_private(path, &key.serialize_pem())
        .map_err(|e| config_error(var, format!("{}: {e}", path.display())))
}

/// Accepts every token-auth app's key of `dir` for its team, and maps its topic to that team.
fn add_apps(auth: &mut mock::AuthCheck, dir: &Path) -> Result<(), ConfigError> {
    let var = "RINGPUSH_MOCK_APPS_DIR";
    for app in mock::apps::read(dir).map_err(|e| config_error(var, e))? {
        let Some(mock::apps::Apns {
            topic,
            key: Some((file, key_id, team_id)),
        }) = app.apns
        else {
            continue;
        };
        let pem = std::fs::read(&file)
            .map_err(|e| config_error(var, format!("{}: {e}", file.display())))?;
        let key = mock::KeyCheck::from_pem(&pem, &key_id, &team_id)
            .map_err(|e| config_error(var, format!("{}: {e}", file.display())))?;
        auth.add_key(key);
        auth.topics.insert(topic, team_id);
    }
    Ok(())
}

fn read_public_key(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let var = "RINGPUSH_MOCK_JWT_KEY_FILE";
    let pem =
        std::fs::read(path).map_err(|e| config_error(var, format!("{}: {e}", path.display())))?;
    jwt::public_key_from_pem(&pem)
        .map_err(|e| config_error(var, format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    #[test]
    fn an_apps_folder_gives_both_mocks_every_apps_credentials() {
        let dir = std::env::temp_dir().join(format!(
            "ringpush-mock-apps-{}",
            crate::token::random_hex(6)
        ));
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::create_dir_all(dir.join("brand")).unwrap();
        std::fs::create_dir_all(dir.join("installer")).unwrap();
        std::fs::write(dir.join("brand/apns.p8"), key.serialize_pem()).unwrap();
        let account = crate::fcm::credentials::generate(
            "proj-brand",
            "svc@proj-brand.iam.gserviceaccount.com",
            "https://localhost:1/token",
        )
        .unwrap();
        std::fs::write(dir.join("brand/fcm.json"), &account).unwrap();
        std::fs::write(
            dir.join("brand/app.json"),
            r#"{"apns": {"topic": "com.brand.doorbell", "key_file": "apns.p8", "key_id": "ABC123DEFG", "team_id": "TEAM123456"}, "fcm": {"credentials_file": "fcm.json"}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("installer/app.json"),
            r#"{"apns": {"topic": "com.installer", "cert_file": "apns.p12", "cert_password_file": "apns.pass"}}"#,
        )
        .unwrap();
        let path = dir.to_str().unwrap();

        let cli = Cli::try_parse_from(["ringpush", "mock-apns", "--apps-dir", path]).unwrap();
        let Command::MockApns(args) = cli.command else {
            panic!("not mock-apns")
        };
        let auth = args.settings().unwrap().0.auth;
        let want = crate::mock::KeyCheck::from_pem(
            key.public_key_pem().as_bytes(),
            "ABC123DEFG",
            "TEAM123456",
        )
        .unwrap();
        assert_eq!(auth.keys, vec![want]);
        assert_eq!(
            auth.topics.into_iter().collect::<Vec<_>>(),
            vec![("com.brand.doorbell".to_owned(), "TEAM123456".to_owned())]
        );

        let cli = Cli::try_parse_from(["ringpush", "mock-fcm", "--apps-dir", path]).unwrap();
        let Command::MockFcm(args) = cli.command else {
            panic!("not mock-fcm")
        };
        let accounts = args.settings().unwrap().0.accounts;
        let emails: Vec<_> = accounts.iter().map(|a| a.client_email.as_str()).collect();
        assert_eq!(emails, ["svc@proj-brand.iam.gserviceaccount.com"]);
        assert_eq!(accounts[0].project_id, "proj-brand");

        // A key file that is not there names the variable and the file.
        std::fs::remove_file(dir.join("brand/apns.p8")).unwrap();
        let cli = Cli::try_parse_from(["ringpush", "mock-apns", "--apps-dir", path]).unwrap();
        let Command::MockApns(args) = cli.command else {
            panic!("not mock-apns")
        };
        let err = args.settings().unwrap_err().to_string();
        assert!(
            err.contains("RINGPUSH_MOCK_APPS_DIR") && err.contains("apns.p8"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
