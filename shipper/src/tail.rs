//! Tailing a node's plog: waking up when the node publishes a new committed decree, without busy
//! polling.
//!
//! The node rewrites `<plog dir>/committed` in place after every group commit. One inotify
//! instance (the `notify` crate) per process watches every plog directory a session tails; each
//! directory has a counter in a `tokio::sync::watch` channel that the inotify thread bumps when
//! the marker changes, so any number of sessions (one per dup) on the same partition wake up
//! from one event, and a change between two waits is never lost. A fallback timer covers what
//! inotify cannot see (a directory that did not exist yet, an overflowed event queue, a network
//! file system).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_log::plog::{Committed, CommittedReader, PlogReader, ReadError, COMMITTED_FILE};
use ferry_proto::{Decree, PlogRecord};
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;

/// One per process: the inotify watches of every tailed plog directory.
#[derive(Clone)]
pub struct CommitWatcher {
    inner: Arc<Inner>,
}

struct Inner {
    dirs: Arc<Mutex<HashMap<PathBuf, DirEntry>>>,
    /// `None` when inotify is not available; waits then rely on the fallback timer.
    watcher: Option<Mutex<notify::RecommendedWatcher>>,
}

struct DirEntry {
    tx: watch::Sender<u64>,
    subscribers: usize,
    watched: bool,
}

/// A session's interest in one plog directory. Dropping it ends the watch when it was the last.
pub struct Subscription {
    dir: PathBuf,
    rx: watch::Receiver<u64>,
    inner: Arc<Inner>,
}

impl CommitWatcher {
    /// Starts the inotify thread. Without inotify (a kernel limit, say) the watcher still works,
    /// waking only on its callers' fallback timers, and says so once.
    pub fn new() -> CommitWatcher {
        let dirs: Arc<Mutex<HashMap<PathBuf, DirEntry>>> = Arc::default();
        let for_events = dirs.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Only a write wakes anyone: inotify also reports opens, and every session opens the
            // marker to read it, which would otherwise wake it again and again.
            let written = matches!(
                event.kind,
                notify::EventKind::Modify(
                    notify::event::ModifyKind::Data(_) | notify::event::ModifyKind::Any
                ) | notify::EventKind::Create(_)
            );
            if !written {
                return;
            }
            for path in &event.paths {
                if path.file_name().is_some_and(|n| n == COMMITTED_FILE) {
                    if let Some(dir) = path.parent() {
                        if let Some(e) = lock(&for_events).get(dir) {
                            e.tx.send_modify(|n| *n = n.wrapping_add(1));
                        }
                    }
                }
            }
        };
        let watcher = match notify::recommended_watcher(handler) {
            Ok(w) => Some(Mutex::new(w)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start inotify; plog tailing falls back to polling every 50ms");
                None
            }
        };
        CommitWatcher {
            inner: Arc::new(Inner { dirs, watcher }),
        }
    }

    /// Subscribes to changes of `<dir>/committed`. If the directory cannot be watched now (it
    /// does not exist yet), the subscription works by its fallback timer alone.
    pub fn subscribe(&self, dir: &Path) -> Subscription {
        // The `dirs` lock is never held across `watch`/`unwatch`: notify's inotify backend
        // answers those on its event thread, which may at the same moment be in the handler
        // waiting for `dirs`, a deadlock that once stalled a whole runtime.
        let (rx, must_watch) = {
            let mut dirs = lock(&self.inner.dirs);
            let entry = dirs.entry(dir.to_path_buf()).or_insert_with(|| DirEntry {
                tx: watch::channel(0).0,
                subscribers: 0,
                watched: false,
            });
            entry.subscribers += 1;
            let must_watch = !entry.watched && self.inner.watcher.is_some();
            // Claimed now, so that one subscriber adds the watch; if it fails, the fallback
            // timer covers the directory.
            if must_watch {
                entry.watched = true;
            }
            (entry.tx.subscribe(), must_watch)
        };
        if must_watch {
            if let Some(w) = &self.inner.watcher {
                if let Err(e) = lock(w).watch(dir, RecursiveMode::NonRecursive) {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch plog directory; polling it");
                    if let Some(entry) = lock(&self.inner.dirs).get_mut(dir) {
                        entry.watched = false;
                    }
                }
            }
        }
        Subscription {
            dir: dir.to_path_buf(),
            rx,
            inner: self.inner.clone(),
        }
    }

    /// Whether `dir` has an inotify watch (for tests and `/health`).
    pub fn is_watched(&self, dir: &Path) -> bool {
        lock(&self.inner.dirs).get(dir).is_some_and(|e| e.watched)
    }
}

impl Default for CommitWatcher {
    fn default() -> Self {
        CommitWatcher::new()
    }
}

impl Subscription {
    /// Waits until the committed marker changes, or `fallback` passes. Returns whether an event
    /// (not the timer) woke it. Cancellation-safe.
    pub async fn changed(&mut self, fallback: Duration) -> bool {
        tokio::select! {
            r = self.rx.changed() => {
                if r.is_err() {
                    // The sender lives as long as any subscription; should it be gone, never spin.
                    tokio::time::sleep(fallback).await;
                    return false;
                }
                true
            }
            _ = tokio::time::sleep(fallback) => false,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // As in `subscribe`: `unwatch` runs after the `dirs` lock is released.
        let unwatch = {
            let mut dirs = lock(&self.inner.dirs);
            let Some(e) = dirs.get_mut(&self.dir) else {
                return;
            };
            e.subscribers = e.subscribers.saturating_sub(1);
            if e.subscribers > 0 {
                return;
            }
            let watched = e.watched;
            dirs.remove(&self.dir);
            watched
        };
        if unwatch {
            if let Some(w) = &self.inner.watcher {
                let _ = lock(w).unwatch(&self.dir);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep using it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The committed marker of a plog directory; a missing marker (the node has not opened the
/// partition yet) reads as nothing committed.
pub fn committed(plog_dir: &Path) -> Result<Committed, ReadError> {
    Ok(Committed::read(plog_dir)?.unwrap_or_default())
}

/// [`committed`] through a reader that keeps the marker open, for loops that look often.
pub fn committed_from(marker: &mut CommittedReader) -> Result<Committed, ReadError> {
    Ok(marker.read()?.unwrap_or_default())
}

/// Reads the next batch: the records after what `reader` returned last, up to `upto` (the
/// committed decree), ending with the record that reaches `max_bytes`. Blocking.
pub fn read_batch(
    reader: &mut PlogReader,
    upto: Decree,
    max_bytes: u64,
) -> Result<Vec<PlogRecord>, ReadError> {
    reader.read(upto, max_bytes.max(1) as usize)
}

/// Encoded bytes of records, as read from the plog.
pub fn encoded_bytes(records: &[PlogRecord]) -> u64 {
    records.iter().map(|r| r.encoded_len() as u64).sum()
}

#[cfg(test)]
mod tests {

    use ferry_engine::{Expiry, Partition, PartitionOptions, SetCond, WriteCmd};
    use ferry_proto::{ClusterId, PartitionId};

    use super::*;

    fn set(key: String, len: usize) -> WriteCmd {
        WriteCmd::Set {
            key: key.into_bytes(),
            value: vec![b'v'; len],
            expiry: Expiry::Never,
            cond: SetCond::Always,
            get_old: false,
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> Partition {
        let mut opts = PartitionOptions::new(ClusterId::new(1).expect("valid id"));
        opts.plog_segment_bytes = segment_bytes;
        Partition::open(dir, PartitionId(0), opts)
            .expect("open partition")
            .0
    }

    /// A real partition commits writes; the watcher wakes a waiting tail at once (well before
    /// the fallback timer), and the reader returns exactly the committed records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inotify_wakes_the_tail_when_the_node_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path(), 64 << 20);
        let plog = dir.path().join("plog");
        let watcher = CommitWatcher::new();
        let mut sub = watcher.subscribe(&plog);
        assert!(watcher.is_watched(&plog), "inotify is available on Linux");
        let mut reader = PlogReader::new(&plog, Decree(1));
        let mut seen = 0u64;
        for i in 0..20u64 {
            let write = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                p.write(set(format!("k{i}"), 10)).await.expect("write")
            };
            let (woke, _) = tokio::join!(sub.changed(Duration::from_secs(10)), write);
            assert!(woke, "woken by inotify, not the 10 s fallback");
            let c = committed(&plog).expect("marker");
            let got = read_batch(&mut reader, c.decree, 1 << 20).expect("read");
            seen += got.len() as u64;
            if let Some(last) = got.last() {
                assert_eq!(last.decree, c.decree, "read up to the marker, not past it");
            }
        }
        let c = committed(&plog).expect("marker");
        seen += read_batch(&mut reader, c.decree, 1 << 20)
            .expect("read")
            .len() as u64;
        assert_eq!(c.decree, Decree(20));
        assert_eq!(seen, 20, "every committed write read once");
        // Nothing new: the wait ends by the fallback timer, although reading the marker opens
        // it (reads must not wake the reader).
        committed(&plog).expect("marker");
        assert!(!sub.changed(Duration::from_millis(200)).await);
        drop(sub);
        assert!(
            !watcher.is_watched(&plog),
            "the last subscription unwatches"
        );
    }

    /// Two subscriptions on one directory (two dups of one partition) are both woken.
    #[tokio::test]
    async fn every_subscriber_of_a_directory_wakes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path(), 64 << 20);
        let plog = dir.path().join("plog");
        let watcher = CommitWatcher::new();
        let mut a = watcher.subscribe(&plog);
        let mut b = watcher.subscribe(&plog);
        p.write(set("k".into(), 1)).await.expect("write");
        assert!(a.changed(Duration::from_secs(10)).await);
        assert!(b.changed(Duration::from_secs(10)).await);
        drop(a);
        assert!(watcher.is_watched(&plog), "b still watches");
    }

    /// A directory that does not exist yet still gives a working subscription (fallback only).
    #[tokio::test]
    async fn a_missing_directory_falls_back_to_the_timer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plog = dir.path().join("not-yet").join("plog");
        let watcher = CommitWatcher::new();
        let mut sub = watcher.subscribe(&plog);
        assert!(!watcher.is_watched(&plog));
        assert!(
            !sub.changed(Duration::from_millis(50)).await,
            "only the timer ends the wait"
        );
        assert_eq!(committed(&plog).expect("missing marker").decree, Decree(0));
    }

    /// Batches end with the record that reaches the byte limit, follow segment roll-overs, and
    /// never pass the committed decree.
    #[tokio::test]
    async fn batches_are_cut_by_bytes_and_bounded_by_the_committed_decree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path(), 64 << 10);
        for i in 0..400u64 {
            p.write(set(format!("key-{i}"), 300)).await.expect("write");
        }
        let plog = dir.path().join("plog");
        assert!(
            ferry_log::plog::list_segments(&plog).expect("list").len() > 1,
            "the writes span several segments"
        );
        let c = committed(&plog).expect("marker");
        assert_eq!(c.decree, Decree(400));
        let one = {
            let mut r = PlogReader::new(&plog, Decree(1));
            encoded_bytes(&read_batch(&mut r, Decree(1), 1 << 20).expect("read"))
        };
        let limit = 4096u64;
        let mut reader = PlogReader::new(&plog, Decree(1));
        let mut next = 1u64;
        // Stop short of the end: the bound is respected.
        loop {
            let batch = read_batch(&mut reader, Decree(350), limit).expect("read");
            if batch.is_empty() {
                break;
            }
            let bytes = encoded_bytes(&batch);
            assert!(
                bytes < limit + one,
                "a batch ends with the record that reaches the limit"
            );
            for r in &batch {
                assert_eq!(r.decree, Decree(next), "contiguous");
                next += 1;
            }
        }
        assert_eq!(next, 351, "stopped at the bound");
        let rest = read_batch(&mut reader, c.decree, 1 << 30).expect("read");
        assert_eq!(rest.first().map(|r| r.decree), Some(Decree(351)));
        assert_eq!(rest.last().map(|r| r.decree), Some(Decree(400)));
    }
}
