//! Leader election with etcd's election API, and the leader's duties.
//!
//! Each round: grant a lease of `coordinator.lease_ttl`, keep it alive in a task, campaign
//! under `/ferry/<cluster>/election/coordinator` with this instance's `{"id","addr"}` as the
//! value. Campaign returns when this instance leads; its election key's create revision is the
//! fencing token that every leader write is conditioned on. The round ends when the lease may
//! have expired (etcd unreachable for a TTL) or on shutdown; the lease is then revoked (best
//! effort) so that the next round does not queue behind this instance's own stale key.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Shared, Stage};
use ferry_meta::registry::{keep_lease_alive, LeaseEnd};
use ferry_meta::status::DupStatus;
use ferry_meta::{list_nodes, Fence, MetaError, MetaStore};

/// The value a candidate puts under the election name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidate {
    /// Instance name.
    pub id: String,
    /// Admin address.
    pub addr: String,
}

/// Runs election rounds until cancelled. Cancellation-safe.
pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let max = shared.config.coordinator.reconnect_backoff_max;
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match round(&shared, &cancel).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                shared.etcd_status(Some(&e));
                tracing::debug!(error = %e, "election round failed");
            }
        }
        shared.set_leader(None);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// The current leader's address, from the election.
pub async fn leader_addr(meta: &MetaStore) -> Result<Option<String>, MetaError> {
    let mut ec = meta.client().election_client();
    let name = meta.keys().coordinator_election();
    match tokio::time::timeout(meta.timeout(), ec.leader(name)).await {
        Ok(Ok(resp)) => Ok(resp
            .kv()
            .and_then(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok())
            .map(|c| c.addr)),
        // etcd answers "election: no leader" as an error.
        Ok(Err(e)) if e.to_string().contains("no leader") => Ok(None),
        Ok(Err(e)) => Err(meta.unavailable(e)),
        Err(_) => Err(meta.unavailable("leader lookup timed out")),
    }
}

/// Every candidate, in election order (the first leads).
pub async fn candidates(meta: &MetaStore) -> Result<Vec<Candidate>, MetaError> {
    let mut kvs = meta
        .get_prefix(format!("{}/", meta.keys().coordinator_election()))
        .await?;
    kvs.sort_by_key(|kv| kv.create_revision());
    Ok(kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok())
        .collect())
}

async fn round(shared: &Arc<Shared>, cancel: &CancellationToken) -> Result<(), MetaError> {
    let meta = &shared.meta;
    let ttl = shared.config.coordinator.lease_ttl;
    let lease = meta.grant_lease(ttl).await?;
    shared.etcd_status(None);
    let lease_cancel = cancel.child_token();
    let keeper = {
        let meta = meta.clone();
        let token = lease_cancel.clone();
        tokio::spawn(async move { keep_lease_alive(&meta, lease, ttl, &token).await })
    };
    let result = lead_while_lease_lives(shared, lease, keeper, cancel).await;
    lease_cancel.cancel();
    shared.set_leader(None);
    meta.revoke_lease(lease).await;
    result
}

async fn lead_while_lease_lives(
    shared: &Arc<Shared>,
    lease: i64,
    mut keeper: tokio::task::JoinHandle<LeaseEnd>,
    cancel: &CancellationToken,
) -> Result<(), MetaError> {
    let meta = &shared.meta;
    let me = Candidate {
        id: shared.config.instance_id(),
        addr: shared.config.advertise(),
    };
    let value = serde_json::to_vec(&me).unwrap_or_default();
    let mut ec = meta.client().election_client();
    let name = meta.keys().coordinator_election();
    let campaign = ec.campaign(name, value, lease);
    let leader_key = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        end = &mut keeper => return Err(lost(meta, end)),
        r = campaign => r.map_err(|e| meta.unavailable(e))?
            .take_leader()
            .ok_or_else(|| meta.unavailable("campaign answered without a leader key"))?,
    };
    let fence = Fence {
        key: leader_key.key().to_vec(),
        revision: leader_key.rev(),
    };
    tracing::info!(id = %me.id, revision = fence.revision, "this coordinator leads");
    let fenced = meta.with_fence(fence);
    shared.set_leader(Some(fenced.clone()));
    tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        end = &mut keeper => {
            let e = lost(meta, end);
            tracing::warn!(error = %e, "stepping down");
            Err(e)
        }
        e = super::failover::drive(shared.clone(), fenced.clone()) => {
            tracing::warn!(error = %e, "stepping down");
            Err(e)
        }
        e = super::forced::check_returns(shared.clone(), fenced.clone()) => {
            tracing::warn!(error = %e, "stepping down");
            Err(e)
        }
        e = leader_duties(shared, &fenced) => {
            tracing::warn!(error = %e, "stepping down");
            Err(e)
        }
    }
}

fn lost(meta: &MetaStore, end: Result<LeaseEnd, tokio::task::JoinError>) -> MetaError {
    match end {
        Ok(LeaseEnd::Lost(why)) => meta.unavailable(why),
        Ok(LeaseEnd::Cancelled) => meta.unavailable("lease keeper cancelled"),
        Err(e) => meta.unavailable(format!("lease keeper failed: {e}")),
    }
}

/// What the leader does besides answering the API: place the partitions of tables still
/// `creating` on the registered nodes, move full dups along ([`super::full`]), and refresh
/// the gauges. Returns only when the election
/// key is gone (the fence failed): another coordinator leads, or an operator deleted the key.
async fn leader_duties(shared: &Arc<Shared>, meta: &MetaStore) -> MetaError {
    let every = shared.config.coordinator.reconcile_interval;
    let mut stalls = super::full::Stalls::default();
    let mut last_error: Option<String> = None;
    loop {
        let step = async {
            if !meta.fence_holds().await? {
                return Err(MetaError::FenceLost);
            }
            let nodes = list_nodes(meta).await?;
            let placed = meta.complete_creating_tables(&nodes).await?;
            if placed > 0 {
                tracing::info!(tables = placed, nodes = nodes.len(), "placed partitions");
            }
            super::full::advance(&shared.config, &shared.metrics, meta, &mut stalls).await?;
            shared.set_stalls(stalls.snapshot());
            let tables = meta.list_tables().await?;
            shared.metrics.tables.set(tables.len() as i64);
            let dups = meta.all_dups().await?;
            for st in DupStatus::ALL {
                let n = dups.iter().filter(|(_, _, d)| d.status == st).count();
                shared
                    .metrics
                    .dups
                    .get_or_create(&vec![("status".to_string(), st.as_str().to_string())])
                    .set(n as i64);
            }
            Ok::<(), MetaError>(())
        };
        match step.await {
            Ok(()) => {
                shared.etcd_status(None);
                last_error = None;
            }
            Err(MetaError::FenceLost) => return MetaError::FenceLost,
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "the leader's reconcile round failed; retrying");
                    last_error = Some(text);
                }
                shared.etcd_status(Some(&e));
            }
        }
        debug_assert!(shared.stage() >= Stage::Campaigning);
        tokio::time::sleep(every).await;
    }
}
