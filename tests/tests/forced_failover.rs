//! Unplanned failover on real processes: the source cluster is killed under load with part of
//! its writes not shipped yet; `ferry failover --force` on the target promotes it and reports,
//! per source partition, the last write it applied. When the old source comes back it never
//! takes a write (it learns it was demoted first), and `--recover` ships every write the target
//! missed: in the end no acknowledged write is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _, Result};

use ferry_proto::partition_of;
use ferry_tests::dup::{Cluster, TwoClusters};

const TABLE: &str = "users";
const PARTITIONS: u32 = 4;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn failover_view(c: &Cluster) -> Result<serde_json::Value> {
    let out = c.ferry_ok(&["--json", "failover", "-t", TABLE, "--status"])?;
    serde_json::from_str(&out).context("parse failover --status --json")
}

/// One client writing unique keys `w<i>` to `c` until stopped or refused; every acked key with
/// the time of its ack (µs since the epoch).
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, u64)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(c: &Cluster) -> Result<Writer> {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut con = c.redis()?;
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 200 000 writes, and it stops at the first refusal (the source
            // is killed under it).
            for i in 0..200_000u32 {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let key = format!("w{i}");
                let r: redis::RedisResult<()> =
                    redis::cmd("SET").arg(&key).arg("old").query(&mut con);
                match r {
                    Ok(()) => a.lock().expect("lock").push((key, now_us())),
                    Err(_) => return,
                }
            }
        });
        Ok(Writer {
            stop,
            acked,
            thread,
        })
    }

    fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Waits (bounded) until `n` more writes were acked.
    fn wait_more(&self, n: usize) -> Result<()> {
        let want = self.count() + n;
        let start = Instant::now();
        while self.count() < want {
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "the writer got {} acks, not {want}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn stop(self) -> Vec<(String, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        std::mem::take(&mut *self.acked.lock().expect("lock"))
    }
}

/// Writes to `c` from the moment its client port opens until stopped: every write that was
/// taken (it must be none), and how many were refused.
struct Prober {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    taken: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Prober {
    fn start(c: &Cluster) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let taken = Arc::new(Mutex::new(Vec::new()));
        let url = c.node.redis_url();
        let (s, r, t) = (stop.clone(), refused.clone(), taken.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut con = None;
            let mut i = 0u64;
            // Bounded by time: two minutes at most.
            while !s.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                if con.is_none() {
                    con = redis::Client::open(url.as_str())
                        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                        .ok();
                    if con.is_none() {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                }
                let Some(c) = con.as_mut() else { continue };
                i += 1;
                let key = format!("probe{i}");
                let res: redis::RedisResult<()> = redis::cmd("SET").arg(&key).arg("x").query(c);
                match res {
                    Ok(()) => t.lock().expect("lock").push(key),
                    Err(e) if e.code() == Some("TRYAGAIN") => {
                        r.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => con = None,
                }
            }
        });
        Prober {
            stop,
            refused,
            taken,
            thread,
        }
    }

    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let taken = std::mem::take(&mut *self.taken.lock().expect("lock"));
        (self.refused.load(Ordering::Relaxed), taken)
    }
}

fn get(con: &mut redis::Connection, key: &str) -> Result<Option<String>> {
    Ok(redis::cmd("GET").arg(key).query(con)?)
}

#[test]
fn forced_failover_reports_its_window_and_recover_loses_nothing() -> Result<()> {
    let mut w = TwoClusters::start(TABLE, PARTITIONS, PARTITIONS)?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    let dupid = w.bj.add_dup(TABLE, "tj")?;

    // Load on bj; part of it ships, then the shipper dies (a lagging dup), then bj dies whole.
    let writer = Writer::start(&w.bj)?;
    writer.wait_more(300)?;
    let mut tcon = w.tj.redis()?;
    let start = Instant::now();
    while get(&mut tcon, "w200")?.is_none() {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "tj never got bj's first writes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(mut s) = w.bj.shipper.take() {
        s.kill9();
    }
    writer.wait_more(300)?;
    w.bj.node.proc.kill9();
    w.bj.coordinator.proc.kill9();
    let acked = writer.stop();
    eprintln!("bj acked {} writes before it was killed", acked.len());

    // tj takes over by force, and reports what it applied from bj.
    let out =
        w.tj.ferry_ok(&["failover", "-t", TABLE, "--to", "tj", "--force"])?;
    eprintln!("ferry failover --force on tj:\n{out}");
    let v = failover_view(&w.tj)?;
    ensure!(v["state"] == "available", "tj: {v}");
    let r = &v["record"];
    ensure!(r["forced"] == true && r["step"] == "done", "tj: {v}");
    let mut window: HashMap<u32, (u64, u64)> = HashMap::new();
    for a in r["applied"].as_array().context("applied")? {
        let p = a["partition"].as_u64().context("partition")? as u32;
        let d = a["decree"].as_u64().context("decree")?;
        let t = a["timestamp_us"].as_u64().context("timestamp")?;
        window.insert(p, (d, t));
    }
    ensure!(
        window.len() == PARTITIONS as usize,
        "the report names {} source partitions, not {PARTITIONS}: {v}",
        window.len()
    );

    // Every acked write missing on tj is inside the reported window: acked after the last
    // applied write of its partition.
    let mut missing: Vec<&(String, u64)> = Vec::new();
    for kv in &acked {
        if get(&mut tcon, &kv.0)?.is_none() {
            missing.push(kv);
        }
    }
    ensure!(
        !missing.is_empty(),
        "every write reached tj before bj died; the test has no window to check"
    );
    let mut missing_per: HashMap<u32, u64> = HashMap::new();
    for (key, acked_at) in &missing {
        let p = partition_of(key.as_bytes(), PARTITIONS).0;
        let (decree, at) = window[&p];
        ensure!(
            *acked_at >= at,
            "{key} (partition {p}) is missing on tj but was acked at {acked_at} µs, before the \
             reported window of that partition (decree {decree}, written at {at} µs)"
        );
        *missing_per.entry(p).or_default() += 1;
    }
    eprintln!(
        "{} acked writes missing on tj, all inside the reported window",
        missing.len()
    );

    // The new primary takes writes; one of them overwrites a key bj wrote in the window.
    let overwritten = missing[0].0.clone();
    redis::cmd("SET")
        .arg(&overwritten)
        .arg("new")
        .query::<()>(&mut tcon)?;
    for i in 0..100 {
        redis::cmd("SET")
            .arg(format!("n{i}"))
            .arg("v")
            .query::<()>(&mut tcon)?;
    }

    // bj comes back: it must not take a single write, from the moment its port opens.
    w.bj.kill_and_respawn_node(&w.etcd)?;
    let prober = Prober::start(&w.bj);
    w.bj.coordinator.respawn(&w.etcd)?;
    w.bj.coordinator
        .wait_stage(&["leader"], Duration::from_secs(60))?;
    w.bj.start_shipper()?;
    let start = Instant::now();
    let v = loop {
        let v = failover_view(&w.bj)?;
        if v["state"] == "demoted" && v["record"]["step"] == "done" {
            break v;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "bj did not learn it was demoted: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(v["record"]["forced"] == true, "bj: {v}");
    eprintln!(
        "bj learned it was demoted:\n{}",
        w.bj.ferry_ok(&["failover", "-t", TABLE, "--status"])?
    );

    let out = w.bj.ferry_ok(&["failover", "-t", TABLE, "--recover"])?;
    eprintln!("ferry failover --recover on bj:\n{out}");
    let v = failover_view(&w.bj)?;
    ensure!(v["record"]["step"] == "recovered", "bj: {v}");
    let recovered: Vec<u64> = v["record"]["recovered"]
        .as_array()
        .context("recovered")?
        .iter()
        .filter_map(|n| n.as_u64())
        .collect();
    for (p, n) in &missing_per {
        ensure!(
            recovered.get(*p as usize).is_some_and(|r| r >= n),
            "partition {p}: {n} acked writes were missing, recover reports {recovered:?}"
        );
    }

    // Every acked write is on tj now (applied shortly after it was confirmed), except the one
    // tj overwrote later, which keeps tj's value (last writer wins).
    let start = Instant::now();
    loop {
        let mut absent = 0;
        for (key, _) in &acked {
            if key != &overwritten && get(&mut tcon, key)?.as_deref() != Some("old") {
                absent += 1;
            }
        }
        if absent == 0 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "{absent} acked writes of bj are still not on tj after --recover"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        get(&mut tcon, &overwritten)?.as_deref() == Some("new"),
        "{overwritten}: tj's later write must win over bj's recovered one"
    );

    let (refused, taken) = prober.stop();
    ensure!(
        taken.is_empty(),
        "bj took {} writes after it came back: {:?}",
        taken.len(),
        &taken[..taken.len().min(5)]
    );
    ensure!(refused > 0, "the prober never reached bj's client port");
    eprintln!(
        "dup {dupid}: every acked write is on tj; bj refused all {refused} writes after it came back; recovered {recovered:?}"
    );
    Ok(())
}
