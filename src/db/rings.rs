//! A ring's life in the database (table `rings`, migration V9): each ring's state from its
//! press to its end, what the workers agree on whatever their number and the order of events.
//!
//! - [`Rings::begin`]: a batch's rings registered before they are pushed, grouped across
//!   concurrent batches into one statement (as the ledger's writes and the claims are). A ring
//!   comes back [`Begun::Ringing`] (push it), [`Begun::Folded`] (a press of a switch whose ring
//!   is still ringing, pressed less than the debounce after it: not pushed) or
//!   [`Begun::Ended`] (its end came first: not pushed). A press that may fold into an earlier
//!   one of the same call goes in a later statement, so it sees the earlier.
//! - [`Rings::end`]: a batch's ends recorded — the first end wins (`ringpush_end_ring`); the
//!   answer says whether this end is the one that ended the ring, also when it is asked
//!   again. Grouped across concurrent batches as `begin` is: one statement, one commit.
//! - [`Rings::sweep_missed`]: the rings still ringing past their deadline end `missed`, in a
//!   transaction that commits only once their ends are published (a worker that dies
//!   between the two leaves them to the next sweep; one that stops running leaves them
//!   when the server ends its idle transaction).
//! - [`Rings::sweep`]: the history's retention; [`history`]: what `ringpush history` prints.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::DbError;
use crate::wire::ring::{EndEvent, EndReason};

/// Longest one statement of the ring's life may take (then it counts as failed: the rings wait).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a missed sweep holds its rows while their ends are published (then it rolls back,
/// and the next sweep takes them again).
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The server's own bound on the missed sweep's transaction, for that transaction alone:
/// idle (between its statements) for 10 s — twice [`ANNOUNCE_TIMEOUT`] — the server ends
/// the session, and the rows it locked go back to the next sweep. [`ANNOUNCE_TIMEOUT`] ends
/// a slow publish; this ends a process that stopped running the sweep's task at all (its
/// runtime blocked — a test's teardown blocking the thread it runs on —, the process
/// stopped), which otherwise held the rows, and anything waiting on their locks (a `DROP
/// SCHEMA`, another worker's end of those rings), for as long as its connection lived.
const IDLE_BOUND: &str = "SET LOCAL idle_in_transaction_session_timeout = '10s'";

/// What [`Rings::begin`] runs: registers each ring of a known gateway (an end that came first
/// is kept, its ring filled in) and finds, for a press of a switch, the ring of that switch still ringing that
/// it folds into. Answers by position (1-based): the ring's state and what it folded into.
///
/// Its commit does not wait for the WAL flush (`synchronous_commit` off for this statement
/// alone): the push does not wait for a disk. A ring's row lost in a crash of PostgreSQL
/// costs that ring its history and its missed follow-up; its follow-ups after an end still
/// come from the delivery ledger, whose writes stay durable.
const BEGIN: &str = "WITH async AS (
    SELECT set_config('synchronous_commit', 'off', true)
), r AS (
    SELECT r.* FROM async, unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
        WITH ORDINALITY AS r(gateway_id, event_id, switch_id, pressed_at, i)
), p AS (
    SELECT r.i, (SELECT q.event_id FROM rings q
                 WHERE $5::float8 > 0 AND q.gateway_id = r.gateway_id AND q.state = 'ringing'
                   AND q.folded_into IS NULL AND q.switch_id IS NOT DISTINCT FROM r.switch_id
                   AND q.event_id <> r.event_id AND q.pressed_at <= r.pressed_at
                   AND r.pressed_at < q.pressed_at + make_interval(secs => $5::float8)
                 ORDER BY q.pressed_at LIMIT 1) AS parent
    FROM r
), ins AS (
    INSERT INTO rings AS x (gateway_id, event_id, switch_id, pressed_at, deadline, folded_into)
    SELECT r.gateway_id, r.event_id, r.switch_id, r.pressed_at,
           r.pressed_at + make_interval(secs => $6::float8), p.parent
    FROM r JOIN p ON p.i = r.i
    -- A ring of an unknown gateway has no life to keep (it is acked as such).
    WHERE EXISTS (SELECT FROM gateways g WHERE g.id = r.gateway_id)
    ORDER BY r.gateway_id, r.event_id
    ON CONFLICT (gateway_id, event_id) DO UPDATE
    SET switch_id = excluded.switch_id, pressed_at = excluded.pressed_at,
        deadline = excluded.deadline
    WHERE x.pressed_at IS NULL
    RETURNING x.gateway_id, x.event_id, x.state, x.folded_into
)
SELECT r.i::int4, coalesce(ins.state, cur.state), coalesce(ins.folded_into, cur.folded_into)
FROM r
LEFT JOIN ins ON ins.gateway_id = r.gateway_id AND ins.event_id = r.event_id
LEFT JOIN rings cur ON cur.gateway_id = r.gateway_id AND cur.event_id = r.event_id";

/// What [`Rings::end`] runs: `ringpush_end_ring` for each end, in one statement (one commit
/// for all of them), in the order of the rings they name, and the ends of one ring in the
/// order they came (the first of them wins) — every worker's statements lock the rings in
/// that order, so two of them seldom wait for each other in a circle (an end naming a folded
/// press locks its ring; the server breaks such a deadlock, and the statement is tried
/// again). Answers by position (1-based).
const END: &str = "SELECT e.i::int4, f.won, f.target, f.state, f.pressed_at, f.ended_at, f.by_name
FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[],
                           $6::timestamptz[])
          WITH ORDINALITY AS e(gateway_id, ring_id, end_id, state, by_user, at, i)
      ORDER BY e.gateway_id, e.ring_id, e.i) e
CROSS JOIN LATERAL ringpush_end_ring(e.gateway_id, e.ring_id, e.end_id, e.state, e.by_user,
                                     e.at) f";

/// Tries of a grouped end statement that the server failed to break a deadlock (with a
/// statement that locks rings in another order: a ledger write counting phones).
const END_TRIES: usize = 3;

/// The rings past their deadline, still ringing, end `missed` (locked until the transaction
/// ends: another worker's sweep skips them).
const MISSED: &str = "UPDATE rings r
SET state = 'missed', ended_at = r.deadline, reason = 'timeout', end_event_id = r.event_id
FROM (SELECT gateway_id, event_id FROM rings
      WHERE state = 'ringing' AND folded_into IS NULL AND deadline IS NOT NULL
        AND deadline <= now()
      ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED) due
WHERE r.gateway_id = due.gateway_id AND r.event_id = due.event_id
RETURNING r.gateway_id, r.event_id, r.deadline";

const SWEEP_HISTORY: &str =
    "DELETE FROM rings WHERE created_at < now() - make_interval(secs => $1::float8)";
/// Ends whose ring never came, once the ring could no longer be pushed.
const SWEEP_ORPHAN_ENDS: &str = "DELETE FROM rings
WHERE pressed_at IS NULL AND created_at < now() - make_interval(secs => $1::float8)";

const HISTORY: &str = "SELECT h.event_id, h.switch_id, h.pressed_at, h.state, h.ended_at, h.reason,
       h.by_user, u.name, h.phones, h.presses
FROM ring_history h LEFT JOIN users u ON u.id = h.by_user
WHERE h.gateway_id = $1
ORDER BY h.pressed_at DESC
LIMIT $2";

/// How the ring's life is timed.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A ring still ringing this long after `pressed_at` ends `missed`.
    pub timeout: Duration,
    /// A press less than this after a ring of its switch still ringing folds into it (zero:
    /// off).
    pub debounce: Duration,
}

/// A ring to register.
#[derive(Debug, Clone)]
pub struct Begin {
    pub gateway: String,
    pub event: String,
    pub switch: Option<String>,
    pub pressed_at: OffsetDateTime,
}

/// A ring registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// Ringing: push it (to the tokens that did not take it yet).
    Ringing,
    /// A press folded into the ring named (still ringing): not pushed.
    Folded(String),
    /// Ended already (its end came first, or came while it waited): not pushed.
    Ended(String),
}

/// An end recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Whether this end is the one that ended the ring (the first).
    pub won: bool,
    /// The ring it ended (a folded press's ring, when the end named the press).
    pub target: String,
    /// The ring's state now.
    pub state: String,
    /// When the ring was pressed (`None`: the ring is not known yet).
    pub pressed_at: Option<OffsetDateTime>,
    pub ended_at: Option<OffsetDateTime>,
    /// The name of the user who answered or declined.
    pub by_name: Option<String>,
}

/// A ring that ended `missed` in a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    pub gateway: String,
    pub event: String,
    pub deadline: OffsetDateTime,
}

/// One row of `ring_history`, as `ringpush history` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub event_id: String,
    pub switch_id: Option<String>,
    pub pressed_at: OffsetDateTime,
    pub state: String,
    pub ended_at: Option<OffsetDateTime>,
    pub reason: Option<String>,
    pub by_user: Option<i64>,
    pub by_name: Option<String>,
    pub phones: i32,
    pub presses: i32,
}

/// What concurrent batches ask of one kind of grouped statement (registrations, ends): each
/// batch's asks and where its answers go, and whether a statement runs.
struct Queue<A, R> {
    running: bool,
    waiting: Vec<(Vec<A>, Answers<R>)>,
}

/// Where a batch's answers go (by position), or why there are none.
type Answers<R> = oneshot::Sender<Result<Vec<R>, String>>;

impl<A, R> Default for Queue<A, R> {
    fn default() -> Self {
        Self {
            running: false,
            waiting: Vec::new(),
        }
    }
}

/// The ring's life, for one worker process (any number share the table).
pub struct Rings {
    pool: Pool,
    timing: Timing,
    begins: Mutex<Queue<Begin, Begun>>,
    ends: Mutex<Queue<EndEvent, Ended>>,
}

impl Rings {
    pub fn new(pool: Pool, timing: Timing) -> Arc<Self> {
        Arc::new(Self {
            pool,
            timing,
            begins: Mutex::default(),
            ends: Mutex::default(),
        })
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Registers `rings` (by position: what became of each). The rings of batches that arrive
    /// while a statement runs go into the next one together.
    pub async fn begin(self: &Arc<Self>, rings: Vec<Begin>) -> Result<Vec<Begun>, String> {
        let this = self.clone();
        grouped(&self.begins, rings, "the ring registration", async move {
            let this = &*this;
            run_grouped(&this.begins, |all: Vec<Begin>| async move {
                let all: Vec<&Begin> = all.iter().collect();
                this.run(&all).await.map_err(|e| e.to_string())
            })
            .await
        })
        .await
    }

    /// Registers `rings` in as few statements as it can — a statement sees only what was
    /// committed before it, so a press that may fold into another of the same call goes in a
    /// later statement than that one: per switch, by `pressed_at`, a *leader* is a press not
    /// within the debounce of the leader before it, a *follower* one within it. The leaders
    /// go first, the followers next (each then sees its leader); without debounce, one
    /// statement. Two copies of one ring are never in the same statement either.
    async fn run(&self, rings: &[&Begin]) -> Result<Vec<Begun>, DbError> {
        let mut order: Vec<usize> = (0..rings.len()).collect();
        order.sort_by_key(|&i| rings[i].pressed_at);
        let debounce = self.timing.debounce;
        let mut leader_at: HashMap<(&str, Option<&str>), OffsetDateTime> = HashMap::new();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        // (round, position): round 0 the leaders, 1 the followers, 2+ repeated copies.
        let mut rounds: Vec<Vec<usize>> = vec![Vec::new(), Vec::new()];
        for i in order {
            let r = rings[i];
            let event = (r.gateway.as_str(), r.event.as_str());
            if !seen.insert(event) {
                rounds.push(vec![i]);
                continue;
            }
            let switch = (r.gateway.as_str(), r.switch.as_deref());
            let follower = !debounce.is_zero()
                && leader_at
                    .get(&switch)
                    .is_some_and(|&at| r.pressed_at < at + debounce);
            if follower {
                rounds[1].push(i);
            } else {
                leader_at.insert(switch, r.pressed_at);
                rounds[0].push(i);
            }
        }
        let mut begun: Vec<Option<Begun>> = vec![None; rings.len()];
        for round in rounds.into_iter().filter(|r| !r.is_empty()) {
            let these: Vec<&Begin> = round.iter().map(|&i| rings[i]).collect();
            for (i, b) in round.iter().zip(self.statement(&these).await?) {
                begun[*i] = Some(b);
            }
        }
        Ok(begun
            .into_iter()
            .map(|b| b.unwrap_or(Begun::Ringing))
            .collect())
    }

    async fn statement(&self, rings: &[&Begin]) -> Result<Vec<Begun>, DbError> {
        let gateways: Vec<&str> = rings.iter().map(|r| r.gateway.as_str()).collect();
        let events: Vec<&str> = rings.iter().map(|r| r.event.as_str()).collect();
        let switches: Vec<Option<&str>> = rings.iter().map(|r| r.switch.as_deref()).collect();
        let pressed: Vec<OffsetDateTime> = rings.iter().map(|r| r.pressed_at).collect();
        let debounce = self.timing.debounce.as_secs_f64();
        let timeout = self.timing.timeout.as_secs_f64();
        let rows = bounded(async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(BEGIN).await?;
            Ok(client
                .query(
                    &statement,
                    &[&gateways, &events, &switches, &pressed, &debounce, &timeout],
                )
                .await?)
        })
        .await?;
        let mut begun = vec![Begun::Ringing; rings.len()];
        for row in rows {
            let i: i32 = row.get(0);
            let Some(b) = usize::try_from(i - 1).ok().and_then(|i| begun.get_mut(i)) else {
                continue;
            };
            let state: Option<String> = row.get(1);
            let folded: Option<String> = row.get(2);
            *b = match (state.as_deref(), folded) {
                (_, Some(into)) => Begun::Folded(into),
                // A copy registered by another worker since this statement's snapshot: it
                // rings (the claims keep the copies apart).
                (None | Some("ringing"), None) => Begun::Ringing,
                (Some(ended), None) => Begun::Ended(ended.to_owned()),
            };
        }
        Ok(begun)
    }

    /// Records `ends` (by position: what became of each; an end's time is its own `at`, else
    /// now): the first end of a ring wins. The ends of batches that arrive while a statement
    /// runs go into the next one together.
    pub async fn end(self: &Arc<Self>, ends: Vec<EndEvent>) -> Result<Vec<Ended>, String> {
        let this = self.clone();
        grouped(&self.ends, ends, "the ends' recording", async move {
            run_grouped(&this.ends, |all: Vec<EndEvent>| this.end_statement(all)).await
        })
        .await
    }

    async fn end_statement(&self, ends: Vec<EndEvent>) -> Result<Vec<Ended>, String> {
        let gateways: Vec<&str> = ends.iter().map(|e| e.gateway_id.as_str()).collect();
        let rings: Vec<&str> = ends.iter().map(|e| e.ring_id.as_str()).collect();
        let own: Vec<&str> = ends.iter().map(|e| e.event_id.as_str()).collect();
        let states: Vec<&str> = ends.iter().map(|e| e.reason.as_str()).collect();
        let by: Vec<Option<i64>> = ends.iter().map(|e| e.by_user).collect();
        let at: Vec<Option<OffsetDateTime>> = ends.iter().map(|e| e.at).collect();
        let mut tries = 0;
        let rows = loop {
            tries += 1;
            let rows = bounded(async {
                let client = self.pool.get().await?;
                let statement = client.prepare_cached(END).await?;
                Ok(client
                    .query(&statement, &[&gateways, &rings, &own, &states, &by, &at])
                    .await?)
            })
            .await;
            match rows {
                Err(e) if tries < END_TRIES && e.is_deadlock() => continue,
                rows => break rows.map_err(|e| e.to_string())?,
            }
        };
        let mut ended: Vec<Option<Ended>> = vec![None; ends.len()];
        for row in rows {
            let i: i32 = row.get(0);
            let Some(e) = usize::try_from(i - 1).ok().and_then(|i| ended.get_mut(i)) else {
                continue;
            };
            *e = Some(Ended {
                won: row.get(1),
                target: row.get(2),
                state: row.get(3),
                pressed_at: row.get(4),
                ended_at: row.get(5),
                by_name: row.get(6),
            });
        }
        // `ringpush_end_ring` answers every end, or fails the statement.
        ended
            .into_iter()
            .map(|e| e.ok_or_else(|| "an end got no answer".to_owned()))
            .collect()
    }

    /// Ends `missed` up to `limit` rings past their deadline, and hands them to `announce`
    /// (which publishes their ends); commits only when it succeeds. Returns how many.
    pub async fn sweep_missed<F, Fut>(&self, limit: i64, announce: F) -> Result<usize, String>
    where
        F: FnOnce(Vec<Missed>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| DbError::from(e).to_string())?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| DbError::from(e).to_string())?;
        tx.batch_execute(IDLE_BOUND)
            .await
            .map_err(|e| DbError::from(e).to_string())?;
        let rows = tx
            .query(MISSED, &[&limit])
            .await
            .map_err(|e| DbError::from(e).to_string())?;
        if rows.is_empty() {
            return Ok(0);
        }
        let missed: Vec<Missed> = rows
            .iter()
            .map(|row| Missed {
                gateway: row.get(0),
                event: row.get(1),
                deadline: row.get(2),
            })
            .collect();
        let n = missed.len();
        // The rows stay locked while their ends are published: not for long.
        tokio::time::timeout(ANNOUNCE_TIMEOUT, announce(missed))
            .await
            .map_err(|_| {
                format!("publishing the missed rings' ends took over {ANNOUNCE_TIMEOUT:?}")
            })??;
        tx.commit()
            .await
            .map_err(|e| DbError::from(e).to_string())?;
        Ok(n)
    }

    /// Deletes the rings older than `keep` (the history's retention), and the ends whose ring
    /// never came once `orphan` has passed; returns how many.
    pub async fn sweep(&self, keep: Duration, orphan: Duration) -> Result<u64, DbError> {
        bounded(async {
            let client = self.pool.get().await?;
            let old = client
                .execute(SWEEP_HISTORY, &[&keep.as_secs_f64()])
                .await?;
            let orphans = client
                .execute(SWEEP_ORPHAN_ENDS, &[&orphan.as_secs_f64()])
                .await?;
            Ok(old + orphans)
        })
        .await
    }
}

/// The last `limit` rings of `gateway`, newest first.
pub async fn history(pool: &Pool, gateway: &str, limit: i64) -> Result<Vec<HistoryRow>, DbError> {
    let client = pool.get().await?;
    let rows = client.query(HISTORY, &[&gateway, &limit]).await?;
    Ok(rows
        .iter()
        .map(|row| HistoryRow {
            event_id: row.get(0),
            switch_id: row.get(1),
            pressed_at: row.get(2),
            state: row.get(3),
            ended_at: row.get(4),
            reason: row.get(5),
            by_user: row.get(6),
            by_name: row.get(7),
            phones: row.get(8),
            presses: row.get(9),
        })
        .collect())
}

/// The end a sweep publishes for a ring it found missed: a v2 end whose own id is the ring's.
pub fn missed_end(missed: &Missed) -> EndEvent {
    EndEvent {
        event_id: missed.event.clone(),
        ring_id: missed.event.clone(),
        gateway_id: missed.gateway.clone(),
        reason: EndReason::Missed,
        by_user: None,
        at: Some(missed.deadline),
    }
}

/// Adds `asks` to `queue` and awaits their answers; the first caller while no statement
/// runs starts `runner` (on a task of its own, so a caller that goes away never stops the
/// others'). `what` names the statement in the error of an abandoned one.
async fn grouped<A, R>(
    queue: &Mutex<Queue<A, R>>,
    asks: Vec<A>,
    what: &str,
    runner: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Vec<R>, String> {
    if asks.is_empty() {
        return Ok(Vec::new());
    }
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.waiting.push((asks, tx));
        !std::mem::replace(&mut queue.running, true)
    };
    if start {
        tokio::spawn(runner);
    }
    rx.await
        .unwrap_or_else(|_| Err(format!("{what} was abandoned")))
}

/// Runs what waits in `queue`, all of it in one call of `run` at a time, until nothing does;
/// answers each caller its part (by position).
async fn run_grouped<A, R, F, Fut>(queue: &Mutex<Queue<A, R>>, run: F)
where
    F: Fn(Vec<A>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<R>, String>>,
{
    /// Frees the runner's place also when a statement panics.
    struct Running<'a, A, R>(&'a Mutex<Queue<A, R>>);
    impl<A, R> Drop for Running<'_, A, R> {
        fn drop(&mut self) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).running = false;
        }
    }
    let _running = Running(queue);
    loop {
        let waiting = {
            let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.waiting.is_empty() {
                return;
            }
            std::mem::take(&mut queue.waiting)
        };
        let (asks, answers): (Vec<Vec<A>>, Vec<_>) = waiting.into_iter().unzip();
        let lengths: Vec<usize> = asks.iter().map(Vec::len).collect();
        match run(asks.into_iter().flatten().collect()).await {
            Ok(mut all) => {
                for (n, tx) in lengths.into_iter().zip(answers).rev() {
                    let mine = all.split_off(all.len() - n);
                    let _ = tx.send(Ok(mine));
                }
            }
            Err(e) => {
                for tx in answers {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(result) => result,
        Err(_) => Err(DbError::Timeout(TIMEOUT)),
    }
}
