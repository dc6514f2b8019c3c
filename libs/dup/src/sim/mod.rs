//! A deterministic simulation of shipping: [`ShipSession`](crate::ship::ShipSession)s and a
//! [`ReceiveSession`](crate::receive::ReceiveSession) over simulated links, in virtual time,
//! driven by one seeded RNG, with invariants checked after every step.
//!
//! What runs (see `world.rs`):
//! - a **source partition** whose committed decree grows (records made by the sim);
//! - one or two **shippers**, each driving `ShipSession`s like the shipper's partition task:
//!   campaign in a simulated etcd (the election revision is the fencing token), resume after the
//!   larger of the stored progress and the `Welcome`, retry by fail mode ([`crate::retry`]),
//!   write progress every `progress_interval`, fenced by the election;
//! - a **receiver** with the fencing rule ([`crate::receive::admit`]), one `ReceiveSession` per
//!   stream, and one in-memory inbox per **target partition** (1–4 per seed): an append is split
//!   with [`crate::route::split`], each part becomes durable only when its own simulated fsync
//!   completes (each inbox skipping what it holds and refusing a gap, as `InboxWriter::append`),
//!   and the session is told the minimum over the target partitions once all are done, which is
//!   also what a `Welcome` confirms;
//! - **connections** between them, one per session, in-order per direction (a QUIC stream).
//!
//! Faults, at random times while the source commits (then the links heal and it runs to
//! quiescence): a connection breaks (both sides notice after independent delays; in-flight data
//! is lost), a shipper abandons a connection whose frames still reach the receiver late (after
//! the next session's), the link is partitioned for a while, a shipper or the receiver crashes
//! (losing what was not durable) and restarts, a second shipper takes over with a newer token
//! while the old one still ships, the receiver's disk fails fsyncs for a while. A receiver crash
//! or a failed fsync in the middle of an append leaves the target partitions at different last
//! decrees: each part still in fsync at a crash is lost or lands, independently, and the parts
//! whose fsync completed before a disk fault keep their records while the append fails.
//!
//! Invariants, each failure naming its letter:
//! - (a) the persisted confirmed decree never exceeds what the target holds durably (in every
//!   target partition: the minimum);
//! - (b) every decree a shipper saw confirmed is durable in every target partition; at quiescence
//!   every target partition holds every committed source decree, with exactly the source's ops
//!   whose key maps to it (FAIL_SKIP may strip the ops of skipped ones);
//! - (c) a fenced (stale) shipper never advances the persisted progress, and a preempted
//!   receive session never starts an append;
//! - (d) an append starts right after what every target partition holds, and each target
//!   partition's inbox is appended at most once per decree: contiguous, no duplicates;
//! - (e) progress never goes backwards (persisted, per term, each target partition's inbox);
//! - (f) only a lost election fences: a shipper that still leads is never told it is stale.
//!
//! Any seed replays alone: `FERRY_SIM_SEED=N cargo test -p ferry-dup --release --test sim`.

mod world;

use std::fmt;
use std::time::Duration;

/// How big one simulated run is.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Records the source commits, at most (each seed draws between a fifth and all of it).
    pub max_records: u64,
    /// Steps (batches of events at one virtual instant) before the run is declared stuck.
    pub max_steps: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            max_records: 300,
            max_steps: 200_000,
        }
    }
}

/// What a successful run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: usize,
    /// Virtual time at quiescence.
    pub virtual_time: Duration,
    pub records: u64,
    pub faults: u64,
    /// Shipping sessions started.
    pub sessions: u64,
    /// Hellos the receiver refused with a stale token.
    pub stale_refusals: u64,
    /// Progress writes refused by the election fence.
    pub fenced_writes: u64,
    /// Appends that became durable in every target partition (one fsync each).
    pub appends: u64,
    /// Records whose ops FAIL_SKIP stripped.
    pub skipped_ops: u64,
    /// Batches and heartbeats the shippers sent.
    pub batches: u64,
    pub heartbeats: u64,
    /// Receiver restarts that found the target partitions at different last decrees (a crash
    /// in the middle of an append).
    pub uneven_restarts: u64,
    /// Receive sessions opened (a Welcome sent) while the target partitions were at different
    /// last decrees, after a crash or a disk fault in the middle of an append.
    pub uneven_welcomes: u64,
}

/// A violated invariant: the seed, which invariant, and the events that led there.
#[derive(Debug, Clone)]
pub struct SimFailure {
    pub seed: u64,
    /// The invariant's letter and name, e.g. `(a) progress <= durable`.
    pub invariant: &'static str,
    pub message: String,
    /// Every event of the run, in order, with its virtual time.
    pub schedule: Vec<String>,
}

/// How many schedule lines a failure prints (the last ones); all of them with
/// `FERRY_SIM_FULL=1`.
const SHOWN_EVENTS: usize = 150;

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation seed {} violated invariant {}: {}",
            self.seed, self.invariant, self.message
        )?;
        writeln!(
            f,
            "replay alone: FERRY_SIM_SEED={} cargo test -p ferry-dup --release --test sim",
            self.seed
        )?;
        let full = std::env::var_os("FERRY_SIM_FULL").is_some();
        let skip = if full {
            0
        } else {
            self.schedule.len().saturating_sub(SHOWN_EVENTS)
        };
        writeln!(
            f,
            "schedule ({} events{}):",
            self.schedule.len(),
            if skip > 0 {
                format!(", the last {SHOWN_EVENTS}; FERRY_SIM_FULL=1 prints all")
            } else {
                String::new()
            }
        )?;
        for line in &self.schedule[skip..] {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimFailure {}

/// Runs one seed to quiescence, checking every invariant after every step.
pub fn run(seed: u64, config: &SimConfig) -> Result<Report, SimFailure> {
    world::World::new(seed, config).run()
}

/// Runs one seed like [`run`] and also returns its whole schedule, to read what a seed did
/// even when it passes.
pub fn trace(seed: u64, config: &SimConfig) -> (Result<Report, SimFailure>, Vec<String>) {
    let mut w = world::World::new(seed, config);
    let r = w.run();
    (r, w.schedule().to_vec())
}

/// The seeds to run: only `FERRY_SIM_SEED` if set, else `0..FERRY_SIM_SEEDS` if set, else
/// `0..default_count`.
pub fn seeds_from_env(default_count: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("FERRY_SIM_SEED") {
        return vec![seed];
    }
    let n = env_u64("FERRY_SIM_SEEDS").unwrap_or(default_count);
    (0..n).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Runs `seeds` on `threads` threads; returns the reports, or the failure of the lowest failing
/// seed (so a run says the same whatever the thread count).
pub fn run_many(
    seeds: &[u64],
    config: &SimConfig,
    threads: usize,
) -> Result<Vec<Report>, Box<SimFailure>> {
    let threads = threads.clamp(1, 64);
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let results: Vec<Vec<Result<Report, SimFailure>>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(chunk.len());
                    for &seed in chunk {
                        let r = run(seed, config);
                        let failed = r.is_err();
                        out.push(r);
                        if failed {
                            break;
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    vec![Err(SimFailure {
                        seed: u64::MAX,
                        invariant: "(panic)",
                        message: "a simulation thread panicked; rerun with one seed".into(),
                        schedule: vec![],
                    })]
                })
            })
            .collect()
    });
    let mut reports = Vec::new();
    let mut worst: Option<SimFailure> = None;
    for r in results.into_iter().flatten() {
        match r {
            Ok(rep) => reports.push(rep),
            Err(f) if worst.as_ref().is_none_or(|w| f.seed < w.seed) => worst = Some(f),
            Err(_) => {}
        }
    }
    match worst {
        Some(f) => Err(Box::new(f)),
        None => Ok(reports),
    }
}
