//! The JSON values stored in etcd. Fields a newer version adds are kept (`extra`) and written
//! back untouched, so an older coordinator never erases them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use ferry_proto::Decree;

use crate::status::{DupStatus, FailMode};

/// `dups/<table>/<dupid>`:
/// `{"remote","status","create_timestamp_ms","fail_mode","mode","remote_table"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DupInfo {
    /// The remote cluster's name.
    pub remote: String,
    /// Where the dup is in its life; an unknown stored name reads as `DS_REMOVED`.
    pub status: DupStatus,
    /// When the dup was added, ms since the Unix epoch.
    pub create_timestamp_ms: u64,
    /// What a shipper does when a batch keeps failing.
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Full (checkpoint first) or incremental (log only).
    pub mode: DupMode,
    /// The table's name in the remote cluster (the same name, as in Pegasus).
    pub remote_table: String,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl DupInfo {
    /// The `extra` field of a full dup's checkpoint bandwidth limit (bytes per second on the
    /// wire, for the whole dup; 0 or absent: none), set by `dup add --rate-mb` and `dup set-rate`.
    pub const CHECKPOINT_RATE: &'static str = "checkpoint_rate_bytes";

    /// The `extra` field of a full dup's target-side install-complete event, ms since the Unix
    /// epoch (the target's coordinator acknowledged it).
    pub const TARGET_INSTALL_COMPLETE: &'static str = "target_install_complete_at_ms";

    /// The checkpoint bandwidth limit, if there is one.
    pub fn checkpoint_rate_bytes(&self) -> Option<u64> {
        self.extra
            .get(Self::CHECKPOINT_RATE)
            .and_then(Value::as_u64)
            .filter(|r| *r > 0)
    }
}

/// How a dup starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DupMode {
    /// Copy a checkpoint first, then the log after it (`ferry dup add --full`).
    Full,
    /// Only writes from now on.
    Incremental,
}

/// `tables/<table>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableInfo {
    /// Unique in the cluster, never reused.
    pub id: u32,
    /// Number of partitions, fixed at creation.
    pub partition_count: u32,
    /// Lifecycle state.
    pub state: TableState,
    /// When the table was created, ms since the Unix epoch.
    pub create_timestamp_ms: u64,
    /// Set on the target of a full duplication: the table is filled from the source's
    /// checkpoints, and stays `creating` until every partition has installed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follower: Option<Follower>,
    /// Set on a failover's target while it catches up (see [`crate::failover`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<crate::failover::CatchUp>,
    /// Set on a table demoted by a failover: the cluster that takes its writes now (the nodes
    /// name it in their refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serves_on: Option<String>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What a follower table is filled from: a full duplication of another cluster's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follower {
    /// The source cluster's name and id.
    pub source_cluster: String,
    pub source_cluster_id: u8,
    /// The table there.
    pub source_table: String,
    /// The source cluster's dupid.
    pub dupid: ferry_proto::DupId,
    /// The source table's partition count (each target partition takes the keys of every
    /// source partition's checkpoint that hash to it).
    pub source_partitions: u32,
    /// The decree of each source partition's checkpoint, in order: a staged checkpoint is
    /// installed only if it is this one (not one an earlier, removed dup left).
    #[serde(default)]
    pub decrees: Vec<Decree>,
}

impl Follower {
    /// Whether `other` follows the same source table (whatever the dup).
    pub fn same_source(&self, other: &Follower) -> bool {
        self.source_cluster == other.source_cluster
            && self.source_cluster_id == other.source_cluster_id
            && self.source_table == other.source_table
            && self.source_partitions == other.source_partitions
    }
}

/// A table's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableState {
    /// Partitions not all placed yet (or, on a dup target, a checkpoint being installed).
    Creating,
    /// Serving reads and writes.
    Available,
    /// Refusing writes, e.g. fenced during failover.
    ReadOnly,
    /// Was the source of a failover; the other cluster serves now.
    Demoted,
}

/// `tables/<table>/partitions/<p>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The node that hosts the partition; `null` while no node is registered.
    pub node: Option<String>,
    /// On a follower table: when the node installed the partition from the source's
    /// checkpoints (ms since the Unix epoch), and each source partition's checkpoint decree
    /// it holds (its duplication progress from then on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<Installed>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A follower partition's install (see [`PartitionEntry::installed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub at_ms: u64,
    /// Per source partition, in order: the decree of the checkpoint installed.
    pub decrees: Vec<Decree>,
    /// The install-complete event (ms since the Unix epoch): every source partition's log
    /// caught up after the install. The node deletes the staged checkpoints then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_at_ms: Option<u64>,
}

/// `dups/<table>/<dupid>/checkpoint/<p>`, written once by the source node when it has made the
/// partition's checkpoint for a full dup (`DS_PREPARE`). Never rewritten with another decree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DupCheckpoint {
    /// The checkpoint: its decree and every file's name, size and CRC-32C.
    pub manifest: ferry_proto::CheckpointManifest,
    /// Which database the files come from (the partition's RocksDB identity): a target staging
    /// files of another lineage discards them.
    pub lineage: String,
    /// The node that made it and keeps it until the install is complete.
    pub node: String,
    /// When it was made, ms since the Unix epoch.
    pub made_at_ms: u64,
    /// Set by the coordinator when log shipping began (`DS_LOG`): the source partition's
    /// committed decree then. The target has caught up once it confirmed this far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_to: Option<Decree>,
    /// The install-complete event (ms since the Unix epoch): the target installed this
    /// checkpoint and then caught up with the log. The node deletes the kept checkpoint then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_complete_at_ms: Option<u64>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `dups/<table>/<dupid>/rebootstrap/<p>`: a partition whose log was collected past what the
/// dup confirmed, filled again from a fresh checkpoint. The shipper requests it, the source
/// node makes and records the checkpoint, the shipper sends it and records it staged, and
/// marks it done once the target confirmed the checkpoint's decree through the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rebootstrap {
    /// 1 for the partition's first re-bootstrap in this dup, then 2, ...
    pub generation: u32,
    pub state: RebootstrapState,
    /// Why: what the dup confirmed and where the plog begins now.
    pub reason: String,
    /// What the dup had confirmed when the log was found gone.
    pub confirmed: Decree,
    pub requested_at_ms: u64,
    /// The fresh checkpoint, once the source node made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<DupCheckpoint>,
    /// When the target confirmed the checkpoint's decree (state `done`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at_ms: Option<u64>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Where a [`Rebootstrap`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebootstrapState {
    /// The shipper found the log gone; the source node makes a checkpoint.
    Requested,
    /// The checkpoint is made; the shipper sends it.
    Checkpointed,
    /// The target staged it; its node applies it, then the log follows.
    Staged,
    /// The target confirmed the checkpoint's decree.
    Done,
}

impl Rebootstrap {
    /// Not done yet.
    pub fn is_open(&self) -> bool {
        self.state != RebootstrapState::Done
    }
}

/// `dups/<table>/<dupid>/transfer/<p>`: a full dup's checkpoint transfer, as its shipper last
/// wrote it (about once a second while it copies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    /// `copying` or `staged` (the target holds the whole checkpoint).
    pub state: String,
    pub files_done: u32,
    pub files_total: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes the target held already when the last transfer started (not sent again).
    pub bytes_present: u64,
    /// File bytes per second, smoothed.
    pub rate: f64,
    /// Time left at that rate, if it can be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// Why the copy does not advance (the target's disk is full, a session failed), while it
    /// does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub updated_at_ms: u64,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `dups/<table>/<dupid>/progress/<p>`, written by the shipper that owns the partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The highest decree the target has made durable.
    pub confirmed_decree: Decree,
    /// The write timestamp of that decree, ms since the Unix epoch (0 if none yet).
    pub last_confirmed_timestamp_ms: u64,
    /// The source partition's last committed decree when this was written; `committed_decree -
    /// confirmed_decree` is the pending mutations. 0 when not known.
    #[serde(default)]
    pub committed_decree: Decree,
    /// When the shipper wrote this, ms since the Unix epoch (0 when not known).
    #[serde(default)]
    pub updated_at_ms: u64,
    /// Why shipping this partition last failed, while it has not confirmed anything since
    /// (`ferry status` shows it for a stuck partition); absent when it ships.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl TableState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TableState::Creating => "creating",
            TableState::Available => "available",
            TableState::ReadOnly => "read_only",
            TableState::Demoted => "demoted",
        }
    }
}

/// Parses the stored names (`available`, `read_only`, ...).
impl std::str::FromStr for TableState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            TableState::Creating,
            TableState::Available,
            TableState::ReadOnly,
            TableState::Demoted,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| format!("unknown table state `{s}`; use available, read_only or demoted"))
    }
}

impl std::fmt::Display for TableState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for DupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DupMode::Full => "full",
            DupMode::Incremental => "incremental",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dup_json_is_documented_shape_and_keeps_unknown_fields() {
        let stored = r#"{"remote":"tj","status":"DS_LOG","create_timestamp_ms":1669972761000,"fail_mode":"FAIL_SKIP","mode":"incremental","remote_table":"users","future":{"x":1}}"#;
        let d: DupInfo = serde_json::from_str(stored).expect("documented JSON decodes");
        assert_eq!(d.status, DupStatus::Log);
        assert_eq!(d.fail_mode, FailMode::Skip);
        assert_eq!(serde_json::to_string(&d).ok().as_deref(), Some(stored));
    }

    #[test]
    fn unknown_status_reads_as_removed() {
        let stored = r#"{"remote":"tj","status":"DS_SOMETHING_NEW","create_timestamp_ms":1,"fail_mode":"FAIL_SLOW","mode":"full","remote_table":"t"}"#;
        let d: DupInfo = serde_json::from_str(stored).expect("decodes");
        assert_eq!(d.status, DupStatus::Removed);
    }

    #[test]
    fn table_state_names() {
        let t = TableInfo {
            id: 1,
            partition_count: 4,
            state: TableState::ReadOnly,
            create_timestamp_ms: 5,
            follower: None,
            catch_up: None,
            serves_on: None,
            extra: Map::new(),
        };
        assert_eq!(
            serde_json::to_string(&t).ok().as_deref(),
            Some(r#"{"id":1,"partition_count":4,"state":"read_only","create_timestamp_ms":5}"#)
        );
    }
}
