//! HTTP/1.1 with the local app, as bytes: the request head the client writes, the response head
//! it reads, and the framing of bodies both ways. No I/O here; `app.rs` moves the bytes.
//!
//! The client speaks to one app, over connections it opened itself, to forward requests the
//! relay has already parsed. Writing the head straight from the tunnel's header list and parsing
//! the answer with `httparse` straight into one costs a fraction of what building `http` types
//! for hyper's client and taking them apart again did (docs/BENCHMARKS.md, finding 29).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferry_protocol::{is_hop_by_hop, HeaderList};

/// Largest response head taken from the app: status line and headers.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields taken in one response head.
pub(crate) const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (extensions included) or trailer line taken.
const MAX_LINE: usize = 4096;
/// Most trailer bytes taken (and dropped: trailers are not carried) after a chunked body.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// What the app sent that is not HTTP/1 Ferry can pass on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResponseError {
    /// The status line or a header is malformed.
    #[error("malformed response head from the app: {0}")]
    Malformed(&'static str),
    /// The head did not end within [`MAX_HEAD_BYTES`].
    #[error("the app's response head is larger than {} KiB", MAX_HEAD_BYTES / 1024)]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("the app's response has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// The answer is a TLS record (an alert, say): the app serves HTTPS on a plain target.
    #[error("the app answered in TLS: if it serves HTTPS, use an https:// target")]
    Tls,
    /// `101 Switching Protocols`: the tunnel carries HTTP exchanges only.
    #[error("the app switched protocols (101), which ferry does not forward")]
    SwitchedProtocols,
    /// `Content-Length` is not one decimal number.
    #[error("the app's response has an invalid content-length")]
    BadContentLength,
    /// A chunked body broke its framing.
    #[error("malformed chunked body from the app: {0}")]
    BadChunk(&'static str),
}

/// How a request's body goes to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body.
    None,
    /// Exactly this many bytes, as announced by `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`: the length was not announced.
    Chunked,
}

/// Writes the head of a request for the app into `out` and says how its body must follow.
///
/// `path` is the origin-form target, already checked (`Target::path_for`); `host` replaces the
/// caller's `Host`. Connection-specific headers are dropped; everything else goes in the order
/// given, names and value bytes unchanged. A head the relay should never have sent (a name that
/// is not a token, a value with a line break, a body announced longer than it can be) is refused
/// with what was wrong, so nothing can be smuggled into the app's connection.
pub(crate) fn write_request_head(
    out: &mut BytesMut,
    method: &str,
    path: &str,
    host: &str,
    headers: &HeaderList,
    has_body: bool,
) -> Result<RequestFraming, String> {
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err(format!("invalid method {method:?}"));
    }
    out.reserve(method.len() + path.len() + host.len() + 64 + headers.len() * 48);
    out.put_slice(method.as_bytes());
    out.put_u8(b' ');
    out.put_slice(path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\nhost: ");
    out.put_slice(host.as_bytes());
    out.put_slice(b"\r\n");
    let mut length: Option<u64> = None;
    for (name, value) in headers.iter() {
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!("invalid header name {name:?}"));
        }
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case("host") {
            continue;
        }
        if !value.iter().all(|&b| is_value_byte(b)) {
            return Err(format!("invalid value for header {name}"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(value).ok_or_else(|| "invalid content-length".to_owned())?;
            if length.is_some_and(|seen| seen != n) {
                return Err("conflicting content-length values".to_owned());
            }
            length = Some(n);
        }
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    }
    let framing = match (has_body, length) {
        (true, Some(n)) => RequestFraming::Length(n),
        (true, None) => {
            out.put_slice(b"transfer-encoding: chunked\r\n");
            RequestFraming::Chunked
        }
        (false, None | Some(0)) => RequestFraming::None,
        (false, Some(n)) => {
            return Err(format!(
                "content-length {n} announced for a request without a body"
            ))
        }
    };
    out.put_slice(b"\r\n");
    Ok(framing)
}

/// Appends the size line of a chunk of `len` bytes.
pub(crate) fn put_chunk_header(out: &mut BytesMut, len: usize) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = len;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

/// The end of a chunked body: the last chunk and no trailers.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// How a response's body is delimited (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body: an answer to `HEAD`, `204`, `304`.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the app closes the connection.
    UntilClose,
}

/// A complete response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    /// Names in lower case, values and order as sent.
    pub(crate) headers: HeaderList,
    pub(crate) framing: ResponseFraming,
    /// Whether the connection may carry another request once the body has been read.
    pub(crate) keep_alive: bool,
}

/// What the start of a buffer holds.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim `1xx` answer of `len` bytes, to skip.
    Interim { len: usize },
    /// The final head, `len` bytes long.
    Final { head: ResponseHead, len: usize },
}

/// Parses the response head at the start of `buf`, the answer to a `HEAD` request if
/// `head_request`.
pub(crate) fn parse_response_head(buf: &[u8], head_request: bool) -> Result<Parsed, ResponseError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(ResponseError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooManyHeaders),
        // A TLS record header: an alert (21) or handshake (22), version 3.x.
        Err(_) if matches!(buf, [21 | 22, 3, ..]) => return Err(ResponseError::Tls),
        Err(err) => return Err(ResponseError::Malformed(malformed(err))),
    };
    if len > MAX_HEAD_BYTES {
        return Err(ResponseError::HeadTooLarge);
    }
    let status = response.code.unwrap_or(0);
    if !(100..=999).contains(&status) {
        return Err(ResponseError::Malformed("invalid status code"));
    }
    if status == 101 {
        return Err(ResponseError::SwitchedProtocols);
    }
    if status < 200 {
        return Ok(Parsed::Interim { len });
    }
    let http11 = response.version == Some(1);
    let mut headers = HeaderList::with_capacity(response.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked_last = None;
    let mut close = !http11;
    for field in response.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            for part in field.value.split(|&b| b == b',') {
                let n = parse_length(trim(part)).ok_or(ResponseError::BadContentLength)?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(ResponseError::BadContentLength);
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only the last coding counts: chunked must be it for the body to be chunked.
            if let Some(last) = field.value.rsplit(|&b| b == b',').map(trim).next() {
                chunked_last = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let mut tokens = field.value.split(|&b| b == b',').map(trim);
            if tokens.any(|token| token.eq_ignore_ascii_case(b"close")) {
                close = true;
            }
        }
        headers.push_lowercased(name, field.value);
    }
    let framing = if head_request || status == 204 || status == 304 {
        ResponseFraming::Empty
    } else {
        match (chunked_last, length) {
            (Some(true), _) => ResponseFraming::Chunked,
            (Some(false), _) => ResponseFraming::UntilClose,
            (None, Some(n)) => ResponseFraming::Length(n),
            (None, None) => ResponseFraming::UntilClose,
        }
    };
    let keep_alive = !close && framing != ResponseFraming::UntilClose;
    Ok(Parsed::Final {
        head: ResponseHead {
            status,
            headers,
            framing,
            keep_alive,
        },
        len,
    })
}

fn malformed(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Version => "not HTTP/1.x",
        httparse::Error::Token => "invalid token",
        _ => "invalid head",
    }
}

/// What a chunked body's decoder has for the caller.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no more whole pieces: read more into it.
    NeedMore,
    /// The body (trailers included) is over.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Decodes a chunked body from a read buffer, handing out its data as slices of that buffer.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            trailer_bytes: 0,
        }
    }
}

impl ChunkedDecoder {
    /// Takes the next piece from the start of `buf`: data of at most `max` bytes, `NeedMore`
    /// when `buf` ends mid-line, or `Done` after the last chunk and its trailers.
    pub(crate) fn decode(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Chunk, ResponseError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Chunk::NeedMore);
                    };
                    let size = parse_chunk_size(&line)?;
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::NeedMore);
                    }
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len())
                        .min(max);
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Chunk::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ResponseError::BadChunk("no line break after a chunk"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Chunk::NeedMore);
                    };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    } else {
                        self.trailer_bytes += line.len();
                        if self.trailer_bytes > MAX_TRAILER_BYTES {
                            return Err(ResponseError::BadChunk("trailers too large"));
                        }
                    }
                }
                ChunkState::Done => return Ok(Chunk::Done),
            }
        }
    }
}

/// Takes one CRLF-terminated line from the start of `buf`, without its line break.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ResponseError> {
    let Some(newline) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_LINE {
            return Err(ResponseError::BadChunk("line too long"));
        }
        return Ok(None);
    };
    if newline > MAX_LINE {
        return Err(ResponseError::BadChunk("line too long"));
    }
    if newline == 0 || buf[newline - 1] != b'\r' {
        return Err(ResponseError::BadChunk("line not ended by CRLF"));
    }
    let mut line = buf.split_to(newline + 1);
    line.truncate(newline - 1);
    Ok(Some(line))
}

/// The size in a chunk-size line: hex digits, then optional whitespace and extensions.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ResponseError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ResponseError::BadChunk("no chunk size"));
    }
    if digits > 15 {
        return Err(ResponseError::BadChunk("chunk size too large"));
    }
    let mut size = 0u64;
    for &b in &line[..digits] {
        let digit = (b as char).to_digit(16).unwrap_or(0);
        size = size * 16 + u64::from(digit);
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| !is_value_byte(b)) {
        return Err(ResponseError::BadChunk("invalid chunk size line"));
    }
    Ok(size)
}

/// A `Content-Length` value: one or more decimal digits, nothing else.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let end = bytes.len()
        - bytes[start..]
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
    &bytes[start..end]
}

/// A `tchar` of RFC 9110: what a method or a header name is made of.
fn is_token_byte(b: u8) -> bool {
    TOKEN_BYTES[usize::from(b)]
}

/// [`is_token_byte`] for every byte: a lookup per byte of every name written.
static TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    table
};

/// A byte a header value may hold: visible, space, tab or `obs-text`; never CR, LF or NUL.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

#[cfg(test)]
mod tests;
