//! A caller's request as the public handlers take it, read by hyper or by the relay's own
//! HTTP/1 path (`http1`): the same handler serves both.

use std::error::Error as _;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use ferry_protocol::HeaderList;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderMap, Method, Request, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::headers::{request_header_list, Forwarded};
use crate::http1::WireHeaders;

/// A caller's request.
#[derive(Debug)]
pub(crate) struct CallerRequest {
    /// Everything but the body.
    pub(crate) head: CallerHead,
    /// The body.
    pub(crate) body: CallerBody,
}

/// A caller's request line and header lines.
#[derive(Debug)]
pub(crate) struct CallerHead {
    /// The method.
    pub(crate) method: Method,
    /// The HTTP version it came in.
    pub(crate) version: Version,
    /// Path and query, as sent (`/session/rest?query`).
    pub(crate) target: PathAndQuery,
    /// The header lines.
    pub(crate) headers: CallerHeaders,
}

impl CallerRequest {
    /// A request hyper read.
    pub(crate) fn from_hyper(request: Request<Incoming>) -> Self {
        let (parts, body) = request.into_parts();
        let mut uri = parts.uri.into_parts();
        CallerRequest {
            head: CallerHead {
                method: parts.method,
                version: parts.version,
                target: uri
                    .path_and_query
                    .take()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
                headers: CallerHeaders::Map {
                    map: parts.headers,
                    authority: uri.authority,
                },
            },
            body: CallerBody::Streaming(body),
        }
    }
}

/// A request's header lines, as the server that read them keeps them.
#[derive(Debug)]
pub(crate) enum CallerHeaders {
    /// Read by hyper: names lowered and grouped; `authority` is the URI's (HTTP/2's
    /// `:authority`, or an absolute-form target's).
    Map {
        map: HeaderMap,
        authority: Option<Authority>,
    },
    /// Read by the relay's own HTTP/1 path: as they were on the wire.
    Wire(WireHeaders),
}

impl CallerHeaders {
    /// The `Content-Length` the caller declared, if any.
    pub(crate) fn content_length(&self) -> Option<u64> {
        match self {
            CallerHeaders::Map { map, .. } => map
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
            CallerHeaders::Wire(wire) => wire.content_length(),
        }
    }

    /// The headers sent on to the client for a caller at `peer` reaching the relay over
    /// `proto` on `session`'s URL: end-to-end ones plus `X-Forwarded-*`
    /// (`headers::request_header_list`).
    pub(crate) fn forwarded(&self, peer: SocketAddr, proto: &str, session: &str) -> HeaderList {
        let fwd = Forwarded {
            peer,
            proto,
            host: self.host(),
            session,
        };
        match self {
            CallerHeaders::Map { map, .. } => {
                let pairs = || {
                    map.iter()
                        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
                };
                request_header_list(pairs, map.len(), &fwd)
            }
            CallerHeaders::Wire(wire) => request_header_list(|| wire.iter(), wire.len(), &fwd),
        }
    }

    /// The host the caller asked for: its `Host` header, or the URI's authority.
    fn host(&self) -> Option<&[u8]> {
        match self {
            CallerHeaders::Map { map, authority } => map
                .get(header::HOST)
                .map(|h| h.as_bytes())
                .or_else(|| authority.as_ref().map(|a| a.as_str().as_bytes())),
            CallerHeaders::Wire(wire) => wire
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(b"host"))
                .map(|(_, value)| value),
        }
    }
}

/// A caller's body: streamed by hyper, or read whole with its head by the relay's own HTTP/1
/// path.
#[derive(Debug)]
pub(crate) enum CallerBody {
    /// Streaming from a connection hyper serves.
    Streaming(Incoming),
    /// Read whole; `None` once taken, or when the request had no body.
    Whole(Option<Bytes>),
}

impl CallerBody {
    /// A body read whole; an empty one is no body at all.
    pub(crate) fn whole(bytes: Bytes) -> Self {
        CallerBody::Whole((!bytes.is_empty()).then_some(bytes))
    }
}

/// Why a caller's streamed body could not be read, in words the caller can act on: hyper's own
/// message ("error reading a body from connection") leaves out the cause.
#[derive(Debug)]
pub(crate) struct CallerBodyError(hyper::Error);

impl fmt::Display for CallerBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = None;
        let mut next = self.0.source();
        while let Some(inner) = next {
            cause = Some(inner);
            next = inner.source();
        }
        let io = cause.and_then(|c| c.downcast_ref::<std::io::Error>());
        match (io.map(std::io::Error::kind), cause) {
            (Some(std::io::ErrorKind::UnexpectedEof), _) => {
                f.write_str("the connection closed before the whole body arrived")
            }
            (Some(std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData), Some(c)) => {
                write!(
                    f,
                    "malformed chunked body: {}",
                    lowercase_first(&c.to_string())
                )
            }
            (_, Some(c)) => write!(f, "cannot read the request body: {c}"),
            (_, None) => write!(f, "cannot read the request body: {}", self.0),
        }
    }
}

impl std::error::Error for CallerBodyError {}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = CallerBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, CallerBodyError>>> {
        match self.get_mut() {
            CallerBody::Streaming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map_err(CallerBodyError))),
            CallerBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CallerBody::Streaming(body) => body.is_end_stream(),
            CallerBody::Whole(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            CallerBody::Streaming(body) => body.size_hint(),
            CallerBody::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
