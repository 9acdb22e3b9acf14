//! The provider seam, proved from outside the crate: a push service defined here — a
//! "pigeon" post that takes any token but those it knows dead — is registered beside APNs and
//! rings phones through the real worker, broker, database, ledger, feedback and purge, with
//! no change to ringpush's code. Adding a provider is this file's `impl Provider` and one
//! registration (docs/providers.md).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringpush::db::Recipient;
use ringpush::provider::guard::Scope;
use ringpush::provider::{
    Answer, Message, PrepareError, Prepared, Probing, Provider, Providers, Ring, Sending,
};
use ringpush::token::{DeviceToken, Environment, Kind, Platform};
use ringpush::worker::Counters;
use time::OffsetDateTime;

use crate::support::{nothing_waiting_or_dead, App, TOPIC};

/// A provider of our own: records what it was asked to send; answers "dead" for the tokens
/// it was told are dead.
#[derive(Debug, Default)]
struct Pigeon {
    sent: Mutex<Vec<(String, String, String)>>,
    dead: Mutex<Vec<String>>,
}

fn pigeon() -> Platform {
    Platform::named("pigeon").unwrap()
}

impl Provider for Pigeon {
    fn platform(&self) -> Platform {
        pigeon()
    }

    fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError> {
        // One message per ring and kind, shared by its tokens.
        Ok(Arc::new(format!(
            "{} rang at {} ({})",
            ring.gateway_name,
            ring.event.gateway_id,
            kind.as_str()
        )))
    }

    fn send<'a>(
        &'a self,
        ring: &'a Prepared,
        message: &'a Message,
        to: &'a Recipient,
    ) -> Sending<'a> {
        Box::pin(async move {
            let text: &String = message.downcast_ref().unwrap();
            let token = to.token.as_str().to_owned();
            if self.dead.lock().unwrap().contains(&token) {
                let now = OffsetDateTime::now_utc();
                return Answer::Dead {
                    reason: "NoSuchLoft".into(),
                    since: now,
                    observed_at: now,
                    mistake: None,
                };
            }
            self.sent
                .lock()
                .unwrap()
                .push((ring.event_id().to_owned(), token, text.clone()));
            Answer::Accepted
        })
    }

    fn scope(&self, _ring: &Prepared, _to: &Recipient) -> Scope {
        Scope::new(pigeon(), "loft")
    }

    fn probe(&self, _environment: Environment) -> Probing<'_> {
        Box::pin(async { Ok(()) })
    }
}

async fn add_pigeon_token(app: &App, user: i64, kind: &str) -> DeviceToken {
    let token = format!("loft/{}", ringpush::token::random_hex(8));
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO push_tokens (token, user_id, platform, kind) VALUES ($1, $2, 'pigeon', $3)",
            &[&token, &user, &kind],
        )
        .await
        .unwrap();
    DeviceToken::parse_for(pigeon(), &token).unwrap()
}

#[tokio::test]
async fn a_provider_defined_outside_the_crate_rings_phones_through_the_real_worker() {
    let mut app = App::spawn_with(|o| o.run_worker = false).await;
    let pigeons = Arc::new(Pigeon::default());
    let apns = app
        .providers
        .get(ringpush::token::AppId::DEFAULT, Platform::APNS)
        .unwrap();
    app.providers = Providers::new(vec![apns, pigeons.clone()]).unwrap();
    app.start_worker();

    let owner = app.add_user().await;
    app.add_gateway("gw-loft", owner, "Barn door").await;
    let iphone = app.add_token(owner, "production", Some(TOPIC)).await;
    let sharee = app.add_user().await;
    app.share("gw-loft", sharee).await;
    let alert = add_pigeon_token(&app, owner, "alert").await;
    let call = add_pigeon_token(&app, sharee, "call").await;
    let gone = add_pigeon_token(&app, sharee, "alert").await;
    app.registered_at(&gone, OffsetDateTime::now_utc() - time::Duration::days(30))
        .await;
    pigeons.dead.lock().unwrap().push(gone.as_str().to_owned());

    let ring = App::ring("gw-loft", Duration::ZERO);
    app.publish(&ring).await;
    app.wait_for("the dead pigeon token purged", || {
        ringpush::purge::Counters::get(&app.purge_counters.purged) == 1
    })
    .await;

    // Each pigeon token got the ring once, with its kind's message prepared once.
    let mut sent = pigeons.sent.lock().unwrap().clone();
    sent.sort();
    let mut want = vec![
        (
            ring.event_id.clone(),
            alert.as_str().to_owned(),
            "Barn door rang at gw-loft (alert)".to_owned(),
        ),
        (
            ring.event_id.clone(),
            call.as_str().to_owned(),
            "Barn door rang at gw-loft (call)".to_owned(),
        ),
    ];
    want.sort();
    assert_eq!(sent, want);
    // The iPhone beside them rang through APNs (the mock) as always.
    assert_eq!(app.unaccepted(std::slice::from_ref(&ring), &[iphone]), 0);
    // Counted per platform, fed back and purged with its platform, the others kept.
    assert_eq!(app.counters.platform(pigeon(), "accepted"), 2);
    assert_eq!(app.counters.platform(pigeon(), "rejected"), 1);
    assert_eq!(app.counters.rejected("NoSuchLoft"), 1);
    assert!(!app.token_exists(&gone).await, "the dead token purged");
    assert!(app.token_exists(&alert).await && app.token_exists(&call).await);
    assert_eq!(Counters::get(&app.counters.rings_delivered), 1);
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}
