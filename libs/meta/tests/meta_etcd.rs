//! The metadata layer against a real etcd: node registration and expiry, the start-up config
//! check, compare-and-swap under concurrent changes, unique increasing dupids, fencing, and
//! monotonic progress.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_meta::config::ClusterConfig;
use ferry_meta::dups::DupPolicy;
use ferry_meta::status::{DupEvent, DupStatus, FailMode};
use ferry_meta::{
    check_cluster_config, init_or_check_cluster_config, list_nodes, register_node, DupMode, Fence,
    MetaError, MetaStore, NodeInfo, Progress,
};
use ferry_proto::{Decree, PartitionId};
use ferry_tests::etcd::Etcd;

type R = Result<(), Box<dyn std::error::Error>>;

async fn store(etcd: &Etcd, cluster: &str) -> Result<MetaStore, MetaError> {
    MetaStore::connect(&[etcd.endpoint()], cluster, Duration::from_secs(2)).await
}

fn policy() -> DupPolicy<'static> {
    DupPolicy {
        local_cluster: "bj",
        duplication_group: vec!["bj", "tj"],
        remote_clusters: vec!["tj"],
    }
}

fn cluster() -> ClusterConfig {
    ClusterConfig {
        name: "bj".into(),
        id: 1,
        duplication_group: BTreeMap::from([("bj".into(), 1), ("tj".into(), 2)]),
        partition_hash: "crc32c".into(),
        plog_format_version: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_lives_with_its_lease() -> R {
    let etcd = Etcd::start()?;
    let meta = store(&etcd, "bj").await?;
    let ttl = Duration::from_secs(2);

    let a = register_node(&meta, NodeInfo::new("n1", "127.0.0.1:6379"), ttl).await?;
    let b = register_node(&meta, NodeInfo::new("n2", "127.0.0.1:6380"), ttl).await?;
    assert!(a.lease_id().is_some());
    // Renewals keep it alive well past the TTL.
    tokio::time::sleep(ttl * 2).await;
    let names: Vec<String> = list_nodes(&meta)
        .await?
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["n1", "n2"]);

    // A node that stops renewing (as a crashed one does) disappears within the TTL.
    drop(a);
    let t0 = Instant::now();
    loop {
        let names: Vec<String> = list_nodes(&meta)
            .await?
            .into_iter()
            .map(|n| n.name)
            .collect();
        if names == ["n2"] {
            break;
        }
        assert!(
            t0.elapsed() < ttl + Duration::from_secs(3),
            "n1 still registered: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A clean deregistration removes the key at once.
    b.deregister().await;
    assert!(list_nodes(&meta).await?.is_empty());

    let bad = register_node(&meta, NodeInfo::new("a/b", "x"), ttl).await;
    assert!(matches!(bad, Err(MetaError::Invalid(_))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_names_the_field() -> R {
    let etcd = Etcd::start()?;
    let meta = store(&etcd, "bj").await?;
    let ours = cluster();
    let missing = check_cluster_config(&meta, &ours)
        .await
        .expect_err("not stored yet");
    assert_eq!(
        missing.to_string(),
        "etcd key /ferry/bj/config does not exist yet; start a coordinator of this cluster first"
    );
    assert!(init_or_check_cluster_config(&meta, &ours).await?);
    assert!(!init_or_check_cluster_config(&meta, &ours).await?);
    check_cluster_config(&meta, &ours).await?;

    let mut node = ours.clone();
    node.partition_hash = "xxh3".into();
    let err = check_cluster_config(&meta, &node)
        .await
        .expect_err("hash differs");
    assert_eq!(
        err.to_string(),
        "config field `cluster.partition_hash` is xxh3 here but crc32c in etcd key /ferry/bj/config; \
         fix this process's config (the stored one is the cluster's truth)"
    );
    // Another cluster in the same etcd is independent.
    let other = store(&etcd, "tj").await?;
    assert!(matches!(
        check_cluster_config(&other, &ours).await,
        Err(MetaError::ConfigMissing(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_are_serialized() -> R {
    let etcd = Etcd::start()?;
    let meta = store(&etcd, "bj").await?;
    let nodes = vec!["n1".to_string()];
    meta.create_table("users", 4, &nodes, 1).await?;
    let (dupid, d) = meta
        .add_dup("users", "tj", DupMode::Incremental, &policy(), 1_000_000)
        .await?;
    assert_eq!(d.status, DupStatus::Log);

    // 16 writers pausing, starting and changing the fail mode at once. Every call either
    // succeeds or is refused by the status machine; nothing is lost or torn.
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let meta = meta.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for j in 0..8u32 {
                let r = match (i + j) % 3 {
                    0 => meta.apply_dup_event("users", dupid, DupEvent::Pause).await,
                    1 => meta.apply_dup_event("users", dupid, DupEvent::Start).await,
                    _ => meta.set_fail_mode("users", dupid, FailMode::Skip).await,
                };
                outcomes.push(r);
            }
            outcomes
        }));
    }
    let mut oks = 0;
    for t in tasks {
        for r in t.await? {
            match r {
                Ok(d) => {
                    assert!(matches!(d.status, DupStatus::Log | DupStatus::Pause));
                    oks += 1;
                }
                Err(MetaError::IllegalTransition { .. }) => {}
                Err(e) => return Err(format!("unexpected error: {e}").into()),
            }
        }
    }
    assert!(oks > 0);
    let end = meta.dup("users", dupid).await?;
    assert_eq!(end.fail_mode, FailMode::Skip);
    assert!(matches!(end.status, DupStatus::Log | DupStatus::Pause));

    // Concurrent adds on several tables: dupids are unique, and each is past the last.
    for t in 0..4 {
        meta.create_table(&format!("t{t}"), 1, &nodes, 1).await?;
    }
    let mut adds = Vec::new();
    for t in 0..4 {
        let meta = meta.clone();
        adds.push(tokio::spawn(async move {
            meta.add_dup(&format!("t{t}"), "tj", DupMode::Full, &policy(), 1_000_000)
                .await
        }));
    }
    let mut ids = vec![dupid.0];
    for a in adds {
        let (id, d) = a.await??;
        assert_eq!(d.status, DupStatus::Prepare);
        ids.push(id.0);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "dupids unique: {ids:?}");
    assert_eq!(
        ids,
        (1000..1005).collect::<Vec<u64>>(),
        "bumped past the last one, one by one"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_fail_once_leadership_is_gone() -> R {
    let etcd = Etcd::start()?;
    let meta = store(&etcd, "bj").await?;
    meta.create_table("users", 1, &["n1".to_string()], 1)
        .await?;
    etcd.ctl(&["put", "/ferry/bj/election/coordinator/x", "{}"])?;
    let rev = meta
        .get("/ferry/bj/election/coordinator/x".into())
        .await?
        .map(|kv| kv.create_revision())
        .ok_or("election key")?;
    let fenced = meta.with_fence(Fence {
        key: b"/ferry/bj/election/coordinator/x".to_vec(),
        revision: rev,
    });
    let (dupid, _) = fenced
        .add_dup("users", "tj", DupMode::Incremental, &policy(), 5_000)
        .await?;
    etcd.ctl(&["del", "/ferry/bj/election/coordinator/x"])?;
    let err = fenced
        .apply_dup_event("users", dupid, DupEvent::Pause)
        .await
        .expect_err("the fence is gone");
    assert!(matches!(err, MetaError::FenceLost), "{err}");
    assert_eq!(
        meta.dup("users", dupid).await?.status,
        DupStatus::Log,
        "nothing written"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_only_moves_forward_and_dies_with_the_dup() -> R {
    let etcd = Etcd::start()?;
    let meta = store(&etcd, "bj").await?;
    meta.create_table("users", 2, &["n1".to_string()], 1)
        .await?;
    let (dupid, _) = meta
        .add_dup("users", "tj", DupMode::Incremental, &policy(), 5_000)
        .await?;
    let p = PartitionId(1);
    let at = |d: u64| Progress {
        confirmed_decree: Decree(d),
        last_confirmed_timestamp_ms: d * 10,
        committed_decree: Decree(d + 5),
        updated_at_ms: 7,
        last_error: None,
        extra: Default::default(),
    };
    meta.advance_progress("users", dupid, p, &at(10)).await?;
    let kept = meta.advance_progress("users", dupid, p, &at(7)).await?;
    assert_eq!(kept.confirmed_decree, Decree(10));
    assert_eq!(
        etcd.get(&format!("/ferry/bj/dups/users/{dupid}/progress/1"))?
            .as_deref(),
        Some(
            r#"{"confirmed_decree":10,"last_confirmed_timestamp_ms":100,"committed_decree":15,"updated_at_ms":7}"#
        )
    );
    meta.remove_dup("users", dupid).await?;
    assert!(etcd
        .get_prefix(&format!("/ferry/bj/dups/users/{dupid}"))?
        .is_empty());
    let gone = meta.advance_progress("users", dupid, p, &at(11)).await;
    assert!(matches!(gone, Err(MetaError::NoSuchDup { .. })));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_states_and_late_placement() -> R {
    use ferry_meta::TableState;
    let etcd = Etcd::start()?;
    let meta = store(&etcd, "bj").await?;
    // No nodes: the table waits in `creating` and its state cannot be forced.
    let t = meta.create_table("users", 3, &[], 1).await?;
    assert_eq!(t.info.state, TableState::Creating);
    let err = meta
        .set_table_state("users", TableState::ReadOnly)
        .await
        .expect_err("still creating");
    assert!(err.to_string().contains("still creating"), "{err}");
    // A node appears: the leader's reconcile places every partition and makes it available.
    assert_eq!(
        meta.complete_creating_tables(&[NodeInfo::new("n1", "a"), NodeInfo::new("n2", "b")])
            .await?,
        1
    );
    let t = meta.describe_table("users").await?;
    assert_eq!(t.info.state, TableState::Available);
    let nodes: Vec<Option<String>> = t
        .partitions
        .into_iter()
        .map(|p| p.and_then(|p| p.node))
        .collect();
    assert_eq!(
        nodes,
        [Some("n2".into()), Some("n1".into()), Some("n2".into())]
    );
    assert_eq!(
        meta.set_table_state("users", TableState::ReadOnly)
            .await?
            .state,
        TableState::ReadOnly
    );
    assert!(matches!(
        meta.set_table_state("users", TableState::Creating).await,
        Err(MetaError::Invalid(_))
    ));
    // More partitions than one etcd transaction may hold are written in chunks.
    meta.create_table("big", 300, &["n1".into()], 1).await?;
    let big = meta.describe_table("big").await?;
    assert_eq!(big.info.state, TableState::Available);
    assert!(big
        .partitions
        .iter()
        .all(|p| p.as_ref().is_some_and(|p| p.node.is_some())));
    meta.drop_table("big").await?;
    assert!(etcd.get_prefix("/ferry/bj/tables/big")?.is_empty());
    Ok(())
}
