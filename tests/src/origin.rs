//! A local HTTP origin (the "local app" behind the tunnel) that records what
//! it receives and answers according to a [`Behaviour`].
//!
//! Request bodies are always read as a stream and hashed chunk by chunk; only
//! bodies up to [`MAX_RECORDED_BODY`] are kept, so multi-hundred-MiB uploads
//! cost little memory.

use std::fmt;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{full_body, hex, ChannelBody, TestBody, WAIT_TIMEOUT};

/// Bodies up to this many bytes are kept in [`Recorded::body`].
pub const MAX_RECORDED_BODY: usize = 1024 * 1024;

/// Capacity of the channel behind [`Origin::next_request`]. If more requests
/// than this are left unconsumed, later ones are only in [`Origin::requests`].
pub const CHANNEL_CAPACITY: usize = 1024;

/// Size of the chunks a [`Behaviour::LargeBody`] response is streamed in.
const PATTERN_CHUNK: usize = 64 * 1024;
/// Period of the deterministic pattern (prime, so offsets errors show).
const PATTERN_PERIOD: usize = 251;

/// One request as the origin received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The method, e.g. `POST`.
    pub method: String,
    /// The request target exactly as received (`req.uri().to_string()`;
    /// path and query for origin-form).
    pub uri: String,
    /// The HTTP version of the request.
    pub version: Version,
    /// Header fields in `HeaderMap` iteration order, duplicates kept, names
    /// lower-case, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Trailer fields, if the body carried any.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Number of body bytes read.
    pub body_len: u64,
    /// SHA-256 of the body bytes read.
    pub body_sha256: [u8; 32],
    /// [`Self::body_sha256`] as lower-case hex.
    pub body_sha256_hex: String,
    /// The body itself, if it was read completely and is at most
    /// [`MAX_RECORDED_BODY`] bytes.
    pub body: Option<Bytes>,
    /// Whether the body was read to its end without error. `false` for heads
    /// recorded by [`Behaviour::Hang`] and [`Behaviour::Close`] (recorded
    /// before the body is read) and for bodies that broke off.
    pub body_complete: bool,
    /// Index (from 0) of the TCP connection the request arrived on, in accept
    /// order; equal values mean the connection was reused.
    pub connection: u64,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of header `name` as UTF-8, if present and valid.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// A canned response for [`Behaviour::Fixed`].
#[derive(Clone, Debug)]
pub struct FixedResponse {
    /// The status code.
    pub status: StatusCode,
    /// Header fields, in order, duplicates allowed (each is appended).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body (sent with a `Content-Length`, unless `headers` say otherwise).
    pub body: Bytes,
}

impl FixedResponse {
    /// A response with `status` and `body` and no extra headers. Panics if
    /// `status` is not a valid status code.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("valid status code"),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds (appends) a header field.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    fn to_response(&self) -> Response<TestBody> {
        let mut resp = Response::new(full_body(self.body.clone()));
        *resp.status_mut() = self.status;
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .unwrap_or_else(|e| panic!("FixedResponse: bad header name {name:?}: {e}"));
            let value = HeaderValue::from_bytes(value)
                .unwrap_or_else(|e| panic!("FixedResponse: bad value for {name}: {e}"));
            resp.headers_mut().append(name, value);
        }
        resp
    }
}

/// Pacing control for [`Behaviour::SlowReader`]: the origin takes one permit
/// from the semaphore before each read of a request-body chunk, so the test
/// decides how much of a body gets read, and can watch how much has been.
///
/// Clones share the same semaphore and counters.
#[derive(Clone, Debug)]
pub struct ReadGate {
    permits: Arc<Semaphore>,
    read: Arc<watch::Sender<u64>>,
    chunks: Arc<AtomicU64>,
    /// Reads that have asked the gate for a permit (waiting or through).
    asked: Arc<watch::Sender<u64>>,
}

impl Default for ReadGate {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadGate {
    /// A closed gate: no chunk may be read until [`Self::allow`] or
    /// [`Self::open`].
    pub fn new() -> Self {
        Self::with_semaphore(Arc::new(Semaphore::new(0)))
    }

    /// A gate over a semaphore the test already holds.
    pub fn with_semaphore(permits: Arc<Semaphore>) -> Self {
        Self {
            permits,
            read: Arc::new(watch::channel(0).0),
            chunks: Arc::new(AtomicU64::new(0)),
            asked: Arc::new(watch::channel(0).0),
        }
    }

    /// The semaphore: each permit added lets the origin perform one more
    /// read of the request body. (Reads that find the end of the body count
    /// too, except when a `Content-Length` body is known to be complete.)
    pub fn semaphore(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// Lets `chunks` more reads happen.
    pub fn allow(&self, chunks: usize) {
        self.permits.add_permits(chunks);
    }

    /// Removes the limit for good: reads proceed at full speed (the
    /// semaphore is closed).
    pub fn open(&self) {
        self.permits.close();
    }

    /// Body bytes read so far, over all requests through this gate.
    pub fn bytes_read(&self) -> u64 {
        *self.read.borrow()
    }

    /// Body chunks read so far, over all requests through this gate.
    pub fn chunks_read(&self) -> u64 {
        self.chunks.load(Ordering::SeqCst)
    }

    /// Waits until at least `at_least` body bytes have been read and returns
    /// the count; panics after [`WAIT_TIMEOUT`].
    pub async fn wait_bytes_read(&self, at_least: u64) -> u64 {
        let mut rx = self.read.subscribe();
        let waited = tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|n| *n >= at_least))
            .await
            .map(|res| res.map(|n| *n));
        match waited {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => unreachable!("the gate holds the sender"),
            Err(_) => panic!(
                "ReadGate: only {} of {at_least} body bytes read within {WAIT_TIMEOUT:?}",
                self.bytes_read()
            ),
        }
    }

    /// Waits until at least `at_least` reads have asked the gate for a permit (so, with a
    /// closed gate and one read per body, that many requests are held at the gate at once);
    /// panics after [`WAIT_TIMEOUT`].
    pub async fn wait_reads_asked(&self, at_least: u64) {
        let mut rx = self.asked.subscribe();
        if tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|n| *n >= at_least))
            .await
            .is_err()
        {
            panic!(
                "ReadGate: only {} of {at_least} reads reached the gate within {WAIT_TIMEOUT:?}",
                *self.asked.borrow()
            );
        }
    }

    async fn acquire(&self) {
        self.asked.send_modify(|n| *n += 1);
        if let Ok(permit) = self.permits.acquire().await {
            permit.forget();
        }
    }

    fn note(&self, n: usize) {
        self.chunks.fetch_add(1, Ordering::SeqCst);
        self.read.send_modify(|total| *total += n as u64);
    }
}

/// Picks a [`Behaviour`] per request from its head; see [`Behaviour::route`].
pub type RouteFn = dyn Fn(&Parts) -> Behaviour + Send + Sync;

/// How an [`Origin`] answers. Except where noted, the request body is read
/// to its end (and the request recorded) before the response is sent.
#[derive(Clone)]
pub enum Behaviour {
    /// `200` with the request body streamed back and headers
    /// `x-origin-method`, `x-origin-uri` and `x-body-sha256`.
    ///
    /// Bodies over [`MAX_RECORDED_BODY`] are not buffered: once that much has
    /// arrived the response starts and the rest of the body is echoed as it
    /// is read. Their hash cannot be known up front, so such responses carry
    /// `x-origin-streamed: 1` instead of `x-body-sha256`; compare with
    /// [`Recorded::body_sha256_hex`] from [`Origin::next_request`].
    Echo,
    /// Always this response.
    Fixed(FixedResponse),
    /// `200`, `content-type: application/octet-stream` and a body of `len`
    /// bytes of [`pattern`], generated and streamed on the fly. With
    /// `chunked` the length is not announced (chunked encoding), otherwise a
    /// `Content-Length` is sent.
    LargeBody {
        /// Body length in bytes.
        len: u64,
        /// Send without `Content-Length`.
        chunked: bool,
    },
    /// Reads the request body at the pace set by the [`ReadGate`], then
    /// answers `200` with `x-body-sha256` and `x-body-len` and an empty body.
    SlowReader(ReadGate),
    /// Records the head as soon as it arrives (`body_complete: false`),
    /// reads and discards the body, and never answers.
    Hang,
    /// Records the head as soon as it arrives (`body_complete: false`) and
    /// closes the connection without answering.
    Close,
    /// Decides per request; build with [`Behaviour::route`].
    Route(Arc<RouteFn>),
}

impl Behaviour {
    /// A behaviour chosen per request by `f` from the request head (method,
    /// URI, headers), e.g. to make `/slow` hang and everything else echo.
    pub fn route(f: impl Fn(&Parts) -> Behaviour + Send + Sync + 'static) -> Self {
        Self::Route(Arc::new(f))
    }

    /// Shorthand for [`Behaviour::Fixed`] with `status` and `body`.
    pub fn fixed(status: u16, body: impl Into<Bytes>) -> Self {
        Self::Fixed(FixedResponse::new(status, body))
    }
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Echo => f.write_str("Echo"),
            Self::Fixed(r) => f.debug_tuple("Fixed").field(r).finish(),
            Self::LargeBody { len, chunked } => f
                .debug_struct("LargeBody")
                .field("len", len)
                .field("chunked", chunked)
                .finish(),
            Self::SlowReader(g) => f.debug_tuple("SlowReader").field(g).finish(),
            Self::Hang => f.write_str("Hang"),
            Self::Close => f.write_str("Close"),
            Self::Route(_) => f.write_str("Route(..)"),
        }
    }
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    log: Mutex<Vec<Recorded>>,
    tx: mpsc::Sender<Recorded>,
    connections: AtomicU64,
}

impl Shared {
    fn record(&self, rec: Recorded) {
        self.log
            .lock()
            .expect("origin log poisoned")
            .push(rec.clone());
        // A full channel only means the test is not consuming it; the log
        // above still has every request.
        let _ = self.tx.try_send(rec);
    }
}

/// A running local HTTP origin on `127.0.0.1`. Dropping it (or
/// [`Origin::shutdown`]) stops the server and closes every connection.
pub struct Origin {
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Recorded>>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin").field("addr", &self.addr).finish()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Origin {
    /// Starts an origin on `127.0.0.1:0` answering with `behaviour`
    /// (HTTP/1.1 with keep-alive; HTTP/2 prior knowledge is accepted too).
    pub async fn start(behaviour: Behaviour) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("origin: local_addr");
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            log: Mutex::new(Vec::new()),
            tx,
            connections: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
        Origin {
            addr,
            shared,
            rx: tokio::sync::Mutex::new(rx),
            cancel,
            task: Some(task),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` followed by `path_and_query` (which should
    /// start with `/`).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// Replaces the behaviour for requests whose head arrives from now on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self
            .shared
            .behaviour
            .lock()
            .expect("origin behaviour poisoned") = behaviour;
    }

    /// Waits for the next recorded request (in recording order) and returns
    /// it; panics if none comes within [`WAIT_TIMEOUT`].
    pub async fn next_request(&self) -> Recorded {
        match self.next_request_within(WAIT_TIMEOUT).await {
            Some(r) => r,
            None => panic!(
                "origin {}: no request arrived within {WAIT_TIMEOUT:?} ({} recorded so far)",
                self.addr,
                self.request_count()
            ),
        }
    }

    /// Waits up to `timeout` for the next recorded request; `None` if none
    /// came (useful to assert that nothing reaches the origin).
    pub async fn next_request_within(&self, timeout: Duration) -> Option<Recorded> {
        let mut rx = self.rx.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next recorded request if one is already waiting.
    pub fn try_next_request(&self) -> Option<Recorded> {
        self.rx.try_lock().ok()?.try_recv().ok()
    }

    /// A snapshot of every request recorded so far, in recording order
    /// (independent of what [`Self::next_request`] consumed).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().expect("origin log poisoned").clone()
    }

    /// How many requests have been recorded so far.
    pub fn request_count(&self) -> usize {
        self.shared.log.lock().expect("origin log poisoned").len()
    }

    /// How many TCP connections have been accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes every connection and waits for the accept
    /// task to finish.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// A `127.0.0.1` address where nothing listens (a port was bound and
    /// released), for "connection refused" tests.
    pub fn refusing_addr() -> SocketAddr {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("refusing_addr: bind 127.0.0.1:0");
        listener.local_addr().expect("refusing_addr: local_addr")
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            res = listener.accept() => match res {
                Ok((stream, _)) => stream,
                // E.g. EMFILE; keep serving the connections we have.
                Err(_) => continue,
            },
        };
        let id = shared.connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve_connection(
            stream,
            shared.clone(),
            cancel.child_token(),
            id,
        ));
    }
}

struct ConnCtx {
    shared: Arc<Shared>,
    /// Cancelled by [`Behaviour::Close`] to drop the connection.
    kill: CancellationToken,
    id: u64,
}

async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    id: u64,
) {
    let _ = stream.set_nodelay(true);
    let kill = CancellationToken::new();
    let ctx = Arc::new(ConnCtx {
        shared,
        kill: kill.clone(),
        id,
    });
    let service = service_fn(move |req| handle(req, ctx.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = cancel.cancelled() => {}
        _ = kill.cancelled() => {}
    }
}

/// Accumulates a request body: hash and length always, bytes while small.
struct BodyAcc {
    hasher: Sha256,
    len: u64,
    buf: Option<BytesMut>,
    trailers: Vec<(String, Vec<u8>)>,
}

impl BodyAcc {
    fn new() -> Self {
        Self {
            hasher: Sha256::new(),
            len: 0,
            buf: Some(BytesMut::new()),
            trailers: Vec::new(),
        }
    }

    /// Whether adding `n` more bytes would exceed [`MAX_RECORDED_BODY`].
    fn would_overflow(&self, n: usize) -> bool {
        self.len + n as u64 > MAX_RECORDED_BODY as u64
    }

    fn push(&mut self, data: &[u8]) {
        if self.would_overflow(data.len()) {
            self.buf = None;
        } else if let Some(buf) = &mut self.buf {
            buf.extend_from_slice(data);
        }
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    fn frame(&mut self, frame: Frame<Bytes>) -> Option<Bytes> {
        match frame.into_data() {
            Ok(data) => {
                self.push(&data);
                Some(data)
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    self.trailers = header_list(&trailers);
                }
                None
            }
        }
    }

    fn finish(self, head: Head, complete: bool) -> Recorded {
        let sha: [u8; 32] = self.hasher.finalize().into();
        Recorded {
            method: head.method,
            uri: head.uri,
            version: head.version,
            headers: head.headers,
            trailers: self.trailers,
            body_len: self.len,
            body_sha256: sha,
            body_sha256_hex: hex(&sha),
            body: if complete {
                self.buf.map(BytesMut::freeze)
            } else {
                None
            },
            body_complete: complete,
            connection: head.connection,
        }
    }
}

struct Head {
    method: String,
    uri: String,
    version: Version,
    headers: Vec<(String, Vec<u8>)>,
    connection: u64,
}

impl Head {
    fn new(parts: &Parts, connection: u64) -> Self {
        Self {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            version: parts.version,
            headers: header_list(&parts.headers),
            connection,
        }
    }

    /// The head alone, recorded before any of the body is read.
    fn incomplete(self) -> Recorded {
        BodyAcc::new().finish(self, false)
    }
}

fn header_list(map: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// Reads `body` to its end (or error), pacing reads with `gate` if given.
async fn read_body(body: &mut Incoming, gate: Option<&ReadGate>) -> (BodyAcc, bool) {
    let mut acc = BodyAcc::new();
    loop {
        if body.is_end_stream() {
            return (acc, true);
        }
        if let Some(gate) = gate {
            gate.acquire().await;
        }
        match body.frame().await {
            None => return (acc, true),
            Some(Err(_)) => return (acc, false),
            Some(Ok(frame)) => {
                if let Some(data) = acc.frame(frame) {
                    if let Some(gate) = gate {
                        gate.note(data.len());
                    }
                }
            }
        }
    }
}

fn status_only(status: StatusCode) -> Response<TestBody> {
    let mut resp = Response::new(crate::empty_body());
    *resp.status_mut() = status;
    resp
}

fn set_header(resp: &mut Response<TestBody>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

async fn handle(
    req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<TestBody>, std::convert::Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut behaviour = ctx
        .shared
        .behaviour
        .lock()
        .expect("origin behaviour poisoned")
        .clone();
    while let Behaviour::Route(f) = &behaviour {
        behaviour = f(&parts);
    }
    let head = Head::new(&parts, ctx.id);
    let shared = &ctx.shared;
    match behaviour {
        Behaviour::Route(_) => unreachable!("routes are resolved above"),
        Behaviour::Echo => Ok(echo(head, body, shared.clone()).await),
        Behaviour::Fixed(fixed) => {
            let (acc, complete) = read_body(&mut body, None).await;
            shared.record(acc.finish(head, complete));
            Ok(fixed.to_response())
        }
        Behaviour::LargeBody { len, chunked } => {
            let (acc, complete) = read_body(&mut body, None).await;
            shared.record(acc.finish(head, complete));
            let mut resp = Response::new(
                PatternBody {
                    offset: 0,
                    remaining: len,
                    chunked,
                }
                .boxed(),
            );
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(resp)
        }
        Behaviour::SlowReader(gate) => {
            let (acc, complete) = read_body(&mut body, Some(&gate)).await;
            let rec = acc.finish(head, complete);
            let mut resp = status_only(StatusCode::OK);
            set_header(&mut resp, "x-body-sha256", &rec.body_sha256_hex);
            set_header(&mut resp, "x-body-len", &rec.body_len.to_string());
            shared.record(rec);
            Ok(resp)
        }
        Behaviour::Hang => {
            shared.record(head.incomplete());
            while let Some(Ok(_)) = body.frame().await {}
            pending().await
        }
        Behaviour::Close => {
            shared.record(head.incomplete());
            ctx.kill.cancel();
            pending().await
        }
    }
}

async fn echo(head: Head, mut body: Incoming, shared: Arc<Shared>) -> Response<TestBody> {
    let method = head.method.clone();
    let uri = head.uri.clone();
    let mut acc = BodyAcc::new();
    // Buffer while the body is small; switch to streaming once it is not.
    let prefix = loop {
        if body.is_end_stream() {
            break None;
        }
        match body.frame().await {
            None => break None,
            Some(Err(_)) => {
                shared.record(acc.finish(head, false));
                return status_only(StatusCode::BAD_REQUEST);
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if acc.would_overflow(data.len()) {
                        let mut prefix = acc.buf.take().unwrap_or_default();
                        prefix.extend_from_slice(data);
                        acc.push(data);
                        break Some(prefix.freeze());
                    }
                }
                acc.frame(frame);
            }
        }
    };

    let mut resp = match prefix {
        None => {
            let rec = acc.finish(head, true);
            let mut resp = Response::new(full_body(rec.body.clone().unwrap_or_default()));
            set_header(&mut resp, "x-body-sha256", &rec.body_sha256_hex);
            shared.record(rec);
            resp
        }
        Some(prefix) => {
            let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(4);
            tokio::spawn(async move {
                let mut acc = acc;
                let mut ok = tx.send(Ok(prefix)).await.is_ok();
                let mut complete = false;
                while ok {
                    match body.frame().await {
                        None => {
                            complete = true;
                            break;
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(Err(io::Error::other(e))).await;
                            break;
                        }
                        Some(Ok(frame)) => {
                            if let Some(data) = acc.frame(frame) {
                                ok = tx.send(Ok(data)).await.is_ok();
                            }
                        }
                    }
                }
                // Record before the response body ends (tx is dropped after).
                shared.record(acc.finish(head, complete));
                drop(tx);
            });
            let mut resp = Response::new(ChannelBody { rx }.boxed());
            set_header(&mut resp, "x-origin-streamed", "1");
            resp
        }
    };
    set_header(&mut resp, "x-origin-method", &method);
    set_header(&mut resp, "x-origin-uri", &uri);
    resp
}

fn pattern_source() -> &'static Bytes {
    static SOURCE: OnceLock<Bytes> = OnceLock::new();
    SOURCE.get_or_init(|| {
        (0..PATTERN_CHUNK + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// `len` bytes of the deterministic pattern used by
/// [`Behaviour::LargeBody`], starting at byte `offset` of the stream (byte
/// `i` of the stream is `i % 251`).
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % PATTERN_PERIOD as u64) as u8)
        .collect()
}

/// SHA-256 (hex) of the first `len` bytes of [`pattern`], computed without
/// holding them in memory.
pub fn pattern_sha256_hex(len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut body = PatternBody {
        offset: 0,
        remaining: len,
        chunked: false,
    };
    while let Some(chunk) = body.next_chunk() {
        hasher.update(&chunk);
    }
    hex(&hasher.finalize())
}

/// Streams [`pattern`] bytes in [`PATTERN_CHUNK`]-sized chunks.
struct PatternBody {
    offset: u64,
    remaining: u64,
    chunked: bool,
}

impl PatternBody {
    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let n = self.remaining.min(PATTERN_CHUNK as u64) as usize;
        let start = (self.offset % PATTERN_PERIOD as u64) as usize;
        self.offset += n as u64;
        self.remaining -= n as u64;
        Some(pattern_source().slice(start..start + n))
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(self.next_chunk().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        !self.chunked && self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.chunked {
            SizeHint::default()
        } else {
            SizeHint::with_exact(self.remaining)
        }
    }
}
