//! The coordinator process: start-up sequence, election, and the admin HTTP API.
//!
//! Start-up, in order, each stage visible on `/health`:
//! `loading_config` → `connecting_etcd` → `checking_config` → `campaigning` → `leader`.
//! The HTTP server starts first so that the stage can be watched; admin calls made before this
//! instance knows a leader are answered with a retryable error.
//!
//! etcd going away never ends the process: every loop that talks to etcd backs off (bounded by
//! `coordinator.reconnect_backoff_max`) and tries again; a leader that cannot renew its lease
//! steps down before the lease can have expired.

pub mod election;
pub mod failover;
pub mod forced;
pub mod full;
pub mod http;
pub mod metrics;
pub mod verify;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::CoordinatorConfig;
use ferry_meta::{self as meta, MetaError, MetaStore};

pub use metrics::Metrics;

/// How far start-up has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Reading and validating the config file.
    LoadingConfig,
    /// Waiting for etcd to answer.
    ConnectingEtcd,
    /// Comparing the config with `/ferry/<cluster>/config`.
    CheckingConfig,
    /// In the election, as a standby.
    Campaigning,
    /// Leading: serving the admin API.
    Leader,
}

impl Stage {
    /// The name shown on `/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::LoadingConfig => "loading_config",
            Stage::ConnectingEtcd => "connecting_etcd",
            Stage::CheckingConfig => "checking_config",
            Stage::Campaigning => "campaigning",
            Stage::Leader => "leader",
        }
    }
}

/// What the HTTP handlers and the election task share.
pub struct Shared {
    /// The validated config.
    pub config: CoordinatorConfig,
    /// Unfenced metadata handle, for reads and the election.
    pub meta: MetaStore,
    /// Metrics.
    pub metrics: Metrics,
    /// Client used to forward admin calls to the leader.
    pub http: reqwest::Client,
    /// Wakes the leader's failover loop ([`failover::drive`]) when one starts.
    pub failover_wake: tokio::sync::Notify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    stages: Vec<Stage>,
    /// The fenced handle, while leading.
    leader_meta: Option<MetaStore>,
    etcd_error: Option<String>,
    /// What each full dup waits for, as the leader's last round found it.
    stalls: std::collections::HashMap<(String, ferry_proto::DupId), String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a handler panicked while holding it; the state is still plain
        // data, so keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that start-up reached `stage`.
    pub fn reach(&self, stage: Stage) {
        let mut s = self.lock();
        if s.stages.last() != Some(&stage) {
            s.stages.push(stage);
        }
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.lock()
            .stages
            .last()
            .copied()
            .unwrap_or(Stage::LoadingConfig)
    }

    /// Every stage reached, in order.
    pub fn stages(&self) -> Vec<Stage> {
        self.lock().stages.clone()
    }

    /// The fenced handle if this instance leads.
    pub fn leader_meta(&self) -> Option<MetaStore> {
        self.lock().leader_meta.clone()
    }

    fn set_leader(&self, meta: Option<MetaStore>) {
        let leading = meta.is_some();
        self.lock().leader_meta = meta;
        self.metrics.is_leader.set(i64::from(leading));
        if leading {
            self.metrics.leader_elections.inc();
            self.reach(Stage::Leader);
        } else if self.stage() == Stage::Leader {
            self.reach(Stage::Campaigning);
        }
    }

    /// Notes an etcd failure (for `/health` and metrics) or recovery (`None`).
    pub fn etcd_status(&self, err: Option<&MetaError>) {
        if err.is_some() {
            self.metrics.etcd_errors.inc();
        }
        self.lock().etcd_error = err.map(|e| e.to_string());
    }

    /// The last etcd error, while etcd is unreachable.
    /// What full dup (`table`, `dupid`) waits for, if anything.
    pub fn stall(&self, table: &str, dupid: ferry_proto::DupId) -> Option<String> {
        self.lock().stalls.get(&(table.to_owned(), dupid)).cloned()
    }

    /// Records what every full dup waits for (the leader, after each round).
    pub fn set_stalls(
        &self,
        stalls: std::collections::HashMap<(String, ferry_proto::DupId), String>,
    ) {
        self.lock().stalls = stalls;
    }

    pub fn etcd_error(&self) -> Option<String> {
        self.lock().etcd_error.clone()
    }
}

/// Runs a coordinator until `cancel` fires. Returns an error only for what retrying cannot fix
/// (the listen address is taken, the config differs from the cluster's).
pub async fn run(config: CoordinatorConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let meta = MetaStore::connect(
        &config.etcd.endpoints,
        &config.cluster.name,
        config.coordinator.etcd_timeout,
    )
    .await
    .context("create the etcd client")?;
    let http = reqwest::Client::builder()
        .timeout(config.coordinator.etcd_timeout * 3)
        .build()
        .context("create the HTTP client")?;
    let shared = Arc::new(Shared {
        config,
        meta,
        metrics: Metrics::new(),
        http,
        failover_wake: tokio::sync::Notify::new(),
        state: Mutex::new(State::default()),
    });
    shared.reach(Stage::LoadingConfig);

    let listener = tokio::net::TcpListener::bind(shared.config.coordinator.listen)
        .await
        .with_context(|| format!("listen on {}", shared.config.coordinator.listen))?;
    let server = tokio::spawn(http::serve(listener, shared.clone(), cancel.clone()));

    shared.reach(Stage::ConnectingEtcd);
    let backoff_max = shared.config.coordinator.reconnect_backoff_max;
    let connected = retry(&shared, &cancel, backoff_max, || shared.meta.ping()).await;
    if connected.is_none() {
        return Ok(());
    }

    shared.reach(Stage::CheckingConfig);
    let checked = loop {
        match meta::init_or_check_cluster_config(&shared.meta, &shared.config.cluster).await {
            Ok(created) => break created,
            Err(e @ MetaError::Unavailable { .. }) => {
                shared.etcd_status(Some(&e));
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff_max.min(Duration::from_secs(1))) => {}
                }
            }
            Err(e) => {
                cancel.cancel();
                let _ = server.await;
                return Err(e).context("check this coordinator's config against the cluster's");
            }
        }
    };
    shared.etcd_status(None);
    if checked {
        tracing::info!(cluster = %shared.config.cluster.name, "stored the cluster config");
    }

    shared.reach(Stage::Campaigning);
    election::run(shared.clone(), cancel.clone()).await;
    let _ = server.await;
    Ok(())
}

/// Calls `op` until it succeeds, backing off from 100ms up to `max`. `None` if cancelled.
async fn retry<T, F, Fut>(
    shared: &Shared,
    cancel: &CancellationToken,
    max: Duration,
    mut op: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MetaError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => {
                shared.etcd_status(None);
                return Some(v);
            }
            Err(e) => {
                tracing::debug!(error = %e, "etcd request failed; retrying");
                shared.etcd_status(Some(&e));
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}
