//! The relay's embedded durable store: sessions, every request with its response and delivery
//! attempts, and the offline queue, in one SQLite database at `<data_dir>/ferry.db`.
//!
//! # Durability
//! The database runs in WAL mode with `synchronous=FULL`: when a write method returns `Ok`, the
//! change is on disk and survives a crash or power loss. Opening the store checks the file
//! (`PRAGMA quick_check`) and refuses — with a [`StoreError`] naming the path and what to do —
//! a damaged file, a file that is not Ferry's, a schema from a newer Ferry, or a data directory
//! it cannot use. It never starts empty over existing data.
//!
//! # Threads
//! No database work runs on async worker threads.
//! - **Writes** go through a bounded channel to one dedicated writer thread, which owns the
//!   write connection and commits in groups: it takes every command already queued (up to
//!   [`StoreOptions::max_batch`]), runs them in one transaction, commits once, then answers
//!   each caller. Under load one `fsync` covers many requests; [`Store::stats`] shows how many.
//! - **Reads** use separate read-only connections on tokio's blocking pool; WAL lets them run
//!   alongside the writer and each other.
//!
//! # Request life cycle
//! ```text
//! record_request(Queued) ──> queued() ──> start_attempt ──> finish_attempt(Delivered) ─> delivered
//!        │                      ▲                                │
//! record_request(Delivering) ───┼──> start_attempt ──────────────┤ Rejected/Error + retry_at
//!                               └────────────────────────────────┘ (back to queued, later)
//!                                         Rejected/Error without retry_at ──> failed (parked)
//! ```
//! Requests passed straight through ([`Store::record_exchanges`]) are final when recorded and
//! are written many to a row, as history blocks (`blocks`); reads merge them with the rows, and
//! a replay first moves its request out of its block into a row.
//!
//! A replay ([`Store::start_replay`]) is an extra attempt on the same request, linked to the
//! attempt it repeats; it does not change the request's state, except that a successful replay
//! of a failed request marks it delivered. Requests found `delivering` when the store opens
//! (the relay stopped mid-delivery) go back to the queue: delivery is at least once.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), ferry_relay::store::StoreError> {
//! use ferry_relay::store::*;
//! let store = Store::open("./ferry-data", StoreOptions::default()).await?;
//! let sessions = store.load_sessions().await?;
//! # let _ = sessions;
//! let request = NewRequest::new(
//!     "stripe-dev", now_ms(), "POST", "/webhooks?x=1",
//!     Default::default(), bytes::Bytes::from_static(b"{}"), RequestState::Queued,
//! );
//! let id = store.record_request(request).await?; // on disk now: answer 202
//! # let _ = id;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

mod block_codec;
mod block_files;
mod blocks;
mod codec;
mod commands;
mod error;
mod ids;
pub mod provider;
mod queries;
mod reader;
mod records;
mod schema;
mod sql;
mod writer;

#[cfg(test)]
mod tests;

pub use error::{Result, StoreError};
pub use ids::{BadRequestId, RequestId};
pub use provider::{delivery_id, ProviderId};
pub use records::{
    Attempt, AttemptOutcome, ListFilter, ListPage, NewRequest, OfflinePolicy, Outcome, Page,
    PruneReport, QueuedRequest, RequestRecord, RequestState, RequestSummary, RespondMode, Response,
    SessionKind, SessionRecord, StatusFilter, StoredResponse,
};
pub use schema::SCHEMA_VERSION;

pub(crate) use block_codec::EncodedExchange;
use commands::{EncodedOutcome, Insert};
use reader::Readers;
use writer::{Counters, Limits, WriterCtx, WriterHandle};

/// The database's file name inside the data directory.
pub const DB_FILE: &str = "ferry.db";

/// Rows deleted per transaction while pruning, so that pruning never stalls other writes long.
const PRUNE_CHUNK: usize = 2000;

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Settings for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Request and response bodies longer than this are cut in history (`--record-max-body`).
    /// Requests recorded as [`RequestState::Queued`] always keep their whole body, since they
    /// must still be delivered. Default 32 MiB.
    pub record_max_body: usize,
    /// How long a connection waits for a lock held by another before failing. Default 5 s.
    pub busy_timeout: Duration,
    /// Capacity of the writer's command channel; callers wait when it is full. Default 4096.
    pub queue_capacity: usize,
    /// Most commands committed in one transaction. Default 1024.
    pub max_batch: usize,
    /// Most payload bytes (bodies and headers) committed in one transaction; a single larger
    /// command still goes through, alone. Default 64 MiB.
    pub max_batch_bytes: usize,
    /// Run `PRAGMA quick_check` when opening. Default on; it reads the whole file.
    pub check_on_open: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            record_max_body: 32 * 1024 * 1024,
            busy_timeout: Duration::from_secs(5),
            queue_capacity: 4096,
            max_batch: 1024,
            max_batch_bytes: 64 * 1024 * 1024,
            check_on_open: true,
        }
    }
}

/// Counters of the writer's work since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed (each one `fsync` of the WAL).
    pub transactions: u64,
    /// Write commands run; `commands / transactions` is the average batch size.
    pub commands: u64,
}

/// The durable store. Cheap to clone: clones share the writer and the read connections.
///
/// The writer thread stops when the last clone is dropped (after running what is queued) or
/// at [`Store::close`].
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    writer: WriterHandle,
    readers: Arc<Readers>,
    counters: Arc<Counters>,
    record_max_body: usize,
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`, on tokio's blocking pool.
    /// See [`Store::open_blocking`].
    pub async fn open(data_dir: impl Into<PathBuf>, options: StoreOptions) -> Result<Store> {
        let data_dir = data_dir.into();
        tokio::task::spawn_blocking(move || Store::open_blocking(&data_dir, options))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Opens (creating if needed) the store in `data_dir`: creates the directory, opens
    /// `ferry.db`, checks it, brings its schema up to date, puts interrupted deliveries back in
    /// the queue and starts the writer thread. Blocks: call it before serving, or from
    /// `spawn_blocking`.
    pub fn open_blocking(data_dir: &Path, options: StoreOptions) -> Result<Store> {
        let dir_error = |detail: String| StoreError::DataDir {
            path: data_dir.to_owned(),
            detail,
        };
        std::fs::create_dir_all(data_dir)
            .map_err(|e| dir_error(format!("cannot create it: {e}")))?;
        if !data_dir.is_dir() {
            return Err(dir_error("not a directory".into()));
        }
        check_writable(data_dir).map_err(|e| dir_error(format!("cannot write in it: {e}")))?;
        let path = data_dir.join(DB_FILE);
        let wal = data_dir.join(format!("{DB_FILE}-wal"));
        if !path.exists() && wal.exists() {
            return Err(StoreError::Corrupt {
                path,
                detail: format!("{} exists but the database file is missing", wal.display()),
            });
        }
        let conn = schema::open_writer(&path, options.busy_timeout, options.check_on_open)?;
        let now = now_ms();
        let recovery = conn.unchecked_transaction()?;
        let requeued = commands::recover_interrupted(&recovery, now)?;
        recovery.commit()?;
        if requeued > 0 {
            warn!(
                requeued,
                "store: requests interrupted mid-delivery go back to the queue"
            );
        }
        let newest: Option<RequestId> =
            conn.query_row("SELECT MAX(id) FROM requests", [], |r| r.get(0))?;
        let newest = newest.max(blocks::newest_id(&conn)?);
        let mut block_files = block_files::BlockFiles::open(data_dir).map_err(|e| {
            dir_error(format!(
                "cannot use {}: {e}",
                data_dir.join(block_files::DIR).display()
            ))
        })?;
        // Files left behind by blocks deleted just before a stop.
        block_files.collect(&conn)?;
        let ctx = WriterCtx {
            ids: ids::IdGenerator::after(newest),
            record_max_body: options.record_max_body,
            block_files,
        };
        let counters = Arc::new(Counters::default());
        let limits = Limits {
            max_batch: options.max_batch.max(1),
            max_batch_bytes: options.max_batch_bytes,
        };
        let writer =
            WriterHandle::spawn(conn, ctx, options.queue_capacity, limits, counters.clone())
                .map_err(|e| StoreError::Open {
                    path: path.clone(),
                    detail: format!("cannot start the writer thread: {e}"),
                })?;
        info!(path = %path.display(), "store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                readers: Readers::new(path.clone(), options.busy_timeout),
                path,
                writer,
                counters,
                record_max_body: options.record_max_body,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The writer's counters so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            transactions: self.inner.counters.transactions.load(Ordering::Relaxed),
            commands: self.inner.counters.commands.load(Ordering::Relaxed),
        }
    }

    /// A receiver that changes after every transaction the writer ends (committed or not): a
    /// readiness signal for tests and tools waiting for a background write, such as a history
    /// record, to land.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.counters.committed.subscribe()
    }

    /// Runs the commands already queued, checkpoints the WAL into the database file, and stops
    /// the writer. Afterwards every write (on any clone) fails with [`StoreError::Closed`].
    /// Not needed for durability — every acknowledged write is already on disk.
    pub async fn close(&self) {
        self.inner.writer.shutdown().await;
    }

    // ---- sessions ----

    /// Creates the session or replaces all of it but `created_at`.
    pub async fn upsert_session(&self, session: SessionRecord) -> Result<()> {
        self.inner
            .writer
            .call(0, move |conn, _| commands::upsert_session(conn, &session))
            .await
    }

    /// Every session, oldest first (for start-up).
    pub async fn load_sessions(&self) -> Result<Vec<SessionRecord>> {
        self.inner.readers.run(queries::load_sessions).await
    }

    /// Deletes the session and all its requests; `false` if there was no such session.
    pub async fn delete_session(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.inner
            .writer
            .call(0, move |conn, _| commands::delete_session(conn, &id))
            .await
    }

    // ---- requests ----

    /// Records a request and returns its new id once it is on disk.
    ///
    /// If the session already has a request with the same provider delivery id, this one is
    /// recorded as a duplicate of the first. Fails with [`StoreError::UnknownSession`] if the
    /// session is not in the store.
    pub async fn record_request(&self, request: NewRequest) -> Result<RequestId> {
        let insert = Insert::new(request, None);
        let kept = if insert.state == RequestState::Queued {
            insert.body.len()
        } else {
            insert.body.len().min(self.inner.record_max_body)
        };
        let weight = insert.headers.len() + kept;
        self.inner
            .writer
            .call(weight, move |conn, ctx| {
                commands::record_request(conn, ctx, insert)
            })
            .await
    }

    /// Records requests that were passed straight through, each together with how its exchange
    /// ended, in one write command (one transaction), as if [`Store::record_request`] (state
    /// `Delivering`), [`Store::start_attempt`] and [`Store::finish_attempt`] ran back to back: a
    /// crash never leaves one half recorded, and so never queues it for a second delivery. A
    /// request of an unknown session gets its own error; the others are recorded. History
    /// needs no fsync: the batch commits with `synchronous=NORMAL` unless it shares its
    /// transaction with durable commands.
    pub async fn record_exchanges(
        &self,
        exchanges: Vec<(NewRequest, Outcome)>,
    ) -> Result<Vec<Result<RequestId>>> {
        let max_body = self.inner.record_max_body;
        let items = exchanges
            .into_iter()
            .map(|(request, outcome)| EncodedExchange::new(request, outcome, max_body))
            .collect();
        self.record_encoded(items).await
    }

    /// [`Store::record_exchanges`] for exchanges already encoded, which is what the relay
    /// keeps while a batch gathers: one buffer per exchange instead of every header's.
    pub(crate) async fn record_encoded(
        &self,
        items: Vec<EncodedExchange>,
    ) -> Result<Vec<Result<RequestId>>> {
        let weight = items.iter().map(|item| item.tail.len()).sum();
        self.inner
            .writer
            .call_lazy(weight, move |conn, ctx| {
                // With its session known to exist, an exchange fails only with the database
                // itself (I/O, full disk): then the whole batch fails and is rolled back.
                let (results, stored) = blocks::write(conn, ctx, items, now_ms())?;
                commands::add_usage(conn, stored)?;
                Ok(results)
            })
            .await
    }

    /// The most body bytes history keeps of a request or response (`--record-max-body`).
    pub(crate) fn record_max_body(&self) -> usize {
        self.inner.record_max_body
    }

    /// Starts a delivery attempt: the request becomes [`RequestState::Delivering`] and its
    /// attempt count goes up. Returns the attempt's number, for [`Store::finish_attempt`].
    pub async fn start_attempt(&self, id: RequestId) -> Result<u32> {
        self.inner
            .writer
            .call(0, move |conn, _| {
                commands::start_attempt(conn, id, false, now_ms())
            })
            .await
    }

    /// Starts a replay: a new attempt linked to the request's latest one, leaving the request's
    /// state alone. Fails with [`StoreError::Incomplete`] if the body was not kept in full.
    pub async fn start_replay(&self, id: RequestId) -> Result<u32> {
        self.inner
            .writer
            .call(0, move |conn, _| {
                commands::start_attempt(conn, id, true, now_ms())
            })
            .await
    }

    /// Records how attempt `attempt` of `id` ended, and returns the request's new state.
    ///
    /// - [`Outcome::Delivered`]: the response is stored and the request is delivered.
    /// - [`Outcome::Rejected`] / [`Outcome::Error`] with `retry_at`: the request goes back to
    ///   the queue, due at `retry_at`; without, it is parked as failed. A request whose body was
    ///   cut at the record limit cannot be retried and is parked.
    ///
    /// For a replay only the attempt is updated (and a failed request that a replay delivered
    /// becomes delivered).
    pub async fn finish_attempt(
        &self,
        id: RequestId,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<RequestState> {
        let outcome = EncodedOutcome::new(outcome);
        let weight = outcome.weight().min(self.inner.record_max_body);
        self.inner
            .writer
            .call(weight, move |conn, ctx| {
                commands::finish_attempt(conn, ctx, id, attempt, outcome, now_ms())
            })
            .await
    }

    /// Marks the request delivered without a stored response, ending its unfinished delivery
    /// attempts as delivered.
    pub async fn mark_delivered(&self, id: RequestId) -> Result<()> {
        self.inner
            .writer
            .call(0, move |conn, _| {
                commands::mark_delivered(conn, id, now_ms())
            })
            .await
    }

    /// Parks the request as failed, ending its unfinished delivery attempts with `reason`.
    pub async fn mark_failed(&self, id: RequestId, reason: &str) -> Result<()> {
        let reason = reason.to_owned();
        self.inner
            .writer
            .call(0, move |conn, _| {
                commands::mark_failed(conn, id, &reason, now_ms())
            })
            .await
    }

    /// Up to `limit` queued requests of the session that are due now, in arrival order, with
    /// everything needed to deliver them.
    pub async fn queued(&self, session_id: &str, limit: usize) -> Result<Vec<QueuedRequest>> {
        let session_id = session_id.to_owned();
        self.inner
            .readers
            .run(move |conn| queries::queued(conn, &session_id, now_ms(), limit))
            .await
    }

    /// When the session's earliest queued request is due (Unix ms; may be in the past), or
    /// `None` if nothing is queued. For scheduling retries.
    pub async fn next_due(&self, session_id: &str) -> Result<Option<i64>> {
        let session_id = session_id.to_owned();
        self.inner
            .readers
            .run(move |conn| queries::next_due(conn, &session_id))
            .await
    }

    /// A page of the session's requests, newest first, that match `filter`.
    pub async fn list(
        &self,
        session_id: &str,
        filter: &ListFilter,
        page: Page,
    ) -> Result<ListPage> {
        let session_id = session_id.to_owned();
        let filter = filter.clone();
        self.inner
            .readers
            .run(move |conn| queries::list(conn, &session_id, &filter, page))
            .await
    }

    /// One request in full with its attempts, or `None` if it is not stored (any session:
    /// check [`RequestSummary::session_id`] before showing it).
    pub async fn get(&self, id: RequestId) -> Result<Option<RequestRecord>> {
        self.inner
            .readers
            .run(move |conn| queries::get(conn, id))
            .await
    }

    /// The session's first request with this provider delivery id.
    pub async fn find_by_provider_id(
        &self,
        session_id: &str,
        provider_id: &str,
    ) -> Result<Option<RequestId>> {
        let session_id = session_id.to_owned();
        let provider_id = provider_id.to_owned();
        self.inner
            .readers
            .run(move |conn| queries::find_by_provider_id(conn, &session_id, &provider_id))
            .await
    }

    /// Bytes of headers and bodies stored (requests and responses), as counted by `max_bytes`
    /// in [`Store::prune`].
    pub async fn stored_bytes(&self) -> Result<u64> {
        self.inner.readers.run(commands::stored_bytes).await
    }

    /// Deletes old history, oldest first:
    /// 1. every request received before `now_ms - retention`, whatever its state (except one
    ///    being delivered at this moment);
    /// 2. then, while the stored bytes exceed `max_bytes`, delivered and failed requests.
    ///    Queued requests are never deleted for size.
    ///
    /// Works in chunks of a few thousand rows per transaction, so it never holds up other
    /// writes for long; run it in the background.
    pub async fn prune(
        &self,
        now_ms: i64,
        retention: Duration,
        max_bytes: Option<u64>,
    ) -> Result<PruneReport> {
        let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(retention);
        let mut report = PruneReport::default();
        loop {
            let (deleted, more) = self
                .inner
                .writer
                .call(0, move |conn, _| {
                    commands::prune_by_age(conn, cutoff, PRUNE_CHUNK)
                })
                .await?;
            report.by_age += deleted;
            if !more {
                break;
            }
        }
        if let Some(max_bytes) = max_bytes {
            loop {
                let (deleted, done) = self
                    .inner
                    .writer
                    .call(0, move |conn, _| {
                        commands::prune_by_size(conn, max_bytes, PRUNE_CHUNK)
                    })
                    .await?;
                report.by_size += deleted;
                if done {
                    break;
                }
            }
        }
        report.stored_bytes = self
            .inner
            .writer
            .call(0, move |conn, ctx| {
                if report.by_age + report.by_size > 0 {
                    commands::release_space(conn)?;
                    ctx.block_files.collect_after_commit();
                }
                commands::stored_bytes(conn)
            })
            .await?;
        Ok(report)
    }
}

/// Creates and removes a file in `dir`, to find an unusable directory before SQLite does.
fn check_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(".ferry-write-check");
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}
