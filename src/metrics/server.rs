//! The metrics server: HTTP/1.1 on `RINGPUSH_METRICS_ADDR` for `/metrics`, `/healthz` and
//! `/readyz`, bounded against clients that hold connections open. A connection whose request
//! headers do not arrive within [`HEADER_TIMEOUT`] is closed (hyper's header read timeout,
//! also between the requests of a kept-alive connection); at most [`MAX_CONNECTIONS`] are
//! open at once, and one more evicts the connection that has waited longest for a request, so
//! a scrape that sends its request at once is served however many slow connections there are.
//! `/readyz` answers from a readiness refreshed at most once per [`READY_FRESH`] (the worker's
//! check takes a database round trip).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ReadyCheck;

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one readiness answer is served before the checks run again.
pub const READY_FRESH: Duration = Duration::from_secs(1);
/// How long the readiness checks may take.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// What the server answers from.
struct Pages {
    registry: Registry,
    ready: Readiness,
}

/// The readiness checks, run at most once per [`READY_FRESH`] whatever the request rate: one
/// request runs them, the requests meanwhile wait for its answer.
struct Readiness {
    check: ReadyCheck,
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    async fn get(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last {
            if at.elapsed() < READY_FRESH {
                return answer.clone();
            }
        }
        let answer = match tokio::time::timeout(READY_TIMEOUT, (self.check)()).await {
            Ok(answer) => answer,
            Err(_) => Err("checks timed out".to_owned()),
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// One open connection, as the accept loop sees it.
struct Open {
    /// Since when it has waited for a request (its first, or the next on a kept-alive
    /// connection); `None` while one is being answered.
    waiting_since: Option<Instant>,
    /// Closes it.
    close: CancellationToken,
}

/// The open connections, by number.
#[derive(Clone, Default)]
struct Connections(Arc<Mutex<(u64, HashMap<u64, Open>)>>);

impl Connections {
    /// Makes room for one more and registers it; `None` when all are busy answering (the
    /// new one is then closed unanswered).
    fn admit(&self) -> Option<(u64, CancellationToken)> {
        let mut guard = self.0.lock().unwrap();
        let (next, open) = &mut *guard;
        if open.len() >= MAX_CONNECTIONS {
            let oldest = open
                .iter()
                .filter_map(|(id, c)| c.waiting_since.map(|at| (at, *id)))
                .min()?;
            if let Some(evicted) = open.remove(&oldest.1) {
                evicted.close.cancel();
            }
        }
        *next += 1;
        let close = CancellationToken::new();
        open.insert(
            *next,
            Open {
                waiting_since: Some(Instant::now()),
                close: close.clone(),
            },
        );
        Some((*next, close))
    }

    /// Connection `id` is answering a request (`true`) or waiting for the next (`false`).
    fn busy(&self, id: u64, busy: bool) {
        if let Some(c) = self.0.lock().unwrap().1.get_mut(&id) {
            c.waiting_since = if busy { None } else { Some(Instant::now()) };
        }
    }

    fn closed(&self, id: u64) {
        self.0.lock().unwrap().1.remove(&id);
    }
}

/// Binds `addr` (so a bad address fails at start) and serves until `cancel`. Returns the
/// bound address.
pub(super) async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: ReadyCheck,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let pages = Arc::new(Pages {
        registry,
        ready: Readiness {
            check: ready,
            last: tokio::sync::Mutex::new(None),
        },
    });
    tokio::spawn(accept(listener, pages, cancel));
    Ok(bound)
}

async fn accept(listener: TcpListener, pages: Arc<Pages>, cancel: CancellationToken) {
    let connections = Connections::default();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // Requests here are a line and a few headers: hyper's smallest read buffer.
        .max_buf_size(8192);
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    tracing::warn!(error = %e, "metrics server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some((id, close)) = connections.admit() else {
            continue;
        };
        let service = {
            let (pages, connections) = (pages.clone(), connections.clone());
            hyper::service::service_fn(move |request| {
                let (pages, connections) = (pages.clone(), connections.clone());
                async move {
                    connections.busy(id, true);
                    let response = answer(&pages, request).await;
                    connections.busy(id, false);
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let (connections, cancel) = (connections.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                // Served, timed out or closed by the client.
                _ = connection.as_mut() => {}
                // Evicted: dropped, which closes the socket.
                _ = close.cancelled() => {}
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
                }
            }
            connections.closed(id);
        });
    }
}

/// The answer to one request.
async fn answer(pages: &Pages, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &pages.registry) {
                Ok(()) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding failed: {e}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match pages.ready.get().await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn server(ready: ReadyCheck) -> (SocketAddr, CancellationToken) {
        let cancel = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Registry::default(),
            ready,
            cancel.clone(),
        )
        .await
        .unwrap();
        (addr, cancel)
    }

    #[tokio::test]
    async fn readyz_runs_its_checks_at_most_once_a_second() {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let ready: ReadyCheck = Arc::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Err::<(), _>("database: gone".to_owned()) })
        });
        let (addr, cancel) = server(ready).await;
        let started = Instant::now();
        for _ in 0..20 {
            let r = crate::http::get(&format!("http://{addr}/readyz"), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                (r.status, r.body.as_str()),
                (503, "not ready: database: gone\n")
            );
        }
        // One run per second begun (a slow machine may cross into a second one).
        let allowed = 1 + started.elapsed().as_secs() as u32;
        assert!(calls.load(Ordering::Relaxed) <= allowed, "{calls:?}");
        tokio::time::sleep(READY_FRESH).await;
        crate::http::get(&format!("http://{addr}/readyz"), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            calls.load(Ordering::Relaxed) >= 2,
            "refreshed after a second"
        );
        let r = crate::http::get(&format!("http://{addr}/healthz"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = crate::http::get(&format!("http://{addr}/nothing"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.status, 404);
        cancel.cancel();
    }

    #[test]
    fn a_connection_past_the_cap_evicts_the_one_waiting_longest_for_a_request() {
        let c = Connections::default();
        let admitted: Vec<_> = (0..MAX_CONNECTIONS).map(|_| c.admit().unwrap()).collect();
        // The first is answering a request: it is never evicted.
        c.busy(admitted[0].0, true);
        let (_, _) = c.admit().unwrap();
        assert!(!admitted[0].1.is_cancelled());
        assert!(admitted[1].1.is_cancelled(), "the oldest waiting one goes");
        assert!(!admitted[2].1.is_cancelled());
        assert_eq!(c.0.lock().unwrap().1.len(), MAX_CONNECTIONS);
        // All busy: a new one is refused.
        let ids: Vec<u64> = c.0.lock().unwrap().1.keys().copied().collect();
        for id in ids {
            c.busy(id, true);
        }
        assert!(c.admit().is_none());
    }
}
