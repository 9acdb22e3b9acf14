//! A small TCP fault proxy for the tests: between the worker and the mock APNs, or between
//! the worker and PostgreSQL. It passes bytes through, and on command cuts every live
//! connection, refuses new ones, or stalls them (accepts, then never answers).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Accept and close at once.
    Refuse,
    /// Accept and hold the connection without forwarding anything.
    Stall,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// One token per live connection: cancelling it drops both sockets.
    live: Arc<Mutex<Vec<CancellationToken>>>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let live: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
        let stop = CancellationToken::new();
        let (m, l, s) = (mode.clone(), live.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let mode = *m.lock().unwrap();
                let token = s.child_token();
                l.lock().unwrap().push(token.clone());
                tokio::spawn(async move {
                    match mode {
                        Mode::Refuse => drop(client),
                        Mode::Stall => token.cancelled().await,
                        Mode::Pass => {
                            let Ok(mut upstream) = TcpStream::connect(target).await else {
                                return;
                            };
                            tokio::select! {
                                _ = token.cancelled() => {}
                                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            live,
            stop,
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Drops every connection open through the proxy.
    pub fn cut(&self) {
        for token in self.live.lock().unwrap().drain(..) {
            token.cancel();
        }
    }
}
