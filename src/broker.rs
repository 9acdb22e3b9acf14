//! RabbitMQ: the topology DESIGN.md names (declared idempotently by every process at
//! start), connecting, and publishing with a publisher confirm.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Deliveries of one ring before RabbitMQ dead-letters it: a backstop against a message
/// that kills the worker every time.
pub const DELIVERY_LIMIT: i64 = 20;
/// How long a ring waits in the retry queue (a classic queue without consumers) before
/// it is dead-lettered back to the rings exchange.
pub const RETRY_DELAY: Duration = Duration::from_secs(2);

/// The broker failed or refused.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the publish to {0}")]
    NotConfirmed(String),
    #[error("RabbitMQ did not confirm the publish to {0} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout(String),
}

/// The names of every exchange and queue, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub prefix: String,
    /// Topic exchange gateways publish to, and the quorum work queue bound to it.
    pub rings: String,
    pub retry: String,
    pub dead: String,
    pub feedback: String,
    pub purge: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            rings: format!("{prefix}.rings"),
            retry: format!("{prefix}.rings.retry"),
            dead: format!("{prefix}.rings.dead"),
            feedback: format!("{prefix}.feedback"),
            purge: format!("{prefix}.purge"),
        }
    }

    /// Every queue, in the order operators read them.
    pub fn queues(&self) -> [&str; 5] {
        [
            &self.rings,
            &self.retry,
            &self.dead,
            &self.feedback,
            &self.purge,
        ]
    }

    /// The routing key of a ring from a gateway.
    pub fn ring_key(gateway_id: &str) -> String {
        format!("ring.{gateway_id}")
    }
}

/// Connects with a heartbeat, named so operators see which process holds the connection.
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let url = if url.contains("heartbeat=") {
        url.to_owned()
    } else {
        format!(
            "{url}{}heartbeat=15",
            if url.contains('?') { '&' } else { '?' }
        )
    };
    let props = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Ok(Connection::connect(&url, props).await?)
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn string(s: &str) -> AMQPValue {
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
    channel
        .queue_declare(
            names.rings.as_str().into(),
            durable,
            table(&[
                quorum(),
                ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                ("x-dead-letter-exchange", string("")),
                ("x-dead-letter-routing-key", string(&names.dead)),
            ]),
        )
        .await?;
    channel
        .queue_bind(
            names.rings.as_str().into(),
            names.rings.as_str().into(),
            "ring.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            names.retry.as_str().into(),
            durable,
            table(&[
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(RETRY_DELAY.as_millis() as i64),
                ),
                ("x-dead-letter-exchange", string(&names.rings)),
                ("x-dead-letter-routing-key", string("ring.retry")),
            ]),
        )
        .await?;
    for queue in [&names.dead, &names.feedback, &names.purge] {
        channel
            .queue_declare(queue.as_str().into(), durable, table(&[quorum()]))
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

/// A channel in confirm mode, for publishes that stand in for an ack.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes persistently and waits for the broker's confirm (bounded by a timeout).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let target = if exchange.is_empty() {
        routing_key
    } else {
        exchange
    };
    let confirm = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Err(_) => Err(BrokerError::ConfirmTimeout(target.to_owned())),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(_))) => Ok(()),
        Ok(Ok(_)) => Err(BrokerError::NotConfirmed(target.to_owned())),
    }
}

/// Publishes a ring as a gateway does: to the rings exchange, keyed by gateway, JSON,
/// persistent, confirmed.
pub async fn publish_ring(
    channel: &Channel,
    names: &Names,
    ring: &crate::ring::RingEvent,
) -> Result<(), BrokerError> {
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_timestamp(ring.pressed_at.unix_timestamp() as u64);
    publish_confirmed(
        channel,
        &names.rings,
        &Names::ring_key(&ring.gateway_id),
        &ring.to_json(),
        properties,
    )
    .await
}
