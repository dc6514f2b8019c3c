//! Measurement, not a pass/fail test (timings never gate CI): how fast the shipper → receiver
//! path drains a backlog, against how fast the node took the same writes, side by side in one
//! run. Run it by name:
//!
//! ```sh
//! cargo test --release -p ferry-tests --test stress_dup_drain -- --ignored --nocapture
//! ```
//!
//! The dup is paused while `STRESS_WRITES` (default 1,000,000) SETs of 100 bytes go into the
//! source with 16 connections × pipelines of 100, then started; the drain rate is the backlog
//! divided by the time until the target holds the source's content.

use std::time::{Duration, Instant};

use anyhow::Result;

use ferry_tests::dup::{wait_converged, TwoClusters};

#[test]
#[ignore]
fn stress_dup_drain_rate_vs_node_ingest() -> Result<()> {
    let n: u64 = std::env::var("STRESS_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let w = TwoClusters::start("bench", 8, 8)?;
    let dupid = w.bj.add_dup("bench", "tj")?.to_string();
    w.bj.ferry_ok(&["dup", "pause", "-t", "bench", "-d", &dupid])?;
    std::thread::sleep(Duration::from_secs(1));

    let conns = 16u64;
    let t = Instant::now();
    let writers: Vec<_> = (0..conns)
        .map(|c| {
            let mut con = w.bj.redis()?;
            Ok(std::thread::spawn(move || -> Result<()> {
                let value = "d".repeat(100);
                let mut i = c;
                while i < n {
                    let mut pipe = redis::pipe();
                    for _ in 0..100 {
                        if i >= n {
                            break;
                        }
                        pipe.cmd("SET").arg(format!("d:{i}")).arg(&value).ignore();
                        i += conns;
                    }
                    pipe.query::<()>(&mut con)?;
                }
                Ok(())
            }))
        })
        .collect::<Result<_>>()?;
    for h in writers {
        h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    let ingest = t.elapsed();

    let t = Instant::now();
    w.bj.ferry_ok(&["dup", "start", "-t", "bench", "-d", &dupid])?;
    // Caught up when every partition's confirmed decree reached its committed one (a cheap
    // poll of the shipper; the digests, which scan both tables, are compared after).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let rows = w.bj.duplication_rows()?;
        let rows = rows["duplications"].as_array().cloned().unwrap_or_default();
        let done = rows.len() == 8
            && rows.iter().all(|r| {
                r["state"] == "shipping"
                    && r["confirmed_decree"] == r["committed_decree"]
                    && r["committed_decree"].as_u64().unwrap_or(0) > 0
            });
        if done || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain = t.elapsed();
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(600))?;
    assert_eq!(entries, n);
    let wire = w.bj.shipper_metric("dup_shipped_bytes_total")?;
    let raw = w.bj.shipper_metric("dup_shipped_raw_bytes_total")?;
    let ingest_rate = n as f64 / ingest.as_secs_f64();
    let drain_rate = n as f64 / drain.as_secs_f64();
    eprintln!(
        "{n} writes: node ingest {ingest_rate:.0}/s ({ingest:?}); dup drain {drain_rate:.0}/s ({drain:?}, from `dup start`); ratio {:.2}; raw {:.1} MB/s, wire {:.1} MB/s \
         (zstd {:.0}% of raw)",
        drain_rate / ingest_rate,
        raw / 1e6 / drain.as_secs_f64(),
        wire / 1e6 / drain.as_secs_f64(),
        100.0 * wire / raw.max(1.0),
    );
    Ok(())
}
