//! The legacy feedback service (protocol sheet B6): connect with the client certificate,
//! send nothing, read tuples until the server closes. The list is cleared once read.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio_rustls::TlsConnector;

use super::codec::{decode_tuples, FeedbackTuple};
use super::Address;

/// Reads every tuple the feedback service has, until it closes the connection (bounded by
/// `timeout`). Tuples split across reads and many per read are both fine.
pub async fn read(
    addr: &Address,
    tls: &TlsConnector,
    timeout: Duration,
) -> Result<Vec<FeedbackTuple>, String> {
    let mut stream = addr.connect_tls(tls, timeout).await?;
    let read_all = async {
        let mut buf = BytesMut::with_capacity(4096);
        let mut tuples = Vec::new();
        loop {
            let n = stream.read_buf(&mut buf).await.map_err(|e| e.to_string())?;
            let (got, used) = decode_tuples(&buf);
            tuples.extend(got);
            let _ = buf.split_to(used);
            if n == 0 {
                if !buf.is_empty() {
                    return Err(format!(
                        "the feedback service closed mid-tuple ({} bytes left)",
                        buf.len()
                    ));
                }
                return Ok(tuples);
            }
        }
    };
    tokio::time::timeout(timeout, read_all)
        .await
        .map_err(|_| format!("no end of feedback within {}", crate::human::Human(timeout)))?
}
