//! etcd goes away and comes back: the coordinator neither crashes nor spins, steps down when
//! it cannot renew its lease, answers admin calls with a clear error meanwhile, and leads again
//! with all metadata once etcd is back.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use ferry_tests::etcd::{ferry, Coordinator, CoordinatorSpec, Etcd};

#[test]
fn coordinator_survives_etcd_restart() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut c = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    c.wait_stage(&["leader"], Duration::from_secs(20))?;
    // A node registered under a lease (as `node` does), so that the table is placed at once.
    etcd.register_node("bj", "n1", 300)?;
    let out = ferry(&[c.addr], &["table", "create", "users", "-p", "2"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry(
        &[c.addr],
        &["dup", "add", "-t", "users", "-c", "tj", "--json"],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dup: Value = serde_json::from_slice(&out.stdout)?;
    let dupid = dup["dupid"].as_u64().context("dupid")?;

    etcd.stop();

    // It notices, steps down within the lease TTL, and keeps answering /health.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = c.health()?;
        if h["stage"] == "campaigning" && h["etcd_error"].is_string() {
            assert!(
                h["etcd_error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("unreachable"),
                "{h}"
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("the coordinator did not report etcd down and step down within 15s: {h}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Admin calls fail with one sentence, not a hang.
    let t = Instant::now();
    let out = ferry(&[c.addr], &["dup", "list", "-t", "users"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("etcd at http://127.0.0.1:") && err.contains("is unreachable"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "answered in {:?}",
        t.elapsed()
    );

    // No spinning: over 5 seconds with etcd down it uses well under a second of CPU.
    let cpu0 = c.cpu_time()?;
    std::thread::sleep(Duration::from_secs(5));
    let used = c.cpu_time()? - cpu0;
    assert!(
        used < Duration::from_millis(1000),
        "used {used:?} of CPU in 5s while etcd was down"
    );
    assert!(
        c.proc.child.try_wait()?.is_none(),
        "the coordinator must not exit: {}",
        c.log_text()
    );

    // etcd comes back: it leads again and the metadata is all there.
    etcd.restart()?;
    c.wait_stage(&["leader"], Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let list = loop {
        let out = ferry(&[c.addr], &["dup", "list", "-t", "users", "--json"])?;
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout)?;
        }
        if Instant::now() > deadline {
            bail!(
                "admin API did not recover within 20s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(list[0]["dupid"], dupid);
    assert_eq!(list[0]["status"], "DS_LOG");
    assert!(c.health()?["etcd_error"].is_null());
    c.proc
        .terminate(Duration::from_secs(10))
        .context("clean exit")?;
    Ok(())
}
