//! Commands for a person at a terminal: `ringpush queues`, `ringpush who`, `ringpush ring`
//! (over AMQP, or MQTT as a gateway speaking it) and `ringpush seed`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Names};
use crate::wire::ring::RingEvent;

/// One queue as `ringpush queues` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLine {
    pub queue: String,
    pub ready: u32,
    /// Delivered and not yet acked (from the management API; `None` without it).
    pub unacked: Option<u64>,
    pub consumers: u32,
    /// The queue does not exist (no ringpush process has declared it yet).
    pub missing: bool,
}

/// Reads every ringpush queue's depth and consumer count (passive declares).
pub(crate) async fn queue_lines(
    connection: &lapin::Connection,
    names: &Names,
) -> Result<Vec<QueueLine>, lapin::Error> {
    let mut lines = Vec::new();
    for queue in names.queues() {
        // A missing queue closes the channel: one channel per queue keeps the others readable.
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => {
                lines.push(QueueLine {
                    queue: queue.to_owned(),
                    ready: q.message_count(),
                    unacked: None,
                    consumers: q.consumer_count(),
                    missing: false,
                });
                let _ = channel.close(200, "done".into()).await;
            }
            Err(_) => lines.push(QueueLine {
                queue: queue.to_owned(),
                ready: 0,
                unacked: None,
                consumers: 0,
                missing: true,
            }),
        }
    }
    Ok(lines)
}

/// RabbitMQ's management API (`http(s)://user:pass@host:port`) and how it is reached.
#[derive(Debug, Clone)]
pub struct ManagementApi {
    pub url: String,
    pub http: crate::http::Client,
}

/// Every ringpush queue's depth, unacked and consumer counts from RabbitMQ's management API
/// alone — what a `monitor` identity reads (`ringpush service add monitor`), which may not
/// open an AMQP connection at all. One GET for the whole vhost, bounded by 10 s. The API's
/// numbers are the broker's statistics, refreshed every few seconds (5 s by default).
pub async fn management_lines(
    management: &ManagementApi,
    vhost: &str,
    names: &Names,
) -> anyhow::Result<Vec<QueueLine>> {
    let base = management.url.trim_end_matches('/');
    let url = format!(
        "{base}/api/queues/{vhost}?columns=name,messages_ready,messages_unacknowledged,consumers"
    );
    let response = management
        .http
        .get(&url, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("RINGPUSH_MANAGEMENT_URL: {e}"))?;
    anyhow::ensure!(
        response.status == 200,
        "management API: status {}",
        response.status
    );
    let listed: Vec<serde_json::Value> = serde_json::from_str(&response.body)?;
    Ok(names
        .queues()
        .into_iter()
        .map(|queue| {
            let found = listed.iter().find(|q| q["name"].as_str() == Some(queue));
            let count = |k: &str| found.and_then(|q| q[k].as_u64()).unwrap_or(0);
            QueueLine {
                queue: queue.to_owned(),
                ready: count("messages_ready").min(u64::from(u32::MAX)) as u32,
                unacked: found.map(|_| count("messages_unacknowledged")),
                consumers: count("consumers").min(u64::from(u32::MAX)) as u32,
                missing: found.is_none(),
            }
        })
        .collect())
}

/// The vhost of an AMQP URL (the first, for a list), percent-encoded as the management API
/// wants it (`%2f` for the default vhost).
pub fn vhost_of(amqp_url: &str) -> String {
    let first = amqp_url.split(',').next().unwrap_or_default().trim();
    let vhost = url::Url::parse(first)
        .ok()
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .unwrap_or_default();
    if vhost.is_empty() {
        "%2f".into()
    } else {
        vhost
    }
}

/// The table `ringpush queues` prints; `rates` are messages per second since the last look.
pub(crate) fn queue_table(lines: &[QueueLine], rates: Option<&[f64]>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36} {:>9} {:>9} {:>9} {:>12}",
        "queue", "ready", "unacked", "consumers", "rate/s"
    );
    for (i, l) in lines.iter().enumerate() {
        let rate = rates
            .and_then(|r| r.get(i))
            .map_or("-".to_owned(), |r| format!("{r:+.1}"));
        let unacked = l.unacked.map_or("-".to_owned(), |u| u.to_string());
        let name = match l.missing {
            true => format!("{} (missing)", l.queue),
            false => l.queue.clone(),
        };
        let _ = writeln!(
            out,
            "{:<36} {:>9} {:>9} {:>9} {:>12}",
            name, l.ready, unacked, l.consumers, rate
        );
    }
    if lines.iter().any(|l| l.unacked.is_none()) {
        out.push_str("(unacked: AMQP does not report it; set RINGPUSH_MANAGEMENT_URL to read it from the management API)\n");
    }
    out
}

/// `ringpush queues [--watch]`: the table once, or — `every` given — redrawn in place at
/// that interval until `cancel`. With `management_url` every number comes from the
/// management API and no AMQP connection is opened (a `monitor` identity has none); without
/// it, from passive declares over AMQP (no unacked counts).
pub async fn queues(
    amqp_url: &broker::Endpoint,
    names: &Names,
    management: Option<&ManagementApi>,
    every: Option<Duration>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let vhost = vhost_of(amqp_url.url());
    // The management API (no AMQP connection: a monitor identity may open none), or AMQP.
    let source = match management {
        Some(management) => Err(management),
        None => Ok(broker::connect(amqp_url, "ringpush queues").await?),
    };
    let mut last: Option<(Instant, Vec<QueueLine>)> = None;
    loop {
        let lines = match &source {
            Ok(connection) => queue_lines(connection, names).await?,
            Err(management) => management_lines(management, &vhost, names).await?,
        };
        let rates: Option<Vec<f64>> = last.as_ref().map(|(at, before)| {
            let secs = at.elapsed().as_secs_f64().max(0.001);
            lines
                .iter()
                .zip(before)
                .map(|(now, then)| (f64::from(now.ready) - f64::from(then.ready)) / secs)
                .collect()
        });
        let table = queue_table(&lines, rates.as_deref());
        let Some(every) = every else {
            print!("{table}");
            break;
        };
        // Clear the screen and draw in place.
        print!("\x1b[2J\x1b[H{table}");
        last = Some((Instant::now(), lines));
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Ok(connection) = source {
        let _ = connection.close(200, "done".into()).await;
    }
    Ok(())
}

/// `ringpush queues --delete`: removes every queue and the rings exchange of a prefix — what
/// a walkthrough or a trial deployment leaves behind — and says what each queue held.
/// Refuses, deleting nothing, while a queue has consumers (the prefix's processes still
/// run).
pub async fn delete_topology(amqp_url: &str, names: &Names) -> anyhow::Result<String> {
    let connection = broker::connect(amqp_url, "ringpush queues --delete").await?;
    let result = async {
        let lines = queue_lines(&connection, names).await?;
        if let Some(busy) = lines.iter().find(|l| l.consumers > 0) {
            anyhow::bail!(
                "{} has {} consumer(s): stop the processes of prefix {} first; nothing deleted",
                busy.queue,
                busy.consumers,
                names.prefix
            );
        }
        let channel = connection.create_channel().await?;
        let mut out = String::new();
        for line in lines.iter().filter(|l| !l.missing) {
            // (No `if_unused`: quorum queues refuse it; the consumers were checked above.)
            let held = channel
                .queue_delete(line.queue.as_str().into(), Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("{}: {}", line.queue, broker::cause::describe(&e)))?;
            let _ = writeln!(
                out,
                "deleted queue {} ({held} message(s) in it)",
                line.queue
            );
        }
        channel
            .exchange_delete(names.rings.as_str().into(), Default::default())
            .await?;
        let _ = writeln!(out, "deleted exchange {} (if it was there)", names.rings);
        if lines.iter().all(|l| l.missing) {
            let _ = writeln!(out, "no queue of prefix {} was there", names.prefix);
        }
        Ok(out)
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    result
}

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

/// Where and as whom a gateway speaks MQTT (plain TCP: ringpush carries no TLS for MQTT).
#[derive(Clone, PartialEq, Eq)]
pub struct MqttTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for MqttTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

fn decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The MQTT listener and credentials of `mqtt_url` (`mqtt://[user[:password]@]host[:port]`);
/// what it leaves out comes from the AMQP URL (the same broker identity), and `password`,
/// when given (a gateway's password file), wins.
pub fn mqtt_target(
    mqtt_url: &str,
    amqp_url: &str,
    password: Option<&str>,
) -> anyhow::Result<MqttTarget> {
    let url = url::Url::parse(mqtt_url).map_err(|e| {
        let shown = crate::broker::redact(mqtt_url);
        anyhow::anyhow!("RINGPUSH_MQTT_URL: {shown:?}: {e}")
    })?;
    anyhow::ensure!(
        url.scheme() == "mqtt",
        "RINGPUSH_MQTT_URL: only mqtt:// (plain TCP, for a local broker) is built in; a real gateway speaks MQTT over TLS on 8883"
    );
    let amqp = url::Url::parse(amqp_url.split(',').next().unwrap_or_default().trim()).ok();
    let (user, amqp_password) = match &url.username() {
        u if !u.is_empty() => (decoded(u), url.password().map(decoded)),
        _ => amqp
            .as_ref()
            .map(|a| (decoded(a.username()), a.password().map(decoded)))
            .unwrap_or_default(),
    };
    Ok(MqttTarget {
        host: url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("RINGPUSH_MQTT_URL: no host"))?
            .to_owned(),
        port: url.port().unwrap_or(1883),
        user,
        password: password
            .map(str::to_owned)
            .or(amqp_password)
            .unwrap_or_default(),
    })
}

/// The AMQP URL with `password` in place of its own (a gateway's password file) — every
/// node's, when it names a cluster's nodes.
pub(crate) fn with_password(amqp_url: &str, password: &str) -> anyhow::Result<String> {
    let nodes: anyhow::Result<Vec<String>> = crate::broker::nodes(amqp_url)
        .into_iter()
        .map(|node| {
            let mut url =
                url::Url::parse(node).map_err(|e| anyhow::anyhow!("RINGPUSH_AMQP_URL: {e}"))?;
            url.set_password(Some(password))
                .map_err(|_| anyhow::anyhow!("RINGPUSH_AMQP_URL: cannot carry a password"))?;
            Ok(url.to_string())
        })
        .collect();
    Ok(nodes?.join(","))
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

/// A gateway speaking MQTT: client id = gateway id, clean session, QoS 1, retain off.
pub struct MqttGateway {
    client: rumqttc::AsyncClient,
    events: rumqttc::EventLoop,
}

impl MqttGateway {
    /// Sets the connection up; it opens with the first publish.
    pub fn connect(target: &MqttTarget, gateway_id: &str) -> Self {
        let mut options = rumqttc::MqttOptions::new(gateway_id, &target.host, target.port);
        options.set_credentials(&target.user, &target.password);
        options.set_keep_alive(Duration::from_secs(15));
        options.set_clean_session(true);
        let (client, events) = rumqttc::AsyncClient::new(options, 10);
        Self { client, events }
    }

    /// Publishes a ring to `ring/<gateway_id>` at QoS 1 and waits (10 s at most) for the
    /// broker's PUBACK. A publish the broker refuses gets none: it closes the connection,
    /// and this returns the error.
    pub async fn publish(&mut self, ring: &RingEvent) -> anyhow::Result<()> {
        self.publish_body(&ring.gateway_id, ring.to_json()).await
    }

    /// Publishes any event body of `gateway_id` (a ring, its end) to `ring/<gateway_id>`, as
    /// [`MqttGateway::publish`] does.
    pub async fn publish_body(&mut self, gateway_id: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let topic = format!("ring/{gateway_id}");
        self.client
            .publish(&topic, rumqttc::QoS::AtLeastOnce, false, body)
            .await?;
        let acked = async {
            loop {
                match self.events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(anyhow::anyhow!(
                            "MQTT publish to {topic} not acknowledged: the broker refused it or closed the connection: {e}"
                        ))
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), acked)
            .await
            .map_err(|_| anyhow::anyhow!("MQTT publish to {topic}: no PUBACK within 10s"))?
    }

    /// Says goodbye (DISCONNECT), best effort.
    pub async fn disconnect(mut self) {
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while self.events.poll().await.is_ok() {}
            })
            .await;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_table_lines_up_and_shows_rates() {
        let lines = [
            QueueLine {
                queue: "ringpush.rings".into(),
                ready: 1200,
                unacked: Some(256),
                consumers: 3,
                missing: false,
            },
            QueueLine {
                queue: "ringpush.rings.dead".into(),
                ready: 2,
                unacked: None,
                consumers: 0,
                missing: true,
            },
        ];
        let table = queue_table(&lines, Some(&[-150.0, 0.5]));
        let rows: Vec<&str> = table.lines().collect();
        assert!(
            rows[1].starts_with("ringpush.rings ")
                && rows[1].contains(" 1200 ")
                && rows[1].contains(" 256 ")
                && rows[1].ends_with("-150.0"),
            "{table}"
        );
        assert!(
            rows[2].ends_with("+0.5") && rows[2].contains("(missing)"),
            "{table}"
        );
        assert!(queue_table(&lines, None)
            .lines()
            .nth(1)
            .unwrap()
            .ends_with('-'));
        assert!(
            table.contains("RINGPUSH_MANAGEMENT_URL"),
            "says how to see unacked"
        );
    }

    #[test]
    fn a_gateway_speaks_mqtt_as_the_broker_identity_of_its_urls() {
        let amqp = "amqp://gw-a:amqp%40pw@h:5672/%2f";
        let t = mqtt_target("mqtt://127.0.0.1:1884", amqp, None).unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_str(),
                t.password.as_str()
            ),
            ("127.0.0.1", 1884, "gw-a", "amqp@pw")
        );
        let t = mqtt_target("mqtt://gw-b:x@broker", amqp, Some("from-file")).unwrap();
        assert_eq!(
            (t.port, t.user.as_str(), t.password.as_str()),
            (1883, "gw-b", "from-file")
        );
        let e = mqtt_target("mqtts://broker:8883", amqp, None).unwrap_err();
        assert!(e.to_string().contains("RINGPUSH_MQTT_URL"), "{e}");
        assert!(
            !format!("{t:?}").contains("from-file"),
            "no password in Debug"
        );
        assert_eq!(
            with_password("amqp://gw-a@h:5672/%2f", "p@ss").unwrap(),
            "amqp://gw-a:p%40ss@h:5672/%2f"
        );
        // A cluster's nodes: every one gets the password.
        assert_eq!(
            with_password("amqp://gw-a@h1:5672/%2f,amqp://gw-a:old@h2:5673/%2f", "p").unwrap(),
            "amqp://gw-a:p@h1:5672/%2f,amqp://gw-a:p@h2:5673/%2f"
        );
    }

    #[test]
    fn vhosts_come_from_the_url_path_still_percent_encoded() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "%2f");
        assert_eq!(vhost_of("amqp://h:5672/doorbell?heartbeat=10"), "doorbell");
        assert_eq!(vhost_of("amqp://h:5672"), "%2f");
        assert_eq!(vhost_of("amqp://h/prod%20eu?heartbeat=5"), "prod%20eu");
        assert_eq!(vhost_of("amqp://h/v1,amqp://h2/v1"), "v1");
        // Not ASCII: encoded by the URL parser, never sliced through a character.
        assert_eq!(vhost_of("amqp://h/é%zz"), "%C3%A9%zz");
    }
}
