//! What a person reads when something outside the process is wrong: the `ringpush` binary run
//! against the real PostgreSQL and RabbitMQ with a wrong database, role, password, vhost, a
//! closed port, a URL that is not AMQP, a server certificate from a CA it does not trust, a
//! missing schema — and a misspelt or badly valued variable (and, without a fault, nothing at
//! warn or error, PostgreSQL's `prefer` without TLS included). Each error must name its cause
//! and where it tried (the address, never the password), must not repeat on every retry, and
//! no line at WARN or ERROR may show a library's error in Rust's debug form
//! (`ShortString(…)`, `AMQPError { … }`, `UnknownIssuer`, `180.881817ms`). The logs must agree
//! with the metrics: skipped tokens are not called rejected, a malformed ring is logged with
//! what could be read of it. Throwaway roles, vhosts and a PostgreSQL instance with password
//! authentication are made here and removed again.

use std::path::PathBuf;
use std::process::Stdio;

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use ringpush::broker;
use ringpush::token::random_hex;

use tokio::process::Command;

use crate::fcm::{add_fcm_token, fcm_settings};
use crate::support::{self, gateway, App, Running, TestDb};

/// The binary under test, with none of the caller's `RINGPUSH_*` setup and logs at info.
fn ringpush() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringpush"));
    for (var, _) in std::env::vars() {
        if var.starts_with("RINGPUSH_") {
            command.env_remove(var);
        }
    }
    command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A port nothing listens on (bound, then let go).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command run to its end: (exit code, stdout and stderr).
async fn output(command: &mut Command) -> (i32, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the command ends within 30 s")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The lines at WARN or ERROR, and the `error:` a command ends with.
fn loud(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            let level = l.split_whitespace().nth(1).unwrap_or_default();
            level == "WARN" || level == "ERROR" || l.starts_with("error:")
        })
        .collect()
}

/// Fails when a WARN or ERROR line shows a library's error in Rust's debug form, or a
/// duration with more digits than a person reads.
fn assert_no_debug_form(text: &str) {
    const DEBUG: [&str; 13] = [
        "ShortString(",
        "AMQPError",
        "Soft(",
        "Hard(",
        "IOError(",
        "ProtocolError(",
        "Kind(",
        "Some(",
        "None",
        "{ kind",
        "os error",
        "UnknownIssuer",
        "InvalidCertificate(",
    ];
    for line in loud(text) {
        for debug in DEBUG {
            assert!(!line.contains(debug), "{debug:?} at WARN/ERROR: {line}");
        }
        // `180.881817ms`: four or more decimals before a unit.
        let bytes = line.as_bytes();
        for (i, _) in line.match_indices('.') {
            let digits = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            let unit = &line[i + 1 + digits..];
            let timed = ["ms", "s", "µs", "ns"].iter().any(|u| unit.starts_with(u));
            assert!(
                !(digits >= 4 && timed && i > 0 && bytes[i - 1].is_ascii_digit()),
                "a duration in debug form at WARN/ERROR: {line}"
            );
        }
    }
}

/// How many lines contain `what`.
fn count(text: &str, what: &str) -> usize {
    text.lines().filter(|l| l.contains(what)).count()
}

/// A worker binary for `app` with `env` on top, logging at info.
fn worker(app: &App, env: &[(&str, &str)]) -> Command {
    let mut command = app.worker_command(env);
    command.env("RUST_LOG", "info");
    command
}

/// An App whose worker runs as a binary started by the test.
async fn app_without_worker(migrate: bool) -> App {
    App::spawn_with(|o| {
        o.run_worker = false;
        o.run_purger = false;
        o.migrate = migrate;
    })
    .await
}

/// A PostgreSQL instance of the test's own on a free port, with password authentication
/// (the shared one trusts every local connection, so it never refuses a password): `initdb`
/// and `pg_ctl` as the `postgres` user when the test runs as root. Stopped and removed when
/// dropped.
struct PasswordPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PasswordPostgres {
    fn start(password: &str) -> Self {
        let root = PathBuf::from("/usr/lib/postgresql");
        let mut versions: Vec<PathBuf> = std::fs::read_dir(&root)
            .expect("PostgreSQL is installed under /usr/lib/postgresql")
            .flatten()
            .map(|e| e.path())
            .collect();
        versions.sort();
        let bin = versions.pop().expect("a PostgreSQL version").join("bin");
        let dir = std::env::temp_dir().join(format!("ringpush-pg-{}", random_hex(4)));
        std::fs::create_dir_all(&dir).unwrap();
        let pwfile = dir.join("password");
        std::fs::write(&pwfile, password).unwrap();
        let this = Self {
            dir: dir.clone(),
            bin,
            port: closed_port(),
        };
        let chown = std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
        assert!(chown.is_ok_and(|s| s.success()) || !is_root());
        let initdb = this.as_postgres(this.bin.join("initdb"), |c| {
            c.arg("-D")
                .arg(dir.join("data"))
                .args([
                    "-U",
                    "postgres",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "-N",
                ])
                .arg(format!("--pwfile={}", pwfile.display()));
        });
        assert!(initdb.success(), "initdb");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            this.port,
            dir.display()
        );
        let started = this.as_postgres(this.bin.join("pg_ctl"), |c| {
            c.arg("-D")
                .arg(dir.join("data"))
                .args(["-o", &options, "-l"])
                .arg(dir.join("log"))
                .args(["-w", "start"]);
        });
        assert!(started.success(), "pg_ctl start");
        this
    }

    fn as_postgres(
        &self,
        program: PathBuf,
        args: impl FnOnce(&mut std::process::Command),
    ) -> std::process::ExitStatus {
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        args(&mut command);
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    }
}

impl Drop for PasswordPostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        self.as_postgres(self.bin.join("pg_ctl"), |c| {
            c.arg("-D").arg(&data).args(["-m", "immediate", "stop"]);
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs `sql` against the shared database (roles are the cluster's).
async fn sql(statement: &str) {
    let pool = ringpush::db::pool(&support::database_url(), 1, Duration::from_secs(5)).unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute(statement)
        .await
        .unwrap();
}

/// A role that exists but may not log in; dropped when this is dropped.
struct NoLoginRole(String);

impl NoLoginRole {
    async fn create() -> Self {
        let name = format!("t_nologin_{}", random_hex(4));
        sql(&format!("CREATE ROLE {name} NOLOGIN")).await;
        Self(name)
    }
}

impl Drop for NoLoginRole {
    fn drop(&mut self) {
        let statement = format!("DROP ROLE IF EXISTS {}", self.0);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(sql(&statement))
        })
        .join()
        .unwrap();
    }
}

/// The URL of `url` with another user, password, host, port or database.
fn with(url: &str, edit: impl FnOnce(&mut url::Url)) -> String {
    let mut u = url::Url::parse(url).unwrap();
    edit(&mut u);
    u.to_string()
}

#[tokio::test]
async fn a_wrong_database_role_or_password_is_named_with_where_it_was_tried() {
    let app = app_without_worker(true).await;
    let role = NoLoginRole::create().await;
    let postgres = tokio::task::spawn_blocking(|| PasswordPostgres::start("the-right-one"))
        .await
        .unwrap();
    let db = format!("t_nodb_{}", random_hex(4));
    let shared = support::database_url();
    // (URL, what the log must say, where)
    let cases = [
        (
            with(&shared, |u| u.set_path(&db)),
            vec![format!("has no database \"{db}\""), "3D000".into()],
            "127.0.0.1:5432".to_owned(),
        ),
        (
            with(&shared, |u| u.set_username(&role.0).unwrap()),
            vec![
                format!("refused role \"{}\"", role.0),
                "28000".into(),
                "not permitted to log in".into(),
            ],
            "127.0.0.1:5432".to_owned(),
        ),
        (
            with(&shared, |u| u.set_username("t_no_such_role").unwrap()),
            vec!["refused role \"t_no_such_role\"".into(), "28000".into()],
            "127.0.0.1:5432".to_owned(),
        ),
        (
            format!(
                "postgres://postgres:the-wrong-one@127.0.0.1:{}/postgres",
                postgres.port
            ),
            vec![
                "refused the password of role \"postgres\"".into(),
                "28P01".into(),
                "check the password in RINGPUSH_DATABASE_URL".into(),
            ],
            format!("127.0.0.1:{}", postgres.port),
        ),
    ];
    let mut running = Vec::new();
    for (url, _, _) in &cases {
        running.push(Running::start(&mut worker(
            &app,
            &[("RINGPUSH_DATABASE_URL", url)],
        )));
    }
    for ((url, says, at), process) in cases.iter().zip(running) {
        let line = process.wait_for("cannot use PostgreSQL").await;
        assert!(line.contains(" ERROR "), "{line}");
        for said in says {
            assert!(line.contains(said.as_str()), "{url}: {said:?} in {line}");
        }
        assert!(line.contains(at.as_str()), "{url}: where: {line}");
        assert!(!line.contains("is PostgreSQL running"), "{line}");
        // It waits (and retries) without saying it again on every probe.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let text = process.stop().await;
        assert!(
            !text.contains("the-wrong-one"),
            "a password in the log:\n{text}"
        );
        assert_eq!(count(&text, "cannot use PostgreSQL"), 1, "{text}");
        assert!(loud(&text).len() <= 6, "{url}: too many lines:\n{text}");
        assert_no_debug_form(&text);
    }
    drop(postgres);
    drop(role);
}

#[tokio::test]
async fn an_unreachable_database_names_the_address_in_every_command() {
    let port = closed_port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let at = format!("127.0.0.1:{port}");
    for args in [vec!["migrate"], vec!["who", "gw-1"], vec!["seed", "gw-1"]] {
        let (code, text) = output(ringpush().args(&args).env("RINGPUSH_DATABASE_URL", &url)).await;
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains(&at), "{args:?} names {at}: {text}");
        assert!(text.contains("connection refused"), "{args:?}: {text}");
        assert_no_debug_form(&text);
    }
    // A worker says it once, with the same words, and waits.
    let app = app_without_worker(true).await;
    let process = Running::start(&mut worker(&app, &[("RINGPUSH_DATABASE_URL", &url)]));
    let line = process.wait_for("cannot use PostgreSQL").await;
    assert!(
        line.contains(&format!(
            "cannot reach PostgreSQL at {at} (connection refused"
        )),
        "{line}"
    );
    let text = process.stop().await;
    assert_no_debug_form(&text);
}

/// A start and a ring without faults log nothing at warn or error. A Debian PostgreSQL (the
/// shared one here) offers TLS with its self-signed "snakeoil" certificate: the default
/// `sslmode=prefer` then connects without TLS, as `prefer` means to, and says so once per
/// process, at info, with what to set to require TLS.
#[tokio::test]
async fn a_fault_free_start_logs_nothing_at_warn_and_prefer_without_tls_says_so_at_info() {
    let app = app_without_worker(true).await;
    gateway(&app, "gw-quiet", 2).await;
    let ssl: String = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    let process = Running::start(&mut worker(&app, &[]));
    process.wait_for("consuming with coalesced acks").await;
    app.publish(&App::ring("gw-quiet", Duration::ZERO)).await;
    process.wait_for("ring delivered").await;
    let text = process.stop().await;
    assert!(loud(&text).is_empty(), "lines at warn or error:\n{text}");
    let plain: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sslmode=prefer connected without TLS"))
        .collect();
    if ssl == "on" {
        assert_eq!(plain.len(), 1, "once per process:\n{text}");
        assert!(
            plain[0].split_whitespace().nth(1) == Some("INFO")
                && plain[0].contains("sslmode=verify-full&sslrootcert="),
            "{}",
            plain[0]
        );
    } else {
        assert!(plain.is_empty(), "{text}");
    }
}

#[tokio::test]
async fn a_missing_schema_says_run_migrate_and_readyz_says_schema_missing() {
    let app = app_without_worker(false).await;
    let process = Running::start(&mut worker(&app, &[]));
    let line = process.wait_for("the schema is not there").await;
    assert!(
        line.contains("run `ringpush migrate`") && line.contains("42P01"),
        "{line}"
    );
    let addr = process.metrics_addr().await;
    process.wait_for("pausing consumption").await;
    let ready = || async {
        let r = ringpush::http::get(&format!("http://{addr}/readyz"), Duration::from_secs(5))
            .await
            .unwrap();
        (r.status, r.body)
    };
    // Connected to the broker, paused for the schema.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let (status, body) = ready().await;
        if body.contains("schema") || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("schema missing"), "{body}");
    assert!(body.contains("ringpush migrate"), "{body}");
    assert!(!body.contains("unreachable"), "{body}");
    assert!(
        !process.text().contains("consuming with coalesced acks"),
        "paused at start, it does not say it consumes:\n{}",
        process.text()
    );

    let (code, text) = output(
        ringpush()
            .arg("migrate")
            .env("RINGPUSH_DATABASE_URL", &app.db_url),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    process.wait_for("consuming with coalesced acks").await;
    let text = process.text();
    let at = |what: &str| text.find(what).unwrap_or_else(|| panic!("{what}:\n{text}"));
    assert!(
        at("pausing consumption") < at("resuming consumption")
            && at("resuming consumption") < at("consuming with coalesced acks"),
        "paused, resumed, then consuming, in that order:\n{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready().await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "ready once migrated: {:?}",
            ready().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = process.stop().await;
    assert_no_debug_form(&text);
}

/// The management API, for a vhost of the test's own.
fn management_url() -> String {
    std::env::var("RINGPUSH_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672".into())
}

/// A vhost on which guest (the tests' user) has no permissions; deleted when dropped.
struct Vhost(String);

impl Vhost {
    async fn create() -> Self {
        let name = format!("t-{}", random_hex(4));
        let url = format!("{}/api/vhosts/{name}", management_url());
        let r = ringpush::http::request(
            hyper::Method::PUT,
            &url,
            Some(&serde_json::json!({})),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(r.status < 300, "vhost created: {r:?}");
        // The management API gives the user who creates a vhost permissions on it: take them.
        let url = format!("{}/api/permissions/{name}/guest", management_url());
        let r = ringpush::http::delete(&url, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            r.status < 300 || r.status == 404,
            "permissions taken: {r:?}"
        );
        Self(name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let url = format!("{}/api/vhosts/{}", management_url(), self.0);
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(ringpush::http::delete(&url, Duration::from_secs(10)))
        })
        .join()
        .unwrap()
        .unwrap();
    }
}

#[tokio::test]
async fn a_refused_broker_login_or_vhost_is_named_once_with_where_it_tried() {
    let app = app_without_worker(true).await;
    let vhost = Vhost::create().await;
    let base = support::amqp_url();
    let cases = [
        (
            with(&base, |u| u.set_password(Some("t-wrong-password")).unwrap()),
            vec![
                "RabbitMQ at 127.0.0.1:5672 refused the login of user \"guest\"",
                "check the user name and password in RINGPUSH_AMQP_URL",
            ],
        ),
        (
            with(&base, |u| u.set_path(&vhost.0)),
            vec!["does not let user \"guest\" into vhost", "refused for user"],
        ),
        (
            with(&base, |u| u.set_path("t-no-such-vhost")),
            vec![
                "does not let user \"guest\" into vhost \"t-no-such-vhost\"",
                "not found",
            ],
        ),
    ];
    let mut running = Vec::new();
    for (url, _) in &cases {
        running.push(Running::start(&mut worker(
            &app,
            &[("RINGPUSH_AMQP_URL", url)],
        )));
    }
    for ((url, says), process) in cases.iter().zip(running) {
        let line = process.wait_for("cannot connect to the broker").await;
        for said in says {
            assert!(line.contains(said), "{url}: {said:?} in {line}");
        }
        // It retries for a few seconds: nothing more at WARN or ERROR.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let text = process.stop().await;
        assert!(
            !text.contains("t-wrong-password"),
            "a password in the log:\n{text}"
        );
        let about_the_broker: Vec<&str> = loud(&text)
            .into_iter()
            .filter(|l| l.contains("broker"))
            .collect();
        assert_eq!(about_the_broker.len(), 1, "{url}: once:\n{text}");
        assert!(!text.contains("connection lost"), "{text}");
        assert!(!text.contains(" lapin"), "lapin's own lines:\n{text}");
        assert!(!text.contains("is RabbitMQ running"), "{text}");
        assert_no_debug_form(&text);
    }
    drop(vhost);
}

#[tokio::test]
async fn an_unreachable_broker_is_named_and_never_called_lost() {
    let app = app_without_worker(true).await;
    let port = closed_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let process = Running::start(&mut worker(&app, &[("RINGPUSH_AMQP_URL", &url)]));
    let line = process.wait_for("cannot connect to the broker").await;
    assert!(
        line.contains(&format!(
            "cannot reach RabbitMQ at 127.0.0.1:{port} (connection refused"
        )),
        "{line}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = process.stop().await;
    assert!(
        !text.contains("connection lost"),
        "it never connected:\n{text}"
    );
    let about_the_broker = loud(&text)
        .into_iter()
        .filter(|l| l.contains("broker"))
        .count();
    assert_eq!(
        about_the_broker, 1,
        "said once, not on every retry:\n{text}"
    );
    assert_no_debug_form(&text);
}

#[tokio::test]
async fn a_url_that_is_not_amqp_is_refused_at_start_with_the_variables_name() {
    let url = "http://guest:t-secret@127.0.0.1:15672/";
    for args in [vec!["worker"], vec!["ring", "gw-1"], vec!["queues"]] {
        let started = Instant::now();
        let (code, text) = output(ringpush().args(&args).env("RINGPUSH_AMQP_URL", url)).await;
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(started.elapsed() < Duration::from_secs(10), "at start");
        assert!(
            text.contains("RINGPUSH_AMQP_URL") && text.contains("amqp://"),
            "{args:?}: {text}"
        );
        assert!(
            !text.contains("t-secret"),
            "the password never shows: {text}"
        );
    }
}

#[tokio::test]
async fn the_commands_a_person_types_name_the_broker_they_could_not_reach() {
    let port = closed_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let prefix = format!("t-{}", random_hex(4));
    for args in [vec!["ring", "gw-1"], vec!["queues"]] {
        let (code, text) = output(
            ringpush()
                .args(&args)
                .env("RINGPUSH_AMQP_URL", &url)
                .env("RINGPUSH_QUEUE_PREFIX", &prefix),
        )
        .await;
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(
            text.contains(&format!(
                "cannot reach RabbitMQ at 127.0.0.1:{port} (connection refused"
            )),
            "{args:?}: {text}"
        );
        assert_no_debug_form(&text);
    }
    // The management API, for `gateway` (and `queues`' unacked counts).
    let management = format!("http://guest:t-secret@127.0.0.1:{port}");
    let (code, text) = output(
        ringpush()
            .args(["gateway", "list"])
            .env("RINGPUSH_MANAGEMENT_URL", &management),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    assert_eq!(
        text.matches(&format!("127.0.0.1:{port}")).count(),
        1,
        "once: {text}"
    );
    assert!(text.contains("connection refused"), "{text}");
    assert!(
        !text.contains("t-secret") && !text.contains("client error"),
        "{text}"
    );
    let wrong = with(&support::amqp_url(), |u| {
        u.set_password(Some("t-wrong-password")).unwrap()
    });
    let (code, text) = output(
        ringpush()
            .args(["ring", "gw-1"])
            .env("RINGPUSH_AMQP_URL", &wrong)
            .env("RINGPUSH_QUEUE_PREFIX", &prefix),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("refused the login of user \"guest\""),
        "{text}"
    );
    assert!(!text.contains("t-wrong-password"), "{text}");
    assert_no_debug_form(&text);
}

#[tokio::test]
async fn a_server_certificate_from_an_unknown_ca_names_the_ca_setting() {
    let app = App::spawn_with(|o| {
        o.run_worker = false;
        o.run_purger = false;
        o.fcm = Some(fcm_settings());
    })
    .await;
    let fcm = app.fcm.as_ref().unwrap();
    let tokens = gateway(&app, "gw-ca", 1).await;
    let owner = {
        let client = app.pool.get().await.unwrap();
        let row = client
            .query_one("SELECT owner_id FROM gateways WHERE id = 'gw-ca'", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    add_fcm_token(&app, owner, "alert").await;
    let credentials = app.dir.join("fcm-service-account.json");
    let mut command = worker(
        &app,
        &[
            (
                "RINGPUSH_FCM_CREDENTIALS_FILE",
                credentials.to_str().unwrap(),
            ),
            ("RINGPUSH_FCM_URL", &fcm.url()),
        ],
    );
    // Neither the mock APNs's CA nor the mock FCM's.
    command.env_remove("RINGPUSH_APNS_CA_FILE");
    let process = Running::start(&mut command);
    process.wait_for("consuming with coalesced acks").await;
    app.publish(&App::ring("gw-ca", Duration::ZERO)).await;
    for var in ["RINGPUSH_APNS_CA_FILE", "RINGPUSH_FCM_CA_FILE"] {
        let line = process.wait_for(var).await;
        assert!(line.contains("unknown issuer"), "{line}");
        assert!(line.contains("localhost"), "names the host: {line}");
    }
    let text = process.stop().await;
    assert_no_debug_form(&text);
    assert_eq!(tokens.len(), 1);
}

#[tokio::test]
async fn an_unknown_ringpush_variable_is_warned_about_with_the_nearest_name() {
    let app = app_without_worker(true).await;
    let process = Running::start(
        ringpush()
            .arg("purge")
            .env("RINGPUSH_AMQP_URL", support::amqp_url())
            .env("RINGPUSH_DATABASE_URL", &app.db_url)
            .env("RINGPUSH_QUEUE_PREFIX", &app.names.prefix)
            .env("RINGPUSH_METRICS_ADDR", "127.0.0.1:0")
            .env("RINGPUSH_PURGE_BACH_SIZE", "10")
            .env("RINGPUSH_T_NOTHING_LIKE_IT", "1"),
    );
    let line = process.wait_for("RINGPUSH_PURGE_BACH_SIZE").await;
    assert!(line.contains(" WARN "), "{line}");
    assert!(
        line.contains("a typo of RINGPUSH_PURGE_BATCH_SIZE?"),
        "{line}"
    );
    let line = process.wait_for("RINGPUSH_T_NOTHING_LIKE_IT").await;
    assert!(line.contains("no ringpush command reads it"), "{line}");
    // The purger says what it checked: it looks up no tokens.
    let line = process.wait_for("PostgreSQL answers").await;
    assert!(line.contains("the schema is there"), "{line}");
    let text = process.stop().await;
    assert!(!text.contains("token lookup"), "{text}");
    assert_no_debug_form(&text);

    // A person's command says it too (its log is otherwise errors only).
    let (_, text) = output(
        ringpush()
            .arg("queues")
            .env("RINGPUSH_AMQP_URL", support::amqp_url())
            .env("RINGPUSH_QUEUE_PREFIX", &app.names.prefix)
            .env("RINGPUSH_QUEUE_PREFIXX", "x"),
    )
    .await;
    assert!(text.contains("a typo of RINGPUSH_QUEUE_PREFIX?"), "{text}");
}

#[tokio::test]
async fn a_bad_value_from_the_environment_names_its_variable() {
    let prefix = format!("t-{}", random_hex(4));
    let cases: [(&[&str], &str, &str, &str); 4] = [
        (&["queues"], "RINGPUSH_MQTT_INGRESS", "yes", "'yes'"),
        (&["queues"], "RINGPUSH_LOG_FORMAT", "JSON", "'JSON'"),
        (
            &["purge"],
            "RINGPUSH_METRICS_ADDR",
            "9464",
            "127.0.0.1:9464",
        ),
        (&["worker"], "RINGPUSH_PREFETCH", "0", "positive"),
    ];
    for (args, var, value, says) in cases {
        let (code, text) = output(
            ringpush()
                .args(args)
                .env("RINGPUSH_QUEUE_PREFIX", &prefix)
                .env(var, value),
        )
        .await;
        assert_eq!(code, 2, "{var}={value}: {text}");
        assert!(
            text.contains(var) && text.contains(says),
            "{var}={value}: {text}"
        );
    }
    // Typed as a flag, the flag is named.
    let (code, text) = output(ringpush().args(["--log-format", "JSON", "queues"])).await;
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--log-format"), "{text}");
    // A missing key id is reported under its own variable.
    let (code, text) = output(
        ringpush()
            .arg("worker")
            .env("RINGPUSH_APNS_KEY_FILE", "/nonexistent/key.p8")
            .env("RINGPUSH_APNS_TEAM_ID", "TEAM123456"),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("error: RINGPUSH_APNS_KEY_ID:"), "{text}");
    // A URL that is not PostgreSQL's, named once.
    let (code, text) = output(
        ringpush()
            .args(["who", "gw-1"])
            .env("RINGPUSH_DATABASE_URL", "postgres://u@h/db?nonsense=1"),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    assert_eq!(text.matches("RINGPUSH_DATABASE_URL").count(), 1, "{text}");
}

#[tokio::test]
async fn logs_agree_with_the_metrics_and_name_what_they_can_of_a_malformed_ring() {
    let app = app_without_worker(true).await;
    // Two iPhones and two Android phones; the worker has no FCM credentials.
    let iphones = gateway(&app, "gw-mixed", 2).await;
    let owner = {
        let client = app.pool.get().await.unwrap();
        let row = client
            .query_one("SELECT owner_id FROM gateways WHERE id = 'gw-mixed'", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    for _ in 0..2 {
        add_fcm_token(&app, owner, "alert").await;
    }
    let process = Running::start(&mut worker(&app, &[]));
    let addr = process.metrics_addr().await;
    process.wait_for("consuming with coalesced acks").await;
    let ring = App::ring("gw-mixed", Duration::ZERO);
    app.publish(&ring).await;
    let line = process.wait_for("ring delivered").await;
    for field in ["tokens=4", "accepted=2", "rejected=0", "skipped=2"] {
        assert!(line.contains(field), "{field}: {line}");
    }
    let metrics = ringpush::http::get(&format!("http://{addr}/metrics"), Duration::from_secs(5))
        .await
        .unwrap()
        .body;
    for agreeing in [
        r#"ringpush_notifications_total{outcome="accepted"} 2"#,
        r#"ringpush_notifications_total{outcome="rejected"} 0"#,
        r#"ringpush_notifications_total{outcome="unconfigured"} 2"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == agreeing),
            "{agreeing}:\n{metrics}"
        );
    }
    assert_eq!(iphones.len(), 2);

    // A ring without its gateway_id: dead-lettered, logged with the routing key's gateway
    // and the event_id it has.
    let props = BasicProperties::default().with_content_type("application/json".into());
    broker::publish_confirmed(
        &app.channel,
        &app.names.rings,
        "ring.gw-typo",
        br#"{"v":1,"event_id":"t-ev-malformed","pressed_at":"2026-11-28T09:15:02Z"}"#,
        props,
    )
    .await
    .unwrap();
    let line = process.wait_for("t-ev-malformed").await;
    assert!(line.contains("gateway=\"gw-typo\""), "{line}");
    assert!(line.contains("gateway_id"), "the reason: {line}");
    let text = process.stop().await;
    assert_no_debug_form(&text);
    assert_eq!(app.drain_dead().await.len(), 1);
}

#[tokio::test]
async fn who_lines_up_its_columns() {
    let db = TestDb::new().await;
    let (code, text) = output(
        ringpush()
            .arg("migrate")
            .env("RINGPUSH_DATABASE_URL", &db.url),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let (code, text) = output(
        ringpush()
            .args(["seed", "gw-who", "--phones", "1", "--call-phones", "1"])
            .args(["--android", "1", "--android-call", "1"])
            .env("RINGPUSH_DATABASE_URL", &db.url),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    let (code, text) = output(
        ringpush()
            .args(["who", "gw-who"])
            .env("RINGPUSH_DATABASE_URL", &db.url),
    )
    .await;
    assert_eq!(code, 0, "{text}");
    // The table: the indented lines after its title (log lines may come around it);
    // characters, not bytes: a shortened token ends in `…`.
    let table: Vec<Vec<char>> = text
        .lines()
        .skip_while(|l| !l.starts_with("gateway \"gw-who\""))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .map(|l| l.chars().collect())
        .collect();
    assert_eq!(table.len(), 5, "a header and four phones:\n{text}");
    // Each column starts where its header does.
    let header: String = table[0].iter().collect();
    for column in [
        "role",
        "platform",
        "kind",
        "token",
        "environment",
        "topic",
        "registered",
    ] {
        let at = header.find(column).unwrap();
        for row in &table[1..] {
            assert!(
                row[at - 1] == ' ' && row[at] != ' ',
                "{column} starts at column {at} in every row:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn a_tls_hop_whose_certificate_comes_from_an_unknown_ca_names_the_setting_that_adds_it() {
    use ringpush::broker::Endpoint;
    use ringpush::tls::Identity;
    let world = crate::servers::tls_world().await;
    let host = crate::servers::SERVER_NAME;
    // The broker (amqps://), trusting another CA than the node's.
    let identity = Identity::from_pem_files(&world.client_cert, &world.client_key).unwrap();
    let endpoint = Endpoint::with_tls(
        world.amqps_url(host),
        Some(&world.other_ca_file),
        Some(identity),
    )
    .unwrap();
    let err = broker::connect(&endpoint, "t unknown ca")
        .await
        .expect_err("refused")
        .to_string();
    for says in [
        &format!("RabbitMQ at {host}:{}", world.amqp_port),
        "unknown issuer",
        "RINGPUSH_AMQP_CA_FILE",
    ] {
        assert!(err.contains(says), "{says:?}: {err}");
    }
    assert_no_debug_form(&format!("error: {err}"));
    // PostgreSQL with sslmode=verify-full and another CA's sslrootcert.
    let other = world.other_ca_file.display().to_string();
    let url = world.pg_tls_url(host, &format!("sslmode=verify-full&sslrootcert={other}"));
    let (code, text) = output(
        ringpush()
            .args(["who", "gw-1"])
            .env("RINGPUSH_DATABASE_URL", &url),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    for says in [
        &format!("PostgreSQL at {host}:{}", world.pg_tls_port),
        "unknown issuer",
        "sslrootcert in RINGPUSH_DATABASE_URL",
    ] {
        assert!(text.contains(says), "{says:?}: {text}");
    }
    assert_no_debug_form(&text);
    // The management API over https, without its CA.
    let (code, text) = output(
        ringpush()
            .args(["gateway", "list"])
            .env("RINGPUSH_MANAGEMENT_URL", world.management_url()),
    )
    .await;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("unknown issuer") && text.contains("RINGPUSH_MANAGEMENT_CA_FILE"),
        "{text}"
    );
    assert!(!text.contains("guest:guest"), "{text}");
    assert_no_debug_form(&text);
}
