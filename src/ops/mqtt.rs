//! A gateway speaking MQTT (`ringpush ring --mqtt`): where and as whom it connects, and its
//! QoS 1 publishes to `ring/<gateway_id>`.

use std::time::Duration;

use crate::wire::ring::RingEvent;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
