//! Extra lanes: more connections of the session to the relay, each carrying requests of the
//! callers served by one of the relay's threads (see the relay's `lanes` module). The relay
//! asks for one (`OpenLane`) when callers arrive on a thread that has none; each lane runs on
//! a thread of its own here, while the machine has cores for them, with its own connections
//! to the app, so both sides work in parallel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_mux::Mux;
use ferry_protocol::LaneJoin;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::connect::{self, ConnectError};
use crate::forward::Forwarder;
use crate::tls::RelayTls;
use crate::ClientHandler;

/// Most extra lanes of one connection.
const MAX_LANES: usize = 16;

/// Connections tried per lane: each lands on a relay thread the kernel picks, and one that
/// lands on a thread that already has a lane of the session is refused.
const ATTEMPTS: usize = 8;

/// What opening a lane of one connection takes.
pub(crate) struct Lanes {
    url: String,
    tls: RelayTls,
    token: String,
    join: LaneJoin,
    forwarder: Arc<Forwarder>,
    heartbeat_timeout: Duration,
    stats: Arc<ferry_mux::MuxStats>,
    /// Lanes asked for so far.
    opened: AtomicUsize,
    /// Lanes that may have a thread of their own.
    threads: usize,
    /// Cancelled when the connection ends: its lanes close with it.
    pub(crate) stop: CancellationToken,
}

impl Lanes {
    /// Lanes of the connection that `join` names.
    pub(crate) fn new(
        url: &str,
        tls: &RelayTls,
        token: &str,
        join: LaneJoin,
        forwarder: Arc<Forwarder>,
        heartbeat_timeout: Duration,
        stats: Arc<ferry_mux::MuxStats>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Lanes {
            url: url.to_owned(),
            tls: tls.clone(),
            token: token.to_owned(),
            join,
            forwarder,
            heartbeat_timeout,
            stats,
            opened: AtomicUsize::new(0),
            threads: cores.saturating_sub(1),
            stop: CancellationToken::new(),
        }
    }

    /// Opens one more lane (the relay asked), on a thread of its own while there are cores
    /// left, else as a task of this runtime.
    pub(crate) fn open(self: &Arc<Self>) {
        let index = self.opened.fetch_add(1, Ordering::Relaxed);
        if index >= MAX_LANES {
            return;
        }
        let lanes = self.clone();
        if index < self.threads {
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-lane-{}", index + 1))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(lanes.run()),
                        Err(err) => debug!(%err, "cannot start a lane's runtime"),
                    }
                });
            if let Err(err) = spawned {
                debug!(%err, "cannot start a lane's thread");
            }
        } else {
            tokio::spawn(async move { lanes.run().await });
        }
    }

    /// Connects a lane (trying again while it lands on a thread that has one) and serves it
    /// until it or the connection ends.
    async fn run(&self) {
        for _ in 0..ATTEMPTS {
            let connecting = connect::connect(
                &self.url,
                &self.tls,
                &self.token,
                connect::Ask::Lane(&self.join),
            );
            let result = tokio::select! {
                _ = self.stop.cancelled() => return,
                result = connecting => result,
            };
            let (ws, welcome) = match result {
                Ok(connected) => connected,
                Err(ConnectError::LaneTaken(_)) => continue,
                Err(err) => {
                    debug!(%err, "lane not opened");
                    return;
                }
            };
            let forwarder = match self.forwarder.for_lane() {
                Ok(forwarder) => Arc::new(forwarder),
                Err(err) => {
                    debug!(%err, "lane not opened");
                    return;
                }
            };
            let handler = ClientHandler {
                forwarder,
                relay_error: Arc::default(),
                lanes: None,
            };
            let config = crate::tunnel_config(
                self.heartbeat_timeout,
                &self.stats,
                welcome.send_window,
                welcome.binary_control,
            );
            let (mux, task) = Mux::spawn(ws, config, handler);
            debug!("lane open");
            tokio::select! {
                _ = self.stop.cancelled() => mux.close("the session's connection ended"),
                _ = mux.closed() => {}
            }
            let _ = task.await;
            debug!("lane closed");
            return;
        }
        debug!("no lane opened: every connection landed on a relay thread that has one");
    }
}
