//! A configuration mistake never deletes the fleet's tokens (docs/design.md, Guarantees): while
//! APNs answers `BadDeviceToken` (production and sandbox swapped) or `DeviceTokenNotForTopic`
//! (a wrong topic) to every token, or FCM `SENDER_ID_MISMATCH` (another Firebase project),
//! the tokens stay, `/readyz` names the setting to check, and once the answers are right
//! again every ring of the mistake reaches its phones, once each. Ordinary dead tokens —
//! a few per cent, spread over many users — are purged as before. Against the real broker,
//! database and purge path, with the mocks recording what they accepted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ringpush::apns::Reason;
use ringpush::mock::{ErrorRate, Faults, Script};
use ringpush::token::{DeviceToken, Platform};
use ringpush::wire::ring::RingEvent;
use ringpush::worker::Counters;
use time::OffsetDateTime;

use crate::fcm::{add_fcm_token, fcm_accepted, fcm_settings};
use crate::support::{nothing_waiting_or_dead, App, TOPIC};

const GATEWAYS: usize = 200;

/// 200 gateways, each owner with three iPhones and an Android phone: 800 tokens.
struct Fleet {
    gateways: Vec<String>,
    iphones: Vec<DeviceToken>,
    androids: Vec<DeviceToken>,
    /// Each gateway's tokens, in the order of `gateways`.
    of: Vec<Vec<DeviceToken>>,
}

impl Fleet {
    async fn new(app: &App, prefix: &str) -> Self {
        let mut fleet = Fleet {
            gateways: Vec::new(),
            iphones: Vec::new(),
            androids: Vec::new(),
            of: Vec::new(),
        };
        for g in 0..GATEWAYS {
            let id = format!("{prefix}-{g:03}");
            let owner = app.add_user().await;
            app.add_gateway(&id, owner, "Door").await;
            let mut tokens = Vec::new();
            for _ in 0..3 {
                let t = app.add_token(owner, "production", Some(TOPIC)).await;
                fleet.iphones.push(t.clone());
                tokens.push(t);
            }
            let a = add_fcm_token(app, owner, "alert").await;
            fleet.androids.push(a.clone());
            tokens.push(a);
            fleet.gateways.push(id);
            fleet.of.push(tokens);
        }
        fleet
    }

    fn total(&self) -> usize {
        self.iphones.len() + self.androids.len()
    }

    /// One ring at every door.
    async fn ring_every_door(&self, app: &App) -> Vec<RingEvent> {
        let mut rings = Vec::new();
        for id in &self.gateways {
            let ring = App::ring(id, Duration::ZERO);
            app.publish(&ring).await;
            rings.push(ring);
        }
        rings
    }
}

async fn tokens_left(app: &App) -> usize {
    let client = app.pool.get().await.unwrap();
    let row = client
        .query_one("SELECT count(*) FROM push_tokens", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as usize
}

/// How often APNs (the mock) accepted each (event, token).
fn apns_accepted(app: &App) -> HashMap<(String, String), usize> {
    let mut accepted = HashMap::new();
    for r in app.mock.received() {
        if r.status == 200 {
            *accepted
                .entry((r.collapse_id().unwrap(), r.token.unwrap()))
                .or_default() += 1;
        }
    }
    accepted
}

/// (pairs never accepted, pairs accepted more than once) for `rings` × each ring's tokens of
/// `platform`.
fn reached(app: &App, fleet: &Fleet, rings: &[RingEvent], platform: Platform) -> (usize, usize) {
    let accepted = if platform == Platform::APNS {
        apns_accepted(app)
    } else {
        fcm_accepted(app)
    };
    let (mut missing, mut twice) = (0, 0);
    for (ring, tokens) in rings.iter().zip(&fleet.of) {
        for t in tokens.iter().filter(|t| t.platform() == platform) {
            let key = t.as_str().to_owned();
            match accepted.get(&(ring.event_id.clone(), key)) {
                None => missing += 1,
                Some(1) => {}
                Some(_) => twice += 1,
            }
        }
    }
    (missing, twice)
}

/// Rings every door while the provider answers every `platform` token with the mistake's
/// answer; checks nothing is purged and `/readyz` names `setting`; puts the answers right
/// (`fix`) and checks every ring of the mistake reaches each of its phones once, within 30 s.
async fn through_a_mistake(
    app: &App,
    fleet: &Fleet,
    platform: Platform,
    setting: &str,
    fix: impl FnOnce(),
) {
    let doubted_before = Counters::get(&app.counters.notifications_doubted);
    let rings = fleet.ring_every_door(app).await;
    let of_platform = if platform == Platform::APNS {
        fleet.iphones.len()
    } else {
        fleet.androids.len()
    } as u64;
    app.wait_for("every token of the platform doubted at least once", || {
        Counters::get(&app.counters.notifications_doubted) - doubted_before >= of_platform
    })
    .await;
    // The other platform's phones rang meanwhile.
    let other = if platform == Platform::APNS {
        Platform::FCM
    } else {
        Platform::APNS
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while reached(app, fleet, &rings, other).0 > 0 {
        assert!(
            Instant::now() < deadline,
            "the other platform's phones ring"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = app.scrape("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("configuration mistake"), "{body}");
    assert!(body.contains(setting), "/readyz names {setting}: {body}");
    let (_, metrics) = app.scrape("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "ringpush_config_suspected{{platform=\"{}\"}} 1",
            platform.as_str()
        )),
        "{metrics}"
    );
    // Give the purge path time to do harm, if it would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = tokens_left(app).await;
    assert!(
        left * 100 >= fleet.total() * 99,
        "at most 1 % of the tokens deleted: {left} of {} left",
        fleet.total()
    );

    fix();
    let fixed = Instant::now();
    let deadline = fixed + Duration::from_secs(30);
    loop {
        let (missing, twice) = reached(app, fleet, &rings, platform);
        assert_eq!(twice, 0, "no phone rang twice");
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every ring of the mistake reaches its phones within 30 s of the fix: {missing} (ring, phone) pairs missing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{platform}: every ring of the mistake reached its phones {:.1} s after the fix; {left} of {} tokens left",
        fixed.elapsed().as_secs_f64(),
        fleet.total()
    );
    let (missing, twice) = reached(app, fleet, &rings, other);
    assert_eq!(
        (missing, twice),
        (0, 0),
        "the other platform's phones, once"
    );
}

#[tokio::test]
async fn a_configuration_mistake_deletes_no_token_and_its_rings_ring_once_it_is_fixed() {
    let app = App::spawn_with(|o| {
        o.fcm = Some(fcm_settings());
        o.metrics = true;
    })
    .await;
    let fleet = Fleet::new(&app, "gw-mistake").await;
    let everything = |reason: Reason| Faults {
        error_rate: Some(ErrorRate {
            per_mille: 1000,
            status: 400,
            reason,
        }),
        ..Faults::default()
    };

    // A worker started with production and sandbox swapped: every token BadDeviceToken from
    // its first answer on.
    app.mock.set_faults(everything(Reason::BadDeviceToken));
    through_a_mistake(
        &app,
        &fleet,
        Platform::APNS,
        "RINGPUSH_APNS_PRODUCTION_URL",
        || app.mock.set_faults(Faults::default()),
    )
    .await;

    // A wrong topic while the worker runs: DeviceTokenNotForTopic for tokens it delivered to
    // a minute ago.
    app.mock
        .set_faults(everything(Reason::DeviceTokenNotForTopic));
    through_a_mistake(&app, &fleet, Platform::APNS, "RINGPUSH_APNS_TOPIC", || {
        app.mock.set_faults(Faults::default())
    })
    .await;

    // Another Firebase project's service account: SENDER_ID_MISMATCH for every Android phone.
    let fcm = app.fcm.as_ref().unwrap();
    fcm.faults(|f| f.error_rate = Some((1000, "SENDER_ID_MISMATCH".into())));
    through_a_mistake(
        &app,
        &fleet,
        Platform::FCM,
        "RINGPUSH_FCM_CREDENTIALS_FILE",
        || fcm.faults(|f| f.error_rate = None),
    )
    .await;

    assert_eq!(
        Counters::get(&app.counters.feedback_events),
        0,
        "no token was reported dead"
    );
    assert_eq!(tokens_left(&app).await, fleet.total(), "every token kept");
    nothing_waiting_or_dead(&app).await;
    app.stop_with_nothing_unacked().await;
}

#[tokio::test]
async fn two_per_cent_truly_dead_tokens_are_purged_within_a_minute_and_no_other() {
    let app = App::spawn().await;
    let fleet = Fleet::new(&app, "gw-dead").await;
    // 16 of the 800 (2 %), one phone each of 16 owners spread over the fleet: half answered
    // BadDeviceToken (the answer a mistake gives every token), half Unregistered.
    let now = OffsetDateTime::now_utc();
    let mut dead = Vec::new();
    for (i, tokens) in fleet.of.iter().enumerate().filter(|(i, _)| i % 12 == 5) {
        let token = tokens[i % 3].clone();
        app.registered_at(&token, now - time::Duration::days(30))
            .await;
        if dead.len() % 2 == 0 {
            app.mock.script(
                &token,
                Script {
                    status: 400,
                    reason: Reason::BadDeviceToken,
                    timestamp_ms: None,
                },
            );
        } else {
            let since = now - time::Duration::days(1);
            app.mock
                .unregister(&token, (since.unix_timestamp_nanos() / 1_000_000) as i64);
        }
        dead.push(token);
        if dead.len() == 16 {
            break;
        }
    }
    assert_eq!(dead.len(), 16);
    let started = Instant::now();
    // Rings flowing: every door rings, twice.
    for _ in 0..2 {
        fleet.ring_every_door(&app).await;
    }
    let deadline = started + Duration::from_secs(60);
    loop {
        let mut gone = 0;
        for t in &dead {
            gone += usize::from(!app.token_exists(t).await);
        }
        if gone == dead.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every truly dead token purged within a minute: {gone} of 16"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "16 dead tokens of 800 purged within {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        tokens_left(&app).await,
        fleet.total() - dead.len(),
        "no other token touched"
    );
    assert_eq!(Counters::get(&app.counters.notifications_doubted), 0);
    app.stop().await;
}
