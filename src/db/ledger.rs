//! The delivery ledger: which tokens a push service accepted for a ring, so that a ring seen
//! again — redelivered after a lost ack, back from a retry tier, handed back at shutdown, on
//! this worker or any other — is not pushed again to a phone that already has it.
//!
//! Table `ring_ledger` (migration V5): one row per settled push that reached a phone, the
//! ring (gateway of its routing key, event id) and its accepted tokens as 8-byte hashes
//! ([`hash`]), concatenated. Rows are only inserted and swept: [`Ledger::record`] groups
//! the writes of concurrent rings into one statement (one commit) like a group commit;
//! [`Ledger::seen`] reads the rings of a batch in one statement (those of callers that ask
//! while a read runs, together in the next); [`Ledger::sweep`] deletes rows older than the
//! ring TTL plus a margin through the BRIN index on `recorded_at`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::oneshot;

use super::DbError;

/// A token as the ledger keeps it: the first 8 bytes of its SHA-256. Two tokens of one ring
/// share a hash with a chance of about n²/2⁶⁵ (one in 10¹¹ for a building's 3,000 phones);
/// the token itself never reaches the table.
pub type TokenHash = [u8; 8];

/// The ledger's hash of a token (its string as stored in `push_tokens`).
pub fn hash(token: &str) -> TokenHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut h = [0; 8];
    h.copy_from_slice(&digest.as_ref()[..8]);
    h
}

/// A ring as the ledger names it: the gateway its routing key names, and its event id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RingKey {
    pub gateway: String,
    pub event: String,
}

/// The tokens accepted for the rings asked about (a ring not seen is absent).
pub type Seen = HashMap<RingKey, HashSet<TokenHash>>;

/// Longest one ledger statement may take (then it counts as failed; the rings wait).
pub const LEDGER_TIMEOUT: Duration = Duration::from_secs(10);

/// Records the entries, and counts their phones on their rings' history rows (a follow-up's
/// entry names no ring row: it counts nothing).
const RECORD: &str = "WITH l AS (
    INSERT INTO ring_ledger (gateway_id, event_id, accepted)
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
    RETURNING gateway_id, event_id, length(accepted) / 8 AS n
)
UPDATE rings r SET phones = r.phones + s.n
FROM (SELECT gateway_id, event_id, sum(n)::int AS n FROM l GROUP BY 1, 2) s
WHERE r.gateway_id = s.gateway_id AND r.event_id = s.event_id";

const SEEN: &str = "SELECT l.gateway_id, l.event_id, l.accepted
FROM ring_ledger l
JOIN unnest($1::text[], $2::text[]) AS r(gateway_id, event_id)
  ON l.gateway_id = r.gateway_id AND l.event_id = r.event_id";

const SWEEP: &str =
    "DELETE FROM ring_ledger WHERE recorded_at < now() - make_interval(secs => $1::float8)";

/// One entry waiting to be written, and who waits for it.
type Waiter = (RingKey, Vec<u8>, oneshot::Sender<Result<(), String>>);

/// The rings one caller asks about, waiting for the next read, and where the answer goes.
type Reader = (Vec<RingKey>, oneshot::Sender<Result<Seen, String>>);

/// The reads waiting for the next statement, and whether one runs.
#[derive(Default)]
struct Reads {
    reading: bool,
    waiting: Vec<Reader>,
}

/// The ledger of one worker process (any number of workers share the table).
pub struct Ledger {
    pool: Pool,
    /// The worker's claims, told when the entries of the rings they hold are written.
    claims: std::sync::OnceLock<Arc<super::Claims>>,
    state: Mutex<Queue>,
    reads: Mutex<Reads>,
}

#[derive(Default)]
struct Queue {
    writing: bool,
    waiting: Vec<Waiter>,
}

impl Ledger {
    pub fn new(pool: Pool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            claims: std::sync::OnceLock::new(),
            state: Mutex::default(),
            reads: Mutex::default(),
        })
    }

    /// Tells `claims` when the entries of the rings it holds are written: that ends their
    /// claims (see [`super::Claims::recorded`]).
    pub(crate) fn end_claims(&self, claims: Arc<super::Claims>) {
        let _ = self.claims.set(claims);
    }

    /// Records that `accepted` (token hashes) took `ring`, committed when this returns `Ok`.
    /// Rings that settle while a write is running wait and go in the next statement
    /// together: one commit for all of them. The writes run on a task of their own, so a
    /// caller that goes away never stops the others'.
    pub async fn record(
        self: &Arc<Self>,
        ring: RingKey,
        accepted: &[TokenHash],
    ) -> Result<(), String> {
        if accepted.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut state = self.state.lock().unwrap();
            state.waiting.push((ring, accepted.concat(), tx));
            !std::mem::replace(&mut state.writing, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.drain().await });
        }
        rx.await
            .unwrap_or_else(|_| Err("the ledger write was abandoned".into()))
    }

    /// Writes what waits, one statement at a time, until nothing does.
    async fn drain(&self) {
        /// Frees the writer's place also when a write panics (the next caller starts one).
        struct Writing<'a> {
            state: &'a Mutex<Queue>,
            done: bool,
        }
        impl Drop for Writing<'_> {
            fn drop(&mut self) {
                if !self.done {
                    let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.writing = false;
                }
            }
        }
        let mut writing = Writing {
            state: &self.state,
            done: false,
        };
        loop {
            let waiting = {
                let mut state = self.state.lock().unwrap();
                if state.waiting.is_empty() {
                    state.writing = false;
                    writing.done = true;
                    return;
                }
                std::mem::take(&mut state.waiting)
            };
            let result = self.write(&waiting).await.map_err(|e| e.to_string());
            for (_, _, tx) in waiting {
                let _ = tx.send(result.clone());
            }
        }
    }

    async fn write(&self, entries: &[Waiter]) -> Result<(), DbError> {
        let gateways: Vec<&str> = entries.iter().map(|e| e.0.gateway.as_str()).collect();
        let events: Vec<&str> = entries.iter().map(|e| e.0.event.as_str()).collect();
        let accepted: Vec<&[u8]> = entries.iter().map(|e| e.1.as_slice()).collect();
        bounded(async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(RECORD).await?;
            client
                .execute(&statement, &[&gateways, &events, &accepted])
                .await?;
            Ok(())
        })
        .await?;
        if let Some(claims) = self.claims.get() {
            claims.recorded(entries.iter().map(|e| &e.0));
        }
        Ok(())
    }

    /// The tokens recorded for `rings`. The reads of callers that ask while a read runs (the
    /// follow-ups of a batch's ends, each on its own) go into the next statement together.
    pub async fn seen(self: &Arc<Self>, rings: &[RingKey]) -> Result<Seen, String> {
        if rings.is_empty() {
            return Ok(Seen::new());
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            reads.waiting.push((rings.to_vec(), tx));
            !std::mem::replace(&mut reads.reading, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.read_waiting().await });
        }
        rx.await
            .unwrap_or_else(|_| Err("the ledger read was abandoned".into()))
    }

    /// Reads what waits, one statement at a time, until nothing does; answers each caller
    /// the rings it asked about.
    async fn read_waiting(&self) {
        /// Frees the reader's place also when a read panics (the next caller starts one).
        struct Reading<'a>(&'a Mutex<Reads>);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|e| e.into_inner()).reading = false;
            }
        }
        let _reading = Reading(&self.reads);
        loop {
            let waiting = {
                let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
                if reads.waiting.is_empty() {
                    return;
                }
                std::mem::take(&mut reads.waiting)
            };
            let all: Vec<&RingKey> = waiting.iter().flat_map(|(rings, _)| rings).collect();
            match self.read(&all).await {
                Ok(seen) => {
                    for (rings, tx) in waiting {
                        let mine = rings
                            .iter()
                            .filter_map(|r| seen.get(r).map(|t| (r.clone(), t.clone())))
                            .collect();
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

    /// The tokens recorded for `rings`, in one statement.
    async fn read(&self, rings: &[&RingKey]) -> Result<Seen, DbError> {
        let mut seen = Seen::new();
        let gateways: Vec<&str> = rings.iter().map(|r| r.gateway.as_str()).collect();
        let events: Vec<&str> = rings.iter().map(|r| r.event.as_str()).collect();
        let rows = bounded(async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(SEEN).await?;
            Ok(client.query(&statement, &[&gateways, &events]).await?)
        })
        .await?;
        for row in rows {
            let key = RingKey {
                gateway: row.get(0),
                event: row.get(1),
            };
            let accepted: &[u8] = row.get(2);
            let tokens = seen.entry(key).or_default();
            for h in accepted.chunks_exact(8) {
                tokens.insert(h.try_into().expect("chunks of 8"));
            }
        }
        Ok(seen)
    }

    /// Deletes the entries recorded more than `keep` ago; returns how many.
    pub async fn sweep(&self, keep: Duration) -> Result<u64, DbError> {
        bounded(async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(SWEEP).await?;
            Ok(client.execute(&statement, &[&keep.as_secs_f64()]).await?)
        })
        .await
    }

    /// Whether the ledger can be written now: the write itself, of nothing (it needs the same
    /// table, grants and a writable primary as a real one). What a paused worker probes.
    pub async fn probe(pool: &Pool) -> Result<(), DbError> {
        let client = pool.get().await?;
        let statement = client.prepare_cached(RECORD).await?;
        let none: &[&str] = &[];
        let bytes: &[&[u8]] = &[];
        client.execute(&statement, &[&none, &none, &bytes]).await?;
        Ok(())
    }
}

/// A statement bounded by [`LEDGER_TIMEOUT`] (a timed-out one fails like a lost connection).
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(LEDGER_TIMEOUT, f).await {
        Ok(result) => result,
        Err(_) => Err(DbError::Timeout(LEDGER_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_hash_is_the_first_eight_bytes_of_its_sha256() {
        // sha256("abc") = ba7816bf 8f01cfea …
        assert_eq!(
            hash("abc"),
            [0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea]
        );
        assert_ne!(hash("00aa"), hash("00ab"));
    }
}
