//! The shipper's HTTP port: `/health` (start-up stage), `/metrics` (Prometheus text) and
//! `GET /replica/duplication?appid=N` (Pegasus's per-replica duplication view, as JSON: one row
//! per (table, dup, partition) of table id `N`, or of every table without `appid`).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::server::Shared;
use crate::status::View;

/// Serves until `cancel` fires. Cancellation-safe.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let app = router(shared);
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "the HTTP server failed");
    }
}

/// Every route.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/replica/duplication", get(duplication))
        .merge(ferry_proc::failpoints::routes())
        .with_state(shared)
}

/// `/health`'s body. Always 200: the stage is the answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    pub stage: String,
    pub cluster: String,
    pub node: String,
    /// The last etcd error, while etcd is unreachable.
    pub etcd_error: Option<String>,
    /// Partitions reported (shipping or paused).
    pub partitions: usize,
    /// Partitions whose shipping election this process holds.
    pub leading: usize,
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Health> {
    let views = s.board.views(None, ferry_log::clock::wall_us());
    Json(Health {
        stage: s.stage().as_str().into(),
        cluster: s.config.cluster.name.clone(),
        node: s.config.shipper.node.clone(),
        etcd_error: s.etcd_error(),
        partitions: views.len(),
        leading: views.iter().filter(|v| v.fencing_token.is_some()).count(),
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    s.board.export(&s.metrics, ferry_log::clock::wall_us());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

#[derive(Debug, Deserialize)]
struct DupQuery {
    appid: Option<String>,
}

/// `GET /replica/duplication`'s body.
#[derive(Debug, Serialize, Deserialize)]
pub struct Duplications {
    pub duplications: Vec<View>,
}

async fn duplication(
    State(s): State<Arc<Shared>>,
    Query(q): Query<DupQuery>,
) -> Result<Json<Duplications>, (StatusCode, Json<serde_json::Value>)> {
    let appid = match q.appid.as_deref().map(str::parse::<u32>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return Err((
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({
                    "error": "appid must be a table id (a non-negative integer); see `ferry table list`"
                })),
            ))
        }
    };
    Ok(Json(Duplications {
        duplications: s.board.views(appid, ferry_log::clock::wall_us()),
    }))
}
