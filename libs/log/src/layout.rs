//! Where the files of a node's data dir are. The node, the shipper and the receiver each open
//! files here (they meet only through them), so the paths are spelled out in this one place:
//!
//! ```text
//! <data_dir>/<table>/<p>/db/                         RocksDB (the node only)
//! <data_dir>/<table>/<p>/plog/<first:020>.plog       the partition's plog segments
//! <data_dir>/<table>/<p>/plog/committed              the committed marker the shipper tails
//! <data_dir>/<table>/<p>/inbox/<cid>-<sp>/           one source partition's inbox log (+ committed)
//! <data_dir>/<table>/<p>/checkpoints/dup-<dupid>/    a full dup's checkpoint (db/ + manifest.json)
//! <data_dir>/<table>/<p>/checkpoints/rebootstrap-<dupid>-<g>/  a re-bootstrap's fresh checkpoint
//! <data_dir>/<table>/.fences/<cid>-<dupid>-<sp>      the receiver's fencing tokens
//! <data_dir>/<table>/.staging/<cid>-<sp>/            an incoming checkpoint (see `staging`)
//! <data_dir>/.nodelog/<n>.nlog                        the node's commit log (see `nodelog`)
//! ```

use std::path::{Path, PathBuf};

use ferry_proto::{DupId, PartitionId, Source};

/// The RocksDB directory inside a partition directory.
pub const DB_DIR: &str = ferry_proto::checkpoint::DB_DIR;
/// The plog directory inside a partition directory.
pub const PLOG_DIR: &str = "plog";
/// The directory of the inbox logs inside a partition directory.
pub const INBOX_DIR: &str = "inbox";
/// The directory of the checkpoints kept for full dups, inside a partition directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// How a re-bootstrap's checkpoint directory under [`CHECKPOINTS_DIR`] begins.
pub const REBOOTSTRAP_PREFIX: &str = "rebootstrap-";
/// The directory of the fencing-token files inside a table directory.
pub const FENCES_DIR: &str = ".fences";
/// The directory of incoming checkpoints inside a table directory.
pub const STAGING_DIR: &str = ".staging";
/// The node's commit log inside the data dir (a table name never starts with a dot).
pub const NODELOG_DIR: &str = ".nodelog";

/// A node's data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(data_dir: impl Into<PathBuf>) -> Layout {
        Layout {
            root: data_dir.into(),
        }
    }

    /// The data dir itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<data_dir>/<table>`.
    pub fn table(&self, table: &str) -> PathBuf {
        self.root.join(table)
    }

    /// `<data_dir>/<table>/<p>`.
    pub fn partition(&self, table: &str, p: PartitionId) -> PathBuf {
        self.table(table).join(p.0.to_string())
    }

    /// `<data_dir>/<table>/<p>/plog`.
    pub fn plog(&self, table: &str, p: PartitionId) -> PathBuf {
        plog_dir(&self.partition(table, p))
    }

    /// `<data_dir>/<table>/<p>/checkpoints`: the checkpoints kept for full dups.
    pub fn checkpoints(&self, table: &str, p: PartitionId) -> PathBuf {
        self.partition(table, p).join(CHECKPOINTS_DIR)
    }

    /// `<data_dir>/<table>/<p>/checkpoints/dup-<dupid>`: the checkpoint of `dupid`, kept until
    /// its install is complete.
    pub fn dup_checkpoint(&self, table: &str, p: PartitionId, dupid: DupId) -> PathBuf {
        self.checkpoints(table, p).join(format!("dup-{}", dupid.0))
    }

    /// `<data_dir>/<table>/<p>/checkpoints/rebootstrap-<dupid>-<generation>`: the fresh
    /// checkpoint a re-bootstrap of the partition sends, kept until it is done.
    pub fn dup_rebootstrap(
        &self,
        table: &str,
        p: PartitionId,
        dupid: DupId,
        generation: u32,
    ) -> PathBuf {
        self.checkpoints(table, p)
            .join(format!("{REBOOTSTRAP_PREFIX}{}-{generation}", dupid.0))
    }

    /// `<data_dir>/<table>/.fences`.
    pub fn fences(&self, table: &str) -> PathBuf {
        self.table(table).join(FENCES_DIR)
    }

    /// `<data_dir>/<table>/.staging/<cid>-<sp>`: where `source`'s checkpoint arrives.
    pub fn staging(&self, table: &str, source: Source) -> PathBuf {
        self.table(table).join(STAGING_DIR).join(format!(
            "{}-{}",
            source.cluster.get(),
            source.partition.0
        ))
    }
}

/// The plog directory of the partition in `partition_dir`.
pub fn plog_dir(partition_dir: &Path) -> PathBuf {
    partition_dir.join(PLOG_DIR)
}

/// The RocksDB directory of the partition in `partition_dir`.
pub fn db_dir(partition_dir: &Path) -> PathBuf {
    partition_dir.join(DB_DIR)
}

/// The inbox log of `source` in the partition in `partition_dir`.
pub fn inbox_dir(partition_dir: &Path, source: Source) -> PathBuf {
    partition_dir
        .join(INBOX_DIR)
        .join(format!("{}-{}", source.cluster.get(), source.partition.0))
}

#[cfg(test)]
mod tests {
    use ferry_proto::ClusterId;

    use super::*;

    #[test]
    fn paths() {
        let l = Layout::new("/d");
        let p = PartitionId(3);
        assert_eq!(l.plog("t", p), PathBuf::from("/d/t/3/plog"));
        assert_eq!(db_dir(&l.partition("t", p)), PathBuf::from("/d/t/3/db"));
        assert_eq!(l.fences("t"), PathBuf::from("/d/t/.fences"));
        let source = Source {
            cluster: ClusterId::new(2).expect("id"),
            partition: PartitionId(5),
        };
        assert_eq!(
            inbox_dir(&l.partition("t", p), source),
            PathBuf::from("/d/t/3/inbox/2-5")
        );
    }
}
