//! The TLS flags of the hops to RabbitMQ: `amqps://` nodes (`RINGPUSH_AMQP_CA_FILE`, a
//! client certificate in `RINGPUSH_AMQP_CERT_FILE` / `RINGPUSH_AMQP_KEY_FILE`) and an
//! `https://` management API (`RINGPUSH_MANAGEMENT_CA_FILE`); checked at start and built into
//! a [`crate::broker::Endpoint`] and an [`crate::http::Client`]. PostgreSQL's TLS is in its
//! URL (`sslmode`, `sslrootcert`: [`crate::db`]).

use std::path::PathBuf;

use clap::Args;

use super::{config_error, ConfigError};
use crate::broker::Endpoint;
use crate::tls::{Identity, TlsError};

/// How `amqps://` nodes are verified and whom ringpush says it is to them.
#[derive(Debug, Clone, Default, Args)]
pub struct AmqpTlsArgs {
    /// Extra CA (PEM) to trust for amqps:// nodes, besides the public roots.
    #[arg(long, env = "RINGPUSH_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// Client certificate (PEM, the chain may follow) presented to amqps:// nodes; with
    /// RINGPUSH_AMQP_KEY_FILE.
    #[arg(long, env = "RINGPUSH_AMQP_CERT_FILE")]
    pub amqp_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "RINGPUSH_AMQP_KEY_FILE")]
    pub amqp_key_file: Option<PathBuf>,
}

impl AmqpTlsArgs {
    /// `url` with this TLS: the CA file and the client certificate read and checked now.
    /// Settings that no `amqps://` node would use are refused (a certificate that is never
    /// presented is a mistake, not a setting).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ConfigError> {
        let set = [
            ("RINGPUSH_AMQP_CA_FILE", self.amqp_ca_file.is_some()),
            ("RINGPUSH_AMQP_CERT_FILE", self.amqp_cert_file.is_some()),
            ("RINGPUSH_AMQP_KEY_FILE", self.amqp_key_file.is_some()),
        ];
        let Some((first, _)) = set.iter().find(|(_, on)| *on) else {
            return Ok(Endpoint::new(url));
        };
        if !Endpoint::new(url).any_tls() {
            return Err(config_error(
                first,
                "is set, but RINGPUSH_AMQP_URL names no amqps:// node: it would never be used",
            ));
        }
        let identity = match (&self.amqp_cert_file, &self.amqp_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Identity::from_pem_files(cert, key).map_err(|e| {
                let var = match &e {
                    TlsError::Identity { path, .. } if *path == key.display().to_string() => {
                        "RINGPUSH_AMQP_KEY_FILE"
                    }
                    _ => "RINGPUSH_AMQP_CERT_FILE",
                };
                config_error(var, e)
            })?),
            (Some(_), None) => {
                return Err(config_error(
                    "RINGPUSH_AMQP_KEY_FILE",
                    "is needed with RINGPUSH_AMQP_CERT_FILE (the certificate's private key)",
                ))
            }
            (None, Some(_)) => {
                return Err(config_error(
                    "RINGPUSH_AMQP_CERT_FILE",
                    "is needed with RINGPUSH_AMQP_KEY_FILE (the certificate of that key)",
                ))
            }
        };
        Endpoint::with_tls(url, self.amqp_ca_file.as_deref(), identity).map_err(|e| {
            let var = match e.is_ca_file() {
                true => "RINGPUSH_AMQP_CA_FILE",
                // rustls refuses a key that does not match the certificate.
                false => "RINGPUSH_AMQP_CERT_FILE",
            };
            config_error(var, e)
        })
    }
}

/// How an `https://` management API is verified.
#[derive(Debug, Clone, Args)]
pub struct ManagementTlsArgs {
    /// Extra CA (PEM) to trust for an https:// RINGPUSH_MANAGEMENT_URL, besides the public
    /// roots.
    #[arg(long, env = "RINGPUSH_MANAGEMENT_CA_FILE")]
    pub management_ca_file: Option<PathBuf>,
}

impl ManagementTlsArgs {
    /// The HTTP client for the management API at `url`.
    pub fn client(&self, url: &str) -> Result<crate::http::Client, ConfigError> {
        const VAR: &str = "RINGPUSH_MANAGEMENT_CA_FILE";
        let Some(ca) = &self.management_ca_file else {
            return Ok(crate::http::Client::default());
        };
        if !url
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("https://")
        {
            return Err(config_error(
                VAR,
                "is set, but RINGPUSH_MANAGEMENT_URL is not https://: it would never be used",
            ));
        }
        crate::http::Client::with_ca(ca).map_err(|e| config_error(VAR, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> AmqpTlsArgs {
        AmqpTlsArgs {
            amqp_ca_file: ca.map(PathBuf::from),
            amqp_cert_file: cert.map(PathBuf::from),
            amqp_key_file: key.map(PathBuf::from),
        }
    }

    #[test]
    fn amqp_tls_settings_that_cannot_be_used_name_their_variable() {
        let tls = "amqps://u:p@h:5671/%2f";
        let cases = [
            (
                args(Some("/ca.pem"), None, None),
                "amqp://h",
                "RINGPUSH_AMQP_CA_FILE",
            ),
            (
                args(None, Some("/c.pem"), None),
                tls,
                "RINGPUSH_AMQP_KEY_FILE",
            ),
            (
                args(None, None, Some("/k.pem")),
                tls,
                "RINGPUSH_AMQP_CERT_FILE",
            ),
            (
                args(Some("/nonexistent.pem"), None, None),
                tls,
                "RINGPUSH_AMQP_CA_FILE",
            ),
            (
                args(None, Some("/nonexistent.pem"), Some("/k.pem")),
                tls,
                "RINGPUSH_AMQP_CERT_FILE",
            ),
        ];
        for (args, url, var) in cases {
            let err = args.endpoint(url).unwrap_err().to_string();
            assert!(err.starts_with(var), "{args:?} {url}: {err}");
            assert!(!err.contains(":p@"), "no password: {err}");
        }
        assert!(args(None, None, None).endpoint("amqp://h").is_ok());
        let https = ManagementTlsArgs {
            management_ca_file: Some("/ca.pem".into()),
        };
        let err = https.client("http://guest:guest@h:15672").unwrap_err();
        assert!(err.to_string().starts_with("RINGPUSH_MANAGEMENT_CA_FILE"));
    }
}
