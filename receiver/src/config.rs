//! The receiver's configuration: one TOML file, overridden by command-line flags, validated once.
//!
//! ```toml
//! [cluster]                      # shared by every process of the cluster, checked against etcd
//! name = "tj"
//! id = 2
//! duplication_group = { bj = 1, tj = 2 }
//!
//! [etcd]
//! endpoints = ["http://127.0.0.1:2379"]
//!
//! [receiver]
//! node = "tj-n1"                 # the node this receiver writes for (required)
//! data_dir = "/var/lib/ferry"    # that node's data dir (required)
//! certs_dir = "/etc/ferry/certs" # `certs init --out` directory (required)
//! listen = "0.0.0.0:34801"       # UDP, QUIC
//! advertise = "10.2.0.7:34801"   # what shippers dial; default `listen`
//! http_addr = "127.0.0.1:34811"  # /health, /metrics
//! lease_ttl = "5s"
//! inbox_segment_bytes = 67108864
//! max_batch_raw_bytes = 75497480  # the default; never less
//! bandwidth_mbps = 1000          # the WAN link, to size QUIC windows and socket buffers
//! rtt_ms = 50
//! congestion = "bbr"
//! ```
//!
//! The defaults are tuned for one receiver per node on a 1 Gbit/s, 50 ms inter-datacenter link.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

pub use ferry_net::Congestion;
use ferry_proto::limits::MAX_BATCH_RAW;

use ferry_meta::config::{valid_name, ClusterConfig, EtcdConfig};

/// The `receiver` process's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Shared with every process of the cluster; checked against etcd at start-up.
    pub cluster: ClusterConfig,
    /// Where the cluster's etcd is.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// This receiver.
    #[serde(default)]
    pub receiver: ReceiverSection,
}

/// The `[receiver]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverSection {
    /// The node this receiver serves, by the name the node registered under. Required.
    pub node: String,
    /// UDP address of the QUIC server. Default `127.0.0.1:34801`.
    pub listen: SocketAddr,
    /// The address shippers in other datacenters dial, `host:port`; registered in etcd.
    /// Default: the bound `listen` address.
    pub advertise: Option<String>,
    /// HTTP address of `/health` and `/metrics`. Default `127.0.0.1:34811`.
    pub http_addr: SocketAddr,
    /// The node's data dir: table `T`'s partition `p` lives in `<data_dir>/<T>/<p>/`. Required.
    pub data_dir: PathBuf,
    /// The directory `certs init --out` wrote: `ca.pem` and `<cluster>/receiver.{pem,key}`.
    /// Required.
    pub certs_dir: PathBuf,
    /// TTL of the registration lease in etcd: a dead receiver disappears within it. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Deadline of one etcd request. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub etcd_timeout: Duration,
    /// An inbox segment rolls over at this size, in bytes. Default 64 MiB.
    pub inbox_segment_bytes: u64,
    /// Largest uncompressed batch accepted, in bytes; a larger one is refused before it is
    /// decompressed. Default and minimum: `ferry_proto::limits::MAX_BATCH_RAW` (72 MiB), the
    /// largest batch a shipper can send (a full batch plus the largest record a node accepts),
    /// so that every acknowledged write can ship.
    pub max_batch_raw_bytes: u64,
    /// Bandwidth of the link from the source datacenters, in Mbit/s. With `rtt_ms` it sizes the
    /// QUIC receive windows and the UDP socket buffers. Default 1000.
    pub bandwidth_mbps: u64,
    /// Round-trip time to the source datacenters, in milliseconds. Default 50.
    pub rtt_ms: u64,
    /// QUIC congestion controller for what this receiver sends. See [`Congestion`].
    pub congestion: Congestion,
    /// On SIGTERM/SIGINT, how long sessions may take to finish the batch they are writing
    /// before the endpoint closes. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ReceiverSection {
    fn default() -> Self {
        ReceiverSection {
            node: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 34801)),
            advertise: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 34811)),
            data_dir: PathBuf::new(),
            certs_dir: PathBuf::new(),
            lease_ttl: Duration::from_secs(5),
            etcd_timeout: Duration::from_secs(3),
            inbox_segment_bytes: 64 << 20,
            max_batch_raw_bytes: MAX_BATCH_RAW as u64,
            bandwidth_mbps: 1000,
            rtt_ms: 50,
            congestion: Congestion::default(),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Command-line flags of `receiver`. Each one overrides the same key of the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "receiver",
    version,
    about = "ferry receiver: QUIC server that writes batches shipped from other clusters into a node's inbox"
)]
pub struct ReceiverArgs {
    /// TOML config file (it holds the `[cluster]` section); flags override its keys.
    #[arg(long, short = 'c', env = "FERRY_RECEIVER_CONFIG")]
    pub config: PathBuf,
    /// Overrides `receiver.node`.
    #[arg(long)]
    pub node: Option<String>,
    /// Overrides `receiver.listen` (UDP), e.g. 0.0.0.0:34801.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Overrides `receiver.advertise`, e.g. 10.2.0.7:34801.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Overrides `receiver.http_addr`, e.g. 127.0.0.1:34811.
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Overrides `receiver.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `receiver.certs_dir`.
    #[arg(long)]
    pub certs_dir: Option<PathBuf>,
    /// Overrides `etcd.endpoints` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Overrides `receiver.lease_ttl`, e.g. 5s.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Overrides `receiver.bandwidth_mbps`.
    #[arg(long)]
    pub bandwidth_mbps: Option<u64>,
    /// Overrides `receiver.rtt_ms`.
    #[arg(long)]
    pub rtt_ms: Option<u64>,
    /// Overrides `receiver.congestion`.
    #[arg(long)]
    pub congestion: Option<Congestion>,
}

/// Why a config could not be loaded. Each message names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file (or text) could not be read or parsed.
    #[error(transparent)]
    Toml(#[from] ferry_proc::TomlError),
    /// A key has a value the receiver cannot run with.
    #[error("config key `{key}` {reason}")]
    Invalid { key: String, reason: String },
}

/// Smallest and largest lease TTL, as the coordinator's.
const LEASE_TTL: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(600));

impl ReceiverConfig {
    /// Reads `--config`, applies the flags over it and validates the result.
    pub fn load(args: &ReceiverArgs) -> Result<ReceiverConfig, ConfigError> {
        let mut config = ReceiverConfig::from_file(&args.config)?;
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file; does not validate.
    pub fn from_file(path: &Path) -> Result<ReceiverConfig, ConfigError> {
        Ok(ferry_proc::read_toml(path)?)
    }

    /// Parses TOML text; does not validate.
    pub fn from_toml(text: &str) -> Result<ReceiverConfig, ConfigError> {
        Ok(ferry_proc::parse_toml(text)?)
    }

    /// Overrides keys with the flags that were given.
    pub fn apply(&mut self, args: &ReceiverArgs) {
        let r = &mut self.receiver;
        if let Some(v) = &args.node {
            r.node = v.clone();
        }
        if let Some(v) = args.listen {
            r.listen = v;
        }
        if let Some(v) = &args.advertise {
            r.advertise = Some(v.clone());
        }
        if let Some(v) = args.http_addr {
            r.http_addr = v;
        }
        if let Some(v) = &args.data_dir {
            r.data_dir = v.clone();
        }
        if let Some(v) = &args.certs_dir {
            r.certs_dir = v.clone();
        }
        if let Some(v) = args.lease_ttl {
            r.lease_ttl = v;
        }
        if let Some(v) = args.bandwidth_mbps {
            r.bandwidth_mbps = v;
        }
        if let Some(v) = args.rtt_ms {
            r.rtt_ms = v;
        }
        if let Some(v) = args.congestion {
            r.congestion = v;
        }
        if let Some(v) = &args.etcd {
            self.etcd.endpoints = v.clone();
        }
    }

    /// Checks every key once, so that the rest of the process can trust them. The first problem
    /// found is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use ferry_meta::config::ConfigError as Shared;
        self.cluster.validate().map_err(|e| match e {
            Shared::Invalid { key, problem } => invalid(&key, problem),
            other => invalid("cluster", other.to_string()),
        })?;
        if !self
            .cluster
            .duplication_group
            .keys()
            .any(|c| *c != self.cluster.name)
        {
            return Err(invalid(
                "cluster.duplication_group",
                "names no cluster besides this one, so every shipper would be refused; add the \
                 source clusters with their ids, e.g. `{ bj = 1, tj = 2 }`"
                    .into(),
            ));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(invalid(
                "etcd.endpoints",
                "must name at least one etcd client URL".into(),
            ));
        }
        let r = &self.receiver;
        if r.node.is_empty() {
            return Err(invalid(
                "receiver.node",
                "is not set; give the name the node registered under (`node` in [receiver] or --node)".into(),
            ));
        }
        if !valid_name(&r.node) {
            return Err(invalid(
                "receiver.node",
                format!(
                    "is `{}`; use 1 to 64 letters, digits, `.`, `-` or `_`",
                    r.node
                ),
            ));
        }
        if r.data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "receiver.data_dir",
                "is not set; give the node's data dir (`data_dir` in [receiver] or --data-dir)"
                    .into(),
            ));
        }
        if r.certs_dir.as_os_str().is_empty() {
            return Err(invalid(
                "receiver.certs_dir",
                "is not set; give the directory `certs init --out` wrote (`certs_dir` in [receiver] or --certs-dir)".into(),
            ));
        }
        if let Some(a) = &r.advertise {
            if !is_host_port(a) {
                return Err(invalid(
                    "receiver.advertise",
                    format!("is `{a}`; write it as host:port, e.g. 10.2.0.7:34801"),
                ));
            }
        }
        if r.lease_ttl < LEASE_TTL.0 || r.lease_ttl > LEASE_TTL.1 {
            return Err(invalid(
                "receiver.lease_ttl",
                format!(
                    "is {}; use between 2s and 600s",
                    humantime_serde::re::humantime::format_duration(r.lease_ttl)
                ),
            ));
        }
        if r.etcd_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "receiver.etcd_timeout",
                "must be at least 100ms".into(),
            ));
        }
        if r.inbox_segment_bytes < 64 << 10 {
            return Err(invalid(
                "receiver.inbox_segment_bytes",
                format!("is {}; use at least 65536 (64 KiB)", r.inbox_segment_bytes),
            ));
        }
        if !(MAX_BATCH_RAW as u64..=1 << 30).contains(&r.max_batch_raw_bytes) {
            return Err(invalid(
                "receiver.max_batch_raw_bytes",
                format!(
                    "is {}; use between {MAX_BATCH_RAW} (the largest batch a shipper sends: a full batch plus the largest write a node accepts) and 1073741824 (1 GiB)",
                    r.max_batch_raw_bytes
                ),
            ));
        }
        if !(1..=400_000).contains(&r.bandwidth_mbps) {
            return Err(invalid(
                "receiver.bandwidth_mbps",
                format!("is {}; use 1..=400000", r.bandwidth_mbps),
            ));
        }
        if !(1..=10_000).contains(&r.rtt_ms) {
            return Err(invalid(
                "receiver.rtt_ms",
                format!("is {}; use 1..=10000", r.rtt_ms),
            ));
        }
        if r.shutdown_grace > Duration::from_secs(600) {
            return Err(invalid(
                "receiver.shutdown_grace",
                "must be at most 600s".into(),
            ));
        }
        Ok(())
    }

    /// The largest uncompressed batch accepted, as a length.
    pub fn max_batch_raw(&self) -> usize {
        usize::try_from(self.receiver.max_batch_raw_bytes).unwrap_or(usize::MAX)
    }
}

/// `host:port`, e.g. `10.2.0.7:34801` or `tj-n1.example:34801`.
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
        name = "tj"
        id = 2
        duplication_group = { bj = 1, tj = 2 }

        [etcd]
        endpoints = ["http://127.0.0.1:2379"]

        [receiver]
        node = "tj-n1"
        data_dir = "/var/lib/ferry"
        certs_dir = "/etc/ferry/certs"
        lease_ttl = "3s"
        rtt_ms = 20
        congestion = "bbr"
    "#;

    #[test]
    fn parses_with_documented_defaults() {
        let c = ReceiverConfig::from_toml(SAMPLE).expect("sample parses");
        c.validate().expect("sample is valid");
        let r = &c.receiver;
        assert_eq!(r.listen.to_string(), "127.0.0.1:34801");
        assert_eq!(r.http_addr.to_string(), "127.0.0.1:34811");
        assert_eq!(r.lease_ttl, Duration::from_secs(3));
        assert_eq!(r.inbox_segment_bytes, 64 << 20);
        assert_eq!(c.max_batch_raw(), MAX_BATCH_RAW);
        assert_eq!(r.bandwidth_mbps, 1000);
        assert_eq!(r.rtt_ms, 20);
        assert_eq!(r.congestion, Congestion::Bbr);
        assert_eq!(r.advertise, None);
        let d = ReceiverSection::default();
        assert_eq!(d.congestion, Congestion::Bbr);
        assert_eq!(d.lease_ttl, Duration::from_secs(5));
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = ReceiverConfig::from_toml(SAMPLE).expect("sample parses");
        let args = ReceiverArgs::parse_from([
            "receiver",
            "--config",
            "x.toml",
            "--node",
            "tj-n2",
            "--listen",
            "127.0.0.1:1",
            "--http-addr",
            "127.0.0.1:2",
            "--data-dir",
            "/d",
            "--certs-dir",
            "/c",
            "--etcd",
            "http://a:1,http://b:2",
            "--congestion",
            "newreno",
        ]);
        c.apply(&args);
        c.validate().expect("still valid");
        assert_eq!(c.receiver.node, "tj-n2");
        assert_eq!(c.receiver.listen.to_string(), "127.0.0.1:1");
        assert_eq!(c.receiver.http_addr.to_string(), "127.0.0.1:2");
        assert_eq!(c.receiver.data_dir, PathBuf::from("/d"));
        assert_eq!(c.receiver.certs_dir, PathBuf::from("/c"));
        assert_eq!(c.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.receiver.congestion, Congestion::Newreno);
        assert_eq!(
            c.receiver.rtt_ms, 20,
            "a flag not given keeps the file's value"
        );
    }

    #[test]
    fn validation_names_the_key() {
        type Change = Box<dyn Fn(&mut ReceiverConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("cluster.id", Box::new(|c| c.cluster.id = 0)),
            (
                "cluster.duplication_group",
                Box::new(|c| {
                    c.cluster.duplication_group.remove("bj");
                }),
            ),
            ("etcd.endpoints", Box::new(|c| c.etcd.endpoints.clear())),
            ("receiver.node", Box::new(|c| c.receiver.node.clear())),
            (
                "receiver.node",
                Box::new(|c| c.receiver.node = "a/b".into()),
            ),
            (
                "receiver.data_dir",
                Box::new(|c| c.receiver.data_dir = PathBuf::new()),
            ),
            (
                "receiver.certs_dir",
                Box::new(|c| c.receiver.certs_dir = PathBuf::new()),
            ),
            (
                "receiver.advertise",
                Box::new(|c| c.receiver.advertise = Some("http://x".into())),
            ),
            (
                "receiver.lease_ttl",
                Box::new(|c| c.receiver.lease_ttl = Duration::from_millis(500)),
            ),
            (
                "receiver.inbox_segment_bytes",
                Box::new(|c| c.receiver.inbox_segment_bytes = 10),
            ),
            (
                "receiver.max_batch_raw_bytes",
                Box::new(|c| c.receiver.max_batch_raw_bytes = 2 << 30),
            ),
            (
                "receiver.bandwidth_mbps",
                Box::new(|c| c.receiver.bandwidth_mbps = 0),
            ),
            ("receiver.rtt_ms", Box::new(|c| c.receiver.rtt_ms = 0)),
        ];
        for (key, change) in cases {
            let mut c = ReceiverConfig::from_toml(SAMPLE).expect("sample parses");
            change(&mut c);
            let e = c.validate().expect_err(key);
            assert!(
                e.to_string().starts_with(&format!("config key `{key}`")),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let e = ReceiverConfig::from_toml(&SAMPLE.replace("rtt_ms", "rtt_msec"))
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("rtt_msec"), "{e}");
        let e = ReceiverConfig::from_toml(&SAMPLE.replace("\"3s\"", "\"3 parsecs\""))
            .expect_err("bad duration")
            .to_string();
        assert!(e.contains("at line 14: `lease_ttl = \"3 parsecs\"`"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = ReceiverConfig::from_toml(&SAMPLE.replace("\"bbr\"", "\"vegas\""))
            .expect_err("unknown congestion controller")
            .to_string();
        assert!(e.contains("vegas"), "{e}");
    }

    #[test]
    fn a_bad_file_is_named_with_the_key_and_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("receiver.toml");
        std::fs::write(&path, SAMPLE.replace("rtt_ms", "rtt_msec")).expect("write the config");
        let e = ReceiverConfig::from_file(&path)
            .expect_err("unknown key")
            .to_string();
        assert!(
            e.starts_with(&format!("config file {} is invalid: ", path.display())),
            "{e}"
        );
        assert!(e.contains("`rtt_msec = 20`") && !e.contains('\n'), "{e}");
        let e = ReceiverConfig::from_toml("bogus = 1").expect_err("text, no file");
        assert!(e.to_string().starts_with("config is invalid: "), "{e}");
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let args = ReceiverArgs {
            config: "/nonexistent/ferry-receiver.toml".into(),
            ..ReceiverArgs::default()
        };
        let e = ReceiverConfig::load(&args).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("cannot read config file /nonexistent/ferry-receiver.toml"),
            "{e}"
        );
    }
}
