//! `ferry verify -t T -c tj` on real processes: a one-way dup's two tables compare equal at a
//! consistent point; a stray write on the target makes them differ, naming the partition; and
//! `ferry failover --verify` then refuses to hand over, rolling back.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};

use ferry_proto::partition_of;
use ferry_tests::dup::{Cluster, TwoClusters};

const TABLE: &str = "users";
const PARTITIONS: u32 = 4;

fn write_keys(c: &Cluster, n: u32) -> Result<()> {
    let mut con = c.redis()?;
    for i in 0..n {
        redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg("v")
            .query::<()>(&mut con)?;
    }
    Ok(())
}

/// `ferry verify` on bj against tj: its output, and whether it said equal (exit 0).
fn verify(w: &TwoClusters) -> Result<(bool, String)> {
    let out = ferry_tests::etcd::ferry(
        &[w.bj.coordinator.addr],
        &["verify", "-t", TABLE, "-c", "tj", "--within", "20s"],
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn verify_finds_equal_copies_and_names_the_partition_that_differs() -> Result<()> {
    let w = TwoClusters::start(TABLE, PARTITIONS, PARTITIONS)?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    w.bj.add_dup(TABLE, "tj")?;
    write_keys(&w.bj, 500)?;

    // Once tj applied everything the two are equal (verify waits for that itself).
    let (equal, out) = verify(&w)?;
    eprintln!("ferry verify:\n{out}");
    ensure!(equal && out.contains(": equal ("), "{out}");
    ensure!(out.contains("500 entries here, 500 there"), "{out}");

    // A write taken on tj directly (`probe`, while tj is writable for a moment) is not on bj.
    w.tj.ferry_ok(&["table", "set-state", TABLE, "available"])?;
    w.tj.wait_writable(Duration::from_secs(10))?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    let (equal, out) = verify(&w)?;
    eprintln!("ferry verify after a stray write on tj:\n{out}");
    ensure!(!equal && out.contains("DIFFERENT"), "{out}");
    let p = partition_of(b"probe", PARTITIONS).0;
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&p.to_string()))
        .unwrap_or_default();
    ensure!(
        row.ends_with("DIFFERENT"),
        "partition {p} holds the stray key `probe` but is not marked: {row}"
    );

    // A failover with --verify does not hand the writes over to a copy that differs.
    let e =
        w.bj.ferry_ok(&["failover", "-t", TABLE, "--to", "tj", "--verify"])
            .expect_err("refused");
    eprintln!("ferry failover --verify: {e}");
    ensure!(
        e.to_string()
            .contains(&format!("verify: partition {p} differs")),
        "{e}"
    );
    w.bj.wait_writable(Duration::from_secs(10))
        .context("bj does not serve after the rolled-back failover")?;
    Ok(())
}
