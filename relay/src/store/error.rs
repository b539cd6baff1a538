//! What can go wrong in the store, worded for the person running the relay.

use std::path::PathBuf;

/// An error from the store.
///
/// Errors from opening name the path involved and say what to do about it; the relay should
/// print them and refuse to start rather than run without its data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created or is not usable.
    #[error(
        "data directory {path}: {detail}; check that it is a directory the relay may write to, \
         or pick another with --data-dir"
    )]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The database file exists but is not a readable Ferry database.
    #[error(
        "database {path} is damaged or is not a Ferry database ({detail}); the relay will not \
         start over it, so no data is lost: restore it from a backup, or move it (and any \
         ferry.db-wal / ferry.db-shm beside it) aside to start with an empty store"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite or the integrity check reported.
        detail: String,
    },
    /// The database was written by a newer Ferry whose schema this build does not know.
    #[error(
        "database {path} has schema version {found}, but this ferry-relay only knows versions up \
         to {supported}; run the newer ferry-relay that wrote it, or point --data-dir elsewhere"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The version found in the file (`PRAGMA user_version`).
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The database could not be opened or set up.
    #[error("cannot open database {path}: {detail}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A request was recorded for a session the store does not know.
    #[error("unknown session '{0}'")]
    UnknownSession(String),
    /// The request id is not in the store (never recorded, or pruned).
    #[error("unknown request {0}")]
    UnknownRequest(String),
    /// The attempt is not in the store, or has already finished.
    #[error("request {request} has no unfinished attempt {attempt}")]
    UnknownAttempt {
        /// The request id.
        request: String,
        /// The attempt number.
        attempt: u32,
    },
    /// The request's body was cut at the record limit, so it cannot be delivered again.
    #[error("request {0} cannot be replayed: its body was larger than the record limit and was not kept in full")]
    Incomplete(String),
    /// A stored row could not be decoded.
    #[error("damaged record in the database: {0}")]
    BadRecord(String),
    /// SQLite reported an error while running a command.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The batch's commit failed: nothing in it was stored.
    #[error("database commit failed, nothing was stored: {0}")]
    Commit(String),
    /// The files holding history blocks could not be written, read or deleted.
    #[error("history files in {path}: {detail}")]
    Files {
        /// The directory of block files.
        path: std::path::PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The store has been closed, or its writer thread has stopped.
    #[error("the store is closed")]
    Closed,
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
