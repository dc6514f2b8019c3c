//! Two clusters that both take writes, with dups both ways (bj → tj and tj → bj): conflicting
//! writes and deletes of the same keys from both sides end byte-identical on both clusters
//! (last writer wins by timetag, tombstones included), and no write loops back.

use std::time::Duration;

use anyhow::Result;

use ferry_tests::dup::{wait_converged, TwoClusters};

const KEYS: u32 = 2_000;

/// Rounds of SETs and DELs of the same key space; returns how many commands were sent.
fn churn(con: &mut redis::Connection, side: &str, rounds: u32) -> Result<u64> {
    let mut sent = 0;
    for r in 0..rounds {
        let mut pipe = redis::pipe();
        for k in 0..KEYS {
            if (k + r) % 5 == 0 {
                pipe.cmd("DEL").arg(format!("c:{k}")).ignore();
            } else {
                pipe.cmd("SET")
                    .arg(format!("c:{k}"))
                    .arg(format!("{side}-{r}"))
                    .ignore();
            }
            sent += 1;
        }
        pipe.query::<()>(con)?;
    }
    Ok(sent)
}

#[test]
fn conflicting_writes_from_both_sides_converge_and_never_loop() -> Result<()> {
    let w = TwoClusters::start("users", 4, 4)?;
    w.bj.add_dup("users", "tj")?;
    w.tj.add_dup("users", "bj")?;

    let (mut bcon, mut tcon) = (w.bj.redis()?, w.tj.redis()?);
    let bj_writer = std::thread::spawn(move || churn(&mut bcon, "bj", 10));
    let tj_sent = churn(&mut tcon, "tj", 10)?;
    let bj_sent = bj_writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;

    let entries = match wait_converged(&w.bj, &w.tj, Duration::from_secs(40)) {
        Ok(n) => n,
        Err(e) => {
            let keys: Vec<String> = (0..KEYS).map(|k| format!("c:{k}")).collect();
            let (mut bcon, mut tcon) = (w.bj.redis()?, w.tj.redis()?);
            let x: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut bcon)?;
            let y: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut tcon)?;
            let diff: Vec<String> = keys
                .iter()
                .zip(x.iter().zip(&y))
                .filter(|(_, (a, b))| a != b)
                .take(20)
                .map(|(k, (a, b))| format!("{k}: bj {a:?} tj {b:?}"))
                .collect();
            let _ = std::process::Command::new("cp")
                .arg("-r")
                .arg(w.dir.path())
                .arg("/tmp/failed-bidi")
                .status();
            let mut logs = String::new();
            for c in [&w.bj, &w.tj] {
                for what in ["shipper", "receiver"] {
                    for l in c.log_text(what).lines().filter(|l| !l.contains(" INFO ")) {
                        logs.push_str(&format!("{}-{what}: {l}\n", c.name));
                    }
                }
                logs.push_str(&format!(
                    "{} node: {}\n",
                    c.name,
                    c.node
                        .log_text()
                        .lines()
                        .filter(|l| !l.contains(" INFO "))
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
                logs.push_str(&format!("{} rows: {}\n", c.name, c.duplication_rows()?));
                logs.push_str(&format!("{} digest: {}\n", c.name, c.digest()?));
            }
            anyhow::bail!("{e}; differing keys: {diff:#?}\n{logs}");
        }
    };
    assert_eq!(entries, u64::from(KEYS), "every key, live or tombstone");
    let (a, b) = (w.bj.digest()?, w.tj.digest()?);
    for p in 0..4 {
        assert_eq!(
            a["partitions"][p]["digest"], b["partitions"][p]["digest"],
            "partition {p}"
        );
    }

    // No loop: each cluster's plog holds at most its own clients' writes, and stays put.
    let (bj_local, tj_local) = (w.bj.committed_sum()?, w.tj.committed_sum()?);
    assert!(
        bj_local <= bj_sent,
        "bj plog {bj_local} > bj's own {bj_sent} writes"
    );
    assert!(
        tj_local <= tj_sent,
        "tj plog {tj_local} > tj's own {tj_sent} writes"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.bj.committed_sum()?, bj_local);
    assert_eq!(w.tj.committed_sum()?, tj_local);

    // Both read the same winner for every key.
    let keys: Vec<String> = (0..KEYS).map(|k| format!("c:{k}")).collect();
    let (mut bcon, mut tcon) = (w.bj.redis()?, w.tj.redis()?);
    let x: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut bcon)?;
    let y: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut tcon)?;
    assert_eq!(x, y);
    eprintln!(
        "bj won {} keys, tj won {}, {} deleted",
        x.iter()
            .filter(|v| v.as_deref().is_some_and(|s| s.starts_with("bj")))
            .count(),
        x.iter()
            .filter(|v| v.as_deref().is_some_and(|s| s.starts_with("tj")))
            .count(),
        x.iter().filter(|v| v.is_none()).count()
    );
    Ok(())
}
