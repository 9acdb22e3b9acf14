//! Servers a test starts beside the shared ones, on free loopback ports and in a directory of
//! its own, with certificates it makes (rcgen): a RabbitMQ node whose only listeners are TLS
//! (AMQP over TLS, asking every client for a certificate, and the management API over
//! https), a PostgreSQL instance that takes TLS connections only (`ssl = on`, `hostssl`
//! lines only, a password login for SCRAM), and one without TLS at all.
//!
//! One set per test binary, shared by the tests that ask for it ([`tls_world`]): starting a
//! RabbitMQ node costs seconds of CPU. It is stopped a few seconds after the last test lets
//! go of it or, when the test binary ends first (as it usually does: the last test ends it;
//! also a filtered run, a panic, a kill), within a second of that by a watchdog process
//! started with it, which also removes its directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use ringpush::token::random_hex;

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The name on the servers' certificates: `localhost` only, so `127.0.0.1` is another name.
pub const SERVER_NAME: &str = "localhost";

/// The login the PostgreSQL instances take with a password (SCRAM), and its password.
pub const SCRAM_USER: &str = "scram";
pub const SCRAM_PASSWORD: &str = "s3cret-scram";

/// The TLS servers and the files a client needs for them.
pub struct TlsWorld {
    pub dir: PathBuf,
    /// The CA that issued every server and client certificate here.
    pub ca_file: PathBuf,
    /// A CA that issued none of them.
    pub other_ca_file: PathBuf,
    /// A client certificate (and its key) from `ca_file`'s CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// RabbitMQ: AMQP over TLS only, and the management API over https.
    pub amqp_port: u16,
    pub management_port: u16,
    /// PostgreSQL with TLS only, and PostgreSQL without TLS.
    pub pg_tls_port: u16,
    pub pg_plain_port: u16,
    rabbit: Option<Rabbit>,
    pgs: Vec<PathBuf>,
    watchdog: Option<Child>,
}

impl TlsWorld {
    /// `amqps://guest:guest@<host>:<port>/%2f` for this node.
    pub fn amqps_url(&self, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{}/%2f", self.amqp_port)
    }

    /// `https://guest:guest@localhost:<port>`: the node's management API.
    pub fn management_url(&self) -> String {
        format!("https://guest:guest@{SERVER_NAME}:{}", self.management_port)
    }

    /// A URL of the TLS-only PostgreSQL instance, with `query` (`sslmode=…&…`).
    pub fn pg_tls_url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres?{query}",
            self.pg_tls_port
        )
    }

    /// A URL of the PostgreSQL instance without TLS, with `query`.
    pub fn pg_plain_url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.pg_plain_port
        )
    }

    fn start() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("ringpush-tls-{}", random_hex(4)));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut world = Self {
            ca_file: dir.join("ca.pem"),
            other_ca_file: dir.join("other-ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
            amqp_port: free_port(),
            management_port: free_port(),
            pg_tls_port: free_port(),
            pg_plain_port: free_port(),
            rabbit: None,
            pgs: Vec::new(),
            watchdog: None,
            dir,
        };
        let pki = Pki::make(&world)?;
        // The watchdog first: whatever starts after it is stopped with the test binary.
        world.watchdog = Some(watchdog(&world.dir)?);
        world.rabbit = Some(Rabbit::start(&world)?);
        world.pgs.push(start_pg(
            &world.dir,
            "pg-tls",
            world.pg_tls_port,
            Some(&pki),
        )?);
        world
            .pgs
            .push(start_pg(&world.dir, "pg-plain", world.pg_plain_port, None)?);
        Ok(world)
    }
}

impl Drop for TlsWorld {
    fn drop(&mut self) {
        if let Some(rabbit) = self.rabbit.take() {
            rabbit.stop();
        }
        for data in &self.pgs {
            let _ = as_postgres(Command::new(format!("{PG_BIN}/pg_ctl")))
                .args([
                    "-D",
                    &data.display().to_string(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The servers the tests of this binary share, started on first use.
static WORLD: Mutex<Weak<TlsWorld>> = Mutex::new(Weak::new());

/// How long the servers outlive the last test that used them (the next may be on its way).
const LINGER: Duration = Duration::from_secs(5);

/// A test's hold on the shared servers.
pub struct Lease(Option<Arc<TlsWorld>>);

impl std::ops::Deref for Lease {
    type Target = TlsWorld;
    fn deref(&self) -> &TlsWorld {
        self.0.as_ref().expect("held until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Held a little longer on another thread: a test starting right after this one finds
        // the servers up. The last holder's drop stops them.
        if let Some(world) = self.0.take() {
            std::thread::spawn(move || {
                std::thread::sleep(LINGER);
                drop(world);
            });
        }
    }
}

/// The shared TLS servers (started now if no test holds them).
pub async fn tls_world() -> Lease {
    tokio::task::spawn_blocking(|| {
        let mut slot = WORLD.lock().unwrap();
        if let Some(world) = slot.upgrade() {
            return Lease(Some(world));
        }
        let started = Instant::now();
        let world = Arc::new(TlsWorld::start().expect("the TLS servers start"));
        eprintln!(
            "TLS servers up in {:.1?}: RabbitMQ amqps {} / https {}, PostgreSQL TLS {} / plain {}",
            started.elapsed(),
            world.amqp_port,
            world.management_port,
            world.pg_tls_port,
            world.pg_plain_port
        );
        *slot = Arc::downgrade(&world);
        Lease(Some(world))
    })
    .await
    .unwrap()
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The certificates: a CA, a server certificate for [`SERVER_NAME`] only, a client
/// certificate, and another CA that issued nothing here.
struct Pki {
    server_cert: String,
    server_key: String,
}

impl Pki {
    fn make(world: &TlsWorld) -> Result<Self, String> {
        let e = |e: rcgen::Error| e.to_string();
        let (issuer, ca_pem) = ca("ringpush test CA").map_err(e)?;
        let (_, other_pem) = ca("ringpush other CA").map_err(e)?;
        let (server_cert, server_key) =
            leaf(&issuer, SERVER_NAME, &[SERVER_NAME], false).map_err(e)?;
        let (client_cert, client_key) =
            leaf(&issuer, "ringpush test client", &[], true).map_err(e)?;
        let write = |path: &Path, text: &str| std::fs::write(path, text).map_err(|e| e.to_string());
        write(&world.ca_file, &ca_pem)?;
        write(&world.other_ca_file, &other_pem)?;
        write(&world.client_cert, &client_cert)?;
        write(&world.client_key, &client_key)?;
        write(&world.dir.join("server.pem"), &server_cert)?;
        write(&world.dir.join("server-key.pem"), &server_key)?;
        Ok(Self {
            server_cert,
            server_key,
        })
    }
}

fn ca(name: &str) -> Result<(Issuer<'static, KeyPair>, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    Ok((Issuer::new(params, key), cert.pem()))
}

/// A certificate issued by `ca`: (certificate PEM, key PEM).
fn leaf(
    ca: &Issuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    client: bool,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![match client {
        true => ExtendedKeyUsagePurpose::ClientAuth,
        false => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A RabbitMQ node of the test's own (the scripts of `/usr/lib/rabbitmq/bin` called
/// directly, with every file and port of its own — nothing of the shared node's), in a
/// process group of its own: the script and the Erlang VM are stopped together.
struct Rabbit {
    node: String,
    process: Child,
}

impl Rabbit {
    fn start(world: &TlsWorld) -> Result<Self, String> {
        let base = world.dir.join("rabbit");
        let home = base.join("home");
        std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, random_hex(16).to_uppercase()).map_err(|e| e.to_string())?;
        set_mode(&cookie, 0o400)?;
        let file = |name: &str| world.dir.join(name).display().to_string();
        let conf = base.join("rabbitmq.conf");
        let text = format!(
            "listeners.tcp = none\n\
             listeners.ssl.1 = 127.0.0.1:{amqp}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n\
             management.ssl.port = {management}\n\
             management.ssl.ip = 127.0.0.1\n\
             management.ssl.cacertfile = {ca}\n\
             management.ssl.certfile = {cert}\n\
             management.ssl.keyfile = {key}\n\
             loopback_users.guest = true\n\
             vm_memory_high_watermark.absolute = 512MB\n\
             disk_free_limit.absolute = 50MB\n",
            amqp = world.amqp_port,
            management = world.management_port,
            ca = file("ca.pem"),
            cert = file("server.pem"),
            key = file("server-key.pem"),
        );
        std::fs::write(&conf, text).map_err(|e| e.to_string())?;
        let plugins = base.join("enabled_plugins");
        std::fs::write(&plugins, "[rabbitmq_management].\n").map_err(|e| e.to_string())?;
        let conf_env = base.join("rabbitmq-env.conf");
        std::fs::write(&conf_env, "").map_err(|e| e.to_string())?;
        let node = format!("rptls{}@localhost", random_hex(3));
        let out = std::fs::File::create(base.join("out.log")).map_err(|e| e.to_string())?;
        let p = |name: &str| base.join(name).display().to_string();
        let mut command = Command::new(format!("{RABBIT_BIN}/rabbitmq-server"));
        command
            .env("HOME", &home)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_PID_FILE", p("pid"))
            .env("RABBITMQ_CONFIG_FILE", &conf)
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
            .env("RABBITMQ_CONF_ENV_FILE", &conf_env)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            // The listeners come from the config file alone (these would add a plain one).
            .env_remove("RABBITMQ_NODE_PORT")
            .env_remove("RABBITMQ_NODE_IP_ADDRESS")
            // Where a crashing Erlang VM would write its dumps (not the tests' directory).
            .current_dir(&base)
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let process = command
            .spawn()
            .map_err(|e| format!("rabbitmq-server: {e}"))?;
        // For the watchdog: the process group to kill.
        std::fs::write(world.dir.join("rabbit.pgid"), process.id().to_string())
            .map_err(|e| e.to_string())?;
        let mut rabbit = Self { node, process };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if rabbit.ctl(&world.dir, &["await_startup"]).is_ok() {
                break;
            }
            let log = || std::fs::read_to_string(base.join("out.log")).unwrap_or_default();
            if rabbit.process.try_wait().ok().flatten().is_some() {
                return Err(format!("RabbitMQ did not start:\n{}", log()));
            }
            if Instant::now() > deadline {
                rabbit.stop();
                return Err(format!("RabbitMQ did not start within 180 s:\n{}", log()));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(rabbit)
    }

    /// `rabbitmqctl -n <node> <args>`: its output, or why it failed.
    fn ctl(&self, dir: &Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new(format!("{RABBIT_BIN}/rabbitmqctl"))
            .env("HOME", dir.join("rabbit").join("home"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// Kills the node's process group: no graceful stop, its data goes with its directory.
    fn stop(mut self) {
        let group = format!("-{}", self.process.id());
        let _ = Command::new("kill").args(["-9", "--", &group]).status();
        let _ = self.process.wait();
    }
}

/// Whether this process runs as root (PostgreSQL's tools then run as `postgres`).
fn root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// `command` as the `postgres` user when this process is root (PostgreSQL refuses root).
fn as_postgres(command: Command) -> Command {
    if !root() {
        return command;
    }
    let mut wrapped = Command::new("runuser");
    wrapped
        .args(["-u", "postgres", "--"])
        .arg(command.get_program())
        .args(command.get_args());
    wrapped
}

/// Hands `path` to the `postgres` user when this process is root.
fn give_to_postgres(path: &Path) -> Result<(), String> {
    if !root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .args(["-R", "postgres", &path.display().to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("chown postgres {}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())
}

/// A PostgreSQL 15 instance in `dir/name` on `port` (127.0.0.1, its own socket directory):
/// with `pki`, TLS on and only `hostssl` lines (trust, and SCRAM for [`SCRAM_USER`]);
/// without, no TLS and `host` lines. Returns its data directory.
fn start_pg(dir: &Path, name: &str, port: u16, pki: Option<&Pki>) -> Result<PathBuf, String> {
    let base = dir.join(name);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    give_to_postgres(&base)?;
    let data = base.join("data");
    let run = |command: &mut Command, what: &str| -> Result<(), String> {
        let out = command.output().map_err(|e| format!("{what}: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "{what}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    };
    let mut initdb = Command::new(format!("{PG_BIN}/initdb"));
    initdb.args([
        "-D",
        &data.display().to_string(),
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
    ]);
    run(&mut as_postgres(initdb), "initdb")?;
    let mut conf = format!(
        "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\n",
        base.display()
    );
    let host = match pki {
        Some(pki) => {
            std::fs::write(data.join("server.pem"), &pki.server_cert).map_err(|e| e.to_string())?;
            std::fs::write(data.join("server-key.pem"), &pki.server_key)
                .map_err(|e| e.to_string())?;
            set_mode(&data.join("server-key.pem"), 0o600)?;
            conf.push_str(
                "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server-key.pem'\n",
            );
            "hostssl"
        }
        None => {
            conf.push_str("ssl = off\n");
            "host"
        }
    };
    let mut text =
        std::fs::read_to_string(data.join("postgresql.conf")).map_err(|e| e.to_string())?;
    text.push_str(&conf);
    std::fs::write(data.join("postgresql.conf"), text).map_err(|e| e.to_string())?;
    let hba = format!(
        "local all all trust\n\
         {host} all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
         {host} all all 127.0.0.1/32 trust\n"
    );
    std::fs::write(data.join("pg_hba.conf"), hba).map_err(|e| e.to_string())?;
    give_to_postgres(&base)?;
    let mut start = Command::new(format!("{PG_BIN}/pg_ctl"));
    start.args([
        "-D",
        &data.display().to_string(),
        "-l",
        &base.join("log").display().to_string(),
        "-w",
        "-t",
        "60",
        "start",
    ]);
    let mut start = as_postgres(start);
    std::os::unix::process::CommandExt::process_group(&mut start, 0);
    run(&mut start, "pg_ctl start")?;
    let sql = format!("CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER PASSWORD '{SCRAM_PASSWORD}'");
    let mut psql = Command::new("psql");
    psql.args(["-h", &base.display().to_string(), "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-qc", &sql]);
    run(&mut as_postgres(psql), "psql")?;
    Ok(data)
}

/// A process that outlives nothing of ours: when this test binary ends, it kills the
/// RabbitMQ node, stops the PostgreSQL instances and removes `dir`.
fn watchdog(dir: &Path) -> Result<Child, String> {
    let d = dir.display();
    let pg_stop = |name: &str| {
        let stop = format!("{PG_BIN}/pg_ctl -D {d}/{name}/data -m immediate -w stop");
        match root() {
            true => format!("runuser -u postgres -- {stop}"),
            false => stop,
        }
    };
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 1; done\n\
         [ -s {d}/rabbit.pgid ] && kill -9 -\"$(cat {d}/rabbit.pgid)\" 2>/dev/null\n\
         {pg_tls} >/dev/null 2>&1\n\
         {pg_plain} >/dev/null 2>&1\n\
         rm -rf {d}\n",
        parent = std::process::id(),
        pg_tls = pg_stop("pg-tls"),
        pg_plain = pg_stop("pg-plain"),
    );
    let mut command = Command::new("sh");
    command
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command.spawn().map_err(|e| format!("watchdog: {e}"))
}
