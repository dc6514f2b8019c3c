//! Fencing: only the newest shipper of a source partition may write its inbox.
//!
//! A shipper's `Hello` carries a fencing token, the revision of its etcd election for (dup,
//! source partition). Per [`FenceKey`] the receiver keeps the newest token it has seen, in a
//! small file under `<data_dir>/<table>/.fences/` (written to a temporary file, fsynced, renamed,
//! and the directory fsynced), so a restarted receiver still refuses a shipper that lost its
//! election before the restart.
//!
//! - An older token than the newest seen is refused (`STALE_FENCING_TOKEN`).
//! - A newer token preempts the live session of the same inbox: that session is stopped with
//!   `STALE_FENCING_TOKEN` and writes none of its further batches.
//! - An equal token is the same shipper reconnecting: admitted, and its old session (if it is
//!   still open, say on a half-dead connection) is ended with `SUPERSEDED`, which a shipper
//!   retries (a stale token would make it give up its election).
//!
//! Besides the tokens, [`Fences`] hands out exclusive ownership of each source's inbox logs
//! ([`InboxKey`]): a session holds its inbox slot while it has the writers open, so a preempting
//! session opens them only after the preempted one has finished the append it was in and closed
//! them.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use ferry_proto::wire::{self, ErrorCode};
use ferry_proto::{ClusterId, DupId, PartitionId};

/// Which shipping a fencing token guards: one source partition of one dup from one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FenceKey {
    pub cluster: ClusterId,
    pub dupid: DupId,
    pub table: String,
    /// The source partition.
    pub partition: PartitionId,
}

/// Which inbox logs a session writes: those of one source partition (one per target
/// partition of `table`). The inbox is per source, not per dup, so this is what a session must
/// own exclusively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxKey {
    pub table: String,
    pub cluster: ClusterId,
    pub partition: PartitionId,
}

impl FenceKey {
    pub fn inbox(&self) -> InboxKey {
        InboxKey {
            table: self.table.clone(),
            cluster: self.cluster,
            partition: self.partition,
        }
    }
}

pub use ferry_dup::receive::{admit, preempted, Admission, LiveId, Refusal};

/// Tells a session to end, and why. Cloned between the session and the registry.
#[derive(Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<wire::Error>>>,
}

impl StopSignal {
    /// Asks the session to stop, answering its shipper with `reason`. The first reason wins.
    pub fn stop(&self, code: ErrorCode, message: String) {
        let mut r = self.reason.lock();
        if r.is_none() {
            *r = Some(wire::Error { code, message });
        }
        drop(r);
        self.token.cancel();
    }

    /// Resolves when the session has been asked to stop. Cancellation-safe.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The reason given to [`StopSignal::stop`].
    pub fn reason(&self) -> wire::Error {
        self.reason.lock().clone().unwrap_or(wire::Error {
            code: ErrorCode::UNAVAILABLE,
            message: "the receiver ended this session; reconnect".into(),
        })
    }
}

/// The persisted tokens, the live sessions and the inbox slots of one receiver.
pub struct Fences {
    files: FenceFiles,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Tokens read from or written to the files, by key.
    tokens: HashMap<FenceKey, u64>,
    live: HashMap<InboxKey, Live>,
    slots: HashMap<InboxKey, Arc<tokio::sync::Mutex<()>>>,
    /// Serializes the admissions of one inbox, across the token file's fsync, so that two
    /// `Hello`s for one partition are decided one after the other; other inboxes do not wait.
    gates: HashMap<InboxKey, Arc<tokio::sync::Mutex<()>>>,
    next_id: LiveId,
}

struct Live {
    id: LiveId,
    token: u64,
    stop: StopSignal,
}

/// An admitted session's registration. Dropping it unregisters the session (if it is still the
/// live one of its inbox).
pub struct Admitted {
    fences: Arc<Fences>,
    inbox: InboxKey,
    id: LiveId,
    /// Stopped when a newer session preempts this one, or the receiver shuts down.
    pub stop: StopSignal,
    /// Exclusive ownership of the inbox's writers: lock it before opening them.
    pub slot: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut st = self.fences.state.lock();
        if st.live.get(&self.inbox).is_some_and(|l| l.id == self.id) {
            st.live.remove(&self.inbox);
        }
    }
}

impl Fences {
    /// Fences whose tokens persist under `<data_dir>/<table>/.fences/`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Fences {
        Fences {
            files: FenceFiles {
                data_dir: data_dir.into(),
            },
            state: Mutex::new(State::default()),
        }
    }

    /// Admits a session for `key` with `token`, or says why not. On success the token is
    /// durable, and any older live session of the same inbox has been told to stop.
    pub async fn admit(self: &Arc<Self>, key: &FenceKey, token: u64) -> Result<Admitted, Refusal> {
        let inbox = key.inbox();
        let gate = self
            .state
            .lock()
            .gates
            .entry(inbox.clone())
            .or_default()
            .clone();
        let _serial = gate.lock().await;
        let cached = self.state.lock().tokens.get(key).copied();
        let stored = match cached {
            Some(t) => t,
            None => {
                let (files, k) = (self.files.clone(), key.clone());
                let loaded = tokio::task::spawn_blocking(move || files.load(&k))
                    .await
                    .map_err(|e| internal(format!("the fence-reading thread failed ({e})")))?
                    .map_err(internal)?;
                self.state.lock().tokens.insert(key.clone(), loaded);
                loaded
            }
        };
        let live = self.state.lock().live.get(&inbox).map(|l| (l.id, l.token));
        let (persist, preempt) = match admit(stored, live, token) {
            Admission::Stale { newest } => {
                return Err(Refusal {
                    code: ErrorCode::STALE_FENCING_TOKEN,
                    message: format!(
                        "fencing token {token} of dup {} partition {} of table `{}` from cluster \
                         {} is older than token {newest}, which a newer shipper holds; this \
                         shipper lost its election and must stop shipping the partition",
                        key.dupid, key.partition, key.table, key.cluster
                    ),
                })
            }
            Admission::Accept { persist, preempt } => (persist, preempt),
        };
        if persist {
            let (files, k) = (self.files.clone(), key.clone());
            tokio::task::spawn_blocking(move || files.store(&k, token))
                .await
                .map_err(|e| internal(format!("the fence-writing thread failed ({e})")))?
                .map_err(internal)?;
        }
        let mut st = self.state.lock();
        if persist {
            st.tokens.insert(key.clone(), token);
        }
        if let Some(old) = preempt.and_then(|id| {
            st.live
                .get(&inbox)
                .filter(|l| l.id == id)
                .map(|l| (l.token, l.stop.clone()))
        }) {
            let (old_token, stop) = old;
            let what = format!("partition {} of table `{}`", key.partition, key.table);
            let reason = preempted(old_token, token, &what);
            stop.stop(reason.code, reason.message);
        }
        st.next_id += 1;
        let id = st.next_id;
        let stop = StopSignal::default();
        st.live.insert(
            inbox.clone(),
            Live {
                id,
                token,
                stop: stop.clone(),
            },
        );
        let slot = st.slots.entry(inbox.clone()).or_default().clone();
        Ok(Admitted {
            fences: self.clone(),
            inbox,
            id,
            stop,
            slot,
        })
    }

    /// Stops every live session with `code` and `message` (at shutdown).
    pub fn stop_all(&self, code: ErrorCode, message: &str) {
        for l in self.state.lock().live.values() {
            l.stop.stop(code, message.to_string());
        }
    }

    /// How many sessions are admitted and not yet ended.
    pub fn live_sessions(&self) -> usize {
        self.state.lock().live.len()
    }
}

fn internal(message: impl ToString) -> Refusal {
    Refusal {
        code: ErrorCode::INTERNAL,
        message: message.to_string(),
    }
}

/// Fence files are one decimal number and a newline; anything longer is not one of ours.
const MAX_FENCE_FILE: u64 = 64;

/// The token files, `<data_dir>/<table>/.fences/<cluster id>-<dupid>-<source partition>`.
#[derive(Debug, Clone)]
pub struct FenceFiles {
    data_dir: PathBuf,
}

/// A fence file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot {action} fence file {}: {source}; check the permissions and free space of the data dir", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fence file {} is unreadable ({reason}); delete it to accept the next shipper's token, or restore it", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

impl FenceFiles {
    pub fn new(data_dir: impl Into<PathBuf>) -> FenceFiles {
        FenceFiles {
            data_dir: data_dir.into(),
        }
    }

    /// The directory of `table`'s fence files.
    pub fn dir(&self, table: &str) -> PathBuf {
        self.data_dir.join(table).join(".fences")
    }

    /// The file of `key`.
    pub fn path(&self, key: &FenceKey) -> PathBuf {
        self.dir(&key.table).join(format!(
            "{}-{}-{}",
            key.cluster.get(),
            key.dupid.0,
            key.partition.0
        ))
    }

    /// The stored token of `key`, 0 if none was ever stored.
    pub fn load(&self, key: &FenceKey) -> Result<u64, FenceError> {
        let path = self.path(key);
        let io = |action, source| FenceError::Io {
            action,
            path: path.clone(),
            source,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io("open", e)),
        };
        let mut text = String::new();
        file.take(MAX_FENCE_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| io("read", e))?;
        let corrupt = |reason: &str| FenceError::Corrupt {
            path: path.clone(),
            reason: reason.into(),
        };
        if text.len() as u64 > MAX_FENCE_FILE {
            return Err(corrupt("it is longer than a token"));
        }
        text.strip_suffix('\n')
            .ok_or_else(|| corrupt("it does not end with a newline"))?
            .parse::<u64>()
            .map_err(|_| corrupt("it does not hold a decimal token"))
    }

    /// Stores `token` for `key` durably: temporary file, fsync, rename, directory fsync.
    pub fn store(&self, key: &FenceKey, token: u64) -> Result<(), FenceError> {
        let dir = self.dir(&key.table);
        let path = self.path(key);
        let io = |action, p: &Path, source| FenceError::Io {
            action,
            path: p.to_path_buf(),
            source,
        };
        fail::fail_point!("fence-store", |arg| Err(io(
            "write",
            &path,
            ferry_log::error::injected_io_error(arg)
        )));
        fs::create_dir_all(&dir).map_err(|e| io("create the directory of", &path, e))?;
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
        f.write_all(format!("{token}\n").as_bytes())
            .map_err(|e| io("write", &tmp, e))?;
        f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| io("rename into place", &path, e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync the directory of", &path, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dupid: u64, partition: u32) -> FenceKey {
        FenceKey {
            cluster: ClusterId::new(1).expect("valid"),
            dupid: DupId(dupid),
            table: "users".into(),
            partition: PartitionId(partition),
        }
    }

    #[test]
    fn the_rule() {
        use Admission::*;
        assert_eq!(
            admit(0, None, 5),
            Accept {
                persist: true,
                preempt: None
            }
        );
        assert_eq!(
            admit(5, None, 5),
            Accept {
                persist: false,
                preempt: None
            }
        );
        assert_eq!(admit(5, None, 4), Stale { newest: 5 });
        assert_eq!(
            admit(5, Some((9, 5)), 7),
            Accept {
                persist: true,
                preempt: Some(9)
            }
        );
        assert_eq!(
            admit(5, Some((9, 5)), 5),
            Accept {
                persist: false,
                preempt: Some(9)
            }
        );
        // Another dup's newer session holds the inbox.
        assert_eq!(admit(0, Some((9, 8)), 7), Stale { newest: 8 });
    }

    #[test]
    fn tokens_survive_a_restart_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FenceFiles::new(dir.path());
        assert_eq!(files.load(&key(1, 0)).expect("none yet"), 0);
        files.store(&key(1, 0), 42).expect("store");
        files.store(&key(1, 1), 7).expect("store");
        files.store(&key(1, 0), 43).expect("overwrite");
        let again = FenceFiles::new(dir.path());
        assert_eq!(again.load(&key(1, 0)).expect("load"), 43);
        assert_eq!(again.load(&key(1, 1)).expect("load"), 7);
        assert_eq!(again.load(&key(2, 0)).expect("other dup"), 0);
        assert!(dir.path().join("users/.fences/1-1-0").exists());
        assert!(!dir.path().join("users/.fences/1-1-0.tmp").exists());

        std::fs::write(files.path(&key(1, 0)), "4x\n").expect("corrupt it");
        let e = files.load(&key(1, 0)).expect_err("corrupt");
        assert!(
            e.to_string().contains("does not hold a decimal token"),
            "{e}"
        );
        std::fs::write(files.path(&key(1, 0)), vec![b'1'; 1000]).expect("huge");
        let e = files.load(&key(1, 0)).expect_err("huge");
        assert!(e.to_string().contains("longer than a token"), "{e}");
    }

    #[tokio::test]
    async fn newer_preempts_equal_replaces_older_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fences = Arc::new(Fences::new(dir.path()));
        let first = fences.admit(&key(1, 0), 10).await.expect("first");
        assert!(!first.stop.is_stopped());
        let e = fences.admit(&key(1, 0), 9).await.err().expect("older");
        assert_eq!(e.code, ErrorCode::STALE_FENCING_TOKEN);
        assert!(e.message.contains("older than token 10"), "{}", e.message);
        assert!(
            !first.stop.is_stopped(),
            "a refused Hello leaves the owner alone"
        );

        let same = fences.admit(&key(1, 0), 10).await.expect("reconnect");
        assert!(first.stop.is_stopped());
        assert_eq!(
            first.stop.reason().code,
            ErrorCode::SUPERSEDED,
            "the same shipper keeps its election"
        );
        let newer = fences.admit(&key(1, 0), 11).await.expect("newer");
        assert!(same.stop.is_stopped());
        assert_eq!(same.stop.reason().code, ErrorCode::STALE_FENCING_TOKEN);
        assert!(same
            .stop
            .reason()
            .message
            .contains("newer fencing token 11"));
        // A session of another source partition is independent.
        let other = fences.admit(&key(1, 1), 1).await.expect("other partition");
        assert!(!other.stop.is_stopped());
        assert_eq!(fences.live_sessions(), 2);

        // Dropping a preempted registration does not unregister its successor.
        drop(first);
        drop(same);
        assert_eq!(fences.live_sessions(), 2);
        drop(newer);
        assert_eq!(fences.live_sessions(), 1);

        // After a restart the stored token still fences.
        let restarted = Arc::new(Fences::new(dir.path()));
        let e = restarted
            .admit(&key(1, 0), 10)
            .await
            .err()
            .expect("stale after restart");
        assert_eq!(e.code, ErrorCode::STALE_FENCING_TOKEN);
        restarted
            .admit(&key(1, 0), 11)
            .await
            .expect("the newest is admitted");
    }
}
