//! PostgreSQL: the connection pool, `ringpush migrate`, and the one query a worker runs per
//! batch of rings.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::apns::Environment;
use crate::token::DeviceToken;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The database cannot be reached or used. Its text says what an operator can act on: the
/// SQLSTATE, the server's message and, where the server names them, the table, column or
/// constraint — never a bare `db error`.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("RINGPUSH_DATABASE_URL is not a PostgreSQL URL: {}", describe(.0))]
    Url(tokio_postgres::Error),
    #[error("PostgreSQL: {}", describe(.0))]
    Postgres(tokio_postgres::Error),
    #[error("PostgreSQL pool: {}", describe_pool(.0))]
    Pool(deadpool_postgres::PoolError),
    #[error("migration: {0}")]
    Migrate(refinery::Error),
    #[error("building the pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
}

// By hand, not `#[from]`: the text already holds the cause once, and a `source` chain would
// print it again (`{:#}`).
impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::Pool(e)
    }
}

impl From<refinery::Error> for DbError {
    fn from(e: refinery::Error) -> Self {
        DbError::Migrate(e)
    }
}

/// Where a PostgreSQL URL points, fit for logs: hosts, ports and database, no credentials.
pub fn target(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
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

impl DbError {
    /// The server's SQLSTATE, when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        let e = match self {
            DbError::Postgres(e) | DbError::Pool(deadpool_postgres::PoolError::Backend(e)) => e,
            _ => return None,
        };
        e.code().map(tokio_postgres::error::SqlState::code)
    }

    /// The statement failed because of the data it was given (SQLSTATE class 22, data
    /// exception, or 23, integrity constraint violation): the same input fails every time,
    /// so it is the input's fault, not the database's.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
    }

    /// A relation, column or function the statement needs is missing, or the role may not
    /// use it (SQLSTATE class 42): the schema is not migrated, or a grant is missing.
    pub fn is_schema_error(&self) -> bool {
        self.sqlstate().is_some_and(|c| c.starts_with("42"))
    }
}

/// One line for a driver error: for a server error its SQLSTATE, message and what it names
/// (`42P01 relation "push_tokens" does not exist`); otherwise the driver's text with its
/// cause once (`error connecting to server: Connection refused (os error 111)`).
fn describe(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write;
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}", db.code().code(), db.message());
        for (what, value) in [
            ("table", db.table()),
            ("column", db.column()),
            ("constraint", db.constraint()),
        ] {
            if let Some(value) = value {
                let _ = write!(s, " ({what} {value})");
            }
        }
        if let Some(detail) = db.detail() {
            let _ = write!(s, "; {detail}");
        }
        if let Some(hint) = db.hint() {
            let _ = write!(s, "; hint: {hint}");
        }
        return s;
    }
    let text = e.to_string();
    match std::error::Error::source(e).map(ToString::to_string) {
        Some(cause) if !text.contains(&cause) => format!("{text}: {cause}"),
        _ => text,
    }
}

fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => describe(e),
        other => other.to_string(),
    }
}

/// Opens a pool with every timeout set (deadpool's defaults wait forever).
pub fn pool(url: &str, max_size: usize, timeout: Duration) -> Result<Pool, DbError> {
    let config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()?)
}

/// Applies `migrations/` (refinery keeps its history table beside ours); a second run is
/// a no-op. Returns the names of the migrations it applied.
pub async fn migrate(url: &str) -> Result<Vec<String>, DbError> {
    let config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    let (mut client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let report = embedded::migrations::runner().run_async(&mut client).await;
    drop(client);
    let _ = driver.await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// A token a ring goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub token: DeviceToken,
    pub environment: Environment,
    /// The app's bundle id; `None` means the configured default topic.
    pub topic: Option<String>,
}

/// What the lookup found for one gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gateway {
    /// The name shown in the alert (the id when the gateway has none).
    pub name: String,
    /// The distinct tokens of the owner and every sharee.
    pub recipients: Vec<Recipient>,
}

/// The owner's and sharees' tokens of every gateway in one query. For each gateway the
/// lateral subquery yields its distinct users (the owner, and every sharee — `UNION` drops an
/// owner listed as a sharee too), and each user's tokens come through the `user_id` index;
/// a token belongs to one user, so no token appears twice. The left join keeps a gateway
/// whose users have no phones (one row with a NULL token), told apart from an unknown
/// gateway (no row). (An `OR` join here made PostgreSQL scan every token for every gateway:
/// 43 ms for 64 gateways over 2,000 tokens, against 1 ms this way.)
const LOOKUP: &str = "
SELECT g.id, coalesce(g.name, g.id), t.token, t.environment, t.topic
FROM gateways g
CROSS JOIN LATERAL (
    SELECT g.owner_id AS user_id
    UNION
    SELECT s.user_id FROM gateway_shares s WHERE s.gateway_id = g.id
) u
LEFT JOIN push_tokens t ON t.user_id = u.user_id
WHERE g.id = ANY($1::text[])
ORDER BY g.id, t.token";

/// Longest a grouped lookup may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to one grouped lookup, shared by every batch it served.
pub type Found = Arc<Result<HashMap<String, Gateway>, LookupError>>;

/// Why a lookup found nothing, sorted by whose fault it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The statement failed because of its input (SQLSTATE class 22/23): looking up the
    /// same gateways fails every time. The ring's fault, found gateway by gateway.
    #[error("{0}")]
    Data(String),
    /// No answer within the bound; the statement was cancelled on the server.
    #[error("the lookup took longer than {0:?}")]
    Timeout(Duration),
    /// The database cannot be used: unreachable, a table or a grant missing, the schema not
    /// migrated yet. The worker's trouble: rings wait.
    #[error("{0}")]
    Unavailable(String),
}

impl From<DbError> for LookupError {
    fn from(e: DbError) -> Self {
        if e.is_data_error() {
            LookupError::Data(e.to_string())
        } else {
            LookupError::Unavailable(e.to_string())
        }
    }
}

/// Lookups of concurrent batches, grouped like a group commit: at most `max` queries run at
/// once; batches that ask while they run wait, and the next query looks them all up
/// together. Under light load nothing waits (a batch finds a free slot); under a burst the
/// database sees a few large queries instead of many small ones.
pub struct Lookups {
    pool: Pool,
    max: usize,
    state: Mutex<Waiting>,
    queries: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Waiting {
    running: usize,
    batches: Vec<(Vec<String>, tokio::sync::oneshot::Sender<Found>)>,
}

impl Lookups {
    /// Up to half the pool's connections run lookups at once (at least one).
    pub fn new(pool: Pool) -> Arc<Self> {
        let max = (pool.status().max_size / 2).max(1);
        Arc::new(Self {
            pool,
            max,
            state: Mutex::default(),
            queries: Default::default(),
        })
    }

    /// How many lookups run at once.
    pub fn concurrency(&self) -> usize {
        self.max
    }

    /// Queries run so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gateways of `ids` (and possibly others looked up in the same query). The queries
    /// run on tasks of their own, so a caller that goes away never holds a slot.
    pub async fn lookup(self: &Arc<Self>, ids: Vec<String>) -> Found {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut state = self.state.lock().unwrap();
            state.batches.push((ids, tx));
            let start = state.running < self.max;
            if start {
                state.running += 1;
            }
            start
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.drain().await });
        }
        rx.await.unwrap_or_else(|_| {
            Arc::new(Err(LookupError::Unavailable(
                "the grouped lookup was abandoned".into(),
            )))
        })
    }

    /// Runs grouped queries for the waiting batches until none wait, then frees the slot
    /// (also if a query panics: the slot is freed when `Slot` drops).
    async fn drain(&self) {
        struct Slot<'a>(&'a Mutex<Waiting>);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
                state.running -= 1;
            }
        }
        let _slot = Slot(&self.state);
        loop {
            let batches = {
                let mut state = self.state.lock().unwrap();
                if state.batches.is_empty() {
                    return;
                }
                std::mem::take(&mut state.batches)
            };
            let ids: HashSet<&str> = batches
                .iter()
                .flat_map(|(ids, _)| ids.iter().map(String::as_str))
                .collect();
            let ids: Vec<&str> = ids.into_iter().collect();
            let found = self.query(&ids).await;
            for (_, tx) in batches {
                let _ = tx.send(found.clone());
            }
        }
    }

    /// One gateway's lookup on its own, not grouped with anyone else's (bounded and cancelled
    /// like the grouped ones): how a grouped lookup that failed for its input finds the
    /// gateway to blame.
    pub async fn lookup_alone(&self, id: &str) -> Found {
        self.query(&[id]).await
    }

    async fn query(&self, ids: &[&str]) -> Found {
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Bounded, so a query the database never answers frees its slot and the batches
        // waiting behind it are handed back (the worker pauses) instead of waiting forever;
        // the statement is then cancelled on the server too, or it would go on holding a
        // backend (and whatever it waits for) after everyone stopped waiting for it.
        let mut cancel = None;
        let found = tokio::time::timeout(
            QUERY_TIMEOUT,
            lookup_cancellable(&self.pool, ids, &mut cancel),
        )
        .await;
        let found = match found {
            Ok(found) => found.map_err(LookupError::from),
            Err(_) => {
                if let Some(token) = cancel {
                    tokio::spawn(async move {
                        // Through a new connection, which may not open either: bounded too.
                        let cancelled =
                            tokio::time::timeout(Duration::from_secs(5), token.cancel_query(NoTls));
                        if !matches!(cancelled.await, Ok(Ok(()))) {
                            tracing::warn!("could not cancel a timed-out lookup on the server");
                        }
                    });
                }
                Err(LookupError::Timeout(QUERY_TIMEOUT))
            }
        };
        Arc::new(found)
    }
}

/// Looks up every gateway of a batch of rings at once. Gateways missing from the result are
/// unknown. Rows whose token or environment is malformed are skipped with a warning.
pub async fn lookup(
    pool: &Pool,
    gateway_ids: &[&str],
) -> Result<HashMap<String, Gateway>, DbError> {
    lookup_cancellable(pool, gateway_ids, &mut None).await
}

/// [`lookup`], leaving in `cancel` how to cancel the statement once it is on its way.
async fn lookup_cancellable(
    pool: &Pool,
    gateway_ids: &[&str],
    cancel: &mut Option<tokio_postgres::CancelToken>,
) -> Result<HashMap<String, Gateway>, DbError> {
    let client = pool.get().await?;
    *cancel = Some(client.cancel_token());
    let statement = client.prepare_cached(LOOKUP).await?;
    let rows = client.query(&statement, &[&gateway_ids]).await?;
    let mut found: HashMap<String, Gateway> = HashMap::new();
    for row in rows {
        let id: String = row.get(0);
        let gateway = found.entry(id).or_insert_with(|| Gateway {
            name: row.get(1),
            recipients: Vec::new(),
        });
        let Some(token) = row.get::<_, Option<String>>(2) else {
            continue;
        };
        let env: String = row.get(3);
        match (DeviceToken::parse(&token), env.parse::<Environment>()) {
            (Ok(token), Ok(environment)) => gateway.recipients.push(Recipient {
                token,
                environment,
                topic: row.get(4),
            }),
            (Err(e), _) => tracing::warn!(error = %e, "skipping a malformed token row"),
            (_, Err(e)) => tracing::warn!(error = %e, "skipping a token row"),
        }
    }
    Ok(found)
}

/// One phone a ring from a gateway would reach, as support sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub user_id: i64,
    /// `owner` or `sharee`.
    pub role: &'static str,
    pub token: DeviceToken,
    pub environment: String,
    pub topic: Option<String>,
    /// When the phone last registered the token (RFC 3339).
    pub registered: String,
}

/// Whom a ring from `gateway_id` reaches now: `None` if there is no such gateway.
pub async fn who(pool: &Pool, gateway_id: &str) -> Result<Option<(String, Vec<Reach>)>, DbError> {
    let client = pool.get().await?;
    let Some(gateway) = client
        .query_opt(
            "SELECT coalesce(name, id), owner_id FROM gateways WHERE id = $1",
            &[&gateway_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let (name, owner): (String, i64) = (gateway.get(0), gateway.get(1));
    let rows = client
        .query(
            "SELECT t.user_id, t.token, t.environment, t.topic,
                    to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM push_tokens t
             WHERE t.user_id = $2
                OR t.user_id IN (SELECT s.user_id FROM gateway_shares s WHERE s.gateway_id = $1)
             ORDER BY t.user_id <> $2, t.user_id, t.token",
            &[&gateway_id, &owner],
        )
        .await?;
    let reach = rows
        .iter()
        .filter_map(|row| {
            let user_id: i64 = row.get(0);
            Some(Reach {
                user_id,
                role: if user_id == owner { "owner" } else { "sharee" },
                token: DeviceToken::parse(row.get(1)).ok()?,
                environment: row.get(2),
                topic: row.get(3),
                registered: row.get(4),
            })
        })
        .collect();
    Ok(Some((name, reach)))
}

/// Creates `gateway_id` with a new owner and `phones` random tokens, unless the gateway
/// exists. Returns whether it created anything.
pub async fn seed(
    pool: &Pool,
    gateway_id: &str,
    phones: u32,
    topic: &str,
) -> Result<bool, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    if tx
        .query_opt("SELECT 1 FROM gateways WHERE id = $1", &[&gateway_id])
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let owner: i64 = tx
        .query_one("INSERT INTO users DEFAULT VALUES RETURNING id", &[])
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO gateways (id, owner_id, name) VALUES ($1, $2, $1)",
        &[&gateway_id, &owner],
    )
    .await?;
    for _ in 0..phones {
        let token = crate::token::random_hex(32);
        tx.execute(
            "INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ($1, $2, 'production', $3)",
            &[&token, &owner, &topic],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Checks that the token lookup can run: the lookup itself, for no gateway — it needs the
/// same tables and privileges as a real one (a missing relation or grant fails it), and finds
/// nothing. What a worker probes with before it consumes and while the database is failing.
pub async fn probe_lookup(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(LOOKUP).await?;
    let none: &[&str] = &[];
    client.query(&statement, &[&none]).await?;
    Ok(())
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

/// Drops a schema and everything in it.
pub async fn drop_schema(url: &str, schema: &str) -> Result<(), DbError> {
    schema_statement(
        url,
        &format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            checked_identifier(schema)
        ),
    )
    .await
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
    let config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    let (client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(sql).await;
    drop(client);
    let _ = driver.await;
    Ok(result?)
}
