//! A whole `ferry` CLI session against one real coordinator and a real etcd: tables, dups,
//! every status change, fail modes, removal; after each step the etcd key holds exactly the
//! documented JSON. Illegal transitions, unknown names and an unreachable coordinator are
//! refused with one sentence and a non-zero exit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use ferry_tests::etcd::{ferry, http_get, Coordinator, CoordinatorSpec, Etcd};
use ferry_tests::procs::{free_port, loopback};

/// Runs ferry and returns stdout; fails the test with stderr if it exits non-zero.
fn ok(c: SocketAddr, args: &[&str]) -> Result<String> {
    let out = ferry(&[c], args)?;
    if !out.status.success() {
        bail!(
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs ferry expecting a refusal; returns the single line it printed on stderr.
fn refused(c: SocketAddr, args: &[&str]) -> Result<String> {
    let out = ferry(&[c], args)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "ferry {args:?} should fail but printed {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "one sentence expected, got: {err}");
    Ok(err.trim_end().to_string())
}

fn json(c: SocketAddr, args: &[&str]) -> Result<Value> {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(c, &a)?).context("parse ferry --json output")
}

fn dup_json(remote: &str, status: &str, ts: u64, fail: &str, mode: &str, table: &str) -> String {
    format!(
        r#"{{"remote":"{remote}","status":"{status}","create_timestamp_ms":{ts},"fail_mode":"{fail}","mode":"{mode}","remote_table":"{table}"}}"#
    )
}

#[test]
fn cli_session_keeps_documented_json_in_etcd() -> Result<()> {
    let etcd = Etcd::start()?;
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(&etcd, dir.path(), "c1", &CoordinatorSpec::default())?;
    coord.wait_stage(&["leader"], Duration::from_secs(20))?;
    let c = coord.addr;

    // Status before anything: this coordinator leads.
    let st = json(c, &["status"])?;
    assert_eq!(st["cluster"], "bj");
    assert_eq!(st["leader"], c.to_string());
    assert_eq!(st["tables"], 0);
    let human = ok(c, &["status"])?;
    assert!(
        human.contains("COORDINATOR") && human.contains("leader"),
        "{human}"
    );

    // The stored cluster config, as the first coordinator wrote it.
    let cfg: Value = serde_json::from_str(&etcd.get("/ferry/bj/config")?.context("config key")?)?;
    assert_eq!(cfg["name"], "bj");
    assert_eq!(cfg["id"], 1);
    assert_eq!(cfg["duplication_group"]["tj"], 2);

    // A table created before any node registers waits in `creating`, partitions unplaced.
    let early = json(c, &["table", "create", "early", "-p", "2"])?;
    assert_eq!(early["state"], "creating");
    assert_eq!(
        etcd.get("/ferry/bj/tables/early/partitions/0")?.as_deref(),
        Some(r#"{"node":null}"#)
    );
    let refusal = refused(c, &["dup", "add", "-t", "early", "-c", "tj"])?;
    assert_eq!(
        refusal,
        "error: table early is creating; a dup can only be added to an available table"
    );

    // Nodes register (under a lease, as `node` does); the leader places `early` on them.
    etcd.register_node("bj", "n1", 120)?;
    etcd.register_node("bj", "n2", 120)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = json(c, &["table", "describe", "early"])?;
        if t["state"] == "available" {
            assert!(
                t["partitions"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().all(|p| p["node"].is_string())),
                "{t}"
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("table early was not placed within 15s: {t}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // A table created with nodes registered is placed round-robin at once.
    let out = ok(c, &["table", "create", "users", "-p", "4"])?;
    assert_eq!(out, "created table users (id 2, 4 partitions, available)\n");
    let users = json(c, &["table", "describe", "users"])?;
    let ts = users["create_timestamp_ms"].as_u64().context("create ts")?;
    assert_eq!(
        etcd.get("/ferry/bj/tables/users")?.as_deref(),
        Some(
            format!(
                r#"{{"id":2,"partition_count":4,"state":"available","create_timestamp_ms":{ts}}}"#
            )
            .as_str()
        )
    );
    for (p, node) in [(0, "n1"), (1, "n2"), (2, "n1"), (3, "n2")] {
        assert_eq!(
            etcd.get(&format!("/ferry/bj/tables/users/partitions/{p}"))?,
            Some(format!(r#"{{"node":"{node}"}}"#)),
            "partition {p}"
        );
    }
    let list = ok(c, &["table", "list"])?;
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("NAME   ID  PARTITIONS  STATE"),
        "{list}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("users  2   4           available")),
        "{list}"
    );
    assert!(refused(c, &["table", "create", "users", "-p", "4"])?
        .contains("table users already exists"));

    // Table states: read_only (nodes refuse writes) and back.
    assert_eq!(
        ok(c, &["table", "set-state", "users", "read_only"])?,
        "table users is now read_only\n"
    );
    assert_eq!(
        etcd.get("/ferry/bj/tables/users")?.as_deref(),
        Some(
            format!(
                r#"{{"id":2,"partition_count":4,"state":"read_only","create_timestamp_ms":{ts}}}"#
            )
            .as_str()
        )
    );
    assert_eq!(
        refused(c, &["dup", "add", "-t", "users", "-c", "tj"])?,
        "error: table users is read_only; a dup can only be added to an available table"
    );
    ok(c, &["table", "set-state", "users", "available"])?;
    // `creating` is not something an operator can set (a usage error, exit code 2).
    let out = ferry(&[c], &["table", "set-state", "users", "creating"])?;
    assert_eq!(out.status.code(), Some(2));

    // Incremental dup: DS_INIT → DS_LOG at once.
    let d = json(c, &["dup", "add", "-t", "users", "-c", "tj"])?;
    let dupid = d["dupid"].as_u64().context("dupid")?;
    let dts = d["create_timestamp_ms"].as_u64().context("ts")?;
    assert!(
        dupid >= dts / 1000,
        "dupid is the creation time in seconds or later"
    );
    let key = format!("/ferry/bj/dups/users/{dupid}");
    let id = dupid.to_string();
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_LOG",
            dts,
            "FAIL_SLOW",
            "incremental",
            "users"
        ))
    );

    let listed = ok(c, &["dup", "list", "-t", "users"])?;
    assert!(listed.starts_with("DUPID"), "{listed}");
    let row = listed.lines().nth(1).context("one dup row")?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..6],
        &[
            id.as_str(),
            "tj",
            "DS_LOG",
            "FAIL_SLOW",
            "incremental",
            "users"
        ]
    );

    // Pause, pause again (a repeat is a no-op), start.
    assert_eq!(
        ok(c, &["dup", "pause", "-t", "users", "-d", &id])?,
        format!("dup {id} of table users is now DS_PAUSE\n")
    );
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_PAUSE",
            dts,
            "FAIL_SLOW",
            "incremental",
            "users"
        ))
    );
    ok(c, &["dup", "pause", "-t", "users", "-d", &id])?;
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_PAUSE",
            dts,
            "FAIL_SLOW",
            "incremental",
            "users"
        ))
    );
    ok(c, &["dup", "start", "-t", "users", "-d", &id])?;
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_LOG",
            dts,
            "FAIL_SLOW",
            "incremental",
            "users"
        ))
    );
    // Start on DS_LOG repeats PAUSE→LOG: a no-op, not an error.
    ok(c, &["dup", "start", "-t", "users", "-d", &id])?;
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_LOG",
            dts,
            "FAIL_SLOW",
            "incremental",
            "users"
        ))
    );

    // Fail modes.
    assert_eq!(
        ok(
            c,
            &["dup", "set-fail-mode", "-t", "users", "-d", &id, "skip"]
        )?,
        format!("dup {id} of table users now has fail mode FAIL_SKIP\n")
    );
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_LOG",
            dts,
            "FAIL_SKIP",
            "incremental",
            "users"
        ))
    );
    ok(
        c,
        &["dup", "set-fail-mode", "-t", "users", "-d", &id, "fast"],
    )?;
    assert_eq!(
        etcd.get(&key)?,
        Some(dup_json(
            "tj",
            "DS_LOG",
            dts,
            "FAIL_FAST",
            "incremental",
            "users"
        ))
    );

    // Remotes must be in the duplication group and configured; one live dup per remote.
    assert_eq!(
        refused(c, &["dup", "add", "-t", "users", "-c", "gz"])?,
        "error: cluster gz is not in the duplication group (bj, sh, tj); add it to cluster.duplication_group on every process of both clusters first"
    );
    assert_eq!(
        refused(c, &["dup", "add", "-t", "users", "-c", "sh"])?,
        "error: cluster sh is not a configured remote cluster (tj); add it to [remote_clusters] in the coordinator config first"
    );
    assert!(refused(c, &["dup", "add", "-t", "users", "-c", "bj"])?.contains("to itself"));
    assert_eq!(
        refused(c, &["dup", "add", "-t", "users", "-c", "tj"])?,
        format!(
            "error: table users already has dup {id} to cluster tj; remove it first to add another"
        )
    );

    // Full dup: the remote side must be asked first (its target table must not exist); with
    // tj's coordinator unreachable it is refused with a sentence and nothing is recorded.
    let e = refused(c, &["dup", "add", "-t", "early", "-c", "tj", "--full"])?;
    assert!(
        e.starts_with("error: cannot check table `early` on cluster tj: cannot reach a coordinator at http://127.0.0.1:1"),
        "{e}"
    );
    assert!(e.ends_with("retry when its coordinator answers"), "{e}");
    assert!(
        etcd.get_prefix("/ferry/bj/dups/early")?.is_empty(),
        "a refused full dup leaves nothing in etcd"
    );
    let e = json(c, &["dup", "add", "-t", "early", "-c", "tj"])?;
    let fid = e["dupid"].as_u64().context("dupid")?.to_string();

    // Unknown names.
    assert_eq!(
        refused(c, &["dup", "list", "-t", "nope"])?,
        "error: table nope does not exist; see `ferry table list`"
    );
    assert_eq!(
        refused(c, &["dup", "pause", "-t", "users", "-d", "42"])?,
        "error: dup 42 of table users does not exist; see `ferry dup list -t users`"
    );
    assert!(refused(c, &["table", "describe", "nope"])?.contains("table nope does not exist"));

    // Pegasus's HTTP view.
    let (code, body) = http_get(c, "/meta/app/duplication?name=users")?;
    assert_eq!(code, 200, "{body}");
    let peg: Value = serde_json::from_str(&body)?;
    assert_eq!(peg["app_name"], "users");
    assert_eq!(peg["duplications"][0]["dupid"], dupid);
    assert_eq!(peg["duplications"][0]["status"], "DS_LOG");

    // Remove deletes the dup's whole subtree, progress included (written here as a shipper would).
    etcd.ctl(&[
        "put",
        &format!("{key}/progress/0"),
        r#"{"confirmed_decree":7,"last_confirmed_timestamp_ms":1}"#,
    ])?;
    assert_eq!(
        ok(c, &["dup", "remove", "-t", "users", "-d", &id])?,
        format!("removed dup {id} of table users\n")
    );
    assert_eq!(etcd.get(&key)?, None);
    assert!(
        etcd.get_prefix(&format!("{key}/"))?.is_empty(),
        "progress removed with the dup"
    );
    assert!(refused(c, &["dup", "remove", "-t", "users", "-d", &id])?.contains("does not exist"));
    assert!(
        ok(c, &["dup", "list", "-t", "users"])?.lines().count() == 1,
        "only the header is left"
    );

    // Drop: refused while a dup exists, then allowed.
    assert_eq!(
        refused(c, &["table", "drop", "early"])?,
        format!("error: table early still has duplication(s) {fid}; remove them first with `ferry dup remove -t early -d DUPID`")
    );
    ok(c, &["table", "drop", "users"])?;
    assert!(
        etcd.get_prefix("/ferry/bj/tables/users")?.is_empty(),
        "table and partitions dropped"
    );

    // `etcdctl get --prefix /ferry/` reads as documented: every key in a documented family,
    // every value JSON.
    let all = etcd.get_prefix("/ferry/")?;
    assert!(!all.is_empty());
    for (k, v) in &all {
        let rest = k
            .strip_prefix("/ferry/bj/")
            .context("every key under /ferry/bj/")?;
        let family = rest.split('/').next().unwrap_or_default();
        assert!(
            [
                "config",
                "nodes",
                "tables",
                "dups",
                "election",
                "seq",
                "failover",
                "state_acks",
                "checked"
            ]
            .contains(&family),
            "undocumented key {k}"
        );
        if family != "election" {
            serde_json::from_str::<Value>(v).with_context(|| format!("{k} holds JSON"))?;
        }
    }

    // Metrics.
    let (code, metrics) = http_get(c, "/metrics")?;
    assert_eq!(code, 200);
    assert!(metrics.contains("coordinator_is_leader 1"), "{metrics}");
    assert!(
        metrics.contains("coordinator_admin_requests_total"),
        "{metrics}"
    );

    // A coordinator that cannot be reached.
    let nobody = loopback(free_port());
    let out = ferry(&[nobody], &["table", "list"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: cannot reach a coordinator at http://{nobody} (connection refused)"
        )),
        "{err}"
    );

    coord
        .proc
        .terminate(Duration::from_secs(10))
        .context("coordinator exits on SIGTERM")?;
    Ok(())
}
