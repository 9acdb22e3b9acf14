//! The FCM leg: ringpush's FCM client against a bare `h2` loop over one connection, both
//! against a `mock-fcm` process (so its CPU is not counted with the client's), with the
//! access token the client obtained from the mock's token endpoint; then the peer sender,
//! `firebase-admin` (Python, `bench/peers/firebase-admin.sh`), as many messages to the same
//! mock, with the same service account (its token from the mock's `token_uri` too).

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use http::uri::PathAndQuery;

use super::bare::bare_h2;
use super::measure::self_cpu;
use super::peers::peer;
use super::processes::FcmMockProcess;
use super::report::Report;
use super::{ring_now, Settings};
use crate::apns::request::AlertTemplate;
use crate::fcm::answer::Verdict;
use crate::fcm::client::build_request;
use crate::fcm::message::{Style, Template};
use crate::fcm::{self, ServiceAccount};
use crate::http2::Endpoint;
use crate::tls;
use crate::token::{DeviceToken, Kind};

pub(super) async fn fcm_leg(
    args: &Settings,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mock = FcmMockProcess::start(&dir.join("fcm-leg")).await?;
    let (credentials, port, cert_dir) = (&mock.credentials, mock.port, &mock.cert_dir);
    let account = ServiceAccount::parse(&std::fs::read(credentials)?)?;
    let project = account.project_id.clone();
    let ca = cert_dir.join("ca.pem");
    let endpoint =
        Endpoint::parse(&format!("https://localhost:{port}")).map_err(anyhow::Error::msg)?;
    let mut settings = fcm::Settings::new(endpoint.clone());
    settings.tuning.connections = 1;
    let client = fcm::Client::new(settings, account, tls::client_config(Some(&ca), None)?)
        .map_err(anyhow::Error::msg)?;
    let ring = ring_now();
    let alert = AlertTemplate::default();
    let style = Style {
        alert: &alert,
        channel: fcm::DEFAULT_CHANNEL,
    };
    let message = Template::new(&ring, "Front door", Kind::Alert, &style);
    let tokens: Vec<DeviceToken> = (0..1000)
        .map(|_| {
            DeviceToken::parse_fcm(&crate::db::random_token(crate::token::Platform::FCM)).unwrap()
        })
        .collect();
    let expiration = ring.expires_at(Duration::from_secs(600));
    let n = args.apns_requests;
    // Connect, get the access token.
    anyhow::ensure!(
        matches!(
            client.send(&message, &tokens[0], expiration).await,
            Ok(Verdict::Accepted)
        ),
        "the first FCM send failed"
    );
    let (cpu0, t0) = (self_cpu(), Instant::now());
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|i| {
                let (client, message, token) = (&client, &message, &tokens[i % tokens.len()]);
                async move {
                    matches!(
                        client.send(message, token, expiration).await,
                        Ok(Verdict::Accepted)
                    )
                }
            })
            .buffer_unordered(1000)
            .filter(|ok| std::future::ready(*ok))
            .count(),
    )
    .await;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), self_cpu() - cpu0);
    anyhow::ensure!(ok == n, "ringpush FCM client: {ok} of {n} accepted");
    report.fcm_client_per_s = n as f64 / secs;
    report.fcm_client_cpu_us = cpu / n as f64 * 1e6;

    let bearer = client.tokens().get().await?;
    let path = PathAndQuery::try_from(format!("/v1/projects/{project}/messages:send"))?;
    let request = build_request(&endpoint, &path, bearer.bearer());
    let body = message.render(&tokens[0], 600);
    let (per_s, cpu_us) =
        bare_h2(&endpoint, &ca, request, body.clone(), n, "bare h2 (FCM)").await?;
    report.fcm_bare_h2_per_s = per_s;
    report.fcm_bare_h2_cpu_us = cpu_us;

    if args.peers {
        let env = [
            ("MOCK_URL", mock.url().into()),
            ("MOCK_CA", ca.clone().into()),
            ("CREDENTIALS", credentials.clone().into()),
            // The message ringpush sends (the peer sends the same fields, its own tokens).
            (
                "MESSAGE",
                String::from_utf8_lossy(&body).into_owned().into(),
            ),
        ];
        // As many messages as ringpush's FCM client sent: the same work, per message.
        let firebase_admin = peer("firebase-admin (Python)", "firebase-admin.sh", &env, n).await;
        if let Some(cpu_us) = firebase_admin.cpu_us {
            let ratio = cpu_us / report.fcm_client_cpu_us;
            report
                .fcm_client_cpu_ratio
                .insert(firebase_admin.name.clone(), ratio);
        }
        report.fcm_peers.push(firebase_admin);
    }
    Ok(())
}
