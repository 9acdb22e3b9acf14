//! Commands for a person at a terminal: `ringpush queues`, `ringpush who`, `ringpush ring`
//! (over AMQP, or MQTT as a gateway speaking it) and `ringpush seed`.

use std::fmt::Write as _;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Names};
use crate::wire::ring::RingEvent;

mod mqtt;
mod queues;

pub(crate) use mqtt::with_password;
pub use mqtt::{mqtt_target, MqttGateway, MqttTarget};
pub(crate) use queues::queue_lines;
pub use queues::{delete_topology, management_lines, queues, vhost_of, ManagementApi, QueueLine};

/// `ringpush who <gateway_id>`: the answer to "why did my phone not ring?".
pub async fn who(pool: &Pool, gateway_id: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    match crate::db::who(pool, gateway_id).await? {
        None => {
            let _ = writeln!(
                out,
                "no gateway {gateway_id:?}: its rings are acked and counted as unknown_gateway"
            );
        }
        Some((name, reach)) => {
            let _ = writeln!(
                out,
                "gateway {gateway_id:?} ({name}): a ring now reaches {} phone(s)",
                reach.len()
            );
            let _ = writeln!(
                out,
                "{:>8}  {:<7} {:<12} {:<8} {:<5} {:<11} {:<11} {:<28} registered",
                "user", "role", "app", "platform", "kind", "token", "environment", "topic"
            );
            for r in &reach {
                let apns = r.token.platform() == crate::token::Platform::APNS;
                let (environment, topic) = match (apns, r.topic.as_deref()) {
                    (false, _) => ("-", "-".to_owned()),
                    (true, Some(topic)) => (r.environment.as_str(), topic.to_owned()),
                    // The app's topic: the variable's for the app default, else its folder's.
                    (true, None) if r.app == "default" => {
                        (r.environment.as_str(), "(RINGPUSH_APNS_TOPIC)".to_owned())
                    }
                    (true, None) => (r.environment.as_str(), "(its app's topic)".to_owned()),
                };
                // A call-style ring goes to the topic's `.voip` variant.
                let topic = match (apns, r.kind) {
                    (true, crate::token::Kind::Call) if !topic.ends_with(".voip") => {
                        format!("{topic}.voip")
                    }
                    _ => topic,
                };
                let _ = writeln!(
                    out,
                    "{:>8}  {:<7} {:<12} {:<8} {:<5} {:<11} {:<11} {:<28} {}",
                    r.user_id,
                    r.role.to_string(),
                    r.app,
                    // Through `to_string`: their `Display` writes the name without padding.
                    r.token.platform().to_string(),
                    r.kind.to_string(),
                    r.token.short().to_string(),
                    environment,
                    topic,
                    r.registered
                );
            }
        }
    }
    Ok(out)
}

/// How `ringpush ring` reaches the broker.
#[derive(Clone)]
pub enum Via {
    /// AMQP 0-9-1 to the rings exchange, confirmed; `declare`: declare the topology first
    /// (a gateway's own identity may not: it publishes to the exchange the workers declared).
    Amqp { declare: bool },
    /// MQTT QoS 1 to topic `ring/<gateway_id>` (RabbitMQ's MQTT plugin; the workers bind
    /// `amq.topic` to the rings exchange with `RINGPUSH_MQTT_INGRESS`).
    Mqtt(MqttTarget),
}

/// `ringpush ring`: publishes rings as a gateway would, confirmed (MQTT: PUBACKed), at a
/// steady rate.
#[allow(clippy::too_many_arguments)]
pub async fn ring(
    amqp_url: impl Into<broker::Endpoint>,
    names: &Names,
    gateway_id: &str,
    count: u64,
    per_second: u32,
    via: &Via,
    end: Option<crate::wire::ring::EndEvent>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    crate::wire::ring::check_gateway_id(gateway_id)?;
    let amqp_url: broker::Endpoint = amqp_url.into();
    if let Some(end) = end {
        return publish_end(&amqp_url, names, via, &end).await;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let new_ring = || RingEvent {
        event_id: crate::token::random_hex(16),
        gateway_id: gateway_id.to_owned(),
        pressed_at: time::OffsetDateTime::now_utc(),
        switch_id: None,
    };
    if let Via::Mqtt(target) = via {
        let mut gateway = MqttGateway::connect(target, gateway_id);
        for _ in 0..count {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let ring = new_ring();
            gateway.publish(&ring).await?;
            println!(
                "rang {} over MQTT (event {})",
                ring.gateway_id, ring.event_id
            );
        }
        gateway.disconnect().await;
        return Ok(());
    }
    let connection = broker::connect(amqp_url, "ringpush ring").await?;
    let channel = broker::confirm_channel(&connection).await?;
    if matches!(via, Via::Amqp { declare: true }) {
        broker::declare(&channel, names).await?;
    }
    for _ in 0..count {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let ring = new_ring();
        broker::publish_ring(&channel, names, &ring).await?;
        println!("rang {} (event {})", ring.gateway_id, ring.event_id);
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// `ringpush ring --end`: publishes a ring's end as its gateway would, confirmed.
async fn publish_end(
    amqp_url: &broker::Endpoint,
    names: &Names,
    via: &Via,
    end: &crate::wire::ring::EndEvent,
) -> anyhow::Result<()> {
    let said = format!(
        "ended ring {} of {} ({}, event {})",
        end.ring_id, end.gateway_id, end.reason, end.event_id
    );
    if let Via::Mqtt(target) = via {
        let mut gateway = MqttGateway::connect(target, &end.gateway_id);
        gateway.publish_body(&end.gateway_id, end.to_json()).await?;
        gateway.disconnect().await;
        println!("{said} over MQTT");
        return Ok(());
    }
    let connection = broker::connect(amqp_url, "ringpush ring").await?;
    let channel = broker::confirm_channel(&connection).await?;
    if matches!(via, Via::Amqp { declare: true }) {
        broker::declare(&channel, names).await?;
    }
    broker::publish_end(&channel, names, end).await?;
    println!("{said}");
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// `ringpush history`: a gateway's last rings, newest first, one line each.
pub async fn history(pool: &Pool, gateway_id: &str, limit: i64) -> anyhow::Result<String> {
    use std::fmt::Write;
    let rows = crate::db::rings::history(pool, gateway_id, limit).await?;
    if rows.is_empty() {
        return Ok(format!("no rings of gateway {gateway_id} in the history\n"));
    }
    let time = |t: time::OffsetDateTime| crate::wire::time::format_rfc3339(t);
    let mut out = format!(
        "{:<26} {:<12} {:<26} {:<18} {:>6} {:>7}  {}\n",
        "pressed_at", "state", "ended_at", "by", "phones", "presses", "event"
    );
    for r in rows {
        let by = match (&r.by_name, r.by_user) {
            (Some(name), Some(id)) => format!("{name} ({id})"),
            (None, Some(id)) => format!("user {id}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<26} {:<12} {:<26} {:<18} {:>6} {:>7}  {}{}",
            time(r.pressed_at),
            r.state,
            r.ended_at.map_or("-".into(), time),
            by,
            r.phones,
            r.presses,
            r.event_id,
            r.switch_id
                .map_or(String::new(), |s| format!(" (switch {s})")),
        );
    }
    Ok(out)
}

/// `ringpush seed`: a gateway with an owner and phones, unless it exists.
pub async fn seed(
    pool: &Pool,
    gateway_id: &str,
    phones: crate::db::Phones,
    topic: &str,
) -> anyhow::Result<String> {
    let created = crate::db::seed(pool, gateway_id, phones, topic).await?;
    let crate::db::Phones {
        apns_alert,
        apns_call,
        fcm_alert,
        fcm_call,
    } = phones;
    Ok(if created {
        format!(
            "created gateway {gateway_id} with {} phone(s): iPhone alert {apns_alert}, iPhone call {apns_call}, Android alert {fcm_alert}, Android call {fcm_call}\n",
            phones.total()
        )
    } else {
        format!("gateway {gateway_id} exists; nothing changed\n")
    })
}
