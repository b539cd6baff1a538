//! Taking one plain request, head and body, off the front of a connection's buffer.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

use super::body::CallerBody;

/// Most header lines read (hyper's limit too: more is handed to it, and it answers `431`).
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
    /// relay's own `/_ferry` paths, malformed input). The buffer is as it was.
    Handoff,
    /// A request, split off the buffer.
    Request(Box<Plain>),
}

/// A plain request and what its connection needs to know of it.
#[derive(Debug)]
pub(super) struct Plain {
    /// The request as the public handler takes it.
    pub(super) request: Request<CallerBody>,
    /// It asked for the connection to close after the answer (`Connection: close`).
    pub(super) close: bool,
}

/// Where one header line's name and value sit in the buffer.
#[derive(Clone, Copy)]
pub(super) struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// Takes one whole request off the front of `buf`, or says why not. Heads are parsed by
/// `httparse`, the parser hyper uses, and built into the same `http` types hyper builds, so a
/// handler cannot tell which of the two read a request. `spans` is room the connection keeps
/// for the header lines' places (nothing per request is zeroed or allocated for them).
pub(super) fn take_request(buf: &mut BytesMut, spans: &mut Vec<Span>) -> Taken {
    if buf.is_empty() {
        return Taken::Head;
    }
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_len = match parsed.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Taken::Head,
        Err(_) => return Taken::Handoff,
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
    let base = buf.as_ptr() as usize;
    let span_of = |bytes: &[u8]| (bytes.as_ptr() as usize - base, bytes.len());
    let target = span_of(target.as_bytes());
    spans.clear();
    let mut content_length = None;
    let mut close = false;
    for header in parsed.headers.iter() {
        let name = header.name.as_bytes();
        match special(name) {
            Special::None => {}
            Special::HandOff => return Taken::Handoff,
            Special::ContentLength => match (content_length, parse_length(header.value)) {
                (None, Some(length)) => content_length = Some(length),
                _ => return Taken::Handoff,
            },
            Special::Connection => match connection_close(header.value) {
                Some(listed_close) => close |= listed_close,
                None => return Taken::Handoff,
            },
        }
        spans.push(Span {
            name: span_of(name),
            value: span_of(header.value),
        });
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
    let head = buf.split_to(head_len).freeze();
    let body = buf.split_to(body_len).freeze();
    match build(&head, method, target, spans) {
        Some(parts) => Taken::Request(Box::new(Plain {
            request: Request::from_parts(parts, CallerBody::whole(body)),
            close,
        })),
        None => {
            // Something `http` refuses that `httparse` let through: put the bytes back for
            // hyper to answer (this copies, and only ever happens to malformed requests).
            let mut restored = BytesMut::with_capacity(head.len() + body.len() + buf.len());
            restored.extend_from_slice(&head);
            restored.extend_from_slice(&body);
            restored.extend_from_slice(buf);
            *buf = restored;
            Taken::Handoff
        }
    }
}

/// Builds the request head out of `head`'s bytes: values are slices of it, not copies.
fn build(
    head: &Bytes,
    method: Method,
    target: (usize, usize),
    spans: &[Span],
) -> Option<http::request::Parts> {
    let slice = |(start, len): (usize, usize)| head.slice(start..start + len);
    let uri = Uri::from_maybe_shared(slice(target)).ok()?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for span in spans {
        let (start, len) = span.name;
        let name = HeaderName::from_bytes(&head[start..start + len]).ok()?;
        let value = HeaderValue::from_maybe_shared(slice(span.value)).ok()?;
        headers.append(name, value);
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Some(parts)
}

/// Header names that decide how a request is read.
enum Special {
    None,
    ContentLength,
    Connection,
    /// `Transfer-Encoding`, `Expect` or `Upgrade`: hyper's to handle.
    HandOff,
}

fn special(name: &[u8]) -> Special {
    // Only names of these lengths can be special: one comparison for most headers.
    match name.len() {
        14 if name.eq_ignore_ascii_case(b"content-length") => Special::ContentLength,
        10 if name.eq_ignore_ascii_case(b"connection") => Special::Connection,
        17 if name.eq_ignore_ascii_case(b"transfer-encoding") => Special::HandOff,
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
