//! Duplications: add, list, status changes through [`crate::status::transition`], fail mode,
//! remove, and per-partition progress.
//!
//! Every change reads the dup, computes the new value, and writes it back only if the dup's
//! `mod_revision` is unchanged; a lost race re-reads and re-decides. So two operators pausing and
//! removing at once are applied one after the other, each judged against the status the other
//! left.

use etcd_client::{Compare, CompareOp, DeleteOptions, KeyValue, TxnOp};
use serde_json::Map;

use ferry_proto::{Decree, DupId, PartitionId};

use crate::keys::Keys;
use crate::status::{transition, DupEvent, DupStatus, FailMode};
use crate::{
    decode, encode, known_table, unchanged, DupCheckpoint, DupInfo, DupMode, MetaError, MetaStore,
    Progress, Rebootstrap, RebootstrapState, TableState, Transfer, CAS_ATTEMPTS,
};

/// What a new dup is checked against: the clusters it may go to.
#[derive(Debug, Clone)]
pub struct DupPolicy<'a> {
    /// This cluster's name (a dup to itself is refused).
    pub local_cluster: &'a str,
    /// Names in the duplication group.
    pub duplication_group: Vec<&'a str>,
    /// Names in the configured remote clusters.
    pub remote_clusters: Vec<&'a str>,
}

impl DupPolicy<'_> {
    /// Refuses a remote that is not both in the duplication group and a configured remote.
    pub fn check_remote(&self, table: &str, remote: &str) -> Result<(), MetaError> {
        if remote == self.local_cluster {
            return Err(MetaError::Invalid(format!(
                "cannot duplicate table {table} of cluster {remote} to itself; name a remote cluster"
            )));
        }
        if !self.duplication_group.contains(&remote) {
            return Err(MetaError::Invalid(format!(
                "cluster {remote} is not in the duplication group ({}); add it to cluster.duplication_group on every process of both clusters first",
                self.duplication_group.join(", ")
            )));
        }
        if !self.remote_clusters.contains(&remote) {
            return Err(MetaError::Invalid(format!(
                "cluster {remote} is not a configured remote cluster ({}); add it to [remote_clusters] in the coordinator config first",
                if self.remote_clusters.is_empty() { "none configured".to_string() } else { self.remote_clusters.join(", ") }
            )));
        }
        Ok(())
    }
}

impl MetaStore {
    /// The dups of a table, oldest first. [`MetaError::NoSuchTable`] if the table is unknown.
    pub async fn list_dups(&self, table: &str) -> Result<Vec<(DupId, DupInfo)>, MetaError> {
        known_table(table)?;
        let prefix = self.keys().dups(table);
        let mut out = Vec::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            if let Some(id) = Keys::leaf(kv.key(), &prefix).and_then(|s| s.parse::<u64>().ok()) {
                out.push((DupId(id), decode(&kv)?));
            }
        }
        if out.is_empty() {
            // Tell an empty list from a typo in the table's name.
            self.table(table).await?;
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// The table's dup to cluster `remote` that is not removed, if any.
    pub async fn live_dup_to(
        &self,
        table: &str,
        remote: &str,
    ) -> Result<Option<(DupId, DupInfo)>, MetaError> {
        Ok(self
            .list_dups(table)
            .await?
            .into_iter()
            .find(|(_, d)| d.remote == remote && d.status != DupStatus::Removed))
    }

    /// Every dup of every table, for status and metrics.
    pub async fn all_dups(&self) -> Result<Vec<(String, DupId, DupInfo)>, MetaError> {
        let prefix = self.keys().all_dups();
        let mut out = Vec::new();
        for kv in self.get_prefix(prefix.clone()).await? {
            let Some(rest) = kv.key().strip_prefix(prefix.as_bytes()) else {
                continue;
            };
            let rest = String::from_utf8_lossy(rest);
            let mut parts = rest.split('/');
            if let (Some(t), Some(id), None) = (parts.next(), parts.next(), parts.next()) {
                if let Ok(id) = id.parse::<u64>() {
                    out.push((t.to_owned(), DupId(id), decode(&kv)?));
                }
            }
        }
        Ok(out)
    }

    /// One dup.
    pub async fn dup(&self, table: &str, dupid: DupId) -> Result<DupInfo, MetaError> {
        let (_, info) = self.dup_kv(table, dupid).await?;
        Ok(info)
    }

    /// Adds a dup of `table` to `remote`. The dupid is the creation time in seconds, bumped past
    /// the last dupid handed out, so dupids are unique and increasing in the cluster. A full dup
    /// is recorded in `DS_PREPARE`, an incremental one in `DS_LOG`.
    pub async fn add_dup(
        &self,
        table: &str,
        remote: &str,
        mode: DupMode,
        policy: &DupPolicy<'_>,
        now_ms: u64,
    ) -> Result<(DupId, DupInfo), MetaError> {
        self.add_dup_with(table, remote, mode, policy, Map::new(), None, now_ms)
            .await
    }

    /// Adds an incremental dup of `table` to `remote` that ships from right after `decrees`
    /// (each partition's, in order), written in the same transaction as its progress, whatever
    /// the table's state but `creating`: what a failover's `--reverse` leaves behind, from the
    /// decrees before the table took its first write.
    pub async fn add_dup_from(
        &self,
        table: &str,
        remote: &str,
        policy: &DupPolicy<'_>,
        decrees: &[Decree],
        now_ms: u64,
    ) -> Result<DupId, MetaError> {
        let (dupid, _) = self
            .add_dup_with(
                table,
                remote,
                DupMode::Incremental,
                policy,
                Map::new(),
                Some(decrees),
                now_ms,
            )
            .await?;
        Ok(dupid)
    }

    /// [`MetaStore::add_dup`] with extra fields stored in the dup (a full dup's options) and,
    /// with `start`, its progress on every partition, in one compare-and-swap (the dupid
    /// sequence, the table and the absence of the dup key are checked). Without `start` the
    /// table must be `available`.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_dup_with(
        &self,
        table: &str,
        remote: &str,
        mode: DupMode,
        policy: &DupPolicy<'_>,
        extra: Map<String, serde_json::Value>,
        start: Option<&[Decree]>,
        now_ms: u64,
    ) -> Result<(DupId, DupInfo), MetaError> {
        known_table(table)?;
        policy.check_remote(table, remote)?;
        let table_key = self.keys().table(table);
        let seq_key = self.keys().dupid_seq();
        let event = match mode {
            DupMode::Full => DupEvent::Prepare,
            DupMode::Incremental => DupEvent::Log,
        };
        // Decided by the pure machine, so an add obeys the same rules as every other change.
        let status =
            transition(DupStatus::Init, event).map_err(|e| MetaError::Invalid(e.to_string()))?;
        for _ in 0..CAS_ATTEMPTS {
            let table_kv = self
                .get(table_key.clone())
                .await?
                .ok_or_else(|| MetaError::NoSuchTable(table.into()))?;
            let info: crate::TableInfo = decode(&table_kv)?;
            match start {
                None if info.state != TableState::Available => {
                    return Err(MetaError::Conflict(format!(
                        "table {table} is {}; a dup can only be added to an available table",
                        info.state
                    )));
                }
                Some(_) if info.state == TableState::Creating => {
                    return Err(MetaError::Conflict(format!(
                        "table {table} is still creating; no dup can start from it yet"
                    )));
                }
                Some(d) if d.len() != info.partition_count as usize => {
                    return Err(MetaError::Invalid(format!(
                        "table {table} has {} partitions but {} start decrees were given",
                        info.partition_count,
                        d.len()
                    )));
                }
                _ => {}
            }
            if let Some((id, _)) = self
                .list_dups(table)
                .await?
                .into_iter()
                .find(|(_, d)| d.remote == remote && d.status != DupStatus::Removed)
            {
                return Err(MetaError::Conflict(format!(
                    "table {table} already has dup {id} to cluster {remote}; remove it first to add another"
                )));
            }
            let seq = self.get(seq_key.clone()).await?;
            let last: u64 = match &seq {
                Some(kv) => decode(kv)?,
                None => 0,
            };
            let dupid = DupId((now_ms / 1000).max(last + 1));
            let dup_key = self.keys().dup(table, dupid);
            let dup = DupInfo {
                remote: remote.into(),
                status,
                create_timestamp_ms: now_ms,
                fail_mode: FailMode::Slow,
                mode,
                remote_table: table.into(),
                extra: extra.clone(),
            };
            let mut ops = vec![
                TxnOp::put(seq_key.clone(), encode(&dupid.0), None),
                TxnOp::put(dup_key.clone(), encode(&dup), None),
            ];
            for (p, d) in start.unwrap_or_default().iter().enumerate() {
                let progress = Progress {
                    confirmed_decree: *d,
                    last_confirmed_timestamp_ms: 0,
                    committed_decree: *d,
                    updated_at_ms: now_ms,
                    last_error: None,
                    extra: Map::new(),
                };
                ops.push(TxnOp::put(
                    self.keys().progress(table, dupid, PartitionId(p as u32)),
                    encode(&progress),
                    None,
                ));
            }
            let ok = self
                .cas(
                    vec![
                        unchanged(&seq_key, seq.as_ref()),
                        unchanged(&table_key, Some(&table_kv)),
                        Compare::version(dup_key, CompareOp::Equal, 0),
                    ],
                    ops,
                )
                .await?;
            if ok {
                return Ok((dupid, dup));
            }
        }
        Err(MetaError::Contended { key: seq_key })
    }

    /// Applies a status event (pause, start, ...) through the status machine. A repeated event
    /// is a no-op; [`DupEvent::Remove`] deletes the dup's subtree (see [`MetaStore::remove_dup`]).
    pub async fn apply_dup_event(
        &self,
        table: &str,
        dupid: DupId,
        event: DupEvent,
    ) -> Result<DupInfo, MetaError> {
        if event == DupEvent::Remove {
            let mut info = self.remove_dup(table, dupid).await?;
            info.status = DupStatus::Removed;
            return Ok(info);
        }
        self.update_dup(table, dupid, |d| {
            d.status = transition(d.status, event).map_err(|e| MetaError::IllegalTransition {
                table: table.into(),
                dupid,
                from: e.from,
                event: e.event,
            })?;
            Ok(())
        })
        .await
    }

    /// Sets the fail mode of a dup that is not removed.
    pub async fn set_fail_mode(
        &self,
        table: &str,
        dupid: DupId,
        mode: FailMode,
    ) -> Result<DupInfo, MetaError> {
        self.update_dup(table, dupid, |d| {
            if d.status == DupStatus::Removed {
                return Err(MetaError::Conflict(format!(
                    "dup {dupid} of table {table} is in DS_REMOVED; its fail mode cannot change"
                )));
            }
            d.fail_mode = mode;
            Ok(())
        })
        .await
    }

    /// Deletes a dup and its subtree (progress, checkpoints) in one transaction. Returns the
    /// dup as it was.
    pub async fn remove_dup(&self, table: &str, dupid: DupId) -> Result<DupInfo, MetaError> {
        let key = self.keys().dup(table, dupid);
        for _ in 0..CAS_ATTEMPTS {
            let (kv, info) = self.dup_kv(table, dupid).await?;
            let ok = self
                .cas(
                    vec![unchanged(&key, Some(&kv))],
                    vec![
                        TxnOp::delete(key.clone(), None),
                        TxnOp::delete(
                            self.keys().dup_subtree(table, dupid),
                            Some(DeleteOptions::new().with_prefix()),
                        ),
                    ],
                )
                .await?;
            if ok {
                return Ok(info);
            }
        }
        Err(MetaError::Contended { key })
    }

    /// A full dup's checkpoint of one partition, once its node has published it.
    pub async fn checkpoint(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
    ) -> Result<Option<DupCheckpoint>, MetaError> {
        match self.get(self.keys().checkpoint(table, dupid, p)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Publishes a partition's checkpoint for a full dup, once: if one is published already,
    /// that one stays and is returned (a node that restarted in the middle cannot enter the
    /// phase twice with another result). Fails if the dup was removed meanwhile.
    pub async fn publish_checkpoint(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
        checkpoint: &DupCheckpoint,
    ) -> Result<DupCheckpoint, MetaError> {
        known_table(table)?;
        let key = self.keys().checkpoint(table, dupid, p);
        for _ in 0..CAS_ATTEMPTS {
            if let Some(kv) = self.get(key.clone()).await? {
                return decode(&kv);
            }
            if self
                .put_while_dup(table, dupid, &key, None, encode(checkpoint))
                .await?
            {
                return Ok(checkpoint.clone());
            }
        }
        Err(MetaError::Contended { key })
    }

    /// Puts `value` at `key` if it is still `seen` (`None`: absent) and the dup exists: true if
    /// written, false if another writer changed `key` first (read again and retry).
    async fn put_while_dup(
        &self,
        table: &str,
        dupid: DupId,
        key: &str,
        seen: Option<&KeyValue>,
        value: Vec<u8>,
    ) -> Result<bool, MetaError> {
        let dup_key = self.keys().dup(table, dupid);
        let ok = self
            .cas(
                vec![
                    unchanged(key, seen),
                    Compare::version(dup_key.clone(), CompareOp::Greater, 0),
                ],
                vec![TxnOp::put(key, value, None)],
            )
            .await?;
        if !ok && self.get(dup_key).await?.is_none() {
            return Err(MetaError::NoSuchDup {
                table: table.into(),
                dupid,
            });
        }
        Ok(ok)
    }

    /// Every partition's published checkpoint of a full dup, by partition; `None` where the
    /// node has not published one yet.
    pub async fn checkpoints(
        &self,
        table: &str,
        dupid: DupId,
        partition_count: u32,
    ) -> Result<Vec<Option<DupCheckpoint>>, MetaError> {
        self.per_partition(table, dupid, "checkpoint", partition_count)
            .await
    }

    /// The records `dups/<table>/<dupid>/<kind>/<p>`, by partition; `None` where there is none.
    async fn per_partition<T: serde::de::DeserializeOwned + Clone>(
        &self,
        table: &str,
        dupid: DupId,
        kind: &str,
        partition_count: u32,
    ) -> Result<Vec<Option<T>>, MetaError> {
        let mut out = vec![None; partition_count as usize];
        let prefix = format!("{}{kind}/", self.keys().dup_subtree(table, dupid));
        for kv in self.get_prefix(prefix.clone()).await? {
            let Some(p) = Keys::leaf(kv.key(), &prefix).and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            if let Some(slot) = out.get_mut(p) {
                *slot = Some(decode(&kv)?);
            }
        }
        Ok(out)
    }

    /// `DS_APP → DS_LOG` once the target installed the checkpoints: first every partition's
    /// progress is set to its checkpoint's decree (never backwards), so shipping starts right
    /// after what the checkpoint holds, then the status moves. A leader that dies between the
    /// two steps leaves the dup in `DS_APP`, and the next one repeats both.
    pub async fn start_log_after_checkpoints(
        &self,
        table: &str,
        dupid: DupId,
        partition_count: u32,
        now_ms: u64,
    ) -> Result<DupInfo, MetaError> {
        let info = self.dup(table, dupid).await?;
        if info.status != DupStatus::App {
            return Err(MetaError::IllegalTransition {
                table: table.into(),
                dupid,
                from: info.status,
                event: DupEvent::Log,
            });
        }
        let checkpoints = self.checkpoints(table, dupid, partition_count).await?;
        for (p, cp) in checkpoints.iter().enumerate() {
            let Some(cp) = cp else {
                return Err(MetaError::Conflict(format!(
                    "dup {dupid} of table {table} has no checkpoint of partition {p}; it cannot \
                     start shipping the log"
                )));
            };
            let progress = Progress {
                confirmed_decree: cp.manifest.decree,
                last_confirmed_timestamp_ms: cp.made_at_ms,
                committed_decree: cp.manifest.decree,
                updated_at_ms: now_ms,
                last_error: None,
                extra: Map::new(),
            };
            self.advance_progress(table, dupid, PartitionId(p as u32), &progress)
                .await?;
        }
        self.update_dup(table, dupid, |d| {
            let to =
                transition(d.status, DupEvent::Log).map_err(|e| MetaError::IllegalTransition {
                    table: table.into(),
                    dupid,
                    from: e.from,
                    event: e.event,
                })?;
            if d.status != to {
                d.status = to;
                d.extra.insert("log_started_at_ms".into(), now_ms.into());
            }
            Ok(())
        })
        .await
    }

    /// Sets one extra field of a dup (a full dup's bookkeeping, its rate limit).
    pub async fn update_dup_extra(
        &self,
        table: &str,
        dupid: DupId,
        field: &str,
        value: serde_json::Value,
    ) -> Result<DupInfo, MetaError> {
        self.update_dup(table, dupid, |d| {
            d.extra.insert(field.to_owned(), value.clone());
            Ok(())
        })
        .await
    }

    /// Read-modify-write of a full dup's published checkpoint record (the coordinator's
    /// catch-up mark and install-complete event). `None` if there is none.
    pub async fn update_checkpoint(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
        change: impl FnMut(&mut DupCheckpoint) -> Result<(), MetaError>,
    ) -> Result<Option<DupCheckpoint>, MetaError> {
        known_table(table)?;
        self.update_json(&self.keys().checkpoint(table, dupid, p), change)
            .await
    }

    /// Records a partition's checkpoint transfer progress (the shipper, about once a second).
    /// Fails if the dup was removed meanwhile.
    pub async fn put_transfer(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
        transfer: &Transfer,
    ) -> Result<(), MetaError> {
        known_table(table)?;
        let ok = self
            .cas(
                vec![Compare::version(
                    self.keys().dup(table, dupid),
                    CompareOp::Greater,
                    0,
                )],
                vec![TxnOp::put(
                    self.keys().transfer(table, dupid, p),
                    encode(transfer),
                    None,
                )],
            )
            .await?;
        if ok {
            Ok(())
        } else {
            Err(MetaError::NoSuchDup {
                table: table.into(),
                dupid,
            })
        }
    }

    /// A partition's re-bootstrap record, if it ever needed one.
    pub async fn rebootstrap(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
    ) -> Result<Option<Rebootstrap>, MetaError> {
        known_table(table)?;
        match self.get(self.keys().rebootstrap(table, dupid, p)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Every partition's re-bootstrap record; `None` where there is none.
    pub async fn rebootstraps(
        &self,
        table: &str,
        dupid: DupId,
        partition_count: u32,
    ) -> Result<Vec<Option<Rebootstrap>>, MetaError> {
        self.per_partition(table, dupid, "rebootstrap", partition_count)
            .await
    }

    /// Asks for a re-bootstrap of partition `p` (the shipper, when the log is gone): a new
    /// generation if the last one is done or there is none, else the open one as it is.
    /// Fails if the dup was removed.
    pub async fn request_rebootstrap(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
        confirmed: Decree,
        reason: &str,
    ) -> Result<Rebootstrap, MetaError> {
        known_table(table)?;
        let key = self.keys().rebootstrap(table, dupid, p);
        for _ in 0..CAS_ATTEMPTS {
            let old = self.get(key.clone()).await?;
            let last: Option<Rebootstrap> = old.as_ref().map(decode).transpose()?;
            if let Some(open) = last.as_ref().filter(|r| r.is_open()) {
                return Ok(open.clone());
            }
            let record = Rebootstrap {
                generation: last.map_or(1, |r| r.generation + 1),
                state: RebootstrapState::Requested,
                reason: reason.to_owned(),
                confirmed,
                requested_at_ms: crate::now_ms(),
                checkpoint: None,
                done_at_ms: None,
                extra: Default::default(),
            };
            if self
                .put_while_dup(table, dupid, &key, old.as_ref(), encode(&record))
                .await?
            {
                return Ok(record);
            }
        }
        Err(MetaError::Contended { key })
    }

    /// Read-modify-write of a re-bootstrap record; `None` if there is none.
    pub async fn update_rebootstrap(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
        change: impl FnMut(&mut Rebootstrap) -> Result<(), MetaError>,
    ) -> Result<Option<Rebootstrap>, MetaError> {
        known_table(table)?;
        self.update_json(&self.keys().rebootstrap(table, dupid, p), change)
            .await
    }

    /// Every partition's transfer record of a full dup; `None` where none was written.
    pub async fn transfers(
        &self,
        table: &str,
        dupid: DupId,
        partition_count: u32,
    ) -> Result<Vec<Option<Transfer>>, MetaError> {
        self.per_partition(table, dupid, "transfer", partition_count)
            .await
    }

    /// A dup's progress on one partition, if a shipper has written any.
    pub async fn progress(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
    ) -> Result<Option<Progress>, MetaError> {
        match self.get(self.keys().progress(table, dupid, p)).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Advances a dup's confirmed decree on one partition. The decree never goes backwards (an
    /// older value is ignored); at an equal decree the other fields (committed decree, time)
    /// are refreshed. The write fails if the dup was removed meanwhile.
    pub async fn advance_progress(
        &self,
        table: &str,
        dupid: DupId,
        p: PartitionId,
        progress: &Progress,
    ) -> Result<Progress, MetaError> {
        known_table(table)?;
        let key = self.keys().progress(table, dupid, p);
        for _ in 0..CAS_ATTEMPTS {
            let old = self.get(key.clone()).await?;
            let mut progress = progress.clone();
            if let Some(kv) = &old {
                let stored: Progress = decode(kv)?;
                // Fields a newer writer added are kept.
                for (k, v) in &stored.extra {
                    progress.extra.entry(k.clone()).or_insert_with(|| v.clone());
                }
                if stored.confirmed_decree > progress.confirmed_decree || stored == progress {
                    return Ok(stored);
                }
            }
            if self
                .put_while_dup(table, dupid, &key, old.as_ref(), encode(&progress))
                .await?
            {
                return Ok(progress);
            }
        }
        Err(MetaError::Contended { key })
    }

    /// Read-modify-write of one dup with compare-and-swap.
    async fn update_dup(
        &self,
        table: &str,
        dupid: DupId,
        change: impl FnMut(&mut DupInfo) -> Result<(), MetaError>,
    ) -> Result<DupInfo, MetaError> {
        known_table(table)?;
        match self
            .update_json(&self.keys().dup(table, dupid), change)
            .await?
        {
            Some(info) => Ok(info),
            None => Err(self.no_such_dup(table, dupid).await),
        }
    }

    async fn dup_kv(&self, table: &str, dupid: DupId) -> Result<(KeyValue, DupInfo), MetaError> {
        known_table(table)?;
        match self.get(self.keys().dup(table, dupid)).await? {
            Some(kv) => {
                let info = decode(&kv)?;
                Ok((kv, info))
            }
            None => Err(self.no_such_dup(table, dupid).await),
        }
    }

    /// The error for a missing dup: an unknown table, or an unknown dup of a known table.
    async fn no_such_dup(&self, table: &str, dupid: DupId) -> MetaError {
        match self.table(table).await {
            Ok(_) => MetaError::NoSuchDup {
                table: table.into(),
                dupid,
            },
            Err(e) => e,
        }
    }
}
