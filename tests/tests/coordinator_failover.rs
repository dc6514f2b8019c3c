//! Three coordinators of one cluster: one leads, two stand by and forward admin calls to it.
//! `kill -9` the leader: a standby takes over within the lease TTL (plus the time to notice),
//! serves the admin API, and no dup metadata is lost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use ferry_tests::etcd::{ferry, Coordinator, CoordinatorSpec, Etcd};

const LEASE_TTL: Duration = Duration::from_secs(3);

fn ok_json(cs: &[SocketAddr], args: &[&str]) -> Result<Value> {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ferry(cs, &a)?;
    if !out.status.success() {
        bail!(
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parse ferry --json")
}

/// The index of the one coordinator whose /health says `leader`, waiting (bounded) for it.
fn leader_of(cs: &[&Coordinator], timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let leaders: Vec<usize> = cs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.stage().is_ok_and(|s| s == "leader"))
            .map(|(i, _)| i)
            .collect();
        match leaders.as_slice() {
            [one] => return Ok(*one),
            [] => {}
            many => bail!(
                "{} coordinators claim to lead at once: {many:?}",
                many.len()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("no coordinator became leader within {timeout:?}")
}

#[test]
fn standby_takes_over_within_lease_ttl_without_losing_dups() -> Result<()> {
    let etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let spec = CoordinatorSpec {
        lease_ttl: "3s",
        ..CoordinatorSpec::default()
    };
    let mut coords = [
        Coordinator::start(&etcd, dir.path(), "c1", &spec)?,
        Coordinator::start(&etcd, dir.path(), "c2", &spec)?,
        Coordinator::start(&etcd, dir.path(), "c3", &spec)?,
    ];
    let leader = leader_of(&coords.iter().collect::<Vec<_>>(), Duration::from_secs(20))?;
    let standbys: Vec<SocketAddr> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| coords[i].addr)
        .collect();

    // Every standby reports the leader on /health.
    for i in (0..3).filter(|i| *i != leader) {
        let h = coords[i].health()?;
        assert_eq!(h["stage"], "campaigning");
        assert_eq!(h["leader"], coords[leader].addr.to_string());
    }

    // Admin calls sent to a standby are forwarded to the leader.
    etcd.register_node("bj", "n1", 120)?;
    let s0 = &standbys[..1];
    ok_json(s0, &["table", "create", "users", "-p", "3"])?;
    let d = ok_json(s0, &["dup", "add", "-t", "users", "-c", "tj"])?;
    let dupid = d["dupid"].as_u64().context("dupid")?;
    ok_json(
        s0,
        &["dup", "pause", "-t", "users", "-d", &dupid.to_string()],
    )?;
    let d2 = ok_json(s0, &["dup", "add", "-t", "users", "-c", "tj"]);
    assert!(
        d2.is_err(),
        "a second dup to tj is refused through the standby too"
    );
    let key = format!("/ferry/bj/dups/users/{dupid}");
    let before = etcd.get(&key)?.context("dup stored")?;
    assert!(before.contains(r#""status":"DS_PAUSE""#), "{before}");
    let status = ok_json(s0, &["status"])?;
    assert_eq!(
        status["coordinators"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );

    // kill -9 the leader.
    let killed = coords[leader].addr;
    coords[leader].proc.kill9();
    let t0 = Instant::now();

    // A standby serves the admin API within the lease TTL (plus renew period and slack).
    let mut served = None;
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(list) = ok_json(&standbys, &["dup", "list", "-t", "users"]) {
            served = Some((t0.elapsed(), list));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (elapsed, list) = served.context("no standby served within 30s")?;
    assert!(
        elapsed < LEASE_TTL + Duration::from_secs(3),
        "took {elapsed:?} to serve after the leader died; the lease TTL is {LEASE_TTL:?}"
    );
    eprintln!("standby served {elapsed:?} after kill -9 of the leader");

    // Nothing lost: the same dup, same status, same JSON in etcd.
    assert_eq!(list[0]["dupid"], dupid);
    assert_eq!(list[0]["status"], "DS_PAUSE");
    assert_eq!(etcd.get(&key)?.as_deref(), Some(before.as_str()));

    // Exactly one of the survivors leads, and it is not the dead one; writes go through it.
    let survivors: Vec<&Coordinator> = coords.iter().filter(|c| c.addr != killed).collect();
    let new_leader = leader_of(&survivors, Duration::from_secs(10))?;
    assert_ne!(survivors[new_leader].addr, killed);
    let started = ok_json(
        &standbys,
        &["dup", "start", "-t", "users", "-d", &dupid.to_string()],
    )?;
    assert_eq!(started["status"], "DS_LOG");
    assert!(etcd
        .get(&key)?
        .context("dup")?
        .contains(r#""status":"DS_LOG""#));

    for c in coords.iter_mut().filter(|c| c.addr != killed) {
        c.proc
            .terminate(Duration::from_secs(10))
            .context("clean exit on SIGTERM")?;
    }
    Ok(())
}
