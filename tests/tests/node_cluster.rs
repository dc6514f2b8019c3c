//! A node in a cluster: it checks its config against etcd, registers under a lease, waits for
//! its table to be placed on it before it opens the client port, refuses writes while the table
//! is `read_only`, keeps serving while etcd is down, and leaves the registry when killed.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use ferry_tests::cluster::{ClusterNode, NodeSpec};
use ferry_tests::etcd::{ferry, Coordinator, CoordinatorSpec, Etcd};

fn ferry_ok(c: &Coordinator, args: &[&str]) -> Result<String> {
    let out = ferry(&[c.addr], args)?;
    if !out.status.success() {
        bail!(
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` (bounded) until it returns `Some`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not happen within {timeout:?}")
}

fn set(con: &mut redis::Connection, k: &str, v: &str) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(k).arg(v).query(con)
}

#[test]
fn node_joins_serves_follows_table_state_and_leaves_when_killed() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    coord.wait_stage(&["leader"], Duration::from_secs(20))?;

    let spec = NodeSpec::default();
    let mut node = ClusterNode::spawn(&etcd, dir.path(), &spec)?;
    // Registered, waiting for its table, and the client port still closed.
    node.wait_stage("waiting_for_table", Duration::from_secs(20))?;
    let reg = etcd
        .get("/ferry/bj/nodes/bj-n1")?
        .context("the node is registered")?;
    let reg: serde_json::Value = serde_json::from_str(&reg)?;
    assert_eq!(reg["resp_addr"], node.resp.to_string());
    assert_eq!(reg["http_addr"], node.http.to_string());
    assert!(
        TcpStream::connect_timeout(&node.resp, Duration::from_millis(200)).is_err(),
        "the client port opens last"
    );

    assert_eq!(reg["table"], "users");

    // A table no node serves is refused, with what each node serves; nothing is created.
    let out = ferry(
        &[coord.addr],
        &["table", "create", "t2", "--partitions", "4"],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no node of cluster bj serves table `t2` (bj-n1 serves `users`)"),
        "{err}"
    );
    let tables = ferry_ok(&coord, &["table", "list"])?;
    assert!(!tables.contains("t2"), "{tables}");

    // The table is created and placed on the node: it opens its partitions, then serves.
    ferry_ok(&coord, &["table", "create", "users", "--partitions", "4"])?;
    node.wait_stage("serving", Duration::from_secs(20))?;
    let client = redis::Client::open(node.redis_url())?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    set(&mut con, "k1", "v1")?;

    // read_only: writes get a retryable error, reads still work; available: writes again.
    ferry_ok(&coord, &["table", "set-state", "users", "read_only"])?;
    let err = wait_for("writes refused", Duration::from_secs(10), || {
        set(&mut con, "k2", "v2").err()
    })?;
    assert_eq!(err.code(), Some("TRYAGAIN"), "{err}");
    assert!(err.to_string().contains("read-only"), "{err}");
    let v: String = redis::cmd("GET").arg("k1").query(&mut con)?;
    assert_eq!(v, "v1");
    let health = node.health()?;
    assert!(health["writes_refused"].as_str().is_some(), "{health}");
    ferry_ok(&coord, &["table", "set-state", "users", "available"])?;
    wait_for("writes accepted again", Duration::from_secs(10), || {
        set(&mut con, "k2", "v2").ok()
    })?;

    // etcd down: the node keeps serving; etcd back: the node is registered again.
    etcd.stop();
    for i in 0..100 {
        set(&mut con, &format!("during-outage-{i}"), "x")?;
    }
    std::thread::sleep(Duration::from_secs(3));
    set(&mut con, "after-3s-outage", "x")?;
    etcd.restart()?;
    wait_for("the node registered again", Duration::from_secs(20), || {
        etcd.get("/ferry/bj/nodes/bj-n1").ok().flatten()
    })?;
    assert_eq!(node.health()?["stage"], "serving");

    // kill -9: the registration disappears within the lease TTL (2s), plus etcd's lease
    // expiry granularity.
    node.proc.kill9();
    let killed = Instant::now();
    wait_for(
        "the dead node left the registry",
        Duration::from_secs(10),
        || {
            etcd.get("/ferry/bj/nodes/bj-n1")
                .ok()
                .filter(Option::is_none)
        },
    )?;
    let gone_after = killed.elapsed();
    eprintln!("registration gone {gone_after:?} after kill -9 (lease TTL 2s)");
    assert!(gone_after < Duration::from_secs(5), "{gone_after:?}");
    coord.proc.terminate(Duration::from_secs(10));
    Ok(())
}

#[test]
fn node_with_differing_config_refuses_to_start_naming_the_field() -> Result<()> {
    let etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    coord.wait_stage(&["leader"], Duration::from_secs(20))?;

    let spec = NodeSpec {
        group: "{ bj = 1, tj = 2 }".into(),
        name: "bj-n2".into(),
        ..NodeSpec::default()
    };
    let mut node = ClusterNode::spawn(&etcd, dir.path(), &spec)?;
    let (code, log) = node.wait_exit(Duration::from_secs(20))?;
    assert_ne!(code, 0);
    assert!(
        log.contains("config field `cluster.duplication_group` is {\"bj\":1,\"tj\":2} here but {\"bj\":1,\"sh\":3,\"tj\":2} in etcd key /ferry/bj/config"),
        "{log}"
    );

    let spec = NodeSpec {
        cluster_id: 7,
        group: "{ bj = 7, tj = 2, sh = 3 }".into(),
        name: "bj-n3".into(),
        ..NodeSpec::default()
    };
    let mut node = ClusterNode::spawn(&etcd, dir.path(), &spec)?;
    let (code, log) = node.wait_exit(Duration::from_secs(20))?;
    assert_ne!(code, 0);
    assert!(
        log.contains("config field `cluster.id` is 7 here but 1 in etcd key /ferry/bj/config"),
        "{log}"
    );
    // Neither registered.
    assert!(etcd.get_prefix("/ferry/bj/nodes/")?.is_empty());
    Ok(())
}

#[test]
fn node_started_while_etcd_is_down_waits_and_joins_when_it_returns() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    coord.wait_stage(&["leader"], Duration::from_secs(20))?;
    ferry_ok(&coord, &["table", "create", "users", "--partitions", "4"])?;
    etcd.stop();

    let mut node = ClusterNode::spawn(&etcd, dir.path(), &NodeSpec::default())?;
    // Bounded: it stays up, waiting, for as long as etcd is away (3 s here).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if let Some(status) = node.proc.child.try_wait()? {
            bail!(
                "the node exited with {status} while etcd was down: {}",
                node.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        node.log_text()
            .contains("etcd is unreachable; waiting for it"),
        "{}",
        node.log_text()
    );
    etcd.restart()?;
    node.wait_stage("serving", Duration::from_secs(60))?;
    let mut con = redis::Client::open(node.redis_url())?
        .get_connection_with_timeout(Duration::from_secs(5))?;
    set(&mut con, "k", "v")?;
    assert!(node.log_text().contains("etcd answers again; joined"));
    Ok(())
}
