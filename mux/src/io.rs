//! One connection's byte stream, shared by Ferry's own frame reader and writer.
//!
//! tungstenite does the opening handshake; after it, Ferry reads frames itself
//! ([`MuxIo::read_message`], `reader.rs`) and writes them itself (`writer.rs`, header and payload
//! side by side in one vectored write): tungstenite copies every payload into buffers of its own.
//! [`MuxIo`] is the stream handed to tungstenite; once the multiplexer starts it takes a second
//! handle for writing and mutes the first, so the two never interleave bytes on the wire.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::reader::{FrameReader, ReadError, WsMessage};

/// Largest WebSocket message (and frame) read: a control message at its limit, with room to
/// spare; data frames are far smaller.
pub const MAX_MESSAGE: usize = ferry_protocol::MAX_CONTROL_LEN + 1024;

/// tungstenite's settings for a tunnel, on either side. tungstenite does the opening handshake
/// and writes what goes out before the multiplexer starts (a hello, or a refusal); every message
/// is read by [`MuxIo::read_message`], so its read buffer is kept at its smallest.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Which end of the WebSocket this is: a client masks what it sends (RFC 6455 §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that opened the connection (the `ferry` client): masks its frames.
    Client,
    /// The end that accepted it (the relay).
    Server,
}

struct Inner<S> {
    stream: Mutex<S>,
    /// Set when the multiplexer's writer takes over: writes through [`MuxIo`] are dropped.
    muted: AtomicBool,
    side: Side,
}

impl<S> Inner<S> {
    fn lock(&self) -> MutexGuard<'_, S> {
        // A poisoned lock means a poll panicked mid-call; the stream itself is still usable.
        self.stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection's stream, to be wrapped in a `WebSocketStream` and then given to
/// [`Mux`](crate::Mux). Reads pass through for tungstenite's opening handshake; every message
/// after it is read with [`MuxIo::read_message`]. Writes pass through until the multiplexer
/// starts; after that, writes through this handle are discarded (the multiplexer's writer sends
/// every frame; nobody answers pings: a peer's liveness is judged on anything received).
pub struct MuxIo<S> {
    inner: Arc<Inner<S>>,
    reader: FrameReader,
}

impl<S> MuxIo<S> {
    /// Wraps `stream`, the `side` end of a WebSocket connection.
    pub fn new(stream: S, side: Side) -> Self {
        MuxIo {
            inner: Arc::new(Inner {
                stream: Mutex::new(stream),
                muted: AtomicBool::new(false),
                side,
            }),
            reader: FrameReader::new(side, MAX_MESSAGE),
        }
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.inner.side
    }

    /// The writer's handle; from now on writes through `self` are discarded.
    pub(crate) fn take_writer(&self) -> WriteIo<S> {
        self.inner.muted.store(true, Ordering::Release);
        WriteIo {
            inner: self.inner.clone(),
        }
    }

    fn muted(&self) -> bool {
        self.inner.muted.load(Ordering::Acquire)
    }
}

impl<S: AsyncRead + Unpin> MuxIo<S> {
    /// The next message from the peer; `None` once it has closed the connection. Read every
    /// message after the opening handshake this way, never through tungstenite: bytes this
    /// reader has taken off the socket are not seen by tungstenite's. Cancel-safe.
    pub async fn read_message(&mut self) -> Result<Option<WsMessage>, ReadError> {
        let MuxIo { inner, reader } = self;
        reader.next(&mut SharedRead(inner)).await
    }
}

/// Reads through the shared stream's lock.
struct SharedRead<'a, S>(&'a Inner<S>);

impl<S: AsyncRead + Unpin> AsyncRead for SharedRead<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MuxIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut SharedRead(&self.inner)).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MuxIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.muted() {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut *self.inner.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.muted() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.muted() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner.lock()).poll_shutdown(cx)
    }
}

/// The multiplexer writer's handle on the stream.
pub(crate) struct WriteIo<S> {
    inner: Arc<Inner<S>>,
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.lock().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner.lock()).poll_shutdown(cx)
    }
}
