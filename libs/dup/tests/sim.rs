//! The deterministic shipping simulation (see `ferry_dup::sim`), over many seeds.
//!
//! - `sim_default_seeds`: the default run, a few thousand seeds.
//! - `stress_sim_many_seeds` (`#[ignore]`): 100k seeds, or `FERRY_SIM_SEEDS=N`.
//! - Either replays one seed alone with `FERRY_SIM_SEED=N`.

use std::time::Instant;

use ferry_dup::sim::{self, Report, SimConfig};

/// Seeds of the default run.
const DEFAULT_SEEDS: u64 = 5_000;
/// Seeds of the stress run.
const STRESS_SEEDS: u64 = 100_000;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run(default_count: u64) -> Vec<Report> {
    let seeds = sim::seeds_from_env(default_count);
    let started = Instant::now();
    let reports = match sim::run_many(&seeds, &SimConfig::default(), threads()) {
        Ok(r) => r,
        Err(f) => panic!("{f}"),
    };
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    eprintln!(
        "{} seeds in {:.2?}: {} records, {} faults, {} sessions, {} stale refusals, {} fenced \
         progress writes, {} batches, {} heartbeats, {} appends, {} ops skipped, {} uneven \
         restarts, {} uneven welcomes",
        reports.len(),
        started.elapsed(),
        sum(|r| r.records),
        sum(|r| r.faults),
        sum(|r| r.sessions),
        sum(|r| r.stale_refusals),
        sum(|r| r.fenced_writes),
        sum(|r| r.batches),
        sum(|r| r.heartbeats),
        sum(|r| r.appends),
        sum(|r| r.skipped_ops),
        sum(|r| r.uneven_restarts),
        sum(|r| r.uneven_welcomes),
    );
    assert_eq!(reports.len(), seeds.len(), "every seed ran");
    reports
}

#[test]
fn sim_default_seeds() {
    let reports = run(DEFAULT_SEEDS);
    if reports.len() > 100 {
        // The runs really exercise the faults they are meant to.
        let total = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
        assert!(
            total(|r| r.faults) > reports.len() as u64,
            "faults injected"
        );
        assert!(total(|r| r.stale_refusals) > 0, "stale shippers refused");
        assert!(
            total(|r| r.fenced_writes) > 0,
            "stale progress writes fenced"
        );
        assert!(total(|r| r.skipped_ops) > 0, "FAIL_SKIP skipped something");
        assert!(total(|r| r.heartbeats) > 0, "idle sessions sent heartbeats");
        assert!(
            total(|r| r.uneven_restarts) > 0,
            "receiver restarts found target partitions at different decrees"
        );
        assert!(
            total(|r| r.uneven_welcomes) > 0,
            "sessions opened over target partitions at different decrees"
        );
        assert!(
            total(|r| r.appends) < total(|r| r.batches),
            "queued batches were merged into fewer appends"
        );
    }
}

#[test]
#[ignore = "stress: run by name"]
fn stress_sim_many_seeds() {
    run(STRESS_SEEDS);
}

/// A seed is a schedule: running it again does exactly the same. With `FERRY_SIM_TRACE=1`
/// (and `FERRY_SIM_SEED=N`) the schedule is printed even when the seed passes.
#[test]
fn a_seed_replays_the_same_schedule() {
    let seeds = match std::env::var("FERRY_SIM_SEED") {
        Ok(_) => sim::seeds_from_env(0),
        Err(_) => (0..20).collect(),
    };
    for seed in seeds {
        let (first, schedule) = sim::trace(seed, &SimConfig::default());
        let (second, again) = sim::trace(seed, &SimConfig::default());
        assert_eq!(schedule, again, "seed {seed} replays differently");
        assert_eq!(first.is_ok(), second.is_ok());
        assert!(schedule.len() > 1, "seed {seed} did something");
        if std::env::var_os("FERRY_SIM_TRACE").is_some() {
            eprintln!("{}", schedule.join("\n"));
        }
    }
}
