//! Schema v3 (`push_tokens.app`): every v2 row and registration statement keeps working (their
//! tokens are the app `default`'s); an app id is checked; the lookup carries each token's app.

use std::time::Duration;

use ringpush::token::AppId;

use crate::support::TestDb;

/// A v2 schema (migrations up to V9) with v2 rows, then migrated to v3.
#[tokio::test]
async fn v2_rows_and_v2_statements_keep_working_after_the_v3_migration() {
    let db = TestDb::new().await;
    ringpush::db::migrate_to(&db.url, Some(9)).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO users DEFAULT VALUES;
             INSERT INTO gateways (id, owner_id, name) VALUES ('gw', 1, 'Door');
             INSERT INTO push_tokens (token, user_id, platform, kind, environment) VALUES ('aa01', 1, 'apns', 'call', 'production');",
        )
        .await
        .unwrap();
    drop(client);
    let applied = ringpush::db::migrate(&db.url).await.unwrap();
    assert!(
        applied.iter().any(|m| m == "V10__push_tokens_app"),
        "{applied:?}"
    );
    let client = pool.get().await.unwrap();
    // The v2 registration statement, unchanged, and a v3 one naming its app.
    client
        .batch_execute(
            "INSERT INTO push_tokens (token, user_id, platform, kind, environment) VALUES ('x:fcm', 1, 'fcm', 'alert', 'production');
             INSERT INTO push_tokens (token, user_id, platform, kind, environment, topic, app) VALUES ('bb02', 1, 'apns', 'alert', 'sandbox', NULL, 'brand-a');",
        )
        .await
        .unwrap();
    for bad in ["Brand", "", "a b", &"a".repeat(65)] {
        let refused = client
            .execute(
                "INSERT INTO push_tokens (token, user_id, environment, app) VALUES ('cc03', 1, 'production', $1)",
                &[&bad],
            )
            .await;
        assert!(refused.is_err(), "app {bad:?} is refused");
    }
    drop(client);
    let found = ringpush::db::lookup(&pool, &["gw"]).await.unwrap();
    let mut apps: Vec<(String, AppId)> = found["gw"]
        .recipients
        .iter()
        .map(|r| (r.token.as_str().to_owned(), r.app))
        .collect();
    apps.sort();
    assert_eq!(
        apps,
        [
            ("aa01".to_owned(), AppId::DEFAULT),
            ("bb02".to_owned(), AppId::named("brand-a").unwrap()),
            ("x:fcm".to_owned(), AppId::DEFAULT),
        ]
    );
}
