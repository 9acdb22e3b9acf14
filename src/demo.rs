//! `ringpush demo`: the whole pipeline on one machine. It migrates a schema of its own,
//! seeds users, gateways, shares and tokens (iPhones and Android phones, alert and call
//! style, of three apps), starts the mock APNs, the mock FCM and a worker in this process —
//! serving the app `default` and two brands, each from its folder with its own credentials —
//! publishes rings the way a gateway does, rotates a brand's key while it runs, and reports
//! what reached which phone, per user, platform and kind, and under which app's credentials.
//! It leaves the broker and the database as it found them.
//!
//! [`seed`]: the apps, people, phones and gateways; [`apps`]: the apps' folders and the
//! worker's reading of them; [`report`]: what the demo saw, printed.

mod apps;
mod report;
mod seed;

pub use apps::Rotation;
pub use report::{Carried, Report, SharedPush};

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::BasicProperties;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::apns::{binary, jwt};
use crate::broker;
use crate::local::Local;
use crate::mock::Mock;
use crate::mock_fcm::MockFcm;
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

    // The mocks: APNs (and, for the binary interface, its legacy gateway and feedback
    // service) and FCM, taking each app's credentials as its folder is written.
    std::fs::create_dir_all(dir)?;
    let binary = demo.binary;
    let mut mock_settings =
        crate::mock::Settings::local(dir.join("mock-certs"), crate::mock::AuthCheck::default());
    if binary {
        let any = "127.0.0.1:0".parse()?;
        mock_settings.binary = Some((any, any));
    }
    let mock = Mock::start(mock_settings, cancel.clone()).await?;
    let fcm_settings = crate::mock_fcm::Settings::local(dir.join("mock-fcm-certs"));
    let fcm_mock = MockFcm::start(fcm_settings, cancel.clone()).await?;
    let now_ms = jwt::unix_now() * 1000;
    for person in &people {
        for phone in &person.phones {
            let token = &phone.token;
            match (phone.unregistered, token.platform()) {
                (true, Platform::APNS) => mock.unregister(token, now_ms - 86_400_000),
                (true, _) => fcm_mock.faults(|f| {
                    f.unregistered.insert(token.as_str().to_owned());
                }),
                (false, _) => {}
            }
            if token.platform() == Platform::FCM {
                // Registered with its app's project: sent under another, refused.
                fcm_mock.bind_token(token.as_str(), seed::app(person.app).project);
            }
        }
    }
    // The binary interface knows only certificate auth; its feedback service is polled too
    // (with a client certificate from the mock's CA).
    let at = |addr: Option<std::net::SocketAddr>| {
        binary::Address::parse(&format!(
            "localhost:{}",
            addr.expect("binary ports are on").port()
        ))
        .map_err(anyhow::Error::msg)
    };
    let (gateway, service) = if binary {
        let service = feedback::Service {
            address: at(mock.feedback_addr())?,
            tls: local.binary_tls(&mock)?,
            every: Duration::from_millis(500),
        };
        (Some(at(mock.gateway_addr())?), Some(service))
    } else {
        (None, None)
    };
    // The apps: a folder each, read and built as `ringpush worker` does.
    let mut deployment = apps::start(&dir.join("apps"), &mock, &fcm_mock, gateway)?;

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
            providers: deployment.apps.providers().clone(),
            counters,
            // Read again every minute and on SIGHUP; the demo has them read at once after
            // its rotation.
            apps: Some(worker::Apps {
                apps: deployment.apps.clone(),
                poll: Duration::from_secs(60),
            }),
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
    let front = ring("front-1", "demo-front", now);
    // One press at the shop rings phones of three apps.
    let shop = ring("shop-1", seed::SHARED_GATEWAY.0, now);
    let first = [
        front.clone(),
        ring("garage-1", "demo-garage", now),
        ring("unknown-1", "demo-nowhere", now),
        ring("stale-1", "demo-front", now - Duration::from_secs(300)),
        shop.clone(),
    ];
    // The visitor presses again a second later, while the first ring still rings: folded
    // into it (debounce), published once the first has reached the phones.
    let again = ring("front-2", "demo-front", now + Duration::from_secs(1));
    for r in &first {
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
    // Bob answers at the front door and Erin at the shop once the rings have reached the
    // phones; nobody answers in the garage: it ends missed after the ring timeout (its end
    // comes from a worker).
    let deadline = Instant::now() + Duration::from_secs(30);
    while Counters::get(&counters.rings_delivered) < 3 {
        if Instant::now() > deadline {
            anyhow::bail!(
                "the front door's, the garage's and the shop's rings were not delivered within 30 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker::publish_ring(&channel, names, &again).await?;
    while Counters::get(&counters.rings_debounced) < 1 {
        if Instant::now() > deadline {
            anyhow::bail!("the second press at the front door was not handled within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Before Erin answers, a brand's key is rotated without a restart: the shop ring's
    // follow-ups go out with the new key.
    let rotation = deployment.rotate(&mock).await?;
    let client = pool.get().await?;
    let answer = async |ring: &RingEvent, name: &str| -> anyhow::Result<()> {
        let user: i64 = client
            .query_one("SELECT id FROM users WHERE name = $1", &[&name])
            .await?
            .get(0);
        let answered = crate::wire::ring::EndEvent {
            event_id: format!("answer-{}", random_hex(4)),
            ring_id: ring.event_id.clone(),
            gateway_id: ring.gateway_id.clone(),
            reason: crate::wire::ring::EndReason::Answered,
            by_user: Some(user),
            at: Some(OffsetDateTime::now_utc()),
        };
        broker::publish_end(&channel, names, &answered).await?;
        Ok(())
    };
    answer(&front, "Bob").await?;
    answer(&shop, "Erin").await?;
    drop(client);
    // The rings, the malformed message and the two ends; the missed ring's end comes on
    // top.
    let published = first.len() as u64 + 1 + 1 + 2;

    // Wait until every ring is settled, the garage's missed, and every dead token has gone
    // through the purger.
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = || {
        Counters::get(&counters.rings_acked) == published + 1
            && Counters::get(&counters.rings_ended) == 3
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
        (seed::SHARED_GATEWAY.1, "answered by Erin".to_owned()),
    ];
    report.shared = report::shared(&people, &mock, &fcm_mock, &shop.event_id);
    report.rotation = rotation;
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
