//! A `receiver` process: [`Receiver::start`] writes its config from a [`ReceiverSpec`] with fresh
//! ports, starts the binary and waits until `/health` says `serving`. The receiver tests, the
//! shipper's tests and [`crate::dup::Cluster`] all start theirs here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Place;
use crate::procs::{bin_path, free_port, spawn_logged, wait_health, Proc};

/// What to put in a receiver's config, and where its files go.
#[derive(Debug, Clone)]
pub struct ReceiverSpec {
    /// `cluster.name`; also names its files, `<dir>/<cluster>-receiver.toml` and `.log`.
    pub cluster: String,
    /// `cluster.id`.
    pub cluster_id: u8,
    /// `cluster.duplication_group`, as TOML inline table text, e.g. `{ bj = 1, tj = 2 }`.
    pub group: String,
    /// The etcd client URL.
    pub etcd_endpoint: String,
    /// `receiver.node`: the node whose partitions' inboxes it writes.
    pub node: String,
    /// `receiver.data_dir`: that node's data dir.
    pub data_dir: PathBuf,
    /// `receiver.certs_dir`, as `certs init` made it.
    pub certs_dir: PathBuf,
    /// Where its config and log go.
    pub dir: PathBuf,
    /// Where it runs; its ports are on this place's address.
    pub place: Place,
    /// The QUIC address to listen on; `None` picks a fresh port at every try. A restart behind
    /// a relay keeps the address the relay forwards to.
    pub listen: Option<SocketAddr>,
    /// More lines for the `[receiver]` section, e.g. `inbox_segment_bytes = 65536`.
    pub extra_toml: String,
}

/// A receiver that reported `serving`.
pub struct Receiver {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Where shippers connect (QUIC).
    pub quic: SocketAddr,
    /// `/health`, `/metrics`, `/fail`.
    pub http: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its standard error, where it logs; appended to by every start.
    pub log: PathBuf,
}

impl Receiver {
    /// Writes the config and starts the receiver; waits (30 s at most) until `/health` says
    /// `serving`. A port picked by `free_port` can be taken by another process meanwhile: then
    /// it tries again with new ones, 5 times in all.
    pub fn start(spec: &ReceiverSpec) -> Result<Receiver> {
        let mut last = None;
        for _ in 0..5 {
            match Receiver::try_start(spec) {
                Err(e) if format!("{e:#}").contains("already in use") => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the receiver did not start")))
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_start(spec: &ReceiverSpec) -> Result<Receiver> {
        let name = format!("{}-receiver", spec.cluster);
        let quic = spec
            .listen
            .unwrap_or_else(|| SocketAddr::new(spec.place.ip, free_port()));
        let http = SocketAddr::new(spec.place.ip, free_port());
        let config = spec.dir.join(format!("{name}.toml"));
        let text = format!(
            "[cluster]\nname = \"{}\"\nid = {}\nduplication_group = {}\n\n\
             [etcd]\nendpoints = [\"{}\"]\n\n\
             [receiver]\nnode = \"{}\"\nlisten = \"{quic}\"\nhttp_addr = \"{http}\"\n\
             data_dir = \"{}\"\ncerts_dir = \"{}\"\nlease_ttl = \"2s\"\netcd_timeout = \"1s\"\n\
             rtt_ms = 5\nshutdown_grace = \"2s\"\n{}",
            spec.cluster,
            spec.cluster_id,
            spec.group,
            spec.etcd_endpoint,
            spec.node,
            spec.data_dir.display(),
            spec.certs_dir.display(),
            spec.extra_toml,
        );
        std::fs::write(&config, text).context("write the receiver config")?;
        let log = spec.dir.join(format!("{name}.log"));
        let cmd = spec.place.command(bin_path("receiver"));
        let mut proc = spawn_logged(&name, cmd, &config, &log)?;
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_health(
            &mut proc,
            http,
            "serving",
            Duration::from_secs(30),
            log_text,
        )?;
        Ok(Receiver {
            proc,
            quic,
            http,
            config,
            log,
        })
    }
}
