//! Planned failover (DESIGN.md, "Planned failover"; after Derby's replication failover), driven
//! by the leader of each cluster from the table's [`FailoverRecord`] in etcd.
//!
//! The source (`ferry failover -t T --to tj` on its CLI):
//! 1. `fencing`: the table becomes `read_only` (persisted first); every node fences each
//!    partition's writer and answers with its last decree ([`StateAck`]);
//! 2. `draining`: the target is asked to take over once it applied those decrees
//!    ([`TakeOver`]); the shippers ship the rest (the view shows each partition's confirmed
//!    decree, `handing_over` once all are confirmed);
//! 3. the target answers `done` → `demoting`: the table becomes `demoted` → `done`.
//!
//! If a step passes the deadline or fails: `rolling_back`. Once the target may have been asked
//! (from `draining` on) the target is told to abort first, and the fence is lifted only when it
//! answers that it did not take over (if it did, the failover goes forward to `demoting`); while
//! it cannot be reached, the source stays fenced. So the two tables never both take writes.
//!
//! The target (asked by the source's coordinator): `catching_up` (the table keeps refusing
//! writes and carries a [`CatchUp`] order; each node answers once its partitions applied every
//! source decree) → `promoting` (from here an abort is refused; with `reverse` the dup back to
//! the source is added from the table's decrees, before it takes any write) → the table becomes
//! `available` → `done`.
//!
//! Each step is persisted before it acts and is idempotent, so a leader that dies is replaced by
//! one that goes on from the recorded step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use ferry_admin::api::{AbortFailover, FailoverPartition, FailoverView, StartFailover, TakeOver};
use ferry_admin::client::{AdminClient, ClientError};
use ferry_meta::dups::DupPolicy;
use ferry_meta::failover::{CatchUp, FailoverRecord, Role, StateAck, Step};
use ferry_meta::status::DupStatus;
use ferry_meta::{now_ms, MetaError, MetaStore, TableState};
use ferry_proto::{Decree, PartitionId};

use super::http::ApiError;
use super::Shared;
use crate::config::CoordinatorConfig;

/// How often the leader advances a running failover.
const TICK: Duration = Duration::from_millis(20);
/// How often it looks for one otherwise.
const IDLE: Duration = Duration::from_millis(250);

/// `POST /v1/tables/{table}/failover`: checks and records a planned failover; the leader's
/// [`drive`] loop runs it.
pub async fn start(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    req: &StartFailover,
) -> Result<FailoverView, ApiError> {
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let info = meta.table(table).await?;
    if info.state != TableState::Available {
        return Err(conflict(format!(
            "table {table} is {} here; a failover hands over the writes of a table that takes them",
            info.state
        )));
    }
    let Some((dupid, dup)) = meta.live_dup_to(table, &req.to).await? else {
        return Err(conflict(format!(
            "table {table} has no duplication to cluster {}; add one (`ferry dup add -t {table} -c {}`) and let it reach DS_LOG first",
            req.to, req.to
        )));
    };
    if dup.status != DupStatus::Log {
        return Err(conflict(format!(
            "dup {dupid} of table {table} to cluster {} is {}; a failover drains a dup in DS_LOG (start it, or wait for its copy)",
            req.to, dup.status
        )));
    }
    let client =
        remote(&shared.config, &req.to).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let path = format!("/v1/tables/{}/failover", dup.remote_table);
    let theirs: FailoverView = client.get(&path).await.map_err(|e| match e {
        ClientError::NotFound(m) => conflict(format!(
            "cluster {} has no table `{}` ({m})",
            req.to, dup.remote_table
        )),
        e => ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "cannot reach cluster {}'s coordinator: {e}; a planned failover needs both clusters (use --force on {} if this one is gone)",
                req.to, req.to
            ),
        ),
    })?;
    match theirs.state {
        TableState::ReadOnly | TableState::Demoted => {}
        TableState::Available => {
            return Err(conflict(format!(
                "table `{}` on cluster {} takes writes (available); a failover needs a target that \
                 refuses them, or both sides would take writes. Make it the standby first: \
                 `ferry table set-state -t {} demoted` on {} (its own clients' writes stop)",
                dup.remote_table, req.to, dup.remote_table, req.to
            )))
        }
        TableState::Creating => {
            return Err(conflict(format!(
                "table `{}` on cluster {} is still being created",
                dup.remote_table, req.to
            )))
        }
    }
    if let Some(r) = theirs.record.as_ref().filter(|r| !r.step.is_final()) {
        return Err(conflict(format!(
            "table `{}` on cluster {} is in failover {} (step {}); wait for it to end",
            dup.remote_table, req.to, r.id, r.step
        )));
    }
    let now = now_ms();
    let record = FailoverRecord::new(
        now,
        Role::Source,
        &req.to,
        &dup.remote_table,
        dupid,
        req.reverse,
        now,
        now + req.timeout_ms,
    );
    let record = FailoverRecord {
        verify: req.verify,
        ..record
    };
    let record = meta.begin_failover(table, record).await?;
    shared.failover_wake.notify_one();
    tracing::info!(%table, failover = record.id, to = %req.to, %dupid, reverse = req.reverse,
        timeout_ms = req.timeout_ms, "failover started: fencing");
    shared.metrics.failovers_started.inc();
    view(meta, &shared.config.cluster.name, table).await
}

/// `POST /v1/tables/{table}/failover/take_over`, on the target. Idempotent per failover id.
pub async fn take_over(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    req: &TakeOver,
) -> Result<FailoverView, ApiError> {
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let cluster = &shared.config.cluster.name;
    if let Some(r) = meta.failover(table).await? {
        if r.id == req.id {
            return view(meta, cluster, table).await;
        }
        if !r.step.is_final() {
            return Err(conflict(format!(
                "table {table} on cluster {cluster} is in failover {} (step {})",
                r.id, r.step
            )));
        }
        if r.id > req.id {
            return Err(conflict(format!(
                "failover {} is older than table {table}'s last failover {} on cluster {cluster}",
                req.id, r.id
            )));
        }
    }
    let info = meta.table(table).await?;
    if !matches!(info.state, TableState::ReadOnly | TableState::Demoted) {
        return Err(conflict(format!(
            "table {table} on cluster {cluster} is {}; it can take over only while it refuses writes",
            info.state
        )));
    }
    if info.partition_count == 0 || req.decrees.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a take-over names at least one source partition",
        ));
    }
    if req.reverse {
        policy(&shared.config).check_remote(table, &req.source_cluster)?;
    }
    let mut record = FailoverRecord::new(
        req.id,
        Role::Target,
        &req.source_cluster,
        &req.source_table,
        req.dupid,
        req.reverse,
        now_ms(),
        req.deadline_ms,
    );
    record.last_decrees = req.decrees.clone();
    record.source_cluster_id = req.source_cluster_id;
    record.verify = req.verify.is_some();
    record.source_digest = req.verify.clone();
    let record = meta.begin_failover(table, record).await?;
    shared.failover_wake.notify_one();
    meta.set_table_order(
        table,
        info.state,
        Some(CatchUp {
            failover: record.id,
            source_cluster_id: req.source_cluster_id,
            decrees: req.decrees.clone(),
        }),
    )
    .await?;
    tracing::info!(%table, failover = record.id, from = %req.source_cluster,
        "taking over: catching up with the source's last decrees");
    view(meta, cluster, table).await
}

/// `POST /v1/tables/{table}/failover/abort`, on the target: calls failover `id` off unless the
/// table is already taking over. Remembers the id even if its take-over never arrived, so a late
/// one is refused.
pub async fn abort(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    req: &AbortFailover,
) -> Result<FailoverView, ApiError> {
    let cluster = &shared.config.cluster.name;
    match meta.failover(table).await? {
        Some(r) if r.id == req.id => {
            if r.step == Step::CatchingUp {
                meta.update_failover(table, r.id, |r| {
                    if r.step != Step::CatchingUp {
                        return Err(MetaError::Conflict(format!("the take-over is {}", r.step)));
                    }
                    r.step = Step::Aborted;
                    r.finished_at_ms = Some(now_ms());
                    r.error = Some("called off by the source".into());
                    Ok(())
                })
                .await
                .or_else(|e| match e {
                    MetaError::Conflict(_) => Ok(r.clone()),
                    e => Err(e),
                })?;
                clear_order(meta, table, req.id).await?;
                tracing::warn!(%table, failover = req.id, "take-over called off by the source");
            }
        }
        Some(r) if r.id > req.id || !r.step.is_final() => {}
        _ => {
            let mut tomb = FailoverRecord::new(
                req.id,
                Role::Target,
                "",
                table,
                ferry_proto::DupId(0),
                false,
                now_ms(),
                now_ms(),
            );
            tomb.step = Step::Aborted;
            tomb.finished_at_ms = Some(now_ms());
            tomb.error = Some("called off by the source before its take-over arrived".into());
            meta.begin_failover(table, tomb).await?;
        }
    }
    view(meta, cluster, table).await
}

/// Removes the table's catch-up order of failover `id`, keeping its state.
pub(super) async fn clear_order(meta: &MetaStore, table: &str, id: u64) -> Result<(), MetaError> {
    let info = meta.table(table).await?;
    if info.catch_up.as_ref().is_some_and(|c| c.failover == id) {
        meta.set_table_order(table, info.state, None).await?;
    }
    Ok(())
}

/// The table's last failover and each partition's part in it.
pub async fn view(meta: &MetaStore, cluster: &str, table: &str) -> Result<FailoverView, ApiError> {
    let (info, rows) = partition_acks(meta, table).await?;
    let record = meta.failover(table).await?;
    let mut partitions = Vec::new();
    for (p, pa) in rows.into_iter().enumerate() {
        let mut row = FailoverPartition {
            partition: p as u32,
            decree: pa
                .ack
                .as_ref()
                .and_then(|a| decree_of(a, pa.partition))
                .map(|d| d.0),
            fenced: pa.ack.as_ref().map(|a| a.fenced),
            node: pa.node,
            confirmed_decree: None,
            caught_up: None,
        };
        if let Some(r) = &record {
            match r.role {
                Role::Source => {
                    if let Some(d) = r.last_decrees.get(p) {
                        row.decree = Some(d.0);
                    }
                    row.confirmed_decree = r.confirmed.get(p).map(|d| d.0);
                }
                Role::Target => {
                    row.caught_up = Some(pa.ack.as_ref().is_some_and(|a| a.caught_up == Some(r.id)))
                }
            }
        }
        partitions.push(row);
    }
    let elapsed_ms = record.as_ref().map_or(0, |r| {
        r.finished_at_ms
            .unwrap_or_else(now_ms)
            .saturating_sub(r.started_at_ms)
    });
    Ok(FailoverView {
        cluster: cluster.to_owned(),
        table: table.to_owned(),
        state: info.state,
        record,
        elapsed_ms,
        partitions,
    })
}

fn decree_of(ack: &StateAck, p: PartitionId) -> Option<Decree> {
    ack.decrees.iter().find(|(q, _)| *q == p).map(|(_, d)| *d)
}

/// One partition of this side's table: its node, and that node's last answer to the table state.
pub(super) struct PartitionAck {
    pub partition: PartitionId,
    pub node: Option<String>,
    pub ack: Option<StateAck>,
}

impl PartitionAck {
    /// The partition's decree in the answer, if the answer is fenced at `revision` or later.
    fn fenced_decree(&self, revision: i64) -> Option<Decree> {
        self.ack
            .as_ref()
            .filter(|a| a.fenced && a.revision >= revision)
            .and_then(|a| decree_of(a, self.partition))
    }
}

/// Every partition of `table` with its node's answer, in partition order, and the table.
pub(super) async fn partition_acks(
    meta: &MetaStore,
    table: &str,
) -> Result<(ferry_meta::TableInfo, Vec<PartitionAck>), MetaError> {
    let desc = meta.describe_table(table).await?;
    let acks: HashMap<String, StateAck> = meta.state_acks(table).await?.into_iter().collect();
    let rows = desc
        .partitions
        .iter()
        .enumerate()
        .map(|(p, e)| {
            let node = e.as_ref().and_then(|e| e.node.clone());
            let ack = node.as_ref().and_then(|n| acks.get(n)).cloned();
            PartitionAck {
                partition: PartitionId(p as u32),
                node,
                ack,
            }
        })
        .collect();
    Ok((desc.info, rows))
}

/// The leader's loop: advances every running failover of the cluster. Returns only when the
/// leadership fence failed.
pub async fn drive(shared: Arc<Shared>, meta: MetaStore) -> MetaError {
    let mut last_error: Option<String> = None;
    loop {
        let active = match round(&shared, &meta).await {
            Ok(active) => {
                last_error = None;
                active
            }
            Err(MetaError::FenceLost) => return MetaError::FenceLost,
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "failover round failed; retrying");
                    last_error = Some(text);
                }
                true
            }
        };
        if active {
            tokio::time::sleep(TICK).await;
        } else {
            // A failover started through the API wakes the loop at once.
            let _ = tokio::time::timeout(IDLE, shared.failover_wake.notified()).await;
        }
    }
}

/// One step of every running failover; whether any is running.
async fn round(shared: &Shared, meta: &MetaStore) -> Result<bool, MetaError> {
    let mut active = false;
    let records = meta.failovers().await?;
    let running = records.iter().filter(|(_, r)| !r.step.is_final()).count();
    shared.metrics.failovers_running.set(running as i64);
    for (table, mut r) in records {
        if r.step.is_final() {
            continue;
        }
        active = true;
        // A step that ends goes on to the next one at once, not a tick later.
        for _ in 0..4 {
            if ferry_proc::failpoints::returned("failover-hold").as_deref() == Some(r.step.as_str())
            {
                break;
            }
            let before = r.step;
            match (r.role, r.step) {
                (Role::Target, Step::Forcing) => {
                    super::forced::forcing_step(shared, meta, &table, &r).await?
                }
                (Role::Source, Step::Recovering) => {
                    super::forced::recovering_step(meta, &table, &r).await?
                }
                (Role::Source, _) => source_step(shared, meta, &table, r.clone()).await?,
                (Role::Target, _) => target_step(shared, meta, &table, r.clone()).await?,
            }
            match meta.failover(&table).await? {
                Some(next) if next.id == r.id && next.step != before && !next.step.is_final() => {
                    r = next
                }
                _ => break,
            }
        }
    }
    Ok(active)
}

/// Advances the source side by at most one step.
async fn source_step(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    r: FailoverRecord,
) -> Result<(), MetaError> {
    let now = now_ms();
    let late = now > r.deadline_ms;
    match r.step {
        Step::Fencing => {
            let Some(rev) = r.fence_revision else {
                let (_, rev) = meta
                    .set_table_order(table, TableState::ReadOnly, None)
                    .await?;
                meta.update_failover(table, r.id, |r| {
                    r.fence_revision = Some(rev);
                    r.fenced_at_ms = Some(now);
                    Ok(())
                })
                .await?;
                tracing::info!(%table, failover = r.id, revision = rev, "failover: fenced; waiting for every node's last decrees");
                return Ok(());
            };
            match fenced_decrees(meta, table, rev).await? {
                Ok(last) => {
                    meta.update_failover(table, r.id, |r| {
                        r.last_decrees = last.clone();
                        r.step = Step::Draining;
                        Ok(())
                    })
                    .await?;
                    tracing::info!(%table, failover = r.id, last_decrees = ?last.iter().map(|d| d.0).collect::<Vec<_>>(),
                        "failover: every node confirmed the fence; draining");
                }
                Err(why) if late => {
                    fail(shared, meta, table, &r, format!("fencing: {why}")).await?
                }
                Err(_) => {}
            }
        }
        Step::Draining | Step::HandingOver => {
            if r.verify && r.source_digest.is_none() {
                // Fenced, the table holds still: its content is what the target must hold.
                let why = match super::verify::table_digest(shared, meta, table).await? {
                    Ok(d) if d.partitions.iter().all(|p| p.stable) => {
                        let digest = content(&d);
                        meta.update_failover(table, r.id, |rec| {
                            rec.source_digest = Some(digest.clone());
                            Ok(())
                        })
                        .await?;
                        tracing::info!(%table, failover = r.id, entries = d.entries, "failover: content digest taken for --verify");
                        return Ok(());
                    }
                    Ok(_) => {
                        "the table took duplicated writes while its digest was taken".to_string()
                    }
                    Err(why) => why,
                };
                if late {
                    return fail(shared, meta, table, &r, format!("verifying: {why}")).await;
                }
                return Ok(());
            }
            let client = remote(&shared.config, &r.remote);
            let mut answer = match &client {
                Ok(c) => ask_take_over(shared, c, table, &r).await,
                Err(e) => Err(e.clone()),
            };
            if ferry_proc::failpoints::returned("failover-blind").is_some() {
                answer = Err("failpoint failover-blind: the answer was dropped".into());
            }
            let confirmed = confirmed_decrees(meta, table, &r).await?;
            let drained = confirmed.iter().zip(&r.last_decrees).all(|(c, l)| c >= l);
            match answer {
                Ok(view) => match view
                    .record
                    .filter(|t| t.id == r.id)
                    .map(|t| (t.step, t.error))
                {
                    // From `promoting` on the target takes over whatever happens: demote now.
                    Some((Step::Promoting, _)) | Some((Step::Done, _)) => {
                        // The target applied every last decree, so each is confirmed, whatever
                        // the shippers last wrote to etcd.
                        let applied: Vec<Decree> = confirmed
                            .iter()
                            .zip(&r.last_decrees)
                            .map(|(c, l)| (*c).max(*l))
                            .collect();
                        meta.update_failover(table, r.id, |r| {
                            r.step = Step::Demoting;
                            r.promoted_at_ms.get_or_insert(now);
                            r.confirmed = applied.clone();
                            Ok(())
                        })
                        .await?;
                        tracing::info!(%table, failover = r.id, remote = %r.remote, "failover: the target took over; demoting");
                        return Ok(());
                    }
                    Some((Step::Aborted, error)) => {
                        return fail(
                            shared,
                            meta,
                            table,
                            &r,
                            format!(
                                "handing over: cluster {} called the take-over off: {}",
                                r.remote,
                                error.as_deref().unwrap_or("no reason given")
                            ),
                        )
                        .await
                    }
                    _ if late => {
                        let why = lagging(&r, &confirmed, &view.partitions);
                        return fail(shared, meta, table, &r, why).await;
                    }
                    _ => {}
                },
                Err(e) if late => {
                    let why = if drained {
                        format!("handing over: cluster {} did not answer: {e}", r.remote)
                    } else {
                        lagging(&r, &confirmed, &[])
                    };
                    return fail(shared, meta, table, &r, why).await;
                }
                Err(_) => {}
            }
            let step = if drained {
                Step::HandingOver
            } else {
                Step::Draining
            };
            if step != r.step || confirmed != r.confirmed {
                meta.update_failover(table, r.id, |r| {
                    r.step = step;
                    r.confirmed = confirmed.clone();
                    Ok(())
                })
                .await?;
            }
        }
        Step::RollingBack => {
            if r.last_decrees.is_empty() {
                // Still fencing: the target was never asked.
                return unfence(meta, table, &r).await;
            }
            let answer = match remote(&shared.config, &r.remote) {
                Ok(c) => c
                    .post::<_, FailoverView>(
                        &format!("/v1/tables/{}/failover/abort", r.remote_table),
                        &AbortFailover { id: r.id },
                    )
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match answer {
                Ok(view) => match view.record.filter(|t| t.id == r.id).map(|t| t.step) {
                    Some(Step::Promoting) | Some(Step::Done) => {
                        meta.update_failover(table, r.id, |r| {
                            r.step = Step::Demoting;
                            r.promoted_at_ms.get_or_insert(now);
                            Ok(())
                        })
                        .await?;
                        tracing::warn!(%table, failover = r.id, "failover: the target had already taken over when it was called off; demoting");
                    }
                    Some(Step::Aborted) => unfence(meta, table, &r).await?,
                    _ => {}
                },
                Err(e) => {
                    let note = format!(
                        "rolling back: waiting for cluster {} to confirm it did not take over ({e}); the table stays fenced until then",
                        r.remote
                    );
                    if r.extra.get("waiting").and_then(|v| v.as_str()) != Some(note.as_str()) {
                        tracing::warn!(%table, failover = r.id, "{note}");
                        meta.update_failover(table, r.id, |r| {
                            r.extra.insert("waiting".into(), note.clone().into());
                            Ok(())
                        })
                        .await?;
                    }
                }
            }
        }
        Step::Demoting => {
            meta.demote_table(table, &r.remote).await?;
            // The dup back, as the target names it once done (best effort: if the target
            // cannot be asked, the failover ends without the name; the target's record has it).
            let mut reverse_dupid = r.reverse_dupid;
            if r.reverse && reverse_dupid.is_none() {
                if let Ok(c) = remote(&shared.config, &r.remote) {
                    let path = format!("/v1/tables/{}/failover", r.remote_table);
                    if let Ok(v) = c.get::<FailoverView>(&path).await {
                        match v.record.filter(|t| t.id == r.id) {
                            Some(t) if t.step == Step::Promoting && !late => return Ok(()),
                            Some(t) => reverse_dupid = t.reverse_dupid,
                            None => {}
                        }
                    }
                }
            }
            let done = meta
                .update_failover(table, r.id, |r| {
                    r.step = Step::Done;
                    r.finished_at_ms = Some(now);
                    r.reverse_dupid = r.reverse_dupid.or(reverse_dupid);
                    Ok(())
                })
                .await?;
            shared.metrics.failovers_done.inc();
            tracing::info!(%table, failover = r.id, remote = %r.remote,
                elapsed_ms = now.saturating_sub(done.started_at_ms),
                "failover done: the table is demoted here, cluster {} takes its writes", r.remote);
        }
        _ => {}
    }
    Ok(())
}

/// Asks the target to take over (idempotent) and returns its view of the failover.
async fn ask_take_over(
    shared: &Shared,
    client: &AdminClient,
    table: &str,
    r: &FailoverRecord,
) -> Result<FailoverView, String> {
    let req = TakeOver {
        id: r.id,
        source_cluster: shared.config.cluster.name.clone(),
        source_cluster_id: shared.config.cluster.id,
        source_table: table.to_owned(),
        dupid: r.dupid,
        decrees: r.last_decrees.clone(),
        reverse: r.reverse,
        deadline_ms: r.deadline_ms,
        verify: r.source_digest.clone(),
    };
    // The take-over is idempotent: asking again answers the target's view of it, so each
    // round costs one round trip.
    let path = format!("/v1/tables/{}/failover/take_over", r.remote_table);
    client.post(&path, &req).await.map_err(|e| e.to_string())
}

/// Why the drain or the hand-over did not finish in time: the first partition behind.
fn lagging(r: &FailoverRecord, confirmed: &[Decree], target: &[FailoverPartition]) -> String {
    for (p, (c, l)) in confirmed.iter().zip(&r.last_decrees).enumerate() {
        if c < l {
            return format!(
                "draining: partition {p} was confirmed up to decree {c} of its last decree {l} when the deadline passed (is its shipper running, and the link to {} up?)",
                r.remote
            );
        }
    }
    match target.iter().find(|t| t.caught_up == Some(false)) {
        Some(t) => format!(
            "handing over: partition {} of cluster {} (node {}) had not applied every source decree when the deadline passed (is that node running?)",
            t.partition,
            r.remote,
            t.node.as_deref().unwrap_or("none")
        ),
        None => format!(
            "handing over: cluster {} had not taken over when the deadline passed",
            r.remote
        ),
    }
}

/// Each partition's last decree once every hosting node answered the fence at `revision` or
/// later; `Err(why)` naming the first partition not confirmed yet.
pub(super) async fn fenced_decrees(
    meta: &MetaStore,
    table: &str,
    revision: i64,
) -> Result<Result<Vec<Decree>, String>, MetaError> {
    let (_, rows) = partition_acks(meta, table).await?;
    let mut out = Vec::new();
    for pa in rows {
        let p = pa.partition;
        let Some(node) = &pa.node else {
            return Ok(Err(format!("partition {p} has no node")));
        };
        match pa.fenced_decree(revision) {
            Some(d) => out.push(d),
            None => {
                return Ok(Err(format!(
                    "node {node} did not confirm the fence of partition {p} (is it running?)"
                )))
            }
        }
    }
    Ok(Ok(out))
}

/// The dup's confirmed decree of each partition, from etcd.
pub(super) async fn confirmed_decrees(
    meta: &MetaStore,
    table: &str,
    r: &FailoverRecord,
) -> Result<Vec<Decree>, MetaError> {
    let mut out = Vec::with_capacity(r.last_decrees.len());
    for p in 0..r.last_decrees.len() {
        let c = meta
            .progress(table, r.dupid, PartitionId(p as u32))
            .await?
            .map_or(Decree(0), |pr| pr.confirmed_decree);
        out.push(c);
    }
    Ok(out)
}

/// Records the failure and rolls back.
async fn fail(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    r: &FailoverRecord,
    why: String,
) -> Result<(), MetaError> {
    tracing::warn!(%table, failover = r.id, error = %why, "failover failed; rolling back");
    meta.update_failover(table, r.id, |r| {
        r.step = Step::RollingBack;
        r.error.get_or_insert(why.clone());
        Ok(())
    })
    .await?;
    shared.metrics.failovers_rolled_back.inc();
    Ok(())
}

/// The table takes writes on this side (its fence lifted, any catch-up order cleared), then
/// failover `id` ends in `step`.
async fn serve_here(meta: &MetaStore, table: &str, id: u64, step: Step) -> Result<(), MetaError> {
    meta.set_table_order(table, TableState::Available, None)
        .await?;
    meta.update_failover(table, id, |r| {
        r.step = step;
        r.finished_at_ms = Some(now_ms());
        Ok(())
    })
    .await
    .map(drop)
}

/// Lifts the fence: the source serves again.
async fn unfence(meta: &MetaStore, table: &str, r: &FailoverRecord) -> Result<(), MetaError> {
    serve_here(meta, table, r.id, Step::RolledBack).await?;
    tracing::warn!(%table, failover = r.id, error = r.error.as_deref().unwrap_or(""),
        "failover rolled back: the table takes writes here again");
    Ok(())
}

/// Advances the target side by at most one step.
async fn target_step(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    r: FailoverRecord,
) -> Result<(), MetaError> {
    match r.step {
        Step::CatchingUp => {
            let (_, rows) = partition_acks(meta, table).await?;
            let all = rows
                .iter()
                .all(|pa| pa.ack.as_ref().is_some_and(|a| a.caught_up == Some(r.id)));
            if !all {
                return Ok(());
            }
            if let Some(want) = &r.source_digest {
                // Caught up, the table holds exactly the source's last decrees: compare.
                let Ok(d) = super::verify::table_digest(shared, meta, table).await? else {
                    return Ok(());
                };
                let exact = r.last_decrees.iter().enumerate().all(|(p, l)| {
                    d.applied.iter().any(|a| {
                        a.cluster_id == r.source_cluster_id
                            && a.partition as usize == p
                            && a.decree == l.0
                    })
                });
                if !exact || d.partitions.iter().any(|p| !p.stable) {
                    return Ok(());
                }
                if let Some(why) = want.differs(&content(&d)) {
                    let why = format!("verify: {why}");
                    tracing::warn!(%table, failover = r.id, error = %why, "not taking over: the content differs from the source's");
                    meta.update_failover(table, r.id, |rec| {
                        if rec.step != Step::CatchingUp {
                            return Err(MetaError::Conflict(format!(
                                "the take-over is {}",
                                rec.step
                            )));
                        }
                        rec.step = Step::Aborted;
                        rec.finished_at_ms = Some(now_ms());
                        rec.error = Some(why.clone());
                        Ok(())
                    })
                    .await?;
                    clear_order(meta, table, r.id).await?;
                    return Ok(());
                }
                tracing::info!(%table, failover = r.id, entries = d.entries, "verify: the content equals the source's");
            }
            // From here the take-over happens: an abort is refused.
            let promoted = meta
                .update_failover(table, r.id, |r| {
                    if r.step != Step::CatchingUp {
                        return Err(MetaError::Conflict(format!("the take-over is {}", r.step)));
                    }
                    r.step = Step::Promoting;
                    r.promoted_at_ms = Some(now_ms());
                    Ok(())
                })
                .await;
            match promoted {
                Ok(_) => {
                    tracing::info!(%table, failover = r.id, "caught up with every source decree: taking over")
                }
                Err(MetaError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Step::Promoting => {
            if r.reverse && r.reverse_dupid.is_none() {
                // The decrees before the table takes its first write: the dup back ships
                // everything after them.
                let (_, rows) = partition_acks(meta, table).await?;
                let Some(decrees) = rows
                    .iter()
                    .map(|pa| pa.fenced_decree(0))
                    .collect::<Option<Vec<Decree>>>()
                else {
                    return Ok(());
                };
                let existing = meta.live_dup_to(table, &r.remote).await?;
                let dupid = match existing {
                    Some((id, _)) => id,
                    None => {
                        meta.add_dup_from(
                            table,
                            &r.remote,
                            &policy(&shared.config),
                            &decrees,
                            now_ms(),
                        )
                        .await?
                    }
                };
                meta.update_failover(table, r.id, |r| {
                    r.reverse_dupid = Some(dupid);
                    Ok(())
                })
                .await?;
                tracing::info!(%table, failover = r.id, %dupid, remote = %r.remote, "the dup back to the old source is in DS_LOG");
            }
            serve_here(meta, table, r.id, Step::Done).await?;
            tracing::info!(%table, failover = r.id, from = %r.remote, "took over: the table takes writes here now");
        }
        _ => {}
    }
    Ok(())
}

/// A digest as a failover record keeps it.
fn content(d: &ferry_admin::api::TableDigest) -> ferry_meta::failover::ContentDigest {
    ferry_meta::failover::ContentDigest {
        entries: d.entries,
        content_hash: d.content_hash.clone(),
        partitions: d
            .partitions
            .iter()
            .map(|p| (p.entries, p.digest.clone()))
            .collect(),
    }
}

/// The duplication policy of this cluster's config.
pub fn policy(cfg: &CoordinatorConfig) -> DupPolicy<'_> {
    DupPolicy {
        local_cluster: &cfg.cluster.name,
        duplication_group: cfg
            .cluster
            .duplication_group
            .keys()
            .map(String::as_str)
            .collect(),
        remote_clusters: cfg.remote_clusters.keys().map(String::as_str).collect(),
    }
}

/// A client of cluster `cluster`'s coordinators.
pub fn remote(config: &CoordinatorConfig, cluster: &str) -> Result<AdminClient, String> {
    let Some(addrs) = config.remote_clusters.get(cluster) else {
        return Err(format!(
            "cluster {cluster} is not in this coordinator's [remote_clusters]; add its \
             coordinators' addresses and restart"
        ));
    };
    AdminClient::new(
        addrs,
        config.coordinator.etcd_timeout.max(Duration::from_secs(3)),
    )
    .map_err(|e| e.to_string())
}
