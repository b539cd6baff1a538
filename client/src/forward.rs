//! Forwarding one request to the local app and streaming its response back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_mux::{MuxHandle, PumpError, StreamGuard, StreamSender, TunnelBody};
use ferry_protocol::{Control, HeaderList, RequestHead, ResponseHead};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tracing::debug;

use crate::events::{millis, Event, RequestEvent};
use crate::target::Target;

/// Body of requests sent to the local app.
type AppBody = Either<Empty<Bytes>, http_body_util::combinators::MapFrame<TunnelBody, CountFn>>;
type CountFn = Box<dyn FnMut(http_body::Frame<Bytes>) -> http_body::Frame<Bytes> + Send + Sync>;

/// Shared by every forwarded request of one client.
pub(crate) struct Forwarder {
    pub(crate) target: Target,
    pub(crate) timeout: Duration,
    client: Client<HttpConnector, AppBody>,
    events: mpsc::Sender<Event>,
    next_id: AtomicU64,
}

impl Forwarder {
    pub(crate) fn new(target: Target, timeout: Duration, events: mpsc::Sender<Event>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Forwarder {
            target,
            timeout,
            client,
            events,
            next_id: AtomicU64::new(1),
        }
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
        let request_bytes = Arc::new(AtomicU64::new(0));
        let mut event = RequestEvent {
            id,
            method: head.method.clone(),
            path: head.target.clone(),
            status: 0,
            duration_ms: 0.0,
            request_bytes: 0,
            response_bytes: 0,
            error: None,
        };
        let outcome = match self.build_request(&head, body, request_bytes.clone()) {
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
            Ok(response) => {
                event.status = response.status().as_u16();
                let (parts, body) = response.into_parts();
                let has_body = !http_body::Body::is_end_stream(&body);
                let head = ResponseHead {
                    stream: sender.id(),
                    status: parts.status.as_u16(),
                    headers: header_list(&parts.headers),
                    has_body,
                };
                if let Err(err) = sender.send_control(Control::ResponseHead(head)).await {
                    event.error = Some(err.to_string());
                } else if has_body {
                    match sender.pump(body, None).await {
                        Ok(sent) => {
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
                } else {
                    guard.finish();
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
        event.request_bytes = request_bytes.load(Ordering::Relaxed);
        event.duration_ms = millis(started.elapsed());
        event
    }

    fn build_request(
        &self,
        head: &RequestHead,
        body: TunnelBody,
        counter: Arc<AtomicU64>,
    ) -> Result<Request<AppBody>, String> {
        let method = Method::from_bytes(head.method.as_bytes())
            .map_err(|_| format!("invalid method {:?}", head.method))?;
        let uri = self.target.uri_for(&head.target)?;
        let mut headers = HeaderMap::with_capacity(head.headers.len() + 1);
        for (name, value) in head.headers.iter() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            if is_connection_specific(&name) || name == header::HOST {
                continue;
            }
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| format!("invalid value for header {name}"))?;
            headers.append(name, value);
        }
        let host = HeaderValue::from_str(self.target.authority().as_str())
            .map_err(|_| "invalid target host".to_owned())?;
        headers.insert(header::HOST, host);
        let body = if head.has_body {
            let count: CountFn = Box::new(move |frame| {
                if let Some(data) = frame.data_ref() {
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                frame
            });
            Either::Right(body.map_frame(count))
        } else {
            Either::Left(Empty::new())
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    async fn call(
        &self,
        request: Request<AppBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, (StatusCode, &'static str, String)> {
        let target = self.target.to_string();
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => {
                let cause = describe(&err);
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

/// The innermost cause of a client error, in words.
fn describe(err: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    let mut text = err.to_string();
    while let Some(inner) = source {
        text = inner.to_string();
        source = inner.source();
    }
    if err.is_connect() {
        format!("{text} (is the app running?)")
    } else {
        text
    }
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
