//! The one HTTP/1.1 client ringpush uses for what it reads over HTTP: RabbitMQ's management
//! API (`ringpush queues`, `gateway` commands) over `http://` or `https://`, the `/metrics`
//! pages the bench scrapes, and tests. One connection per request (hyper's HTTP/1.1 client
//! connection), a timeout on every request; URLs parsed by the `url` crate, credentials in
//! the URL sent as basic auth. `https://` is verified as every TLS connection of ringpush
//! is ([`crate::tls`]): the public roots plus an extra CA when given
//! (`RINGPUSH_MANAGEMENT_CA_FILE`), never off.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::ClientConfig;

use crate::tls::{self, TlsError};

/// A request that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not an http:// or https:// URL: {0}")]
    Url(String),
    #[error("no answer from {} within {}", .0, crate::human::Human(*.1))]
    Timeout(String, Duration),
    #[error("{0}: {1}")]
    Request(String, String),
}

/// An answer: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends requests over `http://` and `https://`; the latter verified against the public
/// roots and, when given, an extra CA. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Default for Client {
    /// `https://` verified against the public roots.
    fn default() -> Self {
        static PUBLIC: OnceLock<Client> = OnceLock::new();
        PUBLIC
            .get_or_init(|| Self {
                tls: tls::config(
                    tls::roots(None).expect("no file to read"),
                    None,
                    &[b"http/1.1"],
                )
                .expect("the ring provider supports the default protocol versions"),
            })
            .clone()
    }
}

impl Client {
    /// `https://` verified against the public roots and the certificates of `extra_ca`.
    pub fn with_ca(extra_ca: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            tls: tls::config(tls::roots(Some(extra_ca))?, None, &[b"http/1.1"])?,
        })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Response, HttpError> {
        self.request(hyper::Method::GET, url, None, timeout).await
    }

    /// `PUT url` with a JSON body (the management API's way to create and change things).
    pub async fn put_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        self.request(hyper::Method::PUT, url, Some(body), timeout)
            .await
    }

    /// `DELETE url`.
    pub async fn delete(&self, url: &str, timeout: Duration) -> Result<Response, HttpError> {
        self.request(hyper::Method::DELETE, url, None, timeout)
            .await
    }

    /// One request: `method url`, with a JSON body when given, the URL's user info as basic
    /// auth, the whole exchange bounded by `timeout`. The URL's password never appears in an
    /// error (nor does the body, which may hold one).
    pub async fn request(
        &self,
        method: hyper::Method,
        url: &str,
        json: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let parsed = url::Url::parse(url).map_err(|e| HttpError::Url(e.to_string()))?;
        let https = match parsed.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(HttpError::Url(format!("scheme {other:?}"))),
        };
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(HttpError::Url("no host".into())),
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        let mut public = parsed.clone();
        let _ = public.set_username("");
        let _ = public.set_password(None);
        let shown = public.to_string();
        let request = build(method, &parsed, json)?;
        let failed = |e: String| HttpError::Request(shown.clone(), e);
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| failed(connect_failure(&e)))?;
            if !https {
                return send(TokioIo::new(tcp), request).await.map_err(failed);
            }
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| HttpError::Url(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                // The management API is what ringpush speaks https to.
                .map_err(|e| {
                    failed(tls::failure(&e, &host, Some("RINGPUSH_MANAGEMENT_CA_FILE")))
                })?;
            send(TokioIo::new(tls), request).await.map_err(failed)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout(shown, timeout)),
        }
    }
}

/// `GET url` with the URL's user info as basic auth; the whole exchange bounded by
/// `timeout`; `https://` verified against the public roots. The URL's password never
/// appears in an error.
pub async fn get(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    Client::default().get(url, timeout).await
}

/// `DELETE url` ([`get`]'s rules).
pub async fn delete(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    Client::default().delete(url, timeout).await
}

/// Any method with an optional JSON body ([`get`]'s rules).
pub async fn request(
    method: hyper::Method,
    url: &str,
    json: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    Client::default().request(method, url, json, timeout).await
}

/// The request for `url` (origin-form, with `host`), basic auth from its user info, and the
/// JSON body when given.
fn build(
    method: hyper::Method,
    url: &url::Url,
    json: Option<&serde_json::Value>,
) -> Result<hyper::Request<Full<Bytes>>, HttpError> {
    let mut target = url.path().to_owned();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    let authority = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => return Err(HttpError::Url("no host".into())),
    };
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", authority);
    if !url.username().is_empty() {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let userinfo = format!(
            "{}:{}",
            decode(url.username()),
            decode(url.password().unwrap_or(""))
        );
        let auth = base64::engine::general_purpose::STANDARD.encode(userinfo);
        request = request.header("authorization", format!("Basic {auth}"));
    }
    let body = match json {
        Some(value) => {
            request = request.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(value).expect("a JSON value serialises"))
        }
        None => Bytes::new(),
    };
    request
        .body(Full::new(body))
        .map_err(|e| HttpError::Url(e.to_string()))
}

/// One HTTP/1.1 exchange over `io`: the answer's status and whole body.
async fn send<IO>(io: IO, request: hyper::Request<Full<Bytes>>) -> Result<Response, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| error_text(&e))?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| error_text(&e))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| error_text(&e))?
        .to_bytes();
    driver.abort();
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A connection that could not be made, in a person's words: `connection refused: nothing
/// listens on that port`, not `Connection refused (os error 111)`.
fn connect_failure(io: &std::io::Error) -> String {
    match io.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            "connection refused: nothing listens on that port".into()
        }
        _ => {
            let text = io.to_string();
            let text = text.split(" (os error").next().unwrap_or_default();
            format!("cannot connect: {}", text.to_lowercase())
        }
    }
}

/// hyper's error with its cause (its own text may be only "connection error").
fn error_text(e: &hyper::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_url_that_is_not_http_is_refused_and_a_dead_port_is_an_error_in_time() {
        assert!(matches!(
            get("amqp://guest:guest@h/", Duration::from_secs(1)).await,
            Err(HttpError::Url(_))
        ));
        // A port nothing listens on: refused at once, never hanging.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let e = get(
            &format!("http://user:secret@127.0.0.1:{port}/x"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[tokio::test]
    async fn basic_auth_comes_from_the_url_and_the_body_is_read_whole() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
            head
        });
        // `%40` in the password is a `@`, sent decoded.
        let r = get(
            &format!("http://guest:p%40ss@{addr}/api/queues/%2f"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        let head = server.await.unwrap();
        assert!(head.starts_with("GET /api/queues/%2f HTTP/1.1"), "{head}");
        let auth = base64::engine::general_purpose::STANDARD.encode("guest:p@ss");
        assert!(
            head.contains(&format!("authorization: Basic {auth}")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let e = get(&format!("http://{addr}/"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, HttpError::Timeout(..)), "{e}");
    }
}
