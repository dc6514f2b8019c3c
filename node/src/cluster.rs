//! The node's part in a cluster, when `etcd_endpoints` is set (see `docs/operations.md`).
//!
//! At start-up, in order (waiting while etcd is away): connect to etcd → compare this node's cluster config with the stored
//! one (refuse to start, naming the field, if they differ; wait while no coordinator has stored
//! one yet) → register under a lease → wait until the table exists and its partitions are placed
//! on this node → for the target of a full duplication, install it from the source's checkpoints
//! ([`crate::install`]). The caller then opens the partitions and, last, the client port.
//!
//! While serving, [`watch_table`] follows the table's state (a `read_only` or `demoted` table
//! refuses writes with a retryable error, and the node answers each state in etcd with its
//! decrees, see [`TableWatch`]) and [`gc_plogs`] deletes plog segments that every
//! duplication has confirmed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use ferry_meta::config::ClusterConfig;
use ferry_meta::failover::{CatchUp, SourceApplied, StateAck};
use ferry_meta::status::DupStatus;
use ferry_meta::{
    check_cluster_config, register_node, MetaError, MetaStore, NodeInfo, Registration, TableInfo,
    TableState,
};
use ferry_proto::{Decree, PartitionId};
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::{Node, Stage, StageCell};

/// How often the waits and watches below look at etcd again.
const POLL: Duration = Duration::from_millis(500);

/// A node that has joined its cluster.
pub struct Member {
    pub meta: MetaStore,
    pub name: String,
    registration: Registration,
}

impl Member {
    /// Removes the node from the registry now (clean shutdown).
    pub async fn leave(self) {
        self.registration.deregister().await;
    }
}

/// The shared part of the config, as this node sees it.
pub fn cluster_config(config: &NodeConfig) -> ClusterConfig {
    ClusterConfig {
        name: config.cluster.clone(),
        id: config.cluster_id.unwrap_or(0),
        duplication_group: config.duplication_group.clone(),
        partition_hash: ferry_meta::config::DEFAULT_PARTITION_HASH.into(),
        plog_format_version: ferry_meta::config::DEFAULT_PLOG_FORMAT_VERSION,
    }
}

/// Joins the cluster (see the module docs). `Ok(None)` if `shutdown` fired meanwhile.
pub async fn join(
    config: &NodeConfig,
    http_addr: std::net::SocketAddr,
    stage: &StageCell,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Member>> {
    let name = config.node_name();
    // While etcd is away the node waits, as every other process does, and says so once.
    stage.set(Stage::ConnectingEtcd);
    let mut away = EtcdAway::default();
    let meta = loop {
        match MetaStore::connect(&config.etcd_endpoints, &config.cluster, config.etcd_timeout).await
        {
            Ok(meta) => break meta,
            Err(e) => away.note(&e),
        }
        if sleep_or_stop(shutdown).await {
            return Ok(None);
        }
    };

    stage.set(Stage::CheckingConfig);
    let ours = cluster_config(config);
    let mut said = false;
    loop {
        match check_cluster_config(&meta, &ours).await {
            Ok(()) => break,
            Err(MetaError::ConfigMissing(key)) => {
                if !said {
                    tracing::info!(%key, "waiting for the first coordinator to store the cluster config");
                    said = true;
                }
            }
            Err(e @ MetaError::Unavailable { .. }) => away.note(&e),
            Err(e) => bail!("{e}"),
        }
        if sleep_or_stop(shutdown).await {
            return Ok(None);
        }
    }

    stage.set(Stage::Registering);
    let mut info = NodeInfo::new(&name, &config.resp_addr.to_string());
    info.http_addr = Some(http_addr.to_string());
    info.table = Some(config.table.clone());
    let registration = loop {
        match register_node(&meta, info.clone(), config.lease_ttl).await {
            Ok(r) => break r,
            Err(e @ MetaError::Unavailable { .. }) => away.note(&e),
            Err(e) => bail!("{e}"),
        }
        if sleep_or_stop(shutdown).await {
            return Ok(None);
        }
    };
    away.back();
    tracing::info!(node = %name, lease_ttl_ms = config.lease_ttl.as_millis() as u64, "registered");

    'table: loop {
        stage.set(Stage::WaitingForTable);
        let mut said = false;
        let assignment = loop {
            match meta.assignments(&name).await {
                Ok(tables) => {
                    if let Some(a) = tables.into_iter().find(|a| a.table == config.table) {
                        let count = a.info.partition_count;
                        if count != config.partitions {
                            bail!(
                            "table `{}` has {count} partitions in etcd but this node's `partitions` \
                             is {}; set partitions = {count} (a table's partition count never changes)",
                            config.table,
                            config.partitions
                        );
                        }
                        if a.partitions.len() as u32 == count {
                            break a;
                        }
                        bail!(
                        "table `{}` has {} of its {count} partitions on node `{name}` and the rest on \
                         other nodes; a node serves a whole table in this version, so run one node \
                         per cluster for it",
                        config.table,
                        a.partitions.len()
                    );
                    }
                    if !said {
                        tracing::info!(table = %config.table, node = %name,
                        "waiting for the table to be created and placed on this node (`ferry table create`)");
                        said = true;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "read the partition table"),
            }
            if sleep_or_stop(shutdown).await {
                registration.deregister().await;
                return Ok(None);
            }
        };
        // The target of a full duplication opens only once it is filled from the checkpoints.
        if let (Some(f), TableState::Creating) = (&assignment.info.follower, assignment.info.state)
        {
            stage.set(Stage::Installing);
            match crate::install::until_installed(config, &meta, &assignment, f, shutdown).await? {
                crate::install::Outcome::Installed => {}
                crate::install::Outcome::Dropped => continue 'table,
                crate::install::Outcome::Stopped => {
                    registration.deregister().await;
                    return Ok(None);
                }
            }
        }
        break 'table;
    }
    Ok(Some(Member {
        meta,
        name,
        registration,
    }))
}

/// Logs etcd being unreachable once, and its return.
#[derive(Default)]
struct EtcdAway(bool);

impl EtcdAway {
    fn note(&mut self, e: &MetaError) {
        if !self.0 {
            tracing::warn!(error = %e, "etcd is unreachable; waiting for it (the client port opens once the node joined)");
            self.0 = true;
        }
    }

    fn back(&self) {
        if self.0 {
            tracing::info!("etcd answers again; joined");
        }
    }
}

/// `true` if `shutdown` fired during the pause.
async fn sleep_or_stop(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(POLL) => false,
    }
}

/// Puts the table's state in force on this node and answers it in etcd (a [`StateAck`]): a
/// `read_only` or `demoted` table refuses client writes with a retryable error, fenced inside
/// every partition's writer, so the decrees answered are the last ones; a catch-up order (a
/// failover's target) is answered once every partition applied the source's decrees, with what
/// each partition applied from the source.
///
/// The return check: a table that takes writes and duplicates to other clusters refuses them
/// from the node's start until the leader has checked, after that start, that no other cluster
/// took them over by a forced failover (`checked/<table>`). A cluster that comes back after an
/// outage so never takes a write the new primary does not know of.
#[derive(Default)]
pub struct TableWatch {
    /// The revision of the table key in force, whether the return check had passed then, and
    /// what was last answered for it.
    in_force: Option<(i64, bool)>,
    acked: Option<StateAck>,
    state: Option<TableState>,
    /// etcd's revision at the first round: the return check must be newer.
    since: Option<i64>,
    checked: bool,
}

/// How soon [`TableWatch::round`] wants to run again, if sooner than the table key changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// When the table key changes.
    OnChange,
    /// A catch-up order is unmet.
    CatchUp,
    /// Writes wait for the return check.
    Check,
}

impl TableWatch {
    /// One round. Returns the revision read and when to run again.
    pub async fn round(&mut self, meta: &MetaStore, node: &Node) -> anyhow::Result<(i64, Again)> {
        let table = node.table.name().to_owned();
        let err = |e: MetaError| anyhow!("{e}");
        let since = match self.since {
            Some(r) => r,
            None => *self.since.insert(meta.revision().await.map_err(err)?),
        };
        // The check is read before the table: a leader that finds the table taken over demotes
        // it before it writes the check, so a check read here comes with the demotion.
        let stamp = match self.checked {
            true => None,
            false => meta.checked(&table).await.map_err(err)?.map(|(_, rev)| rev),
        };
        let (info, revision) = meta.table_at(&table).await.map_err(err)?;
        if self.state != Some(info.state) {
            tracing::info!(table = %table, state = info.state.as_str(), revision, "table state");
            self.state = Some(info.state);
        }
        if !self.checked {
            self.checked = info.state != TableState::Available
                || stamp.is_some_and(|rev| rev > since)
                || !has_remote_dups(meta, &table).await?;
            if self.checked
                && self
                    .acked
                    .as_ref()
                    .is_some_and(|a| a.unchecked_since.is_some())
            {
                tracing::info!(table = %table, "return check passed: no other cluster took the table's writes over; taking writes");
            }
        }
        let fence = fence_error(&table, &info).or_else(|| {
            (!self.checked).then(|| format!(
                "TRYAGAIN table `{table}` waits for its coordinator's return check (that no other cluster took its writes over while this node was away); retry in a few seconds"
            ))
        });
        let fenced = fence.is_some();
        let decrees = if self.in_force != Some((revision, self.checked)) {
            let d = node.fence(fence).await?;
            self.in_force = Some((revision, self.checked));
            d
        } else {
            self.acked
                .as_ref()
                .map(|a| a.decrees.clone())
                .unwrap_or_default()
        };
        let mut again = if self.checked {
            Again::OnChange
        } else {
            Again::Check
        };
        let (caught_up, applied) = match &info.catch_up {
            Some(order) => {
                let applied = applied_from(node, order.source_cluster_id)?;
                if caught_up(node, order)? {
                    (Some(order.failover), applied)
                } else {
                    again = Again::CatchUp;
                    (None, applied)
                }
            }
            None => (None, Vec::new()),
        };
        let ack = StateAck {
            revision,
            fenced,
            decrees,
            caught_up,
            applied,
            unchecked_since: (!self.checked).then_some(since),
            at_ms: ferry_meta::now_ms(),
        };
        let same = self.acked.as_ref().is_some_and(|a| {
            StateAck {
                at_ms: ack.at_ms,
                ..a.clone()
            } == ack
        });
        if !same {
            meta.put_state_ack(&table, &node.config.node_name(), &ack)
                .await
                .map_err(err)?;
            if let Some(f) = ack.caught_up {
                tracing::info!(table = %table, failover = f, "caught up with the failover's source decrees");
            }
            if ack.unchecked_since.is_some() && self.acked.is_none() {
                tracing::info!(table = %table, since, "refusing writes until the coordinator's return check");
            }
            self.acked = Some(ack);
        }
        Ok((revision, again))
    }
}

/// Whether the table duplicates to another cluster (which could take its writes over).
async fn has_remote_dups(meta: &MetaStore, table: &str) -> anyhow::Result<bool> {
    Ok(meta
        .list_dups(table)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .iter()
        .any(|(_, d)| d.status != DupStatus::Removed))
}

/// Per partition of source cluster `cluster_id`, the last decree every partition of this node
/// applied from it, with that write's time. A partition with an inbox for a source it has not
/// applied from yet counts as having applied nothing.
fn applied_from(node: &Node, cluster_id: u8) -> anyhow::Result<Vec<SourceApplied>> {
    let mut per: std::collections::BTreeMap<u32, SourceApplied> = Default::default();
    let partitions = node.table.partitions();
    let mut seen: Vec<Vec<u32>> = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let mut mine = Vec::new();
        for (source, progress) in partition.dup_sources()? {
            if source.cluster.get() != cluster_id {
                continue;
            }
            let sp = source.partition.0;
            mine.push(sp);
            let row = SourceApplied {
                partition: sp,
                decree: progress.decree,
                timestamp_us: progress.timestamp_us,
            };
            per.entry(sp)
                .and_modify(|r| {
                    if row.decree < r.decree {
                        *r = row
                    }
                })
                .or_insert(row);
        }
        seen.push(mine);
    }
    // A partition without progress for a source partition the others applied from.
    for (partition, mine) in partitions.iter().zip(&seen) {
        for sp in per.keys().copied().collect::<Vec<_>>() {
            let source = ferry_proto::Source {
                cluster: ferry_proto::ClusterId::new(cluster_id)
                    .ok_or_else(|| anyhow!("cluster id {cluster_id} is not valid"))?,
                partition: PartitionId(sp),
            };
            let has_inbox = ferry_log::inbox::inbox_dir(partition.dir(), source).exists();
            if !mine.contains(&sp) && has_inbox {
                per.insert(
                    sp,
                    SourceApplied {
                        partition: sp,
                        decree: Decree(0),
                        timestamp_us: 0,
                    },
                );
            }
        }
    }
    Ok(per.into_values().collect())
}

/// The error client writes get in the table's state, if they are refused.
fn fence_error(table: &str, info: &TableInfo) -> Option<String> {
    match info.state {
        TableState::ReadOnly => Some(format!(
            "TRYAGAIN table `{table}` is read-only (fenced, e.g. during failover); retry in a few seconds"
        )),
        TableState::Demoted => Some(match &info.serves_on {
            Some(c) => format!(
                "TRYAGAIN table `{table}` is demoted: cluster {c} serves its writes now; write there, or retry after failback"
            ),
            None => format!(
                "TRYAGAIN table `{table}` is demoted: another cluster serves its writes now; write there, or retry after failback"
            ),
        }),
        TableState::Available | TableState::Creating => None,
    }
}

/// Whether every partition applied every source partition up to the order's decrees.
fn caught_up(node: &Node, order: &CatchUp) -> anyhow::Result<bool> {
    let cluster = ferry_proto::ClusterId::new(order.source_cluster_id).ok_or_else(|| {
        anyhow!(
            "the catch-up order names cluster id {}, which is not a valid cluster id",
            order.source_cluster_id
        )
    })?;
    for partition in node.table.partitions() {
        for (sp, want) in order.decrees.iter().enumerate() {
            let source = ferry_proto::Source {
                cluster,
                partition: PartitionId(sp as u32),
            };
            if partition.dup_progress(source)? < *want {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Runs [`TableWatch`] rounds until cancelled: after each change of the table key (an etcd
/// watch), every 20 ms while a catch-up order is unmet, and every few seconds anyway. etcd
/// being away leaves the last state in force. Cancellation-safe.
pub async fn watch_table(
    meta: MetaStore,
    node: Arc<Node>,
    mut watch: TableWatch,
    cancel: CancellationToken,
) {
    let key = meta.keys().table(node.table.name());
    let mut warned = false;
    loop {
        let next = match watch.round(&meta, &node).await {
            Ok(next) => {
                warned = false;
                Some(next)
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %format!("{e:#}"), "cannot follow the table state; the last one stays in force");
                    warned = true;
                }
                None
            }
        };
        let wait = async {
            match next {
                Some((_, Again::CatchUp)) => tokio::time::sleep(CATCH_UP_POLL).await,
                Some((_, Again::Check)) => tokio::time::sleep(CHECK_POLL).await,
                Some((revision, Again::OnChange)) => {
                    if tokio::time::timeout(RECHECK, meta.wait_changed(&key, revision)).await
                        == Ok(false)
                    {
                        tokio::time::sleep(POLL).await;
                    }
                }
                None => tokio::time::sleep(POLL).await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wait => {}
        }
    }
}

/// How often an unmet catch-up order is looked at again.
const CATCH_UP_POLL: Duration = Duration::from_millis(20);
/// How often a node waiting for the return check looks for it.
const CHECK_POLL: Duration = Duration::from_millis(100);
/// Longest wait for a change of the table key before reading it again.
const RECHECK: Duration = Duration::from_secs(5);

/// `below`, raised so that the plog segments the dups in `held_by` keep past `unheld` (what GC
/// would collect without them) total at most `limit` bytes: the oldest go first. A dup whose
/// confirmed decree ends up collected re-bootstraps the partition from a fresh checkpoint
/// (its shipper finds the log gone). Logged.
async fn hold_limited(
    partition: &ferry_engine::partition::Partition,
    below: Decree,
    unheld: Decree,
    limit: u64,
    held_by: &[(ferry_proto::DupId, Decree)],
) -> anyhow::Result<Decree> {
    let dir = ferry_log::layout::plog_dir(partition.dir());
    let segments = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(Decree, u64)>> {
        let mut out = Vec::new();
        for s in ferry_log::plog::list_segments(&dir)? {
            let len = std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0);
            out.push((s.first_decree, len));
        }
        Ok(out)
    })
    .await??;
    // Segment i holds decrees [first_i, first_{i+1}); GC deletes it once first_{i+1} <=
    // bound + 1. It is held for the dups if `unheld` would delete it and `below` does not.
    let is_held = |w: &[(Decree, u64)]| w[1].0 > below.next() && w[1].0 <= unheld.next();
    let mut held: u64 = segments
        .windows(2)
        .filter(|w| is_held(w))
        .map(|w| w[0].1)
        .sum();
    let mut raised = below;
    for w in segments.windows(2).filter(|w| is_held(w)) {
        if held <= limit {
            break;
        }
        held -= w[0].1;
        raised = Decree(w[1].0 .0 - 1);
    }
    if raised > below {
        let passed: Vec<String> = held_by
            .iter()
            .filter(|(_, c)| *c < raised)
            .map(|(d, c)| format!("dup {d} (confirmed {c})"))
            .collect();
        tracing::warn!(partition = partition.id().0, limit, below = raised.0,
            passed = %passed.join(", "),
            "plog_hold_max_bytes reached: collecting the plog held for duplication up to this decree; those dups re-bootstrap the partition from a fresh checkpoint");
    }
    Ok(raised)
}

/// Deletes, every `interval`, the plog segments of each partition that every duplication of the
/// table has confirmed (none without `meta`: a standalone node). A dup without progress yet
/// holds everything after its checkpoint's decree (a full dup), or everything. The last `retain_decrees` records before the committed decree are always
/// kept. Cancellation-safe.
pub async fn gc_plogs(
    meta: Option<MetaStore>,
    node: Arc<Node>,
    interval: Duration,
    retain_decrees: u64,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(e) = gc_once(meta.as_ref(), &node, retain_decrees).await {
            tracing::warn!(error = %format!("{e:#}"), "plog GC skipped this round");
        }
    }
}

async fn gc_once(meta: Option<&MetaStore>, node: &Node, retain_decrees: u64) -> anyhow::Result<()> {
    let table = node.table.name();
    let dups: Vec<_> = match meta {
        Some(meta) => meta
            .list_dups(table)
            .await
            .map_err(|e| anyhow!("{e}"))?
            .into_iter()
            .filter(|(_, d)| d.status != DupStatus::Removed)
            .collect(),
        None => Vec::new(),
    };
    for partition in node.table.partitions() {
        let p: PartitionId = partition.id();
        let committed = partition.committed_decree();
        let mut below = Decree(committed.0.saturating_sub(retain_decrees));
        let unheld = below;
        let mut held_by = Vec::new();
        for (meta, (dupid, _)) in dups.iter().filter_map(|d| Some((meta?, d))) {
            let confirmed = match meta
                .progress(table, *dupid, p)
                .await
                .map_err(|e| anyhow!("{e}"))?
            {
                Some(pr) => pr.confirmed_decree,
                // A full dup ships from its checkpoint's decree on; before the checkpoint is
                // made, everything is held.
                None => meta
                    .checkpoint(table, *dupid, p)
                    .await
                    .map_err(|e| anyhow!("{e}"))?
                    .map_or(Decree(0), |c| c.manifest.decree),
            };
            if confirmed < unheld {
                held_by.push((*dupid, confirmed));
            }
            below = below.min(confirmed);
        }
        let limit = node.config.plog_hold_max_bytes;
        if limit > 0 && !held_by.is_empty() {
            below = hold_limited(partition, below, unheld, limit, &held_by).await?;
        }
        let removed = partition
            .gc_inboxes()
            .await
            .with_context(|| format!("collect partition {p}'s applied inbox segments"))?;
        if !removed.is_empty() {
            tracing::info!(
                partition = p.0,
                segments = removed.len(),
                "applied inbox segments collected"
            );
        }
        // Segments strictly below the first unconfirmed decree.
        let below = below.next();
        if below.0 <= 1 {
            continue;
        }
        let removed = partition
            .gc_plog(below)
            .await
            .with_context(|| format!("collect partition {p}'s plog below decree {below}"))?;
        if !removed.is_empty() {
            tracing::info!(
                partition = p.0,
                below = below.0,
                segments = removed.len(),
                "plog segments collected"
            );
        }
    }
    Ok(())
}
