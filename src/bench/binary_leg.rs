//! The legacy binary interface: frames a second from ringpush's binary client to the mock
//! process's gateway port, with a client certificate from the mock's CA.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};

use super::Settings;
use crate::apns::request::{build_payload, AlertTemplate, Notification};
use crate::apns::{binary, Answer};
use crate::tls;
use crate::token::{random_hex, DeviceToken};

use super::processes::MockProcess;
use super::report::Report;
use super::ring_now;

pub(super) async fn binary_leg(
    args: &Settings,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mock = MockProcess::start(&dir.join("binary")).await?;
    let (cert, key) = crate::mock::certs::issue_client_certificate(&mock.cert_dir, "bench")?;
    let pem = dir.join("bench-client.pem");
    std::fs::write(&pem, format!("{cert}{key}"))?;
    let mut config = (*tls::client_config(
        Some(&mock.cert_dir.join("ca.pem")),
        Some(tls::Identity::from_file(&pem, "")?),
    )?)
    .clone();
    config.alpn_protocols.clear();
    let mut settings = binary::Settings::new(
        binary::Address::parse(&format!("localhost:{}", mock.binary_port))
            .map_err(anyhow::Error::msg)?,
    );
    settings.quiet = Duration::from_millis(100);
    let quiet = settings.quiet;
    settings.request_timeout = Duration::from_secs(120);
    let client = binary::Client::new(settings, Arc::new(config));
    let payload = build_payload(&ring_now(), "Front door", &AlertTemplate::default())?;
    let tokens: Vec<DeviceToken> = (0..1000)
        .map(|_| DeviceToken::parse(&random_hex(32)).unwrap())
        .collect();
    let n = args.binary_frames;
    let t0 = Instant::now();
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|i| {
                let n = Notification {
                    push_type: crate::apns::request::PushType::Alert,
                    token: tokens[i % tokens.len()].clone(),
                    topic: "com.example.doorbell".into(),
                    collapse_id: String::new(),
                    expiration: 0,
                    payload: payload.clone(),
                };
                let client = &client;
                async move { matches!(client.send(&n).await, Ok(Answer::Accepted)) }
            })
            .buffer_unordered(50_000)
            .filter(|ok| std::future::ready(*ok))
            .count(),
    )
    .await;
    anyhow::ensure!(ok == n, "binary: {ok} of {n} accepted");
    // Confirmation waits for the quiet period after the last write: count it out.
    let secs = (t0.elapsed() - quiet).as_secs_f64();
    report.binary_frames_per_s = n as f64 / secs;
    Ok(())
}
