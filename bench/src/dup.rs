//! `bench dup`: incremental duplication between two real clusters on this machine (etcd,
//! coordinators, nodes, shippers, receivers: the same binaries and harness as the integration
//! tests), per link:
//!
//! 1. the node's own maximum durable ingest, before any dup exists (the baseline);
//! 2. with a dup, writes paced at each `--loads` share of that maximum for `--seconds`:
//!    achieved writes/s, shipped writes/s, MB/s raw and on the wire, and the lag of every write
//!    (source commit → target durable, the shipper's `dup_write_lag_ms`), p50 and p99;
//! 3. the drain: the dup paused while `--drain` writes go in at full speed, then started; the
//!    backlog over the time to ship it, against the maximum ingest (goal ≥ 2×).
//!
//! A link with an RTT runs the receiver behind a UDP relay that holds each datagram RTT/2 each
//! way (this kernel has no netem; see `ferry_harness::delay`). `--pin` puts each cluster's node,
//! shipper and receiver on its own core (bj and the load on core 0, tj on core 1), so the
//! clusters stop competing for one scheduler the way two datacenters would not.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use ferry_harness::delay::UdpDelay;
use ferry_harness::dup::{Cluster, TwoClusters};
use ferry_harness::etcd::http_get;

/// Writer connections, and SETs per pipeline (as the integration tests write).
const CONNS: u64 = 16;
const PIPE: u64 = 100;
const VALUE_BYTES: usize = 100;

pub struct DupArgs {
    pub partitions: u32,
    pub seconds: f64,
    pub rtts_ms: Vec<u64>,
    pub loads_pct: Vec<u32>,
    pub congestion: Vec<String>,
    pub baseline_writes: u64,
    pub drain_writes: u64,
    pub pin: bool,
    /// More `[shipper]` lines, e.g. `window_batches = 2`.
    pub shipper_toml: Vec<String>,
    /// Where `dup-lag-cdf.png` goes.
    pub out: std::path::PathBuf,
}

/// One measured phase.
struct Row {
    link: String,
    congestion: String,
    what: String,
    offered: Option<f64>,
    achieved: f64,
    shipped: f64,
    raw_mbs: f64,
    wire_mbs: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    tail: Duration,
    /// The phase's cumulative `dup_write_lag_ms` buckets `(upper bound, count)`.
    lag: Vec<(f64, f64)>,
}

pub fn run(a: &DupArgs) -> Result<()> {
    if a.pin && cpus() < 2 {
        bail!("--pin needs at least 2 CPUs; this machine has {}", cpus());
    }
    let mut rows = Vec::new();
    for &rtt in &a.rtts_ms {
        for cc in &a.congestion {
            let link = if rtt == 0 {
                "loopback".to_string()
            } else {
                format!("{rtt} ms RTT relay")
            };
            eprintln!("== {link}, {cc} ==");
            rows.extend(one_link(a, &link, rtt, cc)?);
        }
    }
    println!();
    println!("| link | cc | phase | offered/s | achieved/s | shipped/s | raw MB/s | wire MB/s | lag p50 | lag p99 | caught up after |");
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {} | {:.0} ms |",
            r.link,
            r.congestion,
            r.what,
            r.offered.map_or("max".into(), |o| format!("{o:.0}")),
            r.achieved,
            r.shipped,
            r.raw_mbs,
            r.wire_mbs,
            r.p50.map_or("-".into(), ms),
            r.p99.map_or("-".into(), ms),
            r.tail.as_secs_f64() * 1000.0,
        );
    }
    println!();
    println!("lag: source commit → target durable per write (the shipper's dup_write_lag_ms, interpolated within 25% buckets).");
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let png = a.out.join("dup-lag-cdf.png");
    plot_lag_cdf(&png, &rows)?;
    println!("plot: {}", png.display());
    Ok(())
}

/// One CDF of the per-write lag per row that has any (the paced loads), x on a log scale.
fn plot_lag_cdf(path: &std::path::Path, rows: &[Row]) -> Result<()> {
    let series: Vec<crate::plot::Series> = rows
        .iter()
        .filter(|r| r.lag.last().is_some_and(|l| l.1 > 0.0))
        .map(|r| {
            let total = r.lag.last().map_or(1.0, |l| l.1);
            crate::plot::Series {
                name: format!("{}, {}, {}", r.link, r.congestion, r.what),
                // Up to the first bucket that holds every write: the rest is a flat line.
                points: r
                    .lag
                    .iter()
                    .filter(|(le, _)| le.is_finite() && *le > 0.0)
                    .scan(false, |full, &(le, n)| {
                        let point = (!*full).then_some((le.log10(), n / total));
                        *full = n >= total;
                        point
                    })
                    .collect(),
            }
        })
        .collect();
    let axes = crate::plot::Axes {
        title: "per-write lag, source commit to target durable (CDF)",
        x: "lag, ms (log scale)",
        y: "fraction of writes",
        // Only the powers of ten are labelled.
        x_label: &|v| {
            if (v - v.round()).abs() < 0.02 {
                format!("{}", 10f64.powf(v.round()))
            } else {
                String::new()
            }
        },
        legend: plotters::chart::SeriesLabelPosition::UpperLeft,
    };
    crate::plot::lines(path, &axes, &series)
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn one_link(a: &DupArgs, link: &str, rtt_ms: u64, cc: &str) -> Result<Vec<Row>> {
    let mut w = TwoClusters::start("bench", a.partitions, a.partitions)?;
    let rows = measure(a, &mut w, link, rtt_ms, cc);
    if rows.is_err() {
        for (c, what) in [(&w.bj, "shipper"), (&w.tj, "receiver")] {
            let log = c.log_text(what);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!("--- last lines of {}'s {what} log ---", c.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    rows
}

fn measure(
    a: &DupArgs,
    w: &mut TwoClusters,
    link: &str,
    rtt_ms: u64,
    cc: &str,
) -> Result<Vec<Row>> {
    w.bj.shipper_toml = format!("congestion = \"{cc}\"\nrtt_ms = {}\n", rtt_ms.max(1));
    for line in &a.shipper_toml {
        w.bj.shipper_toml += &format!("{line}\n");
    }
    if let Some(mut old) = w.bj.shipper.take() {
        old.terminate(Duration::from_secs(10));
    }
    w.bj.start_shipper()?;
    let _relay = if rtt_ms > 0 {
        let r = UdpDelay::start(w.tj.receiver_quic, Duration::from_millis(rtt_ms / 2))?;
        w.tj.advertise_receiver_at(r.addr)?;
        Some(r)
    } else {
        None
    };
    if a.pin {
        pin(w)?;
    }

    // 1. The node alone.
    let mut next = 0;
    let took = load(&w.bj, next, a.baseline_writes, 0.0)?;
    next += a.baseline_writes;
    let max = a.baseline_writes as f64 / took.as_secs_f64();
    eprintln!("node max durable ingest: {max:.0} writes/s");
    let dupid = w.bj.add_dup("bench", "tj")?.to_string();
    caught_up(&w.bj, a.partitions, Duration::from_secs(60))?;

    let mut rows = vec![Row {
        link: link.into(),
        congestion: cc.into(),
        what: "node alone".into(),
        offered: None,
        achieved: max,
        shipped: 0.0,
        raw_mbs: 0.0,
        wire_mbs: 0.0,
        p50: None,
        p99: None,
        tail: Duration::ZERO,
        lag: Vec::new(),
    }];

    // 2. Paced load.
    for &pct in &a.loads_pct {
        let rate = max * f64::from(pct) / 100.0;
        let writes = (rate * a.seconds) as u64;
        let before = Sample::take(&w.bj)?;
        let took = load(&w.bj, next, writes, rate)?;
        next += writes;
        let tail = caught_up(&w.bj, a.partitions, Duration::from_secs(300))?;
        let after = Sample::take(&w.bj)?;
        let row = after.since(
            &before,
            took + tail,
            took,
            writes,
            link,
            cc,
            format!("{pct}% load"),
        );
        eprintln!(
            "{pct}%: offered {rate:.0}/s, achieved {:.0}/s, lag p50 {:?} p99 {:?}",
            row.achieved, row.p50, row.p99
        );
        rows.push(Row {
            offered: Some(rate),
            tail,
            ..row
        });
    }

    // 3. Drain a backlog.
    if a.drain_writes > 0 {
        w.bj.ferry_ok(&["dup", "pause", "-t", "bench", "-d", &dupid])?;
        std::thread::sleep(Duration::from_millis(500));
        let took = load(&w.bj, next, a.drain_writes, 0.0)?;
        let before = Sample::take(&w.bj)?;
        let t = Instant::now();
        w.bj.ferry_ok(&["dup", "start", "-t", "bench", "-d", &dupid])?;
        // The path's throughput counts from the first confirmed write (the shipper first sees
        // the status change, wins its elections and opens its sessions: `startup`).
        let startup = first_progress(&w.bj, before.ops, Duration::from_secs(60))?;
        let first = Sample::take(&w.bj)?;
        let t1 = Instant::now();
        caught_up(&w.bj, a.partitions, Duration::from_secs(600))?;
        let drain = t1.elapsed();
        let total = t.elapsed();
        let after = Sample::take(&w.bj)?;
        let ingest = a.drain_writes as f64 / took.as_secs_f64();
        let row = after.since(
            &first,
            drain,
            drain,
            a.drain_writes,
            link,
            cc,
            "drain".into(),
        );
        eprintln!(
            "drain: {} writes ingested at {ingest:.0}/s; after `dup start`, the first ack came in {startup:?} and the rest              ({:.0} writes) shipped in {drain:?} = {:.0}/s, {:.2}× the node's max ingest ({total:?} in all)",
            a.drain_writes,
            after.ops - first.ops,
            row.shipped,
            row.shipped / max
        );
        rows.push(Row {
            what: format!("drain ({:.2}× max)", row.shipped / max),
            offered: None,
            achieved: ingest,
            p50: None,
            p99: None,
            tail: Duration::ZERO,
            ..row
        });
    }
    Ok(rows)
}

/// Pins bj's node and shipper (and this process, the load) to CPU 0, tj's node and receiver to
/// CPU 1.
fn pin(w: &TwoClusters) -> Result<()> {
    let mut bj = vec![w.bj.node.proc.pid(), std::process::id()];
    bj.extend(w.bj.shipper.as_ref().map(|p| p.pid()));
    let mut tj = vec![w.tj.node.proc.pid()];
    tj.extend(w.tj.receiver.as_ref().map(|p| p.pid()));
    for (cpu, pids) in [("0", bj), ("1", tj)] {
        for pid in pids {
            let out = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", cpu, &pid.to_string()])
                .output()
                .context("run taskset (util-linux)")?;
            if !out.status.success() {
                bail!(
                    "taskset -a -p -c {cpu} {pid} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Writes `n` keys from `first` on, paced to `rate` writes/s (0: as fast as the node takes
/// them), with `CONNS` connections each sending pipelines of `PIPE` SETs.
fn load(c: &Cluster, first: u64, n: u64, rate: f64) -> Result<Duration> {
    let t = Instant::now();
    let handles: Vec<_> = (0..CONNS)
        .map(|k| {
            let mut con = c.redis()?;
            Ok(std::thread::spawn(move || -> Result<()> {
                let value = "v".repeat(VALUE_BYTES);
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
                        pipe.cmd("SET")
                            .arg(format!("b:{i:012}"))
                            .arg(&value)
                            .ignore();
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
        h.join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
    }
    Ok(t.elapsed())
}

/// Waits until the shipper has confirmed more than `ops` writes; returns how long that took.
fn first_progress(c: &Cluster, ops: f64, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if Sample::take(c)?.ops > ops {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("the dup confirmed nothing within {timeout:?} of `dup start`")
}

/// Waits until every partition's confirmed decree reached its committed one.
fn caught_up(c: &Cluster, partitions: u32, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        let rows = c.duplication_rows()?;
        let rows = rows["duplications"].as_array().cloned().unwrap_or_default();
        if rows.len() == partitions as usize
            && rows
                .iter()
                .all(|r| r["state"] == "shipping" && r["confirmed_decree"] == r["committed_decree"])
        {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("the dup did not catch up within {timeout:?}")
}

/// The shipper's counters and per-write lag histogram at one moment, summed over partitions.
struct Sample {
    ops: f64,
    raw: f64,
    wire: f64,
    /// Cumulative `dup_write_lag_ms` buckets by upper bound.
    lag: Vec<(f64, f64)>,
}

impl Sample {
    fn take(c: &Cluster) -> Result<Sample> {
        let (status, text) = http_get(c.shipper_http, "/metrics")?;
        if status != 200 {
            bail!("the shipper's /metrics answered {status}");
        }
        let mut s = Sample {
            ops: 0.0,
            raw: 0.0,
            wire: 0.0,
            lag: Vec::new(),
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = match (line.split(['{', ' ']).next(), line.rsplit(' ').next()) {
                (Some(n), Some(v)) => (n, v.parse::<f64>().unwrap_or(0.0)),
                _ => continue,
            };
            match name {
                "dup_shipped_ops_total" => s.ops += value,
                "dup_shipped_raw_bytes_total" => s.raw += value,
                "dup_shipped_bytes_total" => s.wire += value,
                "dup_write_lag_ms_bucket" => {
                    let le = line
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
                    if let Some(le) = le {
                        match s.lag.iter_mut().find(|(x, _)| *x == le) {
                            Some(e) => e.1 += value,
                            None => s.lag.push((le, value)),
                        }
                    }
                }
                _ => {}
            }
        }
        s.lag.sort_by(|x, y| x.0.total_cmp(&y.0));
        Ok(s)
    }

    /// The phase between `before` and this sample: `wall` for shipping rates, `load` for the
    /// achieved write rate of `writes`.
    #[allow(clippy::too_many_arguments)]
    fn since(
        &self,
        before: &Sample,
        wall: Duration,
        load: Duration,
        writes: u64,
        link: &str,
        cc: &str,
        what: String,
    ) -> Row {
        let secs = wall.as_secs_f64().max(1e-9);
        let diff: Vec<(f64, f64)> = self
            .lag
            .iter()
            .map(|(le, v)| {
                let b = before
                    .lag
                    .iter()
                    .find(|(x, _)| x == le)
                    .map_or(0.0, |b| b.1);
                (*le, v - b)
            })
            .collect();
        Row {
            link: link.into(),
            congestion: cc.into(),
            what,
            offered: None,
            achieved: writes as f64 / load.as_secs_f64().max(1e-9),
            shipped: (self.ops - before.ops) / secs,
            raw_mbs: (self.raw - before.raw) / 1e6 / secs,
            wire_mbs: (self.wire - before.wire) / 1e6 / secs,
            p50: quantile(&diff, 0.50),
            p99: quantile(&diff, 0.99),
            tail: Duration::ZERO,
            lag: diff,
        }
    }
}

/// The `q` quantile of cumulative buckets `(upper bound, count)`, interpolated linearly inside
/// its bucket (as Prometheus's `histogram_quantile`). `None` without observations.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let frac = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations: 50 in (0, 1], 40 in (1, 2], 10 in (2, 4].
        let b = [
            (1.0, 50.0),
            (2.0, 90.0),
            (4.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(&b, 0.5), Some(1.0));
        assert_eq!(quantile(&b, 0.7), Some(1.5));
        assert_eq!(quantile(&b, 0.95), Some(3.0));
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        // Everything beyond the last finite bound: that bound is all that is known.
        assert_eq!(
            quantile(&[(1.0, 0.0), (f64::INFINITY, 5.0)], 0.5),
            Some(1.0)
        );
    }
}
