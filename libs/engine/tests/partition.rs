//! The partition engine against real RocksDB and real files: commands, last-writer-wins,
//! exactly-once duplicated applies, checkpoints, plog recovery and the tombstone filter.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::{
    Expiry, Partition, PartitionOptions, SetCond, Source, StoreError, WriteCmd, WriteOutcome,
};
use ferry_log::plog::list_segments;
use ferry_proto::{ClusterId, Decree, Op, PartitionId, PlogRecord, Timetag};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn cid(id: u8) -> ClusterId {
    ClusterId::new(id).expect("test cluster ids are in range")
}

fn opts() -> PartitionOptions {
    PartitionOptions::new(cid(1))
}

fn open(dir: &Path) -> Partition {
    Partition::open(dir, PartitionId(0), opts())
        .expect("open partition")
        .0
}

fn set(key: &str, value: &str) -> WriteCmd {
    WriteCmd::Set {
        key: key.into(),
        value: value.into(),
        expiry: Expiry::Never,
        cond: SetCond::Always,
        get_old: false,
    }
}

fn value(p: &Partition, key: &str) -> Option<String> {
    p.get(key.as_bytes())
        .expect("get")
        .map(|l| String::from_utf8(l.value).expect("utf8 value"))
}

fn source(cluster: u8, partition: u32) -> Source {
    Source {
        cluster: cid(cluster),
        partition: PartitionId(partition),
    }
}

fn put_rec(decree: u64, ts: u64, cluster: u8, key: &str, val: &str) -> PlogRecord {
    PlogRecord {
        decree: Decree(decree),
        timetag: Timetag::new(ts, cid(cluster), false),
        ops: vec![Op::Put {
            key: key.into(),
            value: val.into(),
            expire_at_ms: 0,
        }],
    }
}

fn del_rec(decree: u64, ts: u64, cluster: u8, key: &str) -> PlogRecord {
    PlogRecord {
        decree: Decree(decree),
        timetag: Timetag::new(ts, cid(cluster), false),
        ops: vec![Op::Delete { key: key.into() }],
    }
}

#[tokio::test]
async fn commands_resolve_to_plain_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = open(dir.path());
    assert_eq!(
        p.write(set("a", "1")).await.expect("set"),
        WriteOutcome::Set {
            applied: true,
            old: None
        }
    );
    assert_eq!(
        p.write(WriteCmd::IncrBy {
            key: "a".into(),
            delta: 41
        })
        .await
        .expect("incr"),
        WriteOutcome::Integer(42)
    );
    assert_eq!(value(&p, "a").as_deref(), Some("42"));
    p.write(set("s", "x")).await.expect("set");
    assert_eq!(
        p.write(WriteCmd::IncrBy {
            key: "s".into(),
            delta: 1
        })
        .await
        .expect("incr"),
        WriteOutcome::NotInteger
    );
    p.write(set("max", &i64::MAX.to_string()))
        .await
        .expect("set");
    assert_eq!(
        p.write(WriteCmd::IncrBy {
            key: "max".into(),
            delta: 1
        })
        .await
        .expect("incr"),
        WriteOutcome::Overflow
    );

    let nx = |k: &str| WriteCmd::Set {
        key: k.into(),
        value: "n".into(),
        expiry: Expiry::Never,
        cond: SetCond::IfAbsent,
        get_old: true,
    };
    assert_eq!(
        p.write(nx("a")).await.expect("nx"),
        WriteOutcome::Set {
            applied: false,
            old: Some(b"42".to_vec())
        }
    );
    assert_eq!(
        p.write(nx("fresh")).await.expect("nx"),
        WriteOutcome::Set {
            applied: true,
            old: None
        }
    );
    let xx = WriteCmd::Set {
        key: "nope".into(),
        value: "v".into(),
        expiry: Expiry::Never,
        cond: SetCond::IfPresent,
        get_old: false,
    };
    assert_eq!(
        p.write(xx).await.expect("xx"),
        WriteOutcome::Set {
            applied: false,
            old: None
        }
    );
    assert_eq!(value(&p, "nope"), None);

    let del = WriteCmd::Del {
        keys: vec!["a".into(), "missing".into()],
    };
    assert_eq!(p.write(del).await.expect("del"), WriteOutcome::Deleted(1));
    assert_eq!(value(&p, "a"), None);
    let (tag, _, bytes) = p
        .stored(b"missing")
        .expect("stored")
        .expect("a tombstone is stored even for an absent key");
    assert!(tag.is_delete() && bytes.is_empty());

    // Expiry: in the future keeps the key; PERSIST clears it; in the past deletes it.
    let future = ferry_engine::clock::wall_ms() + 60_000;
    assert_eq!(
        p.write(WriteCmd::Expire {
            key: "fresh".into(),
            at_ms: Some(future)
        })
        .await
        .expect("expire"),
        WriteOutcome::Changed(true)
    );
    assert_eq!(
        p.get(b"fresh").expect("get").map(|l| l.expire_at_ms),
        Some(future)
    );
    assert_eq!(
        p.write(WriteCmd::Expire {
            key: "fresh".into(),
            at_ms: None
        })
        .await
        .expect("persist"),
        WriteOutcome::Changed(true)
    );
    assert_eq!(
        p.get(b"fresh").expect("get").map(|l| l.expire_at_ms),
        Some(0)
    );
    assert_eq!(
        p.write(WriteCmd::Expire {
            key: "fresh".into(),
            at_ms: Some(1)
        })
        .await
        .expect("expire"),
        WriteOutcome::Changed(true)
    );
    assert_eq!(value(&p, "fresh"), None);
    let px = WriteCmd::Set {
        key: "short".into(),
        value: "v".into(),
        expiry: Expiry::At(ferry_engine::clock::wall_ms() + 50),
        cond: SetCond::Always,
        get_old: false,
    };
    p.write(px).await.expect("set px");
    assert_eq!(value(&p, "short").as_deref(), Some("v"));
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(value(&p, "short"), None, "an expired value reads as absent");
}

/// A fence refuses the writes queued after it with its sentence, answers the decree of the last
/// write before it, and still lets duplicated writes apply; lifting it takes writes again.
#[tokio::test]
async fn a_fence_refuses_later_writes_and_answers_the_last_decree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Arc::new(open(dir.path()));
    assert_eq!(
        p.fence(Some("TRYAGAIN fenced".into()))
            .await
            .expect("fence"),
        Decree(0)
    );
    p.fence(None).await.expect("unfence");
    // Writes queued before the fence commit; the ones queued after it are refused.
    let before: Vec<_> = (0..20)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.write(set(&format!("b{i}"), "v")).await })
        })
        .collect();
    for w in before {
        w.await.expect("join").expect("write before the fence");
    }
    let last = p
        .fence(Some("TRYAGAIN fenced".into()))
        .await
        .expect("fence");
    assert_eq!(last, Decree(20));
    assert_eq!(p.committed_decree(), Decree(20));
    match p.write(set("after", "v")).await {
        Err(StoreError::Fenced(msg)) => assert_eq!(msg, "TRYAGAIN fenced"),
        other => panic!("a write after the fence was not refused: {other:?}"),
    }
    assert_eq!(value(&p, "after"), None);
    // Fencing again answers the same decree: nothing moved.
    assert_eq!(
        p.fence(Some("TRYAGAIN fenced".into()))
            .await
            .expect("fence"),
        Decree(20)
    );
    // Duplicated writes still apply while fenced (a demoted table follows the new primary).
    p.apply_duplicated(source(2, 0), vec![put_rec(1, 1, 2, "dup", "x")])
        .await
        .expect("apply while fenced");
    assert_eq!(value(&p, "dup").as_deref(), Some("x"));
    assert_eq!(p.fence(None).await.expect("unfence"), Decree(20));
    p.write(set("after", "v"))
        .await
        .expect("write after the fence is lifted");
    assert_eq!(p.committed_decree(), Decree(21));
}

#[tokio::test]
async fn decrees_are_gap_free_and_timetags_increase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = open(dir.path());
    let mut last = Timetag(0);
    for i in 0..50 {
        p.write(set(&format!("k{i}"), "v")).await.expect("set");
        let (tag, _, _) = p
            .stored(format!("k{i}").as_bytes())
            .expect("stored")
            .expect("present");
        assert!(tag > last);
        assert_eq!(tag.cluster(), Some(cid(1)));
        last = tag;
    }
    assert_eq!(p.committed_decree(), Decree(50));
    let marker = ferry_log::plog::Committed::read(&dir.path().join("plog"))
        .expect("read marker")
        .expect("marker exists");
    assert_eq!(
        marker.decree,
        Decree(50),
        "the shipper sees the committed decree"
    );
    // A no-op write (NX on an existing key) takes no decree.
    let nx = WriteCmd::Set {
        key: "k0".into(),
        value: "x".into(),
        expiry: Expiry::Never,
        cond: SetCond::IfAbsent,
        get_old: false,
    };
    p.write(nx).await.expect("nx");
    assert_eq!(p.committed_decree(), Decree(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Arc::new(open(dir.path()));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move { p.write(set(&format!("k{i}"), "v")).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("write");
    }
    let writes = p
        .stats()
        .writes_total
        .load(std::sync::atomic::Ordering::Relaxed);
    let groups = p
        .stats()
        .group_commits_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(writes, 1000);
    assert!(
        groups < writes,
        "group commit: {groups} fsyncs for {writes} writes"
    );
    println!("{writes} concurrent writes took {groups} group commits");
    assert_eq!(p.count_live().expect("count"), 1000);
}

#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let p = open(dir.path());
        for i in 0..300 {
            p.write(set(&format!("k{i}"), &i.to_string()))
                .await
                .expect("set");
        }
    }
    let (p, report) = Partition::open(dir.path(), PartitionId(0), opts()).expect("reopen");
    assert_eq!(report.committed, Decree(300));
    assert_eq!(value(&p, "k299").as_deref(), Some("299"));
    p.write(set("after", "x"))
        .await
        .expect("write after reopen");
    assert_eq!(p.committed_decree(), Decree(301));
}

#[tokio::test]
async fn torn_plog_tail_is_cut_and_writes_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let p = open(dir.path());
        for i in 0..100 {
            p.write(set(&format!("k{i}"), "v")).await.expect("set");
        }
    }
    let seg = list_segments(&dir.path().join("plog"))
        .expect("list")
        .pop()
        .expect("a segment");
    let mut half = Vec::new();
    put_rec(101, 1, 1, "torn", "never acknowledged").encode(&mut half);
    half.truncate(half.len() / 2);
    OpenOptions::new()
        .append(true)
        .open(&seg.path)
        .expect("open")
        .write_all(&half)
        .expect("append");

    let (p, report) =
        Partition::open(dir.path(), PartitionId(0), opts()).expect("a torn tail is not an error");
    let torn = report.plog.torn_tail.expect("the torn tail is reported");
    assert_eq!(torn.file, seg.path);
    assert_eq!(torn.bytes_dropped, half.len() as u64);
    assert_eq!(report.committed, Decree(100));
    assert_eq!(value(&p, "torn"), None);
    assert_eq!(p.count_live().expect("count"), 100);
    p.write(set("next", "v")).await.expect("write after cut");
    assert_eq!(p.committed_decree(), Decree(101));
}

#[tokio::test]
async fn corrupt_record_mid_segment_refuses_to_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let p = open(dir.path());
        for i in 0..100 {
            p.write(set(&format!("k{i}"), "v")).await.expect("set");
        }
    }
    let seg = list_segments(&dir.path().join("plog"))
        .expect("list")
        .pop()
        .expect("a segment");
    let mut bytes = fs::read(&seg.path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&seg.path, &bytes).expect("write");

    let err = Partition::open(dir.path(), PartitionId(0), opts())
        .err()
        .expect("corruption is an error");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::Log(ferry_log::LogError::CorruptPlog { .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&seg.path.display().to_string()),
        "names the file: {msg}"
    );
    assert!(msg.contains("at byte"), "names the offset: {msg}");
    assert_eq!(
        fs::read(&seg.path).expect("read").len(),
        bytes.len(),
        "nothing was truncated"
    );
}

#[tokio::test]
async fn last_writer_wins_ties_and_tombstones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = open(dir.path());
    let (a, b) = (source(2, 0), source(3, 0));

    // Same microsecond: the larger cluster id wins, whichever arrives first.
    p.apply_duplicated(b, vec![put_rec(1, 100, 3, "k", "from-3")])
        .await
        .expect("apply");
    let r = p
        .apply_duplicated(a, vec![put_rec(1, 100, 2, "k", "from-2")])
        .await
        .expect("apply");
    assert_eq!(r.stale_ops, 1);
    assert_eq!(value(&p, "k").as_deref(), Some("from-3"));

    // Same microsecond and cluster: a delete beats a put, in either order.
    p.apply_duplicated(
        a,
        vec![put_rec(2, 200, 2, "d1", "v"), del_rec(3, 200, 2, "d1")],
    )
    .await
    .expect("apply");
    assert_eq!(value(&p, "d1"), None);
    p.apply_duplicated(source(2, 1), vec![del_rec(1, 300, 2, "d2")])
        .await
        .expect("apply");
    p.apply_duplicated(source(2, 2), vec![put_rec(1, 300, 2, "d2", "v")])
        .await
        .expect("apply");
    assert_eq!(
        value(&p, "d2"),
        None,
        "the put at the same timetag loses to the tombstone"
    );

    // A tombstone keeps its timetag: an older put arriving later loses; a newer one wins.
    p.apply_duplicated(source(2, 3), vec![put_rec(1, 150, 2, "d1", "older")])
        .await
        .expect("apply");
    assert_eq!(value(&p, "d1"), None);
    p.apply_duplicated(source(2, 3), vec![put_rec(2, 201, 2, "d1", "newer")])
        .await
        .expect("apply");
    assert_eq!(value(&p, "d1").as_deref(), Some("newer"));

    // A local write after a duplicated write from the future still wins: the clock observed it.
    let future_us = ferry_engine::clock::wall_us() + 60_000_000;
    p.apply_duplicated(b, vec![put_rec(2, future_us, 3, "clock", "remote")])
        .await
        .expect("apply");
    p.write(set("clock", "local")).await.expect("set");
    assert_eq!(value(&p, "clock").as_deref(), Some("local"));
    let (tag, _, _) = p.stored(b"clock").expect("stored").expect("present");
    assert!(tag.timestamp_us() > future_us);
}

#[tokio::test]
async fn apply_duplicated_is_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(2, 5);
    let batch: Vec<PlogRecord> = (1..=10)
        .map(|d| put_rec(d, 1000 + d, 2, &format!("k{}", d % 4), &format!("v{d}")))
        .collect();
    let digest_once;
    {
        let p = open(dir.path());
        let r = p.apply_duplicated(src, batch.clone()).await.expect("apply");
        assert_eq!(
            (r.applied_records, r.skipped_records, r.progress),
            (10, 0, Decree(10))
        );
        digest_once = p.digest().expect("digest");
        let again = p
            .apply_duplicated(src, batch.clone())
            .await
            .expect("apply again");
        assert_eq!((again.applied_records, again.skipped_records), (0, 10));
        assert_eq!(
            p.digest().expect("digest"),
            digest_once,
            "applying the same batch twice changes nothing"
        );
        // No plog record for duplicated writes: they are never shipped back.
        assert_eq!(p.committed_decree(), Decree(0));
    }
    // Progress is stored with the data and survives a reopen; an overlapping batch applies only
    // its new records.
    let p = open(dir.path());
    assert_eq!(p.dup_progress(src).expect("progress"), Decree(10));
    let overlap: Vec<PlogRecord> = (6..=15)
        .map(|d| put_rec(d, 1000 + d, 2, &format!("k{}", d % 4), &format!("v{d}")))
        .collect();
    let r = p
        .apply_duplicated(src, overlap)
        .await
        .expect("apply overlap");
    assert_eq!(
        (r.applied_records, r.skipped_records, r.progress),
        (5, 5, Decree(15))
    );
    assert_eq!(value(&p, "k3").as_deref(), Some("v15"));
}

/// Two clusters' writes applied in different interleavings give byte-identical partitions.
#[tokio::test]
async fn last_writer_wins_converges_in_any_order() {
    let seed: u64 = rand::random();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut streams: Vec<(Source, Vec<PlogRecord>)> = Vec::new();
    // Cluster 2 has one partition, cluster 3 two. As in a real cluster, a key belongs to one
    // partition of its cluster: cluster 3's partitions write disjoint keys (even / odd). Two
    // partitions of one cluster writing one key at one timestamp cannot happen, and no order
    // could be agreed for them.
    for (cluster, part) in [(2u8, 0u32), (3, 0), (3, 1)] {
        let recs = (1..=60)
            .map(|d| {
                let key = if cluster == 2 {
                    format!("k{}", rng.random_range(0..12))
                } else {
                    format!("k{}", 2 * rng.random_range(0..6) + part)
                };
                let ts = rng.random_range(1..40); // many equal timestamps on purpose
                if rng.random_bool(0.3) {
                    del_rec(d, ts, cluster, &key)
                } else {
                    put_rec(d, ts, cluster, &key, &format!("c{cluster}p{part}d{d}"))
                }
            })
            .collect();
        streams.push((source(cluster, part), recs));
    }
    let mut digests = Vec::new();
    for _ in 0..4 {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path());
        // Random chunking and interleaving, order kept within each source partition.
        let mut cursors = vec![0usize; streams.len()];
        let mut order: Vec<usize> = (0..streams.len())
            .flat_map(|i| std::iter::repeat_n(i, 6))
            .collect();
        order.shuffle(&mut rng);
        for s in order {
            let (src, recs) = &streams[s];
            let end = (cursors[s] + 10).min(recs.len());
            p.apply_duplicated(*src, recs[cursors[s]..end].to_vec())
                .await
                .expect("apply");
            cursors[s] = end;
        }
        digests.push(p.digest().expect("digest"));
    }
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "seed {seed}: {digests:?}"
    );
}

#[tokio::test]
async fn checkpoint_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = open(&dir.path().join("src"));
    for i in 0..2000 {
        p.write(set(&format!("k{i}"), &format!("value-{i}")))
            .await
            .expect("set");
    }
    p.write(WriteCmd::Del {
        keys: vec!["k7".into()],
    })
    .await
    .expect("del");
    let cp_dir = dir.path().join("cp");
    let manifest = p.checkpoint(cp_dir.clone()).await.expect("checkpoint");
    let digest_at_checkpoint = p.digest().expect("digest");
    assert_eq!(manifest.decree, Decree(2001));
    assert!(
        !manifest.files.is_empty()
            && manifest
                .files
                .iter()
                .all(|f| f.size > 0 || f.name.ends_with(".log"))
    );
    // Writes after the checkpoint are not in it.
    p.write(set("later", "x")).await.expect("set");

    let (copy, report) =
        Partition::open_from_checkpoint(&cp_dir, &dir.path().join("dst"), PartitionId(0), opts())
            .expect("open from checkpoint");
    assert_eq!(report.committed, Decree(2001));
    assert_eq!(copy.digest().expect("digest"), digest_at_checkpoint);
    assert_eq!(value(&copy, "later"), None);
    assert_eq!(value(&copy, "k7"), None);
    assert_eq!(value(&copy, "k1999").as_deref(), Some("value-1999"));
    copy.write(set("next", "v"))
        .await
        .expect("the copy takes writes");
    assert_eq!(copy.committed_decree(), Decree(2002));
}

#[tokio::test]
async fn corrupt_checkpoint_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = open(&dir.path().join("src"));
    for i in 0..500 {
        p.write(set(&format!("k{i}"), "v")).await.expect("set");
    }
    let cp_dir = dir.path().join("cp");
    let manifest = p.checkpoint(cp_dir.clone()).await.expect("checkpoint");
    let sst = manifest
        .files
        .iter()
        .find(|f| f.name.ends_with(".sst"))
        .expect("an sst file");
    let path = cp_dir.join("db").join(&sst.name);
    let mut bytes = fs::read(&path).expect("read");
    bytes[10] ^= 1;
    fs::write(&path, &bytes).expect("write");
    let err =
        Partition::open_from_checkpoint(&cp_dir, &dir.path().join("dst"), PartitionId(0), opts())
            .err()
            .expect("refused");
    assert!(matches!(err, StoreError::BadCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains(&sst.name), "names the file: {err}");
    assert!(
        !dir.path().join("dst").join("db").join(&sst.name).exists(),
        "nothing installed"
    );
}

#[tokio::test]
async fn gc_deletes_segments_below_and_keeps_the_rest_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts();
    o.plog_segment_bytes = 4096;
    let (p, _) = Partition::open(dir.path(), PartitionId(0), o.clone()).expect("open");
    for i in 0..400 {
        p.write(set(
            &format!("k{i}"),
            "0123456789012345678901234567890123456789",
        ))
        .await
        .expect("set");
    }
    let plog_dir = dir.path().join("plog");
    let before = list_segments(&plog_dir).expect("list").len();
    let removed = p.gc_plog(Decree(200)).await.expect("gc");
    let after = list_segments(&plog_dir).expect("list");
    assert!(!removed.is_empty() && before > after.len());
    assert!(
        after[0].first_decree <= Decree(200),
        "decree 200 and later are kept"
    );
    drop(p);
    let (p, report) = Partition::open(dir.path(), PartitionId(0), o).expect("reopen after gc");
    assert_eq!(report.committed, Decree(400));
    assert_eq!(p.count_live().expect("count"), 400);
}

#[tokio::test]
async fn compaction_purges_old_tombstones_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts();
    o.tombstone_retention = Duration::from_millis(200);
    let (p, _) = Partition::open(dir.path(), PartitionId(0), o).expect("open");
    p.write(set("gone", "v")).await.expect("set");
    p.write(set("kept", "v")).await.expect("set");
    p.write(WriteCmd::Del {
        keys: vec!["gone".into()],
    })
    .await
    .expect("del");
    p.compact();
    assert!(
        p.stored(b"gone").expect("stored").is_some(),
        "a fresh tombstone is kept"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.write(WriteCmd::Del {
        keys: vec!["recent".into()],
    })
    .await
    .expect("del");
    p.compact();
    assert_eq!(
        p.stored(b"gone").expect("stored"),
        None,
        "the old tombstone is purged"
    );
    assert!(
        p.stored(b"recent").expect("stored").is_some(),
        "the new one is not"
    );
    assert_eq!(value(&p, "kept").as_deref(), Some("v"));
}
