//! Many apps in one deployment (contract v3): each app — a brand's own, a white-label brand,
//! an installer's — is an instance of each provider it has credentials for: its own APNs
//! topic and team key (or certificate), its own Firebase project, its own connections, JWTs
//! and access tokens. Two apps never share one.
//!
//! - The app `default` comes from the single-app variables (`RINGPUSH_APNS_KEY_FILE` …,
//!   `RINGPUSH_FCM_CREDENTIALS_FILE`), as before there were apps.
//! - `RINGPUSH_APPS_DIR` holds one folder per app, named by its id, as Kubernetes mounts one
//!   Secret per app: `app.json` ([`folder`]) and the credential files it names, built into
//!   its providers with the deployment's settings ([`build`]).
//! - [`Apps::reload`] reads them all again — every `RINGPUSH_APPS_POLL` and on SIGHUP
//!   ([`Apps::watch`]): an app whose files changed gets new providers (rings prepared before
//!   finish with the old ones, every ring after uses the new ones: none lost, none doubled);
//!   a new folder serves; a removed one's tokens count `unconfigured`; a folder that cannot be
//!   read or is invalid keeps its app's last good credentials, logged and counted, and never
//!   touches another app.

pub mod build;
pub mod folder;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::provider::{Provider, Providers};
use crate::token::AppId;

pub use folder::{AppJson, Credentials};

/// How far ahead an expiring certificate is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// What an app's credentials became: its providers, and when its certificates expire.
pub struct Built {
    pub providers: Vec<Arc<dyn Provider>>,
    /// Per provider (`apns`): the certificate's `notAfter`.
    pub expires: Vec<(&'static str, OffsetDateTime)>,
}

/// Builds an app's providers from its credentials, with the deployment's endpoints, CAs and
/// timeouts (the command line's settings).
pub type Build = Arc<dyn Fn(AppId, &Credentials) -> Result<Built, String> + Send + Sync>;

/// The app `default` from the single-app variables: the files they name (read to tell a
/// change), and how its providers are built from them (an error names the variable).
pub struct FromEnv {
    pub files: Vec<PathBuf>,
    pub build: Arc<dyn Fn() -> Result<Built, String> + Send + Sync>,
}

/// The apps' metrics.
#[derive(Clone, Default)]
struct Metrics {
    errors: Family<Vec<(String, String)>, Counter>,
    loads: Family<Vec<(String, String)>, Counter>,
    expiry: Family<Vec<(String, String)>, Gauge>,
}

fn app_label(app: &str) -> Vec<(String, String)> {
    vec![("app".to_owned(), app.to_owned())]
}

/// Files read, with their bytes.
type Files = Vec<(PathBuf, Vec<u8>)>;

/// What was last read of one app.
#[derive(Default)]
struct Seen {
    /// The files its providers were built from (what a change is told by).
    good: Option<Files>,
    /// The files of its last failure and the error (counted and logged once per change).
    failed: Option<(Files, String)>,
    /// Its certificates' expiry, per provider.
    expires: Vec<(&'static str, OffsetDateTime)>,
}

/// Every app of a deployment, read again when asked.
pub struct Apps {
    dir: Option<PathBuf>,
    env: Option<FromEnv>,
    build: Build,
    providers: Providers,
    seen: Mutex<HashMap<AppId, Seen>>,
    /// Folders whose name is no app id, logged once.
    bad_names: Mutex<std::collections::HashSet<String>>,
    /// One reload at a time (a SIGHUP during a poll waits for it).
    reloading: tokio::sync::Mutex<()>,
    /// SIGHUP, listened for from the start (its default action would end the process): a
    /// SIGHUP before the reloads run reads the apps once they do.
    #[cfg(unix)]
    hangup: Mutex<Option<tokio::signal::unix::Signal>>,
    /// The last error reading `RINGPUSH_APPS_DIR` itself (logged once per change).
    dir_error: Mutex<Option<String>>,
    metrics: Metrics,
}

/// A start-up that cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct StartError {
    pub var: &'static str,
    pub reason: String,
}

impl Apps {
    /// Reads every app once, at start: the app `default` from the variables (already checked
    /// by the caller: `env` builds), each folder of `dir`. A folder that cannot be used is
    /// logged and counted, and its app waits for a good one; the folder itself missing, a
    /// folder named `default` beside the variables, or no app at all stop the start.
    pub fn start(
        dir: Option<PathBuf>,
        env: Option<FromEnv>,
        build: Build,
    ) -> Result<Arc<Self>, StartError> {
        if let Some(dir) = &dir {
            let meta = std::fs::metadata(dir).map_err(|e| StartError {
                var: "RINGPUSH_APPS_DIR",
                reason: format!("{}: {e}", dir.display()),
            })?;
            if !meta.is_dir() {
                return Err(StartError {
                    var: "RINGPUSH_APPS_DIR",
                    reason: format!("{} is not a folder", dir.display()),
                });
            }
            if env.is_some() && dir.join("default").is_dir() {
                return Err(StartError {
                    var: "RINGPUSH_APPS_DIR",
                    reason: format!(
                        "{} has a folder `default`, and the single-app variables (RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_CERT_FILE or RINGPUSH_FCM_CREDENTIALS_FILE) configure the app `default` too: keep one of them",
                        dir.display()
                    ),
                });
            }
        }
        let apps = Arc::new(Self {
            dir,
            env,
            build,
            providers: Providers::new(Vec::new()).expect("no provider is one per platform"),
            seen: Mutex::default(),
            bad_names: Mutex::default(),
            reloading: tokio::sync::Mutex::new(()),
            #[cfg(unix)]
            hangup: Mutex::new(tokio::runtime::Handle::try_current().ok().and_then(|_| {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
            })),
            dir_error: Mutex::default(),
            metrics: Metrics::default(),
        });
        apps.read_all("start");
        if apps.providers.is_empty() {
            return Err(StartError {
                var: match apps.dir {
                    Some(_) => "RINGPUSH_APPS_DIR",
                    None => "RINGPUSH_APNS_KEY_FILE",
                },
                reason: "no push provider is configured: set APNs token auth (RINGPUSH_APNS_KEY_FILE, RINGPUSH_APNS_KEY_ID, RINGPUSH_APNS_TEAM_ID) or certificate auth (RINGPUSH_APNS_CERT_FILE), or FCM (RINGPUSH_FCM_CREDENTIALS_FILE), or app folders under RINGPUSH_APPS_DIR with a usable app.json".into(),
            });
        }
        Ok(apps)
    }

    /// The providers every worker of this process pushes through (kept current by reloads).
    pub fn providers(&self) -> &Providers {
        &self.providers
    }

    /// Registers `ringpush_app_config_errors_total{app}`, `ringpush_app_config_loads_total{app}`
    /// and `ringpush_credential_expiry_timestamp_seconds{app,provider}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "app_config_errors",
            "App folders (or the single-app variables' files) that could not be read or were invalid, per app, counted once per change; the app keeps its last good credentials",
            self.metrics.errors.clone(),
        );
        registry.register(
            "app_config_loads",
            "Credentials loaded per app: at start and at each change read (a rotated key, certificate or service account)",
            self.metrics.loads.clone(),
        );
        registry.register(
            "credential_expiry_timestamp_seconds",
            "When an app's certificate expires (Unix seconds), per app and provider; warned 30 days ahead",
            self.metrics.expiry.clone(),
        );
    }

    /// Reads every app again now (`why`: what asked, for the log). What changed is used for
    /// every ring prepared from now on.
    pub async fn reload(self: &Arc<Self>, why: &'static str) {
        let _one = self.reloading.lock().await;
        // Files are read (twice, a moment apart when a Secret is being swapped) and keys
        // parsed off the runtime's threads.
        let apps = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || apps.read_all(why)).await {
            error!(error = %e, "reading the apps' credentials failed; every app keeps what it has");
        }
    }

    /// Reloads every `every` and on SIGHUP, until `cancel`; warns once a day about
    /// certificates expiring within 30 days.
    pub async fn watch(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = self
            .hangup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .or_else(|| {
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
            });
        let mut warned_at = tokio::time::Instant::now();
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = hup => {
                    info!("SIGHUP: reading the apps' credentials again");
                    self.reload("SIGHUP").await;
                }
                _ = tokio::time::sleep(every) => self.reload("poll").await,
            }
            if warned_at.elapsed() >= Duration::from_secs(86_400) {
                warned_at = tokio::time::Instant::now();
                self.warn_expiring();
            }
        }
    }

    /// Reads the app `default` from the variables and every folder, applying what changed.
    fn read_all(&self, why: &str) {
        let mut present: Vec<AppId> = Vec::new();
        if let Some(env) = &self.env {
            present.push(AppId::DEFAULT);
            let files = env.files.clone();
            let build = env.build.clone();
            self.apply(
                AppId::DEFAULT,
                why,
                read_stable(|| read_files(&files)),
                |_| build(),
            );
        }
        if let Some(dir) = &self.dir {
            let folders = match list(dir) {
                Ok(f) => {
                    *self.dir_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    f
                }
                Err(e) => {
                    // The folder itself is gone or unreadable: every app keeps what it has
                    // (said once per change of the error).
                    let e = e.to_string();
                    let mut last = self.dir_error.lock().unwrap_or_else(|e| e.into_inner());
                    if last.as_deref() != Some(e.as_str()) {
                        error!(dir = %dir.display(), error = %e, "RINGPUSH_APPS_DIR cannot be read; every app keeps its credentials");
                        *last = Some(e);
                    }
                    return;
                }
            };
            for (name, path) in folders {
                let app = match AppId::named(&name) {
                    Ok(app) => app,
                    Err(e) => {
                        self.failed_name(&name, &e);
                        continue;
                    }
                };
                if app == AppId::DEFAULT && self.env.is_some() {
                    self.failed_name(&name, "a folder `default` beside the single-app variables: the variables configure the app `default`; this folder is ignored");
                    continue;
                }
                present.push(app);
                let read = read_stable(|| folder::read(&path));
                let build = self.build.clone();
                self.apply(app, why, read, |credentials| match credentials {
                    Some(c) => build(app, c),
                    None => Err("no app.json was read".into()),
                });
            }
        }
        // Apps whose folder is gone: their tokens count unconfigured from now on.
        let gone: Vec<AppId> = {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.keys()
                .filter(|a| !present.contains(a))
                .copied()
                .collect()
        };
        for app in gone {
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&app);
            if self.providers.apps().contains(&app) {
                let _ = self.providers.set_app(app, Vec::new());
                info!(%app, "the app's folder is gone: its tokens are counted unconfigured from now on");
            }
            self.clear_expiry(app);
        }
    }

    /// Applies what was read of one app: unchanged, nothing; changed and good, its new
    /// providers; bad, its last good ones stay and the error is logged and counted once per
    /// change.
    fn apply(
        &self,
        app: AppId,
        why: &str,
        read: Result<Read, String>,
        build: impl FnOnce(Option<&Credentials>) -> Result<Built, String>,
    ) {
        let mut seen_all = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let seen = seen_all.entry(app).or_default();
        let (files, credentials) = match read {
            Ok(Read { files, credentials }) => (files, credentials),
            Err(e) => {
                if seen.failed.as_ref().is_none_or(|(_, last)| *last != e) {
                    seen.failed = Some((Vec::new(), e.clone()));
                    drop(seen_all);
                    self.failed(app, &e);
                }
                return;
            }
        };
        if seen.good.as_ref() == Some(&files) {
            seen.failed = None;
            return;
        }
        if seen.failed.as_ref().is_some_and(|(f, _)| *f == files) {
            return;
        }
        let built = match credentials {
            None => build(None),
            Some(Ok(c)) => build(Some(&c)),
            Some(Err(e)) => Err(e),
        };
        let built = match built {
            Ok(built) => built,
            Err(e) => {
                seen.failed = Some((files, e.clone()));
                drop(seen_all);
                self.failed(app, &e);
                return;
            }
        };
        let platforms: Vec<&str> = built
            .providers
            .iter()
            .map(|p| p.platform().as_str())
            .collect();
        let platforms = platforms.join(", ");
        if let Err(e) = self.providers.set_app(app, built.providers) {
            seen.failed = Some((files, e.clone()));
            drop(seen_all);
            self.failed(app, &e);
            return;
        }
        let first = seen.good.is_none();
        seen.good = Some(files);
        seen.failed = None;
        seen.expires = built.expires.clone();
        drop(seen_all);
        self.metrics
            .loads
            .get_or_create(&app_label(app.as_str()))
            .inc();
        self.set_expiry(app, &built.expires);
        if first {
            info!(%app, platforms, "app credentials loaded");
        } else {
            info!(%app, platforms, why, "app credentials changed: every ring from now on is pushed with the new ones");
        }
    }

    /// An app whose files could not be used: logged, counted; it keeps what it had.
    fn failed(&self, app: AppId, error: &str) {
        self.metrics
            .errors
            .get_or_create(&app_label(app.as_str()))
            .inc();
        if self.providers.apps().contains(&app) {
            error!(%app, error, "the app's credentials could not be read again; it keeps its last good ones");
        } else {
            error!(%app, error, "the app's credentials cannot be used; its tokens are counted unconfigured until they can");
        }
    }

    /// A folder whose name is no app id (or `default` beside the variables): logged and
    /// counted once.
    fn failed_name(&self, name: &str, error: &str) {
        let shown: String = name.chars().take(AppId::MAX_NAME).collect();
        let new = self
            .bad_names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(shown.clone());
        if new {
            self.metrics.errors.get_or_create(&app_label(&shown)).inc();
            error!(folder = %shown, error, "an app folder that cannot be used");
        }
    }

    fn set_expiry(&self, app: AppId, expires: &[(&'static str, OffsetDateTime)]) {
        self.clear_expiry(app);
        for (provider, at) in expires {
            let labels = vec![
                ("app".to_owned(), app.as_str().to_owned()),
                ("provider".to_owned(), (*provider).to_owned()),
            ];
            self.metrics
                .expiry
                .get_or_create(&labels)
                .set(at.unix_timestamp());
            warn_if_expiring(app, provider, *at);
        }
    }

    fn clear_expiry(&self, app: AppId) {
        for provider in ["apns", "fcm"] {
            let labels = vec![
                ("app".to_owned(), app.as_str().to_owned()),
                ("provider".to_owned(), provider.to_owned()),
            ];
            self.metrics.expiry.remove(&labels);
        }
    }

    fn warn_expiring(&self) {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (app, s) in seen.iter() {
            for (provider, at) in &s.expires {
                warn_if_expiring(*app, provider, *at);
            }
        }
    }
}

/// Warns when a certificate expires within [`EXPIRY_WARNING`] (or has expired).
fn warn_if_expiring(app: AppId, provider: &str, at: OffsetDateTime) {
    let left = at - OffsetDateTime::now_utc();
    let day = crate::wire::time::format_rfc3339(at);
    if left.is_negative() {
        error!(%app, provider, expired = %day, "the app's certificate has expired: its phones get no rings until it is renewed");
    } else if left < EXPIRY_WARNING {
        warn!(%app, provider, expires = %day, days = left.whole_days(), "the app's certificate expires within 30 days: renew it and replace the file (it is read again without a restart)");
    }
}

/// What was read of an app: its files' bytes (what a change is told by) and, for a folder,
/// its credentials (or why its `app.json` is invalid); `None` for the variables' app, whose
/// build reads the files itself.
pub(crate) struct Read {
    pub files: Files,
    pub credentials: Option<Result<Credentials, String>>,
}

/// The variables' files, read (a missing one is the build's error to name).
fn read_files(files: &[PathBuf]) -> Result<Read, String> {
    let files = files
        .iter()
        .map(|f| (f.clone(), std::fs::read(f).unwrap_or_default()))
        .collect();
    Ok(Read {
        files,
        credentials: None,
    })
}

/// Reads until two reads in a row agree: a Secret updated in place swaps every file at once
/// through a symlink, and a read across the swap could pair a new `app.json` with an old key.
fn read_stable(read: impl Fn() -> Result<Read, String>) -> Result<Read, String> {
    let mut last = read()?;
    for _ in 0..5 {
        let again = read()?;
        if again.files == last.files {
            return Ok(again);
        }
        std::thread::sleep(Duration::from_millis(50));
        last = again;
    }
    Err("its files kept changing while they were read; tried again at the next reload".into())
}

/// The app folders of `dir`, by name (hidden entries — a Secret's `..data` — left out).
fn list(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // A folder that cannot be looked at (a stat failing for a moment mid-swap) is still
        // an app: its read fails, is counted, and it keeps its credentials — it is not gone.
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_dir() => {}
            _ => found.push((name, path)),
        }
    }
    found.sort();
    Ok(found)
}
