//! `bench checkpoint`: a full duplication's checkpoint copy over the emulated WAN link
//! (`ferry_harness::link`: by default 1 Gbit/s, 50 ms RTT, 0.1% loss), side by side in one run
//! with the TCP baselines on the same link: `iperf3` for the same bytes, and `rsync` over `ssh`
//! of the very same checkpoint files.
//!
//! 1. bj (in namespace `a`) is filled with `--gb` of random, incompressible values (zstd on the
//!    wire saves nothing; redis-benchmark's values are all `x` and would flatter it);
//! 2. a foreground load (`--fg-conns` connections, each a closed loop of pipelines of `FG_PIPE`
//!    SETs, paced to `--fg-mbs` in all) runs alone for `--fg-seconds`, then on through the full
//!    dup to tj (namespace `b`): its rate and pipeline latency during the copy against those
//!    alone say what the copy costs the source;
//! 3. the copy: the receiver's staged file bytes every 250 ms, from the first byte to every
//!    checkpoint staged; the install (staged → `DS_LOG`) separately;
//! 4. the clusters go, then `iperf3` a→b and `rsync -a` a→b over `sshd` in b, each alone on
//!    the link, with 64 MiB TCP buffers in both namespaces (the host's 4 MiB would cap TCP far
//!    below the link at 50 ms RTT);
//! 5. the same fill and copy on loopback, both clusters in this namespace.
//!
//! It prints one markdown table and the goals (≥ 90% of iperf3's goodput, ≥ 3× rsync's), and
//! writes `checkpoint-throughput.png` (MB/s over time per tool) into `--out`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use ferry_harness::dup::{metric, Cluster, TwoClusters};
use ferry_harness::link::{self, End, Link, LinkConfig};

use crate::plot;

const TABLE: &str = "bench";
/// The fill: connections and SETs per pipeline.
const FILL_CONNS: u64 = 16;
const FILL_PIPE: u64 = 32;
/// SETs per pipeline of the foreground load.
const FG_PIPE: u64 = 8;
/// How often the copy's progress is sampled.
const TICK: Duration = Duration::from_millis(250);
/// The longest any one phase may take.
const PHASE: Duration = Duration::from_secs(1800);
/// TCP buffer limits (min, default, max) set in both namespaces for the TCP baselines.
const TCP_RMEM: &str = "4096 131072 67108864";
const TCP_WMEM: &str = "4096 16384 67108864";

#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    /// Gigabytes (10^9 bytes) of random values to fill bj with.
    #[arg(long, default_value_t = 2.0)]
    pub gb: f64,
    /// Partitions of the table on both sides.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// The link's round-trip time.
    #[arg(long, default_value_t = 50)]
    pub rtt_ms: u64,
    /// The link's loss probability per packet, each way (0.001 = 0.1%).
    #[arg(long, default_value_t = 0.001)]
    pub loss: f64,
    /// The link's rate, each way.
    #[arg(long, default_value_t = 1000)]
    pub rate_mbit: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 4096)]
    pub value_bytes: usize,
    /// Connections of the foreground load (each a closed loop of pipelines of 8 SETs).
    #[arg(long, default_value_t = 2)]
    pub fg_conns: u64,
    /// The foreground load's rate, MB/s of values (0: unpaced, as fast as the loops go).
    #[arg(long, default_value_t = 10.0)]
    pub fg_mbs: f64,
    /// Seconds the foreground load runs alone before the copy.
    #[arg(long, default_value_t = 10.0)]
    pub fg_seconds: f64,
    /// The shipper's congestion controller (cubic, bbr, newreno).
    #[arg(long, default_value = "bbr")]
    pub congestion: String,
    /// Skip the loopback run.
    #[arg(long)]
    pub no_loopback: bool,
    /// Where the plots go (`checkpoint-throughput.png`).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
}

/// One copy: cumulative bytes since its first byte, and its totals.
struct Transfer {
    tool: String,
    bytes: u64,
    secs: f64,
    /// (seconds since the first byte, bytes so far).
    series: Vec<(f64, u64)>,
    /// CPU seconds of the link's forwarding threads during it (none on loopback).
    link_cpu: Option<f64>,
}

impl Transfer {
    fn mbs(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }
}

/// Writes per second and MB/s of a load.
#[derive(Clone, Copy)]
struct Rate {
    writes: f64,
    mbs: f64,
    /// Latency of a pipeline, median and 99th percentile, ms.
    p50: f64,
    p99: f64,
}

/// What a full dup measured.
struct FullCopy {
    fill: Rate,
    fg_alone: Rate,
    fg_during: Rate,
    copy: Transfer,
    wire_bytes: u64,
    install_secs: f64,
    /// CPU cores each process used on average during the copy.
    cores: Vec<(String, f64)>,
}

pub fn run(a: &CheckpointArgs) -> Result<()> {
    if let Some(why) = link::unavailable() {
        bail!("bench checkpoint needs the link emulator: {why}");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let fill_bytes = (a.gb * 1e9) as u64;
    let link = Link::create(LinkConfig {
        one_way: Duration::from_millis(a.rtt_ms) / 2,
        loss: a.loss,
        rate_bps: Some(a.rate_mbit * 1_000_000),
        ..LinkConfig::default()
    })?;
    let keep = tempfile::Builder::new()
        .prefix("ferry-bench-cp")
        .tempdir()?;
    eprintln!(
        "== link: {} Mbit/s, {} ms RTT, {}% loss; {:.2} GB of random values of {} bytes ==",
        a.rate_mbit,
        a.rtt_ms,
        a.loss * 100.0,
        fill_bytes as f64 / 1e9,
        a.value_bytes
    );
    for end in [link.a(), link.b()] {
        tune_tcp(end)?;
    }
    let wan = on_link(a, &link, fill_bytes, keep.path())?;
    let tcp_cc = tcp_congestion(link.a());
    let iperf = iperf3(&link, wan.copy.bytes, &a.out.join("iperf3.json"))?;
    let rsync = rsync(&link, keep.path())?;
    drop(keep);
    drop(link);
    let lo = if !a.no_loopback {
        eprintln!("== loopback ==");
        let mut w = TwoClusters::start_source_only(TABLE, a.partitions, a.partitions)?;
        set_congestion(&mut w, &a.congestion)?;
        Some(measure(a, &w, None, fill_bytes, None)?)
    } else {
        None
    };
    report(a, &tcp_cc, &wan, &iperf, &rsync, lo.as_ref());
    let png = a.out.join("checkpoint-throughput.png");
    plot_throughput(&png, a, [&wan.copy, &iperf, &rsync])?;
    println!("\nplot: {}", png.display());
    Ok(())
}

/// The ferry half on the link: clusters in the namespaces, fill, foreground load, full dup;
/// the checkpoint files are hard-linked into `keep` for rsync. The clusters are gone when this
/// returns.
fn on_link(a: &CheckpointArgs, link: &Link, fill_bytes: u64, keep: &Path) -> Result<FullCopy> {
    let mut w = TwoClusters::start_link(TABLE, a.partitions, a.partitions, link)?;
    let (bj, tj) = (link.a(), link.b());
    bj.enter(|| set_congestion(&mut w, &a.congestion))??;
    let link_cpu = || link_threads_cpu().ok();
    let cpu0 = link_cpu();
    let mut m = bj.enter(|| measure(a, &w, Some(tj), fill_bytes, Some(keep)))?;
    if let Ok(m) = &mut m {
        m.copy.link_cpu = link_cpu().zip(cpu0).map(|(b, a)| b - a);
    }
    if m.is_err() {
        for (c, what) in [(&w.bj, "shipper"), (&w.tj, "receiver")] {
            let log = c.log_text(what);
            eprintln!("--- last lines of {}'s {what} log ---", c.name);
            for l in log
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                eprintln!("{l}");
            }
        }
    }
    m
}

/// The shipper with congestion controller `cc` (restarted; its RTT line kept).
fn set_congestion(w: &mut TwoClusters, cc: &str) -> Result<()> {
    w.bj.shipper_toml += &format!("congestion = \"{cc}\"\n");
    if let Some(mut old) = w.bj.shipper.take() {
        old.terminate(Duration::from_secs(10));
    }
    w.bj.start_shipper()
}

/// Fill, the foreground load alone, then the full dup under it. Runs where bj's processes
/// can be reached; `tj_ns` is where tj's can (`None`: here).
fn measure(
    a: &CheckpointArgs,
    w: &TwoClusters,
    tj_ns: Option<&End>,
    fill_bytes: u64,
    keep: Option<&Path>,
) -> Result<FullCopy> {
    let fill = fill(a, &w.bj, fill_bytes)?;
    let mut fg = Writers::start(&w.bj, a.foreground())?;
    std::thread::sleep(Duration::from_secs_f64(a.fg_seconds));
    let fg_alone = rate(&fg, fg.acked().0, fg.started, Instant::now(), a.value_bytes);
    eprintln!(
        "foreground alone: {:.0} writes/s, {:.1} MB/s, p50 {:.1} ms, p99 {:.1} ms",
        fg_alone.writes, fg_alone.mbs, fg_alone.p50, fg_alone.p99
    );
    let procs = processes(w);
    let (cpu0, t_cpu) = (cpu_of(&procs), Instant::now());
    let (copy, (writes, from, to), dupid) = copy(w, tj_ns, &fg, keep)?;
    let cpu1 = cpu_of(&procs);
    let wall = t_cpu.elapsed().as_secs_f64();
    let fg_during = rate(&fg, writes, from, to, a.value_bytes);
    fg.stop()?;
    let t = Instant::now();
    w.bj.wait_dup_status(TABLE, dupid, "DS_LOG", PHASE)?;
    let install_secs = t.elapsed().as_secs_f64();
    let wire_bytes =
        w.bj.shipper_metric_where("dup_checkpoint_bytes_total", &[("kind", "wire")])?;
    let cores = procs
        .iter()
        .zip(cpu0.iter().zip(&cpu1))
        .map(|((name, _), (c0, c1))| (name.clone(), (c1 - c0) / wall))
        .collect();
    eprintln!(
        "copy: {} bytes in {:.1} s = {:.1} MB/s; foreground during it {:.0} writes/s, p50 {:.1} ms, p99 {:.1} ms; install {install_secs:.1} s",
        copy.bytes, copy.secs, copy.mbs(), fg_during.writes, fg_during.p50, fg_during.p99
    );
    Ok(FullCopy {
        fill,
        fg_alone,
        fg_during,
        copy,
        wire_bytes: wire_bytes as u64,
        install_secs,
        cores,
    })
}

/// Writes `bytes` of random values into `c` as fast as it takes them.
fn fill(a: &CheckpointArgs, c: &Cluster, bytes: u64) -> Result<Rate> {
    let mut fill = Writers::start(
        c,
        Load {
            prefix: "c:",
            conns: FILL_CONNS,
            pipe: FILL_PIPE,
            value_bytes: a.value_bytes,
            limit: Some(bytes),
            rate: 0.0,
        },
    )?;
    let (writes, took) = fill.join()?;
    let r = rate(&fill, writes, fill.started, Instant::now(), a.value_bytes);
    eprintln!(
        "fill: {writes} writes in {took:.1?}: {:.0} writes/s, {:.1} MB/s",
        r.writes, r.mbs
    );
    Ok(r)
}

/// `writes` of `w` in `from..to`: their rate and the latency of their pipelines.
fn rate(w: &Writers, writes: u64, from: Instant, to: Instant, value_bytes: usize) -> Rate {
    let secs = (to - from).as_secs_f64().max(1e-9);
    let (p50, p99) = w.latency(from, to);
    Rate {
        writes: writes as f64 / secs,
        mbs: writes as f64 * value_bytes as f64 / 1e6 / secs,
        p50,
        p99,
    }
}

impl CheckpointArgs {
    fn foreground(&self) -> Load {
        Load {
            prefix: "g:",
            conns: self.fg_conns,
            pipe: FG_PIPE,
            value_bytes: self.value_bytes,
            limit: None,
            rate: self.fg_mbs * 1e6 / self.value_bytes as f64,
        }
    }
}

/// Adds the full dup and follows it until every checkpoint is staged on tj. Returns the
/// transfer (from the receiver's staged bytes), the foreground writes acknowledged during it
/// with its duration, and the dupid.
fn copy(
    w: &TwoClusters,
    tj_ns: Option<&End>,
    fg: &Writers,
    keep: Option<&Path>,
) -> Result<(Transfer, (u64, Instant, Instant), u64)> {
    let t0 = Instant::now();
    let dupid = w.bj.add_full_dup(TABLE, "tj", &[])?;
    let partitions = w.bj.node.spec.partitions;
    let stop = AtomicBool::new(false);
    let receiver = w.tj.receiver_http;
    let (staged, acks) = std::thread::scope(|s| -> Result<_> {
        let stop = &stop;
        let rx = s.spawn(move || in_ns(tj_ns, || staged_series(receiver, partitions, t0, stop)));
        let acks = follow(w, dupid, fg, keep, t0, &rx);
        stop.store(true, Ordering::Relaxed);
        let staged = rx
            .join()
            .map_err(|_| anyhow::anyhow!("the receiver sampler panicked"))??;
        Ok((staged, acks?))
    })?;
    let (series, done) = staged;
    let first = series
        .iter()
        .position(|&(_, b)| b > 0)
        .context("no byte was staged")?;
    let start = if first == 0 { 0.0 } else { series[first - 1].0 };
    let window = (at(&acks, done) - at(&acks, start)).max(0.0) as u64;
    let copy = Transfer {
        tool: "ferry".into(),
        bytes: series.last().map_or(0, |s| s.1),
        secs: done - start,
        series: series
            .iter()
            .map(|&(t, b)| ((t - start).max(0.0), b))
            .collect(),
        link_cpu: None,
    };
    let (from, to) = (t0 + secs(start), t0 + secs(done));
    Ok((copy, (window, from, to), dupid))
}

/// The receiver's staged checkpoint file bytes every `TICK` since `t0`, until every one of
/// `partitions` checkpoints is staged (returned with that time) or `stop`.
fn staged_series(
    receiver: std::net::SocketAddr,
    partitions: u32,
    t0: Instant,
    stop: &AtomicBool,
) -> Result<(Vec<(f64, u64)>, f64)> {
    let mut series = Vec::new();
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < PHASE {
        let t = t0.elapsed().as_secs_f64();
        let bytes = metric(receiver, "receiver_checkpoint_chunk_bytes_total")?;
        let staged = metric(receiver, "receiver_checkpoints_staged_total")?;
        series.push((t, bytes as u64));
        if staged >= f64::from(partitions) {
            return Ok((series, t));
        }
        std::thread::sleep(TICK);
    }
    bail!("the checkpoints were not all staged within {PHASE:?} (or the bench stopped)")
}

/// While the sampler `rx` runs: the foreground writes acknowledged every `TICK` since `t0`,
/// and the checkpoint files hard-linked into `keep` once the dup has them (past
/// `DS_PREPARE`; bj deletes them after the install).
fn follow<T>(
    w: &TwoClusters,
    dupid: u64,
    fg: &Writers,
    keep: Option<&Path>,
    t0: Instant,
    rx: &std::thread::ScopedJoinHandle<'_, T>,
) -> Result<Vec<(f64, f64)>> {
    let mut acks = Vec::new();
    let mut keep = keep;
    while !rx.is_finished() && t0.elapsed() < PHASE {
        acks.push((t0.elapsed().as_secs_f64(), fg.acked().0 as f64));
        if let Some(dir) = keep {
            if w.bj.dup_status(TABLE, dupid)? != "DS_PREPARE" {
                keep_checkpoints(&w.bj, dupid, dir)?;
                keep = None;
            }
        }
        std::thread::sleep(TICK);
    }
    acks.push((t0.elapsed().as_secs_f64(), fg.acked().0 as f64));
    Ok(acks)
}

/// Hard links of every partition's checkpoint of `dupid` under `dir/<partition>/`.
fn keep_checkpoints(c: &Cluster, dupid: u64, dir: &Path) -> Result<()> {
    for p in 0..c.node.spec.partitions {
        let src = c.checkpoint_dir(p, dupid);
        let out = Command::new("cp")
            .arg("-al")
            .arg(&src)
            .arg(dir.join(p.to_string()))
            .output()
            .context("run cp")?;
        if !out.status.success() {
            bail!(
                "cp -al {} failed: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The value of the samples `(t, v)` at `t`, interpolated linearly.
fn at(samples: &[(f64, f64)], t: f64) -> f64 {
    let after = samples.iter().position(|s| s.0 >= t);
    match after {
        None => samples.last().map_or(0.0, |s| s.1),
        Some(0) => samples[0].1,
        Some(i) => {
            let ((t0, v0), (t1, v1)) = (samples[i - 1], samples[i]);
            v0 + (v1 - v0) * (t - t0) / (t1 - t0).max(1e-9)
        }
    }
}

/// Runs `f` in namespace `end`, or here.
fn in_ns<T: Send>(end: Option<&End>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match end {
        Some(e) => e.enter(f)?,
        None => f(),
    }
}

/// What a set of writers sends.
#[derive(Clone, Copy)]
struct Load {
    /// Keys are `<prefix><index>`.
    prefix: &'static str,
    conns: u64,
    /// SETs per pipeline.
    pipe: u64,
    value_bytes: usize,
    /// Stop once the values written reach this many bytes.
    limit: Option<u64>,
    /// Writes per second in all (0: each connection sends its next pipeline at once).
    rate: f64,
}

/// Writers in closed loops: each connection sends a pipeline of SETs of fresh random values
/// (incompressible), waits for the answers and, paced to its share of the rate, sends the
/// next; until stopped, the limit is reached, or `PHASE` passed. Each pipeline's latency is
/// kept with the time it was answered.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<(Instant, f64)>>>,
    started: Instant,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Writers {
    fn start(c: &Cluster, load: Load) -> Result<Writers> {
        let w = Writers {
            stop: Arc::new(AtomicBool::new(false)),
            acked: Arc::new(AtomicU64::new(0)),
            latencies: Arc::new(Mutex::new(Vec::new())),
            started: Instant::now(),
            threads: Vec::new(),
        };
        let next = Arc::new(AtomicU64::new(0));
        let threads = (0..load.conns)
            .map(|k| {
                let con = c.redis()?;
                let (w, next) = (w.shared(), next.clone());
                Ok(std::thread::spawn(move || {
                    write_loop(con, load, k, &w, &next)
                }))
            })
            .collect::<Result<_>>()?;
        Ok(Writers { threads, ..w })
    }

    /// The parts a writer thread shares.
    fn shared(&self) -> Writers {
        Writers {
            stop: self.stop.clone(),
            acked: self.acked.clone(),
            latencies: self.latencies.clone(),
            started: self.started,
            threads: Vec::new(),
        }
    }

    /// Writes acknowledged so far, and the time since the start.
    fn acked(&self) -> (u64, Duration) {
        (self.acked.load(Ordering::Relaxed), self.started.elapsed())
    }

    /// The median and 99th percentile latency (ms) of the pipelines answered in `from..to`.
    fn latency(&self, from: Instant, to: Instant) -> (f64, f64) {
        let all = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<f64> = all
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|l| l.1)
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |q: f64| v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)));
        (
            q(0.5).copied().unwrap_or(0.0),
            q(0.99).copied().unwrap_or(0.0),
        )
    }

    /// Waits until every connection ended (the limit reached); what `acked` says then.
    fn join(&mut self) -> Result<(u64, Duration)> {
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        Ok(self.acked())
    }

    fn stop(&mut self) -> Result<(u64, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }
}

/// One connection's loop of [`Writers`]: claims the next `pipe` indexes, writes them, waits.
fn write_loop(
    mut con: redis::Connection,
    load: Load,
    k: u64,
    w: &Writers,
    next: &AtomicU64,
) -> Result<()> {
    let last = load
        .limit
        .map_or(u64::MAX, |l| l.div_ceil(load.value_bytes as u64));
    let per_conn = load.rate / load.conns as f64;
    let mut rng = StdRng::seed_from_u64(k ^ (u64::from(load.prefix.as_bytes()[0]) << 32));
    let mut value = vec![0u8; load.value_bytes];
    let mut sent = 0u64;
    while !w.stop.load(Ordering::Relaxed) && w.started.elapsed() < PHASE {
        if per_conn > 0.0 {
            let due = w.started + Duration::from_secs_f64(sent as f64 / per_conn);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let first = next.fetch_add(load.pipe, Ordering::Relaxed);
        let n = load.pipe.min(last.saturating_sub(first));
        if n == 0 {
            return Ok(());
        }
        let mut p = redis::pipe();
        for i in first..first + n {
            rng.fill_bytes(&mut value);
            p.cmd("SET")
                .arg(format!("{}{i:012}", load.prefix))
                .arg(&value)
                .ignore();
        }
        let t = Instant::now();
        p.query::<()>(&mut con)?;
        let done = Instant::now();
        let ms = (done - t).as_secs_f64() * 1000.0;
        w.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((done, ms));
        w.acked.fetch_add(n, Ordering::Relaxed);
        sent += n;
    }
    Ok(())
}

/// The processes whose CPU the copy uses: bj's node and shipper, tj's node and receiver.
fn processes(w: &TwoClusters) -> Vec<(String, u32)> {
    let mut p = vec![("bj node".to_string(), w.bj.node.proc.pid())];
    p.extend(
        w.bj.shipper
            .as_ref()
            .map(|s| ("bj shipper".to_string(), s.pid())),
    );
    p.push(("tj node".into(), w.tj.node.proc.pid()));
    p.extend(
        w.tj.receiver
            .as_ref()
            .map(|r| ("tj receiver".to_string(), r.pid())),
    );
    p
}

/// CPU seconds (user + system) each process has used (0 for one that is gone).
fn cpu_of(procs: &[(String, u32)]) -> Vec<f64> {
    procs
        .iter()
        .map(|(_, pid)| stat_cpu(&format!("/proc/{pid}/stat")).unwrap_or(0.0))
        .collect()
}

/// CPU seconds of this process's link forwarding threads (named `link a→b`, `link b→a`).
fn link_threads_cpu() -> Result<f64> {
    let mut sum = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let dir = task?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("link ") {
            sum += stat_cpu(&dir.join("stat").to_string_lossy())?;
        }
    }
    Ok(sum)
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    // The fields after the parenthesised name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux this runs on.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

/// 64 MiB TCP buffers in `end`'s namespace (for the TCP baselines).
fn tune_tcp(end: &End) -> Result<()> {
    let out = end
        .place()
        .command("sysctl")
        .args(["-q", "-w"])
        .arg(format!("net.ipv4.tcp_rmem={TCP_RMEM}"))
        .arg(format!("net.ipv4.tcp_wmem={TCP_WMEM}"))
        .output()
        .context("run sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl in {} failed: {}",
            end.ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The TCP congestion controller of `end`'s namespace.
fn tcp_congestion(end: &End) -> String {
    end.place()
        .command("sysctl")
        .args(["-n", "net.ipv4.tcp_congestion_control"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `iperf3` a→b for `bytes`, alone on the link: the receiver's goodput, and the server's
/// (receiving side's) intervals as the series; its JSON report goes to `json`.
fn iperf3(link: &Link, bytes: u64, json: &Path) -> Result<Transfer> {
    eprintln!("== iperf3, {bytes} bytes a→b ==");
    let (b_ip, port) = (link.b().ip.to_string(), "5201");
    let mut server = link.b().place().command("iperf3");
    server
        .args(["-s", "-1", "-i", "0.25", "-B", &b_ip, "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = ferry_harness::procs::Proc::spawn("iperf3 -s", &mut server)?;
    let cpu0 = link_threads_cpu()?;
    let mut last = String::new();
    for _ in 0..20 {
        std::thread::sleep(TICK);
        let out = link
            .a()
            .place()
            .command("iperf3")
            .args([
                "-c",
                &b_ip,
                "-p",
                port,
                "-n",
                &bytes.to_string(),
                "-i",
                "0.25",
                "-J",
            ])
            .arg("--get-server-output")
            .output()
            .context("run iperf3 (scripts/setup.sh installs it)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            std::fs::write(json, &out.stdout)
                .with_context(|| format!("write {}", json.display()))?;
            let mut t = parse_iperf3(&text)?;
            t.link_cpu = Some(link_threads_cpu()? - cpu0);
            return Ok(t);
        }
        last = text.chars().take(400).collect();
    }
    bail!("iperf3 did not run: {last}")
}

fn parse_iperf3(json: &str) -> Result<Transfer> {
    let v: serde_json::Value = serde_json::from_str(json).context("parse iperf3 -J")?;
    let got = &v["end"]["sum_received"];
    let bytes = got["bytes"]
        .as_u64()
        .context("iperf3: end.sum_received.bytes")?;
    let secs = got["seconds"]
        .as_f64()
        .context("iperf3: end.sum_received.seconds")?;
    let server = v["server_output_text"].as_str().unwrap_or_default();
    let mut series = vec![(0.0, 0)];
    let mut sum = 0.0;
    for (end, b) in server.lines().filter_map(server_interval) {
        sum += b;
        series.push((end, sum as u64));
    }
    Ok(Transfer {
        tool: "iperf3".into(),
        bytes,
        secs,
        series,
        link_cpu: None,
    })
}

/// The end (s) and bytes of an interval line of iperf3's text report, e.g.
/// `[  5]   0.25-0.50   sec  28.8 MBytes   966 Mbits/sec` (its units are powers of 1024).
/// The summary lines (`sender`, `receiver`) and everything else are `None`.
fn server_interval(line: &str) -> Option<(f64, f64)> {
    let rest = line.strip_prefix('[')?.split_once(']')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() != 6 || f.get(1) != Some(&"sec") {
        return None;
    }
    let end: f64 = f[0].split_once('-')?.1.parse().ok()?;
    let scale = match f[3] {
        "Bytes" => 1.0,
        "KBytes" => 1024.0,
        "MBytes" => 1024.0 * 1024.0,
        "GBytes" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((end, f[2].parse::<f64>().ok()? * scale))
}

/// `rsync -a` of `src` from a into a fresh directory through `sshd` in b, alone on the link:
/// the destination's size every `TICK` from the first byte to rsync's exit.
fn rsync(link: &Link, src: &Path) -> Result<Transfer> {
    eprintln!("== rsync over ssh a→b ==");
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-rsync")
        .tempdir()?;
    let (keys, dest) = (dir.path(), dir.path().join("dst"));
    for key in ["host_key", "user_key"] {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(keys.join(key)),
        )?;
    }
    std::fs::copy(keys.join("user_key.pub"), keys.join("authorized_keys"))?;
    std::fs::create_dir_all("/run/sshd")?;
    std::fs::create_dir_all(&dest)?;
    let b_ip = link.b().ip.to_string();
    let mut sshd = link.b().place().command("/usr/sbin/sshd");
    sshd.args([
        "-D",
        "-e",
        "-p",
        "2222",
        "-o",
        &format!("ListenAddress={b_ip}"),
        "-h",
    ])
    .arg(keys.join("host_key"))
    .arg("-o")
    .arg(format!(
        "AuthorizedKeysFile={}",
        keys.join("authorized_keys").display()
    ))
    .args([
        "-o",
        "UsePAM=no",
        "-o",
        "StrictModes=no",
        "-o",
        "PidFile=none",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _sshd = ferry_harness::procs::Proc::spawn("sshd", &mut sshd)?;
    let ssh = format!(
        "ssh -p 2222 -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        keys.join("user_key").display()
    );
    wait_ssh(link, &ssh, &b_ip)?;
    let cpu0 = link_threads_cpu()?;
    let mut child = link
        .a()
        .place()
        .command("rsync")
        .args(["-a", "-e", &ssh])
        .arg(format!("{}/", src.display()))
        .arg(format!("root@{b_ip}:{}/", dest.display()))
        .stdout(Stdio::null())
        .spawn()
        .context("run rsync (scripts/setup.sh installs it)")?;
    let (series, done) = follow_dir(&mut child, &dest)?;
    let first = series
        .iter()
        .position(|&(_, b)| b > 0)
        .context("rsync copied nothing")?;
    let start = if first == 0 { 0.0 } else { series[first - 1].0 };
    Ok(Transfer {
        tool: "rsync".into(),
        bytes: dir_size(&dest),
        secs: done - start,
        series: series
            .iter()
            .map(|&(t, b)| ((t - start).max(0.0), b))
            .collect(),
        link_cpu: Some(link_threads_cpu()? - cpu0),
    })
}

/// Waits (5 s at most) until `ssh` from a logs in to b.
fn wait_ssh(link: &Link, ssh: &str, b_ip: &str) -> Result<()> {
    let mut last = String::new();
    for _ in 0..20 {
        let mut cmd = link.a().place().command("sh");
        let out = cmd
            .arg("-c")
            .arg(format!("{ssh} root@{b_ip} true"))
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(TICK);
    }
    bail!("ssh to sshd in b failed: {last}")
}

/// `dest`'s size every `TICK` until `child` exits (killed after `PHASE`); the samples and
/// the exit time, seconds since the start.
fn follow_dir(child: &mut Child, dest: &Path) -> Result<(Vec<(f64, u64)>, f64)> {
    let t0 = Instant::now();
    let mut series = Vec::new();
    while t0.elapsed() < PHASE {
        series.push((t0.elapsed().as_secs_f64(), dir_size(dest)));
        if let Some(status) = child.try_wait()? {
            let done = t0.elapsed().as_secs_f64();
            if !status.success() {
                bail!("rsync exited with {status}");
            }
            series.push((done, dir_size(dest)));
            return Ok((series, done));
        }
        std::thread::sleep(TICK);
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("rsync did not finish within {PHASE:?}")
}

/// The bytes of every file under `dir` (files that vanish meanwhile count 0).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn report(
    a: &CheckpointArgs,
    tcp_cc: &str,
    wan: &FullCopy,
    iperf: &Transfer,
    rsync: &Transfer,
    lo: Option<&FullCopy>,
) {
    let link = format!(
        "{} Mbit/s, {} ms RTT, {}% loss",
        a.rate_mbit,
        a.rtt_ms,
        a.loss * 100.0
    );
    let cores = |t: &Transfer| {
        t.link_cpu
            .map_or("-".into(), |c| format!("{:.2}", c / t.secs))
    };
    let wire = Transfer {
        tool: "ferry, on the wire (after zstd)".into(),
        bytes: wan.wire_bytes,
        secs: wan.copy.secs,
        series: Vec::new(),
        link_cpu: wan.copy.link_cpu,
    };
    let mut rows = vec![
        (
            format!("ferry checkpoint copy (QUIC, {})", a.congestion),
            link.as_str(),
            &wan.copy,
        ),
        (wire.tool.clone(), link.as_str(), &wire),
        (format!("iperf3 (TCP, {})", tcp_cc), link.as_str(), iperf),
        ("rsync -a over ssh".to_string(), link.as_str(), rsync),
    ];
    if let Some(lo) = lo {
        rows.push(("ferry checkpoint copy".to_string(), "loopback", &lo.copy));
    }
    println!();
    println!("values: random bytes (incompressible); MB = 10^6 bytes; {} partitions; TCP buffers up to 64 MiB in both namespaces", a.partitions);
    println!();
    println!("| tool | link | bytes | seconds | MB/s | ratio to iperf3 | link forwarding, cores |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for (tool, link, t) in &rows {
        println!(
            "| {tool} | {link} | {} | {:.1} | {:.1} | {:.2} | {} |",
            t.bytes,
            t.secs,
            t.mbs(),
            t.mbs() / iperf.mbs(),
            cores(t)
        );
    }
    let (vs_iperf, vs_rsync) = (wan.copy.mbs() / iperf.mbs(), wan.copy.mbs() / rsync.mbs());
    let yes = |ok: bool| if ok { "yes" } else { "no" };
    println!();
    println!(
        "- ferry / iperf3 = {:.0}% (goal ≥ 90%): {}",
        vs_iperf * 100.0,
        yes(vs_iperf >= 0.9)
    );
    println!(
        "- ferry / rsync = {vs_rsync:.2}× (goal ≥ 3×): {}",
        yes(vs_rsync >= 3.0)
    );
    println!();
    report_foreground(a, wan, lo);
}

/// The foreground load alone and during the copy, the install, the CPU per process.
fn report_foreground(a: &CheckpointArgs, wan: &FullCopy, lo: Option<&FullCopy>) {
    println!("| link | fill MB/s | foreground alone: writes/s, p50, p99 | during the copy: writes/s, p50, p99 | writes/s during / alone | install after staged |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, m) in [("WAN", Some(wan)), ("loopback", lo)] {
        if let Some(m) = m {
            let (x, y) = (&m.fg_alone, &m.fg_during);
            println!(
                "| {name} | {:.1} | {:.0}, {:.1} ms, {:.1} ms | {:.0}, {:.1} ms, {:.1} ms | {:.2} | {:.1} s |",
                m.fill.mbs, x.writes, x.p50, x.p99, y.writes, y.p50, y.p99,
                y.writes / x.writes.max(1e-9), m.install_secs
            );
        }
    }
    println!();
    let pace = if a.fg_mbs > 0.0 {
        format!("paced to {} MB/s in all", a.fg_mbs)
    } else {
        "unpaced".into()
    };
    println!(
        "foreground: {} connection(s), pipelines of {FG_PIPE} SETs of {} random bytes, each waiting for its answers, {pace}; latency per pipeline",
        a.fg_conns, a.value_bytes
    );
    let used: Vec<String> = wan
        .cores
        .iter()
        .map(|(n, c)| format!("{n} {c:.2}"))
        .collect();
    println!("CPU cores used during the WAN copy: {}", used.join(", "));
}

/// MB/s over time of each transfer, from its cumulative series.
fn plot_throughput(path: &Path, a: &CheckpointArgs, transfers: [&Transfer; 3]) -> Result<()> {
    let series: Vec<plot::Series> = transfers
        .iter()
        .map(|t| plot::Series {
            name: format!("{} ({:.0} MB/s)", t.tool, t.mbs()),
            points: t
                .series
                .windows(2)
                .filter(|w| w[1].0 > w[0].0)
                .map(|w| {
                    (
                        w[1].0,
                        (w[1].1 - w[0].1.min(w[1].1)) as f64 / 1e6 / (w[1].0 - w[0].0),
                    )
                })
                .collect(),
        })
        .collect();
    let title = format!(
        "checkpoint copy, {} Mbit/s, {} ms RTT, {}% loss",
        a.rate_mbit,
        a.rtt_ms,
        a.loss * 100.0
    );
    plot::lines(
        path,
        &plot::Axes {
            title: &title,
            x: "seconds since the first byte",
            y: "MB/s",
            x_label: &|v| format!("{v:.0}"),
            legend: plotters::chart::SeriesLabelPosition::UpperRight,
        },
        &series,
    )
}

#[cfg(test)]
mod tests {
    use super::{at, server_interval};

    #[test]
    fn iperf3_interval_lines_parse_and_summaries_do_not() {
        let l = "[  5]   0.25-0.50   sec  28.8 MBytes   966 Mbits/sec                  ";
        assert_eq!(server_interval(l), Some((0.5, 28.8 * 1024.0 * 1024.0)));
        let sum = "[  5]   0.00-5.03   sec   503 MBytes   838 Mbits/sec                  receiver";
        assert_eq!(server_interval(sum), None);
        assert_eq!(
            server_interval("[ ID] Interval           Transfer     Bitrate"),
            None
        );
    }

    #[test]
    fn samples_interpolate_between_neighbours() {
        let s = [(0.0, 0.0), (1.0, 10.0), (3.0, 30.0)];
        assert_eq!(at(&s, 0.5), 5.0);
        assert_eq!(at(&s, 2.0), 20.0);
        assert_eq!(at(&s, 9.0), 30.0);
    }
}
