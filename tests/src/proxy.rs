//! A TCP proxy for liveness tests that can stall (stop passing bytes while
//! keeping every socket open) and cut (abort every connection).

use std::collections::HashMap;
use std::fmt;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::WAIT_TIMEOUT;

/// Buffer size of each copy loop, i.e. the largest chunk forwarded at once.
const COPY_BUF: usize = 16 * 1024;

struct Shared {
    upstream: SocketAddr,
    stalled: watch::Sender<bool>,
    accepted: watch::Sender<usize>,
    live: Mutex<HashMap<usize, CancellationToken>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A TCP proxy on `127.0.0.1` forwarding every accepted connection to an
/// upstream address. Dropping it aborts every connection and stops
/// accepting.
pub struct StallProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl fmt::Debug for StallProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StallProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("stalled", &self.is_stalled())
            .finish()
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl StallProxy {
    /// Starts a proxy on `127.0.0.1:0` towards `upstream`. Each accepted
    /// connection gets its own upstream connection; if that cannot be made
    /// the accepted connection is closed.
    pub async fn start(upstream: SocketAddr) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("stall proxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("stall proxy: local_addr");
        let shared = Arc::new(Shared {
            upstream,
            stalled: watch::channel(false).0,
            accepted: watch::channel(0).0,
            live: Mutex::new(HashMap::new()),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
        StallProxy {
            addr,
            shared,
            cancel,
        }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// From now on, pass no bytes in either direction on any connection,
    /// current or future, without closing anything (not even forwarding an
    /// EOF) — as when a laptop sleeps. A chunk already read when this is
    /// called is held back until [`Self::resume`].
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Undoes [`Self::stall`]: held and new bytes flow again.
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// Whether the proxy is stalled.
    pub fn is_stalled(&self) -> bool {
        *self.shared.stalled.borrow()
    }

    /// Aborts every current connection on both sides (TCP reset, pending
    /// data discarded). Connections accepted later work normally.
    pub fn cut(&self) {
        let live: Vec<_> = self
            .shared
            .live
            .lock()
            .expect("stall proxy lock poisoned")
            .drain()
            .collect();
        for (_, token) in live {
            token.cancel();
        }
    }

    /// How many connections have been accepted so far.
    pub fn connections(&self) -> usize {
        *self.shared.accepted.borrow()
    }

    /// How many connections are currently open (accepted, not yet finished
    /// or cut).
    pub fn active_connections(&self) -> usize {
        self.shared
            .live
            .lock()
            .expect("stall proxy lock poisoned")
            .len()
    }

    /// Bytes forwarded from clients to the upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the upstream to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections have been accepted in total;
    /// panics after [`WAIT_TIMEOUT`].
    pub async fn wait_for_connections(&self, n: usize) {
        let mut rx = self.shared.accepted.subscribe();
        let waited = tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|c| *c >= n)).await;
        if waited.is_err() {
            panic!(
                "stall proxy {}: only {} of {n} connections accepted within {WAIT_TIMEOUT:?}",
                self.addr,
                self.connections()
            );
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let client = tokio::select! {
            _ = cancel.cancelled() => return,
            res = listener.accept() => match res {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        let token = cancel.child_token();
        let mut id = 0;
        shared.accepted.send_modify(|n| {
            id = *n;
            *n += 1;
        });
        shared
            .live
            .lock()
            .expect("stall proxy lock poisoned")
            .insert(id, token.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            pipe(client, &shared, token).await;
            shared
                .live
                .lock()
                .expect("stall proxy lock poisoned")
                .remove(&id);
        });
    }
}

/// Forwards between `client` and a new upstream connection until both
/// directions end, one fails, or `token` is cancelled.
async fn pipe(mut client: TcpStream, shared: &Shared, token: CancellationToken) {
    let mut upstream = tokio::select! {
        _ = token.cancelled() => {
            let _ = client.set_zero_linger();
            return;
        }
        res = TcpStream::connect(shared.upstream) => match res {
            Ok(s) => s,
            Err(_) => {
                let _ = client.set_zero_linger();
                return;
            }
        },
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let abort = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = copy_dir(cr, uw, shared.stalled.subscribe(), &shared.bytes_up);
        let down = copy_dir(ur, cw, shared.stalled.subscribe(), &shared.bytes_down);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                _ = token.cancelled() => break true,
                res = &mut up, if !up_done => {
                    if res.is_err() { break true; }
                    up_done = true;
                }
                res = &mut down, if !down_done => {
                    if res.is_err() { break true; }
                    down_done = true;
                }
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if abort {
        // Close with a reset, so both peers see an abrupt end.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// Waits while the proxy is stalled.
async fn wait_running(stalled: &mut watch::Receiver<bool>) {
    if stalled.wait_for(|s| !*s).await.is_err() {
        // The proxy is gone; its cancellation ends this connection.
        pending::<()>().await;
    }
}

/// Copies one direction chunk by chunk, checking the stall flag before each
/// read and before forwarding each chunk (and the EOF).
async fn copy_dir(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut stalled: watch::Receiver<bool>,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        wait_running(&mut stalled).await;
        let n = from.read(&mut buf).await?;
        wait_running(&mut stalled).await;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::SeqCst);
    }
}
