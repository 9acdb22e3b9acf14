//! Coalesced acks against the real broker: one `multiple` ack per settled run, never past a
//! delivery still in flight, and a slow delivery does not hold back the ones behind it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use ringpush::broker::{self, Acks, Control, Names};
use ringpush::token::random_hex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::support::{amqp_url, depth, TestQueues};

/// A fresh topology with `n` messages (bodies "0".."n-1") on its rings queue.
async fn queue_with(n: usize) -> (TestQueues, lapin::Connection) {
    let names = Names::new(&format!("t-{}", random_hex(4)));
    let connection = broker::connect(&amqp_url(), "ringpush acks test")
        .await
        .unwrap();
    let channel = broker::confirm_channel(&connection).await.unwrap();
    broker::declare(&channel, &names).await.unwrap();
    for i in 0..n {
        broker::publish_confirmed(
            &channel,
            "",
            &names.rings,
            i.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    (TestQueues(names), connection)
}

/// Polls `done` until it holds, for at most 30 s.
async fn until(done: impl Fn() -> bool, what: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {what}"));
}

/// Runs a consuming session until `n` deliveries are acked (at most 30 s), then ends it
/// and checks it ended cleanly.
async fn until_acked(
    consume: impl std::future::Future<Output = Result<(), broker::BrokerError>>,
    acked: &AtomicU64,
    n: usize,
    cancel: &CancellationToken,
    what: &str,
) {
    let watch = async {
        until(|| acked.load(Ordering::SeqCst) >= n as u64, what).await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(consume, watch);
    result.unwrap();
}

/// Messages the queue still holds once its consumers are gone (unacked ones are back).
async fn held(connection: &lapin::Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    let n = depth(&channel, queue).await;
    let _ = channel.close(200, "done".into()).await;
    n
}

#[tokio::test]
async fn settled_runs_are_acked_with_one_frame_each() {
    const N: usize = 200;
    let (queues, connection) = queue_with(N).await;
    let queue = queues.0.rings.clone();
    let cancel = CancellationToken::new();
    let (seen, batches, acked) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        AtomicU64::new(0),
    );
    let all_seen = Arc::new(Notify::new());
    let acks_of_session: Arc<Mutex<Option<Acks>>> = Arc::default();
    let consume = broker::consume_batches(
        &connection,
        &queue,
        N as u16,
        50,
        Control::new(cancel.clone(), Duration::from_secs(10)),
        Some(&acked),
        |acks, batch, _abort| {
            let (seen, batches, all_seen) = (seen.clone(), batches.clone(), all_seen.clone());
            *acks_of_session.lock().unwrap() = Some(acks.clone());
            async move {
                batches.fetch_add(1, Ordering::SeqCst);
                // Hold every delivery until all have arrived, then settle the batch
                // newest first: only the batch's oldest one lets a run start.
                let waiting = all_seen.notified();
                if seen.fetch_add(batch.len(), Ordering::SeqCst) + batch.len() == N {
                    all_seen.notify_waiters();
                } else {
                    waiting.await;
                }
                for delivery in batch.iter().rev() {
                    acks.ack(delivery);
                }
            }
        },
    );
    until_acked(consume, &acked, N, &cancel, "every delivery acked").await;
    let (batches, frames) = (
        batches.load(Ordering::SeqCst),
        acks_of_session.lock().unwrap().as_ref().unwrap().frames(),
    );
    // How the broker's deliveries fall into batches depends on timing (on a loaded machine
    // each can arrive alone); what must hold either way: at most one frame per settled run
    // (each batch settles all at once), and, since every delivery settles in one burst after
    // the last has arrived, far fewer frames than deliveries.
    assert!(
        frames as usize <= batches,
        "{frames} ack frames for {N} deliveries in {batches} batches: more than one per run"
    );
    assert!(
        (frames as usize) < N / 10,
        "{frames} ack frames for {N} deliveries settled together: acks were not coalesced"
    );
    assert_eq!(held(&connection, &queue).await, 0, "nothing left unacked");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_slow_delivery_does_not_hold_back_the_acks_behind_it() {
    // Prefetch 10 and 30 messages: if the 29 quick ones waited for the slow first one to be
    // acked, the window would stay full and the broker would never send them all.
    const N: usize = 30;
    let (queues, connection) = queue_with(N).await;
    let queue = queues.0.rings.clone();
    let cancel = CancellationToken::new();
    let (quick, acked) = (Arc::new(AtomicUsize::new(0)), AtomicU64::new(0));
    let release = Arc::new(Notify::new());
    let consume = broker::consume_batches(
        &connection,
        &queue,
        10,
        1,
        Control::new(cancel.clone(), Duration::from_secs(10)),
        Some(&acked),
        |acks, batch, _abort| {
            let (quick, release) = (quick.clone(), release.clone());
            async move {
                for delivery in &batch {
                    if delivery.data == b"0" {
                        release.notified().await;
                    } else {
                        quick.fetch_add(1, Ordering::SeqCst);
                    }
                    acks.ack(delivery);
                }
            }
        },
    );
    let drive = async {
        until(
            || {
                quick.load(Ordering::SeqCst) >= N - 1
                    && acked.load(Ordering::SeqCst) >= N as u64 - 1
            },
            "the quick deliveries flowed and were acked past the slow one",
        )
        .await;
        assert_eq!(
            acked.load(Ordering::SeqCst),
            N as u64 - 1,
            "the slow delivery is not acked while in flight"
        );
        release.notify_one();
        until(
            || acked.load(Ordering::SeqCst) >= N as u64,
            "the slow delivery acked once settled",
        )
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(consume, drive);
    // A `multiple` ack past the slow delivery and then its own ack would have closed the
    // channel with PRECONDITION_FAILED: the session ends cleanly only if neither happened.
    result.unwrap();
    assert_eq!(held(&connection, &queue).await, 0, "nothing left unacked");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_handler_that_panics_hands_its_unsettled_deliveries_back_at_once() {
    // The handler settles "1" and "3" of the fresh deliveries it gets, then panics (however
    // the five fall into batches). The other three must come back in the same session (not
    // when the channel closes) and be acked then.
    const N: usize = 5;
    let (queues, connection) = queue_with(N).await;
    let queue = queues.0.rings.clone();
    let cancel = CancellationToken::new();
    let acked = AtomicU64::new(0);
    let redelivered = Arc::new(Mutex::new(Vec::<String>::new()));
    let consume = broker::consume_batches(
        &connection,
        &queue,
        10,
        N,
        Control::new(cancel.clone(), Duration::from_secs(10)),
        Some(&acked),
        |acks, batch, _abort| {
            let redelivered = redelivered.clone();
            async move {
                let fresh = batch.iter().any(|d| !d.redelivered);
                for delivery in &batch {
                    let body = String::from_utf8_lossy(&delivery.data).into_owned();
                    if delivery.redelivered {
                        redelivered.lock().unwrap().push(body);
                        acks.ack(delivery);
                    } else if body == "1" || body == "3" {
                        acks.ack(delivery);
                    }
                }
                if fresh {
                    panic!("the handler fails on this batch (as the test wants)");
                }
            }
        },
    );
    until_acked(
        consume,
        &acked,
        N,
        &cancel,
        "every delivery acked in the session the handler panicked in",
    )
    .await;
    let mut again = redelivered.lock().unwrap().clone();
    again.sort();
    assert_eq!(
        again,
        ["0", "2", "4"],
        "exactly the unsettled ones came back"
    );
    assert_eq!(held(&connection, &queue).await, 0, "nothing left unacked");
    let _ = connection.close(200, "done".into()).await;
}
