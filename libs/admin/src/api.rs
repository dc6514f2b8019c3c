//! The admin HTTP API's request and response bodies, shared by the coordinator (server) and the
//! `ferry` CLI (client), so a field is defined once.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | `/v1/status` | | [`StatusView`] |
//! | GET | `/v1/tables` | | `[`[`TableView`]`]` |
//! | POST | `/v1/tables` | [`CreateTable`] | [`TableDetail`] |
//! | GET | `/v1/tables/{table}` | | [`TableDetail`] |
//! | GET | `/v1/tables/{table}/receivers` | | [`TableReceivers`] (asked by remote shippers) |
//! | POST | `/v1/tables/{table}/follow` | [`FollowTable`] | [`TableDetail`] (asked by a remote coordinator: create the target of its full dup) |
//! | POST | `/v1/tables/{table}/install_complete` | [`InstallComplete`] | [`TableDetail`] (asked by a remote coordinator: its full dup caught up) |
//! | DELETE | `/v1/tables/{table}` | | [`TableView`] |
//! | PUT | `/v1/tables/{table}/state` | [`SetTableState`] | [`TableView`] |
//! | GET | `/v1/tables/{table}/dups` | | `[`[`DupView`]`]` |
//! | POST | `/v1/tables/{table}/dups` | [`AddDup`] | [`DupView`] |
//! | GET | `/v1/tables/{table}/dups/{dupid}` | | [`DupView`] |
//! | GET | `/v1/tables/{table}/dups/{dupid}/copy` | | [`CopyView`] (a full dup's copy, per partition) |
//! | POST | `/v1/tables/{table}/dups/{dupid}/pause` | | [`DupView`] |
//! | POST | `/v1/tables/{table}/dups/{dupid}/start` | | [`DupView`] |
//! | PUT | `/v1/tables/{table}/dups/{dupid}/fail_mode` | [`SetFailMode`] | [`DupView`] |
//! | PUT | `/v1/tables/{table}/dups/{dupid}/rate` | [`SetRate`] | [`DupView`] (a full dup's checkpoint bandwidth) |
//! | DELETE | `/v1/tables/{table}/dups/{dupid}` | | [`DupView`] (status `DS_REMOVED`) |
//! | POST | `/v1/tables/{table}/failover` | [`StartFailover`] | [`FailoverView`] (a planned failover of this source table) |
//! | GET | `/v1/tables/{table}/failover` | | [`FailoverView`] (the table's last failover, either side) |
//! | POST | `/v1/tables/{table}/failover/take_over` | [`TakeOver`] | [`FailoverView`] (asked by the source's coordinator: catch up, then take the writes over) |
//! | POST | `/v1/tables/{table}/failover/abort` | [`AbortFailover`] | [`FailoverView`] (asked by the source's coordinator: call it off unless already taken over) |
//! | GET | `/meta/app/duplication?name=T` | | [`PegasusAppDuplication`] |
//! | GET | `/health` | | [`HealthView`] |
//! | GET | `/metrics` | | Prometheus text |
//!
//! Errors are `{"error": "<one sentence>"}` with a 4xx/5xx status.

use serde::{Deserialize, Serialize};

use ferry_proto::DupId;

use ferry_meta::tables::TableDescription;
use ferry_meta::{DupInfo, NodeInfo, TableInfo, TableState};

/// `POST /v1/tables`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateTable {
    /// Table name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
}

/// `POST /v1/tables/{table}/dups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddDup {
    /// Remote cluster name.
    pub remote: String,
    /// Full duplication (checkpoint first).
    #[serde(default)]
    pub full: bool,
    /// Full duplication: the partition count of the table the remote cluster creates (default:
    /// the source table's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_partitions: Option<u32>,
    /// Full duplication: the checkpoint transfer's bandwidth limit, bytes per second on the
    /// wire (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bytes: Option<u64>,
}

/// `POST /v1/tables/{table}/install_complete`: the source's coordinator tells the target's that
/// every source partition caught up with the log after the install.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallComplete {
    pub source_cluster: String,
    pub dupid: DupId,
}

/// `POST /v1/tables/{table}/follow`: one coordinator asks another to create the target table of
/// its full duplication.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FollowTable {
    /// The target table's partition count.
    pub partitions: u32,
    /// Where it is filled from.
    pub follower: ferry_meta::Follower,
}

/// `PUT /v1/tables/{table}/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetTableState {
    /// `available`, `read_only` or `demoted`.
    pub state: String,
}

/// `PUT /v1/tables/{table}/dups/{dupid}/fail_mode`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetFailMode {
    /// `slow`, `skip`, `fast` (or `FAIL_SLOW`, ...).
    pub fail_mode: String,
}

/// `PUT /v1/tables/{table}/dups/{dupid}/rate`: a full dup's checkpoint bandwidth limit, bytes per
/// second on the wire, shared by its partitions; 0 lifts it. It applies at once to a copy that
/// runs and to every later one (a re-bootstrap).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetRate {
    pub rate_bytes: u64,
}

/// A table in a list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableView {
    /// Name.
    pub name: String,
    /// Stored value.
    #[serde(flatten)]
    pub info: TableInfo,
}

/// A table with its partitions.
pub type TableDetail = TableDescription;

/// `GET /v1/tables/{table}/receivers`: which receiver takes each partition of a table. A
/// shipper of another cluster asks this before it connects, and again after a failure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableReceivers {
    /// The table.
    pub table: String,
    /// Its partition count.
    pub partition_count: u32,
    /// Its state.
    pub state: TableState,
    /// One entry per partition, in order.
    pub partitions: Vec<PartitionReceiver>,
}

/// One partition in [`TableReceivers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionReceiver {
    /// The partition.
    pub partition: u32,
    /// The node hosting it, if placed.
    pub node: Option<String>,
    /// That node's receiver address, if a receiver is registered for it.
    pub receiver_addr: Option<String>,
}

/// A dup, with its id and table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DupView {
    /// The dupid.
    pub dupid: DupId,
    /// The source table.
    pub table: String,
    /// Stored value.
    #[serde(flatten)]
    pub info: DupInfo,
}

/// `GET /v1/tables/{table}/dups/{dupid}/copy`: where a full dup's copy stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyView {
    pub dupid: DupId,
    pub table: String,
    /// The dup's status name.
    pub status: String,
    /// What the coordinator waits for, if anything (its last stall reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Sums over the partitions with a transfer record.
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate: f64,
    /// Partitions whose checkpoint is published, staged on the target, and install complete.
    pub checkpoints: u32,
    pub staged: u32,
    pub complete: u32,
    pub partitions: Vec<CopyPartition>,
}

/// One partition in [`CopyView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyPartition {
    pub partition: u32,
    /// The checkpoint's decree and size, once published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decree: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bytes: Option<u64>,
    /// The shipper's last transfer record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<ferry_meta::Transfer>,
    /// When the install-complete event fired for it (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_complete_at_ms: Option<u64>,
}

/// `POST /v1/tables/{table}/failover`: hand the table's writes over to cluster `to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartFailover {
    /// The target cluster (a dup of the table to it must be in `DS_LOG`).
    pub to: String,
    /// Add the dup back (target → this cluster) from the hand-over, for failback.
    #[serde(default)]
    pub reverse: bool,
    /// The target takes over only if its content equals this side's at the fence.
    #[serde(default)]
    pub verify: bool,
    /// How long the whole failover may take before it is rolled back, in ms.
    pub timeout_ms: u64,
}

/// `POST /v1/tables/{table}/failover/take_over` (coordinator to coordinator).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TakeOver {
    /// The source's failover id.
    pub id: u64,
    pub source_cluster: String,
    pub source_cluster_id: u8,
    pub source_table: String,
    /// The source's dup to this cluster.
    pub dupid: DupId,
    /// Per source partition: its last decree; the target takes over once it applied them all.
    pub decrees: Vec<ferry_proto::Decree>,
    /// Add the dup back (this cluster → the source) at the take-over.
    #[serde(default)]
    pub reverse: bool,
    pub deadline_ms: u64,
    /// `--verify`: the source's content at the fence; the target takes over only if its own
    /// equals it once caught up.
    #[serde(default)]
    pub verify: Option<ferry_meta::failover::ContentDigest>,
}

/// `POST /v1/tables/{table}/failover/force`, on the target: take the writes over now, without
/// the source (unplanned failover).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForceFailover {
    /// This cluster's name, as the operator typed it (`--to`): a check that the command runs on
    /// the cluster that takes over.
    pub to: String,
    /// The source cluster whose writes the table received; needed only when the duplication
    /// group has more than one other cluster and no failover names it.
    #[serde(default)]
    pub from: Option<String>,
    /// How long to wait for every node's report of what it applied, in ms.
    pub timeout_ms: u64,
}

/// `POST /v1/tables/{table}/failover/recover`, on the old source of a forced failover: ship the
/// writes the new primary never got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoverFailover {
    /// How long the shipping may take, in ms.
    pub timeout_ms: u64,
}

/// A table's content digest: `GET /digest` on a node (its partitions), and
/// `GET /v1/tables/{table}/digest` on a coordinator (every partition, from the node hosting it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableDigest {
    pub table: String,
    /// Stored entries (tombstones included) in all partitions.
    pub entries: u64,
    /// Order-independent hash of every entry (key, timetag, expiry, value), summed over the
    /// partitions: equal across clusters whatever their partition counts.
    pub content_hash: String,
    pub partitions: Vec<PartitionDigest>,
    /// Per partition of each source cluster the table applies from: the last decree every
    /// partition applied, when the digest was taken.
    #[serde(default)]
    pub applied: Vec<AppliedDecree>,
}

/// One partition in [`TableDigest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionDigest {
    pub partition: u32,
    pub entries: u64,
    /// FNV-1a over every entry in key order.
    pub digest: String,
    pub committed_decree: u64,
    /// Whether no write committed while the digest was computed (the digest is the content at
    /// `committed_decree`).
    #[serde(default)]
    pub stable: bool,
}

/// One source partition in [`TableDigest::applied`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedDecree {
    pub cluster_id: u8,
    pub partition: u32,
    pub decree: u64,
}

/// `POST /v1/tables/{table}/verify`: compare the table with its copy on cluster `to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verify {
    pub to: String,
    /// How long to look for a consistent point, in ms.
    pub timeout_ms: u64,
}

/// What `ferry verify` found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyView {
    pub table: String,
    pub remote: String,
    pub remote_table: String,
    /// Whether both sides hold the same entries.
    pub equal: bool,
    /// The source's decree of each partition at the point compared (the target had applied
    /// exactly these).
    pub decrees: Vec<u64>,
    pub source_entries: u64,
    pub target_entries: u64,
    /// Per partition when both tables have the same partition count (otherwise only the
    /// totals and the order-independent hashes are compared).
    pub partitions: Vec<VerifyPartition>,
    /// How many consistent points were tried (the source took writes meanwhile).
    pub attempts: u32,
}

/// One partition in [`VerifyView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyPartition {
    pub partition: u32,
    pub source_entries: u64,
    pub target_entries: u64,
    pub source_digest: String,
    pub target_digest: String,
    pub equal: bool,
}

/// `POST /v1/tables/{table}/failover/abort` (coordinator to coordinator).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AbortFailover {
    pub id: u64,
}

/// A table's last failover, as `ferry failover --status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverView {
    pub cluster: String,
    pub table: String,
    /// The table's state now.
    pub state: TableState,
    /// `None` if the table never took part in a failover.
    pub record: Option<ferry_meta::failover::FailoverRecord>,
    /// Time since the failover started (until it ended), ms.
    pub elapsed_ms: u64,
    /// Per partition of this side's table.
    pub partitions: Vec<FailoverPartition>,
}

/// One partition in [`FailoverView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverPartition {
    pub partition: u32,
    pub node: Option<String>,
    /// Source: the partition's last decree once fenced; target: its committed decree.
    pub decree: Option<u64>,
    /// Source: the dup's confirmed decree (from etcd, where shippers write it every
    /// `progress_interval`; once the target took over, at least the last decree, which the
    /// target applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_decree: Option<u64>,
    /// Whether the node refuses writes now, as it last answered.
    pub fenced: Option<bool>,
    /// Target: whether the node applied the source's last decrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<bool>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// Cluster name.
    pub cluster: String,
    /// Cluster id.
    pub cluster_id: u8,
    /// The leader's advertised address.
    pub leader: String,
    /// Every coordinator taking part in the election.
    pub coordinators: Vec<CoordinatorView>,
    /// Registered nodes.
    pub nodes: Vec<NodeInfo>,
    /// Number of tables.
    pub tables: usize,
    /// Number of dups per status.
    pub dups: std::collections::BTreeMap<String, usize>,
    /// Every live dup's progress per partition, as its shippers last wrote it to etcd.
    #[serde(default)]
    pub progress: Vec<ProgressView>,
    /// Every full dup whose install has not completed on every partition yet.
    #[serde(default)]
    pub copies: Vec<CopyView>,
    /// Every partition's last re-bootstrap (its log was collected past what its dup confirmed).
    #[serde(default)]
    pub rebootstraps: Vec<RebootstrapView>,
    /// Every table's last failover.
    #[serde(default)]
    pub failovers: Vec<(String, ferry_meta::failover::FailoverRecord)>,
}

/// One partition's last re-bootstrap in [`StatusView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebootstrapView {
    pub table: String,
    pub dupid: DupId,
    pub partition: u32,
    pub generation: u32,
    /// `requested`, `checkpointed`, `staged` or `done`.
    pub state: ferry_meta::RebootstrapState,
    pub reason: String,
    /// What the dup had confirmed when the log was found gone.
    pub confirmed_decree: u64,
    /// The fresh checkpoint's decree and size, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decree: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bytes: Option<u64>,
    pub requested_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at_ms: Option<u64>,
    /// The shipper's transfer record while the checkpoint is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<ferry_meta::Transfer>,
}

/// One (dup, partition) in [`StatusView`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressView {
    pub table: String,
    pub dupid: DupId,
    pub remote: String,
    /// The dup's status name.
    pub status: String,
    pub partition: u32,
    /// Highest decree the target has made durable (0: nothing shipped yet).
    pub confirmed_decree: u64,
    /// The source partition's committed decree when the shipper last wrote progress.
    pub committed_decree: u64,
    /// `committed_decree - confirmed_decree`.
    pub pending_mutations: u64,
    /// 0 when nothing is pending; otherwise the age of the last confirmed write, in ms (an
    /// upper bound of the lag; the shipper's `dup_lag_ms` is exact).
    pub lag_ms: u64,
    /// How old this record is, ms (a shipper writes it every `progress_interval` while shipping).
    pub age_ms: u64,
    /// Why shipping last failed, while the partition has confirmed nothing since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One coordinator in the election (its election value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CoordinatorView {
    /// Instance name.
    pub id: String,
    /// Admin address.
    pub addr: String,
    /// Whether it leads.
    #[serde(default)]
    pub leader: bool,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthView {
    /// Always `coordinator`.
    pub process: String,
    /// Cluster name.
    pub cluster: String,
    /// Instance name.
    pub id: String,
    /// The start-up stage reached: `loading_config`, `connecting_etcd`, `checking_config`,
    /// `campaigning` (standby), `leader`.
    pub stage: String,
    /// Every stage reached so far, in order.
    pub stages: Vec<String>,
    /// The leader's address, when known.
    pub leader: Option<String>,
    /// The last etcd error, while etcd is unreachable.
    pub etcd_error: Option<String>,
}

/// `GET /meta/app/duplication?name=T`, shaped like Pegasus's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PegasusAppDuplication {
    /// Table id.
    pub appid: u32,
    /// Table name.
    pub app_name: String,
    /// The dups.
    pub duplications: Vec<PegasusDup>,
}

/// One dup in [`PegasusAppDuplication`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PegasusDup {
    /// The dupid.
    pub dupid: DupId,
    /// Remote cluster.
    pub remote: String,
    /// Status name.
    pub status: String,
    /// Creation time, ms.
    pub create_ts: u64,
    /// Fail mode name.
    pub fail_mode: String,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One sentence.
    pub error: String,
}
