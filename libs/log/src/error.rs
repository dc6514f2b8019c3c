//! Errors of the log files. Each says what failed, where, and what to do about it.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LogError {
    /// A file system call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The plog holds a bad record that is not a torn tail: records after it were committed, so
    /// the log refuses to open rather than lose them.
    #[error(
        "plog segment {} is corrupt at byte {offset}: {reason}; records after this point were \
         committed, so the partition will not open. Restore the partition from a checkpoint or \
         another cluster, or move the segment aside if losing its later writes is acceptable",
        file.display()
    )]
    CorruptPlog {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    /// An append does not continue the log (a gap or an overlap in decrees).
    #[error("log {} is inconsistent: {reason}", dir.display())]
    Inconsistent { dir: PathBuf, reason: String },
}

impl LogError {
    pub fn io(action: &'static str, path: &Path, source: io::Error) -> LogError {
        LogError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn corrupt(file: &Path, offset: u64, reason: String) -> LogError {
        LogError::CorruptPlog {
            file: file.to_path_buf(),
            offset,
            reason,
        }
    }

    /// True when the error comes from a full disk: the write was refused and nothing changed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, LogError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

/// The I/O error a failpoint's `return(arg)` action injects: `enospc` is a full disk, anything
/// else EIO. See `ferry_proc::failpoints` for the names.
pub fn injected_io_error(arg: Option<String>) -> io::Error {
    match arg.as_deref() {
        Some("enospc") => io::Error::from_raw_os_error(libc::ENOSPC),
        _ => io::Error::from_raw_os_error(libc::EIO),
    }
}
