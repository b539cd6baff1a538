//! A running multiplexed connection: reader and writer tasks, heartbeats, the stream table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::flow::{max_frames, STREAM_WINDOW};
use ferry_protocol::{BinaryMessage, Control, DataFrame, ErrorCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::io::{MuxIo, WriteIo};
use crate::stream::{DeliverError, Slot, StreamGuard, StreamSender};
use crate::writer::{FrameWriter, Outgoing};
use crate::{MuxError, TunnelBody, WsMessage};

/// Payloads up to this size are copied out of the WebSocket's read buffer (see `on_data`).
const SMALL_PAYLOAD: usize = 8 * 1024;

/// Most messages written between two flushes of the WebSocket.
const MAX_BATCH: usize = 64;

/// Messages waiting for the writer at which it writes at once instead of waiting for every
/// ready task to queue its own (docs/BENCHMARKS.md, finding 21): a burst of 64 requests leaves
/// in four writes, not one, so the peer's work on the first overlaps this side's on the rest.
pub(crate) const FLUSH_AT: usize = 16;

/// Most bytes gathered into one flush: beyond, what is gathered is written first.
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// Most streams open at once on one connection, by default ([`MuxConfig::max_streams`]).
pub const MAX_STREAMS: usize = 1024;

/// Settings of one multiplexed connection.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// The connection is declared dead when nothing at all has been received for this long.
    /// Pings go out every quarter of it, so a live peer is never silent that long.
    pub heartbeat_timeout: Duration,
    /// Most streams open at once.
    pub max_streams: usize,
    /// Capacity, in messages, of the queue in front of the WebSocket writer.
    pub send_queue: usize,
    /// This side's receive window per stream, enforced on the peer; advertise the same in the
    /// handshake. Default [`STREAM_WINDOW`].
    pub recv_window: u32,
    /// The peer's receive window per stream: the credit each stream starts with for sending.
    /// Set it to what the peer advertised ([`peer_window`](ferry_protocol::flow::peer_window)).
    /// Default [`STREAM_WINDOW`].
    pub send_window: u32,
    /// Whether the peer asked for heads and window updates in binary form (`binary_control`
    /// in the handshake, [`ferry_protocol::binary`]): they are sent so, instead of as JSON.
    /// Either form is read whatever this says. Default `false`.
    pub binary_control: bool,
    /// Counters to update; share one between connections to watch them all.
    pub stats: Arc<MuxStats>,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            heartbeat_timeout: Duration::from_secs(30),
            max_streams: MAX_STREAMS,
            send_queue: 256,
            recv_window: STREAM_WINDOW,
            send_window: STREAM_WINDOW,
            binary_control: false,
            stats: Arc::default(),
        }
    }
}

/// Receives the control messages the connection does not handle itself: new streams' heads
/// (on the client) and connection errors. Called on the reader task: it must not block.
pub trait ControlHandler: Send + Sync + 'static {
    /// One control message from the peer.
    fn on_control(&self, mux: &MuxHandle, msg: Control);
}

/// Counters a test or the benchmark can read.
#[derive(Debug, Default)]
pub struct MuxStats {
    peak_buffered: AtomicUsize,
    frames_received: AtomicU64,
    writes: AtomicU64,
    connections: AtomicU64,
}

impl MuxStats {
    pub(crate) fn note_buffered(&self, bytes: usize) {
        self.peak_buffered.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Most body bytes ever waiting in one stream's receive buffer, unconsumed.
    pub fn peak_buffered(&self) -> usize {
        self.peak_buffered.load(Ordering::Relaxed)
    }

    /// Data frames received.
    pub fn frames_received(&self) -> u64 {
        self.frames_received.load(Ordering::Relaxed)
    }

    /// Batches of queued frames written to the socket (each one write, or a few when the
    /// socket takes it in parts): with many streams busy, far fewer than the frames sent.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Connections started with these counters (a session's connections and their lanes).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// State shared by the tasks and handles of one connection.
pub(crate) struct Shared {
    streams: Mutex<HashMap<u32, Arc<Slot>>>,
    /// Signalled by senders when [`FLUSH_AT`] messages wait in the writer's queue.
    pub(crate) batch_ready: tokio::sync::Notify,
    pub(crate) closed: CancellationToken,
    reason: Mutex<Option<String>>,
    pub(crate) stats: Arc<MuxStats>,
    pub(crate) config: MuxConfig,
}

impl Shared {
    /// `msg` for the writer, in binary form when the peer reads it and `msg` has one.
    pub(crate) fn encode(&self, msg: &Control) -> Outgoing {
        if self.config.binary_control {
            if let Some(bytes) = msg.encode_binary() {
                return Outgoing::Binary(bytes);
            }
        }
        Outgoing::Text(msg.encode())
    }

    pub(crate) fn remove(&self, id: u32) {
        self.streams.lock().expect("stream table").remove(&id);
    }

    fn open_streams(&self) -> usize {
        self.streams.lock().expect("stream table").len()
    }

    fn get(&self, id: u32) -> Option<Arc<Slot>> {
        self.streams.lock().expect("stream table").get(&id).cloned()
    }

    pub(crate) fn close_reason(&self) -> String {
        self.reason
            .lock()
            .expect("reason lock")
            .clone()
            .unwrap_or_else(|| "tunnel connection closed".to_owned())
    }

    fn close(&self, reason: &str) {
        {
            let mut current = self.reason.lock().expect("reason lock");
            if current.is_none() {
                *current = Some(reason.to_owned());
            }
        }
        self.closed.cancel();
        let slots: Vec<Arc<Slot>> = self
            .streams
            .lock()
            .expect("stream table")
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in slots {
            slot.abort(reason);
        }
    }
}

/// A cheap, clonable handle on a running connection.
#[derive(Clone)]
pub struct MuxHandle {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outgoing>,
}

impl MuxHandle {
    /// Registers stream `id`. Returns its sender, its incoming body, the receiver of the peer's
    /// head for it, and the guard that keeps it open.
    pub fn open_stream(
        &self,
        id: u32,
    ) -> Result<
        (
            StreamSender,
            TunnelBody,
            oneshot::Receiver<Control>,
            StreamGuard,
        ),
        MuxError,
    > {
        if self.shared.closed.is_cancelled() {
            return Err(MuxError::Closed(self.shared.close_reason()));
        }
        let (in_tx, in_rx) = mpsc::channel(max_frames(self.shared.config.recv_window) + 1);
        let (head_tx, head_rx) = oneshot::channel();
        let slot = Arc::new(Slot::new(id, in_tx, head_tx, self.shared.clone()));
        {
            let mut streams = self.shared.streams.lock().expect("stream table");
            if streams.len() >= self.shared.config.max_streams {
                return Err(MuxError::TooManyStreams(self.shared.config.max_streams));
            }
            if streams.contains_key(&id) {
                return Err(MuxError::DuplicateStream(id));
            }
            streams.insert(id, slot.clone());
        }
        // `close` cancels, then drains the table: a slot inserted after that drain is caught
        // here instead.
        if self.shared.closed.is_cancelled() {
            self.shared.remove(id);
            slot.abort(&self.shared.close_reason());
            return Err(MuxError::Closed(self.shared.close_reason()));
        }
        let guard = StreamGuard {
            slot: slot.clone(),
            shared: self.shared.clone(),
            out: self.out.clone(),
            finished: AtomicBool::new(false),
        };
        let sender = StreamSender {
            slot: slot.clone(),
            out: self.out.clone(),
        };
        let body = TunnelBody::new(in_rx, slot, self.out.clone());
        Ok((sender, body, head_rx, guard))
    }

    /// Sends a connection-level control message.
    pub async fn send_control(&self, msg: Control) -> Result<(), MuxError> {
        self.out
            .send(self.shared.encode(&msg))
            .await
            .map_err(|_| MuxError::Closed(self.shared.close_reason()))
    }

    /// Queues a connection-level control message if there is room now; a hint that may be
    /// dropped when the connection is busy or closed (then `false`).
    pub fn try_send_control(&self, msg: Control) -> bool {
        self.out.try_send(self.shared.encode(&msg)).is_ok()
    }

    /// Closes the connection: every open stream fails with `reason`.
    pub fn close(&self, reason: &str) {
        self.shared.close(reason);
    }

    /// Sends `Error { code, message }` and then closes the connection.
    pub async fn close_with_error(&self, code: ErrorCode, message: &str) {
        let msg = Control::Error {
            code,
            message: message.to_owned(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.send_control(msg)).await;
        self.close(message);
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Completes when the connection has ended.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    /// Why the connection ended (or will, once it does).
    pub fn close_reason(&self) -> String {
        self.shared.close_reason()
    }

    /// Number of streams open right now.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams()
    }

    /// The connection's counters.
    pub fn stats(&self) -> &MuxStats {
        &self.shared.stats
    }
}

/// Starts multiplexed connections.
pub struct Mux;

impl Mux {
    /// Runs `ws` as a multiplexed connection. Returns its handle and a task that ends, with the
    /// reason, when the connection does.
    pub fn spawn<S, H>(
        ws: WebSocketStream<MuxIo<S>>,
        config: MuxConfig,
        handler: H,
    ) -> (MuxHandle, JoinHandle<String>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: ControlHandler,
    {
        let (handle, pending) = Self::prepare(ws, config, handler, None);
        (handle, pending.start())
    }

    /// Sets a connection up without starting it: the handle can be published first (so that
    /// requests may be queued at once), then [`PendingMux::start`] runs it. `greeting` is
    /// written before anything else queued on the connection.
    pub fn prepare<S, H>(
        ws: WebSocketStream<MuxIo<S>>,
        config: MuxConfig,
        handler: H,
        greeting: Option<Control>,
    ) -> (MuxHandle, PendingMux<S, H>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: ControlHandler,
    {
        let (out_tx, out_rx) = mpsc::channel(config.send_queue);
        config.stats.connections.fetch_add(1, Ordering::Relaxed);
        if let Some(greeting) = greeting {
            out_tx
                .try_send(Outgoing::Text(greeting.encode()))
                .expect("a fresh queue has room");
        }
        let shared = Arc::new(Shared {
            batch_ready: tokio::sync::Notify::new(),
            streams: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
            reason: Mutex::new(None),
            stats: config.stats.clone(),
            config,
        });
        let handle = MuxHandle {
            shared,
            out: out_tx,
        };
        let writer = FrameWriter::new(ws.get_ref().take_writer(), ws.get_ref().side());
        let pending = PendingMux {
            ws,
            writer,
            out_rx,
            handler,
            handle: handle.clone(),
        };
        (handle, pending)
    }
}

/// A connection set up by [`Mux::prepare`], not yet running.
pub struct PendingMux<S, H> {
    ws: WebSocketStream<MuxIo<S>>,
    writer: FrameWriter<WriteIo<S>>,
    out_rx: mpsc::Receiver<Outgoing>,
    handler: H,
    handle: MuxHandle,
}

impl<S, H> PendingMux<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: ControlHandler,
{
    /// Starts the reader and writer. The returned task ends, with the reason, when the
    /// connection does.
    pub fn start(self) -> JoinHandle<String> {
        let PendingMux {
            ws,
            writer,
            out_rx,
            handler,
            handle,
        } = self;
        let writer = tokio::spawn(write_loop(writer, out_rx, handle.shared.clone()));
        tokio::spawn(async move {
            read_loop(ws, &handle, &handler).await;
            let _ = writer.await;
            handle.close_reason()
        })
    }
}

async fn read_loop<S, H>(mut stream: WebSocketStream<MuxIo<S>>, mux: &MuxHandle, handler: &H)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: ControlHandler,
{
    let shared = &mux.shared;
    let timeout = shared.config.heartbeat_timeout;
    let silence_limit = timeout * 3 / 4;
    let mut watchdog = tokio::time::interval(timeout / 8);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        let msg = tokio::select! {
            biased;
            _ = shared.closed.cancelled() => return,
            msg = stream.get_mut().read_message() => msg,
            _ = watchdog.tick() => {
                let silent = last_heard.elapsed();
                if silent > silence_limit {
                    shared.close(&format!(
                        "heartbeat timeout: nothing received for {:.1}s",
                        silent.as_secs_f64()
                    ));
                    return;
                }
                continue;
            }
        };
        last_heard = Instant::now();
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Err(err) => {
                shared.close(&format!("connection error: {err}"));
                return;
            }
            Ok(None) => {
                shared.close("connection closed by the other side");
                return;
            }
        };
        let result = match msg {
            WsMessage::Binary(bytes) => match BinaryMessage::decode(bytes) {
                Ok(BinaryMessage::Data(frame)) => on_data(shared, frame),
                Ok(BinaryMessage::Control(control)) => on_control(mux, handler, control),
                Err(err) => Err(format!("protocol error: {err}")),
            },
            WsMessage::Text(_) => match msg.as_text().map(Control::decode) {
                Some(Ok(control)) => on_control(mux, handler, control),
                Some(Err(err)) => Err(format!("protocol error: {err}")),
                None => Err("protocol error: a text message that is not UTF-8".to_owned()),
            },
            WsMessage::Close { reason, .. } => {
                let reason = if reason.is_empty() {
                    "closed by the other side".to_owned()
                } else {
                    format!("closed by the other side: {reason}")
                };
                shared.close(&reason);
                return;
            }
            WsMessage::Ping | WsMessage::Pong => Ok(()),
        };
        if let Err(reason) = result {
            warn!(%reason, "closing tunnel connection");
            mux.close_with_error(ErrorCode::ProtocolError, &reason)
                .await;
            return;
        }
    }
}

fn on_data(shared: &Shared, mut frame: DataFrame) -> Result<(), String> {
    if frame.payload.len() <= SMALL_PAYLOAD {
        // A small payload would pin the WebSocket's whole read buffer until the body is
        // consumed, making the next read allocate a fresh one: copying it is cheaper.
        frame.payload = Bytes::copy_from_slice(&frame.payload);
    }
    shared.stats.frames_received.fetch_add(1, Ordering::Relaxed);
    let Some(slot) = shared.get(frame.stream) else {
        return Ok(()); // a stream that just ended; its late frames are dropped
    };
    match slot.deliver(frame) {
        Ok(()) => Ok(()),
        Err(DeliverError::Violation(what)) => {
            let reason = format!("protocol error on stream {}: {what}", slot.id);
            shared.remove(slot.id);
            slot.abort(&reason);
            Err(reason)
        }
    }
}

fn on_control<H: ControlHandler>(mux: &MuxHandle, handler: &H, msg: Control) -> Result<(), String> {
    let shared = &mux.shared;
    match msg {
        Control::Window { stream, increment } => {
            if let Some(slot) = shared.get(stream) {
                if !slot.grant(increment) {
                    return Err(format!(
                        "protocol error on stream {stream}: credit beyond the window"
                    ));
                }
            }
            Ok(())
        }
        Control::Cancel { stream, reason } => {
            if let Some(slot) = shared.get(stream) {
                debug!(stream, %reason, "stream cancelled by peer");
                shared.remove(stream);
                slot.abort(&reason);
            }
            Ok(())
        }
        Control::ResponseHead(ref head) => {
            let stream = head.stream;
            if let Some(slot) = shared.get(stream) {
                slot.deliver_head(msg);
            }
            Ok(())
        }
        other => {
            handler.on_control(mux, other);
            Ok(())
        }
    }
}

async fn write_loop<S>(
    mut writer: FrameWriter<WriteIo<S>>,
    mut out: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
) where
    S: AsyncWrite + Unpin,
{
    let mut ping = tokio::time::interval(shared.config.heartbeat_timeout / 4);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let work = async {
        loop {
            tokio::select! {
                msg = out.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    writer.queue(msg);
                    // Other streams open: let the tasks that are ready run first, so that
                    // what they send shares this write (and the peer's wake-up), but write
                    // as soon as a batch is full rather than after every ready task, so the
                    // peer starts on the first requests of a burst while this side still
                    // produces the rest.
                    if shared.open_streams() > 1 {
                        tokio::select! {
                            biased;
                            _ = shared.batch_ready.notified() => {}
                            _ = tokio::task::yield_now() => {}
                        }
                    }
                    // Batch what else is already queued into the same write (a bounded
                    // batch, so a busy queue cannot hold back what is already encoded).
                    for _ in 0..MAX_BATCH {
                        if writer.buffered() >= MAX_BATCH_BYTES {
                            break;
                        }
                        let Ok(msg) = out.try_recv() else { break };
                        writer.queue(msg);
                    }
                    writer.flush().await.map_err(|e| e.to_string())?;
                    shared.stats.writes.fetch_add(1, Ordering::Relaxed);
                }
                _ = ping.tick() => {
                    writer.queue_ping();
                    writer.flush().await.map_err(|e| e.to_string())?;
                }
            }
        }
    };
    // A write stuck on a peer that stopped reading is abandoned as soon as the connection is
    // declared closed (by the reader's heartbeat watchdog, say).
    // `work` is polled first, so whatever is queued and writable when the close comes (a last
    // error message, say) still goes out.
    let result: Result<(), String> = tokio::select! {
        biased;
        result = work => result,
        _ = shared.closed.cancelled() => Ok(()),
    };
    if let Err(err) = result {
        shared.close(&format!("connection error: {err}"));
        return;
    }
    // Flush what was queued before the close (a last error message, say), then say goodbye.
    let goodbye = async {
        while let Ok(msg) = out.try_recv() {
            writer.queue(msg);
        }
        writer.queue_close(&shared.close_reason());
        writer.flush().await?;
        writer.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
}
