//! Read-only connections, used from tokio's blocking pool so reads never stall async workers.
//!
//! In WAL mode readers do not block the writer or each other, and see every committed batch.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

use super::error::{Result, StoreError};
use super::schema;

/// Idle read connections kept for reuse.
const MAX_IDLE: usize = 8;

/// Reads running at once. More wait (asynchronously) for their turn instead of each taking a
/// thread of the blocking pool and a connection of its own: thousands of clients reconnecting
/// at once must not make the relay start hundreds of threads.
const MAX_CONCURRENT: usize = 4;

/// A small pool of read-only connections.
#[derive(Debug)]
pub(crate) struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    turns: tokio::sync::Semaphore,
}

impl Readers {
    pub(crate) fn new(path: PathBuf, busy_timeout: Duration) -> Arc<Readers> {
        Arc::new(Readers {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
            turns: tokio::sync::Semaphore::new(MAX_CONCURRENT),
        })
    }

    /// Runs `f` with a read connection on the blocking pool.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let _turn = self.turns.acquire().await.map_err(|_| StoreError::Closed)?;
        let readers = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result = f(&conn);
            readers.give_back(conn);
            result
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    fn take(&self) -> Result<Connection> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => schema::open_reader(&self.path, self.busy_timeout),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}
