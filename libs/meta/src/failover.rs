//! Failover metadata (DESIGN.md, "Planned failover"): each side's failover record, and the
//! nodes' answers to their table's state.
//!
//! - `failover/<table>`: the [`FailoverRecord`] of the last failover of the table this cluster
//!   took part in, as the source (it hands over) or the target (it takes over). The leading
//!   coordinator advances it one step at a time; every step is persisted before it acts, so a
//!   coordinator that dies is replaced by one that goes on from the step recorded.
//! - `state_acks/<table>/<node>`: a node's [`StateAck`]: which revision of the table key it has
//!   put in force (fenced or not), each partition's committed decree at that point (while fenced:
//!   its last decree), and whether it met the table's [`CatchUp`] order.
//! - `checked/<table>`: the leader's last [`Checked`] of a table that duplicates to other
//!   clusters: none of them took its writes over by a forced failover. A node that starts
//!   refuses writes to such a table until a check newer than its start (DESIGN.md, "Unplanned
//!   failover": the old source learns it was demoted before it takes a write).

use etcd_client::TxnOp;
use ferry_proto::{Decree, DupId, PartitionId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    decode, encode, known_table, unchanged, MetaError, MetaStore, TableInfo, TableState,
    CAS_ATTEMPTS,
};

/// Which side of the failover this cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This cluster's table hands its writes over to the remote one.
    Source,
    /// This cluster's table takes the writes over.
    Target,
}

/// A failover's step. The source goes `fencing → draining → handing_over → demoting → done`,
/// or to `rolling_back → rolled_back` from any step before `demoting`; the target goes
/// `catching_up → promoting → done`, or `aborted` before `promoting`.
///
/// A forced failover: the target goes `forcing → done`; the old source, once it learns of it,
/// `demoting → done`, and with `--recover` `recovering → recovered` (or back to `done` with the
/// error if it did not finish in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Source: the table is `read_only`; waiting for every node to confirm with its last decrees.
    Fencing,
    /// Source: waiting until the target confirmed every partition's last decree.
    Draining,
    /// Source: the target was asked to take over; waiting for it to answer promoted.
    HandingOver,
    /// Source: the target took over; the table becomes `demoted`.
    Demoting,
    /// Target: waiting until every node applied the source's last decrees.
    CatchingUp,
    /// Target: caught up; taking the writes over (an abort is refused from here).
    Promoting,
    /// Finished: the target serves the writes.
    Done,
    /// Source: a step failed; lifting the fence (after the target confirmed it did not promote).
    RollingBack,
    /// Source: the failover was rolled back; the source serves again.
    RolledBack,
    /// Target: the source called the failover off before the target took over.
    Aborted,
    /// Target, forced: the table takes writes; waiting for every node's report of what it
    /// applied from the source.
    Forcing,
    /// Old source of a forced failover: shipping the writes the new primary never got.
    Recovering,
    /// Old source of a forced failover: every write the new primary missed was shipped to it.
    Recovered,
    /// A step name this version does not know.
    #[serde(other)]
    Unknown,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Fencing => "fencing",
            Step::Draining => "draining",
            Step::HandingOver => "handing_over",
            Step::Demoting => "demoting",
            Step::CatchingUp => "catching_up",
            Step::Promoting => "promoting",
            Step::Done => "done",
            Step::RollingBack => "rolling_back",
            Step::RolledBack => "rolled_back",
            Step::Aborted => "aborted",
            Step::Forcing => "forcing",
            Step::Recovering => "recovering",
            Step::Recovered => "recovered",
            Step::Unknown => "unknown",
        }
    }

    /// Whether nothing more happens in this step.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Step::Done | Step::RolledBack | Step::Aborted | Step::Recovered | Step::Unknown
        )
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `failover/<table>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// Unique per table: the start time in ms, bumped past the previous failover's.
    pub id: u64,
    pub role: Role,
    /// The other cluster, and the table there.
    pub remote: String,
    pub remote_table: String,
    /// Source: the dup to the target that is drained.
    pub dupid: DupId,
    pub step: Step,
    /// Add the duplication back (target → source) at the hand-over, for a failback without a
    /// full copy.
    pub reverse: bool,
    pub started_at_ms: u64,
    /// A step still running at this time fails the failover (source) .
    pub deadline_ms: u64,
    pub updated_at_ms: u64,
    /// Source: the revision of the table key that fenced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_revision: Option<i64>,
    /// The source table's last decree of each partition, once every node confirmed the fence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_decrees: Vec<Decree>,
    /// Source, while draining: each partition's confirmed decree, as last seen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confirmed: Vec<Decree>,
    /// When the table was fenced and when the target took over (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Why the failover failed: the step and the partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The dup added back (target → source) with `reverse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_dupid: Option<DupId>,
    /// The source cluster's id (target side: whose progress the nodes check).
    #[serde(default)]
    pub source_cluster_id: u8,
    /// An unplanned failover (`--force` on the target): the source was not asked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// Forced: per source partition, the last decree the target had applied when it took
    /// over, and that write's time. Writes on the source after it may be missing on the target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<SourceApplied>,
    /// `--verify`: the target takes over only if its content equals the source's at the fence.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify: bool,
    /// With `verify`: the source's content once fenced (the target compares its own with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<ContentDigest>,
    /// Old source of a forced failover, after `--recover`: per partition, how many writes the
    /// new primary had missed and was sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovered: Vec<u64>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl FailoverRecord {
    /// A new record in its first step.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        role: Role,
        remote: &str,
        remote_table: &str,
        dupid: DupId,
        reverse: bool,
        now_ms: u64,
        deadline_ms: u64,
    ) -> FailoverRecord {
        FailoverRecord {
            id,
            role,
            remote: remote.into(),
            remote_table: remote_table.into(),
            dupid,
            step: match role {
                Role::Source => Step::Fencing,
                Role::Target => Step::CatchingUp,
            },
            reverse,
            started_at_ms: now_ms,
            deadline_ms,
            updated_at_ms: now_ms,
            fence_revision: None,
            last_decrees: Vec::new(),
            confirmed: Vec::new(),
            fenced_at_ms: None,
            promoted_at_ms: None,
            finished_at_ms: None,
            error: None,
            reverse_dupid: None,
            source_cluster_id: 0,
            forced: false,
            verify: false,
            source_digest: None,
            applied: Vec::new(),
            recovered: Vec::new(),
            extra: Map::new(),
        }
    }
}

/// Set on a target table while it catches up for a failover: each node waits until its
/// partitions applied every source partition up to `decrees`, then says so in its
/// [`StateAck::caught_up`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUp {
    /// The failover (its id).
    pub failover: u64,
    pub source_cluster_id: u8,
    /// Per source partition, in order: the decree every target partition must have applied.
    pub decrees: Vec<Decree>,
}

/// A table's content for a failover's `--verify`: its entries and order-independent hash, and
/// each partition's entries and ordered digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentDigest {
    pub entries: u64,
    pub content_hash: String,
    pub partitions: Vec<(u64, String)>,
}

impl ContentDigest {
    /// Why `other` (this cluster's) differs from `self` (the source's), if it does.
    pub fn differs(&self, other: &ContentDigest) -> Option<String> {
        if self.partitions.len() == other.partitions.len() {
            for (p, (a, b)) in self.partitions.iter().zip(&other.partitions).enumerate() {
                if a != b {
                    return Some(format!(
                        "partition {p} differs: {} entries (digest {}) on the source, {} (digest {}) here",
                        a.0, a.1, b.0, b.1
                    ));
                }
            }
        }
        (self.entries != other.entries || self.content_hash != other.content_hash).then(|| {
            format!(
                "the table differs: {} entries (hash {}) on the source, {} (hash {}) here",
                self.entries, self.content_hash, other.entries, other.content_hash
            )
        })
    }
}

/// How far the target applied one source partition (see [`FailoverRecord::applied`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceApplied {
    /// The source partition.
    pub partition: u32,
    /// The last decree of it applied by every target partition.
    pub decree: Decree,
    /// The hybrid-clock time of that write, µs since the Unix epoch (0: unknown, e.g. right
    /// after a checkpoint was installed).
    pub timestamp_us: u64,
}

/// `checked/<table>`: what the leader found when it last checked the table's remote clusters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    pub at_ms: u64,
    /// Who cleared the table: `leader <id>` after asking every remote, or `operator` (`ferry
    /// table set-state T available`).
    pub by: String,
}

/// `state_acks/<table>/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAck {
    /// The revision of the table key whose state this node has put in force.
    pub revision: i64,
    /// Whether the node refuses client writes to the table now.
    pub fenced: bool,
    /// Each partition the node hosts and its committed decree when the state took effect (while
    /// fenced: its last decree, since no later write is taken).
    pub decrees: Vec<(PartitionId, Decree)>,
    /// The failover whose catch-up order this node has met, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught_up: Option<u64>,
    /// Under a catch-up order: per partition of its source cluster, the last decree every
    /// partition of this node applied (see [`FailoverRecord::applied`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<SourceApplied>,
    /// Set while the node refuses writes until a return check newer than this revision (its
    /// start) is in `checked/<table>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchecked_since: Option<i64>,
    pub at_ms: u64,
}

impl MetaStore {
    /// The table's failover record, if it ever took part in one.
    pub async fn failover(&self, table: &str) -> Result<Option<FailoverRecord>, MetaError> {
        known_table(table)?;
        match self.get(self.keys().failover(table)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Every failover record of the cluster, by table.
    pub async fn failovers(&self) -> Result<Vec<(String, FailoverRecord)>, MetaError> {
        let prefix = self.keys().failovers();
        let mut out = Vec::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let table = key.trim_start_matches(&prefix).to_owned();
            out.push((table, decode(&kv)?));
        }
        Ok(out)
    }

    /// Starts a failover: stores `record` unless one of the table's failovers is still running
    /// (then that one is answered in the error). `record.id` is bumped past the last one's.
    pub async fn begin_failover(
        &self,
        table: &str,
        mut record: FailoverRecord,
    ) -> Result<FailoverRecord, MetaError> {
        known_table(table)?;
        let key = self.keys().failover(table);
        for _ in 0..CAS_ATTEMPTS {
            let old = self.get(key.clone()).await?;
            if let Some(kv) = &old {
                let prev: FailoverRecord = decode(kv)?;
                if !prev.step.is_final() {
                    return Err(MetaError::Conflict(format!(
                        "table {table} is already in failover {} ({} side, step {}); wait for it \
                         (`ferry failover -t {table} --status`) before starting another",
                        prev.id,
                        match prev.role {
                            Role::Source => "source",
                            Role::Target => "target",
                        },
                        prev.step
                    )));
                }
                record.id = record.id.max(prev.id + 1);
            }
            if self
                .cas(
                    vec![unchanged(&key, old.as_ref())],
                    vec![TxnOp::put(key.clone(), encode(&record), None)],
                )
                .await?
            {
                return Ok(record);
            }
        }
        Err(MetaError::Contended { key })
    }

    /// Stores `record` whatever failover the table was in: a forced failover of the remote
    /// side supersedes any of this side's.
    pub async fn supersede_failover(
        &self,
        table: &str,
        record: &FailoverRecord,
    ) -> Result<(), MetaError> {
        known_table(table)?;
        let key = self.keys().failover(table);
        self.cas(vec![], vec![TxnOp::put(key, encode(record), None)])
            .await
            .map(|_| ())
    }

    /// Records a return check of `table` (see [`Checked`]).
    pub async fn put_checked(&self, table: &str, by: &str) -> Result<(), MetaError> {
        known_table(table)?;
        let key = self.keys().checked(table);
        let value = Checked {
            at_ms: crate::now_ms(),
            by: by.to_owned(),
        };
        self.cas(vec![], vec![TxnOp::put(key, encode(&value), None)])
            .await
            .map(|_| ())
    }

    /// Every table's last return check: the revision that wrote it, by table.
    pub async fn all_checked(&self) -> Result<std::collections::HashMap<String, i64>, MetaError> {
        let prefix = self.keys().all_checked();
        Ok(self
            .get_prefix(prefix.clone())
            .await?
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                (
                    key.trim_start_matches(&prefix).to_owned(),
                    kv.mod_revision(),
                )
            })
            .collect())
    }

    /// The tables whose nodes wait for a return check: every table with a node answer that is
    /// `unchecked_since`, and the largest such revision.
    pub async fn unchecked_tables(
        &self,
    ) -> Result<std::collections::HashMap<String, i64>, MetaError> {
        let prefix = self.keys().all_state_acks();
        let mut out = std::collections::HashMap::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(table) = key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('/').next())
            else {
                continue;
            };
            let ack: StateAck = decode(&kv)?;
            if let Some(since) = ack.unchecked_since {
                let e = out.entry(table.to_owned()).or_insert(since);
                *e = (*e).max(since);
            }
        }
        Ok(out)
    }

    /// The table's last return check and the revision that wrote it.
    pub async fn checked(&self, table: &str) -> Result<Option<(Checked, i64)>, MetaError> {
        known_table(table)?;
        match self.get(self.keys().checked(table)).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    /// Read-modify-write of the table's failover record `id`; refused if another failover
    /// replaced it.
    pub async fn update_failover(
        &self,
        table: &str,
        id: u64,
        mut change: impl FnMut(&mut FailoverRecord) -> Result<(), MetaError>,
    ) -> Result<FailoverRecord, MetaError> {
        known_table(table)?;
        let key = self.keys().failover(table);
        self.update_json(&key, |r: &mut FailoverRecord| {
            if r.id != id {
                return Err(MetaError::Conflict(format!(
                    "table {table}'s failover {id} was replaced by failover {}",
                    r.id
                )));
            }
            change(r)?;
            r.updated_at_ms = crate::now_ms();
            Ok(())
        })
        .await?
        .ok_or_else(|| MetaError::Conflict(format!("table {table} has no failover {id}")))
    }

    /// The table and the revision of its key (what a [`StateAck`] names).
    pub async fn table_at(&self, name: &str) -> Result<(TableInfo, i64), MetaError> {
        known_table(name)?;
        let kv = self
            .get(self.keys().table(name))
            .await?
            .ok_or_else(|| MetaError::NoSuchTable(name.into()))?;
        Ok((decode(&kv)?, kv.mod_revision()))
    }

    /// Sets the table's state and catch-up order together; returns the table and the revision
    /// that did it.
    pub async fn set_table_order(
        &self,
        name: &str,
        state: TableState,
        catch_up: Option<CatchUp>,
    ) -> Result<(TableInfo, i64), MetaError> {
        self.update_table(name, |t| {
            if t.state == TableState::Creating {
                return Err(MetaError::Conflict(format!(
                    "table {name} is still creating; it cannot take part in a failover"
                )));
            }
            t.state = state;
            t.catch_up = catch_up.clone();
            t.serves_on = None;
            Ok(())
        })
        .await?;
        self.table_at(name).await
    }

    /// Demotes the table after a failover to cluster `serves_on` (clearing any catch-up order).
    pub async fn demote_table(&self, name: &str, serves_on: &str) -> Result<(), MetaError> {
        self.update_table(name, |t| {
            t.state = TableState::Demoted;
            t.catch_up = None;
            t.serves_on = Some(serves_on.to_owned());
            Ok(())
        })
        .await
        .map(drop)
    }

    /// A node's answer to its table's state (see the module docs).
    pub async fn put_state_ack(
        &self,
        table: &str,
        node: &str,
        ack: &StateAck,
    ) -> Result<(), MetaError> {
        known_table(table)?;
        let key = self.keys().state_ack(table, node);
        self.cas(vec![], vec![TxnOp::put(key, encode(ack), None)])
            .await
            .map(|_| ())
    }

    /// Every node's answer to the table's state, by node.
    pub async fn state_acks(&self, table: &str) -> Result<Vec<(String, StateAck)>, MetaError> {
        known_table(table)?;
        let prefix = self.keys().state_acks(table);
        let mut out = Vec::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            out.push((key.trim_start_matches(&prefix).to_owned(), decode(&kv)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_keeps_unknown_fields() {
        let mut r = FailoverRecord::new(7, Role::Source, "tj", "users", DupId(3), true, 10, 20);
        r.last_decrees = vec![Decree(4), Decree(0)];
        r.extra.insert("later".into(), Value::from(1));
        let json = serde_json::to_string(&r).expect("encode");
        let back: FailoverRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, r);
        assert_eq!(back.step, Step::Fencing);
        let odd: FailoverRecord =
            serde_json::from_str(&json.replace("\"fencing\"", "\"teleporting\"")).expect("decode");
        assert_eq!(odd.step, Step::Unknown);
        assert!(odd.step.is_final());
    }

    #[test]
    fn only_the_last_steps_are_final() {
        for s in [
            Step::Fencing,
            Step::Draining,
            Step::HandingOver,
            Step::Demoting,
            Step::CatchingUp,
            Step::Promoting,
            Step::RollingBack,
            Step::Forcing,
            Step::Recovering,
        ] {
            assert!(!s.is_final(), "{s}");
        }
        for s in [Step::Done, Step::RolledBack, Step::Aborted, Step::Recovered] {
            assert!(s.is_final(), "{s}");
        }
    }
}
