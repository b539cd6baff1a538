//! Ferry's wire protocol, with no I/O.
//!
//! A client holds one WebSocket to the relay, opened at [`CONNECT_PATH`] with the subprotocol
//! [`SUBPROTOCOL`]. Many HTTP exchanges are multiplexed over it, each a *stream* with a `u32` id
//! chosen by the relay:
//!
//! - control and head messages ([`Control`]) travel as JSON text frames; peers that both ask
//!   for it in the handshake (`binary_control`) send heads and window updates in a binary
//!   form instead ([`binary`]);
//! - body bytes travel as binary frames ([`DataFrame`]) with a 5-byte header (stream id, flags),
//!   never as JSON or base64;
//! - each direction of each stream is flow-controlled by a credit window ([`flow`]).
//!
//! Everything here is pure encode/decode: malformed input returns an error, never a panic.

pub mod binary;
mod control;
pub mod flow;
mod frame;
mod headers;
mod session;

pub use binary::BinaryControlError;
pub use control::{
    Control, ControlError, Delivery, ErrorCode, HttpVersion, LaneJoin, OfflinePolicy, RequestHead,
    RespondPolicy, ResponseHead, Resume,
};
pub use frame::{BinaryMessage, DataFrame, FrameError, FRAME_HEADER_LEN};
pub use headers::{is_hop_by_hop, HeaderList, HeaderListError, HOP_BY_HOP};
pub use session::{validate_session_name, SessionNameError};

/// The protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The WebSocket subprotocol naming [`PROTOCOL_VERSION`]; a relay and client that do not share
/// it refuse each other with a readable message instead of hanging.
pub const SUBPROTOCOL: &str = "ferry.v1";

/// Prefix of every WebSocket subprotocol Ferry has used or will use (`ferry.v1`, `ferry.v2`…).
pub const SUBPROTOCOL_PREFIX: &str = "ferry.v";

/// Path of the relay's tunnel endpoint.
pub const CONNECT_PATH: &str = "/_ferry/v1/connect";

/// Every path under this prefix belongs to the relay itself and is never routed to a session.
pub const RESERVED_PREFIX: &str = "/_ferry/";

/// Largest control message (JSON text frame) either side accepts.
pub const MAX_CONTROL_LEN: usize = 1024 * 1024;
