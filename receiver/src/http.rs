//! The receiver's HTTP port: `/health` (the start-up stage reached, as JSON) and `/metrics`
//! (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::server::Status;

pub fn router(status: Arc<Status>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(ferry_proc::failpoints::routes())
        .with_state(status)
}

/// `/health`'s body. Always served with 200: the stage is the answer, so a poller can tell
/// `starting` from "not running".
#[derive(Debug, Serialize)]
pub struct Health {
    /// `starting`, `serving` or `stopping`.
    pub stage: &'static str,
    pub cluster: String,
    pub node: String,
    /// The QUIC address bound, once it is.
    pub quic_addr: Option<String>,
    /// The address registered for shippers, once it is.
    pub advertise: Option<String>,
    /// Open shipping sessions.
    pub sessions: i64,
}

async fn health(State(s): State<Arc<Status>>) -> Json<Health> {
    Json(Health {
        stage: s.stage.get().as_str(),
        cluster: s.cluster.clone(),
        node: s.node.clone(),
        quic_addr: s.quic_addr.get().map(|a| a.to_string()),
        advertise: s.advertise.get().cloned(),
        sessions: s.metrics.sessions.get(),
    })
}

async fn metrics(State(s): State<Arc<Status>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
