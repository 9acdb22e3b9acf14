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
use tracing::{error, warn};

use super::decide::{decide, Step};
use super::pause::{pause, Paused};
use super::read::Incoming;
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

/// Looks up the gateways of `rings`. While the database cannot be used, the rings are held
/// (consumption paused, a probe running) and looked up again when it answers; rings that
/// expire meanwhile, or whose gateway fails alone with a data error or keeps timing out, are
/// settled and leave `rings`. With the gateways, when the statement of the grouped query
/// that found them was sent (`None` when they were looked up gateway by gateway). `None` when `abort` fired (every
/// ring left was handed back).
pub(super) async fn lookup_holding(
    ctx: &Arc<Context>,
    rings: &mut Vec<Incoming>,
    abort: &CancellationToken,
) -> Option<(Gateways, Option<Instant>)> {
    let mut timeouts = 0;
    loop {
        if rings.is_empty() {
            return Some((Gateways::Each(HashMap::new()), None));
        }
        let ids: Vec<String> = rings
            .iter()
            .map(Incoming::gateway)
            .collect::<HashSet<_>>()
            .into_iter()
            .map(str::to_owned)
            .collect();
        // The ledger is read beside the lookup, for the rings a worker may have pushed before.
        let seen: Vec<RingKey> = if ctx.settings.ledger {
            rings
                .iter()
                .filter(|r| r.maybe_seen)
                .map(Incoming::key)
                .collect()
        } else {
            Vec::new()
        };
        let ((found, sent), seen) = tokio::join!(
            ctx.lookups.lookup_timed(ids.clone()),
            ctx.ledger.seen(&seen)
        );
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
        let trouble = match (looked_up, seen) {
            (Ok(gateways), Ok(seen)) => {
                for ring in rings.iter_mut().filter(|r| r.maybe_seen) {
                    if let Some(recorded) = seen.get(&ring.key()) {
                        ring.recorded = recorded.clone();
                    }
                }
                return Some(gateways);
            }
            (Err(trouble), _) => trouble,
            (_, Err(e)) => format!("the delivery ledger could not be read: {e}"),
        };
        error!(rings = rings.len(), error = %trouble, "holding the rings and pausing consumption");
        pause(&ctx.shared, Paused::Database, &trouble);
        if !hold(ctx, rings, abort, &trouble).await {
            return None;
        }
    }
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
                    Err(LookupError::Timeout(t)) => {
                        return Err(Ok(format!(
                            "the token lookup of this gateway took longer than {t:?}, {MAX_LOOKUP_TIMEOUTS} times"
                        )))
                    }
                    Err(LookupError::Data(e)) => {
                        return Err(Ok(format!("the token lookup failed: {e}")))
                    }
                    Err(LookupError::Unavailable(e)) => return Err(Err(e.clone())),
                    Ok(found) => return Ok(found.get(id.as_str()).cloned()),
                }
            }
        })
        .collect();
    let answers: Vec<_> = futures_util::stream::iter(answers)
        .buffered(ctx.lookups.concurrency())
        .collect()
        .await;
    // Every gateway too slow on its own: the database is slow, not any one ring's lookup —
    // the worker's trouble, so the rings are held, not dead-lettered.
    if answers.len() > 1
        && answers
            .iter()
            .all(|a| matches!(a, Err(Ok(reason)) if reason.contains("took longer")))
    {
        return Err(format!(
            "every gateway's lookup took longer than {:?} on its own",
            crate::db::QUERY_TIMEOUT
        ));
    }
    let mut each = HashMap::new();
    let mut refused = HashMap::new();
    for (id, answer) in ids.iter().zip(answers) {
        match answer {
            Ok(Some(gateway)) => {
                each.insert(id.clone(), gateway);
            }
            Ok(None) => {}
            Err(Ok(reason)) => {
                refused.insert(id.as_str(), reason);
            }
            Err(Err(trouble)) => return Err(trouble),
        }
    }
    let (dead, keep): (Vec<_>, Vec<_>) = std::mem::take(rings)
        .into_iter()
        .partition(|r| refused.contains_key(r.gateway()));
    *rings = keep;
    join_all(dead.iter().map(|incoming| {
        let reason = refused[incoming.gateway()].clone();
        warn!(gateway = incoming.gateway(), event = incoming.event(), %reason, "the ring's own lookup fails");
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
