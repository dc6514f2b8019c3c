//! A planned failover that fails at a step rolls back, on real processes: the source serves
//! again, nothing acknowledged is lost, the error names the step and the partition, and once the
//! cause is gone the same failover succeeds. A coordinator leader killed between steps is
//! replaced by a standby that finishes the failover.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use ferry_tests::delay::UdpDelay;
use ferry_tests::dup::{Cluster, TwoClusters, GROUP};
use ferry_tests::etcd::{failpoint, ferry, Coordinator, CoordinatorSpec};

const TABLE: &str = "users";

/// Two clusters with the table on both, tj's as the standby, a dup bj → tj, and `n` keys
/// written to bj.
fn standby_pair_with(n: u32) -> Result<TwoClusters> {
    let w = TwoClusters::start(TABLE, 2, 2)?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    w.bj.add_dup(TABLE, "tj")?;
    write_keys(&w.bj, 0..n)?;
    Ok(w)
}

/// Writes `k<i>` = `v` for every `i` of `keys` to `c`.
fn write_keys(c: &Cluster, keys: std::ops::Range<u32>) -> Result<()> {
    let mut con = c.redis()?;
    for i in keys {
        redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query::<()>(&mut con)?;
    }
    Ok(())
}

fn state(c: &Cluster) -> Result<String> {
    let out = c.ferry_ok(&["--json", "failover", "-t", TABLE, "--status"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["state"].as_str().unwrap_or_default().to_owned())
}

/// Every key `k0..k{n}` reads `v` on `c`.
fn check_keys(c: &Cluster, n: u32) -> Result<()> {
    let mut con = c.redis()?;
    for i in 0..n {
        let v: Option<String> = redis::cmd("GET").arg(format!("k{i}")).query(&mut con)?;
        ensure!(v.as_deref() == Some("v"), "k{i} on {} is {v:?}", c.name);
    }
    Ok(())
}

/// `ferry failover -t TABLE --to tj` on bj, with more flags.
fn to_tj(w: &TwoClusters, flags: &[&str]) -> Result<String> {
    let mut args = vec!["failover", "-t", TABLE, "--to", "tj"];
    args.extend_from_slice(flags);
    w.bj.ferry_ok(&args)
}

/// A failed failover: the error, after checking that bj serves again and tj never took over.
fn failed_failover(w: &TwoClusters, deadline: &str) -> Result<String> {
    let e = to_tj(w, &["--deadline", deadline])
        .expect_err("the failover fails")
        .to_string();
    eprintln!("{e}");
    ensure!(e.contains("rolled_back"), "{e}");
    ensure!(state(&w.bj)? == "available", "bj is not available again");
    ensure!(state(&w.tj)? == "demoted", "tj took over after all");
    w.bj.wait_writable(Duration::from_secs(5))?;
    Ok(e)
}

#[test]
fn a_killed_shipper_stops_the_drain_and_the_failover_rolls_back() -> Result<()> {
    let mut w = standby_pair_with(200)?;
    w.bj.shipper.as_mut().context("bj's shipper")?.kill9();
    write_keys(&w.bj, 200..300)?;
    let e = failed_failover(&w, "3s")?;
    ensure!(e.contains("draining: partition"), "{e}");
    // tj never took a write.
    let mut tcon = w.tj.redis()?;
    ensure!(redis::cmd("SET")
        .arg("x")
        .arg("1")
        .query::<()>(&mut tcon)
        .is_err());
    w.bj.start_shipper()?;
    let out = to_tj(&w, &[])?;
    ensure!(out.contains("step done"), "{out}");
    w.tj.wait_writable(Duration::from_secs(5))?;
    check_keys(&w.tj, 300)
}

#[test]
fn a_target_node_down_rolls_back_at_the_hand_over() -> Result<()> {
    let mut w = standby_pair_with(200)?;
    w.tj.node.proc.kill9();
    let e = failed_failover(&w, "3s")?;
    ensure!(
        e.contains("handing over: partition") && e.contains("tj-n1"),
        "{e}"
    );
    w.tj.restart_node(&w.etcd)?;
    let out = to_tj(&w, &[])?;
    ensure!(out.contains("step done"), "{out}");
    w.tj.wait_writable(Duration::from_secs(5))?;
    check_keys(&w.tj, 200)
}

#[test]
fn a_target_that_does_not_catch_up_in_time_is_called_off() -> Result<()> {
    let w = standby_pair_with(100)?;
    // tj's leader holds the take-over at catching_up: the deadline passes.
    failpoint(
        w.tj.coordinator.addr,
        "failover-hold",
        Some("return(catching_up)"),
    )?;
    let e = failed_failover(&w, "2s")?;
    ensure!(e.contains("handing over"), "{e}");
    let out = w.tj.ferry_ok(&["failover", "-t", TABLE, "--status"])?;
    ensure!(out.contains("step aborted"), "{out}");
    failpoint(w.tj.coordinator.addr, "failover-hold", None)?;
    to_tj(&w, &[])?;
    w.tj.wait_writable(Duration::from_secs(5))?;
    check_keys(&w.tj, 100)
}

#[test]
fn a_deadline_that_passes_after_the_target_took_over_finishes_the_failover() -> Result<()> {
    let w = standby_pair_with(100)?;
    // bj's leader does not see tj's answers: tj takes over, bj's deadline passes, and when bj
    // calls the failover off tj answers that it already took over, so bj goes forward (to
    // demoted), never back to taking writes.
    failpoint(w.bj.coordinator.addr, "failover-blind", Some("return"))?;
    let out = to_tj(&w, &["--json", "--deadline", "2s"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        v["record"]["step"] == "done" && v["state"] == "demoted",
        "{v}"
    );
    let why = v["record"]["error"].as_str().unwrap_or_default();
    ensure!(
        why.contains("handing over") || why.contains("draining"),
        "the record keeps why it was called off: {v}"
    );
    ensure!(state(&w.tj)? == "available");
    failpoint(w.bj.coordinator.addr, "failover-blind", None)?;
    w.tj.wait_writable(Duration::from_secs(5))?;
    check_keys(&w.tj, 100)
}

#[test]
fn a_standby_coordinator_finishes_a_failover_whose_leader_was_killed() -> Result<()> {
    for step in ["fencing", "draining", "demoting"] {
        let mut w = standby_pair_with(100)?;
        let spec = CoordinatorSpec {
            cluster: "bj".into(),
            cluster_id: 1,
            group: GROUP.into(),
            remotes: vec![format!("tj = [\"{}\"]", w.tj.coordinator.addr)],
            lease_ttl: "3s",
        };
        let standby = Coordinator::start(&w.etcd, w.dir.path(), "bj-c2", &spec)?;
        failpoint(
            w.bj.coordinator.addr,
            "failover-hold",
            Some(&format!("return({step})")),
        )?;
        to_tj(&w, &["--no-wait"])?;
        // Bounded: the held leader stays in `step`.
        let start = Instant::now();
        loop {
            let out =
                w.bj.ferry_ok(&["--json", "failover", "-t", TABLE, "--status"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            if v["record"]["step"] == step {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "never reached {step}: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        w.bj.coordinator.proc.kill9();
        let deadline = Instant::now() + Duration::from_secs(30);
        let v = loop {
            let out = ferry(
                &[standby.addr],
                &["--json", "failover", "-t", TABLE, "--status"],
            )?;
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                if v["record"]["step"] == "done" {
                    break v;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the standby did not finish from {step}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(v["state"] == "demoted", "{v}");
        w.tj.wait_writable(Duration::from_secs(5))
            .with_context(|| format!("killed at {step}"))?;
        check_keys(&w.tj, 100)?;
        eprintln!("killed the leader at {step}: the standby finished the failover");
    }
    Ok(())
}

#[test]
fn a_cut_link_stops_the_drain_and_the_failover_rolls_back() -> Result<()> {
    let mut w = TwoClusters::start(TABLE, 2, 2)?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    // The shippers reach tj's receiver through a relay the test cuts (the coordinators talk
    // directly: this is the data path going down).
    let relay = UdpDelay::start(w.tj.receiver_quic, Duration::from_millis(1))?;
    w.tj.advertise_receiver_at(relay.addr)?;
    w.bj.add_dup(TABLE, "tj")?;
    write_keys(&w.bj, 0..200)?;
    relay.set_cut(true);
    write_keys(&w.bj, 200..300)?;
    let e = failed_failover(&w, "3s")?;
    ensure!(e.contains("draining: partition"), "{e}");
    relay.set_cut(false);
    let out = to_tj(&w, &[])?;
    ensure!(out.contains("step done"), "{out}");
    w.tj.wait_writable(Duration::from_secs(5))?;
    check_keys(&w.tj, 300)
}
