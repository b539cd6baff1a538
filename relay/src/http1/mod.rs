//! The relay's own HTTP/1.1 server for the requests it sees most: a plain webhook to a session
//! URL, its head and a body of known, modest length. Everything else on a connection (HTTP/2,
//! upgrades, `Expect`, HTTP/1.0, chunked or long bodies, the relay's API) is handed to hyper with
//! the bytes read so far, and hyper serves the connection from then on. Bad input this path
//! reads (a malformed or overlong head, a broken `Content-Length`, a missing `Host`) is refused
//! here, with a body naming the problem where hyper would send an empty one ([`Refusal`]).
//!
//! Why: hyper's general machinery (its dispatcher, buffers and encoder) was about a fifth of
//! the relay's instructions per webhook (docs/BENCHMARKS.md, finding 34). Here one task reads a
//! request whole, awaits the public handler while watching for the caller hanging up, writes
//! the answer (head and first piece of body in one write) and reads the next. Header lines stay
//! slices of the head as it came ([`WireHeaders`]); no `HeaderMap` is built for them.

mod date;
mod refusal;
mod request;
mod response;
mod rewind;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

pub(crate) use refusal::{host_rule, Refusal};
pub(crate) use request::WireHeaders;
pub(crate) use rewind::Rewind;

use request::{take_request, Taken};

use crate::Relay;

/// How long a caller has to send a request's head, counted from when the connection became
/// ready for it (hyper's `header_read_timeout`, the same value); and, once the head is in, the
/// longest wait for the next piece of its body (then `408`).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest head read (hyper's `max_buf_size`, the same value): a longer one is refused with
/// `431`, or `414` while its request line has not ended.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// First size of a connection's read buffer (hyper's too).
const INITIAL_BUFFER: usize = 8 * 1024;

/// What became of a connection.
pub(crate) enum Served<S> {
    /// It is finished: closed by either side, timed out, or the relay is shutting down.
    Closed,
    /// hyper is to serve it from here, reading what was read already first.
    Handoff(Rewind<S>),
}

/// Serves plain requests on `io` until the connection ends or carries something for hyper.
pub(crate) async fn serve<S>(mut io: S, relay: &Arc<Relay>, peer: SocketAddr) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let mut head = Vec::new();
    let head_deadline = tokio::time::sleep(HEAD_TIMEOUT);
    tokio::pin!(head_deadline);
    loop {
        head_deadline.as_mut().reset(Instant::now() + HEAD_TIMEOUT);
        // The whole request's length once its head is in: until then the head is not parsed
        // again for every piece of the body.
        let mut whole = None;
        let plain = loop {
            if whole.is_none_or(|total| buf.len() >= total) {
                match take_request(&mut buf) {
                    Taken::Request(plain) => break plain,
                    Taken::Head if buf.len() < MAX_HEAD => {}
                    Taken::Head => {
                        return refuse(io, Refusal::head_too_long(&buf), &mut head).await
                    }
                    Taken::Refuse(refusal) => return refuse(io, refusal, &mut head).await,
                    Taken::Handoff => return Served::Handoff(Rewind::new(io, buf.freeze())),
                    Taken::Body { total } => {
                        whole = Some(total);
                        head_deadline.as_mut().reset(Instant::now() + HEAD_TIMEOUT);
                    }
                }
            }
            match whole {
                Some(total) => buf.reserve(total.saturating_sub(buf.len())),
                None if buf.capacity() == 0 => buf.reserve(INITIAL_BUFFER),
                None => buf.reserve(1024),
            }
            let read = tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => read,
                // A head that takes too long ends the connection without an answer, as in hyper;
                // a body that stops arriving is answered.
                _ = &mut head_deadline => return match whole {
                    None => Served::Closed,
                    Some(_) => refuse(io, Refusal::BODY_STALLED, &mut head).await,
                },
                _ = relay.shutdown.cancelled(), if buf.is_empty() => return Served::Closed,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Served::Closed;
            }
            if whole.is_some() {
                // The body has HEAD_TIMEOUT from each piece to the next.
                head_deadline.as_mut().reset(Instant::now() + HEAD_TIMEOUT);
            }
        };
        let method = plain.request.head.method.clone();
        let close = plain.close;
        let answer = crate::public::forward(relay.clone(), plain.request, peer);
        // Boxed: the handler's state stays out of this connection's future.
        let mut answer = Box::pin(answer);
        let response = loop {
            tokio::select! {
                biased;
                response = &mut answer => break response,
                // A caller that hangs up cancels its exchange, as with hyper. As hyper, this
                // reads only while nothing is buffered: requests pipelined behind this one are
                // answered first, even when the caller has closed its side after them.
                read = io.read_buf(&mut buf), if buf.is_empty() => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return Served::Closed;
                    }
                }
            }
        };
        drop(answer);
        let close = close || relay.shutdown.is_cancelled();
        match response::write(&mut io, response, &method, close, &mut head).await {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = io.shutdown().await;
                return Served::Closed;
            }
        }
    }
}

/// Answers bad input with `refusal` and closes the connection, as hyper does after a refusal.
async fn refuse<S>(mut io: S, refusal: Refusal, scratch: &mut Vec<u8>) -> Served<S>
where
    S: AsyncWrite + Unpin,
{
    let answer = refusal.response();
    if response::write(&mut io, answer, &http::Method::POST, true, scratch)
        .await
        .is_ok()
    {
        let _ = io.shutdown().await;
    }
    Served::Closed
}
