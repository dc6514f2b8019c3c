//! The node's HTTP port: `/health` (the start-up stage reached, as JSON) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::server::{Node, NodeConfig, StageCell};

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
        Some(node) => node.metrics.encode(&node.table),
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
