//! The server: TLS (client certificates optional for HTTP/2, required for the binary
//! interface), the accept loop, one HTTP/2 connection behind its frame [`shim`], and each
//! stream answered as APNs would (validated, scripted or faulted, counted, kept).
//!
//! [`shim`]: super::shim

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use http::{Request, Response};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpListener;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::{check_connection_jwt, JwtState};
use super::faults::{decide, GoAwayDebug, Plan};
use super::validate::ClientCert;
use super::{binary, certs, shim, validate, Mock, Received, Settings, State};
use crate::apns::Reason;
use crate::tls;

/// One client connection, as the stream handlers see it.
pub(super) struct Conn {
    number: u64,
    pub(super) shim: shim::Handle,
    /// The certificate the client presented (signed by the mock's CA), if any.
    certificate: Option<ClientCert>,
    /// The stream limit has been raised after an accepted request.
    raised: AtomicBool,
    /// Streams open on this connection now.
    open: AtomicU64,
    /// Which team and key the connection is locked to, and its current JWT.
    jwt: Mutex<JwtState>,
    /// Cancelled when the connection ends; held streams wait for it.
    closed: CancellationToken,
}

impl Mock {
    /// Binds, loads or generates the certificates, and serves until `cancel`.
    pub async fn start(settings: Settings, cancel: CancellationToken) -> anyhow::Result<Self> {
        let certs = certs::Certs::load_or_generate(&settings.cert_dir)?;
        let mut roots = RootCertStore::empty();
        for ca in tls::read_certs(&certs.ca_file)? {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        // The binary interface knows only certificate auth: a certificate is required.
        let binary_tls = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), tls::provider())
                    .build()?,
            )
            .with_single_cert(certs.chain.clone(), certs.key.clone_key())?;
        // Client certificates are optional (token auth sends none) but, when presented, must
        // chain to the mock's CA.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, tls::provider())
            .allow_unauthenticated()
            .build()?;
        let mut config = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.chain, certs.key)?;
        // ALPN h2, and also clients that offer none (HTTP/2 with prior knowledge).
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let record = match &settings.record {
            Some(path) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
            None => None,
        };
        let state = Arc::new(State {
            faults: Mutex::new(settings.faults.clone()),
            auth: RwLock::new(settings.auth.clone()),
            fail_first: Mutex::default(),
            settings: settings.clone(),
            in_flight: AtomicU64::new(0),
            pings: Arc::new(AtomicU64::new(0)),
            connections: AtomicU64::new(0),
            scripts: Mutex::default(),
            stats: Mutex::default(),
            received: Mutex::default(),
            record,
            binary_feedback: Mutex::default(),
        });
        let accept_state = state.clone();
        let binary_cancel = cancel.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = cancel.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => { warn!(error = %e, "mock APNs accept failed"); continue; }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, state, cancel) =
                    (acceptor.clone(), accept_state.clone(), cancel.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(acceptor, tcp, state, cancel).await {
                        debug!(%peer, error = %e, "mock APNs connection ended");
                    }
                });
            }
        });
        let binary = match settings.binary {
            None => None,
            Some((gateway, feedback)) => {
                let acceptor = TlsAcceptor::from(Arc::new(binary_tls));
                let addrs =
                    binary::start(acceptor, gateway, feedback, state.clone(), binary_cancel)
                        .await?;
                info!(gateway = %addrs.0, feedback = %addrs.1, "mock binary gateway and feedback service listening");
                Some(addrs)
            }
        };
        info!(%addr, ca_file = %certs.ca_file.display(), "mock APNs listening");
        Ok(Self {
            addr,
            ca_file: certs.ca_file,
            cert_dir: settings.cert_dir,
            state,
            binary,
        })
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<State>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| ClientCert {
            topic: certs::certificate_topic(c),
        });
    let settings = &state.settings;
    let (io, shim) = shim::spawn(tls, settings.initial_streams, state.pings.clone());
    let mut h2 = h2::server::Builder::new()
        .max_concurrent_streams(
            settings
                .max_concurrent_streams
                .max(settings.initial_streams),
        )
        .handshake::<_, Bytes>(io)
        .await?;
    let number = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
    let conn = Arc::new(Conn {
        number,
        shim,
        certificate,
        raised: AtomicBool::new(false),
        open: AtomicU64::new(0),
        jwt: Mutex::default(),
        closed: CancellationToken::new(),
    });
    let _closed = conn.closed.clone().drop_guard();
    let mut streams = 0u64;
    let mut gone_away: Option<u32> = None;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => { h2.graceful_shutdown(); None }
            next = h2.accept() => next,
        };
        let Some(next) = next else { break };
        let (request, respond) = next?;
        streams += 1;
        let id = respond.stream_id().as_u32();
        let open = conn.open.fetch_add(1, Ordering::SeqCst) + 1;
        if open > u64::from(conn.shim.limit()) {
            state.stats.lock().unwrap().limit_violations += 1;
        }
        let plan = decide(&state, &conn, streams, id, &mut gone_away);
        let (state, conn) = (state.clone(), conn.clone());
        tokio::spawn(async move {
            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            {
                let mut stats = state.stats.lock().unwrap();
                stats.max_in_flight = stats.max_in_flight.max(now);
            }
            let result = handle_stream(plan, request, respond, id, &state, &conn).await;
            if let Err(e) = result {
                debug!(error = %e, "mock APNs stream failed");
                state.stats.lock().unwrap().cut += 1;
            }
            conn.open.fetch_sub(1, Ordering::SeqCst);
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // Let streams in flight finish after a graceful shutdown.
    std::future::poll_fn(|cx| h2.poll_closed(cx)).await?;
    Ok(())
}

async fn handle_stream(
    plan: Plan,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    id: u32,
    state: &State,
    conn: &Conn,
) -> Result<(), h2::Error> {
    match plan {
        Plan::Unprocessed => {
            state.stats.lock().unwrap().unprocessed += 1;
            // Hold the stream, unanswered, until the client gives up the connection.
            conn.closed.cancelled().await;
            return Ok(());
        }
        Plan::Refuse => {
            state.stats.lock().unwrap().refused += 1;
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            return Ok(());
        }
        Plan::Close => {
            conn.shim.inject(shim::Inject::Close);
            state.stats.lock().unwrap().cut += 1;
            return Ok(());
        }
        Plan::Process | Plan::Shutdown | Plan::Error(..) => {}
    }
    let (parts, mut body) = request.into_parts();
    let mut payload = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        payload.extend_from_slice(&chunk);
    }
    let payload = payload.freeze();
    if !state.settings.response_delay.is_zero() {
        tokio::time::sleep(state.settings.response_delay).await;
    }
    let apns_id = parts
        .headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(new_apns_id);
    let now = crate::apns::jwt::unix_now();
    let token = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .map(str::to_ascii_lowercase);
    let shutdown = matches!(plan, Plan::Shutdown);
    let answer: Result<(), (u16, Reason)> = match plan {
        Plan::Shutdown => Err((503, Reason::Shutdown)),
        Plan::Error(status, reason) => Err((status, reason)),
        _ => validate::validate(
            &parts,
            &payload,
            &state.auth.read().unwrap(),
            conn.certificate.as_ref(),
            now,
        )
        .and_then(|valid| {
            check_connection_jwt(&conn.jwt, valid.jwt, state.settings.token_update_window)
                .map(|()| valid.token)
        })
        .and_then(
            |token| match state.scripts.lock().unwrap().get(token.as_hex()) {
                Some(s) => Err((s.status, s.reason.clone())),
                None => Ok(()),
            },
        ),
    };
    let (status, reason) = match &answer {
        Ok(()) => (200, None),
        Err((status, reason)) => (*status, Some(reason.clone())),
    };
    // Decided: counted (and kept) before the answer goes out. As at APNs, a notification
    // taken is delivered even when its answer never reaches the sender (a stream reset, a
    // connection cut while the answer was on its way): the mock's record is what phones got.
    {
        let mut stats = state.stats.lock().unwrap();
        match &reason {
            None => stats.accepted += 1,
            Some(r) => *stats.rejected.entry(r.as_str().to_owned()).or_default() += 1,
        }
    }
    if let Some(file) = &state.record {
        use std::io::Write;
        let collapse = parts
            .headers
            .get("apns-collapse-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        // A ring's follow-up (its end) carries the ring's collapse id too: told apart.
        let what = match serde_json::from_slice::<serde_json::Value>(&payload) {
            Ok(v) if v.get("state").is_some() => "followup",
            _ => "ring",
        };
        let line = format!(
            "{} {status} {collapse} {} {what}\n",
            time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000,
            token.as_deref().unwrap_or("-")
        );
        let _ = file.lock().unwrap().write_all(line.as_bytes());
    }
    if state.settings.keep_requests > 0 {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let topic = header("apns-topic").map(str::to_owned);
        // What the JWT claimed, verified or not; APNs ignores it on certificate connections.
        let (key_id, team_id) = match header("authorization") {
            Some(value) if conn.certificate.is_none() => value
                .strip_prefix("bearer ")
                .and_then(validate::carried)
                .map_or((None, None), |(kid, iss)| (Some(kid), Some(iss))),
            _ => (None, None),
        };
        let mut received = state.received.lock().unwrap();
        if received.len() == state.settings.keep_requests {
            received.pop_front();
        }
        received.push_back(Received {
            token: token.clone(),
            status,
            reason: reason.clone(),
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            payload,
            connection: conn.number,
            stream_id: id,
            certificate: conn.certificate.is_some(),
            topic,
            key_id,
            team_id,
            certificate_topic: conn.certificate.as_ref().and_then(|c| c.topic.clone()),
        });
    }
    let response = Response::builder()
        .status(status)
        .header("apns-id", apns_id);
    match &reason {
        None => {
            respond.send_response(response.body(()).expect("valid response"), true)?;
        }
        Some(reason) => {
            let mut body = serde_json::json!({ "reason": reason.as_str() });
            if status == 410 {
                let scripted = token.as_deref().and_then(|t| {
                    state
                        .scripts
                        .lock()
                        .unwrap()
                        .get(t)
                        .and_then(|s| s.timestamp_ms)
                });
                // Milliseconds, as APNs sends them (whole seconds would date the answer
                // before a registration earlier in the same second).
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(now * 1000, |d| d.as_millis() as i64);
                body["timestamp"] = scripted.unwrap_or(now_ms).into();
            }
            let response = response
                .header("content-type", "application/json")
                .body(())
                .expect("valid response");
            let mut stream = respond.send_response(response, false)?;
            stream.send_data(Bytes::from(body.to_string()), true)?;
        }
    }
    // The stream limit: raised after the first accepted request, lowered after a rejection.
    let settings = &state.settings;
    if reason.is_none() && !conn.raised.swap(true, Ordering::SeqCst) {
        conn.shim
            .inject(shim::Inject::MaxStreams(settings.max_concurrent_streams));
    } else if reason.is_some()
        && settings.drop_streams_after_rejection
        && conn.raised.swap(false, Ordering::SeqCst)
    {
        conn.shim
            .inject(shim::Inject::MaxStreams(settings.initial_streams));
    }
    if shutdown {
        conn.shim.inject(shim::Inject::GoAway {
            last_stream_id: id,
            error_code: 0,
            debug: GoAwayDebug::Json.bytes(),
        });
        state.stats.lock().unwrap().goaways += 1;
    }
    Ok(())
}

/// A random lower-case UUID (version 4 layout), as APNs makes up when none is sent.
fn new_apns_id() -> String {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system RNG works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = crate::token::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
