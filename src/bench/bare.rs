//! The bench's bare `h2` loop: one connection, the same request over and over, as fast as
//! `h2` goes — the wire's ceiling in this stack, which the APNs and FCM legs compare their
//! clients with.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};

use super::measure::self_cpu;
use crate::http2::Endpoint;
use crate::tls;

/// Sends `request` with `body` `n` times over one connection to `endpoint` (trusting `ca`),
/// 1,000 at a time; requests per second and CPU µs per request. `what` names the loop in
/// its errors.
pub(super) async fn bare_h2(
    endpoint: &Endpoint,
    ca: &Path,
    request: http::Request<()>,
    body: Bytes,
    n: usize,
    what: &str,
) -> anyhow::Result<(f64, f64)> {
    let tls = tokio_rustls::TlsConnector::from(tls::client_config(Some(ca), None)?);
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
    tcp.set_nodelay(true)?;
    let tls = tls
        .connect(
            rustls_pki_types::ServerName::try_from(endpoint.host.clone())?,
            tcp,
        )
        .await?;
    let (sender, connection) = h2::client::Builder::new()
        .initial_max_send_streams(1)
        .handshake::<_, Bytes>(tls)
        .await?;
    tokio::spawn(connection);
    let send = |sender: h2::client::SendRequest<Bytes>| {
        let (request, body) = (request.clone(), body.clone());
        async move {
            let mut sender = sender.ready().await?;
            let (response, mut stream) = sender.send_request(request, false)?;
            stream.send_data(body, true)?;
            let response = response.await?;
            let status = response.status();
            let mut recv = response.into_body();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk?;
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            anyhow::Ok(status.as_u16() == 200)
        }
    };
    anyhow::ensure!(send(sender.clone()).await?, "{what}: the first send failed");
    let (cpu0, t0) = (self_cpu(), Instant::now());
    let ok = tokio::task::unconstrained(
        stream::iter(0..n)
            .map(|_| send(sender.clone()))
            .buffer_unordered(1000)
            .filter(|r| std::future::ready(matches!(r, Ok(true))))
            .count(),
    )
    .await;
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), self_cpu() - cpu0);
    anyhow::ensure!(ok == n, "{what}: {ok} of {n} accepted");
    Ok((n as f64 / secs, cpu / n as f64 * 1e6))
}
