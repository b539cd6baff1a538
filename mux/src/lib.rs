//! The I/O half of Ferry's protocol, shared by relay and client.
//!
//! [`Mux::spawn`] takes a WebSocket whose handshake (hello/welcome) is done and runs it: a reader
//! task dispatches frames to streams, a writer task batches outgoing frames, and both watch the
//! heartbeat. Each HTTP exchange is a stream: [`MuxHandle::open_stream`] registers it and returns
//! a [`StreamSender`] (sends body bytes, waiting for flow-control credit) and a [`TunnelBody`]
//! (an [`http_body::Body`] of the bytes the peer sends, returning credit as they are consumed).
//!
//! ```text
//!             ┌── reader task ──> stream slots ──> TunnelBody (credit back via writer)
//! WebSocket ──┤
//!             └── writer task <── bounded queue <── StreamSender, control messages, pings
//! ```

mod body;
mod connection;
mod io;
mod opcode;
mod reader;
mod stream;
mod writer;

pub use body::{BodyError, BodyTap, TunnelBody};
pub use connection::{
    ControlHandler, Mux, MuxConfig, MuxHandle, MuxStats, PendingMux, MAX_STREAMS,
};
pub use io::{websocket_config, MuxIo, Side, MAX_MESSAGE};
pub use reader::{ReadError, WsMessage};
pub use stream::{EncodedControl, PumpError, StreamGuard, StreamSender};

/// Errors of a multiplexed connection.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MuxError {
    /// The connection is closed.
    #[error("tunnel connection closed: {0}")]
    Closed(String),
    /// The stream was cancelled by either side.
    #[error("stream cancelled: {0}")]
    Cancelled(String),
    /// A stream with this id is already open.
    #[error("stream {0} is already open")]
    DuplicateStream(u32),
    /// The connection has as many open streams as it may.
    #[error("too many exchanges in flight on this tunnel (limit {0})")]
    TooManyStreams(usize),
}
