//! Building APNs requests, apart from sending them (docs/design.md "Notifications").
//!
//! The payload of a ring is built once and shared by every token it goes to; the request
//! for one token is then a handful of headers around that shared body.

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_TYPE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Method, Request, Uri};

use crate::token::DeviceToken;
use crate::wire::ring::RingEvent;

/// APNs's payload limit for alert notifications, in bytes.
pub(crate) const MAX_PAYLOAD_BYTES: usize = 4096;

/// The alert text of a ring (the provider-neutral template every provider builds from).
pub use crate::provider::AlertTemplate;

/// Why a ring cannot become a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PayloadError {
    #[error("the notification payload would be {0} bytes, over APNs's {MAX_PAYLOAD_BYTES}")]
    TooLarge(usize),
}

/// The payload's shape, borrowed from the ring: serialised straight to bytes, without an
/// intermediate `serde_json::Value` (a map and a string per field, per ring).
#[derive(serde::Serialize)]
struct Payload<'a> {
    aps: Aps<'a>,
    event_id: &'a str,
    gateway_id: &'a str,
    pressed_at: &'a str,
}

#[derive(serde::Serialize)]
struct Aps<'a> {
    alert: Alert<'a>,
    sound: &'a str,
    #[serde(rename = "interruption-level")]
    interruption_level: &'a str,
    #[serde(rename = "thread-id")]
    thread_id: &'a str,
}

#[derive(serde::Serialize)]
struct Alert<'a> {
    title: &'a str,
    body: &'a str,
}

/// A call-style ring's payload: `aps` empty (a VoIP push shows nothing by itself; the app
/// reports the call to CallKit at once) and the ring's fields with the gateway's name.
#[derive(serde::Serialize)]
struct CallPayload<'a> {
    aps: Empty,
    event_id: &'a str,
    gateway_id: &'a str,
    gateway_name: &'a str,
    pressed_at: &'a str,
}

#[derive(serde::Serialize)]
struct Empty {}

/// What kind of push a request is (`apns-push-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PushType {
    /// A banner with a sound, to the app's topic.
    #[default]
    Alert,
    /// A PushKit VoIP push (a call-style ring), to the app's `<topic>.voip`.
    Voip,
}

impl PushType {
    pub fn as_str(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Voip => "voip",
        }
    }
}

/// The topic a VoIP push goes to: `<topic>.voip`, unless the row's topic already ends so.
pub(crate) fn voip_topic(topic: &str) -> String {
    if topic.ends_with(".voip") {
        topic.to_owned()
    } else {
        format!("{topic}.voip")
    }
}

/// Builds the JSON payload of a call-style ring (the same bytes for every call token).
pub(crate) fn build_call_payload(
    ring: &RingEvent,
    gateway_name: &str,
) -> Result<Bytes, PayloadError> {
    let pressed_at = ring.pressed_at_rfc3339();
    let payload = CallPayload {
        aps: Empty {},
        event_id: &ring.event_id,
        gateway_id: &ring.gateway_id,
        gateway_name,
        pressed_at: &pressed_at,
    };
    let mut bytes = Vec::with_capacity(192);
    serde_json::to_writer(&mut bytes, &payload).expect("strings serialise");
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge(bytes.len()));
    }
    Ok(Bytes::from(bytes))
}

/// Builds the JSON payload of a ring (the same bytes for every token).
pub(crate) fn build_payload(
    ring: &RingEvent,
    gateway_name: &str,
    alert: &AlertTemplate,
) -> Result<Bytes, PayloadError> {
    let (title, body) = (
        alert.title.replace("{gateway}", gateway_name),
        alert.body.replace("{gateway}", gateway_name),
    );
    let pressed_at = ring.pressed_at_rfc3339();
    let payload = Payload {
        aps: Aps {
            alert: Alert {
                title: &title,
                body: &body,
            },
            sound: &alert.sound,
            interruption_level: "time-sensitive",
            thread_id: &ring.gateway_id,
        },
        event_id: &ring.event_id,
        gateway_id: &ring.gateway_id,
        pressed_at: &pressed_at,
    };
    let mut bytes = Vec::with_capacity(256);
    serde_json::to_writer(&mut bytes, &payload).expect("strings serialise");
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge(bytes.len()));
    }
    Ok(Bytes::from(bytes))
}

/// Builds the JSON payload of a ring's follow-up to its alert tokens (the same bytes for
/// each): the gateway's name and how the ring ended, `passive` and without a sound — it
/// replaces the ringing banner (same `apns-collapse-id`) without ringing again.
pub(crate) fn build_followup_payload(
    ring: &RingEvent,
    gateway_name: &str,
    ending: &crate::provider::Ending,
) -> Result<Bytes, PayloadError> {
    let payload = serde_json::json!({
        "aps": {
            "alert": {"title": gateway_name, "body": ending.text},
            "interruption-level": "passive",
            "thread-id": ring.gateway_id,
        },
        "event_id": ring.event_id,
        "gateway_id": ring.gateway_id,
        "state": ending.state.as_str(),
        "pressed_at": ring.pressed_at_rfc3339(),
        "ended_at": ending.ended_at_rfc3339(),
    });
    let bytes = serde_json::to_vec(&payload).expect("a JSON value serialises");
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(PayloadError::TooLarge(bytes.len()));
    }
    Ok(Bytes::from(bytes))
}

/// One notification to one token: everything a request needs.
#[derive(Debug, Clone)]
pub struct Notification {
    pub token: DeviceToken,
    /// `apns-push-type`: an alert, or a VoIP push (a call-style ring).
    pub push_type: PushType,
    /// `apns-topic`: the app's bundle id (`<bundle id>.voip` for a VoIP push).
    pub topic: String,
    /// `apns-collapse-id`: the ring's `event_id`.
    pub collapse_id: String,
    /// `apns-expiration`: Unix seconds after which APNs stops trying.
    pub expiration: i64,
    /// The ring's payload, shared by all its tokens.
    pub payload: Bytes,
}

/// Where requests go: scheme and authority of an APNs base URL.
pub use crate::http2::Endpoint;

const PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
const EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");

/// The `authorization` value for a provider token: built once per token, shared by every
/// request (a clone is a reference count).
pub fn bearer(jwt: &str) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(format!("bearer {jwt}")))
        .expect("a JWT is base64url and dots")
}

/// Builds the HTTP/2 request (headers only; the body is `n.payload`). It runs once per
/// notification, so it parses nothing it can avoid: the header names are constants, the
/// authority is the endpoint's, the bearer value is shared.
pub(crate) fn build_request(
    endpoint: &Endpoint,
    n: &Notification,
    bearer: Option<&HeaderValue>,
) -> Request<()> {
    let mut path = String::with_capacity(10 + n.token.as_hex().len());
    path.push_str("/3/device/");
    path.push_str(n.token.as_hex());
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(endpoint.authority.clone());
    uri.path_and_query =
        Some(PathAndQuery::from_maybe_shared(Bytes::from(path)).expect("hex is a valid path"));
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path");
    let h = req.headers_mut();
    h.reserve(7);
    h.insert(PUSH_TYPE, HeaderValue::from_static(n.push_type.as_str()));
    h.insert(PRIORITY, HeaderValue::from_static("10"));
    h.insert(TOPIC, header_value(&n.topic));
    h.insert(COLLAPSE_ID, header_value(&n.collapse_id));
    h.insert(EXPIRATION, HeaderValue::from(n.expiration));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(bearer) = bearer {
        h.insert(http::header::AUTHORIZATION, bearer.clone());
    }
    req
}

/// A topic or collapse id as a header value (they come from the database and from ring
/// events, which are checked for printable ASCII; anything else is sent empty, and APNs
/// answers with the reason).
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn ring() -> RingEvent {
        RingEvent {
            event_id: "5f0c1e2d".into(),
            gateway_id: "gw-042".into(),
            pressed_at: datetime!(2026-11-28 09:15:02.120 UTC),
            switch_id: Some("front".into()),
        }
    }

    #[test]
    fn the_payload_carries_alert_sound_level_thread_and_the_ring() {
        let payload = build_payload(&ring(), "Front door", &AlertTemplate::default()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "aps": {
                    "alert": {"title": "Front door", "body": "Someone is at the door"},
                    "sound": "default",
                    "interruption-level": "time-sensitive",
                    "thread-id": "gw-042",
                },
                "event_id": "5f0c1e2d",
                "gateway_id": "gw-042",
                "pressed_at": "2026-11-28T09:15:02.12Z",
            })
        );
    }

    #[test]
    fn a_payload_over_4096_bytes_is_refused() {
        let alert = AlertTemplate {
            body: "x".repeat(4000),
            ..AlertTemplate::default()
        };
        let name = "n".repeat(200);
        assert!(
            matches!(build_payload(&ring(), &name, &alert), Err(PayloadError::TooLarge(n)) if n > 4096)
        );
    }

    #[test]
    fn the_request_has_the_path_and_headers_design_names() {
        let endpoint = Endpoint::parse("https://api.push.apple.com").unwrap();
        let token = DeviceToken::parse(&"ab".repeat(32)).unwrap();
        let n = Notification {
            token,
            push_type: PushType::Alert,
            topic: "com.example.doorbell".into(),
            collapse_id: "5f0c1e2d".into(),
            expiration: 1_795_857_362,
            payload: Bytes::from_static(b"{}"),
        };
        let req = build_request(&endpoint, &n, Some(&bearer("eyJ.a.b")));
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().to_string(),
            format!(
                "https://api.push.apple.com:443/3/device/{}",
                "ab".repeat(32)
            )
        );
        let h = req.headers();
        let cases = [
            ("apns-push-type", "alert"),
            ("apns-priority", "10"),
            ("apns-topic", "com.example.doorbell"),
            ("apns-collapse-id", "5f0c1e2d"),
            ("apns-expiration", "1795857362"),
            ("authorization", "bearer eyJ.a.b"),
        ];
        for (name, value) in cases {
            assert_eq!(h.get(name).unwrap(), value, "{name}");
        }
        assert!(build_request(&endpoint, &n, None)
            .headers()
            .get("authorization")
            .is_none());
    }

    #[test]
    fn a_call_is_a_voip_push_to_the_voip_topic_with_the_ring_and_an_empty_aps() {
        let payload = build_call_payload(&ring(), "Front door").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "aps": {},
                "event_id": "5f0c1e2d",
                "gateway_id": "gw-042",
                "gateway_name": "Front door",
                "pressed_at": "2026-11-28T09:15:02.12Z",
            })
        );
        assert_eq!(
            voip_topic("com.example.doorbell"),
            "com.example.doorbell.voip"
        );
        assert_eq!(
            voip_topic("com.example.doorbell.voip"),
            "com.example.doorbell.voip"
        );
        let endpoint = Endpoint::parse("https://api.push.apple.com").unwrap();
        let n = Notification {
            token: DeviceToken::parse(&"cd".repeat(32)).unwrap(),
            push_type: PushType::Voip,
            topic: voip_topic("com.example.doorbell"),
            collapse_id: "5f0c1e2d".into(),
            expiration: 1_795_857_362,
            payload,
        };
        let req = build_request(&endpoint, &n, None);
        let h = req.headers();
        assert_eq!(h["apns-push-type"], "voip");
        assert_eq!(h["apns-topic"], "com.example.doorbell.voip");
        assert_eq!(h["apns-priority"], "10");
    }

    #[test]
    fn endpoints_parse_as_the_table_says() {
        let cases = [
            (
                "https://api.push.apple.com",
                Ok(("api.push.apple.com", 443)),
            ),
            ("https://localhost:8443/", Ok(("localhost", 8443))),
            ("https://[::1]:2197", Ok(("::1", 2197))),
            ("http://api.push.apple.com", Err(())),
            ("https://host/path", Err(())),
            ("not a url", Err(())),
        ];
        for (url, want) in cases {
            let got = Endpoint::parse(url)
                .map(|e| (e.host, e.port))
                .map_err(|_| ());
            assert_eq!(got, want.map(|(h, p)| (h.to_owned(), p)), "{url}");
        }
    }
}
