use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};

use super::*;
use crate::writer::{FrameWriter, Outgoing};

const LIMIT: usize = 1 << 20;

/// Hands out `data` at most `step` bytes per read, counting the reads that returned bytes.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
    reads: usize,
}

impl Trickle {
    fn new(data: Vec<u8>, step: usize) -> Self {
        Trickle {
            data,
            at: 0,
            step,
            reads: 0,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .step
            .min(buf.remaining())
            .min(self.data.len() - self.at);
        if n > 0 {
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            self.reads += 1;
        }
        Poll::Ready(Ok(()))
    }
}

/// One frame as RFC 6455 §5.2 lays it out, masked with `key` if given.
fn frame(fin: bool, opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=65535 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    match key {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Every message in `data`, read as `side` in pieces of `step`, then how reading ended.
fn read_all(data: Vec<u8>, side: Side, step: usize) -> (Vec<WsMessage>, Result<(), ReadError>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut io = Trickle::new(data, step);
        let mut reader = FrameReader::new(side, LIMIT);
        let mut messages = Vec::new();
        loop {
            match reader.next(&mut io).await {
                Ok(Some(msg)) => messages.push(msg),
                Ok(None) => return (messages, Ok(())),
                Err(err) => return (messages, Err(err)),
            }
        }
    })
}

fn protocol_error(data: Vec<u8>, side: Side) -> &'static str {
    match read_all(data, side, usize::MAX).1 {
        Err(ReadError::Protocol(what)) => what,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

#[test]
fn reads_what_the_frame_writer_writes_from_either_side() {
    for side in [Side::Client, Side::Server] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let written = runtime.block_on(async {
            let mut out = Vec::new();
            let mut writer = FrameWriter::new(&mut out, side);
            writer.queue(Outgoing::Text("{\"type\":\"x\"}".into()));
            writer.queue(Outgoing::Binary(Bytes::from(vec![7u8; 70_000])));
            writer.queue(Outgoing::Data {
                stream: 3,
                end: true,
                payload: Bytes::from_static(b"small"),
            });
            writer.queue_ping();
            writer.queue_close("bye");
            writer.flush().await.unwrap();
            out
        });
        let reader_side = match side {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        };
        let (messages, end) = read_all(written, reader_side, usize::MAX);
        end.unwrap();
        assert_eq!(messages.len(), 5);
        assert_eq!(messages[0].as_text(), Some("{\"type\":\"x\"}"));
        assert_eq!(
            messages[1],
            WsMessage::Binary(Bytes::from(vec![7u8; 70_000]))
        );
        let WsMessage::Binary(data) = &messages[2] else {
            panic!("binary expected")
        };
        let data = ferry_protocol::DataFrame::decode(data.clone()).unwrap();
        assert_eq!(
            (data.stream, data.end, &data.payload[..]),
            (3, true, &b"small"[..])
        );
        assert_eq!(messages[3], WsMessage::Ping);
        assert_eq!(
            messages[4],
            WsMessage::Close {
                code: Some(1000),
                reason: "bye".into()
            }
        );
    }
}

#[test]
fn every_split_of_the_input_gives_the_same_messages() {
    let mut data = frame(true, opcode::TEXT, b"hello", Some(KEY));
    data.extend(frame(true, opcode::BINARY, &[9u8; 300], Some(KEY)));
    data.extend(frame(false, opcode::BINARY, b"frag", Some(KEY)));
    data.extend(frame(true, opcode::PING, b"p", Some(KEY)));
    data.extend(frame(true, opcode::CONTINUATION, b"ment", Some(KEY)));
    data.extend(frame(true, opcode::CLOSE, &[0x03, 0xe8], Some(KEY)));
    let expected = vec![
        WsMessage::Text(Bytes::from_static(b"hello")),
        WsMessage::Binary(Bytes::from(vec![9u8; 300])),
        WsMessage::Ping,
        WsMessage::Binary(Bytes::from_static(b"fragment")),
        WsMessage::Close {
            code: Some(1000),
            reason: String::new(),
        },
    ];
    for step in 1..=data.len() {
        let (messages, end) = read_all(data.clone(), Side::Server, step);
        end.unwrap();
        assert_eq!(messages, expected, "step {step}");
    }
}

#[test]
fn a_large_frame_arrives_in_few_reads_and_its_buffer_is_given_back() {
    let payload = vec![5u8; 512 * 1024];
    let mut data = frame(true, opcode::BINARY, &payload, None);
    data.extend(frame(true, opcode::PONG, b"", None));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut io = Trickle::new(data, usize::MAX);
        let mut reader = FrameReader::new(Side::Client, LIMIT);
        let first = reader.next(&mut io).await.unwrap().unwrap();
        assert_eq!(first, WsMessage::Binary(Bytes::from(payload)));
        // A reader handed at most 8 KiB per read (tungstenite's setting on the relay) would
        // have made 64 reads.
        assert!(io.reads <= 3, "{} reads", io.reads);
        assert_eq!(reader.next(&mut io).await.unwrap(), Some(WsMessage::Pong));
        assert!(reader.buf.capacity() <= KEEP_CAPACITY);
        assert_eq!(reader.next(&mut io).await.unwrap(), None);
    });
}

#[test]
fn frames_with_the_wrong_masking_are_refused() {
    assert_eq!(
        protocol_error(frame(true, opcode::TEXT, b"x", None), Side::Server),
        "a client's frame is unmasked"
    );
    assert_eq!(
        protocol_error(frame(true, opcode::TEXT, b"x", Some(KEY)), Side::Client),
        "a server's frame is masked"
    );
}

#[test]
fn malformed_frames_are_refused() {
    let mut reserved = frame(true, opcode::TEXT, b"x", None);
    reserved[0] |= 0x40;
    assert_eq!(
        protocol_error(reserved, Side::Client),
        "reserved bits set without an extension"
    );
    assert_eq!(
        protocol_error(frame(true, 0x3, b"x", None), Side::Client),
        "unknown opcode"
    );
    assert_eq!(
        protocol_error(frame(true, 0xB, b"x", None), Side::Client),
        "unknown opcode"
    );
    assert_eq!(
        protocol_error(frame(false, opcode::PING, b"x", None), Side::Client),
        "a control frame in fragments"
    );
    assert_eq!(
        protocol_error(frame(true, opcode::PING, &[0u8; 126], None), Side::Client),
        "a control frame longer than 125 bytes"
    );
    assert_eq!(
        protocol_error(frame(true, opcode::CONTINUATION, b"x", None), Side::Client),
        "a continuation frame with no message to continue"
    );
    let mut two_starts = frame(false, opcode::TEXT, b"a", None);
    two_starts.extend(frame(true, opcode::TEXT, b"b", None));
    assert_eq!(
        protocol_error(two_starts, Side::Client),
        "a new message began inside one in fragments"
    );
    assert_eq!(
        protocol_error(frame(true, opcode::CLOSE, &[3], None), Side::Client),
        "a close frame of one byte"
    );
    assert_eq!(
        protocol_error(
            frame(true, opcode::CLOSE, &[3, 232, 0xff], None),
            Side::Client
        ),
        "a close reason that is not UTF-8"
    );
}

#[test]
fn a_frame_over_the_limit_is_refused_before_its_payload_is_read() {
    // Only the header is sent: the refusal must not wait for (or buffer) the payload.
    let mut header = vec![0x82, 127];
    header.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
    match read_all(header, Side::Client, usize::MAX).1 {
        Err(ReadError::TooLarge { size, limit }) => {
            assert_eq!((size, limit), (u64::MAX >> 1, LIMIT));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let mut header = vec![0x82, 127];
    header.extend_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        read_all(header, Side::Client, usize::MAX).1,
        Err(ReadError::TooLarge { .. })
    ));
}

#[test]
fn a_message_in_fragments_over_the_limit_is_refused() {
    let piece = vec![1u8; LIMIT / 2 + 1];
    let mut data = frame(false, opcode::BINARY, &piece, None);
    data.extend(frame(true, opcode::CONTINUATION, &piece, None));
    assert!(matches!(
        read_all(data, Side::Client, usize::MAX).1,
        Err(ReadError::TooLarge { .. })
    ));
}

#[test]
fn the_end_of_the_connection_is_clean_only_between_messages() {
    assert!(read_all(Vec::new(), Side::Client, 1).1.is_ok());
    let whole = frame(true, opcode::BINARY, b"abcdef", None);
    for cut in 1..whole.len() {
        assert!(
            matches!(
                read_all(whole[..cut].to_vec(), Side::Client, 1).1,
                Err(ReadError::Truncated)
            ),
            "cut at {cut}"
        );
    }
    let unfinished = frame(false, opcode::BINARY, b"abc", None);
    assert!(matches!(
        read_all(unfinished, Side::Client, usize::MAX).1,
        Err(ReadError::Truncated)
    ));
}

#[test]
fn text_that_is_not_utf8_is_read_but_has_no_text() {
    let (messages, end) = read_all(
        frame(true, opcode::TEXT, &[0xff, 0xfe], None),
        Side::Client,
        9,
    );
    end.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].as_text(), None);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600), step in 1usize..64) {
        let _ = read_all(data.clone(), Side::Server, step);
        let _ = read_all(data, Side::Client, step);
    }

    #[test]
    fn masked_payloads_come_back_as_sent(payload in proptest::collection::vec(any::<u8>(), 0..70_000), key in any::<[u8; 4]>()) {
        let (messages, end) = read_all(frame(true, opcode::BINARY, &payload, Some(key)), Side::Server, usize::MAX);
        prop_assert!(end.is_ok());
        prop_assert_eq!(messages, vec![WsMessage::Binary(Bytes::from(payload))]);
    }
}

#[test]
fn reads_grow_while_a_burst_fills_them_and_shrink_back_when_idle() {
    let mut burst = Vec::new();
    for i in 0..3000u32 {
        burst.extend(frame(
            true,
            opcode::BINARY,
            &i.to_be_bytes().repeat(15),
            None,
        ));
    }
    let burst_len = burst.len();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut reader = FrameReader::new(Side::Client, LIMIT);
        let mut io = Trickle::new(burst, usize::MAX);
        for i in 0..3000u32 {
            let msg = reader.next(&mut io).await.unwrap().unwrap();
            assert_eq!(
                msg,
                WsMessage::Binary(Bytes::from(i.to_be_bytes().repeat(15)))
            );
        }
        // 4 KiB at a time would have taken 45 reads.
        assert!(io.reads <= 8, "{} reads for {burst_len} bytes", io.reads);
        assert_eq!(reader.read_size, MAX_READ);
        let mut quiet = Vec::new();
        for _ in 0..10 {
            quiet.extend(frame(true, opcode::PING, b"", None));
        }
        let mut io = Trickle::new(quiet, 2);
        for _ in 0..10 {
            assert_eq!(reader.next(&mut io).await.unwrap(), Some(WsMessage::Ping));
        }
        assert_eq!(reader.read_size, MIN_READ);
        assert!(reader.buf.capacity() <= KEEP_CAPACITY);
    });
}
