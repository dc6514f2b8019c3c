//! The shipper process: start-up, and the reconcile loop that keeps one partition task per
//! (table, dup in `DS_LOG` or `DS_APP`, local partition).
//!
//! Start-up, each stage visible on `/health`: `loading_config` → `connecting_etcd` →
//! `checking_config` (refuses to start on a mismatch with the cluster's stored config) →
//! `running`. The HTTP server starts first so the stage can be watched.
//!
//! The reconcile loop reads this node's partitions (`assignments`) and every dup, every
//! `reconcile_interval` and whenever a dup key changes (an etcd watch), then starts and stops
//! partition tasks. Paused dups get no task, but their progress, pending mutations and plog
//! retention are still reported (from etcd and the plog). A full dup gets its tasks in `DS_APP`
//! (they send the checkpoint, then ship the log); in `DS_PREPARE` it is only logged.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use etcd_client::WatchOptions;
use ferry_log::plog::{list_segments, PlogReader};
use ferry_meta::status::DupStatus;
use ferry_meta::{self as meta, DupInfo, MetaError, MetaStore};
use ferry_proto::{ClusterId, Decree, DupId, PartitionId};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::ShipperConfig;
use crate::metrics::{labels, Metrics};
use crate::quic::Quic;
use crate::status::{Board, Entry, Key, State};
use crate::tail::{self, CommitWatcher};
use crate::task;
use ferry_dup::lag;

/// How far start-up has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    LoadingConfig,
    ConnectingEtcd,
    CheckingConfig,
    Running,
}

impl Stage {
    /// The name shown on `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::LoadingConfig => "loading_config",
            Stage::ConnectingEtcd => "connecting_etcd",
            Stage::CheckingConfig => "checking_config",
            Stage::Running => "running",
        }
    }
}

/// What every task and handler of the process shares.
pub struct Shared {
    pub config: ShipperConfig,
    pub meta: MetaStore,
    pub metrics: Metrics,
    pub board: Board,
    pub quic: Quic,
    pub watcher: CommitWatcher,
    pub cluster_id: ClusterId,
    state: Mutex<ProcState>,
}

#[derive(Default)]
struct ProcState {
    stage: Option<Stage>,
    etcd_error: Option<String>,
}

impl Shared {
    /// Builds the shared state (QUIC endpoint, certificates, etcd client). Fails on what no
    /// retry can fix: unreadable certificates, a socket that cannot be bound.
    pub async fn new(config: ShipperConfig) -> anyhow::Result<Arc<Shared>> {
        let cluster_id = ClusterId::new(config.cluster.id)
            .context("cluster.id must be in 1..=127 (validate the config first)")?;
        let meta = MetaStore::connect(
            &config.etcd.endpoints,
            &config.cluster.name,
            config.shipper.etcd_timeout,
        )
        .await
        .context("create the etcd client")?;
        let quic = Quic::new(&config)?;
        Ok(Arc::new(Shared {
            config,
            meta,
            metrics: Metrics::new(),
            board: Board::default(),
            quic,
            watcher: CommitWatcher::new(),
            cluster_id,
            state: Mutex::new(ProcState::default()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plog directory of a local partition: `<data_dir>/<table>/<p>/plog`.
    pub fn plog_dir(&self, table: &str, p: PartitionId) -> PathBuf {
        self.config
            .shipper
            .data_dir
            .join(table)
            .join(p.0.to_string())
            .join("plog")
    }

    pub fn reach(&self, stage: Stage) {
        tracing::info!(stage = stage.as_str(), "start-up");
        self.lock().stage = Some(stage);
    }

    pub fn stage(&self) -> Stage {
        self.lock().stage.unwrap_or(Stage::LoadingConfig)
    }

    /// Notes an etcd failure (for `/health`), or recovery with `None`.
    pub fn etcd_status(&self, err: Option<&MetaError>) {
        self.lock().etcd_error = err.map(|e| e.to_string());
    }

    pub fn etcd_error(&self) -> Option<String> {
        self.lock().etcd_error.clone()
    }
}

/// Runs a shipper until `cancel` fires. Returns an error only for what retrying cannot fix (the
/// HTTP address is taken, the certificates cannot be loaded, the config differs from the
/// cluster's).
pub async fn run(config: ShipperConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let http_addr = config.shipper.http_addr;
    let shared = Shared::new(config).await?;
    shared.reach(Stage::LoadingConfig);
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("listen on {http_addr} (shipper.http_addr)"))?;
    let server = tokio::spawn(crate::http::serve(listener, shared.clone(), cancel.clone()));

    shared.reach(Stage::ConnectingEtcd);
    let mut backoff = Duration::from_millis(100);
    loop {
        match shared.meta.ping().await {
            Ok(()) => break,
            Err(e) => {
                if shared.etcd_error().is_none() {
                    tracing::warn!(error = %e, "waiting for etcd");
                }
                shared.etcd_status(Some(&e));
            }
        }
        if sleep_or_cancel(&cancel, backoff).await {
            let _ = server.await;
            return Ok(());
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    shared.etcd_status(None);

    shared.reach(Stage::CheckingConfig);
    loop {
        match meta::check_cluster_config(&shared.meta, &shared.config.cluster).await {
            Ok(()) => break,
            Err(e @ (MetaError::Unavailable { .. } | MetaError::ConfigMissing(_))) => {
                if shared.etcd_error().as_deref() != Some(&e.to_string()) {
                    tracing::warn!(error = %e, "cannot check the cluster config yet; retrying");
                }
                shared.etcd_status(Some(&e));
            }
            Err(e) => {
                cancel.cancel();
                let _ = server.await;
                return Err(e)
                    .context("check this shipper's [cluster] config against the cluster's");
            }
        }
        if sleep_or_cancel(&cancel, Duration::from_secs(1)).await {
            let _ = server.await;
            return Ok(());
        }
    }
    shared.etcd_status(None);

    shared.reach(Stage::Running);
    reconcile_loop(&shared, &cancel).await;
    shared.quic.close().await;
    let _ = server.await;
    Ok(())
}

struct Running {
    cancel: CancellationToken,
    dup: watch::Sender<DupInfo>,
    handle: tokio::task::JoinHandle<()>,
}

/// What one reconcile wants.
#[derive(Debug, Default, PartialEq)]
pub struct Wanted {
    /// Partitions to ship, with their dup and table id.
    pub ship: HashMap<Key, (DupInfo, u32)>,
    /// Partitions of paused dups (reported, not shipped).
    pub paused: HashMap<Key, (DupInfo, u32)>,
    /// Full dups still making their checkpoints (`DS_PREPARE`): nothing to send yet.
    pub full: Vec<(String, DupId, DupStatus)>,
}

/// From this node's assignments and every dup, what to ship. Pure.
pub fn wanted(
    assignments: &[meta::tables::Assignment],
    dups: &[(String, DupId, DupInfo)],
) -> Wanted {
    let mut w = Wanted::default();
    for (table, dupid, info) in dups {
        let Some(a) = assignments.iter().find(|a| &a.table == table) else {
            continue;
        };
        let target = match info.status {
            DupStatus::Log | DupStatus::App => &mut w.ship,
            DupStatus::Pause => &mut w.paused,
            DupStatus::Init | DupStatus::Prepare => {
                w.full.push((table.clone(), *dupid, info.status));
                continue;
            }
            DupStatus::Removed => continue,
        };
        for p in &a.partitions {
            target.insert(
                Key {
                    table: table.clone(),
                    dupid: *dupid,
                    partition: *p,
                },
                (info.clone(), a.info.id),
            );
        }
    }
    w
}

async fn reconcile_loop(shared: &Arc<Shared>, cancel: &CancellationToken) {
    let wake = Arc::new(Notify::new());
    let watcher = tokio::spawn(watch_dups(shared.clone(), wake.clone(), cancel.clone()));
    let mut tasks: HashMap<Key, Running> = HashMap::new();
    // Cancelled tasks until they have ended: a partition's next task starts only after its
    // last one wrote its final progress and resigned, so two never run for one partition.
    let mut stopping: HashMap<Key, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut logged_full: HashSet<(String, DupId)> = HashSet::new();
    let mut warned_retention: HashSet<Key> = HashSet::new();
    loop {
        match reconcile(shared, &mut tasks, &mut stopping, &mut logged_full, cancel).await {
            Ok(()) => shared.etcd_status(None),
            Err(e) => {
                if shared.etcd_error().is_none() {
                    tracing::warn!(error = %e, "cannot read dups and assignments; keeping the running tasks");
                }
                shared.etcd_status(Some(&e));
            }
        }
        retention(shared, &mut warned_retention).await;
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(shared.config.shipper.reconcile_interval) => {}
        }
    }
    for (k, t) in tasks.drain() {
        t.cancel.cancel();
        stopping.insert(k, t.handle);
    }
    for (_, handle) in stopping.drain() {
        // Each task resigns its election and writes its last progress.
        let _ = tokio::time::timeout(Duration::from_secs(5), handle).await;
    }
    watcher.abort();
}

async fn reconcile(
    shared: &Arc<Shared>,
    tasks: &mut HashMap<Key, Running>,
    stopping: &mut HashMap<Key, tokio::task::JoinHandle<()>>,
    logged_full: &mut HashSet<(String, DupId)>,
    cancel: &CancellationToken,
) -> Result<(), MetaError> {
    let assignments = shared.meta.assignments(&shared.config.shipper.node).await?;
    let dups = shared.meta.all_dups().await?;
    let w = wanted(&assignments, &dups);
    for (table, dupid, status) in &w.full {
        if logged_full.insert((table.clone(), *dupid)) {
            tracing::info!(%table, %dupid, status = status.as_str(), "full dup: waiting for every partition's checkpoint before sending them (DS_APP)");
        }
    }

    // Stop tasks whose dup left DS_LOG or went away, or whose partition moved.
    stopping.retain(|_, h| !h.is_finished());
    let stop: Vec<Key> = tasks
        .iter()
        .filter(|(k, t)| !w.ship.contains_key(*k) || t.handle.is_finished())
        .map(|(k, _)| k.clone())
        .collect();
    for k in stop {
        if let Some(t) = tasks.remove(&k) {
            t.cancel.cancel();
            tracing::info!(table = %k.table, dupid = %k.dupid, partition = k.partition.0, "stopping the partition task");
            if !t.handle.is_finished() {
                stopping.insert(k, t.handle);
            }
        }
    }
    for (k, (info, appid)) in &w.ship {
        shared.board.update(
            k,
            || Entry::new(*appid, &info.remote, &info.remote_table, State::Campaigning),
            |e| {
                e.dup_status = info.status.as_str().into();
                e.fail_mode = fail_mode_name(info);
                if e.state == State::Paused {
                    e.state = State::Campaigning;
                }
            },
        );
        match tasks.get(k) {
            Some(t) => {
                t.dup.send_if_modified(|d| {
                    let changed = d != info;
                    *d = info.clone();
                    changed
                });
            }
            // The last task of this partition is still writing its final progress: start the
            // next one at the next reconcile.
            None if stopping.contains_key(k) => {}
            None => {
                let (tx, rx) = watch::channel(info.clone());
                let token = cancel.child_token();
                let handle = tokio::spawn(task::run(shared.clone(), k.clone(), rx, token.clone()));
                tracing::info!(table = %k.table, dupid = %k.dupid, partition = k.partition.0, remote = %info.remote, "starting the partition task");
                tasks.insert(
                    k.clone(),
                    Running {
                        cancel: token,
                        dup: tx,
                        handle,
                    },
                );
            }
        }
    }
    for (k, (info, appid)) in &w.paused {
        let progress = shared.meta.progress(&k.table, k.dupid, k.partition).await?;
        shared.board.update(
            k,
            || Entry::new(*appid, &info.remote, &info.remote_table, State::Paused),
            |e| {
                e.state = State::Paused;
                e.dup_status = info.status.as_str().into();
                e.fail_mode = fail_mode_name(info);
                e.fencing_token = None;
                if let Some(p) = &progress {
                    e.confirmed = e.confirmed.max(p.confirmed_decree);
                }
            },
        );
    }
    for k in shared.board.keys() {
        if !w.ship.contains_key(&k) && !w.paused.contains_key(&k) {
            shared.board.remove(&k);
            shared
                .metrics
                .forget(&labels(&k.table, k.dupid, k.partition));
        }
    }
    Ok(())
}

fn fail_mode_name(info: &DupInfo) -> String {
    serde_json::to_value(info.fail_mode)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Refreshes every reported partition's committed decree and plog retention from the files,
/// and warns once when a partition keeps more than `plog_retention_warn_bytes` for a dup.
async fn retention(shared: &Arc<Shared>, warned: &mut HashSet<Key>) {
    let limit = shared.config.shipper.plog_retention_warn_bytes;
    for k in shared.board.keys() {
        let Some(e) = shared.board.get(&k) else {
            continue;
        };
        let dir = shared.plog_dir(&k.table, k.partition);
        let confirmed = e.confirmed;
        let paused = e.state == State::Paused;
        let scan = tokio::task::spawn_blocking(move || scan_plog(&dir, confirmed, paused)).await;
        let Ok(Some(scan)) = scan else {
            continue;
        };
        shared.board.with(&k, |e| {
            e.committed = e.committed.max(scan.committed);
            e.committed_time_us = e.committed_time_us.max(scan.committed_time_us);
            e.retained_bytes = scan.retained;
            if e.state == State::Paused {
                e.oldest_unconfirmed_us = scan.next_record_us;
            }
        });
        if scan.retained > limit {
            if warned.insert(k.clone()) {
                tracing::warn!(table = %k.table, dupid = %k.dupid, partition = k.partition.0,
                    retained_bytes = scan.retained, limit, paused,
                    "the plog kept for this dup exceeds plog_retention_warn_bytes; resume or remove the dup, or fix its shipping, before the disk fills");
            }
        } else {
            warned.remove(&k);
        }
    }
}

struct PlogScan {
    committed: Decree,
    committed_time_us: u64,
    retained: u64,
    /// Commit time of the record after `confirmed` (only looked up for paused dups).
    next_record_us: Option<u64>,
}

fn scan_plog(dir: &std::path::Path, confirmed: Decree, next_record: bool) -> Option<PlogScan> {
    let c = tail::committed(dir).ok()?;
    let segs = list_segments(dir).ok()?;
    let sized: Vec<(Decree, u64)> = segs
        .iter()
        .map(|s| {
            (
                s.first_decree,
                std::fs::metadata(&s.path).map_or(0, |m| m.len()),
            )
        })
        .collect();
    let next_record_us = if next_record && c.decree > confirmed {
        PlogReader::new(dir, confirmed.next())
            .read(c.decree, 1)
            .ok()
            .and_then(|r| r.first().map(|r| r.timetag.timestamp_us()))
    } else {
        None
    };
    Some(PlogScan {
        committed: c.decree,
        committed_time_us: c.commit_time_us,
        retained: lag::retained_bytes(&sized, confirmed, c.decree),
        next_record_us,
    })
}

/// Wakes the reconcile loop when a dup key (not its progress or checkpoint subtree) changes.
/// Reconnects with a backoff after etcd errors; the periodic reconcile covers the gaps.
async fn watch_dups(shared: Arc<Shared>, wake: Arc<Notify>, cancel: CancellationToken) {
    let prefix = shared.meta.keys().all_dups();
    loop {
        let mut client = shared.meta.client();
        let watched = tokio::time::timeout(
            shared.meta.timeout(),
            client.watch(prefix.clone(), Some(WatchOptions::new().with_prefix())),
        )
        .await;
        if let Ok(Ok(mut stream)) = watched {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    msg = stream.message() => match msg {
                        Ok(Some(resp)) => {
                            let dup_changed = resp.events().iter().any(|ev| {
                                ev.kv().is_some_and(|kv| is_dup_key(kv.key(), &prefix))
                            });
                            if dup_changed {
                                wake.notify_one();
                            }
                        }
                        _ => break,
                    },
                }
            }
        }
        if sleep_or_cancel(&cancel, Duration::from_secs(1)).await {
            return;
        }
    }
}

/// `<prefix><table>/<dupid>` exactly (not `.../progress/<p>`).
fn is_dup_key(key: &[u8], prefix: &str) -> bool {
    key.strip_prefix(prefix.as_bytes())
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .is_some_and(|rest| rest.split('/').count() == 2)
}

async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use ferry_meta::status::FailMode;
    use ferry_meta::tables::Assignment;
    use ferry_meta::{DupMode, TableInfo, TableState};
    use serde_json::Map;

    use super::*;

    fn dup(status: DupStatus) -> DupInfo {
        DupInfo {
            remote: "tj".into(),
            status,
            create_timestamp_ms: 1,
            fail_mode: FailMode::Slow,
            mode: DupMode::Incremental,
            remote_table: "users".into(),
            extra: Map::new(),
        }
    }

    #[test]
    fn ships_log_dups_of_local_partitions_only() {
        let assignments = vec![Assignment {
            table: "users".into(),
            info: TableInfo {
                id: 4,
                partition_count: 4,
                state: TableState::Available,
                create_timestamp_ms: 1,
                follower: None,
                catch_up: None,
                serves_on: None,
                extra: Map::new(),
            },
            partitions: vec![PartitionId(1), PartitionId(3)],
        }];
        let dups = vec![
            ("users".to_string(), DupId(1), dup(DupStatus::Log)),
            ("users".to_string(), DupId(2), dup(DupStatus::Pause)),
            ("users".to_string(), DupId(3), dup(DupStatus::Prepare)),
            ("users".to_string(), DupId(4), dup(DupStatus::Removed)),
            ("other".to_string(), DupId(5), dup(DupStatus::Log)),
        ];
        let w = wanted(&assignments, &dups);
        let mut ship: Vec<(u64, u32)> = w.ship.keys().map(|k| (k.dupid.0, k.partition.0)).collect();
        ship.sort();
        assert_eq!(ship, vec![(1, 1), (1, 3)]);
        assert!(w.ship.values().all(|(_, appid)| *appid == 4));
        let mut paused: Vec<(u64, u32)> = w
            .paused
            .keys()
            .map(|k| (k.dupid.0, k.partition.0))
            .collect();
        paused.sort();
        assert_eq!(paused, vec![(2, 1), (2, 3)]);
        assert_eq!(
            w.full,
            vec![("users".to_string(), DupId(3), DupStatus::Prepare)]
        );
    }

    #[test]
    fn only_dup_keys_wake_the_reconcile() {
        let p = "/ferry/bj/dups/";
        assert!(is_dup_key(b"/ferry/bj/dups/users/7", p));
        assert!(!is_dup_key(b"/ferry/bj/dups/users/7/progress/0", p));
        assert!(!is_dup_key(b"/ferry/bj/tables/users", p));
    }
}
