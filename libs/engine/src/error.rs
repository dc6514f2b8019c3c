//! Errors of the partition engine. Each says what failed, where, and what to do about it.

use std::io;
use std::path::{Path, PathBuf};

use ferry_log::nodelog::CommitError;
use ferry_log::LogError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// A file system call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The plog or an inbox failed (a file system call, corruption, a gap).
    #[error(transparent)]
    Log(#[from] LogError),
    /// The node's commit log refused or failed the group commit.
    #[error(transparent)]
    CommitLog(#[from] CommitError),
    /// The plog and RocksDB disagree about what was committed.
    #[error("partition {} is inconsistent: {reason}", dir.display())]
    Inconsistent { dir: PathBuf, reason: String },
    /// RocksDB returned an error.
    #[error("rocksdb {action} in {}: {source}", dir.display())]
    Rocks {
        action: &'static str,
        dir: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// An earlier fsync or apply failed; the partition's durable state is uncertain, so it takes
    /// no more writes until the node restarts and recovers from the plog.
    #[error("partition {partition} stopped taking writes after an earlier failure ({reason}); restart the node to recover it from its plog")]
    Poisoned { partition: u32, reason: String },
    /// The write is larger than a plog record may be.
    #[error("write of {len} bytes exceeds the {limit}-byte limit of one plog record")]
    TooLarge { len: usize, limit: usize },
    /// A checkpoint failed verification.
    #[error("checkpoint {} is invalid: {reason}", dir.display())]
    BadCheckpoint { dir: PathBuf, reason: String },
    /// The group commit this write was part of failed, so it was not acknowledged. Every write
    /// of the group gets its own copy of the reason.
    #[error("commit failed: {reason}")]
    CommitFailed {
        /// The failure was a full disk (`ENOSPC`): free space and retry.
        disk_full: bool,
        reason: String,
    },
    /// The partition is fenced (its table refuses writes, e.g. during a failover); the
    /// sentence is the node's, and says where to write or when to retry.
    #[error("{0}")]
    Fenced(String),
    /// The partition is shutting down.
    #[error("partition {0} is closed")]
    Closed(u32),
}

impl StoreError {
    pub fn io(action: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn rocks(action: &'static str, dir: &Path, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            action,
            dir: dir.to_path_buf(),
            source,
        }
    }

    /// True when the error comes from a full disk: the write was refused and nothing changed.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            StoreError::Log(e) => e.is_disk_full(),
            StoreError::CommitLog(e) => e.is_disk_full(),
            StoreError::CommitFailed { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}
