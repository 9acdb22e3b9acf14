//! `ringpush demo`, run as the command runs it (README's first command), over HTTP/2 and over
//! the legacy binary interface: its story holds (the front door answered by Bob, the garage
//! missed, a second press folded in, stale tokens purged), and at the gateway users of three
//! apps share, each phone got its ring — and the ring's follow-up — under its own app's
//! credentials as APNs and FCM received them, a brand's key rotated in between without a
//! restart.

use std::collections::BTreeMap;

use ringpush::demo::{self, Carried, Report, SharedPush};
use tokio_util::sync::CancellationToken;

use crate::support::{amqp_url, database_url};

/// Per app: its topic, its team key and its Firebase project, as the demo writes its folder.
const APPS: [(&str, &str, &str, &str, &str); 3] = [
    (
        "default",
        "com.example.doorbell",
        "DEMOKEY123",
        "DEMOTEAM12",
        "example-doorbell",
    ),
    (
        "acme",
        "com.acme.doorbell",
        "ACMEKEY001",
        "ACMETEAM01",
        "acme-doorbell",
    ),
    (
        "globex",
        "com.globex.ring",
        "GLOBEXKEY1",
        "GLOBEXTEAM",
        "globex-ring",
    ),
];

async fn run(binary: bool) -> Report {
    let settings = demo::Settings {
        amqp_url: amqp_url().into(),
        database_url: database_url(),
        binary,
    };
    demo::run(&settings, CancellationToken::new())
        .await
        .expect("the demo runs")
}

/// The story the demo told before it had brands.
fn assert_story(report: &Report) {
    assert_eq!(report.rings_delivered, 3, "front door, garage, shop");
    assert_eq!(report.rings_debounced, 1);
    assert_eq!(report.rings_expired, 1);
    assert_eq!(report.rings_unknown_gateway, 1);
    assert_eq!(report.rings_dead_lettered, 1);
    let ends: Vec<(&str, &str)> = report.ends.iter().map(|(d, h)| (*d, h.as_str())).collect();
    assert_eq!(ends[0], ("Front door", "answered by Bob"));
    assert!(ends[1].1.starts_with("missed"), "{ends:?}");
    assert_eq!(ends[2], ("Shop", "answered by Erin"));
    assert_eq!(report.feedback_events, 2);
    assert_eq!(report.tokens_purged, 2);
    assert_eq!(report.stale_tokens_left, 0);
}

/// The shared gateway's pushes per (person, phone): what each carried, in order.
fn per_phone(report: &Report) -> BTreeMap<(String, String), Vec<&SharedPush>> {
    let mut phones: BTreeMap<(String, String), Vec<&SharedPush>> = BTreeMap::new();
    for p in &report.shared {
        let key = (p.who.clone(), p.phone.clone());
        phones.entry(key).or_default().push(p);
    }
    phones
}

fn app(id: &str) -> (&str, &str, &str, &str, &str) {
    *APPS.iter().find(|a| a.0 == id).expect("an app of the demo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_rings_each_brands_phones_with_its_own_credentials_and_rotates_a_key() {
    let report = run(false).await;
    assert_story(&report);
    let phones = per_phone(&report);
    let expected = [
        ("bob", "iPhone alert", "default"),
        ("erin", "iPhone alert", "acme"),
        ("erin", "Android alert", "acme"),
        ("frank", "iPhone alert", "globex"),
        ("frank", "Android alert", "globex"),
    ];
    assert_eq!(phones.len(), expected.len(), "{:#?}", report.shared);
    let mut accounts = BTreeMap::new();
    for (who, phone, app_id) in expected {
        let pushes = &phones[&(who.to_owned(), phone.to_owned())];
        let what: Vec<&str> = pushes.iter().map(|p| p.push.as_str()).collect();
        assert_eq!(what, ["ring", "answered"], "{who}'s {phone}");
        let (_, topic, key_id, team_id, project) = app(app_id);
        for p in pushes {
            assert_eq!(p.app, app_id, "{who}'s {phone}");
            match &p.carried {
                Carried::Jwt {
                    topic: t,
                    key_id: k,
                    team_id: team,
                } => {
                    assert_eq!((t.as_str(), team.as_str()), (topic, team_id), "{p:?}");
                    // acme's key is rotated between the ring and its answer.
                    let key = match (app_id, p.push.as_str()) {
                        ("acme", "answered") => "ACMEKEY002",
                        _ => key_id,
                    };
                    assert_eq!(k, key, "{p:?}");
                }
                Carried::Fcm {
                    project: pr,
                    account,
                } => {
                    assert_eq!(pr, project, "{p:?}");
                    assert!(
                        account.ends_with(&format!("@{project}.iam.gserviceaccount.com")),
                        "{p:?}"
                    );
                    // One account per app, the same for its ring and its follow-up.
                    let first = accounts.entry(app_id).or_insert(account.clone());
                    assert_eq!(first, account, "{p:?}");
                }
                Carried::Certificate { .. } => panic!("HTTP/2 apps use token auth: {p:?}"),
            }
        }
    }
    assert_eq!(accounts.len(), 2, "each brand its own service account");
    let rotation = report.rotation.as_ref().expect("a key rotated");
    assert_eq!(
        (
            rotation.app.as_str(),
            rotation.from.as_str(),
            rotation.to.as_str()
        ),
        ("acme", "ACMEKEY001", "ACMEKEY002")
    );
    let printed = report.to_string();
    assert!(
        printed.contains("one gateway, 3 apps: the Shop's ring"),
        "{printed}"
    );
    assert!(printed.contains("ACMEKEY001 → ACMEKEY002"), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_binary_interface_each_apps_iphones_ring_over_its_own_certificate() {
    let report = run(true).await;
    assert_story(&report);
    assert!(
        report.rotation.is_none(),
        "certificates have no key to rotate"
    );
    let phones = per_phone(&report);
    for (who, app_id) in [("bob", "default"), ("erin", "acme"), ("frank", "globex")] {
        let (_, topic, _, _, project) = app(app_id);
        // The binary interface sends no follow-ups to iPhones.
        let iphone = &phones[&(who.to_owned(), "iPhone alert".to_owned())];
        assert_eq!(iphone.len(), 1, "{iphone:?}");
        assert_eq!(iphone[0].push, "ring");
        assert_eq!(
            iphone[0].carried,
            Carried::Certificate {
                topic: topic.to_owned()
            }
        );
        if who != "bob" {
            let android = &phones[&(who.to_owned(), "Android alert".to_owned())];
            assert_eq!(android.len(), 2, "{android:?}");
            for p in android {
                assert!(
                    matches!(&p.carried, Carried::Fcm { project: pr, .. } if pr == project),
                    "{p:?}"
                );
            }
        }
    }
}
