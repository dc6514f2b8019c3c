//! Tables and the partition table.
//!
//! A table is created in two steps, because etcd caps the number of operations in one
//! transaction (128 by default) and a table may have more partitions than that: the table key
//! is written first in state `creating`, then its partitions in chunks, then the state flips to
//! `available` once every partition has a node. A leader that dies half-way leaves a `creating`
//! table that the next leader completes ([`MetaStore::complete_creating_tables`]).

use etcd_client::{Compare, CompareOp, TxnOp};
use serde_json::Map;

use ferry_proto::PartitionId;

use crate::config::valid_name;
use crate::keys::Keys;
use crate::{
    decode, encode, known_table, unchanged, Follower, Installed, MetaError, MetaStore, NodeInfo,
    PartitionEntry, TableInfo, TableState, CAS_ATTEMPTS,
};

/// Largest partition count accepted.
pub const MAX_PARTITIONS: u32 = 4096;
/// Operations per transaction when writing partitions (etcd's default limit is 128).
const PARTITIONS_PER_TXN: usize = 100;

/// A table with its partition table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TableDescription {
    /// Its name.
    pub name: String,
    /// The table key's value.
    #[serde(flatten)]
    pub info: TableInfo,
    /// One entry per partition, in order; `None` where the entry is not written yet.
    pub partitions: Vec<Option<PartitionEntry>>,
}

/// A table's partitions placed on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The table.
    pub table: String,
    /// Its stored value (partition count, state).
    pub info: TableInfo,
    /// The partitions this node hosts, ascending.
    pub partitions: Vec<PartitionId>,
}

impl MetaStore {
    /// Every table, sorted by name.
    pub async fn list_tables(&self) -> Result<Vec<(String, TableInfo)>, MetaError> {
        let prefix = self.keys().tables();
        let mut out = Vec::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            if let Some(name) = Keys::leaf(kv.key(), &prefix) {
                out.push((name.to_owned(), decode(&kv)?));
            }
        }
        Ok(out)
    }

    /// The partitions placed on `node`, per table (sorted by name), with each table's value:
    /// what a node opens at start-up, and re-reads when the partition table or a state changes.
    /// One consistent etcd read.
    pub async fn assignments(&self, node: &str) -> Result<Vec<Assignment>, MetaError> {
        let prefix = self.keys().tables();
        let mut tables: Vec<Assignment> = Vec::new();
        let mut placed: Vec<(String, PartitionId)> = Vec::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            let Some(rest) = kv.key().strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            let rest = String::from_utf8_lossy(rest);
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                [name] => tables.push(Assignment {
                    table: (*name).to_owned(),
                    info: decode(&kv)?,
                    partitions: Vec::new(),
                }),
                [name, "partitions", p] => {
                    let entry: PartitionEntry = decode(&kv)?;
                    if let (Some(n), Ok(p)) = (entry.node, p.parse::<u32>()) {
                        if n == node {
                            placed.push(((*name).to_owned(), PartitionId(p)));
                        }
                    }
                }
                _ => {}
            }
        }
        for (name, p) in placed {
            if let Some(a) = tables.iter_mut().find(|a| a.table == name) {
                a.partitions.push(p);
            }
        }
        tables.retain(|a| !a.partitions.is_empty());
        for a in &mut tables {
            a.partitions.sort();
        }
        Ok(tables)
    }

    /// One table, or [`MetaError::NoSuchTable`].
    pub async fn table(&self, name: &str) -> Result<TableInfo, MetaError> {
        known_table(name)?;
        let kv = self
            .get(self.keys().table(name))
            .await?
            .ok_or_else(|| MetaError::NoSuchTable(name.into()))?;
        decode(&kv)
    }

    /// One table with its partition table.
    pub async fn describe_table(&self, name: &str) -> Result<TableDescription, MetaError> {
        let info = self.table(name).await?;
        let prefix = self.keys().partitions(name);
        let mut partitions = vec![None; info.partition_count as usize];
        for kv in self.get_prefix(prefix.clone()).await? {
            let Some(p) = Keys::leaf(kv.key(), &prefix).and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            if let Some(slot) = partitions.get_mut(p) {
                *slot = Some(decode(&kv)?);
            }
        }
        Ok(TableDescription {
            name: name.into(),
            info,
            partitions,
        })
    }

    /// Creates a table with `partition_count` partitions placed round-robin on `nodes`. With no
    /// nodes, the table stays `creating` until nodes register and a leader places it.
    pub async fn create_table(
        &self,
        name: &str,
        partition_count: u32,
        nodes: &[String],
        now_ms: u64,
    ) -> Result<TableDescription, MetaError> {
        self.create_table_with(name, partition_count, None, nodes, now_ms)
            .await
    }

    /// Creates the target table of a full duplication: `creating` until every partition has
    /// installed the source's checkpoints ([`MetaStore::mark_installed`]). Asked again for the
    /// same duplication, it answers with the table as it is; a table of that name that is not
    /// this duplication's follower is refused.
    pub async fn create_follower_table(
        &self,
        name: &str,
        partition_count: u32,
        follower: Follower,
        nodes: &[String],
        now_ms: u64,
    ) -> Result<TableDescription, MetaError> {
        match self.table(name).await {
            Ok(info) if info.follower.as_ref() == Some(&follower) => {
                self.place_partitions(name, nodes).await?;
                return self.describe_table(name).await;
            }
            Ok(info)
                if info.state == TableState::Creating
                    && info.partition_count == partition_count
                    && info
                        .follower
                        .as_ref()
                        .is_some_and(|f| f.same_source(&follower)) =>
            {
                // Left by a removed dup of the same source table: this dup takes it over. Its
                // partitions are installed again from this dup's checkpoints; what the target
                // staged already is reused where the files are the same.
                return self.adopt_follower_table(name, follower, nodes).await;
            }
            Ok(info) => {
                return Err(MetaError::Conflict(format!(
                    "cluster {} already has a table `{name}` ({}, {} partitions) that is not the \
                     target of dup {} from {}; a full duplication creates its own target table, \
                     so drop that table there first or duplicate into another cluster",
                    self.keys().cluster(),
                    info.state,
                    info.partition_count,
                    follower.dupid,
                    follower.source_cluster
                )))
            }
            Err(MetaError::NoSuchTable(_)) => {}
            Err(e) => return Err(e),
        }
        match self
            .create_table_with(name, partition_count, Some(follower.clone()), nodes, now_ms)
            .await
        {
            // Created concurrently by a retry of the same request.
            Err(MetaError::TableExists(_)) => match self.table(name).await? {
                info if info.follower.as_ref() == Some(&follower) => {
                    self.describe_table(name).await
                }
                _ => Err(MetaError::TableExists(name.into())),
            },
            other => other,
        }
    }

    async fn adopt_follower_table(
        &self,
        name: &str,
        follower: Follower,
        nodes: &[String],
    ) -> Result<TableDescription, MetaError> {
        let desc = self.describe_table(name).await?;
        for (p, entry) in desc.partitions.iter().enumerate() {
            if entry.as_ref().is_some_and(|e| e.installed.is_some()) {
                self.update_json(
                    &self.keys().partition(name, PartitionId(p as u32)),
                    |e: &mut PartitionEntry| {
                        e.installed = None;
                        Ok(())
                    },
                )
                .await?;
            }
        }
        self.update_table(name, |t| {
            if t.state != TableState::Creating {
                return Err(MetaError::Conflict(format!(
                    "table {name} became {} meanwhile; it is no longer a follower to take over",
                    t.state
                )));
            }
            t.follower = Some(follower.clone());
            Ok(())
        })
        .await?;
        self.place_partitions(name, nodes).await?;
        self.describe_table(name).await
    }

    async fn create_table_with(
        &self,
        name: &str,
        partition_count: u32,
        follower: Option<Follower>,
        nodes: &[String],
        now_ms: u64,
    ) -> Result<TableDescription, MetaError> {
        if !valid_name(name) {
            return Err(MetaError::Invalid(format!(
                "table name `{name}` is not valid; use 1 to 64 letters, digits, `.`, `-` or `_`"
            )));
        }
        if !(1..=MAX_PARTITIONS).contains(&partition_count) {
            return Err(MetaError::Invalid(format!(
                "a table needs 1 to {MAX_PARTITIONS} partitions, not {partition_count}"
            )));
        }
        let table_key = self.keys().table(name);
        let seq_key = self.keys().table_id_seq();
        let mut created = None;
        for _ in 0..CAS_ATTEMPTS {
            if self.get(table_key.clone()).await?.is_some() {
                return Err(MetaError::TableExists(name.into()));
            }
            let seq = self.get(seq_key.clone()).await?;
            let last: u32 = match &seq {
                Some(kv) => decode(kv)?,
                None => 0,
            };
            let info = TableInfo {
                id: last + 1,
                partition_count,
                state: TableState::Creating,
                create_timestamp_ms: now_ms,
                follower: follower.clone(),
                catch_up: None,
                serves_on: None,
                extra: Map::new(),
            };
            let ok = self
                .cas(
                    vec![
                        unchanged(&seq_key, seq.as_ref()),
                        Compare::version(table_key.clone(), CompareOp::Equal, 0),
                    ],
                    vec![
                        TxnOp::put(seq_key.clone(), encode(&info.id), None),
                        TxnOp::put(table_key.clone(), encode(&info), None),
                    ],
                )
                .await?;
            if ok {
                created = Some(info);
                break;
            }
        }
        if created.is_none() {
            return Err(MetaError::Contended { key: seq_key });
        }
        self.place_partitions(name, nodes).await?;
        self.describe_table(name).await
    }

    /// Writes the missing partition entries of a `creating` table round-robin over `nodes`, and
    /// marks it `available` when every partition has a node. Idempotent.
    pub async fn place_partitions(&self, name: &str, nodes: &[String]) -> Result<(), MetaError> {
        let desc = self.describe_table(name).await?;
        if desc.info.state != TableState::Creating {
            return Ok(());
        }
        let mut ops = Vec::new();
        for (p, entry) in desc.partitions.iter().enumerate() {
            if matches!(entry, Some(PartitionEntry { node: Some(_), .. })) {
                continue;
            }
            // Start each table at a different node so that small tables do not all land on the first.
            let start = desc.info.id as usize;
            let node = (!nodes.is_empty()).then(|| nodes[(start + p) % nodes.len()].clone());
            if node.is_none() && entry.is_some() {
                continue;
            }
            let entry = PartitionEntry {
                node,
                installed: entry.as_ref().and_then(|e| e.installed.clone()),
                extra: entry.as_ref().map(|e| e.extra.clone()).unwrap_or_default(),
            };
            ops.push(TxnOp::put(
                self.keys().partition(name, PartitionId(p as u32)),
                encode(&entry),
                None,
            ));
        }
        let table_key = self.keys().table(name);
        for chunk in ops.chunks(PARTITIONS_PER_TXN) {
            // The table must still exist (not dropped meanwhile); its value does not change here.
            let ok = self
                .cas(
                    vec![Compare::version(table_key.clone(), CompareOp::Greater, 0)],
                    chunk.to_vec(),
                )
                .await?;
            if !ok {
                return Err(MetaError::NoSuchTable(name.into()));
            }
        }
        if nodes.is_empty() {
            return Ok(());
        }
        self.update_table(name, |t| {
            // A follower stays creating until its partitions are installed.
            if t.state == TableState::Creating && t.follower.is_none() {
                t.state = TableState::Available;
            }
            Ok(())
        })
        .await
        .map(|_| ())
    }

    /// Records that partition `p` of follower table `name` installed the source's checkpoints,
    /// and marks the table `available` once every partition has. Idempotent: a partition
    /// installed already keeps its first record.
    pub async fn mark_installed(
        &self,
        name: &str,
        p: PartitionId,
        installed: Installed,
    ) -> Result<TableDescription, MetaError> {
        let key = self.keys().partition(name, p);
        let entry = self
            .update_json(&key, |e: &mut PartitionEntry| {
                if e.installed.is_none() {
                    e.installed = Some(installed.clone());
                }
                Ok(())
            })
            .await?;
        if entry.is_none() {
            return Err(MetaError::Invalid(format!(
                "table {name} has no partition {p} placed; it cannot be marked installed"
            )));
        }
        let desc = self.describe_table(name).await?;
        let all = desc
            .partitions
            .iter()
            .all(|e| e.as_ref().is_some_and(|e| e.installed.is_some()));
        if all && desc.info.state == TableState::Creating {
            self.update_table(name, |t| {
                if t.state == TableState::Creating {
                    t.state = TableState::Available;
                }
                Ok(())
            })
            .await?;
            return self.describe_table(name).await;
        }
        Ok(desc)
    }

    /// The install-complete event on a follower table: every installed partition records it
    /// (once). Returns the partitions newly marked. Refused if the table is not `source`'s
    /// follower for `dupid`.
    pub async fn mark_install_complete(
        &self,
        name: &str,
        source_cluster: &str,
        dupid: ferry_proto::DupId,
        now_ms: u64,
    ) -> Result<Vec<PartitionId>, MetaError> {
        let desc = self.describe_table(name).await?;
        let ours = desc
            .info
            .follower
            .as_ref()
            .is_some_and(|f| f.source_cluster == source_cluster && f.dupid == dupid);
        if !ours {
            return Err(MetaError::Conflict(format!(
                "table {name} is not the follower of dup {dupid} from {source_cluster}"
            )));
        }
        let mut marked = Vec::new();
        for (p, entry) in desc.partitions.iter().enumerate() {
            let p = PartitionId(p as u32);
            let Some(e) = entry else { continue };
            let Some(installed) = &e.installed else {
                return Err(MetaError::Conflict(format!(
                    "partition {p} of table {name} is not installed yet; the install is not complete"
                )));
            };
            if installed.complete_at_ms.is_some() {
                continue;
            }
            self.update_json(&self.keys().partition(name, p), |e: &mut PartitionEntry| {
                if let Some(i) = e.installed.as_mut() {
                    i.complete_at_ms.get_or_insert(now_ms);
                }
                Ok(())
            })
            .await?;
            marked.push(p);
        }
        Ok(marked)
    }

    /// Places the partitions of every `creating` table on the nodes that serve it; what a new
    /// leader runs, and then periodically.
    pub async fn complete_creating_tables(&self, nodes: &[NodeInfo]) -> Result<usize, MetaError> {
        let mut done = 0;
        for (name, info) in self.list_tables().await? {
            let able: Vec<String> = nodes
                .iter()
                .filter(|n| n.serves(&name))
                .map(|n| n.name.clone())
                .collect();
            if info.state == TableState::Creating && !able.is_empty() {
                self.place_partitions(&name, &able).await?;
                done += 1;
            }
        }
        Ok(done)
    }

    /// Sets a table's state (e.g. `read_only` while fenced for failover). A table still
    /// `creating` keeps that state until its partitions are placed.
    pub async fn set_table_state(
        &self,
        name: &str,
        state: TableState,
    ) -> Result<TableInfo, MetaError> {
        if state == TableState::Creating {
            return Err(MetaError::Invalid(format!(
                "table {name} cannot be set to creating; use available, read_only or demoted"
            )));
        }
        self.update_table(name, |t| {
            if t.state == TableState::Creating {
                return Err(MetaError::Conflict(format!(
                    "table {name} is still creating (its partitions are not all placed); \
                     register nodes and retry when it is available"
                )));
            }
            t.state = state;
            Ok(())
        })
        .await
    }

    /// Drops a table, its partition table, its failover record and its nodes' state answers.
    /// Refused while the table has duplications: remove
    /// them first, so that no shipper is left reading a table that is gone.
    pub async fn drop_table(&self, name: &str) -> Result<(), MetaError> {
        known_table(name)?;
        let table_key = self.keys().table(name);
        let dups_prefix = self.keys().dups(name);
        for _ in 0..CAS_ATTEMPTS {
            let kv = self
                .get(table_key.clone())
                .await?
                .ok_or_else(|| MetaError::NoSuchTable(name.into()))?;
            let dups = self.list_dups(name).await?;
            if !dups.is_empty() {
                let ids: Vec<String> = dups.iter().map(|(id, _)| id.to_string()).collect();
                return Err(MetaError::Conflict(format!(
                    "table {name} still has duplication(s) {}; remove them first with `ferry dup remove -t {name} -d DUPID`",
                    ids.join(", ")
                )));
            }
            let ok = self
                .cas(
                    vec![
                        unchanged(&table_key, Some(&kv)),
                        // No dup was added since we looked.
                        Compare::version(dups_prefix.clone(), CompareOp::Equal, 0).with_prefix(),
                    ],
                    vec![
                        TxnOp::delete(table_key.clone(), None),
                        TxnOp::delete(
                            self.keys().partitions(name),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        ),
                        // What failovers left: a table made again under this name starts fresh.
                        TxnOp::delete(self.keys().failover(name), None),
                        TxnOp::delete(self.keys().checked(name), None),
                        TxnOp::delete(
                            self.keys().state_acks(name),
                            Some(etcd_client::DeleteOptions::new().with_prefix()),
                        ),
                    ],
                )
                .await?;
            if ok {
                return Ok(());
            }
        }
        Err(MetaError::Contended { key: table_key })
    }

    /// Read-modify-write of a table with compare-and-swap.
    pub async fn update_table(
        &self,
        name: &str,
        change: impl FnMut(&mut TableInfo) -> Result<(), MetaError>,
    ) -> Result<TableInfo, MetaError> {
        known_table(name)?;
        self.update_json(&self.keys().table(name), change)
            .await?
            .ok_or_else(|| MetaError::NoSuchTable(name.into()))
    }
}
