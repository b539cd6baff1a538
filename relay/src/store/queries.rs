//! Read queries: each runs on a read-only connection in tokio's blocking pool.

use rusqlite::types::{Type, Value};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::error::Result;
use super::ids::RequestId;
use super::records::{
    Attempt, ListFilter, ListPage, OfflinePolicy, Page, QueuedRequest, RequestRecord, RequestState,
    RequestSummary, RespondMode, SessionKind, SessionRecord, StatusFilter, StoredResponse,
};
use super::sql::{bad_column, bytes_at, headers_at, opt_headers_at, provider_at};

pub(crate) fn load_sessions(conn: &Connection) -> Result<Vec<SessionRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, owner, resume_digest, kind, offline, respond, respond_status, respond_body,
                respond_deadline_ms, created_at, last_seen_at
         FROM sessions ORDER BY created_at, id",
    )?;
    let sessions = stmt
        .query_map([], session_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(sessions)
}

fn digest_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<[u8; 32]> {
    row.get_ref(idx)?
        .as_blob()?
        .try_into()
        .map_err(|_| bad_column(idx, Type::Blob, "digest is not 32 bytes"))
}

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    let kind = match row.get_ref(3)?.as_str()? {
        "named" => SessionKind::Named,
        "random" => SessionKind::Random,
        _ => return Err(bad_column(3, Type::Text, "unknown session kind")),
    };
    let offline = match row.get_ref(4)?.as_str()? {
        "queue" => OfflinePolicy::Queue,
        "reject" => OfflinePolicy::Reject,
        _ => return Err(bad_column(4, Type::Text, "unknown offline policy")),
    };
    let respond = match row.get_ref(5)?.as_str()? {
        "pass" => RespondMode::Pass,
        "now" => RespondMode::Now {
            status: row.get(6)?,
            body: row.get::<_, Option<Vec<u8>>>(7)?.map(bytes::Bytes::from),
        },
        "deadline" => RespondMode::Deadline {
            millis: row.get::<_, Option<u64>>(8)?.unwrap_or(0),
        },
        _ => return Err(bad_column(5, Type::Text, "unknown respond mode")),
    };
    Ok(SessionRecord {
        id: row.get(0)?,
        owner: digest_at(row, 1)?,
        resume_digest: digest_at(row, 2)?,
        kind,
        offline,
        respond,
        created_at: row.get(9)?,
        last_seen_at: row.get(10)?,
    })
}

/// The columns of a [`RequestSummary`], in the order [`summary_from_row`] reads them.
const SUMMARY: &str = "id, session_id, received_at, method, target, state, attempts,
    next_attempt_at, status, delivered_at, duration_ms, provider, provider_id, duplicate_of,
    body_len, body_truncated";
/// Number of columns in [`SUMMARY`].
const SUMMARY_LEN: usize = 16;

fn summary_from_row(row: &Row<'_>) -> rusqlite::Result<RequestSummary> {
    Ok(RequestSummary {
        id: row.get(0)?,
        session_id: row.get(1)?,
        received_at: row.get(2)?,
        method: row.get(3)?,
        target: row.get(4)?,
        state: row.get(5)?,
        attempts: row.get(6)?,
        next_attempt_at: row.get(7)?,
        status: row.get(8)?,
        delivered_at: row.get(9)?,
        duration_ms: row.get(10)?,
        provider: provider_at(row, 11)?,
        duplicate_of: row.get(13)?,
        body_len: row.get(14)?,
        body_truncated: row.get(15)?,
    })
}

/// Queued requests of `session_id` due at `now`, oldest first, with head and body.
pub(crate) fn queued(
    conn: &Connection,
    session_id: &str,
    now: i64,
    limit: usize,
) -> Result<Vec<QueuedRequest>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, session_id, received_at, method, target, attempts, provider, provider_id,
                duplicate_of, headers, body
         FROM requests
         WHERE session_id = ?1 AND state = 'queued' AND next_attempt_at <= ?2
         ORDER BY id LIMIT ?3",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let requests = stmt
        .query_map(params![session_id, now, limit], |row| {
            Ok(QueuedRequest {
                id: row.get(0)?,
                session_id: row.get(1)?,
                received_at: row.get(2)?,
                method: row.get(3)?,
                target: row.get(4)?,
                attempts: row.get(5)?,
                provider: provider_at(row, 6)?,
                duplicate_of: row.get(8)?,
                headers: headers_at(row, 9)?,
                body: bytes_at(row, 10)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(requests)
}

/// When the earliest queued request of `session_id` is due, if it has any.
pub(crate) fn next_due(conn: &Connection, session_id: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(
            "SELECT MIN(next_attempt_at) FROM requests WHERE session_id = ?1 AND state = 'queued'",
        )?
        .query_row([session_id], |row| row.get(0))?)
}

/// One page of `session_id`'s requests, newest first.
pub(crate) fn list(
    conn: &Connection,
    session_id: &str,
    filter: &ListFilter,
    page: Page,
) -> Result<ListPage> {
    let limit = page.limit.clamp(1, Page::MAX_LIMIT);
    let mut sql = format!("SELECT {SUMMARY} FROM requests WHERE session_id = ?");
    let mut args: Vec<Value> = vec![Value::Text(session_id.to_owned())];
    let mut add = |clause: &str, values: &[Value]| {
        sql.push_str(" AND ");
        sql.push_str(clause);
        args.extend_from_slice(values);
    };
    if let Some(before) = page.before {
        add("id < ?", &[Value::Text(before.to_string())]);
    }
    match filter.status {
        Some(StatusFilter::Exact(status)) => add("status = ?", &[Value::Integer(status.into())]),
        Some(StatusFilter::Class(class)) => {
            let low = i64::from(class) * 100;
            add(
                "status >= ? AND status < ?",
                &[Value::Integer(low), Value::Integer(low + 100)],
            );
        }
        None => {}
    }
    if let Some(method) = &filter.method {
        add("method = ?", &[Value::Text(method.clone())]);
    }
    if let Some(prefix) = &filter.path_prefix {
        add(
            "substr(target, 1, length(?)) = ?",
            &[Value::Text(prefix.clone()), Value::Text(prefix.clone())],
        );
    }
    if let Some(since) = filter.since {
        add("received_at >= ?", &[Value::Integer(since)]);
    }
    if let Some(until) = filter.until {
        add("received_at < ?", &[Value::Integer(until)]);
    }
    if let Some(state) = filter.state {
        add("state = ?", &[Value::Text(state.as_str().to_owned())]);
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    args.push(Value::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)));
    debug_assert_eq!(SUMMARY.split(',').count(), SUMMARY_LEN);
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut requests: Vec<RequestSummary> = stmt
        .query_map(params_from_iter(args), summary_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    // Requests passed straight through live in history blocks: take as many of theirs, and
    // keep the newest of both.
    requests.extend(super::blocks::list(
        conn,
        session_id,
        filter,
        page.before,
        limit + 1,
    )?);
    requests.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
    requests.truncate(limit + 1);
    let next = if requests.len() > limit {
        requests.truncate(limit);
        requests.last().map(|r| r.id)
    } else {
        None
    };
    Ok(ListPage { requests, next })
}

/// One request in full, with its attempts.
pub(crate) fn get(conn: &Connection, id: RequestId) -> Result<Option<RequestRecord>> {
    let sql = format!(
        "SELECT {SUMMARY}, response_body_len, response_body_truncated, headers, body,
                response_headers, response_body, error
         FROM requests WHERE id = ?1"
    );
    let n = SUMMARY_LEN;
    let record = conn
        .prepare_cached(&sql)?
        .query_row([id], |row| {
            let summary = summary_from_row(row)?;
            let response = match (summary.status, opt_headers_at(row, n + 4)?) {
                (Some(status), Some(headers)) => Some(StoredResponse {
                    status,
                    headers,
                    body: bytes_at(row, n + 5)?,
                    body_len: row.get::<_, Option<u64>>(n)?.unwrap_or(0),
                    body_truncated: row.get::<_, Option<bool>>(n + 1)?.unwrap_or(false),
                }),
                _ => None,
            };
            let error: Option<String> = row.get(n + 6)?;
            Ok((
                RequestRecord {
                    summary,
                    headers: headers_at(row, n + 2)?,
                    body: bytes_at(row, n + 3)?,
                    response,
                    attempt_log: Vec::new(),
                },
                error,
            ))
        })
        .optional()?;
    let Some((mut record, error)) = record else {
        return super::blocks::get(conn, id);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT attempt, kind, replay_of, started_at, finished_at, outcome, status, error
         FROM attempts WHERE request_id = ?1 ORDER BY attempt",
    )?;
    record.attempt_log = stmt
        .query_map([id], |row| {
            Ok(Attempt {
                number: row.get(0)?,
                replay: row.get_ref(1)?.as_str()? == "replay",
                replay_of: row.get(2)?,
                started_at: row.get(3)?,
                finished_at: row.get(4)?,
                outcome: row.get(5)?,
                status: row.get(6)?,
                error: row.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    // A request passed straight through had one attempt, kept in its own row rather than in
    // `attempts` (see `commands::record_exchange`): show it as attempt 1.
    let first_logged = record.attempt_log.first().map(|a| a.number);
    let summary = &record.summary;
    if summary.attempts >= 1
        && first_logged != Some(1)
        && matches!(
            summary.state,
            RequestState::Delivered | RequestState::Failed
        )
    {
        let replayed = !record.attempt_log.is_empty();
        let attempt = super::blocks::implied_attempt(summary, error, replayed);
        record.attempt_log.insert(0, attempt);
    }
    Ok(Some(record))
}

/// The first request of `session_id` with this provider delivery id.
pub(crate) fn find_by_provider_id(
    conn: &Connection,
    session_id: &str,
    provider_id: &str,
) -> Result<Option<RequestId>> {
    super::blocks::find_by_provider_id(conn, session_id, provider_id)
}
