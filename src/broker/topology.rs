//! The topology docs/design.md names, under one prefix ([`Names`]): the rings exchange and its
//! quorum work queue, the retry tiers, the dead-letter, feedback and purge queues, and the
//! internal exchange ringpush's processes reach those queues through. One [`plan`] of it,
//! carried out over AMQP ([`declare`], idempotent, by every process whose identity may) or
//! through the management API (`ringpush service add`, for processes whose least-privilege
//! identities may not: they [`check`] that it is there); the demo and tests delete it.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::BrokerError;

/// Deliveries of one ring before RabbitMQ dead-letters it: a backstop against a message
/// that kills the worker every time.
pub const DELIVERY_LIMIT: i64 = 20;
/// The retry tiers: a ring's n-th retry waits in tier min(n, last) (a quorum queue without
/// consumers, one TTL each) before it is dead-lettered back to the rings exchange.
pub const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// The routing key rings come back from a retry tier with. No gateway identity may publish it
/// (`retry` is not a gateway id a broker identity is made for).
pub const RETRY_KEY: &str = "ring.retry";

/// Where RabbitMQ's MQTT plugin puts what MQTT clients publish: topic `ring/<gateway_id>`
/// arrives here with routing key `ring.<gateway_id>`.
pub const MQTT_EXCHANGE: &str = "amq.topic";

/// The names of every exchange and queue, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
    /// Topic exchange gateways publish to, and the quorum work queue bound to it.
    pub rings: String,
    /// The retry tiers, one per delay of [`RETRY_DELAYS`]: `<prefix>.rings.retry.quorum.<n>s`
    /// (quorum queues; the classic `<prefix>.rings.retry.<n>s` of earlier releases are no
    /// longer published to: they drain into the rings exchange and can be deleted).
    pub retry: Vec<String>,
    pub dead: String,
    pub feedback: String,
    pub purge: String,
    /// Feedback events and purge requests that cannot be read, with the reason.
    pub feedback_dead: String,
    pub purge_dead: String,
    /// The topic exchange ringpush's processes publish to their queues through (retry tiers,
    /// dead letters, feedback events, purge requests): every queue but the rings queue is
    /// bound to it by its own name. Unlike the default exchange, a topic exchange carries
    /// topic permissions, so each role's broker identity may reach exactly the queues its role
    /// feeds (`ringpush service add`).
    pub internal: String,
    /// MQTT ingress (`RINGPUSH_MQTT_INGRESS`): [`declare`] also binds [`MQTT_EXCHANGE`] to
    /// the rings exchange for `ring.#`, so a gateway's MQTT publish is a ring like any other.
    pub mqtt_ingress: bool,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            rings: format!("{prefix}.rings"),
            retry: RETRY_DELAYS
                .iter()
                .map(|d| format!("{prefix}.rings.retry.quorum.{}s", d.as_secs()))
                .collect(),
            dead: format!("{prefix}.rings.dead"),
            feedback: format!("{prefix}.feedback"),
            purge: format!("{prefix}.purge"),
            feedback_dead: format!("{prefix}.feedback.dead"),
            purge_dead: format!("{prefix}.purge.dead"),
            internal: format!("{prefix}.internal"),
            mqtt_ingress: false,
        }
    }

    /// The same names, with MQTT ingress on or off.
    pub(crate) fn with_mqtt_ingress(mut self, on: bool) -> Self {
        self.mqtt_ingress = on;
        self
    }

    /// Every queue, in the order operators read them.
    pub fn queues(&self) -> Vec<&str> {
        let mut all = vec![self.rings.as_str()];
        all.extend(self.retry.iter().map(String::as_str));
        all.extend([
            self.dead.as_str(),
            self.feedback.as_str(),
            self.feedback_dead.as_str(),
            self.purge.as_str(),
            self.purge_dead.as_str(),
        ]);
        all
    }

    /// The tier for a ring's `retry`-th retry that waits at least `at_least` (a provider's
    /// `Retry-After`): the retry's own tier, or a later one when that is too short — the
    /// longest when none is long enough.
    pub(crate) fn retry_tier_waiting(&self, retry: u32, at_least: Option<Duration>) -> &str {
        let own = (retry.max(1) as usize - 1).min(self.retry.len() - 1);
        let i = match at_least {
            None => own,
            Some(wait) => (own..self.retry.len())
                .find(|&i| RETRY_DELAYS[i] >= wait)
                .unwrap_or(self.retry.len() - 1),
        };
        &self.retry[i]
    }

    /// The routing key of a ring from a gateway.
    pub fn ring_key(gateway_id: &str) -> String {
        format!("ring.{gateway_id}")
    }
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

pub(super) fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The whole topology of a prefix, as data: what [`declare`] declares over AMQP and the
/// management client through its API — one description, so both give every name the same
/// arguments (a mismatch would be a channel error).
#[derive(Debug, Clone)]
pub struct Plan {
    /// Durable topic exchanges.
    pub exchanges: Vec<String>,
    /// Durable queues with their arguments.
    pub queues: Vec<(String, FieldTable)>,
    pub bindings: Vec<Binding>,
}

/// A binding of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// An exchange.
    pub source: String,
    /// A queue, or an exchange when `to_exchange`.
    pub destination: String,
    pub to_exchange: bool,
    pub key: String,
}

/// The topology of `names`: the rings exchange and the internal exchange; every queue of
/// `names.queues()` (so [`delete`] removes exactly what this declares); the rings queue
/// bound to the rings exchange for `ring.#`, every other queue to the internal exchange by
/// its own name; with MQTT ingress, `amq.topic` bound to the rings exchange.
pub fn plan(names: &Names) -> Plan {
    let quorum = || ("x-queue-type", string("quorum"));
    let queues = names
        .queues()
        .into_iter()
        .map(|queue| {
            let arguments = if queue == names.rings {
                table(&[
                    quorum(),
                    ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                    ("x-dead-letter-exchange", string("")),
                    ("x-dead-letter-routing-key", string(&names.dead)),
                ])
            } else if let Some(tier) = names.retry.iter().position(|r| r == queue) {
                // A quorum queue without consumers: messages wait out the TTL, then return —
                // replicated like every queue that holds a ring (a classic queue lives on the
                // node that declared it: when that node dies, re-declaring it elsewhere
                // fails, and with it every process's start). Dead-lettered at least once: a
                // message leaves the tier only when the rings exchange has taken it.
                table(&[
                    quorum(),
                    ("x-dead-letter-strategy", string("at-least-once")),
                    ("x-overflow", string("reject-publish")),
                    (
                        "x-message-ttl",
                        AMQPValue::LongLongInt(RETRY_DELAYS[tier].as_millis() as i64),
                    ),
                    ("x-dead-letter-exchange", string(&names.rings)),
                    ("x-dead-letter-routing-key", string(RETRY_KEY)),
                ])
            } else {
                table(&[quorum()])
            };
            (queue.to_owned(), arguments)
        })
        .collect();
    let mut bindings = vec![Binding {
        source: names.rings.clone(),
        destination: names.rings.clone(),
        to_exchange: false,
        key: "ring.#".into(),
    }];
    bindings.extend(
        names
            .queues()
            .into_iter()
            .filter(|q| *q != names.rings)
            .map(|queue| Binding {
                source: names.internal.clone(),
                destination: queue.to_owned(),
                to_exchange: false,
                key: queue.to_owned(),
            }),
    );
    if names.mqtt_ingress {
        // An exchange-to-exchange binding: deleting the rings exchange removes it.
        bindings.push(Binding {
            source: MQTT_EXCHANGE.into(),
            destination: names.rings.clone(),
            to_exchange: true,
            key: "ring.#".into(),
        });
    }
    Plan {
        exchanges: vec![names.rings.clone(), names.internal.clone()],
        queues,
        bindings,
    }
}

/// Declares the whole topology ([`plan`]); identical arguments in every process.
pub async fn declare(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    let plan = plan(names);
    for exchange in &plan.exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (queue, arguments) in plan.queues {
        channel
            .queue_declare(queue.as_str().into(), durable, arguments)
            .await?;
    }
    for b in plan.bindings {
        let (source, destination, key) = (b.source.as_str(), b.destination.as_str(), b.key);
        if b.to_exchange {
            channel
                .exchange_bind(
                    destination.into(),
                    source.into(),
                    key.as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        } else {
            channel
                .queue_bind(
                    destination.into(),
                    source.into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

/// Checks that every exchange and queue of the topology is there, by passive declares (which
/// need no permission: what an identity that may not declare can do). The first one missing
/// is named in the error. (Bindings cannot be checked this way: a publish that no binding
/// routes comes back to its publisher, which then fails, so it is not lost.)
pub async fn check(connection: &Connection, names: &Names) -> Result<(), BrokerError> {
    let plan = plan(names);
    let channel = connection.create_channel().await?;
    let passive = || QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for exchange in &plan.exchanges {
        let options = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .map_err(|e| missing(e, "exchange", exchange))?;
    }
    for (queue, _) in &plan.queues {
        channel
            .queue_declare(queue.as_str().into(), passive(), FieldTable::default())
            .await
            .map_err(|e| missing(e, "queue", queue))?;
    }
    let _ = channel.close(200, "checked".into()).await;
    Ok(())
}

/// A passive declare's error: [`BrokerError::NotDeclared`] when the name is not there.
fn missing(e: lapin::Error, kind: &str, name: &str) -> BrokerError {
    if super::reply_code(&e) == Some(404) {
        BrokerError::NotDeclared(format!("{kind} {name}"))
    } else {
        e.into()
    }
}

/// What [`declare_or_check`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Declared,
    /// The identity may not declare it (a role's least-privilege identity); it is there.
    Checked,
}

/// Declares the topology on a channel of its own, or — when the broker refuses it to this
/// identity (ACCESS_REFUSED: a role's identity has no configure permission; the topology is
/// the administrator's, declared by `ringpush service add`) — checks that it is there.
pub async fn declare_or_check(
    connection: &Connection,
    names: &Names,
) -> Result<Topology, BrokerError> {
    let channel = connection.create_channel().await?;
    match declare(&channel, names).await {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(Topology::Declared)
        }
        Err(BrokerError::Amqp(e)) if super::reply_code(&e) == Some(403) => {
            check(connection, names).await?;
            Ok(Topology::Checked)
        }
        Err(e) => Err(e),
    }
}

/// Deletes every queue and exchange of a prefix (the demo's and tests' clean-up).
pub async fn delete(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    for queue in names.queues() {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [&names.rings, &names.internal] {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_binds_every_queue_but_the_rings_queue_to_the_internal_exchange_by_its_name() {
        let names = Names::new("p");
        let plan = plan(&names);
        assert_eq!(plan.exchanges, ["p.rings", "p.internal"]);
        assert_eq!(plan.queues.len(), names.queues().len());
        let bound: Vec<(&str, &str, &str)> = plan
            .bindings
            .iter()
            .map(|b| (b.source.as_str(), b.destination.as_str(), b.key.as_str()))
            .collect();
        assert_eq!(bound[0], ("p.rings", "p.rings", "ring.#"));
        for queue in names.queues().into_iter().filter(|q| *q != "p.rings") {
            assert!(bound.contains(&("p.internal", queue, queue)), "{queue}");
        }
        assert_eq!(bound.len(), names.queues().len());
        assert!(plan.bindings.iter().all(|b| !b.to_exchange));
        let mqtt = super::plan(&names.clone().with_mqtt_ingress(true));
        let last = mqtt.bindings.last().unwrap();
        assert_eq!(
            (
                last.source.as_str(),
                last.destination.as_str(),
                last.to_exchange
            ),
            (MQTT_EXCHANGE, "p.rings", true)
        );
    }

    #[test]
    fn a_retry_goes_to_its_tier_or_a_later_one_long_enough_for_the_wait_asked() {
        let n = Names::new("p");
        assert_eq!(n.retry_tier_waiting(1, None), "p.rings.retry.quorum.1s");
        assert_eq!(n.retry_tier_waiting(9, None), "p.rings.retry.quorum.16s");
        let wait = |s: f64| Some(Duration::from_secs_f64(s));
        assert_eq!(
            n.retry_tier_waiting(1, wait(0.5)),
            "p.rings.retry.quorum.1s"
        );
        assert_eq!(
            n.retry_tier_waiting(1, wait(3.0)),
            "p.rings.retry.quorum.4s"
        );
        assert_eq!(
            n.retry_tier_waiting(4, wait(3.0)),
            "p.rings.retry.quorum.8s"
        );
        assert_eq!(
            n.retry_tier_waiting(1, wait(60.0)),
            "p.rings.retry.quorum.16s"
        );
    }
}
