//! `bench`: ferry's benchmarks, each run side by side with its baseline in one invocation, so the
//! ratio is meaningful on a shared, noisy machine.
//!
//! `bench node-vs-redis` runs `redis-benchmark` against a ferry `node` and against `redis-server
//! --appendonly yes --appendfsync always` (Redis's strongest durability), with the same
//! arguments, alternating the two targets for `--rounds` rounds.
//!
//! `bench dup` measures incremental duplication between two local clusters against the node's
//! own maximum ingest (see [`dup`]).
//!
//! `bench checkpoint` copies a full dup's checkpoints over the emulated WAN link beside
//! `iperf3` and `rsync` over `ssh` on the same link (see [`checkpoint`]).
//!
//! `bench failover` moves a table's writes back and forth with `ferry failover` under load and
//! reports the write gap the clients saw (see [`failover`]).
//!
//! Beside the markdown tables, `bench` writes PNG plots into `--out` ([`plot`]).

mod checkpoint;
mod dup;
mod failover;
mod plot;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ferry benchmarks, side by side with their baselines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Durable SET throughput: ferry node vs redis-server with appendfsync always.
    NodeVsRedis {
        /// Requests per redis-benchmark run.
        #[arg(short = 'n', long, default_value_t = 1_000_000)]
        requests: u64,
        /// Parallel client connections.
        #[arg(short = 'c', long, default_value_t = 50)]
        clients: u32,
        /// Value size in bytes.
        #[arg(short = 'd', long, default_value_t = 100)]
        data_size: u32,
        /// Pipeline depths to measure (1 = unpipelined).
        #[arg(short = 'P', long, value_delimiter = ',', default_value = "1,16")]
        pipeline: Vec<u32>,
        /// Alternating rounds per pipeline depth; the median is reported.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Partitions of the ferry node.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Directory for both servers' data (default: a temp dir on the same disk as /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Commands of the mixed workload (one client, pipelines of 256 of SET, DEL, INCR, MSET,
        /// SET EX) per round against each server; 0 skips it.
        #[arg(long, default_value_t = 500_000)]
        mixed_ops: u64,
    },
    /// Incremental duplication: throughput, MB/s raw and on the wire, per-write lag p50/p99 at
    /// shares of the node's own maximum ingest, and the drain rate of a backlog.
    Dup {
        /// Partitions of the table on both sides.
        #[arg(long, default_value_t = 8)]
        partitions: u32,
        /// Seconds of paced load per share.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Link round-trip times to measure, in ms (0 = loopback; more: a delaying UDP relay).
        #[arg(long, value_delimiter = ',', default_value = "0,50")]
        rtt_ms: Vec<u64>,
        /// Load as percentages of the node's measured maximum ingest.
        #[arg(long, value_delimiter = ',', default_value = "50,100")]
        loads: Vec<u32>,
        /// Shipper congestion controllers to compare (cubic, bbr, newreno).
        #[arg(long, value_delimiter = ',', default_value = "bbr")]
        congestion: Vec<String>,
        /// Writes that measure the node's maximum ingest.
        #[arg(long, default_value_t = 300_000)]
        baseline_writes: u64,
        /// Backlog written while the dup is paused, then drained (0 = skip).
        #[arg(long, default_value_t = 1_000_000)]
        drain: u64,
        /// bj (node, shipper, the load) on CPU 0 and tj (node, receiver) on CPU 1.
        #[arg(long)]
        pin: bool,
        /// A line for the shipper's `[shipper]` section, e.g. `--shipper 'window_batches = 2'`
        /// (repeatable).
        #[arg(long = "shipper")]
        shipper_toml: Vec<String>,
        /// Where the plots go (`dup-lag-cdf.png`).
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
    },
    /// Full duplication's checkpoint copy over the emulated WAN link, beside iperf3 and rsync
    /// over ssh on the same link; the foreground write rate during the copy; then on loopback.
    /// Needs root and /dev/net/tun.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Planned failovers back and forth under load, on loopback and on the emulated WAN link:
    /// the time to the new primary's first write and the write gap.
    Failover(failover::FailoverArgs),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Dup {
            partitions,
            seconds,
            rtt_ms,
            loads,
            congestion,
            baseline_writes,
            drain,
            pin,
            shipper_toml,
            out,
        } => dup::run(&dup::DupArgs {
            partitions,
            seconds,
            rtts_ms: rtt_ms,
            loads_pct: loads,
            congestion,
            baseline_writes,
            drain_writes: drain,
            pin,
            shipper_toml,
            out,
        }),
        Cmd::Checkpoint(args) => checkpoint::run(&args),
        Cmd::Failover(args) => failover::run(&args),
        Cmd::NodeVsRedis {
            requests,
            clients,
            data_size,
            pipeline,
            rounds,
            partitions,
            dir,
            mixed_ops,
        } => {
            let tmp = tempfile::Builder::new()
                .prefix("ferry-bench")
                .tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
            node_vs_redis(
                tmp.path(),
                requests,
                clients,
                data_size,
                &pipeline,
                rounds.max(1),
                partitions,
            )?;
            if mixed_ops == 0 {
                return Ok(());
            }
            mixed_vs_redis(tmp.path(), mixed_ops, data_size, rounds.max(1), partitions)
        }
    }
}

fn node_vs_redis(
    dir: &Path,
    n: u64,
    c: u32,
    d: u32,
    pipelines: &[u32],
    rounds: u32,
    partitions: u32,
) -> Result<()> {
    let node_bin = sibling_binary("node")?;
    println!("redis-benchmark -t set -d {d} -c {c} -n {n}, pipelines {pipelines:?}, {rounds} round(s) each");
    println!(
        "{:<6} {:>16} {:>16} {:>8}",
        "-P", "ferry ops/s", "redis ops/s", "ratio"
    );
    for &p in pipelines {
        let (mut ferry, mut redis) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Fresh data directories each round, so neither side benefits from the other's warm-up.
            let (node, port) = start_node(
                &node_bin,
                &dir.join(format!("node-p{p}-r{round}")),
                partitions,
            )?;
            ferry.push(redis_benchmark(port, n, c, d, p)?);
            drop(node);
            let (redis_srv, port) = start_redis(&dir.join(format!("redis-p{p}-r{round}")))?;
            redis.push(redis_benchmark(port, n, c, d, p)?);
            drop(redis_srv);
        }
        let (f, r) = (median(&mut ferry), median(&mut redis));
        println!("{:<6} {:>16.0} {:>16.0} {:>8.2}", p, f, r, f / r);
    }
    Ok(())
}

/// The mixed workload against a node and against Redis, alternating, median of `rounds`.
fn mixed_vs_redis(dir: &Path, mixed_ops: u64, d: u32, rounds: u32, partitions: u32) -> Result<()> {
    let node_bin = sibling_binary("node")?;
    println!();
    println!(
        "mixed: one client, pipelines of {MIXED_PIPE} of SET, DEL, INCR, MSET (2 keys), SET EX; {mixed_ops} commands, {rounds} round(s)"
    );
    println!("{:>16} {:>16} {:>8}", "ferry ops/s", "redis ops/s", "ratio");
    let (mut ferry, mut redis) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (node, port) = start_node(
            &node_bin,
            &dir.join(format!("node-mixed-r{round}")),
            partitions,
        )?;
        ferry.push(mixed(port, mixed_ops, d)?);
        drop(node);
        let (redis_srv, port) = start_redis(&dir.join(format!("redis-mixed-r{round}")))?;
        redis.push(mixed(port, mixed_ops, d)?);
        drop(redis_srv);
    }
    let (f, r) = (median(&mut ferry), median(&mut redis));
    println!("{:>16.0} {:>16.0} {:>8.2}", f, r, f / r);
    Ok(())
}

/// Commands per pipeline in the mixed workload.
const MIXED_PIPE: u64 = 256;

/// One connection sending pipelines of the five write commands in turn over 100,000 keys;
/// returns commands per second. Every reply is checked: an error reply fails the run.
fn mixed(port: u16, ops: u64, value_bytes: u32) -> Result<f64> {
    let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()?;
    let value = "v".repeat(value_bytes as usize);
    let mut rng = rand::rng();
    let mut key = || {
        format!(
            "key:{:06}",
            rand::Rng::random_range(&mut rng, 0..100_000u32)
        )
    };
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < ops {
        let mut pipe = redis::pipe();
        for i in 0..MIXED_PIPE {
            match i % 5 {
                0 => pipe.cmd("SET").arg(key()).arg(&value),
                1 => pipe.cmd("DEL").arg(key()),
                // Counters of their own, so INCR never meets a non-integer value.
                2 => pipe.cmd("INCR").arg(format!("n{}", key())),
                3 => pipe
                    .cmd("MSET")
                    .arg(key())
                    .arg(&value)
                    .arg(key())
                    .arg(&value),
                _ => pipe.cmd("SET").arg(key()).arg(&value).arg("EX").arg(3600),
            };
        }
        let replies: Vec<redis::Value> = pipe.query(&mut con)?;
        if let Some(e) = replies
            .iter()
            .find(|v| matches!(v, redis::Value::ServerError(_)))
        {
            bail!("the server on port {port} answered an error in the mixed workload: {e:?}");
        }
        sent += MIXED_PIPE;
    }
    Ok(sent as f64 / start.elapsed().as_secs_f64())
}

/// A standalone node on a fresh port, with its data in `dir`.
fn start_node(bin: &Path, dir: &Path, partitions: u32) -> Result<(Server, u16)> {
    let port = free_port()?;
    let http = free_port()?;
    let node = Server::start(
        Command::new(bin)
            .arg("--data-dir")
            .arg(dir)
            .args(["--partitions", &partitions.to_string(), "--cluster-id", "1"])
            .args([
                "--resp-addr",
                &format!("127.0.0.1:{port}"),
                "--http-addr",
                &format!("127.0.0.1:{http}"),
            ])
            .env("RUST_LOG", "warn"),
        port,
    )?;
    Ok((node, port))
}

/// `redis-server --appendonly yes --appendfsync always` on a fresh port, with its data in `dir`.
fn start_redis(dir: &Path) -> Result<(Server, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let srv = Server::start(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir),
        port,
    )?;
    Ok((srv, port))
}

/// Runs redis-benchmark's SET test and returns requests per second.
fn redis_benchmark(port: u16, n: u64, c: u32, d: u32, p: u32) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "set",
            "--csv",
            "-r",
            "1000000",
        ])
        .args([
            "-n",
            &n.to_string(),
            "-c",
            &c.to_string(),
            "-d",
            &d.to_string(),
            "-P",
            &p.to_string(),
        ])
        .output()
        .context("run redis-benchmark (install redis-tools: scripts/setup.sh)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // CSV: "test","rps",... ; the SET row's second field.
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if fields.first() == Some(&"SET") {
            if let Some(rps) = fields.get(1).and_then(|f| f.parse().ok()) {
                return Ok(rps);
            }
        }
    }
    bail!(
        "redis-benchmark printed no SET result: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A server process, killed when dropped.
struct Server(Child);

impl Server {
    fn start(cmd: &mut Command, port: u16) -> Result<Server> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn server")?;
        let mut s = Server(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(s);
            }
            if let Some(status) = s.0.try_wait()? {
                bail!("server exited with {status} before listening on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("server did not listen on port {port} within 60 s")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A binary built next to this one (target/release/).
fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("locate target directory")?;
    if !path.exists() {
        bail!(
            "{} is missing; build it with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}
