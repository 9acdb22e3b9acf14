//! Building FCM HTTP v1 messages, apart from sending them (docs/design.md "FCM, alert" and
//! "FCM, call").
//!
//! A ring's message is built once per kind as a [`Template`]: the JSON with two holes, the
//! token and `android.ttl`, filled for each request ([`Template::render`]) — the ttl is the
//! whole seconds left of the ring when that request is sent, so a retry sends less.

use bytes::Bytes;
use serde::Serialize;

use crate::apns::request::AlertTemplate;
use crate::token::{DeviceToken, Kind};
use crate::wire::ring::RingEvent;

/// What every FCM message of a ring needs besides the ring.
#[derive(Debug, Clone, Copy)]
pub struct Style<'a> {
    /// The alert's title, body and sound (`{gateway}` becomes the gateway's name).
    pub alert: &'a AlertTemplate,
    /// The Android notification channel of alert rings (`RINGPUSH_FCM_CHANNEL`).
    pub channel: &'a str,
}

#[derive(Serialize)]
struct Envelope<'a> {
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<Notification<'a>>,
    data: Data<'a>,
    android: Android<'a>,
}

#[derive(Serialize)]
struct Notification<'a> {
    title: &'a str,
    body: &'a str,
}

#[derive(Serialize)]
struct Data<'a> {
    kind: &'a str,
    event_id: &'a str,
    gateway_id: &'a str,
    gateway_name: &'a str,
    pressed_at: &'a str,
}

#[derive(Serialize)]
struct Android<'a> {
    priority: &'a str,
    ttl: &'a str,
    collapse_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification: Option<AndroidNotification<'a>>,
}

#[derive(Serialize)]
struct AndroidNotification<'a> {
    channel_id: &'a str,
    tag: &'a str,
    sound: &'a str,
}

/// A ring's message of one kind, with holes for the token and the ttl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The JSON around the holes: before the first hole, between them, after the second.
    parts: [String; 3],
    /// Whether the token's hole comes first.
    token_first: bool,
}

impl Template {
    /// The message of `kind` for a ring of `gateway_name`: an alert has both notification
    /// objects (title and body; channel, tag = `event_id`, sound), a call neither — a data
    /// message with `data.kind = call`. Both keep `android.priority: HIGH`, the ttl and
    /// `collapse_key` = `gateway_id`.
    pub fn new(ring: &RingEvent, gateway_name: &str, kind: Kind, style: &Style<'_>) -> Self {
        let (title, body) = (
            style.alert.title.replace("{gateway}", gateway_name),
            style.alert.body.replace("{gateway}", gateway_name),
        );
        let pressed_at = ring.pressed_at_rfc3339();
        let alert = kind == Kind::Alert;
        // Where the token and the ttl go: strings with a random part, which no ring, name or
        // template can hold.
        let nonce = crate::token::random_hex(8);
        let (token_mark, ttl_mark) = (format!("token-{nonce}"), format!("ttl-{nonce}"));
        let envelope = Envelope {
            message: Message {
                token: &token_mark,
                notification: alert.then_some(Notification {
                    title: &title,
                    body: &body,
                }),
                data: Data {
                    kind: kind.as_str(),
                    event_id: &ring.event_id,
                    gateway_id: &ring.gateway_id,
                    gateway_name,
                    pressed_at: &pressed_at,
                },
                android: Android {
                    priority: "HIGH",
                    ttl: &ttl_mark,
                    collapse_key: &ring.gateway_id,
                    notification: alert.then_some(AndroidNotification {
                        channel_id: style.channel,
                        tag: &ring.event_id,
                        sound: &style.alert.sound,
                    }),
                },
            },
        };
        let json = serde_json::to_string(&envelope).expect("strings serialise");
        Self::with_holes(json, &token_mark, &ttl_mark)
    }

    /// A ring's follow-up of `kind`: for an alert, the same title (the gateway's name) with
    /// how the ring ended as the body, `tag` = the ring's `event_id` (it replaces the ringing
    /// banner) on the quiet channel without a sound; for a call, data only. Both keep
    /// `android.priority: HIGH` and `collapse_key` = `gateway_id` (a phone that was offline
    /// gets the end instead of the ring); `data.kind` is `ended`.
    pub fn followup(
        ring: &RingEvent,
        gateway_name: &str,
        kind: Kind,
        ending: &crate::provider::Ending,
        quiet_channel: &str,
    ) -> Self {
        let nonce = crate::token::random_hex(8);
        let (token_mark, ttl_mark) = (format!("token-{nonce}"), format!("ttl-{nonce}"));
        let mut android = serde_json::json!({
            "priority": "HIGH",
            "ttl": ttl_mark,
            "collapse_key": ring.gateway_id,
        });
        let mut message = serde_json::json!({
            "token": token_mark,
            "data": {
                "kind": "ended",
                "event_id": ring.event_id,
                "gateway_id": ring.gateway_id,
                "gateway_name": gateway_name,
                "state": ending.state.as_str(),
                "pressed_at": ring.pressed_at_rfc3339(),
                "ended_at": ending.ended_at_rfc3339(),
            },
        });
        if kind == Kind::Alert {
            message["notification"] =
                serde_json::json!({"title": gateway_name, "body": ending.text});
            android["notification"] =
                serde_json::json!({"channel_id": quiet_channel, "tag": ring.event_id});
        }
        message["android"] = android;
        let json = serde_json::json!({ "message": message }).to_string();
        Self::with_holes(json, &token_mark, &ttl_mark)
    }

    /// A template from the JSON of a message whose token and ttl are the strings
    /// `token_mark` and `ttl_mark` (random: no ring, name or template holds them).
    fn with_holes(json: String, token_mark: &str, ttl_mark: &str) -> Self {
        let (token_hole, ttl_hole) = (format!("\"{token_mark}\""), format!("\"{ttl_mark}\""));
        let (token_at, ttl_at) = (
            json.find(&token_hole).expect("the token's hole"),
            json.find(&ttl_hole).expect("the ttl's hole"),
        );
        let token_first = token_at < ttl_at;
        let (first, first_len, second, second_len) = if token_first {
            (token_at, token_hole.len(), ttl_at, ttl_hole.len())
        } else {
            (ttl_at, ttl_hole.len(), token_at, token_hole.len())
        };
        Self {
            parts: [
                json[..first].to_owned(),
                json[first + first_len..second].to_owned(),
                json[second + second_len..].to_owned(),
            ],
            token_first,
        }
    }

    /// The request body for `token` with `ttl_secs` left (at least 1). An FCM token holds
    /// only characters JSON takes as they are (checked when it was parsed).
    pub(crate) fn render(&self, token: &DeviceToken, ttl_secs: u64) -> Bytes {
        let token = format!("\"{}\"", token.as_str());
        let ttl = format!("\"{}s\"", ttl_secs.max(1));
        let (a, b) = if self.token_first {
            (&token, &ttl)
        } else {
            (&ttl, &token)
        };
        let [p0, p1, p2] = &self.parts;
        let mut out = String::with_capacity(p0.len() + p1.len() + p2.len() + a.len() + b.len());
        for piece in [p0.as_str(), a, p1, b, p2] {
            out.push_str(piece);
        }
        Bytes::from(out)
    }
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

    fn render(kind: Kind, ttl: u64) -> serde_json::Value {
        let alert = AlertTemplate::default();
        let style = Style {
            alert: &alert,
            channel: "doorbell",
        };
        let token = DeviceToken::parse_fcm("dGVz:APA91b-x_y.Z").unwrap();
        let body = Template::new(&ring(), "Front door", kind, &style).render(&token, ttl);
        serde_json::from_slice(&body).unwrap()
    }

    #[test]
    fn an_alert_carries_both_notifications_the_data_and_the_android_block() {
        assert_eq!(
            render(Kind::Alert, 57),
            serde_json::json!({"message": {
                "token": "dGVz:APA91b-x_y.Z",
                "notification": {"title": "Front door", "body": "Someone is at the door"},
                "data": {"kind": "alert", "event_id": "5f0c1e2d", "gateway_id": "gw-042",
                         "gateway_name": "Front door", "pressed_at": "2026-11-28T09:15:02.12Z"},
                "android": {"priority": "HIGH", "ttl": "57s", "collapse_key": "gw-042",
                            "notification": {"channel_id": "doorbell", "tag": "5f0c1e2d", "sound": "default"}}
            }})
        );
    }

    #[test]
    fn a_call_is_a_high_priority_data_message_without_notifications() {
        assert_eq!(
            render(Kind::Call, 3),
            serde_json::json!({"message": {
                "token": "dGVz:APA91b-x_y.Z",
                "data": {"kind": "call", "event_id": "5f0c1e2d", "gateway_id": "gw-042",
                         "gateway_name": "Front door", "pressed_at": "2026-11-28T09:15:02.12Z"},
                "android": {"priority": "HIGH", "ttl": "3s", "collapse_key": "gw-042"}
            }})
        );
    }

    #[test]
    fn the_ttl_is_at_least_a_second_and_names_with_quotes_stay_json() {
        assert_eq!(render(Kind::Call, 0)["message"]["android"]["ttl"], "1s");
        let alert = AlertTemplate::default();
        let style = Style {
            alert: &alert,
            channel: "door\"bell",
        };
        let token = DeviceToken::parse_fcm("t").unwrap();
        let body = Template::new(&ring(), "Bob's \"front\" door\u{1}", Kind::Alert, &style)
            .render(&token, 9);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["message"]["data"]["gateway_name"],
            "Bob's \"front\" door\u{1}"
        );
        assert_eq!(
            v["message"]["android"]["notification"]["channel_id"],
            "door\"bell"
        );
        assert_eq!(v["message"]["token"], "t");
    }
}
