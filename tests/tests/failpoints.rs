//! Failure paths of real processes, driven by failpoints (`ferry_proc::failpoints`): the
//! binaries are built with `--features ferry-tests/failpoints` (as `scripts/test.sh` does), and
//! each test switches a failpoint on over the process's HTTP port at the moment it wants.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};

use ferry_tests::dup::{set_keys, wait_converged, TwoClusters};
use ferry_tests::etcd::failpoint;
use ferry_tests::procs::Node;

/// Without failpoints compiled in these tests cannot inject anything: they fail with a sentence
/// rather than pass without testing.
fn require_failpoints() -> Result<()> {
    ensure!(
        cfg!(feature = "failpoints"),
        "these tests need the failpoints: run them as scripts/test.sh does, with `--features ferry-tests/failpoints`"
    );
    Ok(())
}

fn set(con: &mut redis::Connection, k: &str, v: &str) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(k).arg(v).query(con)
}

fn get(con: &mut redis::Connection, k: &str) -> Result<Option<String>> {
    Ok(redis::cmd("GET").arg(k).query(con)?)
}

/// A failed fsync of the node's commit log: the write is refused, never `+OK`; the partitions
/// then refuse every write until a restart recovers them from their logs, and what was
/// acknowledged before is there.
#[test]
fn a_failed_commit_fsync_is_never_acknowledged() -> Result<()> {
    require_failpoints()?;
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), 1, &[])?;
    let mut con = redis::Client::open(node.redis_url())?.get_connection()?;
    set(&mut con, "before", "1")?;

    failpoint(node.http, "nodelog-fsync", Some("return"))?;
    let e = set(&mut con, "during", "2").expect_err("a write whose fsync failed is refused");
    let msg = e.to_string();
    assert!(
        msg.contains("not acknowledged") && msg.contains("fsync"),
        "the refusal says what failed: {msg}"
    );
    failpoint(node.http, "nodelog-fsync", None)?;
    let e = set(&mut con, "after", "3").expect_err("the partition stays stopped");
    assert!(e.to_string().contains("restart the node"), "{e}");
    drop(con);
    drop(node);

    let node = Node::start(dir.path(), 1, &[])?;
    let mut con = redis::Client::open(node.redis_url())?.get_connection()?;
    assert_eq!(get(&mut con, "before")?.as_deref(), Some("1"));
    assert_eq!(
        get(&mut con, "after")?,
        None,
        "a refused write was never logged"
    );
    set(&mut con, "again", "4")?;
    assert_eq!(get(&mut con, "again")?.as_deref(), Some("4"));
    Ok(())
}

/// A crash that takes the plogs' unsynced tails with it (power lost before the commit log's
/// background thread synced them, which `nodelog-hold-plogs` holds back): every acknowledged
/// write is still there after the restart, written back into the plogs from the commit log.
#[test]
fn acknowledged_writes_survive_lost_plog_tails() -> Result<()> {
    require_failpoints()?;
    let dir = tempfile::tempdir()?;
    let partitions = 4;
    let mut node = Node::start(dir.path(), partitions, &[])?;
    failpoint(node.http, "nodelog-hold-plogs", Some("return"))?;
    let mut con = redis::Client::open(node.redis_url())?.get_connection()?;
    for i in 0..400 {
        set(&mut con, &format!("k{i}"), &format!("v{i}"))?;
    }
    node.proc.kill9();
    drop(con);
    // What the disk would hold: each plog as it was when created (its segment header only),
    // then a page of garbage where a later page of the file did reach the disk.
    let layout = ferry_log::Layout::new(dir.path());
    for p in 0..partitions {
        let plog = layout.plog("default", ferry_proto::PartitionId(p));
        let segs = ferry_log::plog::list_segments(&plog)?;
        ensure!(
            segs.len() == 1,
            "partition {p} has one plog segment: {segs:?}"
        );
        let mut bytes = std::fs::read(&segs[0].path)?;
        ensure!(
            bytes.len() > ferry_log::plog::SEGMENT_HEADER_LEN,
            "partition {p}'s plog has records"
        );
        bytes.truncate(ferry_log::plog::SEGMENT_HEADER_LEN);
        bytes.extend_from_slice(&[0xa5; 4096]);
        std::fs::write(&segs[0].path, &bytes)?;
    }

    let node = Node::start(dir.path(), partitions, &[])?;
    let mut con = redis::Client::open(node.redis_url())?.get_connection()?;
    for i in 0..400 {
        assert_eq!(
            get(&mut con, &format!("k{i}"))?,
            Some(format!("v{i}")),
            "acknowledged write k{i} survives"
        );
    }
    Ok(())
}

/// A full disk reaches the client as "disk is full" (a typed kind, not a parsed message), the
/// write is not acknowledged, and once space is back the same partition takes writes again.
#[test]
fn a_full_disk_is_reported_as_such_and_writes_resume() -> Result<()> {
    require_failpoints()?;
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), 1, &[])?;
    let mut con = redis::Client::open(node.redis_url())?.get_connection()?;
    set(&mut con, "a", "1")?;
    failpoint(node.http, "plog-append", Some("return(enospc)"))?;
    let e = set(&mut con, "b", "2").expect_err("no space, no ack");
    assert!(e.to_string().contains("disk is full"), "{e}");
    failpoint(node.http, "plog-append", None)?;
    set(&mut con, "c", "3")?;
    assert_eq!(get(&mut con, "b")?, None);
    assert_eq!(get(&mut con, "c")?.as_deref(), Some("3"));
    Ok(())
}

/// The receiver's inbox append fails for a while: nothing is acknowledged, the shipper resends,
/// and once appends work again the target converges with every write.
#[test]
fn a_failed_inbox_append_is_not_acknowledged_and_the_shipper_resends() -> Result<()> {
    require_failpoints()?;
    let w = TwoClusters::start("users", 2, 2)?;
    w.bj.add_dup("users", "tj")?;
    let mut con = w.bj.redis()?;
    set_keys(&mut con, "first", 100, "v")?;
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;

    let receiver_http = w.tj.receiver_http;
    let failures = w.bj.shipper_metric("dup_session_failures_total")?;
    failpoint(receiver_http, "inbox-append", Some("return"))?;
    set_keys(&mut con, "second", 500, "v")?;
    // The shipper sees its batches refused, and none of the second load reaches the target.
    wait_for(Duration::from_secs(30), || {
        Ok(w.bj.shipper_metric("dup_session_failures_total")? > failures)
    })?;
    let mut tcon = w.tj.redis()?;
    assert_eq!(get(&mut tcon, "second:499")?, None);
    // `ferry status` shows the stuck partition and why.
    wait_for(Duration::from_secs(30), || {
        let status = w.bj.ferry_ok(&["status"])?;
        Ok(status
            .lines()
            .any(|l| l.contains("is not shipping") && l.contains("refused")))
    })?;
    failpoint(receiver_http, "inbox-append", None)?;
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;
    assert_eq!(get(&mut tcon, "second:499")?.as_deref(), Some("v"));
    // Shipping again: the reason is gone from `ferry status`.
    wait_for(Duration::from_secs(30), || {
        Ok(!w.bj.ferry_ok(&["status"])?.contains("is not shipping"))
    })?;
    Ok(())
}

/// FAIL_SKIP end to end: one batch that the receiver keeps refusing (it holds a poisoned
/// decree) is skipped after bounded retries and counted in `dup_failed_shipping_ops_total`;
/// shipping goes on after it, and every later write arrives.
#[test]
fn fail_skip_skips_a_batch_that_keeps_failing_and_counts_it() -> Result<()> {
    require_failpoints()?;
    let w = TwoClusters::start("users", 1, 1)?;
    let dupid = w.bj.add_dup("users", "tj")?;
    w.bj.ferry_ok(&[
        "dup",
        "set-fail-mode",
        "-t",
        "users",
        "-d",
        &dupid.to_string(),
        "skip",
    ])?;
    let mut con = w.bj.redis()?;
    set_keys(&mut con, "warm", 10, "v")?;
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;
    let poisoned = w.bj.committed_sum()? + 1;
    let receiver_http = w.tj.receiver_http;
    failpoint(
        receiver_http,
        "inbox-append",
        Some(&format!("return({poisoned})")),
    )?;
    set(&mut con, "poison", "x")?;
    wait_for(Duration::from_secs(90), || {
        Ok(w.bj.shipper_metric("dup_failed_shipping_ops_total")? >= 1.0)
    })?;
    // FAIL_SKIP skips the whole batch that kept failing; what is written after it ships.
    set_keys(&mut con, "later", 200, "v")?;
    let mut tcon = w.tj.redis()?;
    wait_for(Duration::from_secs(60), || {
        Ok(get(&mut tcon, "later:199")?.as_deref() == Some("v"))
    })?;
    assert_eq!(
        get(&mut tcon, "poison")?,
        None,
        "the skipped write is not on the target"
    );
    failpoint(receiver_http, "inbox-append", None)?;
    Ok(())
}

fn wait_for(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match last {
        Some(e) => bail!("not reached within {timeout:?}; last error: {e:#}"),
        None => bail!("not reached within {timeout:?}"),
    }
}
