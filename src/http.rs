//! The one HTTP client ringpush uses for what it reads over plain HTTP: RabbitMQ's management
//! API (`ringpush queues`, `gateway` commands), the `/metrics` pages the bench scrapes, and
//! tests. hyper's client (through hyper-util) with a timeout on every request; URLs parsed by
//! the `url` crate, credentials in the URL sent as basic auth.

use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A request that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not an http:// URL: {0}")]
    Url(String),
    #[error("no answer from {0} within {1:?}")]
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

/// `GET url` with the URL's user info as basic auth; the whole exchange bounded by
/// `timeout`. The URL's password never appears in an error.
pub async fn get(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    request(hyper::Method::GET, url, None, timeout).await
}

/// `PUT url` with a JSON body (the management API's way to create and change things).
pub(crate) async fn put_json(
    url: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Response, HttpError> {
    request(hyper::Method::PUT, url, Some(body), timeout).await
}

/// `DELETE url`.
pub async fn delete(url: &str, timeout: Duration) -> Result<Response, HttpError> {
    request(hyper::Method::DELETE, url, None, timeout).await
}

/// One request: `method url`, with a JSON body when given, the URL's user info as basic auth,
/// the whole exchange bounded by `timeout`. The URL's password never appears in an error (nor
/// does the body, which may hold one).
pub async fn request(
    method: hyper::Method,
    url: &str,
    json: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let parsed = url::Url::parse(url).map_err(|e| HttpError::Url(e.to_string()))?;
    if parsed.scheme() != "http" {
        return Err(HttpError::Url(format!("scheme {:?}", parsed.scheme())));
    }
    let mut public = parsed.clone();
    let _ = public.set_username("");
    let _ = public.set_password(None);
    let shown = public.to_string();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(public.as_str());
    if !parsed.username().is_empty() {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let userinfo = format!(
            "{}:{}",
            decode(parsed.username()),
            decode(parsed.password().unwrap_or(""))
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
    let request = request
        .body(Full::new(body))
        .map_err(|e| HttpError::Url(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| HttpError::Request(shown.clone(), error_text(&e)))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| HttpError::Request(shown.clone(), e.to_string()))?
            .to_bytes();
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout(shown, timeout)),
    }
}

/// hyper-util's error with its cause (its own text is only "client error (Connect)").
fn error_text(e: &hyper_util::client::legacy::Error) -> String {
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
