//! Writing an answer on an HTTP/1.1 connection, framed as hyper frames it.

use std::io::{self, IoSlice};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use super::date;
use crate::reply::RelayBody;

/// How the body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body bytes at all (`HEAD`, `204`, `304`, or an empty body).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked: the length is not known ahead.
    Chunked,
}

/// The head of `response` to a request with `method`, and how its body is framed. `close`
/// adds `Connection: close`. The rules are hyper's (`proto::h1::role::Server::encode`), so
/// that answers read the same whichever of the two served the request.
pub(super) fn encode_head(
    response: &Response<RelayBody>,
    method: &Method,
    close: bool,
    out: &mut Vec<u8>,
) -> Framing {
    let status = response.status();
    let body = response.body();
    let head_request = *method == Method::HEAD;
    let no_content = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        || status.is_informational();
    // `None`: no body; `Some(None)`: a body of unknown length.
    let body_length = (!body.is_end_stream()).then(|| body.size_hint().exact());
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut framing = None;
    let mut wrote_date = false;
    for (name, value) in response.headers() {
        match *name {
            header::CONTENT_LENGTH => {
                if framing.is_some() {
                    continue;
                }
                framing = match body_length {
                    None if head_request => Some(Framing::Empty),
                    None => continue,
                    Some(Some(known)) => Some(Framing::Length(known)),
                    Some(None) => match parse_length(value) {
                        Some(length) => Some(Framing::Length(length)),
                        None => continue,
                    },
                };
            }
            // Bodies are framed here; the handlers never set these (they are hop-by-hop).
            header::TRANSFER_ENCODING | header::TRAILER | header::CONNECTION => continue,
            header::DATE => wrote_date = true,
            _ => {}
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let framing = match (framing, body_length) {
        (Some(framing), _) => framing,
        (None, None | Some(Some(0))) => {
            if !no_content && !head_request {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Framing::Empty
        }
        (None, Some(Some(known))) => {
            if !no_content {
                let mut digits = itoa::Buffer::new();
                put_header(out, b"content-length", digits.format(known).as_bytes());
            }
            Framing::Length(known)
        }
        (None, Some(None)) if no_content || head_request => Framing::Empty,
        (None, Some(None)) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if no_content || head_request {
        Framing::Empty
    } else {
        framing
    }
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn parse_length(value: &HeaderValue) -> Option<u64> {
    std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()
}

/// Writes `response` to a request with `method`, its head encoded into `scratch` (room the
/// connection keeps). `Ok(true)` when the connection can carry another request: the whole
/// answer went out as framed and `close` was not asked for.
pub(super) async fn write<S>(
    io: &mut S,
    response: Response<RelayBody>,
    method: &Method,
    close: bool,
    scratch: &mut Vec<u8>,
) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    scratch.clear();
    let framing = encode_head(&response, method, close, scratch);
    // The head until it has gone out (empty after: writing it again writes nothing).
    let mut head: &[u8] = scratch;
    let mut body = response.into_body();
    if framing == Framing::Empty {
        // As hyper does: a body that cannot be sent is dropped unread.
        drop(body);
        write_all(io, &mut [IoSlice::new(head)]).await?;
        io.flush().await?;
        return Ok(!close);
    }
    let mut left = match framing {
        Framing::Length(length) => Some(length),
        _ => None,
    };
    loop {
        // The head waits for the first piece of the body when it is there already: one write.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                write_all(io, &mut [IoSlice::new(std::mem::take(&mut head))]).await?;
                io.flush().await?;
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => return Ok(false),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: not sent, as hyper does without `Trailer`
            },
        };
        if data.is_empty() {
            continue;
        }
        if let Some(left) = &mut left {
            if data.len() as u64 > *left {
                // More than the announced length: hyper fails the connection too.
                return Ok(false);
            }
            *left -= data.len() as u64;
        }
        write_piece(io, std::mem::take(&mut head), data, framing).await?;
    }
    let end: &[u8] = if framing == Framing::Chunked {
        b"0\r\n\r\n"
    } else {
        b""
    };
    write_all(io, &mut [IoSlice::new(head), IoSlice::new(end)]).await?;
    // A body that ended short of its length: the caller must not wait for the rest.
    if matches!(left, Some(left) if left > 0) {
        return Ok(false);
    }
    io.flush().await?;
    Ok(!close)
}

/// One piece of the body, after what is left of the head (nothing once it has gone out).
async fn write_piece<S>(io: &mut S, head: &[u8], data: Bytes, framing: Framing) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    if framing != Framing::Chunked {
        return write_all(io, &mut [IoSlice::new(head), IoSlice::new(&data)]).await;
    }
    let mut size = [0u8; 18];
    let size = chunk_size_line(data.len(), &mut size);
    write_all(
        io,
        &mut [
            IoSlice::new(head),
            IoSlice::new(size),
            IoSlice::new(&data),
            IoSlice::new(b"\r\n"),
        ],
    )
    .await
}

/// `len` in hex followed by CRLF, written into `buf`.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut end = buf.len() - 2;
    buf[end..].copy_from_slice(b"\r\n");
    let mut n = len;
    loop {
        end -= 1;
        buf[end] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &buf[end..]
}

/// Writes every slice, as few writes as the connection allows.
async fn write_all<S>(io: &mut S, mut slices: &mut [IoSlice<'_>]) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let written = io.write_vectored(slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
pub(super) fn chunk_size_line_for_tests(len: usize) -> Vec<u8> {
    chunk_size_line(len, &mut [0; 18]).to_vec()
}
