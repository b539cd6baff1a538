//! Writing WebSocket frames (RFC 6455 §5.2) without copying body bytes.
//!
//! A data frame goes out as its headers (WebSocket, then Ferry's 5-byte frame header) followed
//! by the payload `Bytes` exactly as they arrived, side by side in one vectored write; small
//! pieces are gathered into one buffer so a batch of small messages is still one `writev` of a
//! few slices. A client must mask what it sends, which rewrites every byte: its frames are
//! masked into the gather buffer instead.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_protocol::DataFrame;
use tokio::io::AsyncWrite;

use crate::io::Side;
use crate::opcode;

/// Pieces up to this size are copied into the gather buffer rather than written from where they
/// are: a slice of its own costs more than the copy.
const GATHER_MAX: usize = 2048;

/// Most slices handed to one `writev`.
const MAX_SLICES: usize = 64;

/// A gather buffer grown past this by a burst is given back once written, so that an idle
/// connection holds no large buffer.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Close code 1000: normal closure.
const CLOSE_NORMAL: u16 = 1000;

/// A message for the writer.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A control message: a text frame holding its JSON.
    Text(String),
    /// A control message in binary form, frame header included: a binary frame.
    Binary(Bytes),
    /// One chunk of one stream's body: a binary frame.
    Data {
        stream: u32,
        end: bool,
        payload: Bytes,
    },
}

/// Encodes frames and writes them to `io`.
pub(crate) struct FrameWriter<W> {
    io: W,
    side: Side,
    /// Small pieces, and everything masked, waiting to be written.
    gather: BytesMut,
    /// What is ready to go, in order (the gather buffer is moved here before a write).
    ready: VecDeque<Bytes>,
    /// Bytes encoded and not yet written.
    buffered: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(io: W, side: Side) -> Self {
        FrameWriter {
            io,
            side,
            gather: BytesMut::new(),
            ready: VecDeque::new(),
            buffered: 0,
        }
    }

    /// Bytes encoded and not yet written.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    /// Encodes `msg`; [`FrameWriter::flush`] writes it.
    pub(crate) fn queue(&mut self, msg: Outgoing) {
        match msg {
            Outgoing::Text(text) if text.len() <= GATHER_MAX => {
                self.frame(opcode::TEXT, text.as_bytes(), None);
            }
            Outgoing::Text(text) => self.frame(opcode::TEXT, &[], Some(Bytes::from(text))),
            Outgoing::Binary(bytes) => self.frame(opcode::BINARY, &[], Some(bytes)),
            Outgoing::Data {
                stream,
                end,
                payload,
            } => {
                self.frame(
                    opcode::BINARY,
                    &DataFrame::header(stream, end),
                    Some(payload),
                );
            }
        }
    }

    /// Encodes a ping.
    pub(crate) fn queue_ping(&mut self) {
        self.frame(opcode::PING, &[], None);
    }

    /// Encodes a normal close with `reason` (at most 123 bytes; longer is cut).
    pub(crate) fn queue_close(&mut self, reason: &str) {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = BytesMut::with_capacity(2 + end);
        payload.put_u16(CLOSE_NORMAL);
        payload.put_slice(&reason.as_bytes()[..end]);
        self.frame(opcode::CLOSE, &payload, None);
    }

    /// Encodes one frame whose payload is `head` (small: always gathered) then `body`.
    fn frame(&mut self, opcode: u8, head: &[u8], body: Option<Bytes>) {
        let len = head.len() + body.as_ref().map_or(0, Bytes::len);
        self.buffered += len + 14;
        self.gather.reserve(14);
        self.gather.put_u8(0x80 | opcode); // FIN: every message is one frame
        let mask_bit = if self.side == Side::Client { 0x80 } else { 0 };
        if len < 126 {
            self.gather.put_u8(mask_bit | len as u8);
        } else if let Ok(len) = u16::try_from(len) {
            self.gather.put_u8(mask_bit | 126);
            self.gather.put_u16(len);
        } else {
            self.gather.put_u8(mask_bit | 127);
            self.gather.put_u64(len as u64);
        }
        if self.side == Side::Client {
            let key: [u8; 4] = rand::random();
            self.gather.put_slice(&key);
            let start = self.gather.len();
            self.gather.reserve(len);
            self.gather.put_slice(head);
            if let Some(body) = &body {
                self.gather.put_slice(body);
            }
            apply_mask(&mut self.gather[start..], key);
            return;
        }
        self.gather.put_slice(head);
        match body {
            Some(body) if body.len() > GATHER_MAX => {
                self.ready.push_back(self.gather.split().freeze());
                self.ready.push_back(body);
            }
            Some(body) => self.gather.put_slice(&body),
            None => {}
        }
    }

    /// Writes everything encoded so far and flushes the stream.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        if !self.gather.is_empty() {
            self.ready.push_back(self.gather.split().freeze());
        }
        let FrameWriter { io, ready, .. } = self;
        while !ready.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = ready.len().min(MAX_SLICES);
            for (slice, bytes) in slices.iter_mut().zip(ready.iter()) {
                *slice = IoSlice::new(bytes);
            }
            let written =
                poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            advance(ready, written);
        }
        self.buffered = 0;
        if self.gather.capacity() > KEEP_CAPACITY {
            self.gather = BytesMut::new();
        }
        poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await
    }

    /// Ends the stream's write side (after a close frame has been flushed).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
    }
}

/// Drops the first `written` bytes of `ready`.
fn advance(ready: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(front) = ready.front_mut() else {
            return;
        };
        if front.len() > written {
            front.advance(written);
            return;
        }
        written -= front.len();
        ready.pop_front();
    }
    while ready.front().is_some_and(Bytes::is_empty) {
        ready.pop_front();
    }
}

/// XORs a frame's payload with its masking `key`.
pub(crate) fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    /// Frames written by `FrameWriter` as `side` are read back by tungstenite as the other end
    /// (which rejects unmasked frames from a client and masked ones from a server).
    async fn round_trip(side: Side) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(a, side);
        let big = Bytes::from((0..65_536u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        writer.queue(Outgoing::Text("{\"type\":\"x\"}".into()));
        writer.queue(Outgoing::Data {
            stream: 7,
            end: true,
            payload: big.clone(),
        });
        writer.queue(Outgoing::Data {
            stream: 8,
            end: false,
            payload: Bytes::from_static(b"small"),
        });
        writer.queue(Outgoing::Data {
            stream: 9,
            end: false,
            payload: Bytes::from(vec![3u8; 300]),
        });
        let long_text = format!("{{\"pad\":\"{}\"}}", "x".repeat(3000));
        writer.queue(Outgoing::Text(long_text.clone()));
        writer.queue_ping();
        writer.queue_close("bye");
        writer.flush().await.unwrap();
        let role = match side {
            Side::Client => Role::Server,
            Side::Server => Role::Client,
        };
        let mut reader = WebSocketStream::from_raw_socket(b, role, None).await;
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::text("{\"type\":\"x\"}")
        );
        let Message::Binary(frame) = reader.next().await.unwrap().unwrap() else {
            panic!("binary expected")
        };
        let frame = DataFrame::decode(frame).unwrap();
        assert_eq!((frame.stream, frame.end), (7, true));
        assert_eq!(frame.payload, big);
        let Message::Binary(frame) = reader.next().await.unwrap().unwrap() else {
            panic!("binary expected")
        };
        assert_eq!(&DataFrame::decode(frame).unwrap().payload[..], b"small");
        let Message::Binary(frame) = reader.next().await.unwrap().unwrap() else {
            panic!("binary expected")
        };
        assert_eq!(DataFrame::decode(frame).unwrap().payload, vec![3u8; 300]);
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::text(long_text)
        );
        assert!(matches!(reader.next().await.unwrap().unwrap(), Message::Ping(p) if p.is_empty()));
        let Message::Close(Some(close)) = reader.next().await.unwrap().unwrap() else {
            panic!("close expected")
        };
        assert_eq!(close.reason.as_str(), "bye");
    }

    #[tokio::test]
    async fn server_frames_are_read_by_a_client() {
        round_trip(Side::Server).await;
    }

    #[tokio::test]
    async fn client_frames_are_masked_and_read_by_a_server() {
        round_trip(Side::Client).await;
    }

    #[test]
    fn mask_matches_bytewise_xor() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..37u8).collect();
        let mut masked = data.clone();
        apply_mask(&mut masked, key);
        for (i, (m, d)) in masked.iter().zip(&data).enumerate() {
            assert_eq!(*m, d ^ key[i % 4]);
        }
    }

    #[test]
    fn advance_drops_written_bytes_across_slices() {
        let mut ready: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        advance(&mut ready, 4);
        assert_eq!(ready, [&b"e"[..], b"fgh"]);
        advance(&mut ready, 1);
        assert_eq!(ready, [&b"fgh"[..]]);
    }
}
