//! The caller's request body as the public handlers see it.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A caller's body: streamed by hyper, or read whole with its head by the relay's own HTTP/1
/// path ([`super::serve`]).
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

impl Body for CallerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            CallerBody::Streaming(body) => Pin::new(body).poll_frame(cx),
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
