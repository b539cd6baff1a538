//! Forwarding one request to the local app and streaming its response back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_mux::{MuxHandle, PumpError, StreamGuard, StreamSender, TunnelBody};
use ferry_protocol::{Control, HeaderList, RequestHead, ResponseHead};
use http::StatusCode;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tracing::debug;

use crate::app::{AppConnections, AppRequest, AppResponse, AppTls};
use crate::dedupe::{DeliveredIds, Seen};
use crate::events::{millis, Event, RequestEvent};
use crate::http1;
use crate::target::Target;

/// Shared by every forwarded request of one client.
pub(crate) struct Forwarder {
    pub(crate) target: Target,
    pub(crate) timeout: Duration,
    app: Arc<AppConnections>,
    events: mpsc::Sender<Event>,
    /// Numbers the console's requests, across lanes.
    next_id: Arc<AtomicU64>,
    /// Delivery ids already handed to the app, for the current session.
    delivered: Mutex<Option<Arc<DeliveredIds>>>,
}

/// Header on the answer to a delivery the app had already seen.
pub const DUPLICATE_HEADER: &str = "ferry-duplicate";

impl Forwarder {
    /// Must be called within a tokio runtime (the pool of connections to the app starts a task).
    pub(crate) fn new(
        target: Target,
        timeout: Duration,
        events: mpsc::Sender<Event>,
    ) -> Result<Self, String> {
        // Every request in flight may hold a connection to the app; keep them all for reuse
        // (a smaller pool would close and reopen connections under a burst: at 128 concurrent
        // requests and 64 kept, 5,000 new connections in 3 s and a third less throughput).
        // Bounded by the streams a tunnel carries at once; idle ones close after 30 s.
        let tls = match target.is_tls() {
            true => Some(AppTls::new(target.host())?),
            false => None,
        };
        let app = AppConnections::new(
            target.connect_to(),
            tls,
            ferry_mux::MAX_STREAMS,
            Duration::from_secs(30),
            Duration::from_secs(10),
        );
        Ok(Forwarder {
            target,
            timeout,
            app,
            events,
            next_id: Arc::new(AtomicU64::new(1)),
            delivered: Mutex::new(None),
        })
    }

    /// Uses `ids` to remember delivered ids from now on (after a welcome).
    pub(crate) fn set_delivered(&self, ids: Arc<DeliveredIds>) {
        *self.delivered.lock().expect("delivered lock") = Some(ids);
    }

    fn delivered(&self) -> Option<Arc<DeliveredIds>> {
        self.delivered.lock().expect("delivered lock").clone()
    }

    /// A forwarder for an extra lane: the same target, console numbering and delivered ids,
    /// with connections to the app of its own (its pool's task runs on the lane's runtime, so
    /// this must be called there).
    pub(crate) fn for_lane(&self) -> Result<Forwarder, String> {
        let mut lane = Forwarder::new(self.target.clone(), self.timeout, self.events.clone())?;
        lane.next_id = self.next_id.clone();
        *lane.delivered.get_mut().expect("delivered lock") = self.delivered();
        Ok(lane)
    }

    /// Starts forwarding the request `head` announced on `mux`.
    pub(crate) fn spawn(self: &Arc<Self>, mux: &MuxHandle, head: RequestHead) {
        let parts = match mux.open_stream(head.stream) {
            Ok(parts) => parts,
            Err(err) => {
                debug!(stream = head.stream, %err, "cannot open stream");
                return;
            }
        };
        let this = self.clone();
        // Boxed: the forwarding future is several KiB, and tokio moves a task's future by value
        // as it spawns and finishes the task, where a box moves as a pointer.
        tokio::spawn(Box::pin(async move {
            let (sender, body, _, guard) = parts;
            let event = this.exchange(head, sender, body, &guard).await;
            let _ = this.events.send(Event::Request(event)).await;
        }));
    }

    async fn exchange(
        &self,
        head: RequestHead,
        sender: StreamSender,
        body: TunnelBody,
        guard: &StreamGuard,
    ) -> RequestEvent {
        let started = Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut event = RequestEvent::new(id, &head.method, &head.target);
        // A delivery of a recorded request: refuse to hand an id to the app twice.
        let mut dedupe: Option<(Arc<DeliveredIds>, String)> = None;
        if let Some(delivery) = &head.delivery {
            let now = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(i64::MAX);
            event.delivery_id = Some(delivery.id.clone());
            event.age_ms =
                Some(u64::try_from(now.saturating_sub(delivery.received_at_ms)).unwrap_or(0));
            event.attempt = Some(delivery.attempt);
            if let Some(ids) = self.delivered() {
                match ids.begin(&delivery.id) {
                    Seen::Fresh => dedupe = Some((ids, delivery.id.clone())),
                    seen => {
                        return self
                            .answer_duplicate(
                                seen,
                                &delivery.id,
                                sender,
                                body,
                                guard,
                                event,
                                started,
                            )
                            .await;
                    }
                }
            }
        }
        let mut dedupe = DedupeGuard(dedupe);
        let outcome = match self.build_request(&head, body) {
            Ok((request, path)) => {
                event.path = path;
                tokio::select! {
                    outcome = self.call(request) => outcome,
                    _ = guard.cancelled() => {
                        event.status = 499;
                        event.error = Some(format!("cancelled: {}", guard.cancel_reason()));
                        event.duration_ms = millis(started.elapsed());
                        return event;
                    }
                }
            }
            Err(detail) => Err((StatusCode::BAD_REQUEST, "bad request", detail)),
        };
        match outcome {
            Ok(AppResponse {
                status,
                headers,
                body: mut app_body,
            }) => {
                event.status = status;
                // The app answered: unless it failed (5xx, which the relay retries), the id
                // is on disk before the relay hears of it, so a redelivery after a lost
                // acknowledgement is not passed to the app again.
                if let Some((ids, id)) = dedupe.0.take() {
                    if status >= 500 {
                        ids.abandon(&id);
                    } else if let Err(err) = ids.commit(&id).await {
                        tracing::warn!(%err, id, "could not record the delivered id");
                    }
                }
                let has_body = !app_body.is_end_stream();
                let head = ResponseHead {
                    stream: sender.id(),
                    status,
                    headers,
                    has_body,
                };
                if !has_body {
                    if let Some(conn) = app_body.into_reusable() {
                        self.app.release(conn);
                    }
                    match sender.send_control(Control::ResponseHead(head)).await {
                        Ok(()) => guard.finish(),
                        Err(err) => event.error = Some(err.to_string()),
                    }
                } else {
                    match sender
                        .send_head_and_body(
                            sender.encode(&Control::ResponseHead(head)),
                            &mut app_body,
                            None,
                        )
                        .await
                    {
                        Ok(sent) => {
                            // The answer was read to its end: the connection can take another.
                            if let Some(conn) = app_body.into_reusable() {
                                self.app.release(conn);
                            }
                            event.response_bytes = sent;
                            guard.finish();
                        }
                        Err(PumpError::Body(err)) => {
                            let reason = format!("local app failed mid-response: {err}");
                            guard.cancel(&reason);
                            event.error = Some(reason);
                        }
                        Err(err) => event.error = Some(err.to_string()),
                    }
                }
            }
            Err((status, error, detail)) => {
                event.status = status.as_u16();
                event.error = Some(detail.clone());
                let body = serde_json::json!({ "error": error, "detail": detail }).to_string();
                let mut headers = HeaderList::new();
                headers.push("content-type", "application/json");
                headers.push("content-length", body.len().to_string());
                let head = ResponseHead {
                    stream: sender.id(),
                    status: status.as_u16(),
                    headers,
                    has_body: true,
                };
                if sender
                    .send_control(Control::ResponseHead(head))
                    .await
                    .is_ok()
                    && sender.send_data(Bytes::from(body), true).await.is_ok()
                {
                    guard.finish();
                }
            }
        }
        // What the app took of the body (the stream's body counts what it hands out).
        event.request_bytes = guard.body_bytes_read();
        event.duration_ms = millis(started.elapsed());
        event
    }

    /// Answers a delivery whose id the app has already seen (or is seeing right now) without
    /// calling the app: `200` with `ferry-duplicate: 1`, or `503` while the first is in flight.
    #[allow(clippy::too_many_arguments)]
    async fn answer_duplicate(
        &self,
        seen: Seen,
        id: &str,
        sender: StreamSender,
        body: TunnelBody,
        guard: &StreamGuard,
        mut event: RequestEvent,
        started: Instant,
    ) -> RequestEvent {
        // Drain the request body so the relay's upload completes.
        if let Ok(collected) = body.collect().await {
            event.request_bytes = collected.to_bytes().len() as u64;
        }
        let (status, marker, json) = if seen == Seen::Delivered {
            (
                StatusCode::OK,
                "1",
                serde_json::json!({ "duplicate": true, "id": id }),
            )
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "in-flight",
                serde_json::json!({ "duplicate": true, "id": id, "in_flight": true }),
            )
        };
        let text = json.to_string();
        let mut headers = HeaderList::new();
        headers.push("content-type", "application/json");
        headers.push("content-length", text.len().to_string());
        headers.push(DUPLICATE_HEADER, marker);
        if seen == Seen::InFlight {
            headers.push("retry-after", "1");
        }
        let head = ResponseHead {
            stream: sender.id(),
            status: status.as_u16(),
            headers,
            has_body: true,
        };
        event.status = status.as_u16();
        event.duplicate = true;
        event.response_bytes = text.len() as u64;
        if sender
            .send_control(Control::ResponseHead(head))
            .await
            .is_ok()
            && sender.send_data(Bytes::from(text), true).await.is_ok()
        {
            guard.finish();
        }
        event.duration_ms = millis(started.elapsed());
        event
    }

    /// The request for the app, and its path and query (for the console).
    fn build_request(
        &self,
        head: &RequestHead,
        body: TunnelBody,
    ) -> Result<(AppRequest<TunnelBody>, String), String> {
        // Origin form (`/path?query`): the connection is to the target, and only to it.
        let path = self.target.path_for(&head.target)?;
        let mut bytes = BytesMut::new();
        let framing = http1::write_request_head(
            &mut bytes,
            &head.method,
            path.as_str(),
            self.target.authority().as_str(),
            &head.headers,
            head.has_body,
        )?;
        let request = AppRequest {
            head: bytes,
            framing,
            body,
            head_request: head.method == "HEAD",
        };
        Ok((request, path.as_str().to_owned()))
    }

    /// Sends `request` to the app and reads the response head; the connection comes with the
    /// response's body, to be released once that has been read.
    async fn call(
        &self,
        request: AppRequest<TunnelBody>,
    ) -> Result<AppResponse, (StatusCode, &'static str, String)> {
        let target = &self.target;
        match tokio::time::timeout(self.timeout, self.app.send(request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => {
                let cause = err.describe(target.is_tls());
                Err((
                    StatusCode::BAD_GATEWAY,
                    "local app unreachable",
                    format!("ferry could not get a response from {target}: {cause}"),
                ))
            }
            Err(_) => Err((
                StatusCode::GATEWAY_TIMEOUT,
                "local app timeout",
                format!(
                    "{target} did not answer within {}s (ferry --timeout)",
                    self.timeout.as_secs_f64()
                ),
            )),
        }
    }
}

/// Releases an id marked in flight when the exchange ends without the app's answer.
struct DedupeGuard(Option<(Arc<DeliveredIds>, String)>);

impl Drop for DedupeGuard {
    fn drop(&mut self) {
        if let Some((ids, id)) = self.0.take() {
            ids.abandon(&id);
        }
    }
}
