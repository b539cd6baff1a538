//! Relay and client fixtures: a relay on 127.0.0.1:0 and clients that wait for readiness.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_client::{ClientConfig, ClientError, Event, Target};
use ferry_relay::RelayConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::WAIT_TIMEOUT as WAIT;

/// The token test relays accept.
pub const TOKEN: &str = "test-token-0123456789";

/// The configuration of a test relay listening on `addr`: it accepts [`TOKEN`] and
/// `other-token`, with defaults otherwise.
fn test_config(addr: SocketAddr) -> RelayConfig {
    RelayConfig::new(
        &format!("http://{addr}"),
        vec![TOKEN.to_owned(), "other-token".to_owned()],
    )
}

/// A relay running in this process.
pub struct TestRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestRelay {
    /// Starts a relay accepting [`TOKEN`] and `other-token`, with defaults.
    pub async fn start() -> TestRelay {
        Self::start_with(|_| {}).await
    }

    /// Starts a relay after `tweak` adjusts its configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        Self::start_on(listener, tweak).await
    }

    /// Starts a relay on an already bound listener (to restart on the same port).
    pub async fn start_on(
        listener: TcpListener,
        tweak: impl FnOnce(&mut RelayConfig),
    ) -> TestRelay {
        let addr = listener.local_addr().expect("relay addr");
        let mut config = test_config(addr);
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ferry_relay::run(listener, config, async {
            let _ = stopped.await;
        }));
        TestRelay {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a relay serving its connections on `threads` threads, each over its own
    /// listening socket of one port (as the `ferry-relay` binary does), after `tweak`.
    pub async fn start_threads(threads: usize, tweak: impl FnOnce(&mut RelayConfig)) -> TestRelay {
        let listeners = ferry_relay::lanes::bind("127.0.0.1:0".parse().expect("address"), threads)
            .expect("bind relay");
        let addr = listeners[0].local_addr().expect("relay addr");
        let mut config = test_config(addr);
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ferry_relay::run_threads(listeners, config, async {
            let _ = stopped.await;
        }));
        TestRelay {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The relay's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The opening request of a hand-written client's tunnel: `token` as its bearer token,
    /// offering the WebSocket subprotocol `subprotocol`.
    pub fn tunnel_request(
        &self,
        token: &str,
        subprotocol: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut request = format!("ws://{}{}", self.addr, ferry_protocol::CONNECT_PATH)
            .into_client_request()
            .expect("a tunnel request");
        let headers = request.headers_mut();
        let bearer = format!("Bearer {token}").parse().expect("a header value");
        headers.insert("authorization", bearer);
        let offered = subprotocol.parse().expect("a header value");
        headers.insert("sec-websocket-protocol", offered);
        request
    }

    /// Sends the shutdown signal (like SIGTERM) without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.signal_shutdown();
        let task = self.task.take().expect("relay task");
        tokio::time::timeout(WAIT * 3, task)
            .await
            .expect("relay did not stop in time")
            .expect("relay task panicked")
    }

    /// Waits for `run` to return after [`TestRelay::signal_shutdown`].
    pub async fn join(mut self) -> std::io::Result<()> {
        let task = self.task.take().expect("relay task");
        tokio::time::timeout(WAIT * 3, task)
            .await
            .expect("relay did not stop in time")
            .expect("relay task panicked")
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A client running in this process, with its event stream.
pub struct TestClient {
    /// The session's public URL, from the ready event.
    pub url: String,
    /// The session id.
    pub session: String,
    events: mpsc::Receiver<Event>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ClientError>>>,
}

/// Builds a client configuration for `relay` forwarding to `target`.
pub fn client_config(relay: &str, target: &str) -> ClientConfig {
    let target = Target::parse(target).expect("target");
    let mut config = ClientConfig::new(relay, TOKEN, target);
    config.max_backoff = Duration::from_millis(500);
    config
}

impl TestClient {
    /// Starts a client and waits until its session is ready.
    pub async fn start(config: ClientConfig) -> TestClient {
        let mut client = Self::spawn(config);
        loop {
            match client.next_event().await {
                Event::Ready { url, session, .. } => {
                    client.url = url;
                    client.session = session;
                    return client;
                }
                Event::Connecting { .. } | Event::Reconnecting { .. } => continue,
                other => panic!("unexpected event before ready: {other:?}"),
            }
        }
    }

    /// Starts a client without waiting for anything.
    pub fn spawn(config: ClientConfig) -> TestClient {
        let (events_tx, events) = mpsc::channel(4096);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ferry_client::run(config, events_tx, async {
            let _ = stopped.await;
        }));
        TestClient {
            url: String::new(),
            session: String::new(),
            events,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The next event; panics after [`WAIT`].
    pub async fn next_event(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no client event in time")
            .expect("client event stream ended")
    }

    /// Skips events until `pick` returns something; panics after `within`.
    pub async fn wait_for<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the awaited client event did not come in time")
                .expect("client event stream ended");
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    }

    /// Waits for the client to stop on its own and returns its result.
    pub async fn finished(mut self) -> Result<(), ClientError> {
        let task = self.task.take().expect("client task");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("client did not stop in time")
            .expect("client task panicked")
    }

    /// Stops the client (like Ctrl+C) and waits.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("client task");
        let _ = tokio::time::timeout(WAIT, task).await;
    }

    /// Kills the client at once, as SIGKILL would: no goodbye to the relay.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A relay with a durable store, on its own thread and runtime, so that [`KillableRelay::kill`]
/// can stop it the way SIGKILL would: every task dropped at once, no graceful shutdown, no
/// goodbye to clients.
pub struct KillableRelay {
    /// Where it listens.
    pub addr: SocketAddr,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KillableRelay {
    /// Starts a relay on 127.0.0.1:0 with its store in `data_dir`, after `tweak`.
    pub async fn start(
        data_dir: &std::path::Path,
        tweak: impl FnOnce(&mut RelayConfig) + Send + 'static,
    ) -> KillableRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        Self::start_on(listener, data_dir, tweak).await
    }

    /// Starts a relay on `addr` (e.g. the port of a killed one).
    pub async fn start_at(
        addr: SocketAddr,
        data_dir: &std::path::Path,
        tweak: impl FnOnce(&mut RelayConfig) + Send + 'static,
    ) -> KillableRelay {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind the relay's old port");
        let listener = socket.listen(1024).expect("listen");
        Self::start_on(listener.into_std().expect("std listener"), data_dir, tweak).await
    }

    /// Starts a relay on `listener` with its store in `data_dir`; returns once the store is
    /// open.
    pub async fn start_on(
        listener: std::net::TcpListener,
        data_dir: &std::path::Path,
        tweak: impl FnOnce(&mut RelayConfig) + Send + 'static,
    ) -> KillableRelay {
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("relay addr");
        let data_dir = data_dir.to_owned();
        let (kill, killed) = oneshot::channel::<()>();
        let (opened_tx, opened) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("relay runtime");
            runtime.block_on(async move {
                let store = ferry_relay::store::Store::open(&data_dir, Default::default())
                    .await
                    .expect("open the relay's store");
                let mut config = test_config(addr);
                config.store = Some(store);
                tweak(&mut config);
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                let _ = opened_tx.send(());
                tokio::select! {
                    _ = ferry_relay::run(listener, config, std::future::pending()) => {}
                    _ = killed => {}
                }
            });
            // Drops every task (tunnels, deliveries, store handles) without running them on.
            runtime.shutdown_timeout(Duration::from_secs(5));
        });
        tokio::time::timeout(WAIT, opened)
            .await
            .expect("relay store did not open in time")
            .expect("relay thread failed to start");
        KillableRelay {
            addr,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    /// The relay's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the relay: drops all its tasks and connections at once, then waits for its thread.
    pub async fn kill(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for KillableRelay {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}
