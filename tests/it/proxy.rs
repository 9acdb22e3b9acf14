//! A small TCP fault proxy for the tests: between the worker and the mock APNs, or between
//! the worker and PostgreSQL. It passes bytes through, and on command cuts every live
//! connection, refuses new ones, stalls them (accepts, then never answers), or drops each
//! a while after it opened.

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
    /// Forward, then drop the connection after this long: a peer that accepts and then
    /// falls over.
    PassFor(std::time::Duration),
    /// Not listening at all: connections are refused at the TCP level (an endpoint that is
    /// down); setting another mode listens on the same port again. Open connections are cut.
    Down,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// Wakes the accept loop when the mode changes (to stop or start listening).
    changed: Arc<tokio::sync::Notify>,
    /// One token per live connection: cancelling it drops both sockets.
    live: Arc<Mutex<Vec<CancellationToken>>>,
    /// While true, open connections forward nothing (and stay open).
    frozen: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let mut listener = Some(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let addr = listener.as_ref().unwrap().local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let changed = Arc::new(tokio::sync::Notify::new());
        let c = changed.clone();
        let live: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
        let stop = CancellationToken::new();
        let (frozen, _) = tokio::sync::watch::channel(false);
        let (m, l, s, f) = (mode.clone(), live.clone(), stop.clone(), frozen.clone());
        tokio::spawn(async move {
            loop {
                let down = *m.lock().unwrap() == Mode::Down;
                if down {
                    listener = None;
                } else if listener.is_none() {
                    // The port was ours a moment ago; retry while the OS frees it.
                    loop {
                        match TcpListener::bind(addr).await {
                            Ok(l) => break listener = Some(l),
                            Err(_) => {
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await
                            }
                        }
                    }
                }
                let accept = async {
                    match &listener {
                        Some(l) => l.accept().await,
                        None => std::future::pending().await,
                    }
                };
                let (mut client, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    _ = c.notified() => continue,
                    accepted = accept => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let mode = *m.lock().unwrap();
                let token = s.child_token();
                l.lock().unwrap().push(token.clone());
                let mut frozen = f.subscribe();
                tokio::spawn(async move {
                    match mode {
                        Mode::Refuse | Mode::Down => drop(client),
                        Mode::Stall => token.cancelled().await,
                        Mode::Pass | Mode::PassFor(_) => {
                            let Ok(mut upstream) = TcpStream::connect(target).await else {
                                return;
                            };
                            let lifetime = async {
                                match mode {
                                    Mode::PassFor(t) => tokio::time::sleep(t).await,
                                    _ => std::future::pending().await,
                                }
                            };
                            tokio::select! {
                                _ = token.cancelled() => {}
                                _ = lifetime => {}
                                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                                _ = async { frozen.wait_for(|f| *f).await.map(|_| ()) } => {
                                    token.cancelled().await
                                }
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            changed,
            live,
            frozen,
            stop,
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
        self.changed.notify_one();
        if mode == Mode::Down {
            self.cut();
        }
    }

    /// Open connections stop forwarding, without closing: a peer that no longer answers.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// New connections forward again (the frozen ones stay frozen until [`Proxy::cut`]).
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Drops every connection open through the proxy.
    pub fn cut(&self) {
        for token in self.live.lock().unwrap().drain(..) {
            token.cancel();
        }
    }
}
