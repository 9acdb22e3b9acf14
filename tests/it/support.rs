//! `App::spawn`: a fresh schema, queue prefix, mock APNs and worker for one test, removed
//! again when the test ends (also when it panics). The world is assembled by
//! `ringpush::local` (as the demo's and the bench's are); the proxies, the processes and
//! the clean-up on drop are the tests' own.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use ringpush::apns::http2;
use ringpush::apns::request::Endpoint;
use ringpush::apns::Apns;
use ringpush::broker::{self, Names};
use ringpush::local::{self, Key, Local};
use ringpush::mock::{self, Mock};
use ringpush::token::random_hex;
use ringpush::token::DeviceToken;
use ringpush::wire::ring::RingEvent;
use ringpush::worker::{self, Counters};
use ringpush::{feedback, purge};
use time::OffsetDateTime;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;

pub const TOPIC: &str = "com.example.doorbell";
pub const KEY_ID: &str = "TESTKEY123";
pub const TEAM_ID: &str = "TESTTEAM12";

pub fn amqp_url() -> String {
    std::env::var("RINGPUSH_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn database_url() -> String {
    std::env::var("RINGPUSH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of the test's own, migrated, dropped when this is dropped.
pub struct TestDb {
    pub schema: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let schema = format!("t_{}", random_hex(6));
        ringpush::db::create_schema(&database_url(), &schema)
            .await
            .expect("create schema");
        let url = ringpush::db::url_with_schema(&database_url(), &schema);
        Self { schema, url }
    }

    /// `local`'s schema, created empty, dropped when this is dropped.
    pub async fn of(local: &Local) -> Self {
        local.create_schema().await.expect("create schema");
        Self {
            schema: local.schema.clone(),
            url: local.db_url(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        on_fresh_runtime(async move {
            let _ = ringpush::db::drop_schema(&database_url(), &schema).await;
        });
    }
}

/// Deletes a queue prefix's topology when dropped.
pub struct TestQueues(pub Names);

impl Drop for TestQueues {
    fn drop(&mut self) {
        let names = self.0.clone();
        on_fresh_runtime(async move {
            let _ = local::delete_queues(&amqp_url(), &names, &[]).await;
        });
    }
}

/// Messages ready in a queue right now (a passive declare on `channel`).
pub async fn depth(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

/// Runs clean-up from a `Drop`, which may be inside a runtime that must not block.
fn on_fresh_runtime(f: impl std::future::Future<Output = ()> + Send + 'static) {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap();
}

/// What a test may change before the worker starts.
pub struct Options {
    pub worker: worker::Settings,
    pub mock: mock::Settings,
    pub feedback: feedback::Settings,
    pub purge: purge::Settings,
    /// The worker's APNs client (its endpoints are set to the mock's).
    pub apns: http2::Settings,
    /// Start the purger with the others (a test may start it later with `start_purger`).
    pub run_purger: bool,
    /// Start the feedback consumer with the others (a test may start it later with
    /// `start_feedback_at`).
    pub run_feedback: bool,
    /// Start the in-process worker (a test may start it later with `start_worker`).
    pub run_worker: bool,
    /// Put a fault proxy between the worker and the mock APNs.
    pub apns_proxy: bool,
    /// Put a fault proxy between the worker and PostgreSQL.
    pub db_proxy: bool,
    /// Put a fault proxy between the worker and RabbitMQ.
    pub amqp_proxy: bool,
    /// Serve the worker's /metrics, /healthz and /readyz on a loopback port.
    pub metrics: bool,
    /// Speak the legacy binary protocol (certificate auth) to the mock's gateway, and poll
    /// its feedback service.
    pub binary: bool,
    /// Apply `migrations/` to the test's schema (false: the schema starts empty, as before
    /// the deploy's `ringpush migrate` has run).
    pub migrate: bool,
    /// Start a mock FCM and give the worker an FCM client for it (with these settings; its
    /// URL is set to the mock's). `None`: the worker has no FCM credentials.
    pub fcm: Option<ringpush::fcm::Settings>,
}

pub struct App {
    pub names: Names,
    pub pool: Pool,
    pub mock: Mock,
    /// The mock FCM, with `Options::fcm`.
    pub fcm: Option<ringpush::mock_fcm::MockFcm>,
    /// The providers of the workers started in this test, and of `/readyz`.
    pub providers: ringpush::provider::Providers,
    pub counters: Arc<Counters>,
    pub feedback_counters: Arc<feedback::Counters>,
    pub purge_counters: Arc<purge::Counters>,
    purge_settings: purge::Settings,
    feedback_settings: feedback::Settings,
    worker_settings: worker::Settings,
    /// The worker's database pool (through the proxy when asked for).
    worker_pool: Pool,
    pub apns_proxy: Option<Proxy>,
    pub db_proxy: Option<Proxy>,
    pub amqp_proxy: Option<Proxy>,
    /// With `binary`: TLS with a client certificate from the mock's CA, for its gateway.
    pub binary_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// The .p8 key the worker signs with, and the test's schema URL (for a worker process).
    pub key_pem: String,
    pub db_url: String,
    /// Where the worker's metrics are served, when asked for.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The public half of the key the worker signs JWTs with.
    pub jwt_public_key: Vec<u8>,
    /// A confirm-mode channel for publishing rings and reading queues.
    pub channel: Channel,
    /// A confirm-mode channel that publishes to the test's queues as ringpush's processes do
    /// (through the internal exchange).
    pub publisher: broker::Publisher,
    connection: Connection,
    cancel: CancellationToken,
    /// The processes running in this test: worker, feedback consumer, purger.
    processes: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    // Dropped last, in this order: queues, then the schema, then the files.
    _queues: TestQueues,
    _db: TestDb,
    pub dir: std::path::PathBuf,
}

impl App {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(edit: impl FnOnce(&mut Options)) -> Self {
        let id = random_hex(6);
        let local = Local::named(
            Names::new(&format!("t-{id}")),
            format!("t_{}", random_hex(6)),
            std::env::temp_dir().join(format!("ringpush-test-{id}")),
            amqp_url(),
            &database_url(),
        );
        let (names, dir) = (local.names.clone(), local.dir.clone());
        let queues = TestQueues(names.clone());
        let db = TestDb::of(&local).await;
        let pool = local.pool(4, Duration::from_secs(5)).unwrap();

        let key = Key::generate(KEY_ID, TEAM_ID).unwrap();
        let signer = key.signer().unwrap();
        let jwt_public_key = signer.public_key();
        let mut options = Options {
            worker: worker::Settings {
                prefetch: 64,
                batch_size: 16,
                default_topic: Some(TOPIC.into()),
                probe_interval: Duration::from_millis(100),
                grace: Duration::from_secs(5),
                // The tests publish bursts of one gateway's rings, each a ring of its own;
                // the tests of a ring's life (life.rs) turn debounce on.
                ring_debounce: Duration::ZERO,
                ..worker::Settings::new(names.clone())
            },
            // The mock reads the key's public half from PEM, as `mock-apns` does.
            mock: local.mock_settings(&key).unwrap(),
            feedback: feedback::Settings {
                prefetch: 100,
                dedup_window: Duration::from_secs(600),
                service: None,
                ..feedback::Settings::new(names.clone())
            },
            purge: purge::Settings {
                prefetch: 100,
                batch_size: 50,
                db_retry_delay: Duration::from_millis(200),
                ..purge::Settings::new(names.clone())
            },
            apns: {
                let placeholder = Endpoint::parse("https://localhost").unwrap();
                http2::Settings::new(placeholder.clone(), placeholder)
            },
            run_purger: true,
            run_feedback: true,
            run_worker: true,
            apns_proxy: false,
            db_proxy: false,
            amqp_proxy: false,
            metrics: false,
            binary: false,
            migrate: true,
            fcm: None,
        };
        edit(&mut options);
        if options.migrate {
            local.migrate().await.expect("migrate");
        }
        if options.binary {
            let any = "127.0.0.1:0".parse().unwrap();
            options.mock.binary = Some((any, any));
        }

        let cancel = CancellationToken::new();
        let mock = Mock::start(options.mock, cancel.clone())
            .await
            .expect("mock starts");
        let apns_proxy = match options.apns_proxy {
            true => Some(Proxy::start(mock.addr()).await),
            false => None,
        };
        let binary_tls = match options.binary {
            false => None,
            true => Some(local.binary_tls(&mock).unwrap()),
        };
        if let (Some(tls), Some(addr)) = (&binary_tls, mock.feedback_addr()) {
            options.feedback.service = Some(feedback::Service {
                address: ringpush::apns::binary::Address::parse(&format!(
                    "localhost:{}",
                    addr.port()
                ))
                .unwrap(),
                tls: tls.clone(),
                every: Duration::from_millis(200),
            });
        }
        let worker_apns: Apns = if let (Some(tls), Some(addr)) = (&binary_tls, mock.gateway_addr())
        {
            let address =
                ringpush::apns::binary::Address::parse(&format!("localhost:{}", addr.port()))
                    .unwrap();
            let mut settings = ringpush::apns::binary::Settings::new(address);
            settings.quiet = Duration::from_millis(100);
            ringpush::apns::binary::Client::new(settings, tls.clone()).into()
        } else {
            let via = apns_proxy.as_ref().map(|p| p.addr);
            local::http2_client(&mock, via, options.apns, Arc::new(signer))
                .unwrap()
                .into()
        };
        let (fcm, worker_fcm) = match options.fcm {
            None => (None, None),
            Some(settings) => {
                let (mock, client) = local::fcm_world(&dir, settings, cancel.clone())
                    .await
                    .expect("mock FCM starts");
                (Some(mock), Some(client))
            }
        };
        let db_proxy = match options.db_proxy {
            true => Some(Proxy::start("127.0.0.1:5432".parse().unwrap()).await),
            false => None,
        };
        let worker_pool = match &db_proxy {
            Some(p) => {
                let url = db.url.replace("127.0.0.1:5432", &p.addr.to_string());
                assert_ne!(
                    url, db.url,
                    "RINGPUSH_DATABASE_URL must name 127.0.0.1:5432 for the proxy tests"
                );
                ringpush::db::pool(&url, 4, Duration::from_secs(1)).unwrap()
            }
            None => pool.clone(),
        };
        let amqp_proxy = match options.amqp_proxy {
            true => Some(Proxy::start("127.0.0.1:5672".parse().unwrap()).await),
            false => None,
        };
        let connection = broker::connect(&amqp_url(), "ringpush test")
            .await
            .expect("broker");
        let channel = broker::confirm_channel(&connection).await.unwrap();
        broker::declare(&channel, &names).await.unwrap();
        let publisher = broker::Publisher::open(&connection, &names).await.unwrap();
        let counters = Arc::new(Counters::default());
        let feedback_counters = Arc::new(feedback::Counters::default());
        // One set of providers for the workers this test starts in-process and the metrics
        // server: `/readyz` sees what the workers' providers see (the guard's suspicion).
        let providers = ringpush::worker::providers(Some(worker_apns), worker_fcm);
        let metrics_addr = match options.metrics {
            false => None,
            // The metrics server of the workers this test runs in-process: the worker's own
            // assembly serves it, with their counters and providers.
            true => {
                let process = worker::Process {
                    settings: options.worker.clone(),
                    amqp_url: amqp_url().into(),
                    pools: worker_pool.clone().into(),
                    providers: providers.clone(),
                    counters: counters.clone(),
                    apps: None,
                };
                let serve = ringpush::metrics::Serve {
                    addr: "127.0.0.1:0".parse().unwrap(),
                    poll_every: Duration::from_millis(200),
                };
                Some(process.observe(&serve, &cancel).await.unwrap())
            }
        };
        let mut app = Self {
            metrics_addr,
            names,
            pool,
            mock,
            fcm,
            counters,
            feedback_counters,
            purge_counters: Arc::new(purge::Counters::default()),
            purge_settings: options.purge,
            feedback_settings: options.feedback,
            worker_settings: options.worker,
            providers,
            worker_pool,
            apns_proxy,
            db_proxy,
            amqp_proxy,
            binary_tls,
            key_pem: key.pem.clone(),
            db_url: db.url.clone(),
            jwt_public_key,
            channel,
            publisher,
            connection,
            cancel,
            processes: Vec::new(),
            _queues: queues,
            _db: db,
            dir,
        };
        if options.run_feedback {
            app.start_feedback_at(amqp_url());
        }
        if options.run_worker {
            app.start_worker();
        }
        if options.run_purger {
            app.start_purger();
        }
        app
    }

    /// GETs a path of the worker's metrics server: (status, body).
    pub async fn scrape(&self, path: &str) -> (u16, String) {
        let addr = self.metrics_addr.expect("metrics are on");
        let r = ringpush::http::get(&format!("http://{addr}{path}"), Duration::from_secs(30))
            .await
            .unwrap();
        (r.status, r.body)
    }

    /// Starts `ringpush worker` in this test (through the AMQP fault proxy when there is one).
    pub fn start_worker(&mut self) {
        self.start_worker_at(self.worker_amqp_url());
    }

    /// Starts `ringpush worker` in this test, connected to the broker at `url`.
    pub fn start_worker_at(&mut self, url: String) {
        let (pool, counters, cancel) = (
            self.worker_pool.clone(),
            self.counters.clone(),
            self.cancel.clone(),
        );
        let worker = worker::Process {
            settings: self.worker_settings.clone(),
            amqp_url: url.into(),
            pools: pool.into(),
            providers: self.providers.clone(),
            counters,
            apps: None,
        };
        self.processes
            .push(("worker", tokio::spawn(worker.run(cancel))));
    }

    /// Starts the `ringpush worker` binary against this test's queues, schema and mock
    /// (token auth), with `env` on top; killed when the handle drops.
    pub fn worker_process(&self, env: &[(&str, &str)]) -> tokio::process::Child {
        self.worker_command(env)
            .spawn()
            .expect("the worker binary starts")
    }

    /// The command [`App::worker_process`] runs (a test may redirect its output first).
    pub fn worker_command(&self, env: &[(&str, &str)]) -> tokio::process::Command {
        std::fs::create_dir_all(&self.dir).unwrap();
        let key_file = self.dir.join("key.p8");
        std::fs::write(&key_file, &self.key_pem).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringpush"));
        command
            .arg("worker")
            .env("RINGPUSH_AMQP_URL", amqp_url())
            .env("RINGPUSH_QUEUE_PREFIX", &self.names.prefix)
            .env("RINGPUSH_DATABASE_URL", &self.db_url)
            .env("RINGPUSH_APNS_PRODUCTION_URL", self.mock.url())
            .env("RINGPUSH_APNS_SANDBOX_URL", self.mock.url())
            .env("RINGPUSH_APNS_CA_FILE", self.mock.ca_file())
            .env("RINGPUSH_APNS_KEY_FILE", &key_file)
            .env("RINGPUSH_APNS_KEY_ID", KEY_ID)
            .env("RINGPUSH_APNS_TEAM_ID", TEAM_ID)
            .env("RINGPUSH_APNS_TOPIC", TOPIC)
            .env("RINGPUSH_PREFETCH", "64")
            // Bursts of one gateway's rings are rings of their own here (see `Options`).
            .env("RINGPUSH_RING_DEBOUNCE", "0s")
            // Tests run side by side: no fixed port.
            .env("RINGPUSH_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        command
    }

    /// The broker URL the worker uses: through the AMQP fault proxy when there is one.
    pub fn worker_amqp_url(&self) -> String {
        let url = amqp_url();
        match &self.amqp_proxy {
            Some(p) => {
                let through = url.replace("127.0.0.1:5672", &p.addr.to_string());
                assert_ne!(
                    through, url,
                    "RINGPUSH_AMQP_URL must name 127.0.0.1:5672 for the proxy tests"
                );
                through
            }
            None => url,
        }
    }

    /// How many (ring, token) pairs the mock has not accepted yet.
    pub fn unaccepted(&self, rings: &[RingEvent], tokens: &[DeviceToken]) -> usize {
        let accepted: std::collections::HashSet<(String, String)> = self
            .mock
            .received()
            .into_iter()
            .filter(|r| r.status == 200)
            .map(|r| {
                let event = r.collapse_id().unwrap();
                (event, r.token.unwrap())
            })
            .collect();
        rings
            .iter()
            .flat_map(|r| {
                tokens
                    .iter()
                    .map(move |t| (r.event_id.clone(), t.as_hex().to_owned()))
            })
            .filter(|pair| !accepted.contains(pair))
            .count()
    }

    /// Checks every (ring, token) pair was accepted by the mock at least once; returns how
    /// many duplicates it accepted (reported, and bounded by the retry policy).
    pub fn ledger(&self, rings: &[RingEvent], tokens: &[DeviceToken]) -> usize {
        let mut accepted: HashMap<(String, String), usize> = HashMap::new();
        for r in self.mock.received() {
            if r.status == 200 {
                let event = r.collapse_id().unwrap();
                *accepted.entry((event, r.token.unwrap())).or_default() += 1;
            }
        }
        let mut missing = Vec::new();
        let mut duplicates = 0;
        for ring in rings {
            for token in tokens {
                match accepted.get(&(ring.event_id.clone(), token.as_hex().to_owned())) {
                    None => missing.push((ring.event_id.clone(), token.short())),
                    Some(n) => duplicates += n - 1,
                }
            }
        }
        assert!(
            missing.is_empty(),
            "{} (ring, token) pairs never accepted: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        eprintln!(
            "ledger: {} pairs accepted, {duplicates} duplicates",
            rings.len() * tokens.len()
        );
        duplicates
    }

    /// Starts `ringpush feedback` in this test, connected to the broker at `url`.
    pub fn start_feedback_at(&mut self, url: String) {
        let feedback = feedback::Process {
            settings: self.feedback_settings.clone(),
            amqp_url: url.into(),
            counters: self.feedback_counters.clone(),
        };
        self.processes
            .push(("feedback", tokio::spawn(feedback.run(self.cancel.clone()))));
    }

    /// Starts `ringpush purge` in this test.
    pub fn start_purger(&mut self) {
        self.start_purger_at(amqp_url());
    }

    /// Starts `ringpush purge` in this test, connected to the broker at `url`.
    pub fn start_purger_at(&mut self, url: String) {
        let (pool, counters, cancel) = (
            self.pool.clone(),
            self.purge_counters.clone(),
            self.cancel.clone(),
        );
        let purger = purge::Process {
            settings: self.purge_settings.clone(),
            amqp_url: url.into(),
            pool,
            counters,
        };
        self.processes
            .push(("purge", tokio::spawn(purger.run(cancel))));
    }

    /// Sets when the phone last registered `token`.
    pub async fn registered_at(&self, token: &DeviceToken, at: OffsetDateTime) {
        let client = self.pool.get().await.unwrap();
        let at = ringpush::wire::time::format_rfc3339(at);
        client
            .execute(
                "UPDATE push_tokens SET updated_at = $2::text::timestamptz WHERE token = $1",
                &[&token.as_hex(), &at],
            )
            .await
            .unwrap();
    }

    /// Whether a token is still in the database.
    pub async fn token_exists(&self, token: &DeviceToken) -> bool {
        let client = self.pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT count(*) FROM push_tokens WHERE token = $1",
                &[&token.as_hex()],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 1
    }

    pub async fn add_user(&self) -> i64 {
        let client = self.pool.get().await.unwrap();
        client
            .query_one("INSERT INTO users DEFAULT VALUES RETURNING id", &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn add_gateway(&self, id: &str, owner: i64, name: &str) {
        let client = self.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO gateways (id, owner_id, name) VALUES ($1, $2, $3)",
                &[&id, &owner, &name],
            )
            .await
            .unwrap();
    }

    pub async fn share(&self, gateway: &str, user: i64) {
        let client = self.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO gateway_shares (gateway_id, user_id) VALUES ($1, $2)",
                &[&gateway, &user],
            )
            .await
            .unwrap();
    }

    /// Registers a new random token for `user`.
    pub async fn add_token(
        &self,
        user: i64,
        environment: &str,
        topic: Option<&str>,
    ) -> DeviceToken {
        let token = DeviceToken::parse(&random_hex(32)).unwrap();
        let client = self.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO push_tokens (token, user_id, environment, topic) VALUES ($1, $2, $3, $4)",
                &[&token.as_hex(), &user, &environment, &topic],
            )
            .await
            .unwrap();
        token
    }

    /// A ring pressed now (or `age` ago) at `gateway`.
    pub fn ring(gateway: &str, age: Duration) -> RingEvent {
        RingEvent {
            event_id: format!("ev-{}", random_hex(8)),
            gateway_id: gateway.into(),
            pressed_at: OffsetDateTime::now_utc() - age,
            switch_id: None,
        }
    }

    pub async fn publish(&self, ring: &RingEvent) {
        broker::publish_ring(&self.channel, &self.names, ring)
            .await
            .expect("publish ring");
    }

    /// Publishes any bytes to the rings exchange, as a confused gateway might.
    pub async fn publish_raw(&self, body: &[u8]) {
        let props = BasicProperties::default().with_content_type("application/json".into());
        broker::publish_confirmed(&self.channel, &self.names.rings, "ring.raw", body, props)
            .await
            .unwrap();
    }

    /// Waits (bounded) until the worker has acked `n` rings.
    pub async fn wait_acked(&self, n: u64) {
        self.wait_for(&format!("{n} rings acked"), || {
            Counters::get(&self.counters.rings_acked) >= n
        })
        .await;
    }

    /// Waits up to 60 s for a condition (CI machines are small and busy); the test fails
    /// with `what` if it never holds.
    pub async fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; counters: {:?}",
                self.counters
            );
            for (name, process) in &self.processes {
                assert!(
                    !process.is_finished(),
                    "{name} stopped while waiting for {what}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Messages ready in a queue right now.
    pub async fn depth(&self, queue: &str) -> u32 {
        depth(&self.channel, queue).await
    }

    /// Takes every message off the rings' dead queue: (body, `x-ringpush-error`).
    pub async fn drain_dead(&self) -> Vec<(Vec<u8>, String)> {
        self.drain(&self.names.dead).await
    }

    /// Takes every message off a queue: (body, `x-ringpush-error`).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, String)> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let reason = msg
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(worker::ERROR_HEADER).cloned());
            let reason = match reason {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                other => format!("{other:?}"),
            };
            out.push((msg.data.clone(), reason));
        }
        out
    }

    /// Stops the worker the way SIGTERM does and checks it exits cleanly.
    pub async fn stop(mut self) {
        self.stop_processes().await;
        let _ = self.connection.close(200, "done".into()).await;
    }

    /// Stops the processes, then checks no ring was left unacked: a delivery still held when
    /// the worker's channel closes goes back to the queue, so the queue must be empty.
    pub async fn stop_with_nothing_unacked(mut self) {
        self.stop_processes().await;
        assert_eq!(
            self.depth(&self.names.rings).await,
            0,
            "a ring was left unacked"
        );
        let _ = self.connection.close(200, "done".into()).await;
    }

    async fn stop_processes(&mut self) {
        self.cancel.cancel();
        for (name, process) in std::mem::take(&mut self.processes) {
            tokio::time::timeout(Duration::from_secs(30), process)
                .await
                .unwrap_or_else(|_| panic!("{name} stops within 30 s"))
                .unwrap()
                .unwrap_or_else(|e| panic!("{name} exits without error: {e:#}"));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends SIGTERM to a worker process and checks it exits 0 (within 30 s).
pub async fn terminate(worker: &mut tokio::process::Child) {
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &worker.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker exits")
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// A gateway whose owner has `phones` phones.
pub async fn gateway(app: &App, id: &str, phones: usize) -> Vec<DeviceToken> {
    let owner = app.add_user().await;
    app.add_gateway(id, owner, "Door").await;
    let mut tokens = Vec::new();
    for _ in 0..phones {
        tokens.push(app.add_token(owner, "production", Some(TOPIC)).await);
    }
    tokens
}

/// The end of a test that must leave nothing behind in the queues: nothing ready in the rings
/// queue or any retry tier, nothing in the dead queue.
pub async fn nothing_waiting_or_dead(app: &App) {
    assert_eq!(
        app.depth(&app.names.rings).await,
        0,
        "nothing left in the rings queue"
    );
    for tier in &app.names.retry {
        assert_eq!(app.depth(tier).await, 0, "nothing left in {tier}");
    }
    let dead = app.drain_dead().await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(dead.is_empty(), "nothing dead-lettered: {reasons:?}");
}

/// A running process and every line it writes (stdout and stderr).
pub struct Running {
    pub child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub fn start(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ringpush starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let kept = lines.clone();
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    kept.lock().unwrap().push(line);
                }
            });
        }
        Self { child, lines }
    }

    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (up to 30 s) for a line containing `what`; fails the test with the log if none
    /// comes.
    pub async fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {what:?} within 30 s:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where its metrics server listens (from its log line).
    pub async fn metrics_addr(&self) -> String {
        let line = self.wait_for("/readyz listening").await;
        line.split("addr=")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .expect("the line names the address")
            .to_owned()
    }

    /// SIGTERM; waits for a clean exit; the whole log.
    pub async fn stop(mut self) -> String {
        terminate(&mut self.child).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.text()
    }
}
