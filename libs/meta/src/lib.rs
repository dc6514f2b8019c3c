//! The cluster's metadata in etcd, under `/ferry/<cluster>/`.
//!
//! [`MetaStore`] is a cheap-to-clone handle (an etcd client plus the cluster's prefix). Every
//! read-modify-write is a compare-and-swap: an etcd transaction that compares the `mod_revision`
//! read before, and retries from a fresh read when another writer got there first. That is how
//! concurrent changes to one dup or table are serialized. A leader's handle also carries a
//! [`Fence`]: its writes succeed only while its election key still exists, so a coordinator that
//! lost its leadership without noticing cannot overwrite the new leader's work.
//!
//! - [`keys`]: every key, in one place.
//! - [`types`]: the stored JSON values.
//! - [`tables`], [`dups`]: tables, partition table, duplications and progress.
//! - [`registry`]: node registration under a lease.
//! - [`cluster_config`]: the stored cluster config and the start-up check.
//! - [`config`]: the config every process of a cluster shares.
//! - [`status`]: the dup status machine, a pure function (no I/O).

pub mod cluster_config;
pub mod config;
pub mod dups;
pub mod failover;
pub mod keys;
pub mod registry;
pub mod status;
pub mod tables;
pub mod types;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp, TxnResponse,
};
use ferry_proto::DupId;

use crate::status::{DupEvent, DupStatus};

pub use cluster_config::{check_cluster_config, init_or_check_cluster_config};
pub use registry::{
    list_nodes, list_receivers, nodes_for, register_node, register_receiver, NodeInfo,
    ReceiverInfo, Registration,
};
pub use types::{
    DupCheckpoint, DupInfo, DupMode, Follower, Installed, PartitionEntry, Progress, Rebootstrap,
    RebootstrapState, TableInfo, TableState, Transfer,
};

/// How many times a compare-and-swap is retried after losing a race before giving up.
const CAS_ATTEMPTS: usize = 16;

/// Something went wrong reading or writing the metadata. Every message is a sentence an operator
/// can act on.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// etcd did not answer (down, unreachable, or too slow).
    #[error(
        "etcd at {endpoints} is unreachable ({reason}); check that etcd is running, then retry"
    )]
    Unavailable {
        /// The configured endpoints.
        endpoints: String,
        /// The transport's message.
        reason: String,
    },
    /// The table does not exist.
    #[error("table {0} does not exist; see `ferry table list`")]
    NoSuchTable(String),
    /// The table already exists.
    #[error("table {0} already exists")]
    TableExists(String),
    /// The dup does not exist in this table.
    #[error("dup {dupid} of table {table} does not exist; see `ferry dup list -t {table}`")]
    NoSuchDup {
        /// The table.
        table: String,
        /// The dupid asked for.
        dupid: DupId,
    },
    /// The status machine refused the event.
    #[error("dup {dupid} of table {table} is in {from}; {}", event.requirement())]
    IllegalTransition {
        /// The table.
        table: String,
        /// The dup.
        dupid: DupId,
        /// Its current status.
        from: DupStatus,
        /// The refused event.
        event: DupEvent,
    },
    /// A request that can never succeed as asked (bad name, unknown remote cluster, ...).
    #[error("{0}")]
    Invalid(String),
    /// The operation conflicts with the current state (e.g. dropping a table that has dups).
    #[error("{0}")]
    Conflict(String),
    /// Too many concurrent writers; the caller may retry.
    #[error("{key} changed {CAS_ATTEMPTS} times while this change was being applied; retry")]
    Contended {
        /// The contended key.
        key: String,
    },
    /// This process's election key is gone: another coordinator leads now.
    #[error(
        "this coordinator lost its leadership while writing; retry, the new leader will answer"
    )]
    FenceLost,
    /// A stored value cannot be decoded.
    #[error("etcd key {key} holds an unreadable value ({reason}); fix or delete it with etcdctl")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoder's message.
        reason: String,
    },
    /// This process's config differs from the cluster's stored one.
    #[error(
        "config field `{field}` is {ours} here but {stored} in etcd key {key}; \
         fix this process's config (the stored one is the cluster's truth)"
    )]
    ConfigMismatch {
        /// The dotted field name.
        field: String,
        /// This process's value.
        ours: String,
        /// The stored value.
        stored: String,
        /// The etcd key.
        key: String,
    },
    /// No coordinator has stored the cluster config yet.
    #[error("etcd key {0} does not exist yet; start a coordinator of this cluster first")]
    ConfigMissing(String),
}

/// Proof of leadership that every leader write is conditioned on: the election key and the
/// revision at which it was created (the fencing token).
#[derive(Debug, Clone)]
pub struct Fence {
    /// The election key owned by this process.
    pub key: Vec<u8>,
    /// Its create revision.
    pub revision: i64,
}

/// A handle to one cluster's metadata. Clones share the connection.
#[derive(Clone)]
pub struct MetaStore {
    client: Client,
    keys: keys::Keys,
    endpoints: String,
    timeout: Duration,
    fence: Option<Fence>,
}

impl MetaStore {
    /// Creates a client for `endpoints`. The connection is made lazily and re-made after etcd
    /// comes back, so this succeeds while etcd is down; requests then fail with
    /// [`MetaError::Unavailable`] after `timeout`.
    pub async fn connect(
        endpoints: &[String],
        cluster: &str,
        timeout: Duration,
    ) -> Result<MetaStore, MetaError> {
        let joined = endpoints.join(",");
        // No gRPC-wide request timeout: a campaign must be able to block for as long as another
        // coordinator leads. Each KV request gets its own deadline instead (`deadline`).
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| MetaError::Unavailable {
                endpoints: joined.clone(),
                reason: e.to_string(),
            })?;
        Ok(MetaStore {
            client,
            keys: keys::Keys::new(cluster),
            endpoints: joined,
            timeout,
            fence: None,
        })
    }

    /// The same store, with every write conditioned on `fence`.
    pub fn with_fence(&self, fence: Fence) -> MetaStore {
        MetaStore {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// The cluster's keys.
    pub fn keys(&self) -> &keys::Keys {
        &self.keys
    }

    /// The raw etcd client, for elections and leases.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Turns an etcd error into [`MetaError::Unavailable`].
    pub fn unavailable(&self, e: impl std::fmt::Display) -> MetaError {
        MetaError::Unavailable {
            endpoints: self.endpoints.clone(),
            reason: short_reason(&e.to_string()),
        }
    }

    /// Checks that etcd answers, e.g. for `/health`.
    pub async fn ping(&self) -> Result<(), MetaError> {
        self.get(self.keys.config()).await.map(|_| ())
    }

    /// One key, or `None`.
    pub async fn get(&self, key: String) -> Result<Option<KeyValue>, MetaError> {
        let mut kv = self.client.kv_client();
        let mut resp = self.deadline(kv.get(key, None)).await?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// etcd's current revision: a key changed after this moment has a larger mod revision.
    pub async fn revision(&self) -> Result<i64, MetaError> {
        let mut kv = self.client.kv_client();
        let resp = self.deadline(kv.get(self.keys.config(), None)).await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Every key under `prefix`, sorted by key.
    pub async fn get_prefix(&self, prefix: String) -> Result<Vec<KeyValue>, MetaError> {
        let mut kv = self.client.kv_client();
        let mut resp = self
            .deadline(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(resp.take_kvs())
    }

    /// Runs `ops` if every compare holds (and, with a fence, the fence holds). Returns whether it
    /// ran; [`MetaError::FenceLost`] when the fence is what failed.
    pub async fn cas(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, MetaError> {
        let mut all = compares;
        if let Some(f) = &self.fence {
            all.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.revision,
            ));
        }
        let resp: TxnResponse = {
            let mut kv = self.client.kv_client();
            self.deadline(kv.txn(Txn::new().when(all).and_then(ops)))
                .await?
        };
        if resp.succeeded() {
            return Ok(true);
        }
        if !self.fence_holds().await? {
            return Err(MetaError::FenceLost);
        }
        Ok(false)
    }

    /// Whether this handle's fence (if any) still holds: the election key exists with the
    /// create revision it had when this process was elected.
    pub async fn fence_holds(&self) -> Result<bool, MetaError> {
        let Some(f) = &self.fence else {
            return Ok(true);
        };
        Ok(self
            .get(String::from_utf8_lossy(&f.key).into_owned())
            .await?
            .is_some_and(|kv| kv.create_revision() == f.revision))
    }

    /// Grants a lease of `ttl` (whole seconds, at least one).
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64, MetaError> {
        let mut lc = self.client.lease_client();
        let ttl = ttl.as_secs().max(1) as i64;
        Ok(self.deadline(lc.grant(ttl, None)).await?.id())
    }

    /// Revokes a lease, which deletes its keys at once. Best effort: an unreachable etcd lets
    /// the lease expire by itself.
    pub async fn revoke_lease(&self, id: i64) {
        let mut lc = self.client.lease_client();
        let _ = self.deadline(lc.revoke(id)).await;
    }

    /// Returns `true` once `key` changed after `revision` (a watch), `false` at once if the watch
    /// could not be set up or ended (the caller reads again, after a pause).
    pub async fn wait_changed(&self, key: &str, revision: i64) -> bool {
        let opts = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(self.timeout, self.client.clone().watch(key, Some(opts))).await
        else {
            return false;
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) if resp.events().is_empty() => continue,
                Ok(Some(_)) => return true,
                _ => return false,
            }
        }
    }

    /// Read-modify-write of one JSON value with compare-and-swap, retried from a fresh read when
    /// another writer got there first. `Ok(None)` if the key does not exist. A change that
    /// leaves the value as it was writes nothing.
    async fn update_json<T>(
        &self,
        key: &str,
        mut change: impl FnMut(&mut T) -> Result<(), MetaError>,
    ) -> Result<Option<T>, MetaError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Clone + PartialEq,
    {
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = self.get(key.to_owned()).await? else {
                return Ok(None);
            };
            let mut value: T = decode(&kv)?;
            let before = value.clone();
            change(&mut value)?;
            if value == before {
                return Ok(Some(value));
            }
            if self
                .cas(
                    vec![unchanged(key, Some(&kv))],
                    vec![TxnOp::put(key, encode(&value), None)],
                )
                .await?
            {
                return Ok(Some(value));
            }
        }
        Err(MetaError::Contended { key: key.into() })
    }

    async fn deadline<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, MetaError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Err(_) => {
                Err(self.unavailable(format!("no answer within {}ms", self.timeout.as_millis())))
            }
        }
    }
}

/// The gist of a transport error: gRPC and tonic nest several layers of debug output, of which
/// an operator needs only the cause.
fn short_reason(full: &str) -> String {
    let lower = full.to_ascii_lowercase();
    let known = [
        ("connection refused", "connection refused"),
        ("tcp connect error", "cannot connect"),
        ("timed out", "timed out"),
        ("deadline", "timed out"),
        ("connection reset", "connection reset"),
        ("broken pipe", "connection lost"),
        ("h2 protocol error", "connection lost"),
        ("no leader", "etcd has no leader"),
    ];
    for (needle, gist) in known {
        if lower.contains(needle) {
            return gist.to_string();
        }
    }
    // Unknown: keep it, but bounded to one readable line.
    let line = full.lines().next().unwrap_or_default();
    line.chars().take(160).collect()
}

/// A name that cannot be a table's (say `a/b`, which would read another key) names no table.
fn known_table(name: &str) -> Result<(), MetaError> {
    if crate::config::valid_name(name) {
        Ok(())
    } else {
        Err(MetaError::NoSuchTable(name.into()))
    }
}

/// Compare: `key` does not exist, or still has the `mod_revision` read before.
fn unchanged(key: &str, seen: Option<&KeyValue>) -> Compare {
    match seen {
        Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
        None => Compare::version(key, CompareOp::Equal, 0),
    }
}

/// Decodes a stored JSON value, naming the key when it cannot.
fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, MetaError> {
    serde_json::from_slice(kv.value()).map_err(|e| MetaError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: e.to_string(),
    })
}

/// Encodes a value for storage.
fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs (string keys, no maps with non-string keys) cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::short_reason;

    #[test]
    fn transport_errors_are_shortened() {
        let tonic = r#"grpc request error: code: 'The service is currently unavailable', message: "tcp connect error", source: tonic::transport::Error(Transport, ConnectError(ConnectError("tcp connect error", 127.0.0.1:23791, Os { code: 111, kind: ConnectionRefused, message: "Connection refused" })))"#;
        assert_eq!(short_reason(tonic), "connection refused");
        assert_eq!(
            short_reason("no answer within 3000ms"),
            "no answer within 3000ms"
        );
    }
}
