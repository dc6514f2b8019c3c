//! Re-bootstrap, target side: applies a source partition's fresh checkpoint to the serving
//! partitions (see the shipper's `rebootstrap` module for the whole flow).
//!
//! The receiver stages the checkpoint in `<table>/.staging/<cid>-<sp>/`. A staged checkpoint
//! whose decree is past what a local partition holds from that source (its progress, or its
//! inbox) is applied here: the entries that hash to the partition go in, last-writer-wins
//! against what it holds, the progress for the source becomes the checkpoint's decree, and the
//! source's inbox restarts right after it. Until every partition's inbox is there, the receiver
//! refuses log sessions from that source, so nothing is appended in between. Then the staged
//! copy is deleted.
//!
//! Crash safety: a `REBOOTSTRAP` marker is written into the staging directory before the first
//! change, and the directory is deleted only after the last; applying again is harmless, so an
//! interrupted apply is simply done again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use ferry_engine::partition::Partition;
use ferry_log::layout::{Layout, STAGING_DIR};
use ferry_log::plog::Committed;
use ferry_proto::{ClusterId, Decree, PartitionId, Source};

use crate::Node;

/// How often the staging directory is looked at.
const POLL: Duration = Duration::from_secs(1);
/// Bytes of entries per RocksDB batch.
const CHUNK_BYTES: usize = 4 << 20;
/// Marks a staged checkpoint whose apply began.
const MARKER: &str = "REBOOTSTRAP";
/// The nominal size of a restarted inbox's first segment (as an install's).
const INBOX_SEGMENT_BYTES: u64 = 64 << 20;

/// Applies staged re-bootstrap checkpoints until cancelled. Cancellation-safe.
pub async fn run(node: Arc<Node>, cancel: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        match once(&node).await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::error!(error = %format!("{e:#}"), "cannot apply a re-bootstrap checkpoint; retrying");
                }
                failing = true;
            }
        }
    }
}

async fn once(node: &Node) -> anyhow::Result<()> {
    let root = Layout::new(&node.config.data_dir)
        .table(node.table.name())
        .join(STAGING_DIR);
    let staged = tokio::task::spawn_blocking(move || staged(&root)).await??;
    for (source, dir, decree) in staged {
        let behind = {
            let mut behind = Vec::new();
            for p in node.table.partitions() {
                if holds(p, source)? < decree {
                    behind.push(p.clone());
                }
            }
            behind
        };
        let marked = dir.join(MARKER).exists();
        if behind.is_empty() {
            if marked {
                // Applied, then interrupted before the staged copy went.
                remove(dir).await?;
            }
            continue;
        }
        tracing::info!(
            source_cluster = source.cluster.get(),
            source_partition = source.partition.0,
            decree = decree.0,
            partitions = behind.len(),
            "re-bootstrap: applying a fresh checkpoint"
        );
        let marker = dir.join(MARKER);
        tokio::task::spawn_blocking(move || std::fs::write(&marker, b""))
            .await?
            .context("write the re-bootstrap marker")?;
        let count = node.table.partition_count();
        let mut applied = 0;
        for p in &behind {
            applied += apply(p, count, source, &dir, decree).await?;
        }
        node.inbox_resets
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::info!(
            source_cluster = source.cluster.get(),
            source_partition = source.partition.0,
            decree = decree.0,
            entries = applied,
            "re-bootstrap: checkpoint applied; the log resumes after it"
        );
        remove(dir).await?;
    }
    Ok(())
}

/// The finished staged checkpoints: (source, directory, decree). Blocking.
fn staged(root: &Path) -> anyhow::Result<Vec<(Source, PathBuf, Decree)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("list {}", root.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("list {}", root.display()))?;
        let Some(source) = entry.file_name().to_str().and_then(parse_source) else {
            continue;
        };
        let dir = entry.path();
        if let Some(m) = ferry_log::staging::staged_manifest(&dir)? {
            out.push((source, dir, m.decree));
        }
    }
    Ok(out)
}

/// `<cid>-<sp>`.
fn parse_source(name: &str) -> Option<Source> {
    let (c, p) = name.split_once('-')?;
    Some(Source {
        cluster: ClusterId::new(c.parse().ok()?)?,
        partition: PartitionId(p.parse().ok()?),
    })
}

/// How far partition `p` holds `source`'s writes: the lesser of its applied progress and its
/// inbox's committed decree.
fn holds(p: &Partition, source: Source) -> anyhow::Result<Decree> {
    let progress = p.dup_progress(source)?;
    let inbox = Committed::read(&ferry_log::inbox::inbox_dir(p.dir(), source))?
        .map_or(Decree::ZERO, |c| c.decree);
    Ok(progress.min(inbox))
}

/// Applies the checkpoint's entries of partition `p`, then restarts its inbox of `source` after
/// `decree`. Returns the entries taken.
async fn apply(
    p: &Arc<Partition>,
    count: u32,
    source: Source,
    dir: &Path,
    decree: Decree,
) -> anyhow::Result<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let (d, id) = (dir.to_path_buf(), p.id());
    let reader = tokio::task::spawn_blocking(move || {
        ferry_engine::install::read_entries(&d, id, count, CHUNK_BYTES, |chunk| {
            tx.blocking_send(chunk).is_ok()
        })
    });
    let mut taken = 0;
    while let Some(chunk) = rx.recv().await {
        taken += chunk.len() as u64;
        p.apply_checkpoint(source, chunk, None).await?;
    }
    reader.await??;
    p.apply_checkpoint(source, Vec::new(), Some(decree)).await?;
    let pdir = p.dir().to_path_buf();
    tokio::task::spawn_blocking(move || {
        ferry_log::inbox::start_after(&pdir, source, decree, INBOX_SEGMENT_BYTES)
    })
    .await??;
    Ok(taken)
}

async fn remove(dir: PathBuf) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
        .await?
        .context("delete the applied re-bootstrap checkpoint")
}
