//! `ringpush demo`: the whole pipeline on one machine. It migrates a schema of its own,
//! seeds users, gateways, shares and tokens (iPhones and Android phones, alert and call
//! style), starts the mock APNs, the mock FCM and a worker in this process, publishes rings
//! the way a gateway does, and reports what reached which phone, per user, platform and
//! kind. It leaves the broker and the database as it found them.
//!
//! [`seed`]: the people, their phones and gateways; [`report`]: what the demo saw, printed.

mod report;
mod seed;

pub use report::Report;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::BasicProperties;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::apns::jwt;
use crate::apns::{binary, Apns};
use crate::broker;
use crate::local::{self, Key, Local};
use crate::mock::Mock;
use crate::token::{random_hex, Kind, Platform};
use crate::wire::ring::RingEvent;
use crate::wire::ERROR_HEADER;
use crate::worker::{self, Counters};
use crate::{feedback, purge};

/// How long the demo's rings ring before they are missed (the garage's is).
const DEMO_RING_TIMEOUT: Duration = Duration::from_secs(3);

/// What the demo borrows and how it pushes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The local RabbitMQ: the demo declares queues of its own there and deletes them.
    pub amqp_url: broker::Endpoint,
    /// The local PostgreSQL: the demo migrates a schema of its own there and drops it.
    pub database_url: String,
    /// Push over the legacy binary interface instead of HTTP/2.
    pub binary: bool,
}

/// Runs the demo and cleans up after it, whatever happened: its queues (prefix
/// `ringpush-demo-<random>`), its schema and its files.
pub async fn run(settings: &Settings, cancel: CancellationToken) -> anyhow::Result<Report> {
    let local = Local::new("demo", settings.amqp_url.clone(), &settings.database_url);
    let workers = cancel.child_token();
    let result = run_inner(settings, &local, workers.clone()).await;
    workers.cancel();
    let cleaned = local.clean_up(&[]).await;
    let report = result?;
    cleaned?;
    Ok(report)
}

async fn run_inner(
    demo: &Settings,
    local: &Local,
    cancel: CancellationToken,
) -> anyhow::Result<Report> {
    let (names, dir) = (&local.names, &local.dir);
    let started = Instant::now();
    // Database: a schema of our own, migrated and seeded.
    local.create_migrated_schema().await?;
    let pool = local.pool(4, Duration::from_secs(5))?;
    let people = seed::people();
    seed::seed(&pool, &people).await?;

    // APNs: a key of our own, the mock checking JWTs with its public half.
    std::fs::create_dir_all(dir)?;
    let key = Key::generate("DEMOKEY123", "DEMOTEAM12")?;
    let signer = key.signer()?;
    let binary = demo.binary;
    let mut mock_settings = local.mock_settings(&key)?;
    if binary {
        let any = "127.0.0.1:0".parse()?;
        mock_settings.binary = Some((any, any));
    }
    let mock = Mock::start(mock_settings, cancel.clone()).await?;
    let now_ms = jwt::unix_now() * 1000;
    // FCM: a service account of our own, the mock taking its assertions.
    let placeholder = crate::http2::Endpoint::parse(crate::fcm::URL).map_err(anyhow::Error::msg)?;
    let (fcm_mock, fcm) =
        local::fcm_world(dir, crate::fcm::Settings::new(placeholder), cancel.clone()).await?;
    for phone in people.iter().flat_map(|p| &p.phones) {
        match (phone.unregistered, phone.token.platform()) {
            (false, _) => {}
            (true, Platform::APNS) => mock.unregister(&phone.token, now_ms - 86_400_000),
            (true, _) => fcm_mock.faults(|f| {
                f.unregistered.insert(phone.token.as_str().to_owned());
            }),
        }
    }
    // The binary interface knows only certificate auth: a client certificate from the
    // mock's CA; its feedback service is polled too.
    let (apns, service): (Apns, Option<feedback::Service>) = if binary {
        let tls = local.binary_tls(&mock)?;
        let at = |addr: Option<std::net::SocketAddr>| {
            binary::Address::parse(&format!(
                "localhost:{}",
                addr.expect("binary ports are on").port()
            ))
            .map_err(anyhow::Error::msg)
        };
        let client =
            binary::Client::new(binary::Settings::new(at(mock.gateway_addr())?), tls.clone());
        let service = feedback::Service {
            address: at(mock.feedback_addr())?,
            tls,
            every: Duration::from_millis(500),
        };
        (client.into(), Some(service))
    } else {
        let client = local::http2_client(&mock, None, mock.client_settings(), Arc::new(signer))?;
        (client.into(), None)
    };

    // A worker in this process.
    let counters = Arc::new(Counters::default());
    let settings = worker::Settings {
        prefetch: 64,
        batch_size: 16,
        default_topic: Some(seed::TOPIC.into()),
        // The demo waits for the garage's ring to be missed: 3 s, not the default 30 s.
        ring_timeout: DEMO_RING_TIMEOUT,
        ..worker::Settings::new(names.clone())
    };
    let feedback_counters = Arc::new(feedback::Counters::default());
    let purge_counters = Arc::new(purge::Counters::default());
    let mut processes = tokio::task::JoinSet::new();
    {
        let (url, counters, cancel) = (demo.amqp_url.clone(), counters.clone(), cancel.clone());
        let pool = pool.clone();
        let worker = worker::Process {
            settings,
            amqp_url: url,
            pools: pool.into(),
            providers: crate::worker::providers(Some(apns), Some(fcm)),
            counters,
            apps: None,
        };
        processes.spawn(worker.run(cancel));
    }
    {
        let (url, counters, cancel) = (
            demo.amqp_url.clone(),
            feedback_counters.clone(),
            cancel.clone(),
        );
        let settings = feedback::Settings {
            service,
            ..feedback::Settings::new(names.clone())
        };
        let feedback = feedback::Process {
            settings,
            amqp_url: url,
            counters,
        };
        processes.spawn(feedback.run(cancel));
    }
    {
        let (url, counters, cancel) = (
            demo.amqp_url.clone(),
            purge_counters.clone(),
            cancel.clone(),
        );
        let settings = purge::Settings {
            // Smaller batches than a deployment's: the demo's few requests purge at once.
            prefetch: 100,
            batch_size: 50,
            ..purge::Settings::new(names.clone())
        };
        let purge = purge::Process {
            settings,
            amqp_url: url,
            pool: pool.clone(),
            counters,
        };
        processes.spawn(purge.run(cancel));
    }

    // A gateway: rings as they are published in a home.
    let connection = broker::connect(&demo.amqp_url, "ringpush demo gateway").await?;
    let channel = broker::confirm_channel(&connection).await?;
    broker::declare(&channel, names).await?;
    let now = OffsetDateTime::now_utc();
    let ring = |event: &str, gateway: &str, pressed_at: OffsetDateTime| RingEvent {
        event_id: format!("{event}-{}", random_hex(4)),
        gateway_id: gateway.into(),
        pressed_at,
        switch_id: Some("front".into()),
    };
    let rings = [
        ring("front-1", "demo-front", now),
        ring("garage-1", "demo-garage", now),
        ring("unknown-1", "demo-nowhere", now),
        ring("stale-1", "demo-front", now - Duration::from_secs(300)),
        // The visitor presses again a second later, while the first ring still rings:
        // folded into it (debounce), published once the first has reached the phones.
        ring("front-2", "demo-front", now + Duration::from_secs(1)),
    ];
    let (again, first) = rings.split_last().expect("rings");
    for r in first {
        broker::publish_ring(&channel, names, r).await?;
    }
    let malformed = br#"{"v":1,"event_id":"no-gateway"}"#;
    broker::publish_confirmed(
        &channel,
        &names.rings,
        "ring.demo-front",
        malformed,
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await?;
    // Bob answers at the front door once the ring has reached the phones; nobody answers
    // in the garage: it ends missed after the ring timeout (its end comes from a worker).
    let deadline = Instant::now() + Duration::from_secs(30);
    while Counters::get(&counters.rings_delivered) < 2 {
        if Instant::now() > deadline {
            anyhow::bail!("the front door's and the garage's rings were not delivered within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker::publish_ring(&channel, names, again).await?;
    while Counters::get(&counters.rings_debounced) < 1 {
        if Instant::now() > deadline {
            anyhow::bail!("the second press at the front door was not handled within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bob: i64 = pool
        .get()
        .await?
        .query_one("SELECT id FROM users WHERE name = 'Bob'", &[])
        .await?
        .get(0);
    let answered = crate::wire::ring::EndEvent {
        event_id: format!("answer-{}", random_hex(4)),
        ring_id: rings[0].event_id.clone(),
        gateway_id: "demo-front".into(),
        reason: crate::wire::ring::EndReason::Answered,
        by_user: Some(bob),
        at: Some(OffsetDateTime::now_utc()),
    };
    broker::publish_end(&channel, names, &answered).await?;
    // The rings, the malformed message and the end; the missed ring's end comes on top.
    let published = rings.len() as u64 + 2;

    // Wait until every ring is settled, the garage's missed, and every dead token has gone
    // through the purger.
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = || {
        Counters::get(&counters.rings_acked) == published + 1
            && Counters::get(&counters.rings_ended) == 2
            // (the binary feedback service may add events of its own)
            && feedback::Counters::get(&feedback_counters.acked)
                >= Counters::get(&counters.feedback_events)
                    + feedback::Counters::get(&feedback_counters.service_tokens)
            && purge::Counters::get(&purge_counters.acked)
                == feedback::Counters::get(&feedback_counters.purge_requests)
    };
    while !settled() {
        if Instant::now() > deadline {
            anyhow::bail!(
                "still unsettled after 60 s: {counters:?} {feedback_counters:?} {purge_counters:?}"
            );
        }
        if let Some(stopped) = processes.try_join_next() {
            stopped??;
            anyhow::bail!("a process stopped early");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let client = pool.get().await?;
    let mut stale_left = 0;
    for phone in people.iter().flat_map(|p| &p.phones) {
        if phone.unregistered {
            let row = client
                .query_one(
                    "SELECT count(*) FROM push_tokens WHERE token = $1",
                    &[&phone.token.as_str()],
                )
                .await?;
            stale_left += row.get::<_, i64>(0);
        }
    }
    drop(client);

    let mut dead_reasons = Vec::new();
    while let Some(msg) = channel
        .basic_get(names.dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let reason = msg
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(ERROR_HEADER).cloned())
            .map(|v| match v {
                lapin::types::AMQPValue::LongString(s) => s.to_string(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        dead_reasons.push(reason);
    }
    let _ = connection.close(200, "done".into()).await;
    cancel.cancel();
    while let Some(stopped) = processes.join_next().await {
        stopped??;
    }

    let mut report = report::report(
        &people,
        &mock,
        &fcm_mock,
        &counters,
        published,
        elapsed,
        dead_reasons,
    );
    report.unsupported = Counters::get(&counters.notifications_unsupported);
    report.rings_debounced = Counters::get(&counters.rings_debounced);
    report.ends = vec![
        ("Front door", "answered by Bob".to_owned()),
        (
            "Garage",
            format!(
                "missed (nobody answered within {}s)",
                DEMO_RING_TIMEOUT.as_secs()
            ),
        ),
    ];
    report.voip_skipped = counters.followups(Platform::APNS, Kind::Call, "skipped_voip");
    report.feedback_events = Counters::get(&counters.feedback_events);
    report.purge_requests = feedback::Counters::get(&feedback_counters.purge_requests);
    report.tokens_purged = purge::Counters::get(&purge_counters.purged);
    report.stale_tokens_left = stale_left as u64;
    report.protocol = if binary {
        "legacy binary interface"
    } else {
        "HTTP/2"
    };
    Ok(report)
}
