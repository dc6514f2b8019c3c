//! ferry's storage node, the `node` process: serves one table over RESP, with an HTTP port for health and metrics.
//!
//! Start-up, in order (each step observable in the log and on `/health`):
//! 1. validate the config, and open the commit log ([`ferry_log::nodelog`]), which first writes
//!    back into the plogs whatever a crash took from their unsynced tails;
//! 2. open the HTTP port (`/health` reports the stage from here on);
//! 3. in a cluster (`etcd_endpoints` set): connect to etcd, check the config against the stored
//!    one, register under a lease, wait until the table is placed on this node ([`cluster`]);
//! 4. open the table's partitions, replaying their plogs (torn tails are cut and reported, a
//!    corrupt plog stops the start with an error naming the file and offset);
//! 5. start the inbox appliers, the table-state watch and the plog GC;
//! 6. open the RESP client port, last, and log "node ready".
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting, let connections finish the commands they have
//! started (bounded by `shutdown_grace`), close the HTTP port, then drop the table so every
//! partition's writer drains and flushes RocksDB.
//!
//! - [`config`]: the TOML config and the flags.
//! - [`resp`]: connections and the request codec.
//! - [`commands`]: what each command does.
//! - [`reads`]: the read pool, where reads run in batches, off the async workers.
//! - [`scan`]: SCAN cursors and glob patterns.
//! - [`http`], [`metrics`]: `/health` and `/metrics`.

pub mod auth;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod http;
pub mod inbox_apply;
pub mod install;
pub mod metrics;
pub mod prepare;
pub mod reads;
pub mod rebootstrap;
pub mod resp;
pub mod scan;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context as _};
use ferry_proc::{listen_error, watch_signals};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{NodeArgs, NodeConfig};

use crate::metrics::Metrics;
use crate::scan::CursorTable;
use ferry_engine::table::Table;
use ferry_log::nodelog::NodeLog;

/// Everything a connection or an HTTP handler needs, shared.
pub struct Node {
    pub config: NodeConfig,
    pub table: Table,
    pub cursors: CursorTable,
    pub metrics: Metrics,
    pub started: Instant,
    /// The RESP address actually bound (the port may have been 0 in the config).
    pub resp_addr: SocketAddr,
    /// Set while the table refuses writes (`read_only`, `demoted`): the error to answer with.
    write_block: parking_lot::RwLock<Option<String>>,
    write_blocked: std::sync::atomic::AtomicBool,
    /// Inbox restarts by a re-bootstrap: the inbox appliers start over when it moves.
    pub inbox_resets: Arc<std::sync::atomic::AtomicU64>,
    /// The commit log the partitions share (for its metrics).
    pub commit_log: Option<Arc<NodeLog>>,
    /// Where client reads run.
    pub reads: reads::ReadPool,
    /// Who clients may authenticate as.
    pub users: auth::Users,
}

impl Node {
    pub fn new(config: NodeConfig, table: Table, resp_addr: SocketAddr) -> Node {
        // Cursor ids from different runs should not collide: start from the clock.
        let first_cursor = ferry_engine::clock::wall_ms() % (1 << 40) * 1000;
        let users = auth::Users::from_config(&config);
        Node {
            config,
            table,
            cursors: CursorTable::new(CursorTable::DEFAULT_CAPACITY, first_cursor),
            metrics: Metrics::default(),
            started: Instant::now(),
            resp_addr,
            write_block: parking_lot::RwLock::new(None),
            write_blocked: std::sync::atomic::AtomicBool::new(false),
            inbox_resets: Arc::default(),
            commit_log: None,
            reads: reads::ReadPool::for_this_machine(),
            users,
        }
    }

    /// Refuses writes with `error` (a RESP error line, e.g. `TRYAGAIN ...`), or accepts them
    /// again with `None`.
    pub fn set_write_block(&self, error: Option<String>) {
        self.write_blocked.store(error.is_some(), Ordering::Release);
        *self.write_block.write() = error;
    }

    /// Refuses client writes with `error` (see [`Node::set_write_block`]) in every partition's
    /// writer too, or takes them again with `None`. Returns each partition's committed decree
    /// once the writes queued before are durable: while fenced, its last decree.
    pub async fn fence(
        &self,
        error: Option<String>,
    ) -> anyhow::Result<Vec<(ferry_proto::PartitionId, ferry_proto::Decree)>> {
        self.set_write_block(error.clone());
        let mut out = Vec::new();
        for p in self.table.partitions() {
            let d = p
                .fence(error.clone())
                .await
                .with_context(|| format!("fence partition {}", p.id()))?;
            out.push((p.id(), d));
        }
        Ok(out)
    }

    /// The error a write gets now, if writes are refused.
    pub fn write_block(&self) -> Option<String> {
        if !self.write_blocked.load(Ordering::Acquire) {
            return None;
        }
        self.write_block.read().clone()
    }
}

/// How far the node has come, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Opening the partitions (replaying plogs).
    Opening = 0,
    Serving = 1,
    Stopping = 2,
    /// In a cluster: connecting to etcd.
    ConnectingEtcd = 3,
    /// In a cluster: comparing the config with the stored one.
    CheckingConfig = 4,
    /// In a cluster: registering under a lease.
    Registering = 5,
    /// In a cluster: waiting for the table to be created and placed on this node.
    WaitingForTable = 6,
    /// In a cluster: the table is the target of a full duplication; installing it from the
    /// source's checkpoints (clients get `-LOADING`).
    Installing = 7,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Opening => "opening",
            Stage::Serving => "serving",
            Stage::Stopping => "stopping",
            Stage::ConnectingEtcd => "connecting_etcd",
            Stage::CheckingConfig => "checking_config",
            Stage::Registering => "registering",
            Stage::WaitingForTable => "waiting_for_table",
            Stage::Installing => "installing",
        }
    }
}

/// A [`Stage`] shared between the server and the HTTP handlers.
#[derive(Debug, Default)]
pub struct StageCell(AtomicU8);

impl StageCell {
    pub fn get(&self) -> Stage {
        match self.0.load(Ordering::Acquire) {
            0 => Stage::Opening,
            1 => Stage::Serving,
            3 => Stage::ConnectingEtcd,
            4 => Stage::CheckingConfig,
            5 => Stage::Registering,
            6 => Stage::WaitingForTable,
            7 => Stage::Installing,
            _ => Stage::Stopping,
        }
    }

    pub fn set(&self, stage: Stage) {
        self.0.store(stage as u8, Ordering::Release);
    }
}

/// Runs the node until SIGTERM or SIGINT, then shuts down gracefully. A second signal exits at
/// once.
pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone(), "the next start replays the plogs")
        .context("install the SIGTERM/SIGINT handlers")?;
    let result = serve(config, shutdown).await;
    signals.abort();
    result
}

/// Runs the node until `shutdown` is cancelled, then shuts down gracefully.
pub async fn serve(config: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let opts = config.partition_options()?;
    let stage = Arc::new(StageCell::default());

    check_partition_count(&config)?;
    check_data_dir_identity(&config)?;
    let commit_log = open_commit_log(&config).await?;
    let mut opts = opts;
    opts.commit_log = Some(commit_log.clone());

    // 1. The HTTP port first, so `/health` shows every stage that follows.
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| listen_error("HTTP", "--http-addr", config.http_addr, &e))?;
    let http_addr = http_listener
        .local_addr()
        .context("read the HTTP port's address")?;
    let slot = Arc::new(std::sync::OnceLock::new());
    let http_stop = CancellationToken::new();
    // Stops the HTTP server on every early return below.
    let _http_guard = http_stop.clone().drop_guard();
    let http = {
        let router = http::router(http::HttpState {
            node: slot.clone(),
            stage: stage.clone(),
            config: Arc::new(config.clone()),
        });
        let stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(http_listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    };

    // 2. In a cluster: check the config, register, wait for the table's placement.
    let member = if config.etcd_endpoints.is_empty() {
        None
    } else {
        match cluster::join(&config, http_addr, &stage, &shutdown).await? {
            Some(m) => Some(m),
            None => return Ok(()),
        }
    };

    // 3. The table. Opening replays plogs: blocking work, off the runtime threads.
    stage.set(Stage::Opening);
    let t = Instant::now();
    let (dir, name, count) = (
        config.data_dir.clone(),
        config.table.clone(),
        config.partitions,
    );
    let (table, reports) =
        tokio::task::spawn_blocking(move || Table::open(&dir, &name, count, &opts))
            .await
            .context("join the table-opening thread")?
            .map_err(|e| {
                anyhow!(
                    "cannot open table `{}` in {}: {e}",
                    config.table,
                    config.data_dir.display()
                )
            })?;
    // Each partition has already logged its torn tail (file, offset, bytes); this is the summary.
    let torn = reports
        .iter()
        .filter(|r| r.plog.torn_tail.is_some())
        .count();
    tracing::info!(
        table = %config.table,
        partitions = config.partitions,
        records_replayed = reports.iter().map(|r| r.plog.replayed).sum::<u64>(),
        torn_tails_cut = torn,
        committed_decrees = ?reports.iter().map(|r| r.committed.0).collect::<Vec<_>>(),
        elapsed_ms = t.elapsed().as_millis() as u64,
        "table opened"
    );

    // 4. The client port, last.
    let resp_listener = match TcpListener::bind(config.resp_addr).await {
        Ok(l) => l,
        Err(e) => {
            close_table(table).await;
            return Err(listen_error(
                "RESP clients",
                "--resp-addr",
                config.resp_addr,
                &e,
            ));
        }
    };
    let resp_addr = resp_listener
        .local_addr()
        .context("read the RESP port's address")?;
    let grace = config.shutdown_grace;
    let mut node = Node::new(config, table, resp_addr);
    node.commit_log = Some(commit_log);
    let node = Arc::new(node);
    let _ = slot.set(node.clone());

    // Background work: apply duplicated writes, follow the table's state, collect the plog.
    let background = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(inbox_apply::run(
        node.table.partitions().to_vec(),
        node.config.inbox_apply_interval,
        node.inbox_resets.clone(),
        background.clone(),
    ));
    if let Some(m) = &member {
        // The table's state is in force before the first client connects: a fenced or demoted
        // table never takes a write at start-up. If etcd does not answer now, writes stay
        // refused until the watch reads it.
        let mut watch = cluster::TableWatch::default();
        if let Err(e) = watch.round(&m.meta, &node).await {
            node.fence(Some(format!(
                "TRYAGAIN the node has not read table `{}`'s state from etcd yet; retry in a few seconds",
                node.table.name()
            )))
            .await?;
            tracing::warn!(error = %format!("{e:#}"), "cannot read the table state; refusing writes until it is read");
        }
        tasks.spawn(cluster::watch_table(
            m.meta.clone(),
            node.clone(),
            watch,
            background.clone(),
        ));
        tasks.spawn(prepare::run(
            m.meta.clone(),
            node.clone(),
            m.name.clone(),
            background.clone(),
        ));
        tasks.spawn(install::clean_staging(
            m.meta.clone(),
            node.config.clone(),
            background.clone(),
        ));
        tasks.spawn(rebootstrap::run(node.clone(), background.clone()));
    }
    tasks.spawn(cluster::gc_plogs(
        member.as_ref().map(|m| m.meta.clone()),
        node.clone(),
        node.config.plog_gc_interval,
        node.config.plog_retain_decrees,
        background.clone(),
    ));

    let accept = tokio::spawn(resp::accept_loop(
        resp_listener,
        node.clone(),
        shutdown.clone(),
    ));
    stage.set(Stage::Serving);
    tracing::info!(resp = %resp_addr, http = %http_addr, table = %node.table.name(), partitions = node.table.partition_count(), "node ready");

    shutdown.cancelled().await;
    stage.set(Stage::Stopping);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "stopping: no new clients; finishing in-flight commands"
    );
    let mut conns = accept.await.context("join the accept loop")?;
    let open = conns.len();
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open,
            left = conns.len(),
            "connections still busy after the shutdown grace; cutting them"
        );
        conns.shutdown().await;
    }
    background.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(m) = member {
        m.leave().await;
    }
    http_stop.cancel();
    match http.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
        Ok(Ok(())) => {}
    }
    drop(slot);
    match Arc::try_unwrap(node) {
        Ok(node) => close_table(node.table).await,
        // Every holder (connections, HTTP) has ended, so this is a bug; the plog is durable, so
        // the next start replays what RocksDB had not flushed.
        Err(_) => tracing::warn!(
            "the table is still referenced at shutdown; it will be replayed on the next start"
        ),
    }
    tracing::info!("node stopped");
    Ok(())
}

/// Refuses to open a table whose directory holds another number of partitions than configured:
/// keys are routed by `hash % partitions`, so a changed count would hide existing keys. (The
/// table does not record its count yet, so the directories are the record.)
fn check_partition_count(config: &NodeConfig) -> anyhow::Result<()> {
    let dir = config.data_dir.join(&config.table);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let on_disk = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .map(|p| p + 1);
    match on_disk {
        Some(n) if n != config.partitions => Err(anyhow!(
            "table `{}` in {} has {n} partitions on disk but `partitions` is {}; start the node \
             with --partitions {n} (the partition count of a table cannot change)",
            config.table,
            dir.display(),
            config.partitions
        )),
        _ => Ok(()),
    }
}

/// The record in a data dir of the cluster whose node wrote it.
const IDENTITY_FILE: &str = "ferry-node.json";

/// Refuses a data dir written as another cluster or cluster id: the node stamps the cluster id
/// into every write's timetag, and duplication keys its progress by it. A fresh data dir gets
/// the record (written whole, then renamed, then the directory synced).
fn check_data_dir_identity(config: &NodeConfig) -> anyhow::Result<()> {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq)]
    struct Identity {
        cluster: String,
        cluster_id: u8,
    }
    let ours = Identity {
        cluster: config.cluster.clone(),
        cluster_id: config.cluster_id.unwrap_or(0),
    };
    let path = config.data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let theirs: Identity = serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a data dir record ({{\"cluster\": ..., \"cluster_id\": ...}}); restore it or move the data dir away",
                    path.display()
                )
            })?;
            if theirs != ours {
                anyhow::bail!(
                    "data dir {} was written by a node of cluster `{}` (id {}), but this node is configured as cluster `{}` (id {}); its writes would carry the wrong cluster id. Fix `cluster`/`cluster_id`, or use a fresh data_dir",
                    config.data_dir.display(),
                    theirs.cluster,
                    theirs.cluster_id,
                    ours.cluster,
                    ours.cluster_id
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
            let tmp = config.data_dir.join(format!("{IDENTITY_FILE}.tmp"));
            let mut f =
                std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec(&ours)?)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("write {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("rename to {}", path.display()))?;
            ferry_log::plog::sync_dir(&config.data_dir)
                .map_err(|e| anyhow!("sync data dir {}: {e}", config.data_dir.display()))?;
            Ok(())
        }
        Err(e) => Err(anyhow!("read {}: {e}", path.display())),
    }
}

/// Opens the node's commit log before anything else looks at a partition: it first writes back
/// into each plog the records a crash took from its unsynced tail.
async fn open_commit_log(config: &NodeConfig) -> anyhow::Result<Arc<NodeLog>> {
    let (dir, bytes) = (config.data_dir.clone(), config.commit_log_segment_bytes);
    let t = Instant::now();
    let (log, report) = tokio::task::spawn_blocking(move || NodeLog::open(&dir, bytes))
        .await
        .context("join the commit-log thread")?
        .map_err(|e| {
            anyhow!(
                "cannot open the node's commit log in {}: {e}",
                config
                    .data_dir
                    .join(ferry_log::layout::NODELOG_DIR)
                    .display()
            )
        })?;
    if report.records_restored > 0 {
        tracing::warn!(records = report.records_restored, partitions = ?report.partitions_restored,
            "restored plog records lost in a crash from the commit log");
    }
    tracing::info!(
        segments_read = report.segments_read,
        entries_read = report.entries_read,
        elapsed_ms = t.elapsed().as_millis() as u64,
        "commit log opened"
    );
    Ok(Arc::new(log))
}

/// Drops the table off the runtime: each partition's writer finishes its queue and flushes.
async fn close_table(table: Table) {
    let t = Instant::now();
    if tokio::task::spawn_blocking(move || drop(table))
        .await
        .is_err()
    {
        tracing::warn!("closing the table panicked; the next start replays the plogs");
    }
    tracing::info!(elapsed_ms = t.elapsed().as_millis() as u64, "table closed");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use redis_protocol::resp2::types::BytesFrame as Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::commands::{self, Command};
    use super::*;

    const TEST_GRACE: Duration = Duration::from_secs(2);

    fn test_node(partitions: u32) -> (tempfile::TempDir, Node) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = NodeConfig {
            cluster_id: Some(1),
            partitions,
            data_dir: dir.path().to_path_buf(),
            shutdown_grace: TEST_GRACE,
            ..NodeConfig::default()
        };
        let opts = config.partition_options().expect("valid config");
        let (table, _) = Table::open(dir.path(), "t", partitions, &opts).expect("open table");
        let node = Node::new(config, table, "127.0.0.1:6380".parse().expect("addr"));
        (dir, node)
    }

    fn args(line: &str) -> Vec<Bytes> {
        line.split(' ')
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    async fn cmd(node: &Node, line: &str) -> Frame {
        match commands::parse(&args(line), ferry_engine::clock::wall_ms()) {
            Err(e) => e.to_frame(),
            Ok(c) => match c.class() {
                commands::Class::Write => commands::start_write(node, c).await,
                _ => commands::execute(node, c),
            },
        }
    }

    fn bulk(s: &str) -> Frame {
        Frame::BulkString(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[tokio::test]
    async fn commands_against_a_real_table() {
        let (_dir, node) = test_node(4);
        assert_eq!(cmd(&node, "SET a 1").await, commands::ok());
        assert_eq!(cmd(&node, "INCR a").await, Frame::Integer(2));
        assert_eq!(cmd(&node, "INCRBY a 10").await, Frame::Integer(12));
        assert_eq!(cmd(&node, "DECRBY a 2").await, Frame::Integer(10));
        assert_eq!(cmd(&node, "GET a").await, bulk("10"));
        assert_eq!(cmd(&node, "SET s x").await, commands::ok());
        assert!(
            matches!(cmd(&node, "INCR s").await, Frame::Error(e) if &*e == "ERR value is not an integer or out of range")
        );
        assert_eq!(cmd(&node, "SET a 5 NX").await, Frame::Null);
        assert_eq!(cmd(&node, "SET a 6 XX GET").await, bulk("10"));
        assert_eq!(cmd(&node, "SET nope 1 XX").await, Frame::Null);
        assert_eq!(
            cmd(&node, "MSET k1 v1 k2 v2 k3 v3 k4 v4 k5 v5").await,
            commands::ok()
        );
        assert_eq!(
            cmd(&node, "MGET k1 k5 missing a").await,
            Frame::Array(vec![bulk("v1"), bulk("v5"), Frame::Null, bulk("6")])
        );
        assert_eq!(
            cmd(&node, "EXISTS k1 k2 k1 missing").await,
            Frame::Integer(3)
        );
        assert_eq!(cmd(&node, "DEL k1 k2 missing").await, Frame::Integer(2));
        assert_eq!(cmd(&node, "DBSIZE").await, Frame::Integer(5));
        assert_eq!(cmd(&node, "TTL k3").await, Frame::Integer(-1));
        assert_eq!(cmd(&node, "TTL missing").await, Frame::Integer(-2));
        assert_eq!(
            cmd(&node, "TYPE k3").await,
            Frame::SimpleString("string".into())
        );
        assert_eq!(
            cmd(&node, "TYPE missing").await,
            Frame::SimpleString("none".into())
        );
        assert_eq!(cmd(&node, "STRLEN k3").await, Frame::Integer(2));
        assert_eq!(cmd(&node, "STRLEN missing").await, Frame::Integer(0));
        assert_eq!(cmd(&node, "EXPIRE k3 100").await, Frame::Integer(1));
        assert_eq!(cmd(&node, "TTL k3").await, Frame::Integer(100));
        assert!(
            matches!(cmd(&node, "PTTL k3").await, Frame::Integer(ms) if ms > 99_000 && ms <= 100_000)
        );
        assert_eq!(cmd(&node, "PERSIST k3").await, Frame::Integer(1));
        assert_eq!(cmd(&node, "TTL k3").await, Frame::Integer(-1));
        assert_eq!(cmd(&node, "EXPIRE k3 -1").await, Frame::Integer(1));
        assert_eq!(cmd(&node, "GET k3").await, Frame::Null);
        assert_eq!(cmd(&node, "SET e v PX 1").await, commands::ok());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(cmd(&node, "GET e").await, Frame::Null);
        assert_eq!(cmd(&node, "SET kt v EX 100").await, commands::ok());
        assert_eq!(cmd(&node, "SET kt w KEEPTTL").await, commands::ok());
        assert_eq!(cmd(&node, "TTL kt").await, Frame::Integer(100));
    }

    #[tokio::test]
    async fn scan_walks_every_partition_once() {
        let (_dir, node) = test_node(4);
        let mut keys: Vec<String> = (0..100).map(|i| format!("user:{i}")).collect();
        keys.extend((0..20).map(|i| format!("other:{i}")));
        for k in &keys {
            assert_eq!(cmd(&node, &format!("SET {k} v")).await, commands::ok());
        }
        for (pattern, want) in [(None, 120), (Some("user:*"), 100), (Some("other:1?"), 10)] {
            let mut seen = std::collections::BTreeSet::new();
            let mut cursor = "0".to_string();
            let mut calls = 0;
            loop {
                let line = match pattern {
                    Some(p) => format!("SCAN {cursor} MATCH {p} COUNT 7"),
                    None => format!("SCAN {cursor} COUNT 7"),
                };
                let Frame::Array(reply) = cmd(&node, &line).await else {
                    panic!("SCAN reply is an array")
                };
                let [Frame::BulkString(next), Frame::Array(found)] = reply.as_slice() else {
                    panic!("SCAN reply shape")
                };
                for k in found {
                    let Frame::BulkString(k) = k else {
                        panic!("key is a bulk string")
                    };
                    assert!(seen.insert(k.clone()), "key returned twice");
                }
                cursor = String::from_utf8(next.to_vec()).expect("cursor is text");
                cursor.parse::<u64>().expect("cursor is a decimal u64");
                calls += 1;
                if cursor == "0" {
                    break;
                }
                assert!(calls < 100, "scan terminates");
            }
            assert_eq!(seen.len(), want, "{pattern:?}");
        }
        assert!(
            matches!(cmd(&node, "SCAN 12345").await, Frame::Error(e) if &*e == "ERR invalid cursor")
        );
    }

    #[tokio::test]
    async fn admin_replies_that_clients_ask_for() {
        let (_dir, node) = test_node(2);
        assert_eq!(
            cmd(&node, "CONFIG GET save").await,
            Frame::Array(vec![bulk("save"), bulk("")])
        );
        assert_eq!(
            cmd(&node, "CONFIG GET appendonly").await,
            Frame::Array(vec![bulk("appendonly"), bulk("yes")])
        );
        assert_eq!(
            cmd(&node, "COMMAND COUNT").await,
            Frame::Integer(commands::SPECS.len() as i64)
        );
        assert_eq!(cmd(&node, "COMMAND DOCS").await, Frame::Array(vec![]));
        let Frame::BulkString(info) = cmd(&node, "INFO").await else {
            panic!("INFO is a bulk string")
        };
        let info = String::from_utf8(info.to_vec()).expect("INFO is text");
        for needle in [
            "# Server",
            "# Clients",
            "# Persistence",
            "# Keyspace",
            "# Memory",
            "# Replication",
            "role:master",
            "partition1:committed_decree=0",
        ] {
            assert!(info.contains(needle), "INFO lacks {needle}: {info}");
        }
        assert!(matches!(cmd(&node, "SELECT 1").await, Frame::Error(_)));
        assert_eq!(cmd(&node, "SELECT 0").await, commands::ok());
        assert_eq!(cmd(&node, "PING").await, Frame::SimpleString("PONG".into()));
        assert!(matches!(parse_only("QUIT"), Command::Quit));
    }

    fn parse_only(line: &str) -> Command {
        commands::parse(&args(line), 0).expect("valid")
    }

    /// A node served in-process on free loopback ports.
    struct TestServer {
        _dir: tempfile::TempDir,
        resp: SocketAddr,
        http: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl TestServer {
        fn start(max_connections: usize) -> TestServer {
            let dir = tempfile::tempdir().expect("temp dir");
            let (resp, http) = (free_port(), free_port());
            let config = NodeConfig {
                cluster_id: Some(1),
                partitions: 4,
                data_dir: dir.path().to_path_buf(),
                resp_addr: resp,
                http_addr: http,
                max_connections,
                shutdown_grace: TEST_GRACE,
                ..NodeConfig::default()
            };
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(config, shutdown.clone()));
            TestServer {
                _dir: dir,
                resp,
                http,
                shutdown,
                task,
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("node stops within the grace")
                .expect("join")
                .expect("clean stop");
        }
    }

    /// A whole node: pipelined writes, read-your-writes, errors that keep the connection open,
    /// QUIT, and a graceful stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_connection_and_graceful_shutdown() {
        let server = TestServer::start(100);
        let mut sock = connect(server.resp).await;

        // 200 pipelined INCRs of one key, then a GET of it, in one write.
        let mut req = Vec::new();
        for _ in 0..200 {
            req.extend_from_slice(b"*2\r\n$4\r\nINCR\r\n$3\r\nctr\r\n");
        }
        req.extend_from_slice(
            b"*2\r\n$3\r\nGET\r\n$3\r\nctr\r\n*3\r\n$5\r\nLPUSH\r\n$1\r\nx\r\n$1\r\n1\r\nPING\r\n",
        );
        sock.write_all(&req).await.expect("send");
        let mut want = String::new();
        for i in 1..=200 {
            want += &format!(":{i}\r\n");
        }
        want += "$3\r\n200\r\n-ERR unknown command 'LPUSH', with args beginning with: 'x' '1' \r\n+PONG\r\n";
        assert_eq!(read_exactly(&mut sock, want.len()).await, want);

        // Interleaved writes and reads of many keys (all partitions): each read sees the write
        // just before it.
        let mut req = String::new();
        let mut want = String::new();
        for i in 0..100 {
            req += &format!("SET key{i} v{i}\r\nGET key{i}\r\nDEL key{i}\r\nEXISTS key{i}\r\n");
            want += &format!("+OK\r\n${}\r\nv{i}\r\n:1\r\n:0\r\n", format!("v{i}").len());
        }
        sock.write_all(req.as_bytes()).await.expect("send");
        assert_eq!(read_exactly(&mut sock, want.len()).await, want);

        sock.write_all(b"QUIT\r\n").await.expect("send");
        assert_eq!(read_exactly(&mut sock, 5).await, "+OK\r\n");
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "QUIT closes the connection");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_past_the_limit_are_told_and_closed() {
        let server = TestServer::start(1);
        let mut first = connect(server.resp).await;
        first.write_all(b"PING\r\n").await.expect("send");
        assert_eq!(read_exactly(&mut first, 7).await, "+PONG\r\n");
        let mut second = connect(server.resp).await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut reply)).await;
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "-ERR max number of clients reached\r\n"
        );
        // The first client is unaffected, and its slot frees when it leaves.
        first.write_all(b"PING\r\n").await.expect("send");
        assert_eq!(read_exactly(&mut first, 7).await, "+PONG\r\n");
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = connect(server.resp).await;
        third.write_all(b"PING\r\n").await.expect("send");
        assert_eq!(read_exactly(&mut third, 7).await, "+PONG\r\n");
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_and_metrics() {
        let server = TestServer::start(100);
        let mut sock = connect(server.resp).await;
        sock.write_all(b"SET a 1\r\nNOSUCH\r\n")
            .await
            .expect("send");
        let want = "+OK\r\n-ERR unknown command 'NOSUCH', with args beginning with: \r\n";
        assert_eq!(read_exactly(&mut sock, want.len()).await, want);

        let health = http_get(server.http, "/health").await;
        assert!(health.contains(r#""stage":"serving""#), "{health}");
        assert!(health.contains(r#""partitions":4"#), "{health}");
        let metrics = http_get(server.http, "/metrics").await;
        for line in [
            "ferry_node_writes_total 1",
            "ferry_node_group_commits_total 1",
            "ferry_node_connections 1",
            r#"ferry_node_commands_total{cmd="set"} 1"#,
            r#"ferry_node_commands_total{cmd="unknown"} 1"#,
            "ferry_node_command_errors_total 1",
            "ferry_node_fsync_seconds_total ",
            "ferry_node_plog_bytes_total ",
        ] {
            assert!(metrics.contains(line), "metrics lack {line:?}:\n{metrics}");
        }
        let decrees: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("ferry_node_committed_decree{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(decrees, 1, "{metrics}");
        server.stop().await;
    }

    #[test]
    fn a_data_dir_of_another_cluster_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = |cluster: &str, id| NodeConfig {
            cluster: cluster.into(),
            cluster_id: Some(id),
            data_dir: dir.path().to_path_buf(),
            ..NodeConfig::default()
        };
        check_data_dir_identity(&config("bj", 1)).expect("a fresh data dir gets the record");
        check_data_dir_identity(&config("bj", 1)).expect("the same cluster");
        let e = check_data_dir_identity(&config("bj", 2)).expect_err("another id");
        assert!(
            e.to_string().contains(
                "was written by a node of cluster `bj` (id 1), but this node is configured as cluster `bj` (id 2)"
            ),
            "{e}"
        );
        let e = check_data_dir_identity(&config("tj", 1)).expect_err("another cluster");
        assert!(e.to_string().contains("cluster `tj` (id 1)"), "{e}");
    }

    #[test]
    fn a_changed_partition_count_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        for p in 0..4 {
            std::fs::create_dir_all(dir.path().join("default").join(p.to_string())).expect("mkdir");
        }
        let config = |partitions| NodeConfig {
            cluster_id: Some(1),
            partitions,
            data_dir: dir.path().to_path_buf(),
            ..NodeConfig::default()
        };
        let e = check_partition_count(&config(2)).expect_err("fewer partitions than on disk");
        assert!(
            e.to_string()
                .contains("has 4 partitions on disk but `partitions` is 2"),
            "{e}"
        );
        check_partition_count(&config(4)).expect("same count");
        let e = check_partition_count(&config(8)).expect_err("more partitions than on disk");
        assert!(
            e.to_string().contains("start the node with --partitions 4"),
            "{e}"
        );
        let fresh = NodeConfig {
            table: "other".into(),
            ..config(8)
        };
        check_partition_count(&fresh).expect("a new table may have any count");
    }

    fn free_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    }

    async fn http_get(addr: SocketAddr, path: &str) -> String {
        let mut s = connect(addr).await;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body))
            .await
            .expect("HTTP reply in time")
            .expect("read");
        String::from_utf8_lossy(&body).into_owned()
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        for _ in 0..200 {
            if let Ok(s) = TcpStream::connect(addr).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node did not open {addr}");
    }

    async fn read_exactly(sock: &mut TcpStream, n: usize) -> String {
        let mut buf = vec![0; n];
        tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut buf))
            .await
            .expect("reply in time")
            .expect("read");
        String::from_utf8_lossy(&buf).into_owned()
    }
}
