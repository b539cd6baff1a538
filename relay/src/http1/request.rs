//! Taking one plain request, head and body, off the front of a connection's buffer.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{Method, Version};

use super::refusal::{host_rule, Refusal};
use crate::caller::{CallerBody, CallerHead, CallerHeaders, CallerRequest};

/// Most header lines read (hyper's limit too): more is refused with `431`.
pub(super) const MAX_HEADERS: usize = 100;

/// Largest body read whole here; a longer one is streamed by hyper.
pub(super) const MAX_WHOLE_BODY: usize = 256 * 1024;

/// Longest request target taken here (hyper decides about longer ones).
const MAX_TARGET: usize = 8 * 1024;

/// What the front of the buffer holds.
#[derive(Debug)]
pub(super) enum Taken {
    /// Not all of the head yet.
    Head,
    /// The whole head, but not all of the body: `total` bytes make the request.
    Body { total: usize },
    /// A request for hyper: anything but a plain HTTP/1.1 request to a session with a body of
    /// known, modest length (HTTP/1.0 and 2, upgrades, `Expect`, chunked or long bodies, the
    /// relay's own `/_ferry` paths). The buffer is as it was.
    Handoff,
    /// Bad input, refused here with an answer that names the problem (malformed heads, a
    /// broken `Content-Length`, the `Host` rule).
    Refuse(Refusal),
    /// A request, split off the buffer.
    Request(Box<Plain>),
}

/// A plain request and what its connection needs to know of it.
#[derive(Debug)]
pub(super) struct Plain {
    /// The request as the public handler takes it.
    pub(super) request: CallerRequest,
    /// It asked for the connection to close after the answer (`Connection: close`).
    pub(super) close: bool,
}

/// The header lines of a head this path read, as they were on the wire: slices of the head's
/// bytes, nothing copied or lowered (hyper builds a `HeaderMap`, which the handler would only
/// turn back into a list).
#[derive(Debug)]
pub(crate) struct WireHeaders {
    head: Bytes,
    /// Where each line's name and value are in `head`.
    spans: Vec<Span>,
    content_length: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

impl WireHeaders {
    /// The lines, in order: names as sent (any case; ASCII, as `httparse` checked), values as
    /// sent.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let at = |(start, len): (usize, usize)| &self.head[start..start + len];
        self.spans
            .iter()
            .map(move |span| (at(span.name), at(span.value)))
    }

    /// Number of lines.
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// The declared `Content-Length`.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.content_length
    }
}

/// The start of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4): hyper's to serve.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Takes one whole request off the front of `buf`, or says why not. Heads are parsed by
/// `httparse`, the parser hyper uses, with hyper's limits; input hyper would refuse is refused
/// here with a clearer answer, and what hyper would read differently goes to hyper.
pub(super) fn take_request(buf: &mut BytesMut) -> Taken {
    if buf.is_empty() {
        return Taken::Head;
    }
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len = match parsed.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Taken::Head,
        Err(_) if buf.starts_with(H2_PREFACE) => return Taken::Handoff,
        Err(_) if H2_PREFACE.starts_with(buf) => return Taken::Head,
        Err(error) => return Taken::Refuse(Refusal::malformed(buf, error)),
    };
    let (Some(1), Some(method), Some(target)) = (parsed.version, parsed.method, parsed.path) else {
        return Taken::Handoff;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Taken::Handoff;
    };
    if method == Method::CONNECT
        || !target.starts_with('/')
        || target.starts_with("/_ferry")
        || target.len() > MAX_TARGET
    {
        return Taken::Handoff;
    }
    let mut content_length = None;
    // Several `Content-Length`s, or a list: hyper takes them if they agree.
    let mut lengths_for_hyper = false;
    let mut hosts = 0;
    let mut close = false;
    // Whether the last `Transfer-Encoding` ends in `chunked`, once there is one.
    let mut chunked = None;
    for header in parsed.headers.iter() {
        match special(header.name.as_bytes()) {
            Special::None => {}
            Special::HandOff => return Taken::Handoff,
            Special::Host => hosts += 1,
            Special::TransferEncoding => chunked = Some(ends_in_chunked(header.value)),
            // As hyper: a length after a `Transfer-Encoding` is ignored.
            Special::ContentLength if chunked.is_some() => {}
            Special::ContentLength => match (content_length, parse_length(header.value)) {
                (None, Some(length)) => content_length = Some(length),
                _ => match agreed_length(header.value) {
                    Some(length) if content_length.is_none_or(|first| first == length) => {
                        content_length = Some(length);
                        lengths_for_hyper = true;
                    }
                    _ => return Taken::Refuse(Refusal::BAD_LENGTH),
                },
            },
            Special::Connection => match connection_close(header.value) {
                Some(listed_close) => close |= listed_close,
                None => return Taken::Handoff,
            },
        }
    }
    if let Some(refusal) = host_rule(Version::HTTP_11, hosts) {
        return Taken::Refuse(refusal);
    }
    match chunked {
        Some(true) => return Taken::Handoff,
        Some(false) => return Taken::Refuse(Refusal::NOT_CHUNKED),
        None => {}
    }
    if lengths_for_hyper {
        return Taken::Handoff;
    }
    let body_len = match content_length {
        Some(length) if length > MAX_WHOLE_BODY as u64 => return Taken::Handoff,
        Some(length) => length as usize,
        None => 0,
    };
    let total = head_len + body_len;
    if buf.len() < total {
        return Taken::Body { total };
    }
    let base = buf.as_ptr() as usize;
    let span_of = |bytes: &[u8]| (bytes.as_ptr() as usize - base, bytes.len());
    let target = span_of(target.as_bytes());
    let spans: Vec<Span> = parsed
        .headers
        .iter()
        .map(|header| Span {
            name: span_of(header.name.as_bytes()),
            value: span_of(header.value),
        })
        .collect();
    let head = buf.split_to(head_len).freeze();
    let body = buf.split_to(body_len).freeze();
    let (start, len) = target;
    let Ok(target) = PathAndQuery::from_maybe_shared(head.slice(start..start + len)) else {
        // A target `http` refuses that `httparse` let through: put the bytes back for hyper to
        // answer (this copies, and only ever happens to malformed requests).
        let mut restored = BytesMut::with_capacity(head.len() + body.len() + buf.len());
        restored.extend_from_slice(&head);
        restored.extend_from_slice(&body);
        restored.extend_from_slice(buf);
        *buf = restored;
        return Taken::Handoff;
    };
    Taken::Request(Box::new(Plain {
        request: CallerRequest {
            head: CallerHead {
                method,
                version: Version::HTTP_11,
                target,
                headers: CallerHeaders::Wire(WireHeaders {
                    head,
                    spans,
                    content_length,
                }),
            },
            body: CallerBody::whole(body),
        },
        close,
    }))
}

/// Header names that decide how a request is read.
enum Special {
    None,
    ContentLength,
    Connection,
    Host,
    /// Bodies in chunks are hyper's to read.
    TransferEncoding,
    /// `Expect` or `Upgrade`: hyper's to handle.
    HandOff,
}

fn special(name: &[u8]) -> Special {
    // Only names of these lengths can be special: one comparison for most headers.
    match name.len() {
        14 if name.eq_ignore_ascii_case(b"content-length") => Special::ContentLength,
        10 if name.eq_ignore_ascii_case(b"connection") => Special::Connection,
        4 if name.eq_ignore_ascii_case(b"host") => Special::Host,
        17 if name.eq_ignore_ascii_case(b"transfer-encoding") => Special::TransferEncoding,
        6 if name.eq_ignore_ascii_case(b"expect") => Special::HandOff,
        7 if name.eq_ignore_ascii_case(b"upgrade") => Special::HandOff,
        _ => Special::None,
    }
}

/// A `Content-Length` value: digits only (no sign, no list), as RFC 9110 §8.6 has it.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A `Content-Length` value that is a list of equal numbers (`1, 1`), as hyper accepts it.
fn agreed_length(value: &[u8]) -> Option<u64> {
    let mut agreed = None;
    for item in value.split(|&b| b == b',') {
        let length = parse_length(item.trim_ascii())?;
        if agreed.is_some_and(|first| first != length) {
            return None;
        }
        agreed = Some(length);
    }
    agreed
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`, as a request's must be
/// (RFC 9112 §6.3).
fn ends_in_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a `Connection` value lists `close`; `None` (hand the request to hyper) when it
/// lists `upgrade` or is not text.
fn connection_close(value: &[u8]) -> Option<bool> {
    let value = std::str::from_utf8(value).ok()?;
    let mut close = false;
    for token in value.split(',').map(str::trim) {
        if token.eq_ignore_ascii_case("upgrade") {
            return None;
        }
        close |= token.eq_ignore_ascii_case("close");
    }
    Some(close)
}
