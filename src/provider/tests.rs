//! The registry: each token through its app's provider, skipped when none, a ring prepared
//! before a reload kept on its own providers.

use super::*;
use crate::token::DeviceToken;

fn recipient(token: DeviceToken, kind: Kind) -> Recipient {
    Recipient {
        token,
        kind,
        environment: Environment::Production,
        topic: None,
        app: AppId::DEFAULT,
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

/// A provider that takes every notification and remembers the message it prepared.
#[derive(Debug)]
struct Echo;

impl Provider for Echo {
    fn platform(&self) -> Platform {
        Platform::named("echo").unwrap()
    }
    fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError> {
        Ok(Arc::new(format!(
            "{} {}",
            ring.event.event_id,
            kind.as_str()
        )))
    }
    fn send<'a>(
        &'a self,
        _ring: &'a Prepared,
        message: &'a Message,
        _to: &'a Recipient,
    ) -> Sending<'a> {
        let text = message.downcast_ref::<String>().unwrap().clone();
        Box::pin(async move {
            match text.as_str() {
                "ev-1 alert" => Answer::Accepted,
                other => Answer::Rejected {
                    reason: other.to_owned(),
                    ours: false,
                },
            }
        })
    }
    fn scope(&self, _ring: &Prepared, _to: &Recipient) -> guard::Scope {
        guard::Scope::new(self.platform(), "echo")
    }
    fn probe(&self, _environment: Environment) -> Probing<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// A provider that answers every token with its own name (as a rejection).
#[derive(Debug)]
struct Named(&'static str);

impl Provider for Named {
    fn platform(&self) -> Platform {
        Platform::named("echo").unwrap()
    }
    fn prepare(&self, _ring: &Ring<'_>, _kind: Kind) -> Result<Message, PrepareError> {
        Ok(Arc::new(()))
    }
    fn send<'a>(
        &'a self,
        _ring: &'a Prepared,
        _message: &'a Message,
        _to: &'a Recipient,
    ) -> Sending<'a> {
        let reason = self.0.to_owned();
        Box::pin(async move {
            Answer::Rejected {
                reason,
                ours: false,
            }
        })
    }
    fn scope(&self, _ring: &Prepared, _to: &Recipient) -> guard::Scope {
        guard::Scope::new(self.platform(), self.0)
    }
    fn probe(&self, _environment: Environment) -> Probing<'_> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn each_token_goes_through_its_apps_provider_and_a_ring_prepared_keeps_its_own() {
    let echo = Platform::named("echo").unwrap();
    let (a, b) = (
        AppId::named("brand-a").unwrap(),
        AppId::named("brand-b").unwrap(),
    );
    let of = |app: AppId, token: &str| Recipient {
        app,
        ..recipient(DeviceToken::parse_for(echo, token).unwrap(), Kind::Alert)
    };
    let (to_a, to_b, to_default) = (of(a, "t/a"), of(b, "t/b"), of(AppId::DEFAULT, "t/d"));
    let providers = Providers::of_apps(vec![
        (a, vec![Arc::new(Named("a1")) as Arc<dyn Provider>]),
        (b, vec![Arc::new(Named("b1"))]),
    ])
    .unwrap();
    let alert = AlertTemplate::default();
    let messages = Messages {
        alert: &alert,
        default_topic: None,
        ring_ttl: Duration::from_secs(60),
    };
    let all = [&to_a, &to_b, &to_default];
    let rejected = |answer: Answer| match answer {
        Answer::Rejected { reason, .. } => reason,
        other => format!("{other:?}"),
    };
    let before = providers
        .prepare(&ring(), "Door", &all, &messages, None)
        .unwrap();
    assert_eq!(rejected(providers.send(&before, &to_a).await), "a1");
    assert_eq!(rejected(providers.send(&before, &to_b).await), "b1");
    assert_eq!(
        providers.send(&before, &to_default).await,
        Answer::Skipped(Skip::Unconfigured(echo)),
        "an app with no provider for the platform"
    );
    assert_eq!(
        providers.scope(&before, &to_a).what,
        "app brand-a: a1",
        "one app's answers are weighed apart from another's"
    );
    // brand-a's credentials rotated, brand-b removed.
    let clone = providers.clone();
    clone.set_app(a, vec![Arc::new(Named("a2"))]).unwrap();
    clone.set_app(b, Vec::new()).unwrap();
    assert_eq!(
        rejected(providers.send(&before, &to_a).await),
        "a1",
        "a ring prepared before finishes with the providers it was prepared with"
    );
    let after = providers
        .prepare(&ring(), "Door", &all, &messages, None)
        .unwrap();
    assert_eq!(rejected(providers.send(&after, &to_a).await), "a2");
    assert_eq!(
        providers.send(&after, &to_b).await,
        Answer::Skipped(Skip::Unconfigured(echo))
    );
    assert_eq!(providers.apps(), [a]);
    assert!(clone
        .set_app(a, vec![Arc::new(Named("x")), Arc::new(Named("y"))])
        .is_err());
}

#[tokio::test]
async fn a_platform_without_a_provider_is_skipped_and_a_registered_one_sends() {
    let echo = Platform::named("echo").unwrap();
    let apns_alert = recipient(DeviceToken::parse("ab01").unwrap(), Kind::Alert);
    let fcm_call = recipient(DeviceToken::parse_fcm("x:y").unwrap(), Kind::Call);
    let echoed = recipient(DeviceToken::parse_for(echo, "e/1").unwrap(), Kind::Alert);
    let called = recipient(DeviceToken::parse_for(echo, "e/2").unwrap(), Kind::Call);
    let alert = AlertTemplate::default();
    let messages = Messages {
        alert: &alert,
        default_topic: None,
        ring_ttl: Duration::from_secs(60),
    };
    let providers = Providers::new(vec![Arc::new(Echo)]).unwrap();
    let all = [&apns_alert, &fcm_call, &echoed, &called];
    let prepared = providers
        .prepare(&ring(), "Door", &all, &messages, None)
        .unwrap();
    assert_eq!(
        providers.send(&prepared, &apns_alert).await,
        Answer::Skipped(Skip::Unconfigured(Platform::APNS))
    );
    assert_eq!(
        providers.send(&prepared, &fcm_call).await,
        Answer::Skipped(Skip::Unconfigured(Platform::FCM))
    );
    assert_eq!(providers.send(&prepared, &echoed).await, Answer::Accepted);
    assert_eq!(
        providers.send(&prepared, &called).await,
        Answer::Rejected {
            reason: "ev-1 call".into(),
            ours: false
        },
        "each kind prepared once, from the ring"
    );
    assert!(!Answer::Skipped(Skip::Unsupported(Platform::APNS)).answered());
    assert!(Providers::new(vec![Arc::new(Echo), Arc::new(Echo)]).is_err());
}
