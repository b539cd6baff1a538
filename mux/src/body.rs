//! [`TunnelBody`]: the bytes a peer sends on one stream, as an HTTP body.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use ferry_protocol::flow::frame_cost;
use ferry_protocol::Control;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::stream::{Inbound, Slot, StreamGuard};
use crate::writer::Outgoing;

/// Why a [`TunnelBody`] ended early.
#[derive(Debug, Clone, thiserror::Error)]
#[error("body aborted: {0}")]
pub struct BodyError(pub String);

/// Sees a [`TunnelBody`]'s bytes as they are handed out (see [`TunnelBody::with_tap`]), e.g.
/// to keep a copy for a log.
pub trait BodyTap: Send + Sync + 'static {
    /// One chunk of the body, as handed out.
    fn data(&mut self, bytes: &Bytes);
    /// The body ended: `complete` if it reached its end, false if it broke off or was dropped
    /// unread.
    fn end(self: Box<Self>, complete: bool);
}

/// A stream's incoming body. Each chunk handed out returns its flow-control credit to the peer,
/// so the peer can never have more than one window of data waiting here.
pub struct TunnelBody {
    rx: mpsc::Receiver<Inbound>,
    slot: Arc<Slot>,
    /// Where window updates go; made the first time one is due (most webhook bodies are
    /// smaller than the update threshold and never send one).
    out: Option<PollSender<Outgoing>>,
    sender: mpsc::Sender<Outgoing>,
    unreturned: u32,
    /// A message taken off the queue while looking for the end behind a chunk.
    lookahead: Option<Inbound>,
    done: bool,
    guard: Option<StreamGuard>,
    tap: Option<Box<dyn BodyTap>>,
}

impl TunnelBody {
    pub(crate) fn new(
        rx: mpsc::Receiver<Inbound>,
        slot: Arc<Slot>,
        out: mpsc::Sender<Outgoing>,
    ) -> Self {
        TunnelBody {
            rx,
            slot,
            out: None,
            sender: out,
            unreturned: 0,
            lookahead: None,
            done: false,
            guard: None,
            tap: None,
        }
    }

    /// Keeps `guard` alive for as long as this body, so the stream stays open until the body has
    /// been read to its end or dropped.
    pub fn with_guard(mut self, guard: StreamGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Shows every chunk handed out to `tap`, and tells it how the body ended.
    pub fn with_tap(mut self, tap: Box<dyn BodyTap>) -> Self {
        self.tap = Some(tap);
        self
    }

    fn end_tap(&mut self, complete: bool) {
        if let Some(tap) = self.tap.take() {
            tap.end(complete);
        }
    }

    /// The body has reached its end. The tap hears of it only on the next poll or when the
    /// body is dropped: after the last chunk has been handed out and written on, so that what
    /// the tap does at the end (the relay encodes a history record) does not delay it.
    fn finish(&mut self) {
        self.done = true;
        if let Some(guard) = &self.guard {
            guard.finish();
        }
    }

    fn poll_return_credit(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.unreturned < self.slot.update_threshold() {
            return Poll::Ready(());
        }
        // If the connection is gone there is nobody to return credit to.
        let out = self
            .out
            .get_or_insert_with(|| PollSender::new(self.sender.clone()));
        if ready!(out.poll_reserve(cx)).is_ok() {
            // Count the credit as returned before the peer can hear of it: once the update is
            // out, the peer may spend it and its data may arrive (on another thread) before
            // this one runs on, and it must find room for it.
            self.slot.credit_returned(self.unreturned);
            let msg = Control::Window {
                stream: self.slot.id,
                increment: self.unreturned,
            };
            let _ = out.send_item(self.slot.shared.encode(&msg));
        }
        self.unreturned = 0;
        Poll::Ready(())
    }
}

impl Drop for TunnelBody {
    fn drop(&mut self) {
        // Complete if it reached its end (the tap of a body that broke off has gone already).
        let complete = self.done;
        self.end_tap(complete);
    }
}

impl http_body::Body for TunnelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.done {
            // A body that broke off told its tap already; one that ended tells it now.
            this.end_tap(true);
            return Poll::Ready(None);
        }
        ready!(this.poll_return_credit(cx));
        let next = match this.lookahead.take() {
            Some(next) => Some(next),
            None => ready!(this.rx.poll_recv(cx)),
        };
        match next {
            Some(Inbound::Data(bytes)) => {
                this.slot.consumed(bytes.len());
                this.unreturned += frame_cost(bytes.len());
                if let Some(tap) = this.tap.as_mut() {
                    tap.data(&bytes);
                }
                // A reader that knows the length (hyper with Content-Length) stops polling after
                // the last byte: notice an end queued right behind it now, or the exchange would
                // look abandoned and be cancelled.
                match this.rx.try_recv() {
                    Ok(Inbound::End) => this.finish(),
                    Ok(next) => this.lookahead = Some(next),
                    Err(_) => {}
                }
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Some(Inbound::End) => {
                this.finish();
                this.end_tap(true);
                Poll::Ready(None)
            }
            None => {
                this.done = true;
                this.end_tap(false);
                Poll::Ready(Some(Err(BodyError(this.slot.cancel_reason()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
