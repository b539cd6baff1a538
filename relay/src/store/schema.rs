//! Opening the database: connection settings, integrity check and schema migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::error::{Result, StoreError};

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 4;

/// Migrations: `MIGRATIONS[n]` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: [&str; 4] = [V1, V2, V3, V4];

/// Version 4, history blocks in files: a new block's bytes go to `DATA_DIR/history/` (see
/// `block_files`), and its row says where (`file_no`, `file_at`, `file_len`) with a CRC-32
/// (`file_crc`); `data` is then empty. Blocks written before, and what is left of a block
/// after a replay took a record out of it, keep their bytes in `data` (`file_no` NULL).
const V4: &str = "
ALTER TABLE history_blocks ADD COLUMN file_no INTEGER;
ALTER TABLE history_blocks ADD COLUMN file_at INTEGER;
ALTER TABLE history_blocks ADD COLUMN file_len INTEGER;
ALTER TABLE history_blocks ADD COLUMN file_crc INTEGER;
";

/// Version 3, history blocks: requests passed straight through are written many to a row, one
/// row per history batch and session (see `blocks`), rather than a `requests` row each.
/// Blocks never overlap; `first_id` and `last_id` bound the ids they hold. Provider delivery
/// ids of their requests are indexed beside them, so retries are still marked duplicates.
/// `usage` keeps counting their bytes: inserts add them, triggers subtract what is deleted or
/// taken out (a replayed request moves to a row of its own).
const V3: &str = "
CREATE TABLE history_blocks (
    first_id     TEXT PRIMARY KEY NOT NULL,
    last_id      TEXT NOT NULL,
    session_id   TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    count        INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    data         BLOB NOT NULL
);
CREATE INDEX history_blocks_by_session ON history_blocks (session_id, first_id);
CREATE TABLE history_provider_ids (
    session_id  TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    block       TEXT NOT NULL REFERENCES history_blocks (first_id) ON DELETE CASCADE,
    PRIMARY KEY (session_id, provider_id, request_id)
) WITHOUT ROWID;
CREATE INDEX history_provider_ids_by_block ON history_provider_ids (block);
CREATE TRIGGER history_blocks_usage_delete AFTER DELETE ON history_blocks BEGIN
    UPDATE usage SET stored_bytes = stored_bytes - OLD.stored_bytes;
END;
CREATE TRIGGER history_blocks_usage_update AFTER UPDATE OF stored_bytes ON history_blocks BEGIN
    UPDATE usage SET stored_bytes = stored_bytes - OLD.stored_bytes + NEW.stored_bytes;
END;
";

/// Version 2, lighter rows for history (passed-through requests are the bulk of all rows):
/// - inserts add their bytes to `usage` themselves (once per batch of history) instead of
///   through a trigger per row, which made every insert open a statement journal;
/// - a passed-through request's single attempt lives in its row (`error` is new) rather than
///   in `attempts`, which keeps deliveries of queued requests and replays;
/// - pruning by age walks ids (ULIDs, which sort by the time they were made, never before
///   the request arrived), so `received_at` needs no index of its own.
const V2: &str = "
DROP TRIGGER requests_usage_insert;
DROP INDEX requests_by_received_at;
ALTER TABLE requests ADD COLUMN error TEXT;
";

/// Version 1.
///
/// Request rows keep their small columns first and their BLOBs last, so that listing and
/// pruning read only the start of each row and never the BLOBs' overflow pages.
/// `usage.stored_bytes` is kept equal to the sum of `requests.stored_bytes` by triggers, so the
/// byte limit can be checked without a scan.
const V1: &str = "
CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY NOT NULL,
    owner               BLOB NOT NULL CHECK (length(owner) = 32),
    resume_digest       BLOB NOT NULL CHECK (length(resume_digest) = 32),
    kind                TEXT NOT NULL CHECK (kind IN ('named', 'random')),
    offline             TEXT NOT NULL DEFAULT 'queue' CHECK (offline IN ('queue', 'reject')),
    respond             TEXT NOT NULL DEFAULT 'pass' CHECK (respond IN ('pass', 'now', 'deadline')),
    respond_status      INTEGER,
    respond_body        BLOB,
    respond_deadline_ms INTEGER,
    created_at          INTEGER NOT NULL,
    last_seen_at        INTEGER NOT NULL
);

CREATE TABLE requests (
    id                      TEXT PRIMARY KEY NOT NULL,
    session_id              TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    received_at             INTEGER NOT NULL,
    method                  TEXT NOT NULL,
    target                  TEXT NOT NULL,
    provider                TEXT,
    provider_id             TEXT,
    duplicate_of            TEXT,
    state                   TEXT NOT NULL
                            CHECK (state IN ('queued', 'delivering', 'delivered', 'failed')),
    attempts                INTEGER NOT NULL DEFAULT 0,
    next_attempt_at         INTEGER NOT NULL,
    body_len                INTEGER NOT NULL,
    body_truncated          INTEGER NOT NULL DEFAULT 0,
    status                  INTEGER,
    delivered_at            INTEGER,
    duration_ms             INTEGER,
    response_body_len       INTEGER,
    response_body_truncated INTEGER,
    stored_bytes            INTEGER NOT NULL,
    headers                 BLOB NOT NULL,
    body                    BLOB NOT NULL,
    response_headers        BLOB,
    response_body           BLOB
);
CREATE INDEX requests_by_session ON requests (session_id, id);
CREATE INDEX requests_queue ON requests (session_id, id) WHERE state = 'queued';
CREATE INDEX requests_by_provider_id ON requests (session_id, provider_id)
    WHERE provider_id IS NOT NULL;
CREATE INDEX requests_by_received_at ON requests (received_at);

CREATE TABLE attempts (
    request_id  TEXT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('delivery', 'replay')),
    replay_of   INTEGER,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT NOT NULL
                CHECK (outcome IN ('in_progress', 'delivered', 'retry', 'failed', 'interrupted')),
    status      INTEGER,
    error       TEXT,
    PRIMARY KEY (request_id, attempt)
) WITHOUT ROWID;

CREATE TABLE usage (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    stored_bytes INTEGER NOT NULL
);
INSERT INTO usage (id, stored_bytes) VALUES (1, 0);
CREATE TRIGGER requests_usage_insert AFTER INSERT ON requests BEGIN
    UPDATE usage SET stored_bytes = stored_bytes + NEW.stored_bytes;
END;
CREATE TRIGGER requests_usage_delete AFTER DELETE ON requests BEGIN
    UPDATE usage SET stored_bytes = stored_bytes - OLD.stored_bytes;
END;
CREATE TRIGGER requests_usage_update AFTER UPDATE OF stored_bytes ON requests BEGIN
    UPDATE usage SET stored_bytes = stored_bytes - OLD.stored_bytes + NEW.stored_bytes;
END;
";

/// Turns an SQLite error met while opening `path` into an error that says what to do.
fn open_error(path: &Path, err: rusqlite::Error) -> StoreError {
    let detail = err.to_string();
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_owned(),
            detail,
        },
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => {
            StoreError::DataDir {
                path: path.parent().unwrap_or(path).to_owned(),
                detail: format!("cannot open {}: {detail}", path.display()),
            }
        }
        _ => StoreError::Open {
            path: path.to_owned(),
            detail,
        },
    }
}

/// Opens the write connection: checks the file, migrates it to [`SCHEMA_VERSION`] and turns on
/// WAL with `synchronous=FULL`, so that a commit is on disk before it returns.
pub(crate) fn open_writer(path: &Path, busy_timeout: Duration, check: bool) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    setup_writer(&conn, path, busy_timeout, check).map_err(|e| match e {
        StoreError::Sqlite(err) => open_error(path, err),
        other => other,
    })?;
    Ok(conn)
}

fn setup_writer(conn: &Connection, path: &Path, busy_timeout: Duration, check: bool) -> Result<()> {
    conn.busy_timeout(busy_timeout)?;
    // Room for every statement the writer runs (about 30, transaction control included), so
    // none is parsed again because another pushed it out of the cache (rusqlite keeps 16).
    conn.set_prepared_statement_cache_capacity(64);
    // 16 KiB pages rather than 4: a history row (a webhook with its body) is one to two KiB, so
    // a page holds eight of them instead of two, and inserts split pages, rebalance the tree and
    // write WAL frame headers a quarter as often (docs/BENCHMARKS.md). Only a new, empty file
    // takes it, and only before anything at all has read it; an existing file keeps its size.
    conn.pragma_update(None, "page_size", 16384)?;
    // The first read of the file: garbage in it fails here with "file is not a database".
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if check {
        quick_check(conn, path)?;
    }
    if version == 0 {
        // Lets pruning give space back. Only takes effect on a new, empty file, so it goes
        // before anything (switching to WAL included) writes to it.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_owned(),
            detail: format!(
                "could not switch to WAL mode (got {mode:?}); is the file system local?"
            ),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Savepoints (one per command in a group commit) journal the pages they touch: in memory,
    // not in a temporary file written page by page.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoint every ~16 MiB of WAL rather than 4: pages changed again and again (index
    // pages, the usage row) are copied back into the database less often. (The setting counts
    // pages: 1,000 of 16 KiB; an older file with 4 KiB pages checkpoints every 4 MiB.)
    conn.pragma_update(None, "wal_autocheckpoint", 1000)?;
    migrate(conn, path, version)?;
    Ok(())
}

/// Runs `PRAGMA quick_check`, failing with [`StoreError::Corrupt`] unless it says `ok`.
fn quick_check(conn: &Connection, path: &Path) -> Result<()> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
    let problems: Vec<String> = stmt
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StoreError::Corrupt {
        path: path.to_owned(),
        detail: format!("integrity check failed: {}", problems.join("; ")),
    })
}

fn migrate(conn: &Connection, path: &Path, mut version: i64) -> Result<()> {
    if version == 0 {
        let tables: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
        if tables > 0 {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                detail: "it has tables but no Ferry schema version".to_owned(),
            });
        }
    }
    while version < SCHEMA_VERSION {
        let step = MIGRATIONS[usize::try_from(version).unwrap_or(0)];
        let next = version + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {step}; PRAGMA user_version = {next}; COMMIT;"
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
        version = next;
    }
    Ok(())
}

/// Opens a read-only connection to a database already set up by [`open_writer`].
pub(crate) fn open_reader(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ListFilter, Page, Store, StoreOptions, DB_FILE};

    #[tokio::test]
    async fn a_version_2_database_is_brought_up_to_date_with_its_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(DB_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!("{V1}; {V2}; PRAGMA user_version = 2;"))
                .unwrap();
            conn.execute_batch(
                "INSERT INTO sessions (id, owner, resume_digest, kind, created_at, last_seen_at)
                 VALUES ('s1', zeroblob(32), zeroblob(32), 'named', 1, 1);
                 INSERT INTO requests (id, session_id, received_at, method, target, state,
                                       attempts, next_attempt_at, body_len, stored_bytes,
                                       headers, body)
                 VALUES ('01JCZ0000000000000000000AA', 's1', 1, 'POST', '/old', 'queued', 0, 1,
                         2, 3, x'01', x'7b7d');",
            )
            .unwrap();
        }
        let store = Store::open(tmp.path(), StoreOptions::default())
            .await
            .unwrap();
        let listed = store
            .list("s1", &ListFilter::default(), Page::default())
            .await
            .unwrap();
        assert_eq!(listed.requests.len(), 1);
        assert_eq!(listed.requests[0].target, "/old");
        store.close().await;
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let blocks: i64 = conn
            .query_row("SELECT count(*) FROM history_blocks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(blocks, 0);
    }
}
