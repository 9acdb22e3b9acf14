//! The demo's people, their phones and their gateways, and the rows they become: users,
//! gateways, shares and push tokens.

use std::collections::HashMap;

use crate::token::{DeviceToken, Kind, Platform};

/// The topic (bundle id) of the demo's iPhone app.
pub(super) const TOPIC: &str = "com.example.doorbell";

/// A person of the seed data, their phones and what they should hear.
pub(super) struct Person {
    pub name: &'static str,
    pub phones: Vec<Phone>,
}

/// One phone: its token (with its platform), how it rings, its APNs environment, and whether
/// its app was deleted (the mock answers Unregistered / UNREGISTERED).
pub(super) struct Phone {
    pub token: DeviceToken,
    pub kind: Kind,
    pub environment: &'static str,
    pub unregistered: bool,
}

impl Phone {
    fn new(platform: Platform, kind: Kind, environment: &'static str, unregistered: bool) -> Self {
        let token = crate::db::random_token(platform);
        Self {
            token: DeviceToken::parse_for(platform, &token).expect("a random token parses"),
            kind,
            environment,
            unregistered,
        }
    }

    /// `iPhone alert`, `Android call`, …
    pub fn label(&self) -> String {
        label(self.token.platform(), self.kind)
    }
}

/// How a phone of `platform` ringing as `kind` reads in the report.
pub(super) fn label(platform: Platform, kind: Kind) -> String {
    let phone = match platform {
        Platform::APNS => "iPhone",
        Platform::FCM => "Android",
        other => other.as_str(),
    };
    format!("{phone} {kind}")
}

/// alice has two iPhones and an Android phone; bob an iPhone; carol a development iPhone
/// (sandbox), an iPhone whose app was deleted, and an iPhone that rings as a call; dan an
/// iPhone and an Android phone whose app was deleted.
pub(super) fn people() -> Vec<Person> {
    use Kind::{Alert, Call};
    const APNS: Platform = Platform::APNS;
    const FCM: Platform = Platform::FCM;
    vec![
        Person {
            name: "alice",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", false),
            ],
        },
        Person {
            name: "bob",
            phones: vec![Phone::new(APNS, Alert, "production", false)],
        },
        Person {
            name: "carol",
            phones: vec![
                Phone::new(APNS, Alert, "sandbox", false),
                Phone::new(APNS, Alert, "production", true),
                Phone::new(APNS, Call, "production", false),
            ],
        },
        Person {
            name: "dan",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", true),
            ],
        },
    ]
}

/// alice owns the front door and shares it with bob and carol (and, by mistake, with
/// herself); dan owns the garage and shares it with alice.
pub(super) async fn seed(pool: &deadpool_postgres::Pool, people: &[Person]) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let mut ids = HashMap::new();
    for person in people {
        // The name "Answered by …" says: Alice, Bob, …
        let mut name = person.name.to_owned();
        name[..1].make_ascii_uppercase();
        let row = client
            .query_one(
                "INSERT INTO users (name) VALUES ($1) RETURNING id",
                &[&name],
            )
            .await?;
        let id: i64 = row.get(0);
        ids.insert(person.name, id);
        for (i, phone) in person.phones.iter().enumerate() {
            // Every other iPhone relies on the default topic (RINGPUSH_APNS_TOPIC).
            let apns = phone.token.platform() == Platform::APNS;
            let topic = (apns && i % 2 == 0).then_some(TOPIC);
            // A phone whose app was deleted registered its token a month ago.
            let age_days = if phone.unregistered { 30.0 } else { 0.0 };
            client
                .execute(
                    "INSERT INTO push_tokens (token, user_id, environment, topic, platform, kind, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, now() - make_interval(days => $7::float8::int))",
                    &[
                        &phone.token.as_str(),
                        &id,
                        &phone.environment,
                        &topic,
                        &phone.token.platform().as_str(),
                        &phone.kind.as_str(),
                        &age_days,
                    ],
                )
                .await?;
        }
    }
    let gateways = [
        (
            "demo-front",
            "Front door",
            "alice",
            &["bob", "carol", "alice"][..],
        ),
        ("demo-garage", "Garage", "dan", &["alice"][..]),
    ];
    for (gw, name, owner, sharees) in gateways {
        client
            .execute(
                "INSERT INTO gateways (id, owner_id, name) VALUES ($1, $2, $3)",
                &[&gw, &ids[owner], &name],
            )
            .await?;
        for s in sharees {
            client
                .execute(
                    "INSERT INTO gateway_shares (gateway_id, user_id) VALUES ($1, $2)",
                    &[&gw, &ids[s]],
                )
                .await?;
        }
    }
    Ok(())
}
