//! Binary frames: one chunk of one stream's body, or a control message in binary form.
//!
//! Layout: `stream id (u32, big-endian) | flags (u8) | payload`. Flag bit 0 ([`DataFrame::end`])
//! marks the last frame of the body; bit 7 ([`FLAG_CONTROL`]) marks a control message (see
//! [`crate::binary`]), sent only to a peer that asked for them; the other bits are reserved and
//! must be zero.

use bytes::{BufMut, Bytes, BytesMut};

use crate::binary::{BinaryControlError, FLAG_CONTROL};
use crate::Control;

/// Bytes of header in front of every data frame's payload.
pub const FRAME_HEADER_LEN: usize = 5;

const FLAG_END: u8 = 0x01;

/// Why a binary frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the fixed header.
    #[error("data frame of {0} bytes is shorter than its {FRAME_HEADER_LEN}-byte header")]
    Truncated(usize),
    /// A reserved flag bit was set.
    #[error("data frame has unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// The payload is larger than a frame may carry.
    #[error("data frame payload of {0} bytes exceeds the {max} byte limit", max = crate::flow::MAX_FRAME_PAYLOAD)]
    TooLarge(usize),
    /// A control message in binary form that could not be decoded.
    #[error(transparent)]
    Control(#[from] BinaryControlError),
}

/// What a binary WebSocket message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryMessage {
    /// A chunk of a stream's body.
    Data(DataFrame),
    /// A control message in binary form (a head or a window update).
    Control(Control),
}

impl BinaryMessage {
    /// Decodes a binary WebSocket message; a data frame's payload shares `bytes`' buffer.
    pub fn decode(bytes: Bytes) -> Result<BinaryMessage, FrameError> {
        match bytes.get(4) {
            Some(&FLAG_CONTROL) => {
                let stream = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let payload = &bytes[FRAME_HEADER_LEN..];
                Ok(BinaryMessage::Control(Control::decode_binary(
                    stream, payload,
                )?))
            }
            _ => DataFrame::decode(bytes).map(BinaryMessage::Data),
        }
    }
}

/// One chunk of a stream's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    /// The stream this chunk belongs to.
    pub stream: u32,
    /// Whether this is the last chunk of the body.
    pub end: bool,
    /// Body bytes, passed on exactly as they are.
    pub payload: Bytes,
}

impl DataFrame {
    /// The header in front of a frame's payload, for writers that send the payload from where
    /// it is rather than copying it behind the header.
    pub fn header(stream: u32, end: bool) -> [u8; FRAME_HEADER_LEN] {
        let [a, b, c, d] = stream.to_be_bytes();
        [a, b, c, d, if end { FLAG_END } else { 0 }]
    }

    /// Encodes a frame carrying `payload` for `stream` into a fresh buffer.
    pub fn encode(stream: u32, end: bool, payload: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + payload.len());
        buf.put_slice(&Self::header(stream, end));
        buf.put_slice(payload);
        buf.freeze()
    }

    /// Decodes a frame; the payload shares `bytes`' buffer (no copy).
    pub fn decode(mut bytes: Bytes) -> Result<DataFrame, FrameError> {
        if bytes.len() < FRAME_HEADER_LEN {
            return Err(FrameError::Truncated(bytes.len()));
        }
        let header = bytes.split_to(FRAME_HEADER_LEN);
        let stream = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let flags = header[4];
        if flags & !FLAG_END != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        if bytes.len() > crate::flow::MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        Ok(DataFrame {
            stream,
            end: flags & FLAG_END != 0,
            payload: bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_fixed() {
        let bytes = DataFrame::encode(0x01020304, true, b"hi");
        assert_eq!(&bytes[..], &[1, 2, 3, 4, 1, b'h', b'i']);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            DataFrame::decode(Bytes::from_static(&[0, 0, 1])),
            Err(FrameError::Truncated(3))
        );
        assert_eq!(
            DataFrame::decode(Bytes::from_static(&[0, 0, 0, 1, 0x81])),
            Err(FrameError::UnknownFlags(0x81))
        );
        let mut big = vec![0u8; FRAME_HEADER_LEN + crate::flow::MAX_FRAME_PAYLOAD + 1];
        big[3] = 1;
        assert!(matches!(
            DataFrame::decode(Bytes::from(big)),
            Err(FrameError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn round_trips(stream: u32, end: bool, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let decoded = DataFrame::decode(DataFrame::encode(stream, end, &payload)).unwrap();
            prop_assert_eq!(decoded, DataFrame { stream, end, payload: Bytes::from(payload) });
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = DataFrame::decode(Bytes::from(bytes));
        }
    }
}
