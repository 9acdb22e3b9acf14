//! Where the broker is and how a connection gets there: the URL (one node, or a cluster's
//! nodes as a comma-separated list) and the TLS an `amqps://` node is spoken to with —
//! the public roots plus `RINGPUSH_AMQP_CA_FILE`, and the client certificate of
//! `RINGPUSH_AMQP_CERT_FILE` / `RINGPUSH_AMQP_KEY_FILE` when given. An `amqps://` node gets
//! a TLS handshake before any AMQP byte, verified (chain and host name) — never plain AMQP
//! and never an unverified session; an `amqp://` node gets plain AMQP.

use std::path::Path;
use std::sync::Arc;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use tokio_rustls::rustls::ClientConfig;

use super::BrokerError;
use crate::tls::{self, Identity, TlsError};

/// The broker's URL with the TLS its `amqps://` nodes are reached with. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    url: String,
    tls: Arc<ClientConfig>,
}

impl Endpoint {
    /// `url`, its `amqps://` nodes verified against the public roots only.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: tls::config(tls::roots(None).expect("no file to read"), None, &[])
                .expect("the ring provider supports the default protocol versions"),
        }
    }

    /// `url`, its `amqps://` nodes verified against the public roots and `extra_ca`, with
    /// `identity` as the client certificate when given.
    pub fn with_tls(
        url: impl Into<String>,
        extra_ca: Option<&Path>,
        identity: Option<Identity>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            url: url.into(),
            tls: tls::config(tls::roots(extra_ca)?, identity, &[])?,
        })
    }

    /// The URL (a comma-separated list for a cluster), password included.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The same TLS with another URL (a gateway's login on the same nodes).
    pub fn with_url(&self, url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: self.tls.clone(),
        }
    }

    /// Whether any node of the URL is `amqps://`.
    pub fn any_tls(&self) -> bool {
        super::nodes(&self.url).iter().any(|n| is_amqps(n))
    }

    /// Opens an AMQP connection to `node` (one URL of the list): plain for `amqp://`, TLS
    /// verified against this endpoint's roots for `amqps://` (SNI and the name checked are
    /// the URL's host).
    pub(crate) async fn open(
        &self,
        node: &str,
        props: ConnectionProperties,
    ) -> Result<Connection, BrokerError> {
        let uri: AMQPUri = node
            .parse()
            .map_err(|e: String| BrokerError::Url(super::redact(node), e))?;
        let runtime = lapin::runtime::default_runtime()?;
        let connector = RustlsConnector::from(self.tls.clone());
        let connection = Connection::connector(
            uri,
            runtime,
            async move |uri: AMQPUri, runtime| {
                let host = uri.authority.host.clone();
                let addrs = runtime.to_socket_addrs((host.clone(), uri.authority.port));
                let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
                Ok(match uri.scheme {
                    AMQPScheme::AMQP => stream,
                    // TLS first, whatever happens: this is the only way an amqps node is
                    // spoken to (lapin's own connect would fall back to plain AMQP in a
                    // build without a TLS feature).
                    AMQPScheme::AMQPS => stream.into_rustls(&connector, &host).await?,
                })
            },
            props,
        );
        Ok(connection.await?)
    }
}

/// Whether one node's URL asks for TLS.
pub(crate) fn is_amqps(node: &str) -> bool {
    node.trim_start()
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &super::redact(&self.url))
            .finish_non_exhaustive()
    }
}

/// The URL with its passwords hidden.
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&super::redact(&self.url))
    }
}

impl From<&str> for Endpoint {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl From<String> for Endpoint {
    fn from(url: String) -> Self {
        Self::new(url)
    }
}

impl From<&String> for Endpoint {
    fn from(url: &String) -> Self {
        Self::new(url.as_str())
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(endpoint: &Endpoint) -> Self {
        endpoint.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_nodes_speak_tls() {
        assert!(is_amqps("amqps://u:p@h/v"));
        assert!(is_amqps("AMQPS://h"));
        assert!(!is_amqps("amqp://u:p@h/v"));
        assert!(Endpoint::new("amqp://a,amqps://b").any_tls());
        assert!(!Endpoint::new("amqp://a, amqp://b").any_tls());
    }

    #[test]
    fn an_endpoint_never_shows_its_password() {
        let e = Endpoint::new("amqps://svc:s3cret@h:5671/%2f");
        assert_eq!(e.to_string(), "amqps://svc:***@h:5671/%2f");
        assert!(!format!("{e:?}").contains("s3cret"));
        assert_eq!(e.url(), "amqps://svc:s3cret@h:5671/%2f");
    }
}
