//! `ringpush migrate` and the batched lookup, against a real PostgreSQL.

use std::time::Duration;

use crate::support::TestDb;

#[tokio::test]
async fn migrate_twice_is_a_no_op() {
    let db = TestDb::new().await;
    let first = ringpush::db::migrate(&db.url).await.unwrap();
    assert_eq!(
        first,
        [
            "V1__create_users",
            "V2__create_gateways",
            "V3__create_gateway_shares",
            "V4__create_push_tokens"
        ]
    );
    let second = ringpush::db::migrate(&db.url).await.unwrap();
    assert!(second.is_empty(), "second run applied {second:?}");
    // The tables are in the test's schema, not in public.
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let client = pool.get().await.unwrap();
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = ANY($2)",
            &[&db.schema, &vec!["users", "gateways", "gateway_shares", "push_tokens"]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
}

#[tokio::test]
async fn one_query_finds_every_gateway_of_a_batch_and_tells_empty_from_unknown() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO users DEFAULT VALUES; INSERT INTO users DEFAULT VALUES; INSERT INTO users DEFAULT VALUES;
             INSERT INTO gateways (id, owner_id, name) VALUES ('a', 1, 'A'), ('b', 2, NULL), ('c', 3, 'C');
             INSERT INTO gateway_shares (gateway_id, user_id) VALUES ('a', 2), ('a', 1), ('b', 1);
             INSERT INTO push_tokens (token, user_id, environment, topic) VALUES
               ('aa01', 1, 'production', 't'), ('aa02', 2, 'sandbox', NULL);",
        )
        .await
        .unwrap();
    drop(client);
    let found = ringpush::db::lookup(&pool, &["a", "b", "c", "zz"])
        .await
        .unwrap();
    let tokens = |g: &str| {
        found[g]
            .recipients
            .iter()
            .map(|r| r.token.as_hex().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(tokens("a"), ["aa01", "aa02"]);
    assert_eq!(tokens("b"), ["aa01", "aa02"]);
    assert!(
        tokens("c").is_empty(),
        "a gateway without phones is found, with no recipients"
    );
    assert!(!found.contains_key("zz"), "an unknown gateway is absent");
    assert_eq!(
        found["b"].name, "b",
        "a gateway without a name is shown by its id"
    );
    assert_eq!(found["a"].recipients[1].topic, None);
    assert_eq!(
        found["a"].recipients[1].environment,
        ringpush::apns::Environment::Sandbox
    );
}

#[tokio::test]
async fn a_bad_database_url_is_refused_with_the_variable_name() {
    let err = ringpush::db::pool("mysql://nope", 1, Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("RINGPUSH_DATABASE_URL"), "{err}");
}
