//! One stream's state: its slot in the connection, the sending half and the guard that ends it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_protocol::flow::{frame_cost, update_threshold, MAX_FRAME_PAYLOAD};
use ferry_protocol::{Control, DataFrame};
use futures_util::FutureExt;
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::connection::{Shared, FLUSH_AT};
use crate::writer::Outgoing;
use crate::MuxError;

/// What the reader hands to a stream's [`TunnelBody`](crate::TunnelBody).
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Bytes),
    End,
}

/// Why a frame could not be delivered to its stream.
#[derive(Debug)]
pub(crate) enum DeliverError {
    /// The peer sent more than the window allows, or data after the end.
    Violation(&'static str),
}

/// Queues `item` for the body. A full queue means the peer ignored the window; a closed one
/// only that the body's reader stopped early (a local app that answered before reading it
/// all, say), so the rest is dropped.
fn push(tx: &mpsc::Sender<Inbound>, item: Inbound) -> Result<(), DeliverError> {
    match tx.try_send(item) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => Err(DeliverError::Violation(
            "peer sent more frames than the window allows",
        )),
    }
}

/// A stream's entry in the connection's table, shared by the reader, the sender and the body.
pub(crate) struct Slot {
    pub(crate) id: u32,
    /// Where incoming body frames go; taken away when the stream is cancelled.
    inbound: Mutex<Option<mpsc::Sender<Inbound>>>,
    /// Credit units received but not yet handed back to the peer.
    unreturned: AtomicUsize,
    /// Body bytes received but not yet consumed.
    buffered: AtomicUsize,
    /// Body bytes consumed (handed out by the stream's body) so far.
    consumed: AtomicU64,
    inbound_ended: AtomicBool,
    /// Credit we may still spend sending.
    pub(crate) send_credit: Semaphore,
    /// The peer's head for this stream (the response head, on the relay).
    head: Mutex<Option<oneshot::Sender<Control>>>,
    pub(crate) cancel: CancellationToken,
    reason: Mutex<Option<String>>,
    pub(crate) shared: Arc<Shared>,
}

impl Slot {
    pub(crate) fn new(
        id: u32,
        inbound: mpsc::Sender<Inbound>,
        head: oneshot::Sender<Control>,
        shared: Arc<Shared>,
    ) -> Self {
        Slot {
            id,
            inbound: Mutex::new(Some(inbound)),
            unreturned: AtomicUsize::new(0),
            buffered: AtomicUsize::new(0),
            consumed: AtomicU64::new(0),
            inbound_ended: AtomicBool::new(false),
            send_credit: Semaphore::new(shared.config.send_window as usize),
            head: Mutex::new(Some(head)),
            // Not a child of the connection token: `Shared::close` aborts every open slot itself,
            // and a child would take a lock on the parent per stream.
            cancel: CancellationToken::new(),
            reason: Mutex::new(None),
            shared,
        }
    }

    /// Hands an incoming data frame to the body, enforcing the window.
    pub(crate) fn deliver(&self, frame: DataFrame) -> Result<(), DeliverError> {
        if self.inbound_ended.load(Ordering::Acquire) {
            return Err(DeliverError::Violation("data after the end of the body"));
        }
        let cost = frame_cost(frame.payload.len()) as usize;
        let unreturned = self.unreturned.fetch_add(cost, Ordering::AcqRel) + cost;
        if unreturned > self.shared.config.recv_window as usize {
            return Err(DeliverError::Violation(
                "peer exceeded the flow-control window",
            ));
        }
        let guard = self.inbound.lock().expect("slot lock");
        let Some(tx) = guard.as_ref() else {
            return Ok(()); // cancelled: late frames are dropped
        };
        if !frame.payload.is_empty() {
            let len = frame.payload.len();
            let buffered = self.buffered.fetch_add(len, Ordering::AcqRel) + len;
            self.shared.stats.note_buffered(buffered);
            push(tx, Inbound::Data(frame.payload))?;
        }
        if frame.end {
            self.inbound_ended.store(true, Ordering::Release);
            push(tx, Inbound::End)?;
        }
        Ok(())
    }

    /// Delivers the peer's head for this stream; false if nobody waits for one.
    pub(crate) fn deliver_head(&self, msg: Control) -> bool {
        match self.head.lock().expect("slot lock").take() {
            Some(tx) => tx.send(msg).is_ok(),
            None => false,
        }
    }

    /// Adds credit the peer handed back; false if it hands back more than was spent.
    pub(crate) fn grant(&self, increment: u32) -> bool {
        let available = self.send_credit.available_permits();
        if available + increment as usize > self.shared.config.send_window as usize {
            return false;
        }
        self.send_credit.add_permits(increment as usize);
        true
    }

    /// Credit owed to the peer at which it is handed back.
    pub(crate) fn update_threshold(&self) -> u32 {
        update_threshold(self.shared.config.recv_window)
    }

    pub(crate) fn consumed(&self, len: usize) {
        self.buffered.fetch_sub(len, Ordering::AcqRel);
        self.consumed.fetch_add(len as u64, Ordering::Relaxed);
    }

    pub(crate) fn credit_returned(&self, units: u32) {
        self.unreturned.fetch_sub(units as usize, Ordering::AcqRel);
    }

    /// Aborts the stream locally: the body ends with an error, the sender stops.
    pub(crate) fn abort(&self, reason: &str) {
        {
            let mut slot_reason = self.reason.lock().expect("slot lock");
            if slot_reason.is_none() {
                *slot_reason = Some(reason.to_owned());
            }
        }
        self.inbound.lock().expect("slot lock").take();
        self.head.lock().expect("slot lock").take();
        self.cancel.cancel();
    }

    pub(crate) fn cancel_reason(&self) -> String {
        if let Some(reason) = self.reason.lock().expect("slot lock").clone() {
            return reason;
        }
        self.shared.close_reason()
    }
}

/// Why [`StreamSender::pump`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The body being sent failed.
    #[error("reading the body failed: {0}")]
    Body(String),
    /// The body grew past the limit given to [`StreamSender::pump`].
    #[error("body exceeds the {0} byte limit")]
    TooLarge(u64),
    /// The stream or the connection went away.
    #[error(transparent)]
    Mux(#[from] MuxError),
}

/// A control message encoded for the wire, in the form the peer reads
/// ([`StreamSender::encode`]): lets a sender encode a message and still take its parts back
/// afterwards (the relay keeps a request's headers for history without copying them).
#[derive(Debug)]
pub struct EncodedControl(Outgoing);

/// Sends one stream's body bytes and control messages, respecting the peer's window.
#[derive(Clone)]
pub struct StreamSender {
    pub(crate) slot: Arc<Slot>,
    pub(crate) out: mpsc::Sender<Outgoing>,
}

impl StreamSender {
    /// The stream's id.
    pub fn id(&self) -> u32 {
        self.slot.id
    }

    /// Encodes `msg` in the form the peer reads: binary for a head when it asked for that.
    pub fn encode(&self, msg: &Control) -> EncodedControl {
        EncodedControl(self.slot.shared.encode(msg))
    }

    /// Sends a control message (a head, usually) on the connection.
    pub async fn send_control(&self, msg: Control) -> Result<(), MuxError> {
        self.send(self.slot.shared.encode(&msg)).await
    }

    /// Sends a control message encoded by [`StreamSender::encode`].
    pub async fn send_encoded(&self, msg: EncodedControl) -> Result<(), MuxError> {
        self.send(msg.0).await
    }

    async fn send(&self, msg: Outgoing) -> Result<(), MuxError> {
        tokio::select! {
            biased;
            _ = self.slot.cancel.cancelled() => Err(MuxError::Cancelled(self.slot.cancel_reason())),
            sent = self.out.send(msg) => sent.map_err(|_| MuxError::Closed(self.slot.shared.close_reason())),
        }?;
        self.note_queued();
        Ok(())
    }

    /// Wakes the writer when a full batch waits for it (see [`FLUSH_AT`]).
    fn note_queued(&self) {
        if self.out.max_capacity() - self.out.capacity() >= FLUSH_AT {
            self.slot.shared.batch_ready.notify_one();
        }
    }

    /// Sends `bytes` as data frames, waiting for credit; `end` marks the last of the body.
    pub async fn send_data(&self, mut bytes: Bytes, end: bool) -> Result<(), MuxError> {
        if bytes.is_empty() && !end {
            return Ok(()); // an empty chunk says nothing, and would cost credit nobody returns
        }
        loop {
            let chunk = bytes.split_to(bytes.len().min(MAX_FRAME_PAYLOAD));
            let last = bytes.is_empty();
            let cost = frame_cost(chunk.len());
            tokio::select! {
                biased;
                _ = self.slot.cancel.cancelled() => return Err(MuxError::Cancelled(self.slot.cancel_reason())),
                permit = self.slot.send_credit.acquire_many(cost) => match permit {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Err(MuxError::Closed(self.slot.shared.close_reason())),
                },
            }
            self.send(Outgoing::Data {
                stream: self.slot.id,
                end: end && last,
                payload: chunk,
            })
            .await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Streams all of `body` and then the end marker; fails with [`PumpError::TooLarge`] as soon
    /// as more than `limit` bytes have been read. Returns the number of body bytes sent.
    pub async fn pump<B>(&self, body: B, limit: Option<u64>) -> Result<u64, PumpError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let body = std::pin::pin!(body);
        self.pump_from(body, 0, limit).await
    }

    /// Sends `head`, then streams `body` like [`StreamSender::pump`]. A first chunk that is
    /// already there (a small webhook usually is) is queued together with the head, so both
    /// leave in one write and the peer sees head and body at once.
    pub async fn send_head_and_body<B>(
        &self,
        head: EncodedControl,
        body: B,
        limit: Option<u64>,
    ) -> Result<u64, PumpError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let mut body = std::pin::pin!(body);
        let head = head.0;
        let first = match body.frame().now_or_never() {
            Some(Some(Ok(frame))) => frame.into_data().ok().map(|data| (data, false)),
            Some(Some(Err(err))) => return Err(PumpError::Body(err.to_string())),
            Some(None) => Some((Bytes::new(), true)), // already over: the end goes with the head
            None => None,
        };
        let Some((data, over)) = first.filter(|(data, over)| *over || !data.is_empty()) else {
            self.send(head).await?;
            return self.pump_from(body, 0, limit).await;
        };
        let sent = data.len() as u64;
        if let Some(limit) = limit.filter(|limit| sent > *limit) {
            return Err(PumpError::TooLarge(limit));
        }
        let end = over || body.is_end_stream();
        let credit = (data.len() <= MAX_FRAME_PAYLOAD)
            .then(|| {
                self.slot
                    .send_credit
                    .try_acquire_many(frame_cost(data.len()))
                    .ok()
            })
            .flatten();
        match credit {
            Some(credit) => {
                credit.forget();
                let frame = Outgoing::Data {
                    stream: self.slot.id,
                    end,
                    payload: data,
                };
                let mut permits = tokio::select! {
                    biased;
                    _ = self.slot.cancel.cancelled() => return Err(MuxError::Cancelled(self.slot.cancel_reason()).into()),
                    permits = self.out.reserve_many(2) => permits.map_err(|_| MuxError::Closed(self.slot.shared.close_reason()))?,
                };
                if let (Some(first), Some(second)) = (permits.next(), permits.next()) {
                    first.send(head);
                    second.send(frame);
                }
                self.note_queued();
            }
            None => {
                self.send(head).await?;
                self.send_data(data, end).await?;
            }
        }
        if end {
            return Ok(sent);
        }
        self.pump_from(body, sent, limit).await
    }

    async fn pump_from<B>(
        &self,
        mut body: std::pin::Pin<&mut B>,
        mut sent: u64,
        limit: Option<u64>,
    ) -> Result<u64, PumpError>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.slot.cancel.cancelled() => return Err(MuxError::Cancelled(self.slot.cancel_reason()).into()),
                frame = body.frame() => frame,
            };
            match frame {
                None => {
                    self.send_data(Bytes::new(), true).await?;
                    return Ok(sent);
                }
                Some(Err(err)) => return Err(PumpError::Body(err.to_string())),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers are not carried
                    };
                    sent += data.len() as u64;
                    if let Some(limit) = limit {
                        if sent > limit {
                            return Err(PumpError::TooLarge(limit));
                        }
                    }
                    let end = body.is_end_stream();
                    self.send_data(data, end).await?;
                    if end {
                        return Ok(sent);
                    }
                }
            }
        }
    }
}

/// Keeps a stream registered; dropping it removes the stream and, unless the exchange finished
/// cleanly, tells the peer to cancel it.
pub struct StreamGuard {
    pub(crate) slot: Arc<Slot>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) out: mpsc::Sender<Outgoing>,
    pub(crate) finished: AtomicBool,
}

impl StreamGuard {
    /// Bytes of the peer's body handed out by the stream's [`TunnelBody`](crate::TunnelBody)
    /// so far: what its reader has taken.
    pub fn body_bytes_read(&self) -> u64 {
        self.slot.consumed.load(Ordering::Relaxed)
    }

    /// Marks the exchange as finished: dropping the guard will not send a cancel.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// Cancels the stream now, telling the peer why.
    pub fn cancel(&self, reason: &str) {
        if self.slot.cancel.is_cancelled() {
            return;
        }
        self.slot.abort(reason);
        self.send_cancel(reason);
    }

    /// A future that completes when the stream is cancelled by either side or the connection ends.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.slot.cancel.cancelled()
    }

    /// Why the stream was cancelled, if it was.
    pub fn cancel_reason(&self) -> String {
        self.slot.cancel_reason()
    }

    fn send_cancel(&self, reason: &str) {
        let msg = Outgoing::Text(
            Control::Cancel {
                stream: self.slot.id,
                reason: reason.to_owned(),
            }
            .encode(),
        );
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.out.try_send(msg) {
            let out = self.out.clone();
            tokio::spawn(async move {
                let _ = out.send(msg).await;
            });
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared.remove(self.slot.id);
        if !self.finished.load(Ordering::Acquire) && !self.slot.cancel.is_cancelled() {
            self.send_cancel("the other side stopped the exchange");
        }
        self.slot.abort("stream closed");
    }
}
