//! Controlling a running mock: the scripted answers of tokens, the requests it answered and
//! its counts as tests read them back, the fault modes and failures set while it runs, and
//! the addresses, CA and clients that reach it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;

use super::{certs, FailFirst, Faults, KeyCheck, Mock};
use crate::apns::http2::{self, Client};
use crate::apns::request::Endpoint;
use crate::apns::Reason;
use crate::tls;
use crate::token::DeviceToken;

/// A scripted answer for one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub status: u16,
    pub reason: Reason,
    /// With 410: the `timestamp` (Unix ms) APNs reports.
    pub timestamp_ms: Option<i64>,
}

/// One request the mock answered, as tests and the demo read it back.
#[derive(Debug, Clone)]
pub struct Received {
    /// The token from the path (lower-case hex), when the path had one.
    pub token: Option<String>,
    pub status: u16,
    pub reason: Option<Reason>,
    pub path: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// Which connection (1, 2, …) and stream carried it.
    pub connection: u64,
    pub stream_id: u32,
    /// Whether the connection presented a client certificate.
    pub certificate: bool,
    /// The `apns-topic` it carried.
    pub topic: Option<String>,
    /// The `kid` and `iss` of the JWT it carried, as it carried them (verified or not);
    /// `None` on certificate connections, where APNs ignores `authorization`.
    pub key_id: Option<String>,
    pub team_id: Option<String>,
    /// The topic the connection's client certificate is issued for, when it names one.
    pub certificate_topic: Option<String>,
}

impl Received {
    /// The `apns-collapse-id` it carried (the ring's `event_id`), if any.
    pub fn collapse_id(&self) -> Option<String> {
        let value = self.headers.get("apns-collapse-id")?;
        value.to_str().ok().map(str::to_owned)
    }
}

/// Counts of what the mock did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered 200.
    pub accepted: u64,
    /// Requests answered with an error, by reason string.
    pub rejected: BTreeMap<String, u64>,
    /// TLS connections accepted.
    pub connections: u64,
    /// The most requests the mock was answering at the same moment (all connections).
    pub max_in_flight: u64,
    /// Streams opened while the connection already had as many open as it announced.
    pub limit_violations: u64,
    /// Streams reset with REFUSED_STREAM.
    pub refused: u64,
    /// Streams above a GOAWAY's last-stream-id, never processed.
    pub unprocessed: u64,
    /// Streams lost to a TCP close before their answer.
    pub cut: u64,
    /// GOAWAY frames sent.
    pub goaways: u64,
    /// PING frames received.
    pub pings: u64,
}

impl Stats {
    pub(crate) fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Requests processed: answered, accepted or not.
    pub fn processed(&self) -> u64 {
        self.accepted + self.rejected_total()
    }
}

impl Mock {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The binary gateway's address, when served.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.binary.map(|b| b.0)
    }

    /// The binary feedback service's address, when served.
    pub fn feedback_addr(&self) -> Option<SocketAddr> {
        self.binary.map(|b| b.1)
    }

    /// The base URL clients use (`https://localhost:<port>`; the certificate names localhost).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The CA certificate clients must trust.
    pub fn ca_file(&self) -> &std::path::Path {
        &self.ca_file
    }

    /// A client certificate and key (PEM) signed by the mock's CA, for certificate auth.
    pub fn issue_client_certificate(
        &self,
        name: &str,
    ) -> Result<(String, String), certs::CertError> {
        certs::issue_client_certificate(&self.cert_dir, name)
    }

    /// A client identity for `topic`, named as Apple names push certificates and valid until
    /// `not_after`, written to `file` (PEM: certificate, CA, key): certificate auth for
    /// that topic (and `<topic>.voip`) only.
    pub fn issue_topic_identity(
        &self,
        topic: &str,
        not_after: std::time::SystemTime,
        file: &std::path::Path,
    ) -> Result<(), certs::CertError> {
        certs::issue_topic_identity(&self.cert_dir, topic, not_after, file)
    }

    /// Where the mock's CA lives (to issue client identities from).
    pub(crate) fn cert_dir(&self) -> &std::path::Path {
        &self.cert_dir
    }

    /// Accepts JWTs signed with `key` from now on (in place of an accepted key of the same
    /// id), on connections already open too.
    pub fn add_key(&self, key: KeyCheck) {
        self.state.auth.write().unwrap().add_key(key);
    }

    /// Refuses JWTs of the key `key_id` from now on (403 InvalidProviderToken), as APNs
    /// does a revoked key's.
    pub fn remove_key(&self, key_id: &str) {
        let mut auth = self.state.auth.write().unwrap();
        auth.keys.retain(|k| k.key_id.as_deref() != Some(key_id));
    }

    /// `topic` (and `<topic>.voip`) takes JWTs of `team_id` only from now on (others: 400
    /// TopicDisallowed).
    pub fn set_topic(&self, topic: &str, team_id: &str) {
        let mut auth = self.state.auth.write().unwrap();
        auth.topics.insert(topic.to_owned(), team_id.to_owned());
    }

    /// An APNs client (token auth) that sends both environments here, trusting the mock's CA.
    pub fn client(&self, signer: Arc<crate::apns::jwt::Signer>) -> Result<Client, tls::TlsError> {
        let config = tls::client_config(Some(self.ca_file()), None)?;
        Ok(Client::new(self.client_settings(), config, Some(signer)))
    }

    /// Client settings that send both environments here.
    pub fn client_settings(&self) -> http2::Settings {
        let endpoint = Endpoint::parse(&self.url()).expect("the mock's URL parses");
        http2::Settings::new(endpoint.clone(), endpoint)
    }

    /// Answers every request for `token` with 410 Unregistered and this `timestamp`.
    pub fn unregister(&self, token: &DeviceToken, timestamp_ms: i64) {
        self.script(
            token,
            Script {
                status: 410,
                reason: Reason::Unregistered,
                timestamp_ms: Some(timestamp_ms),
            },
        );
    }

    /// Answers every request for `token` as scripted.
    pub fn script(&self, token: &DeviceToken, script: Script) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(token.as_hex().to_owned(), script);
    }

    /// Lists `token` on the binary feedback service (once), as removed at `time` (Unix s).
    pub fn offer_feedback(&self, token: &DeviceToken, time: u32) {
        let bytes = (0..token.as_hex().len() / 2)
            .map(|i| u8::from_str_radix(&token.as_hex()[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        self.state
            .binary_feedback
            .lock()
            .unwrap()
            .push(crate::apns::binary::codec::FeedbackTuple { time, token: bytes });
    }

    /// Replaces the fault modes; new streams follow them at once.
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock().unwrap() = faults;
    }

    /// Answers the next `fail.count` requests (all connections) with `fail`'s status and
    /// reason, then every later one normally; `None` stops it. Replaces what was left of an
    /// earlier call.
    pub fn fail_first(&self, fail: Option<FailFirst>) {
        *self.state.fail_first.lock().unwrap() = fail;
    }

    /// How many failures [`Mock::fail_first`] still has to answer.
    pub fn fail_first_left(&self) -> u64 {
        let left = self.state.fail_first.lock().unwrap();
        left.as_ref().map_or(0, |f| f.count)
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.state.stats.lock().unwrap().clone();
        stats.pings = self.state.pings.load(Ordering::Relaxed);
        stats.connections = self.state.connections.load(Ordering::Relaxed);
        stats
    }

    /// The requests answered so far (at most `keep_requests`, oldest first).
    pub fn received(&self) -> Vec<Received> {
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect()
    }
}
