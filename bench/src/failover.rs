//! `bench failover`: planned failovers (`ferry failover -t T --to ... --reverse`) back and forth
//! between two clusters, on loopback and on the emulated WAN link, at shares of the node's
//! maximum ingest. For each: the time from the command to the new primary acknowledging its
//! first write, and the write gap (from the last write the old primary acknowledged to the
//! first the new one did), as the clients saw them. The clients run beside the old primary (in
//! its namespace on the link: its load is local until the failover, across the link after),
//! write to the primary and move when it answers "demoted"; a probe client writes one key at a
//! time beside the load, so the gap is seen at 0% load too.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ferry_harness::dup::{Cluster, TwoClusters};
use ferry_harness::failover::{first_on_new, write_gap, Clients, Load, Seen};
use ferry_harness::link::{self, End, Link, LinkConfig};

const TABLE: &str = "bench";

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// Partitions of the table on both sides.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// Failovers per (link, load); they alternate direction.
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// Load as percentages of the node's measured maximum ingest.
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    pub loads: Vec<u32>,
    /// Links: round-trip times in ms (0 = loopback; more: the link emulator, needs root).
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    pub rtt_ms: Vec<u64>,
    /// Seconds of load before and after each failover.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
}

/// One failover's numbers.
struct Round {
    rtt_ms: u64,
    load_pct: u32,
    from: String,
    /// Command start → the new primary's first acknowledged write.
    takeover: Duration,
    gap: Duration,
    /// The failover's own duration, as it recorded it.
    recorded_ms: u64,
    writes: usize,
}

pub fn run(a: &FailoverArgs) -> Result<()> {
    let mut rounds = Vec::new();
    for &rtt in &a.rtt_ms {
        if rtt == 0 {
            eprintln!("== loopback ==");
            let w = TwoClusters::start(TABLE, a.partitions, a.partitions)?;
            rounds.extend(on(a, &w, 0, None, None)?);
        } else {
            if let Some(why) = link::unavailable() {
                bail!("bench failover on a {rtt} ms link needs the link emulator: {why}");
            }
            eprintln!("== {rtt} ms RTT link, 1 Gbit/s ==");
            let link = Link::create(LinkConfig {
                one_way: Duration::from_millis(rtt) / 2,
                rate_bps: Some(1_000_000_000),
                ..LinkConfig::default()
            })?;
            let mut w = TwoClusters::start_link(TABLE, a.partitions, a.partitions, &link)?;
            let p = a.partitions.to_string();
            link.b().enter(|| -> Result<()> {
                w.tj.ferry_ok(&["table", "create", TABLE, "--partitions", &p])?;
                w.tj.node.wait_stage("serving", Duration::from_secs(30))
            })??;
            rounds.extend(on(a, &w, rtt, Some(link.a()), Some(link.b()))?);
        }
    }
    report(&rounds);
    Ok(())
}

/// Runs `f` in `end`'s namespace, or here.
fn within<T: Send>(end: Option<&End>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match end {
        Some(e) => e.enter(f)?,
        None => f(),
    }
}

/// Every (load, round) on one pair of clusters; the clients run beside the old primary.
fn on(
    a: &FailoverArgs,
    w: &TwoClusters,
    rtt_ms: u64,
    bj_ns: Option<&End>,
    tj_ns: Option<&End>,
) -> Result<Vec<Round>> {
    within(tj_ns, || {
        w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])
            .map(drop)
    })?;
    within(bj_ns, || w.bj.add_dup(TABLE, "tj").map(drop))?;
    let max = within(bj_ns, || max_ingest(&w.bj))?;
    eprintln!("bj's maximum ingest: {max:.0} writes/s");
    let mut out = Vec::new();
    let mut n = 0usize;
    for &load in &a.loads {
        for _ in 0..a.rounds {
            let (from, to, ns) = if n.is_multiple_of(2) {
                (&w.bj, &w.tj, bj_ns)
            } else {
                (&w.tj, &w.bj, tj_ns)
            };
            let rate = max * f64::from(load) / 100.0;
            let r = within(ns, || one(a, from, to, ns, rate, &format!("f{n}-"))).with_context(
                || format!("failover {n} ({} -> {}, {load}% load)", from.name, to.name),
            )?;
            eprintln!(
                "{} -> {}, {load}% load: took over after {:.0} ms, write gap {:.0} ms, recorded {} ms, {} writes",
                from.name,
                to.name,
                ms(r.0),
                ms(r.1),
                r.2,
                r.3
            );
            out.push(Round {
                rtt_ms,
                load_pct: load,
                from: from.name.clone(),
                takeover: r.0,
                gap: r.1,
                recorded_ms: r.2,
                writes: r.3,
            });
            n += 1;
        }
    }
    Ok(out)
}

/// One failover under `rate` writes/s (0: the probe only). Returns (takeover, gap, recorded
/// ms, acknowledged writes).
fn one(
    a: &FailoverArgs,
    from: &Cluster,
    to: &Cluster,
    from_ns: Option<&End>,
    rate: f64,
    prefix: &str,
) -> Result<(Duration, Duration, u64, usize)> {
    let sides = [from.node.redis_url(), to.node.redis_url()];
    let limit = Duration::from_secs_f64(a.settle * 2.0 + 120.0);
    let probe = Clients::start_with(
        sides.clone(),
        &Load {
            pause: Duration::from_millis(1),
            ..Load::one_at_a_time(1, &format!("{prefix}p"), Duration::ZERO, limit)
        },
    )?;
    let load = (rate > 0.0)
        .then(|| {
            Clients::start_with(
                sides.clone(),
                &Load {
                    clients: 8,
                    prefix: format!("{prefix}l"),
                    pipe: 10,
                    rate,
                    pause: Duration::ZERO,
                    limit,
                },
            )
        })
        .transpose()?;
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let t0 = Instant::now();
    // The command runs where its cluster's coordinator is reachable.
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            within(from_ns, || {
                from.ferry_ok(&[
                    "--json",
                    "failover",
                    "-t",
                    TABLE,
                    "--to",
                    &to.name,
                    "--reverse",
                ])
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the ferry thread panicked"))?
    })?;
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let mut seen: Vec<Seen> = probe.stop();
    if let Some(l) = load {
        seen.extend(l.stop());
    }
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.other).collect();
    if !errors.is_empty() {
        bail!("clients got errors that are not retryable: {errors:?}");
    }
    let v: serde_json::Value = serde_json::from_str(&out).context("parse failover --json")?;
    let recorded = v["elapsed_ms"].as_u64().unwrap_or(0);
    let first = first_on_new(&seen, 0).context("the new primary acknowledged no write")?;
    let gap = write_gap(&seen, 0).context("one side acknowledged no write")?;
    let writes = seen.iter().map(|s| s.acked.len()).sum();
    Ok((first.saturating_duration_since(t0), gap, recorded, writes))
}

/// Writes/s bj acknowledges with 8 clients in pipelines of 10, unpaced, for 3 s.
fn max_ingest(bj: &Cluster) -> Result<f64> {
    let url = bj.node.redis_url();
    let c = Clients::start_with(
        [url.clone(), url],
        &Load {
            clients: 8,
            prefix: "max-".into(),
            pipe: 10,
            rate: 0.0,
            pause: Duration::ZERO,
            limit: Duration::from_secs(3),
        },
    )?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let seen = c.stop();
    let n: usize = seen.iter().map(|s| s.acked.len()).sum();
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(rounds: &[Round]) {
    println!("\n## bench failover\n");
    println!("| link | load | from | command → new primary's first ack (ms) | write gap (ms) | failover recorded (ms) | writes |");
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for r in rounds {
        println!(
            "| {} | {}% | {} | {:.0} | {:.0} | {} | {} |",
            if r.rtt_ms == 0 {
                "loopback".to_string()
            } else {
                format!("{} ms RTT", r.rtt_ms)
            },
            r.load_pct,
            r.from,
            ms(r.takeover),
            ms(r.gap),
            r.recorded_ms,
            r.writes
        );
    }
    println!("\n| link | load | median gap (ms) | max gap (ms) | median takeover (ms) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut keys: Vec<(u64, u32)> = rounds.iter().map(|r| (r.rtt_ms, r.load_pct)).collect();
    keys.dedup();
    for (rtt, load) in keys {
        let mut gaps: Vec<f64> = rounds
            .iter()
            .filter(|r| (r.rtt_ms, r.load_pct) == (rtt, load))
            .map(|r| ms(r.gap))
            .collect();
        let mut takeovers: Vec<f64> = rounds
            .iter()
            .filter(|r| (r.rtt_ms, r.load_pct) == (rtt, load))
            .map(|r| ms(r.takeover))
            .collect();
        gaps.sort_by(f64::total_cmp);
        takeovers.sort_by(f64::total_cmp);
        println!(
            "| {} | {load}% | {:.0} | {:.0} | {:.0} |",
            if rtt == 0 {
                "loopback".to_string()
            } else {
                format!("{rtt} ms RTT")
            },
            gaps[gaps.len() / 2],
            gaps.last().copied().unwrap_or(0.0),
            takeovers[takeovers.len() / 2]
        );
    }
}
