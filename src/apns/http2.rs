//! The APNs HTTP/2 client: one persistent connection per endpoint, shared by every
//! request, with as many streams in flight as the server's SETTINGS allow.
//!
//! `send` is a thin wrapper around [`super::request::build_request`]: it waits on the
//! connection's `ready()` (the peer's stream limit is the backpressure), sends headers and
//! the shared payload, and reads the answer. A connection that has died is replaced on the
//! next request.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::jwt::Signer;
use super::request::{build_request, Endpoint, Notification};
use super::{Answer, Environment, Reason, Rejection};

/// Why a notification got no answer from APNs. All of these are transient: the
/// notification was not accepted and may be sent again.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct Settings {
    pub production: Endpoint,
    pub sandbox: Endpoint,
    /// How long one request may take, headers to answer.
    pub request_timeout: Duration,
    /// How long a TCP connect plus TLS and HTTP/2 handshake may take.
    pub connect_timeout: Duration,
}

/// The APNs client of one worker. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    production: Arc<Connection>,
    sandbox: Arc<Connection>,
    /// Token auth: the shared JWT signer (one token for every connection).
    signer: Option<Arc<Signer>>,
    request_timeout: Duration,
}

/// One persistent connection to one endpoint, opened on first use and replaced when it dies.
struct Connection {
    endpoint: Endpoint,
    tls: TlsConnector,
    connect_timeout: Duration,
    /// The live connection's request handle and its generation; the mutex also makes sure
    /// only one task reconnects at a time.
    current: Mutex<Option<(SendRequest<Bytes>, u64)>>,
}

impl Client {
    /// A client that connects lazily, on the first notification for each environment.
    pub fn new(settings: Settings, tls: Arc<ClientConfig>, signer: Option<Arc<Signer>>) -> Self {
        let connection = |endpoint: Endpoint| {
            Arc::new(Connection {
                endpoint,
                tls: TlsConnector::from(tls.clone()),
                connect_timeout: settings.connect_timeout,
                current: Mutex::new(None),
            })
        };
        Self {
            production: connection(settings.production.clone()),
            sandbox: connection(settings.sandbox.clone()),
            signer,
            request_timeout: settings.request_timeout,
        }
    }

    /// Sends one notification and returns APNs's answer.
    pub async fn send(&self, env: Environment, n: &Notification) -> Result<Answer, SendError> {
        let conn = match env {
            Environment::Production => &self.production,
            Environment::Sandbox => &self.sandbox,
        };
        let jwt = self.signer.as_ref().map(|s| s.token());
        let request = build_request(&conn.endpoint, n, jwt.as_deref());
        let timeout = self.request_timeout;
        match tokio::time::timeout(timeout, conn.send(request, n.payload.clone())).await {
            Ok(result) => result,
            Err(_) => Err(SendError::Timeout(timeout)),
        }
    }
}

impl Connection {
    async fn send(&self, request: http::Request<()>, payload: Bytes) -> Result<Answer, SendError> {
        let (sender, generation) = self.sender().await?;
        let mut sender = match sender.ready().await {
            Ok(ready) => ready,
            Err(e) => {
                // The connection is gone: forget it so the next request opens a new one.
                self.forget(generation).await;
                return Err(e.into());
            }
        };
        let (response, mut stream) = sender.send_request(request, false)?;
        stream.send_data(payload, true)?;
        let response = response.await?;
        let status = response.status().as_u16();
        let apns_id = response
            .headers()
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = response.into_body();
        let mut bytes = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        if status == 200 {
            return Ok(Answer::Accepted);
        }
        Ok(Answer::Rejected(parse_rejection(status, &bytes, apns_id)))
    }

    /// The live connection, opening one if there is none.
    async fn sender(&self) -> Result<(SendRequest<Bytes>, u64), SendError> {
        let mut current = self.current.lock().await;
        if let Some((sender, generation)) = current.as_ref() {
            return Ok((sender.clone(), *generation));
        }
        let sender = tokio::time::timeout(self.connect_timeout, self.connect())
            .await
            .map_err(|_| SendError::Connect {
                endpoint: self.endpoint.base.clone(),
                reason: format!("timed out after {:?}", self.connect_timeout),
            })??;
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *current = Some((sender.clone(), generation));
        Ok((sender, generation))
    }

    async fn forget(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if matches!(current.as_ref(), Some((_, g)) if *g == generation) {
            *current = None;
        }
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, SendError> {
        let endpoint = &self.endpoint;
        let err = |reason: String| SendError::Connect {
            endpoint: endpoint.base.clone(),
            reason,
        };
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| err(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| err(e.to_string()))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| err(format!("TLS: {e}")))?;
        let (sender, connection) = h2::client::Builder::new()
            // APNs allows one stream until the first authenticated request; its SETTINGS
            // frame then raises the limit.
            .initial_max_send_streams(1)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| err(format!("HTTP/2 handshake: {e}")))?;
        let base = endpoint.base.clone();
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => debug!(endpoint = %base, "APNs connection closed"),
                Err(e) => warn!(endpoint = %base, error = %e, "APNs connection ended"),
            }
        });
        info!(endpoint = %endpoint.base, "APNs connection open");
        Ok(sender)
    }
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
