//! The cluster config stored under `/ferry/<cluster>/config`, and the start-up check every
//! process runs against it (IoTDB's start-up "check the configuration with the other nodes").
//!
//! The first coordinator writes the key; every later process compares its own [`ClusterConfig`]
//! with the stored one field by field and refuses to start on the first difference, naming the
//! field and both values. A field the stored copy has and this process does not know is a
//! difference too: a newer format this process cannot honour.

use etcd_client::{Compare, CompareOp, TxnOp};
use serde_json::{Map, Value};

use crate::config::ClusterConfig;
use crate::{decode, encode, MetaError, MetaStore};

/// For any process that is not a coordinator (a node, a shipper, a receiver): checks `ours`
/// against the stored config. [`MetaError::ConfigMissing`] if no coordinator has stored it yet
/// (retry later), [`MetaError::ConfigMismatch`] naming the field on a difference.
pub async fn check_cluster_config(meta: &MetaStore, ours: &ClusterConfig) -> Result<(), MetaError> {
    let key = meta.keys().config();
    let kv = meta
        .get(key.clone())
        .await?
        .ok_or_else(|| MetaError::ConfigMissing(key.clone()))?;
    let stored: Value = decode(&kv)?;
    compare(ours, &stored, &key)
}

/// For a coordinator: stores `ours` if the cluster has no config yet, else checks it like
/// [`check_cluster_config`]. Returns `true` if this call stored it.
pub async fn init_or_check_cluster_config(
    meta: &MetaStore,
    ours: &ClusterConfig,
) -> Result<bool, MetaError> {
    let key = meta.keys().config();
    let created = meta
        .cas(
            vec![Compare::version(key.clone(), CompareOp::Equal, 0)],
            vec![TxnOp::put(key.clone(), encode(ours), None)],
        )
        .await?;
    if created {
        return Ok(true);
    }
    check_cluster_config(meta, ours).await.map(|()| false)
}

/// The first difference between `ours` and the stored JSON, as a [`MetaError::ConfigMismatch`].
pub fn compare(ours: &ClusterConfig, stored: &Value, key: &str) -> Result<(), MetaError> {
    let ours = match serde_json::to_value(ours) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let Value::Object(stored) = stored else {
        return Err(MetaError::Corrupt {
            key: key.into(),
            reason: "not a JSON object".into(),
        });
    };
    let show = |v: Option<&Value>| match v {
        None => "(absent)".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    // The most telling difference first (the declared order), then anything else either has.
    let declared = [
        "name",
        "id",
        "duplication_group",
        "partition_hash",
        "plog_format_version",
    ];
    let mut fields: Vec<&str> = declared.to_vec();
    for k in ours.keys().chain(stored.keys()) {
        if !fields.contains(&k.as_str()) {
            fields.push(k);
        }
    }
    for field in fields {
        let (a, b) = (ours.get(field), stored.get(field));
        if a != b {
            return Err(MetaError::ConfigMismatch {
                field: format!("cluster.{field}"),
                ours: show(a),
                stored: show(b),
                key: key.into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sample() -> ClusterConfig {
        ClusterConfig {
            name: "bj".into(),
            id: 1,
            duplication_group: BTreeMap::from([("bj".into(), 1), ("tj".into(), 2)]),
            partition_hash: "crc32c".into(),
            plog_format_version: 1,
        }
    }

    #[test]
    fn equal_configs_pass() {
        let stored = serde_json::to_value(sample()).expect("serializes");
        assert!(compare(&sample(), &stored, "/ferry/bj/config").is_ok());
    }

    #[test]
    fn difference_names_field_and_both_values() {
        let mut other = sample();
        other.id = 2;
        let stored = serde_json::to_value(sample()).expect("serializes");
        let err = compare(&other, &stored, "/ferry/bj/config").expect_err("ids differ");
        assert_eq!(
            err.to_string(),
            "config field `cluster.id` is 2 here but 1 in etcd key /ferry/bj/config; \
             fix this process's config (the stored one is the cluster's truth)"
        );
    }

    #[test]
    fn unknown_stored_field_is_a_difference() {
        let mut stored = serde_json::to_value(sample()).expect("serializes");
        if let Value::Object(m) = &mut stored {
            m.insert("value_format_version".into(), Value::from(2));
        }
        let err = compare(&sample(), &stored, "k").expect_err("newer field");
        assert!(err
            .to_string()
            .contains("`cluster.value_format_version` is (absent) here but 2"));
    }
}
