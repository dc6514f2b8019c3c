//! The node's configuration: one TOML file, overridden by command-line flags, validated once.
//!
//! Every field has a default, so an empty file (or no file) plus `--cluster-id` is a working
//! single-node set-up on loopback. The defaults are tuned for a development machine: one SSD, a
//! few partitions, loopback addresses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ferry_proc::one_line;
use ferry_proto::ClusterId;
use serde::{Deserialize, Serialize};

use ferry_engine::partition::PartitionOptions;
use ferry_log::nodelog;

/// Most partitions one node may host; a bound so a typo cannot open a million RocksDB instances.
pub const MAX_PARTITIONS: u32 = 4096;

/// The `node` process's configuration, as read from its TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This cluster's name (`bj`). Default `local`.
    pub cluster: String,
    /// This cluster's id in the duplication group, 1..=127, stamped into every timetag. No
    /// default: two clusters with the same id could not order their writes, so it must be chosen.
    pub cluster_id: Option<u8>,
    /// The table this node serves. Default `default`.
    pub table: String,
    /// Partition count P of the table. Default 8. Changing it for an existing data dir re-routes
    /// keys, so it must stay fixed for the life of the table.
    pub partitions: u32,
    /// Where the table's partitions live (`<data_dir>/<table>/<p>`). Default `./data`.
    pub data_dir: PathBuf,
    /// Address of the RESP (Redis protocol) client port. Default `127.0.0.1:6380`.
    pub resp_addr: SocketAddr,
    /// Address of the HTTP port (`/health`, `/metrics`). Default `127.0.0.1:9180`.
    pub http_addr: SocketAddr,
    /// Most client connections at once; the next one is told so and closed. Default 10000.
    pub max_connections: usize,
    /// A plog segment rolls over at this size, in bytes. Default 64 MiB.
    pub plog_segment_bytes: u64,
    /// Size in bytes of each segment of the node's commit log (`<data_dir>/.nodelog`), the one
    /// log every partition's group commits share. Each segment takes this much disk from the
    /// start (it is written full of zeros, so its fsyncs change no metadata). Default 32 MiB.
    pub commit_log_segment_bytes: u64,
    /// How long tombstones are kept before compaction may purge them, e.g. `"24h"`. Default 24h.
    /// It must exceed the longest duplication lag you tolerate, or a late duplicated write could
    /// resurrect a deleted key.
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
    /// Most writes in one group commit (one fsync). Default 4096.
    pub max_group_writes: usize,
    /// On SIGTERM/SIGINT, how long in-flight commands may take to finish before connections are
    /// cut, e.g. `"10s"`. Default 10s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// etcd client URLs of this cluster. Empty (the default): a standalone node, outside any
    /// cluster. Set: the node checks its config against the cluster's, registers, and waits
    /// for its table to be placed on it before it opens the client port.
    pub etcd_endpoints: Vec<String>,
    /// This node's name in the registry. Default `<cluster>-<resp port>`.
    pub node_name: Option<String>,
    /// Every cluster that may take part in duplication, by name, with its id; must equal the
    /// coordinator's `cluster.duplication_group`. Default empty.
    pub duplication_group: std::collections::BTreeMap<String, u8>,
    /// TTL of the registration lease: a dead node leaves the registry within it. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Deadline of one etcd request. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub etcd_timeout: Duration,
    /// How often each partition looks for new duplicated writes in an inbox that inotify cannot
    /// watch; a watched inbox wakes its applier as each batch becomes durable. Default `2ms`.
    #[serde(with = "humantime_serde")]
    pub inbox_apply_interval: Duration,
    /// How often plog segments that every duplication confirmed are deleted. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub plog_gc_interval: Duration,
    /// Records kept in the plog before the committed decree even when nothing holds them.
    /// Default 0.
    pub plog_retain_decrees: u64,
    /// Most bytes of plog one partition keeps for duplications that have not confirmed them
    /// (a long pause, a long outage). Past it the oldest segments are collected anyway, so the
    /// source's disk never fills for a dup; the dup's shippers then re-bootstrap the partition
    /// from a fresh checkpoint (or stop with an alarm, `shipper.on_log_gone`). 0: no limit.
    /// Default 64 GiB.
    pub plog_hold_max_bytes: u64,
    /// The password of the `default` user, as Redis's `requirepass`. Set (or with `users`),
    /// clients must `AUTH` (or `HELLO ... AUTH`) before any other command. Default: none, and
    /// anyone who reaches the client port may read and write.
    pub requirepass: Option<String>,
    /// More users, each `{ name, password, readonly }`; a `readonly` user may only read.
    pub users: Vec<UserConfig>,
}

/// A client user (`[[users]]` in the node's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: String,
    /// Reads only: every write is refused with `-NOPERM`. Default false.
    #[serde(default)]
    pub readonly: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let partition = PartitionOptions::new(
            ClusterId::new(1).unwrap_or_else(|| unreachable!("1 is a valid cluster id")),
        );
        NodeConfig {
            cluster: "local".to_string(),
            cluster_id: None,
            table: "default".to_string(),
            partitions: 8,
            data_dir: PathBuf::from("data"),
            resp_addr: SocketAddr::from(([127, 0, 0, 1], 6380)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9180)),
            max_connections: 10_000,
            plog_segment_bytes: partition.plog_segment_bytes,
            commit_log_segment_bytes: nodelog::DEFAULT_SEGMENT_BYTES,
            tombstone_retention: partition.tombstone_retention,
            max_group_writes: partition.max_group_writes,
            shutdown_grace: Duration::from_secs(10),
            etcd_endpoints: Vec::new(),
            node_name: None,
            duplication_group: Default::default(),
            lease_ttl: Duration::from_secs(5),
            etcd_timeout: Duration::from_secs(3),
            inbox_apply_interval: Duration::from_millis(2),
            plog_gc_interval: Duration::from_secs(10),
            plog_retain_decrees: 0,
            plog_hold_max_bytes: 64 << 30,
            requirepass: None,
            users: Vec::new(),
        }
    }
}

/// Command-line flags of `node`. Each one overrides the same key of the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "node",
    version,
    about = "ferry storage node: serves one partitioned table over RESP"
)]
pub struct NodeArgs {
    /// TOML config file; flags override its keys.
    #[arg(long, env = "FERRY_NODE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This cluster's name.
    #[arg(long)]
    pub cluster: Option<String>,
    /// This cluster's id, 1..=127.
    #[arg(long)]
    pub cluster_id: Option<u8>,
    /// The table this node serves.
    #[arg(long)]
    pub table: Option<String>,
    /// Partition count of the table.
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Directory that holds the table's partitions.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// RESP client address, e.g. 127.0.0.1:6380.
    #[arg(long)]
    pub resp_addr: Option<SocketAddr>,
    /// HTTP address for /health and /metrics, e.g. 127.0.0.1:9180.
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Most client connections at once.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Plog segment size in bytes.
    #[arg(long)]
    pub plog_segment_bytes: Option<u64>,
    /// Commit log segment size in bytes.
    #[arg(long)]
    pub commit_log_segment_bytes: Option<u64>,
    /// How long tombstones are kept, e.g. 24h.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub tombstone_retention: Option<Duration>,
    /// Most writes in one group commit.
    #[arg(long)]
    pub max_group_writes: Option<usize>,
    /// How long shutdown waits for in-flight commands, e.g. 10s.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// etcd client URLs, comma-separated; joins the cluster.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// This node's name in the registry.
    #[arg(long)]
    pub node_name: Option<String>,
    /// Registration lease TTL, e.g. 5s.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,
}

/// Why a config could not be loaded. Each message names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for a node, or has an unknown key.
    #[error("config file {} is invalid: {}", path.display(), one_line(source, text))]
    Parse {
        path: PathBuf,
        /// The file's text, to quote the offending line.
        text: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A key has a value the node cannot run with.
    #[error("config key `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl NodeConfig {
    /// Reads the file named by `--config` (if any), applies the flags over it and validates the
    /// result.
    pub fn load(args: &NodeArgs) -> Result<NodeConfig, ConfigError> {
        let mut config = match &args.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file; does not validate.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        NodeConfig::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            text: text.clone(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text; does not validate.
    pub fn from_toml(text: &str) -> Result<NodeConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Overrides keys with the flags that were given.
    pub fn apply(&mut self, args: &NodeArgs) {
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &args.$field {
                    self.$field = v.clone();
                }
            )*};
        }
        set!(
            cluster,
            table,
            partitions,
            data_dir,
            resp_addr,
            http_addr,
            max_connections,
            plog_segment_bytes,
            commit_log_segment_bytes,
            tombstone_retention,
            max_group_writes,
            shutdown_grace
        );
        set!(lease_ttl);
        if args.cluster_id.is_some() {
            self.cluster_id = args.cluster_id;
        }
        if let Some(e) = &args.etcd {
            self.etcd_endpoints = e.clone();
        }
        if args.node_name.is_some() {
            self.node_name = args.node_name.clone();
        }
    }

    /// Checks every key; the first problem found is returned, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.partition_options().map(|_| ())
    }

    /// This node's name in the registry.
    pub fn node_name(&self) -> String {
        self.node_name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.cluster, self.resp_addr.port()))
    }

    /// The options every partition of the table is opened with. Validates the config first.
    pub fn partition_options(&self) -> Result<PartitionOptions, ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        check_name("cluster", &self.cluster)?;
        check_name("table", &self.table)?;
        let Some(id) = self.cluster_id else {
            return invalid("cluster_id", "is not set; choose this cluster's id (1..=127) with `cluster_id` in the config file or --cluster-id".into());
        };
        let Some(cluster) = ClusterId::new(id) else {
            return invalid(
                "cluster_id",
                format!("must be between 1 and {}, not {id}", ClusterId::MAX),
            );
        };
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return invalid(
                "partitions",
                format!(
                    "must be between 1 and {MAX_PARTITIONS}, not {}",
                    self.partitions
                ),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            return invalid(
                "data_dir",
                "is empty; name the directory that holds the table".into(),
            );
        }
        if self.resp_addr == self.http_addr && self.resp_addr.port() != 0 {
            return invalid(
                "http_addr",
                format!("is the same address as `resp_addr` ({})", self.resp_addr),
            );
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1".into());
        }
        if self.plog_segment_bytes < 64 << 10 {
            return invalid(
                "plog_segment_bytes",
                format!(
                    "must be at least 65536 (64 KiB), not {}",
                    self.plog_segment_bytes
                ),
            );
        }
        if !(nodelog::MIN_SEGMENT_BYTES..=u32::MAX as u64).contains(&self.commit_log_segment_bytes)
        {
            return invalid(
                "commit_log_segment_bytes",
                format!(
                    "must be between {} (1 MiB) and {} (4 GiB), not {}",
                    nodelog::MIN_SEGMENT_BYTES,
                    u32::MAX,
                    self.commit_log_segment_bytes
                ),
            );
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() || u.name == "default" || u.password.is_empty() {
                return invalid(
                    "users",
                    format!("entry {i} needs a `name` other than `default` (whose password is `requirepass`) and a non-empty `password`"),
                );
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                return invalid("users", format!("user `{}` is named twice", u.name));
            }
        }
        if self.requirepass.as_deref() == Some("") {
            return invalid(
                "requirepass",
                "is empty; remove it, or set a password".into(),
            );
        }
        if self.max_group_writes == 0 {
            return invalid("max_group_writes", "must be at least 1".into());
        }
        if !self.etcd_endpoints.is_empty() {
            check_name("node_name", &self.node_name())?;
            if self.resp_addr.port() == 0 {
                return invalid(
                    "resp_addr",
                    "has port 0, which cannot be registered; choose a port when `etcd_endpoints` is set".into(),
                );
            }
            if self.lease_ttl < Duration::from_secs(1) {
                return invalid("lease_ttl", "must be at least 1s".into());
            }
        }
        if self.inbox_apply_interval.is_zero() {
            return invalid("inbox_apply_interval", "must be more than 0".into());
        }
        if self.plog_gc_interval.is_zero() {
            return invalid("plog_gc_interval", "must be more than 0".into());
        }
        let mut opts = PartitionOptions::new(cluster);
        opts.plog_segment_bytes = self.plog_segment_bytes;
        opts.tombstone_retention = self.tombstone_retention;
        opts.max_group_writes = self.max_group_writes;
        Ok(opts)
    }
}

/// Cluster and table names become directory names and etcd key parts: keep them plain.
fn check_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!(
                "is {name:?}; use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NodeConfig {
        NodeConfig {
            cluster_id: Some(1),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = NodeConfig::from_toml("").expect("empty TOML parses");
        assert_eq!(c, NodeConfig::default());
        assert_eq!(c.table, "default");
        assert_eq!(c.resp_addr.to_string(), "127.0.0.1:6380");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:9180");
        assert_eq!(c.max_connections, 10_000);
    }

    #[test]
    fn parses_every_key_with_human_durations() {
        let c = NodeConfig::from_toml(
            r#"
            cluster = "bj"
            cluster_id = 3
            table = "users"
            partitions = 16
            data_dir = "/var/lib/ferry"
            resp_addr = "127.0.0.1:7000"
            http_addr = "127.0.0.1:7001"
            max_connections = 5
            plog_segment_bytes = 1048576
            tombstone_retention = "2h 30m"
            max_group_writes = 100
            shutdown_grace = "3s"
            "#,
        )
        .expect("valid TOML");
        assert_eq!(c.cluster_id, Some(3));
        assert_eq!(c.tombstone_retention, Duration::from_secs(9000));
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        let opts = c.partition_options().expect("valid config");
        assert_eq!(opts.cluster.get(), 3);
        assert_eq!(opts.plog_segment_bytes, 1 << 20);
        assert_eq!(opts.max_group_writes, 100);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = NodeConfig::from_toml("partitons = 4").expect_err("typo is refused");
        assert!(e.to_string().contains("partitons"), "{e}");
        let e = NodeConfig::from_toml("tombstone_retention = \"ten minutes\"")
            .expect_err("bad duration");
        assert!(
            e.message().contains("ten minutes") || e.to_string().contains("tombstone_retention"),
            "{e}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let cases: Vec<(&str, NodeConfig)> = vec![
            ("cluster_id", NodeConfig::default()),
            (
                "cluster_id",
                NodeConfig {
                    cluster_id: Some(0),
                    ..valid()
                },
            ),
            (
                "cluster_id",
                NodeConfig {
                    cluster_id: Some(200),
                    ..valid()
                },
            ),
            (
                "partitions",
                NodeConfig {
                    partitions: 0,
                    ..valid()
                },
            ),
            (
                "partitions",
                NodeConfig {
                    partitions: MAX_PARTITIONS + 1,
                    ..valid()
                },
            ),
            (
                "table",
                NodeConfig {
                    table: "../etc".into(),
                    ..valid()
                },
            ),
            (
                "table",
                NodeConfig {
                    table: String::new(),
                    ..valid()
                },
            ),
            (
                "cluster",
                NodeConfig {
                    cluster: "a b".into(),
                    ..valid()
                },
            ),
            (
                "max_connections",
                NodeConfig {
                    max_connections: 0,
                    ..valid()
                },
            ),
            (
                "plog_segment_bytes",
                NodeConfig {
                    plog_segment_bytes: 10,
                    ..valid()
                },
            ),
            (
                "max_group_writes",
                NodeConfig {
                    max_group_writes: 0,
                    ..valid()
                },
            ),
            (
                "http_addr",
                NodeConfig {
                    http_addr: valid().resp_addr,
                    ..valid()
                },
            ),
        ];
        for (key, config) in cases {
            let e = config.validate().expect_err(key);
            assert!(
                matches!(&e, ConfigError::Invalid { key: k, .. } if *k == key),
                "{key}: {e}"
            );
            assert!(
                e.to_string().starts_with(&format!("config key `{key}`")),
                "{e}"
            );
        }
        valid()
            .validate()
            .expect("defaults plus a cluster id are valid");
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = NodeConfig::from_toml("partitions = 4\ncluster_id = 2\ntable = \"t\"")
            .expect("valid TOML");
        let args = NodeArgs::parse_from([
            "node",
            "--partitions",
            "12",
            "--resp-addr",
            "127.0.0.1:1234",
            "--shutdown-grace",
            "1s",
        ]);
        c.apply(&args);
        assert_eq!(c.partitions, 12);
        assert_eq!(
            c.cluster_id,
            Some(2),
            "a flag that is not given keeps the file's value"
        );
        assert_eq!(c.table, "t");
        assert_eq!(c.resp_addr.to_string(), "127.0.0.1:1234");
        assert_eq!(c.shutdown_grace, Duration::from_secs(1));
    }

    #[test]
    fn file_errors_quote_the_offending_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "cluster_id = 1\ntombstone_retention = \"forever\"\n")
            .expect("write");
        let e = NodeConfig::from_file(&path).expect_err("bad duration");
        let msg = e.to_string();
        assert!(
            msg.contains("at line 2: `tombstone_retention = \"forever\"`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let args = NodeArgs {
            config: Some("/nonexistent/ferry-node.toml".into()),
            ..NodeArgs::default()
        };
        let e = NodeConfig::load(&args).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("cannot read config file /nonexistent/ferry-node.toml"),
            "{e}"
        );
    }
}
