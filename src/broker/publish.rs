//! Publishing: a confirm-mode channel, a publish that waits for the broker's confirm (and
//! fails when no binding routes it), the AMQP limits a message is measured against before it
//! goes out ([`check_fits`]), rings as a gateway publishes them, publishes to ringpush's own
//! queues through the internal exchange ([`Publisher::to_queue`]), and dead letters carrying
//! their reason in `x-ringpush-error`.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use super::{BrokerError, Names};
pub use crate::wire::ERROR_HEADER;

/// How long a publish may wait for the broker's confirm.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A confirm-mode channel for publishes that stand in for an ack, with the connection's
/// negotiated `frame_max` — what [`publish_checked`] measures a message against before it
/// goes out — and the internal exchange its publishes to ringpush's queues go through.
#[derive(Clone)]
pub struct Publisher {
    pub channel: Channel,
    pub frame_max: u32,
    /// [`Names::internal`].
    pub internal: String,
}

impl Publisher {
    /// A confirm-mode channel on `connection` for the topology of `names`.
    pub async fn open(connection: &Connection, names: &Names) -> Result<Self, BrokerError> {
        Ok(Self {
            channel: confirm_channel(connection).await?,
            frame_max: connection.configuration().frame_max(),
            internal: names.internal.clone(),
        })
    }

    /// [`publish_checked`] to one of ringpush's queues: through the internal exchange, keyed
    /// by the queue's name (an identity's topic permissions say which queues it may reach).
    pub async fn to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        publish_checked(self, &self.internal, queue, body, properties).await
    }
}

impl std::ops::Deref for Publisher {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.channel
    }
}

/// Largest message body ringpush publishes. RabbitMQ refuses bodies over its
/// `max_message_size` (128 MiB in 3.x, 16 MiB from 4.0) by closing the channel; staying far
/// below it keeps any broker version's default out of reach.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Bytes a content header frame adds around the properties: frame header (7), class id,
/// weight and body size (12) and the frame end (1).
const CONTENT_HEADER_OVERHEAD: usize = 20;

/// Encoded size of `properties` in a content header frame (AMQP 0-9-1 §4.2.6.1): the flags
/// word and each property present.
pub fn properties_size(properties: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let mut size = 2;
    size += short(properties.content_type());
    size += short(properties.content_encoding());
    size += properties.headers().as_ref().map_or(0, table_size);
    size += properties.delivery_mode().map_or(0, |_| 1);
    size += properties.priority().map_or(0, |_| 1);
    size += short(properties.correlation_id());
    size += short(properties.reply_to());
    size += short(properties.expiration());
    size += short(properties.message_id());
    size += properties.timestamp().map_or(0, |_| 8);
    size += short(properties.kind());
    size += short(properties.user_id());
    size += short(properties.app_id());
    size += short(properties.cluster_id());
    size
}

fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_size(v))
        .sum::<usize>()
}

fn value_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
    }
}

/// Whether a message fits the limits the broker enforces by closing the connection or the
/// channel: its content header in one frame of `frame_max`, its body under
/// [`MAX_BODY_BYTES`]. Says which limit it breaks.
pub fn check_fits(frame_max: u32, body: &[u8], properties: &BasicProperties) -> Result<(), String> {
    let header = properties_size(properties) + CONTENT_HEADER_OVERHEAD;
    if header > frame_max as usize {
        return Err(format!(
            "its properties need a {header}-byte content header, over the {frame_max} bytes a frame leaves them (frame_max less the broker's headroom)"
        ));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(format!(
            "its body of {} bytes is over the {MAX_BODY_BYTES}-byte limit",
            body.len()
        ));
    }
    Ok(())
}

/// Room left in a content header frame for what the broker adds to a message ringpush
/// publishes before a consumer gets it again: `x-death` and `x-first-death-*` when a retry
/// tier dead-letters it back, `x-delivery-count` on a redelivery. A copy that fits the frame
/// only without them would be published fine and then, on its way back, make the broker
/// close every connection it is delivered on.
pub(crate) const BROKER_HEADROOM: u32 = 4096;

/// [`publish_confirmed`] after [`check_fits`] (with [`BROKER_HEADROOM`] kept free): a message
/// that would break a limit is not sent (the broker would close the connection, taking
/// every delivery in flight with it); the caller gets [`BrokerError::TooLarge`] and decides
/// (split it, or dead-letter it).
pub async fn publish_checked(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let properties = properties.with_delivery_mode(2);
    let room = publisher.frame_max.saturating_sub(BROKER_HEADROOM);
    if let Err(what) = check_fits(room, body, &properties) {
        let target = if exchange.is_empty() {
            routing_key
        } else {
            exchange
        };
        return Err(BrokerError::TooLarge {
            target: target.to_owned(),
            what,
        });
    }
    publish_confirmed(&publisher.channel, exchange, routing_key, body, properties).await
}

/// A channel in confirm mode, for publishes that stand in for an ack.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes persistently and waits for the broker's confirm (bounded by a timeout). The
/// publish is mandatory: one that no binding routes comes back, and is an error
/// ([`BrokerError::Unroutable`]) instead of being lost.
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
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Err(_) => Err(BrokerError::ConfirmTimeout(target.to_owned())),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_)))) => Err(BrokerError::Unroutable(format!(
            "{target} (routing key {})",
            crate::wire::logged(routing_key)
        ))),
        Ok(Ok(_)) => Err(BrokerError::NotConfirmed(target.to_owned())),
    }
}

/// Publishes a ring's end as its gateway does (ring event v2, `type: ended`), as
/// [`publish_ring`] publishes a ring.
pub async fn publish_end(
    channel: &Channel,
    names: &Names,
    end: &crate::wire::ring::EndEvent,
) -> Result<(), BrokerError> {
    let mut properties = BasicProperties::default().with_content_type("application/json".into());
    if let Some(at) = end.at {
        properties = properties.with_timestamp(at.unix_timestamp().max(0) as u64);
    }
    publish_confirmed(
        channel,
        &names.rings,
        &Names::ring_key(&end.gateway_id),
        &end.to_json(),
        properties,
    )
    .await
}

/// Publishes a ring as a gateway does: to the rings exchange, keyed by gateway, JSON,
/// persistent, confirmed.
pub async fn publish_ring(
    channel: &Channel,
    names: &Names,
    ring: &crate::wire::ring::RingEvent,
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

/// Feedback events and purge requests go out here, beside rings, so that [`crate::wire`]
/// stays free of the broker.
impl crate::wire::feedback::Invalidation {
    /// Publishes this invalidation to `queue` (through the internal exchange), persistent and
    /// confirmed.
    pub async fn publish(&self, publisher: &Publisher, queue: &str) -> Result<(), BrokerError> {
        let properties = BasicProperties::default().with_content_type("application/json".into());
        publisher.to_queue(queue, &self.to_json(), properties).await
    }
}

/// Copies `properties` with one header added or replaced.
pub fn with_header(properties: &BasicProperties, name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(ShortString::from(name), value);
    properties.clone().with_headers(headers)
}

/// Publishes a copy of `delivery` to `dead_queue` (through the internal exchange) with the
/// reason in `x-ringpush-error`, confirmed. The caller acks the original only after this
/// returns `Ok`.
pub async fn dead_letter(
    publisher: &Publisher,
    dead_queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), BrokerError> {
    dead_letter_with(
        publisher,
        dead_queue,
        &delivery.data,
        &delivery.properties,
        reason,
    )
    .await
}

/// Longest `x-ringpush-error`, in bytes: a reason is for a person to read, and it must never
/// be what makes a dead letter too large to publish.
pub const MAX_REASON_BYTES: usize = 1024;

/// [`dead_letter`] for a body and properties of the caller's choosing. The reason is cut to
/// [`MAX_REASON_BYTES`]; if the message's own headers leave no room for it in a frame, they
/// are dropped (the reason says so) rather than the dead letter being lost.
pub async fn dead_letter_with(
    publisher: &Publisher,
    dead_queue: &str,
    body: &[u8],
    properties: &BasicProperties,
    reason: &str,
) -> Result<(), BrokerError> {
    let reason = truncate(reason, MAX_REASON_BYTES);
    let with_reason = |properties: &BasicProperties, reason: &str| {
        with_header(
            properties,
            ERROR_HEADER,
            AMQPValue::LongString(LongString::from(reason)),
        )
    };
    let mut dead = with_reason(properties, reason);
    let room = publisher.frame_max.saturating_sub(BROKER_HEADROOM);
    if check_fits(room, body, &dead.clone().with_delivery_mode(2)).is_err() {
        let stripped = properties.clone().with_headers(FieldTable::default());
        let reason = format!("{reason} (the message's own headers were too large to keep)");
        dead = with_reason(&stripped, &reason);
    }
    publisher.to_queue(dead_queue, body, dead).await
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The `x-ringpush-error` of a dead-lettered message, if any.
pub fn error_header(properties: &BasicProperties) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(ERROR_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::topology::string;

    #[test]
    fn properties_are_measured_as_amqp_encodes_them() {
        assert_eq!(properties_size(&BasicProperties::default()), 2);
        let p = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(1);
        assert_eq!(properties_size(&p), 2 + (1 + 16) + 1 + 8);
        let mut headers = FieldTable::default();
        headers.insert("x".into(), string("abc"));
        headers.insert("n".into(), AMQPValue::LongUInt(7));
        headers.insert(
            "a".into(),
            AMQPValue::FieldArray(vec![string("ab"), AMQPValue::Boolean(true)].into()),
        );
        // table length + ("x": 1+1, LongString 1+4+3) + ("n": 1+1, 1+4)
        //   + ("a": 1+1, array 1+4 + (1+4+2) + (1+1))
        let table = 4 + (2 + 8) + (2 + 5) + (2 + 5 + 7 + 2);
        assert_eq!(
            properties_size(&BasicProperties::default().with_headers(headers)),
            2 + table
        );
    }

    #[test]
    fn a_header_of_a_buildings_tokens_does_not_fit_a_default_frame() {
        let tokens: Vec<AMQPValue> = (0..2_499).map(|i| string(&format!("{i:064x}"))).collect();
        let p = with_header(
            &BasicProperties::default(),
            "x-ringpush-pending",
            AMQPValue::FieldArray(tokens.into()),
        );
        let e = check_fits(131_072, b"{}", &p).unwrap_err();
        assert!(
            e.contains("over the 131072 bytes a frame leaves them"),
            "{e}"
        );
        assert!(check_fits(131_072, b"{}", &BasicProperties::default()).is_ok());
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(check_fits(131_072, &body, &BasicProperties::default()).is_err());
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(
            truncate(&"x".repeat(2000), MAX_REASON_BYTES).len(),
            MAX_REASON_BYTES
        );
    }
}
