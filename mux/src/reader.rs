//! Reading WebSocket frames (RFC 6455 §5.2) straight into `Bytes`.
//!
//! tungstenite does the opening handshake; every message after it (hello and welcome included)
//! is read here. Bytes go into the spare capacity of one buffer, nothing zeroed first; a large
//! frame has its whole length reserved, so it arrives in as few reads as the socket allows
//! (tungstenite asked for at most its `read_buffer_size` per read, 8 KiB on the relay); each
//! payload is handed on as a slice of that buffer. An idle connection keeps a small buffer, and
//! one grown by a large frame is given back once it is empty.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncRead;

use crate::io::Side;
use crate::opcode;
use crate::writer::apply_mask;

/// Room asked for a read at first, and again once reads come back small: all an idle tunnel
/// holds (a larger buffer costs idle tunnels their memory target, docs/BENCHMARKS.md).
const MIN_READ: usize = 4 * 1024;

/// Most room asked for a read while reads keep filling what they are given (a busy tunnel's
/// batches). A frame's own length is always reserved in full, whatever this says.
const MAX_READ: usize = 64 * 1024;

/// An empty buffer with more room than this is dropped once reads are small again.
const KEEP_CAPACITY: usize = 16 * 1024;

/// One message from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A text message, not yet checked to be UTF-8 (see [`WsMessage::as_text`]).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A close frame: its status code, if it had one, and its reason.
    Close {
        /// The close status code.
        code: Option<u16>,
        /// The reason given (may be empty).
        reason: String,
    },
    /// A ping (its payload is not kept: liveness is judged on anything received).
    Ping,
    /// A pong.
    Pong,
}

impl WsMessage {
    /// The text of a text message that is valid UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            WsMessage::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer broke the WebSocket protocol.
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or message is larger than this side accepts.
    #[error("WebSocket message of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// Its size (so far, for a message in fragments).
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The connection ended in the middle of a frame or of a message in fragments.
    #[error("connection closed in the middle of a WebSocket frame")]
    Truncated,
}

/// One frame, unmasked.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: BytesMut,
}

/// Reads the frames one end of a WebSocket receives and puts messages together.
pub(crate) struct FrameReader {
    buf: BytesMut,
    /// Room to ask for the next read: doubles while reads fill it, halves when they come back
    /// small, between [`MIN_READ`] and [`MAX_READ`].
    read_size: usize,
    /// Which end this is: a server takes only masked frames, a client only unmasked ones.
    side: Side,
    /// Largest frame, and largest message once put together.
    max_message: usize,
    /// A message in fragments: its opcode and its bytes so far.
    partial: Option<(u8, BytesMut)>,
}

impl FrameReader {
    /// A reader for the `side` end, taking messages of at most `max_message` bytes.
    pub(crate) fn new(side: Side, max_message: usize) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            read_size: MIN_READ,
            side,
            max_message,
            partial: None,
        }
    }

    /// The next message, reading from `io` as needed; `None` when the peer closed the
    /// connection between messages. Cancel-safe: what was read stays in the buffer.
    pub(crate) async fn next<R>(&mut self, io: &mut R) -> Result<Option<WsMessage>, ReadError>
    where
        R: AsyncRead + Unpin,
    {
        loop {
            if let Some(msg) = self.parse()? {
                if self.buf.is_empty()
                    && self.read_size == MIN_READ
                    && self.buf.capacity() > KEEP_CAPACITY
                {
                    self.buf = BytesMut::new();
                }
                return Ok(Some(msg));
            }
            if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
                self.buf.reserve(self.read_size);
            }
            let room = self.buf.capacity() - self.buf.len();
            let buf = &mut self.buf;
            let read = poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf));
            let n = read.await?;
            if n == 0 {
                if self.buf.is_empty() && self.partial.is_none() {
                    return Ok(None);
                }
                return Err(ReadError::Truncated);
            }
            if n >= room {
                self.read_size = (self.read_size * 2).min(MAX_READ);
            } else if n <= self.read_size / 4 {
                self.read_size = (self.read_size / 2).max(MIN_READ);
            }
        }
    }

    /// The next whole message already in the buffer.
    fn parse(&mut self) -> Result<Option<WsMessage>, ReadError> {
        while let Some(frame) = self.parse_frame()? {
            if let Some(msg) = self.assemble(frame)? {
                return Ok(Some(msg));
            }
        }
        Ok(None)
    }

    /// Takes one whole frame off the buffer; when it is not all there yet, makes room for it.
    fn parse_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (buf[0], buf[1]);
        if first & 0x70 != 0 {
            return Err(ReadError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        let fin = first & 0x80 != 0;
        let code = first & 0x0F;
        match code {
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
            opcode::CLOSE | opcode::PING | opcode::PONG if !fin => {
                return Err(ReadError::Protocol("a control frame in fragments"));
            }
            opcode::CLOSE | opcode::PING | opcode::PONG => {}
            _ => return Err(ReadError::Protocol("unknown opcode")),
        }
        let masked = second & 0x80 != 0;
        match (self.side, masked) {
            (Side::Server, false) => {
                return Err(ReadError::Protocol("a client's frame is unmasked"))
            }
            (Side::Client, true) => return Err(ReadError::Protocol("a server's frame is masked")),
            _ => {}
        }
        let (len, mut header) = match second & 0x7F {
            126 => {
                let Some(bytes) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
            }
            127 => {
                let Some(bytes) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                (u64::from_be_bytes(be), 10)
            }
            short => (u64::from(short), 2),
        };
        if code >= opcode::CLOSE && len > 125 {
            return Err(ReadError::Protocol("a control frame longer than 125 bytes"));
        }
        if len > self.max_message as u64 {
            return Err(ReadError::TooLarge {
                size: len,
                limit: self.max_message,
            });
        }
        let len = len as usize; // at most `max_message`
        let key = if masked {
            let Some(bytes) = buf.get(header..header + 4) else {
                return Ok(None);
            };
            header += 4;
            Some([bytes[0], bytes[1], bytes[2], bytes[3]])
        } else {
            None
        };
        let whole = header + len;
        if buf.len() < whole {
            let missing = whole - buf.len();
            self.buf.reserve(missing);
            return Ok(None);
        }
        self.buf.advance(header);
        let mut payload = self.buf.split_to(len);
        if let Some(key) = key {
            apply_mask(&mut payload, key);
        }
        Ok(Some(Frame {
            fin,
            opcode: code,
            payload,
        }))
    }

    /// Turns a frame into a message, or keeps it as part of one.
    fn assemble(&mut self, frame: Frame) -> Result<Option<WsMessage>, ReadError> {
        match frame.opcode {
            opcode::CLOSE => close_message(&frame.payload).map(Some),
            opcode::PING => Ok(Some(WsMessage::Ping)),
            opcode::PONG => Ok(Some(WsMessage::Pong)),
            opcode::CONTINUATION => {
                let Some((code, mut data)) = self.partial.take() else {
                    return Err(ReadError::Protocol(
                        "a continuation frame with no message to continue",
                    ));
                };
                let size = data.len() + frame.payload.len();
                if size > self.max_message {
                    return Err(ReadError::TooLarge {
                        size: size as u64,
                        limit: self.max_message,
                    });
                }
                data.extend_from_slice(&frame.payload);
                if frame.fin {
                    Ok(Some(data_message(code, data.freeze())))
                } else {
                    self.partial = Some((code, data));
                    Ok(None)
                }
            }
            code => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol(
                        "a new message began inside one in fragments",
                    ));
                }
                if frame.fin {
                    Ok(Some(data_message(code, frame.payload.freeze())))
                } else {
                    self.partial = Some((code, frame.payload));
                    Ok(None)
                }
            }
        }
    }
}

fn data_message(code: u8, payload: Bytes) -> WsMessage {
    if code == opcode::TEXT {
        WsMessage::Text(payload)
    } else {
        WsMessage::Binary(payload)
    }
}

fn close_message(payload: &[u8]) -> Result<WsMessage, ReadError> {
    match payload {
        [] => Ok(WsMessage::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(ReadError::Protocol("a close frame of one byte")),
        [high, low, reason @ ..] => {
            let reason = std::str::from_utf8(reason)
                .map_err(|_| ReadError::Protocol("a close reason that is not UTF-8"))?;
            Ok(WsMessage::Close {
                code: Some(u16::from_be_bytes([*high, *low])),
                reason: reason.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
