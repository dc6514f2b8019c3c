//! Two real clusters on loopback, each with a coordinator, a node, a receiver and a shipper, all
//! real binaries, sharing one etcd (each cluster's keys under `/ferry/<cluster>/`) and one set of
//! certificates made by `certs init`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{ClusterNode, NodeSpec};
use crate::etcd::{ferry, http_get, Coordinator, CoordinatorSpec, Etcd};
use crate::metrics::sum_samples;
use crate::procs::{bin_path, free_port, spawn_logged, wait_health, Proc};
use crate::receiver::{Receiver, ReceiverSpec};

/// The duplication group of every test cluster.
pub const GROUP: &str = "{ bj = 1, tj = 2 }";

/// One cluster's processes.
pub struct Cluster {
    pub name: String,
    pub id: u8,
    pub coordinator: Coordinator,
    pub node: ClusterNode,
    pub receiver: Option<Proc>,
    /// Where the receiver listens, kept across its restarts (a relay may forward there).
    pub receiver_quic: SocketAddr,
    /// The receiver's HTTP address, new at every start.
    pub receiver_http: SocketAddr,
    pub shipper: Option<Proc>,
    pub shipper_http: SocketAddr,
    /// Where its processes run.
    pub place: crate::netns::Place,
    /// The address the receiver registers for shippers to dial, if not its own.
    pub receiver_advertise: Option<SocketAddr>,
    /// The other cluster's coordinator address.
    pub remote: SocketAddr,
    /// More lines for the receiver's `[receiver]` section (applied at its next start).
    pub receiver_toml: String,
    /// The last lines of the shipper's `[shipper]` section (applied at its next start): the
    /// link's `rtt_ms`, and whatever a test adds.
    pub shipper_toml: String,
    dir: PathBuf,
    etcd_endpoint: String,
    certs: PathBuf,
}

/// Two clusters, `bj` (id 1) and `tj` (id 2).
pub struct TwoClusters {
    pub etcd: Etcd,
    /// tj's own etcd, when tj runs across a WAN link (otherwise both share `etcd`).
    pub tj_etcd: Option<Etcd>,
    pub dir: tempfile::TempDir,
    pub bj: Cluster,
    pub tj: Cluster,
}

impl TwoClusters {
    /// Starts everything and creates table `table` on both sides, with `bj_partitions` and
    /// `tj_partitions` partitions. Nodes are serving when this returns.
    pub fn start(table: &str, bj_partitions: u32, tj_partitions: u32) -> Result<TwoClusters> {
        TwoClusters::start_with(table, bj_partitions, tj_partitions, "")
    }

    /// Like [`TwoClusters::start`], with more TOML lines in both nodes' configs.
    pub fn start_with(
        table: &str,
        bj_partitions: u32,
        tj_partitions: u32,
        node_toml: &str,
    ) -> Result<TwoClusters> {
        let etcd = Etcd::start()?;
        TwoClusters::start_on(
            etcd,
            None,
            table,
            bj_partitions,
            tj_partitions,
            node_toml,
            true,
        )
    }

    /// For a full duplication: the table is created on bj only (bj's node serves when this
    /// returns); tj's node, configured for `tj_partitions`, waits for the follower table the
    /// dup creates.
    pub fn start_source_only(
        table: &str,
        bj_partitions: u32,
        tj_partitions: u32,
    ) -> Result<TwoClusters> {
        let etcd = Etcd::start()?;
        TwoClusters::start_on(etcd, None, table, bj_partitions, tj_partitions, "", false)
    }

    /// bj here, tj across `wan` (inside its namespace, with its own etcd there): every packet
    /// between the clusters crosses the delayed link.
    pub fn start_wan(
        table: &str,
        bj_partitions: u32,
        tj_partitions: u32,
        wan: &crate::netns::Wan,
    ) -> Result<TwoClusters> {
        let etcd = Etcd::start_in(&wan.near())?;
        let tj_etcd = Etcd::start_in(&wan.far())?;
        TwoClusters::start_on(
            etcd,
            Some(tj_etcd),
            table,
            bj_partitions,
            tj_partitions,
            "",
            true,
        )
    }

    /// Starts bj with `etcd` and tj with `tj_etcd` (or the same one), each cluster where its
    /// etcd runs, and creates the table on bj, and on tj too if `on_tj`.
    fn start_on(
        etcd: Etcd,
        tj_etcd: Option<Etcd>,
        table: &str,
        bj_partitions: u32,
        tj_partitions: u32,
        node_toml: &str,
        on_tj: bool,
    ) -> Result<TwoClusters> {
        let dir = tempfile::tempdir()?;
        let certs = make_certs(dir.path())?;
        let tj_side = tj_etcd.as_ref().unwrap_or(&etcd);
        let bj_addr = SocketAddr::new(etcd.place().ip, free_port());
        let tj_addr = SocketAddr::new(tj_side.place().ip, free_port());
        let start = |etcd: &Etcd, name: &str, id, addr, remote, partitions| {
            Cluster::start(
                etcd,
                dir.path(),
                &certs,
                name,
                id,
                addr,
                remote,
                table,
                partitions,
                node_toml,
            )
        };
        let mut bj = start(&etcd, "bj", 1, bj_addr, tj_addr, bj_partitions)?;
        let mut tj = start(tj_side, "tj", 2, tj_addr, bj_addr, tj_partitions)?;
        let mut clusters = vec![&mut bj];
        if on_tj {
            clusters.push(&mut tj);
        }
        for c in &mut clusters {
            c.ferry_ok(&[
                "table",
                "create",
                table,
                "--partitions",
                &c.node.spec.partitions.to_string(),
            ])?;
        }
        for c in &mut clusters {
            c.node.wait_stage("serving", Duration::from_secs(30))?;
        }
        Ok(TwoClusters {
            etcd,
            tj_etcd,
            dir,
            bj,
            tj,
        })
    }
}

impl TwoClusters {
    /// For a full duplication across the emulated `link`: bj (with its etcd) in namespace `a`,
    /// tj (with its own etcd) in `b`, so every packet between the clusters crosses the link;
    /// the table is created on bj only (as [`TwoClusters::start_source_only`]). Both
    /// shippers and receivers size their QUIC windows for the link's RTT.
    ///
    /// Nothing in either namespace is reachable from this one: every call to a cluster (its
    /// HTTP, the `ferry` CLI, etcd) must run in its namespace, e.g.
    /// `link.a().enter(|| w.bj.ferry_ok(..))`; threads and processes started from there stay
    /// there.
    pub fn start_link(
        table: &str,
        bj_partitions: u32,
        tj_partitions: u32,
        link: &crate::link::Link,
    ) -> Result<TwoClusters> {
        let (a, b) = (link.a(), link.b());
        let rtt_ms = (link.config().one_way * 2).as_millis().max(1) as u64;
        let dir = tempfile::tempdir()?;
        let certs = make_certs(dir.path())?;
        let etcd = a.enter(|| Etcd::start_in(&a.place()))??;
        let tj_etcd = b.enter(|| Etcd::start_in(&b.place()))??;
        let bj_addr = SocketAddr::new(a.place().ip, free_port());
        let tj_addr = SocketAddr::new(b.place().ip, free_port());
        let start = |etcd: &Etcd, name: &str, id, addr, remote, partitions| -> Result<Cluster> {
            let mut c = Cluster::start(
                etcd,
                dir.path(),
                &certs,
                name,
                id,
                addr,
                remote,
                table,
                partitions,
                "",
            )?;
            c.shipper_toml = format!("rtt_ms = {rtt_ms}\n");
            if let Some(mut old) = c.shipper.take() {
                old.terminate(Duration::from_secs(10));
            }
            c.start_shipper()?;
            c.restart_receiver_with_flags(&["--rtt-ms", &rtt_ms.to_string()])?;
            Ok(c)
        };
        let mut bj = a.enter(|| start(&etcd, "bj", 1, bj_addr, tj_addr, bj_partitions))??;
        let tj = b.enter(|| start(&tj_etcd, "tj", 2, tj_addr, bj_addr, tj_partitions))??;
        a.enter(|| -> Result<()> {
            let partitions = bj.node.spec.partitions.to_string();
            bj.ferry_ok(&["table", "create", table, "--partitions", &partitions])?;
            bj.node.wait_stage("serving", Duration::from_secs(30))
        })??;
        Ok(TwoClusters {
            etcd,
            tj_etcd: Some(tj_etcd),
            dir,
            bj,
            tj,
        })
    }
}

/// Makes the deployment's certificates for bj and tj under `dir/certs` (`certs init`).
fn make_certs(dir: &Path) -> Result<PathBuf> {
    let certs = dir.join("certs");
    let out = Command::new(bin_path("certs"))
        .args(["init", "--out"])
        .arg(&certs)
        .args(["--cluster", "bj", "--cluster", "tj"])
        .output()
        .context("run certs init")?;
    if !out.status.success() {
        bail!(
            "certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(certs)
}

impl Cluster {
    /// Restarts the receiver with more command-line flags after its `--config` (flags override
    /// the file; `ReceiverSpec` writes `rtt_ms = 5`, which `--rtt-ms` replaces for a long
    /// link). The flags are appended by a `sh` wrapper around this cluster's place.
    pub fn restart_receiver_with_flags(&mut self, flags: &[&str]) -> Result<()> {
        if let Some(mut r) = self.receiver.take() {
            r.terminate(Duration::from_secs(10));
        }
        let place = self.place.clone();
        let quoted: Vec<String> = flags.iter().map(|f| format!("'{f}'")).collect();
        let mut prefix = vec![
            "sh".to_string(),
            "-c".into(),
            format!("exec \"$@\" {}", quoted.join(" ")),
            "sh".into(),
        ];
        prefix.extend(place.prefix.iter().cloned());
        self.place = crate::netns::Place {
            ip: place.ip,
            prefix,
        };
        let started = self.start_receiver();
        self.place = place;
        started
    }

    /// The directory of the checkpoint this cluster's node keeps for full dup `dupid` of its
    /// table's partition `partition` (until the install is complete).
    pub fn checkpoint_dir(&self, partition: u32, dupid: u64) -> PathBuf {
        ferry_log::layout::Layout::new(&self.node.data_dir).dup_checkpoint(
            &self.node.spec.table,
            ferry_proto::ids::PartitionId(partition),
            ferry_proto::ids::DupId(dupid),
        )
    }
}

impl TwoClusters {
    /// The total size of the checkpoints bj published for full dup `dupid` of `table`.
    pub fn checkpoint_bytes(&self, table: &str, dupid: u64) -> Result<u64> {
        self.etcd
            .get_prefix(&format!("/ferry/bj/dups/{table}/{dupid}/checkpoint/"))?
            .iter()
            .map(|(_, v)| {
                let cp: serde_json::Value =
                    serde_json::from_str(v).context("parse a checkpoint record")?;
                let files = cp["manifest"]["files"]
                    .as_array()
                    .context("a checkpoint record has manifest.files")?;
                Ok(files.iter().filter_map(|f| f["size"].as_u64()).sum::<u64>())
            })
            .sum()
    }
}

impl Cluster {
    #[allow(clippy::too_many_arguments)]
    fn start(
        etcd: &Etcd,
        dir: &Path,
        certs: &Path,
        name: &str,
        id: u8,
        addr: SocketAddr,
        remote: SocketAddr,
        table: &str,
        partitions: u32,
        node_toml: &str,
    ) -> Result<Cluster> {
        let spec = CoordinatorSpec {
            cluster: name.into(),
            cluster_id: id,
            group: GROUP.into(),
            remotes: vec![format!(
                "{} = [\"{remote}\"]",
                if name == "bj" { "tj" } else { "bj" }
            )],
            lease_ttl: "3s",
        };
        let mut coordinator = Coordinator::spawn_at(etcd, dir, &format!("{name}-c1"), &spec, addr)?;
        coordinator.wait_stage(&["leader"], Duration::from_secs(30))?;
        let node = ClusterNode::spawn(
            etcd,
            dir,
            &NodeSpec {
                cluster: name.into(),
                cluster_id: id,
                group: GROUP.into(),
                name: format!("{name}-n1"),
                table: table.into(),
                partitions,
                lease_ttl: "2s",
                extra_toml: node_toml.into(),
            },
        )?;
        let mut c = Cluster {
            name: name.into(),
            id,
            coordinator,
            node,
            receiver: None,
            receiver_quic: SocketAddr::new(etcd.place().ip, free_port()),
            // Set by `start_receiver` below.
            receiver_http: SocketAddr::new(etcd.place().ip, 0),
            shipper: None,
            shipper_http: SocketAddr::new(etcd.place().ip, free_port()),
            place: etcd.place().clone(),
            receiver_advertise: None,
            receiver_toml: String::new(),
            shipper_toml: "rtt_ms = 5\n".into(),
            remote,
            dir: dir.to_path_buf(),
            etcd_endpoint: etcd.endpoint(),
            certs: certs.to_path_buf(),
        };
        c.start_receiver()?;
        c.start_shipper()?;
        Ok(c)
    }

    fn cluster_section(&self) -> String {
        format!(
            "[cluster]\nname = \"{}\"\nid = {}\nduplication_group = {GROUP}\n\n[etcd]\nendpoints = [\"{}\"]\n\n",
            self.name, self.id, self.etcd_endpoint
        )
    }

    /// Where a process of this cluster (`receiver`, `shipper`) logs.
    fn log_path(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{}-{what}.log", self.name))
    }

    /// What a process of this cluster logged (`receiver`, `shipper`).
    pub fn log_text(&self, what: &str) -> String {
        std::fs::read_to_string(self.log_path(what)).unwrap_or_default()
    }

    /// Starts (or restarts) the receiver on `receiver_quic` and waits until it serves.
    pub fn start_receiver(&mut self) -> Result<()> {
        let mut extra = String::from("bandwidth_mbps = 1000\n");
        if let Some(a) = self.receiver_advertise {
            extra += &format!("advertise = \"{a}\"\n");
        }
        extra += &self.receiver_toml;
        let r = Receiver::start(&ReceiverSpec {
            cluster: self.name.clone(),
            cluster_id: self.id,
            group: GROUP.into(),
            etcd_endpoint: self.etcd_endpoint.clone(),
            node: self.node.spec.name.clone(),
            data_dir: self.node.data_dir.clone(),
            certs_dir: self.certs.clone(),
            dir: self.dir.clone(),
            place: self.place.clone(),
            listen: Some(self.receiver_quic),
            extra_toml: extra,
        })?;
        self.receiver = Some(r.proc);
        self.receiver_http = r.http;
        Ok(())
    }

    /// Starts a shipper with `--config config`, logging to `<cluster>-<log>.log`, and waits
    /// until `/health` on `http` says `running`.
    fn run_shipper(&self, log: &str, config: &Path, http: SocketAddr) -> Result<Proc> {
        let cmd = self.place.command(bin_path("shipper"));
        let name = format!("{}-{log}", self.name);
        let mut proc = spawn_logged(&name, cmd, config, &self.log_path(log))?;
        let log_text = || self.log_text(log);
        wait_health(
            &mut proc,
            http,
            "running",
            Duration::from_secs(30),
            log_text,
        )?;
        Ok(proc)
    }

    /// Starts (or restarts) the shipper and waits until it runs. The port picked by
    /// `free_port` can be taken by another process meanwhile: then another is tried, 4 times
    /// in all.
    pub fn start_shipper(&mut self) -> Result<()> {
        for _ in 0..3 {
            match self.try_start_shipper() {
                Err(e) if e.to_string().contains("already in use") => {
                    self.shipper_http = SocketAddr::new(self.place.ip, free_port());
                }
                other => return other,
            }
        }
        self.try_start_shipper()
    }

    fn try_start_shipper(&mut self) -> Result<()> {
        let config = self.dir.join(format!("{}-shipper.toml", self.name));
        let remote_name = if self.name == "bj" { "tj" } else { "bj" };
        std::fs::write(
            &config,
            format!(
                "{}[remote_clusters]\n{remote_name} = [\"{}\"]\n\n[shipper]\nnode = \"{}\"\n\
                 data_dir = \"{}\"\ncerts_dir = \"{}\"\nhttp_addr = \"{}\"\nlease_ttl = \"2s\"\n\
                 etcd_timeout = \"1s\"\nprogress_interval = \"200ms\"\nreconcile_interval = \"300ms\"\n\
                 bandwidth_mbps = 1000\n{}\n",
                self.cluster_section(),
                self.remote,
                self.node.spec.name,
                self.node.data_dir.display(),
                self.certs.display(),
                self.shipper_http,
                self.shipper_toml,
            ),
        )?;
        let proc = self.run_shipper("shipper", &config, self.shipper_http)?;
        self.shipper = Some(proc);
        Ok(())
    }

    /// Makes shippers reach this cluster's receiver through `addr` (a delaying relay): the
    /// receiver is restarted to register that address.
    pub fn advertise_receiver_at(&mut self, addr: SocketAddr) -> Result<()> {
        self.receiver_advertise = Some(addr);
        if let Some(mut r) = self.receiver.take() {
            r.terminate(Duration::from_secs(10));
        }
        self.start_receiver()
    }

    /// kill -9 of the node, then a restart on the same addresses and data, without waiting.
    pub fn kill_and_respawn_node(&mut self, etcd: &Etcd) -> Result<()> {
        self.node.proc.kill9();
        let (resp, http, spec) = (self.node.resp, self.node.http, self.node.spec.clone());
        self.node = ClusterNode::spawn_at(etcd, &self.dir, &spec, resp, http)?;
        Ok(())
    }

    /// kill -9 of the node, then a restart on the same addresses and data; waits until it serves.
    pub fn restart_node(&mut self, etcd: &Etcd) -> Result<()> {
        self.node.proc.kill9();
        let (resp, http, spec) = (self.node.resp, self.node.http, self.node.spec.clone());
        // The lease of the killed node's registration may still be alive: the new node
        // registers under its own lease and the old key expires.
        self.node = ClusterNode::spawn_at(etcd, &self.dir, &spec, resp, http)?;
        self.node.wait_stage("serving", Duration::from_secs(60))
    }

    /// Runs `ferry` against this cluster's coordinator; fails with its stderr.
    pub fn ferry_ok(&self, args: &[&str]) -> Result<String> {
        let out = ferry(&[self.coordinator.addr], args)?;
        if !out.status.success() {
            bail!(
                "ferry {args:?} on {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds a full dup of `table` to `remote` (with more `ferry dup add` flags); returns its
    /// dupid.
    pub fn add_full_dup(&self, table: &str, remote: &str, flags: &[&str]) -> Result<u64> {
        let mut args = vec!["--json", "dup", "add", "-t", table, "-c", remote, "--full"];
        args.extend_from_slice(flags);
        let out = self.ferry_ok(&args)?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parse dup add --json")?;
        v["dupid"].as_u64().context("dup add --json has a dupid")
    }

    /// The status of dup `dupid` of `table` (`DS_LOG`, ...).
    pub fn dup_status(&self, table: &str, dupid: u64) -> Result<String> {
        let out = self.ferry_ok(&["--json", "dup", "list", "-t", table])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parse dup list --json")?;
        v.as_array()
            .into_iter()
            .flatten()
            .find(|d| d["dupid"].as_u64() == Some(dupid))
            .and_then(|d| d["status"].as_str().map(str::to_owned))
            .with_context(|| format!("dup {dupid} is not listed: {v}"))
    }

    /// Waits (bounded) until dup `dupid` of `table` is in `status`.
    pub fn wait_dup_status(
        &self,
        table: &str,
        dupid: u64,
        status: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            last = self.dup_status(table, dupid)?;
            if last == status {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("dup {dupid} of {table} is {last}, not {status}, after {timeout:?}")
    }

    /// Adds an incremental dup of `table` to `remote`; returns its dupid.
    pub fn add_dup(&self, table: &str, remote: &str) -> Result<u64> {
        let out = self.ferry_ok(&["--json", "dup", "add", "-t", table, "-c", remote])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parse dup add --json")?;
        v["dupid"].as_u64().context("dup add --json has a dupid")
    }

    /// The node's `/digest`.
    pub fn digest(&self) -> Result<serde_json::Value> {
        let (status, body) = crate::etcd::http_within(
            self.node.http,
            "GET",
            "/digest",
            "",
            Duration::from_secs(120),
        )?;
        if status != 200 {
            bail!("/digest answered {status}: {body}");
        }
        serde_json::from_str(&body).context("parse /digest")
    }

    /// Plog segment files per partition of the node's table.
    pub fn plog_segments(&self) -> Result<Vec<usize>> {
        let table = self.node.data_dir.join(&self.node.spec.table);
        (0..self.node.spec.partitions)
            .map(|p| {
                let dir = table.join(p.to_string()).join("plog");
                Ok(std::fs::read_dir(&dir)
                    .with_context(|| format!("list {}", dir.display()))?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".plog"))
                    .count())
            })
            .collect()
    }

    /// Sum of the node's committed decrees (its own, local writes).
    pub fn committed_sum(&self) -> Result<u64> {
        let d = self.digest()?;
        Ok(d["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["committed_decree"].as_u64())
            .sum())
    }

    /// The sum of every sample of metric `name` (exact name, any labels) on the shipper's
    /// `/metrics`.
    pub fn shipper_metric(&self, name: &str) -> Result<f64> {
        metric(self.shipper_http, name)
    }

    /// The sum of metric `name`'s samples on the shipper's `/metrics` whose labels include every
    /// `label="value"` of `labels`.
    pub fn shipper_metric_where(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let (status, text) = http_get(self.shipper_http, "/metrics")?;
        if status != 200 {
            bail!("/metrics of the shipper answered {status}: {text}");
        }
        Ok(crate::metrics::sum_where(&text, name, labels))
    }

    /// Like [`Cluster::shipper_metric`], on the receiver's `/metrics`.
    pub fn receiver_metric(&self, name: &str) -> Result<f64> {
        metric(self.receiver_http, name)
    }

    /// Like [`Cluster::shipper_metric`], on the node's `/metrics`.
    pub fn node_metric(&self, name: &str) -> Result<f64> {
        metric(self.node.http, name)
    }

    /// The shipper's `/replica/duplication` rows.
    pub fn duplication_rows(&self) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.shipper_http, "/replica/duplication")?;
        if status != 200 {
            bail!("/replica/duplication answered {status}: {body}");
        }
        serde_json::from_str(&body).context("parse /replica/duplication")
    }

    /// Waits (bounded) until the node takes a write (`SET probe 1`); returns how long that took.
    pub fn wait_writable(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut con = self.redis()?;
        loop {
            let r: redis::RedisResult<()> = redis::cmd("SET").arg("probe").arg("1").query(&mut con);
            match r {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) if start.elapsed() >= timeout => {
                    bail!("{} still refuses writes after {timeout:?}: {e}", self.name)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn redis(&self) -> Result<redis::Connection> {
        Ok(redis::Client::open(self.node.redis_url())?
            .get_connection_with_timeout(Duration::from_secs(5))?)
    }
}

/// Waits (bounded) until both nodes hold the same content: equal entry counts and equal
/// order-independent content hashes. Returns the entry count.
pub fn wait_converged(a: &Cluster, b: &Cluster, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let (da, db) = (a.digest()?, b.digest()?);
        if da["entries"] == db["entries"] && da["content_hash"] == db["content_hash"] {
            return da["entries"].as_u64().context("entries");
        }
        last = format!(
            "{}: {} entries {}, {}: {} entries {}",
            a.name, da["entries"], da["content_hash"], b.name, db["entries"], db["content_hash"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("not converged after {timeout:?}: {last}")
}

impl Cluster {
    /// Starts one more shipper of this cluster beside [`Cluster::shipper`]: same node, plog
    /// and certificates, the config `start_shipper` last wrote with only its own HTTP port and,
    /// if `etcd_endpoint` is given, that etcd URL instead of the cluster's (a relay a test can
    /// cut). Config `<cluster>-<name>.toml`, log `<cluster>-<name>.log` (see
    /// [`Cluster::log_text`]). Returns the process and its HTTP address once it runs; new ports
    /// are tried if the picked one was taken meanwhile.
    pub fn spawn_extra_shipper(
        &self,
        name: &str,
        etcd_endpoint: Option<&str>,
    ) -> Result<(Proc, SocketAddr)> {
        // Derived from the harness shipper's file, so both stay configured alike.
        let base_path = self.dir.join(format!("{}-shipper.toml", self.name));
        let base = std::fs::read_to_string(&base_path)
            .with_context(|| format!("read {} (start_shipper writes it)", base_path.display()))?;
        let config = self.dir.join(format!("{}-{name}.toml", self.name));
        let mut last = None;
        for _ in 0..4 {
            let http = SocketAddr::new(self.place.ip, free_port());
            let mut text = replace_line(&base, "http_addr = ", &format!("http_addr = \"{http}\""))?;
            if let Some(url) = etcd_endpoint {
                text = replace_line(&text, "endpoints = ", &format!("endpoints = [\"{url}\"]"))?;
            }
            std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
            match self.run_shipper(name, &config, http) {
                Ok(proc) => return Ok((proc, http)),
                Err(e) if e.to_string().contains("already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the extra shipper {name} did not start")))
    }
}

/// The sum of the samples of `series` on `http`'s `/metrics`: a bare name sums every label
/// set, a name with labels is that one series (see [`sum_samples`]).
pub fn metric(http: SocketAddr, series: &str) -> Result<f64> {
    let (status, text) = http_get(http, "/metrics")?;
    if status != 200 {
        bail!("/metrics of {http} answered {status}: {text}");
    }
    Ok(sum_samples(&text, series))
}

/// `text` with its one line that starts with `prefix` replaced by `line`; an error if not
/// exactly one line does.
fn replace_line(text: &str, prefix: &str, line: &str) -> Result<String> {
    let hits = text.lines().filter(|l| l.starts_with(prefix)).count();
    if hits != 1 {
        bail!("expected one line starting with `{prefix}` in the shipper's config, found {hits}");
    }
    let mut out: String = text
        .lines()
        .map(|l| if l.starts_with(prefix) { line } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    Ok(out)
}

/// A client writing `<prefix><i>` = `value-<i>` to a cluster in pipelines of 50, `pause`
/// between pipelines, counting what was acknowledged, until stopped (or 300 s).
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Writer {
    pub fn start(c: &Cluster, prefix: &str, pause: Duration) -> Result<Writer> {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut con = c.redis()?;
        let prefix = prefix.to_string();
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || -> Result<()> {
                let deadline = Instant::now() + Duration::from_secs(300);
                let mut next = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let mut pipe = redis::pipe();
                    for i in next..next + 50 {
                        pipe.cmd("SET")
                            .arg(format!("{prefix}{i}"))
                            .arg(format!("value-{i}"))
                            .ignore();
                    }
                    pipe.query::<()>(&mut con)?;
                    next += 50;
                    acked.store(next, Ordering::Relaxed);
                    std::thread::sleep(pause);
                }
                Ok(())
            })
        };
        Ok(Writer {
            stop,
            acked,
            thread,
        })
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops it; the number of acknowledged writes.
    pub fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        Ok(self.acked.load(Ordering::Relaxed))
    }
}

/// Every key a [`Writer`] with `prefix` had acknowledged (`n` of them) reads back from `c` with
/// its value.
pub fn check_written(c: &Cluster, prefix: &str, n: u64) -> Result<()> {
    let mut con = c.redis()?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|i| format!("{prefix}{i}")).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con)?;
        for (i, v) in chunk.iter().zip(got) {
            if v.as_deref() != Some(format!("value-{i}").as_str()) {
                bail!("{prefix}{i} on {} is {v:?}, not value-{i}", c.name);
            }
        }
    }
    Ok(())
}

/// SETs `<prefix>:<i>` = `value` for `i` in `0..n`, in pipelines of 1000.
pub fn set_keys(con: &mut redis::Connection, prefix: &str, n: u32, value: &str) -> Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}:{i}"))
                .arg(value)
                .ignore();
        }
        pipe.query::<()>(con)?;
    }
    Ok(())
}
