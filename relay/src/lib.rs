//! Ferry's relay: accepts webhooks on per-session public URLs and carries each one through the
//! session's tunnel to the client on the developer's machine.
//!
//! # Layout
//! - [`run`] serves one listener until a shutdown signal, then drains; [`run_threads`] serves
//!   several sockets of one port, each on a thread of its own ([`lanes`]).
//! - `http1`: the relay's own HTTP/1.1 server for plain webhooks; every other request, and the
//!   rest of its connection, goes to hyper (`serve_connection`).
//! - `caller`: a caller's request as the handlers take it, from either server.
//! - `tunnel`: the `/_ferry/v1/connect` endpoint (auth, upgrade, session claim, mux).
//! - `public`: everything else, forwarded to a session.
//! - [`registry`]: sessions and their live connections.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{ErrorCode, CONNECT_PATH};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod api;
pub mod auth;
mod caller;
mod config;
mod delivery;
pub use delivery::{DELIVERY_AGE_HEADER, DELIVERY_ID_HEADER};
mod headers;
mod http1;
mod idle;
pub mod lanes;
mod public;
mod record;
pub mod registry;
mod reply;
pub mod store;
pub mod tls;
mod tunnel;

pub use config::{Args, RelayConfig};

use auth::TokenSet;
use registry::Registry;
use reply::RelayBody;

/// Path of the health check.
pub const HEALTH_PATH: &str = "/_ferry/health";

/// A running relay's shared state.
pub struct Relay {
    config: RelayConfig,
    tokens: TokenSet,
    registry: Registry,
    shutdown: CancellationToken,
    /// Writes passed-through requests to history (with a store).
    recorder: Option<record::Recorder>,
    /// Bytes of request bodies being read into memory to be queued (see `public::enqueue`).
    queue_memory: Arc<tokio::sync::Semaphore>,
    /// Threads serving connections: lanes are offered when there is more than one.
    threads: usize,
}

impl Relay {
    /// The relay's state for `config`, with `registry`'s sessions (its history recorder, if any,
    /// starts writing now).
    fn new(config: RelayConfig, registry: Registry, threads: usize) -> Relay {
        Relay {
            threads,
            tokens: TokenSet::new(&config.tokens),
            registry,
            shutdown: CancellationToken::new(),
            recorder: config
                .store
                .clone()
                .map(|store| record::Recorder::start(store, config.record_buffer)),
            queue_memory: Arc::new(tokio::sync::Semaphore::new(
                config
                    .queue_memory
                    .max(usize::try_from(config.max_body).unwrap_or(usize::MAX))
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            config,
        }
    }

    /// The sessions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Serves `listener` until `shutdown` completes; then stops accepting, lets in-flight exchanges
/// finish for up to `config.grace`, closes the tunnels and returns.
pub async fn run(
    listener: TcpListener,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(listener, Vec::new(), config, shutdown).await
}

/// Like [`run`], over several listening sockets of one port ([`lanes::bind`]): the first is
/// served on the calling runtime, each other one on a thread of its own running a
/// single-threaded runtime, and sessions' clients are offered lanes ([`lanes`]).
pub async fn run_threads(
    mut listeners: Vec<std::net::TcpListener>,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    if listeners.is_empty() {
        return Err(std::io::Error::other("no listening socket to serve"));
    }
    let first = listeners.remove(0);
    first.set_nonblocking(true)?;
    serve(TcpListener::from_std(first)?, listeners, config, shutdown).await
}

/// What every thread's accept loop shares.
struct Serving {
    relay: Arc<Relay>,
    connections: Arc<Semaphore>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

async fn serve(
    listener: TcpListener,
    extra: Vec<std::net::TcpListener>,
    config: RelayConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let registry = Registry::new(config.max_sessions);
    if let Some(store) = &config.store {
        let sessions = store
            .load_sessions()
            .await
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        info!(sessions = sessions.len(), "sessions loaded from the store");
        let mut backlogged = Vec::new();
        for session in &sessions {
            let due = store
                .next_due(&session.id)
                .await
                .map_err(|err| std::io::Error::other(err.to_string()))?;
            if due.is_some() {
                backlogged.push(session.id.clone());
            }
        }
        registry.restore(sessions);
        for id in backlogged {
            if let Some(session) = registry.get(&id) {
                session.queue.lock().expect("queue lock").backlog = true;
            }
        }
    }
    let relay = Arc::new(Relay::new(config, registry, 1 + extra.len()));
    if let Some(store) = relay.config.store.clone() {
        tokio::spawn(prune(
            store,
            relay.config.retention,
            relay.config.retention_max_bytes,
            relay.config.prune_interval,
            relay.shutdown.clone(),
        ));
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(http1::HEAD_TIMEOUT)
        .max_buf_size(http1::MAX_HEAD);
    builder.http2().max_concurrent_streams(100);
    let serving = Arc::new(Serving {
        relay: relay.clone(),
        connections: Arc::new(Semaphore::new(relay.config.max_connections)),
        builder,
        tls: relay
            .config
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from),
    });
    // The other threads drain with this one, and run on until the tunnels are closed.
    let exit = CancellationToken::new();
    let mut threads = Vec::new();
    for (index, listener) in extra.into_iter().enumerate() {
        let serving = serving.clone();
        let exit = exit.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("ferry-relay-{}", index + 1))
            .spawn(move || {
                lanes::set_home(index + 1);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        warn!(%err, "cannot start a relay thread's runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            // Stops with the relay's shutdown, which every loop watches.
                            accept_loop(listener, &serving, std::future::pending()).await;
                        }
                        Err(err) => warn!(%err, "cannot serve a listening socket"),
                    }
                    exit.cancelled().await;
                });
                drop(done_tx);
            })?;
        threads.push(done_rx);
    }
    accept_loop(listener, &serving, shutdown).await;
    relay.shutdown.cancel();
    for live in relay.registry.live_connections() {
        live.mux
            .close_with_error(ErrorCode::ShuttingDown, "the relay is shutting down")
            .await;
    }
    exit.cancel();
    for done in threads {
        let _ = done.await;
    }
    info!("relay stopped");
    Ok(())
}

/// Accepts and serves connections on `listener` until `stop` completes (or the relay shuts
/// down); then lets this thread's in-flight exchanges finish for up to the grace period.
async fn accept_loop(
    listener: TcpListener,
    serving: &Arc<Serving>,
    stop: impl Future<Output = ()>,
) {
    let relay = &serving.relay;
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            _ = relay.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = serving.connections.clone().try_acquire_owned() else {
            debug!(%peer, "connection limit reached; refusing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serving = serving.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let relay = serving.relay.clone();
            let builder = &serving.builder;
            let result = match serving.tls.clone() {
                None => serve_connection(stream, relay, peer, builder, watcher).await,
                // A caller gets as long for its TLS handshake as for a request's head: one
                // that connects and stalls must not hold a connection slot for ever.
                Some(tls) => {
                    match tokio::time::timeout(http1::HEAD_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, relay, peer, builder, watcher).await
                        }
                        Ok(Err(err)) => {
                            debug!(%peer, %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake not finished in time; closing");
                            return;
                        }
                    }
                }
            };
            if let Err(err) = result {
                debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if !relay.shutdown.is_cancelled() {
        relay.shutdown.cancel();
        info!("shutting down: waiting for in-flight requests");
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(relay.config.grace) => {
            warn!(grace = ?relay.config.grace, "grace period over; dropping unfinished requests");
        }
    }
}

/// Serves one connection: plain webhooks by the relay's own HTTP/1 path, the rest (from the
/// first request that is not one) by hyper. `watcher` keeps a graceful shutdown waiting for it.
async fn serve_connection<S>(
    io: S,
    relay: Arc<Relay>,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Never below the wait for an answer's head, so a caller waiting for a slow app is not cut.
    let idle_limit = IDLE_TIMEOUT.max(relay.config.timeout + IDLE_TIMEOUT / 5);
    let activity = idle::Activity::new();
    let io = idle::IdleIo::new(io, activity.clone());
    let serving = async move {
        let io = match http1::serve(io, &relay, peer).await {
            http1::Served::Closed => return Ok(()),
            http1::Served::Handoff(io) => io,
        };
        let service = service_fn(move |req| {
            let relay = relay.clone();
            async move { Ok::<_, Infallible>(route(relay, req, peer).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        watcher.watch(conn.into_owned()).await
    };
    // An upgraded connection (a tunnel) leaves `serving` when upgraded, and with it this
    // watch: tunnels have heartbeats of their own.
    tokio::select! {
        served = serving => served,
        _ = activity.idle(idle_limit) => {
            debug!(%peer, "no bytes either way for {idle_limit:?}; closing the connection");
            Ok(())
        }
    }
}

/// A connection on which no byte has moved either way for this long (or the relay's
/// `--timeout` and a minute, if longer) is closed, whatever it was doing: an HTTP/2 connection
/// with no stream open, a caller that stopped reading its answer, an app that stopped in the
/// middle of one. It is noticed within a quarter of it. Idle HTTP/1 keep-alive connections
/// close sooner, at [`http1::HEAD_TIMEOUT`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Prunes old history every `interval` until `stop`.
async fn prune(
    store: store::Store,
    retention: Duration,
    max_bytes: Option<u64>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.prune(store::now_ms(), retention, max_bytes).await {
            Ok(report) if report.by_age + report.by_size > 0 => {
                info!(
                    by_age = report.by_age,
                    by_size = report.by_size,
                    "pruned history"
                );
            }
            Ok(_) => {}
            Err(err) => warn!(%err, "pruning history failed"),
        }
    }
}

/// Dispatches one request. The large handlers are boxed: hyper keeps the service's future inline
/// in a box per connection, sized for the largest branch (8.4 KiB with the API's handler inline,
/// 0.9 KiB boxed), and writes it there for every request.
async fn route(relay: Arc<Relay>, req: Request<Incoming>, peer: SocketAddr) -> Response<RelayBody> {
    let hosts = req.headers().get_all(hyper::header::HOST).iter().count();
    if let Some(refusal) = http1::host_rule(req.version(), hosts) {
        return refusal.response();
    }
    let path = req.uri().path();
    if path == CONNECT_PATH {
        tunnel::connect(&relay, req)
    } else if path == HEALTH_PATH {
        if relay.shutdown.is_cancelled() {
            reply::json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "shutting down"}),
            )
        } else {
            reply::json(StatusCode::OK, serde_json::json!({"status": "ok"}))
        }
    } else if path.starts_with(api::PREFIX) {
        Box::pin(api::handle(relay, req)).await
    } else if path == "/_ferry" || path.starts_with(ferry_protocol::RESERVED_PREFIX) {
        reply::error(
            StatusCode::NOT_FOUND,
            "not found",
            "no such relay endpoint under /_ferry/",
        )
    } else {
        Box::pin(public::forward(
            relay,
            caller::CallerRequest::from_hyper(req),
            peer,
        ))
        .await
    }
}
