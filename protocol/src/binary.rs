//! The per-request control messages (request and response heads, window updates) in binary
//! form, for peers that agreed on it in the handshake (`binary_control` in hello and welcome).
//!
//! A binary control message travels in a binary WebSocket frame like a body chunk, with the
//! same 5-byte header (stream id, flags) and the flag [`FLAG_CONTROL`] set; its payload is one
//! kind byte and the message's fields, integers big-endian:
//!
//! ```text
//! request head   1 | version u8 | has_body u8 | method: u16 len, bytes | target: u32 len, bytes
//!                  | delivery: 0, or 1 and id: u16 len, bytes | received_at_ms i64 | attempt u32
//!                  |   | queued u8 | headers
//! response head  2 | status u16 | has_body u8 | headers
//! window         3 | increment u32
//! headers        count u32 | names_len u32 | values_len u32 | per entry: name u16 len, value u32
//!                  len | every name, back to back | every value, back to back
//! ```
//!
//! JSON costs each side of the tunnel 11–23 % of its instructions per webhook, in escaping and
//! parsing header lists (docs/BENCHMARKS.md, finding 25); this form is copied in and out in a
//! few slices. Every other message stays JSON, and so does everything for a peer that did not
//! ask for this form.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Control, Delivery, HeaderList, HttpVersion, RequestHead, ResponseHead};

/// Flag bit of a binary frame whose payload is a control message in binary form.
pub const FLAG_CONTROL: u8 = 0x80;

const KIND_REQUEST_HEAD: u8 = 1;
const KIND_RESPONSE_HEAD: u8 = 2;
const KIND_WINDOW: u8 = 3;

/// Why a binary control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryControlError {
    /// The message ends before its last field.
    #[error("binary control message is truncated")]
    Truncated,
    /// Bytes follow the last field.
    #[error("binary control message has {0} bytes after its end")]
    TrailingBytes(usize),
    /// The kind byte names no message this build knows.
    #[error("unknown binary control message kind {0}")]
    UnknownKind(u8),
    /// The message is larger than [`MAX_CONTROL_LEN`](crate::MAX_CONTROL_LEN).
    #[error("binary control message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// A field holds a value it may not (a flag other than 0 or 1, text that is not UTF-8…).
    #[error("binary control message has an invalid {0}")]
    Invalid(&'static str),
}

impl Control {
    /// The message in binary form, frame header included, for the messages that have one
    /// (request and response heads, window updates); `None` for the others, and for a head
    /// with a field too long for its length prefix (a header name over 64 KiB from a local
    /// app, say), which then goes as JSON.
    pub fn encode_binary(&self) -> Option<Bytes> {
        if !self.fits_binary() {
            return None;
        }
        let (stream, size) = match self {
            Control::RequestHead(head) => (head.stream, request_head_len(head)),
            Control::ResponseHead(head) => (head.stream, 1 + 2 + 1 + headers_len(&head.headers)),
            Control::Window { stream, .. } => (*stream, 1 + 4),
            _ => return None,
        };
        let mut out = BytesMut::with_capacity(crate::FRAME_HEADER_LEN + size);
        out.put_u32(stream);
        out.put_u8(FLAG_CONTROL);
        match self {
            Control::RequestHead(head) => put_request_head(&mut out, head),
            Control::ResponseHead(head) => {
                out.put_u8(KIND_RESPONSE_HEAD);
                out.put_u16(head.status);
                out.put_u8(u8::from(head.has_body));
                put_headers(&mut out, &head.headers);
            }
            Control::Window { increment, .. } => {
                out.put_u8(KIND_WINDOW);
                out.put_u32(*increment);
            }
            _ => unreachable!("only messages with a binary form get here"),
        }
        debug_assert_eq!(out.len(), crate::FRAME_HEADER_LEN + size);
        Some(out.freeze())
    }

    /// Decodes the payload of a binary frame flagged [`FLAG_CONTROL`] for `stream`.
    pub fn decode_binary(stream: u32, payload: &[u8]) -> Result<Control, BinaryControlError> {
        if payload.len() > crate::MAX_CONTROL_LEN {
            return Err(BinaryControlError::TooLarge(payload.len()));
        }
        let mut input = Reader(payload);
        let msg = match input.u8()? {
            KIND_REQUEST_HEAD => Control::RequestHead(read_request_head(stream, &mut input)?),
            KIND_RESPONSE_HEAD => Control::ResponseHead(ResponseHead {
                stream,
                status: input.u16()?,
                has_body: input.flag("has_body flag")?,
                headers: read_headers(&mut input)?,
            }),
            KIND_WINDOW => Control::Window {
                stream,
                increment: input.u32()?,
            },
            kind => return Err(BinaryControlError::UnknownKind(kind)),
        };
        match input.0.len() {
            0 => Ok(msg),
            rest => Err(BinaryControlError::TrailingBytes(rest)),
        }
    }

    /// Whether every field fits its length prefix in the binary form.
    fn fits_binary(&self) -> bool {
        let short = |bytes: &[u8]| bytes.len() <= usize::from(u16::MAX);
        let long = |bytes: &[u8]| u32::try_from(bytes.len()).is_ok();
        let headers_fit = |headers: &HeaderList| {
            // Each value fits when all of them together do.
            let (names, values, _) = headers.parts();
            long(names.as_bytes())
                && long(values)
                && u32::try_from(headers.len()).is_ok()
                && headers.iter().all(|(name, _)| short(name.as_bytes()))
        };
        match self {
            Control::RequestHead(head) => {
                short(head.method.as_bytes())
                    && long(head.target.as_bytes())
                    && head
                        .delivery
                        .as_ref()
                        .is_none_or(|delivery| short(delivery.id.as_bytes()))
                    && headers_fit(&head.headers)
            }
            Control::ResponseHead(head) => headers_fit(&head.headers),
            _ => true,
        }
    }
}

fn request_head_len(head: &RequestHead) -> usize {
    let delivery = head
        .delivery
        .as_ref()
        .map_or(0, |d| 2 + d.id.len() + 8 + 4 + 1);
    1 + 1
        + 1
        + 2
        + head.method.len()
        + 4
        + head.target.len()
        + 1
        + delivery
        + headers_len(&head.headers)
}

fn put_request_head(out: &mut BytesMut, head: &RequestHead) {
    out.put_u8(KIND_REQUEST_HEAD);
    out.put_u8(match head.version {
        HttpVersion::Http10 => 0,
        HttpVersion::Http11 => 1,
        HttpVersion::Http2 => 2,
        HttpVersion::Http3 => 3,
    });
    out.put_u8(u8::from(head.has_body));
    put_short(out, head.method.as_bytes());
    put_long(out, head.target.as_bytes());
    match &head.delivery {
        None => out.put_u8(0),
        Some(delivery) => {
            out.put_u8(1);
            put_short(out, delivery.id.as_bytes());
            out.put_i64(delivery.received_at_ms);
            out.put_u32(delivery.attempt);
            out.put_u8(u8::from(delivery.queued));
        }
    }
    put_headers(out, &head.headers);
}

fn read_request_head(
    stream: u32,
    input: &mut Reader<'_>,
) -> Result<RequestHead, BinaryControlError> {
    let version = match input.u8()? {
        0 => HttpVersion::Http10,
        1 => HttpVersion::Http11,
        2 => HttpVersion::Http2,
        3 => HttpVersion::Http3,
        _ => return Err(BinaryControlError::Invalid("HTTP version")),
    };
    let has_body = input.flag("has_body flag")?;
    let len = usize::from(input.u16()?);
    let method = input.text(len, "method")?.to_owned();
    let len = input.u32()? as usize;
    let target = input.text(len, "target")?.to_owned();
    let delivery = match input.u8()? {
        0 => None,
        1 => {
            let len = usize::from(input.u16()?);
            Some(Delivery {
                id: input.text(len, "delivery id")?.to_owned(),
                received_at_ms: input.i64()?,
                attempt: input.u32()?,
                queued: input.flag("queued flag")?,
            })
        }
        _ => return Err(BinaryControlError::Invalid("delivery marker")),
    };
    Ok(RequestHead {
        stream,
        method,
        target,
        version,
        headers: read_headers(input)?,
        has_body,
        delivery,
    })
}

fn headers_len(headers: &HeaderList) -> usize {
    let (names, values, _) = headers.parts();
    4 + 4 + 4 + headers.len() * 6 + names.len() + values.len()
}

fn put_headers(out: &mut BytesMut, headers: &HeaderList) {
    let (names, values, ends) = headers.parts();
    // Every length fits its prefix: `fits_binary` checked.
    out.put_u32(ends.len() as u32);
    out.put_u32(names.len() as u32);
    out.put_u32(values.len() as u32);
    let mut start = (0, 0);
    for &(name_end, value_end) in ends {
        out.put_u16((name_end - start.0) as u16);
        out.put_u32((value_end - start.1) as u32);
        start = (name_end, value_end);
    }
    out.put_slice(names.as_bytes());
    out.put_slice(values);
}

fn read_headers(input: &mut Reader<'_>) -> Result<HeaderList, BinaryControlError> {
    let count = input.u32()? as usize;
    let names_len = input.u32()? as usize;
    let values_len = input.u32()? as usize;
    // Six bytes of lengths per entry: a count the input cannot hold is refused before any
    // allocation is sized by it.
    let lengths = input.bytes(count.checked_mul(6).ok_or(BinaryControlError::Truncated)?)?;
    let names = input.text(names_len, "header names")?;
    let values = input.bytes(values_len)?;
    let mut ends = Vec::with_capacity(count);
    let mut end = (0usize, 0usize);
    for entry in lengths.chunks_exact(6) {
        let name_len = usize::from(u16::from_be_bytes([entry[0], entry[1]]));
        let value_len = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]) as usize;
        if name_len == 0 {
            return Err(BinaryControlError::Invalid("header name (empty)"));
        }
        end = (end.0 + name_len, end.1 + value_len);
        if end.0 > names.len() || end.1 > values.len() || !names.is_char_boundary(end.0) {
            return Err(BinaryControlError::Invalid("header lengths"));
        }
        ends.push(end);
    }
    if end != (names.len(), values.len()) {
        return Err(BinaryControlError::Invalid("header lengths"));
    }
    Ok(HeaderList::from_parts(
        names.to_owned(),
        values.to_vec(),
        ends,
    ))
}

fn put_short(out: &mut BytesMut, bytes: &[u8]) {
    // Fits: `fits_binary` checked.
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn put_long(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

/// Reads fields off the front of a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, len: usize) -> Result<&'a [u8], BinaryControlError> {
        if len > self.0.len() {
            return Err(BinaryControlError::Truncated);
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BinaryControlError> {
        let bytes = self.bytes(N)?;
        Ok(bytes.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, BinaryControlError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, BinaryControlError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, BinaryControlError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, BinaryControlError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, BinaryControlError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BinaryControlError::Invalid(what)),
        }
    }

    fn text(&mut self, len: usize, what: &'static str) -> Result<&'a str, BinaryControlError> {
        std::str::from_utf8(self.bytes(len)?).map_err(|_| BinaryControlError::Invalid(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataFrame;
    use proptest::prelude::*;

    fn head() -> Control {
        Control::RequestHead(RequestHead {
            stream: 7,
            method: "POST".into(),
            target: "/a?b".into(),
            version: HttpVersion::Http11,
            headers: [("x-a", &b"1"[..]), ("x-b", b"\xff")].into_iter().collect(),
            has_body: true,
            delivery: None,
        })
    }

    #[test]
    fn layout_is_fixed() {
        let bytes = head().encode_binary().unwrap();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0, 0, 0, 7, 0x80,               // stream 7, control flag
            1, 1, 1,                        // request head, HTTP/1.1, has a body
            0, 4, b'P', b'O', b'S', b'T',   // method
            0, 0, 0, 4, b'/', b'a', b'?', b'b', // target
            0,                              // no delivery
            0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0, 2, // 2 headers, 6 bytes of names, 2 of values
            0, 3, 0, 0, 0, 1, 0, 3, 0, 0, 0, 1, // each 3 + 1 bytes
            b'x', b'-', b'a', b'x', b'-', b'b', b'1', 0xff,
        ];
        assert_eq!(&bytes[..], expected);
        let window = Control::Window {
            stream: 1,
            increment: 256,
        };
        assert_eq!(
            &window.encode_binary().unwrap()[..],
            &[0, 0, 0, 1, 0x80, 3, 0, 0, 1, 0]
        );
        let cancel = Control::Cancel {
            stream: 1,
            reason: "r".into(),
        };
        assert_eq!(cancel.encode_binary(), None);
    }

    #[test]
    fn a_head_with_a_field_too_long_for_the_binary_form_goes_as_json() {
        let long_name = "x".repeat(usize::from(u16::MAX) + 1);
        let head = Control::ResponseHead(ResponseHead {
            stream: 3,
            status: 200,
            headers: [(long_name.as_str(), "v")].into_iter().collect(),
            has_body: false,
        });
        assert_eq!(head.encode_binary(), None);
        assert_eq!(Control::decode(&head.encode()).unwrap(), head);
        let just_fits = "x".repeat(usize::from(u16::MAX));
        let head = Control::ResponseHead(ResponseHead {
            stream: 3,
            status: 200,
            headers: [(just_fits.as_str(), "v")].into_iter().collect(),
            has_body: false,
        });
        let bytes = head.encode_binary().unwrap();
        assert_eq!(
            crate::BinaryMessage::decode(bytes).unwrap(),
            crate::BinaryMessage::Control(head)
        );
    }

    #[test]
    fn rejects_malformed() {
        let bytes = head().encode_binary().unwrap();
        let payload = &bytes[crate::FRAME_HEADER_LEN..];
        let decode = |payload: &[u8]| Control::decode_binary(7, payload);
        assert_eq!(decode(payload), Ok(head()));
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = payload.to_vec();
        longer.push(0);
        assert_eq!(decode(&longer), Err(BinaryControlError::TrailingBytes(1)));
        assert_eq!(decode(&[9]), Err(BinaryControlError::UnknownKind(9)));
        let mut bad_flag = payload.to_vec();
        bad_flag[2] = 2;
        assert!(matches!(
            decode(&bad_flag),
            Err(BinaryControlError::Invalid(_))
        ));
        // A name of zero bytes, and lengths that split a multi-byte character.
        let empty_name = [
            2, 0, 200, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(matches!(
            decode(&empty_name),
            Err(BinaryControlError::Invalid(_))
        ));
        let split = [
            2, 0, 200, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0,
            0xc3, 0xa9,
        ];
        assert!(matches!(
            decode(&split),
            Err(BinaryControlError::Invalid(_))
        ));
        // A count of entries far beyond what the message holds.
        let huge = [2, 0, 200, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&huge), Err(BinaryControlError::Truncated));
        let big = vec![3u8; crate::MAX_CONTROL_LEN + 1];
        assert!(matches!(decode(&big), Err(BinaryControlError::TooLarge(_))));
    }

    /// Names of any characters: lengths must not split a multi-byte one.
    fn arb_headers() -> impl Strategy<Value = HeaderList> {
        crate::headers::arb_headers(".{1,12}")
    }

    fn arb_binary_control() -> impl Strategy<Value = Control> {
        prop_oneof![
            (
                any::<u32>(),
                ".{0,10}",
                ".*",
                0u8..4,
                arb_headers(),
                any::<bool>(),
                proptest::option::of((".*", any::<i64>(), any::<u32>(), any::<bool>()))
            )
                .prop_map(
                    |(stream, method, target, version, headers, has_body, delivery)| {
                        Control::RequestHead(RequestHead {
                            stream,
                            method,
                            target,
                            version: [
                                HttpVersion::Http10,
                                HttpVersion::Http11,
                                HttpVersion::Http2,
                                HttpVersion::Http3,
                            ][usize::from(version)],
                            headers,
                            has_body,
                            delivery: delivery.map(|(id, received_at_ms, attempt, queued)| {
                                Delivery {
                                    id,
                                    received_at_ms,
                                    attempt,
                                    queued,
                                }
                            }),
                        })
                    }
                ),
            (any::<u32>(), any::<u16>(), arb_headers(), any::<bool>()).prop_map(
                |(stream, status, headers, has_body)| Control::ResponseHead(ResponseHead {
                    stream,
                    status,
                    headers,
                    has_body,
                })
            ),
            (any::<u32>(), any::<u32>())
                .prop_map(|(stream, increment)| Control::Window { stream, increment }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips_through_a_binary_frame(msg in arb_binary_control()) {
            let bytes = msg.encode_binary().unwrap();
            let decoded = crate::BinaryMessage::decode(bytes).unwrap();
            prop_assert_eq!(decoded, crate::BinaryMessage::Control(msg));
        }

        #[test]
        fn never_panics_on_mutated_messages(msg in arb_binary_control(), at in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = msg.encode_binary().unwrap().to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = crate::BinaryMessage::decode(Bytes::from(bytes));
        }

        #[test]
        fn never_panics_on_garbage(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Control::decode_binary(1, &payload);
        }

        #[test]
        fn data_frames_are_not_control_messages(stream: u32, end: bool, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = DataFrame::encode(stream, end, &payload);
            let decoded = crate::BinaryMessage::decode(bytes).unwrap();
            prop_assert_eq!(decoded, crate::BinaryMessage::Data(DataFrame { stream, end, payload: Bytes::from(payload) }));
        }
    }
}
