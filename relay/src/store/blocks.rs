//! History blocks in the database: passed-through exchanges, many to a row.
//!
//! Each history batch becomes one `history_blocks` row per session, holding its exchanges
//! encoded by `block_codec`, with the range of ids it covers. Blocks never overlap: a batch
//! hands out the ids of one session's exchanges in a row, and later batches get larger ids.
//! Provider delivery ids of the exchanges go to `history_provider_ids`, so that a provider's
//! retry is still found to be a duplicate.
//!
//! Reads treat a block's records like `requests` rows: listing merges both, showing one looks
//! in both. A record that must change (the user replays it) first moves out of its block
//! into a `requests` row of its own ([`take_out`]), where attempts are recorded as for any
//! other request.
//!
//! A block's bytes are in a file of `block_files` (the row says where), or, for blocks from
//! before schema version 4 and what is left of a block after [`take_out`], in the row's `data`.

use std::path::Path;

use bytes::Bytes;
use rusqlite::{params, Connection, Row};
use tracing::warn;

use super::block_codec::{self, decode_block, BlockEntry, EncodedExchange};
use super::block_files::{self, Location};
use super::codec::decode_headers;
use super::error::{Result, StoreError};
use super::ids::RequestId;
use super::records::{
    Attempt, ListFilter, RequestRecord, RequestState, RequestSummary, StatusFilter, StoredResponse,
};
use super::writer::WriterCtx;

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn bad_block(first_id: RequestId) -> StoreError {
    StoreError::BadRecord(format!("history block {first_id} cannot be decoded"))
}

/// The columns of `history_blocks` that say where a block's bytes are, in the order
/// [`block_data`] reads them.
const DATA_COLUMNS: &str = "data, file_no, file_at, file_len, file_crc";

/// A block's bytes, from the row's [`DATA_COLUMNS`] starting at column `at`: the row's own
/// `data`, or the block file they point to.
fn block_data(conn: &Connection, row: &Row<'_>, at: usize) -> Result<Bytes> {
    let Some(file) = row.get::<_, Option<u64>>(at + 1)? else {
        let data = row.get_ref(at)?.as_blob().map_err(rusqlite::Error::from)?;
        return Ok(Bytes::copy_from_slice(data));
    };
    let location = Location {
        file,
        offset: row.get(at + 2)?,
        len: row.get(at + 3)?,
        crc: row.get(at + 4)?,
    };
    let dir = block_files::dir_of(conn)
        .ok_or_else(|| block_files::error(Path::new(""), "the database has no directory"))?;
    block_files::read(&dir, location)
        .map(Bytes::from)
        .map_err(|err| block_files::error(&dir, err))
}

/// Writes passed-through exchanges: one block per session among `items`, ids handed out in
/// the order given. Returns each exchange's id, in the order given, or
/// [`StoreError::UnknownSession`] for those of a session the store does not know. The
/// caller adds the returned byte count to the usage total.
pub(crate) fn write(
    conn: &Connection,
    ctx: &mut WriterCtx,
    items: Vec<EncodedExchange>,
    now: i64,
) -> Result<(Vec<Result<RequestId>>, usize)> {
    let mut results: Vec<Option<Result<RequestId>>> = Vec::new();
    results.resize_with(items.len(), || None);
    // Sessions in order of first appearance, each with its exchanges (most batches hold one).
    let mut groups: Vec<(String, Vec<(usize, EncodedExchange)>)> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match groups.iter_mut().find(|(s, _)| *s == item.session_id) {
            Some((_, group)) => group.push((index, item)),
            None => groups.push((item.session_id.clone(), vec![(index, item)])),
        }
    }
    let mut total = 0;
    for (session_id, group) in groups {
        if !super::commands::session_exists(conn, &session_id)? {
            for (index, _) in group {
                results[index] = Some(Err(StoreError::UnknownSession(session_id.clone())));
            }
            continue;
        }
        let size = group.iter().map(|(_, e)| e.tail.len() + 48).sum();
        let mut block = block_codec::new_block(size);
        let mut range: Option<(RequestId, RequestId)> = None;
        let mut provider_ids: Vec<(String, RequestId)> = Vec::new();
        let mut stored = 0;
        let count = group.len();
        for (index, item) in group {
            let id = ctx.ids.next_id();
            let duplicate_of = match &item.provider_id {
                Some(provider_id) => match find_by_provider_id(conn, &session_id, provider_id)? {
                    Some(first) => Some(first),
                    None => provider_ids
                        .iter()
                        .find(|(p, _)| p == provider_id)
                        .map(|(_, first)| *first),
                },
                None => None,
            };
            block_codec::push_record(
                &mut block,
                id,
                duplicate_of,
                item.delivered.then_some(now),
                &item.tail,
            );
            if let Some(provider_id) = item.provider_id {
                provider_ids.push((provider_id, id));
            }
            stored += item.stored;
            range = Some((range.map_or(id, |(first, _)| first), id));
            results[index] = Some(Ok(id));
        }
        let Some((first_id, last_id)) = range else {
            continue;
        };
        let at = ctx.block_files.append(&block).map_err(|err| {
            let detail = format!("cannot write a history block: {err}");
            block_files::error(ctx.block_files.dir(), detail)
        })?;
        conn.prepare_cached(
            "INSERT INTO history_blocks (first_id, last_id, session_id, count, stored_bytes, data,
                                         file_no, file_at, file_len, file_crc)
             VALUES (?1, ?2, ?3, ?4, ?5, x'', ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            first_id,
            last_id,
            session_id,
            to_i64(count),
            to_i64(stored),
            at.file,
            at.offset,
            at.len,
            at.crc
        ])?;
        if !provider_ids.is_empty() {
            let mut insert = conn.prepare_cached(
                "INSERT INTO history_provider_ids (session_id, provider_id, request_id, block)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (provider_id, id) in &provider_ids {
                insert.execute(params![session_id, provider_id, id, first_id])?;
            }
        }
        total += stored;
    }
    let results = results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Closed)))
        .collect();
    Ok((results, total))
}

/// The first request of `session_id` with this provider delivery id, rows and blocks together.
pub(crate) fn find_by_provider_id(
    conn: &Connection,
    session_id: &str,
    provider_id: &str,
) -> Result<Option<RequestId>> {
    Ok(conn
        .prepare_cached(
            "SELECT MIN(id) FROM (
                 SELECT MIN(id) AS id FROM requests WHERE session_id = ?1 AND provider_id = ?2
                 UNION ALL
                 SELECT MIN(request_id) FROM history_provider_ids
                 WHERE session_id = ?1 AND provider_id = ?2)",
        )?
        .query_row(params![session_id, provider_id], |row| row.get(0))?)
}

/// The newest id in any block.
pub(crate) fn newest_id(conn: &Connection) -> Result<Option<RequestId>> {
    Ok(conn.query_row("SELECT MAX(last_id) FROM history_blocks", [], |r| r.get(0))?)
}

/// The block holding `id`: its first id, session and records, and the record itself.
struct Found {
    first_id: RequestId,
    session_id: String,
    data: Bytes,
    entry: BlockEntry,
}

fn find(conn: &Connection, id: RequestId) -> Result<Option<Found>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT first_id, last_id, session_id, {DATA_COLUMNS} FROM history_blocks
         WHERE first_id <= ?1 ORDER BY first_id DESC LIMIT 1"
    ))?;
    let mut rows = stmt.query([id])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let first_id: RequestId = row.get(0)?;
    let last_id: RequestId = row.get(1)?;
    let session_id: String = row.get(2)?;
    if id > last_id {
        return Ok(None);
    }
    let data = block_data(conn, row, 3)?;
    let entries = decode_block(&data).ok_or_else(|| bad_block(first_id))?;
    Ok(entries.into_iter().find(|e| e.id == id).map(|entry| Found {
        first_id,
        session_id,
        data,
        entry,
    }))
}

/// A block record as listed.
fn summary(entry: &BlockEntry, session_id: &str) -> RequestSummary {
    RequestSummary {
        id: entry.id,
        session_id: session_id.to_owned(),
        received_at: entry.received_at,
        method: entry.method.clone(),
        target: entry.target.clone(),
        state: entry.state,
        attempts: 1,
        next_attempt_at: entry.received_at,
        status: entry.status,
        delivered_at: entry.delivered_at,
        duration_ms: entry.duration_ms,
        provider: entry.provider.clone(),
        duplicate_of: entry.duplicate_of,
        body_len: entry.body_len,
        body_truncated: entry.body_truncated,
    }
}

/// A request in a block, in full, if `id` is in one.
pub(crate) fn get(conn: &Connection, id: RequestId) -> Result<Option<RequestRecord>> {
    let Some(found) = find(conn, id)? else {
        return Ok(None);
    };
    let entry = &found.entry;
    let bad = || bad_block(found.first_id);
    let response = match (&entry.response, entry.status) {
        (Some((headers, body)), Some(status)) => Some(StoredResponse {
            status,
            headers: decode_headers(headers).ok_or_else(bad)?,
            body: body.clone(),
            body_len: entry.response_body_len,
            body_truncated: entry.response_body_truncated,
        }),
        _ => None,
    };
    let summary = summary(entry, &found.session_id);
    let attempt = implied_attempt(&summary, entry.error.clone(), false);
    Ok(Some(RequestRecord {
        headers: decode_headers(&entry.headers).ok_or_else(bad)?,
        body: entry.body.clone(),
        response,
        attempt_log: vec![attempt],
        summary,
    }))
}

/// The one attempt of a request passed straight through, which its row or block record
/// implies rather than `attempts` holding it. `replayed`: the request has been replayed since,
/// so its stored response is the replay's, not this attempt's.
pub(crate) fn implied_attempt(
    summary: &RequestSummary,
    error: Option<String>,
    replayed: bool,
) -> Attempt {
    let finished_at = summary.delivered_at.or_else(|| {
        summary
            .duration_ms
            .map(|d| summary.received_at + i64::try_from(d).unwrap_or(0))
    });
    Attempt {
        number: 1,
        replay: false,
        replay_of: None,
        started_at: summary.received_at,
        finished_at,
        outcome: if summary.state == RequestState::Delivered {
            super::records::AttemptOutcome::Delivered
        } else {
            super::records::AttemptOutcome::Failed
        },
        status: if replayed { None } else { summary.status },
        error,
    }
}

/// Whether a listed request passes `filter` (the same tests `queries::list` makes in SQL).
fn matches(filter: &ListFilter, s: &RequestSummary) -> bool {
    let status_ok = match filter.status {
        Some(StatusFilter::Exact(status)) => s.status == Some(status),
        Some(StatusFilter::Class(class)) => {
            let low = u16::from(class) * 100;
            s.status
                .is_some_and(|status| (low..low + 100).contains(&status))
        }
        None => true,
    };
    status_ok
        && filter.method.as_ref().is_none_or(|m| *m == s.method)
        && filter
            .path_prefix
            .as_ref()
            .is_none_or(|p| s.target.starts_with(p.as_str()))
        && filter.since.is_none_or(|since| s.received_at >= since)
        && filter.until.is_none_or(|until| s.received_at < until)
        && filter.state.is_none_or(|state| s.state == state)
}

/// Up to `want` of `session_id`'s block records that pass `filter`, newest first, all with
/// ids below `before`.
pub(crate) fn list(
    conn: &Connection,
    session_id: &str,
    filter: &ListFilter,
    before: Option<RequestId>,
    want: usize,
) -> Result<Vec<RequestSummary>> {
    // Ids are made after their request arrived: a block whose last id is older than `since`
    // holds nothing received since.
    let floor = filter.since.map(first_id_at);
    // A plain range on the index (session_id, first_id), newest first; '~' sorts after every
    // id's characters (Crockford base32).
    let below = before.map_or_else(|| "~".to_owned(), |id| id.to_string());
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT first_id, {DATA_COLUMNS} FROM history_blocks
         WHERE session_id = ?1 AND first_id < ?2 AND (?3 IS NULL OR last_id >= ?3)
         ORDER BY first_id DESC"
    ))?;
    let mut rows = stmt.query(params![session_id, below, floor])?;
    let mut found = Vec::new();
    while found.len() < want {
        let Some(row) = rows.next()? else { break };
        let first_id: RequestId = row.get(0)?;
        // A block that cannot be read (its file lost or cut short by a power cut) is left
        // out rather than failing every listing of the session.
        let entries = match block_data(conn, row, 1) {
            Ok(data) => decode_block(&data).ok_or_else(|| bad_block(first_id)),
            Err(err) => Err(err),
        };
        let entries = match entries {
            Ok(entries) => entries,
            Err(err) => {
                warn!(%err, block = %first_id, "store: a history block is left out of a listing");
                continue;
            }
        };
        for entry in entries.iter().rev() {
            if before.is_some_and(|before| entry.id >= before) {
                continue;
            }
            let summary = summary(entry, session_id);
            if matches(filter, &summary) {
                found.push(summary);
                if found.len() == want {
                    break;
                }
            }
        }
    }
    Ok(found)
}

/// The smallest id made at `ms`: every id made before sorts below it.
pub(crate) fn first_id_at(ms: i64) -> RequestId {
    RequestId::from(ulid::Ulid::from_parts(u64::try_from(ms).unwrap_or(0), 0))
}

/// Moves request `id` out of its block into a `requests` row of its own, so that it can take
/// more attempts. Returns `false` if no block holds it.
pub(crate) fn take_out(conn: &Connection, id: RequestId) -> Result<bool> {
    let Some(found) = find(conn, id)? else {
        return Ok(false);
    };
    let Found {
        first_id,
        session_id,
        data,
        entry,
    } = found;
    let stored = entry.stored();
    let rest = block_codec::without(&data, entry.span.clone());
    if rest.len() <= 1 {
        delete(conn, first_id)?;
    } else {
        conn.prepare_cached(
            "UPDATE history_blocks SET data = ?2, count = count - 1,
                 stored_bytes = stored_bytes - ?3,
                 file_no = NULL, file_at = NULL, file_len = NULL, file_crc = NULL
             WHERE first_id = ?1",
        )?
        .execute(params![first_id, rest, to_i64(stored)])?;
        conn.prepare_cached(
            "DELETE FROM history_provider_ids WHERE block = ?1 AND request_id = ?2",
        )?
        .execute(params![first_id, id])?;
    }
    let (provider, provider_id) = entry.provider.map(|p| (p.provider, p.id)).unzip();
    let (response_headers, response_body) = entry.response.unzip();
    conn.prepare_cached(super::commands::INSERT_EXCHANGE)?
        .execute(params![
            id,
            session_id,
            entry.received_at,
            entry.method,
            entry.target,
            provider,
            provider_id,
            entry.duplicate_of,
            entry.state,
            entry.body_len,
            entry.body_truncated,
            to_i64(stored),
            &entry.headers[..],
            &entry.body[..],
            entry.status,
            entry.delivered_at,
            entry
                .duration_ms
                .map(|d| i64::try_from(d).unwrap_or(i64::MAX)),
            response_headers.as_deref(),
            response_body.as_deref(),
            entry.status.map(|_| entry.response_body_len),
            entry.status.map(|_| entry.response_body_truncated),
            entry.error,
        ])?;
    super::commands::add_usage(conn, stored)?;
    Ok(true)
}

/// Deletes up to `limit` of the oldest blocks whose every request was received before
/// `cutoff` (Unix ms). Returns how many requests went.
pub(crate) fn prune_by_age(conn: &Connection, cutoff: i64, limit: usize) -> Result<(u64, usize)> {
    let bound = first_id_at(cutoff);
    let victims: Vec<(RequestId, u64)> = conn
        .prepare_cached(
            "SELECT first_id, count FROM history_blocks WHERE first_id < ?1 AND last_id < ?1
             ORDER BY first_id LIMIT ?2",
        )?
        .query_map(params![bound, to_i64(limit)], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (first_id, _) in &victims {
        delete(conn, *first_id)?;
    }
    Ok((victims.iter().map(|(_, n)| n).sum(), victims.len()))
}

/// The oldest blocks, up to `limit`: first id, stored bytes and number of requests.
pub(crate) fn oldest(conn: &Connection, limit: usize) -> Result<Vec<(RequestId, u64, u64)>> {
    Ok(conn
        .prepare_cached(
            "SELECT first_id, stored_bytes, count FROM history_blocks ORDER BY first_id LIMIT ?1",
        )?
        .query_map([to_i64(limit)], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Deletes the block that starts at `first_id`.
pub(crate) fn delete(conn: &Connection, first_id: RequestId) -> Result<()> {
    conn.prepare_cached("DELETE FROM history_blocks WHERE first_id = ?1")?
        .execute([first_id])?;
    Ok(())
}
