//! Pause, start and remove of a dup, with small plog segments so the plog hold is visible:
//! paused, the source keeps every segment and the target falls behind; started, the target
//! catches up and the plog is collected; removed, the hold is released.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use ferry_tests::dup::{set_keys, wait_converged, Cluster, TwoClusters};

fn write(con: &mut redis::Connection, prefix: &str, n: u32) -> Result<()> {
    set_keys(con, prefix, n, &"x".repeat(100))
}

fn segments(c: &Cluster) -> Result<usize> {
    Ok(c.plog_segments()?.iter().sum())
}

/// Waits (bounded) until the source's plog has at most `max` segments in all.
fn wait_collected(c: &Cluster, max: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while Instant::now() < deadline {
        n = segments(c)?;
        if n <= max {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the plog still has {n} segments, expected at most {max}")
}

fn pending(c: &Cluster) -> Result<u64> {
    let rows = c.duplication_rows()?;
    Ok(rows["duplications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["pending_mutations"].as_u64())
        .sum())
}

#[test]
fn pause_holds_the_plog_start_catches_up_remove_releases() -> Result<()> {
    // 64 KiB segments: a few thousand writes make several per partition.
    let w = TwoClusters::start_with("users", 2, 2, "plog_segment_bytes = 65536")?;
    let dupid = w.bj.add_dup("users", "tj")?.to_string();
    let mut con = w.bj.redis()?;
    write(&mut con, "a", 2_000)?;
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;
    let floor = 2 * 2; // at most a couple of live segments per partition once collected
    wait_collected(&w.bj, floor)?;

    // Paused: nothing ships, the plog is held, the pending count shows the backlog.
    w.bj.ferry_ok(&["dup", "pause", "-t", "users", "-d", &dupid])?;
    std::thread::sleep(Duration::from_millis(500));
    write(&mut con, "b", 6_000)?;
    // Segments with only records the target confirmed before the pause may still go.
    std::thread::sleep(Duration::from_secs(2));
    let held = segments(&w.bj)?;
    std::thread::sleep(Duration::from_secs(3)); // three more GC rounds
    assert!(
        held >= 8,
        "6000 writes of 100 bytes make several 64 KiB segments: {held}"
    );
    assert_eq!(segments(&w.bj)?, held, "a paused dup holds the plog");
    let (a, b) = (w.bj.digest()?, w.tj.digest()?);
    assert_ne!(a["entries"], b["entries"], "nothing ships while paused");
    let backlog = pending(&w.bj)?;
    assert!(
        backlog >= 6_000,
        "pending mutations while paused: {backlog}"
    );

    // Started: the target catches up, and then the plog is collected.
    w.bj.ferry_ok(&["dup", "start", "-t", "users", "-d", &dupid])?;
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;
    let after = wait_collected(&w.bj, floor)?;
    eprintln!("segments: {held} held while paused, {after} after catching up");

    // Paused again and removed: the hold goes with the dup.
    w.bj.ferry_ok(&["dup", "pause", "-t", "users", "-d", &dupid])?;
    std::thread::sleep(Duration::from_millis(500));
    write(&mut con, "c", 6_000)?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(segments(&w.bj)? >= 8);
    w.bj.ferry_ok(&["dup", "remove", "-t", "users", "-d", &dupid])?;
    let released = wait_collected(&w.bj, floor)?;
    eprintln!("segments after remove: {released}");
    Ok(())
}
