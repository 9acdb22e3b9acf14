//! A frame-level shim between the TLS stream and the `h2` server.
//!
//! The `h2` crate's server cannot change its SETTINGS after the handshake or choose a GOAWAY's
//! last-stream-id and debug data, and APNs does both. The shim reads whole HTTP/2 frames in
//! each direction and forwards them, and on request writes frames of its own between them:
//! a SETTINGS frame with a new MAX_CONCURRENT_STREAMS (the client's ACK for it is swallowed,
//! so the server never sees an ACK it did not ask for), a GOAWAY with any last-stream-id and
//! debug data, or an abrupt close of the TCP connection. It also rewrites the server's first
//! SETTINGS to announce the starting stream limit, and counts the client's PINGs.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// A frame the mock wants written to the client.
#[derive(Debug, Clone)]
pub(crate) enum Inject {
    /// SETTINGS with a new MAX_CONCURRENT_STREAMS.
    MaxStreams(u32),
    /// GOAWAY with this last-stream-id, error code and debug data.
    GoAway {
        last_stream_id: u32,
        error_code: u32,
        debug: Bytes,
    },
    /// Drop the TCP connection at once, mid-stream.
    Close,
}

/// The mock's handle on one shimmed connection.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Inject>,
    /// PING frames (not ACKs) clients sent (shared by the mock's connections).
    pub pings: Arc<AtomicU64>,
    /// The stream limit most recently announced to the client.
    pub announced: Arc<AtomicU32>,
    /// The stream limit the client has acknowledged last.
    pub acknowledged: Arc<AtomicU32>,
}

impl Handle {
    pub(crate) fn inject(&self, frame: Inject) {
        if let Inject::MaxStreams(n) = frame {
            self.announced.store(n, Ordering::SeqCst);
        }
        let _ = self.tx.send(frame);
    }

    /// The most streams the client may have open right now: while a change is not yet
    /// acknowledged, the larger of the old and the new limit.
    pub fn limit(&self) -> u32 {
        self.announced
            .load(Ordering::SeqCst)
            .max(self.acknowledged.load(Ordering::SeqCst))
    }
}

/// Who sent a SETTINGS frame the client has yet to acknowledge.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Server,
    Shim(u32),
}

/// Starts the shim on `client` (the TLS stream); the returned stream is the server's side.
pub fn spawn<S>(
    client: S,
    initial_max_streams: u32,
    pings: Arc<AtomicU64>,
) -> (DuplexStream, Handle)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (server_side, shim_side) = tokio::io::duplex(64 * 1024);
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Handle {
        tx,
        pings,
        announced: Arc::new(AtomicU32::new(initial_max_streams)),
        acknowledged: Arc::new(AtomicU32::new(initial_max_streams)),
    };
    let pending: Arc<Mutex<VecDeque<Origin>>> = Arc::default();
    let stop = CancellationToken::new();
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(shim_side);
    tokio::spawn({
        let (handle, pending, stop) = (handle.clone(), pending.clone(), stop.clone());
        async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = client_to_server(client_read, server_write, handle, pending) => {}
            }
            stop.cancel();
        }
    });
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = server_to_client(server_read, client_write, rx, initial_max_streams, pending) => {}
        }
        stop.cancel();
    });
    (server_side, handle)
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<BytesMut>> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut frame = BytesMut::with_capacity(HEADER_LEN + len);
    frame.extend_from_slice(&header);
    frame.resize(HEADER_LEN + len, 0);
    r.read_exact(&mut frame[HEADER_LEN..]).await?;
    Ok(Some(frame))
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> BytesMut {
    let mut f = BytesMut::with_capacity(HEADER_LEN + payload.len());
    f.put_uint(payload.len() as u64, 3);
    f.put_u8(kind);
    f.put_u8(flags);
    f.put_u32(stream);
    f.extend_from_slice(payload);
    f
}

async fn client_to_server<R, W>(
    mut from: R,
    mut to: W,
    handle: Handle,
    pending: Arc<Mutex<VecDeque<Origin>>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE_LEN];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    while let Some(f) = read_frame(&mut from).await? {
        let (kind, flags) = (f[3], f[4]);
        if kind == SETTINGS && flags & ACK != 0 {
            let origin = pending.lock().unwrap().pop_front();
            if let Some(Origin::Shim(limit)) = origin {
                handle.acknowledged.store(limit, Ordering::SeqCst);
                continue;
            }
        }
        if kind == PING && flags & ACK == 0 {
            handle.pings.fetch_add(1, Ordering::Relaxed);
        }
        to.write_all(&f).await?;
    }
    to.shutdown().await
}

async fn server_to_client<R, W>(
    mut from: R,
    mut to: W,
    mut inject: mpsc::UnboundedReceiver<Inject>,
    initial_max_streams: u32,
    pending: Arc<Mutex<VecDeque<Origin>>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut first_settings = true;
    // Bytes from the server, kept across iterations: `read_buf` is cancel safe where a
    // half-read frame dropped by the `select!` would desynchronise the stream.
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        let mut forwarded = false;
        while let Some(mut f) = take_frame(&mut buf) {
            if f[3] == SETTINGS && f[4] & ACK == 0 {
                if first_settings {
                    first_settings = false;
                    f = with_max_streams(&f, initial_max_streams);
                }
                pending.lock().unwrap().push_back(Origin::Server);
            }
            to.write_all(&f).await?;
            forwarded = true;
        }
        if forwarded {
            to.flush().await?;
        }
        tokio::select! {
            biased;
            frame_to_inject = inject.recv() => {
                let Some(frame_to_inject) = frame_to_inject else { continue };
                let bytes = match frame_to_inject {
                    Inject::MaxStreams(n) => {
                        pending.lock().unwrap().push_back(Origin::Shim(n));
                        let mut p = BytesMut::new();
                        p.put_u16(MAX_CONCURRENT_STREAMS);
                        p.put_u32(n);
                        frame(SETTINGS, 0, 0, &p)
                    }
                    Inject::GoAway { last_stream_id, error_code, debug } => {
                        let mut p = BytesMut::new();
                        p.put_u32(last_stream_id & 0x7fff_ffff);
                        p.put_u32(error_code);
                        p.extend_from_slice(&debug);
                        frame(GOAWAY, 0, 0, &p)
                    }
                    Inject::Close => return Ok(()),
                };
                to.write_all(&bytes).await?;
                to.flush().await?;
            }
            read = from.read_buf(&mut buf) => {
                if read? == 0 {
                    break;
                }
            }
        }
    }
    to.shutdown().await
}

/// Splits the first whole frame off `buf`, if it holds one.
fn take_frame(buf: &mut BytesMut) -> Option<BytesMut> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
    (buf.len() >= HEADER_LEN + len).then(|| buf.split_to(HEADER_LEN + len))
}

/// The same SETTINGS frame with MAX_CONCURRENT_STREAMS set to `n`.
fn with_max_streams(f: &[u8], n: u32) -> BytesMut {
    let mut p = BytesMut::new();
    for param in f[HEADER_LEN..].chunks_exact(6) {
        if u16::from_be_bytes([param[0], param[1]]) != MAX_CONCURRENT_STREAMS {
            p.extend_from_slice(param);
        }
    }
    p.put_u16(MAX_CONCURRENT_STREAMS);
    p.put_u32(n);
    frame(SETTINGS, f[4], 0, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_rewritten_with_the_new_stream_limit() {
        let mut p = BytesMut::new();
        p.put_u16(0x4); // INITIAL_WINDOW_SIZE
        p.put_u32(65_535);
        p.put_u16(MAX_CONCURRENT_STREAMS);
        p.put_u32(1000);
        let original = frame(SETTINGS, 0, 0, &p);
        let rewritten = with_max_streams(&original, 1);
        assert_eq!(rewritten.len(), original.len());
        assert_eq!(&rewritten[..9], &original[..9]);
        assert_eq!(&rewritten[9..15], &original[9..15]);
        assert_eq!(&rewritten[15..], &[0, 3, 0, 0, 0, 1]);
        // A SETTINGS frame without the parameter gets it.
        let bare = frame(SETTINGS, 0, 0, &[]);
        assert_eq!(
            &with_max_streams(&bare, 7)[..],
            &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 7]
        );
    }

    #[test]
    fn whole_frames_are_taken_and_a_partial_one_waits() {
        let a = frame(PING, 0, 0, &[1; 8]);
        let b = frame(GOAWAY, 0, 0, &[0; 8]);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&a);
        buf.extend_from_slice(&b[..12]);
        assert_eq!(take_frame(&mut buf).as_deref(), Some(&a[..]));
        assert_eq!(take_frame(&mut buf), None, "half a frame stays buffered");
        buf.extend_from_slice(&b[12..]);
        assert_eq!(take_frame(&mut buf).as_deref(), Some(&b[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn frames_are_laid_out_as_rfc_7540_says() {
        let f = frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0, b'x']);
        assert_eq!(
            &f[..],
            &[0, 0, 9, 7, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, b'x']
        );
    }
}
