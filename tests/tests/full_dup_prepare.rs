//! Full duplication, prepare phase, on real processes: a dup in `DS_PREPARE` makes every source
//! partition publish a checkpoint at once (an empty one too), at a decree at or past what was
//! committed when the dup was added; the checkpoint is kept on the node and verifies; a node
//! killed with -9 in the middle resumes and publishes nothing twice; removing the dup deletes
//! the kept checkpoints.
//!
//! The dup is recorded through the metadata API (tj's table exists here, so `ferry dup add
//! --full` would refuse it, and the coordinator leaves it in `DS_PREPARE`: the follower table
//! cannot be created), so the test sees the prepare phase alone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use ferry_meta::dups::DupPolicy;
use ferry_meta::{DupCheckpoint, DupMode, MetaStore};
use ferry_proto::{DupId, PartitionId};
use ferry_tests::dup::{set_keys, Cluster, TwoClusters};
use ferry_tests::etcd::Etcd;

const TABLE: &str = "users";
const PARTITIONS: u32 = 4;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn meta(etcd: &Etcd) -> Result<MetaStore> {
    Ok(MetaStore::connect(&[etcd.endpoint()], "bj", Duration::from_secs(3)).await?)
}

/// Records a full dup of `TABLE` to tj, as `ferry dup add --full` does.
fn add_full_dup(etcd: &Etcd) -> Result<DupId> {
    runtime()?.block_on(async {
        let m = meta(etcd).await?;
        let policy = DupPolicy {
            local_cluster: "bj",
            duplication_group: vec!["bj", "tj"],
            remote_clusters: vec!["tj"],
        };
        let (id, info) = m
            .add_dup(TABLE, "tj", DupMode::Full, &policy, ferry_meta::now_ms())
            .await?;
        assert_eq!(info.status.as_str(), "DS_PREPARE");
        Ok(id)
    })
}

fn checkpoints(etcd: &Etcd, dupid: DupId) -> Result<BTreeMap<u32, DupCheckpoint>> {
    runtime()?.block_on(async {
        let m = meta(etcd).await?;
        let mut out = BTreeMap::new();
        for p in 0..PARTITIONS {
            if let Some(c) = m.checkpoint(TABLE, dupid, PartitionId(p)).await? {
                out.insert(p, c);
            }
        }
        Ok(out)
    })
}

fn wait_all(etcd: &Etcd, dupid: DupId, c: &Cluster) -> Result<BTreeMap<u32, DupCheckpoint>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = BTreeMap::new();
    while Instant::now() < deadline {
        got = checkpoints(etcd, dupid)?;
        if got.len() == PARTITIONS as usize {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{} of {PARTITIONS} checkpoints published in 30 s\nnode log:\n{}",
        got.len(),
        c.node.log_text()
    )
}

/// The committed decree of every partition, from the node's `/replica/...`-free view: the
/// plog's committed markers.
fn committed(c: &Cluster) -> Result<Vec<u64>> {
    (0..PARTITIONS)
        .map(|p| {
            let dir = c.node.data_dir.join(TABLE).join(p.to_string()).join("plog");
            Ok(ferry_log::plog::Committed::read(&dir)?.map_or(0, |m| m.decree.0))
        })
        .collect()
}

#[test]
fn every_partition_publishes_a_checkpoint_at_once_and_exactly_once() -> Result<()> {
    let mut w = TwoClusters::start(TABLE, PARTITIONS, PARTITIONS)?;
    // One key: most partitions stay empty, and still get a checkpoint at once.
    let mut con = w.bj.redis()?;
    set_keys(&mut con, "only", 1, "v")?;
    let before = committed(&w.bj)?;
    assert!(before.contains(&0), "an empty partition: {before:?}");

    let started = Instant::now();
    let dupid = add_full_dup(&w.etcd)?;
    let first = wait_all(&w.etcd, dupid, &w.bj)?;
    eprintln!(
        "{PARTITIONS} checkpoints (one key in all) published in {:?}",
        started.elapsed()
    );
    for (p, c) in &first {
        assert!(
            c.manifest.decree.0 >= before[*p as usize],
            "partition {p}: checkpoint decree {} is before the committed {}",
            c.manifest.decree,
            before[*p as usize]
        );
        assert_eq!(c.manifest.partition, PartitionId(*p));
        assert!(!c.lineage.is_empty());
        assert!(!c.manifest.files.is_empty(), "partition {p} has files");
        let kept =
            w.bj.node
                .data_dir
                .join(TABLE)
                .join(p.to_string())
                .join("checkpoints")
                .join(format!("dup-{}", dupid.0));
        let verified = ferry_engine::checkpoint::verify(&kept)
            .with_context(|| format!("partition {p}'s kept checkpoint verifies"))?;
        assert_eq!(
            verified, c.manifest,
            "the kept files are the published ones"
        );
    }

    // Removing the dup deletes its kept checkpoints.
    w.bj.ferry_ok(&["dup", "remove", "-t", TABLE, "-d", &dupid.0.to_string()])?;
    let kept = |c: &Cluster, dupid: DupId, p: u32| {
        c.node
            .data_dir
            .join(TABLE)
            .join(p.to_string())
            .join("checkpoints")
            .join(format!("dup-{}", dupid.0))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..PARTITIONS).any(|p| kept(&w.bj, dupid, p).exists()) {
        if Instant::now() > deadline {
            bail!("the removed dup's checkpoints are still kept");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // A new full dup recorded while the node is down, with what a kill -9 in the middle of
    // making partition 0's checkpoint leaves (files, no manifest): at start-up the node makes
    // that one again and publishes every partition's.
    set_keys(&mut con, "more", 2_000, &"x".repeat(200))?;
    w.bj.node.proc.kill9();
    let second = add_full_dup(&w.etcd)?;
    let torn = kept(&w.bj, second, 0).join("db");
    std::fs::create_dir_all(&torn)?;
    std::fs::write(torn.join("000009.sst"), b"half a file")?;
    w.bj.restart_node(&w.etcd)?;
    let after = wait_all(&w.etcd, second, &w.bj)?;
    // Another kill -9 and start: nothing is published again or changed.
    w.bj.restart_node(&w.etcd)?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        checkpoints(&w.etcd, second)?,
        after,
        "a published checkpoint never changes"
    );
    for (p, c) in &after {
        let verified =
            ferry_engine::checkpoint::verify(&kept(&w.bj, second, *p)).with_context(|| {
                format!("partition {p}'s kept checkpoint verifies after the restart")
            })?;
        assert_eq!(&verified, &c.manifest);
        assert!(
            c.manifest.decree.0 > first[p].manifest.decree.0,
            "partition {p}: the new checkpoint holds the later writes"
        );
    }
    let log = w.bj.node.log_text();
    assert!(
        log.contains("an unfinished checkpoint is made again"),
        "the torn checkpoint was found and made again:\n{log}"
    );
    for p in 0..PARTITIONS {
        let published = log
            .lines()
            .filter(|l| {
                l.contains("checkpoint published")
                    && l.contains(&format!("dupid={}", second.0))
                    && l.contains(&format!("partition={p} "))
            })
            .count();
        assert!(
            published <= 1,
            "partition {p} of dup {second} published {published} times:\n{log}"
        );
    }
    Ok(())
}
