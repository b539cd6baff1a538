//! History of requests passed straight through: the request and the app's response are copied
//! (up to `--record-max-body`) as they stream by, and written to the store in the background
//! once the exchange is over, so recording never delays an answer.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ferry_mux::BodyTap;
use ferry_protocol::HeaderList;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::{EncodedExchange, NewRequest, Outcome, RequestState, Response, Store};

/// Default of `--record-buffer`: body bytes held for history at once, over all exchanges, kept
/// and not yet written. Beyond it, bodies are kept only in part (their records say so), so
/// history never costs the relay more than about this much memory, however large or many the
/// bodies passing through. One body may take at most half of it, so that one huge upload does
/// not leave every other request of the moment without its body.
pub(crate) const DEFAULT_BUFFER: usize = 8 * 1024 * 1024;

/// What is left of the `--record-buffer`.
#[derive(Clone)]
pub(crate) struct Budget {
    left: Arc<AtomicUsize>,
    /// Most one body may hold: half the buffer.
    per_body: usize,
}

impl Budget {
    fn new(bytes: usize) -> Self {
        Budget {
            left: Arc::new(AtomicUsize::new(bytes)),
            per_body: bytes / 2,
        }
    }

    /// Takes up to `want` bytes; returns how many were granted.
    fn take(&self, want: usize) -> usize {
        let mut granted = 0;
        let _ = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                granted = want.min(left);
                Some(left - granted)
            });
        granted
    }
}

/// Bytes taken from the [`Budget`]; given back when dropped (once they are written).
pub(crate) struct Held {
    budget: Budget,
    bytes: usize,
}

impl Held {
    fn merge(mut self, mut other: Held) -> Held {
        self.bytes += std::mem::take(&mut other.bytes);
        self
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.left.fetch_add(self.bytes, Ordering::AcqRel);
    }
}

/// What a body keeps, for show, once it is known that history cannot keep it whole because of
/// the shared [`Budget`] (its share of `--record-buffer`, or the buffer running out). Such a
/// record cannot be replayed whatever it keeps, and copying megabytes of it into history cost
/// the relay ~2 ms per 5 MiB upload (docs/BENCHMARKS.md, finding 24).
const PREVIEW: usize = 64 * 1024;

/// A body's first `limit` bytes, kept as the chunks that passed (no copy until the end), and
/// its full length. A body the [`Budget`] cannot hold whole keeps only its first [`PREVIEW`]
/// bytes (and gives the rest of its share back at once).
pub(crate) struct Capture {
    chunks: Vec<Bytes>,
    kept: usize,
    limit: usize,
    len: u64,
    /// Out of budget: nothing more is kept, so the copy stays a prefix.
    starved: bool,
    /// Known to be too large for the budget: keeps a preview only.
    preview: bool,
    held: Held,
}

impl Capture {
    pub(crate) fn new(limit: usize, budget: Budget) -> Self {
        Capture {
            chunks: Vec::new(),
            kept: 0,
            limit,
            len: 0,
            starved: false,
            preview: false,
            held: Held { budget, bytes: 0 },
        }
    }

    /// The most this body may keep.
    fn cap(&self) -> usize {
        let per_body = self.held.budget.per_body;
        if self.preview {
            PREVIEW.min(self.limit).min(per_body)
        } else {
            self.limit.min(per_body)
        }
    }

    /// Whether a body of `len` bytes is more than its share of the budget lets it keep, where
    /// `--record-max-body` alone would have kept more.
    fn beyond_share(&self, len: u64) -> bool {
        let per_body = self.held.budget.per_body;
        self.limit > per_body && len > per_body as u64
    }

    /// The body will be `len` bytes long (its `Content-Length`): one too large for its share
    /// keeps a preview from the start.
    pub(crate) fn announce(&mut self, len: u64) {
        if self.beyond_share(len) {
            self.keep_preview();
        }
    }

    fn push(&mut self, bytes: &Bytes) {
        self.len += bytes.len() as u64;
        if self.starved {
            return;
        }
        if !self.preview && self.beyond_share(self.len) {
            self.keep_preview();
        }
        let want = bytes.len().min(self.cap().saturating_sub(self.kept));
        let granted = self.held.budget.take(want);
        self.held.bytes += granted;
        if granted > 0 {
            self.kept += granted;
            self.chunks.push(bytes.slice(..granted));
        }
        if granted < want {
            self.starved = true;
            self.keep_preview();
        }
    }

    /// Keeps no more than a preview from now on, and gives back what was kept beyond it.
    fn keep_preview(&mut self) {
        self.preview = true;
        let cap = self.cap();
        if self.kept <= cap {
            return;
        }
        let mut kept = 0;
        self.chunks.retain_mut(|chunk| {
            if kept >= cap {
                return false;
            }
            if kept + chunk.len() > cap {
                chunk.truncate(cap - kept);
            }
            kept += chunk.len();
            true
        });
        let released = self.kept - kept;
        self.kept = kept;
        self.held.bytes -= released;
        self.held.budget.left.fetch_add(released, Ordering::AcqRel);
    }

    /// The kept bytes (in one piece), the full length, and the budget they hold.
    fn take(&mut self) -> (Bytes, u64, Held) {
        let held = Held {
            budget: self.held.budget.clone(),
            bytes: std::mem::take(&mut self.held.bytes),
        };
        let chunks = std::mem::take(&mut self.chunks);
        let kept = std::mem::take(&mut self.kept);
        let body = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.into_iter().next().expect("one chunk"),
            _ => {
                let mut body = BytesMut::with_capacity(kept);
                for chunk in chunks {
                    body.extend_from_slice(&chunk);
                }
                body.freeze()
            }
        };
        (body, self.len, held)
    }
}

/// A body that copies what passes through it into a shared [`Capture`].
pub(crate) struct Tee<B> {
    inner: B,
    capture: Option<Arc<Mutex<Capture>>>,
}

impl<B: Body> Tee<B> {
    pub(crate) fn new(inner: B, capture: Option<Arc<Mutex<Capture>>>) -> Self {
        if let (Some(capture), Some(len)) = (&capture, inner.size_hint().exact()) {
            capture.lock().expect("capture lock").announce(len);
        }
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

/// Pause between two history writes, so that exchanges are written in batches (one history
/// block per session and batch). Since records wait as one compact buffer each, longer pauses
/// no longer cost the cold allocations they did with a row per exchange (docs/BENCHMARKS.md,
/// findings 16 and 17): at 50 ms the writer thread spends half the CPU per request it spends
/// at 10 ms when requests come one at a time, and no more under load.
const GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// Hands finished exchanges to a background task that writes them to the store in batches.
#[derive(Clone)]
pub(crate) struct Recorder {
    tx: mpsc::Sender<(EncodedExchange, Held)>,
    budget: Budget,
    /// Most body bytes kept per request or response (`--record-max-body`).
    max_body: usize,
}

impl Recorder {
    /// Starts the writing task for `store`; it ends when every [`Recorder`] clone is gone.
    pub(crate) fn start(store: Store, buffer: usize) -> Recorder {
        let max_body = store.record_max_body();
        let (tx, mut rx) = mpsc::channel::<(EncodedExchange, Held)>(MAX_PENDING);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (exchanges, held): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
                let result = store.record_encoded(exchanges).await;
                drop(held); // written (or given up on): the bodies' budget is free again
                match result {
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
        Recorder {
            tx,
            budget: Budget::new(buffer),
            max_body,
        }
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
            request_body: Arc::new(Mutex::new(Capture::new(limit, recorder.budget.clone()))),
            started: Instant::now(),
            limit,
        }
    }

    /// The app answered with an empty body: record the response.
    pub(crate) fn answered(self, status: u16, headers: HeaderList) {
        let budget = self.recorder.budget.clone();
        self.answered_with(status, headers, Capture::new(0, budget));
    }

    fn answered_with(self, status: u16, headers: HeaderList, mut capture: Capture) {
        let (body, body_len, held) = capture.take();
        let response = Response {
            status,
            headers,
            body,
            body_len,
            duration: self.started.elapsed(),
        };
        self.write(Outcome::Delivered(response), Some(held));
    }

    /// The exchange failed: record why.
    pub(crate) fn failed(self, error: &str) {
        self.write(
            Outcome::Error {
                error: error.to_owned(),
                retry_at: None,
            },
            None,
        );
    }

    /// A tap for the response body that records the exchange when the body ends.
    pub(crate) fn response_tap(self, status: u16, headers: HeaderList) -> Box<dyn BodyTap> {
        let capture = Capture::new(self.limit, self.recorder.budget.clone());
        Box::new(ResponseTap {
            exchange: self,
            status,
            headers,
            capture,
        })
    }

    fn write(self, outcome: Outcome, response_held: Option<Held>) {
        let (body, body_len, mut held) = self.request_body.lock().expect("capture lock").take();
        if let Some(response_held) = response_held {
            held = held.merge(response_held);
        }
        let mut request = NewRequest::new(
            self.session_id,
            self.received_at,
            self.method,
            self.target,
            self.headers,
            body,
            RequestState::Delivering,
        );
        request.body_len = body_len;
        // Encoded now, while its pieces are fresh in the cache: what waits for the batch is one
        // buffer (whose body bytes `held` still counts) instead of every header and body chunk.
        let exchange = EncodedExchange::new(request, outcome, self.recorder.max_body);
        if self.recorder.tx.try_send((exchange, held)).is_err() {
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
            capture,
        } = *self;
        if complete {
            exchange.answered_with(status, headers, capture);
        } else {
            exchange.failed(&format!(
                "the response (status {status}) broke off before its end"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_keeps_a_prefix_within_its_limit_and_counts_the_whole_body() {
        let budget = Budget::new(1000);
        let mut capture = Capture::new(10, budget.clone());
        capture.push(&Bytes::from_static(b"0123456"));
        capture.push(&Bytes::from_static(b"789abcdef"));
        let (kept, len, held) = capture.take();
        assert_eq!(&kept[..], b"0123456789");
        assert_eq!(len, 16);
        assert_eq!(budget.left.load(Ordering::Acquire), 990);
        drop(held);
        assert_eq!(
            budget.left.load(Ordering::Acquire),
            1000,
            "given back once written"
        );
    }

    #[test]
    fn the_shared_budget_bounds_what_all_captures_hold() {
        // 10 bytes in all, at most 5 per body.
        let budget = Budget::new(10);
        let mut first = Capture::new(100, budget.clone());
        let mut second = Capture::new(100, budget.clone());
        let mut third = Capture::new(100, budget.clone());
        first.push(&Bytes::from_static(b"abcdef"));
        second.push(&Bytes::from_static(b"ghij"));
        third.push(&Bytes::from_static(b"klm"));
        let (kept, len, held) = first.take();
        assert_eq!(
            (&kept[..], len),
            (&b"abcde"[..], 6),
            "half the buffer per body"
        );
        let (kept, _, _second_held) = second.take();
        assert_eq!(&kept[..], b"ghij");
        // Out of budget: the third keeps a prefix and nothing after it, even once the budget
        // is back.
        drop(held);
        third.push(&Bytes::from_static(b"no"));
        let (kept, len, _held) = third.take();
        assert_eq!((&kept[..], len), (&b"k"[..], 5));
    }

    #[test]
    fn a_body_beyond_its_share_keeps_a_preview_and_gives_the_rest_back_at_once() {
        // 1 MiB buffer: 512 KiB per body, under a --record-max-body of 32 MiB.
        let budget = Budget::new(1 << 20);
        let mut capture = Capture::new(32 << 20, budget.clone());
        let chunk = Bytes::from(vec![7u8; 200 * 1024]);
        for _ in 0..2 {
            capture.push(&chunk); // 400 KiB: within its share, all kept so far
        }
        assert_eq!(budget.left.load(Ordering::Acquire), (1 << 20) - 400 * 1024);
        capture.push(&chunk); // 600 KiB: beyond its share
        assert_eq!(
            budget.left.load(Ordering::Acquire),
            (1 << 20) - PREVIEW,
            "all but the preview given back before the body ends"
        );
        capture.push(&chunk);
        let (kept, len, _held) = capture.take();
        assert_eq!((kept.len(), len), (PREVIEW, 800 * 1024));
    }

    #[test]
    fn a_body_announced_beyond_its_share_never_holds_more_than_a_preview() {
        let budget = Budget::new(1 << 20);
        let mut capture = Capture::new(32 << 20, budget.clone());
        capture.announce(5 << 20);
        capture.push(&Bytes::from(vec![1u8; 300 * 1024]));
        assert_eq!(budget.left.load(Ordering::Acquire), (1 << 20) - PREVIEW);
        let (kept, len, _held) = capture.take();
        assert_eq!((kept.len(), len), (PREVIEW, 300 * 1024));
    }

    #[test]
    fn a_body_cut_by_record_max_body_keeps_that_much() {
        // --record-max-body 100 KiB, below the 512 KiB share: the user's cut, not a preview.
        let budget = Budget::new(1 << 20);
        let mut capture = Capture::new(100 * 1024, budget.clone());
        capture.announce(5 << 20);
        capture.push(&Bytes::from(vec![1u8; 300 * 1024]));
        let (kept, len, _held) = capture.take();
        assert_eq!((kept.len(), len), (100 * 1024, 300 * 1024));
    }
}
