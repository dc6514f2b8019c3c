//! Start-up config checks: a coordinator whose cluster config differs from the one stored in
//! etcd refuses to start and names the field and both values; an invalid file is refused with
//! the key named; the running leader is unaffected.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use ferry_tests::etcd::{ferry, Coordinator, CoordinatorSpec, Etcd};

/// Waits (bounded) for the process to exit; returns its exit code and log.
fn wait_exit(c: &mut Coordinator, timeout: Duration) -> Result<(i32, String)> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = c.proc.child.try_wait()? {
            return Ok((status.code().unwrap_or(-1), c.log_text()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the coordinator did not exit within {timeout:?}: {}",
        c.log_text()
    )
}

#[test]
fn differing_config_refuses_to_start_naming_the_field() -> Result<()> {
    let etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut first = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    first.wait_stage(&["leader"], Duration::from_secs(20))?;
    let stored = etcd
        .get("/ferry/bj/config")?
        .context("the first coordinator stores the config")?;

    // A different duplication group.
    let spec = CoordinatorSpec {
        group: "{ bj = 1, tj = 2 }".into(),
        ..CoordinatorSpec::default()
    };
    let mut other = Coordinator::spawn(&etcd, dir.path(), "c2", &spec)?;
    let (code, log) = wait_exit(&mut other, Duration::from_secs(20))?;
    assert_ne!(code, 0);
    assert!(
        log.contains("config field `cluster.duplication_group` is {\"bj\":1,\"tj\":2} here but {\"bj\":1,\"sh\":3,\"tj\":2} in etcd key /ferry/bj/config"),
        "{log}"
    );

    // A different cluster id (and a group that agrees with it, so the file itself is valid).
    let spec = CoordinatorSpec {
        cluster_id: 5,
        group: "{ bj = 5, tj = 2, sh = 3 }".into(),
        ..CoordinatorSpec::default()
    };
    let mut other = Coordinator::spawn(&etcd, dir.path(), "c3", &spec)?;
    let (code, log) = wait_exit(&mut other, Duration::from_secs(20))?;
    assert_ne!(code, 0);
    assert!(
        log.contains("config field `cluster.id` is 5 here but 1 in etcd key /ferry/bj/config"),
        "{log}"
    );

    // An invalid file is refused before etcd is even asked, naming the key.
    let spec = CoordinatorSpec {
        lease_ttl: "1s",
        ..CoordinatorSpec::default()
    };
    let mut bad = Coordinator::spawn(&etcd, dir.path(), "c4", &spec)?;
    let (code, log) = wait_exit(&mut bad, Duration::from_secs(20))?;
    assert_ne!(code, 0);
    assert!(
        log.contains("config key `coordinator.lease_ttl` is 1s; use between 2s and 600s"),
        "{log}"
    );

    // The stored config is untouched and the first coordinator still leads and serves.
    assert_eq!(
        etcd.get("/ferry/bj/config")?.as_deref(),
        Some(stored.as_str())
    );
    assert_eq!(first.stage()?, "leader");
    let out = ferry(&[first.addr], &["table", "list"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    first
        .proc
        .terminate(Duration::from_secs(10))
        .context("clean exit")?;
    Ok(())
}
