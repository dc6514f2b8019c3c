//! The configuration every process of a cluster shares: [`ClusterConfig`] (stored in etcd under
//! `/ferry/<cluster>/config` and compared at start-up), [`EtcdConfig`], and the [`ConfigError`]
//! every process's own config reports with, naming the key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The partitioning hash every process of a cluster must agree on.
pub const DEFAULT_PARTITION_HASH: &str = "crc32c";
/// The plog record format version.
pub const DEFAULT_PLOG_FORMAT_VERSION: u32 = 1;

/// What every process of one cluster must agree on. The first coordinator stores it; every other
/// process compares its own copy with the stored one and refuses to start on any difference
/// (see [`crate::cluster_config`]).
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

fn default_partition_hash() -> String {
    DEFAULT_PARTITION_HASH.into()
}

fn default_plog_format_version() -> u32 {
    DEFAULT_PLOG_FORMAT_VERSION
}

impl ConfigError {
    /// A key has a value that cannot work: `key` is dotted (`cluster.id`), `problem` says what
    /// is wrong and what would be right.
    pub fn invalid(key: &str, problem: String) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            problem,
        }
    }
}

fn invalid(key: &str, problem: String) -> ConfigError {
    ConfigError::invalid(key, problem)
}
