//! The history API: list, show and replay a session's recorded requests (issue 4).
//!
//! Every route is under [`PREFIX`] and needs the session owner's token as
//! `Authorization: Bearer TOKEN`:
//!
//! | Route | Answer |
//! |---|---|
//! | `GET {PREFIX}{session}/requests?status=5xx&method=POST&path=/p&since=MS&until=MS&state=failed&before=ID&limit=N` | `{"requests": [summary…], "next": ID or null}`, newest first |
//! | `GET {PREFIX}{session}/requests/{id}` | the request in full (headers, `body_b64`, response, attempts) |
//! | `POST {PREFIX}{session}/requests/{id}/replay` | delivers it again; `{"replayed": true, "id", "attempt", "status"}` |
//!
//! Errors are the relay's usual `{"error", "detail"}`: `401` for a missing or unknown token,
//! `404` for a session that does not exist *or belongs to another token* (so a token cannot
//! probe other owners' session names), `404` for an unknown request, `400` for a bad filter,
//! `409` for a replay while no client is connected, `503` when the relay keeps no store.
//!
//! # Replay and the client's duplicate check
//! The client refuses to hand a delivery id to the app twice. A replay is meant to reach the
//! app again, so it is delivered under its own delivery id, `<request id>.r<attempt>`, e.g.
//! `01JD….r3`; the original id stays in the `ferry-replay-of` header.

// Handlers return the error answer itself as `Err`, to leave early with `?`; it is built once
// per request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use ferry_protocol::{Delivery, HeaderList};
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::delivery::{send_stored, Stored};
use crate::registry::Session;
use crate::reply::{self, RelayBody};
use crate::store::{
    self, Attempt, ListFilter, Outcome, Page, RequestId, RequestRecord, RequestState,
    RequestSummary, StatusFilter, Store, StoredResponse,
};
use crate::Relay;

/// Prefix of the history API: `/_ferry/v1/sessions/{session}/requests[/{id}[/replay]]`.
pub(crate) const PREFIX: &str = "/_ferry/v1/sessions/";

/// Header naming the original request on a replayed delivery.
pub(crate) const REPLAY_OF_HEADER: &str = "ferry-replay-of";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

type Answer = Response<RelayBody>;

/// Serves one history API request.
pub(crate) async fn handle(relay: Arc<Relay>, req: Request<Incoming>) -> Response<RelayBody> {
    match serve(&relay, &req).await {
        Ok(answer) | Err(answer) => answer,
    }
}

async fn serve(relay: &Relay, req: &Request<Incoming>) -> Result<Answer, Answer> {
    let rest = req.uri().path().strip_prefix(PREFIX).unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').collect();
    let (session_id, route) = match segments.as_slice() {
        [session, "requests"] => (*session, Route::List),
        [session, "requests", id] => (*session, Route::Show(id)),
        [session, "requests", id, "replay"] => (*session, Route::Replay(id)),
        _ => {
            return Err(reply::error(
                StatusCode::NOT_FOUND,
                "not found",
                "no such history endpoint; see /_ferry/v1/sessions/{session}/requests",
            ))
        }
    };
    let session = authorize(relay, req, session_id)?;
    let Some(store) = relay.config.store.as_ref() else {
        return Err(reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no history",
            "this relay runs without a store, so it keeps no request history",
        ));
    };
    let expected = match route {
        Route::Replay(_) => Method::POST,
        _ => Method::GET,
    };
    if req.method() != expected {
        let mut answer = reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            &format!("use {expected} on this endpoint"),
        );
        if let Ok(allow) = header::HeaderValue::from_str(expected.as_str()) {
            answer.headers_mut().insert(header::ALLOW, allow);
        }
        return Err(answer);
    }
    match route {
        Route::List => list(store, &session, req.uri().query().unwrap_or("")).await,
        Route::Show(id) => {
            let record = find(store, &session, id).await?;
            Ok(reply::json(StatusCode::OK, record_json(&record)))
        }
        Route::Replay(id) => replay(relay, store, &session, id).await,
    }
}

enum Route<'a> {
    List,
    Show(&'a str),
    Replay(&'a str),
}

/// The session, if the request carries its owner's token.
fn authorize(
    relay: &Relay,
    req: &Request<Incoming>,
    session_id: &str,
) -> Result<Arc<Session>, Answer> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(unauthorized(
            "missing token: send Authorization: Bearer TOKEN (the session owner's token)",
        ));
    };
    let Some(token) = relay.tokens.verify(presented) else {
        return Err(unauthorized("this relay does not accept that token"));
    };
    match relay.registry.get(session_id) {
        Some(session) if session.owner == token => Ok(session),
        // Another owner's session looks exactly like a missing one.
        _ => Err(reply::error(
            StatusCode::NOT_FOUND,
            "unknown session",
            &format!("no session '{session_id}' belongs to this token"),
        )),
    }
}

fn unauthorized(detail: &str) -> Answer {
    let mut answer = reply::error(StatusCode::UNAUTHORIZED, "unauthorized", detail);
    answer.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    answer
}

fn bad_request(detail: &str) -> Answer {
    reply::error(StatusCode::BAD_REQUEST, "bad request", detail)
}

fn store_error(err: &store::StoreError) -> Answer {
    reply::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "store error",
        &err.to_string(),
    )
}

/// Decodes `%XX` escapes and `+` (as a space) in a query value.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8"))
}

/// The list filter and page from a query string.
fn parse_query(query: &str) -> Result<(ListFilter, Page), String> {
    let mut filter = ListFilter::default();
    let mut page = Page::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value)?;
        let number = |what: &str| {
            value
                .parse::<i64>()
                .map_err(|_| format!("{what} must be a number, not {value:?}"))
        };
        match name {
            "status" => filter.status = Some(StatusFilter::from_str(&value)?),
            "method" => filter.method = Some(value.to_ascii_uppercase()),
            "path" => filter.path_prefix = Some(value),
            "since" => filter.since = Some(number("since (Unix ms)")?),
            "until" => filter.until = Some(number("until (Unix ms)")?),
            "state" => filter.state = Some(RequestState::from_str(&value)?),
            "before" => {
                page.before = Some(RequestId::from_str(&value).map_err(|e| e.to_string())?);
            }
            "limit" => {
                let limit = value
                    .parse::<usize>()
                    .map_err(|_| format!("limit must be a number, not {value:?}"))?;
                page.limit = limit.clamp(1, Page::MAX_LIMIT);
            }
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok((filter, page))
}

async fn list(store: &Store, session: &Session, query: &str) -> Result<Answer, Answer> {
    let (filter, page) = parse_query(query).map_err(|e| bad_request(&e))?;
    let listed = store
        .list(&session.id, &filter, page)
        .await
        .map_err(|e| store_error(&e))?;
    let requests: Vec<Value> = listed.requests.iter().map(summary_json).collect();
    Ok(reply::json(
        StatusCode::OK,
        json!({
            "requests": requests,
            "next": listed.next.map(|id| id.to_string()),
        }),
    ))
}

/// The record `id` of `session`, or a `404`.
async fn find(store: &Store, session: &Session, id: &str) -> Result<RequestRecord, Answer> {
    let not_found = || {
        reply::error(
            StatusCode::NOT_FOUND,
            "unknown request",
            &format!("session '{}' has no request {id:?}", session.id),
        )
    };
    let parsed = RequestId::from_str(id).map_err(|_| not_found())?;
    match store.get(parsed).await {
        Ok(Some(record)) if record.summary.session_id == session.id => Ok(record),
        Ok(_) => Err(not_found()),
        Err(err) => Err(store_error(&err)),
    }
}

fn summary_json(s: &RequestSummary) -> Value {
    json!({
        "id": s.id.to_string(),
        "received_at_ms": s.received_at,
        "method": s.method,
        "target": s.target,
        "status": s.status,
        "state": s.state.as_str(),
        "attempts": s.attempts,
        "duration_ms": s.duration_ms,
        "delivered_at_ms": s.delivered_at,
        "provider": s.provider.as_ref().map(|p| p.provider.clone()),
        "provider_id": s.provider.as_ref().map(|p| p.id.clone()),
        "duplicate_of": s.duplicate_of.map(|id| id.to_string()),
        "body_len": s.body_len,
        "body_truncated": s.body_truncated,
    })
}

fn headers_json(headers: &HeaderList) -> Value {
    serde_json::to_value(headers).unwrap_or(Value::Null)
}

fn response_json(r: &StoredResponse, duration_ms: Option<u64>) -> Value {
    json!({
        "status": r.status,
        "headers": headers_json(&r.headers),
        "body_b64": B64.encode(&r.body),
        "body_len": r.body_len,
        "body_truncated": r.body_truncated,
        "duration_ms": duration_ms,
    })
}

fn attempt_json(a: &Attempt) -> Value {
    json!({
        "number": a.number,
        "replay": a.replay,
        "replay_of": a.replay_of,
        "started_at_ms": a.started_at,
        "finished_at_ms": a.finished_at,
        "outcome": a.outcome.as_str(),
        "status": a.status,
        "error": a.error,
    })
}

fn record_json(r: &RequestRecord) -> Value {
    let mut value = summary_json(&r.summary);
    value["session"] = json!(r.summary.session_id);
    value["headers"] = headers_json(&r.headers);
    value["body_b64"] = json!(B64.encode(&r.body));
    value["response"] = r.response.as_ref().map_or(Value::Null, |resp| {
        response_json(resp, r.summary.duration_ms)
    });
    value["attempt_log"] = Value::Array(r.attempt_log.iter().map(attempt_json).collect());
    value
}

async fn replay(
    relay: &Relay,
    store: &Store,
    session: &Session,
    id: &str,
) -> Result<Answer, Answer> {
    let record = find(store, session, id).await?;
    let conflict = |detail: &str| reply::error(StatusCode::CONFLICT, "cannot replay", detail);
    if record.summary.body_truncated {
        return Err(conflict(&format!(
            "request {id} cannot be replayed: its body was larger than the record limit and was not kept in full"
        )));
    }
    let Some(live) = session.live() else {
        return Err(conflict(&format!(
            "no ferry client is connected to session '{}'; start `ferry listen` and replay again",
            session.id
        )));
    };
    let request_id = record.summary.id;
    let attempt = match store.start_replay(request_id).await {
        Ok(attempt) => attempt,
        Err(store::StoreError::Incomplete(detail)) => return Err(conflict(&detail)),
        Err(err) => return Err(store_error(&err)),
    };
    let started = Instant::now();
    let result = exchange(relay, &live, &record, attempt).await;
    let (outcome, answer) = match result {
        Ok(mut response) => {
            response.duration = started.elapsed();
            let status = response.status;
            let answer = reply::json(
                StatusCode::OK,
                json!({
                    "replayed": true,
                    "id": request_id.to_string(),
                    "attempt": attempt,
                    "delivery_id": replay_delivery_id(request_id, attempt),
                    "status": status,
                    "duration_ms": u64::try_from(response.duration.as_millis()).unwrap_or(u64::MAX),
                }),
            );
            let outcome = if status < 500 {
                Outcome::Delivered(response)
            } else {
                Outcome::Rejected {
                    response,
                    retry_at: None,
                }
            };
            (outcome, answer)
        }
        Err(error) => {
            let answer = reply::error(
                StatusCode::BAD_GATEWAY,
                "replay failed",
                &format!("attempt {attempt} of request {request_id} got no answer: {error}"),
            );
            (
                Outcome::Error {
                    error,
                    retry_at: None,
                },
                answer,
            )
        }
    };
    if let Err(err) = store.finish_attempt(request_id, attempt, outcome).await {
        return Err(store_error(&err));
    }
    Ok(answer)
}

/// The delivery id of a replay: distinct from the original's, so the client hands it to the
/// app even though it has delivered the original.
fn replay_delivery_id(id: RequestId, attempt: u32) -> String {
    format!("{id}.r{attempt}")
}

/// Sends the recorded request through `live` and waits for the complete response.
async fn exchange(
    relay: &Relay,
    live: &crate::registry::Live,
    record: &RequestRecord,
    attempt: u32,
) -> Result<store::Response, String> {
    let mut headers = HeaderList::with_capacity(record.headers.len() + 1);
    for (name, value) in record.headers.iter() {
        if name.eq_ignore_ascii_case(REPLAY_OF_HEADER) {
            continue;
        }
        headers.push(name, value);
    }
    headers.push(REPLAY_OF_HEADER, record.summary.id.to_string());
    let stored = Stored {
        method: &record.summary.method,
        target: &record.summary.target,
        headers,
        body: &record.body,
        delivery: Delivery {
            id: replay_delivery_id(record.summary.id, attempt),
            received_at_ms: record.summary.received_at,
            attempt,
            queued: true,
        },
    };
    send_stored(
        live,
        stored,
        relay.config.timeout,
        relay.config.record_max_body,
    )
    .await
    .map_err(|failure| failure.error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters() {
        let (filter, page) =
            parse_query("status=5xx&method=post&path=%2Fhooks%2F&since=10&until=20&limit=5000")
                .unwrap();
        assert_eq!(filter.status, Some(StatusFilter::Class(5)));
        assert_eq!(filter.method.as_deref(), Some("POST"));
        assert_eq!(filter.path_prefix.as_deref(), Some("/hooks/"));
        assert_eq!((filter.since, filter.until), (Some(10), Some(20)));
        assert_eq!(page.limit, Page::MAX_LIMIT);
        assert!(parse_query("status=abc").is_err());
        assert!(parse_query("before=nope").is_err());
        assert!(parse_query("bogus=1").is_err());
        assert!(parse_query("path=%zz").is_err());
        assert_eq!(parse_query("").unwrap().1, Page::default());
    }
}
