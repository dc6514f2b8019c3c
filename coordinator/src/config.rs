//! Configuration: the part every process of a cluster shares ([`ClusterConfig`], stored in etcd
//! under `/ferry/<cluster>/config` and compared at start-up), and the coordinator's own file
//! ([`CoordinatorConfig`]).
//!
//! One TOML file per process, parsed with serde into typed structs with documented defaults,
//! then validated once by [`CoordinatorConfig::validate`], whose errors name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The partitioning hash every process of a cluster must agree on. // move to ferry-proto
pub const DEFAULT_PARTITION_HASH: &str = "crc32c";
/// The plog record format version. // move to ferry-proto
pub const DEFAULT_PLOG_FORMAT_VERSION: u32 = 1;

/// What every process of one cluster must agree on. The first coordinator stores it; every other
/// process compares its own copy with the stored one and refuses to start on any difference
/// (see [`crate::meta::cluster_config`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name, e.g. `bj`. Every etcd key lives under `/ferry/<name>/`.
    pub name: String,
    /// The cluster's id in the duplication group, 1..=127 (it goes into every timetag).
    pub id: u8,
    /// Every cluster that may take part in duplication, by name, with its id (Pegasus's
    /// `[duplication-group]`). Must contain this cluster itself.
    #[serde(default)]
    pub duplication_group: BTreeMap<String, u8>,
    /// The key → partition hash. Default `crc32c`.
    #[serde(default = "default_partition_hash")]
    pub partition_hash: String,
    /// The plog record format version. Default 1.
    #[serde(default = "default_plog_format_version")]
    pub plog_format_version: u32,
}

/// A coordinator's configuration file.
///
/// ```toml
/// [cluster]
/// name = "bj"
/// id = 1
/// duplication_group = { bj = 1, tj = 2 }
///
/// [coordinator]
/// id = "bj-c1"
/// listen = "127.0.0.1:34601"
///
/// [etcd]
/// endpoints = ["http://127.0.0.1:2379"]
///
/// [remote_clusters]
/// tj = ["10.2.0.1:34601"]
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Shared with every process of the cluster; checked against etcd at start-up.
    pub cluster: ClusterConfig,
    /// This coordinator process.
    #[serde(default)]
    pub coordinator: CoordinatorSection,
    /// Where the cluster's etcd is.
    #[serde(default)]
    pub etcd: EtcdConfig,
    /// Remote clusters this one may duplicate to, by name, with their coordinators' admin
    /// addresses (Pegasus's `[pegasus.clusters]`). Each name must be in the duplication group.
    #[serde(default)]
    pub remote_clusters: BTreeMap<String, Vec<String>>,
}

/// The `[coordinator]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSection {
    /// This instance's name, unique in the cluster; shown by `ferry status`. Default: the
    /// advertised address.
    pub id: Option<String>,
    /// Admin HTTP API, `/metrics` and `/health`. Default `127.0.0.1:34601`.
    pub listen: SocketAddr,
    /// The address other coordinators and the CLI use to reach this one. Default: `listen`.
    pub advertise: Option<String>,
    /// TTL of the election lease: a dead leader is replaced within this time. Default `5s`;
    /// shorter fails over faster but a long etcd or GC stall can then cost the leadership.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Deadline of a single etcd request. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub etcd_timeout: Duration,
    /// Upper bound of the backoff between reconnection attempts while etcd is down. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// How often the leader re-checks tables still `creating` (unplaced partitions). Default `2s`.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
}

/// The `[etcd]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// etcd client URLs. Default `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
}

/// A configuration value that cannot work, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The TOML parser's message, which names the key and line.
        message: String,
    },
    /// A key has a value that cannot work.
    #[error("config key `{key}` {problem}")]
    Invalid {
        /// The dotted key, e.g. `cluster.id`.
        key: String,
        /// What is wrong and what would be right.
        problem: String,
    },
}

impl CoordinatorConfig {
    /// Reads and parses a TOML file. Does not validate; call [`CoordinatorConfig::validate`]
    /// after applying command-line overrides.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        CoordinatorConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<CoordinatorConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Checks every value once, so that the rest of the process can trust them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cluster.validate()?;
        let c = &self.coordinator;
        if c.lease_ttl < Duration::from_secs(2) || c.lease_ttl > Duration::from_secs(600) {
            return Err(invalid(
                "coordinator.lease_ttl",
                format!(
                    "is {}; use between 2s and 600s",
                    humantime_serde::re::humantime::format_duration(c.lease_ttl)
                ),
            ));
        }
        if c.etcd_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "coordinator.etcd_timeout",
                "must be at least 100ms".into(),
            ));
        }
        if c.reconnect_backoff_max < Duration::from_millis(100) {
            return Err(invalid(
                "coordinator.reconnect_backoff_max",
                "must be at least 100ms".into(),
            ));
        }
        if c.reconcile_interval < Duration::from_millis(100) {
            return Err(invalid(
                "coordinator.reconcile_interval",
                "must be at least 100ms".into(),
            ));
        }
        if matches!(&c.id, Some(id) if id.is_empty() || id.contains('/')) {
            return Err(invalid(
                "coordinator.id",
                "must be non-empty and contain no `/`".into(),
            ));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(invalid(
                "etcd.endpoints",
                "must name at least one etcd client URL".into(),
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
            if let Some(bad) = addrs.iter().find(|a| !is_host_port(a)) {
                return Err(invalid(
                    &key,
                    format!("has address `{bad}`; write each coordinator as host:port"),
                ));
            }
            if addrs.is_empty() {
                return Err(invalid(
                    &key,
                    "must list at least one coordinator address".into(),
                ));
            }
        }
        Ok(())
    }

    /// The address this coordinator announces to the others and to the CLI.
    pub fn advertise(&self) -> String {
        self.coordinator
            .advertise
            .clone()
            .unwrap_or_else(|| self.coordinator.listen.to_string())
    }

    /// This coordinator's name.
    pub fn instance_id(&self) -> String {
        self.coordinator
            .id
            .clone()
            .unwrap_or_else(|| self.advertise())
    }
}

impl ClusterConfig {
    /// Checks the shared part; every process calls this before comparing with etcd.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.name) {
            return Err(invalid(
                "cluster.name",
                format!(
                    "is `{}`; use 1 to 64 letters, digits, `-` or `_`",
                    self.name
                ),
            ));
        }
        if !(1..=127).contains(&self.id) {
            return Err(invalid(
                "cluster.id",
                format!("is {}; use 1..=127", self.id),
            ));
        }
        match self.duplication_group.get(&self.name) {
            Some(id) if *id == self.id => {}
            Some(id) => {
                return Err(invalid(
                    &format!("cluster.duplication_group.{}", self.name),
                    format!("is {id} but cluster.id is {}; they must be equal", self.id),
                ))
            }
            None if self.duplication_group.is_empty() => {}
            None => {
                return Err(invalid(
                    "cluster.duplication_group",
                    format!(
                        "does not contain this cluster `{}`; add `{} = {}`",
                        self.name, self.name, self.id
                    ),
                ))
            }
        }
        let mut seen: BTreeMap<u8, &str> = BTreeMap::new();
        for (name, id) in &self.duplication_group {
            let key = format!("cluster.duplication_group.{name}");
            if !valid_name(name) {
                return Err(invalid(&key, "is not a valid cluster name".into()));
            }
            if !(1..=127).contains(id) {
                return Err(invalid(&key, format!("is {id}; use 1..=127")));
            }
            if let Some(other) = seen.insert(*id, name) {
                return Err(invalid(
                    &key,
                    format!("reuses id {id} of cluster `{other}`; ids must be unique"),
                ));
            }
        }
        if self.partition_hash.is_empty() {
            return Err(invalid(
                "cluster.partition_hash",
                "must not be empty".into(),
            ));
        }
        Ok(())
    }
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        CoordinatorSection {
            id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 34601)),
            advertise: None,
            lease_ttl: Duration::from_secs(5),
            etcd_timeout: Duration::from_secs(3),
            reconnect_backoff_max: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(2),
        }
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
        }
    }
}

/// Table, cluster and node names: what can safely sit between two `/` in an etcd key.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s != "."
        && s != ".."
}

/// `host:port`, e.g. `10.2.0.1:34601` or `tj-meta.example:34601`.
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
    })
}

fn default_partition_hash() -> String {
    DEFAULT_PARTITION_HASH.into()
}

fn default_plog_format_version() -> u32 {
    DEFAULT_PLOG_FORMAT_VERSION
}

fn invalid(key: &str, problem: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem,
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

        [coordinator]
        listen = "127.0.0.1:1234"
        lease_ttl = "3s"

        [remote_clusters]
        tj = ["127.0.0.1:4000"]
    "#;

    #[test]
    fn parses_with_defaults() {
        let c = CoordinatorConfig::parse(SAMPLE).expect("sample parses");
        c.validate().expect("sample is valid");
        assert_eq!(c.coordinator.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.coordinator.etcd_timeout, Duration::from_secs(3));
        assert_eq!(c.cluster.partition_hash, "crc32c");
        assert_eq!(c.advertise(), "127.0.0.1:1234");
    }

    #[test]
    fn errors_name_the_key() {
        let bad = SAMPLE.replace("id = 1", "id = 0");
        let err = CoordinatorConfig::parse(&bad)
            .and_then(|c| c.validate())
            .expect_err("id 0");
        assert!(err.to_string().contains("`cluster.id`"), "{err}");

        let bad = SAMPLE.replace("tj = [\"127", "sh = [\"127");
        let err = CoordinatorConfig::parse(&bad)
            .and_then(|c| c.validate())
            .expect_err("sh");
        assert!(err.to_string().contains("remote_clusters.sh"), "{err}");

        let bad = SAMPLE.replace("127.0.0.1:4000", "http://tj");
        let err = CoordinatorConfig::parse(&bad)
            .and_then(|c| c.validate())
            .expect_err("no port");
        assert!(
            err.to_string()
                .contains("`remote_clusters.tj` has address `http://tj`"),
            "{err}"
        );

        let bad = SAMPLE.replace("lease_ttl = \"3s\"", "lease_ttl = \"3 parsecs\"");
        let err = CoordinatorConfig::parse(&bad).expect_err("bad duration");
        assert!(err.to_string().contains("lease_ttl"), "{err}");

        let bad = SAMPLE.replace("lease_ttl", "lease_tll");
        let err = CoordinatorConfig::parse(&bad).expect_err("unknown key");
        assert!(err.to_string().contains("lease_tll"), "{err}");
    }
}
