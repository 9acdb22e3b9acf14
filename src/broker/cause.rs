//! Why a connection to the broker failed, told for a person: the cause as far as the process
//! can know it — the login refused (wrong user or password), the vhost refused or missing,
//! nothing listening or no route, a URL that is not AMQP — where it tried (`host:port`, the
//! user and vhost; never the password), and what to check. lapin's own text (`protocol error:
//! AMQP soft error: ACCESS-REFUSED: …`) is kept as the failure's detail, for a debug line.

use std::fmt;

/// What went wrong when connecting, as far as the process can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The broker refused the login: wrong user name or password (`ACCESS_REFUSED`).
    Login,
    /// The broker refused the vhost: it does not exist, or the user has no permission on it
    /// (`NOT_ALLOWED`).
    Vhost,
    /// Nothing accepted a connection there: refused, unreachable, timed out, a name that does
    /// not resolve.
    Unreachable,
    /// The URL is not an AMQP URL (`http://…`).
    Scheme,
    /// An `amqps://` node's TLS handshake failed (a certificate from a CA not trusted, …).
    Tls,
    /// Anything else (the broker's or lapin's words are kept).
    Other,
}

impl Cause {
    /// A few words for the cause, for a log field or `/readyz`.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Login => "login refused",
            Cause::Vhost => "vhost refused",
            Cause::Unreachable => "broker unreachable",
            Cause::Scheme => "not an AMQP URL",
            Cause::Tls => "TLS refused",
            Cause::Other => "broker error",
        }
    }
}

/// A connection to one node that failed: its cause, where, and lapin's own text.
#[derive(Debug)]
pub struct Refused {
    pub cause: Cause,
    /// `host:port` of the node.
    pub node: String,
    /// What a person reads: the cause, where, and what to check.
    text: String,
    /// lapin's text, for a debug line.
    pub detail: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where a node's URL points: `host:port`, the user and the vhost (decoded), never the
/// password.
struct Where {
    node: String,
    host: String,
    user: String,
    vhost: String,
}

fn where_of(url: &str) -> Where {
    let node = super::node_label(url);
    match url::Url::parse(url) {
        Ok(u) => {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let user = match u.username() {
                "" => "guest".to_owned(),
                name => decode(name),
            };
            let vhost = match u.path().strip_prefix('/').unwrap_or("") {
                "" => "/".to_owned(),
                path => decode(path),
            };
            let host = u.host_str().unwrap_or_default().to_owned();
            Where {
                node,
                host,
                user,
                vhost,
            }
        }
        Err(_) => Where {
            node,
            host: String::new(),
            user: String::new(),
            vhost: String::new(),
        },
    }
}

/// A failed connection to the node at `url`, told for a person.
pub fn refused(url: &str, error: &lapin::Error) -> Refused {
    let at = where_of(url);
    let detail = error.to_string();
    let (cause, text) = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let said = amqp.get_message().as_str();
            let code = amqp.get_id();
            if code == 403 {
                (
                    Cause::Login,
                    format!(
                        "RabbitMQ at {} refused the login of user {:?} ({said}): check the user name and password in RINGPUSH_AMQP_URL",
                        at.node, at.user
                    ),
                )
            } else if code == 530 {
                (
                    Cause::Vhost,
                    format!(
                        "RabbitMQ at {} does not let user {:?} into vhost {:?} ({said}): check the vhost in RINGPUSH_AMQP_URL (the path after the port; %2f is \"/\") and the user's permissions on it",
                        at.node, at.user, at.vhost
                    ),
                )
            } else {
                (
                    Cause::Other,
                    format!("RabbitMQ at {} closed the connection: {said}", at.node),
                )
            }
        }
        lapin::ErrorKind::IOError(io) if io.to_string().contains("Invalid AMQP scheme") => (
            Cause::Scheme,
            format!(
                "RINGPUSH_AMQP_URL: {} is not an AMQP URL (amqp://user:password@host:5672/vhost)",
                super::redact(url)
            ),
        ),
        lapin::ErrorKind::IOError(io) if crate::tls::is_handshake_failure(io) => (
            Cause::Tls,
            format!(
                "RabbitMQ at {}: {}",
                at.node,
                crate::tls::failure(io, &at.host, Some("RINGPUSH_AMQP_CA_FILE"))
            ),
        ),
        lapin::ErrorKind::IOError(io) => {
            let why = io_reason(io);
            (
                Cause::Unreachable,
                format!(
                    "cannot reach RabbitMQ at {} ({why}): is RabbitMQ running there, and is that its address? Locally: rabbitmq-server -detached",
                    at.node
                ),
            )
        }
        lapin::ErrorKind::InvalidConnectionState(_) => (
            Cause::Unreachable,
            format!(
                "RabbitMQ at {} closed the connection while it was being opened (a plain-TCP port that expects TLS, or the broker stopping?)",
                at.node
            ),
        ),
        _ => (
            Cause::Other,
            format!("RabbitMQ at {}: {}", at.node, describe(error)),
        ),
    };
    Refused {
        cause,
        node: at.node,
        text,
        detail,
    }
}

/// A node that did not complete the connection within `within`.
pub fn timed_out(url: &str, within: std::time::Duration) -> Refused {
    let node = super::node_label(url);
    Refused {
        cause: Cause::Unreachable,
        text: format!(
            "cannot reach RabbitMQ at {node}: no connection within {} (a firewall dropping packets, or a host that is down?)",
            crate::human::Human(within)
        ),
        detail: format!("no connection within {}", crate::human::Human(within)),
        node,
    }
}

/// An IO error's reason in a few plain words (`connection refused`), or its own text.
fn io_reason(io: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::ConnectionRefused => "connection refused: nothing listens on that port".into(),
        K::TimedOut => "timed out".into(),
        K::ConnectionReset => "connection reset".into(),
        K::ConnectionAborted => "connection aborted".into(),
        K::UnexpectedEof => "the connection closed at once".into(),
        _ => {
            let text = io.to_string();
            // `Connection refused (os error 111)` → without the errno.
            match text.find(" (os error") {
                Some(at) => text[..at].to_lowercase(),
                None => text,
            }
        }
    }
}

/// lapin's error in a person's words: for an error the broker sent, its reply
/// (`ACCESS_REFUSED - access to exchange …`), once; for an IO error, the IO error; else lapin's
/// text.
pub fn describe(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        lapin::ErrorKind::IOError(io) => io_reason(io),
        _ => error.to_string(),
    }
}

/// Checks a `RINGPUSH_AMQP_URL` (one URL, or a comma-separated list of a cluster's nodes)
/// before anything connects: every node an `amqp://` or `amqps://` URL with a host.
pub fn check_url(text: &str) -> Result<(), String> {
    let nodes = super::nodes(text);
    if nodes.is_empty() {
        return Err("names no node (amqp://user:password@host:5672/vhost)".into());
    }
    for node in nodes {
        let shown = super::redact(node);
        let url = url::Url::parse(node).map_err(|e| {
            format!("{shown} is not a URL ({e}); amqp://user:password@host:5672/vhost")
        })?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(format!(
                "{shown} is not an AMQP URL: the scheme is {}://, RabbitMQ's is amqp:// (or amqps://); amqp://user:password@host:5672/vhost",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{shown} names no host"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_amqp_urls_pass() {
        assert!(check_url("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(check_url("amqp://a@h1,amqps://b@h2:5671/v").is_ok());
        let err = check_url("http://guest:secret@127.0.0.1:15672/").unwrap_err();
        assert!(err.contains("http://") && err.contains("amqp://"), "{err}");
        assert!(!err.contains("secret"), "the password never shows: {err}");
        assert!(check_url("").is_err());
        assert!(check_url("127.0.0.1:5672").is_err());
    }

    #[test]
    fn where_names_the_node_user_and_vhost_never_the_password() {
        let at = where_of("amqp://gw%2d1:secret@h:5673/t-v%2fx");
        assert_eq!(
            (at.node.as_str(), at.user.as_str(), at.vhost.as_str()),
            ("h:5673", "gw-1", "t-v/x")
        );
        let at = where_of("amqp://h");
        assert_eq!((at.user.as_str(), at.vhost.as_str()), ("guest", "/"));
    }

    #[test]
    fn io_errors_read_plainly() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = refused("amqp://u:p@127.0.0.1:5999/%2f", &lapin::Error::from(io));
        assert_eq!(e.cause, Cause::Unreachable);
        assert!(e.to_string().contains("127.0.0.1:5999"), "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
        assert!(!e.to_string().contains("os error"), "{e}");
    }
}
