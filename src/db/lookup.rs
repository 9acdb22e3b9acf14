//! The token lookup: the owner's and sharees' tokens of every gateway of a batch of rings
//! in one query, grouped across concurrent batches like a group commit ([`Lookups`]),
//! bounded and cancelled on the server when it takes too long.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use crate::token::{AppId, DeviceToken, Environment, Kind, Platform};

use super::DbError;

/// A token a ring goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The token, with its platform (APNs or FCM).
    pub token: DeviceToken,
    /// How the phone wants a ring: an alert, or a call-style ring.
    pub kind: Kind,
    /// APNs only: the environment that issued the token (FCM tokens read `production`).
    pub environment: Environment,
    /// APNs only: the app's bundle id; `None` means its app's topic.
    pub topic: Option<String>,
    /// The app the token belongs to: whose credentials push it.
    pub app: AppId,
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
SELECT g.id, coalesce(g.name, g.id), t.token, t.environment, t.topic, t.platform, t.kind, t.app
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
    #[error("the lookup took longer than {}", crate::human::Human(*.0))]
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

/// Where a waiting batch's answer goes.
type Answer = tokio::sync::oneshot::Sender<(Found, Instant)>;

#[derive(Default)]
struct Waiting {
    running: usize,
    batches: Vec<(Vec<String>, Answer)>,
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
    pub(crate) fn concurrency(&self) -> usize {
        self.max
    }

    /// Queries run so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gateways of `ids` (and possibly others looked up in the same query). The queries
    /// run on tasks of their own, so a caller that goes away never holds a slot.
    pub async fn lookup(self: &Arc<Self>, ids: Vec<String>) -> Found {
        self.lookup_timed(ids).await.0
    }

    /// [`Lookups::lookup`], with when the statement that answered was sent (a pooled
    /// connection in hand): what a batch waited before it — another query running, the slots
    /// all taken, a connection — is told apart from the query. `None` when it was abandoned.
    pub(crate) async fn lookup_timed(
        self: &Arc<Self>,
        ids: Vec<String>,
    ) -> (Found, Option<Instant>) {
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
        match rx.await {
            Ok((found, sent)) => (found, Some(sent)),
            Err(_) => {
                let abandoned = "the grouped lookup was abandoned".into();
                (Arc::new(Err(LookupError::Unavailable(abandoned))), None)
            }
        }
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
            let asked = Instant::now();
            let (found, sent) = self.query_timed(&ids).await;
            let sent = sent.unwrap_or(asked);
            for (_, tx) in batches {
                let _ = tx.send((found.clone(), sent));
            }
        }
    }

    /// One gateway's lookup on its own, not grouped with anyone else's (bounded and cancelled
    /// like the grouped ones): how a grouped lookup that failed for its input finds the
    /// gateway to blame.
    pub(crate) async fn lookup_alone(&self, id: &str) -> Found {
        self.query_timed(&[id]).await.0
    }

    /// One query, with when its statement was sent (`None` if it never was).
    async fn query_timed(&self, ids: &[&str]) -> (Found, Option<Instant>) {
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Bounded, so a query the database never answers frees its slot and the batches
        // waiting behind it are tried again (then gateway by gateway) instead of waiting forever;
        // the statement is then cancelled on the server too, or it would go on holding a
        // backend (and whatever it waits for) after everyone stopped waiting for it.
        let mut cancel = None;
        let found = tokio::time::timeout(
            QUERY_TIMEOUT,
            lookup_cancellable(&self.pool, ids, &mut cancel),
        )
        .await;
        let started = cancel.as_ref().map(|(_, sent)| *sent);
        let cancel = cancel.map(|(token, _)| token);
        let found = match found {
            Ok(found) => found.map_err(LookupError::from),
            Err(_) => {
                if let Some(token) = cancel {
                    tokio::spawn(async move {
                        // Through a new connection, which may not open either: bounded too.
                        let cancelled = tokio::time::timeout(
                            Duration::from_secs(5),
                            token.cancel_query(super::tls::CancelTls),
                        );
                        if !matches!(cancelled.await, Ok(Ok(()))) {
                            tracing::warn!("could not cancel a timed-out lookup on the server");
                        }
                    });
                }
                Err(LookupError::Timeout(QUERY_TIMEOUT))
            }
        };
        (Arc::new(found), started)
    }
}

/// Looks up every gateway of a batch of rings at once. Gateways missing from the result are
/// unknown. Rows whose token, environment, platform or kind is malformed are skipped with a
/// warning.
pub async fn lookup(
    pool: &Pool,
    gateway_ids: &[&str],
) -> Result<HashMap<String, Gateway>, DbError> {
    lookup_cancellable(pool, gateway_ids, &mut None).await
}

/// [`lookup`], leaving in `cancel` how to cancel the statement once it is on its way, and
/// when it went.
async fn lookup_cancellable(
    pool: &Pool,
    gateway_ids: &[&str],
    cancel: &mut Option<(tokio_postgres::CancelToken, Instant)>,
) -> Result<HashMap<String, Gateway>, DbError> {
    let client = pool.get().await?;
    *cancel = Some((client.cancel_token(), Instant::now()));
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
        match recipient(&row, &token) {
            Ok(r) => gateway.recipients.push(r),
            Err(e) => tracing::warn!(error = %e, "skipping a malformed token row"),
        }
    }
    Ok(found)
}

/// One token row of the lookup as a recipient (columns 3 to 7: environment, topic, platform,
/// kind, app).
fn recipient(row: &tokio_postgres::Row, token: &str) -> Result<Recipient, String> {
    let platform: Platform = row.get::<_, String>(5).parse()?;
    Ok(Recipient {
        token: DeviceToken::parse_for(platform, token).map_err(|e| e.to_string())?,
        kind: row.get::<_, String>(6).parse()?,
        // Only APNs has environments: other tokens are production (docs/design.md, feedback
        // events).
        environment: match platform {
            Platform::APNS => row.get::<_, String>(3).parse()?,
            _ => crate::token::Environment::Production,
        },
        topic: row.get(4),
        app: row.get::<_, String>(7).parse()?,
    })
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
