//! The FCM flags: the service account, the API base, an extra CA and the notification
//! channel; checked here (the service account read and parsed at start) and built into the
//! client the worker pushes Android phones through.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::values::{duration, endpoint, positive, shown};
use super::{config_error, ConfigError};
use crate::apps;
use crate::fcm::{self, ServiceAccount};
use crate::http2::Endpoint;
use crate::tls;

#[derive(Debug, Clone, Args)]
pub struct FcmArgs {
    /// Google service-account JSON (project_id, client_email, private_key, token_uri);
    /// unset: FCM tokens are not pushed (counted unconfigured).
    #[arg(long, env = "RINGPUSH_FCM_CREDENTIALS_FILE")]
    pub fcm_credentials_file: Option<PathBuf>,
    /// FCM HTTP v1 API base.
    #[arg(long, env = "RINGPUSH_FCM_URL", default_value = fcm::URL, value_parser = endpoint("RINGPUSH_FCM_URL"))]
    pub fcm_url: Endpoint,
    /// Extra CA (PEM) to trust for FCM and its token endpoint, e.g. the mock's.
    #[arg(long, env = "RINGPUSH_FCM_CA_FILE")]
    pub fcm_ca_file: Option<PathBuf>,
    /// Android notification channel of alert rings.
    #[arg(long, env = "RINGPUSH_FCM_CHANNEL", default_value = fcm::DEFAULT_CHANNEL)]
    pub fcm_channel: String,
    /// Android notification channel of follow-ups (a ring's end): one the app creates without
    /// a sound.
    #[arg(long, env = "RINGPUSH_FCM_QUIET_CHANNEL", default_value = fcm::DEFAULT_QUIET_CHANNEL)]
    pub fcm_quiet_channel: String,
    /// Persistent HTTP/2 connections to FCM.
    #[arg(long, env = "RINGPUSH_FCM_CONNECTIONS", default_value_t = fcm::Settings::new(fcm_default_url()).tuning.connections, value_parser = positive::<usize>("RINGPUSH_FCM_CONNECTIONS"))]
    pub fcm_connections: usize,
    /// How long one FCM request (or token exchange) may take.
    #[arg(long, env = "RINGPUSH_FCM_REQUEST_TIMEOUT", default_value = shown!(fcm::Settings::new(fcm_default_url()).request_timeout), value_parser = duration("RINGPUSH_FCM_REQUEST_TIMEOUT"))]
    pub fcm_request_timeout: Duration,
}

fn fcm_default_url() -> Endpoint {
    Endpoint::parse(fcm::URL).expect("FCM's URL parses")
}

impl FcmArgs {
    /// The client when a service account is configured, its file read and checked.
    pub fn client(&self) -> Result<Option<fcm::Client>, ConfigError> {
        let Some(path) = &self.fcm_credentials_file else {
            return Ok(None);
        };
        let var = "RINGPUSH_FCM_CREDENTIALS_FILE";
        let json = std::fs::read(path)
            .map_err(|e| config_error(var, format!("{}: {e}", path.display())))?;
        let account = ServiceAccount::parse(&json)
            .map_err(|e| config_error(var, format!("{}: {e}", path.display())))?;
        self.check()?;
        self.app_settings()
            .client(account)
            .map(Some)
            .map_err(|e| config_error(var, e))
    }

    /// Checks the deployment-wide settings (channels).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.fcm_channel.is_empty() {
            return Err(config_error("RINGPUSH_FCM_CHANNEL", "must not be empty"));
        }
        if self.fcm_quiet_channel.is_empty() {
            return Err(config_error(
                "RINGPUSH_FCM_QUIET_CHANNEL",
                "must not be empty",
            ));
        }
        tls::client_config(self.fcm_ca_file.as_deref(), None)
            .map_err(|e| config_error("RINGPUSH_FCM_CA_FILE", e))?;
        Ok(())
    }

    /// The deployment's FCM settings every app's client is built with: the endpoint,
    /// channels, timeouts and CA.
    pub fn app_settings(&self) -> apps::build::FcmSettings {
        let mut client = fcm::Settings::new(self.fcm_url.clone());
        client.channel = self.fcm_channel.clone();
        client.quiet_channel = self.fcm_quiet_channel.clone();
        client.request_timeout = self.fcm_request_timeout;
        client.tuning.connections = self.fcm_connections;
        apps::build::FcmSettings {
            client,
            ca_file: self.fcm_ca_file.clone(),
        }
    }
}
