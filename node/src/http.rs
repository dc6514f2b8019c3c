//! The node's HTTP port: `/health` (the start-up stage reached, as JSON), `/digest` (the
//! table's content digest, to compare clusters) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::{Node, NodeConfig, StageCell};

/// What the HTTP handlers read. The node is there once its table is open.
#[derive(Clone)]
pub struct HttpState {
    pub node: Arc<std::sync::OnceLock<Arc<Node>>>,
    pub stage: Arc<StageCell>,
    pub config: Arc<NodeConfig>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/digest", get(digest))
        .merge(ferry_proc::failpoints::routes())
        .with_state(state)
}

/// `/health`'s body. Always served with 200: the stage is the answer, so a poller can tell
/// "opening" from "not running".
#[derive(Debug, Serialize)]
pub struct Health {
    pub stage: &'static str,
    pub cluster: String,
    pub cluster_id: u8,
    pub node: String,
    pub table: String,
    pub partitions: u32,
    pub connections: i64,
    /// Why writes are refused now (the table is `read_only` or `demoted`), if they are.
    pub writes_refused: Option<String>,
}

async fn health(State(s): State<HttpState>) -> Json<Health> {
    let config = &s.config;
    let node = s.node.get();
    Json(Health {
        stage: s.stage.get().as_str(),
        cluster: config.cluster.clone(),
        cluster_id: config.cluster_id.unwrap_or(0),
        node: config.node_name(),
        table: config.table.clone(),
        partitions: config.partitions,
        connections: node.map_or(0, |n| n.metrics.connections()),
        writes_refused: node.and_then(|n| n.write_block()),
    })
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let body = match s.node.get() {
        Some(node) => node.metrics.encode(
            &node.table,
            node.config.plog_hold_max_bytes,
            node.write_block().is_some(),
            node.commit_log.as_ref().map(|l| l.stats()),
        ),
        None => String::from("# EOF\n"),
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// `/digest`'s body: what two clusters compare to prove they hold the same table (see
/// [`TableDigest`]).
pub use ferry_admin::api::{PartitionDigest, TableDigest};

async fn digest(State(s): State<HttpState>) -> axum::response::Response {
    let Some(node) = s.node.get().cloned() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the table is not open yet\n",
        )
            .into_response();
    };
    let result = tokio::task::spawn_blocking(move || -> Result<TableDigest, String> {
        let mut out = TableDigest {
            table: node.table.name().to_string(),
            entries: 0,
            content_hash: String::new(),
            partitions: Vec::new(),
            applied: Vec::new(),
        };
        let mut sum = 0u64;
        let mut applied: std::collections::BTreeMap<(u8, u32), u64> = Default::default();
        for p in node.table.partitions() {
            // The duplicated writes applied count as much as the clients': the progress before
            // and after the scan must agree too.
            let progress = |p: &ferry_engine::partition::Partition| {
                p.dup_sources().map(|v| {
                    v.into_iter()
                        .map(|(s, pr)| ((s.cluster.get(), s.partition.0), pr.decree.0))
                        .collect::<Vec<_>>()
                })
            };
            let before = (
                p.committed_decree(),
                progress(p).map_err(|e| e.to_string())?,
            );
            let d = p.digests().map_err(|e| e.to_string())?;
            let after = (
                p.committed_decree(),
                progress(p).map_err(|e| e.to_string())?,
            );
            sum = sum.wrapping_add(d.unordered);
            out.entries += d.entries;
            for (source, decree) in &after.1 {
                applied
                    .entry(*source)
                    .and_modify(|a| *a = (*a).min(*decree))
                    .or_insert(*decree);
            }
            out.partitions.push(PartitionDigest {
                partition: p.id().0,
                entries: d.entries,
                digest: format!("{:016x}", d.ordered),
                committed_decree: after.0 .0,
                stable: before == after,
            });
        }
        out.applied = applied
            .into_iter()
            .map(
                |((cluster_id, partition), decree)| ferry_admin::api::AppliedDecree {
                    cluster_id,
                    partition,
                    decree,
                },
            )
            .collect();
        out.content_hash = format!("{sum:016x}");
        Ok(out)
    })
    .await;
    match result {
        Ok(Ok(d)) => Json(d).into_response(),
        Ok(Err(e)) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the table: {e}\n"),
        )
            .into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("digest task failed: {e}\n"),
        )
            .into_response(),
    }
}
