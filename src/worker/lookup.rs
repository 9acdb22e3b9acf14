//! Looking up a batch's gateways — one grouped query for the batch — and holding the rings
//! while the database cannot be used: consumption pauses, the probe runs, and the batch is
//! looked up again when it works. A lookup that fails for its input, or keeps timing out,
//! is tried gateway by gateway, so only the rings whose gateway fails alone are
//! dead-lettered.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::wire::logged;

use super::decide::{decide, Step};
use super::pause::{pause, Paused};
use super::read::{Incoming, Life};
use super::settle::settle;
use super::Context;
use crate::db::{Found, Gateway, LookupError, RingKey};

/// Timeouts of one grouped lookup before its gateways are looked up one by one, and of one
/// gateway's lookup alone before its rings are dead-lettered.
const MAX_LOOKUP_TIMEOUTS: u32 = 2;

/// The gateways a batch's rings go to: one grouped answer, or answers put together gateway
/// by gateway.
pub(super) enum Gateways {
    Grouped(Found),
    Each(HashMap<String, Gateway>),
}

impl Gateways {
    pub(super) fn get(&self, id: &str) -> Option<&Gateway> {
        match self {
            Gateways::Grouped(found) => found.as_ref().as_ref().ok()?.get(id),
            Gateways::Each(map) => map.get(id),
        }
    }
}

/// A batch looked up: its gateways, when the statement of the grouped query that found them
/// was sent (`None` when they were looked up gateway by gateway), and the rings another copy
/// of which is in hand (in this worker or another: a gateway's re-publish), which wait for
/// it ([`wait_for_claim`]) instead of being pushed now.
pub(super) struct Looked {
    pub(super) gateways: Gateways,
    pub(super) sent: Option<Instant>,
    pub(super) waiting: Vec<Incoming>,
}

/// The distinct gateways of `rings`.
fn gateway_ids(rings: &[Incoming]) -> Vec<String> {
    rings
        .iter()
        .map(Incoming::gateway)
        .collect::<HashSet<_>>()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// The rings to claim (their positions): each reserved in this process first (a copy of a
/// ring another copy of which is in hand here waits for it); a ring claimed on an earlier
/// turn (the database failed meanwhile) keeps its claim.
fn reserve(ctx: &Context, rings: &mut [Incoming], claims_on: bool) -> Vec<usize> {
    let mut asking = Vec::new();
    if claims_on {
        for (i, ring) in rings.iter_mut().enumerate() {
            if ring.claim.is_none() {
                ring.claim = ctx.claims.reserve(ring.key());
            }
            if ring.claim.as_ref().is_some_and(|c| !c.held()) {
                asking.push(i);
            }
        }
    }
    asking
}

/// Without claims, the rings a worker may have pushed before, whose ledger entries are read
/// beside the lookup.
fn maybe_seen(ctx: &Context, rings: &[Incoming], claims_on: bool) -> Vec<RingKey> {
    if !ctx.settings.ledger || claims_on {
        return Vec::new();
    }
    rings
        .iter()
        .filter(|r| r.maybe_seen)
        .map(Incoming::key)
        .collect()
}

/// Looked up: the ledger's word noted on the rings seen before, and the rings another copy
/// of which is in hand (their claim not held) set aside to wait for it.
fn set_aside_waiting(
    rings: &mut Vec<Incoming>,
    seen: &crate::db::Seen,
    claims_on: bool,
) -> Vec<Incoming> {
    for ring in rings.iter_mut().filter(|r| r.maybe_seen) {
        if let Some(recorded) = seen.get(&ring.key()) {
            ring.recorded = recorded.clone();
        }
    }
    let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(rings)
        .into_iter()
        .partition(|r| !claims_on || r.claim.as_ref().is_some_and(|c| c.held()));
    *rings = ready;
    for ring in &waiting {
        info!(
            gateway = ring.gateway(),
            event = ring.event(),
            "another copy of this ring is in hand (a gateway's re-publish); waiting for it"
        );
    }
    waiting
}

/// Looks up the gateways of `rings` and, beside it in one statement on the primary, claims
/// them (reading the ledger for those claimed before; without claims, the ledger is read for
/// the rings that may have been seen). While the database cannot be used, the rings are held
/// (consumption paused, a probe running) and looked up again when it answers; rings that
/// expire meanwhile, or whose gateway fails alone with a data error or keeps timing out, are
/// settled and leave `rings`, as do the rings another copy of which is in hand
/// ([`Looked::waiting`]). `None` when `abort` fired (every ring left was handed back).
pub(super) async fn lookup_holding(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    abort: &CancellationToken,
) -> Option<Looked> {
    let mut timeouts = 0;
    let claims_on = ctx.claims_on();
    loop {
        if rings.is_empty() {
            return Some(Looked {
                gateways: Gateways::Each(HashMap::new()),
                sent: None,
                waiting: Vec::new(),
            });
        }
        let ids = gateway_ids(rings);
        let asking = reserve(ctx, rings, claims_on);
        let asks: Vec<_> = asking
            .iter()
            .map(|&i| {
                (
                    rings[i].claim.as_ref().expect("reserved"),
                    rings[i].maybe_seen,
                )
            })
            .collect();
        let seen = maybe_seen(ctx, rings, claims_on);
        let (begins, ends) = life_asks(rings);
        let ((found, sent), seen, claimed, begun, ended) = tokio::join!(
            ctx.lookups.lookup_timed(ids.clone()),
            ctx.ledger.seen(&seen),
            ctx.claims.claim(&asks),
            ctx.rings
                .begin(begins.iter().map(|(_, b)| b.clone()).collect()),
            ctx.rings.end(
                ends.iter()
                    .map(|&i| rings[i].end.clone().expect("an end"))
                    .collect()
            ),
        );
        drop(asks);
        // What the claims found, at once: a ring claimed keeps its claim (and the ledger's
        // word) whatever happens next.
        let claimed = claimed.map(|claimed| {
            for (&i, held) in asking.iter().zip(claimed) {
                if let Some(held) = held {
                    rings[i].recorded = held.recorded;
                    if held.ended && rings[i].end.is_none() {
                        rings[i].life = Life::Ended;
                    }
                }
            }
        });
        let life = note_life(ctx, rings, &begins, begun, &ends, ended);
        let looked_up = match &*found {
            Ok(_) => Ok((Gateways::Grouped(found), sent)),
            Err(e @ LookupError::Timeout(_)) if timeouts + 1 < MAX_LOOKUP_TIMEOUTS => {
                timeouts += 1;
                warn!(rings = rings.len(), error = %e, "token lookup timed out; trying again");
                continue;
            }
            Err(LookupError::Data(_) | LookupError::Timeout(_)) => {
                lookup_one_by_one(ctx, rings, &ids)
                    .await
                    .map(|each| (Gateways::Each(each), None))
                    .map_err(|e| format!("the token lookup failed: {e}"))
            }
            Err(LookupError::Unavailable(e)) => Err(format!("the token lookup failed: {e}")),
        };
        let trouble = match (looked_up, seen, claimed, life) {
            (Ok((gateways, sent)), Ok(seen), Ok(()), Ok(())) => {
                let waiting = set_aside_waiting(rings, &seen, claims_on);
                return Some(Looked {
                    gateways,
                    sent,
                    waiting,
                });
            }
            (Err(trouble), _, _, _) => trouble,
            (_, Err(e), _, _) => format!("the delivery ledger could not be read: {e}"),
            (_, _, Err(e), _) => format!("the rings could not be claimed: {e}"),
            (_, _, _, Err(e)) => format!("the rings' states could not be written: {e}"),
        };
        error!(rings = rings.len(), error = %trouble, "holding the rings and pausing consumption");
        pause(&ctx.shared, Paused::Database, &trouble);
        if !hold(ctx, rings, abort, &trouble).await {
            return None;
        }
        // Held while the database failed, perhaps longer than a claim's lease: claimed again.
        for claim in rings.iter().filter_map(|r| r.claim.as_ref()) {
            claim.may_have_lapsed();
        }
    }
}

/// What the ring's life asks of the database for `rings`: the rings to register (by
/// position) and the ends to record (their positions).
fn life_asks(rings: &[Incoming]) -> (Vec<(usize, crate::db::rings::Begin)>, Vec<usize>) {
    let mut begins = Vec::new();
    let mut ends = Vec::new();
    for (i, r) in rings.iter().enumerate() {
        if r.end.is_some() {
            ends.push(i);
        } else {
            begins.push((
                i,
                crate::db::rings::Begin {
                    gateway: r.ring.gateway_id.clone(),
                    event: r.ring.event_id.clone(),
                    switch: r.ring.switch_id.clone(),
                    pressed_at: r.ring.pressed_at,
                },
            ));
        }
    }
    (begins, ends)
}

/// Notes on each ring what its life's statements said: a ring ringing, folded or ended; an
/// end that ended its ring (counted, once, on its first delivery) or came too late.
fn note_life(
    ctx: &Context,
    rings: &mut [Incoming],
    begins: &[(usize, crate::db::rings::Begin)],
    begun: Result<Vec<crate::db::rings::Begun>, String>,
    ends: &[usize],
    ended: Result<Vec<crate::db::rings::Ended>, String>,
) -> Result<(), String> {
    use crate::db::rings::Begun;
    let begun = begun?;
    for ((i, _), b) in begins.iter().zip(begun) {
        let ring = &mut rings[*i];
        ring.life = match (b, &ring.life) {
            // The claim saw the end: it stands.
            (_, Life::Ended) => Life::Ended,
            (Begun::Ringing, _) => Life::Ringing,
            (Begun::Folded(into), _) => Life::Folded(into),
            (Begun::Ended(_), _) => Life::Ended,
        };
    }
    for (&i, e) in ends.iter().zip(ended?) {
        let ring = &mut rings[i];
        if e.won {
            let first = ring.attempt == 0 && !ring.maybe_seen && ring.life == Life::Unknown;
            if first {
                ctx.counters.count_end(&e);
            }
            ring.life = Life::FollowUp(e);
        } else {
            ring.life = Life::AlreadyEnded(e.state);
        }
    }
    Ok(())
}

/// First wait before a ring another copy of which is in hand claims again, doubling up to
/// [`CLAIM_POLL_CAP`] (jittered): the holder normally settles within a push's time.
const CLAIM_POLL_FIRST: Duration = Duration::from_millis(50);
const CLAIM_POLL_CAP: Duration = Duration::from_millis(500);

/// Waits until this worker can claim `incoming`, another copy of which is in hand (in this
/// process, or another worker's live claim): claims again now and then — no attempt spent,
/// no nack — and returns `true` with the ring claimed and the ledger read (the holder's
/// entry written: its phones are not pushed again), or when the holder's lease lapsed (it
/// died). `false` when the ring was settled instead: its TTL passed (dead-lettered, as a
/// held ring is) or `abort` fired (handed back).
pub(super) async fn wait_for_claim(
    ctx: &Arc<Context>,
    incoming: &mut Incoming,
    abort: &CancellationToken,
) -> bool {
    let since = Instant::now();
    let ttl = ctx.settings.ring_ttl;
    let mut turns = 0;
    loop {
        let left = incoming.time_left(ttl);
        if left.is_zero() {
            let step = Step::ExpiredWhileHeld {
                ttl,
                attempt: incoming.attempt,
                why: "another copy of the ring was in hand all along".into(),
            };
            settle(ctx, incoming, decide(step)).await;
            return false;
        }
        turns += 1;
        let wait = crate::backoff::jittered(CLAIM_POLL_FIRST, CLAIM_POLL_CAP, turns).min(left);
        tokio::select! {
            _ = abort.cancelled() => {
                settle(ctx, incoming, decide(Step::Stopping)).await;
                return false;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        if incoming.claim.is_none() {
            incoming.claim = ctx.claims.reserve(incoming.key());
        }
        let Some(claim) = incoming.claim.as_ref() else {
            continue;
        };
        match ctx.claims.claim(&[(claim, incoming.maybe_seen)]).await {
            Ok(claimed) => {
                if let Some(Some(held)) = claimed.into_iter().next() {
                    incoming.recorded = held.recorded;
                    // An end recorded while this copy waited: the ring is not pushed.
                    if held.ended && incoming.end.is_none() {
                        incoming.life = Life::Ended;
                    }
                    info!(
                        gateway = crate::wire::logged(incoming.gateway()),
                        event = crate::wire::logged(incoming.event()),
                        waited_ms = since.elapsed().as_millis() as u64,
                        recorded = incoming.recorded.len(),
                        "claimed the ring after its other copy; the phones that took it are not pushed again"
                    );
                    return true;
                }
            }
            Err(e) => {
                warn!(gateway = logged(incoming.gateway()), event = logged(incoming.event()), error = %e, "could not claim the ring; trying again")
            }
        }
    }
}

/// What one gateway's lookup, alone, came to.
enum Alone {
    /// Answered: the gateway (none: unknown).
    Found(Option<Gateway>),
    /// Refused for its own input (SQLSTATE class 22 or 23): its rings are dead-lettered.
    Refused(String),
    /// It kept taking longer than this: dead-lettered, unless every gateway does (then the
    /// database is slow, and the rings are held).
    TooSlow(std::time::Duration),
    /// The database could not be used: the worker's trouble.
    Unavailable(String),
}

/// After a grouped lookup failed for its input or kept timing out: each gateway alone, so
/// that only the rings of the gateway that fails alone are dead-lettered (with the
/// database's message) and the others go on. `Err` when the database itself is in trouble.
async fn lookup_one_by_one(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    ids: &[String],
) -> Result<HashMap<String, Gateway>, String> {
    // A few at a time, as grouped lookups run: one each at once would queue on the pool and
    // time out there, and turn the ring's trouble into the database's.
    let answers: Vec<_> = ids
        .iter()
        .map(|id| async move {
            let mut timeouts = 0;
            loop {
                match &*ctx.lookups.lookup_alone(id).await {
                    Err(LookupError::Timeout(_)) if timeouts + 1 < MAX_LOOKUP_TIMEOUTS => {
                        timeouts += 1;
                    }
                    Err(LookupError::Timeout(t)) => return Alone::TooSlow(*t),
                    Err(LookupError::Data(e)) => return Alone::Refused(e.clone()),
                    Err(LookupError::Unavailable(e)) => return Alone::Unavailable(e.clone()),
                    Ok(found) => return Alone::Found(found.get(id.as_str()).cloned()),
                }
            }
        })
        .collect();
    let answers: Vec<Alone> = futures_util::stream::iter(answers)
        .buffered(ctx.lookups.concurrency())
        .collect()
        .await;
    // Every gateway too slow on its own: the database is slow, not any one ring's lookup —
    // the worker's trouble, so the rings are held, not dead-lettered.
    if answers.len() > 1 && answers.iter().all(|a| matches!(a, Alone::TooSlow(_))) {
        return Err(format!(
            "every gateway's lookup took longer than {} on its own",
            crate::human::Human(crate::db::QUERY_TIMEOUT)
        ));
    }
    let mut each = HashMap::new();
    let mut refused = HashMap::new();
    for (id, answer) in ids.iter().zip(answers) {
        match answer {
            Alone::Found(Some(gateway)) => {
                each.insert(id.clone(), gateway);
            }
            Alone::Found(None) => {}
            Alone::Refused(e) => {
                refused.insert(id.as_str(), format!("the token lookup failed: {e}"));
            }
            Alone::TooSlow(t) => {
                let reason = format!(
                    "the token lookup of this gateway took longer than {}, {MAX_LOOKUP_TIMEOUTS} times",
                    crate::human::Human(t)
                );
                refused.insert(id.as_str(), reason);
            }
            Alone::Unavailable(trouble) => return Err(trouble),
        }
    }
    let (dead, keep): (Vec<_>, Vec<_>) = std::mem::take(rings)
        .into_iter()
        .partition(|r| refused.contains_key(r.gateway()));
    *rings = keep;
    join_all(dead.iter().map(|incoming| {
        let reason = refused[incoming.gateway()].clone();
        warn!(
            gateway = logged(incoming.gateway()),
            event = logged(incoming.event()),
            reason = logged(&reason),
            "the ring's own lookup fails"
        );
        settle(ctx, incoming, decide(Step::LookupRefused { reason }))
    }))
    .await;
    Ok(each)
}

/// Holds `rings` while consumption is paused: returns `true` when it opens again (the
/// caller tries again), having settled the rings whose TTL passed meanwhile (dead-lettered,
/// `why` in the reason); `false` when `abort` fired and every ring was handed back.
async fn hold(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    abort: &CancellationToken,
    why: &str,
) -> bool {
    let ttl = ctx.settings.ring_ttl;
    loop {
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(rings)
            .into_iter()
            .partition(|r| r.time_left(ttl).is_zero());
        *rings = waiting;
        join_all(expired.iter().map(|incoming| {
            let step = Step::ExpiredWhileHeld {
                ttl,
                attempt: incoming.attempt,
                why: why.to_owned(),
            };
            settle(ctx, incoming, decide(step))
        }))
        .await;
        if rings.is_empty() {
            return true;
        }
        let next_expiry = rings
            .iter()
            .map(|r| r.time_left(ttl))
            .min()
            .unwrap_or_default();
        tokio::select! {
            _ = ctx.pause.opened() => return true,
            _ = tokio::time::sleep(next_expiry + Duration::from_millis(1)) => {}
            _ = abort.cancelled() => {
                join_all(rings.drain(..).map(|incoming| async move {
                    settle(ctx, &incoming, decide(Step::Stopping)).await;
                }))
                .await;
                return false;
            }
        }
    }
}
