//! History of requests passed straight through: the request and the app's response are copied
//! (up to `--record-max-body`) as they stream by, and written to the store in the background
//! once the exchange is over, so recording never delays an answer.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ferry_mux::BodyTap;
use ferry_protocol::HeaderList;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::{NewRequest, Outcome, RequestState, Response, Store};

/// A copy of a body's first `limit` bytes.
#[derive(Debug)]
pub(crate) struct Capture {
    buf: BytesMut,
    limit: usize,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Self {
        Capture {
            buf: BytesMut::new(),
            limit,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn take(&mut self) -> Bytes {
        std::mem::take(&mut self.buf).freeze()
    }
}

/// A body that copies what passes through it into a shared [`Capture`].
pub(crate) struct Tee<B> {
    inner: B,
    capture: Option<Arc<Mutex<Capture>>>,
}

impl<B> Tee<B> {
    pub(crate) fn new(inner: B, capture: Option<Arc<Mutex<Capture>>>) -> Self {
        Tee { inner, capture }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let (Some(Ok(frame)), Some(capture)) = (&frame, &this.capture) {
            if let Some(data) = frame.data_ref() {
                capture.lock().expect("capture lock").push(data);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Most recordings waiting for the store; beyond, requests are not recorded rather than the
/// relay slowing down or running out of memory.
const MAX_PENDING: usize = 8192;

/// Most exchanges written in one store command.
const MAX_BATCH: usize = 2048;

/// Pause between two history writes, so that exchanges are written in large batches.
const GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// Hands finished exchanges to a background task that writes them to the store in batches.
#[derive(Clone)]
pub(crate) struct Recorder {
    tx: mpsc::Sender<(NewRequest, Outcome)>,
}

impl Recorder {
    /// Starts the writing task for `store`; it ends when every [`Recorder`] clone is gone.
    pub(crate) fn start(store: Store) -> Recorder {
        let (tx, mut rx) = mpsc::channel::<(NewRequest, Outcome)>(MAX_PENDING);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let exchanges = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
                match store.record_exchanges(exchanges).await {
                    Ok(results) => {
                        for err in results.into_iter().filter_map(Result::err) {
                            debug!(%err, "cannot record a passed-through request");
                        }
                    }
                    Err(err) => warn!(%err, "cannot record passed-through requests"),
                }
                // History need not be on disk at once: letting exchanges gather for a moment
                // makes few, large transactions, which write far fewer pages per request.
                tokio::time::sleep(GATHER).await;
            }
        });
        Recorder { tx }
    }
}

/// One pass-through exchange being recorded.
pub(crate) struct Exchange {
    recorder: Recorder,
    session_id: String,
    received_at: i64,
    method: String,
    target: String,
    pub(crate) headers: HeaderList,
    pub(crate) request_body: Arc<Mutex<Capture>>,
    started: Instant,
    limit: usize,
}

impl Exchange {
    /// Starts recording an exchange.
    pub(crate) fn begin(
        recorder: &Recorder,
        session_id: &str,
        method: &str,
        target: &str,
        limit: usize,
    ) -> Exchange {
        Exchange {
            recorder: recorder.clone(),
            session_id: session_id.to_owned(),
            received_at: crate::store::now_ms(),
            method: method.to_owned(),
            target: target.to_owned(),
            headers: HeaderList::new(),
            request_body: Arc::new(Mutex::new(Capture::new(limit))),
            started: Instant::now(),
            limit,
        }
    }

    /// The app answered: record the response.
    pub(crate) fn answered(self, status: u16, headers: HeaderList, body: Bytes) {
        let response = Response {
            status,
            headers,
            body,
            duration: self.started.elapsed(),
        };
        self.write(Outcome::Delivered(response));
    }

    /// The exchange failed: record why.
    pub(crate) fn failed(self, error: &str) {
        self.write(Outcome::Error {
            error: error.to_owned(),
            retry_at: None,
        });
    }

    /// A tap for the response body that records the exchange when the body ends.
    pub(crate) fn response_tap(self, status: u16, headers: HeaderList) -> Box<dyn BodyTap> {
        let capture = Capture::new(self.limit);
        Box::new(ResponseTap {
            exchange: self,
            status,
            headers,
            capture,
        })
    }

    fn write(self, outcome: Outcome) {
        let body = self.request_body.lock().expect("capture lock").take();
        let request = NewRequest::new(
            self.session_id,
            self.received_at,
            self.method,
            self.target,
            self.headers,
            body,
            RequestState::Delivering,
        );
        if self.recorder.tx.try_send((request, outcome)).is_err() {
            debug!("history writer is behind; a passed-through request is not recorded");
        }
    }
}

struct ResponseTap {
    exchange: Exchange,
    status: u16,
    headers: HeaderList,
    capture: Capture,
}

impl BodyTap for ResponseTap {
    fn data(&mut self, bytes: &Bytes) {
        self.capture.push(bytes);
    }

    fn end(self: Box<Self>, complete: bool) {
        let ResponseTap {
            exchange,
            status,
            headers,
            mut capture,
        } = *self;
        if complete {
            exchange.answered(status, headers, capture.take());
        } else {
            exchange.failed(&format!(
                "the response (status {status}) broke off before its end"
            ));
        }
    }
}
