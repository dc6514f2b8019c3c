//! A follower table built from a source table's checkpoints (`ferry_engine::install`): with an
//! equal and with another partition count, every entry (tombstones included) lands in the
//! partition its key hashes to, with its timetag; each source's checkpoint decree becomes the
//! duplication progress and the inbox start; an install interrupted half-way and run again ends
//! the same.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::install::{self, SourceCheckpoint};
use ferry_engine::{Expiry, Partition, PartitionOptions, SetCond, WriteCmd};
use ferry_log::inbox::InboxWriter;
use ferry_proto::{partition_of, ClusterId, Decree, PartitionId, Source};

fn opts(cluster: u8) -> PartitionOptions {
    PartitionOptions::new(ClusterId::new(cluster).expect("valid id"))
}

/// A 4-partition source table with `n` keys (every tenth deleted), checkpointed.
async fn source(dir: &Path, n: u32) -> (Vec<SourceCheckpoint>, u64, u64) {
    let count = 4;
    let parts: Vec<Partition> = (0..count)
        .map(|p| {
            Partition::open(&dir.join(format!("src/{p}")), PartitionId(p), opts(1))
                .expect("open")
                .0
        })
        .collect();
    for i in 0..n {
        let key = format!("key-{i:06}").into_bytes();
        let p = &parts[partition_of(&key, count).0 as usize];
        p.write(WriteCmd::Set {
            key: key.clone(),
            value: format!("value-{i}").into_bytes(),
            expiry: Expiry::Never,
            cond: SetCond::Always,
            get_old: false,
        })
        .await
        .expect("set");
        if i % 10 == 0 {
            p.write(WriteCmd::Del { keys: vec![key] })
                .await
                .expect("del");
        }
    }
    let mut cps = Vec::new();
    let (mut entries, mut sum) = (0, 0u64);
    for p in &parts {
        let cp = dir.join(format!("cp/{}", p.id().0));
        let manifest = p.checkpoint(cp.clone()).await.expect("checkpoint");
        let d = p.digests().expect("digests");
        entries += d.entries;
        sum = sum.wrapping_add(d.unordered);
        cps.push(SourceCheckpoint {
            source: Source {
                cluster: ClusterId::new(1).expect("valid"),
                partition: p.id(),
            },
            dir: cp,
            decree: manifest.decree,
        });
    }
    (cps, entries, sum)
}

fn target_dir(root: &Path, count: u32, p: u32) -> PathBuf {
    root.join(format!("tj-{count}/{p}"))
}

#[tokio::test]
async fn a_follower_installs_from_checkpoints_with_equal_and_other_partition_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cps, entries, sum) = source(dir.path(), 3000).await;
    assert!(cps.iter().all(|c| c.decree.0 > 0));

    for count in [4u32, 3] {
        let (mut got_entries, mut got_sum) = (0, 0u64);
        for p in 0..count {
            let pdir = target_dir(dir.path(), count, p);
            assert!(!install::is_installed(&pdir));
            let report = install::install(
                &pdir,
                PartitionId(p),
                count,
                &cps,
                Duration::from_secs(3600),
                1 << 20,
            )
            .expect("install");
            assert!(install::is_installed(&pdir));
            // Equal counts open the source partition's checkpoint itself; others re-split.
            assert_eq!(report.opened_directly, count == 4, "{report:?}");
            assert!(report.opened_directly || report.keys > 0, "{report:?}");
            let part = Partition::open(&pdir, PartitionId(p), opts(2))
                .expect("open")
                .0;
            let d = part.digests().expect("digests");
            if !report.opened_directly {
                assert_eq!(d.entries, report.keys);
            }
            assert!(d.entries > 0);
            got_entries += d.entries;
            got_sum = got_sum.wrapping_add(d.unordered);
            // Only its own keys, and the source's decrees as progress and inbox start.
            let page = part.scan(None, 100_000).expect("scan");
            assert!(page
                .keys
                .iter()
                .all(|k| partition_of(k, count) == PartitionId(p)));
            assert_eq!(part.committed_decree(), Decree(0), "no plog of its own yet");
            for cp in &cps {
                assert_eq!(part.dup_progress(cp.source).expect("progress"), cp.decree);
                let inbox = InboxWriter::open(&pdir, cp.source, 1 << 20).expect("inbox");
                assert_eq!(inbox.last_decree(), cp.decree);
            }
        }
        assert_eq!(
            (got_entries, got_sum),
            (entries, sum),
            "{count} target partitions hold exactly the source's entries"
        );
    }

    // An install that stopped half-way (no marker) is built again from the start.
    let pdir = target_dir(dir.path(), 3, 1);
    std::fs::remove_file(pdir.join(install::INSTALLED_FILE)).expect("drop the marker");
    std::fs::create_dir_all(pdir.join("db.installing")).expect("a leftover build");
    let again = install::install(
        &pdir,
        PartitionId(1),
        3,
        &cps,
        Duration::from_secs(3600),
        1 << 20,
    )
    .expect("install again");
    let part = Partition::open(&pdir, PartitionId(1), opts(2))
        .expect("open")
        .0;
    assert_eq!(part.digests().expect("digests").entries, again.keys);
}
