//! The mock's legacy binary gateway and feedback service (protocol sheet B7): TLS that
//! requires a client certificate from the mock's CA; frames parsed across reads; nothing
//! written on success; a token scripted as invalid answered with error packet 8, then the
//! connection closed and everything after it discarded (as Apple did); `shutdown_after`
//! answered with status 10 naming the last good frame; and a feedback port that lists the
//! tokens it rejected once, then forgets them.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Received, State};
use crate::apns::binary::codec::{self, ErrorResponse, FeedbackTuple, Status};
use crate::apns::Reason;

/// Serves the gateway on `gateway` and the feedback service on `feedback`.
pub(super) async fn start(
    acceptor: TlsAcceptor,
    gateway: SocketAddr,
    feedback: SocketAddr,
    state: Arc<State>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let gateway = TcpListener::bind(gateway).await?;
    let feedback = TcpListener::bind(feedback).await?;
    let addrs = (gateway.local_addr()?, feedback.local_addr()?);
    let (a, s, c) = (acceptor.clone(), state.clone(), cancel.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = c.cancelled() => break,
                accepted = gateway.accept() => match accepted { Ok(x) => x, Err(_) => continue },
            };
            let (a, s) = (a.clone(), s.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_gateway(a, tcp, s).await {
                    debug!(error = %e, "mock gateway connection ended");
                }
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = feedback.accept() => match accepted { Ok(x) => x, Err(_) => continue },
            };
            let (a, s) = (acceptor.clone(), state.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_feedback(a, tcp, s).await {
                    debug!(error = %e, "mock feedback connection ended");
                }
            });
        }
    });
    Ok(addrs)
}

async fn serve_gateway(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let number = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
    // The topic its client certificate is issued for: whose connection it is.
    let certificate_topic = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| super::certs::certificate_topic(c));
    let shutdown_after = state.faults.lock().unwrap().shutdown_after;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut good = 0u64;
    let mut last_good = 0u32;
    loop {
        if tls.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        loop {
            let (decoded, used) = match codec::decode_frame(&buf) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => {
                    // Not a frame at all: a protocol error, then close.
                    let packet = ErrorResponse {
                        status: Status::ProtocolError,
                        identifier: 0,
                    };
                    tls.write_all(&packet.encode()).await?;
                    return Ok(());
                }
            };
            let _ = buf.split_to(used);
            let answer = match &decoded.frame {
                Err(e) => Some(e.status()),
                Ok(frame) => {
                    let hex = crate::token::hex(&frame.token);
                    let invalid = state
                        .scripts
                        .lock()
                        .unwrap()
                        .get(&hex)
                        .is_some_and(|s| s.reason.is_token_invalid());
                    record(
                        &state,
                        number,
                        &decoded.identifier,
                        &hex,
                        frame.payload.clone(),
                        certificate_topic.as_deref(),
                        invalid,
                    );
                    if invalid {
                        let time = crate::apns::jwt::unix_now() as u32;
                        state.binary_feedback.lock().unwrap().push(FeedbackTuple {
                            time,
                            token: frame.token.to_vec(),
                        });
                        Some(Status::InvalidToken)
                    } else {
                        good += 1;
                        last_good = decoded.identifier;
                        None
                    }
                }
            };
            if let Some(status) = answer {
                // Answer, close, and discard whatever came after the bad frame.
                let packet = ErrorResponse {
                    status,
                    identifier: decoded.identifier,
                };
                tls.write_all(&packet.encode()).await?;
                tls.shutdown().await?;
                return Ok(());
            }
            if shutdown_after.is_some_and(|n| good == n) {
                let packet = ErrorResponse {
                    status: Status::Shutdown,
                    identifier: last_good,
                };
                tls.write_all(&packet.encode()).await?;
                tls.shutdown().await?;
                state.stats.lock().unwrap().goaways += 1;
                return Ok(());
            }
        }
    }
}

/// Counts and keeps a processed frame, as the HTTP/2 side keeps requests.
fn record(
    state: &State,
    connection: u64,
    identifier: &u32,
    token: &str,
    payload: Bytes,
    certificate_topic: Option<&str>,
    invalid: bool,
) {
    {
        let mut stats = state.stats.lock().unwrap();
        match invalid {
            false => stats.accepted += 1,
            true => *stats.rejected.entry("InvalidToken".into()).or_default() += 1,
        }
    }
    if state.settings.keep_requests == 0 {
        return;
    }
    let mut received = state.received.lock().unwrap();
    if received.len() == state.settings.keep_requests {
        received.pop_front();
    }
    received.push_back(Received {
        token: Some(token.to_owned()),
        status: if invalid { 8 } else { 200 },
        reason: invalid.then_some(Reason::InvalidToken),
        path: "binary".into(),
        headers: HeaderMap::new(),
        payload,
        connection,
        stream_id: *identifier,
        certificate: true,
        topic: None,
        key_id: None,
        team_id: None,
        certificate_topic: certificate_topic.map(str::to_owned),
    });
}

async fn serve_feedback(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    // The list is cleared once read.
    let tuples = std::mem::take(&mut *state.binary_feedback.lock().unwrap());
    let mut out = BytesMut::new();
    for t in &tuples {
        t.encode(&mut out);
    }
    tls.write_all(&out).await?;
    tls.shutdown().await?;
    Ok(())
}
