//! Ferry's client: holds a WebSocket to the relay and forwards each webhook to the local app.
//!
//! # Layout
//! - [`run`]: connect, serve, reconnect with backoff, until shutdown or a fatal error.
//! - `connect`: the WebSocket handshake and hello/welcome.
//! - `forward`: one request to the local app and its response back.
//! - `app`, `http1`: the connections to the local app, and HTTP/1.1 on them as bytes.
//! - [`events`]: what the console prints.
//! - [`target`]: the only place requests may go.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_mux::{ControlHandler, Mux, MuxConfig, MuxHandle};
use ferry_protocol::{Control, ErrorCode, OfflinePolicy, RespondPolicy, Resume};
use rand::Rng;
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub mod api;
mod app;
mod commands;
mod config;
mod connect;
pub mod dedupe;
pub mod events;
mod forward;
mod http1;
mod lanes;
pub mod target;
mod tls;
mod verify;

pub use commands::run_command;
pub use config::{Cli, Command, HistoryArgs, ListenArgs, OfflineArg, RelayArgs, ShowArgs};
pub use connect::connect_url;
pub use events::{Console, Event, RequestEvent};
pub use forward::DUPLICATE_HEADER;
pub use target::Target;

use connect::{ConnectError, Welcome};
use forward::Forwarder;
use tls::RelayTls;

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Relay base URL (`https://relay.example.com`).
    pub relay: String,
    /// Token the relay accepts.
    pub token: String,
    /// Where requests go.
    pub target: Target,
    /// Session name to claim, for a stable URL.
    pub name: Option<String>,
    /// How long the local app may take to send its response head.
    pub timeout: Duration,
    /// The tunnel is declared dead when nothing is received for this long.
    pub heartbeat_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Flow-control counters of the tunnel, across reconnects (for tests and benchmarks).
    pub stats: Arc<ferry_mux::MuxStats>,
    /// Where the ids of delivered requests are kept (one small file per session), so that a
    /// redelivery is never handed to the app twice, even across restarts. `None` (the default
    /// here; the `ferry` binary uses [`dedupe::default_state_dir`]) remembers them in memory
    /// only, for the life of the process.
    pub state_dir: Option<PathBuf>,
    /// What the relay should do with requests while this client is away (`--offline`);
    /// `None` leaves the relay's default.
    pub offline: Option<OfflinePolicy>,
    /// How the relay answers callers (`--respond-now`, `--deadline`); `None` keeps `pass`.
    pub respond: Option<RespondPolicy>,
    /// A PEM file of certificates trusted for an `https://` relay besides the built-in roots
    /// (`--relay-ca`): for a relay with a self-signed or private-CA certificate.
    pub relay_ca: Option<PathBuf>,
}

impl ClientConfig {
    /// Defaults for forwarding to `target` through `relay` with `token`.
    pub fn new(relay: &str, token: &str, target: Target) -> Self {
        ClientConfig {
            relay: relay.to_owned(),
            token: token.to_owned(),
            target,
            name: None,
            timeout: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
            stats: Arc::default(),
            state_dir: None,
            offline: None,
            respond: None,
            relay_ca: None,
        }
    }
}

/// Why the client stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration cannot work (bad relay URL).
    #[error("{0}")]
    Config(String),
    /// The relay refused us in a way retrying cannot fix (wrong token, name taken, version).
    #[error("{0}")]
    Refused(String),
    /// Another client with the same token took the session over.
    #[error("{0}")]
    TakenOver(String),
}

/// Client-side handler: request heads start forwards; relay errors are remembered; the relay's
/// asks for lanes open them.
struct ClientHandler {
    forwarder: Arc<Forwarder>,
    relay_error: Arc<Mutex<Option<(ErrorCode, String)>>>,
    /// The connection's lanes, if the relay offered them (none on a lane itself).
    lanes: Option<Arc<lanes::Lanes>>,
}

impl ControlHandler for ClientHandler {
    fn on_control(&self, mux: &MuxHandle, msg: Control) {
        match msg {
            Control::RequestHead(head) => self.forwarder.spawn(mux, head),
            Control::OpenLane {} => match &self.lanes {
                Some(lanes) => lanes.open(),
                None => debug!("the relay asked for a lane it did not offer"),
            },
            Control::Error { code, message } => {
                *self.relay_error.lock().expect("error lock") = Some((code, message.clone()));
                mux.close(&message);
            }
            other => debug!(?other, "ignoring unexpected control message"),
        }
    }
}

/// The mux settings of a connection to the relay (the session's or a lane), with what its
/// welcome agreed.
fn tunnel_config(
    heartbeat_timeout: Duration,
    stats: &Arc<ferry_mux::MuxStats>,
    send_window: u32,
    binary_control: bool,
) -> MuxConfig {
    MuxConfig {
        heartbeat_timeout,
        stats: stats.clone(),
        recv_window: ferry_protocol::flow::STREAM_WINDOW,
        send_window,
        binary_control,
        ..MuxConfig::default()
    }
}

/// The delivered-id set of `session`, from its file under `state_dir` (in memory only if there
/// is none or it cannot be used).
async fn open_delivered(state_dir: Option<PathBuf>, session: &str) -> Arc<dedupe::DeliveredIds> {
    let capacity = dedupe::DEFAULT_CAPACITY;
    let Some(dir) = state_dir else {
        return Arc::new(dedupe::DeliveredIds::in_memory(capacity));
    };
    let session = session.to_owned();
    let opened = tokio::task::spawn_blocking(move || {
        dedupe::DeliveredIds::open(&dir, &session, capacity)
            .map_err(|e| format!("{}: {e}", dir.display()))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match opened {
        Ok(ids) => Arc::new(ids),
        Err(err) => {
            warn!(%err, "cannot use the state directory; delivered ids are kept in memory only");
            Arc::new(dedupe::DeliveredIds::in_memory(capacity))
        }
    }
}

/// Delay before reconnection attempt `attempt` (1-based): exponential, capped, with jitter.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = base.min(max);
    // Full jitter over the upper half, so many clients don't reconnect in lockstep.
    let jitter = rand::thread_rng().gen_range(0.5..=1.0);
    capped.mul_f64(jitter)
}

/// Runs the client until `shutdown` completes (then `Ok`) or a fatal error.
pub async fn run(
    config: ClientConfig,
    events: mpsc::Sender<Event>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let url = connect_url(&config.relay).map_err(ClientError::Config)?;
    let tls = RelayTls::new(config.relay_ca.as_deref())
        .map_err(|e| ClientError::Config(format!("--relay-ca: {e}")))?;
    let forwarder = Arc::new(
        Forwarder::new(config.target.clone(), config.timeout, events.clone())
            .map_err(|e| ClientError::Config(format!("target {}: {e}", config.target)))?,
    );
    let mut shutdown = std::pin::pin!(shutdown);
    let mut resume: Option<Resume> = None;
    let mut dedupe_session: Option<String> = None;
    let mut announced = false;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if !announced || attempt > 1 {
            let _ = events
                .send(Event::Connecting {
                    attempt,
                    relay: config.relay.clone(),
                })
                .await;
        }
        let connecting = connect::connect(
            &url,
            &tls,
            &config.token,
            connect::Ask::Session {
                name: config.name.as_deref(),
                resume: resume.as_ref(),
                offline: config.offline,
                respond: config.respond.as_ref(),
            },
        );
        let result = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            result = connecting => result,
        };
        let reason = match result {
            Ok((ws, welcome)) => {
                attempt = 0;
                let Welcome {
                    session,
                    url: public_url,
                    resume_secret,
                    send_window,
                    binary_control,
                    lane_key,
                } = welcome;
                let session_id = session.clone();
                resume = Some(Resume {
                    session: session.clone(),
                    secret: resume_secret,
                });
                if dedupe_session.as_deref() != Some(session.as_str()) {
                    forwarder
                        .set_delivered(open_delivered(config.state_dir.clone(), &session).await);
                    dedupe_session = Some(session.clone());
                }
                let event = if announced {
                    Event::Online {
                        url: public_url.clone(),
                    }
                } else {
                    announced = true;
                    Event::Ready {
                        url: public_url.clone(),
                        session,
                        target: config.target.to_string(),
                        answers: events::describe_answers(config.respond.as_ref(), config.offline),
                    }
                };
                let _ = events.send(event).await;
                let relay_error = Arc::new(Mutex::new(None));
                let lanes = lane_key.map(|key| {
                    Arc::new(lanes::Lanes::new(
                        &url,
                        &tls,
                        &config.token,
                        ferry_protocol::LaneJoin {
                            session: session_id.clone(),
                            key,
                        },
                        forwarder.clone(),
                        config.heartbeat_timeout,
                        config.stats.clone(),
                    ))
                });
                // The lanes close when this connection ends (or `run` returns).
                let _lanes_stop = lanes.as_ref().map(|l| l.stop.clone().drop_guard());
                let handler = ClientHandler {
                    forwarder: forwarder.clone(),
                    relay_error: relay_error.clone(),
                    lanes,
                };
                let mux_config = tunnel_config(
                    config.heartbeat_timeout,
                    &config.stats,
                    send_window,
                    binary_control,
                );
                let (mux, mut task) = Mux::spawn(ws, mux_config, handler);
                let reason = tokio::select! {
                    _ = &mut shutdown => {
                        mux.close("client shutting down");
                        let _ = task.await;
                        return Ok(());
                    }
                    reason = &mut task => reason.unwrap_or_else(|e| format!("tunnel task failed: {e}")),
                };
                let relay_error = relay_error.lock().expect("error lock").take();
                match relay_error {
                    Some((ErrorCode::TakenOver, message)) => {
                        return Err(ClientError::TakenOver(format!(
                            "{message}; this client stops so the two do not fight over the URL"
                        )))
                    }
                    Some((_, message)) => message,
                    None => reason,
                }
            }
            Err(ConnectError::Fatal(message)) => return Err(ClientError::Refused(message)),
            Err(ConnectError::ResumeRefused(message)) => {
                warn!(%message, "could not resume the session; asking for a new one");
                resume = None;
                message
            }
            Err(ConnectError::Transient(message) | ConnectError::LaneTaken(message)) => message,
            // Before the first connection: a setting is wrong, and retrying cannot fix it.
            // After working: the relay changed (its certificate expired, say), which its
            // operator may well fix, so keep trying and keep saying why.
            Err(ConnectError::Setting(message)) if !announced => {
                return Err(ClientError::Refused(message))
            }
            Err(ConnectError::Setting(message)) => message,
        };
        let attempt_no = attempt.max(1);
        let delay = if attempt == 0 {
            // Just lost a working connection: try again almost at once.
            backoff(1, config.max_backoff).min(Duration::from_millis(200))
        } else {
            backoff(attempt, config.max_backoff)
        };
        let _ = events
            .send(Event::Reconnecting {
                attempt: attempt_no,
                reason,
                retry_in_ms: delay.as_millis() as u64,
            })
            .await;
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let max = Duration::from_secs(30);
        assert!(backoff(1, max) <= Duration::from_millis(200));
        assert!(backoff(1, max) >= Duration::from_millis(100));
        assert!(backoff(5, max) >= Duration::from_millis(1600));
        assert!(backoff(40, max) <= max);
        assert!(backoff(40, max) >= max / 2);
    }
}
