//! Incremental duplication end to end, two clusters on loopback with every process a real
//! binary: writes through a real Redis client on the source converge on the target, with equal
//! per-partition digests when the partition counts match and an equal content hash when they
//! do not (8 → 3).

use std::time::{Duration, Instant};

use anyhow::Result;

use ferry_tests::dup::{set_keys, wait_converged, TwoClusters};

/// Writes `n` keys with 100-byte values in pipelines of 1000, then deletes every 10th key and
/// increments a few counters, so puts, deletes (tombstones) and read-modify-writes all ship.
fn write_load(con: &mut redis::Connection, prefix: &str, n: u32) -> Result<()> {
    set_keys(con, prefix, n, &"v".repeat(100))?;
    let mut pipe = redis::pipe();
    for i in (0..n).step_by(10) {
        pipe.cmd("DEL").arg(format!("{prefix}:{i}")).ignore();
    }
    for i in 0..100 {
        pipe.cmd("INCRBY")
            .arg(format!("{prefix}:counter:{}", i % 7))
            .arg(i)
            .ignore();
    }
    pipe.query::<()>(con)?;
    Ok(())
}

#[test]
fn two_hundred_thousand_keys_converge_with_equal_partition_digests() -> Result<()> {
    let w = TwoClusters::start("users", 8, 8)?;
    let dupid = w.bj.add_dup("users", "tj")?;
    let mut con = w.bj.redis()?;
    let t = Instant::now();
    write_load(&mut con, "k", 200_000)?;
    let wrote = t.elapsed();
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    eprintln!(
        "dup {dupid}: 200k writes in {wrote:?}, converged {:?} after the first write, {entries} entries",
        t.elapsed()
    );
    // 200k keys (tombstones included) and 7 counters.
    assert_eq!(entries, 200_007);
    let (a, b) = (w.bj.digest()?, w.tj.digest()?);
    for p in 0..8 {
        assert_eq!(
            a["partitions"][p]["digest"], b["partitions"][p]["digest"],
            "partition {p}"
        );
        assert_eq!(
            a["partitions"][p]["entries"], b["partitions"][p]["entries"],
            "partition {p}"
        );
    }
    // Reads on the target see the source's values, deletes and counters.
    let mut tcon = w.tj.redis()?;
    let v: Option<String> = redis::cmd("GET").arg("k:1").query(&mut tcon)?;
    assert_eq!(v.as_deref(), Some("v".repeat(100).as_str()));
    let gone: Option<String> = redis::cmd("GET").arg("k:10").query(&mut tcon)?;
    assert_eq!(gone, None);
    let c: i64 = redis::cmd("GET").arg("k:counter:0").query(&mut tcon)?;
    assert_eq!(c, (0..100).filter(|i| i % 7 == 0).sum::<i64>());
    // Nothing was shipped back: the target's plogs hold no records (its writes came from the
    // inbox, which never reaches a plog).
    for p in b["partitions"].as_array().into_iter().flatten() {
        assert_eq!(p["committed_decree"], 0, "{p}");
    }
    Ok(())
}

#[test]
fn eight_source_partitions_converge_on_three_target_partitions() -> Result<()> {
    let w = TwoClusters::start("users", 8, 3)?;
    w.bj.add_dup("users", "tj")?;
    let mut con = w.bj.redis()?;
    write_load(&mut con, "m", 30_000)?;
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    assert_eq!(entries, 30_007);
    let b = w.tj.digest()?;
    assert_eq!(b["partitions"].as_array().map(Vec::len), Some(3));
    // `ferry status` on the source shows every partition's progress, caught up (the shipper
    // writes it to etcd every 200 ms here).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st: serde_json::Value = serde_json::from_str(&w.bj.ferry_ok(&["--json", "status"])?)?;
        let rows = st["progress"].as_array().cloned().unwrap_or_default();
        let caught_up = rows.len() == 8
            && rows.iter().all(|r| {
                r["pending_mutations"] == 0
                    && r["confirmed_decree"].as_u64().unwrap_or(0) > 0
                    && r["lag_ms"] == 0
            });
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ferry status never caught up: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let human = w.bj.ferry_ok(&["status"])?;
    assert!(
        human.contains("PENDING") && human.contains("LAG_MS"),
        "{human}"
    );
    // Every target partition got its share of the keys.
    for p in b["partitions"].as_array().into_iter().flatten() {
        assert!(p["entries"].as_u64().unwrap_or(0) > 5_000, "{p}");
    }
    Ok(())
}

/// Every value a node accepts ships, however large and however incompressible: the limits of
/// the node, the plog, the batch and the frame nest (`ferry_proto::limits`). A 20 MB and a
/// 60 MB value of random bytes reach the target byte for byte, the writes after them too, and a
/// write over the node's limit is refused with a sentence, never acknowledged.
#[test]
fn large_incompressible_values_ship() -> Result<()> {
    let w = TwoClusters::start("users", 2, 2)?;
    w.bj.add_dup("users", "tj")?;
    let mut con = w.bj.redis()?;
    let random = |seed: u64, n: usize| -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    };
    let big = [random(1, 20_000_000), random(2, 60_000_000)];
    for (i, v) in big.iter().enumerate() {
        redis::cmd("SET")
            .arg(format!("big:{i}"))
            .arg(v.as_slice())
            .query::<()>(&mut con)?;
    }
    set_keys(&mut con, "after", 100, "small")?;
    let over = vec![b'x'; ferry_proto::limits::MAX_WRITE_BYTES + 1];
    let refused = redis::cmd("SET")
        .arg("too-big")
        .arg(over.as_slice())
        .query::<()>(&mut con)
        .expect_err("a write over the limit is refused");
    assert!(
        refused.to_string().contains("exceeds"),
        "the refusal says why: {refused}"
    );

    wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    let mut tcon = w.tj.redis()?;
    for (i, v) in big.iter().enumerate() {
        let got: Vec<u8> = redis::cmd("GET").arg(format!("big:{i}")).query(&mut tcon)?;
        assert!(
            got == *v,
            "big:{i} differs on the target ({} bytes)",
            got.len()
        );
    }
    let last: Option<String> = redis::cmd("GET").arg("after:99").query(&mut tcon)?;
    assert_eq!(last.as_deref(), Some("small"));
    let none: Option<String> = redis::cmd("GET").arg("too-big").query(&mut tcon)?;
    assert_eq!(none, None);
    Ok(())
}
