//! The log is gone: a dup paused while bj keeps writing past `plog_hold_max_bytes`, so bj's GC
//! collects the plog past what the dup confirmed. When the dup starts again, its shipper finds
//! the log gone and re-bootstraps each partition from a fresh checkpoint (requested, made by
//! bj's node, sent, applied by tj's node last-writer-wins), then ships the log after it; both
//! sides converge, deletes included. With `shipper.on_log_gone = "stop"` the partition stops
//! with an alarm instead.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use ferry_tests::dup::{set_keys, wait_converged, Cluster, TwoClusters};

const TABLE: &str = "users";
const PARTITIONS: u32 = 2;
/// 64 KiB plog segments, and at most 256 KiB of plog held per partition for dups.
const NODE_TOML: &str = "plog_segment_bytes = 65536\nplog_hold_max_bytes = 262144";

/// A dup that shipped 2,000 keys, then paused while bj overwrites, deletes and adds keys, far
/// past the hold limit; returns once bj's GC collected past the dup. Returns the dupid.
fn pause_past_the_hold(w: &TwoClusters) -> Result<String> {
    let dupid = w.bj.add_dup(TABLE, "tj")?.to_string();
    let mut con = w.bj.redis()?;
    set_keys(&mut con, "a", 2_000, &"v".repeat(100))?;
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;
    w.bj.ferry_ok(&["dup", "pause", "-t", TABLE, "-d", &dupid])?;
    std::thread::sleep(Duration::from_millis(500));
    set_keys(&mut con, "a", 1_000, &"w".repeat(100))?;
    let mut pipe = redis::pipe();
    for i in 1_000..1_500 {
        pipe.cmd("DEL").arg(format!("a:{i}")).ignore();
    }
    pipe.query::<()>(&mut con)?;
    set_keys(&mut con, "b", 12_000, &"x".repeat(150))?;
    wait_log(
        &w.bj,
        "plog_hold_max_bytes reached",
        Duration::from_secs(30),
    )?;
    Ok(dupid)
}

fn wait_log(c: &Cluster, what: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !c.node.log_text().contains(what) && !c.log_text("shipper").contains(what) {
        if Instant::now() > deadline {
            bail!("no {what:?} in {}'s logs after {timeout:?}", c.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn gc_past_a_paused_dups_confirmed_decree_re_bootstraps_the_partitions() -> Result<()> {
    let w = TwoClusters::start_with(TABLE, PARTITIONS, PARTITIONS, NODE_TOML)?;
    let dupid = pause_past_the_hold(&w)?;
    w.bj.ferry_ok(&["dup", "start", "-t", TABLE, "-d", &dupid])?;
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    // 2,000 (500 of them now tombstones) + 12,000.
    assert_eq!(entries, 14_000);
    let mut tj = w.tj.redis()?;
    let v: Option<String> = redis::cmd("GET").arg("a:10").query(&mut tj)?;
    assert_eq!(v.as_deref(), Some("w".repeat(100).as_str()));
    let v: Option<String> = redis::cmd("GET").arg("a:1200").query(&mut tj)?;
    assert_eq!(v, None, "a delete made while the log was lost is on tj too");

    // Every partition re-bootstrapped once, and is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.bj.shipper_metric("dup_rebootstraps_total")? < f64::from(PARTITIONS) {
        if Instant::now() > deadline {
            bail!(
                "{} re-bootstraps done\n{}",
                w.bj.shipper_metric("dup_rebootstraps_total")?,
                w.bj.log_text("shipper")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(w.bj.shipper_metric("dup_rebootstrap_active")?, 0.0);
    for (_, v) in w
        .etcd
        .get_prefix(&format!("/ferry/bj/dups/{TABLE}/{dupid}/rebootstrap/"))?
    {
        let r: ferry_meta::Rebootstrap = serde_json::from_str(&v)?;
        assert_eq!(r.state, ferry_meta::RebootstrapState::Done, "{r:?}");
        assert_eq!(r.generation, 1);
        let cp = r.checkpoint.expect("the fresh checkpoint is recorded");
        assert!(cp.manifest.decree > r.confirmed);
    }
    let status = w.bj.ferry_ok(&["status"])?;
    assert!(
        status.contains("REBOOTSTRAP") && status.contains("done "),
        "{status}"
    );
    eprintln!("{status}");

    // Nothing is left behind: bj's fresh checkpoints and tj's staged copies go.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: usize = (0..PARTITIONS)
            .map(|p| {
                let dir = w.bj.node.data_dir.join(format!("{TABLE}/{p}/checkpoints"));
                std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
            })
            .sum();
        let staged = std::fs::read_dir(w.tj.node.data_dir.join(TABLE).join(".staging"))
            .map(|d| d.count())
            .unwrap_or(0);
        if kept == 0 && staged == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{kept} checkpoints kept on bj and {staged} staged on tj after the re-bootstraps"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // The log ships again as before.
    let mut con = w.bj.redis()?;
    set_keys(&mut con, "c", 500, "after")?;
    let after = wait_converged(&w.bj, &w.tj, Duration::from_secs(60)).with_context(|| {
        format!(
            "--- bj shipper\n{}\n--- tj receiver\n{}\n--- tj node\n{}",
            tail(&w.bj.log_text("shipper")),
            tail(&w.tj.log_text("receiver")),
            tail(&w.tj.node.log_text())
        )
    })?;
    assert_eq!(after, 14_500);
    Ok(())
}

#[test]
fn with_on_log_gone_stop_the_partition_stops_with_an_alarm() -> Result<()> {
    let mut w = TwoClusters::start_with(TABLE, PARTITIONS, PARTITIONS, NODE_TOML)?;
    w.bj.shipper_toml += "on_log_gone = \"stop\"\n";
    if let Some(mut s) = w.bj.shipper.take() {
        s.terminate(Duration::from_secs(10));
    }
    w.bj.start_shipper()?;
    let dupid = pause_past_the_hold(&w)?;
    w.bj.ferry_ok(&["dup", "start", "-t", TABLE, "-d", &dupid])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = w.bj.duplication_rows()?;
        let stopped = rows["duplications"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["state"] == "stopped"
                    && r["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("on_log_gone is `stop`"))
            })
            .count();
        if stopped > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("no partition stopped after 60 s: {rows}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(w.bj.log_text("shipper").contains("ALARM"));
    assert!(w
        .etcd
        .get_prefix(&format!("/ferry/bj/dups/{TABLE}/{dupid}/rebootstrap/"))?
        .is_empty());
    Ok(())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}
