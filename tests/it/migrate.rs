//! `ringpush migrate`, the batched lookup and the schemas of the demo and the tests, against a
//! real PostgreSQL.

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
            "V4__create_push_tokens",
            "V5__ring_ledger",
            "V6__push_tokens_platform_kind",
            "V7__ring_claims",
            "V8__push_tokens_any_provider",
            "V9__ring_life",
            "V10__push_tokens_app"
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
        ringpush::token::Environment::Sandbox
    );
}

#[tokio::test]
async fn a_bad_database_url_is_refused_with_the_variable_name() {
    // The library says what is wrong; the command line names the variable, once.
    let err = ringpush::db::pool("mysql://nope", 1, Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().starts_with("not a PostgreSQL URL"), "{err}");
    let args: Vec<std::ffi::OsString> =
        ["ringpush", "who", "gw-1", "--database-url", "mysql://nope"]
            .map(Into::into)
            .to_vec();
    let ringpush::cli::Command::Who(who) =
        ringpush::cli::Cli::try_parse_env(&args).unwrap().command
    else {
        panic!("not who");
    };
    let err = who.database.pool().unwrap_err().to_string();
    assert!(
        err.starts_with("RINGPUSH_DATABASE_URL: not a PostgreSQL URL"),
        "{err}"
    );
    assert_eq!(err.matches("RINGPUSH_DATABASE_URL").count(), 1, "{err}");
}

#[tokio::test]
async fn concurrent_batches_share_grouped_lookups_and_each_gets_its_gateways() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    // Pool of 2: one lookup runs at a time, the rest wait and are grouped.
    let pool = ringpush::db::pool(&db.url, 2, Duration::from_secs(5)).unwrap();
    const N: i32 = 12;
    pool.get()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO users (id) OVERRIDING SYSTEM VALUE SELECT generate_series(1, {N});
             INSERT INTO gateways (id, owner_id, name) SELECT 'g' || id, id, 'Door ' || id FROM users;
             INSERT INTO push_tokens (token, user_id) SELECT lpad(to_hex(id), 64, '0'), id FROM users;"
        ))
        .await
        .unwrap();
    let lookups = ringpush::db::Lookups::new(pool);
    let found = futures_util::future::join_all((1..=N).map(|i| {
        let lookups = lookups.clone();
        async move { (i, lookups.lookup(vec![format!("g{i}")]).await) }
    }))
    .await;
    for (i, found) in found {
        let gateways = found.as_ref().as_ref().expect("the lookup succeeds");
        let g = &gateways[&format!("g{i}")];
        assert_eq!(g.name, format!("Door {i}"));
        let tokens: Vec<&str> = g.recipients.iter().map(|r| r.token.as_hex()).collect();
        assert_eq!(
            tokens,
            [format!("{i:064x}")],
            "gateway g{i} gets its own phone"
        );
    }
    let queries = lookups.queries();
    assert!(
        queries < N as u64,
        "{N} concurrent batches took {queries} queries: lookups were not grouped"
    );
}

#[tokio::test]
async fn a_lookup_the_database_never_answers_fails_in_time_and_frees_its_slot() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let proxy = crate::proxy::Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(
        url, db.url,
        "RINGPUSH_DATABASE_URL must name 127.0.0.1:5432"
    );
    // Pool of 2: one lookup slot, so a stuck query would hold every batch behind it. The
    // pool's own timeouts are long, so only the lookup's bound can end the wait.
    let pool = ringpush::db::pool(&url, 2, Duration::from_secs(120)).unwrap();
    let lookups = ringpush::db::Lookups::new(pool);
    assert!(lookups.lookup(vec!["g".into()]).await.is_ok());
    proxy.freeze();
    let stuck = tokio::time::timeout(
        ringpush::db::QUERY_TIMEOUT + Duration::from_secs(10),
        lookups.lookup(vec!["g".into()]),
    )
    .await
    .expect("the lookup gives up on its own");
    let error = stuck.as_ref().as_ref().unwrap_err();
    assert!(error.to_string().contains("took longer"), "{error}");
    // The slot is free again: with the database reachable, the next lookup answers.
    proxy.thaw();
    proxy.cut();
    let again = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if lookups.lookup(vec!["g".into()]).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        again.is_ok(),
        "lookups work again once the database answers"
    );
}

#[tokio::test]
async fn a_lookup_that_times_out_is_cancelled_on_the_server() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    // Another session holds a lock the lookup needs: it waits on the server, not the wire.
    let locker = ringpush::db::pool(&db.url, 1, Duration::from_secs(60)).unwrap();
    let mut holder = locker.get().await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE push_tokens IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let holder_pid: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Pool of 2: one lookup slot. Watched from a connection of its own.
    let pool = ringpush::db::pool(&db.url, 2, Duration::from_secs(60)).unwrap();
    let watcher = ringpush::db::pool(&db.url, 1, Duration::from_secs(60)).unwrap();
    let blocked = || async {
        let client = watcher.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&holder_pid],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let lookups = ringpush::db::Lookups::new(pool);
    let waiting = tokio::spawn({
        let lookups = lookups.clone();
        async move { lookups.lookup(vec!["g".into()]).await }
    });
    // Polls `blocked` for up to 30 s until it is what `done` wants; the verdict is only
    // asserted after the lock is released (a panic while it is held would hang the test's
    // clean-up, which drops the schema).
    let settles = |done: fn(i64) -> bool| {
        let blocked = &blocked;
        async move {
            let started = std::time::Instant::now();
            loop {
                let n = blocked().await;
                if done(n) || started.elapsed() > Duration::from_secs(30) {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let waited = settles(|n| n > 0).await;
    let found = waiting.await.unwrap();
    // Given up on by the worker, and then no longer running on the server either.
    let left = settles(|n| n == 0).await;
    tx.rollback().await.unwrap();
    assert_eq!(waited, 1, "the lookup waited for the lock");
    let error = found.as_ref().as_ref().unwrap_err();
    assert!(error.to_string().contains("took longer"), "{error}");
    assert_eq!(left, 0, "the timed-out lookup still runs on the server");
}

/// A schema is dropped also while a session sits idle in a transaction holding locks in it
/// (a process stopped between two statements): that session is ended, not waited for.
#[tokio::test]
async fn a_schema_is_dropped_past_a_session_idle_in_a_transaction_in_it() {
    let db = TestDb::new().await;
    ringpush::db::migrate(&db.url).await.unwrap();
    let pool = ringpush::db::pool(&db.url, 1, Duration::from_secs(5)).unwrap();
    let idle = pool.get().await.unwrap();
    idle.batch_execute("BEGIN; LOCK TABLE rings IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let url = crate::support::database_url();
    ringpush::db::drop_schema(&url, &db.schema)
        .await
        .expect("the schema dropped");
    let left: i64 = ringpush::db::pool(&url, 1, Duration::from_secs(5))
        .unwrap()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&db.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // The idle session was ended: its next statement fails.
    assert!(idle.batch_execute("COMMIT").await.is_err());
}
