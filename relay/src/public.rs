//! Public requests: find the session, carry the exchange through its tunnel, relay the answer.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use ferry_mux::{MuxError, PumpError};
use ferry_protocol::{Control, HttpVersion, RequestHead};
use http::{header, HeaderName, HeaderValue, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use http_body_util::Either;
use tracing::{debug, warn};

use crate::delivery::Enqueuing;
use crate::record::{Exchange, Tee};
use crate::registry::{Live, Session};
use crate::store::{now_ms, NewRequest, OfflinePolicy, RequestState, RespondMode};

use crate::caller::{CallerBody, CallerHead, CallerRequest};
use crate::headers::to_header_map;
use crate::reply::{self, RelayBody};
use crate::Relay;

/// Header naming the queued request's id on a `202` (or `--respond-now`) answer.
const QUEUED_ID_HEADER: &str = "ferry-queued-id";

/// Seconds a caller is told to wait before retrying a session with no client.
const RETRY_AFTER_SECS: &str = "5";

/// Splits `/SESSION/rest?query` into `SESSION` and the exact rest (`/rest?query`, `?query` or
/// nothing); the client puts the rest below its target's path prefix.
fn split_session(path_and_query: &str) -> Option<(&str, &str)> {
    let rest = path_and_query.strip_prefix('/')?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (session, tail) = rest.split_at(end);
    if session.is_empty() {
        return None;
    }
    Some((session, tail))
}

fn protocol_version(version: Version) -> HttpVersion {
    match version {
        Version::HTTP_10 | Version::HTTP_09 => HttpVersion::Http10,
        Version::HTTP_2 => HttpVersion::Http2,
        Version::HTTP_3 => HttpVersion::Http3,
        _ => HttpVersion::Http11,
    }
}

/// Handles a request for a session URL.
pub(crate) async fn forward(
    relay: Arc<Relay>,
    req: CallerRequest,
    peer: SocketAddr,
) -> Response<RelayBody> {
    let CallerRequest { head: parts, body } = req;
    let path_and_query = parts.target.as_str();
    let Some((session_id, target)) = split_session(path_and_query) else {
        return reply::error(
            StatusCode::NOT_FOUND,
            "unknown session",
            "the URL names no session; webhook URLs look like <relay>/<session>/<path>",
        );
    };
    let Some(session) = relay.registry.get(session_id) else {
        return reply::error(
            StatusCode::NOT_FOUND,
            "unknown session",
            &format!("no session '{session_id}' on this relay"),
        );
    };
    let live = session.live_for_caller();
    let respond = match relay.config.store {
        Some(_) => session.respond_mode(),
        None => RespondMode::Pass,
    };
    if relay.config.store.is_some() {
        // Queue when no client is connected (unless the session opted out), and behind a
        // backlog even when one is, so that delivery order is arrival order; always when the
        // session answers at once.
        let queue = match (&live, &respond) {
            (_, RespondMode::Now { .. }) => true,
            (None, _) => session.offline_policy() == OfflinePolicy::Queue,
            (Some(_), _) => session.queue.lock().expect("queue lock").backlog,
        };
        if queue {
            let enqueuing = Enqueuing::begin(session.clone());
            // Boxed, here and in `pass`: inline, its state would size every request's future.
            return Box::pin(enqueue(
                &relay, &session, &parts, body, peer, target, enqueuing,
            ))
            .await;
        }
    }
    let Some(live) = live else {
        let mut response = reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no client connected",
            &format!(
                "session '{session_id}' exists but no ferry client is connected to it right now"
            ),
        );
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
        return response;
    };
    let target = target.to_owned();
    // `pass` is built where it is awaited: a future held in a local and then awaited takes two
    // slots in this one's state (6.9 KiB per request with `enqueue` inline, 2.5 KiB now).
    let RespondMode::Deadline { millis } = respond else {
        return pass(relay, session, live, parts, body, peer, target).await;
    };
    // The real answer if it comes in time; otherwise 202 now, and the exchange carries on
    // in the background (its response drained so that it is recorded).
    let mut exchange = Box::pin(pass(relay, session, live, parts, body, peer, target));
    let deadline = std::time::Duration::from_millis(millis);
    tokio::select! {
        response = &mut exchange => response,
        _ = tokio::time::sleep(deadline) => {
            tokio::spawn(async move {
                let mut body = exchange.await.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            });
            reply::json(
                StatusCode::ACCEPTED,
                serde_json::json!({
                    "accepted": true,
                    "detail": format!(
                        "the local app did not answer within the session's deadline ({}s); the request carries on to it and its result is recorded in history",
                        deadline.as_secs_f64()
                    ),
                }),
            )
        }
    }
}

/// Carries one exchange through the session's live tunnel and relays the app's answer.
async fn pass(
    relay: Arc<Relay>,
    session: Arc<Session>,
    live: Live,
    parts: CallerHead,
    body: CallerBody,
    peer: SocketAddr,
    target: String,
) -> Response<RelayBody> {
    let session_id = session.id.as_str();
    let target = target.as_str();
    let max_body = relay.config.max_body;
    let declared = parts.headers.content_length();
    if declared.is_some_and(|length| length > max_body) {
        return too_large(max_body);
    }
    let Some(stream_id) = live.next_stream_id() else {
        live.mux.close("stream ids exhausted; reconnecting");
        return disconnected(session_id, "the tunnel is being renewed");
    };
    let (sender, response_body, head_rx, guard) = match live.mux.open_stream(stream_id) {
        Ok(parts) => parts,
        Err(err @ MuxError::TooManyStreams(_)) => {
            let mut response = reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight",
                &err.to_string(),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Err(err) => {
            // The client went away just now; nothing of the request was sent, so it can
            // still be queued.
            if relay.config.store.is_some() && session.offline_policy() == OfflinePolicy::Queue {
                let enqueuing = Enqueuing::begin(session.clone());
                return Box::pin(enqueue(
                    &relay, &session, &parts, body, peer, target, enqueuing,
                ))
                .await;
            }
            return disconnected(session_id, &err.to_string());
        }
    };
    let has_body = !body.is_end_stream();
    let headers = forwarded_headers(&relay, &parts, peer, session_id);
    // History: the exchange is copied as it streams by and written after it ends.
    let mut exchange = relay.recorder.as_ref().map(|recorder| {
        Exchange::begin(
            recorder,
            session_id,
            parts.method.as_str(),
            target,
            relay.config.record_max_body,
        )
    });
    let body = Tee::new(body, exchange.as_ref().map(|e| e.request_body.clone()));
    let head = Control::RequestHead(RequestHead {
        stream: stream_id,
        method: parts.method.as_str().to_owned(),
        target: target.to_owned(),
        version: protocol_version(parts.version),
        headers,
        has_body,
        delivery: None,
    });
    // Encoded now, so that history can take the headers over rather than a copy of them.
    let encoded = sender.encode(&head);
    if let (Some(exchange), Control::RequestHead(head)) = (exchange.as_mut(), head) {
        exchange.headers = head.headers;
    }
    let mut head = Some(encoded);
    if !has_body {
        if let Err(err) = sender.send_encoded(head.take().expect("head")).await {
            return disconnected(session_id, &err.to_string());
        }
    }

    // The caller's body is pumped inside this handler while it waits for the answer, so a
    // typical webhook (body complete before the app answers) costs no extra task; only a body
    // still streaming when the head arrives is handed to a task of its own.
    let mut pump = has_body.then(|| {
        let sender = sender.clone();
        let head = head.take().expect("head");
        Box::pin(async move { sender.send_head_and_body(head, body, Some(max_body)).await })
    });
    let timeout = tokio::time::sleep(relay.config.timeout);
    tokio::pin!(timeout);
    tokio::pin!(head_rx);
    let head = loop {
        tokio::select! {
            head = &mut head_rx => break head,
            pumped = async { pump.as_mut().expect("guarded").await }, if pump.is_some() => {
                pump = None;
                let err = match pumped {
                    Ok(_) => continue,
                    Err(err) => err,
                };
                return match err {
                    PumpError::TooLarge(limit) => {
                        guard.cancel("request body too large");
                        too_large(limit)
                    }
                    PumpError::Body(detail) => {
                        guard.cancel("caller's request body failed");
                        debug!(%detail, "caller's body failed");
                        reply::error(StatusCode::BAD_REQUEST, "bad request body", &detail)
                    }
                    PumpError::Mux(err) => {
                        failed(exchange, &err.to_string());
                        disconnected(session_id, &err.to_string())
                    }
                };
            }
            _ = &mut timeout => {
                guard.cancel("no response within the relay's timeout");
                failed(exchange, "no response within the relay's timeout");
                return reply::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "client timeout",
                    &format!("the ferry client did not answer within {}s", relay.config.timeout.as_secs_f64()),
                );
            }
        }
    };
    if let Some(rest) = pump {
        // The app answered before the body was all sent: finish sending it in the background
        // (the stream's cancel stops it if the exchange ends first).
        tokio::spawn(async move {
            let _ = rest.await;
        });
    }
    let head = match head {
        Ok(Control::ResponseHead(head)) => head,
        Ok(_) | Err(_) => {
            failed(exchange, &guard.cancel_reason());
            return disconnected(session_id, &guard.cancel_reason());
        }
    };
    let status = match StatusCode::from_u16(head.status) {
        Ok(status) if !status.is_informational() => status,
        _ => {
            guard.cancel("invalid response status");
            return reply::error(
                StatusCode::BAD_GATEWAY,
                "invalid response",
                &format!("the client sent status {}", head.status),
            );
        }
    };
    let headers = match to_header_map(&head.headers) {
        Ok(headers) => headers,
        Err(detail) => {
            guard.cancel("invalid response header");
            return reply::error(StatusCode::BAD_GATEWAY, "invalid response", &detail);
        }
    };
    let body = if head.has_body {
        let body = response_body.with_guard(guard);
        Either::Right(match exchange {
            Some(exchange) => body.with_tap(exchange.response_tap(head.status, head.headers)),
            None => body,
        })
    } else {
        guard.finish();
        if let Some(exchange) = exchange {
            exchange.answered(head.status, head.headers);
        }
        reply::empty()
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Records the request durably as queued and answers `202` with its id.
async fn enqueue(
    relay: &Arc<Relay>,
    session: &Arc<Session>,
    parts: &CallerHead,
    body: CallerBody,
    peer: SocketAddr,
    target: &str,
    enqueuing: Enqueuing,
) -> Response<RelayBody> {
    let session_id = session.id.as_str();
    let max_body = relay.config.max_body;
    let declared = parts.headers.content_length();
    if declared.is_some_and(|length| length > max_body) {
        return too_large(max_body);
    }
    let capacity = declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    let (body, _held) = match read_for_queue(body, capacity, max_body, &relay.queue_memory).await {
        Ok(read) => read,
        Err(QueueReadError::TooLarge) => return too_large(max_body),
        Err(QueueReadError::Body(detail)) => {
            debug!(%detail, "caller's body failed");
            return reply::error(StatusCode::BAD_REQUEST, "bad request body", &detail);
        }
        Err(QueueReadError::Busy) => {
            let mut response = reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "relay busy",
                "the relay is storing as many request bodies as it can hold in memory right now; retry shortly",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
    };
    let headers = forwarded_headers(relay, parts, peer, session_id);
    let request = NewRequest::new(
        session_id,
        now_ms(),
        parts.method.as_str(),
        target,
        headers,
        body,
        RequestState::Queued,
    );
    let store = relay.config.store.as_ref().expect("queueing needs a store");
    let recorded = store.record_request(request).await;
    drop(enqueuing);
    match recorded {
        Ok(id) => {
            crate::delivery::nudge(relay, session);
            queued_answer(&session.respond_mode(), &id.to_string())
        }
        Err(err) => {
            warn!(session = %session_id, %err, "cannot queue a request");
            let mut response = reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot queue",
                &format!("the relay could not store the request: {err}"),
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            response
        }
    }
}

/// The answer to a caller whose request was queued: `202 {"queued":true,"id":...}`, or the
/// status and body the session set with `--respond-now`.
fn queued_answer(respond: &RespondMode, id: &str) -> Response<RelayBody> {
    let (status, body) = match respond {
        RespondMode::Now { status, body } => (*status, body.clone()),
        _ => (None, None),
    };
    let status = status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::ACCEPTED);
    let mut response = match body {
        None => reply::json(status, serde_json::json!({"queued": true, "id": id})),
        Some(body) => {
            let json = serde_json::from_slice::<serde_json::Value>(&body).is_ok();
            let mut response = Response::new(reply::full(body));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if json {
                    "application/json"
                } else {
                    "text/plain; charset=utf-8"
                }),
            );
            response
        }
    };
    response.headers_mut().insert(
        HeaderName::from_static(QUEUED_ID_HEADER),
        HeaderValue::from_str(id).expect("ids are ASCII"),
    );
    response
}

/// Why a body could not be read for the queue.
#[derive(Debug, PartialEq, Eq)]
enum QueueReadError {
    /// Longer than `--max-body`.
    TooLarge,
    /// The memory for bodies being queued is spent.
    Busy,
    /// The caller's body failed.
    Body(String),
}

/// Reads a body to be queued, whole (it is written to disk in one piece). All bodies being read
/// for the queue share `memory`: one that finds it spent fails with [`QueueReadError::Busy`]
/// (the caller gets 503 and Retry-After, like from any busy server) rather than the relay
/// growing without bound. The returned guard holds the body's share until it is dropped.
async fn read_for_queue<B>(
    body: B,
    declared: usize,
    max_body: u64,
    memory: &tokio::sync::Semaphore,
) -> Result<(Bytes, HeldMemory<'_>), QueueReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut chunks = bytes::BytesMut::with_capacity(declared.min(64 * 1024 * 1024));
    let mut held = HeldMemory {
        semaphore: memory,
        bytes: 0,
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| QueueReadError::Body(err.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if chunks.len() as u64 + data.len() as u64 > max_body {
            return Err(QueueReadError::TooLarge);
        }
        let permit = u32::try_from(data.len())
            .ok()
            .and_then(|n| memory.try_acquire_many(n).ok())
            .ok_or(QueueReadError::Busy)?;
        permit.forget();
        held.bytes += data.len();
        chunks.extend_from_slice(&data);
    }
    Ok((chunks.freeze(), held))
}

/// Bytes of the queue's memory held by one request being queued; given back when dropped.
struct HeldMemory<'a> {
    semaphore: &'a tokio::sync::Semaphore,
    bytes: usize,
}

impl Drop for HeldMemory<'_> {
    fn drop(&mut self) {
        self.semaphore.add_permits(self.bytes);
    }
}

/// The request's headers as the app gets them: hop-by-hop ones removed, `X-Forwarded-*` added.
fn forwarded_headers(
    relay: &Relay,
    parts: &CallerHead,
    peer: SocketAddr,
    session_id: &str,
) -> ferry_protocol::HeaderList {
    parts
        .headers
        .forwarded(peer, &relay.config.public_scheme, session_id)
}

/// Records a failed pass-through exchange.
fn failed(exchange: Option<Exchange>, error: &str) {
    if let Some(exchange) = exchange {
        exchange.failed(error);
    }
}

fn too_large(limit: u64) -> Response<RelayBody> {
    reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body too large",
        &format!("request bodies are limited to {limit} bytes on this relay (--max-body)"),
    )
}

fn disconnected(session: &str, detail: &str) -> Response<RelayBody> {
    reply::error(
        StatusCode::BAD_GATEWAY,
        "client disconnected",
        &format!("the ferry client of session '{session}' went away mid-request: {detail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::{read_for_queue, split_session, QueueReadError};
    use bytes::Bytes;
    use http_body_util::Full;

    #[tokio::test]
    async fn bodies_read_for_the_queue_share_their_memory() {
        let memory = tokio::sync::Semaphore::new(1024);
        let (first, held) =
            read_for_queue(Full::new(Bytes::from(vec![b'a'; 1000])), 0, 4096, &memory)
                .await
                .unwrap();
        assert_eq!(first.len(), 1000);
        assert_eq!(
            memory.available_permits(),
            24,
            "held while the body is being stored"
        );
        let busy = read_for_queue(Full::new(Bytes::from(vec![b'b'; 100])), 0, 4096, &memory).await;
        assert_eq!(busy.err(), Some(QueueReadError::Busy));
        assert_eq!(
            memory.available_permits(),
            24,
            "nothing kept by a refused body"
        );
        drop(held);
        assert_eq!(memory.available_permits(), 1024);
        let (second, _held) =
            read_for_queue(Full::new(Bytes::from(vec![b'b'; 100])), 0, 4096, &memory)
                .await
                .unwrap();
        assert_eq!(second.len(), 100);
        let large = read_for_queue(Full::new(Bytes::from(vec![b'c'; 200])), 0, 150, &memory).await;
        assert_eq!(large.err(), Some(QueueReadError::TooLarge));
    }

    #[test]
    fn splits_session_from_target() {
        assert_eq!(split_session("/s/a/b?x=1"), Some(("s", "/a/b?x=1")));
        assert_eq!(split_session("/s"), Some(("s", "")));
        assert_eq!(split_session("/s/"), Some(("s", "/")));
        assert_eq!(split_session("/s?x=1"), Some(("s", "?x=1")));
        assert_eq!(
            split_session("/s//a%2Fb?b=2&a=1"),
            Some(("s", "//a%2Fb?b=2&a=1"))
        );
        assert_eq!(split_session("/"), None);
        assert_eq!(split_session("//x"), None);
    }
}
