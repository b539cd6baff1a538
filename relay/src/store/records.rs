//! The records the store keeps and the values its API takes and returns.

use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::HeaderList;

use super::ids::RequestId;
use super::provider::{self, ProviderId};

/// How a session got its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A name the client asked for with `--name`.
    Named,
    /// A random id issued by the relay.
    Random,
}

/// What the relay does with a request while the session's client is offline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Record it durably, answer `202`, deliver it when the client is back.
    #[default]
    Queue,
    /// Answer `503` with `Retry-After`, so that providers that retry will retry.
    Reject,
}

/// How the sender gets its answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RespondMode {
    /// The local app's real response (offline: queue and `202`).
    #[default]
    Pass,
    /// The relay answers at once and delivers through the queue.
    Now {
        /// The status to answer with; `None` means `202`.
        status: Option<u16>,
        /// The body to answer with; `None` means the relay's default body.
        body: Option<Bytes>,
    },
    /// The real response if the app answers within `millis`, otherwise `202` at the deadline.
    Deadline {
        /// The deadline in milliseconds.
        millis: u64,
    },
}

/// A persisted session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id: the first path segment of its URL.
    pub id: String,
    /// SHA-256 of the owning token (tokens are never stored in clear).
    pub owner: [u8; 32],
    /// SHA-256 of the current resume secret.
    pub resume_digest: [u8; 32],
    /// Named or random.
    pub kind: SessionKind,
    /// What happens while the client is offline.
    pub offline: OfflinePolicy,
    /// How the sender gets its answer.
    pub respond: RespondMode,
    /// When the session was created, Unix milliseconds. Kept as first stored by
    /// [`Store::upsert_session`](super::Store::upsert_session).
    pub created_at: i64,
    /// When a client last used the session, Unix milliseconds.
    pub last_seen_at: i64,
}

/// Where a request is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestState {
    /// Waiting for delivery (client offline, or a retry after backoff).
    Queued,
    /// Being delivered to the client now.
    Delivering,
    /// The local app answered and the client acknowledged it.
    Delivered,
    /// Given up on (parked): visible in history and replayable.
    Failed,
}

impl RequestState {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Queued => "queued",
            RequestState::Delivering => "delivering",
            RequestState::Delivered => "delivered",
            RequestState::Failed => "failed",
        }
    }
}

impl FromStr for RequestState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "queued" => RequestState::Queued,
            "delivering" => RequestState::Delivering,
            "delivered" => RequestState::Delivered,
            "failed" => RequestState::Failed,
            other => return Err(format!("unknown request state {other:?}")),
        })
    }
}

/// A request to record.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// The session it was sent to (must exist in the store).
    pub session_id: String,
    /// When the relay received it, Unix milliseconds. A queued request is first due at this time.
    pub received_at: i64,
    /// The method, e.g. `POST`.
    pub method: String,
    /// Path and query below the session, exactly as received.
    pub target: String,
    /// The request headers, in order, with duplicates and raw value bytes.
    pub headers: HeaderList,
    /// The whole body. A request recorded as [`RequestState::Queued`] keeps all of it, since
    /// it must be delivered later; otherwise it is cut at `StoreOptions::record_max_body`.
    pub body: Bytes,
    /// The body's full length: more than `body.len()` when only its first bytes were kept
    /// (history of a large body passed straight through). [`NewRequest::new`] sets `body.len()`.
    pub body_len: u64,
    /// The provider's delivery id, if any; [`NewRequest::new`] extracts it.
    pub provider: Option<ProviderId>,
    /// The state to record it in: usually `Queued` (client offline) or `Delivering`.
    pub state: RequestState,
}

impl NewRequest {
    /// A request with its provider delivery id extracted from `headers` and `body`.
    pub fn new(
        session_id: impl Into<String>,
        received_at: i64,
        method: impl Into<String>,
        target: impl Into<String>,
        headers: HeaderList,
        body: Bytes,
        state: RequestState,
    ) -> Self {
        let provider = provider::delivery_id(&headers, &body);
        NewRequest {
            session_id: session_id.into(),
            received_at,
            method: method.into(),
            target: target.into(),
            body_len: body.len() as u64,
            headers,
            body,
            provider,
            state,
        }
    }
}

/// The local app's response, as the client reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderList,
    /// The response body (stored up to `StoreOptions::record_max_body`).
    pub body: Bytes,
    /// The body's full length: more than `body.len()` when only its first bytes were kept.
    pub body_len: u64,
    /// How long the exchange took.
    pub duration: Duration,
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered and the request is done: it becomes [`RequestState::Delivered`].
    Delivered(Response),
    /// The app answered, but with a response that calls for another try (such as a `5xx` to a
    /// queued request). The response is stored as the request's latest response.
    Rejected {
        /// The app's response.
        response: Response,
        /// When to try again (Unix ms): the request goes back to the queue. `None` parks it as
        /// [`RequestState::Failed`].
        retry_at: Option<i64>,
    },
    /// No answer: the app is down, the client vanished, a timeout…
    Error {
        /// What went wrong, for history.
        error: String,
        /// When to try again (Unix ms), or `None` to park the request as failed.
        retry_at: Option<i64>,
    },
}

/// The recorded end of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Still running.
    InProgress,
    /// The app answered and the request was done.
    Delivered,
    /// It failed and another try was scheduled.
    Retry,
    /// It failed and the request was parked (or, for a replay, simply failed).
    Failed,
    /// The relay stopped while it was running (found unfinished at start-up).
    Interrupted,
}

impl AttemptOutcome {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::InProgress => "in_progress",
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Interrupted => "interrupted",
        }
    }
}

impl FromStr for AttemptOutcome {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "in_progress" => AttemptOutcome::InProgress,
            "delivered" => AttemptOutcome::Delivered,
            "retry" => AttemptOutcome::Retry,
            "failed" => AttemptOutcome::Failed,
            "interrupted" => AttemptOutcome::Interrupted,
            other => return Err(format!("unknown attempt outcome {other:?}")),
        })
    }
}

/// One delivery attempt or replay of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// 1, 2, 3… per request, counting deliveries and replays together.
    pub number: u32,
    /// Whether this was a replay asked for by the user rather than a delivery.
    pub replay: bool,
    /// For a replay: the attempt it repeats (the request's latest attempt when the replay
    /// started), `None` if there was none.
    pub replay_of: Option<u32>,
    /// When it started, Unix ms.
    pub started_at: i64,
    /// When it ended, Unix ms.
    pub finished_at: Option<i64>,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The app's status, if it answered.
    pub status: Option<u16>,
    /// What went wrong, if it failed without an answer.
    pub error: Option<String>,
}

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: HeaderList,
    /// The body, possibly cut at the record limit.
    pub body: Bytes,
    /// The body's full length.
    pub body_len: u64,
    /// Whether `body` was cut at the record limit.
    pub body_truncated: bool,
}

/// A request as listed in history: everything but headers and bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    /// The id.
    pub id: RequestId,
    /// The session it was sent to.
    pub session_id: String,
    /// When the relay received it, Unix ms.
    pub received_at: i64,
    /// The method.
    pub method: String,
    /// Path and query below the session, exactly as received.
    pub target: String,
    /// Where it is in its delivery.
    pub state: RequestState,
    /// Number of delivery attempts so far (replays not counted).
    pub attempts: u32,
    /// When a queued request is next due, Unix ms.
    pub next_attempt_at: i64,
    /// The status of the latest response, if any.
    pub status: Option<u16>,
    /// When it was delivered, Unix ms.
    pub delivered_at: Option<i64>,
    /// How long the delivering exchange took, in ms.
    pub duration_ms: Option<u64>,
    /// The provider's delivery id.
    pub provider: Option<ProviderId>,
    /// The first request of this session with the same provider delivery id: this one is the
    /// provider's retry of it.
    pub duplicate_of: Option<RequestId>,
    /// The body's full length.
    pub body_len: u64,
    /// Whether the stored body was cut at the record limit (such a request cannot be retried or
    /// replayed).
    pub body_truncated: bool,
}

/// A request in full: head, body, response and attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The listing fields.
    pub summary: RequestSummary,
    /// The request headers.
    pub headers: HeaderList,
    /// The body (see [`RequestSummary::body_truncated`]).
    pub body: Bytes,
    /// The latest response, if the app answered.
    pub response: Option<StoredResponse>,
    /// Every attempt and replay, oldest first.
    pub attempt_log: Vec<Attempt>,
}

/// A queued request, with everything needed to deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRequest {
    /// The id.
    pub id: RequestId,
    /// The session.
    pub session_id: String,
    /// When the relay received it, Unix ms (for the age header).
    pub received_at: i64,
    /// The method.
    pub method: String,
    /// Path and query below the session.
    pub target: String,
    /// The request headers.
    pub headers: HeaderList,
    /// The whole body.
    pub body: Bytes,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// The provider's delivery id.
    pub provider: Option<ProviderId>,
    /// Set when this is a provider's retry of an earlier request.
    pub duplicate_of: Option<RequestId>,
}

/// A filter on status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    /// Exactly this status.
    Exact(u16),
    /// This class: `5` is `5xx`.
    Class(u8),
}

impl FromStr for StatusFilter {
    type Err = String;

    /// Parses `404` or a class such as `5xx` / `5XX`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad status filter {text:?}: expected e.g. 404 or 5xx");
        let bytes = text.as_bytes();
        if bytes.len() == 3 && bytes[1..].eq_ignore_ascii_case(b"xx") {
            return match bytes[0] {
                d @ b'1'..=b'5' => Ok(StatusFilter::Class(d - b'0')),
                _ => Err(bad()),
            };
        }
        match text.parse::<u16>() {
            Ok(status) if (100..=999).contains(&status) => Ok(StatusFilter::Exact(status)),
            _ => Err(bad()),
        }
    }
}

/// Which requests [`Store::list`](super::Store::list) returns. Every field left `None` matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// The latest response's status.
    pub status: Option<StatusFilter>,
    /// The method, exactly (e.g. `POST`).
    pub method: Option<String>,
    /// The target starts with this (e.g. `/webhooks/`).
    pub path_prefix: Option<String>,
    /// Received at or after this time, Unix ms.
    pub since: Option<i64>,
    /// Received before this time, Unix ms.
    pub until: Option<i64>,
    /// In this state.
    pub state: Option<RequestState>,
}

/// One page of a listing, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Start after this id (the previous page's [`ListPage::next`]); `None` for the newest.
    pub before: Option<RequestId>,
    /// At most this many requests (clamped to 1..=[`Page::MAX_LIMIT`]).
    pub limit: usize,
}

impl Page {
    /// The largest page.
    pub const MAX_LIMIT: usize = 1000;

    /// The newest `limit` requests.
    pub fn first(limit: usize) -> Self {
        Page {
            before: None,
            limit,
        }
    }
}

impl Default for Page {
    fn default() -> Self {
        Page::first(50)
    }
}

/// A page of requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The requests, newest first.
    pub requests: Vec<RequestSummary>,
    /// The cursor for the next (older) page, `None` on the last page.
    pub next: Option<RequestId>,
}

/// What [`Store::prune`](super::Store::prune) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Requests removed for being older than the retention.
    pub by_age: u64,
    /// Requests removed to get under the byte limit.
    pub by_size: u64,
    /// Bytes of headers and bodies still stored afterwards.
    pub stored_bytes: u64,
}
