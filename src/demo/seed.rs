//! The demo's apps, people, phones and gateways, and the rows they become: users, gateways,
//! shares and push tokens (each of its app).

use std::collections::HashMap;

use crate::token::{DeviceToken, Kind, Platform};

/// The topic (bundle id) of the app `default`'s iPhone app.
pub(super) const TOPIC: &str = "com.example.doorbell";

/// An app of the demo's deployment (a folder of its `RINGPUSH_APPS_DIR`): its APNs topic and
/// team key, its Firebase project.
pub(super) struct App {
    pub id: &'static str,
    pub topic: &'static str,
    pub key_id: &'static str,
    pub team_id: &'static str,
    pub project: &'static str,
}

/// The app `default` and two brands, each with an Apple team and a Firebase project of its
/// own.
pub(super) const APPS: [App; 3] = [
    App {
        id: "default",
        topic: TOPIC,
        key_id: "DEMOKEY123",
        team_id: "DEMOTEAM12",
        project: "example-doorbell",
    },
    App {
        id: "acme",
        topic: "com.acme.doorbell",
        key_id: "ACMEKEY001",
        team_id: "ACMETEAM01",
        project: "acme-doorbell",
    },
    App {
        id: "globex",
        topic: "com.globex.ring",
        key_id: "GLOBEXKEY1",
        team_id: "GLOBEXTEAM",
        project: "globex-ring",
    },
];

/// The app whose key the demo rotates while it runs, and the new key's id.
pub(super) const ROTATED: (&str, &str) = ("acme", "ACMEKEY002");

/// The app `id`.
pub(super) fn app(id: &str) -> &'static App {
    APPS.iter()
        .find(|a| a.id == id)
        .expect("one of the demo's apps")
}

/// The gateway shared by users of different apps.
pub(super) const SHARED_GATEWAY: (&str, &str) = ("demo-shop", "Shop");

/// A person of the seed data, the app they use (their tokens' app), their phones and what
/// they should hear.
pub(super) struct Person {
    pub name: &'static str,
    pub app: &'static str,
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
/// iPhone and an Android phone whose app was deleted — all of them with the app `default`.
/// erin has the brand acme's app on an iPhone and an Android phone, frank the brand globex's.
pub(super) fn people() -> Vec<Person> {
    use Kind::{Alert, Call};
    const APNS: Platform = Platform::APNS;
    const FCM: Platform = Platform::FCM;
    vec![
        Person {
            name: "alice",
            app: "default",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", false),
            ],
        },
        Person {
            name: "bob",
            app: "default",
            phones: vec![Phone::new(APNS, Alert, "production", false)],
        },
        Person {
            name: "carol",
            app: "default",
            phones: vec![
                Phone::new(APNS, Alert, "sandbox", false),
                Phone::new(APNS, Alert, "production", true),
                Phone::new(APNS, Call, "production", false),
            ],
        },
        Person {
            name: "dan",
            app: "default",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", true),
            ],
        },
        Person {
            name: "erin",
            app: "acme",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", false),
            ],
        },
        Person {
            name: "frank",
            app: "globex",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", false),
            ],
        },
    ]
}

/// alice owns the front door and shares it with bob and carol (and, by mistake, with
/// herself); dan owns the garage and shares it with alice; erin (acme) owns the shop and
/// shares it with frank (globex) and bob (default).
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
            // Every other iPhone registered without a topic: its app's is used.
            let apns = phone.token.platform() == Platform::APNS;
            let topic = (apns && i % 2 == 0).then_some(app(person.app).topic);
            // A phone whose app was deleted registered its token a month ago.
            let age_days = if phone.unregistered { 30.0 } else { 0.0 };
            client
                .execute(
                    "INSERT INTO push_tokens (token, user_id, environment, topic, platform, kind, app, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, now() - make_interval(days => $8::float8::int))",
                    &[
                        &phone.token.as_str(),
                        &id,
                        &phone.environment,
                        &topic,
                        &phone.token.platform().as_str(),
                        &phone.kind.as_str(),
                        &person.app,
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
        (
            SHARED_GATEWAY.0,
            SHARED_GATEWAY.1,
            "erin",
            &["frank", "bob"][..],
        ),
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
