//! The node's HTTP port: `/health` (the start-up stage reached, as JSON) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::server::{Node, StageCell};

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub node: Arc<Node>,
    pub stage: Arc<StageCell>,
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
    pub table: String,
    pub partitions: u32,
    pub connections: i64,
}

async fn health(State(s): State<HttpState>) -> Json<Health> {
    let node = &s.node;
    Json(Health {
        stage: s.stage.get().as_str(),
        cluster: node.config.cluster.clone(),
        cluster_id: node.config.cluster_id.unwrap_or(0),
        table: node.table.name().to_string(),
        partitions: node.table.partition_count(),
        connections: node.metrics.connections(),
    })
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let body = s.node.metrics.encode(&s.node.table);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}
