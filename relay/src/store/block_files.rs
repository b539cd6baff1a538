//! The bytes of history blocks, in append-only files beside the database.
//!
//! A history block (see `blocks`) is written once and then only read, moved out of in part by a
//! replay, or deleted whole. Kept in SQLite, every byte of it was written twice (to the WAL,
//! then by the checkpoint to the database file), read back once, checksummed per WAL frame
//! and copied once more when bound: the writer thread's largest cost (docs/BENCHMARKS.md,
//! finding 44). Here it is written once, with one `write` per block, to `DATA_DIR/history/`,
//! and its row keeps where it is (file number, offset, length) and a CRC-32 of it.
//!
//! Files are numbered in the order they are made and never appended to after the store is
//! reopened, so a write cut short by a crash only leaves unreferenced bytes at a file's end.
//! A file is closed for writing at [`FILE_BYTES`]. Files no block refers to any more are
//! deleted after the commit that let go of them ([`BlockFiles::collect`]). Blocks are written in
//! id order, so the oldest block still kept names the oldest file still needed.
//!
//! Durability is that of history rows (`synchronous=NORMAL`): the files are not synced per
//! batch, only when the store closes. A power cut can lose the last seconds of history; a
//! block whose bytes did not reach the disk fails its checksum and is skipped when listed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};
use tracing::{debug, warn};

use super::error::{Result, StoreError};

/// The directory of block files, inside the data directory.
pub(crate) const DIR: &str = "history";

/// A file takes no new blocks once it holds this many bytes. Deleted blocks give their space
/// back only when their whole file goes, so this bounds the disk history can hold beyond
/// `--retention-max-bytes`.
pub(crate) const FILE_BYTES: u64 = 16 << 20;

/// Where a block's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Location {
    /// The file's number: `history/{file:010}.blocks`.
    pub(crate) file: u64,
    /// Offset of the block's first byte in the file.
    pub(crate) offset: u64,
    /// The block's length in bytes.
    pub(crate) len: u64,
    /// CRC-32 of the block's bytes.
    pub(crate) crc: u32,
}

/// The writer's side: the file being appended to.
#[derive(Debug)]
pub(crate) struct BlockFiles {
    dir: PathBuf,
    /// The number the next new file gets.
    next_file: u64,
    /// No file below this number is left on disk.
    first_file: u64,
    /// The file being appended to, its number and length.
    current: Option<(File, u64, u64)>,
    /// Whether files may be deleted after the next commit.
    collect_pending: bool,
}

/// The file of number `file` in `dir`.
pub(crate) fn file_path(dir: &Path, file: u64) -> PathBuf {
    dir.join(format!("{file:010}.blocks"))
}

/// The number of a block file's name, if it is one.
fn file_number(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".blocks")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The numbers of the block files in `dir`, in no order.
fn existing(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(n) = entry?.file_name().to_str().and_then(file_number) {
            numbers.push(n);
        }
    }
    Ok(numbers)
}

/// The block files' directory of the database `conn` is open on.
pub(crate) fn dir_of(conn: &Connection) -> Option<PathBuf> {
    let db = Path::new(conn.path()?);
    Some(db.parent()?.join(DIR))
}

impl BlockFiles {
    /// Opens `data_dir/history`, creating it. New blocks go to a new file, numbered after
    /// every file there.
    pub(crate) fn open(data_dir: &Path) -> io::Result<BlockFiles> {
        let dir = data_dir.join(DIR);
        fs::create_dir_all(&dir)?;
        let numbers = existing(&dir)?;
        let next_file = numbers.iter().max().map_or(1, |n| n + 1);
        let first_file = numbers.into_iter().min().unwrap_or(next_file);
        Ok(BlockFiles {
            dir,
            next_file,
            first_file,
            current: None,
            collect_pending: false,
        })
    }

    /// The directory of the files.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `block` and says where it went. On an error the file being written is given
    /// up (a later block starts a new one), so a half-written block is never followed.
    pub(crate) fn append(&mut self, block: &[u8]) -> io::Result<Location> {
        let crc = crc32fast::hash(block);
        if self
            .current
            .as_ref()
            .is_none_or(|(_, _, len)| *len >= FILE_BYTES)
        {
            let file = self.next_file;
            let handle = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(file_path(&self.dir, file))?;
            self.next_file += 1;
            self.current = Some((handle, file, 0));
        }
        let (handle, file, len) = self.current.as_mut().expect("opened above");
        let offset = *len;
        if let Err(err) = handle.write_all(block) {
            self.current = None;
            return Err(err);
        }
        *len += block.len() as u64;
        Ok(Location {
            file: *file,
            offset,
            len: block.len() as u64,
            crc,
        })
    }

    /// Asks for files no block refers to any more to be deleted once the running batch has
    /// committed (see [`BlockFiles::after_commit`]).
    pub(crate) fn collect_after_commit(&mut self) {
        self.collect_pending = true;
    }

    /// Runs after each committed batch: deletes the files no committed block refers to, if
    /// [`BlockFiles::collect_after_commit`] asked for it.
    pub(crate) fn after_commit(&mut self, conn: &Connection) {
        if std::mem::take(&mut self.collect_pending) {
            if let Err(err) = self.collect(conn) {
                warn!(%err, dir = %self.dir.display(), "store: cannot delete old history files");
            }
        }
    }

    /// Deletes every file older than the oldest one a block refers to, except the one being
    /// written.
    pub(crate) fn collect(&mut self, conn: &Connection) -> Result<()> {
        // Blocks are written in id order: the oldest block names the oldest file in use.
        let oldest: Option<u64> = conn
            .prepare_cached(
                "SELECT file_no FROM history_blocks WHERE file_no IS NOT NULL
                 ORDER BY first_id LIMIT 1",
            )?
            .query_row([], |row| row.get(0))
            .optional()?;
        let keep_from = oldest
            .or(self.current.as_ref().map(|(_, file, _)| *file))
            .unwrap_or(self.next_file);
        // Files are numbered in the order they were made: no need to list the directory.
        let mut removed = 0;
        while self.first_file < keep_from {
            match fs::remove_file(file_path(&self.dir, self.first_file)) {
                Ok(()) => removed += 1,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(error(&self.dir, err)),
            }
            self.first_file += 1;
        }
        if removed > 0 {
            debug!(removed, "store: old history files deleted");
        }
        Ok(())
    }

    /// Syncs the file being written, so that a clean stop leaves every block on disk.
    pub(crate) fn sync(&self) -> io::Result<()> {
        match &self.current {
            Some((handle, _, _)) => handle.sync_data(),
            None => Ok(()),
        }
    }
}

/// The store's error for block files in `dir`.
pub(crate) fn error(dir: &Path, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Files {
        path: dir.to_owned(),
        detail: detail.to_string(),
    }
}

/// Reads the block at `location` from `dir`, checking its length and checksum.
pub(crate) fn read(dir: &Path, location: Location) -> io::Result<Vec<u8>> {
    let file = File::open(file_path(dir, location.file))?;
    // A damaged row must not make the reader allocate more than the file holds.
    let size = file.metadata()?.len();
    let len = match location.offset.checked_add(location.len) {
        Some(end) if end <= size => usize::try_from(location.len).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the block at {} of {} ends beyond the file's {size} bytes",
                location.offset,
                file_path(dir, location.file).display()
            ),
        )
    })?;
    let mut data = vec![0; len];
    file.read_exact_at(&mut data, location.offset)?;
    if crc32fast::hash(&data) != location.crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the block at {} of {} fails its checksum",
                location.offset,
                file_path(dir, location.file).display()
            ),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_read_back_from_where_they_were_appended() {
        let tmp = tempfile::tempdir().unwrap();
        let mut files = BlockFiles::open(tmp.path()).unwrap();
        let a = files.append(b"first block").unwrap();
        let b = files.append(b"second").unwrap();
        assert_eq!((a.file, a.offset, b.file, b.offset), (1, 0, 1, 11));
        let dir = tmp.path().join(DIR);
        assert_eq!(read(&dir, a).unwrap(), b"first block");
        assert_eq!(read(&dir, b).unwrap(), b"second");
    }

    #[test]
    fn a_reopened_store_writes_to_a_new_file() {
        let tmp = tempfile::tempdir().unwrap();
        let first = BlockFiles::open(tmp.path()).unwrap().append(b"x").unwrap();
        let second = BlockFiles::open(tmp.path()).unwrap().append(b"y").unwrap();
        assert_eq!((first.file, second.file), (1, 2));
        assert_eq!(second.offset, 0);
    }

    #[test]
    fn a_full_file_takes_no_more_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let mut files = BlockFiles::open(tmp.path()).unwrap();
        let big = vec![7u8; FILE_BYTES as usize];
        let a = files.append(&big).unwrap();
        let b = files.append(b"next").unwrap();
        assert_eq!((a.file, b.file, b.offset), (1, 2, 0));
    }

    #[test]
    fn a_changed_byte_fails_the_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let mut files = BlockFiles::open(tmp.path()).unwrap();
        let at = files.append(b"payload").unwrap();
        let dir = tmp.path().join(DIR);
        let path = file_path(&dir, at.file);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = read(&dir, at).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let long = Location { len: 100, ..at };
        let err = read(&dir, long).unwrap_err();
        assert!(err.to_string().contains("beyond"), "{err}");
        let huge = Location {
            len: u64::MAX,
            ..at
        };
        assert!(
            read(&dir, huge).is_err(),
            "no allocation of a damaged length"
        );
    }

    #[test]
    fn only_names_of_block_files_are_counted() {
        assert_eq!(file_number("0000000042.blocks"), Some(42));
        for name in [
            "42.blocks",
            "00000000x2.blocks",
            "0000000042.tmp",
            "notes.txt",
        ] {
            assert_eq!(file_number(name), None, "{name}");
        }
    }
}
