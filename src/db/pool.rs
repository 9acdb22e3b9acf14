//! The pool and the schema: opening the pool with every timeout set, `ringpush migrate`,
//! the liveness ping, where a URL points (for logs), and the schemas that keep the demo's
//! and tests' tables apart. Every connection is opened by [`Target::connect`] (TLS as the
//! URL's `sslmode` says).

use std::time::Duration;

use deadpool_postgres::{HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

use super::{DbError, Target};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where a PostgreSQL URL points, fit for logs: hosts, ports and database, no credentials.
pub fn target(url: &str) -> String {
    let Ok(Target { config, .. }) = Target::parse(url) else {
        return "(not a PostgreSQL URL)".into();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            let port = config.get_ports().get(i).or(config.get_ports().first());
            format!("{host}:{}", port.copied().unwrap_or(5432))
        })
        .collect();
    format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
}

/// What a pooled connection runs before it is used again when the URL asks for a primary
/// (`target_session_attrs=read-write`): after a failover, a connection to a server that is
/// now a standby fails this and is replaced — through the URL's hosts, by one to the new
/// primary — instead of failing every write.
const STILL_PRIMARY: &str = "DO $$ BEGIN IF pg_is_in_recovery() THEN \
    RAISE EXCEPTION 'this server is a standby now (failover): reconnecting'; END IF; END $$";

/// How long a pooled connection may go unused before it is checked with a round trip when
/// it is taken again (see [`pool`]).
pub(crate) const VERIFY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Opens a pool with every timeout set (deadpool's defaults wait forever). The URL may name
/// several hosts (libpq's multi-host form: `host1:5432,host2:5432`, tried in order) with
/// `target_session_attrs=read-write` (the primary) or `read-only` (a standby).
///
/// A connection taken from the pool is checked first — a round trip: an empty statement,
/// or, for a primary, that the server is not a standby now — only when it went unused for
/// [`VERIFY_AFTER_IDLE`] or longer (and one whose socket closed is never handed out). A
/// busy worker takes a connection for every lookup and ledger write, and a round trip
/// before each one doubled the database's share of a ring's time and of its tail; a
/// connection in use a moment ago is not worth checking, and one that failed since is
/// checked when the probe after the failure takes it (consumption pauses, so nothing uses
/// it in between).
pub fn pool(url: &str, max_size: usize, timeout: Duration) -> Result<Pool, DbError> {
    let target = Target::parse(url)?;
    let check: &'static str = match target.config.get_target_session_attrs() {
        tokio_postgres::config::TargetSessionAttrs::ReadWrite => STILL_PRIMARY,
        _ => "",
    };
    let recycling_method = RecyclingMethod::Fast;
    let config = target.config.clone();
    let manager =
        Manager::from_connect(config, Connect(target), ManagerConfig { recycling_method });
    let verify = deadpool_postgres::Hook::async_fn(move |client, metrics| {
        Box::pin(async move {
            if metrics.last_used() < VERIFY_AFTER_IDLE {
                return Ok(());
            }
            let failed = match tokio::time::timeout(timeout, client.simple_query(check)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => super::DbError::from(e).to_string(),
                Err(_) => format!("no answer in {}", crate::human::Human(timeout)),
            };
            tracing::warn!(error = %failed, "a pooled PostgreSQL connection failed its check; replacing it");
            Err(HookError::message(failed))
        })
    });
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .post_recycle(verify)
        .build()?)
}

/// How the pool opens a connection: [`Target::connect`], the same as every other.
struct Connect(Target);

impl deadpool_postgres::Connect for Connect {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        Box::pin(self.0.connect())
    }
}

/// Applies `migrations/` (refinery keeps its history table beside ours); a second run is
/// a no-op. Returns the names of the migrations it applied.
pub async fn migrate(url: &str) -> Result<Vec<String>, DbError> {
    migrate_to(url, None).await
}

/// [`migrate`], stopping after migration `version` when given: how a test builds the
/// schema an older release left behind, to check what the next migration does to its rows.
pub async fn migrate_to(url: &str, version: Option<i32>) -> Result<Vec<String>, DbError> {
    let (mut client, driver) = Target::parse(url)?.connect().await?;
    let mut runner = embedded::migrations::runner();
    if let Some(version) = version {
        runner = runner.set_target(refinery::Target::Version(version));
    }
    let report = runner.run_async(&mut client).await;
    drop(client);
    let _ = driver.await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// Checks the database answers (a pooled connection and `SELECT 1`).
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// The URL of the same database with `schema` first on the search path: how the demo and
/// the tests keep their tables apart from everyone else's.
pub fn url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// Creates a schema (its name is checked: identifiers cannot be bound as parameters).
pub async fn create_schema(url: &str, schema: &str) -> Result<(), DbError> {
    schema_statement(
        url,
        &format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            checked_identifier(schema)
        ),
    )
    .await
}

/// Drops a schema and everything in it. A session idle in a transaction that holds locks in
/// the schema is ended rather than waited for: the schema is going, and such a session may
/// never end by itself (a process stopped between two statements — a test's runtime blocked
/// by that test's own teardown). The drop waits a second for the locks it needs, then ends
/// those sessions and tries again, 30 times at most (a session running a
/// statement is waited for).
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), DbError> {
    let drop_it = format!(
        "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
        checked_identifier(schema)
    );
    let (client, driver) = Target::parse(url)?.connect().await?;
    let result = async {
        client.batch_execute("SET lock_timeout = '1s'").await?;
        let mut tries = 0;
        loop {
            tries += 1;
            match client.batch_execute(&drop_it).await {
                Err(e) if tries < DROP_TRIES && is_lock_timeout(&e) => {
                    // Not allowed to end them (another role's, without pg_signal_backend):
                    // wait on; their own bound may end them.
                    let _ = client.execute(END_IDLE_HOLDERS, &[&schema]).await;
                }
                result => return result,
            }
        }
    }
    .await;
    drop(client);
    let _ = driver.await;
    Ok(result?)
}

/// Tries of [`drop_schema`], a second's wait for locks each.
const DROP_TRIES: usize = 30;

/// Ends the other sessions of this database that sit idle in a transaction holding a lock on
/// the schema `$1` or on anything in it.
const END_IDLE_HOLDERS: &str = "SELECT pg_terminate_backend(a.pid)
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND EXISTS (
    SELECT FROM pg_locks l, pg_namespace n
    WHERE l.pid = a.pid AND n.nspname = $1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND (l.relation IN (SELECT oid FROM pg_class WHERE relnamespace = n.oid)
           OR (l.classid = 'pg_namespace'::regclass AND l.objid = n.oid)))";

fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

fn checked_identifier(name: &str) -> &str {
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "schema names are lower-case letters, digits and '_' only: {name:?}"
    );
    name
}

async fn schema_statement(url: &str, sql: &str) -> Result<(), DbError> {
    let (client, driver) = Target::parse(url)?.connect().await?;
    let result = client.batch_execute(sql).await;
    drop(client);
    let _ = driver.await;
    Ok(result?)
}
