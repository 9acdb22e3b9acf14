//! `ringpush service add|remove|list`: a broker identity of its own for each ringpush
//! process, with exactly the permissions its role needs on the vhost of `RINGPUSH_AMQP_URL`,
//! made through RabbitMQ's management API (as gateways' are, [`crate::gateway`]).
//!
//! No role may configure anything (`configure ^$`): configuring a name is also deleting it.
//! The topology is the administrator's: `service add` declares it through the management API
//! ([`declare_topology`], the same [`broker::plan`] the processes declare over AMQP when
//! their login may), and a process whose identity may not declare checks that it is there.
//! ringpush's processes publish to their queues through the internal topic exchange, whose
//! topic permissions say which queues each role may reach — the default exchange, which
//! reaches every queue and carries no topic permissions, is no role's to write:
//!
//! | role | read (consume) | write, with the routing keys its topic permissions allow |
//! |---|---|---|
//! | `worker` | the rings queue | the rings exchange, `ring.*` (hand-backs); the internal exchange: the retry tiers, the rings' dead queue, the feedback queue |
//! | `feedback` | the feedback queue | the internal exchange: the purge queue, the feedback dead queue, the feedback queue (binary mode's feedback service) |
//! | `purge` | the purge queue | the internal exchange: the purge dead queue |
//! | `monitor` | nothing | nothing; tag `management` (queue depths through the management API), and no AMQP connection at all (`max-connections` 0) |

use serde_json::json;

use crate::broker::{self, Names};
use crate::gateway::{regex_escape, tags_of, GatewayError, Management};

/// What a ringpush process's identity is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Worker,
    Feedback,
    Purge,
    /// Reads queue depths through the management API (KEDA, `ringpush queues`), nothing else.
    Monitor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Worker, Role::Feedback, Role::Purge, Role::Monitor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Feedback => "feedback",
            Role::Purge => "purge",
            Role::Monitor => "monitor",
        }
    }

    pub fn parse(s: &str) -> Result<Role, ServiceError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ServiceError::UnknownRole(s.to_owned()))
    }

    /// The tag that says a user is this role's identity: `ringpush-<role>`.
    pub fn tag(self) -> String {
        format!("ringpush-{}", self.as_str())
    }

    /// Every tag the role's user carries: its own, and for `monitor` RabbitMQ's `management`
    /// (the management API, showing the vhosts the user has permissions on; not `monitoring`,
    /// which would show every vhost's connections and channels too).
    fn tags(self) -> Vec<String> {
        match self {
            Role::Monitor => vec![self.tag(), "management".into()],
            _ => vec![self.tag()],
        }
    }

    /// The role whose tag a user carries, if any.
    fn of(tags: &[String]) -> Option<Role> {
        Role::ALL.into_iter().find(|r| tags.contains(&r.tag()))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a service command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0:?} is not a role: worker, feedback, purge or monitor")]
    UnknownRole(String),
    #[error("{0:?} is not a name a broker identity can be made for: 1 to 128 ASCII letters, digits, `-` and `_`")]
    InvalidName(String),
    #[error("the broker user {0:?} is not a ringpush service identity (no ringpush-<role> tag); nothing changed")]
    NotAService(String),
    #[error("{name:?} is the {has} identity, not {asked}; nothing changed (`ringpush service remove {name}` first)")]
    OtherRole {
        name: String,
        has: Role,
        asked: Role,
    },
    #[error(transparent)]
    Management(#[from] GatewayError),
}

/// Checks a service identity's name: 1 to 128 ASCII letters, digits, `-` and `_`.
pub fn check_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(ServiceError::InvalidName(name.to_owned())),
    }
}

/// `^(a|b|…)$` over the names given, each matching only itself.
fn only(names: &[&str]) -> String {
    let escaped: Vec<String> = names.iter().map(|n| regex_escape(n)).collect();
    format!("^({})$", escaped.join("|"))
}

/// The vhost permissions of `role`: configure, write, read.
pub(crate) fn permissions(role: Role, names: &Names) -> serde_json::Value {
    let none = "^$";
    let (write, read) = match role {
        Role::Worker => (
            only(&[&names.rings, &names.internal]),
            only(&[&names.rings]),
        ),
        Role::Feedback => (only(&[&names.internal]), only(&[&names.feedback])),
        Role::Purge => (only(&[&names.internal]), only(&[&names.purge])),
        Role::Monitor => (none.to_owned(), none.to_owned()),
    };
    json!({"configure": none, "write": write, "read": read})
}

/// The topic permissions of `role`, one per exchange it may write to: the routing keys it may
/// publish with (on the internal exchange, the names of the queues it feeds).
pub(crate) fn topic_permissions(role: Role, names: &Names) -> Vec<serde_json::Value> {
    let internal =
        |queues: &[&str]| json!({"exchange": names.internal, "write": only(queues), "read": "^$"});
    match role {
        Role::Worker => {
            let mut queues: Vec<&str> = names.retry.iter().map(String::as_str).collect();
            queues.extend([names.dead.as_str(), names.feedback.as_str()]);
            vec![
                // Hand-backs keep the ring's own key (or go back under ring.retry).
                json!({"exchange": names.rings, "write": r"^ring\.", "read": "^$"}),
                internal(&queues),
            ]
        }
        Role::Feedback => vec![internal(&[
            &names.purge,
            &names.feedback_dead,
            &names.feedback,
        ])],
        Role::Purge => vec![internal(&[&names.purge_dead])],
        Role::Monitor => Vec::new(),
    }
}

/// What `add` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    Created,
    /// It existed with its role's permissions: nothing changed.
    Exists,
    /// It existed, but its permissions, tags or limits were not its role's: they were set
    /// again (its password was not touched).
    Repaired,
}

/// A service identity as `list` shows it (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    /// Configure, write and read on this vhost (`None`: no permissions here).
    pub permissions: Option<(String, String, String)>,
    /// The routing keys it may publish, per exchange.
    pub topics: Vec<(String, String)>,
}

/// Declares the topology of `names` through the management API, as an administrator: the
/// processes whose identities may not declare find it there. Idempotent; a name declared
/// before with other arguments is an error (the broker's 400, passed on).
pub async fn declare_topology(m: &Management, names: &Names) -> Result<(), ServiceError> {
    let vhost = m.vhost();
    let plan = broker::plan(names);
    for exchange in &plan.exchanges {
        let body = json!({"type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {}});
        m.put(&format!("exchanges/{vhost}/{exchange}"), &body)
            .await?;
    }
    for (queue, arguments) in &plan.queues {
        let body =
            json!({"durable": true, "auto_delete": false, "arguments": arguments_json(arguments)});
        m.put(&format!("queues/{vhost}/{queue}"), &body).await?;
    }
    for b in &plan.bindings {
        let kind = if b.to_exchange { "e" } else { "q" };
        let path = format!("bindings/{vhost}/e/{}/{kind}/{}", b.source, b.destination);
        m.post(&path, &json!({"routing_key": b.key, "arguments": {}}))
            .await?;
    }
    Ok(())
}

/// Queue arguments as the management API takes them (the plan's are strings and integers).
fn arguments_json(table: &lapin::types::FieldTable) -> serde_json::Value {
    use lapin::types::AMQPValue;
    let mut out = serde_json::Map::new();
    for (k, v) in table.inner() {
        let value = match v {
            AMQPValue::LongString(s) => json!(s.to_string()),
            AMQPValue::LongLongInt(n) => json!(n),
            AMQPValue::LongInt(n) => json!(n),
            AMQPValue::Boolean(b) => json!(b),
            other => json!(format!("{other:?}")),
        };
        out.insert(k.to_string(), value);
    }
    serde_json::Value::Object(out)
}

/// `service add`: declares the topology, then creates the user with `password`, its tags,
/// limits and permissions. An existing identity of the role keeps its password; its
/// permissions are compared with the role's and set again only when they differ.
pub async fn add(
    m: &Management,
    names: &Names,
    role: Role,
    name: &str,
    password: &str,
) -> Result<Added, ServiceError> {
    check_name(name)?;
    let existing = m.tags(name).await?;
    if let Some(tags) = &existing {
        match Role::of(tags) {
            None => return Err(ServiceError::NotAService(name.to_owned())),
            Some(has) if has != role => {
                return Err(ServiceError::OtherRole {
                    name: name.to_owned(),
                    has,
                    asked: role,
                })
            }
            Some(_) => {}
        }
    }
    declare_topology(m, names).await?;
    let tags = role.tags().join(",");
    let added = match existing {
        None => {
            m.put(
                &format!("users/{name}"),
                &json!({"password": password, "tags": tags}),
            )
            .await?;
            Added::Created
        }
        Some(_) if as_the_role_needs(m, names, role, name).await? => return Ok(Added::Exists),
        Some(_) => {
            // Tags again without touching the password (the API keeps the hash it is given).
            let user = m.get(&format!("users/{name}")).await?.unwrap_or_default();
            let hash = user["password_hash"].as_str().unwrap_or_default();
            let algorithm = user["hashing_algorithm"].as_str().unwrap_or_default();
            m.put(
                &format!("users/{name}"),
                &json!({"password_hash": hash, "hashing_algorithm": algorithm, "tags": tags}),
            )
            .await?;
            Added::Repaired
        }
    };
    grant(m, names, role, name).await?;
    Ok(added)
}

/// Sets the role's limits and permissions: the connection limit first (a monitor never has a
/// moment with vhost access and connections allowed), the topic permissions before the write
/// permission they narrow (an `add` cut short never leaves an identity that may write every
/// routing key), stale topic permissions removed.
async fn grant(m: &Management, names: &Names, role: Role, name: &str) -> Result<(), ServiceError> {
    let vhost = m.vhost();
    if role == Role::Monitor {
        m.put(
            &format!("user-limits/{name}/max-connections"),
            &json!({"value": 0}),
        )
        .await?;
    }
    let wanted = topic_permissions(role, names);
    for topic in &wanted {
        m.put(&format!("topic-permissions/{vhost}/{name}"), topic)
            .await?;
    }
    let held = m
        .get(&format!("topic-permissions/{vhost}/{name}"))
        .await?
        .unwrap_or_default();
    for t in held.as_array().into_iter().flatten() {
        let exchange = t["exchange"].as_str().unwrap_or_default();
        if !wanted.iter().any(|w| w["exchange"] == exchange) {
            m.delete(&format!("topic-permissions/{vhost}/{name}/{exchange}"))
                .await?;
        }
    }
    m.put(
        &format!("permissions/{vhost}/{name}"),
        &permissions(role, names),
    )
    .await?;
    Ok(())
}

/// Whether an existing identity has exactly its role's tags, limits and permissions here.
async fn as_the_role_needs(
    m: &Management,
    names: &Names,
    role: Role,
    name: &str,
) -> Result<bool, ServiceError> {
    let vhost = m.vhost();
    let mut tags = m.tags(name).await?.unwrap_or_default();
    tags.sort();
    let mut wanted_tags = role.tags();
    wanted_tags.sort();
    let permissions = m.get(&format!("permissions/{vhost}/{name}")).await?;
    let same_permissions = permissions.is_some_and(|p| {
        let wanted = self::permissions(role, names);
        ["configure", "write", "read"]
            .iter()
            .all(|k| p[k] == wanted[k])
    });
    let held = m
        .get(&format!("topic-permissions/{vhost}/{name}"))
        .await?
        .unwrap_or_default();
    let mut held: Vec<(String, String, String)> = held
        .as_array()
        .into_iter()
        .flatten()
        .map(topic_triple)
        .collect();
    held.sort();
    let mut wanted: Vec<(String, String, String)> = topic_permissions(role, names)
        .iter()
        .map(topic_triple)
        .collect();
    wanted.sort();
    let limited = match role {
        Role::Monitor => {
            let limits = m
                .get(&format!("user-limits/{name}"))
                .await?
                .unwrap_or_default();
            limits
                .as_array()
                .into_iter()
                .flatten()
                .any(|l| l["value"]["max-connections"] == 0)
        }
        _ => true,
    };
    Ok(tags == wanted_tags && same_permissions && held == wanted && limited)
}

fn topic_triple(t: &serde_json::Value) -> (String, String, String) {
    let field = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
    (field("exchange"), field("write"), field("read"))
}

/// `service remove`: deletes a service identity (its permissions and limits go with it) and
/// closes its connections. `false`: there was none. Any other user is refused untouched.
pub async fn remove(m: &Management, name: &str) -> Result<bool, ServiceError> {
    check_name(name)?;
    match m.tags(name).await? {
        None => return Ok(false),
        Some(tags) if Role::of(&tags).is_none() => {
            return Err(ServiceError::NotAService(name.to_owned()))
        }
        Some(_) => {}
    }
    m.delete(&format!("users/{name}")).await?;
    m.close_connections(name).await?;
    Ok(true)
}

/// `service list`: every user with a `ringpush-<role>` tag, with its permissions on this vhost.
pub async fn list(m: &Management) -> Result<Vec<Identity>, ServiceError> {
    let vhost = m.vhost();
    let users = m.get("users").await?.unwrap_or_default();
    let permissions = m
        .get(&format!("vhosts/{vhost}/permissions"))
        .await?
        .unwrap_or_default();
    let topics = m
        .get(&format!("vhosts/{vhost}/topic-permissions"))
        .await?
        .unwrap_or_default();
    let of_user = |list: &serde_json::Value, name: &str| -> Vec<serde_json::Value> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["user"].as_str() == Some(name))
            .cloned()
            .collect()
    };
    let mut out = Vec::new();
    for user in users.as_array().into_iter().flatten() {
        let (Some(name), Some(role)) = (user["name"].as_str(), Role::of(&tags_of(&user["tags"])))
        else {
            continue;
        };
        let permissions = of_user(&permissions, name).first().map(|p| {
            let field = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
            (field("configure"), field("write"), field("read"))
        });
        let topics = of_user(&topics, name)
            .iter()
            .map(|t| {
                let (exchange, write, _) = topic_triple(t);
                (exchange, write)
            })
            .collect();
        out.push(Identity {
            name: name.to_owned(),
            role,
            permissions,
            topics,
        });
    }
    out.sort_by(|a, b| (a.role.as_str(), &a.name).cmp(&(b.role.as_str(), &b.name)));
    Ok(out)
}

/// The table `ringpush service list` prints: name, role, then what it may do on this vhost.
pub fn list_table(identities: &[Identity]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for i in identities {
        let may = match &i.permissions {
            None => "no permissions on this vhost".to_owned(),
            Some((configure, write, read)) => {
                let topics: Vec<String> = i
                    .topics
                    .iter()
                    .map(|(exchange, key)| format!("{exchange}: {key}"))
                    .collect();
                let mut line = format!("configure {configure}, write {write}, read {read}");
                if !topics.is_empty() {
                    let _ = write!(line, "; routing keys {}", topics.join(", "));
                }
                line
            }
        };
        let _ = writeln!(out, "{}\t{}\t{may}", i.name, i.role);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_may_read_and_write_only_what_it_needs() {
        let n = Names::new("rp");
        let p = |role| permissions(role, &n);
        assert_eq!(
            p(Role::Worker),
            json!({"configure": "^$", "write": r"^(rp\.rings|rp\.internal)$", "read": r"^(rp\.rings)$"})
        );
        assert_eq!(
            p(Role::Feedback),
            json!({"configure": "^$", "write": r"^(rp\.internal)$", "read": r"^(rp\.feedback)$"})
        );
        assert_eq!(
            p(Role::Purge),
            json!({"configure": "^$", "write": r"^(rp\.internal)$", "read": r"^(rp\.purge)$"})
        );
        assert_eq!(
            p(Role::Monitor),
            json!({"configure": "^$", "write": "^$", "read": "^$"})
        );
        let worker = topic_permissions(Role::Worker, &n);
        assert_eq!(worker[0]["write"], r"^ring\.");
        assert_eq!(
            worker[1]["write"],
            r"^(rp\.rings\.retry\.quorum\.1s|rp\.rings\.retry\.quorum\.2s|rp\.rings\.retry\.quorum\.4s|rp\.rings\.retry\.quorum\.8s|rp\.rings\.retry\.quorum\.16s|rp\.rings\.dead|rp\.feedback)$"
        );
        assert_eq!(
            topic_permissions(Role::Purge, &n),
            vec![json!({"exchange": "rp.internal", "write": r"^(rp\.purge\.dead)$", "read": "^$"})]
        );
        assert!(topic_permissions(Role::Monitor, &n).is_empty());
        // No role's regexes reach the purge queue but the feedback consumer's.
        for role in [Role::Worker, Role::Purge, Role::Monitor] {
            let all = format!("{}{:?}", p(role), topic_permissions(role, &n));
            assert!(
                !all.contains(r"rp\.purge)") && !all.contains(r"rp\.purge|"),
                "{role}: {all}"
            );
        }
    }

    #[test]
    fn roles_and_names_are_checked() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()).unwrap(), role);
            assert_eq!(Role::of(&role.tags()), Some(role));
        }
        assert!(Role::parse("admin").is_err());
        assert_eq!(Role::of(&["ringpush-gateway".to_owned()]), None);
        assert!(check_name("ringpush-worker-1").is_ok());
        for bad in ["", "a b", "a/b", "é", &"n".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn queue_arguments_go_to_the_api_as_strings_and_numbers() {
        let plan = broker::plan(&Names::new("rp"));
        let (_, rings) = &plan.queues[0];
        assert_eq!(
            arguments_json(rings),
            json!({"x-queue-type": "quorum", "x-delivery-limit": 20, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "rp.rings.dead"})
        );
    }
}
