//! Coalesced writes under the HTTP/2 connection.
//!
//! `h2` flushes at the end of every poll of its connection, and its connection task is woken
//! by every request a handler sends: under load that is one TLS record and one `writev` per
//! notification (measured: 0.9 per notification, and the kernel's loopback send path the
//! largest single cost of the worker). [`Cork`] sits between `h2` and the TLS stream: writes
//! only fill its buffer, and a flush of a small buffer first yields the task once — the
//! handlers that are ready to run send their requests meanwhile — and then writes everything
//! buffered at once. Nothing waits on a timer: the delay is one turn of the scheduler.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A buffer this large is written without yielding first.
const FULL: usize = 16 * 1024;

/// A stream whose writes are buffered and flushed in batches (see the module docs).
#[derive(Debug)]
pub(crate) struct Cork<S> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `inner`.
    written: usize,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<S> Cork<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(FULL),
            written: 0,
            yielded: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Cork<S> {
    /// Writes out the buffer; Ready once all of it is in `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cork<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cork<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() >= FULL {
            // Full: make room before taking more.
            std::task::ready!(this.poll_drain(cx))?;
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.yielded && this.buf.len() < FULL {
            // Let the tasks that are ready add their frames first; we are woken right after.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_reach_the_peer_in_order_and_only_on_flush() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut cork = Cork::new(a);
        cork.write_all(b"hello ").await.unwrap();
        cork.write_all(b"world").await.unwrap();
        let mut peek = [0u8; 1];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut peek))
                .await
                .is_err(),
            "nothing is written before the flush"
        );
        cork.flush().await.unwrap();
        let mut got = [0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
        // More than a buffer's worth goes through whole and in order.
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        cork.write_all(&big).await.unwrap();
        cork.flush().await.unwrap();
        let mut back = vec![0u8; big.len()];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(back, big);
        cork.shutdown().await.unwrap();
        assert_eq!(
            b.read(&mut peek).await.unwrap(),
            0,
            "shut down after the rest"
        );
    }
}
