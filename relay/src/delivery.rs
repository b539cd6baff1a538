//! The offline queue's delivery: when a client connects, one task per session hands the session's
//! queued requests to it, in arrival order, one at a time, and records each attempt.
//!
//! # Ordering
//! A session has a *backlog* while the store may hold queued requests for it. While it has one,
//! new requests are queued behind it (answered `202`) even if a client is connected, so that
//! delivery order is arrival order. The delivery task clears the backlog once the store has
//! nothing left for the session and no request is being queued at that moment; from then on
//! requests pass straight through again.
//!
//! # Outcomes
//! A request is marked delivered only once the client has sent the local app's response (head
//! and body). A `5xx` or no answer (timeout, connection lost) is retried with exponential
//! backoff, in place (later requests wait behind it), up to `max_attempts`; then the request is
//! parked as failed and the next one goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::{Control, Delivery, HeaderList, HttpVersion, RequestHead};
use http_body_util::BodyExt as _;
use tracing::{debug, info, warn};

use crate::registry::{Live, Session};
use crate::store::{now_ms, Outcome, QueuedRequest, RequestState, RespondMode, Response, Store};
use crate::Relay;

/// Queued requests fetched from the store at a time.
const BATCH: usize = 64;

/// Header carrying the relay's id of a queued request on delivery.
pub const DELIVERY_ID_HEADER: &str = "ferry-delivery-id";
/// Header carrying how many seconds ago the relay received a queued request.
pub const DELIVERY_AGE_HEADER: &str = "ferry-delivery-age";

/// Marks a request being written to a session's queue; on drop, makes it visible to the
/// session's delivery task.
pub(crate) struct Enqueuing {
    session: Arc<Session>,
}

impl Enqueuing {
    /// Starts queueing a request for `session`: from now on, the session has a backlog.
    pub(crate) fn begin(session: Arc<Session>) -> Self {
        {
            let mut queue = session.queue.lock().expect("queue lock");
            queue.backlog = true;
            queue.writing += 1;
        }
        Enqueuing { session }
    }
}

impl Drop for Enqueuing {
    fn drop(&mut self) {
        {
            let mut queue = self.session.queue.lock().expect("queue lock");
            queue.writing -= 1;
            queue.written = queue.written.wrapping_add(1);
        }
        self.session.queued.notify_one();
    }
}

/// Starts the delivery task of `session` for the connection `live`. It runs until the backlog
/// is empty or the connection ends.
pub(crate) fn start(relay: Arc<Relay>, session: Arc<Session>, live: Live) {
    let Some(store) = relay.config.store.clone() else {
        return;
    };
    session.queue.lock().expect("queue lock").draining += 1;
    tokio::spawn(async move {
        let cleared = tokio::select! {
            turn = session.delivering.lock() => {
                let cleared = drain(&relay, &store, &session, &live).await;
                drop(turn);
                cleared
            }
            _ = live.mux.closed() => false,
        };
        if !cleared {
            session.queue.lock().expect("queue lock").draining -= 1;
        }
    });
}

/// Makes sure a delivery task serves `session`'s queue if a client is connected: after a
/// request was queued while one is (`--respond-now`, or a request caught at a disconnect).
pub(crate) fn nudge(relay: &Arc<Relay>, session: &Arc<Session>) {
    let Some(live) = session.live() else {
        return;
    };
    if session.queue.lock().expect("queue lock").draining > 0 {
        return;
    }
    start(relay.clone(), session.clone(), live);
}

/// What became of one delivery attempt.
enum Step {
    /// Delivered, or parked as failed: go on with the next request.
    Next,
    /// Try the same request again at this time (Unix ms).
    RetryAt(i64),
    /// The connection is gone: stop.
    Stop,
}

/// Delivers the session's queue; true when it ended because the backlog was cleared (and the
/// task was counted out of `draining` under the same lock).
async fn drain(relay: &Relay, store: &Store, session: &Arc<Session>, live: &Live) -> bool {
    loop {
        if live.mux.is_closed() {
            return false;
        }
        let seen = session.queue.lock().expect("queue lock").written;
        let notified = session.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = match store.queued(&session.id, BATCH).await {
            Ok(batch) => batch,
            Err(err) => {
                warn!(session = %session.id, %err, "cannot read the queue; retrying");
                if wait(live, tokio::time::sleep(Duration::from_secs(1))).await {
                    continue;
                }
                return false;
            }
        };
        if batch.is_empty() {
            let due = match store.next_due(&session.id).await {
                Ok(due) => due,
                Err(err) => {
                    warn!(session = %session.id, %err, "cannot read the queue; retrying");
                    Some(now_ms() + 1000)
                }
            };
            match due {
                Some(at) => {
                    // A retry scheduled later (e.g. after a restart): wait for it, or for news.
                    let delay = Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
                    let woke = tokio::select! {
                        _ = tokio::time::sleep(delay) => true,
                        _ = &mut notified => true,
                        _ = live.mux.closed() => false,
                    };
                    if !woke {
                        return false;
                    }
                }
                None => {
                    {
                        let mut queue = session.queue.lock().expect("queue lock");
                        if queue.writing == 0 && queue.written == seen {
                            queue.backlog = false;
                            queue.draining -= 1;
                            debug!(session = %session.id, "backlog delivered");
                            return true;
                        }
                    }
                    if !wait(live, notified).await {
                        return false;
                    }
                }
            }
            continue;
        }
        for item in batch {
            loop {
                match deliver(relay, store, live, &item, delivery_timeout(relay, session)).await {
                    Step::Next => break,
                    Step::Stop => return false,
                    Step::RetryAt(at) => {
                        let delay =
                            Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
                        if !wait(live, tokio::time::sleep(delay)).await {
                            return false;
                        }
                    }
                }
            }
        }
    }
}

/// Waits for `what`; false if the connection ended first.
async fn wait(live: &Live, what: impl std::future::Future) -> bool {
    tokio::select! {
        _ = what => true,
        _ = live.mux.closed() => false,
    }
}

/// How long a `--respond-now` session's app may take over a delivery: its caller already has
/// an answer, and the user may be holding a breakpoint in the handler.
pub(crate) const RESPOND_NOW_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long the app may take over one delivery of `session`'s queue.
fn delivery_timeout(relay: &Relay, session: &Session) -> Duration {
    match session.respond_mode() {
        RespondMode::Now { .. } => relay.config.timeout.max(RESPOND_NOW_TIMEOUT),
        _ => relay.config.timeout,
    }
}

/// The wait before the attempt after attempt `attempt` failed.
fn backoff(relay: &Relay, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    relay
        .config
        .retry_base
        .checked_mul(factor)
        .unwrap_or(relay.config.retry_max)
        .min(relay.config.retry_max)
}

/// One delivery attempt of `item`, recorded in the store.
async fn deliver(
    relay: &Relay,
    store: &Store,
    live: &Live,
    item: &QueuedRequest,
    timeout: Duration,
) -> Step {
    let attempt = match store.start_attempt(item.id).await {
        Ok(attempt) => attempt,
        Err(err) => {
            warn!(id = %item.id, %err, "cannot start a delivery attempt");
            return Step::RetryAt(now_ms() + 1000);
        }
    };
    let started = Instant::now();
    let result = exchange(relay, live, item, attempt, timeout).await;
    let last = attempt >= relay.config.max_attempts;
    let retry_at = |gone: bool| {
        (!last).then(|| {
            let delay = if gone {
                Duration::ZERO
            } else {
                backoff(relay, attempt)
            };
            now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2)
        })
    };
    let (outcome, step_if_retry, gone) = match result {
        Ok(mut response) => {
            response.duration = started.elapsed();
            if response.status < 500 {
                (Outcome::Delivered(response), None, false)
            } else {
                let at = retry_at(false);
                (
                    Outcome::Rejected {
                        response,
                        retry_at: at,
                    },
                    at,
                    false,
                )
            }
        }
        Err(Failure { error, gone }) => {
            let at = retry_at(gone);
            (
                Outcome::Error {
                    error,
                    retry_at: at,
                },
                at,
                gone,
            )
        }
    };
    match store.finish_attempt(item.id, attempt, outcome).await {
        Ok(RequestState::Delivered) => {
            debug!(id = %item.id, attempt, "queued request delivered");
            Step::Next
        }
        Ok(RequestState::Failed) => {
            info!(id = %item.id, attempt, "queued request parked as failed after its last attempt");
            if gone {
                Step::Stop
            } else {
                Step::Next
            }
        }
        Ok(_) => match (gone, step_if_retry) {
            (true, _) => Step::Stop,
            (false, Some(at)) => Step::RetryAt(at),
            (false, None) => Step::Next,
        },
        Err(err) => {
            warn!(id = %item.id, %err, "cannot record a delivery attempt");
            if gone {
                Step::Stop
            } else {
                Step::RetryAt(now_ms() + 1000)
            }
        }
    }
}

/// Why an exchange produced no response.
pub(crate) struct Failure {
    pub(crate) error: String,
    /// The connection is gone (rather than the app being slow or down).
    pub(crate) gone: bool,
}

impl Failure {
    fn gone(error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            gone: true,
        }
    }
}

/// Sends `item` through `live` and waits for the complete response.
async fn exchange(
    relay: &Relay,
    live: &Live,
    item: &QueuedRequest,
    attempt: u32,
    timeout: Duration,
) -> Result<Response, Failure> {
    let id = item.id.to_string();
    let age_secs = (now_ms() - item.received_at).max(0) / 1000;
    let mut headers = HeaderList::with_capacity(item.headers.len() + 2);
    for (name, value) in item.headers.iter() {
        headers.push(name, value);
    }
    headers.push(DELIVERY_ID_HEADER, id.clone());
    headers.push(DELIVERY_AGE_HEADER, age_secs.to_string());
    let stored = Stored {
        method: &item.method,
        target: &item.target,
        headers,
        body: &item.body,
        delivery: Delivery {
            id,
            received_at_ms: item.received_at,
            attempt,
            queued: true,
        },
    };
    send_stored(live, stored, timeout, relay.config.record_max_body).await
}

/// A recorded request on its way to the app again (a delivery from the queue, or a replay).
pub(crate) struct Stored<'a> {
    pub(crate) method: &'a str,
    pub(crate) target: &'a str,
    /// The headers to send, delivery headers included.
    pub(crate) headers: HeaderList,
    pub(crate) body: &'a Bytes,
    pub(crate) delivery: Delivery,
}

/// Sends a recorded request (head and whole body) through `live` and waits, up to `timeout`,
/// for the app's complete response, of whose body the first `keep` bytes are kept.
pub(crate) async fn send_stored(
    live: &Live,
    stored: Stored<'_>,
    timeout: Duration,
    keep: usize,
) -> Result<Response, Failure> {
    let stream_id = live
        .next_stream_id()
        .ok_or_else(|| Failure::gone("stream ids exhausted"))?;
    let (sender, body, head_rx, guard) = live
        .mux
        .open_stream(stream_id)
        .map_err(|err| Failure::gone(err.to_string()))?;
    let has_body = !stored.body.is_empty();
    let head = RequestHead {
        stream: stream_id,
        method: stored.method.to_owned(),
        target: stored.target.to_owned(),
        version: HttpVersion::Http11,
        headers: stored.headers,
        has_body,
        delivery: Some(stored.delivery),
    };
    sender
        .send_control(Control::RequestHead(head))
        .await
        .map_err(|err| Failure::gone(err.to_string()))?;
    let failed = |error: String| Failure {
        gone: live.mux.is_closed(),
        error,
    };
    let exchange = async {
        let send = async {
            if has_body {
                let _ = sender.send_data(stored.body.clone(), true).await;
            }
        };
        let ((), head) = tokio::join!(send, head_rx);
        let Ok(Control::ResponseHead(head)) = head else {
            return Err(failed(format!("no response: {}", guard.cancel_reason())));
        };
        let (body, body_len) = if head.has_body {
            read_capped(body.with_guard(guard), keep)
                .await
                .map_err(failed)?
        } else {
            guard.finish();
            (Bytes::new(), 0)
        };
        Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
            body_len,
            duration: Duration::ZERO,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(failed(format!(
            "no response within the relay's timeout ({}s)",
            timeout.as_secs_f64()
        ))),
    }
}

/// Reads the app's response `body` to its end (the answer is complete only then), keeping its
/// first `limit` bytes; returns them and the body's full length.
pub(crate) async fn read_capped(
    mut body: ferry_mux::TunnelBody,
    limit: usize,
) -> Result<(Bytes, u64), String> {
    let mut kept = bytes::BytesMut::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| format!("response body failed: {}", err.0))?;
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
            let room = limit.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok((kept.freeze(), len))
}
