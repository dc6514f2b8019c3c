//! Full duplication, prepare phase (`DS_PREPARE`), on the source node.
//!
//! For every full dup of the table in `DS_PREPARE`, each local partition makes its checkpoint at
//! once (an idle or empty partition too: nothing waits for a periodic checkpoint), keeps it under
//! `<partition>/checkpoints/dup-<dupid>/` until the install is complete, and publishes its
//! manifest in etcd (`dups/<table>/<dupid>/checkpoint/<p>`). The plog is held from the
//! checkpoint's decree on (see `cluster::gc_plogs`), so shipping can start right after it.
//!
//! Every step survives a kill -9: a checkpoint made but not yet published is verified and
//! published; a half-made one fails verification, is deleted and made again; a published one
//! never changes (etcd keeps the first). Checkpoints of dups that are gone are deleted.
//!
//! A re-bootstrap (the shipper found the log collected past what the dup confirmed, see
//! `dups/<table>/<dupid>/rebootstrap/<p>`) gets its fresh checkpoint here too, in
//! `checkpoints/rebootstrap-<dupid>-<generation>/`, recorded in the re-bootstrap record and kept
//! until the re-bootstrap is done.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use tokio_util::sync::CancellationToken;

use ferry_engine::partition::Partition;
use ferry_log::layout::{db_dir, Layout, REBOOTSTRAP_PREFIX};
use ferry_meta::status::DupStatus;
use ferry_meta::{DupCheckpoint, MetaStore, RebootstrapState};
use ferry_proto::{CheckpointManifest, DupId};

use crate::Node;

/// How often the dups are looked at.
const POLL: Duration = Duration::from_millis(500);
/// RocksDB's file naming a database: the lineage of its checkpoint files.
const IDENTITY_FILE: &str = "IDENTITY";

/// Makes and publishes the checkpoints of full dups in `DS_PREPARE` until cancelled. etcd being
/// away only delays it. Cancellation-safe.
pub async fn run(meta: MetaStore, node: Arc<Node>, node_name: String, cancel: CancellationToken) {
    loop {
        if let Err(e) = once(&meta, &node, &node_name).await {
            tracing::warn!(error = %format!("{e:#}"), "full-dup checkpoints: will retry");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn once(meta: &MetaStore, node: &Node, node_name: &str) -> anyhow::Result<()> {
    let table = node.table.name();
    let layout = Layout::new(&node.config.data_dir);
    let dups = meta.list_dups(table).await.map_err(|e| anyhow!("{e}"))?;
    for (dupid, _) in dups.iter().filter(|(_, d)| d.status == DupStatus::Prepare) {
        for partition in node.table.partitions() {
            let p = partition.id();
            let published = meta
                .checkpoint(table, *dupid, p)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            if published.is_some() {
                continue;
            }
            let dir = layout.dup_checkpoint(table, p, *dupid);
            let started = Instant::now();
            let manifest = make_or_reuse(partition, &dir).await?;
            let lineage = lineage(&layout.partition(table, p))?;
            let record = DupCheckpoint {
                manifest,
                lineage,
                node: node_name.to_string(),
                made_at_ms: ferry_engine::clock::wall_ms(),
                catch_up_to: None,
                install_complete_at_ms: None,
                extra: Default::default(),
            };
            let kept = meta
                .publish_checkpoint(table, *dupid, p, &record)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            tracing::info!(
                dupid = dupid.0,
                partition = p.0,
                decree = kept.manifest.decree.0,
                files = kept.manifest.files.len(),
                bytes = kept.manifest.total_bytes(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "full dup: checkpoint published"
            );
        }
    }
    let count = node.table.partition_count();
    let live_rebootstraps = rebootstraps(meta, node, node_name, &dups).await?;
    // A kept checkpoint is deleted once its dup is gone or its install-complete event fired,
    // on the blocking pool.
    let mut keep: Vec<(PathBuf, Vec<DupId>)> = node
        .table
        .partitions()
        .iter()
        .map(|p| (layout.checkpoints(table, p.id()), Vec::new()))
        .collect();
    for (dupid, d) in dups.iter().filter(|(_, d)| d.status != DupStatus::Removed) {
        let records = match d.status {
            DupStatus::Log | DupStatus::Pause => meta
                .checkpoints(table, *dupid, count)
                .await
                .map_err(|e| anyhow!("{e}"))?,
            _ => Vec::new(),
        };
        for (i, (_, live)) in keep.iter_mut().enumerate() {
            let complete = records
                .get(i)
                .and_then(Option::as_ref)
                .is_some_and(|c| c.install_complete_at_ms.is_some());
            if !complete {
                live.push(*dupid);
            }
        }
    }
    tokio::task::spawn_blocking(move || {
        delete_unless_live(&keep)?;
        let dirs: Vec<PathBuf> = keep.into_iter().map(|(dir, _)| dir).collect();
        delete_rebootstraps_unless(&dirs, &live_rebootstraps)
    })
    .await?
}

/// Makes the checkpoint of every re-bootstrap a shipper requested (its log was collected past
/// what the dup confirmed) and records it. Returns the re-bootstrap checkpoint directories still
/// needed.
async fn rebootstraps(
    meta: &MetaStore,
    node: &Node,
    node_name: &str,
    dups: &[(DupId, ferry_meta::DupInfo)],
) -> anyhow::Result<Vec<PathBuf>> {
    let table = node.table.name();
    let layout = Layout::new(&node.config.data_dir);
    let mut live = Vec::new();
    for (dupid, _) in dups.iter().filter(|(_, d)| d.status != DupStatus::Removed) {
        let records = meta
            .rebootstraps(table, *dupid, node.table.partition_count())
            .await
            .map_err(|e| anyhow!("{e}"))?;
        for (partition, r) in node.table.partitions().iter().zip(records) {
            let Some(r) = r.filter(|r| r.is_open()) else {
                continue;
            };
            let p = partition.id();
            let dir = layout.dup_rebootstrap(table, p, *dupid, r.generation);
            live.push(dir.clone());
            if r.state != RebootstrapState::Requested {
                continue;
            }
            let manifest = make_or_reuse(partition, &dir).await?;
            let record = DupCheckpoint {
                manifest,
                lineage: lineage(&layout.partition(table, p))?,
                node: node_name.to_string(),
                made_at_ms: ferry_engine::clock::wall_ms(),
                catch_up_to: None,
                install_complete_at_ms: None,
                extra: Default::default(),
            };
            let (decree, files) = (record.manifest.decree, record.manifest.files.len());
            meta.update_rebootstrap(table, *dupid, p, |x| {
                if x.generation == r.generation && x.state == RebootstrapState::Requested {
                    x.state = RebootstrapState::Checkpointed;
                    x.checkpoint = Some(record.clone());
                }
                Ok(())
            })
            .await
            .map_err(|e| anyhow!("{e}"))?;
            tracing::info!(
                dupid = dupid.0,
                partition = p.0,
                generation = r.generation,
                decree = decree.0,
                files,
                "re-bootstrap: fresh checkpoint made"
            );
        }
    }
    Ok(live)
}

/// The checkpoint in `dir` if a previous run made it whole, else a new one (what a crash left
/// half-made is deleted first).
async fn make_or_reuse(partition: &Partition, dir: &Path) -> anyhow::Result<CheckpointManifest> {
    let d = dir.to_path_buf();
    if let Some(m) = tokio::task::spawn_blocking(move || reuse_or_clear(&d)).await?? {
        return Ok(m);
    }
    partition
        .checkpoint(dir.to_path_buf())
        .await
        .with_context(|| format!("make the checkpoint {}", dir.display()))
}

/// The whole checkpoint a previous run left in `dir`, if any; otherwise `dir` is cleared (what a
/// crash left half-made is deleted) and its parent made. Blocking.
fn reuse_or_clear(dir: &Path) -> anyhow::Result<Option<CheckpointManifest>> {
    if dir.exists() {
        match ferry_engine::checkpoint::verify(dir) {
            Ok(m) => return Ok(Some(m)),
            Err(e) => {
                tracing::info!(dir = %dir.display(), reason = %e, "an unfinished checkpoint is made again");
                std::fs::remove_dir_all(dir).with_context(|| {
                    format!("delete the unfinished checkpoint {}", dir.display())
                })?;
            }
        }
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    Ok(None)
}

/// Deletes the re-bootstrap checkpoints under each of `dirs` that are not in `live` (done, or
/// their dup is gone). Blocking.
fn delete_rebootstraps_unless(dirs: &[PathBuf], live: &[PathBuf]) -> anyhow::Result<()> {
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("list {}", dir.display()))?;
            let path = entry.path();
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(REBOOTSTRAP_PREFIX));
            if ours && !live.contains(&path) {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("delete the checkpoint {}", path.display()))?;
                tracing::info!(dir = %path.display(),
                    "re-bootstrap checkpoint deleted (the re-bootstrap is done, or its dup was removed)");
            }
        }
    }
    Ok(())
}

/// Deletes the kept checkpoints under each directory whose dup is not in its list. Blocking.
fn delete_unless_live(dirs: &[(PathBuf, Vec<DupId>)]) -> anyhow::Result<()> {
    for (dir, live) in dirs {
        for (dupid, kept) in kept_checkpoints(dir)? {
            if !live.contains(&dupid) {
                std::fs::remove_dir_all(&kept)
                    .with_context(|| format!("delete the checkpoint {}", kept.display()))?;
                tracing::info!(dupid = dupid.0, dir = %kept.display(),
                    "kept checkpoint deleted (its install is complete, or its dup was removed)");
            }
        }
    }
    Ok(())
}

/// The partition database's identity, which names the lineage of its files.
fn lineage(partition_dir: &Path) -> anyhow::Result<String> {
    let path = db_dir(partition_dir).join(IDENTITY_FILE);
    let id = std::fs::read_to_string(&path)
        .with_context(|| format!("read the database identity {}", path.display()))?;
    Ok(id.trim().to_string())
}

/// The `dup-<id>` directories under `dir`.
fn kept_checkpoints(dir: &Path) -> anyhow::Result<Vec<(DupId, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("dup-"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push((DupId(id), entry.path()));
    }
    Ok(out)
}
