//! Write commands: each runs on the writer thread, inside the batch's transaction.

use rusqlite::{params, Connection, OptionalExtension};

use super::blocks::first_id_at;
use super::error::{Result, StoreError};
use super::ids::RequestId;
use super::records::{AttemptOutcome, Outcome, RequestState, RespondMode, Response, SessionRecord};
use super::writer::WriterCtx;

/// A request ready for insertion: headers already encoded off the writer thread.
pub(crate) struct Insert {
    pub(crate) session_id: String,
    pub(crate) received_at: i64,
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) headers: Vec<u8>,
    pub(crate) body: bytes::Bytes,
    /// The body's full length (`body` may hold only its first bytes).
    pub(crate) body_len: u64,
    pub(crate) provider: Option<(String, String)>,
    pub(crate) state: RequestState,
}

impl Insert {
    /// The body's full length (at least what `body` holds).
    fn full_len(&self) -> u64 {
        self.body_len.max(self.body.len() as u64)
    }

    /// `request` with its headers encoded (off the writer thread), in `state` or its own.
    pub(crate) fn new(request: super::NewRequest, state: Option<RequestState>) -> Self {
        Insert {
            headers: super::codec::encode_headers(&request.headers),
            state: state.unwrap_or(request.state),
            session_id: request.session_id,
            received_at: request.received_at,
            method: request.method,
            target: request.target,
            body_len: request.body_len,
            body: request.body,
            provider: request.provider.map(|p| (p.provider, p.id)),
        }
    }
}

/// A response ready for storage.
pub(crate) struct EncodedResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<u8>,
    pub(crate) body: bytes::Bytes,
    /// The body's full length (`body` may hold only its first bytes).
    pub(crate) body_len: u64,
    pub(crate) duration_ms: u64,
}

impl EncodedResponse {
    pub(crate) fn new(response: Response) -> Self {
        EncodedResponse {
            status: response.status,
            headers: super::codec::encode_headers(&response.headers),
            body_len: response.body_len.max(response.body.len() as u64),
            body: response.body,
            duration_ms: u64::try_from(response.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// [`Outcome`] with its response encoded.
pub(crate) enum EncodedOutcome {
    Delivered(EncodedResponse),
    Rejected {
        response: EncodedResponse,
        retry_at: Option<i64>,
    },
    Error {
        error: String,
        retry_at: Option<i64>,
    },
}

impl EncodedOutcome {
    pub(crate) fn new(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Delivered(response) => {
                EncodedOutcome::Delivered(EncodedResponse::new(response))
            }
            Outcome::Rejected { response, retry_at } => EncodedOutcome::Rejected {
                response: EncodedResponse::new(response),
                retry_at,
            },
            Outcome::Error { error, retry_at } => EncodedOutcome::Error { error, retry_at },
        }
    }

    /// Bytes this outcome adds to a batch.
    pub(crate) fn weight(&self) -> usize {
        match self {
            EncodedOutcome::Delivered(r) | EncodedOutcome::Rejected { response: r, .. } => {
                r.headers.len() + r.body.len()
            }
            EncodedOutcome::Error { error, .. } => error.len(),
        }
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn upsert_session(conn: &Connection, session: &SessionRecord) -> Result<()> {
    let (respond_status, respond_body, respond_deadline_ms) = match &session.respond {
        RespondMode::Pass => (None, None, None),
        RespondMode::Now { status, body } => (*status, body.as_deref(), None),
        RespondMode::Deadline { millis } => {
            (None, None, Some(i64::try_from(*millis).unwrap_or(i64::MAX)))
        }
    };
    conn.prepare_cached(
        "INSERT INTO sessions (id, owner, resume_digest, kind, offline, respond, respond_status,
                               respond_body, respond_deadline_ms, created_at, last_seen_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (id) DO UPDATE SET
            owner = excluded.owner, resume_digest = excluded.resume_digest, kind = excluded.kind,
            offline = excluded.offline, respond = excluded.respond,
            respond_status = excluded.respond_status, respond_body = excluded.respond_body,
            respond_deadline_ms = excluded.respond_deadline_ms,
            last_seen_at = excluded.last_seen_at",
    )?
    .execute(params![
        session.id,
        &session.owner[..],
        &session.resume_digest[..],
        session.kind.as_str(),
        session.offline.as_str(),
        session.respond.as_str(),
        respond_status,
        respond_body,
        respond_deadline_ms,
        session.created_at,
        session.last_seen_at,
    ])?;
    Ok(())
}

pub(crate) fn delete_session(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("DELETE FROM sessions WHERE id = ?1")?
        .execute([id])?
        > 0)
}

pub(crate) fn record_request(
    conn: &Connection,
    ctx: &mut WriterCtx,
    req: Insert,
) -> Result<RequestId> {
    let known = conn
        .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .exists([&req.session_id])?;
    if !known {
        return Err(StoreError::UnknownSession(req.session_id));
    }
    let id = ctx.ids.next_id();
    let duplicate_of = first_with_provider_id(conn, &req)?;
    // A queued request keeps its whole body: it has yet to be delivered.
    let keep = if req.state == RequestState::Queued {
        req.body.len()
    } else {
        req.body.len().min(ctx.record_max_body)
    };
    let body = &req.body[..keep];
    let full_len = req.full_len();
    let (provider, provider_id) = req.provider.unzip();
    conn.prepare_cached(
        "INSERT INTO requests (id, session_id, received_at, method, target, provider, provider_id,
                               duplicate_of, state, attempts, next_attempt_at, body_len,
                               body_truncated, stored_bytes, headers, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?3, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        id,
        req.session_id,
        req.received_at,
        req.method,
        req.target,
        provider,
        provider_id,
        duplicate_of,
        req.state,
        full_len,
        (keep as u64) < full_len,
        to_i64(req.headers.len() + keep),
        req.headers,
        body,
    ])?;
    add_usage(conn, req.headers.len() + keep)?;
    Ok(id)
}

/// Adds `bytes` to the stored total (inserts do this themselves; updates and deletes keep it
/// by trigger).
pub(crate) fn add_usage(conn: &Connection, bytes: usize) -> Result<()> {
    conn.prepare_cached("UPDATE usage SET stored_bytes = stored_bytes + ?1 WHERE id = 1")?
        .execute([to_i64(bytes)])?;
    Ok(())
}

/// Starts attempt `n + 1` of `id`: a delivery (the request becomes `delivering`) or a replay
/// (the request's state is left alone).
pub(crate) fn start_attempt(
    conn: &Connection,
    id: RequestId,
    replay: bool,
    now: i64,
) -> Result<u32> {
    if replay {
        // A request passed straight through is in a history block until it changes.
        super::blocks::take_out(conn, id)?;
    }
    let truncated: bool = conn
        .prepare_cached("SELECT body_truncated FROM requests WHERE id = ?1")?
        .query_row([id], |row| row.get(0))
        .optional()?
        .ok_or_else(|| StoreError::UnknownRequest(id.to_string()))?;
    if replay && truncated {
        return Err(StoreError::Incomplete(id.to_string()));
    }
    // A passed-through request's attempt is not in `attempts` (see `record_exchange`) but
    // counted in `requests.attempts`.
    let last: u32 = conn
        .prepare_cached(
            "SELECT max(COALESCE((SELECT MAX(attempt) FROM attempts WHERE request_id = ?1), 0),
                        (SELECT attempts FROM requests WHERE id = ?1))",
        )?
        .query_row([id], |row| row.get(0))?;
    let number = last + 1;
    let (kind, replay_of) = if replay {
        ("replay", (last > 0).then_some(last))
    } else {
        ("delivery", None)
    };
    conn.prepare_cached(
        "INSERT INTO attempts (request_id, attempt, kind, replay_of, started_at, outcome)
         VALUES (?1, ?2, ?3, ?4, ?5, 'in_progress')",
    )?
    .execute(params![id, number, kind, replay_of, now])?;
    if !replay {
        conn.prepare_cached(
            "UPDATE requests SET state = 'delivering', attempts = attempts + 1 WHERE id = ?1",
        )?
        .execute([id])?;
    }
    Ok(number)
}

/// Stores `response` as the request's latest response.
fn set_response(
    conn: &Connection,
    id: RequestId,
    response: &EncodedResponse,
    limit: usize,
) -> Result<()> {
    let keep = response.body.len().min(limit);
    conn.prepare_cached(
        "UPDATE requests SET status = ?2, duration_ms = ?3, response_headers = ?4,
            response_body = ?5, response_body_len = ?6, response_body_truncated = ?7,
            stored_bytes = length(headers) + length(body) + ?8
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        response.status,
        i64::try_from(response.duration_ms).unwrap_or(i64::MAX),
        response.headers,
        &response.body[..keep],
        response.body_len,
        (keep as u64) < response.body_len,
        to_i64(response.headers.len() + keep),
    ])?;
    Ok(())
}

pub(crate) fn finish_attempt(
    conn: &Connection,
    ctx: &WriterCtx,
    id: RequestId,
    number: u32,
    outcome: EncodedOutcome,
    now: i64,
) -> Result<RequestState> {
    let unknown = || StoreError::UnknownAttempt {
        request: id.to_string(),
        attempt: number,
    };
    let (kind, current): (String, AttemptOutcome) = conn
        .prepare_cached(
            "SELECT kind, outcome FROM attempts WHERE request_id = ?1 AND attempt = ?2",
        )?
        .query_row(params![id, number], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?
        .ok_or_else(unknown)?;
    if current != AttemptOutcome::InProgress {
        return Err(unknown());
    }
    let replay = kind == "replay";
    let (state, truncated): (RequestState, bool) = conn
        .prepare_cached("SELECT state, body_truncated FROM requests WHERE id = ?1")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))?;

    // What comes next after a failure: back to the queue, or parked.
    let after_failure = |retry_at: Option<i64>, error: Option<String>| match retry_at {
        _ if replay => (state, AttemptOutcome::Failed, None, error),
        Some(at) if !truncated => (RequestState::Queued, AttemptOutcome::Retry, Some(at), error),
        Some(_) => {
            let note = "not retried: the body was too large to keep";
            let error = Some(match error {
                Some(error) => format!("{error}; {note}"),
                None => note.to_owned(),
            });
            (RequestState::Failed, AttemptOutcome::Failed, None, error)
        }
        None => (RequestState::Failed, AttemptOutcome::Failed, None, error),
    };
    let (new_state, attempt_outcome, retry_at, error, status) = match &outcome {
        EncodedOutcome::Delivered(response) => {
            if !replay || state != RequestState::Delivered {
                set_response(conn, id, response, ctx.record_max_body)?;
                conn.prepare_cached(
                    "UPDATE requests SET state = 'delivered', delivered_at = ?2 WHERE id = ?1",
                )?
                .execute(params![id, now])?;
            }
            (
                RequestState::Delivered,
                AttemptOutcome::Delivered,
                None,
                None,
                Some(response.status),
            )
        }
        EncodedOutcome::Rejected { response, retry_at } => {
            if !replay {
                set_response(conn, id, response, ctx.record_max_body)?;
            }
            let (s, o, r, e) = after_failure(*retry_at, None);
            (s, o, r, e, Some(response.status))
        }
        EncodedOutcome::Error { error, retry_at } => {
            let (s, o, r, e) = after_failure(*retry_at, Some(error.clone()));
            (s, o, r, e, None)
        }
    };
    if !replay && new_state != RequestState::Delivered {
        conn.prepare_cached(
            "UPDATE requests SET state = ?2, next_attempt_at = COALESCE(?3, next_attempt_at)
             WHERE id = ?1",
        )?
        .execute(params![id, new_state, retry_at])?;
    }
    conn.prepare_cached(
        "UPDATE attempts SET finished_at = ?3, outcome = ?4, status = ?5, error = ?6
         WHERE request_id = ?1 AND attempt = ?2",
    )?
    .execute(params![id, number, now, attempt_outcome, status, error])?;
    Ok(new_state)
}

/// Ends the request's unfinished delivery attempts with `outcome`, then sets its state.
fn settle(
    conn: &Connection,
    id: RequestId,
    state: RequestState,
    outcome: AttemptOutcome,
    error: Option<&str>,
    now: i64,
) -> Result<()> {
    let changed = conn
        .prepare_cached(
            "UPDATE requests SET state = ?2,
                delivered_at = CASE WHEN ?2 = 'delivered' THEN COALESCE(delivered_at, ?3)
                                    ELSE delivered_at END
             WHERE id = ?1",
        )?
        .execute(params![id, state, now])?;
    if changed == 0 {
        return Err(StoreError::UnknownRequest(id.to_string()));
    }
    conn.prepare_cached(
        "UPDATE attempts SET outcome = ?2, finished_at = ?3, error = COALESCE(?4, error)
         WHERE request_id = ?1 AND outcome = 'in_progress' AND kind = 'delivery'",
    )?
    .execute(params![id, outcome, now, error])?;
    Ok(())
}

pub(crate) fn mark_delivered(conn: &Connection, id: RequestId, now: i64) -> Result<()> {
    settle(
        conn,
        id,
        RequestState::Delivered,
        AttemptOutcome::Delivered,
        None,
        now,
    )
}

pub(crate) fn mark_failed(conn: &Connection, id: RequestId, reason: &str, now: i64) -> Result<()> {
    settle(
        conn,
        id,
        RequestState::Failed,
        AttemptOutcome::Failed,
        Some(reason),
        now,
    )
}

/// After a crash: unfinished attempts become `interrupted`, and requests that were being
/// delivered go back to the queue (or are parked, if their body was not fully kept).
pub(crate) fn recover_interrupted(conn: &Connection, now: i64) -> Result<u64> {
    conn.execute(
        "UPDATE attempts SET outcome = 'interrupted', finished_at = ?1
         WHERE outcome = 'in_progress'",
        [now],
    )?;
    let requeued = conn.execute(
        "UPDATE requests
         SET state = CASE WHEN body_truncated THEN 'failed' ELSE 'queued' END,
             next_attempt_at = ?1
         WHERE state = 'delivering'",
        [now],
    )?;
    Ok(requeued as u64)
}

/// Deletes up to `limit` of the oldest requests received before `cutoff` (except those being
/// delivered right now) and up to `limit` of the oldest history blocks all received before it.
/// Returns how many requests went and whether there may be more to delete.
pub(crate) fn prune_by_age(conn: &Connection, cutoff: i64, limit: usize) -> Result<(u64, bool)> {
    let deleted = conn
        .prepare_cached(
            // An id is made when the request is recorded, never before it arrived: the id
            // range (the primary key's index) holds every candidate.
            "DELETE FROM requests WHERE id IN (
                SELECT id FROM requests
                WHERE id < ?1 AND received_at < ?2 AND state != 'delivering'
                ORDER BY id LIMIT ?3)",
        )?
        .execute(params![first_id_at(cutoff), cutoff, to_i64(limit)])?;
    let (in_blocks, blocks) = super::blocks::prune_by_age(conn, cutoff, limit)?;
    // Done when neither rows nor blocks filled their share.
    let more = deleted >= limit || blocks >= limit;
    Ok((deleted as u64 + in_blocks, more))
}

/// Deletes the oldest delivered or failed requests, up to `limit` of them, until the stored
/// bytes are at most `max_bytes`. Returns how many went and whether the goal was reached.
pub(crate) fn prune_by_size(
    conn: &Connection,
    max_bytes: u64,
    limit: usize,
) -> Result<(u64, bool)> {
    let mut total = stored_bytes(conn)?;
    if total <= max_bytes {
        return Ok((0, true));
    }
    // The oldest of rows and history blocks together, oldest first.
    let rows: Vec<(RequestId, u64)> = conn
        .prepare_cached(
            "SELECT id, stored_bytes FROM requests WHERE state IN ('delivered', 'failed')
             ORDER BY id LIMIT ?1",
        )?
        .query_map([to_i64(limit)], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let blocks = super::blocks::oldest(conn, limit)?;
    let (mut rows, mut blocks) = (rows.into_iter().peekable(), blocks.into_iter().peekable());
    let mut delete_row = conn.prepare_cached("DELETE FROM requests WHERE id = ?1")?;
    let (mut units, mut requests) = (0, 0);
    while total > max_bytes && units < limit {
        let take_row = match (rows.peek(), blocks.peek()) {
            (Some((row, _)), Some((block, _, _))) => row < block,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_row {
            let (id, bytes) = rows.next().expect("peeked");
            delete_row.execute([id])?;
            total = total.saturating_sub(bytes);
            requests += 1;
        } else {
            let (first_id, bytes, count) = blocks.next().expect("peeked");
            super::blocks::delete(conn, first_id)?;
            total = total.saturating_sub(bytes);
            requests += count;
        }
        units += 1;
    }
    let reached = total <= max_bytes;
    // Reached, or nothing more that may be deleted.
    Ok((requests, reached || units < limit))
}

/// Returns free pages to the file system after a prune.
pub(crate) fn release_space(conn: &Connection) -> Result<()> {
    conn.execute_batch("PRAGMA incremental_vacuum")?;
    Ok(())
}

/// Bytes of headers and bodies stored, requests and responses together.
pub(crate) fn stored_bytes(conn: &Connection) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT stored_bytes FROM usage WHERE id = 1")?
        .query_row([], |row| row.get(0))?)
}

/// The session's first request with the same provider delivery id as `req`, if any.
fn first_with_provider_id(conn: &Connection, req: &Insert) -> Result<Option<RequestId>> {
    match &req.provider {
        Some((_, provider_id)) => {
            super::queries::find_by_provider_id(conn, &req.session_id, provider_id)
        }
        None => Ok(None),
    }
}

/// Whether session `id` is stored.
pub(crate) fn session_exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?
        .exists([id])?)
}

/// Inserts a request passed straight through, with its response and its one (implied)
/// attempt: how a history block's record becomes a row of its own (`blocks::take_out`).
pub(crate) const INSERT_EXCHANGE: &str =
    "INSERT INTO requests (id, session_id, received_at, method, target, provider, provider_id,
                           duplicate_of, state, attempts, next_attempt_at, body_len,
                           body_truncated, stored_bytes, headers, body, status, delivered_at,
                           duration_ms, response_headers, response_body, response_body_len,
                           response_body_truncated, error)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?3, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
             ?17, ?18, ?19, ?20, ?21, ?22)";
