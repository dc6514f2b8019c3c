//! The coordinator's configuration file ([`CoordinatorConfig`]). The part every process of the
//! cluster shares is [`ferry_meta::config::ClusterConfig`].
//!
//! One TOML file per process, parsed with serde into typed structs with documented defaults,
//! then validated once by [`CoordinatorConfig::validate`], whose errors name the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use ferry_meta::config::{ClusterConfig, ConfigError, EtcdConfig};

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

/// `host:port`, e.g. `10.2.0.1:34601` or `tj-meta.example:34601`.
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok()
    })
}

fn invalid(key: &str, problem: String) -> ConfigError {
    ConfigError::invalid(key, problem)
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
