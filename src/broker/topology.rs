//! The topology docs/design.md names, under one prefix ([`Names`]): the rings exchange and its
//! quorum work queue, the retry tiers, the dead-letter, feedback and purge queues. Every
//! process declares it idempotently at start ([`declare`]); the demo and tests delete it.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

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

/// Declares the whole topology; identical arguments in every process (a mismatch would be
/// 406 PRECONDITION_FAILED).
pub async fn declare(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let quorum = || ("x-queue-type", string("quorum"));
    channel
        .exchange_declare(
            names.rings.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // Every queue of `names.queues()`, so `delete` removes exactly what this declares.
    for queue in names.queues() {
        let arguments = if queue == names.rings {
            table(&[
                quorum(),
                ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                ("x-dead-letter-exchange", string("")),
                ("x-dead-letter-routing-key", string(&names.dead)),
            ])
        } else if let Some(tier) = names.retry.iter().position(|r| r == queue) {
            // A quorum queue without consumers: messages wait out the TTL, then return —
            // replicated like every queue that holds a ring (a classic queue lives on the node
            // that declared it: when that node dies, re-declaring it elsewhere fails, and with
            // it every process's start). Dead-lettered at least once: a message leaves the
            // tier only when the rings exchange has taken it.
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
        channel
            .queue_declare(queue.into(), durable, arguments)
            .await?;
    }
    channel
        .queue_bind(
            names.rings.as_str().into(),
            names.rings.as_str().into(),
            "ring.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if names.mqtt_ingress {
        // An exchange-to-exchange binding: deleting the rings exchange removes it.
        channel
            .exchange_bind(
                names.rings.as_str().into(),
                MQTT_EXCHANGE.into(),
                "ring.#".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Deletes every queue and the exchange of a prefix (the demo's and tests' clean-up).
pub async fn delete(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    for queue in names.queues() {
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(
            names.rings.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
