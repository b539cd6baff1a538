//! The writer thread: sole owner of the write connection, committing in groups.
//!
//! Callers queue [`Job`]s on a bounded channel. The thread blocks for the first job, takes
//! whatever else is already queued (up to a count and a byte budget), runs them all in one
//! transaction — each inside its own savepoint, so one failing command does not undo the
//! others — commits once, and only then answers every caller. One `fsync` thus covers a whole
//! batch: under load, throughput grows with concurrency instead of being capped by the disk's
//! sync latency.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::block_files::BlockFiles;
use super::error::{Result, StoreError};
use super::ids::IdGenerator;

/// State the writer keeps between commands.
pub(crate) struct WriterCtx {
    /// Hands out request ids in commit order.
    pub(crate) ids: IdGenerator,
    /// Bodies beyond this are cut in history (see `StoreOptions::record_max_body`).
    pub(crate) record_max_body: usize,
    /// Where history blocks' bytes are written.
    pub(crate) block_files: BlockFiles,
}

/// Called after the batch's commit with the commit's error, if any; answers the caller.
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// One queued command.
trait Command: Send {
    /// Runs against the connection inside the batch's transaction. Returns whether it failed
    /// (its changes are then rolled back) and how to answer once the batch is committed.
    fn run(self: Box<Self>, conn: &Connection, ctx: &mut WriterCtx) -> (bool, Answer);

    /// Answers with `error` without running.
    fn abort(self: Box<Self>, error: &str);
}

/// A caller's closure and its reply channel.
struct Call<F, T> {
    f: F,
    reply: oneshot::Sender<Result<T>>,
}

impl<F, T> Command for Call<F, T>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &mut WriterCtx) -> Result<T> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection, ctx: &mut WriterCtx) -> (bool, Answer) {
        let Call { f, reply } = *self;
        let result = f(conn, ctx);
        let failed = result.is_err();
        let answer: Answer = Box::new(move |commit_error: Option<&str>| {
            let result = match (commit_error, result) {
                (Some(error), Ok(_)) => Err(StoreError::Commit(error.to_owned())),
                (_, result) => result,
            };
            let _ = reply.send(result);
        });
        (failed, answer)
    }

    fn abort(self: Box<Self>, error: &str) {
        let _ = self.reply.send(Err(StoreError::Commit(error.to_owned())));
    }
}

type Job = Box<dyn Command>;

/// What travels on the channel.
enum Message {
    /// A command, with its share of the batch's byte budget.
    Job {
        job: Job,
        weight: usize,
        /// Must be on disk when its caller hears back (`false`: history, which may be lost in
        /// a power cut but never corrupted).
        durable: bool,
    },
    /// Finish what is queued, checkpoint, close the connection and stop.
    Shutdown(oneshot::Sender<()>),
}

/// Batch limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most commands in one transaction.
    pub(crate) max_batch: usize,
    /// Most payload bytes in one transaction (a single larger command still runs, alone).
    pub(crate) max_batch_bytes: usize,
}

/// Counters shared with [`Store::stats`](super::Store::stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) commands: AtomicU64,
    /// Transactions committed (or failed) so far, for whoever waits for a write to land.
    pub(crate) committed: tokio::sync::watch::Sender<u64>,
}

/// The sending side, held by the store.
#[derive(Debug, Clone)]
pub(crate) struct WriterHandle {
    tx: mpsc::Sender<Message>,
}

impl WriterHandle {
    /// Starts the writer thread over `conn`.
    pub(crate) fn spawn(
        conn: Connection,
        ctx: WriterCtx,
        capacity: usize,
        limits: Limits,
        counters: Arc<Counters>,
    ) -> std::io::Result<WriterHandle> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        std::thread::Builder::new()
            .name("ferry-store-writer".into())
            .spawn(move || run(conn, ctx, rx, limits, &counters))?;
        Ok(WriterHandle { tx })
    }

    /// Runs `f` in the writer's next transaction and returns its result once committed.
    ///
    /// If `f` fails, its changes are rolled back (the rest of the batch still commits). If the
    /// commit fails, the caller gets [`StoreError::Commit`] even if `f` succeeded.
    pub(crate) async fn call<T, F>(&self, weight: usize, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterCtx) -> Result<T> + Send + 'static,
    {
        self.submit(weight, true, f).await
    }

    /// [`WriterHandle::call`] for a command whose changes need not survive a power cut
    /// (history): a batch of such commands only is committed without waiting for the disk (WAL
    /// with `synchronous=NORMAL`: still atomic and never corrupt, possibly lost if the machine
    /// loses power).
    pub(crate) async fn call_lazy<T, F>(&self, weight: usize, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterCtx) -> Result<T> + Send + 'static,
    {
        self.submit(weight, false, f).await
    }

    async fn submit<T, F>(&self, weight: usize, durable: bool, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterCtx) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(Call { f, reply });
        self.tx
            .send(Message::Job {
                job,
                weight,
                durable,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Asks the writer to finish the queued commands and stop; waits until it has.
    pub(crate) async fn shutdown(&self) {
        let (done, stopped) = oneshot::channel();
        if self.tx.send(Message::Shutdown(done)).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

fn run(
    conn: Connection,
    mut ctx: WriterCtx,
    mut rx: mpsc::Receiver<Message>,
    limits: Limits,
    counters: &Counters,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(limits.max_batch);
    let mut stop: Option<oneshot::Sender<()>> = None;
    // The connection starts with synchronous=FULL (see `schema::open_writer`).
    let mut synced = true;
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = 0usize;
        let mut durable = false;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Job {
                    job,
                    weight,
                    durable: needs_sync,
                } => {
                    bytes = bytes.saturating_add(weight);
                    durable |= needs_sync;
                    batch.push(job);
                }
                Message::Shutdown(done) => stop = Some(done),
            }
            if stop.is_none() && batch.len() < limits.max_batch && bytes < limits.max_batch_bytes {
                next = rx.try_recv().ok();
            }
        }
        if stop.is_some() {
            // Refuse new commands, but run the ones already queued.
            rx.close();
            while let Ok(message) = rx.try_recv() {
                if let Message::Job {
                    job,
                    durable: needs_sync,
                    ..
                } = message
                {
                    durable |= needs_sync;
                    batch.push(job);
                }
            }
        }
        if !batch.is_empty() {
            if durable != synced {
                let level = if durable { "FULL" } else { "NORMAL" };
                match conn.pragma_update(None, "synchronous", level) {
                    Ok(()) => synced = durable,
                    Err(err) => warn!(%err, "store: cannot set synchronous={level}"),
                }
            }
            run_batch(&conn, &mut ctx, &mut batch, counters);
        }
        if stop.is_some() {
            break;
        }
    }
    // Fold the WAL back into the database so the directory holds a single file at rest.
    if let Err(err) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        debug!(%err, "store: checkpoint at close failed");
    }
    if let Err(err) = ctx.block_files.sync() {
        warn!(%err, "store: cannot sync the history file at close");
    }
    drop(conn);
    if let Some(done) = stop {
        let _ = done.send(());
    }
}

/// Runs `batch` in one transaction and answers every job.
fn run_batch(conn: &Connection, ctx: &mut WriterCtx, batch: &mut Vec<Job>, counters: &Counters) {
    let count = batch.len() as u64;
    if let Err(err) = run_cached(conn, "BEGIN IMMEDIATE") {
        let error = err.to_string();
        warn!(%error, "store: cannot begin a transaction");
        for job in batch.drain(..) {
            job.abort(&error);
        }
        return;
    }
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        answers.push(run_one(conn, ctx, job));
    }
    let commit = run_cached(conn, "COMMIT").map_err(|err| {
        let error = err.to_string();
        warn!(%error, "store: commit failed; the batch is lost");
        let _ = conn.execute_batch("ROLLBACK");
        error
    });
    counters.transactions.fetch_add(1, Ordering::Relaxed);
    counters.commands.fetch_add(count, Ordering::Relaxed);
    counters.committed.send_modify(|n| *n += 1);
    let commit_error = commit.err();
    if commit_error.is_none() {
        ctx.block_files.after_commit(conn);
    }
    for answer in answers {
        answer(commit_error.as_deref());
    }
}

/// Runs one of the statements every batch or command runs, parsed once per connection.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs one job inside a savepoint; a failed or panicking job leaves no trace in the database.
fn run_one(conn: &Connection, ctx: &mut WriterCtx, job: Job) -> Answer {
    if let Err(err) = run_cached(conn, "SAVEPOINT command") {
        job.abort(&err.to_string());
        return Box::new(|_| {});
    }
    match catch_unwind(AssertUnwindSafe(|| job.run(conn, ctx))) {
        Ok((false, answer)) => {
            let _ = run_cached(conn, "RELEASE command");
            answer
        }
        Ok((true, answer)) => {
            let _ = conn.execute_batch("ROLLBACK TO command; RELEASE command");
            answer
        }
        Err(_) => {
            warn!("store: a command panicked; its changes were rolled back");
            let _ = conn.execute_batch("ROLLBACK TO command; RELEASE command");
            // The unwind dropped the job's reply channel: its caller sees `Closed`.
            Box::new(|_| {})
        }
    }
}
