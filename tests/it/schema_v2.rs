//! Schema v2 (`push_tokens.platform`, `push_tokens.kind`): every v1 row and every v1
//! registration statement keeps working; each platform's tokens are checked for their own
//! shape; the lookup, `who` and `seed` carry platform and kind.

use std::time::Duration;

use ringpush::token::{Kind, Platform};

use crate::support::TestDb;

/// A v1 schema (migrations up to V4) with v1 rows, then migrated to v2.
#[tokio::test]
async fn v1_rows_and_v1_statements_keep_working_after_the_v2_migration() {
    let db = TestDb::new().await;
    ringpush::db::migrate_to(&db.url, Some(4)).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO users DEFAULT VALUES;
             INSERT INTO gateways (id, owner_id, name) VALUES ('gw', 1, 'Door');
             INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ('aa01', 1, 'sandbox', 't');",
        )
        .await
        .unwrap();
    drop(client);
    let applied = ringpush::db::migrate(&db.url).await.unwrap();
    assert_eq!(applied.last().map(String::as_str), Some("V7__ring_claims"));
    let client = pool.get().await.unwrap();
    // The v1 registration statement, unchanged, and its upsert (a phone registering again).
    client
        .batch_execute(
            "INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ('bb02', 1, 'production', NULL);
             INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ('aa01', 1, 'sandbox', 't')
               ON CONFLICT (token) DO UPDATE SET user_id = excluded.user_id, updated_at = now();",
        )
        .await
        .unwrap();
    let rows = client
        .query(
            "SELECT token, platform, kind FROM push_tokens ORDER BY token",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("aa01".into(), "apns".into(), "alert".into()),
            ("bb02".into(), "apns".into(), "alert".into())
        ],
        "v1 rows and v1 inserts are APNs alert tokens"
    );
    // A v1 statement still cannot store what v1 refused.
    let refused = client
        .execute(
            "INSERT INTO push_tokens (token, user_id) VALUES ('ABCD', 1)",
            &[],
        )
        .await;
    assert!(refused.is_err(), "an upper-case APNs token is refused");
    drop(client);
    let found = ringpush::db::lookup(&pool, &["gw"]).await.unwrap();
    let kinds: Vec<(Platform, Kind)> = found["gw"]
        .recipients
        .iter()
        .map(|r| (r.token.platform(), r.kind))
        .collect();
    assert_eq!(
        kinds,
        [(Platform::Apns, Kind::Alert), (Platform::Apns, Kind::Alert)]
    );
}

#[tokio::test]
async fn each_platform_checks_its_own_token_shape() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute("INSERT INTO users DEFAULT VALUES")
        .await
        .unwrap();
    let insert = |token: String, platform: &'static str, kind: &'static str| {
        let client = &client;
        async move {
            client
                .execute(
                    "INSERT INTO push_tokens (token, user_id, platform, kind) VALUES ($1, 1, $2, $3)",
                    &[&token, &platform, &kind],
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let cases: Vec<(String, &str, &str, bool)> = vec![
        ("ab".repeat(100), "apns", "call", true),
        ("ab".repeat(101), "apns", "alert", false),
        ("abc".into(), "apns", "alert", false),
        ("dGVz:APA91b-x_y.Z".into(), "fcm", "alert", true),
        ("F".repeat(512), "fcm", "call", true),
        ("G".repeat(513), "fcm", "alert", false),
        ("has space".into(), "fcm", "alert", false),
        ("a/b".into(), "fcm", "alert", false),
        (String::new(), "fcm", "alert", false),
        ("cd".repeat(8), "gcm", "alert", false),
        ("cd".repeat(9), "apns", "banner", false),
    ];
    for (token, platform, kind, ok) in cases {
        let shown = format!("{platform}/{kind} {} chars", token.len());
        let result = insert(token, platform, kind).await;
        assert_eq!(result.is_ok(), ok, "{shown}: {result:?}");
    }
}

#[tokio::test]
async fn seed_creates_phones_of_every_platform_and_kind_and_who_shows_them() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let phones = ringpush::db::Phones {
        apns_alert: 1,
        apns_call: 1,
        fcm_alert: 2,
        fcm_call: 1,
    };
    let report = ringpush::ops::seed(&pool, "gw-mixed", phones, "com.example.doorbell")
        .await
        .unwrap();
    assert!(report.contains("5 phone(s)"), "{report}");
    let found = ringpush::db::lookup(&pool, &["gw-mixed"]).await.unwrap();
    let mut kinds: Vec<(Platform, Kind, Option<String>)> = found["gw-mixed"]
        .recipients
        .iter()
        .map(|r| (r.token.platform(), r.kind, r.topic.clone()))
        .collect();
    kinds.sort();
    let topic = Some("com.example.doorbell".to_owned());
    assert_eq!(
        kinds,
        [
            (Platform::Apns, Kind::Alert, topic.clone()),
            (Platform::Apns, Kind::Call, topic),
            (Platform::Fcm, Kind::Alert, None),
            (Platform::Fcm, Kind::Alert, None),
            (Platform::Fcm, Kind::Call, None),
        ]
    );
    let who = ringpush::ops::who(&pool, "gw-mixed").await.unwrap();
    let lines: Vec<&str> = who.lines().collect();
    assert!(
        lines[1].contains("platform") && lines[1].contains("kind"),
        "{who}"
    );
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count(" fcm "), 3, "{who}");
    assert_eq!(count(" apns "), 2, "{who}");
    assert_eq!(count("com.example.doorbell.voip"), 1, "{who}");
    assert_eq!(count(" call "), 2, "{who}");
}
