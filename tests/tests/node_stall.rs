//! No stalls: while one client pipelines slow reads (GETs of a 20 MiB value), another client's
//! PINGs are answered promptly and the node keeps its etcd registration (its lease keep-alive
//! runs on the same runtime as the connections). Reads run on a bounded pool of their own, so a
//! runtime thread never spends milliseconds in RocksDB.
//!
//! The PING latencies are reported, not asserted (the machines are shared and noisy); what is
//! asserted is that every PING is answered, every slow read returns the whole value, and the
//! registration made before the load is still the one in etcd after it.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use ferry_tests::cluster::{ClusterNode, NodeSpec};
use ferry_tests::etcd::{ferry, Coordinator, CoordinatorSpec, Etcd};

const BIG: usize = 20 << 20;
const SLOW_READS: usize = 60;
const SMALL_READS: usize = 3000;

fn registered_at(etcd: &Etcd) -> Result<u64> {
    let reg = etcd
        .get("/ferry/bj/nodes/bj-n1")?
        .context("the node is registered")?;
    let reg: serde_json::Value = serde_json::from_str(&reg)?;
    reg["registered_at_ms"]
        .as_u64()
        .context("registered_at_ms in the registration")
}

#[test]
fn slow_reads_of_one_client_do_not_stall_another_or_the_lease() -> Result<()> {
    let etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    coord.wait_stage(&["leader"], Duration::from_secs(20))?;
    let out = ferry(
        &[coord.addr],
        &["table", "create", "users", "--partitions", "4"],
    )?;
    ensure!(out.status.success(), "{out:?}");
    let spec = NodeSpec {
        lease_ttl: "2s",
        ..NodeSpec::default()
    };
    let mut node = ClusterNode::spawn(&etcd, dir.path(), &spec)?;
    node.wait_stage("serving", Duration::from_secs(30))?;

    // A 20 MiB value (compressible, so each read also decompresses it) among small keys.
    let client = redis::Client::open(node.redis_url())?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let big: Vec<u8> = (0..BIG).map(|i| b"ferry-"[i % 6]).collect();
    redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query::<()>(&mut con)?;
    for i in 0..200 {
        redis::cmd("SET")
            .arg(format!("small-{i}"))
            .arg("v".repeat(100))
            .query::<()>(&mut con)?;
    }
    drop(con);
    // A restart flushes RocksDB: the reads below come from SST and blob files, not the memtable.
    let (resp, http) = (node.resp, node.http);
    node.proc.terminate(Duration::from_secs(20));
    let mut node = ClusterNode::spawn_at(&etcd, dir.path(), &spec, resp, http)?;
    node.wait_stage("serving", Duration::from_secs(30))?;
    let before = registered_at(&etcd)?;

    let url = node.redis_url();
    let slow = std::thread::spawn(move || -> Result<(usize, usize)> {
        let mut con = redis::Client::open(url)?.get_connection()?;
        let mut pipe = redis::pipe();
        for _ in 0..SLOW_READS {
            pipe.cmd("GET").arg("big");
        }
        let values: Vec<Vec<u8>> = pipe.query(&mut con)?;
        let whole = values.iter().filter(|v| v.len() == BIG).count();
        let mut pipe = redis::pipe();
        for i in 0..SMALL_READS {
            pipe.cmd("GET").arg(format!("small-{}", i % 200));
        }
        let small: Vec<Option<String>> = pipe.query(&mut con)?;
        Ok((whole, small.iter().filter(|v| v.is_some()).count()))
    });

    let mut ping = redis::Client::open(node.redis_url())?.get_connection()?;
    let mut latencies = Vec::new();
    let start = Instant::now();
    while !slow.is_finished() && start.elapsed() < Duration::from_secs(120) {
        let t = Instant::now();
        let pong: String = redis::cmd("PING").query(&mut ping)?;
        latencies.push(t.elapsed());
        ensure!(pong == "PONG", "{pong}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (whole, small) = slow
        .join()
        .map_err(|_| anyhow::anyhow!("the slow client panicked"))??;
    let load = start.elapsed();
    ensure!(
        whole == SLOW_READS,
        "{whole} of {SLOW_READS} GETs returned the whole value"
    );
    ensure!(
        small == SMALL_READS,
        "{small} of {SMALL_READS} small GETs found their key"
    );
    ensure!(
        !latencies.is_empty(),
        "PINGs were sent during the slow reads"
    );

    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "during {load:?} of slow reads: {} PINGs, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    // The lease survived: the registration is the one made before the load, not a new one.
    ensure!(
        registered_at(&etcd)? == before,
        "the node registered again: its lease expired during the slow reads"
    );
    ensure!(node.health()?["stage"] == "serving");
    node.proc.terminate(Duration::from_secs(20));
    coord.proc.terminate(Duration::from_secs(10));
    Ok(())
}
