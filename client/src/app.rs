//! Connections to the local app: HTTP/1.1 over TCP (or TLS for an `https://` target,
//! `app/stream.rs`), kept alive and reused.
//!
//! The client writes each request and reads each answer itself (`http1.rs` has the bytes). A
//! forwarding task checks a connection out, writes the request head in one write (with the
//! body, when all of it is there already, as a webhook's usually is), reads the response head,
//! and streams the response body from that same connection. It gives the connection back with
//! [`AppConnections::release`] once the body has been read to its end. There is no task per
//! connection and no channel between the forwarding task and its connection: hyper's client,
//! and before it hyper-util's pool, cost the client more than its own work on each request
//! (docs/BENCHMARKS.md, findings 23 and 29).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::FutureExt;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod stream;

pub(crate) use stream::AppTls;
use stream::{AppRead, AppWrite};

use crate::http1::{
    self, Chunk, ChunkedDecoder, Parsed, RequestFraming, ResponseError, ResponseFraming,
};
use ferry_protocol::HeaderList;

/// Most body bytes sent beside the head in its write, and handed to the tunnel as one piece of
/// an answer's body.
const CHUNK: usize = 64 * 1024;

/// Most bytes of an answer's body read from the app at once: a large answer comes in reads of
/// up to this much (hyper's client read ~276 KB at a time), handed on as pieces of at most
/// [`CHUNK`]. 1 GiB downloads were 5 % faster than with 64 KiB reads (docs/BENCHMARKS.md).
const BODY_READ: usize = 256 * 1024;
/// What one read for a response head asks for.
const HEAD_READ: usize = 8 * 1024;
/// Most pieces (body chunks and chunk lines) in one write of a request body.
const BATCH_PIECES: usize = 48;
/// A write of a request body takes no more pieces once it holds this many bytes.
const BATCH_BYTES: usize = 512 * 1024;

/// Why the app could not be asked, or its answer not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    /// No TCP connection (refused, unresolvable host, timed out).
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    /// Connected, but the TLS handshake of an `https://` target failed.
    #[error("{0}")]
    Tls(String),
    /// The connection failed during the exchange (reset, closed before the answer).
    #[error(transparent)]
    Io(io::Error),
    /// The app's answer is not HTTP/1 Ferry can pass on.
    #[error(transparent)]
    Response(#[from] ResponseError),
    /// The request's own body broke off or did not match its `Content-Length`.
    #[error("request body: {0}")]
    Body(String),
}

impl AppError {
    /// The cause in words, with a hint when the app does not seem to run, or, for a plain
    /// `http://` target (`over_tls` false), seems to speak TLS: an HTTPS server given plain
    /// HTTP resets the connection or closes it without an HTTP answer.
    pub(crate) fn describe(&self, over_tls: bool) -> String {
        match self {
            AppError::Connect(err) => format!("{err} (is the app running?)"),
            AppError::Io(err)
                if !over_tls
                    && matches!(
                        err.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                    ) =>
            {
                format!("{err} (if the app serves HTTPS, use an https:// target)")
            }
            other => other.to_string(),
        }
    }
}

fn closed_early(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the app closed the connection {what}"),
    )
}

/// A request for the app.
pub(crate) struct AppRequest<B> {
    /// The head, as written by [`http1::write_request_head`].
    pub(crate) head: BytesMut,
    /// How the body follows the head.
    pub(crate) framing: RequestFraming,
    /// The body; not read when `framing` is [`RequestFraming::None`].
    pub(crate) body: B,
    /// A `HEAD` request: its answer has no body, whatever its head announces.
    pub(crate) head_request: bool,
}

/// The app's answer: its head, and its body still on the connection.
pub(crate) struct AppResponse {
    pub(crate) status: u16,
    /// Names in lower case; order, duplicates and value bytes as the app sent them.
    pub(crate) headers: HeaderList,
    pub(crate) body: AppResponseBody,
}

/// One connection to the app, and what has been read from it but not used yet. Split in two
/// halves from the start, so that a request body can go on being written while the answer is
/// read (an app may answer before it has read the whole body, or echo it as it comes).
pub(crate) struct AppConnection {
    read: AppRead,
    write: AppWrite,
    read_buf: BytesMut,
}

/// The rest of a request body, still being written when the answer began; it gives the write
/// half back when done.
type Upload = Pin<Box<dyn Future<Output = (Result<(), AppError>, AppWrite)> + Send>>;

impl AppConnection {
    /// Whether the app has not closed the connection (nor sent anything unasked) while it sat
    /// idle ([`AppRead::still_open`]).
    fn still_open(&self) -> bool {
        self.read.still_open()
    }

    /// Reads the response head, writing the rest of the request body (if any) meanwhile; what
    /// is left of the body when the head is in goes on being written beside the answer's body.
    async fn answer<B>(
        self,
        mut body: BodyWriter<B>,
        head_request: bool,
    ) -> Result<AppResponse, AppError>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let AppConnection {
            mut read,
            write,
            mut read_buf,
        } = self;
        let mut write = Some(write);
        let mut upload = None;
        let head = if body.done {
            read_head(&mut read, &mut read_buf, head_request).await?
        } else {
            let mut half = write.take().expect("the write half is here");
            let pending: Upload = Box::pin(async move {
                let written = body.write_rest(&mut half).await;
                (written, half)
            });
            let reading = std::pin::pin!(read_head(&mut read, &mut read_buf, head_request));
            match futures_util::future::select(reading, pending).await {
                Either::Left((head, pending)) => {
                    upload = Some(pending);
                    head?
                }
                Either::Right(((Ok(()), half), reading)) => {
                    write = Some(half);
                    reading.await?
                }
                // The app stopped reading: its answer may still be whole (a 413, say). The
                // connection is not reused (no write half comes back).
                Either::Right(((Err(AppError::Io(err)), _), reading)) => {
                    reading.await.map_err(|_| AppError::Io(err))?
                }
                Either::Right(((Err(err), _), _)) => return Err(err),
            }
        };
        let state = match head.framing {
            ResponseFraming::Empty | ResponseFraming::Length(0) => BodyState::Done,
            ResponseFraming::Length(n) => BodyState::Length(n),
            ResponseFraming::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            ResponseFraming::UntilClose => BodyState::UntilClose,
        };
        Ok(AppResponse {
            status: head.status,
            headers: head.headers,
            body: AppResponseBody {
                read: Some(read),
                read_buf,
                write,
                upload,
                state,
                keep_alive: head.keep_alive,
                acknowledged: false,
            },
        })
    }
}

/// Reads until a final response head is complete, skipping interim (`1xx`) answers.
async fn read_head(
    io: &mut AppRead,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<http1::ResponseHead, AppError> {
    loop {
        if !buf.is_empty() {
            match http1::parse_response_head(buf, head_request)? {
                Parsed::Final { head, len } => {
                    buf.advance(len);
                    return Ok(head);
                }
                Parsed::Interim { len } => {
                    buf.advance(len);
                    continue;
                }
                // Part of the head is in: the rest may wait for its acknowledgement.
                Parsed::Partial => io.acknowledge_now(),
            }
        }
        buf.reserve(HEAD_READ);
        if io.read_buf(buf).await.map_err(AppError::Io)? == 0 {
            let what = if buf.is_empty() {
                "without answering"
            } else {
                "in the middle of its response head"
            };
            return Err(AppError::Io(closed_early(what)));
        }
    }
}

/// A request body on its way to the app, framed as its head announced.
struct BodyWriter<B> {
    body: B,
    framing: RequestFraming,
    sent: u64,
    done: bool,
}

impl<B> BodyWriter<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    fn new(body: B, framing: RequestFraming) -> Self {
        BodyWriter {
            body,
            framing,
            sent: 0,
            done: framing == RequestFraming::None || framing == RequestFraming::Length(0),
        }
    }

    /// Appends to `out` what the body has ready right now, up to [`CHUNK`] bytes in all.
    fn take_ready(&mut self, out: &mut BytesMut) -> Result<(), AppError> {
        let mut scratch = BytesMut::new();
        while !self.done && out.len() < CHUNK {
            let Some(next) = self.body.frame().now_or_never() else {
                break;
            };
            self.frame_next(next, &mut scratch, |piece| out.put_slice(&piece))?;
        }
        Ok(())
    }

    /// Writes the rest of the body as it comes: each write takes every piece that is ready
    /// by then (up to [`BATCH_PIECES`] pieces or [`BATCH_BYTES`]), so a fast upload leaves in
    /// few large writes and the app wakes once for many pieces.
    async fn write_rest<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<(), AppError> {
        let mut batch: Vec<Bytes> = Vec::new();
        let mut scratch = BytesMut::new();
        while !self.done {
            let next = self.body.frame().await;
            self.frame_next(next, &mut scratch, |piece| batch.push(piece))?;
            while !self.done
                && batch.len() < BATCH_PIECES
                && batch.iter().map(Bytes::len).sum::<usize>() < BATCH_BYTES
            {
                let Some(next) = self.body.frame().now_or_never() else {
                    break;
                };
                self.frame_next(next, &mut scratch, |piece| batch.push(piece))?;
            }
            write_all_pieces(io, &mut batch)
                .await
                .map_err(AppError::Io)?;
            // Over TLS, what is written may wait in the session until flushed.
            io.flush().await.map_err(AppError::Io)?;
        }
        Ok(())
    }

    /// Hands `emit` what the body's next frame puts on the wire, in order: its data, framed
    /// when chunked (`scratch` holds the chunk lines), and the last chunk once the body ends.
    fn frame_next(
        &mut self,
        next: Option<Result<Frame<Bytes>, B::Error>>,
        scratch: &mut BytesMut,
        mut emit: impl FnMut(Bytes),
    ) -> Result<(), AppError> {
        let chunked = self.framing == RequestFraming::Chunked;
        match self.next_data(next)? {
            Some(data) if chunked => {
                http1::put_chunk_header(scratch, data.len());
                emit(scratch.split().freeze());
                emit(data);
                scratch.put_slice(b"\r\n");
                // The end known now goes with this chunk rather than in a write of its own.
                if self.body.is_end_stream() {
                    scratch.put_slice(http1::LAST_CHUNK);
                    self.done = true;
                }
                emit(scratch.split().freeze());
            }
            Some(data) => emit(data),
            None if self.done && chunked => emit(Bytes::from_static(http1::LAST_CHUNK)),
            None => {}
        }
        Ok(())
    }

    /// The data in the body's next frame, `None` when there was none (a trailers frame, or
    /// the end: then `done`, with the last chunk's bytes still to write when chunked).
    fn next_data(
        &mut self,
        next: Option<Result<Frame<Bytes>, B::Error>>,
    ) -> Result<Option<Bytes>, AppError> {
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(err)) => return Err(AppError::Body(err.to_string())),
            None => {
                if let RequestFraming::Length(n) = self.framing {
                    if self.sent < n {
                        return Err(AppError::Body(format!(
                            "ended after {} of the {n} bytes its content-length announced",
                            self.sent
                        )));
                    }
                }
                self.done = true;
                return Ok(None);
            }
        };
        let Ok(data) = frame.into_data() else {
            return Ok(None); // trailers: not carried
        };
        if data.is_empty() {
            return Ok(None);
        }
        self.sent += data.len() as u64;
        if let RequestFraming::Length(n) = self.framing {
            if self.sent > n {
                return Err(AppError::Body(format!(
                    "longer than the {n} bytes its content-length announced"
                )));
            }
            // Stop at the announced length, as the app does: the end follows right behind.
            self.done = self.sent == n;
        }
        Ok(Some(data))
    }
}

/// Writes every piece of `batch`, in as few writes as the socket takes, and empties it.
async fn write_all_pieces<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<IoSlice<'_>> = batch[first..].iter().map(|b| IoSlice::new(b)).collect();
        let mut written = io.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let piece = &mut batch[first];
            let n = written.min(piece.len());
            piece.advance(n);
            written -= n;
            if piece.is_empty() {
                first += 1;
            }
        }
        while first < batch.len() && batch[first].is_empty() {
            first += 1;
        }
    }
    batch.clear();
    Ok(())
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// A response body, read from the app's connection as it is polled. Each chunk handed out is
/// a slice of the read buffer, at most [`CHUNK`] bytes; a read takes what the socket has, up
/// to [`BODY_READ`], so at most that much is read ahead of the reader.
/// Polling it also drives what is left of the request body's upload.
pub(crate) struct AppResponseBody {
    /// `None` once the connection broke.
    read: Option<AppRead>,
    read_buf: BytesMut,
    /// Back once the request body has been written whole.
    write: Option<AppWrite>,
    upload: Option<Upload>,
    state: BodyState,
    keep_alive: bool,
    /// Whether what arrived was acknowledged at once since the last read found nothing
    /// ([`AppRead::acknowledge_now`]): once per wait, not on every poll.
    acknowledged: bool,
}

impl AppResponseBody {
    /// The connection, if the body was read to its end, the request body was written whole
    /// and the connection may carry another request.
    pub(crate) fn into_reusable(mut self) -> Option<AppConnection> {
        let reusable = self.keep_alive
            && matches!(self.state, BodyState::Done)
            && self.upload.is_none()
            && self.read_buf.is_empty();
        if !reusable {
            return None;
        }
        Some(AppConnection {
            read: self.read.take()?,
            write: self.write.take()?,
            read_buf: std::mem::take(&mut self.read_buf),
        })
    }

    fn poll_upload(&mut self, cx: &mut Context<'_>) {
        if let Some(upload) = self.upload.as_mut() {
            if let Poll::Ready((written, half)) = upload.as_mut().poll(cx) {
                self.upload = None;
                // A failed upload (the app stopped reading) leaves the connection unusable,
                // but the answer may still come whole.
                if written.is_ok() {
                    self.write = Some(half);
                }
            }
        }
    }
}

impl Body for AppResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        this.poll_upload(cx);
        loop {
            let Some(read) = this.read.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut this.read_buf;
            let want = match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !buf.is_empty() {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(buf.len())
                            .min(CHUNK);
                        *left -= n as u64;
                        if *left == 0 {
                            this.state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(buf.split_to(n).freeze()))));
                    }
                    usize::try_from(*left).unwrap_or(BODY_READ).min(BODY_READ)
                }
                BodyState::Chunked(decoder) => match decoder.decode(buf, CHUNK) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Chunk::Done) => {
                        this.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::NeedMore) => BODY_READ,
                    Err(err) => {
                        this.read = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            err,
                        ))));
                    }
                },
                BodyState::UntilClose => {
                    if !buf.is_empty() {
                        let n = buf.len().min(CHUNK);
                        return Poll::Ready(Some(Ok(Frame::data(buf.split_to(n).freeze()))));
                    }
                    BODY_READ
                }
            };
            // What is left of the last allocation is used up first: reserving `want` each time
            // would allocate afresh whenever earlier pieces are still in flight.
            if buf.capacity() - buf.len() < want.min(CHUNK) {
                buf.reserve(want);
            }
            let polled = tokio_util::io::poll_read_buf(Pin::new(&mut *read), cx, buf);
            let read = match polled {
                Poll::Ready(read) => {
                    this.acknowledged = false;
                    read
                }
                // The rest of the body may wait for the acknowledgement of what came before.
                Poll::Pending if !this.acknowledged => {
                    read.acknowledge_now();
                    this.acknowledged = true;
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            };
            match read {
                Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                    this.state = BodyState::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.read = None;
                    return Poll::Ready(Some(Err(closed_early(
                        "in the middle of its response body",
                    ))));
                }
                Ok(_) => {}
                Err(err) => {
                    this.read = None;
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

/// An idle connection and since when it has been idle.
struct Idle {
    conn: AppConnection,
    since: Instant,
}

/// The pool of connections to one app (`host:port`), shared by every forwarded request.
pub(crate) struct AppConnections {
    /// `host:port` to connect to.
    authority: String,
    /// TLS on each connection, for an `https://` target.
    tls: Option<AppTls>,
    /// Idle connections, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl AppConnections {
    /// A pool for the app at `authority` (`host:port`), over `tls` if given, that keeps at most
    /// `max_idle` idle connections, each for at most `idle_timeout`. Must be called within a
    /// tokio runtime: a task closes connections idle for longer (it ends with the pool).
    pub(crate) fn new(
        authority: String,
        tls: Option<AppTls>,
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(AppConnections {
            authority,
            tls,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
        });
        tokio::spawn(close_idle(Arc::downgrade(&pool), idle_timeout));
        pool
    }

    /// Sends `request` on an idle connection, or on a new one, and reads the response head.
    /// A request an idle connection could not take (the app had closed it) goes out again on
    /// another. The response's body is still on the connection: [`release`](Self::release)
    /// it once read to its end.
    pub(crate) async fn send<B>(&self, request: AppRequest<B>) -> Result<AppResponse, AppError>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let AppRequest {
            mut head,
            framing,
            body,
            head_request,
        } = request;
        let mut body = BodyWriter::new(body, framing);
        body.take_ready(&mut head)?;
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let written = match conn.write.write_all(&head).await {
                Ok(()) => conn.write.flush().await,
                Err(err) => Err(err),
            };
            match written {
                Ok(()) => return conn.answer(body, head_request).await,
                Err(_) if reused => continue, // closed while idle, unnoticed
                Err(err) => return Err(AppError::Io(err)),
            }
        }
    }

    /// Takes back a connection whose last response was read to its end (see
    /// [`AppResponseBody::into_reusable`]).
    pub(crate) fn release(&self, conn: AppConnection) {
        let mut idle = self.idle.lock().expect("app pool lock");
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections right now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().expect("app pool lock").len()
    }

    fn take_idle(&self) -> Option<AppConnection> {
        loop {
            let conn = {
                let mut idle = self.idle.lock().expect("app pool lock");
                let conn = idle.pop()?;
                if conn.since.elapsed() >= self.idle_timeout {
                    // The oldest are first: everything left is older still.
                    idle.clear();
                    return None;
                }
                conn.conn
            };
            if conn.still_open() {
                return Some(conn);
            }
        }
    }

    fn close_expired(&self) {
        let mut idle = self.idle.lock().expect("app pool lock");
        let expired = idle
            .iter()
            .take_while(|conn| conn.since.elapsed() >= self.idle_timeout)
            .count();
        idle.drain(..expired);
        idle.retain(|conn| conn.conn.still_open());
    }

    async fn connect(&self) -> Result<AppConnection, AppError> {
        let opened = async {
            let tcp = TcpStream::connect(self.authority.as_str())
                .await
                .map_err(AppError::Connect)?;
            let _ = tcp.set_nodelay(true);
            stream::split(tcp, self.tls.as_ref()).await
        };
        let (read, write) = tokio::time::timeout(self.connect_timeout, opened)
            .await
            .map_err(|_| {
                AppError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {}s", self.connect_timeout.as_secs()),
                ))
            })??;
        Ok(AppConnection {
            read,
            write,
            read_buf: BytesMut::new(),
        })
    }
}

/// Closes connections idle for longer than `every`, until the pool is gone.
async fn close_idle(pool: Weak<AppConnections>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.close_expired();
    }
}

#[cfg(test)]
mod tests;
