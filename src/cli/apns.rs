//! The APNs flags: the protocol, the endpoints, the credentials (token or certificate auth,
//! exactly one) and the client's timeouts; checked here and built into the client the worker
//! pushes through.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::values::{address, defaults, duration, endpoint, positive, protocol, shown};
use super::{config_error, ApnsProtocol, ConfigError};
use crate::apns::http2;
use crate::apns::jwt::{self, Signer};
use crate::apns::request::Endpoint;
use crate::apns::{self, binary, Apns};
use crate::apps;
use crate::tls;

#[derive(Debug, Clone, Args)]
pub struct ApnsArgs {
    #[command(flatten)]
    pub tls: ApnsTlsArgs,
    /// HTTP/2 API base for tokens whose environment is production.
    #[arg(long, env = "RINGPUSH_APNS_PRODUCTION_URL", default_value = apns::PRODUCTION_URL, value_parser = endpoint("RINGPUSH_APNS_PRODUCTION_URL"))]
    pub apns_production_url: Endpoint,
    /// HTTP/2 API base for tokens whose environment is sandbox.
    #[arg(long, env = "RINGPUSH_APNS_SANDBOX_URL", default_value = apns::SANDBOX_URL, value_parser = endpoint("RINGPUSH_APNS_SANDBOX_URL"))]
    pub apns_sandbox_url: Endpoint,
    /// Token auth: the team's .p8 key file.
    #[arg(long, env = "RINGPUSH_APNS_KEY_FILE")]
    pub apns_key_file: Option<PathBuf>,
    /// Token auth: the key's 10-character id.
    #[arg(long, env = "RINGPUSH_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// Token auth: the 10-character team id.
    #[arg(long, env = "RINGPUSH_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// Bundle id for tokens whose row has no topic.
    #[arg(long, env = "RINGPUSH_APNS_TOPIC")]
    pub apns_topic: Option<String>,
    /// How long one APNs request may take.
    #[arg(long, env = "RINGPUSH_APNS_REQUEST_TIMEOUT", default_value = shown!(defaults::http2().request_timeout), value_parser = duration("RINGPUSH_APNS_REQUEST_TIMEOUT"))]
    pub apns_request_timeout: Duration,
    /// Token auth: re-sign the shared JWT this often (20m to 60m).
    #[arg(long, env = "RINGPUSH_APNS_JWT_REFRESH", default_value = shown!(jwt::DEFAULT_REFRESH), value_parser = duration("RINGPUSH_APNS_JWT_REFRESH"))]
    pub apns_jwt_refresh: Duration,
    /// Persistent connections per APNs endpoint.
    #[arg(long, env = "RINGPUSH_APNS_CONNECTIONS", default_value_t = defaults::http2().connections, value_parser = positive::<usize>("RINGPUSH_APNS_CONNECTIONS"))]
    pub apns_connections: usize,
    /// PING a connection idle this long (0s: never).
    #[arg(long, env = "RINGPUSH_APNS_PING_INTERVAL", default_value = shown!(defaults::http2().ping_interval.unwrap_or_default()), value_parser = duration("RINGPUSH_APNS_PING_INTERVAL"))]
    pub apns_ping_interval: Duration,
    /// How long connecting to APNs (TCP, TLS, HTTP/2) may take.
    #[arg(long, env = "RINGPUSH_APNS_CONNECT_TIMEOUT", default_value = shown!(defaults::http2().connect_timeout), value_parser = duration("RINGPUSH_APNS_CONNECT_TIMEOUT"))]
    pub apns_connect_timeout: Duration,
    /// Binary protocol: the legacy gateway, host:port.
    #[arg(long, env = "RINGPUSH_APNS_BINARY_ADDR", default_value = binary::GATEWAY, value_parser = address("RINGPUSH_APNS_BINARY_ADDR"))]
    pub apns_binary_addr: binary::Address,
    /// Binary protocol: a notification with no error packet this long after its write is
    /// accepted.
    #[arg(long, env = "RINGPUSH_APNS_BINARY_QUIET", default_value = shown!(defaults::binary().quiet), value_parser = duration("RINGPUSH_APNS_BINARY_QUIET"))]
    pub apns_binary_quiet: Duration,
}

/// What both protocols' TLS needs: the protocol, an extra CA, and certificate auth.
#[derive(Debug, Clone, Args)]
pub struct ApnsTlsArgs {
    /// `http2` (today's APNs) or `binary` (the legacy protocol).
    #[arg(long, env = "RINGPUSH_APNS_PROTOCOL", default_value_t = ApnsProtocol::Http2, value_parser = protocol)]
    pub apns_protocol: ApnsProtocol,
    /// Extra CA (PEM) to trust besides the public roots, e.g. the mock's.
    #[arg(long, env = "RINGPUSH_APNS_CA_FILE")]
    pub apns_ca_file: Option<PathBuf>,
    /// Certificate auth: a .p12 file, or PEM with the certificate chain and its key.
    #[arg(long, env = "RINGPUSH_APNS_CERT_FILE")]
    pub apns_cert_file: Option<PathBuf>,
    /// Certificate auth: the .p12 file's password.
    #[arg(long, env = "RINGPUSH_APNS_CERT_PASSWORD", hide_env_values = true)]
    pub apns_cert_password: Option<Secret>,
}

impl ApnsTlsArgs {
    /// The client certificate, when one is configured.
    pub fn identity(&self) -> Result<Option<tls::Identity>, ConfigError> {
        let Some(file) = &self.apns_cert_file else {
            return Ok(None);
        };
        let password = self.apns_cert_password.as_ref().map_or("", |p| p.expose());
        tls::Identity::from_file(file, password)
            .map(Some)
            .map_err(|e| config_error("RINGPUSH_APNS_CERT_FILE", e))
    }

    /// TLS for the binary interface: the certificate is required there.
    pub fn binary_tls(&self) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, ConfigError> {
        let identity = self.identity()?.ok_or_else(|| {
            config_error(
                "RINGPUSH_APNS_CERT_FILE",
                "the binary protocol needs certificate auth (.p12 or PEM)",
            )
        })?;
        let mut config = (*tls::client_config(self.apns_ca_file.as_deref(), Some(identity))
            .map_err(|e| config_error("RINGPUSH_APNS_CA_FILE", e))?)
        .clone();
        config.alpn_protocols.clear();
        Ok(Arc::new(config))
    }
}

impl ApnsArgs {
    /// Whether any APNs credential is set (or the binary protocol asked for): APNs is meant
    /// to be used, and its settings must be complete.
    pub(crate) fn configured(&self) -> bool {
        self.apns_key_file.is_some()
            || self.apns_key_id.is_some()
            || self.apns_team_id.is_some()
            || self.tls.apns_cert_file.is_some()
            || self.tls.apns_protocol == ApnsProtocol::Binary
    }

    /// The client when APNs is configured ([`ApnsArgs::configured`]), checked as
    /// [`ApnsArgs::client`] checks it; `None` when no APNs credential is set at all.
    pub(crate) fn client_if_configured(&self) -> Result<Option<Apns>, ConfigError> {
        self.configured().then(|| self.client()).transpose()
    }

    /// When the configured client certificate expires (`RINGPUSH_APNS_CERT_FILE`), for
    /// `ringpush_credential_expiry_timestamp_seconds`.
    pub(crate) fn certificate_expiry(
        &self,
    ) -> Result<Vec<(&'static str, time::OffsetDateTime)>, ConfigError> {
        Ok(self
            .tls
            .identity()?
            .and_then(|identity| identity.not_after())
            .map(|at| ("apns", at))
            .into_iter()
            .collect())
    }

    /// Checks the credentials and builds the client (connections open on first use).
    pub fn client(&self) -> Result<Apns, ConfigError> {
        match self.tls.apns_protocol {
            ApnsProtocol::Binary => self.binary_client(),
            ApnsProtocol::Http2 => self.http2_client(),
        }
    }

    fn binary_client(&self) -> Result<Apns, ConfigError> {
        if self.apns_key_file.is_some() || self.apns_key_id.is_some() || self.apns_team_id.is_some()
        {
            return Err(config_error(
                "RINGPUSH_APNS_KEY_FILE",
                "the binary protocol has no token auth: use RINGPUSH_APNS_CERT_FILE only",
            ));
        }
        Ok(self.binary_client_with(self.tls.binary_tls()?))
    }

    /// The deployment's APNs settings every app folder's client is built with: the
    /// protocol with its endpoints and timeouts, the CA, the JWT refresh (checked by
    /// [`ApnsArgs::jwt_refresh`]).
    pub fn app_settings(&self, jwt_refresh: Duration) -> apps::build::ApnsSettings {
        let protocol = match self.tls.apns_protocol {
            ApnsProtocol::Binary => apps::build::Protocol::Binary(self.binary_settings()),
            ApnsProtocol::Http2 => apps::build::Protocol::Http2(self.http2_settings()),
        };
        apps::build::ApnsSettings {
            protocol,
            ca_file: self.tls.apns_ca_file.clone(),
            jwt_refresh,
        }
    }

    /// The deployment's JWT refresh, checked (20m to 60m).
    pub fn jwt_refresh(&self) -> Result<Duration, ConfigError> {
        let refresh = self.apns_jwt_refresh;
        if !(jwt::MIN_REFRESH..=Duration::from_secs(3600)).contains(&refresh) {
            return Err(config_error(
                "RINGPUSH_APNS_JWT_REFRESH",
                format!(
                    "{} is outside 20m..60m (APNs refuses older tokens and more frequent changes)",
                    crate::human::Human(refresh)
                ),
            ));
        }
        Ok(refresh)
    }

    fn binary_client_with(&self, tls: Arc<tokio_rustls::rustls::ClientConfig>) -> Apns {
        binary::Client::new(self.binary_settings(), tls).into()
    }

    fn binary_settings(&self) -> binary::Settings {
        binary::Settings {
            connect_timeout: self.apns_connect_timeout,
            request_timeout: self.apns_request_timeout,
            // Callers give up after the request timeout: a stalled write must be noticed first.
            write_timeout: self.apns_request_timeout / 2,
            quiet: self.apns_binary_quiet,
            ..binary::Settings::new(self.apns_binary_addr.clone())
        }
    }

    /// The app `default`'s HTTP/2 client: its credentials checked here (each mistake named by
    /// its variable), the client built as every app's is.
    fn http2_client(&self) -> Result<Apns, ConfigError> {
        let (signer, identity) = self.credentials()?;
        self.app_settings(self.apns_jwt_refresh)
            .client(signer, identity)
            .map_err(|e| config_error("RINGPUSH_APNS_CA_FILE", e))
    }

    fn http2_settings(&self) -> http2::Settings {
        http2::Settings {
            request_timeout: self.apns_request_timeout,
            connect_timeout: self.apns_connect_timeout,
            connections: self.apns_connections,
            ping_interval: Some(self.apns_ping_interval).filter(|d| !d.is_zero()),
            ..http2::Settings::new(
                self.apns_production_url.clone(),
                self.apns_sandbox_url.clone(),
            )
        }
    }

    /// Exactly one of token auth (key file, key id, team id) and certificate auth.
    fn credentials(&self) -> Result<(Option<Signer>, Option<tls::Identity>), ConfigError> {
        let token_vars = [
            ("RINGPUSH_APNS_KEY_FILE", self.apns_key_file.is_some()),
            ("RINGPUSH_APNS_KEY_ID", self.apns_key_id.is_some()),
            ("RINGPUSH_APNS_TEAM_ID", self.apns_team_id.is_some()),
        ];
        let any_token = token_vars.iter().any(|(_, set)| *set);
        match (&self.tls.apns_cert_file, any_token) {
            (Some(_), true) => Err(config_error(
                "RINGPUSH_APNS_CERT_FILE",
                "set either certificate auth (RINGPUSH_APNS_CERT_FILE) or token auth (RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_KEY_ID, RINGPUSH_APNS_TEAM_ID), not both",
            )),
            (Some(_), false) => Ok((None, self.tls.identity()?)),
            (None, _) => {
                let missing: Vec<&str> = token_vars
                    .iter()
                    .filter_map(|(var, set)| (!set).then_some(*var))
                    .collect();
                if let Some(first) = missing.first() {
                    // Reported under the (first) variable that is missing.
                    return Err(config_error(
                        first,
                        format!("APNs needs token auth (RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_KEY_ID, RINGPUSH_APNS_TEAM_ID) or certificate auth (RINGPUSH_APNS_CERT_FILE); missing: {}", missing.join(", ")),
                    ));
                }
                Ok((Some(self.signer()?), None))
            }
        }
    }

    fn signer(&self) -> Result<Signer, ConfigError> {
        let (Some(file), Some(key_id), Some(team_id)) =
            (&self.apns_key_file, &self.apns_key_id, &self.apns_team_id)
        else {
            unreachable!("credentials() checked all three are set");
        };
        for (var, value) in [
            ("RINGPUSH_APNS_KEY_ID", key_id),
            ("RINGPUSH_APNS_TEAM_ID", team_id),
        ] {
            if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(config_error(
                    var,
                    format!("{value:?} is not a 10-character Apple id"),
                ));
            }
        }
        let refresh = self.jwt_refresh()?;
        let pem = std::fs::read(file).map_err(|e| {
            config_error("RINGPUSH_APNS_KEY_FILE", format!("{}: {e}", file.display()))
        })?;
        Signer::from_pem(&pem, key_id, team_id, refresh)
            .map_err(|e| config_error("RINGPUSH_APNS_KEY_FILE", format!("{}: {e}", file.display())))
    }
}

/// A secret from the environment: never printed, not even by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}
