//! The processes the bench starts: the mock APNs in a child process (so its CPU is not
//! counted with the client's), `ringpush worker` processes against it, and how they stop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Settings;
use crate::apns::jwt;
use crate::apns::request::Endpoint;
use crate::broker::Names;
use crate::local::Key;

use super::measure::cpu_seconds;

/// A free loopback port (bound, then released).
pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mock APNs in a child process (so its CPU is not counted with the client's).
pub(super) struct MockProcess {
    /// Killed when dropped.
    _child: tokio::process::Child,
    pub(super) port: u16,
    pub(super) binary_port: u16,
    pub(super) cert_dir: PathBuf,
}

impl MockProcess {
    pub(super) async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, &[]).await
    }

    /// [`MockProcess::start`], with more of `ringpush mock-apns`'s flags (JWT checks, an
    /// apps folder).
    pub(super) async fn start_with(dir: &Path, flags: &[OsString]) -> anyhow::Result<Self> {
        let (port, binary_port, feedback_port) = (free_port(), free_port(), free_port());
        let cert_dir = dir.join("mock-certs");
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("mock-apns")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--binary-listen", &format!("127.0.0.1:{binary_port}")])
            .args(["--feedback-listen", &format!("127.0.0.1:{feedback_port}")])
            .arg("--cert-dir")
            .arg(&cert_dir)
            .args(flags)
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .stdout(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the mock did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            _child: child,
            port,
            binary_port,
            cert_dir,
        })
    }

    /// CPU seconds the mock has used.
    pub(super) fn cpu(&self) -> f64 {
        self._child
            .id()
            .map_or(0.0, |pid| cpu_seconds(&pid.to_string()))
    }

    pub(super) fn endpoint(&self) -> Endpoint {
        Endpoint::parse(&format!("https://localhost:{}", self.port)).expect("a valid URL")
    }
}

/// A mock FCM in a child process, with the service account it wrote (its token_uri at the
/// mock) for the clients.
pub(super) struct FcmMockProcess {
    /// Killed when dropped.
    _child: tokio::process::Child,
    pub(super) port: u16,
    pub(super) cert_dir: PathBuf,
    pub(super) credentials: PathBuf,
}

impl FcmMockProcess {
    pub(super) async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, free_port(), &[]).await
    }

    /// [`FcmMockProcess::start`] on `port` (known beforehand: an apps folder's service
    /// accounts name it in their `token_uri`), with more of `ringpush mock-fcm`'s flags.
    pub(super) async fn start_with(
        dir: &Path,
        port: u16,
        flags: &[OsString],
    ) -> anyhow::Result<Self> {
        let (cert_dir, credentials) = (dir.join("fcm-certs"), dir.join("fcm-service-account.json"));
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("mock-fcm")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--cert-dir")
            .arg(&cert_dir)
            .arg("--generate-credentials")
            .arg(&credentials)
            .args(flags)
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .stdout(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        while !credentials.exists()
            || tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "mock-fcm did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The file is written whole before the mock logs it; give it that moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(Self {
            _child: child,
            port,
            cert_dir,
            credentials,
        })
    }

    /// CPU seconds the mock has used.
    pub(super) fn cpu(&self) -> f64 {
        self._child
            .id()
            .map_or(0.0, |pid| cpu_seconds(&pid.to_string()))
    }

    pub(super) fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
}

pub(super) fn signer(dir: &Path) -> anyhow::Result<(Arc<jwt::Signer>, PathBuf)> {
    let key = Key::generate("BENCHKEY01", "BENCHTEAM1")?;
    let file = dir.join("bench-key.p8");
    key.write_p8(&file)?;
    Ok((Arc::new(key.signer()?), file))
}

/// Stops a worker process as Kubernetes would (SIGTERM) and waits for it (at most 30 s).
pub(super) async fn stop(worker: &mut tokio::process::Child) {
    if let Some(pid) = worker.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
}

/// What a `ringpush worker` process of the bench is started with.
pub(super) struct WorkerOf<'a> {
    pub(super) args: &'a Settings,
    pub(super) names: &'a Names,
    pub(super) db_url: &'a str,
    pub(super) mock: &'a MockProcess,
    pub(super) key_file: &'a Path,
    /// The mock FCM, for a fleet with Android phones.
    pub(super) fcm: Option<&'a FcmMockProcess>,
}

/// The bench workers' ring TTL (`RINGPUSH_RING_TTL`), and the ring timeout
/// (`RINGPUSH_RING_TIMEOUT`, at most the TTL) unless the bench's environment sets one: longer
/// than a run, with `--soak` too.
const RING_TTL: &str = "3600s";

impl WorkerOf<'_> {
    /// The `application_name` of the database connections of the worker serving `/metrics`
    /// on `metrics_port`: how its backends are told apart in `pg_stat_activity`.
    pub(super) fn application_name(metrics_port: u16) -> String {
        format!("ringpush-bench-worker-{metrics_port}")
    }

    /// Starts one worker against the mock, serving `/metrics` on `metrics_port`. Its logs
    /// are warnings only, or — with `info_log` — its per-ring lines too, as JSON, into that
    /// file. The worker's other variables come from the bench's environment.
    pub(super) fn spawn(
        &self,
        metrics_port: u16,
        info_log: Option<&Path>,
    ) -> anyhow::Result<tokio::process::Child> {
        self.spawn_with(metrics_port, info_log, &[])
    }

    /// [`WorkerOf::spawn`], with `env` on top.
    pub(super) fn spawn_with(
        &self,
        metrics_port: u16,
        info_log: Option<&Path>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<tokio::process::Child> {
        let mock = self.mock;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("worker")
            .env("RINGPUSH_AMQP_URL", &self.args.amqp_url)
            .env("RINGPUSH_QUEUE_PREFIX", &self.names.prefix)
            .env(
                "RINGPUSH_DATABASE_URL",
                format!(
                    "{}{}application_name={}",
                    self.db_url,
                    if self.db_url.contains('?') { '&' } else { '?' },
                    Self::application_name(metrics_port)
                ),
            )
            .env(
                "RINGPUSH_APNS_PRODUCTION_URL",
                format!("https://localhost:{}", mock.port),
            )
            .env(
                "RINGPUSH_APNS_SANDBOX_URL",
                format!("https://localhost:{}", mock.port),
            )
            .env("RINGPUSH_APNS_CA_FILE", mock.cert_dir.join("ca.pem"))
            .env("RINGPUSH_APNS_KEY_FILE", self.key_file)
            .env("RINGPUSH_APNS_KEY_ID", "BENCHKEY01")
            .env("RINGPUSH_APNS_TEAM_ID", "BENCHTEAM1")
            .env("RINGPUSH_RING_TTL", RING_TTL)
            .env("RINGPUSH_PREFETCH", self.args.prefetch.to_string())
            .env("RINGPUSH_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        // The bench presses each of its gateways about once a second, far more often than
        // a doorbell is pressed: debounce would fold those presses into one ring. And no
        // ring goes missed within a run (whose follow-ups would join the next drain's
        // count). Either can still be set through the bench's environment.
        for (name, value) in [
            ("RINGPUSH_RING_DEBOUNCE", "0s"),
            ("RINGPUSH_RING_TIMEOUT", RING_TTL),
        ] {
            if std::env::var_os(name).is_none() {
                command.env(name, value);
            }
        }
        if let Some(fcm) = self.fcm {
            command
                .env("RINGPUSH_FCM_CREDENTIALS_FILE", &fcm.credentials)
                .env("RINGPUSH_FCM_URL", fcm.url())
                .env("RINGPUSH_FCM_CA_FILE", fcm.cert_dir.join("ca.pem"));
        }
        if let Some(file) = info_log {
            command
                .env("RUST_LOG", "warn,ringpush::worker=info")
                .env("RINGPUSH_LOG_FORMAT", "json")
                .stderr(std::fs::File::create(file)?);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        Ok(command.spawn()?)
    }
}
