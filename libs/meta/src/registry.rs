//! The node registry: `/ferry/<cluster>/nodes/<node>` bound to a lease, kept alive by a task.
//! A node that dies stops renewing, and etcd deletes its key within the lease TTL.
//!
//! A node calls, at start-up, after [`crate::check_cluster_config`]:
//!
//! ```no_run
//! # async fn f() -> Result<(), ferry_meta::MetaError> {
//! use std::time::Duration;
//! use ferry_meta::{register_node, MetaStore, NodeInfo};
//! let meta = MetaStore::connect(&["http://127.0.0.1:2379".into()], "bj", Duration::from_secs(3)).await?;
//! let info = NodeInfo::new("bj-n1", "127.0.0.1:6379");
//! let registration = register_node(&meta, info, Duration::from_secs(5)).await?;
//! // ... serve ...
//! registration.deregister().await; // on clean shutdown; a crash lets the lease expire
//! # Ok(()) }
//! ```
//!
//! While etcd is unreachable the task keeps trying with bounded backoff; if the lease expired
//! meanwhile it registers again under a new lease when etcd is back.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Map;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::valid_name;
use crate::keys::Keys;
use crate::{decode, encode, now_ms, MetaError, MetaStore};

/// `nodes/<node>`: how to reach a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's name, unique in the cluster (the key's last segment).
    pub name: String,
    /// Client (RESP) address.
    pub resp_addr: String,
    /// Receiver QUIC address, if a receiver runs beside the node.
    #[serde(default)]
    pub receiver_addr: Option<String>,
    /// HTTP address (`/metrics`, `/health`).
    #[serde(default)]
    pub http_addr: Option<String>,
    /// The table the node serves (its config's `table`); `None` from a node that does not say,
    /// which may be given any table.
    #[serde(default)]
    pub table: Option<String>,
    /// When this registration was made, ms since the Unix epoch.
    pub registered_at_ms: u64,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, serde_json::Value>,
}

impl NodeInfo {
    /// A node with a name and a client address; set the optional fields directly.
    pub fn new(name: &str, resp_addr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            resp_addr: resp_addr.into(),
            receiver_addr: None,
            http_addr: None,
            table: None,
            registered_at_ms: now_ms(),
            extra: Map::new(),
        }
    }
}

impl NodeInfo {
    /// Whether the node can host partitions of `table`.
    pub fn serves(&self, table: &str) -> bool {
        self.table.as_deref().is_none_or(|t| t == table)
    }
}

/// The names of the nodes that can host `table`, or an error that says why none can (while
/// no node is registered at all, the empty list: the table waits for nodes).
pub fn nodes_for(nodes: &[NodeInfo], cluster: &str, table: &str) -> Result<Vec<String>, MetaError> {
    let able: Vec<String> = nodes
        .iter()
        .filter(|n| n.serves(table))
        .map(|n| n.name.clone())
        .collect();
    if able.is_empty() && !nodes.is_empty() {
        let serving: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} serves `{}`", n.name, n.table.as_deref().unwrap_or("?")))
            .collect();
        return Err(MetaError::Invalid(format!(
            "no node of cluster {cluster} serves table `{table}` ({}); a node serves the one \
             table its config names (`table`), so start a node with `table = \"{table}\"`, \
             then create the table",
            serving.join(", ")
        )));
    }
    Ok(able)
}

/// `receivers/<node>`: how shippers of other clusters reach the receiver beside a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiverInfo {
    /// The node the receiver writes for (its data dir is that node's).
    pub node: String,
    /// The receiver's QUIC address, as shippers in other datacenters dial it.
    pub addr: String,
    /// When this registration was made, ms since the Unix epoch.
    pub registered_at_ms: u64,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, serde_json::Value>,
}

impl ReceiverInfo {
    pub fn new(node: &str, addr: &str) -> ReceiverInfo {
        ReceiverInfo {
            node: node.into(),
            addr: addr.into(),
            registered_at_ms: now_ms(),
            extra: Map::new(),
        }
    }
}

/// Something registered under a lease: its key, and its value re-stamped on every
/// re-registration.
pub trait Registrable: Serialize + Send + Sync + 'static {
    /// The name it is registered under (validated, and used in logs).
    fn name(&self) -> &str;
    /// Its key.
    fn key(&self, keys: &Keys) -> String;
    /// Stamps the registration time.
    fn touch(&mut self);
}

impl Registrable for NodeInfo {
    fn name(&self) -> &str {
        &self.name
    }
    fn key(&self, keys: &Keys) -> String {
        keys.node(&self.name)
    }
    fn touch(&mut self) {
        self.registered_at_ms = now_ms();
    }
}

impl Registrable for ReceiverInfo {
    fn name(&self) -> &str {
        &self.node
    }
    fn key(&self, keys: &Keys) -> String {
        keys.receiver(&self.node)
    }
    fn touch(&mut self) {
        self.registered_at_ms = now_ms();
    }
}

/// A live registration. Dropping it stops the renewals (the key disappears within the TTL);
/// [`Registration::deregister`] removes the key at once.
pub struct Registration {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    lease: watch::Receiver<Option<i64>>,
    meta: MetaStore,
}

impl Registration {
    /// The current lease, or `None` while the registration is lost and being re-made.
    pub fn lease_id(&self) -> Option<i64> {
        *self.lease.borrow()
    }

    /// Stops renewing and revokes the lease, which deletes the key now.
    pub async fn deregister(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let lease = *self.lease.borrow();
        if let Some(id) = lease {
            self.meta.revoke_lease(id).await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Registers a node under a lease of `ttl` and keeps it alive in a background task.
/// Fails if etcd cannot be reached now; the caller decides whether to retry.
pub async fn register_node(
    meta: &MetaStore,
    info: NodeInfo,
    ttl: Duration,
) -> Result<Registration, MetaError> {
    register(meta, info, ttl).await
}

/// Registers a receiver under `receivers/<node>` with a lease of `ttl`, kept alive like
/// [`register_node`]'s.
pub async fn register_receiver(
    meta: &MetaStore,
    info: ReceiverInfo,
    ttl: Duration,
) -> Result<Registration, MetaError> {
    register(meta, info, ttl).await
}

async fn register<T: Registrable>(
    meta: &MetaStore,
    info: T,
    ttl: Duration,
) -> Result<Registration, MetaError> {
    if !valid_name(info.name()) {
        return Err(MetaError::Invalid(format!(
            "node name `{}` is not valid; use 1 to 64 letters, digits, `.`, `-` or `_`",
            info.name()
        )));
    }
    let lease = put_under_new_lease(meta, &info, ttl).await?;
    let (tx, rx) = watch::channel(Some(lease));
    let cancel = CancellationToken::new();
    let task = tokio::spawn(keep_registered(
        meta.clone(),
        info,
        ttl,
        lease,
        tx,
        cancel.clone(),
    ));
    Ok(Registration {
        cancel,
        task: Some(task),
        lease: rx,
        meta: meta.clone(),
    })
}

/// Every registered node, sorted by name.
pub async fn list_nodes(meta: &MetaStore) -> Result<Vec<NodeInfo>, MetaError> {
    let prefix = meta.keys().nodes();
    let mut out = Vec::new();
    for kv in meta.get_prefix(prefix.clone()).await? {
        if Keys::leaf(kv.key(), &prefix).is_some() {
            out.push(decode(&kv)?);
        }
    }
    Ok(out)
}

/// Every registered receiver, sorted by node name.
pub async fn list_receivers(meta: &MetaStore) -> Result<Vec<ReceiverInfo>, MetaError> {
    let prefix = meta.keys().receivers();
    let mut out = Vec::new();
    for kv in meta.get_prefix(prefix.clone()).await? {
        if Keys::leaf(kv.key(), &prefix).is_some() {
            out.push(decode(&kv)?);
        }
    }
    Ok(out)
}

/// How [`keep_lease_alive`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The token was cancelled.
    Cancelled,
    /// The lease expired, or may have: no renewal succeeded within the TTL.
    Lost(String),
}

/// Renews lease `id` every `ttl / 3` until cancelled or lost. Returns
/// [`LeaseEnd::Lost`] as soon as the lease may have expired: etcd said so, or no renewal sent
/// within the last `ttl` succeeded. Backs off (bounded by `ttl / 3`) while etcd is down, never
/// spins. Cancellation-safe.
pub async fn keep_lease_alive(
    meta: &MetaStore,
    id: i64,
    ttl: Duration,
    cancel: &CancellationToken,
) -> LeaseEnd {
    let period = ttl / 3;
    let t = meta.timeout().min(period.max(Duration::from_millis(200)));
    // The lease may expire `ttl` after the last renewal etcd accepted; a renewal is counted
    // from when it was *sent*, so this deadline is never later than etcd's.
    let mut deadline = Instant::now() + ttl;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut lc = meta.client().lease_client();
        if let Ok(Ok((mut keeper, mut stream))) = tokio::time::timeout(t, lc.keep_alive(id)).await {
            backoff = Duration::from_millis(100);
            loop {
                let sent = Instant::now();
                let answer = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(t, answer).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        deadline = sent + Duration::from_secs(resp.ttl() as u64).min(ttl);
                    }
                    Ok(Ok(Some(_))) => return LeaseEnd::Lost(format!("lease {id:x} expired")),
                    _ => break,
                }
                tokio::select! {
                    _ = cancel.cancelled() => return LeaseEnd::Cancelled,
                    _ = tokio::time::sleep(period) => {}
                }
            }
        }
        if Instant::now() >= deadline {
            return LeaseEnd::Lost(format!(
                "lease {id:x} could not be renewed within {}ms",
                ttl.as_millis()
            ));
        }
        tokio::select! {
            _ = cancel.cancelled() => return LeaseEnd::Cancelled,
            _ = tokio::time::sleep(backoff.min(deadline - Instant::now())) => {}
        }
        backoff = (backoff * 2).min(period);
    }
}

async fn put_under_new_lease<T: Registrable>(
    meta: &MetaStore,
    info: &T,
    ttl: Duration,
) -> Result<i64, MetaError> {
    let lease = meta.grant_lease(ttl).await?;
    let mut kv = meta.client().kv_client();
    let opts = etcd_client::PutOptions::new().with_lease(lease);
    meta.deadline(kv.put(info.key(meta.keys()), encode(info), Some(opts)))
        .await?;
    Ok(lease)
}

/// The registration task: keep the lease alive; if it is lost, register again.
async fn keep_registered<T: Registrable>(
    meta: MetaStore,
    mut info: T,
    ttl: Duration,
    mut lease: i64,
    tx: watch::Sender<Option<i64>>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    let max_backoff = meta.timeout().max(Duration::from_secs(1));
    loop {
        match keep_lease_alive(&meta, lease, ttl, &cancel).await {
            LeaseEnd::Cancelled => return,
            LeaseEnd::Lost(why) => {
                tracing::warn!(name = %info.name(), %why, "registration lost; registering again");
                let _ = tx.send(None);
            }
        }
        loop {
            info.touch();
            match put_under_new_lease(&meta, &info, ttl).await {
                Ok(id) => {
                    lease = id;
                    let _ = tx.send(Some(id));
                    tracing::info!(name = %info.name(), lease = id, "registered again");
                    backoff = Duration::from_millis(200);
                    break;
                }
                Err(e) => tracing::debug!(name = %info.name(), error = %e, "register failed"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }
}
