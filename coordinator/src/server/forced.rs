//! Unplanned failover (DESIGN.md, "Unplanned failover"): the target takes the writes over
//! without the source, the old source learns it before it takes a write again, and
//! `--recover` ships what the new primary never got.
//!
//! - `ferry failover -t T --to tj --force`, on tj ([`force`]): the table takes writes at once
//!   (`forcing`), and each node reports, per source partition, the last decree it applied and
//!   that write's time ([`SourceApplied`]); the record keeps the smallest over the nodes →
//!   `done`. Writes on the source after them may be missing here.
//! - The return check ([`Returns`]), on every cluster: a node that starts refuses writes to a
//!   table that duplicates to other clusters until the leader asked each of them, after that
//!   start, whether it took the table over by force (`checked/<table>`). The leader also asks
//!   every few seconds, so a link that comes back is noticed too. A forced take-over found
//!   demotes the table here (a source record in `demoting`, superseding any failover of ours).
//! - `ferry failover -t T --recover`, on the old source ([`recover`]): the dup to the new
//!   primary still holds the writes it never confirmed in the plog, and its shippers ship them
//!   (last-writer-wins merges them there). `recovering` waits until each partition's confirmed
//!   decree reaches its last decree → `recovered`, with the count of writes per partition that
//!   the new primary had not applied when it took over.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ferry_admin::api::{FailoverView, ForceFailover, RecoverFailover};
use ferry_meta::failover::{CatchUp, FailoverRecord, Role, SourceApplied, Step};
use ferry_meta::status::DupStatus;
use ferry_meta::{now_ms, MetaError, MetaStore, TableState};
use ferry_proto::{Decree, DupId};

use super::failover::{
    clear_order, confirmed_decrees, fenced_decrees, partition_acks, remote, view,
};
use super::http::ApiError;
use super::Shared;

/// How often the leader asks the remote clusters anyway (a link that came back).
const SWEEP: Duration = Duration::from_secs(2);
/// How often it looks for nodes waiting for a check.
const LOOK: Duration = Duration::from_millis(200);

/// `POST /v1/tables/{table}/failover/force`, on the target: the table takes writes now.
pub async fn force(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    req: &ForceFailover,
) -> Result<FailoverView, ApiError> {
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let cluster = &shared.config.cluster.name;
    if &req.to != cluster {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "a forced failover runs on the cluster that takes the writes over; this is cluster {cluster}, not {} (run it with {}'s coordinators)",
                req.to, req.to
            ),
        ));
    }
    let info = meta.table(table).await?;
    match info.state {
        TableState::ReadOnly | TableState::Demoted => {}
        TableState::Available => {
            return Err(conflict(format!(
                "table {table} takes writes on cluster {cluster} already; there is nothing to force"
            )))
        }
        TableState::Creating => {
            return Err(conflict(format!(
                "table {table} on cluster {cluster} is still being created; it holds no copy to promote"
            )))
        }
    }
    let last = meta.failover(table).await?;
    let running = last.as_ref().filter(|r| !r.step.is_final());
    if let Some(r) = running.filter(|r| r.role == Role::Target && r.step != Step::CatchingUp) {
        return Err(conflict(format!(
            "table {table} is already taking over (failover {}, step {}); wait for it (`ferry failover -t {table} --status`)",
            r.id, r.step
        )));
    }
    // The source: the one a running take-over names, or the one the operator names, or the
    // only other cluster of the duplication group.
    let group = &shared.config.cluster.duplication_group;
    let source = match (&req.from, running.filter(|r| r.role == Role::Target)) {
        (Some(f), _) => f.clone(),
        (None, Some(r)) => r.remote.clone(),
        (None, None) => {
            let others: Vec<&String> = group.keys().filter(|n| *n != cluster).collect();
            match others.as_slice() {
                [one] => (*one).clone(),
                _ => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "the duplication group has {} other clusters; name the source whose writes table {table} received with --from",
                            others.len()
                        ),
                    ))
                }
            }
        }
    };
    let Some(&source_cluster_id) = group.get(&source) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cluster {source} is not in this cluster's duplication_group"),
        ));
    };
    let now = now_ms();
    let id = now.max(last.as_ref().map_or(0, |r| r.id + 1));
    let source_table = running.map_or(table, |r| r.remote_table.as_str());
    let mut record = FailoverRecord::new(
        id,
        Role::Target,
        &source,
        source_table,
        running.map_or(DupId(0), |r| r.dupid),
        false,
        now,
        now + req.timeout_ms,
    );
    record.step = Step::Forcing;
    record.forced = true;
    record.source_cluster_id = source_cluster_id;
    record.promoted_at_ms = Some(now);
    // Persisted before the table takes a write, so a leader that dies goes on with the report.
    meta.supersede_failover(table, &record).await?;
    meta.set_table_order(
        table,
        TableState::Available,
        Some(CatchUp {
            failover: id,
            source_cluster_id,
            decrees: Vec::new(),
        }),
    )
    .await?;
    shared.failover_wake.notify_one();
    shared.metrics.failovers_started.inc();
    tracing::warn!(%table, failover = id, from = %source,
        "forced failover: the table takes writes here now, without its source; collecting what each node applied from it");
    view(meta, cluster, table).await
}

/// The target's `forcing` step: collects every node's report; `done` once all answered (or at
/// the deadline, naming the partitions whose report is missing).
pub async fn forcing_step(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    r: &FailoverRecord,
) -> Result<(), MetaError> {
    let (_, rows) = partition_acks(meta, table).await?;
    let missing: Vec<String> = rows
        .iter()
        .filter(|pa| pa.ack.as_ref().is_none_or(|a| a.caught_up != Some(r.id)))
        .map(|pa| {
            format!(
                "partition {} (node {})",
                pa.partition,
                pa.node.as_deref().unwrap_or("none")
            )
        })
        .collect();
    let late = now_ms() > r.deadline_ms;
    if !missing.is_empty() && !late {
        return Ok(());
    }
    // Per source partition, the least any node applied.
    let mut applied: HashMap<u32, SourceApplied> = HashMap::new();
    let mut nodes = BTreeSet::new();
    for pa in &rows {
        let Some(ack) = pa.ack.as_ref().filter(|a| a.caught_up == Some(r.id)) else {
            continue;
        };
        if !nodes.insert(pa.node.clone()) {
            continue;
        }
        for a in &ack.applied {
            applied
                .entry(a.partition)
                .and_modify(|b| {
                    if a.decree < b.decree {
                        *b = *a
                    }
                })
                .or_insert(*a);
        }
    }
    let mut applied: Vec<SourceApplied> = applied.into_values().collect();
    applied.sort_by_key(|a| a.partition);
    let error = (!missing.is_empty()).then(|| {
        format!(
            "forcing: no report from {} by the deadline; what they applied from {} is unknown",
            missing.join(", "),
            r.remote
        )
    });
    meta.update_failover(table, r.id, |rec| {
        rec.applied = applied.clone();
        rec.step = Step::Done;
        rec.finished_at_ms = Some(now_ms());
        rec.error = error.clone();
        Ok(())
    })
    .await?;
    clear_order(meta, table, r.id).await?;
    shared.metrics.failovers_done.inc();
    tracing::warn!(%table, failover = r.id, from = %r.remote,
        applied = ?applied.iter().map(|a| (a.partition, a.decree.0)).collect::<Vec<_>>(),
        "forced failover done: writes on {} after these decrees may be missing here until its --recover", r.remote);
    Ok(())
}

/// `POST /v1/tables/{table}/failover/recover`, on the old source of a forced failover.
pub async fn recover(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    req: &RecoverFailover,
) -> Result<FailoverView, ApiError> {
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let cluster = &shared.config.cluster.name;
    let Some(r) = meta.failover(table).await? else {
        return Err(conflict(format!(
            "table {table} never took part in a failover; --recover follows a forced failover that took its writes over"
        )));
    };
    if !(r.forced && r.role == Role::Source) {
        return Err(conflict(format!(
            "table {table}'s last failover ({}) was not another cluster's forced take-over of it; there is nothing to recover",
            r.id
        )));
    }
    match r.step {
        Step::Recovering => return view(meta, cluster, table).await,
        Step::Done | Step::Recovered => {}
        step => {
            return Err(conflict(format!(
                "table {table} is still {step} after the forced failover; retry in a moment"
            )))
        }
    }
    let dup = meta
        .list_dups(table)
        .await?
        .into_iter()
        .find(|(id, d)| *id == r.dupid && d.status != DupStatus::Removed);
    let Some((dupid, dup)) = dup else {
        return Err(conflict(format!(
            "dup {} of table {table} to cluster {} was removed; nothing ships its unshipped writes any more (the plog still holds them until GC)",
            r.dupid, r.remote
        )));
    };
    if dup.status != DupStatus::Log {
        return Err(conflict(format!(
            "dup {dupid} of table {table} to cluster {} is {}; start it (`ferry dup start -t {table} -d {dupid}`) and run --recover again",
            r.remote, dup.status
        )));
    }
    let now = now_ms();
    meta.update_failover(table, r.id, |rec| {
        rec.step = Step::Recovering;
        rec.deadline_ms = now + req.timeout_ms;
        rec.last_decrees.clear();
        rec.confirmed.clear();
        rec.recovered.clear();
        rec.error = None;
        rec.finished_at_ms = None;
        Ok(())
    })
    .await?;
    shared.failover_wake.notify_one();
    tracing::info!(%table, failover = r.id, to = %r.remote, %dupid,
        "recovering: shipping the writes cluster {} never got", r.remote);
    view(meta, cluster, table).await
}

/// The old source's `recovering` step.
pub async fn recovering_step(
    meta: &MetaStore,
    table: &str,
    r: &FailoverRecord,
) -> Result<(), MetaError> {
    let late = now_ms() > r.deadline_ms;
    let give_up = |why: String| async move {
        tracing::warn!(%table, failover = r.id, error = %why, "recover did not finish");
        meta.update_failover(table, r.id, |rec| {
            rec.step = Step::Done;
            rec.error = Some(why.clone());
            Ok(())
        })
        .await
        .map(drop)
    };
    if r.last_decrees.is_empty() {
        // Every write this side took: the nodes' last decrees under the demoted state.
        let (info, revision) = meta.table_at(table).await?;
        if info.state != TableState::Demoted {
            return give_up(format!(
                "recovering: table {table} is {} here, not demoted; its last decrees are not fixed",
                info.state
            ))
            .await;
        }
        match fenced_decrees(meta, table, revision).await? {
            Ok(last) => {
                meta.update_failover(table, r.id, |rec| {
                    rec.last_decrees = last.clone();
                    Ok(())
                })
                .await?;
            }
            Err(why) if late => return give_up(format!("recovering: {why}")).await,
            Err(_) => {}
        }
        return Ok(());
    }
    let confirmed = confirmed_decrees(meta, table, r).await?;
    let behind = confirmed
        .iter()
        .zip(&r.last_decrees)
        .enumerate()
        .find(|(_, (c, l))| c < l);
    match behind {
        None => {
            let recovered: Vec<u64> = r
                .last_decrees
                .iter()
                .enumerate()
                .map(|(p, l)| l.0.saturating_sub(applied_of(r, p).0))
                .collect();
            meta.update_failover(table, r.id, |rec| {
                rec.step = Step::Recovered;
                rec.confirmed = confirmed.clone();
                rec.recovered = recovered.clone();
                rec.finished_at_ms = Some(now_ms());
                Ok(())
            })
            .await?;
            tracing::info!(%table, failover = r.id, to = %r.remote, ?recovered,
                "recovered: cluster {} has every write this side took", r.remote);
            Ok(())
        }
        Some((p, (c, l))) if late => {
            give_up(format!(
                "recovering: partition {p} was confirmed up to decree {c} of its last decree {l} when the deadline passed (is its shipper running, and the link to {} up?)",
                r.remote
            ))
            .await
        }
        Some(_) => {
            if confirmed != r.confirmed {
                meta.update_failover(table, r.id, |rec| {
                    rec.confirmed = confirmed.clone();
                    Ok(())
                })
                .await?;
            }
            Ok(())
        }
    }
}

/// What the new primary had applied of partition `p` when it took over (0 if it did not say).
fn applied_of(r: &FailoverRecord, p: usize) -> Decree {
    r.applied
        .iter()
        .find(|a| a.partition as usize == p)
        .map_or(Decree(0), |a| a.decree)
}

/// The leader's loop of return checks (see the module docs), beside [`super::failover::drive`]
/// so that a remote slow to answer holds no failover up. Returns only when the leadership
/// fence failed.
pub async fn check_returns(shared: std::sync::Arc<Shared>, meta: MetaStore) -> MetaError {
    let mut returns = Returns::default();
    let mut last_error: Option<String> = None;
    loop {
        match returns.run(&shared, &meta).await {
            Ok(()) => last_error = None,
            Err(MetaError::FenceLost) => return MetaError::FenceLost,
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "return check failed; retrying");
                    last_error = Some(text);
                }
            }
        }
        tokio::time::sleep(LOOK).await;
    }
}

/// The leader's return checks (see the module docs).
struct Returns {
    next_look: Instant,
    next_sweep: Instant,
    /// The last reason each table could not be cleared, logged once.
    waiting: HashMap<String, String>,
}

impl Default for Returns {
    fn default() -> Self {
        Returns {
            next_look: Instant::now(),
            next_sweep: Instant::now(),
            waiting: HashMap::new(),
        }
    }
}

impl Returns {
    /// Checks the tables whose nodes wait for it, and every table once per sweep.
    async fn run(&mut self, shared: &Shared, meta: &MetaStore) -> Result<(), MetaError> {
        let now = Instant::now();
        if now < self.next_look {
            return Ok(());
        }
        self.next_look = now + LOOK;
        let sweep = now >= self.next_sweep;
        if sweep {
            self.next_sweep = now + SWEEP;
        }
        let mut by_table: HashMap<String, Vec<(DupId, ferry_meta::DupInfo)>> = HashMap::new();
        for (table, dupid, d) in meta.all_dups().await? {
            if d.status != DupStatus::Removed {
                by_table.entry(table).or_default().push((dupid, d));
            }
        }
        // Three range reads however many tables there are.
        let stamps = meta.all_checked().await?;
        let unchecked = meta.unchecked_tables().await?;
        for (table, dups) in by_table.into_iter() {
            let waiting = unchecked
                .get(&table)
                .is_some_and(|since| stamps.get(&table).is_none_or(|s| s <= since));
            if !(waiting || sweep) {
                continue;
            }
            match self.check(shared, meta, &table, &dups).await? {
                Ok(()) => {
                    if self.waiting.remove(&table).is_some() {
                        tracing::info!(%table, "return check: every remote cluster answered");
                    }
                    if waiting {
                        meta.put_checked(
                            &table,
                            &format!("leader {}", shared.config.instance_id()),
                        )
                        .await?;
                        tracing::info!(%table, "return check passed: no other cluster took the table over; its nodes take writes");
                    }
                }
                Err(why) => {
                    if self.waiting.get(&table) != Some(&why) {
                        tracing::warn!(%table, "{why}");
                        self.waiting.insert(table.clone(), why);
                    }
                }
            }
        }
        Ok(())
    }

    /// Asks every remote cluster of the table's dups whether it took the table over by force;
    /// demotes it here if one did. `Err(why)` if one could not be asked.
    async fn check(
        &self,
        shared: &Shared,
        meta: &MetaStore,
        table: &str,
        dups: &[(DupId, ferry_meta::DupInfo)],
    ) -> Result<Result<(), String>, MetaError> {
        let cluster = &shared.config.cluster.name;
        for (dupid, d) in dups {
            // A remote not configured cannot be asked (nor could it be failed over to by
            // `ferry failover`): it does not hold the table's writes back.
            let Ok(client) = remote(&shared.config, &d.remote) else {
                continue;
            };
            let path = format!("/v1/tables/{}/failover", d.remote_table);
            let theirs: FailoverView = match client.get(&path).await {
                Ok(v) => v,
                Err(ferry_admin::client::ClientError::NotFound(_)) => continue,
                Err(e) => {
                    return Ok(Err(format!(
                        "return check: cannot ask cluster {} whether it took table {table} over ({e}); nodes that started since keep refusing writes to it. If {} is gone for good, `ferry table set-state {table} available` lets them write",
                        d.remote, d.remote
                    )))
                }
            };
            let Some(t) = theirs.record else { continue };
            let forced_over = t.role == Role::Target
                && t.forced
                && &t.remote == cluster
                && matches!(t.step, Step::Forcing | Step::Done);
            if !forced_over {
                continue;
            }
            let ours = meta.failover(table).await?;
            if ours.as_ref().is_some_and(|o| o.forced && o.id == t.id) {
                continue;
            }
            let now = now_ms();
            let mut record = FailoverRecord::new(
                t.id,
                Role::Source,
                &d.remote,
                &d.remote_table,
                *dupid,
                false,
                now,
                now + 60_000,
            );
            record.step = Step::Demoting;
            record.forced = true;
            record.applied = t.applied.clone();
            record.error = Some(format!(
                "cluster {} took the table's writes over by a forced failover; this side is demoted. `ferry failover -t {table} --recover` ships the writes it never got",
                d.remote
            ));
            meta.supersede_failover(table, &record).await?;
            // Demoted before any node is cleared by this check.
            meta.demote_table(table, &d.remote).await?;
            shared.failover_wake.notify_one();
            tracing::warn!(%table, failover = t.id, by = %d.remote,
                "cluster {} took this table over by a forced failover: demoting it here", d.remote);
            return Ok(Ok(()));
        }
        Ok(Ok(()))
    }
}
