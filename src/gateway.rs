//! `ringpush gateway add|rotate|remove|list`: one broker identity per gateway, made through
//! RabbitMQ's management API. A gateway's user is named after its id, tagged
//! [`TAG`], and may do exactly one thing on the vhost of `RINGPUSH_AMQP_URL`: publish its own
//! rings — configure `^$`, read `^$`, write only the rings exchange and `amq.topic` (MQTT), and
//! topic permissions on both that allow only the routing key `ring.<its id>`. A stolen
//! gateway's credentials ring that gateway's own door, and nothing else.
//!
//! Passwords are generated here (or read from a file) and never logged; only `add` and
//! `rotate` print a generated one, once, on stdout.
//!
//! [`Management`], the management API client, serves `ringpush service` too
//! ([`crate::service`]: the processes' own identities, and the topology they may not declare).

use std::time::Duration;

use serde_json::json;

use crate::broker::{Names, MQTT_EXCHANGE};

/// The tag every gateway's user carries: what `list` shows, and what `rotate` and `remove`
/// insist on (they never touch another user).
pub(crate) const TAG: &str = "ringpush-gateway";

/// Ids that name a routing key the workers use themselves (`ring.retry`, `ring.handed-back`).
const RESERVED: [&str; 2] = ["retry", "handed-back"];

/// Longest gateway id (as for ring events).
const MAX_ID_BYTES: usize = crate::wire::ring::MAX_GATEWAY_ID_BYTES;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a gateway command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0:?} is not a gateway id a broker identity can be made for: {1}")]
    InvalidId(String, &'static str),
    // Not a `source`: the text holds the cause once (`{:#}` would print it again).
    #[error("RINGPUSH_MANAGEMENT_URL: {0}")]
    Http(crate::http::HttpError),
    #[error("management API: {what}: status {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("the broker user {0:?} is not a ringpush gateway (no tag {TAG}); nothing changed")]
    NotAGateway(String),
    #[error("no gateway identity {0:?}; `ringpush gateway add` it first")]
    Missing(String),
    #[error("the password must be 1 to 1024 bytes on one line")]
    BadPassword,
}

impl From<crate::http::HttpError> for GatewayError {
    fn from(e: crate::http::HttpError) -> Self {
        GatewayError::Http(e)
    }
}

/// Checks an id a broker identity is made for: 1 to 128 ASCII letters, digits, `-` and `_`.
/// Anything else could not be one MQTT topic level (`ring/<id>`: a `.` becomes a level
/// separator in the routing key, `+`/`#` are wildcards) or one routing-key word.
pub fn check_id(id: &str) -> Result<(), GatewayError> {
    let invalid = |why| Err(GatewayError::InvalidId(id.to_owned(), why));
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return invalid("it must be 1 to 128 bytes");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return invalid("only ASCII letters, digits, `-` and `_`");
    }
    if RESERVED.contains(&id) {
        return invalid("ring.retry and ring.handed-back are the workers' own routing keys");
    }
    Ok(())
}

/// A string as a regular expression that matches only itself.
pub(crate) fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if !(c.is_ascii_alphanumeric() || c == '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The vhost permissions of a gateway: (configure, write, read).
pub(crate) fn permissions(names: &Names) -> serde_json::Value {
    let write = format!(
        "^({}|{})$",
        regex_escape(&names.rings),
        regex_escape(MQTT_EXCHANGE)
    );
    json!({"configure": "^$", "write": write, "read": "^$"})
}

/// The topic permissions of gateway `id`, one per exchange it may publish to.
pub(crate) fn topic_permissions(names: &Names, id: &str) -> Vec<serde_json::Value> {
    let key = format!("^{}$", regex_escape(&Names::ring_key(id)));
    [names.rings.as_str(), MQTT_EXCHANGE]
        .iter()
        .map(|exchange| json!({"exchange": exchange, "write": key, "read": "^$"}))
        .collect()
}

/// A generated password: 160 random bits, hex.
pub fn generate_password() -> String {
    crate::token::random_hex(20)
}

/// A password read from a file: its first line, which must not be empty.
pub(crate) fn password_from_file(text: &str) -> Result<String, GatewayError> {
    let password = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    if password.is_empty() || password.len() > 1024 || text.trim_end().contains('\n') {
        return Err(GatewayError::BadPassword);
    }
    Ok(password.to_owned())
}

/// RabbitMQ's management API on the vhost of the broker URL.
#[derive(Clone)]
pub struct Management {
    base: String,
    /// Percent-encoded, as the API's paths want it.
    vhost: String,
    /// `https://` verified against the public roots and `RINGPUSH_MANAGEMENT_CA_FILE`.
    http: crate::http::Client,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = crate::broker::redact(&self.base);
        f.debug_struct("Management")
            .field("base", &shown)
            .field("vhost", &self.vhost)
            .finish()
    }
}

/// A gateway's broker identity as `list` shows it (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub gateway_id: String,
    /// The routing keys it may publish, per exchange, on this vhost.
    pub may_publish: Vec<(String, String)>,
}

/// What `add` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    Created,
    /// It existed: nothing changed.
    Exists,
}

impl Management {
    /// `url`: `http://user:pass@host:15672` or `https://…:15671`; `amqp_url`: whose vhost the
    /// permissions are on. `https://` is verified against the public roots.
    pub fn new(url: &str, amqp_url: &str) -> Self {
        Self {
            base: url.trim_end_matches('/').to_owned(),
            vhost: crate::ops::vhost_of(amqp_url),
            http: crate::http::Client::default(),
        }
    }

    /// The same API reached with `http` (an extra CA for `https://`).
    pub fn with_client(self, http: crate::http::Client) -> Self {
        Self { http, ..self }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/{path}", self.base)
    }

    /// The vhost of `RINGPUSH_AMQP_URL`, percent-encoded as the API's paths want it.
    pub(crate) fn vhost(&self) -> &str {
        &self.vhost
    }

    /// `GET path`: the JSON answer, `None` for 404.
    pub(crate) async fn get(&self, path: &str) -> Result<Option<serde_json::Value>, GatewayError> {
        let r = self.http.get(&self.url(path), TIMEOUT).await?;
        match r.status {
            200 => Ok(Some(serde_json::from_str(&r.body).map_err(|e| {
                GatewayError::Status {
                    what: format!("GET {path}"),
                    status: 200,
                    body: e.to_string(),
                }
            })?)),
            404 => Ok(None),
            status => Err(status_error(format!("GET {path}"), status, &r.body)),
        }
    }

    /// PUT with a JSON body that may hold a password: an error shows the path, never it.
    pub(crate) async fn put(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(), GatewayError> {
        let r = self.http.put_json(&self.url(path), body, TIMEOUT).await?;
        match r.status {
            200..=299 => Ok(()),
            status => Err(status_error(format!("PUT {path}"), status, &r.body)),
        }
    }

    /// POST with a JSON body (a binding).
    pub(crate) async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(), GatewayError> {
        let r = self
            .http
            .request(hyper::Method::POST, &self.url(path), Some(body), TIMEOUT)
            .await?;
        match r.status {
            200..=299 => Ok(()),
            status => Err(status_error(format!("POST {path}"), status, &r.body)),
        }
    }

    /// `DELETE path`; `false` when there was nothing there (404).
    pub(crate) async fn delete(&self, path: &str) -> Result<bool, GatewayError> {
        let r = self.http.delete(&self.url(path), TIMEOUT).await?;
        match r.status {
            200..=299 => Ok(true),
            404 => Ok(false),
            status => Err(status_error(format!("DELETE {path}"), status, &r.body)),
        }
    }

    /// The user's tags, `None` when there is no such user.
    pub(crate) async fn tags(&self, user: &str) -> Result<Option<Vec<String>>, GatewayError> {
        Ok(self
            .get(&format!("users/{user}"))
            .await?
            .map(|u| tags_of(&u["tags"])))
    }

    /// The user must exist and be a gateway's.
    async fn gateway_user(&self, id: &str) -> Result<(), GatewayError> {
        match self.tags(id).await? {
            None => Err(GatewayError::Missing(id.to_owned())),
            Some(tags) if tags.iter().any(|t| t == TAG) => Ok(()),
            Some(_) => Err(GatewayError::NotAGateway(id.to_owned())),
        }
    }

    /// `gateway add`: creates the user with `password` and its permissions; an existing
    /// gateway keeps its password and gets its permissions set again (the same ones).
    pub async fn add(
        &self,
        names: &Names,
        id: &str,
        password: &str,
    ) -> Result<Added, GatewayError> {
        check_id(id)?;
        let added = match self.tags(id).await? {
            Some(tags) if tags.iter().any(|t| t == TAG) => Added::Exists,
            Some(_) => return Err(GatewayError::NotAGateway(id.to_owned())),
            None => {
                self.put(
                    &format!("users/{id}"),
                    &json!({"password": password, "tags": TAG}),
                )
                .await?;
                Added::Created
            }
        };
        // The topic permissions first, then the write permission they narrow: an `add` cut
        // short between the two never leaves a gateway that may write every routing key. An
        // existing gateway gets both again (idempotent), so a rerun repairs a cut-short add.
        let vhost = &self.vhost;
        for topic in topic_permissions(names, id) {
            self.put(&format!("topic-permissions/{vhost}/{id}"), &topic)
                .await?;
        }
        self.put(&format!("permissions/{vhost}/{id}"), &permissions(names))
            .await?;
        Ok(added)
    }

    /// `gateway rotate`: a new password; the gateway's open connections are closed, so the
    /// old password stops working at once.
    pub async fn rotate(&self, id: &str, password: &str) -> Result<(), GatewayError> {
        check_id(id)?;
        self.gateway_user(id).await?;
        self.put(
            &format!("users/{id}"),
            &json!({"password": password, "tags": TAG}),
        )
        .await?;
        self.close_connections(id).await
    }

    /// `gateway remove`: deletes the user (its permissions go with it) and closes its
    /// connections. `false`: there was none.
    pub async fn remove(&self, id: &str) -> Result<bool, GatewayError> {
        check_id(id)?;
        match self.gateway_user(id).await {
            Err(GatewayError::Missing(_)) => return Ok(false),
            other => other?,
        }
        let path = format!("users/{id}");
        let r = self.http.delete(&self.url(&path), TIMEOUT).await?;
        match r.status {
            200..=299 | 404 => {}
            status => return Err(status_error(format!("DELETE {path}"), status, &r.body)),
        }
        self.close_connections(id).await?;
        Ok(true)
    }

    /// Closes every connection of `user`, MQTT ones included (the broker's connection
    /// tracking, not the statistics a connection list would lag behind).
    pub(crate) async fn close_connections(&self, user: &str) -> Result<(), GatewayError> {
        let path = format!("connections/username/{user}");
        let r = self.http.delete(&self.url(&path), TIMEOUT).await?;
        match r.status {
            200..=299 | 404 => Ok(()),
            status => Err(status_error(format!("DELETE {path}"), status, &r.body)),
        }
    }

    /// `gateway list`: every user tagged [`TAG`], with what it may publish on this vhost.
    pub async fn list(&self) -> Result<Vec<Identity>, GatewayError> {
        let users = self.get("users").await?.unwrap_or_default();
        let topics = self
            .get(&format!("vhosts/{}/topic-permissions", self.vhost))
            .await?
            .unwrap_or_default();
        let mut out = Vec::new();
        for user in users.as_array().into_iter().flatten() {
            if !tags_of(&user["tags"]).iter().any(|t| t == TAG) {
                continue;
            }
            let Some(name) = user["name"].as_str() else {
                continue;
            };
            let may_publish = topics
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["user"].as_str() == Some(name))
                .map(|t| {
                    let field = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
                    (field("exchange"), field("write"))
                })
                .collect();
            out.push(Identity {
                gateway_id: name.to_owned(),
                may_publish,
            });
        }
        out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        Ok(out)
    }
}

/// Tags as RabbitMQ 3.10 gives them (a list), or as older versions did (comma-separated).
pub(crate) fn tags_of(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::String(s) => s
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

fn status_error(what: String, status: u16, body: &str) -> GatewayError {
    let body: String = body.chars().take(300).collect();
    GatewayError::Status { what, status, body }
}

/// The table `ringpush gateway list` prints: one line per identity, the ids padded to one
/// width; with none, a line that says so.
pub fn list_table(identities: &[Identity]) -> String {
    use std::fmt::Write as _;
    if identities.is_empty() {
        return format!(
            "no gateway identities on this broker (users tagged {TAG}); `ringpush gateway add <gateway_id>` creates one\n"
        );
    }
    let width = identities
        .iter()
        .map(|i| i.gateway_id.chars().count())
        .chain(["gateway".len()])
        .max()
        .unwrap_or_default();
    let mut out = format!("{:<width$}  may publish\n", "gateway");
    for i in identities {
        let keys: Vec<String> = i
            .may_publish
            .iter()
            .map(|(exchange, key)| format!("{exchange}: {key}"))
            .collect();
        let keys = match keys.is_empty() {
            true => "nothing on this vhost".to_owned(),
            false => keys.join(", "),
        };
        let _ = writeln!(out, "{:<width$}  {keys}", i.gateway_id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_lines_up_and_an_empty_one_says_so() {
        let empty = list_table(&[]);
        assert!(empty.starts_with("no gateway identities"), "{empty}");
        let table = list_table(&[
            Identity {
                gateway_id: "gw-1".into(),
                may_publish: vec![("ringpush.rings".into(), "^ring\\.gw\\-1$".into())],
            },
            Identity {
                gateway_id: "gateway-with-a-long-id".into(),
                may_publish: vec![],
            },
        ]);
        let columns: Vec<usize> = table
            .lines()
            .map(|l| l.find("  ").unwrap() + l[l.find("  ").unwrap()..].find(|c| c != ' ').unwrap())
            .collect();
        assert!(columns.windows(2).all(|w| w[0] == w[1]), "{table}");
        assert!(table.contains("nothing on this vhost"), "{table}");
    }

    #[test]
    fn gateway_ids_are_one_routing_key_word_and_one_mqtt_topic_level() {
        for ok in ["gw-042", "gw_sim", "A1", &"g".repeat(128)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "gw.1",
            "gw/1",
            "gw+",
            "gw#",
            "gw*",
            "gw 1",
            "café",
            "retry",
            "handed-back",
            &"g".repeat(129),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn permissions_allow_only_the_gateways_own_routing_key() {
        let names = Names::new("t-ab.c");
        assert_eq!(
            permissions(&names),
            json!({"configure": "^$", "write": "^(t\\-ab\\.c\\.rings|amq\\.topic)$", "read": "^$"})
        );
        assert_eq!(
            topic_permissions(&names, "gw-a"),
            vec![
                json!({"exchange": "t-ab.c.rings", "write": "^ring\\.gw\\-a$", "read": "^$"}),
                json!({"exchange": "amq.topic", "write": "^ring\\.gw\\-a$", "read": "^$"}),
            ]
        );
    }

    #[test]
    fn a_password_file_holds_one_line() {
        assert_eq!(password_from_file("s3cret\n").unwrap(), "s3cret");
        assert_eq!(password_from_file("s3cret\r\n").unwrap(), "s3cret");
        assert!(password_from_file("").is_err());
        assert!(password_from_file("\n").is_err());
        assert!(password_from_file("a\nb\n").is_err());
        assert_eq!(generate_password().len(), 40);
        assert_ne!(generate_password(), generate_password());
    }

    #[test]
    fn tags_come_as_a_list_or_a_comma_separated_string() {
        assert_eq!(tags_of(&json!(["a", TAG])), vec!["a", TAG]);
        assert_eq!(tags_of(&json!("a, ringpush-gateway")), vec!["a", TAG]);
        assert!(tags_of(&json!(null)).is_empty());
    }
}
