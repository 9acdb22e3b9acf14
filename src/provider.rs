//! The seam between the worker and the push services. A push service is a [`Provider`]: it
//! prepares a ring's message for a kind of phone once, sends it to one token and says what
//! the answer means in the provider-neutral [`Answer`] — accepted, the token is dead,
//! rejected for good, skipped, try again, or the service could not be reached. It also says
//! whether it is up, how to probe it, whether a ring it cannot reach may be held, and what
//! it shows at `/metrics`. [`Providers`] is the registry the worker pushes through, keyed by
//! [`Platform`] (the `platform` column): APNs (`crate::apns::Provider`) and FCM
//! (`crate::fcm::Provider`) are two entries, assembled by the command line; a provider
//! defined outside this crate registers the same way (`tests/it/seam.rs`).
//!
//! Nothing here knows a particular service: what its status codes mean lives in its own
//! folder; what becomes of the ring is decided in `worker::decide` from the answers alone.

pub mod guard;
mod prepare;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use tracing::warn;

use crate::db::Recipient;
use crate::token::{AppId, Environment, Kind, Platform};

pub use prepare::{followup_text, AlertTemplate, Ending, Messages, Prepared, Ring};

/// One token's answer, whatever the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The provider took the notification (not proof the phone showed it).
    Accepted,
    /// The provider says the token is dead (the app was deleted, the token expired): report
    /// it for the purge, never retry it. `since`: when the provider last knew it invalid.
    Dead {
        reason: String,
        since: OffsetDateTime,
        observed_at: OffsetDateTime,
        /// When the answer says "this token was never valid here" — the answer a
        /// configuration mistake gives every token —, the setting to check ([`guard`]).
        mistake: Option<&'static str>,
    },
    /// The provider said the token is dead, but so it says of most tokens of the scope, or
    /// of tokens it took lately: a configuration mistake is suspected ([`guard`]). Not
    /// reported for the purge; the token goes on the retry path without spending an attempt.
    Doubted { error: String },
    /// Refused for good for another reason (a payload it will not take; with `ours`, our
    /// credentials or topic — no phone will ring until someone fixes them): counted under
    /// `reason`, not retried.
    Rejected { reason: String, ours: bool },
    /// Not sent, and never will be by this worker: no provider is registered for the
    /// token's platform, or the one registered cannot carry its kind. Counted, not retried.
    Skipped(Skip),
    /// No answer, or one that says "try again" (`answered`: the provider did answer; `after`:
    /// how long it asked to wait first — FCM's `Retry-After`).
    Retry {
        error: String,
        answered: bool,
        after: Option<Duration>,
    },
    /// No connection to the provider could be had at all: the worker's trouble, not the
    /// ring's. `holds`: the provider's [`Provider::holds`].
    Unreachable { error: String, holds: bool },
}

/// Why a token was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No provider is registered for its platform (its credentials are not configured).
    Unconfigured(Platform),
    /// Its provider cannot carry its kind (a call-style ring over APNs's legacy binary
    /// interface, which has no VoIP pushes).
    Unsupported(Platform),
}

impl Answer {
    /// Whether the provider answered this request (its latency is a request's latency).
    pub fn answered(&self) -> bool {
        match self {
            Answer::Retry { answered, .. } => *answered,
            Answer::Unreachable { .. } | Answer::Skipped(_) => false,
            // Only a `Dead` answer is doubted: the provider did answer.
            Answer::Doubted { .. } => true,
            _ => true,
        }
    }
}

/// What [`Provider::send`] returns: the answer, later.
pub type Sending<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;
/// What [`Provider::probe`] returns: whether it can be reached, later.
pub type Probing<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
/// A message a provider prepared for one kind of phone, shared by every token of that kind
/// (the provider that made it reads it back with `downcast_ref`).
pub type Message = Arc<dyn Any + Send + Sync>;
/// Why a ring cannot be sent to anyone of a kind (its payload would be too large).
pub type PrepareError = Box<dyn std::error::Error + Send + Sync>;

/// A push service, as the worker uses it. Object-safe: the registry holds `Arc<dyn Provider>`.
pub trait Provider: Send + Sync + fmt::Debug + 'static {
    /// The platform whose tokens it pushes (their `platform` column).
    fn platform(&self) -> Platform;

    /// Builds the ring's message for its tokens of `kind`, once per ring and kind — for a
    /// follow-up ([`Ring::ending`] set), the message that tells the phone the ring ended.
    fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError>;

    /// Whether its tokens of `kind` get a follow-up when a ring ends; `Err` names the outcome
    /// they are counted under instead (`ringpush_followups_total{outcome}`), e.g.
    /// `skipped_voip` (Apple requires every VoIP push to report a new call).
    fn follow_up(&self, _kind: Kind) -> Result<(), &'static str> {
        Ok(())
    }

    /// Sends the prepared `message` to one token and says what the answer means.
    fn send<'a>(
        &'a self,
        ring: &'a Prepared,
        message: &'a Message,
        to: &'a Recipient,
    ) -> Sending<'a>;

    /// The topic a request for `to` goes under, when the service has topics (APNs): what a
    /// feedback event about the token names.
    fn topic(&self, _ring: &Prepared, _to: &Recipient) -> Option<String> {
        None
    }

    /// What its answers are weighed against when they say a token is dead (`guard`): the
    /// credentials and addressing the request went under.
    fn scope(&self, ring: &Prepared, to: &Recipient) -> guard::Scope;

    /// Whether a ring none of whose tokens could be reached may be held (consumption paused
    /// and this provider probed) when it is the only provider registered. A provider that
    /// says no has its unreachable tokens wait on the retry path instead.
    fn holds(&self) -> bool {
        false
    }

    /// Whether it is usable as far as this worker knows.
    fn up(&self) -> bool {
        true
    }

    /// What `/readyz` says while it is not [`up`](Provider::up).
    fn down(&self) -> String {
        format!(
            "{} unreachable; its tokens wait on the retry path",
            self.platform().provider_name()
        )
    }

    /// Whether it can be reached now (for `environment`, where that matters): what a worker
    /// paused for it probes.
    fn probe(&self, environment: Environment) -> Probing<'_>;

    /// What is known only at scrape time (connections, streams in flight): the registry
    /// shows each with the provider's app (`app` label), one family per name.
    fn stats(&self) -> Vec<Stat> {
        Vec::new()
    }
}

/// A number a provider shows at `/metrics`, read at scrape time.
#[derive(Debug, Clone)]
pub struct Stat {
    /// The family's name, without `ringpush_` (`apns_connections`).
    pub name: &'static str,
    pub help: &'static str,
    /// A counter (else a gauge).
    pub counter: bool,
    /// Its labels besides `app`.
    pub labels: Vec<(&'static str, &'static str)>,
    pub value: i64,
}

impl Stat {
    pub fn gauge(name: &'static str, help: &'static str, value: i64) -> Self {
        Self {
            name,
            help,
            counter: false,
            labels: Vec::new(),
            value,
        }
    }
}

/// The providers a worker pushes through: per app, one per platform (an app is an instance
/// of each provider it has credentials for — its own connections, JWTs and access tokens);
/// the guard that judges their "dead" answers; the once-a-minute warnings for tokens no
/// provider takes. Clones share everything: an app's providers replaced on one clone
/// ([`Providers::set_app`], a reload) are what every clone pushes through from then on.
#[derive(Clone)]
pub struct Providers {
    /// The apps' providers now; a ring prepared holds the ones it was prepared with.
    table: Arc<RwLock<Arc<Table>>>,
    /// `ringpush_<platform>_request_seconds`: each platform's request latency, send to
    /// answer (FCM's with a `Retry-After` wait included), whatever the app.
    request_seconds: Arc<[(Platform, Histogram)]>,
    /// When a skipped token was last warned about, per app, platform and reason (seconds
    /// since the epoch): at most one warning a minute each.
    warned: Arc<Mutex<HashMap<Warned, u64>>>,
    /// Judges "dead" answers against the rest before they may delete a token.
    pub guard: Arc<guard::Guard>,
}

/// What a skipped token was warned about: its app, platform, and whether it was unsupported.
type Warned = (AppId, Platform, bool);

/// Every app's providers at one moment.
#[derive(Default)]
struct Table {
    entries: Vec<(AppId, Arc<dyn Provider>)>,
}

impl Table {
    fn get(&self, app: AppId, platform: Platform) -> Option<&Arc<dyn Provider>> {
        self.entries
            .iter()
            .find(|(a, p)| *a == app && p.platform() == platform)
            .map(|(_, p)| p)
    }
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries()).finish()
    }
}

/// Refuses a second provider for one platform in one app: a mistake in the assembly.
fn one_per_platform(app: AppId, providers: &[Arc<dyn Provider>]) -> Result<(), String> {
    for (i, p) in providers.iter().enumerate() {
        if providers[..i].iter().any(|q| q.platform() == p.platform()) {
            return Err(format!(
                "two providers for the platform {} in the app {app}",
                p.platform()
            ));
        }
    }
    Ok(())
}

impl Providers {
    /// The registry of `providers`, one per platform, all the app `default`'s (a second one
    /// for a platform is a mistake in the assembly: refused, naming it).
    pub fn new(providers: Vec<Arc<dyn Provider>>) -> Result<Self, String> {
        Self::of_apps(vec![(AppId::DEFAULT, providers)])
    }

    /// The registry of several apps' providers, one per platform in each app.
    pub fn of_apps(apps: Vec<(AppId, Vec<Arc<dyn Provider>>)>) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, (app, providers)) in apps.iter().enumerate() {
            if apps[..i].iter().any(|(a, _)| a == app) {
                return Err(format!("the app {app} is given twice"));
            }
            one_per_platform(*app, providers)?;
            entries.extend(providers.iter().map(|p| (*app, p.clone())));
        }
        // Every platform met now, and APNs and FCM whatever is configured: an app that
        // appears later with a platform no app had has its latency measured too.
        let mut platforms = vec![Platform::APNS, Platform::FCM];
        for (_, p) in &entries {
            if !platforms.contains(&p.platform()) {
                platforms.push(p.platform());
            }
        }
        Ok(Self {
            request_seconds: platforms
                .into_iter()
                .map(|p| (p, crate::metrics::latency_histogram()))
                .collect(),
            table: Arc::new(RwLock::new(Arc::new(Table { entries }))),
            warned: Arc::default(),
            guard: Arc::default(),
        })
    }

    /// The table now (a ring prepared keeps the providers it was prepared with).
    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces `app`'s providers (none: the app is gone, its tokens are skipped as
    /// unconfigured). A ring already prepared finishes with the ones it was prepared with;
    /// every ring prepared after this uses the new ones. Refused when two are for one
    /// platform.
    pub fn set_app(&self, app: AppId, providers: Vec<Arc<dyn Provider>>) -> Result<(), String> {
        one_per_platform(app, &providers)?;
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<_> = table
            .entries
            .iter()
            .filter(|(a, _)| *a != app)
            .cloned()
            .collect();
        entries.extend(providers.into_iter().map(|p| (app, p)));
        *table = Arc::new(Table { entries });
        Ok(())
    }

    /// The provider of `app` for `platform`, when one is registered.
    pub fn get(&self, app: AppId, platform: Platform) -> Option<Arc<dyn Provider>> {
        self.table().get(app, platform).cloned()
    }

    /// Some provider of `platform` (whichever app's): the endpoints are the deployment's, so
    /// any of them tells whether the service can be reached.
    pub fn any(&self, platform: Platform) -> Option<Arc<dyn Provider>> {
        let table = self.table();
        let found = table.entries.iter().find(|(_, p)| p.platform() == platform);
        found.map(|(_, p)| p.clone())
    }

    /// Registers each platform's request latency histogram,
    /// `ringpush_<platform>_request_seconds`.
    pub fn register(&self, registry: &mut Registry) {
        for (platform, h) in self.request_seconds.iter() {
            registry.register(
                format!("{platform}_request_seconds"),
                format!(
                    "{} request latency, send to answer (a wait the service asked for included)",
                    platform.provider_name()
                ),
                h.clone(),
            );
        }
    }

    /// Every provider registered now, with its app.
    pub fn entries(&self) -> Vec<(AppId, Arc<dyn Provider>)> {
        self.table().entries.clone()
    }

    /// The apps that have a provider now.
    pub fn apps(&self) -> Vec<AppId> {
        let mut apps: Vec<AppId> = self.table().entries.iter().map(|(a, _)| *a).collect();
        apps.sort();
        apps.dedup();
        apps
    }

    /// The platforms some app has a provider for now.
    pub fn platforms(&self) -> Vec<Platform> {
        let mut platforms: Vec<Platform> = Vec::new();
        for (_, p) in self.table().entries.iter() {
            if !platforms.contains(&p.platform()) {
                platforms.push(p.platform());
            }
        }
        platforms
    }

    /// How many providers are registered, over every app and platform. Only when there is
    /// one may a ring none of whose tokens can be reached be held (consumption paused, that
    /// provider probed): with two or more — two platforms, or two apps, whose connections
    /// and credentials fail apart — a down one never pauses the others' rings, and its
    /// tokens wait on the retry path.
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table().entries.is_empty()
    }

    /// Prepares a ring for `recipients`: for each app and platform among them, its provider's
    /// message for each kind among its tokens, built once and shared by them.
    pub fn prepare(
        &self,
        event: &crate::wire::ring::RingEvent,
        gateway_name: &str,
        recipients: &[&Recipient],
        messages: &Messages<'_>,
        ending: Option<&Ending>,
    ) -> Result<Prepared, PrepareError> {
        let table = self.table();
        let of = |app, platform| table.get(app, platform).cloned();
        Prepared::new(&of, event, gateway_name, recipients, messages, ending)
    }

    /// Whether `to` gets a follow-up when a ring ends (`Err`: the outcome it is counted under
    /// instead). A token without a provider: `Ok` (it is then skipped as unconfigured, as
    /// for a ring).
    pub fn follows_up(&self, to: &Recipient) -> Result<(), &'static str> {
        match self.table().get(to.app, to.token.platform()) {
            Some(p) => p.follow_up(to.kind),
            None => Ok(()),
        }
    }

    /// Sends the ring to one token through the provider of its app and platform that the
    /// ring was prepared with, and says what it means.
    pub async fn send(&self, ring: &Prepared, to: &Recipient) -> Answer {
        let platform = to.token.platform();
        let Some((provider, message)) = ring.message(to.app, platform, to.kind) else {
            return self.skipped(to.app, Skip::Unconfigured(platform));
        };
        let sent = Instant::now();
        let answer = provider.send(ring, message, to).await;
        if answer.answered() {
            if let Some((_, h)) = self.request_seconds.iter().find(|(p, _)| *p == platform) {
                h.observe(sent.elapsed().as_secs_f64());
            }
        }
        if let Answer::Skipped(skip) = answer {
            return self.skipped(to.app, skip);
        }
        answer
    }

    /// The topic a request for `to` goes under (APNs), for the feedback event.
    pub fn topic(&self, ring: &Prepared, to: &Recipient) -> Option<String> {
        let (provider, _) = ring.message(to.app, to.token.platform(), to.kind)?;
        provider.topic(ring, to)
    }

    /// The scope `to`'s request went under (what the guard weighs its answer against): its
    /// provider's, within its app (one app's mistake is judged on that app's answers).
    pub fn scope(&self, ring: &Prepared, to: &Recipient) -> guard::Scope {
        let platform = to.token.platform();
        let scope = match ring.message(to.app, platform, to.kind) {
            Some((p, _)) => p.scope(ring, to),
            None => guard::Scope::new(platform, "(no provider)"),
        };
        match to.app {
            AppId::DEFAULT => scope,
            app => guard::Scope::new(scope.platform, format!("app {app}: {}", scope.what)),
        }
    }

    /// Whether `platform` can be reached now: what a paused worker probes (any app's
    /// provider of it: the endpoints are the deployment's).
    pub async fn probe(&self, platform: Platform, environment: Environment) -> Result<(), String> {
        match self.any(platform) {
            Some(p) => p.probe(environment).await,
            None => Ok(()),
        }
    }

    /// Counts a skipped token, warning about its reason at most once a minute per app and
    /// platform.
    fn skipped(&self, app: AppId, skip: Skip) -> Answer {
        let (platform, unsupported) = match skip {
            Skip::Unconfigured(p) => (p, false),
            Skip::Unsupported(p) => (p, true),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let due = {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            let last = warned.entry((app, platform, unsupported)).or_insert(0);
            let due = now.saturating_sub(*last) >= 60;
            if due {
                *last = now;
            }
            due
        };
        if due {
            let name = platform.provider_name();
            if unsupported {
                warn!(%app, platform = %platform, "a call-style ring to a {name} token was not pushed: {name} as configured cannot carry calls (APNs's legacy binary interface has no VoIP pushes); counted as unsupported, not retried (warned once a minute)");
            } else {
                warn!(%app, platform = %platform, "a {name} token of the app {app} was not pushed: the app has no {name} credentials ({}); such tokens are counted as unconfigured, not retried (warned once a minute)", configured_by(app, platform));
            }
        }
        Answer::Skipped(skip)
    }
}

/// What configures a platform's provider, for the warning about its skipped tokens.
fn configured_by(app: AppId, platform: Platform) -> String {
    match (app, platform) {
        (AppId::DEFAULT, Platform::APNS) => {
            "RINGPUSH_APNS_KEY_FILE or RINGPUSH_APNS_CERT_FILE, or RINGPUSH_APPS_DIR/default".into()
        }
        (AppId::DEFAULT, Platform::FCM) => {
            "RINGPUSH_FCM_CREDENTIALS_FILE, or RINGPUSH_APPS_DIR/default".into()
        }
        (app, Platform::APNS) => format!("\"apns\" in RINGPUSH_APPS_DIR/{app}/app.json"),
        (app, Platform::FCM) => format!("\"fcm\" in RINGPUSH_APPS_DIR/{app}/app.json"),
        _ => "no provider is registered for this platform".into(),
    }
}

#[cfg(test)]
mod tests;
