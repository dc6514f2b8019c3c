//! The checkpoint manifest: what a partition checkpoint holds, so that a receiver can verify every
//! file and skip those it already has (same name, size and checksum).

use serde::{Deserialize, Serialize};

use crate::ids::{Decree, PartitionId};

/// Name of the manifest file inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Sub-directory of a checkpoint holding the RocksDB files.
pub const DB_DIR: &str = "db";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    pub partition: PartitionId,
    /// Every write up to and including this decree is in the checkpoint, and none after it.
    pub decree: Decree,
    pub files: Vec<CheckpointFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// File name relative to the checkpoint's `db` directory (no separators).
    pub name: String,
    pub size: u64,
    /// CRC-32C of the whole file.
    pub crc32c: u32,
}

impl CheckpointManifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}
