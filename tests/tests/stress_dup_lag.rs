//! Measurement, not a pass/fail test: duplication lag at 50% and 100% of the node's own maximum
//! durable ingest (measured first, in the same run), on loopback and over a 50 ms RTT link (a
//! UDP relay delaying each datagram 25 ms each way). Run by name:
//!
//! ```sh
//! cargo test --release -p ferry-tests --test stress_dup_lag -- --ignored --nocapture
//! ```
//!
//! Lag is the shipper's `dup_time_lag_ms` histogram (source commit of a batch's last record to
//! its ack, on the source's clock), read as bucket differences over each phase; its buckets
//! double, so p50 and p99 are reported as "at most" their bucket's bound.

use std::time::{Duration, Instant};

use anyhow::Result;

use ferry_tests::delay::UdpDelay;
use ferry_tests::dup::{Cluster, TwoClusters};
use ferry_tests::etcd::http_get;

const CONNS: u64 = 16;
const PIPE: u64 = 100;

/// Writes `n` keys starting at `first`, paced to `rate` writes/s (0: as fast as possible).
fn load(c: &Cluster, first: u64, n: u64, rate: f64) -> Result<Duration> {
    let t = Instant::now();
    let handles: Vec<_> = (0..CONNS)
        .map(|k| {
            let mut con = c.redis()?;
            Ok(std::thread::spawn(move || -> Result<()> {
                let value = "l".repeat(100);
                let per_conn = rate / CONNS as f64;
                let start = Instant::now();
                let mut sent = 0u64;
                let mut i = first + k;
                while i < first + n {
                    if per_conn > 0.0 {
                        let due = start + Duration::from_secs_f64(sent as f64 / per_conn);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let mut pipe = redis::pipe();
                    for _ in 0..PIPE {
                        if i >= first + n {
                            break;
                        }
                        pipe.cmd("SET").arg(format!("l:{i}")).arg(&value).ignore();
                        i += CONNS;
                        sent += 1;
                    }
                    pipe.query::<()>(&mut con)?;
                }
                Ok(())
            }))
        })
        .collect::<Result<_>>()?;
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    }
    Ok(t.elapsed())
}

/// Cumulative bucket counts of `dup_time_lag_ms`, summed over partitions, by upper bound.
fn lag_buckets(c: &Cluster) -> Result<Vec<(f64, f64)>> {
    let (_, text) = http_get(c.shipper_http, "/metrics")?;
    let mut b: Vec<(f64, f64)> = Vec::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("dup_time_lag_ms_bucket"))
    {
        let le = l
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| {
                if v == "+Inf" {
                    Some(f64::INFINITY)
                } else {
                    v.parse().ok()
                }
            });
        let v = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(le), Some(v)) = (le, v) {
            match b.iter_mut().find(|(x, _)| *x == le) {
                Some(e) => e.1 += v,
                None => b.push((le, v)),
            }
        }
    }
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    Ok(b)
}

fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> (f64, f64) {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, v)| {
            (
                *le,
                v - before.iter().find(|(x, _)| x == le).map_or(0.0, |b| b.1),
            )
        })
        .collect();
    let total = diff.last().map_or(0.0, |d| d.1);
    let bound = diff
        .iter()
        .find(|(_, v)| *v >= q * total)
        .map_or(f64::INFINITY, |d| d.0);
    (bound, total)
}

fn caught_up(c: &Cluster, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        let rows = c.duplication_rows()?;
        let rows = rows["duplications"].as_array().cloned().unwrap_or_default();
        if !rows.is_empty()
            && rows
                .iter()
                .all(|r| r["confirmed_decree"] == r["committed_decree"])
        {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("not caught up within {timeout:?}")
}

fn run(link: &str, relay: bool) -> Result<()> {
    let mut w = TwoClusters::start("lag", 8, 8)?;
    let _relay = if relay {
        let r = UdpDelay::start(w.tj.receiver_quic, Duration::from_millis(25))?;
        w.tj.advertise_receiver_at(r.addr)?;
        Some(r)
    } else {
        None
    };
    // The node's own maximum durable ingest, before any dup exists.
    let n = 300_000;
    let took = load(&w.bj, 0, n, 0.0)?;
    let max = n as f64 / took.as_secs_f64();
    w.bj.add_dup("lag", "tj")?;
    std::thread::sleep(Duration::from_secs(1));
    let mut next = n;
    for share in [0.5, 1.0] {
        let rate = max * share;
        let writes = (rate * 10.0) as u64;
        let before = lag_buckets(&w.bj)?;
        let took = load(&w.bj, next, writes, rate)?;
        next += writes;
        let tail = caught_up(&w.bj, Duration::from_secs(120))?;
        let after = lag_buckets(&w.bj)?;
        let (p50, batches) = quantile(&before, &after, 0.50);
        let (p99, _) = quantile(&before, &after, 0.99);
        eprintln!(
            "{link}: {:.0}% of max ingest ({max:.0}/s): offered {rate:.0}/s, achieved {:.0}/s; \
             lag p50 <= {p50} ms, p99 <= {p99} ms over {batches} batches; caught up {tail:?} after the load",
            share * 100.0,
            writes as f64 / took.as_secs_f64()
        );
    }
    Ok(())
}

#[test]
#[ignore]
fn stress_dup_lag_at_half_and_full_ingest() -> Result<()> {
    run("loopback", false)?;
    run("50 ms RTT (UDP relay)", true)?;
    Ok(())
}
