//! Planned failover on real processes (`ferry failover -t T --to tj`): clients write through a
//! real Redis client while the table's writes move from bj to tj and back, and across both
//! moves no acknowledged write is lost and the two sides never take writes at once. A failover
//! is refused while the target takes writes. (Rollbacks: `failover_rollback.rs`.)

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use ferry_tests::dup::{wait_converged, Cluster, TwoClusters};
use ferry_tests::failover::{check_no_overlap, check_present, Clients};

const TABLE: &str = "users";

/// The table's failover as `ferry failover --status --json` shows it.
fn failover_view(c: &Cluster) -> Result<serde_json::Value> {
    let out = c.ferry_ok(&["--json", "failover", "-t", TABLE, "--status"])?;
    serde_json::from_str(&out).context("parse failover --status --json")
}

/// Two clusters with the table on both, tj's as the standby (`demoted`), and a dup bj → tj.
fn standby_pair(partitions: u32) -> Result<(TwoClusters, u64)> {
    let w = TwoClusters::start(TABLE, partitions, partitions)?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    let dupid = w.bj.add_dup(TABLE, "tj")?;
    Ok((w, dupid))
}

#[test]
fn planned_failover_and_failback_under_load_lose_nothing() -> Result<()> {
    let (w, dupid) = standby_pair(4)?;
    // The standby refuses client writes, naming why (once its node follows the new state).
    let mut tcon = w.tj.redis()?;
    let start = Instant::now();
    let e = loop {
        let r: redis::RedisResult<()> = redis::cmd("SET").arg("x").arg("1").query(&mut tcon);
        match r {
            Err(e) => break e,
            Ok(()) => ensure!(
                start.elapsed() < Duration::from_secs(10),
                "tj still takes writes"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(
        e.code() == Some("TRYAGAIN") && e.to_string().contains("demoted"),
        "{e}"
    );
    redis::cmd("DEL").arg("x").query::<()>(&mut w.bj.redis()?)?;

    let urls = [w.bj.node.redis_url(), w.tj.node.redis_url()];
    let clients = Clients::start(
        urls.clone(),
        4,
        "a",
        Duration::from_millis(2),
        Duration::from_secs(120),
    )?;
    std::thread::sleep(Duration::from_secs(2));

    // bj -> tj, adding the dup back, and checking tj's content before it takes over.
    let t = Instant::now();
    let out = w.bj.ferry_ok(&[
        "failover",
        "-t",
        TABLE,
        "--to",
        "tj",
        "--reverse",
        "--verify",
    ])?;
    eprintln!("failover bj -> tj in {:?}:\n{out}", t.elapsed());
    ensure!(out.contains("step done"), "{out}");
    ensure!(
        out.contains("verified: tj's content equalled bj's"),
        "{out}"
    );
    let v = failover_view(&w.bj)?;
    ensure!(v["state"] == "demoted", "bj after the failover: {v}");
    ensure!(v["record"]["dupid"] == dupid, "{v}");
    let reverse = v["record"]["reverse_dupid"].as_u64();
    let tv = failover_view(&w.tj)?;
    ensure!(
        tv["state"] == "available" && tv["record"]["role"] == "target",
        "{tv}"
    );
    ensure!(
        tv["record"]["reverse_dupid"].as_u64() == reverse && reverse.is_some(),
        "{tv}"
    );
    // Every partition's last decree was confirmed before the hand-over.
    for p in v["partitions"].as_array().context("partitions")? {
        ensure!(
            p["decree"] == p["confirmed_decree"] || p["confirmed_decree"].is_null(),
            "{p}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let seen = clients.stop();
    let (on_bj, on_tj) = check_no_overlap(&seen, 0)?;
    ensure!(on_bj > 0 && on_tj > 0, "bj took {on_bj} writes, tj {on_tj}");
    let n = check_present(&urls[1], &seen)?;
    eprintln!("bj took {on_bj} writes, tj {on_tj}; all {n} read back from tj");
    // The old source refuses writes, naming where the table serves now.
    let mut bcon = w.bj.redis()?;
    let refused: redis::RedisResult<()> = redis::cmd("SET").arg("x").arg("1").query(&mut bcon);
    let e = refused.expect_err("the demoted source refuses writes");
    ensure!(
        e.code() == Some("TRYAGAIN") && e.to_string().contains("cluster tj serves its writes"),
        "{e}"
    );
    // tj's writes ship back to bj through the dup the failover added.
    wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;

    // Failback tj -> bj: the same command on tj, over the dup back; no full copy.
    let clients = Clients::start(
        [urls[1].clone(), urls[0].clone()],
        4,
        "b",
        Duration::from_millis(2),
        Duration::from_secs(120),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let out = w.tj.ferry_ok(&["failover", "-t", TABLE, "--to", "bj"])?;
    eprintln!("failback tj -> bj:\n{out}");
    std::thread::sleep(Duration::from_secs(2));
    let seen = clients.stop();
    let (on_tj, on_bj) = check_no_overlap(&seen, 0)?;
    ensure!(on_tj > 0 && on_bj > 0, "tj took {on_tj} writes, bj {on_bj}");
    check_present(&urls[0], &seen)?;
    ensure!(failover_view(&w.bj)?["state"] == "available");
    ensure!(failover_view(&w.tj)?["state"] == "demoted");
    // bj's new writes reach tj over the first dup, which resumed where it stood.
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(60))?;
    let (a, b) = (w.bj.digest()?, w.tj.digest()?);
    for p in 0..4 {
        ensure!(
            a["partitions"][p]["digest"] == b["partitions"][p]["digest"],
            "partition {p}: {} against {}",
            a["partitions"][p],
            b["partitions"][p]
        );
    }
    // Only the two incremental dups exist: nothing was copied in full.
    for c in [&w.bj, &w.tj] {
        let dups: serde_json::Value =
            serde_json::from_str(&c.ferry_ok(&["--json", "dup", "list", "-t", TABLE])?)?;
        let dups = dups.as_array().context("dup list")?;
        ensure!(dups.len() == 1, "{}: {dups:?}", c.name);
        ensure!(
            dups[0]["mode"] == "incremental" && dups[0]["status"] == "DS_LOG",
            "{dups:?}"
        );
    }
    eprintln!("converged on {entries} entries after the failback");
    Ok(())
}

#[test]
fn a_failover_is_refused_while_the_target_takes_writes() -> Result<()> {
    let w = TwoClusters::start(TABLE, 2, 2)?;
    w.bj.add_dup(TABLE, "tj")?;
    let e =
        w.bj.ferry_ok(&["failover", "-t", TABLE, "--to", "tj"])
            .expect_err("refused");
    ensure!(e.to_string().contains("set-state"), "{e}");
    let e =
        w.bj.ferry_ok(&["failover", "-t", TABLE, "--to", "xx"])
            .expect_err("refused");
    ensure!(
        e.to_string().contains("no duplication to cluster xx"),
        "{e}"
    );
    // A forced failover is refused where it makes no sense, saying why.
    let e =
        w.tj.ferry_ok(&["failover", "-t", TABLE, "--to", "tj", "--force"])
            .expect_err("refused");
    ensure!(
        e.to_string().contains("takes writes on cluster tj already"),
        "{e}"
    );
    let e =
        w.tj.ferry_ok(&["failover", "-t", TABLE, "--to", "bj", "--force"])
            .expect_err("refused");
    ensure!(e.to_string().contains("this is cluster tj, not bj"), "{e}");
    let e =
        w.bj.ferry_ok(&["failover", "-t", TABLE, "--recover"])
            .expect_err("refused");
    ensure!(
        e.to_string().contains("never took part in a failover"),
        "{e}"
    );
    // Nothing was fenced.
    w.bj.wait_writable(Duration::from_secs(1))?;
    Ok(())
}
