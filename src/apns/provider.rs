//! APNs as a [`crate::provider::Provider`]: a ring's payload per kind (alert; call, a VoIP
//! push to `<topic>.voip`), one request per token over HTTP/2 or the legacy binary
//! interface, and what each APNs answer means — a dead token (with the setting to check when
//! the answer says the token was never valid here: `BadDeviceToken`, `DeviceTokenNotForTopic`,
//! binary status 8), a retry, a rejection of our credentials or topic, or APNs unreachable,
//! which may hold a ring (consumption paused, APNs probed) when APNs is the only provider.

use bytes::Bytes;
use time::OffsetDateTime;

use super::request::{
    build_call_payload, build_followup_payload, build_payload, voip_topic, Notification, PushType,
};
use super::{Apns, Reason, SendError};
use crate::db::Recipient;
use crate::provider::guard::Scope;
use crate::provider::{
    self, Answer, Message, PrepareError, Prepared, Probing, Ring, Sending, Skip, Stat,
};
use crate::token::{Environment, Kind, Platform};

/// APNs, registered with the worker's providers.
#[derive(Debug, Clone)]
pub struct Provider {
    client: Apns,
    /// The app's topic (bundle id), for tokens whose row names none.
    topic: Option<String>,
}

impl Provider {
    pub fn new(client: impl Into<Apns>) -> Self {
        Self {
            client: client.into(),
            topic: None,
        }
    }

    /// With the app's topic: what its tokens whose row names none are sent under (else the
    /// worker's `RINGPUSH_APNS_TOPIC`).
    pub fn with_topic(mut self, topic: Option<String>) -> Self {
        self.topic = topic;
        self
    }

    /// The client it sends through.
    pub fn client(&self) -> &Apns {
        &self.client
    }
}

impl provider::Provider for Provider {
    fn platform(&self) -> Platform {
        Platform::APNS
    }

    fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError> {
        let payload = match (kind, ring.ending) {
            (Kind::Alert, Some(ending)) => {
                build_followup_payload(ring.event, ring.gateway_name, ending)?
            }
            (Kind::Alert, None) => {
                build_payload(ring.event, ring.gateway_name, ring.messages.alert)?
            }
            (Kind::Call, _) => build_call_payload(ring.event, ring.gateway_name)?,
        };
        Ok(std::sync::Arc::new(payload))
    }

    /// An alert token gets its follow-up over HTTP/2; a VoIP token never (Apple requires
    /// every VoIP push to report a new incoming call: the app ends its CallKit call from its
    /// own signalling); the legacy binary interface sends none.
    fn follow_up(&self, kind: Kind) -> Result<(), &'static str> {
        match (&self.client, kind) {
            (Apns::Binary(_), _) => Err("unsupported"),
            (_, Kind::Call) => Err("skipped_voip"),
            (_, Kind::Alert) => Ok(()),
        }
    }

    fn send<'a>(
        &'a self,
        ring: &'a Prepared,
        message: &'a Message,
        to: &'a Recipient,
    ) -> Sending<'a> {
        Box::pin(async move {
            if to.kind == Kind::Call && matches!(self.client, Apns::Binary(_)) {
                return Answer::Skipped(Skip::Unsupported(Platform::APNS));
            }
            let Some(topic) = self.topic(ring, to) else {
                let reason = Reason::MissingTopic.to_string();
                return Answer::Rejected { reason, ours: true };
            };
            let payload: &Bytes = message.downcast_ref().expect("APNs prepared it");
            let n = Notification {
                token: to.token.clone(),
                push_type: match to.kind {
                    Kind::Alert => PushType::Alert,
                    Kind::Call => PushType::Voip,
                },
                topic,
                collapse_id: ring.event_id().to_owned(),
                expiration: ring.expiration(),
                payload: payload.clone(),
            };
            answer_of(self.client.send(to.environment, &n).await)
        })
    }

    /// Its row's topic, else its app's, else the worker's default; `.voip` for a call.
    fn topic(&self, ring: &Prepared, to: &Recipient) -> Option<String> {
        let topic = to
            .topic
            .as_deref()
            .or(self.topic.as_deref())
            .or(ring.default_topic())?;
        Some(match to.kind {
            Kind::Alert => topic.to_owned(),
            Kind::Call => voip_topic(topic),
        })
    }

    fn scope(&self, ring: &Prepared, to: &Recipient) -> Scope {
        let topic = self.topic(ring, to);
        let topic = topic.as_deref().unwrap_or("(no topic)");
        Scope::new(
            Platform::APNS,
            format!("{} {topic}", to.environment.as_str()),
        )
    }

    fn holds(&self) -> bool {
        true
    }

    fn up(&self) -> bool {
        self.client.up()
    }

    fn down(&self) -> String {
        "APNs unreachable; iPhone tokens wait on the retry path".into()
    }

    fn probe(&self, environment: Environment) -> Probing<'_> {
        Box::pin(async move {
            self.client
                .probe(environment)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn stats(&self) -> Vec<Stat> {
        vec![
            Stat::gauge(
                "apns_connections",
                "Open HTTP/2 connections to APNs, per app.",
                self.client.connections_open(),
            ),
            Stat::gauge(
                "apns_streams_in_flight",
                "APNs requests awaiting their answer, per app.",
                self.client.in_flight(),
            ),
        ]
    }
}

/// APNs alone: a worker's providers when only APNs is configured (tests, tools).
impl From<Apns> for crate::provider::Providers {
    fn from(apns: Apns) -> Self {
        crate::provider::Providers::new(vec![std::sync::Arc::new(Provider::new(apns))])
            .expect("one provider")
    }
}

impl From<super::http2::Client> for crate::provider::Providers {
    fn from(c: super::http2::Client) -> Self {
        Apns::from(c).into()
    }
}

impl From<super::binary::Client> for crate::provider::Providers {
    fn from(c: super::binary::Client) -> Self {
        Apns::from(c).into()
    }
}

/// What an APNs answer means, in the provider-neutral [`Answer`] (the worker logs it, with
/// the ring it belongs to).
fn answer_of(result: Result<super::Answer, SendError>) -> Answer {
    let rejection = match result {
        Ok(super::Answer::Accepted) => return Answer::Accepted,
        Ok(super::Answer::Rejected(rejection)) => rejection,
        Err(e) if e.is_unreachable() => {
            return Answer::Unreachable {
                error: e.to_string(),
                holds: true,
            }
        }
        Err(e) => {
            return Answer::Retry {
                error: e.to_string(),
                answered: false,
                after: None,
            }
        }
    };
    let (reason, status) = (&rejection.reason, rejection.status);
    if reason.is_retryable() {
        return Answer::Retry {
            error: format!("APNs {status} {reason}"),
            answered: true,
            after: None,
        };
    }
    if reason.is_token_invalid() {
        let now = OffsetDateTime::now_utc();
        let since = rejection
            .timestamp_ms
            .and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok())
            .and_then(crate::wire::time::in_range)
            .unwrap_or(now);
        return Answer::Dead {
            reason: reason.to_string(),
            // Never later than the answer: a purge request's `invalid_since` in the future
            // is refused by the purger.
            since: since.min(now),
            observed_at: now,
            mistake: mistake(reason),
        };
    }
    Answer::Rejected {
        reason: format!("{reason}"),
        ours: reason.is_provider_error(),
    }
}

/// The setting to check when APNs says of every token that it was never valid here.
fn mistake(reason: &Reason) -> Option<&'static str> {
    match reason {
        Reason::BadDeviceToken => Some("check RINGPUSH_APNS_PRODUCTION_URL and RINGPUSH_APNS_SANDBOX_URL (production and sandbox swapped?) and the tokens' environment"),
        Reason::DeviceTokenNotForTopic => Some("check RINGPUSH_APNS_TOPIC or the app folder's apns.topic (or the rows' topic), and that the APNs key or certificate is of the app's team"),
        Reason::InvalidToken => Some("check RINGPUSH_APNS_BINARY_ADDR (production and sandbox swapped?) and the tokens' environment"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{AlertTemplate, Messages, Provider as _, Providers};
    use crate::token::DeviceToken;
    use std::time::Duration;

    fn recipient(token: DeviceToken, kind: Kind, topic: Option<&str>) -> Recipient {
        Recipient {
            token,
            kind,
            environment: Environment::Production,
            topic: topic.map(str::to_owned),
            app: crate::token::AppId::DEFAULT,
        }
    }

    fn ring() -> crate::wire::ring::RingEvent {
        crate::wire::ring::RingEvent {
            event_id: "ev-1".into(),
            gateway_id: "gw-1".into(),
            pressed_at: time::macros::datetime!(2026-11-28 09:15:02.120 UTC),
            switch_id: None,
        }
    }

    #[test]
    fn a_call_goes_to_the_voip_topic_with_the_call_payload() {
        let endpoint = super::super::request::Endpoint::parse("https://localhost").unwrap();
        let tls = crate::tls::client_config(None, None).unwrap();
        let client = super::super::http2::Client::new(
            super::super::http2::Settings::new(endpoint.clone(), endpoint),
            tls,
            None,
        );
        let apns = Provider::new(client);
        let providers = Providers::new(vec![std::sync::Arc::new(apns.clone())]).unwrap();
        let alert = AlertTemplate::default();
        let messages = Messages {
            alert: &alert,
            default_topic: Some("com.example.doorbell"),
            ring_ttl: Duration::from_secs(60),
        };
        let token = || DeviceToken::parse("ab01").unwrap();
        let cases = [
            (
                recipient(token(), Kind::Alert, None),
                "com.example.doorbell",
            ),
            (
                recipient(token(), Kind::Call, None),
                "com.example.doorbell.voip",
            ),
            (recipient(token(), Kind::Call, Some("a.b.voip")), "a.b.voip"),
            (recipient(token(), Kind::Alert, Some("a.b")), "a.b"),
        ];
        let all: Vec<&Recipient> = cases.iter().map(|(r, _)| r).collect();
        let prepared = providers
            .prepare(&ring(), "Door", &all, &messages, None)
            .unwrap();
        for (r, want) in &cases {
            assert_eq!(apns.topic(&prepared, r).as_deref(), Some(*want), "{r:?}");
            assert_eq!(providers.topic(&prepared, r).as_deref(), Some(*want));
        }
        assert_eq!(
            apns.scope(&prepared, &cases[1].0),
            Scope::new(Platform::APNS, "production com.example.doorbell.voip")
        );
        assert_eq!(prepared.expiration(), ring().expires_at(messages.ring_ttl));
        let ring = Ring {
            event: &ring(),
            gateway_name: "Door",
            messages: &messages,
            ending: None,
        };
        let call = apns.prepare(&ring, Kind::Call).unwrap();
        let call: serde_json::Value =
            serde_json::from_slice(call.downcast_ref::<Bytes>().unwrap()).unwrap();
        assert_eq!(call["gateway_name"], "Door");
        assert_eq!(call["aps"], serde_json::json!({}));
    }
}
