//! Full duplication end to end on real processes (`ferry dup add --full`): bj holds a table with
//! data and takes writes during the whole copy; tj has no such table. The dup goes
//! `DS_PREPARE → DS_APP → DS_LOG`: every bj partition makes a checkpoint, tj's coordinator
//! creates the follower table, the shipper sends the checkpoints over QUIC, tj's node installs
//! them (refusing reads with `-LOADING` until then), and the log after each checkpoint follows.
//! At the end both sides hold exactly the same entries, and every write acknowledged during the
//! copy is on tj; with equal and with different partition counts.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use ferry_tests::dup::{
    check_written, metric, set_keys, wait_converged, Cluster, TwoClusters, Writer,
};

const TABLE: &str = "users";

/// What bj holds before the dup: `keys` keys `old:<i>`.
#[derive(Clone, Copy)]
enum Fill {
    /// 20,000 values of 200 × `x`: several SSTs' worth of chunks, which compress well.
    Small,
    /// `keys` values of `value_bytes` random bytes each (incompressible), `random_value(i)`.
    Random { keys: u32, value_bytes: usize },
}

impl Fill {
    fn keys(self) -> u32 {
        match self {
            Fill::Small => 20_000,
            Fill::Random { keys, .. } => keys,
        }
    }

    fn value(self, i: u32) -> Vec<u8> {
        match self {
            Fill::Small => b"x".repeat(200),
            Fill::Random { value_bytes, .. } => random_value(i, value_bytes),
        }
    }

    /// How long each phase may take: the copy of 1 GB needs more than a small table.
    fn timeout(self) -> Duration {
        match self {
            Fill::Small => Duration::from_secs(90),
            Fill::Random { .. } => Duration::from_secs(900),
        }
    }
}

/// `len` pseudo-random bytes determined by `i`, so a test can check any value.
fn random_value(i: u32, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(u64::from(i)).fill_bytes(&mut v);
    v
}

fn fill(con: &mut redis::Connection, fill: Fill) -> Result<()> {
    for chunk in (0..fill.keys()).collect::<Vec<_>>().chunks(200) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.cmd("SET")
                .arg(format!("old:{i}"))
                .arg(fill.value(*i))
                .ignore();
        }
        pipe.query::<()>(con)?;
    }
    Ok(())
}

/// Fills bj, adds the full dup with `flags`, writes during the copy, and checks the result.
fn full_dup(bj_partitions: u32, tj_partitions: u32, flags: &[&str], what: Fill) -> Result<()> {
    let mut w = TwoClusters::start_source_only(TABLE, bj_partitions, tj_partitions)?;
    let mut con = w.bj.redis()?;
    let filling = std::time::Instant::now();
    fill(&mut con, what)?;
    eprintln!(
        "filled bj with {} keys in {:?}",
        what.keys(),
        filling.elapsed()
    );
    let writer = Writer::start(&w.bj, "live-", Duration::from_millis(5))?;
    std::thread::sleep(Duration::from_millis(300));

    let dupid = w.bj.add_full_dup(TABLE, "tj", flags)?;
    let mut loading = None;
    let took = {
        let start = std::time::Instant::now();
        loop {
            if start.elapsed() > what.timeout() {
                bail!(
                    "dup {dupid} is {} after {:?}\n--- bj coordinator\n{}\n--- bj shipper\n{}\n--- tj receiver\n{}\n--- tj node\n{}",
                    w.bj.dup_status(TABLE, dupid)?,
                    what.timeout(),
                    tail(&w.bj.coordinator.log_text()),
                    tail(&w.bj.log_text("shipper")),
                    tail(&w.tj.log_text("receiver")),
                    tail(&w.tj.node.log_text())
                );
            }
            if loading.is_none() {
                loading = loading_reply(&w.tj);
            }
            if w.bj.dup_status(TABLE, dupid)? == "DS_LOG" {
                break start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    eprintln!("{bj_partitions} -> {tj_partitions} partitions: DS_LOG after {took:?}");
    if let Some(l) = &loading {
        assert!(
            l.starts_with(
                "LOADING table users is being filled from a full duplication of bj.users"
            ),
            "{l}"
        );
    }
    // Writes go on for a while in DS_LOG, then stop; tj converges to exactly bj's entries.
    std::thread::sleep(Duration::from_millis(500));
    let acked = writer.stop()?;
    assert!(acked > 0);
    w.tj.node.wait_stage("serving", Duration::from_secs(30))?;
    let entries = wait_converged(&w.bj, &w.tj, what.timeout())?;
    assert!(
        entries >= u64::from(what.keys()) + acked,
        "{entries} entries, {acked} live writes"
    );
    check_written(&w.tj, "live-", acked)?;
    let mut tj = w.tj.redis()?;
    for i in [0, 12_345 % what.keys(), what.keys() - 1] {
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(format!("old:{i}")).query(&mut tj)?;
        assert_eq!(v, Some(what.value(i)), "old:{i} on tj");
    }

    // What was sent: every file byte once, and again at most the chunks in flight at a break
    // (a session can fail on a loaded machine); some on the wire compressed.
    let file =
        w.bj.shipper_metric_where("dup_checkpoint_bytes_total", &[("kind", "file")])?;
    let wire =
        w.bj.shipper_metric_where("dup_checkpoint_bytes_total", &[("kind", "wire")])?;
    let failures = w.bj.shipper_metric("dup_session_failures_total")?;
    let staged = w.tj.receiver_metric("receiver_checkpoints_staged_total")?;
    let why = || format!("--- bj shipper\n{}", tail(&w.bj.log_text("shipper")));
    assert!(
        staged >= f64::from(bj_partitions) && staged <= f64::from(bj_partitions) + failures,
        "{staged} checkpoints staged for {bj_partitions} partitions, {failures} failed sessions\n{}",
        why()
    );
    let total = w.checkpoint_bytes(TABLE, dupid)?;
    // 4 lanes of at most LANE_WINDOW unacknowledged 1 MiB chunks each (the shipper's defaults).
    let in_flight = 4 * ferry_shipper::checkpoint::LANE_WINDOW as u32 * (1 << 20);
    let bound = total as f64 + failures * f64::from(in_flight);
    assert!(
        file >= total as f64 && file <= bound,
        "{file} file bytes sent for {total} bytes of checkpoints, {failures} failed sessions\n{}",
        why()
    );
    assert!(wire > 0.0, "wire {wire}");
    eprintln!(
        "checkpoints of {total} bytes: {file} file bytes sent, {wire} on the wire, {failures} failed sessions"
    );

    install_complete(&w, dupid, bj_partitions, tj_partitions)
}

/// The install-complete event fires once per partition on both sides, only after log shipping
/// began and the target caught up; then the kept and the staged checkpoints are deleted.
fn install_complete(
    w: &TwoClusters,
    dupid: u64,
    bj_partitions: u32,
    tj_partitions: u32,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let source = metric(
            w.bj.coordinator.addr,
            "coordinator_install_complete_total{side=\"source\"}",
        )?;
        let target = metric(
            w.tj.coordinator.addr,
            "coordinator_install_complete_total{side=\"target\"}",
        )?;
        if (source, target) == (f64::from(bj_partitions), f64::from(tj_partitions)) {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "install-complete events: {source} on bj, {target} on tj\n{}",
                tail(&w.bj.coordinator.log_text())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dup: serde_json::Value = serde_json::from_str(
        &w.etcd
            .get_prefix(&format!("/ferry/bj/dups/{TABLE}/{dupid}"))?
            .first()
            .context("the dup")?
            .1,
    )?;
    let started = dup["log_started_at_ms"]
        .as_u64()
        .context("log_started_at_ms")?;
    for (_, v) in w
        .etcd
        .get_prefix(&format!("/ferry/bj/dups/{TABLE}/{dupid}/checkpoint/"))?
    {
        let cp: ferry_meta::DupCheckpoint = serde_json::from_str(&v)?;
        let at = cp
            .install_complete_at_ms
            .context("source side event recorded")?;
        assert!(
            at >= started,
            "install complete at {at}, log shipping began at {started}"
        );
        assert!(cp.catch_up_to.context("catch-up mark")? >= cp.manifest.decree);
    }
    for (_, v) in w
        .etcd
        .get_prefix(&format!("/ferry/tj/tables/{TABLE}/partitions/"))?
    {
        let e: ferry_meta::PartitionEntry = serde_json::from_str(&v)?;
        let i = e.installed.context("installed")?;
        assert!(i.complete_at_ms.context("target side event recorded")? >= i.at_ms);
    }
    // The kept checkpoints on bj and the staged ones on tj go away.
    let bj_data = w.bj.node.data_dir.join(TABLE);
    let tj_staging = w.tj.node.data_dir.join(TABLE).join(".staging");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let kept = (0..bj_partitions)
            .filter(|p| {
                bj_data
                    .join(format!("{p}/checkpoints/dup-{dupid}"))
                    .exists()
            })
            .count();
        let staged = std::fs::read_dir(&tj_staging)
            .map(|d| d.count())
            .unwrap_or(0);
        if kept == 0 && staged == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{kept} kept checkpoints on bj and {staged} staged on tj left after the install completed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// tj's client port answer while the table is not installed, if it is `-LOADING`.
fn loading_reply(tj: &Cluster) -> Option<String> {
    let mut con = tj.redis().ok()?;
    match redis::cmd("GET")
        .arg("old:1")
        .query::<Option<String>>(&mut con)
    {
        Err(e) if e.code() == Some("LOADING") => {
            Some(format!("LOADING {}", e.detail().unwrap_or("")))
        }
        _ => None,
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn full_dup_with_equal_partition_counts_converges_with_writes_during_the_copy() -> Result<()> {
    full_dup(4, 4, &[], Fill::Small).context("4 -> 4")
}

#[test]
fn full_dup_re_splits_eight_partitions_into_three() -> Result<()> {
    full_dup(8, 3, &["--remote-partitions", "3"], Fill::Small).context("8 -> 3")
}

/// About 1 GB (250,000 incompressible values of 4,000 bytes), writes going on during the whole
/// copy.
const ONE_GB: Fill = Fill::Random {
    keys: 250_000,
    value_bytes: 4_000,
};

#[test]
fn a_1gb_table_with_writes_during_the_copy_converges() -> Result<()> {
    full_dup(4, 4, &[], ONE_GB).context("1 GB, 4 -> 4")
}

#[test]
fn a_1gb_table_re_split_from_eight_partitions_into_three_converges() -> Result<()> {
    full_dup(8, 3, &["--remote-partitions", "3"], ONE_GB).context("1 GB, 8 -> 3")
}

/// An empty table and a one-key table: nothing waits for a periodic checkpoint or for data, so
/// both reach `DS_LOG` within seconds (the bound here only keeps the test from hanging; the time
/// is printed).
#[test]
fn an_empty_and_a_one_key_table_reach_ds_log_at_once() -> Result<()> {
    for keys in [0u32, 1] {
        let mut w = TwoClusters::start_source_only(TABLE, 4, 4)?;
        if keys > 0 {
            let mut con = w.bj.redis()?;
            set_keys(&mut con, "only", keys, "v")?;
        }
        let dupid = w.bj.add_full_dup(TABLE, "tj", &[])?;
        let took =
            w.bj.wait_dup_status(TABLE, dupid, "DS_LOG", Duration::from_secs(60))?;
        eprintln!("{keys} keys: DS_LOG after {took:?}");
        w.tj.node.wait_stage("serving", Duration::from_secs(30))?;
        assert_eq!(
            wait_converged(&w.bj, &w.tj, Duration::from_secs(30))?,
            u64::from(keys)
        );
        install_complete(&w, dupid, 4, 4)?;
    }
    Ok(())
}

/// `--rate-mb` limits a copy, `ferry dup list` and `ferry status` show it running, and `ferry dup
/// set-rate` changes the limit of the copy that runs: the shippers' limit gauge follows, and
/// with the limit lifted the copy finishes.
#[test]
fn set_rate_changes_a_running_copy_and_status_shows_it() -> Result<()> {
    let mut w = TwoClusters::start_source_only(TABLE, 2, 2)?;
    let mut con = w.bj.redis()?;
    // Incompressible values (zstd would otherwise shrink the wire bytes the limit counts).
    for chunk in 0..16 {
        let mut pipe = redis::pipe();
        for i in 0..500 {
            let value = random_value(chunk * 500 + i, 1000);
            pipe.cmd("SET")
                .arg(format!("r:{chunk}:{i}"))
                .arg(value)
                .ignore();
        }
        pipe.query::<()>(&mut con)?;
    }
    // 0.2 MB/s for 8 MB in 1 MiB chunks: the copy would take about 40 s.
    let dupid = w.bj.add_full_dup(TABLE, "tj", &["--rate-mb", "0.2"])?;
    let limit = || {
        w.bj.shipper_metric_where(
            "dup_checkpoint_rate_limit_bytes",
            &[("dupid", &dupid.to_string())],
        )
    };
    wait_for(
        Duration::from_secs(30),
        "the shippers to take the 0.2 MB/s limit",
        || Ok(limit()? == 200_000.0),
    )?;
    let list = w.bj.ferry_ok(&["dup", "list", "-t", TABLE])?;
    assert!(list.contains("copying at at most 0.2 MB/s"), "{list}");
    let mut status = String::new();
    wait_for(
        Duration::from_secs(30),
        "a copy row in ferry status",
        || {
            status = w.bj.ferry_ok(&["status"])?;
            Ok(status.contains("COPY") && status.lines().any(|l| l.contains(" copying ")))
        },
    )
    .with_context(|| status.clone())?;
    eprintln!("{status}");
    assert_eq!(w.bj.dup_status(TABLE, dupid)?, "DS_APP");

    let d = dupid.to_string();
    let out =
        w.bj.ferry_ok(&["dup", "set-rate", "-t", TABLE, "-d", &d, "--mb", "0"])?;
    assert!(out.contains("no bandwidth limit"), "{out}");
    wait_for(
        Duration::from_secs(30),
        "the shippers to lift the limit",
        || Ok(limit()? == 0.0),
    )?;
    w.bj.wait_dup_status(TABLE, dupid, "DS_LOG", Duration::from_secs(60))?;
    w.tj.node.wait_stage("serving", Duration::from_secs(30))?;
    assert_eq!(
        wait_converged(&w.bj, &w.tj, Duration::from_secs(30))?,
        8_000
    );
    wait_for(
        Duration::from_secs(30),
        "install complete in ferry dup list",
        || {
            Ok(w.bj
                .ferry_ok(&["dup", "list", "-t", TABLE])?
                .contains("install complete"))
        },
    )?;
    let status = w.bj.ferry_ok(&["status"])?;
    assert!(
        !status.contains("COPY"),
        "no copy rows once installs completed:\n{status}"
    );

    // Refusals name what is wrong.
    let bad = ferry_tests::etcd::ferry(
        &[w.bj.coordinator.addr],
        &["dup", "set-rate", "-t", TABLE, "-d", "999", "--mb", "1"],
    )?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("999"), "{err}");
    let bad = ferry_tests::etcd::ferry(
        &[w.bj.coordinator.addr],
        &["dup", "set-rate", "-t", TABLE, "-d", &d, "--mb=-3"],
    )?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("not a rate in MB/s"), "{err}");
    Ok(())
}

/// Polls `done` every 100 ms until it holds, at most `timeout`.
fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("waited {timeout:?} for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
