//! The shipper's configuration: one TOML file, overridden by command-line flags, validated once.
//!
//! ```toml
//! [cluster]                       # shared by every process of the cluster, checked against etcd
//! name = "bj"
//! id = 1
//! duplication_group = { bj = 1, tj = 2 }
//!
//! [etcd]
//! endpoints = ["http://127.0.0.1:2379"]
//!
//! [remote_clusters]               # remote coordinators' admin addresses, as the coordinator's
//! tj = ["10.2.0.1:34601"]
//!
//! [shipper]
//! node = "bj-n1"                  # the node this shipper runs beside (its registered name)
//! data_dir = "/data/ferry"        # the node's data_dir: <data_dir>/<table>/<p>/plog/
//! certs_dir = "/etc/ferry/certs"  # `certs init --out` directory
//! ```
//!
//! The defaults are tuned for a datacenter-to-datacenter link of about 1 Gbit/s and 30 ms RTT;
//! set `bandwidth_mbps` and `rtt_ms` to the real link so the QUIC windows and the UDP socket
//! buffers cover its bandwidth-delay product.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ferry_meta::config::{ClusterConfig, EtcdConfig};
use serde::{Deserialize, Serialize};

pub use ferry_net::Congestion;

/// Largest accepted `duplicate_log_batch_bytes` (see `ferry_proto::limits`).
pub use ferry_proto::limits::MAX_BATCH_BYTES;

/// The `shipper` process's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipperConfig {
    /// Shared with every process of the cluster; checked against etcd at start-up.
    pub cluster: ClusterConfig,
    /// Where the cluster's etcd is.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Remote clusters by name, with their coordinators' admin addresses (`host:port`): where a
    /// shipper asks which receiver owns a target table.
    #[serde(default)]
    pub remote_clusters: BTreeMap<String, Vec<String>>,
    /// This process.
    #[serde(default)]
    pub shipper: ShipperSection,
}

/// The `[shipper]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShipperSection {
    /// The registered name of the node this shipper runs beside; its partitions are shipped.
    /// Required.
    pub node: String,
    /// The node's data directory (`<data_dir>/<table>/<p>/plog/`). Default `./data`.
    pub data_dir: PathBuf,
    /// The `certs init --out` directory; this shipper loads `ca.pem` and
    /// `<cluster>/shipper.{pem,key}`. Default `./certs`.
    pub certs_dir: PathBuf,
    /// `/health`, `/metrics` and `/replica/duplication`. Default `127.0.0.1:34821`.
    pub http_addr: SocketAddr,
    /// TTL of the lease behind each shipping election: a dead shipper's partitions can be taken
    /// over after this. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Deadline of one etcd request. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub etcd_timeout: Duration,
    /// Plog bytes read into one batch (Pegasus's name); a batch ends after the record that
    /// reaches it. Default 1 MiB, at most 8 MiB.
    pub duplicate_log_batch_bytes: u64,
    /// Batches in flight (sent, not yet acknowledged) per (dup, partition). Default 8.
    pub window_batches: usize,
    /// zstd level of batches, 1..=19. Default 1. Measured on this project's 2-core dev box with
    /// 0.8 MB batches of JSON-like values (6000 records): level 1 → 21.2 % of the raw size at
    /// ~500 MB/s, level 3 → 21.3 % at ~380 MB/s, level 6 → 20.7 % at ~150 MB/s. Higher levels
    /// buy almost nothing on such payloads and cost the CPU the shipper needs to keep up with
    /// the node; raise it only for a link much slower than the disk.
    pub zstd_level: i32,
    /// How often each partition's confirmed decree is written to etcd. Default `1s`. A restart
    /// re-ships at most this much (harmless: the target applies exactly once).
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// A heartbeat is sent this often when there is nothing to ship. Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often dups and assignments are re-read from etcd (a watch also wakes it). Default `1s`.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// An unacknowledged batch older than this fails the session. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Warn (log and `dup_plog_retained_bytes`) when a partition keeps more plog than this for a
    /// dup (since its confirmed decree, paused dups included). Default 16 GiB.
    pub plog_retention_warn_bytes: u64,
    /// A write whose lag (source commit → target durable) exceeds this counts in
    /// `dup_lagging_writes_total`. Default 10000.
    pub dup_lagging_write_threshold_ms: u64,
    /// The link's bandwidth in Mbit/s, for the QUIC windows. Default 1000.
    pub bandwidth_mbps: u64,
    /// The link's round-trip time in ms, for the QUIC windows. Default 30.
    pub rtt_ms: u64,
    /// Congestion control: `bbr` (default), `cubic` or `newreno`.
    pub congestion: Congestion,
    /// Parallel QUIC streams of one partition's checkpoint transfer (full duplication).
    /// Default 4, at most 64.
    pub checkpoint_lanes: usize,
    /// Bytes of a checkpoint file per chunk. Default 1 MiB, at most 4 MiB.
    pub checkpoint_chunk_bytes: u32,
    /// What a partition does when the plog no longer holds what its dup must ship next (the
    /// source collected it past `node.plog_hold_max_bytes`): `rebootstrap` (default) fills the
    /// target again from a fresh checkpoint, then ships the log after it; `stop` stops the
    /// partition with an alarm for the operator.
    pub on_log_gone: OnLogGone,
}

/// `shipper.on_log_gone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnLogGone {
    /// Re-bootstrap the partition from a fresh checkpoint.
    #[default]
    Rebootstrap,
    /// Stop the partition and raise an alarm.
    Stop,
}

impl Default for ShipperSection {
    fn default() -> Self {
        ShipperSection {
            node: String::new(),
            data_dir: PathBuf::from("data"),
            certs_dir: PathBuf::from("certs"),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 34821)),
            lease_ttl: Duration::from_secs(5),
            etcd_timeout: Duration::from_secs(3),
            duplicate_log_batch_bytes: 1 << 20,
            window_batches: 8,
            zstd_level: 1,
            progress_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(500),
            reconcile_interval: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(30),
            plog_retention_warn_bytes: 16 << 30,
            dup_lagging_write_threshold_ms: 10_000,
            bandwidth_mbps: 1000,
            rtt_ms: 30,
            checkpoint_lanes: 4,
            checkpoint_chunk_bytes: 1 << 20,
            congestion: Congestion::default(),
            on_log_gone: OnLogGone::Rebootstrap,
        }
    }
}

/// Command-line flags of `shipper`. Each one overrides the same key of the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "shipper",
    version,
    about = "ferry shipper: streams a node's plogs to the remote clusters' receivers"
)]
pub struct ShipperArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, env = "FERRY_SHIPPER_CONFIG")]
    pub config: Option<PathBuf>,
    /// etcd client URLs, comma-separated (`etcd.endpoints`).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// The node this shipper runs beside (`shipper.node`).
    #[arg(long)]
    pub node: Option<String>,
    /// The node's data directory (`shipper.data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The certificates directory (`shipper.certs_dir`).
    #[arg(long)]
    pub certs_dir: Option<PathBuf>,
    /// HTTP address for /health, /metrics, /replica/duplication (`shipper.http_addr`).
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Election lease TTL, e.g. 5s (`shipper.lease_ttl`).
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Plog bytes per batch (`shipper.duplicate_log_batch_bytes`).
    #[arg(long)]
    pub duplicate_log_batch_bytes: Option<u64>,
    /// Batches in flight per partition (`shipper.window_batches`).
    #[arg(long)]
    pub window_batches: Option<usize>,
    /// zstd level (`shipper.zstd_level`).
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// How often progress is written to etcd, e.g. 1s (`shipper.progress_interval`).
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub progress_interval: Option<Duration>,
    /// Idle heartbeat period, e.g. 500ms (`shipper.heartbeat_interval`).
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Plog retention warning threshold in bytes (`shipper.plog_retention_warn_bytes`).
    #[arg(long)]
    pub plog_retention_warn_bytes: Option<u64>,
    /// Link bandwidth in Mbit/s (`shipper.bandwidth_mbps`).
    #[arg(long)]
    pub bandwidth_mbps: Option<u64>,
    /// Link round-trip time in ms (`shipper.rtt_ms`).
    #[arg(long)]
    pub rtt_ms: Option<u64>,
    /// Congestion control (`shipper.congestion`).
    #[arg(long, value_enum)]
    pub congestion: Option<Congestion>,
}

/// Why a config could not be loaded. Each message names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file (or text) could not be read or parsed.
    #[error(transparent)]
    Toml(#[from] ferry_proc::TomlError),
    /// No `--config` was given.
    #[error("no config file given; pass --config FILE (or set FERRY_SHIPPER_CONFIG), with at least [cluster] and [shipper] node")]
    NoFile,
    /// A key has a value the shipper cannot run with.
    #[error("config key `{key}` {reason}")]
    Invalid { key: String, reason: String },
}

impl ShipperConfig {
    /// Reads the file named by `--config`, applies the flags over it and validates the result.
    pub fn load(args: &ShipperArgs) -> Result<ShipperConfig, ConfigError> {
        let Some(path) = &args.config else {
            return Err(ConfigError::NoFile);
        };
        let mut config = ShipperConfig::from_file(path)?;
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file; does not validate.
    pub fn from_file(path: &Path) -> Result<ShipperConfig, ConfigError> {
        Ok(ferry_proc::read_toml(path)?)
    }

    /// Parses TOML text; does not validate.
    pub fn parse(text: &str) -> Result<ShipperConfig, ConfigError> {
        Ok(ferry_proc::parse_toml(text)?)
    }

    /// Overrides keys with the flags that were given.
    pub fn apply(&mut self, args: &ShipperArgs) {
        let s = &mut self.shipper;
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &args.$field {
                    s.$field = v.clone();
                }
            )*};
        }
        set!(
            node,
            data_dir,
            certs_dir,
            http_addr,
            lease_ttl,
            duplicate_log_batch_bytes,
            window_batches,
            zstd_level,
            progress_interval,
            heartbeat_interval,
            plog_retention_warn_bytes,
            bandwidth_mbps,
            rtt_ms,
            congestion
        );
        if let Some(e) = &args.etcd {
            self.etcd.endpoints = e.clone();
        }
    }

    /// Checks every key once, so the rest of the process can trust them. The first problem found
    /// is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cluster.validate().map_err(|e| match e {
            ferry_meta::config::ConfigError::Invalid { key, problem } => invalid(&key, problem),
            other => invalid("cluster", other.to_string()),
        })?;
        let s = &self.shipper;
        if !ferry_meta::config::valid_name(&s.node) {
            return Err(invalid(
                "shipper.node",
                format!(
                    "is {:?}; set it to the registered name of the node this shipper runs beside (1 to 64 letters, digits, `-`, `_` or `.`)",
                    s.node
                ),
            ));
        }
        if s.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "shipper.data_dir",
                "is empty; name the node's data directory".into(),
            ));
        }
        if s.certs_dir.as_os_str().is_empty() {
            return Err(invalid(
                "shipper.certs_dir",
                "is empty; name the `certs init --out` directory".into(),
            ));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(invalid(
                "etcd.endpoints",
                "must name at least one etcd client URL".into(),
            ));
        }
        between_durations("shipper.lease_ttl", s.lease_ttl, 2_000, 600_000)?;
        between_durations("shipper.etcd_timeout", s.etcd_timeout, 100, 60_000)?;
        between_durations(
            "shipper.progress_interval",
            s.progress_interval,
            10,
            600_000,
        )?;
        between_durations(
            "shipper.heartbeat_interval",
            s.heartbeat_interval,
            10,
            60_000,
        )?;
        between_durations(
            "shipper.reconcile_interval",
            s.reconcile_interval,
            100,
            600_000,
        )?;
        between_durations("shipper.ack_timeout", s.ack_timeout, 100, 3_600_000)?;
        between(
            "shipper.duplicate_log_batch_bytes",
            s.duplicate_log_batch_bytes,
            1,
            MAX_BATCH_BYTES,
        )?;
        between("shipper.window_batches", s.window_batches as u64, 1, 1024)?;
        between("shipper.checkpoint_lanes", s.checkpoint_lanes as u64, 1, 64)?;
        between(
            "shipper.checkpoint_chunk_bytes",
            u64::from(s.checkpoint_chunk_bytes),
            4096,
            ferry_proto::wire::MAX_CHUNK as u64,
        )?;
        let levels = zstd_levels();
        if !levels.contains(&s.zstd_level) {
            return Err(invalid(
                "shipper.zstd_level",
                format!(
                    "is {}; use {}..={} (1 is fast, 3 is zstd's default)",
                    s.zstd_level,
                    levels.start(),
                    levels.end()
                ),
            ));
        }
        between("shipper.bandwidth_mbps", s.bandwidth_mbps, 1, 400_000)?;
        between("shipper.rtt_ms", s.rtt_ms, 1, 10_000)?;
        if s.plog_retention_warn_bytes == 0 {
            return Err(invalid(
                "shipper.plog_retention_warn_bytes",
                "must be at least 1".into(),
            ));
        }
        for (name, addrs) in &self.remote_clusters {
            let key = format!("remote_clusters.{name}");
            if name == &self.cluster.name {
                return Err(invalid(
                    &key,
                    "names this cluster itself; list only remote clusters".into(),
                ));
            }
            if !self.cluster.duplication_group.contains_key(name) {
                return Err(invalid(
                    &key,
                    format!("names cluster `{name}`, which is not in cluster.duplication_group; add it there with its id"),
                ));
            }
            if addrs.is_empty() {
                return Err(invalid(
                    &key,
                    "must list at least one coordinator address".into(),
                ));
            }
            if let Some(bad) = addrs.iter().find(|a| !is_host_port(a)) {
                return Err(invalid(
                    &key,
                    format!("has address `{bad}`; write each coordinator as host:port"),
                ));
            }
        }
        Ok(())
    }
}

impl ShipperSection {
    /// The QUIC flow-control windows and UDP buffers for the link, as the receiver sizes its own
    /// ([`ferry_net::Windows::for_link`]).
    pub fn window_bytes(&self) -> u64 {
        ferry_net::Windows::for_link(self.bandwidth_mbps, self.rtt_ms).stream
    }
}

fn zstd_levels() -> std::ops::RangeInclusive<i32> {
    // zstd's negative "fast" levels trade too much ratio for a WAN link; 1..=19 without --ultra.
    1..=19
}

fn between(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, format!("is {v}; use {lo}..={hi}")))
    }
}

fn between_durations(key: &str, v: Duration, lo_ms: u64, hi_ms: u64) -> Result<(), ConfigError> {
    let ms = v.as_millis();
    if (u128::from(lo_ms)..=u128::from(hi_ms)).contains(&ms) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "is {}; use between {} and {}",
                humantime_serde::re::humantime::format_duration(v),
                humantime_serde::re::humantime::format_duration(Duration::from_millis(lo_ms)),
                humantime_serde::re::humantime::format_duration(Duration::from_millis(hi_ms)),
            ),
        ))
    }
}

/// `host:port`, e.g. `10.2.0.1:34601` or `tj-meta.example:34601`.
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
    })
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [cluster]
        name = "bj"
        id = 1
        duplication_group = { bj = 1, tj = 2 }

        [etcd]
        endpoints = ["http://127.0.0.1:2379"]

        [remote_clusters]
        tj = ["127.0.0.1:34601"]

        [shipper]
        node = "bj-n1"
        data_dir = "/tmp/data"
        progress_interval = "2s"
    "#;

    fn sample() -> ShipperConfig {
        ShipperConfig::parse(SAMPLE).expect("sample parses")
    }

    #[test]
    fn sample_parses_with_documented_defaults() {
        let c = sample();
        c.validate().expect("sample is valid");
        let s = &c.shipper;
        assert_eq!(s.progress_interval, Duration::from_secs(2));
        assert_eq!(s.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(s.duplicate_log_batch_bytes, 1 << 20);
        assert_eq!(s.window_batches, 8);
        assert_eq!(s.zstd_level, 1);
        assert_eq!(s.lease_ttl, Duration::from_secs(5));
        assert_eq!(s.http_addr, SocketAddr::from(([127, 0, 0, 1], 34821)));
        assert_eq!(s.congestion, Congestion::Bbr);
        assert_eq!(s.dup_lagging_write_threshold_ms, 10_000);
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = sample();
        let args = ShipperArgs::parse_from([
            "shipper",
            "--node",
            "bj-n2",
            "--etcd",
            "http://a:1,http://b:2",
            "--window-batches",
            "3",
            "--congestion",
            "cubic",
            "--heartbeat-interval",
            "250ms",
        ]);
        c.apply(&args);
        c.validate().expect("still valid");
        assert_eq!(c.shipper.node, "bj-n2");
        assert_eq!(c.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.shipper.window_batches, 3);
        assert_eq!(c.shipper.congestion, Congestion::Cubic);
        assert_eq!(c.shipper.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(c.shipper.data_dir, PathBuf::from("/tmp/data"), "kept");
    }

    fn invalid_key(c: &ShipperConfig) -> String {
        match c.validate() {
            Err(ConfigError::Invalid { key, reason }) => {
                assert!(!reason.is_empty());
                key
            }
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = sample();
        c.shipper.node = String::new();
        assert_eq!(invalid_key(&c), "shipper.node");

        let mut c = sample();
        c.shipper.duplicate_log_batch_bytes = MAX_BATCH_BYTES + 1;
        assert_eq!(invalid_key(&c), "shipper.duplicate_log_batch_bytes");

        let mut c = sample();
        c.shipper.window_batches = 0;
        assert_eq!(invalid_key(&c), "shipper.window_batches");

        let mut c = sample();
        c.shipper.zstd_level = 40;
        assert_eq!(invalid_key(&c), "shipper.zstd_level");

        let mut c = sample();
        c.shipper.lease_ttl = Duration::from_millis(500);
        assert_eq!(invalid_key(&c), "shipper.lease_ttl");

        let mut c = sample();
        c.shipper.heartbeat_interval = Duration::ZERO;
        assert_eq!(invalid_key(&c), "shipper.heartbeat_interval");

        let mut c = sample();
        c.remote_clusters
            .insert("sh".into(), vec!["127.0.0.1:1".into()]);
        assert_eq!(invalid_key(&c), "remote_clusters.sh", "not in the group");

        let mut c = sample();
        c.remote_clusters
            .insert("tj".into(), vec!["http://x/".into()]);
        assert_eq!(invalid_key(&c), "remote_clusters.tj");

        let mut c = sample();
        c.cluster.id = 0;
        assert_eq!(invalid_key(&c), "cluster.id");

        let mut c = sample();
        c.etcd.endpoints.clear();
        assert_eq!(invalid_key(&c), "etcd.endpoints");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused_with_the_line() {
        let err = ShipperConfig::parse(&format!("{SAMPLE}\nbogus = 1\n"))
            .expect_err("unknown key at the end of [shipper]")
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = ShipperConfig::parse(&SAMPLE.replace("\"2s\"", "\"soon\""))
            .expect_err("bad duration")
            .to_string();
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn a_bad_file_is_named_with_the_key_and_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shipper.toml");
        std::fs::write(&path, format!("{SAMPLE}\nbogus = 1\n")).expect("write the config");
        let err = ShipperConfig::from_file(&path).expect_err("unknown key");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("config file {} is invalid: ", path.display())),
            "{msg}"
        );
        assert!(msg.contains("`bogus = 1`") && !msg.contains('\n'), "{msg}");
        let err = ShipperConfig::parse("bogus = 1").expect_err("text, no file");
        assert!(err.to_string().starts_with("config is invalid: "), "{err}");
    }

    #[test]
    fn missing_config_flag_is_a_sentence() {
        let err = ShipperConfig::load(&ShipperArgs::default()).expect_err("no --config");
        assert!(err.to_string().contains("--config"), "{err}");
    }
}
