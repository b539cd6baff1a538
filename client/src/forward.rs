//! Forwarding one request to the local app and streaming its response back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_mux::{MuxHandle, PumpError, StreamGuard, StreamSender, TunnelBody};
use ferry_protocol::{Control, HeaderList, RequestHead, ResponseHead};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::mpsc;
use tracing::debug;

use crate::app::AppConnections;
use crate::dedupe::{DeliveredIds, Seen};
use crate::events::{millis, Event, RequestEvent};
use crate::target::Target;

/// Body of requests sent to the local app.
type AppBody = Either<Empty<Bytes>, TunnelBody>;

/// Shared by every forwarded request of one client.
pub(crate) struct Forwarder {
    pub(crate) target: Target,
    pub(crate) timeout: Duration,
    app: Arc<AppConnections<AppBody>>,
    events: mpsc::Sender<Event>,
    next_id: AtomicU64,
    /// Delivery ids already handed to the app, for the current session.
    delivered: Mutex<Option<Arc<DeliveredIds>>>,
}

/// Header on the answer to a delivery the app had already seen.
pub const DUPLICATE_HEADER: &str = "ferry-duplicate";

impl Forwarder {
    /// Must be called within a tokio runtime (the pool of connections to the app starts a task).
    pub(crate) fn new(target: Target, timeout: Duration, events: mpsc::Sender<Event>) -> Self {
        // Every request in flight may hold a connection to the app; keep them all for reuse
        // (a smaller pool would close and reopen connections under a burst: at 128 concurrent
        // requests and 64 kept, 5,000 new connections in 3 s and a third less throughput).
        // Bounded by the streams a tunnel carries at once; idle ones close after 30 s.
        let app = AppConnections::new(
            target.authority().to_string(),
            ferry_mux::MAX_STREAMS,
            Duration::from_secs(30),
            Duration::from_secs(10),
        );
        Forwarder {
            target,
            timeout,
            app,
            events,
            next_id: AtomicU64::new(1),
            delivered: Mutex::new(None),
        }
    }

    /// Uses `ids` to remember delivered ids from now on (after a welcome).
    pub(crate) fn set_delivered(&self, ids: Arc<DeliveredIds>) {
        *self.delivered.lock().expect("delivered lock") = Some(ids);
    }

    fn delivered(&self) -> Option<Arc<DeliveredIds>> {
        self.delivered.lock().expect("delivered lock").clone()
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
        tokio::spawn(async move {
            let (sender, body, _, guard) = parts;
            let event = this.exchange(head, sender, body, &guard).await;
            let _ = this.events.send(Event::Request(event)).await;
        });
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
            Ok(request) => {
                event.path = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
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
            Ok((response, connection)) => {
                event.status = response.status().as_u16();
                // The app answered: unless it failed (5xx, which the relay retries), the id
                // is on disk before the relay hears of it, so a redelivery after a lost
                // acknowledgement is not passed to the app again.
                if let Some((ids, id)) = dedupe.0.take() {
                    if response.status().is_server_error() {
                        ids.abandon(&id);
                    } else if let Err(err) = ids.commit(&id).await {
                        tracing::warn!(%err, id, "could not record the delivered id");
                    }
                }
                let (parts, body) = response.into_parts();
                let has_body = !http_body::Body::is_end_stream(&body);
                let head = ResponseHead {
                    stream: sender.id(),
                    status: parts.status.as_u16(),
                    headers: header_list(&parts.headers),
                    has_body,
                };
                if !has_body {
                    self.app.release(connection);
                    match sender.send_control(Control::ResponseHead(head)).await {
                        Ok(()) => guard.finish(),
                        Err(err) => event.error = Some(err.to_string()),
                    }
                } else {
                    match sender
                        .send_head_and_body(sender.encode(&Control::ResponseHead(head)), body, None)
                        .await
                    {
                        Ok(sent) => {
                            // The answer was read to its end: the connection can take another.
                            self.app.release(connection);
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

    fn build_request(
        &self,
        head: &RequestHead,
        body: TunnelBody,
    ) -> Result<Request<AppBody>, String> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", head.method))?;
        // Origin form (`/path?query`): the connection is to the target, and only to it.
        let uri = http::Uri::from(self.target.path_for(&head.target)?);
        let mut headers = HeaderMap::with_capacity(head.headers.len() + 1);
        for (name, value) in head.headers.iter_shared() {
            let name = header_name(name)?;
            if is_connection_specific(&name) || name == header::HOST {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(value)
                .map_err(|_| format!("invalid value for header {name}"))?;
            headers.append(name, value);
        }
        let host = HeaderValue::from_str(self.target.authority().as_str())
            .map_err(|_| "invalid target host".to_owned())?;
        headers.insert(header::HOST, host);
        let body = if head.has_body {
            Either::Right(body)
        } else {
            Either::Left(Empty::new())
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// Sends `request` to the app; the connection comes back with the response, to be
    /// released once the response's body has been read.
    async fn call(
        &self,
        request: Request<AppBody>,
    ) -> Result<
        (http::Response<hyper::body::Incoming>, SendRequest<AppBody>),
        (StatusCode, &'static str, String),
    > {
        let target = &self.target;
        match tokio::time::timeout(self.timeout, self.app.send(request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => {
                let cause = err.describe();
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

/// `name` as an `http` header name. The names the relay adds to every request are known in
/// advance: taken as static names, they cost no allocation and no validation (an unknown name
/// is copied into a buffer of its own).
fn header_name(name: &str) -> Result<HeaderName, String> {
    let known = match name {
        "x-forwarded-for" => "x-forwarded-for",
        "x-forwarded-proto" => "x-forwarded-proto",
        "x-forwarded-host" => "x-forwarded-host",
        "x-forwarded-prefix" => "x-forwarded-prefix",
        _ => {
            return HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))
        }
    };
    Ok(HeaderName::from_static(known))
}

fn is_connection_specific(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "proxy-connection" | "keep-alive" | "te" | "transfer-encoding" | "upgrade"
    )
}

/// The app's response headers as a list, keeping duplicates and bytes.
fn header_list(headers: &HeaderMap) -> HeaderList {
    let mut list = HeaderList::with_capacity(headers.len());
    for (name, value) in headers {
        list.push(name.as_str(), value.as_bytes());
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_known_in_advance_are_the_same_names() {
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-prefix",
            "content-type",
            "x-github-delivery",
        ] {
            assert_eq!(
                header_name(name).unwrap(),
                HeaderName::from_bytes(name.as_bytes()).unwrap()
            );
        }
        assert!(header_name("bad name").unwrap_err().contains("bad name"));
    }
}
