//! Waking up when a log's `committed` marker changes, without busy polling.
//!
//! Whoever appends to a log (the node to a plog, the receiver to an inbox) rewrites
//! `<log dir>/committed` in place after every durable append. One inotify instance (the `notify`
//! crate) per process watches every directory a reader follows; each directory has a counter in a
//! `tokio::sync::watch` channel that the inotify thread bumps when the marker is written, so any
//! number of readers of the same directory (one shipper session per dup, say) wake up from one
//! event, and a change between two waits is never lost. The callers' fallback timers cover what
//! inotify cannot see (a directory that did not exist yet, an overflowed event queue, a network
//! file system).
//!
//! The shipper tails plogs with it; the node's inbox appliers follow inboxes with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::plog::COMMITTED_FILE;
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;

/// One per process: the inotify watches of every watched log directory.
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

/// Interest in one log directory's marker. Dropping it ends the watch when it was the last.
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
                tracing::warn!(error = %e, "cannot start inotify; committed markers are looked at by timer only");
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
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch the directory of a committed marker; polling it");
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
    /// Whether inotify watches this subscription's directory (otherwise only timers wake it).
    pub fn is_watched(&self) -> bool {
        lock(&self.inner.dirs)
            .get(&self.dir)
            .is_some_and(|e| e.watched)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plog::{Committed, CommittedMarker};
    use ferry_proto::Decree;

    fn publish(m: &CommittedMarker, d: u64) {
        m.publish(Committed {
            decree: Decree(d),
            commit_time_us: d,
        })
        .expect("publish");
    }

    /// Each publish wakes a waiting subscriber at once (well before the fallback), reading the
    /// marker does not, and the last subscription unwatches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_wakes_the_subscriber_and_a_read_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = CommittedMarker::open(dir.path()).expect("marker");
        let watcher = CommitWatcher::new();
        let mut sub = watcher.subscribe(dir.path());
        assert!(
            watcher.is_watched(dir.path()),
            "inotify is available on Linux"
        );
        for d in 1..=10u64 {
            let write = async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                publish(&marker, d);
            };
            let (woke, ()) = tokio::join!(sub.changed(Duration::from_secs(10)), write);
            assert!(woke, "woken by inotify, not the 10 s fallback");
            let read = Committed::read(dir.path())
                .expect("read")
                .expect("a marker");
            assert_eq!(read.decree, Decree(d));
        }
        Committed::read(dir.path()).expect("read");
        assert!(
            !sub.changed(Duration::from_millis(200)).await,
            "reading the marker wakes nobody"
        );
        drop(sub);
        assert!(
            !watcher.is_watched(dir.path()),
            "the last subscription unwatches"
        );
    }

    /// Two subscriptions on one directory are both woken; one dropped leaves the watch.
    #[tokio::test]
    async fn every_subscriber_of_a_directory_wakes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = CommittedMarker::open(dir.path()).expect("marker");
        let watcher = CommitWatcher::new();
        let mut a = watcher.subscribe(dir.path());
        let mut b = watcher.subscribe(dir.path());
        publish(&marker, 1);
        assert!(a.changed(Duration::from_secs(10)).await);
        assert!(b.changed(Duration::from_secs(10)).await);
        drop(a);
        assert!(watcher.is_watched(dir.path()), "b still watches");
    }

    /// A directory that does not exist yet still gives a working subscription (fallback only).
    #[tokio::test]
    async fn a_missing_directory_falls_back_to_the_timer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("not-yet");
        let watcher = CommitWatcher::new();
        let mut sub = watcher.subscribe(&missing);
        assert!(!watcher.is_watched(&missing));
        assert!(
            !sub.changed(Duration::from_millis(50)).await,
            "only the timer ends the wait"
        );
    }
}
