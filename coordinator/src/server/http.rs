//! The admin HTTP API (routes listed in [`ferry_admin::api`]), `/health` and `/metrics`.
//!
//! Admin routes run only on the leader. A standby forwards them to the leader it finds in the
//! election and relays the answer; a request that was already forwarded once, or a leader that
//! cannot be reached, is answered 503 with the leader's address, so nothing loops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use ferry_proto::DupId;

use super::{election, Shared};
use ferry_admin::api::{
    AbortFailover, AddDup, CoordinatorView, CopyPartition, CopyView, CreateTable, DupView,
    ErrorBody, FailoverView, FollowTable, ForceFailover, HealthView, InstallComplete,
    PartitionReceiver, PegasusAppDuplication, PegasusDup, RebootstrapView, RecoverFailover,
    SetFailMode, SetRate, SetTableState, StartFailover, StatusView, TableDetail, TableDigest,
    TableReceivers, TableView, TakeOver, Verify, VerifyView,
};
use ferry_meta::failover::Role;
use ferry_meta::status::{DupEvent, DupStatus, FailMode};
use ferry_meta::{
    list_nodes, nodes_for, now_ms, DupInfo, DupMode, MetaError, MetaStore, TableState,
};

/// Header set on a forwarded request (its value names the standby that forwarded it).
pub const FORWARDED_BY: &str = "x-ferry-forwarded-by";
/// Header naming the leader on a standby's refusal.
pub const LEADER_HEADER: &str = "x-ferry-leader";
/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// Serves until `cancel` fires. Cancellation-safe.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "admin HTTP server failed");
    }
}

/// Every route.
pub fn router(shared: Arc<Shared>) -> Router {
    let admin = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/tables", get(list_tables).post(create_table))
        .route("/v1/tables/{table}", get(describe_table).delete(drop_table))
        .route("/v1/tables/{table}/state", put(set_table_state))
        .route("/v1/tables/{table}/receivers", get(table_receivers))
        .route("/v1/tables/{table}/follow", post(follow_table))
        .route(
            "/v1/tables/{table}/install_complete",
            post(install_complete),
        )
        .route("/v1/tables/{table}/dups", get(list_dups).post(add_dup))
        .route(
            "/v1/tables/{table}/dups/{dupid}",
            get(one_dup).delete(remove_dup),
        )
        .route("/v1/tables/{table}/dups/{dupid}/copy", get(dup_copy))
        .route("/v1/tables/{table}/dups/{dupid}/pause", post(pause_dup))
        .route("/v1/tables/{table}/dups/{dupid}/start", post(start_dup))
        .route(
            "/v1/tables/{table}/dups/{dupid}/fail_mode",
            put(set_fail_mode),
        )
        .route("/v1/tables/{table}/dups/{dupid}/rate", put(set_rate))
        .route(
            "/v1/tables/{table}/failover",
            get(get_failover).post(start_failover),
        )
        .route("/v1/tables/{table}/failover/take_over", post(take_over))
        .route("/v1/tables/{table}/failover/abort", post(abort_failover))
        .route("/v1/tables/{table}/failover/force", post(force_failover))
        .route("/v1/tables/{table}/digest", get(table_digest))
        .route("/v1/tables/{table}/verify", post(verify_table))
        .route(
            "/v1/tables/{table}/failover/recover",
            post(recover_failover),
        )
        .route("/meta/app/duplication", get(pegasus_app_duplication))
        .layer(middleware::from_fn_with_state(shared.clone(), leader_only));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(ferry_proc::failpoints::routes())
        .merge(admin)
        .with_state(shared)
}

/// An error answer: a status code and one sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    leader: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            leader: None,
        }
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> ApiError {
        let status = match &e {
            MetaError::NoSuchTable(_) | MetaError::NoSuchDup { .. } => StatusCode::NOT_FOUND,
            MetaError::TableExists(_)
            | MetaError::IllegalTransition { .. }
            | MetaError::Conflict(_)
            | MetaError::Contended { .. } => StatusCode::CONFLICT,
            MetaError::Invalid(_) => StatusCode::BAD_REQUEST,
            MetaError::Unavailable { .. } | MetaError::FenceLost => StatusCode::SERVICE_UNAVAILABLE,
            MetaError::Corrupt { .. }
            | MetaError::ConfigMismatch { .. }
            | MetaError::ConfigMissing(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(addr) = self.leader.and_then(|a| HeaderValue::from_str(&a).ok()) {
            resp.headers_mut().insert(LEADER_HEADER, addr);
        }
        resp
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs admin routes on the leader; forwards them from a standby.
async fn leader_only(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let resp = if shared.leader_meta().is_some() {
        next.run(req).await
    } else {
        match forward(&shared, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    };
    shared
        .metrics
        .admin_requests
        .get_or_create(&vec![
            ("method".to_string(), method),
            ("code".to_string(), resp.status().as_u16().to_string()),
        ])
        .inc();
    resp
}

async fn forward(shared: &Shared, req: Request) -> Result<Response, ApiError> {
    let me = shared.config.instance_id();
    let unavailable = |msg: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg);
    let leader = election::leader_addr(&shared.meta).await?;
    let Some(addr) = leader else {
        return Err(unavailable(format!(
            "no coordinator of cluster {} leads yet (an election is in progress); retry in a few seconds",
            shared.config.cluster.name
        )));
    };
    let standby = |msg: String| ApiError {
        leader: Some(addr.clone()),
        ..unavailable(msg)
    };
    if addr == shared.config.advertise() {
        return Err(standby(format!(
            "coordinator {me} is taking over or handing over the leadership; retry in a few seconds"
        )));
    }
    if req.headers().contains_key(FORWARDED_BY) {
        return Err(standby(format!(
            "coordinator {me} is a standby; the leader is at {addr}"
        )));
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let body = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        })?;
    let answer = shared
        .http
        .request(method, format!("http://{addr}{path}"))
        .header(FORWARDED_BY, me.clone())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            return Err(standby(format!(
                "coordinator {me} is a standby and cannot reach the leader at {addr} ({}); retry in a few seconds",
                e.without_url()
            )))
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let bytes = answer.bytes().await.map_err(|e| {
        standby(format!(
            "coordinator {me} is a standby and lost the leader's answer ({}); retry",
            e.without_url()
        ))
    })?;
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    Ok(resp)
}

fn leader(shared: &Shared) -> Result<MetaStore, ApiError> {
    shared.leader_meta().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this coordinator just lost its leadership; retry in a few seconds",
        )
    })
}

async fn health(State(shared): State<Arc<Shared>>) -> Json<HealthView> {
    let leader = if shared.leader_meta().is_some() {
        Some(shared.config.advertise())
    } else {
        // Bounded: /health must answer quickly even while etcd is away.
        tokio::time::timeout(Duration::from_secs(1), election::leader_addr(&shared.meta))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
    };
    Json(HealthView {
        process: "coordinator".into(),
        cluster: shared.config.cluster.name.clone(),
        id: shared.config.instance_id(),
        stage: shared.stage().as_str().into(),
        stages: shared
            .stages()
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        leader,
        etcd_error: shared.etcd_error(),
    })
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn status(State(shared): State<Arc<Shared>>) -> ApiResult<StatusView> {
    let meta = leader(&shared)?;
    let me = shared.config.advertise();
    let coordinators = election::candidates(&meta)
        .await?
        .into_iter()
        .map(|c| CoordinatorView {
            leader: c.addr == me,
            id: c.id,
            addr: c.addr,
        })
        .collect();
    let mut dups = std::collections::BTreeMap::new();
    let mut progress = Vec::new();
    let mut copies = Vec::new();
    let mut rebootstraps = Vec::new();
    let now = ferry_meta::now_ms();
    for (table, dupid, d) in meta.all_dups().await? {
        *dups.entry(d.status.as_str().to_string()).or_insert(0) += 1;
        let Ok(info) = meta.table(&table).await else {
            continue;
        };
        if d.mode == DupMode::Full && d.status != DupStatus::Removed {
            let copy = copy_view(&shared, &meta, &table, dupid, &d).await?;
            if copy.complete < info.partition_count {
                copies.push(copy);
            }
        }
        if d.status != DupStatus::Removed {
            rebootstraps
                .extend(rebootstrap_views(&meta, &table, dupid, info.partition_count).await?);
        }
        for p in 0..info.partition_count {
            let Some(pr) = meta
                .progress(&table, dupid, ferry_proto::PartitionId(p))
                .await?
            else {
                continue;
            };
            let pending = pr.committed_decree.0.saturating_sub(pr.confirmed_decree.0);
            progress.push(ferry_admin::api::ProgressView {
                table: table.clone(),
                dupid,
                remote: d.remote.clone(),
                status: d.status.as_str().to_string(),
                partition: p,
                confirmed_decree: pr.confirmed_decree.0,
                committed_decree: pr.committed_decree.0,
                pending_mutations: pending,
                lag_ms: if pending == 0 || pr.last_confirmed_timestamp_ms == 0 {
                    0
                } else {
                    now.saturating_sub(pr.last_confirmed_timestamp_ms)
                },
                age_ms: now.saturating_sub(pr.updated_at_ms),
                last_error: pr.last_error.clone(),
            });
        }
    }
    Ok(Json(StatusView {
        cluster: shared.config.cluster.name.clone(),
        cluster_id: shared.config.cluster.id,
        leader: me,
        coordinators,
        nodes: list_nodes(&meta).await?,
        tables: meta.list_tables().await?.len(),
        dups,
        progress,
        copies,
        rebootstraps,
        failovers: meta.failovers().await?,
    }))
}

async fn list_tables(State(shared): State<Arc<Shared>>) -> ApiResult<Vec<TableView>> {
    let meta = leader(&shared)?;
    let tables = meta.list_tables().await?;
    Ok(Json(
        tables
            .into_iter()
            .map(|(name, info)| TableView { name, info })
            .collect(),
    ))
}

async fn create_table(
    State(shared): State<Arc<Shared>>,
    Json(req): Json<CreateTable>,
) -> ApiResult<TableDetail> {
    let meta = leader(&shared)?;
    let nodes = nodes_for(
        &list_nodes(&meta).await?,
        &shared.config.cluster.name,
        &req.name,
    )?;
    let desc = meta
        .create_table(&req.name, req.partitions, &nodes, now_ms())
        .await?;
    tracing::info!(table = %req.name, partitions = req.partitions, nodes = nodes.len(), "created table");
    Ok(Json(desc))
}

/// Another cluster's coordinator creates the target table of its full dup here.
async fn follow_table(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<FollowTable>,
) -> ApiResult<TableDetail> {
    let meta = leader(&shared)?;
    let group = &shared.config.cluster.duplication_group;
    let f = &req.follower;
    if group.get(&f.source_cluster) != Some(&f.source_cluster_id)
        || f.source_cluster == shared.config.cluster.name
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "cluster {} (id {}) is not another cluster of this duplication group; it cannot \
                 create a follower table here",
                f.source_cluster, f.source_cluster_id
            ),
        ));
    }
    let nodes = nodes_for(
        &list_nodes(&meta).await?,
        &shared.config.cluster.name,
        &table,
    )?;
    let desc = meta
        .create_follower_table(&table, req.partitions, f.clone(), &nodes, now_ms())
        .await?;
    tracing::info!(%table, partitions = req.partitions, source = %f.source_cluster,
        dupid = %f.dupid, "follower table for a full duplication");
    Ok(Json(desc))
}

/// The source's coordinator reports that its full dup caught up: the install-complete event on
/// this (the target) side.
async fn install_complete(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<InstallComplete>,
) -> ApiResult<TableDetail> {
    let meta = leader(&shared)?;
    let marked = meta
        .mark_install_complete(&table, &req.source_cluster, req.dupid, now_ms())
        .await?;
    for p in &marked {
        tracing::info!(%table, partition = p.0, source = %req.source_cluster, dupid = %req.dupid,
            "install complete: the partition installed the checkpoints and caught up with the log");
    }
    shared.metrics.install_complete("target", marked.len());
    Ok(Json(meta.describe_table(&table).await?))
}

async fn describe_table(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
) -> ApiResult<TableDetail> {
    Ok(Json(leader(&shared)?.describe_table(&table).await?))
}

async fn table_receivers(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
) -> ApiResult<TableReceivers> {
    let meta = leader(&shared)?;
    let desc = meta.describe_table(&table).await?;
    let receivers = ferry_meta::list_receivers(&meta).await?;
    let partitions = desc
        .partitions
        .iter()
        .enumerate()
        .map(|(p, entry)| {
            let node = entry.as_ref().and_then(|e| e.node.clone());
            let receiver_addr = node.as_ref().and_then(|n| {
                receivers
                    .iter()
                    .find(|r| &r.node == n)
                    .map(|r| r.addr.clone())
            });
            PartitionReceiver {
                partition: p as u32,
                node,
                receiver_addr,
            }
        })
        .collect();
    Ok(Json(TableReceivers {
        table,
        partition_count: desc.info.partition_count,
        state: desc.info.state,
        partitions,
    }))
}

async fn drop_table(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
) -> ApiResult<TableView> {
    let meta = leader(&shared)?;
    let info = meta.table(&table).await?;
    meta.drop_table(&table).await?;
    tracing::info!(%table, "dropped table");
    Ok(Json(TableView { name: table, info }))
}

async fn set_table_state(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<SetTableState>,
) -> ApiResult<TableView> {
    let meta = leader(&shared)?;
    let state: TableState = req
        .state
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    if let Some(r) = meta.failover(&table).await?.filter(|r| !r.step.is_final()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "table {table} is in failover {} (step {}); its state is the failover's to set until it ends (`ferry failover -t {table} --status`)",
                r.id, r.step
            ),
        ));
    }
    let last = meta.failover(&table).await?;
    if let Some(r) = last.filter(|r| r.forced && r.role == Role::Source) {
        if state == TableState::Available {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "cluster {} took table {table}'s writes over by a forced failover; making it available here too would have both clusters take writes. Fail back with a planned failover from {}, or take it back by force (`ferry failover -t {table} --to {} --force`) if {} is gone",
                    r.remote, r.remote, shared.config.cluster.name, r.remote
                ),
            ));
        }
    }
    let info = meta.set_table_state(&table, state).await?;
    if state == TableState::Available {
        // The operator's word clears nodes waiting for the return check (a remote gone for
        // good cannot answer it).
        meta.put_checked(&table, "operator").await?;
    }
    tracing::info!(%table, %state, "table state");
    Ok(Json(TableView { name: table, info }))
}

async fn start_failover(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<StartFailover>,
) -> ApiResult<FailoverView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::failover::start(&shared, &meta, &table, &req).await?,
    ))
}

async fn get_failover(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
) -> ApiResult<FailoverView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::failover::view(&meta, &shared.config.cluster.name, &table).await?,
    ))
}

async fn take_over(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<TakeOver>,
) -> ApiResult<FailoverView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::failover::take_over(&shared, &meta, &table, &req).await?,
    ))
}

async fn abort_failover(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<AbortFailover>,
) -> ApiResult<FailoverView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::failover::abort(&shared, &meta, &table, &req).await?,
    ))
}

async fn force_failover(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<ForceFailover>,
) -> ApiResult<FailoverView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::forced::force(&shared, &meta, &table, &req).await?,
    ))
}

async fn table_digest(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
) -> ApiResult<TableDigest> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::verify::table_digest(&shared, &meta, &table)
            .await?
            .map_err(|m| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m))?,
    ))
}

async fn verify_table(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<Verify>,
) -> ApiResult<VerifyView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::verify::verify(&shared, &meta, &table, &req).await?,
    ))
}

async fn recover_failover(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<RecoverFailover>,
) -> ApiResult<FailoverView> {
    let meta = leader(&shared)?;
    Ok(Json(
        super::forced::recover(&shared, &meta, &table, &req).await?,
    ))
}

async fn list_dups(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
) -> ApiResult<Vec<DupView>> {
    let meta = leader(&shared)?;
    let dups = meta.list_dups(&table).await?;
    Ok(Json(
        dups.into_iter()
            .map(|(dupid, info)| DupView {
                dupid,
                table: table.clone(),
                info,
            })
            .collect(),
    ))
}

async fn add_dup(
    State(shared): State<Arc<Shared>>,
    Path(table): Path<String>,
    Json(req): Json<AddDup>,
) -> ApiResult<DupView> {
    let meta = leader(&shared)?;
    let cfg = &shared.config;
    let policy = super::failover::policy(cfg);
    let mut extra = serde_json::Map::new();
    let mode = if req.full {
        policy.check_remote(&table, &req.remote)?;
        super::full::check_remote_table_absent(cfg, &req.remote, &table).await?;
        if let Some(n) = req.remote_partitions {
            if !(1..=ferry_meta::tables::MAX_PARTITIONS).contains(&n) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "--remote-partitions must be 1 to {}, not {n}",
                        ferry_meta::tables::MAX_PARTITIONS
                    ),
                ));
            }
            extra.insert("remote_partitions".into(), n.into());
        }
        if let Some(r) = req.rate_bytes.filter(|r| *r > 0) {
            extra.insert(DupInfo::CHECKPOINT_RATE.into(), r.into());
        }
        DupMode::Full
    } else {
        DupMode::Incremental
    };
    let (dupid, info) = meta
        .add_dup_with(&table, &req.remote, mode, &policy, extra, None, now_ms())
        .await?;
    tracing::info!(%table, %dupid, remote = %req.remote, %mode, status = %info.status, "added dup");
    Ok(Json(DupView { dupid, table, info }))
}

async fn one_dup(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
) -> ApiResult<DupView> {
    let info = leader(&shared)?.dup(&table, DupId(dupid)).await?;
    Ok(Json(DupView {
        dupid: DupId(dupid),
        table,
        info,
    }))
}

/// Where a full dup's copy stands, per partition (for `ferry dup add --full --wait`).
async fn dup_copy(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
) -> ApiResult<CopyView> {
    let meta = leader(&shared)?;
    let dupid = DupId(dupid);
    let info = full_dup(&meta, &table, dupid).await?;
    Ok(Json(copy_view(&shared, &meta, &table, dupid, &info).await?))
}

/// The dup, which must be a full one: an incremental dup copies no checkpoint.
async fn full_dup(meta: &MetaStore, table: &str, dupid: DupId) -> Result<DupInfo, ApiError> {
    let info = meta.dup(table, dupid).await?;
    if info.mode != DupMode::Full {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("dup {dupid} of table {table} is incremental: it copies no checkpoint"),
        ));
    }
    Ok(info)
}

/// A dup's re-bootstrap records, with the transfer of those being sent.
async fn rebootstrap_views(
    meta: &MetaStore,
    table: &str,
    dupid: DupId,
    count: u32,
) -> Result<Vec<RebootstrapView>, MetaError> {
    let records = meta.rebootstraps(table, dupid, count).await?;
    if records.iter().all(Option::is_none) {
        return Ok(Vec::new());
    }
    let transfers = meta.transfers(table, dupid, count).await?;
    let mut out = Vec::new();
    for (p, (r, t)) in records.into_iter().zip(transfers).enumerate() {
        let Some(r) = r else { continue };
        let sending = r.state == ferry_meta::RebootstrapState::Checkpointed;
        out.push(RebootstrapView {
            table: table.to_owned(),
            dupid,
            partition: p as u32,
            generation: r.generation,
            state: r.state,
            reason: r.reason,
            confirmed_decree: r.confirmed.0,
            decree: r.checkpoint.as_ref().map(|c| c.manifest.decree.0),
            checkpoint_bytes: r.checkpoint.as_ref().map(|c| c.manifest.total_bytes()),
            requested_at_ms: r.requested_at_ms,
            done_at_ms: r.done_at_ms,
            transfer: t.filter(|_| sending),
        });
    }
    Ok(out)
}

/// A full dup's copy, per partition, from its checkpoint and transfer records.
async fn copy_view(
    shared: &Shared,
    meta: &MetaStore,
    table: &str,
    dupid: DupId,
    info: &DupInfo,
) -> Result<CopyView, MetaError> {
    let count = meta.table(table).await?.partition_count;
    let checkpoints = meta.checkpoints(table, dupid, count).await?;
    let transfers = meta.transfers(table, dupid, count).await?;
    let mut view = CopyView {
        dupid,
        table: table.to_owned(),
        status: info.status.as_str().into(),
        waiting: shared.stall(table, dupid),
        bytes_done: 0,
        bytes_total: 0,
        rate: 0.0,
        checkpoints: 0,
        staged: 0,
        complete: 0,
        partitions: Vec::new(),
    };
    for (p, (cp, t)) in checkpoints.into_iter().zip(transfers).enumerate() {
        if let Some(cp) = &cp {
            view.checkpoints += 1;
            view.bytes_total += cp.manifest.total_bytes();
            view.complete += u32::from(cp.install_complete_at_ms.is_some());
        }
        // Past DS_APP every checkpoint is on the target.
        let copied = matches!(info.status, DupStatus::Log | DupStatus::Pause);
        match &t {
            Some(t) if !copied => {
                view.bytes_done += t.bytes_done;
                view.rate += t.rate;
                view.staged += u32::from(t.state == "staged");
            }
            _ if copied => {
                view.bytes_done += cp.as_ref().map_or(0, |c| c.manifest.total_bytes());
                view.staged += 1;
            }
            _ => {}
        }
        view.partitions.push(CopyPartition {
            partition: p as u32,
            decree: cp.as_ref().map(|c| c.manifest.decree.0),
            checkpoint_bytes: cp.as_ref().map(|c| c.manifest.total_bytes()),
            transfer: t,
            install_complete_at_ms: cp.and_then(|c| c.install_complete_at_ms),
        });
    }
    Ok(view)
}

async fn pause_dup(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
) -> ApiResult<DupView> {
    dup_event(&shared, table, DupId(dupid), DupEvent::Pause).await
}

async fn start_dup(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
) -> ApiResult<DupView> {
    dup_event(&shared, table, DupId(dupid), DupEvent::Start).await
}

async fn remove_dup(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
) -> ApiResult<DupView> {
    dup_event(&shared, table, DupId(dupid), DupEvent::Remove).await
}

async fn dup_event(
    shared: &Shared,
    table: String,
    dupid: DupId,
    event: DupEvent,
) -> ApiResult<DupView> {
    let meta = leader(shared)?;
    let info = meta.apply_dup_event(&table, dupid, event).await?;
    tracing::info!(%table, %dupid, ?event, status = %info.status, "dup status");
    Ok(Json(DupView { dupid, table, info }))
}

async fn set_fail_mode(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
    Json(req): Json<SetFailMode>,
) -> ApiResult<DupView> {
    let meta = leader(&shared)?;
    let mode: FailMode = req
        .fail_mode
        .parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let info = meta.set_fail_mode(&table, DupId(dupid), mode).await?;
    tracing::info!(%table, dupid, %mode, "dup fail mode");
    Ok(Json(DupView {
        dupid: DupId(dupid),
        table,
        info,
    }))
}

/// A full dup's checkpoint bandwidth (`ferry dup set-rate`); the shippers see it through their
/// dup watch.
async fn set_rate(
    State(shared): State<Arc<Shared>>,
    Path((table, dupid)): Path<(String, u64)>,
    Json(req): Json<SetRate>,
) -> ApiResult<DupView> {
    let meta = leader(&shared)?;
    let dupid = DupId(dupid);
    full_dup(&meta, &table, dupid).await?;
    let info = meta
        .update_dup_extra(
            &table,
            dupid,
            DupInfo::CHECKPOINT_RATE,
            req.rate_bytes.into(),
        )
        .await?;
    tracing::info!(%table, %dupid, rate_bytes = req.rate_bytes, "dup checkpoint rate");
    Ok(Json(DupView { dupid, table, info }))
}

async fn pegasus_app_duplication(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<PegasusAppDuplication> {
    let meta = leader(&shared)?;
    let name = q
        .get("name")
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "add ?name=<table> to the URL"))?;
    let info = meta.table(name).await?;
    let duplications = meta
        .list_dups(name)
        .await?
        .into_iter()
        .map(|(dupid, d)| PegasusDup {
            dupid,
            remote: d.remote,
            status: d.status.as_str().into(),
            create_ts: d.create_timestamp_ms,
            fail_mode: d.fail_mode.as_str().into(),
        })
        .collect();
    Ok(Json(PegasusAppDuplication {
        appid: info.id,
        app_name: name.clone(),
        duplications,
    }))
}
