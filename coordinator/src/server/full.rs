//! The leader's part in full duplications (`ferry dup add --full`), run every reconcile round:
//!
//! - `DS_PREPARE`: once every source partition's node has published its checkpoint, ask the
//!   remote cluster's coordinator to create the follower table (`creating`, filled from the
//!   checkpoints), then move the dup to `DS_APP`: the shippers send the checkpoints;
//! - `DS_APP`: once the remote table is `available` (every target partition installed), set each
//!   partition's progress to its checkpoint's decree and move the dup to `DS_LOG`: the shippers
//!   ship the log from right after the checkpoints.
//!
//! - `DS_LOG`: per source partition, the install-complete event once the target confirmed
//!   everything committed when log shipping began (`catch_up_to`, recorded from the first
//!   progress a shipper wrote in `DS_LOG`); when every partition's has fired, the remote
//!   coordinator records it on its side too. The source node then deletes its kept checkpoints,
//!   the target node its staged ones.
//!
//! Every step is idempotent and persisted in etcd, so a leader that dies in the middle is
//! replaced by one that repeats the step; asking the remote side twice answers the same table.

use std::collections::HashMap;

use axum::http::StatusCode;
use ferry_admin::api::{FollowTable, InstallComplete, TableDetail};
use ferry_admin::client::ClientError;
use ferry_meta::status::{DupEvent, DupStatus};
use ferry_meta::{now_ms, DupInfo, DupMode, Follower, MetaError, MetaStore, TableState};
use ferry_proto::{DupId, PartitionId};

use super::failover::remote;
use super::http::ApiError;
use super::metrics::Metrics;
use crate::config::CoordinatorConfig;

/// What the last round could not do, per dup, so each distinct reason is logged once.
#[derive(Default)]
pub struct Stalls(HashMap<(String, DupId), String>);

impl Stalls {
    /// Every dup's current reason.
    pub fn snapshot(&self) -> HashMap<(String, DupId), String> {
        self.0.clone()
    }

    fn note(&mut self, table: &str, dupid: DupId, why: Option<String>) {
        let key = (table.to_owned(), dupid);
        match why {
            Some(w) => {
                if self.0.get(&key) != Some(&w) {
                    tracing::warn!(%table, %dupid, reason = %w, "full dup waits");
                    self.0.insert(key, w);
                }
            }
            None => {
                self.0.remove(&key);
            }
        }
    }
}

/// One round over every full dup.
pub async fn advance(
    config: &CoordinatorConfig,
    metrics: &Metrics,
    meta: &MetaStore,
    stalls: &mut Stalls,
) -> Result<(), MetaError> {
    for (table, dupid, info) in meta.all_dups().await? {
        if info.mode != DupMode::Full {
            continue;
        }
        let why = match info.status {
            DupStatus::Prepare => prepare_to_app(config, meta, &table, dupid, &info).await?,
            DupStatus::App => app_to_log(config, meta, &table, dupid, &info).await?,
            DupStatus::Log => install_complete(config, metrics, meta, &table, dupid, &info).await?,
            _ => None,
        };
        stalls.note(&table, dupid, why);
    }
    Ok(())
}

/// The install-complete events of a full dup in `DS_LOG`; `Some(reason)` while the target
/// side has not recorded them yet.
async fn install_complete(
    config: &CoordinatorConfig,
    metrics: &Metrics,
    meta: &MetaStore,
    table: &str,
    dupid: DupId,
    info: &DupInfo,
) -> Result<Option<String>, MetaError> {
    if info.extra.get(DupInfo::TARGET_INSTALL_COMPLETE).is_some() {
        return Ok(None);
    }
    let started = info
        .extra
        .get("log_started_at_ms")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let t = meta.table(table).await?;
    let checkpoints = meta.checkpoints(table, dupid, t.partition_count).await?;
    let mut complete = 0;
    for (p, cp) in checkpoints.iter().enumerate() {
        let p = PartitionId(p as u32);
        let Some(cp) = cp else { continue };
        if cp.install_complete_at_ms.is_some() {
            complete += 1;
            continue;
        }
        // Only what a shipper wrote in DS_LOG counts (the coordinator wrote the first one).
        let Some(progress) = meta.progress(table, dupid, p).await? else {
            continue;
        };
        if progress.updated_at_ms <= started {
            continue;
        }
        let catch_up_to = cp.catch_up_to.unwrap_or(progress.committed_decree);
        let done = progress.confirmed_decree >= catch_up_to;
        let now = now_ms();
        let updated = meta
            .update_checkpoint(table, dupid, p, |c| {
                c.catch_up_to.get_or_insert(catch_up_to);
                if done {
                    c.install_complete_at_ms.get_or_insert(now);
                }
                Ok(())
            })
            .await?;
        if done && updated.is_some() {
            complete += 1;
            metrics.install_complete("source", 1);
            tracing::info!(%table, %dupid, partition = p.0, decree = cp.manifest.decree.0,
                caught_up_to = catch_up_to.0, "install complete: the target installed the checkpoint and caught up with the log");
        }
    }
    if complete < checkpoints.len() {
        return Ok(Some(format!(
            "{complete} of {} partitions caught up after the install",
            checkpoints.len()
        )));
    }
    let client = match remote(config, &info.remote) {
        Ok(c) => c,
        Err(e) => return Ok(Some(e)),
    };
    let req = InstallComplete {
        source_cluster: config.cluster.name.clone(),
        dupid,
    };
    let path = format!("/v1/tables/{}/install_complete", info.remote_table);
    if let Err(e) = client.post::<_, TableDetail>(&path, &req).await {
        return Ok(Some(format!(
            "cluster {} did not record the install-complete event: {e}",
            info.remote
        )));
    }
    let now = now_ms();
    meta.update_dup_extra(table, dupid, DupInfo::TARGET_INSTALL_COMPLETE, now.into())
        .await?;
    tracing::info!(%table, %dupid, remote = %info.remote, "install complete on both sides");
    Ok(None)
}

/// `DS_PREPARE → DS_APP`; `Some(reason)` while it cannot happen yet.
async fn prepare_to_app(
    config: &CoordinatorConfig,
    meta: &MetaStore,
    table: &str,
    dupid: DupId,
    info: &DupInfo,
) -> Result<Option<String>, MetaError> {
    let t = meta.table(table).await?;
    let checkpoints = meta.checkpoints(table, dupid, t.partition_count).await?;
    let missing = checkpoints.iter().filter(|c| c.is_none()).count();
    if missing > 0 {
        return Ok(Some(format!(
            "{missing} of {} partitions have not published their checkpoint yet",
            t.partition_count
        )));
    }
    let client = match remote(config, &info.remote) {
        Ok(c) => c,
        Err(e) => return Ok(Some(e)),
    };
    let partitions = info
        .extra
        .get("remote_partitions")
        .and_then(serde_json::Value::as_u64)
        .map_or(t.partition_count, |n| n as u32);
    let req = FollowTable {
        partitions,
        follower: Follower {
            source_cluster: config.cluster.name.clone(),
            source_cluster_id: config.cluster.id,
            source_table: table.to_owned(),
            dupid,
            source_partitions: t.partition_count,
            decrees: checkpoints
                .iter()
                .flatten()
                .map(|c| c.manifest.decree)
                .collect(),
        },
    };
    let path = format!("/v1/tables/{}/follow", info.remote_table);
    if let Err(e) = client.post::<_, TableDetail>(&path, &req).await {
        return Ok(Some(format!(
            "cluster {} did not create the follower table `{}`: {e}",
            info.remote, info.remote_table
        )));
    }
    meta.apply_dup_event(table, dupid, DupEvent::Apply).await?;
    tracing::info!(%table, %dupid, remote = %info.remote, partitions = t.partition_count,
        remote_partitions = partitions, "every checkpoint is made and the follower table exists: DS_APP");
    Ok(None)
}

/// `DS_APP → DS_LOG`; `Some(reason)` while it cannot happen yet.
async fn app_to_log(
    config: &CoordinatorConfig,
    meta: &MetaStore,
    table: &str,
    dupid: DupId,
    info: &DupInfo,
) -> Result<Option<String>, MetaError> {
    let client = match remote(config, &info.remote) {
        Ok(c) => c,
        Err(e) => return Ok(Some(e)),
    };
    let path = format!("/v1/tables/{}", info.remote_table);
    let desc: TableDetail = match client.get(&path).await {
        Ok(d) => d,
        Err(e) => {
            return Ok(Some(format!(
                "cannot read table `{}` on cluster {}: {e}",
                info.remote_table, info.remote
            )))
        }
    };
    let ours = desc
        .info
        .follower
        .as_ref()
        .is_some_and(|f| f.dupid == dupid && f.source_cluster == config.cluster.name);
    if !ours {
        return Ok(Some(format!(
            "table `{}` on cluster {} is not the follower of this dup",
            info.remote_table, info.remote
        )));
    }
    if desc.info.state != TableState::Available {
        let installed = desc
            .partitions
            .iter()
            .filter(|e| e.as_ref().is_some_and(|e| e.installed.is_some()))
            .count();
        return Ok(Some(format!(
            "the target is installing the checkpoints: {installed} of {} partitions installed",
            desc.partitions.len()
        )));
    }
    let t = meta.table(table).await?;
    meta.start_log_after_checkpoints(table, dupid, t.partition_count, now_ms())
        .await?;
    tracing::info!(%table, %dupid, remote = %info.remote,
        "the target installed every checkpoint: DS_LOG, shipping the log after each checkpoint");
    Ok(None)
}

/// Refuses a full dup whose target table already exists on the remote cluster: a full dup
/// creates its own target table.
pub async fn check_remote_table_absent(
    config: &CoordinatorConfig,
    cluster: &str,
    table: &str,
) -> Result<(), ApiError> {
    let client = remote(config, cluster).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    match client.get::<TableDetail>(&format!("/v1/tables/{table}")).await {
        Err(ClientError::NotFound(_)) => Ok(()),
        // Left `creating` by a removed full dup of this very table: the new dup takes it over
        // and reuses what is staged there.
        Ok(desc)
            if desc.info.state == TableState::Creating
                && desc.info.follower.as_ref().is_some_and(|f| {
                    f.source_cluster == config.cluster.name && f.source_table == table
                }) =>
        {
            Ok(())
        }
        Ok(desc) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "cluster {cluster} already has a table `{table}` ({}, {} partitions); a full \
                 duplication creates its own target table, so drop that table there first, or \
                 add the dup without --full to ship only the writes from now on",
                desc.info.state, desc.info.partition_count
            ),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot check table `{table}` on cluster {cluster}: {e}; retry when its coordinator answers"),
        )),
    }
}
