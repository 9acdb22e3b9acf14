//! `ringpush demo`: the whole pipeline on one machine. It migrates a schema of its own,
//! seeds users, gateways, shares and tokens (iPhones and Android phones, alert and call
//! style), starts the mock APNs, the mock FCM and a worker in this process, publishes rings
//! the way a gateway does, and reports what reached which phone, per user, platform and
//! kind. It leaves the broker and the database as it found them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
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
use crate::mock_fcm::MockFcm;
use crate::token::{random_hex, DeviceToken, Kind, Platform};
use crate::wire::ring::RingEvent;
use crate::wire::ERROR_HEADER;
use crate::worker::{self, Counters};
use crate::{feedback, purge};

const TOPIC: &str = "com.example.doorbell";

/// A person of the seed data, their phones and what they should hear.
struct Person {
    name: &'static str,
    phones: Vec<Phone>,
}

/// One phone: its token (with its platform), how it rings, its APNs environment, and whether
/// its app was deleted (the mock answers Unregistered / UNREGISTERED).
struct Phone {
    token: DeviceToken,
    kind: Kind,
    environment: &'static str,
    unregistered: bool,
}

impl Phone {
    fn new(platform: Platform, kind: Kind, environment: &'static str, unregistered: bool) -> Self {
        let token = crate::db::random_token(platform);
        Self {
            token: DeviceToken::parse_for(platform, &token).expect("a random token parses"),
            kind,
            environment,
            unregistered,
        }
    }

    /// `iPhone alert`, `Android call`, …
    fn label(&self) -> String {
        label(self.token.platform(), self.kind)
    }
}

fn label(platform: Platform, kind: Kind) -> String {
    let phone = match platform {
        Platform::APNS => "iPhone",
        Platform::FCM => "Android",
        other => other.as_str(),
    };
    format!("{phone} {kind}")
}

/// How long the demo's rings ring before they are missed (the garage's is).
const DEMO_RING_TIMEOUT: Duration = Duration::from_secs(3);

/// What the demo saw, printed for a person.
#[derive(Debug, Default)]
pub struct Report {
    pub elapsed: Duration,
    pub rings_published: u64,
    pub rings_consumed: u64,
    pub rings_delivered: u64,
    pub rings_expired: u64,
    pub rings_unknown_gateway: u64,
    pub rings_dead_lettered: u64,
    /// Presses folded into a ring still ringing (debounce).
    pub rings_debounced: u64,
    /// How each ring ended, per door.
    pub ends: Vec<(&'static str, String)>,
    /// Follow-ups accepted per person and phone kind, with what they said.
    pub followups_per_person: Vec<(String, String, String)>,
    /// iPhone VoIP tokens that got no follow-up (the app ends its CallKit call itself).
    pub voip_skipped: u64,
    /// Accepted notifications per person and phone kind (`iPhone alert`, `Android call`, …),
    /// with that kind's phone count.
    pub accepted_per_person: Vec<(String, String, u64, usize)>,
    /// Notifications not sent for lack of a provider that carries them (a call over the
    /// binary interface).
    pub unsupported: u64,
    /// Rejections per (person, reason).
    pub rejections: Vec<(String, String, u64)>,
    /// Reasons found on the dead queue.
    pub dead_reasons: Vec<String>,
    /// Feedback events the worker published for dead tokens.
    pub feedback_events: u64,
    /// Purge requests the feedback consumer published (repeats dropped).
    pub purge_requests: u64,
    /// Tokens the purger deleted.
    pub tokens_purged: u64,
    /// Tokens of deleted apps still in the database at the end (should be 0).
    pub stale_tokens_left: u64,
    /// `HTTP/2` or `binary`.
    pub protocol: &'static str,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ringpush demo ({}): {} messages published as gateways do, all settled in {:.2?}",
            self.protocol, self.rings_published, self.elapsed
        )?;
        writeln!(f)?;
        writeln!(f, "rings")?;
        writeln!(f, "  consumed            {:>4}", self.rings_consumed)?;
        writeln!(f, "  delivered           {:>4}", self.rings_delivered)?;
        writeln!(f, "  expired (not sent)  {:>4}", self.rings_expired)?;
        writeln!(f, "  unknown gateway     {:>4}", self.rings_unknown_gateway)?;
        writeln!(f, "  dead-lettered       {:>4}", self.rings_dead_lettered)?;
        writeln!(
            f,
            "  debounced           {:>4}  (a second press while the ring still rang)",
            self.rings_debounced
        )?;
        writeln!(f)?;
        writeln!(f, "ring ends")?;
        for (door, how) in &self.ends {
            writeln!(f, "  {door:<12} {how}")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "follow-ups (the ring ended: the phones that took it stop ringing)"
        )?;
        let mut last = "";
        for (who, phone, said) in &self.followups_per_person {
            let shown = if who == last { "" } else { who.as_str() };
            last = who;
            writeln!(f, "  {shown:<8} {phone:<14} {said}")?;
        }
        if self.voip_skipped > 0 {
            writeln!(
                f,
                "  (none to {} iPhone call token(s): the app ends its CallKit call itself)",
                self.voip_skipped
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "notifications accepted by APNs and FCM (mocks), per user and phone"
        )?;
        let mut last = "";
        for (who, phone, accepted, phones) in &self.accepted_per_person {
            let shown = if who == last { "" } else { who.as_str() };
            last = who;
            writeln!(
                f,
                "  {shown:<8} {phone:<14} {accepted:>4}  ({phones} phone{})",
                if *phones == 1 { "" } else { "s" }
            )?;
        }
        if self.unsupported > 0 {
            writeln!(
                f,
                "  (not sent: {} call ring(s) to iPhones — the binary interface has no VoIP pushes)",
                self.unsupported
            )?;
        }
        writeln!(f)?;
        writeln!(f, "rejections")?;
        if self.rejections.is_empty() {
            writeln!(f, "  none")?;
        }
        for (who, reason, n) in &self.rejections {
            writeln!(f, "  {who:<8} {reason:<14} {n:>4}  (that phone's app was deleted; the token is stale)")?;
        }
        writeln!(f)?;
        writeln!(f, "stale tokens")?;
        writeln!(
            f,
            "  feedback events     {:>4}  (one per rejection)",
            self.feedback_events
        )?;
        writeln!(
            f,
            "  purge requests      {:>4}  (repeats of a token dropped)",
            self.purge_requests
        )?;
        writeln!(f, "  deleted from db     {:>4}", self.tokens_purged)?;
        writeln!(f, "  still in db         {:>4}", self.stale_tokens_left)?;
        writeln!(f)?;
        writeln!(f, "dead queue")?;
        for reason in &self.dead_reasons {
            writeln!(f, "  x-ringpush-error: {reason}")?;
        }
        Ok(())
    }
}

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
    let people = seed_people();
    seed(&pool, &people).await?;

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
        default_topic: Some(TOPIC.into()),
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

    let mut report = report(
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

fn report(
    people: &[Person],
    mock: &Mock,
    fcm: &MockFcm,
    c: &Counters,
    published: u64,
    elapsed: Duration,
    dead_reasons: Vec<String>,
) -> Report {
    let owner: HashMap<String, &str> = people
        .iter()
        .flat_map(|p| {
            p.phones
                .iter()
                .map(move |phone| (phone.token.as_str().to_owned(), p.name))
        })
        .collect();
    let who = |token: Option<&str>| token.and_then(|t| owner.get(t).copied()).unwrap_or("?");
    let mut accepted: BTreeMap<(&str, String), u64> = BTreeMap::new();
    let mut rejected: BTreeMap<(&str, String), u64> = BTreeMap::new();
    let mut followups: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
    for r in mock.received() {
        let voip = r.headers.get("apns-push-type").is_some_and(|v| v == "voip");
        let kind = if voip { Kind::Call } else { Kind::Alert };
        let who = who(r.token.as_deref());
        let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
        if let (true, Some(state)) = (r.reason.is_none(), payload["state"].as_str()) {
            let said = format!(
                "{}: \"{}\" (silent, replaces the ring's banner)",
                state,
                payload["aps"]["alert"]["body"].as_str().unwrap_or_default()
            );
            followups
                .entry((who, label(Platform::APNS, kind)))
                .or_default()
                .push(said);
            continue;
        }
        match r.reason {
            None => {
                *accepted
                    .entry((who, label(Platform::APNS, kind)))
                    .or_default() += 1
            }
            Some(reason) => *rejected.entry((who, reason.to_string())).or_default() += 1,
        }
    }
    for r in fcm.received() {
        let message = &r.body["message"];
        let kind = match message["data"]["kind"].as_str() {
            Some("call") => Kind::Call,
            _ => Kind::Alert,
        };
        let who = who(r.token.as_deref());
        if r.status == 200 && message["data"]["kind"] == "ended" {
            let (kind, said) = match message["notification"]["body"].as_str() {
                Some(body) => (
                    Kind::Alert,
                    format!(
                        "{}: \"{body}\" (quiet channel, replaces the ring's notification)",
                        message["data"]["state"].as_str().unwrap_or_default()
                    ),
                ),
                None => (
                    Kind::Call,
                    format!(
                        "{} (data only: the app closes its call screen)",
                        message["data"]["state"].as_str().unwrap_or_default()
                    ),
                ),
            };
            followups
                .entry((who, label(Platform::FCM, kind)))
                .or_default()
                .push(said);
            continue;
        }
        match (r.status, r.code) {
            (200, _) => {
                *accepted
                    .entry((who, label(Platform::FCM, kind)))
                    .or_default() += 1
            }
            (_, Some(code)) => *rejected.entry((who, code)).or_default() += 1,
            (status, None) => *rejected.entry((who, format!("HTTP {status}"))).or_default() += 1,
        }
    }
    let mut per_person = Vec::new();
    for p in people {
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for phone in &p.phones {
            *kinds.entry(phone.label()).or_default() += 1;
        }
        for (phone, n) in kinds {
            let got = accepted.get(&(p.name, phone.clone())).copied().unwrap_or(0);
            per_person.push((p.name.to_owned(), phone, got, n));
        }
    }
    Report {
        elapsed,
        rings_published: published,
        rings_consumed: Counters::get(&c.rings_consumed),
        rings_delivered: Counters::get(&c.rings_delivered),
        rings_expired: Counters::get(&c.rings_expired),
        rings_unknown_gateway: Counters::get(&c.rings_unknown_gateway),
        rings_dead_lettered: Counters::get(&c.rings_dead_lettered),
        followups_per_person: people
            .iter()
            .flat_map(|p| {
                let followups = &followups;
                followups
                    .iter()
                    .filter(move |((who, _), _)| *who == p.name)
                    .flat_map(|((who, phone), said)| {
                        said.iter()
                            .map(|s| (who.to_string(), phone.clone(), s.clone()))
                    })
            })
            .collect(),
        accepted_per_person: per_person,
        rejections: rejected
            .into_iter()
            .map(|((who, reason), n)| (who.to_owned(), reason, n))
            .collect(),
        dead_reasons,
        ..Report::default()
    }
}

/// alice has two iPhones and an Android phone; bob an iPhone; carol a development iPhone
/// (sandbox), an iPhone whose app was deleted, and an iPhone that rings as a call; dan an
/// iPhone and an Android phone whose app was deleted.
fn seed_people() -> Vec<Person> {
    use Kind::{Alert, Call};
    const APNS: Platform = Platform::APNS;
    const FCM: Platform = Platform::FCM;
    vec![
        Person {
            name: "alice",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", false),
            ],
        },
        Person {
            name: "bob",
            phones: vec![Phone::new(APNS, Alert, "production", false)],
        },
        Person {
            name: "carol",
            phones: vec![
                Phone::new(APNS, Alert, "sandbox", false),
                Phone::new(APNS, Alert, "production", true),
                Phone::new(APNS, Call, "production", false),
            ],
        },
        Person {
            name: "dan",
            phones: vec![
                Phone::new(APNS, Alert, "production", false),
                Phone::new(FCM, Alert, "production", true),
            ],
        },
    ]
}

/// alice owns the front door and shares it with bob and carol (and, by mistake, with
/// herself); dan owns the garage and shares it with alice.
async fn seed(pool: &deadpool_postgres::Pool, people: &[Person]) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let mut ids = HashMap::new();
    for person in people {
        // The name "Answered by …" says: Alice, Bob, …
        let mut name = person.name.to_owned();
        name[..1].make_ascii_uppercase();
        let row = client
            .query_one(
                "INSERT INTO users (name) VALUES ($1) RETURNING id",
                &[&name],
            )
            .await?;
        let id: i64 = row.get(0);
        ids.insert(person.name, id);
        for (i, phone) in person.phones.iter().enumerate() {
            // Every other iPhone relies on the default topic (RINGPUSH_APNS_TOPIC).
            let apns = phone.token.platform() == Platform::APNS;
            let topic = (apns && i % 2 == 0).then_some(TOPIC);
            // A phone whose app was deleted registered its token a month ago.
            let age_days = if phone.unregistered { 30.0 } else { 0.0 };
            client
                .execute(
                    "INSERT INTO push_tokens (token, user_id, environment, topic, platform, kind, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, now() - make_interval(days => $7::float8::int))",
                    &[
                        &phone.token.as_str(),
                        &id,
                        &phone.environment,
                        &topic,
                        &phone.token.platform().as_str(),
                        &phone.kind.as_str(),
                        &age_days,
                    ],
                )
                .await?;
        }
    }
    let gateways = [
        (
            "demo-front",
            "Front door",
            "alice",
            &["bob", "carol", "alice"][..],
        ),
        ("demo-garage", "Garage", "dan", &["alice"][..]),
    ];
    for (gw, name, owner, sharees) in gateways {
        client
            .execute(
                "INSERT INTO gateways (id, owner_id, name) VALUES ($1, $2, $3)",
                &[&gw, &ids[owner], &name],
            )
            .await?;
        for s in sharees {
            client
                .execute(
                    "INSERT INTO gateway_shares (gateway_id, user_id) VALUES ($1, $2)",
                    &[&gw, &ids[s]],
                )
                .await?;
        }
    }
    Ok(())
}
