//! Failpoints (the `fail` crate) at the places where ferry meets the disk and the network, for
//! fault tests on real processes. They are compiled in only when the build enables
//! `fail/failpoints` (`cargo build --features ferry-tests/failpoints`, as `scripts/test.sh`
//! does); a normal build has none, and these routes then say so.
//!
//! A process configures them from `FAILPOINTS` (`name=actions;...`) at start-up, and at run time
//! over its HTTP port: `PUT /fail/<name>` with the actions as the body (`return`, `return(arg)`,
//! `3*return`, `off`, ...; see `fail::cfg`), `DELETE /fail/<name>`, `GET /fail`.
//!
//! | name | where | `return(arg)` |
//! | --- | --- | --- |
//! | `plog-append` | `ferry_log::plog::PlogWriter::append` | `enospc` for a full disk, else EIO |
//! | `plog-fsync` | `ferry_log::plog::PlogWriter::sync` (inbox, and a plog's own fsyncs) | EIO |
//! | `nodelog-fsync` | `ferry_log::nodelog::NodeLog` commits (the node's group commit) | (none) EIO |
//! | `nodelog-hold-plogs` | the commit log's background thread | (none) it syncs no plog, so a test can drop their unsynced tails |
//! | `inbox-append` | `ferry_log::inbox::InboxWriter::append` | a decree: fail only batches holding that decree with its ops |
//! | `rocksdb-write` | `ferry_engine::engine::Engine::write` | an error from RocksDB |
//! | `fence-store` | the receiver's fencing-token file | EIO |
//! | `frame-send` | `ferry_net::send_frame` | the stream is reset |
//! | `failover-hold` | the coordinator leader's failover loop | a step name: the leader does not advance failovers in that step |
//! | `failover-blind` | the source coordinator's failover loop | (none) it does not see the target's answers, as if they were lost |

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

/// Whether this build has failpoints.
pub fn compiled_in() -> bool {
    fail::has_failpoints()
}

/// The argument failpoint `name` returns now (`Some("")` for a bare `return`) if it is set to
/// return; always `None` in a build without failpoints.
pub fn returned(name: &str) -> Option<String> {
    fn eval(name: &str) -> Option<String> {
        fail::fail_point!(name, |arg: Option<String>| Some(arg.unwrap_or_default()));
        let _ = name;
        None
    }
    eval(name)
}

/// Configures the failpoints named in `FAILPOINTS`. A malformed entry is logged and skipped.
pub fn setup_from_env() {
    if !compiled_in() {
        return;
    }
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return;
    };
    for entry in spec.split(';').filter(|e| !e.trim().is_empty()) {
        match entry.split_once('=') {
            Some((name, actions)) => match fail::cfg(name.trim(), actions.trim()) {
                Ok(()) => tracing::warn!(name, actions, "failpoint configured"),
                Err(e) => tracing::error!(entry, error = %e, "bad FAILPOINTS entry; ignored"),
            },
            None => tracing::error!(entry, "bad FAILPOINTS entry (want name=actions); ignored"),
        }
    }
}

/// `GET /fail`, `PUT /fail/{name}`, `DELETE /fail/{name}`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/fail", get(list))
        .route("/fail/{name}", axum::routing::put(set).delete(remove))
}

const NOT_BUILT: &str =
    "this build has no failpoints; build with `--features ferry-tests/failpoints`\n";

async fn list() -> (StatusCode, String) {
    if !compiled_in() {
        return (StatusCode::NOT_FOUND, NOT_BUILT.into());
    }
    let mut out = String::new();
    for (name, actions) in fail::list() {
        out.push_str(&format!("{name}={actions}\n"));
    }
    (StatusCode::OK, out)
}

async fn set(Path(name): Path<String>, actions: String) -> (StatusCode, String) {
    if !compiled_in() {
        return (StatusCode::NOT_FOUND, NOT_BUILT.into());
    }
    match fail::cfg(name.as_str(), actions.trim()) {
        Ok(()) => {
            tracing::warn!(%name, actions = actions.trim(), "failpoint configured");
            (StatusCode::OK, format!("{name}={}\n", actions.trim()))
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("failpoint {name}: {e}; see the `fail` crate's cfg for the syntax\n"),
        ),
    }
}

async fn remove(Path(name): Path<String>) -> (StatusCode, String) {
    if !compiled_in() {
        return (StatusCode::NOT_FOUND, NOT_BUILT.into());
    }
    fail::remove(name.as_str());
    tracing::warn!(%name, "failpoint removed");
    (StatusCode::OK, format!("{name} removed\n"))
}
