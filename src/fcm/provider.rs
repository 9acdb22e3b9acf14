//! FCM as a [`crate::provider::Provider`]: a ring's message per kind (alert; call, a
//! data-only message), one `messages:send` per token, and what each FCM answer means — a
//! dead token (`SENDER_ID_MISMATCH` with the setting to check: an answer another Firebase
//! project's service account gives every token), a retry (`Retry-After` kept;
//! THIRD_PARTY_AUTH_ERROR logged as an error: a new access token does not cure it), a
//! rejection, or FCM unreachable (no connection, no access token), which never holds a ring:
//! its tokens wait on the retry path, so a down FCM never pauses the iPhones.

use std::sync::atomic::Ordering;

use time::OffsetDateTime;
use tracing::error;

use super::answer::{Code, Verdict};
use super::message::{Style, Template};
use super::{Client, FcmError};
use crate::db::Recipient;
use crate::provider::guard::Scope;
use crate::provider::{
    self, Answer, Message, PrepareError, Prepared, Probing, Ring, Sending, Stat,
};
use crate::token::{Environment, Kind, Platform};

/// FCM, registered with the worker's providers.
#[derive(Debug, Clone)]
pub struct Provider {
    client: Client,
}

impl Provider {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The client it sends through.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl provider::Provider for Provider {
    fn platform(&self) -> Platform {
        Platform::FCM
    }

    fn prepare(&self, ring: &Ring<'_>, kind: Kind) -> Result<Message, PrepareError> {
        if let Some(ending) = ring.ending {
            return Ok(std::sync::Arc::new(Template::followup(
                ring.event,
                ring.gateway_name,
                kind,
                ending,
                self.client.quiet_channel(),
            )));
        }
        let style = Style {
            alert: ring.messages.alert,
            channel: self.client.channel(),
        };
        Ok(std::sync::Arc::new(Template::new(
            ring.event,
            ring.gateway_name,
            kind,
            &style,
        )))
    }

    fn send<'a>(
        &'a self,
        ring: &'a Prepared,
        message: &'a Message,
        to: &'a Recipient,
    ) -> Sending<'a> {
        Box::pin(async move {
            let template: &Template = message.downcast_ref().expect("FCM prepared it");
            answer_of(
                self.client
                    .send(template, &to.token, ring.expiration())
                    .await,
            )
        })
    }

    fn scope(&self, _ring: &Prepared, _to: &Recipient) -> Scope {
        Scope::new(Platform::FCM, format!("project {}", self.client.project()))
    }

    fn up(&self) -> bool {
        self.client.up()
    }

    fn down(&self) -> String {
        "FCM unreachable, or its token endpoint refusing the service account; Android tokens wait on the retry path".into()
    }

    fn probe(&self, _environment: Environment) -> Probing<'_> {
        Box::pin(async move { self.client.probe().await.map_err(|e| e.to_string()) })
    }

    fn stats(&self) -> Vec<Stat> {
        let tokens = self.client.tokens();
        let renewals = |outcome, n: &std::sync::atomic::AtomicU64| {
            Stat {
            name: "fcm_token_renewals",
            help: "OAuth 2.0 access-token exchanges at the service account's token_uri, per app and outcome.",
            counter: true,
            labels: vec![("outcome", outcome)],
            value: n.load(Ordering::Relaxed) as i64,
        }
        };
        vec![
            Stat::gauge(
                "fcm_connections",
                "Open HTTP/2 connections to FCM, per app.",
                self.client.connections_open(),
            ),
            Stat::gauge(
                "fcm_streams_in_flight",
                "FCM requests awaiting their answer, per app.",
                self.client.streams_in_flight(),
            ),
            renewals("ok", &tokens.renewals),
            renewals("failed", &tokens.renewal_failures),
        ]
    }
}

/// What an FCM answer means, in the provider-neutral [`Answer`] (docs/design.md, "What the
/// answers mean").
fn answer_of(result: Result<Verdict, FcmError>) -> Answer {
    match result {
        Ok(Verdict::Accepted) => Answer::Accepted,
        Ok(Verdict::Dead(code)) => {
            let now = OffsetDateTime::now_utc();
            Answer::Dead {
                mistake: (code == Code::SenderIdMismatch).then_some(
                    "check RINGPUSH_FCM_CREDENTIALS_FILE or the app folder's fcm.credentials_file: a service account of another Firebase project than the app's?",
                ),
                reason: code.to_string(),
                since: now,
                observed_at: now,
            }
        }
        Ok(Verdict::Rejected { code, ours }) => Answer::Rejected {
            reason: code.to_string(),
            ours,
        },
        Ok(Verdict::Retry { code, error, after }) => {
            if error {
                error!(code = %code, "FCM cannot deliver for the project's third-party credentials (APNs certificate or web push key); retrying");
            }
            Answer::Retry {
                error: format!("FCM {code}"),
                answered: true,
                after,
            }
        }
        Ok(Verdict::Unauthenticated) => Answer::Retry {
            error: "FCM UNAUTHENTICATED after renewing the access token".into(),
            answered: true,
            after: None,
        },
        Err(e) if e.is_unreachable() => Answer::Unreachable {
            error: e.to_string(),
            holds: false,
        },
        Err(e) => Answer::Retry {
            error: e.to_string(),
            answered: false,
            after: None,
        },
    }
}
