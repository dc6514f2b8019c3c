//! A `node` that joins a cluster (etcd + coordinator), with its own config file and log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::etcd::{http_get, Etcd};
use crate::procs::{bin_path, free_port, spawn_logged, Proc};

/// What to put in a cluster node's config.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub cluster: String,
    pub cluster_id: u8,
    /// TOML inline table, e.g. `{ bj = 1, tj = 2 }`.
    pub group: String,
    pub name: String,
    pub table: String,
    pub partitions: u32,
    pub lease_ttl: &'static str,
    /// More TOML lines for the config, e.g. `plog_segment_bytes = 65536`.
    pub extra_toml: String,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            cluster: "bj".into(),
            cluster_id: 1,
            group: "{ bj = 1, tj = 2, sh = 3 }".into(),
            name: "bj-n1".into(),
            table: "users".into(),
            partitions: 4,
            lease_ttl: "2s",
            extra_toml: String::new(),
        }
    }
}

/// A `node` process in a cluster.
pub struct ClusterNode {
    pub proc: Proc,
    pub resp: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub spec: NodeSpec,
}

impl ClusterNode {
    /// Writes a config into `dir` and starts the node, without waiting. The data dir is
    /// `dir/<name>-data`, so a restart with the same `dir` and name finds its data.
    pub fn spawn(etcd: &Etcd, dir: &Path, spec: &NodeSpec) -> Result<ClusterNode> {
        let ip = etcd.place().ip;
        ClusterNode::spawn_at(
            etcd,
            dir,
            spec,
            SocketAddr::new(ip, free_port()),
            SocketAddr::new(ip, free_port()),
        )
    }

    /// Like [`ClusterNode::spawn`] on given addresses (a restart keeps its RESP address).
    pub fn spawn_at(
        etcd: &Etcd,
        dir: &Path,
        spec: &NodeSpec,
        resp: SocketAddr,
        http: SocketAddr,
    ) -> Result<ClusterNode> {
        let data_dir = dir.join(format!("{}-data", spec.name));
        let config = dir.join(format!("{}.toml", spec.name));
        let text = format!(
            "cluster = \"{}\"\ncluster_id = {}\nduplication_group = {}\nnode_name = \"{}\"\n\
             table = \"{}\"\npartitions = {}\ndata_dir = \"{}\"\nresp_addr = \"{resp}\"\n\
             http_addr = \"{http}\"\netcd_endpoints = [\"{}\"]\nlease_ttl = \"{}\"\n\
             etcd_timeout = \"1s\"\nplog_gc_interval = \"1s\"\nshutdown_grace = \"2s\"\n\
             commit_log_segment_bytes = 4194304\n{}\n",
            spec.cluster,
            spec.cluster_id,
            spec.group,
            spec.name,
            spec.table,
            spec.partitions,
            data_dir.display(),
            etcd.endpoint(),
            spec.lease_ttl,
            spec.extra_toml,
        );
        std::fs::write(&config, text).context("write the node config")?;
        let log = dir.join(format!("{}.log", spec.name));
        let cmd = etcd.place().command(bin_path("node"));
        let proc = spawn_logged(&spec.name, cmd, &config, &log)?;
        Ok(ClusterNode {
            proc,
            resp,
            http,
            data_dir,
            log,
            spec: spec.clone(),
        })
    }

    /// `/health`'s JSON.
    pub fn health(&self) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.http, "/health")?;
        if status != 200 {
            bail!("/health answered {status}: {body}");
        }
        serde_json::from_str(&body).context("parse /health")
    }

    /// Waits (bounded) until `/health` reports `stage`; `serving` also waits for the return
    /// check after a start (writes refused until the coordinator checked that no other cluster
    /// took the table over).
    pub fn wait_stage(&mut self, stage: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("(no answer)");
        while Instant::now() < deadline {
            if let Some(status) = self.proc.child.try_wait()? {
                bail!("node exited with {status}: {}", self.log_text());
            }
            if let Ok(h) = self.health() {
                let s = h["stage"].as_str().unwrap_or_default().to_string();
                let checking = h["writes_refused"]
                    .as_str()
                    .is_some_and(|w| w.contains("return check"));
                if s == stage && !(stage == "serving" && checking) {
                    return Ok(());
                }
                last = if checking {
                    format!("{s} (waiting for the return check)")
                } else {
                    s
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("node stayed in stage {last} for {timeout:?}, not {stage}")
    }

    /// Waits (bounded) for the process to exit; its exit code and log.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(i32, String)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.proc.child.try_wait()? {
                return Ok((status.code().unwrap_or(-1), self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the node did not exit within {timeout:?}: {}",
            self.log_text()
        )
    }

    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.resp)
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
