//! The delivery ids this client has handed to the local app, so that a redelivery (the relay
//! never got our acknowledgement) is not passed to the app a second time.
//!
//! One small append-only file per session under the state directory: one id per line. An id is
//! appended and `fsync`ed after the local app answered and before the answer goes back to the
//! relay. Only the newest [`DEFAULT_CAPACITY`] ids are remembered; the file is compacted when it
//! holds twice that many lines.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How many delivered ids are remembered per session.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Where the client keeps its state when `--state-dir` is not given:
/// `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`, else `./.ferry-state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ferry");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/ferry");
    }
    PathBuf::from(".ferry-state")
}

/// What [`DeliveredIds::begin`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Never delivered: go ahead (the id is now marked in flight).
    Fresh,
    /// Already handed to the app and answered.
    Delivered,
    /// Being delivered right now by another exchange.
    InFlight,
}

struct Inner {
    set: HashSet<String>,
    order: VecDeque<String>,
    pending: HashSet<String>,
    /// Ids remembered but not yet on disk, oldest first.
    unsynced: Vec<String>,
    /// Counts ids handed to `commit`; an id's ticket is on disk once `Disk::synced` reaches it.
    tickets: u64,
}

struct Disk {
    file: Option<File>,
    lines_in_file: usize,
    synced: u64,
}

/// The delivered ids of one session.
///
/// Commits are grouped: while one caller writes and `fsync`s, others wait for the file, and
/// the next one to get it writes every id queued meanwhile with a single `fsync`.
pub(crate) struct DeliveredIds {
    path: Option<PathBuf>,
    capacity: usize,
    inner: Mutex<Inner>,
    disk: Mutex<Disk>,
}

impl DeliveredIds {
    fn build(path: Option<PathBuf>, capacity: usize, order: VecDeque<String>, disk: Disk) -> Self {
        DeliveredIds {
            path,
            capacity,
            inner: Mutex::new(Inner {
                set: order.iter().cloned().collect(),
                order,
                pending: HashSet::new(),
                unsynced: Vec::new(),
                tickets: 0,
            }),
            disk: Mutex::new(disk),
        }
    }

    /// Memory only (no state directory).
    pub(crate) fn in_memory(capacity: usize) -> Self {
        let disk = Disk {
            file: None,
            lines_in_file: 0,
            synced: 0,
        };
        Self::build(None, capacity, VecDeque::new(), disk)
    }

    /// Opens (creating) the file of `session` under `dir` and loads its newest ids. Blocks.
    pub(crate) fn open(dir: &Path, session: &str, capacity: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(file_name(session));
        let mut order = VecDeque::new();
        let mut lines_in_file = 0;
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                let line = line?;
                let id = line.trim();
                if id.is_empty() {
                    continue;
                }
                lines_in_file += 1;
                order.push_back(id.to_owned());
                if order.len() > capacity {
                    order.pop_front();
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let disk = Disk {
            file: Some(file),
            lines_in_file,
            synced: 0,
        };
        Ok(Self::build(Some(path), capacity, order, disk))
    }

    /// The file backing this set, if any.
    #[cfg(test)]
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Checks `id`; a fresh id is marked in flight until [`commit`](Self::commit) or
    /// [`abandon`](Self::abandon).
    pub(crate) fn begin(&self, id: &str) -> Seen {
        let mut inner = self.inner.lock().expect("dedupe lock");
        if inner.set.contains(id) {
            Seen::Delivered
        } else if !inner.pending.insert(id.to_owned()) {
            Seen::InFlight
        } else {
            Seen::Fresh
        }
    }

    /// The delivery of `id` ended without the app handling it: it may come again.
    pub(crate) fn abandon(&self, id: &str) {
        self.inner.lock().expect("dedupe lock").pending.remove(id);
    }

    /// Records `id` as delivered, on disk (appended and `fsync`ed) before returning. Runs on
    /// the blocking pool.
    pub(crate) async fn commit(self: &Arc<Self>, id: &str) -> std::io::Result<()> {
        let this = self.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || this.commit_blocking(&id))
            .await
            .map_err(std::io::Error::other)?
    }

    fn commit_blocking(&self, id: &str) -> std::io::Result<()> {
        let ticket = {
            let mut inner = self.inner.lock().expect("dedupe lock");
            inner.pending.remove(id);
            if !inner.set.insert(id.to_owned()) {
                return Ok(());
            }
            inner.order.push_back(id.to_owned());
            while inner.order.len() > self.capacity {
                if let Some(old) = inner.order.pop_front() {
                    inner.set.remove(&old);
                }
            }
            inner.unsynced.push(id.to_owned());
            inner.tickets += 1;
            inner.tickets
        };
        let mut disk = self.disk.lock().expect("dedupe file lock");
        if disk.synced >= ticket {
            return Ok(()); // another caller wrote it along with its own
        }
        let (batch, upto) = {
            let mut inner = self.inner.lock().expect("dedupe lock");
            (std::mem::take(&mut inner.unsynced), inner.tickets)
        };
        let Some(file) = disk.file.as_mut() else {
            disk.synced = upto;
            return Ok(());
        };
        let mut text = String::with_capacity(batch.len() * 32);
        for id in &batch {
            text.push_str(id);
            text.push('\n');
        }
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(err) = written {
            // Put them back: the next commit tries again.
            let mut inner = self.inner.lock().expect("dedupe lock");
            let newer = std::mem::replace(&mut inner.unsynced, batch);
            inner.unsynced.extend(newer);
            return Err(err);
        }
        disk.synced = upto;
        disk.lines_in_file += batch.len();
        if disk.lines_in_file >= self.capacity.saturating_mul(2).max(16) {
            self.compact(&mut disk)?;
        }
        Ok(())
    }

    /// Rewrites the file with only the remembered ids (write a temporary file, fsync, rename).
    fn compact(&self, disk: &mut Disk) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // Ids not yet written stay out: their own commit appends them afterwards.
        let text = {
            let inner = self.inner.lock().expect("dedupe lock");
            let unsynced: HashSet<&String> = inner.unsynced.iter().collect();
            let mut text = String::with_capacity(inner.order.len() * 32);
            for id in inner.order.iter().filter(|id| !unsynced.contains(id)) {
                text.push_str(id);
                text.push('\n');
            }
            text
        };
        let tmp = path.with_extension("tmp");
        {
            let mut out = File::create(&tmp)?;
            out.write_all(text.as_bytes())?;
            out.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        disk.file = Some(OpenOptions::new().append(true).open(path)?);
        disk.lines_in_file = text.lines().count();
        Ok(())
    }
}

/// A file name for `session` (ids and names are already safe; anything else is replaced).
fn file_name(session: &str) -> String {
    let safe: String = session
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("delivered-{safe}.ids")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_across_reopen_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Arc::new(DeliveredIds::open(dir.path(), "s-1", 8).unwrap());
        assert_eq!(ids.begin("a"), Seen::Fresh);
        assert_eq!(ids.begin("a"), Seen::InFlight);
        ids.commit("a").await.unwrap();
        assert_eq!(ids.begin("a"), Seen::Delivered);
        assert_eq!(ids.begin("b"), Seen::Fresh);
        ids.abandon("b");
        assert_eq!(ids.begin("b"), Seen::Fresh);
        ids.abandon("b");
        let path = ids.path().unwrap().to_owned();
        drop(ids);

        let ids = Arc::new(DeliveredIds::open(dir.path(), "s-1", 8).unwrap());
        assert_eq!(ids.begin("a"), Seen::Delivered, "persisted");
        for n in 0..40 {
            let id = format!("id{n}");
            assert_eq!(ids.begin(&id), Seen::Fresh);
            ids.commit(&id).await.unwrap();
        }
        assert_eq!(ids.begin("id39"), Seen::Delivered);
        assert_eq!(ids.begin("id0"), Seen::Fresh, "oldest forgotten");
        ids.abandon("id0");
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 16, "compacted: {lines} lines");
        drop(ids);
        let ids = DeliveredIds::open(dir.path(), "s-1", 8).unwrap();
        assert_eq!(ids.begin("id39"), Seen::Delivered);
        assert_eq!(ids.begin("id32"), Seen::Delivered);
        assert_eq!(ids.begin("id31"), Seen::Fresh);
        // Another session has its own file.
        let other = DeliveredIds::open(dir.path(), "s-2", 8).unwrap();
        assert_eq!(other.begin("id39"), Seen::Fresh);
        let memory = DeliveredIds::in_memory(2);
        assert_eq!(memory.begin("x"), Seen::Fresh);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_all_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Arc::new(DeliveredIds::open(dir.path(), "s", 1000).unwrap());
        let mut tasks = Vec::new();
        for n in 0..200 {
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("c{n}");
                assert_eq!(ids.begin(&id), Seen::Fresh);
                ids.commit(&id).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        drop(ids);
        let ids = DeliveredIds::open(dir.path(), "s", 1000).unwrap();
        for n in 0..200 {
            assert_eq!(ids.begin(&format!("c{n}")), Seen::Delivered, "c{n}");
        }
    }
}
