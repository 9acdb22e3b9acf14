//! The legacy binary provider interface (protocol sheet B): the seed protocol ringpush
//! replaces, spoken correctly. Selected with `RINGPUSH_APNS_PROTOCOL=binary`.
//!
//! One persistent TLS connection (client certificate) per worker, driven by one task:
//! notifications queue up, and each turn writes everything queued as one batch — many frames,
//! one write. A reader watches for the error packet. Every notification carries a unique
//! identifier and waits in a bounded buffer of sent notifications until it is confirmed.
//!
//! **When is a frame delivered?** The gateway never says "ok". A notification counts as
//! accepted once `quiet` has passed since its batch was flushed with no error packet on the
//! connection (APNs answers a bad frame within milliseconds; the quiet period defaults to
//! 300 ms), or once a notification sent after it on the same connection is confirmed — the
//! gateway processes frames in order. Its ring is acked only then.
//!
//! On an error packet the gateway closes the connection and discards everything written
//! after the failed frame: that frame gets its outcome (status 8 → the token is invalid →
//! a feedback event), the ones before it are accepted, and every one after it is resent on a
//! new connection — none lost, none before it sent twice. Status 10 (Shutdown) names the
//! last frame processed: it and those before it are accepted, the rest resent. A connection
//! that drops without an error packet sends its unconfirmed notifications again (at least
//! once; the collapse-free legacy interface may show such a duplicate).
//!
//! A write that does not finish within `write_timeout` (a peer that stopped reading) drops
//! the connection and resends, like a close; a notification whose caller has given up is not
//! written again. A write that fails because the gateway closed after an error packet is
//! decided by that packet. Reconnecting after an error packet is immediate — that is the
//! protocol. A used connection that dies before it has proved itself (no notification
//! confirmed on it, no error packet) counts as a failure: one such death is retried at once,
//! the next ones wait the jittered reconnect backoff, so a gateway that accepts and then
//! drops connections is not hammered with handshakes.
//!
//! One concern a file: `client` (the cheap-to-clone handle a worker sends through),
//! `driver` (the connection task: connecting, batched writes, a lost connection), `sent`
//! (the buffer of sent notifications: confirming by the quiet period, settling an error
//! packet, resending), [`codec`] (the frames, byte for byte) and [`feedback`] (the feedback
//! service reader). This file holds the addresses, the settings and what a status means.

pub mod codec;
pub mod feedback;

mod client;
mod driver;
mod sent;

use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::Reason;
pub use client::Client;
use codec::Status;

/// Apple's legacy gateway (retired in 2021; for the systems and rigs that still speak it).
pub(crate) const GATEWAY: &str = "gateway.push.apple.com:2195";
/// Apple's legacy feedback service.
pub(crate) const FEEDBACK: &str = "feedback.push.apple.com:2196";

/// A `host:port` address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub host: String,
    pub port: u16,
}

impl Address {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    pub(crate) async fn connect_tls(
        &self,
        tls: &TlsConnector,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, String> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
            tls.connect(name, tcp)
                .await
                .map_err(|e| crate::tls::failure(&e, &self.host, Some("RINGPUSH_APNS_CA_FILE")))
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("timed out after {}", crate::human::Human(timeout)))?
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Settings of the binary client.
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: Address,
    pub connect_timeout: Duration,
    /// How long after its flush a notification with no error packet counts as accepted.
    pub quiet: Duration,
    /// How long one notification may take, queue to confirmation.
    pub request_timeout: Duration,
    /// Longest one write may wait for the gateway to take it.
    pub write_timeout: Duration,
    /// Most notifications per write.
    pub max_batch: usize,
    /// Most sent-but-unconfirmed notifications kept for resending; writing waits beyond it.
    pub max_unconfirmed: usize,
    /// Times one notification is written before it is reported as failed.
    pub max_writes: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Settings {
    pub fn new(gateway: Address) -> Self {
        Self {
            gateway,
            connect_timeout: Duration::from_secs(10),
            quiet: Duration::from_millis(300),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_batch: 1000,
            max_unconfirmed: 100_000,
            max_writes: 5,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The reason a binary status stands for (the decisions then live on [`Reason`]).
pub(crate) fn reason_of(status: Status) -> Reason {
    match status {
        Status::InvalidToken => Reason::InvalidToken,
        Status::MissingDeviceToken => Reason::MissingDeviceToken,
        Status::MissingTopic => Reason::MissingTopic,
        Status::MissingPayload => Reason::PayloadEmpty,
        Status::InvalidTokenSize => Reason::InvalidTokenSize,
        Status::InvalidTopicSize => Reason::BadTopic,
        Status::InvalidPayloadSize => Reason::PayloadTooLarge,
        Status::Shutdown => Reason::Shutdown,
        Status::ProcessingError | Status::Unknown => Reason::InternalServerError,
        Status::ProtocolError => Reason::Unknown("ProtocolError".into()),
        Status::NoErrors | Status::Other(_) => {
            Reason::Unknown(format!("binary status {}", status.byte()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client::token_bytes;
    use super::*;

    #[test]
    fn addresses_and_tokens_parse() {
        assert_eq!(
            Address::parse("gateway.push.apple.com:2195").unwrap().port,
            2195
        );
        assert_eq!(Address::parse("[::1]:2195").unwrap().host, "::1");
        assert!(Address::parse("nohost").is_err() && Address::parse(":1").is_err());
        assert_eq!(token_bytes(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(token_bytes(&"ab".repeat(16)), None, "only 32-byte tokens");
    }

    #[test]
    fn status_8_means_the_token_is_invalid_and_1_is_retried() {
        assert!(reason_of(Status::InvalidToken).is_token_invalid());
        assert!(reason_of(Status::ProcessingError).is_retryable());
        assert!(reason_of(Status::Unknown).is_retryable());
        assert!(!reason_of(Status::InvalidTokenSize).is_token_invalid());
    }
}
