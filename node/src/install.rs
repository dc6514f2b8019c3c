//! A node hosting a follower table (the target of a full duplication) before it serves: it
//! waits until the receiver has staged every source partition's checkpoint, builds each of its
//! partitions from them ([`ferry_engine::install`]), records the install in etcd (the table
//! becomes `available` when every partition has), and only then opens the table.
//!
//! Meanwhile the client port is open and answers every command with Redis's retryable
//! `-LOADING` error, naming the table and how far the copy is, so a client is never served from
//! a half-installed partition and knows to retry. An install interrupted by a crash starts again
//! on the next start (the partition is rebuilt from the staged files, which stay until the
//! install is complete).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use bytes::BytesMut;
use ferry_engine::install::{self, SourceCheckpoint};
use ferry_log::layout::Layout;
use ferry_meta::tables::Assignment;
use ferry_meta::{Follower, Installed, MetaStore, TableState};
use ferry_proto::{ClusterId, Decree, PartitionId, Source};
use ferry_resp::RequestCodec;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;

/// How often the staging directories and etcd are looked at.
const POLL: Duration = Duration::from_millis(300);

/// How waiting for a follower table's install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every partition is installed and the table is `available`: open it.
    Installed,
    /// The table was dropped meanwhile (its staged checkpoints are deleted): wait for it again.
    Dropped,
    /// Shutdown came first.
    Stopped,
}

/// Waits for the staged checkpoints and installs every partition of the follower table `a`
/// (see the module docs).
pub async fn until_installed(
    config: &NodeConfig,
    meta: &MetaStore,
    a: &Assignment,
    follower: &Follower,
    shutdown: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let follower = follower.clone();
    let table = &config.table;
    let cluster = ClusterId::new(follower.source_cluster_id).ok_or_else(|| {
        anyhow!(
            "table `{table}` names source cluster id {}, which is not in 1..=127",
            follower.source_cluster_id
        )
    })?;
    let status = Arc::new(Mutex::new(format!(
        "table {table} is being filled from a full duplication of {}.{}; retry later",
        follower.source_cluster, follower.source_table
    )));
    let loading = CancellationToken::new();
    let port = match TcpListener::bind(config.resp_addr).await {
        Ok(l) => Some(tokio::spawn(loading_port(
            l,
            status.clone(),
            loading.clone(),
        ))),
        Err(e) => {
            tracing::warn!(addr = %config.resp_addr, error = %e,
                "cannot open the client port while installing; clients get connection refused until the table opens");
            None
        }
    };
    let outcome = install_loop(config, meta, a, follower, cluster, &status, shutdown).await;
    // The port is closed before the caller opens the table's own on the same address.
    loading.cancel();
    if let Some(port) = port {
        let _ = port.await;
    }
    outcome
}

/// The waiting and installing of [`until_installed`], while the `-LOADING` port answers.
async fn install_loop(
    config: &NodeConfig,
    meta: &MetaStore,
    a: &Assignment,
    mut follower: Follower,
    cluster: ClusterId,
    status: &Mutex<String>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let table = &config.table;
    let layout = Layout::new(&config.data_dir);
    let opts = config.partition_options()?;
    let mut staged: BTreeMap<u32, SourceCheckpoint> = BTreeMap::new();
    let mut said = (usize::MAX, usize::MAX);
    tracing::info!(%table, source = %follower.source_cluster, dupid = %follower.dupid,
        source_partitions = follower.source_partitions, partitions = a.info.partition_count,
        "follower table: waiting for the source's checkpoints before opening");
    loop {
        // Which source checkpoints are staged whole (verified once each).
        for sp in 0..follower.source_partitions {
            if staged.contains_key(&sp) {
                continue;
            }
            let source = Source {
                cluster,
                partition: PartitionId(sp),
            };
            let dir = layout.staging(table, source);
            if !dir.join(ferry_proto::checkpoint::MANIFEST_FILE).exists() {
                continue;
            }
            let d = dir.clone();
            let expected = follower.decrees.get(sp as usize).copied();
            match tokio::task::spawn_blocking(move || ferry_engine::checkpoint::verify(&d)).await? {
                Ok(m) if expected.is_some_and(|e| e != m.decree) => {
                    tracing::debug!(partition = sp, staged = m.decree.0, "a staged checkpoint of another decree (an earlier dup's) waits to be replaced");
                }
                Ok(m) => {
                    staged.insert(
                        sp,
                        SourceCheckpoint {
                            source,
                            dir,
                            decree: m.decree,
                        },
                    );
                }
                Err(e) => tracing::warn!(error = %e, "a staged checkpoint does not verify yet"),
            }
        }
        let desc = match meta.describe_table(table).await {
            Ok(d) => d,
            Err(ferry_meta::MetaError::NoSuchTable(_)) => {
                // Dropped before it was installed: what was staged for it is abandoned.
                let dir = layout.table(table).join(ferry_log::layout::STAGING_DIR);
                tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                })
                .await??;
                tracing::info!(%table, "the follower table was dropped before its install; its staged checkpoints are deleted");
                return Ok(Outcome::Dropped);
            }
            Err(e) => return Err(anyhow!("{e}")),
        };
        // Another dup of the same source took the table over: only its checkpoints count.
        match &desc.info.follower {
            Some(f) if *f != follower => {
                tracing::info!(%table, dupid = %f.dupid, "the follower table was taken over by a new dup; installing from its checkpoints");
                follower = f.clone();
                staged.clear();
            }
            Some(_) => {}
            None => return Ok(Outcome::Installed),
        }
        let installed = desc
            .partitions
            .iter()
            .filter(|e| e.as_ref().is_some_and(|e| e.installed.is_some()))
            .count();
        if said != (staged.len(), installed) {
            said = (staged.len(), installed);
            *status.lock() = format!(
                "table {table} is being filled from a full duplication of {}.{}: {} of {} \
                 source checkpoints staged, {installed} of {} partitions installed; retry later",
                follower.source_cluster,
                follower.source_table,
                staged.len(),
                follower.source_partitions,
                a.info.partition_count
            );
            tracing::info!(
                staged = staged.len(),
                of = follower.source_partitions,
                installed,
                partitions = a.info.partition_count,
                "follower table install progress"
            );
        }
        if desc.info.state != TableState::Creating {
            return Ok(Outcome::Installed);
        }
        if staged.len() as u32 == follower.source_partitions {
            let sources: Vec<SourceCheckpoint> = staged.values().cloned().collect();
            for p in &a.partitions {
                let entry = desc.partitions.get(p.0 as usize).cloned().flatten();
                if entry.is_some_and(|e| e.installed.is_some()) {
                    continue;
                }
                let pdir = layout.partition(table, *p);
                // Built again unless etcd records it: a build of an earlier, removed dup (or
                // one that crashed before it was recorded) is not trusted.
                {
                    let (srcs, count, retention, pp) = (
                        sources.clone(),
                        a.info.partition_count,
                        opts.tombstone_retention,
                        *p,
                    );
                    let d = pdir.clone();
                    let report = tokio::task::spawn_blocking(move || {
                        install::install(&d, pp, count, &srcs, retention, 64 << 20)
                    })
                    .await?
                    .map_err(|e| anyhow!("cannot install partition {p} of table `{table}`: {e}"))?;
                    tracing::info!(
                        partition = p.0,
                        opened_directly = report.opened_directly,
                        keys = report.keys,
                        sst_bytes = report.sst_bytes,
                        "partition installed from the source's checkpoints"
                    );
                }
                let decrees: Vec<Decree> = sources.iter().map(|s| s.decree).collect();
                meta.mark_installed(
                    table,
                    *p,
                    Installed {
                        at_ms: ferry_meta::now_ms(),
                        decrees,
                        complete_at_ms: None,
                    },
                )
                .await
                .map_err(|e| anyhow!("{e}"))?;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Outcome::Stopped),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Answers every command with `-LOADING <status>` until `stop`.
async fn loading_port(listener: TcpListener, status: Arc<Mutex<String>>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut socket, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut codec = RequestCodec::default();
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                let read = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = socket.read_buf(&mut buf) => r,
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let mut out = Vec::new();
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(_)) => {
                            let line = status.lock().replace(['\r', '\n'], " ");
                            out.extend_from_slice(format!("-LOADING {line}\r\n").as_bytes());
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
                if socket.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Once the install-complete event is recorded for every partition of the follower table
/// (the source's coordinator reports it when every source partition caught up), deletes the
/// staged checkpoints; until then they stay, so a re-install needs nothing sent again. Ends
/// when there is nothing (left) to delete, or at `cancel`.
pub async fn clean_staging(meta: MetaStore, config: NodeConfig, cancel: CancellationToken) {
    let layout = Layout::new(&config.data_dir);
    loop {
        match staging_to_delete(&meta, &config.table).await {
            Ok(Some(dirs)) => {
                let dirs: Vec<_> = dirs
                    .into_iter()
                    .map(|s| layout.staging(&config.table, s))
                    .filter(|d| d.exists())
                    .collect();
                let n = dirs.len();
                let deleted = tokio::task::spawn_blocking(move || {
                    dirs.iter().try_for_each(std::fs::remove_dir_all)
                })
                .await;
                match deleted {
                    Ok(Ok(())) => {
                        if n > 0 {
                            tracing::info!(table = %config.table, checkpoints = n,
                                "install complete: the staged checkpoints are deleted");
                        }
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot delete the staged checkpoints; retrying")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the staging cleanup thread failed; retrying")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "read the table for the staging cleanup"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The source partitions whose staged checkpoints may go: all of them once every partition
/// recorded the install-complete event; none while one has not. A table that is not a
/// follower has none (`Some(vec![])`).
async fn staging_to_delete(
    meta: &MetaStore,
    table: &str,
) -> Result<Option<Vec<Source>>, ferry_meta::MetaError> {
    let desc = meta.describe_table(table).await?;
    let Some(f) = &desc.info.follower else {
        return Ok(Some(Vec::new()));
    };
    let complete = desc.partitions.iter().all(|e| {
        e.as_ref()
            .and_then(|e| e.installed.as_ref())
            .is_some_and(|i| i.complete_at_ms.is_some())
    });
    let Some(cluster) = ClusterId::new(f.source_cluster_id) else {
        return Ok(Some(Vec::new()));
    };
    Ok(complete.then(|| {
        (0..f.source_partitions)
            .map(|p| Source {
                cluster,
                partition: PartitionId(p),
            })
            .collect()
    }))
}
