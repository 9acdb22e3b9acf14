//! The APNs leg: ringpush's HTTP/2 client against a bare `h2` loop over one connection
//! (the wire's ceiling in this stack), the client alone at the end-to-end half rate, and
//! the peer clients (`@parse/node-apn`, `aioapns`, driven by `bench/peers/`), each against
//! a mock process.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};

use super::Settings;
use crate::apns::request::{build_payload, build_request, AlertTemplate, Notification};
use crate::apns::{http2, Answer};
use crate::tls;
use crate::token::{random_hex, DeviceToken, Environment};

use super::bare::bare_h2;
use super::measure::{p50_p99, paced, self_cpu};
use super::peers::peer;
use super::processes::{signer, MockProcess};
use super::report::Report;
use super::ring_now;

pub(super) async fn apns_leg(
    args: &Settings,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mock = MockProcess::start(&dir.join("leg")).await?;
    let (signer, key_file) = signer(dir)?;
    let ca = mock.cert_dir.join("ca.pem");
    let ring = ring_now();
    let payload = build_payload(&ring, "Front door", &AlertTemplate::default())?;
    let tokens: Vec<DeviceToken> = (0..1000)
        .map(|_| DeviceToken::parse(&random_hex(32)).unwrap())
        .collect();
    let notification = |i: usize| Notification {
        push_type: crate::apns::request::PushType::Alert,
        token: tokens[i % tokens.len()].clone(),
        topic: "com.example.doorbell".into(),
        collapse_id: ring.event_id.clone(),
        expiration: ring.expires_at(Duration::from_secs(60)),
        payload: payload.clone(),
    };
    let n = args.apns_requests;

    // ringpush's client, one connection.
    let mut settings = http2::Settings::new(mock.endpoint(), mock.endpoint());
    settings.connections = 1;
    let client = http2::Client::new(
        settings,
        tls::client_config(Some(&ca), None)?,
        Some(signer.clone()),
    );
    client
        .send(Environment::Production, &notification(0))
        .await?; // connect, raise the stream limit
    let (cpu0, t0) = (self_cpu(), Instant::now());
    // Unconstrained: with a thousand futures in one `buffer_unordered`, tokio's cooperative
    // budget would make the driving task re-poll them all over and over (a harness cost,
    // not the client's).
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|i| {
                let (client, n) = (&client, notification(i));
                async move {
                    matches!(
                        client.send(Environment::Production, &n).await,
                        Ok(Answer::Accepted)
                    )
                }
            })
            .buffer_unordered(1000)
            .filter(|ok| std::future::ready(*ok))
            .count(),
    )
    .await;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), self_cpu() - cpu0);
    anyhow::ensure!(ok == n, "ringpush client: {ok} of {n} accepted");
    report.ringpush_client_per_s = n as f64 / secs;
    report.ringpush_client_cpu_us = cpu / n as f64 * 1e6;

    // The same client at the end-to-end half rate, for 3 s.
    let rate = report.half_rate.rings_per_s * args.fanout as f64;
    if rate >= 1.0 {
        let answered = paced(rate, (rate * 3.0) as usize, |i| {
            let (client, n) = (client.clone(), notification(i));
            async move {
                let t = Instant::now();
                let answer = client.send(Environment::Production, &n).await;
                matches!(answer, Ok(Answer::Accepted)).then(|| t.elapsed().as_secs_f64() * 1e3)
            }
        })
        .await?;
        let latencies = answered
            .into_iter()
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| anyhow::anyhow!("a request failed"))?;
        (
            report.ringpush_client_half_rate_p50_ms,
            report.ringpush_client_half_rate_p99_ms,
        ) = p50_p99(latencies);
    }

    // A bare h2 loop: the wire's ceiling in this stack (one connection, the same request).
    let n0 = notification(0);
    let request = build_request(&mock.endpoint(), &n0, Some(&signer.bearer()));
    let (per_s, cpu_us) = bare_h2(&mock.endpoint(), &ca, request, n0.payload, n, "bare h2").await?;
    report.bare_h2_per_s = per_s;
    report.bare_h2_cpu_us = cpu_us;

    if args.peers {
        for (name, script) in [
            ("@parse/node-apn", "node-apn.sh"),
            ("aioapns", "aioapns.sh"),
        ] {
            let n = args.peer_requests;
            let env = [
                ("MOCK_HOST", "localhost".into()),
                ("MOCK_PORT", mock.port.to_string().into()),
                ("MOCK_CA", mock.cert_dir.join("ca.pem").into()),
                ("KEY_FILE", key_file.clone().into()),
                ("KEY_ID", "BENCHKEY01".into()),
                ("TEAM_ID", "BENCHTEAM1".into()),
                // The doorbell payload ringpush sends, byte for byte.
                (
                    "PAYLOAD",
                    String::from_utf8_lossy(&payload).into_owned().into(),
                ),
            ];
            report.peers.push(peer(name, script, &env, n).await);
        }
    }
    Ok(())
}
