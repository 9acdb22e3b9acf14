//! The server: TLS with the mock's CA, the accept loop, one HTTP/2 connection per client,
//! and each stream routed to the token endpoint or `messages:send` and answered as FCM
//! would (checked, scripted or faulted, counted, kept). A client that negotiates HTTP/1.1
//! (ALPN `http/1.1`, as many OAuth libraries do) reaches the token endpoint over HTTP/1.1;
//! sends need HTTP/2.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use http::{Request, Response};
use ring::rand::SecureRandom;
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{check, Issued, MockFcm, Received, Script, State};
use crate::mock::certs;
use crate::tls;

impl MockFcm {
    /// Binds, loads or generates the certificates, and serves until `cancel`.
    pub async fn start(
        settings: super::Settings,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let certs = certs::Certs::load_or_generate(&settings.cert_dir)?;
        let mut config = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs.chain, certs.key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            accounts: Mutex::new(
                settings
                    .accounts
                    .iter()
                    .map(|a| (a.client_email.clone(), a.clone()))
                    .collect(),
            ),
            bound: Mutex::default(),
            faults: Mutex::new(settings.faults.clone()),
            settings,
            tokens: Mutex::default(),
            scripts: Mutex::default(),
            fail_next: Mutex::default(),
            stats: Mutex::default(),
            received: Mutex::default(),
            cut: Mutex::default(),
        });
        let connections = Arc::new(AtomicU64::new(0));
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = cancel.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => { warn!(error = %e, "mock FCM accept failed"); continue; }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let number = connections.fetch_add(1, Ordering::SeqCst) + 1;
                let (acceptor, state, cancel) =
                    (acceptor.clone(), accept_state.clone(), cancel.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(acceptor, tcp, number, state, cancel).await {
                        debug!(%peer, error = %e, "mock FCM connection ended");
                    }
                });
            }
        });
        info!(%addr, ca_file = %certs.ca_file.display(), "mock FCM listening");
        Ok(Self {
            addr,
            ca_file: certs.ca_file,
            state,
        })
    }
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    number: u64,
    state: Arc<State>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    if tls.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
        return serve_http1(tls, state).await;
    }
    let mut h2 = h2::server::Builder::new()
        .max_concurrent_streams(state.settings.max_concurrent_streams)
        .handshake::<_, Bytes>(tls)
        .await?;
    state.stats.lock().unwrap().connections += 1;
    let cut = state.cut.lock().unwrap().clone();
    let mut streams = 0u64;
    let mut gone_away = false;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => { h2.graceful_shutdown(); None }
            _ = cut.cancelled() => {
                state.stats.lock().unwrap().cut += 1;
                return Ok(());
            }
            next = h2.accept() => next,
        };
        let Some(next) = next else { break };
        let (request, respond) = next?;
        streams += 1;
        let (close_after, goaway_after) = {
            let f = state.faults.lock().unwrap();
            (f.close_after, f.goaway_after)
        };
        if close_after.is_some_and(|n| streams >= n) {
            // Dropped with this stream and every other in flight unanswered.
            state.stats.lock().unwrap().cut += 1;
            debug!(
                connection = number,
                streams, "mock FCM drops the connection (fault)"
            );
            return Ok(());
        }
        let state2 = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_stream(request, respond, number, &state2).await {
                debug!(error = %e, "mock FCM stream failed");
            }
        });
        if !gone_away && goaway_after.is_some_and(|n| streams >= n) {
            gone_away = true;
            state.stats.lock().unwrap().goaways += 1;
            h2.graceful_shutdown();
        }
    }
    std::future::poll_fn(|cx| h2.poll_closed(cx)).await?;
    Ok(())
}

/// HTTP/1.1: the token endpoint only (what OAuth clients speaking HTTP/1.1 need).
async fn serve_http1(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let state = state.clone();
        async move {
            let post_token =
                request.method() == http::Method::POST && request.uri().path() == "/token";
            let body = request.into_body().collect().await?.to_bytes();
            let (status, _, body) = if post_token {
                token(&state, &body)
            } else {
                error(
                    404,
                    "NOT_FOUND",
                    None,
                    "over HTTP/1.1 only POST /token is served; messages:send needs HTTP/2",
                    false,
                )
            };
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/json; charset=UTF-8")
                .body(Full::new(body))
                .expect("a valid response");
            Ok::<_, hyper::Error>(response)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await?;
    Ok(())
}

async fn handle_stream(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    connection: u64,
    state: &State,
) -> Result<(), h2::Error> {
    let (parts, mut body) = request.into_parts();
    let mut payload = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        payload.extend_from_slice(&chunk);
    }
    let path = parts.uri.path().to_owned();
    let (status, headers, body) = if parts.method != http::Method::POST {
        error(405, "METHOD_NOT_ALLOWED", None, "POST only", false)
    } else if path == "/token" {
        token(state, &payload)
    } else if let Some(project) = path
        .strip_prefix("/v1/projects/")
        .and_then(|p| p.strip_suffix("/messages:send"))
    {
        let bearer = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        send(state, project, bearer.as_deref(), &payload, connection)
    } else {
        error(404, "NOT_FOUND", None, "no such method", false)
    };
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=UTF-8");
    for (name, value) in headers {
        response = response.header(name, value);
    }
    let response = response.body(()).expect("a valid response");
    let mut stream = respond.send_response(response, false)?;
    stream.send_data(body, true)?;
    Ok(())
}

type Answer = (u16, Vec<(&'static str, String)>, Bytes);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `POST /token`: an access token for a valid assertion of an account the mock takes.
fn token(state: &State, form: &[u8]) -> Answer {
    let refused = |error: &str, description: String| {
        state.stats.lock().unwrap().token_refusals += 1;
        let body = serde_json::json!({"error": error, "error_description": description});
        (400, vec![], Bytes::from(body.to_string()))
    };
    let account = {
        let accounts = state.accounts.lock().unwrap();
        if accounts.is_empty() {
            return refused("invalid_client", "the mock has no service account".into());
        }
        check::assertion_issuer(form).and_then(|iss| accounts.get(&iss).cloned())
    };
    // Google's answer for an assertion of an account it does not know (or deleted).
    let Some(account) = account else {
        return refused("invalid_grant", "Invalid grant: account not found".into());
    };
    if let Err((error, description)) = check::token_request(form, &account, unix_now()) {
        return refused(error, description);
    }
    let mut random = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .expect("the system RNG works");
    let token = format!("ya29.mock-{}", crate::token::hex(&random));
    let lifetime = state.settings.token_lifetime;
    let valid = state
        .faults
        .lock()
        .unwrap()
        .token_valid_for
        .unwrap_or(lifetime)
        .min(lifetime);
    let issued = Issued {
        account: account.client_email,
        project: account.project_id,
        valid_until: Instant::now() + valid,
    };
    state.tokens.lock().unwrap().insert(token.clone(), issued);
    state.stats.lock().unwrap().tokens_issued += 1;
    let body = serde_json::json!({
        "access_token": token,
        "expires_in": lifetime.as_secs(),
        "token_type": "Bearer",
    });
    (200, vec![], Bytes::from(body.to_string()))
}

/// `POST /v1/projects/<project>/messages:send`.
fn send(
    state: &State,
    project: &str,
    bearer: Option<&str>,
    payload: &[u8],
    connection: u64,
) -> Answer {
    let body_json: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    let token = body_json["message"]["token"].as_str().map(str::to_owned);
    let issued = bearer.and_then(|b| state.tokens.lock().unwrap().get(b).cloned());
    let account = issued.as_ref().map(|i| i.account.clone());
    let answer = decide(state, project, issued, payload, token.as_deref());
    let (status, code) = (answer.0, answer_code(&answer.2));
    {
        let mut stats = state.stats.lock().unwrap();
        match status {
            200 => stats.accepted += 1,
            401 => stats.unauthenticated += 1,
            _ => stats.rejected += 1,
        }
    }
    state.received.lock().unwrap().push(Received {
        token,
        project: project.to_owned(),
        account,
        status,
        code,
        body: body_json,
        connection,
        at: Instant::now(),
    });
    answer
}

/// The answer to a send under `project` with the access token `issued` (`None`: not one
/// the mock issued).
fn decide(
    state: &State,
    project: &str,
    issued: Option<Issued>,
    payload: &[u8],
    token: Option<&str>,
) -> Answer {
    let Some(issued) = issued.filter(|i| Instant::now() < i.valid_until) else {
        return error(
            401,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            false,
        );
    };
    // An access token sends for its account's project only.
    if issued.project != project {
        return error(
            403,
            "PERMISSION_DENIED",
            None,
            &format!("Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist)."),
            false,
        );
    }
    if let Err((message, about_token)) = check::message(payload) {
        return error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            &message,
            about_token,
        );
    }
    let token = token.unwrap_or_default();
    if let Some(script) = state.fail_next.lock().unwrap().pop_front() {
        return scripted(&script);
    }
    {
        let mut scripts = state.scripts.lock().unwrap();
        if let Some(script) = scripts.get_mut(token) {
            let answer = scripted(script);
            script.times = script.times.saturating_sub(1);
            if script.times == 0 {
                scripts.remove(token);
            }
            return answer;
        }
    }
    // A registration token belongs to the project its app registered with.
    let owner = state.bound.lock().unwrap().get(token).cloned();
    if owner.is_some_and(|p| p != project) {
        return error(
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "SenderId mismatch",
            false,
        );
    }
    let faults = state.faults.lock().unwrap().clone();
    if faults.unregistered.contains(token) {
        return error(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
            false,
        );
    }
    if let Some((per_mille, code)) = &faults.error_rate {
        let mut b = [0u8; 2];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .expect("the system RNG works");
        if u32::from(u16::from_le_bytes(b)) % 1000 < *per_mille {
            let status = status_of(code);
            return scripted(&Script {
                status,
                code: code.clone(),
                retry_after: faults.retry_after,
                times: 1,
            });
        }
    }
    let id = crate::token::random_hex(8);
    let body = serde_json::json!({"name": format!("projects/{project}/messages/0:{id}")});
    (200, vec![], Bytes::from(body.to_string()))
}

/// FCM's HTTP status for an error code.
pub(crate) fn status_of(code: &str) -> u16 {
    match code {
        "UNREGISTERED" => 404,
        "SENDER_ID_MISMATCH" | "PERMISSION_DENIED" => 403,
        "QUOTA_EXCEEDED" => 429,
        "UNAVAILABLE" => 503,
        "INTERNAL" => 500,
        "INVALID_ARGUMENT" => 400,
        "THIRD_PARTY_AUTH_ERROR" | "UNAUTHENTICATED" => 401,
        _ => 500,
    }
}

fn scripted(script: &Script) -> Answer {
    let status_text = match script.status {
        404 => "NOT_FOUND",
        403 => "PERMISSION_DENIED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        _ => "INTERNAL",
    };
    let fcm_code = (script.code != "UNAUTHENTICATED").then_some(script.code.as_str());
    let (status, mut headers, body) = error(
        script.status,
        status_text,
        fcm_code,
        "scripted by the mock",
        false,
    );
    if let Some(after) = script.retry_after {
        headers.push(("retry-after", after.to_string()));
    }
    (status, headers, body)
}

/// FCM's error JSON: `google.rpc.Status` with an `FcmError` detail (and a `BadRequest` on
/// `message.token` when `about_token`).
fn error(
    status: u16,
    status_text: &str,
    code: Option<&str>,
    message: &str,
    about_token: bool,
) -> Answer {
    let mut details = Vec::new();
    if let Some(code) = code {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }));
    }
    if about_token {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.token", "description": message}],
        }));
    }
    let body = serde_json::json!({"error": {
        "code": status, "message": message, "status": status_text, "details": details,
    }});
    (status, vec![], Bytes::from(body.to_string()))
}

/// The FCM error code an answer carries (its `FcmError`, else its status), none for 200.
fn answer_code(body: &Bytes) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = v.get("error")?;
    let fcm = error["details"].as_array().and_then(|d| {
        d.iter()
            .find_map(|d| d["errorCode"].as_str().map(str::to_owned))
    });
    fcm.or_else(|| error["status"].as_str().map(str::to_owned))
}
