//! Ring claims: a gateway's re-publish is the same ring. A gateway whose publisher confirm was
//! lost publishes its ring again; both copies are first deliveries, to one worker or two, one
//! after the other or at the same moment. Before a batch is pushed, its rings are claimed in
//! one statement on the primary (table `ring_claims`, migration V7), which also reads the
//! delivery ledger for every ring claimed before (or that may have been seen): a copy finds
//! the ring
//! - free (never claimed, or released, or its lease lapsed because its worker died): this
//!   worker holds it now, and pushes only to the tokens the ledger does not name;
//! - held by another worker (a live lease), or by another copy in this process: it waits —
//!   no attempt spent, no nack — and claims again, until the holder has written its ledger
//!   entry and released the claim (or died).
//!
//! A claim is reserved in the process first ([`Claims::reserve`]: one copy of a ring in hand
//! at a time per process), then in the database ([`Claims::claim`]). It ends when its ledger
//! entry is written (the usual case: no write to the claim itself, [`Claims::recorded`]), or,
//! for a ring settled without one, when its lease is set to now ([`ClaimGuard`]'s drop,
//! grouped with the releases around it into one statement); its lease ([`LEASE`]) is renewed
//! while the ring is in hand ([`Claims::renew`]). Every statement takes its rows' locks in key order (no deadlock
//! between workers). Rows are swept by age like the ledger's ([`Claims::sweep`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use super::ledger::{RingKey, TokenHash};
use super::DbError;

/// How long a claim holds without renewal: how long the copies of a ring wait when the worker
/// holding it dies.
pub const LEASE: Duration = Duration::from_secs(10);

/// How often the claims held are renewed (those held longer than this).
pub const RENEW_EVERY: Duration = Duration::from_secs(3);

/// Longest one claim statement may take (then it counts as failed: the rings wait).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Claims the rings not held by another worker: free when never claimed, when the holder's
/// ledger entry was written since it took the claim, or when its lease ended (released, or
/// lapsed: the holder died). This worker's own live claim is one whose end has not reached the
/// database yet: the process lets one copy at a time ask, so the keys of one statement are
/// distinct. Reads the ledger for the rings claimed before or that may have been seen (for a
/// first claim the `CASE` leaves the ledger's index untouched). Answers by position in the
/// arrays (1-based).
const CLAIM: &str = "WITH r AS (
    SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::bool[])
        WITH ORDINALITY AS r(ring, gateway_id, event_id, seen, i)
), c AS (
    INSERT INTO ring_claims AS c (ring, gateway_id, event_id, holder, lease_until)
    SELECT ring, gateway_id, event_id, $5, now() + make_interval(secs => $6::float8)
    FROM r ORDER BY ring
    ON CONFLICT (ring) DO UPDATE
    SET gateway_id = excluded.gateway_id, event_id = excluded.event_id, holder = excluded.holder,
        lease_until = excluded.lease_until, claims = c.claims + 1, taken_at = now()
    WHERE c.lease_until <= now() OR c.holder = excluded.holder
       OR EXISTS (SELECT FROM ring_ledger l WHERE l.gateway_id = c.gateway_id
                  AND l.event_id = c.event_id AND l.recorded_at >= c.taken_at)
    RETURNING c.ring, c.claims
)
SELECT r.i::int4, c.claims, l.accepted, s.state IS NOT NULL AND s.state <> 'ringing'
FROM c JOIN r ON r.ring = c.ring
LEFT JOIN rings s ON s.gateway_id = r.gateway_id AND s.event_id = r.event_id
LEFT JOIN ring_ledger l ON l.gateway_id = r.gateway_id
  AND l.event_id = CASE WHEN c.claims > 1 OR r.seen THEN r.event_id END";

/// Sets the lease of this worker's claims (by their count: a claim taken since is not
/// touched) to now + `$4` seconds: a renewal, or with 0 a release.
const LEASE_SET: &str =
    "INSERT INTO ring_claims AS c (ring, gateway_id, event_id, holder, lease_until, claims)
SELECT ring, '', '', $3, now() + make_interval(secs => $4::float8), claims
FROM unnest($1::int8[], $2::int4[]) AS r(ring, claims)
ORDER BY ring
ON CONFLICT (ring) DO UPDATE SET lease_until = excluded.lease_until
WHERE c.holder = excluded.holder AND c.claims = excluded.claims";

const SWEEP: &str =
    "DELETE FROM ring_claims WHERE claimed_at < now() - make_interval(secs => $1::float8)";

/// How often, in this process, a copy of a ring found the ring in hand elsewhere (another
/// copy here, or another worker's live claim) and had to wait.
static WAITED: AtomicU64 = AtomicU64::new(0);

/// How often a copy of a ring found the ring in hand elsewhere and waited (this process).
pub fn waited() -> u64 {
    WAITED.load(Ordering::Relaxed)
}

/// A ring in hand in this process: reserved (being claimed, or waiting for another worker's
/// claim), or held in the database (with its claim count and when its lease was last set).
#[derive(Debug, Clone, Copy)]
enum Local {
    Reserved,
    Held {
        claims: i32,
        since: Instant,
    },
    /// Held, and its ledger entry written: the claim has ended in the database.
    Recorded,
}

#[derive(Default)]
struct State {
    /// By [`key`]: two rings whose keys collide (one chance in 2⁶⁴) only wait for each other.
    local: HashMap<i64, Local>,
    releasing: bool,
    releases: Vec<(i64, i32)>,
}

/// The claims of one worker process (any number of workers share the table).
/// One ring to claim.
struct Ask {
    ring: i64,
    gateway: String,
    event: String,
    seen: bool,
}

/// A ring's claim count (0: another worker holds it), the tokens the ledger recorded, and
/// whether the ring has ended.
type Claimed = (i32, HashSet<TokenHash>, bool);

/// A ring this worker holds now: the tokens the ledger says took it, and whether it has
/// ended (read with the claim: an end recorded before the claim is seen here, and one
/// recorded after it waits for this worker's ledger entry — so no phone rings unfollowed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub recorded: HashSet<TokenHash>,
    pub ended: bool,
}

/// Where a waiting batch's claims are answered.
type Answer = tokio::sync::oneshot::Sender<Result<Vec<Claimed>, String>>;

/// The claims waiting for the next statement, and whether one runs.
#[derive(Default)]
struct Queue {
    running: bool,
    waiting: Vec<(Vec<Ask>, Answer)>,
}

/// Why rings could not be claimed (the database's error, as text: one statement answers
/// for the batches grouped into it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ClaimError(String);

pub struct Claims {
    pool: Pool,
    queue: Mutex<Queue>,
    /// This process's id in `ring_claims.holder`.
    holder: String,
    state: Mutex<State>,
    statements: AtomicU64,
}

/// A ring reserved in this process, and perhaps claimed in the database. Dropping it releases
/// both (the database's claim in the next grouped release).
pub struct ClaimGuard {
    claims: Arc<Claims>,
    key: RingKey,
    /// Its [`key`].
    ring: i64,
    /// The claim count it holds in the database (0: not held there).
    held: AtomicI32,
}

impl ClaimGuard {
    /// Whether this worker holds the ring in the database.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed) > 0
    }

    /// The claim may have lapsed (the database failed for longer than a lease): the next
    /// [`Claims::claim`] asks for it again — kept if it is still this worker's, taken over
    /// or waited for if another worker's.
    pub(crate) fn may_have_lapsed(&self) {
        self.held.store(0, Ordering::Relaxed);
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.claims
            .release(self.ring, self.held.load(Ordering::Relaxed));
    }
}

impl Claims {
    pub fn new(pool: Pool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            queue: Mutex::default(),
            holder: crate::token::random_hex(8),
            state: Mutex::default(),
            statements: AtomicU64::new(0),
        })
    }

    /// Statements run so far (claims, renewals, releases).
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// This process's holder id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Reserves `key` in this process; `None` while another copy of the ring has it.
    pub(crate) fn reserve(self: &Arc<Self>, key: RingKey) -> Option<ClaimGuard> {
        let ring = self::key(&key);
        let mut state = self.state.lock().unwrap();
        if state.local.contains_key(&ring) {
            WAITED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        state.local.insert(ring, Local::Reserved);
        Some(ClaimGuard {
            claims: self.clone(),
            key,
            ring,
            held: AtomicI32::new(0),
        })
    }

    /// Claims the rings of `asks` (reserved, not yet held; with whether the ring may have been
    /// seen, which reads the ledger even for a first claim) in one statement. For each: the
    /// tokens the ledger says took it when this worker holds it now, `None` when another
    /// worker does.
    pub async fn claim(
        self: &Arc<Self>,
        asks: &[(&ClaimGuard, bool)],
    ) -> Result<Vec<Option<Held>>, ClaimError> {
        if asks.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Ask> = asks
            .iter()
            .map(|(g, seen)| Ask {
                ring: g.ring,
                gateway: g.key.gateway.clone(),
                event: g.key.event.clone(),
                seen: *seen,
            })
            .collect();
        let claimed = self.grouped(rows).await.map_err(ClaimError)?;
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        Ok(asks
            .iter()
            .zip(claimed)
            .map(|((guard, _), (claims, recorded, ended))| {
                if claims == 0 {
                    WAITED.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                guard.held.store(claims, Ordering::Relaxed);
                if let Some(local) = state.local.get_mut(&guard.ring) {
                    *local = Local::Held { claims, since: now };
                }
                Some(Held { recorded, ended })
            })
            .collect())
    }

    /// Claims `asks` in the next statement: the asks of the batches that arrive while one
    /// statement runs go into the next one together (like the ledger's group commit), so a
    /// busy worker at a low rate — each ring its own batch — runs a few claim statements a
    /// second, not one per ring. By position: the claim count and the tokens recorded.
    async fn grouped(self: &Arc<Self>, asks: Vec<Ask>) -> Result<Vec<Claimed>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.waiting.push((asks, tx));
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.drain_claims().await });
        }
        rx.await
            .unwrap_or_else(|_| Err("the claim statement was abandoned".into()))
    }

    /// Runs what waits, one statement at a time, until nothing does.
    async fn drain_claims(&self) {
        /// Frees the runner's place also when a statement panics.
        struct Running<'a>(&'a Mutex<Queue>);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).running = false;
            }
        }
        let _running = Running(&self.queue);
        loop {
            let waiting = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if queue.waiting.is_empty() {
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let all: Vec<&Ask> = waiting.iter().flat_map(|(asks, _)| asks).collect();
            match self.run_claim(&all).await {
                Ok(mut claimed) => {
                    for (asks, tx) in waiting.into_iter().rev() {
                        let mine = claimed.split_off(claimed.len() - asks.len());
                        let _ = tx.send(Ok(mine));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for (_, tx) in waiting {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// One claim statement for `asks` (distinct rings: one copy of a ring asks at a time in
    /// this process); a deadlock is tried again twice.
    async fn run_claim(&self, asks: &[&Ask]) -> Result<Vec<Claimed>, DbError> {
        let rings: Vec<i64> = asks.iter().map(|a| a.ring).collect();
        let gateways: Vec<&str> = asks.iter().map(|a| a.gateway.as_str()).collect();
        let events: Vec<&str> = asks.iter().map(|a| a.event.as_str()).collect();
        let seen: Vec<bool> = asks.iter().map(|a| a.seen).collect();
        let lease = LEASE.as_secs_f64();
        let mut tries = 0;
        let rows = loop {
            tries += 1;
            let rows = bounded(async {
                let client = self.pool.get().await?;
                let statement = client.prepare_cached(CLAIM).await?;
                Ok(client
                    .query(
                        &statement,
                        &[&rings, &gateways, &events, &seen, &self.holder, &lease],
                    )
                    .await?)
            })
            .await;
            self.statements.fetch_add(1, Ordering::Relaxed);
            match rows {
                Err(e) if tries < 3 && e.is_deadlock() => continue,
                rows => break rows?,
            }
        };
        // By position: the claim count and the tokens recorded (0: not claimed).
        let mut claimed: Vec<Claimed> = vec![(0, HashSet::new(), false); asks.len()];
        for row in rows {
            let i: i32 = row.get(0);
            let Some(entry) = usize::try_from(i - 1).ok().and_then(|i| claimed.get_mut(i)) else {
                continue;
            };
            entry.0 = row.get(1);
            entry.2 = row.get(3);
            if let Some(accepted) = row.get::<_, Option<&[u8]>>(2) {
                for h in accepted.chunks_exact(8) {
                    entry.1.insert(h.try_into().expect("chunks of 8"));
                }
            }
        }
        Ok(claimed)
    }

    /// The ledger entries of `rings` were written: their claims (held here) have ended in
    /// the database, and need no release.
    pub fn recorded<'a>(&self, rings: impl IntoIterator<Item = &'a RingKey>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for ring in rings {
            if let Some(local @ Local::Held { .. }) = state.local.get_mut(&key(ring)) {
                *local = Local::Recorded;
            }
        }
    }

    /// A guard dropped: the ring leaves the process; its database claim (count `claims`, 0
    /// when it held none) is released with the releases around it, unless its ledger entry
    /// ended it already.
    fn release(self: &Arc<Self>, ring: i64, claims: i32) {
        let start = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let local = state.local.remove(&ring);
            if claims == 0 || matches!(local, Some(Local::Recorded)) {
                return;
            }
            state.releases.push((ring, claims));
            !std::mem::replace(&mut state.releasing, true)
        };
        if start {
            let this = self.clone();
            // Outside a runtime (a guard dropped at the very end), the lease lapses instead.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { this.drain_releases().await });
            }
        }
    }

    /// Writes the waiting releases, one statement at a time, until none wait. A release that
    /// fails is not tried again: its lease lapses within [`LEASE`].
    async fn drain_releases(&self) {
        loop {
            let releases = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if state.releases.is_empty() {
                    state.releasing = false;
                    return;
                }
                std::mem::take(&mut state.releases)
            };
            if let Err(e) = self.set_lease(&releases, Duration::ZERO).await {
                tracing::warn!(rings = releases.len(), error = %e, "could not release ring claims; their leases lapse instead");
            }
        }
    }

    /// Renews the leases of the claims held longer than [`RENEW_EVERY`] (one statement);
    /// returns how many.
    pub async fn renew(&self) -> Result<usize, DbError> {
        let now = Instant::now();
        let due: Vec<(i64, i32)> = {
            let state = self.state.lock().unwrap();
            state
                .local
                .iter()
                .filter_map(|(ring, local)| match local {
                    Local::Held { claims, since } if now - *since >= RENEW_EVERY => {
                        Some((*ring, *claims))
                    }
                    _ => None,
                })
                .collect()
        };
        if due.is_empty() {
            return Ok(0);
        }
        self.set_lease(&due, LEASE).await?;
        let mut state = self.state.lock().unwrap();
        for (ring, claims) in &due {
            if let Some(Local::Held { claims: c, since }) = state.local.get_mut(ring) {
                if c == claims {
                    *since = now;
                }
            }
        }
        Ok(due.len())
    }

    async fn set_lease(&self, claims: &[(i64, i32)], lease: Duration) -> Result<(), DbError> {
        // One entry per ring (a ring released twice in a row: the later claim).
        let mut latest: HashMap<i64, i32> = HashMap::new();
        for (ring, n) in claims {
            let e = latest.entry(*ring).or_insert(*n);
            *e = (*e).max(*n);
        }
        let rings: Vec<i64> = latest.keys().copied().collect();
        let counts: Vec<i32> = latest.values().copied().collect();
        let secs = lease.as_secs_f64();
        let mut tries = 0;
        loop {
            tries += 1;
            let done = bounded(async {
                let client = self.pool.get().await?;
                let statement = client.prepare_cached(LEASE_SET).await?;
                client
                    .execute(&statement, &[&rings, &counts, &self.holder, &secs])
                    .await?;
                Ok(())
            })
            .await;
            self.statements.fetch_add(1, Ordering::Relaxed);
            match done {
                Err(e) if tries < 3 && e.is_deadlock() => continue,
                done => return done,
            }
        }
    }

    /// Deletes the claims first made more than `keep` ago; returns how many.
    pub async fn sweep(&self, keep: Duration) -> Result<u64, DbError> {
        bounded(async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(SWEEP).await?;
            Ok(client.execute(&statement, &[&keep.as_secs_f64()]).await?)
        })
        .await
    }

    /// Whether rings can be claimed now: a claim of nothing (same table, grants and a
    /// writable primary as a real one). Part of what a paused worker probes.
    pub async fn probe(pool: &Pool) -> Result<(), DbError> {
        let client = pool.get().await?;
        let statement = client.prepare_cached(CLAIM).await?;
        let (rings, none, seen): (&[i64], &[&str], &[bool]) = (&[], &[], &[]);
        client
            .query(
                &statement,
                &[&rings, &none, &none, &seen, &"probe", &0.0f64],
            )
            .await?;
        Ok(())
    }
}

/// A ring's key in `ring_claims`: the first 8 bytes of the SHA-256 of its gateway and
/// event id (a NUL between them, which neither may contain). A fixed-size key keeps the
/// table's one index small and its comparisons cheap.
pub fn key(ring: &RingKey) -> i64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ring.gateway.as_bytes());
    ctx.update(&[0]);
    ctx.update(ring.event.as_bytes());
    let digest = ctx.finish();
    i64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// A statement bounded by [`CLAIM_TIMEOUT`] (a timed-out one fails like a lost connection).
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(CLAIM_TIMEOUT, f).await {
        Ok(result) => result,
        Err(_) => Err(DbError::Timeout(CLAIM_TIMEOUT)),
    }
}
