//! What the demo saw, read from the worker's counters and from what the mock APNs and the
//! mock FCM received, per person and phone — and, at the gateway the apps share, under
//! which app's credentials each phone got its ring; and how it is printed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::apps::Rotation;
use super::seed::{label, Person, SHARED_GATEWAY};
use crate::mock::Mock;
use crate::mock_fcm::MockFcm;
use crate::token::{Kind, Platform};
use crate::worker::Counters;

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
    /// Every push of the ring at the gateway users of different apps share, to each phone,
    /// as APNs and FCM received it.
    pub shared: Vec<SharedPush>,
    /// The key rotated while the worker ran (token auth only).
    pub rotation: Option<Rotation>,
}

/// One push to a phone of the shared gateway's ring: the ring or its follow-up.
#[derive(Debug, Clone)]
pub struct SharedPush {
    pub who: String,
    /// `iPhone alert`, `Android alert`, …
    pub phone: String,
    /// The phone's app (its token's `push_tokens.app`).
    pub app: String,
    /// `ring`, or how the ring ended for its follow-up (`answered`).
    pub push: String,
    pub carried: Carried,
}

/// Whose credentials a push carried, as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    /// APNs over HTTP/2 with token auth: the `apns-topic` and the JWT's key and team.
    Jwt {
        topic: String,
        key_id: String,
        team_id: String,
    },
    /// APNs over a connection whose client certificate is issued for `topic` (the binary
    /// interface's only auth).
    Certificate { topic: String },
    /// FCM: the project it was sent for and the service account its access token was issued
    /// to.
    Fcm { project: String, account: String },
}

impl fmt::Display for Carried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Carried::Jwt {
                topic,
                key_id,
                team_id,
            } => write!(f, "{topic:<22} key {key_id} of team {team_id}"),
            Carried::Certificate { topic } => write!(f, "{topic:<22} a client certificate for it"),
            Carried::Fcm { project, account } => {
                let account = account.split('@').next().unwrap_or_default();
                write!(f, "project {project:<14} service account {account}@…")
            }
        }
    }
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
        if !self.shared.is_empty() {
            writeln!(f)?;
            let apps: std::collections::BTreeSet<&str> =
                self.shared.iter().map(|p| p.app.as_str()).collect();
            writeln!(
                f,
                "one gateway, {} apps: the {}'s ring, each phone through its own app (as APNs and FCM received it)",
                apps.len(),
                SHARED_GATEWAY.1
            )?;
            let (mut last_who, mut last_phone) = ("", ("", ""));
            for p in &self.shared {
                let phone = (p.who.as_str(), p.phone.as_str());
                let (who, shown, app) = match (p.who == last_who, phone == last_phone) {
                    (_, true) => ("", "", ""),
                    (true, false) => ("", p.phone.as_str(), p.app.as_str()),
                    (false, _) => (p.who.as_str(), p.phone.as_str(), p.app.as_str()),
                };
                (last_who, last_phone) = (p.who.as_str(), phone);
                writeln!(
                    f,
                    "  {who:<8} {shown:<14} {app:<8} {:<9} {}",
                    p.push, p.carried
                )?;
            }
            if let Some(r) = &self.rotation {
                writeln!(
                    f,
                    "  ({}'s key rotated between the ring and its answer, the worker not restarted: {} → {}, the old key revoked)",
                    r.app, r.from, r.to
                )?;
            }
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

pub(super) fn report(
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

/// Every push of the ring `event_id` (the shared gateway's) that APNs or FCM accepted, per
/// person and phone in the seed's order, the ring before its follow-up.
pub(super) fn shared(
    people: &[Person],
    mock: &Mock,
    fcm: &MockFcm,
    event_id: &str,
) -> Vec<SharedPush> {
    let mut seen: HashMap<String, Vec<(String, Carried)>> = HashMap::new();
    for r in mock.received() {
        let payload: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
        if r.reason.is_some() || payload["event_id"] != event_id {
            continue;
        }
        let push = payload["state"].as_str().unwrap_or("ring").to_owned();
        let carried = match (r.key_id, r.certificate_topic) {
            (Some(key_id), _) => Carried::Jwt {
                topic: r.topic.unwrap_or_default(),
                key_id,
                team_id: r.team_id.unwrap_or_default(),
            },
            (None, topic) => Carried::Certificate {
                topic: topic.unwrap_or_default(),
            },
        };
        let token = r.token.unwrap_or_default();
        seen.entry(token).or_default().push((push, carried));
    }
    for r in fcm.received() {
        let data = &r.body["message"]["data"];
        if r.status != 200 || data["event_id"] != event_id {
            continue;
        }
        let push = match data["kind"].as_str() {
            Some("ended") => data["state"].as_str().unwrap_or_default().to_owned(),
            _ => "ring".to_owned(),
        };
        let carried = Carried::Fcm {
            project: r.project,
            account: r.account.unwrap_or_default(),
        };
        let token = r.token.unwrap_or_default();
        seen.entry(token).or_default().push((push, carried));
    }
    let mut pushes = Vec::new();
    for person in people {
        for phone in &person.phones {
            for (push, carried) in seen.remove(phone.token.as_str()).unwrap_or_default() {
                pushes.push(SharedPush {
                    who: person.name.to_owned(),
                    phone: phone.label(),
                    app: person.app.to_owned(),
                    push,
                    carried,
                });
            }
        }
    }
    pushes
}
