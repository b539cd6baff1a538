//! End-to-end test harness for Ferry.
//!
//! This crate holds the reusable pieces that the end-to-end tests put together
//! around a relay and a client running on loopback:
//!
//! * [`Origin`] — a local HTTP/1.1 server standing in for the user's app. It
//!   records every request it receives (head, body length and SHA-256, and the
//!   body itself when it is small) and answers according to a [`Behaviour`].
//! * [`StallProxy`] — a TCP proxy that can silently stop passing bytes in both
//!   directions without closing anything ([`StallProxy::stall`]), or abort every
//!   connection ([`StallProxy::cut`]), for liveness tests.
//! * Helpers for sending requests ([`http_client`], [`send`], [`try_send`],
//!   [`send_with`]), for building request bodies ([`full_body`],
//!   [`chunked_body`], [`body_channel`]), for hashing ([`sha256_hex`],
//!   [`body_digest`]) and for raw-socket HTTP ([`raw_http`],
//!   [`parse_response`]).
//!
//! Everything binds `127.0.0.1:0` and exposes the address it got. Servers are
//! handles: dropping one stops its tasks and closes its sockets. Nothing here
//! sleeps to synchronise; every wait is bounded by [`WAIT_TIMEOUT`] and panics
//! with a message saying what it was waiting for.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub mod origin;
pub mod proxy;
pub mod tunnel;

pub use origin::{
    pattern, pattern_sha256_hex, Behaviour, FixedResponse, Origin, ReadGate, Recorded,
    CHANNEL_CAPACITY, MAX_RECORDED_BODY,
};
pub use proxy::StallProxy;
pub use tunnel::{client_config, KillableRelay, TestClient, TestRelay, TOKEN};

/// How long any harness wait (next request, N-th connection, raw response…)
/// lasts before it panics.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The request/response body type used by the harness: boxed, `Send + Sync`,
/// with I/O errors.
pub type TestBody = BoxBody<Bytes, io::Error>;

/// The HTTP client returned by [`http_client`].
pub type HttpClient = Client<HttpConnector, TestBody>;

/// The sending half of a [`body_channel`]: each `Ok` is one chunk of the body,
/// an `Err` aborts the body with that error, dropping the sender ends it.
pub type BodySender = mpsc::Sender<Result<Bytes, io::Error>>;

/// Lower-case hex encoding of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// SHA-256 of `data`, as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A fresh HTTP/1.1 client (`hyper_util` legacy client over a plain
/// [`HttpConnector`]) whose request bodies are [`TestBody`].
///
/// Create one per test (pooled connections are tied to the runtime that made
/// them); reuse it within a test to exercise keep-alive.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A body with a known length (hyper sends `Content-Length`).
pub fn full_body(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty body.
pub fn empty_body() -> TestBody {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A body made of `chunks`, with an unknown length, so hyper sends it with
/// `Transfer-Encoding: chunked` (even when `chunks` is empty). Empty chunks
/// are skipped.
pub fn chunked_body(chunks: Vec<Bytes>) -> TestBody {
    ChunkedBody {
        chunks: chunks.into(),
    }
    .boxed()
}

/// A streamed body of unknown length fed by the returned [`BodySender`];
/// `capacity` is how many chunks may wait in the channel. The body ends when
/// the sender is dropped.
pub fn body_channel(capacity: usize) -> (BodySender, TestBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody { rx }.boxed())
}

/// Reads `body` to its end, hashing as it goes without buffering it, and
/// returns its length and SHA-256 (hex).
pub async fn body_digest<B>(body: B) -> anyhow::Result<(u64, String)>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow::anyhow!(e.into()))?;
        if let Some(data) = frame.data_ref() {
            hasher.update(data);
            len += data.len() as u64;
        }
    }
    Ok((len, hex(&hasher.finalize())))
}

/// Sends one request with a fresh [`http_client`] and collects the response.
/// Panics (with the URL and the error) if the request fails.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    match try_send(method.clone(), url, headers, full_body(body)).await {
        Ok(r) => r,
        Err(e) => panic!("harness send {method} {url} failed: {e:#}"),
    }
}

/// Like [`send`] but with any body (e.g. [`chunked_body`]) and returning the
/// error instead of panicking.
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    send_with(&http_client(), method, url, headers, body).await
}

/// Sends one request on `client` (so connections can be reused) and collects
/// the whole response body.
pub async fn send_with(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(body).context("building request")?;
    let resp = client.request(req).await.context("sending request")?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .context("reading response body")?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// Writes `request` verbatim on a new TCP connection to `addr`, then reads
/// until the peer closes or one complete final response has been received
/// (interim `1xx` responses other than `101` are skipped; a request starting
/// with `HEAD ` expects no body). Returns every byte read. Panics if that
/// takes longer than [`WAIT_TIMEOUT`] or the connection cannot be made.
///
/// Use [`parse_response`] to pick the result apart.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    raw_exchange(addr, request, true).await
}

/// Like [`raw_http`] but always reads until the peer closes the connection
/// (for pipelining or "connection closed without a response" tests).
pub async fn raw_http_to_eof(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    raw_exchange(addr, request, false).await
}

async fn raw_exchange(addr: SocketAddr, request: &[u8], stop_at_response: bool) -> Vec<u8> {
    let head_request = request.starts_with(b"HEAD ");
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        stream.flush().await?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                // A reset after (part of) a response still counts as the end.
                Err(e) if !out.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
            if stop_at_response && matches!(parse_final(&out, head_request, false), Ok(Some(_))) {
                return Ok(out);
            }
        }
    };
    match tokio::time::timeout(WAIT_TIMEOUT, work).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("raw_http to {addr} failed: {e}"),
        Err(_) => panic!("raw_http to {addr}: no complete response within {WAIT_TIMEOUT:?}"),
    }
}

/// A response parsed by [`parse_response`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// The HTTP version token of the status line, e.g. `HTTP/1.1`.
    pub version: String,
    /// The status code.
    pub status: u16,
    /// The reason phrase (possibly empty).
    pub reason: String,
    /// Header fields in wire order, names lower-cased, values raw and trimmed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, de-chunked if it was chunked.
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body, names lower-cased.
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of header `name` (case-insensitive), in wire order.
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// Parses the first final response in `bytes` (skipping interim `1xx`
/// responses other than `101`), treating the end of `bytes` as the end of the
/// connection. Returns `None` if `bytes` does not hold a complete,
/// well-formed response. For the answer to a `HEAD` request (which has a
/// `Content-Length` but no body) use [`parse_head_response`].
pub fn parse_response(bytes: &[u8]) -> Option<RawResponse> {
    parse_final(bytes, false, true).ok().flatten()
}

/// Like [`parse_response`] for the answer to a `HEAD` request: the body is
/// always empty whatever the framing headers say.
pub fn parse_head_response(bytes: &[u8]) -> Option<RawResponse> {
    parse_final(bytes, true, true).ok().flatten()
}

/// Finds the first final response; `Ok(None)` means "incomplete so far".
fn parse_final(buf: &[u8], head_request: bool, eof: bool) -> Result<Option<RawResponse>, String> {
    let mut pos = 0;
    loop {
        let Some((resp, used)) = parse_one(&buf[pos..], head_request, eof)? else {
            return Ok(None);
        };
        if (100..200).contains(&resp.status) && resp.status != 101 {
            pos += used;
            continue;
        }
        return Ok(Some(resp));
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn parse_fields(block: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line.iter().position(|&b| b == b':').ok_or_else(|| {
            format!(
                "header line without colon: {:?}",
                String::from_utf8_lossy(line)
            )
        })?;
        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
        out.push((name, trim(&line[colon + 1..]).to_vec()));
    }
    Ok(out)
}

/// Parses one response at the start of `buf`: `Ok(Some((resp, bytes_used)))`.
fn parse_one(
    buf: &[u8],
    head_request: bool,
    eof: bool,
) -> Result<Option<(RawResponse, usize)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n", 0) else {
        return if eof {
            Err("truncated response head".into())
        } else {
            Ok(None)
        };
    };
    let head = &buf[..head_end];
    let line_end = find(head, b"\r\n", 0).unwrap_or(head.len());
    let status_line = String::from_utf8_lossy(&head[..line_end]).into_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_owned();
    if !version.starts_with("HTTP/") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    let headers = parse_fields(head.get(line_end + 2..).unwrap_or_default())?;
    let mut resp = RawResponse {
        version,
        status,
        reason,
        headers,
        body: Vec::new(),
        trailers: Vec::new(),
    };
    let body_start = head_end + 4;
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Some((resp, body_start)));
    }
    let chunked = resp.header_all("transfer-encoding").iter().any(|v| {
        String::from_utf8_lossy(v)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
    });
    if chunked {
        let mut pos = body_start;
        loop {
            let Some(eol) = find(buf, b"\r\n", pos) else {
                return incomplete(eof);
            };
            let size_field = &buf[pos..eol];
            let size_field = size_field
                .iter()
                .position(|&b| b == b';')
                .map_or(size_field, |i| &size_field[..i]);
            let size_str = String::from_utf8_lossy(trim(size_field)).into_owned();
            let size = usize::from_str_radix(&size_str, 16)
                .map_err(|_| format!("bad chunk size {size_str:?}"))?;
            pos = eol + 2;
            if size == 0 {
                // Trailer section, ended by an empty line.
                let Some(end) = find(buf, b"\r\n", pos) else {
                    return incomplete(eof);
                };
                if end == pos {
                    return Ok(Some((resp, pos + 2)));
                }
                let Some(end) = find(buf, b"\r\n\r\n", pos) else {
                    return incomplete(eof);
                };
                resp.trailers = parse_fields(&buf[pos..end])?;
                return Ok(Some((resp, end + 4)));
            }
            if buf.len() < pos + size + 2 {
                return incomplete(eof);
            }
            resp.body.extend_from_slice(&buf[pos..pos + size]);
            if &buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            pos += size + 2;
        }
    }
    if let Some(cl) = resp.header("content-length") {
        let cl: usize = String::from_utf8_lossy(cl)
            .trim()
            .parse()
            .map_err(|_| "bad content-length".to_owned())?;
        if buf.len() < body_start + cl {
            return incomplete(eof);
        }
        resp.body = buf[body_start..body_start + cl].to_vec();
        return Ok(Some((resp, body_start + cl)));
    }
    // Delimited by the end of the connection.
    if eof {
        resp.body = buf[body_start..].to_vec();
        Ok(Some((resp, buf.len())))
    } else {
        Ok(None)
    }
}

fn incomplete<T>(eof: bool) -> Result<Option<T>, String> {
    if eof {
        Err("truncated response body".into())
    } else {
        Ok(None)
    }
}

/// Body of [`chunked_body`]: known chunks, unknown length.
struct ChunkedBody {
    chunks: std::collections::VecDeque<Bytes>,
}

impl Body for ChunkedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        while let Some(chunk) = self.chunks.pop_front() {
            if !chunk.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        Poll::Ready(None)
    }
}

/// Body fed by an mpsc channel; unknown length.
pub(crate) struct ChannelBody {
    pub(crate) rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|res| res.map(Frame::data)))
    }
}

/// Runs `check` now and again after every transaction `store` ends, until it finds something;
/// panics after 10 s naming `what`. For writes that land in the background (history records,
/// delivery outcomes): the store's commit signal, not a timer, says when to look again.
pub async fn wait_for_store<T, F, Fut>(
    store: &ferry_relay::store::Store,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let mut commits = store.commits();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        commits.borrow_and_update();
        if let Some(found) = check().await {
            return found;
        }
        tokio::time::timeout_at(deadline, commits.changed())
            .await
            .unwrap_or_else(|_| panic!("{what}: not in the store within 10 s"))
            .expect("the store's writer stopped");
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nA: 1\r\nA: 2\r\n\r\nabc")
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"abc");
        assert_eq!(r.header_all("a"), vec![&b"1"[..], &b"2"[..]]);

        let r = parse_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: v\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"abcde");
        assert_eq!(r.trailers, vec![("t".to_owned(), b"v".to_vec())]);

        assert!(parse_final(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab",
            false,
            false
        )
        .unwrap()
        .is_none());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab").is_none());
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nuntil eof").unwrap();
        assert_eq!(r.body, b"until eof");
    }

    #[test]
    fn hex_and_sha() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
