//! A stale shipper, still connected after losing its election, is refused by the receiver.
//!
//! Two real shipper processes of `bj`, A and B, on the same node (same plog, same certificate),
//! campaign for every (dup, partition). A leads and ships under a client write load; B waits.
//! A is frozen (SIGSTOP) past its lease TTL: its leader keys expire, B wins every election with a
//! newer revision (fencing token), connects to the receiver and preempts A's sessions there,
//! while A's QUIC connection stays open (the freeze is kept well under the 30 s idle timeout).
//!
//! When A resumes it still believes it leads: its lease keeper has not run yet. To make sure
//! the receiver, not etcd, is what stops A, A talks to etcd through a relay that the test cuts
//! just before A resumes (a paused process whose network blips as it wakes: the worst case for
//! fencing). A's lease keeper then needs a whole renewal timeout (`lease_ttl / 3`) to give up,
//! and its fenced progress writes cannot reach etcd either. Meanwhile the receiver refuses A
//! with `STALE_FENCING_TOKEN`, over the connection A had all along: A's old session, woken by
//! new commits, sends into the stream the receiver stopped, fails, and 100 ms later A sends a
//! new `Hello` with its old token, which the receiver refuses (or, if A reads the receiver's
//! `Error` frame on the old session first, it is refused right there). If the freeze happens to
//! catch A's keeper waiting for a renewal answer, the keeper gives up at once on resume and the
//! test fails saying so; that window is about one etcd round trip in every `lease_ttl / 3`.
//!
//! Checked: the receiver ended A's sessions because B's newer token took over; A stops every
//! partition because the receiver refused it as stale; A confirms nothing past what the receiver
//! had when B took over and ships nothing afterwards; B keeps leading every partition; the
//! confirmed decrees in etcd never go backwards (sampled throughout) and end at the source's
//! committed decrees; the target holds every acknowledged write.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use ferry_tests::dup::{check_written, metric, wait_converged, TwoClusters, Writer};
use ferry_tests::etcd::{http_get, Etcd};
use ferry_tests::procs::Proc;

const TABLE: &str = "users";
const PARTITIONS: u32 = 2;
/// Both sides close a QUIC connection silent for 30 s; A must be back well before that for the
/// test to be about a shipper that is still connected.
const MAX_FREEZE: Duration = Duration::from_secs(20);

#[test]
fn a_stale_shipper_still_connected_after_losing_its_election_is_refused_by_the_receiver(
) -> Result<()> {
    let mut w = TwoClusters::start(TABLE, PARTITIONS, PARTITIONS)?;
    // Only A and B ship bj: the harness's shipper goes before the dup exists.
    if let Some(mut s) = w.bj.shipper.take() {
        s.terminate(Duration::from_secs(10));
    }
    let gate = Gate::start(etcd_addr(&w.etcd)?)?;
    let (a, a_http) =
        w.bj.spawn_extra_shipper("shipper-a", Some(&gate.endpoint()))?;
    let dupid = w.bj.add_dup(TABLE, "tj")?;
    let mut progress = ProgressWatch::new(&w.etcd, dupid);
    let writer = Writer::start(&w.bj, "s:", Duration::from_millis(5))?;

    // A leads and ships every partition.
    let a_tokens = wait_for("A to lead and ship every partition", 60, || {
        progress.sample()?;
        let rows = rows(a_http)?;
        Ok(per_partition(&rows, |r| {
            (r["state"] == "shipping" && r["confirmed_decree"].as_u64() > Some(0))
                .then(|| r["fencing_token"].as_u64())
                .flatten()
        }))
    })?;
    eprintln!("A leads with fencing tokens {a_tokens:?}");

    // B starts and waits for the elections A holds.
    let (b, b_http) = w.bj.spawn_extra_shipper("shipper-b", None)?;
    wait_for("B to campaign for every partition", 30, || {
        progress.sample()?;
        let rows = rows(b_http)?;
        Ok(per_partition(&rows, |r| {
            (r["state"] == "campaigning").then_some(())
        }))
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let still = per_partition(&rows(a_http)?, |r| r["fencing_token"].as_u64());
    assert_eq!(still, Some(a_tokens.clone()), "A still leads while B waits");

    // Freeze A past its lease TTL.
    let receiver_log_from = w.tj.log_text("receiver").len();
    let a_log_from = w.bj.log_text("shipper-a").len();
    signal(&a, "STOP")?;
    let frozen = Instant::now();

    // B wins every election with a newer token, and ships.
    let b_started = wait_for("B to lead and ship every partition", 15, || {
        progress.sample()?;
        let rows = rows(b_http)?;
        Ok(per_partition(&rows, |r| {
            let p = r["partition"].as_u64()? as usize;
            let token = r["fencing_token"].as_u64()?;
            (r["state"] == "shipping" && token > a_tokens[p])
                .then(|| (token, r["confirmed_decree"].as_u64().unwrap_or(0)))
        }))
    })?;
    let b_tokens: Vec<u64> = b_started.iter().map(|(t, _)| *t).collect();
    eprintln!("B leads with fencing tokens {b_tokens:?}");
    wait_for(
        "B's confirmed decrees to advance while A is frozen",
        15,
        || {
            progress.sample()?;
            let rows = rows(b_http)?;
            Ok(per_partition(&rows, |r| {
                let p = r["partition"].as_u64()? as usize;
                (r["confirmed_decree"].as_u64()? > b_started[p].1).then_some(())
            }))
        },
    )?;
    // The receiver ended A's open sessions: B's newer token took over.
    let takeovers = wait_for("the receiver to end A's sessions for B's", 10, || {
        let log = w.tj.log_text("receiver");
        let log = log.get(receiver_log_from..).unwrap_or_default();
        Ok((0..PARTITIONS)
            .map(|p| {
                let needle = format!(
                    "took over partition {p} of table `{TABLE}`; this session (token {})",
                    a_tokens[p as usize]
                );
                log.lines().find(|l| l.contains(&needle)).map(str::to_owned)
            })
            .collect::<Option<Vec<_>>>())
    })?;
    for l in &takeovers {
        eprintln!("receiver: {l}");
    }
    // A's QUIC endpoint (one UDP socket for all its connections) as the receiver saw it.
    let a_peer = takeovers
        .iter()
        .map(|l| l.split([' ', '{', '}']).find(|f| f.starts_with("peer=")))
        .collect::<Option<Vec<_>>>()
        .context("the peer of A's sessions in the receiver's log")?;
    assert!(
        a_peer.iter().all(|p| *p == a_peer[0]),
        "A's sessions came from one endpoint: {a_peer:?}"
    );
    let a_peer = a_peer[0].to_owned();
    let freeze = frozen.elapsed();
    assert!(
        freeze < MAX_FREEZE,
        "A was frozen for {freeze:?}: its QUIC connection may have timed out, so it would not be \
         the still-connected shipper this test is about"
    );

    // A resumes, cut off from etcd: only the receiver can tell it that it no longer leads.
    gate.close();
    signal(&a, "CONT")?;
    eprintln!("A resumed after {freeze:?} frozen");
    let fenced = wait_for("A to stop every partition", 30, || {
        progress.sample()?;
        let log = w.bj.log_text("shipper-a");
        let log = log.get(a_log_from..).unwrap_or_default();
        Ok((0..PARTITIONS)
            .map(|p| {
                let tag = format!(" partition={p} ");
                log.lines()
                    .find(|l| l.contains("lost the shipping election") && l.contains(&tag))
                    .map(str::to_owned)
            })
            .collect::<Option<Vec<_>>>())
    })?;
    let a_log = w.bj.log_text("shipper-a");
    for l in a_log.get(a_log_from..).unwrap_or_default().lines() {
        if l.contains(" WARN ") || l.contains(" ERROR ") {
            eprintln!("A: {l}");
        }
    }
    for (p, l) in fenced.iter().enumerate() {
        assert!(
            l.contains("stale_fencing_token") && l.contains(&format!("token {}", b_tokens[p])),
            "A stopped partition {p} for another reason than the receiver's refusal: {l}"
        );
    }
    // A was refused over the connection it had before the freeze: it never connected again.
    let receiver_log = w.tj.log_text("receiver");
    let reconnect = format!("shipper connected {a_peer} ");
    assert!(
        !receiver_log
            .get(receiver_log_from..)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&reconnect)),
        "A ({a_peer}) connected to the receiver again, so it was not refused as a shipper that \
         stayed connected"
    );
    assert_eq!(
        metric(a_http, "dup_shipper_is_leader")?,
        0.0,
        "A leads nothing"
    );
    // A confirmed nothing past what the receiver held when B's session opened.
    let b_log = w.bj.log_text("shipper-b");
    let a_rows = rows(a_http)?;
    for p in 0..PARTITIONS {
        let welcome = first_welcome(&b_log, p)
            .with_context(|| format!("B's first session on partition {p} in its log"))?;
        let a_confirmed = per_partition(&a_rows, |r| r["confirmed_decree"].as_u64())
            .context("A's rows")?[p as usize];
        eprintln!("partition {p}: A confirmed {a_confirmed}, B started after {welcome}");
        assert!(
            a_confirmed <= welcome,
            "A confirmed decree {a_confirmed} of partition {p}, past the {welcome} the receiver \
             held when B took over"
        );
    }
    let a_shipped = metric(a_http, "dup_shipped_ops_total")?;

    // etcd back for A: it campaigns again, and waits, for B keeps leading; A ships nothing.
    gate.open();
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        progress.sample()?;
        let a_rows = rows(a_http)?;
        let b_rows = rows(b_http)?;
        for (p, b_token) in b_tokens.iter().enumerate() {
            let a_row = row(&a_rows, p)?;
            let b_row = row(&b_rows, p)?;
            assert!(
                a_row["state"] != "shipping" && a_row["fencing_token"].is_null(),
                "A ships partition {p} again: {a_row}"
            );
            assert!(
                b_row["fencing_token"].as_u64() == Some(*b_token) && b_row["state"] == "shipping",
                "B no longer leads partition {p}: {b_row}"
            );
        }
        assert_eq!(metric(a_http, "dup_shipped_ops_total")?, a_shipped);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "receiver: {} Hello(s) refused as stale",
        metric(
            w.tj.receiver_http,
            "receiver_sessions_rejected_total{reason=\"stale_fencing_token\"}"
        )?
    );

    // Every acknowledged write reached the target.
    let acked = writer.stop()?;
    let entries = wait_converged(&w.bj, &w.tj, Duration::from_secs(120))?;
    eprintln!("{acked} acknowledged writes; both clusters hold {entries} entries");
    assert_eq!(entries, acked);
    check_written(&w.tj, "s:", acked)?;
    // And the confirmed decrees in etcd, never lower than before, reach the committed ones.
    let committed: Vec<u64> = w.bj.digest()?["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["committed_decree"].as_u64())
        .collect();
    wait_for(
        "etcd's confirmed decrees to reach the committed ones",
        20,
        || {
            let now = progress.sample()?;
            Ok((now == committed).then_some(()))
        },
    )?;
    eprintln!(
        "confirmed decrees {committed:?} in etcd; {} samples, never lower than before",
        progress.samples
    );
    drop((a, b));
    Ok(())
}

/// Polls `f` every 200 ms for up to `secs` seconds until it gives `Some`.
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("gave up waiting {secs}s for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A shipper's `/replica/duplication` rows.
fn rows(http: SocketAddr) -> Result<Vec<Value>> {
    let (status, body) = http_get(http, "/replica/duplication")?;
    if status != 200 {
        bail!("/replica/duplication on {http} answered {status}: {body}");
    }
    let v: Value = serde_json::from_str(&body).context("parse /replica/duplication")?;
    Ok(v["duplications"].as_array().cloned().unwrap_or_default())
}

/// The row of partition `p`.
fn row(rows: &[Value], p: usize) -> Result<&Value> {
    rows.iter()
        .find(|r| r["partition"].as_u64() == Some(p as u64))
        .with_context(|| format!("no row for partition {p} in {rows:?}"))
}

/// `f` of every partition's row, in partition order, if there is a row for each and `f` gives
/// `Some` for each.
fn per_partition<T>(rows: &[Value], f: impl Fn(&Value) -> Option<T>) -> Option<Vec<T>> {
    (0..PARTITIONS as usize)
        .map(|p| row(rows, p).ok().and_then(&f))
        .collect()
}

/// The confirmed decree in the `Welcome` of the first session B's log shows for partition `p`
/// (`session started ... welcome=N`).
fn first_welcome(log: &str, p: u32) -> Option<u64> {
    let tag = format!(" partition={p} ");
    let line = log
        .lines()
        .find(|l| l.contains("session started") && l.contains(&tag))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("welcome="))?
        .parse()
        .ok()
}

/// Sends `kill -<sig>` to a process (the tests crate has no unsafe code for `libc::kill`).
fn signal(p: &Proc, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(p.pid().to_string())
        .status()
        .context("run kill")?;
    if !status.success() {
        bail!("kill -{sig} {} failed: {status}", p.name);
    }
    Ok(())
}

fn etcd_addr(etcd: &Etcd) -> Result<SocketAddr> {
    let url = etcd.endpoint();
    url.trim_start_matches("http://")
        .parse()
        .with_context(|| format!("etcd's endpoint {url} is not http://ip:port"))
}

/// Reads every partition's confirmed decree from etcd and fails if one is lower than the last
/// time it was read.
struct ProgressWatch<'a> {
    etcd: &'a Etcd,
    prefix: String,
    last: Vec<u64>,
    samples: u64,
}

impl<'a> ProgressWatch<'a> {
    fn new(etcd: &'a Etcd, dupid: u64) -> ProgressWatch<'a> {
        ProgressWatch {
            etcd,
            prefix: format!("/ferry/bj/dups/{TABLE}/{dupid}/progress/"),
            last: vec![0; PARTITIONS as usize],
            samples: 0,
        }
    }

    /// The confirmed decrees now (0 where none is stored yet).
    fn sample(&mut self) -> Result<Vec<u64>> {
        let mut now = vec![0; PARTITIONS as usize];
        for (key, value) in self.etcd.get_prefix(&self.prefix)? {
            let p: usize = key
                .strip_prefix(&self.prefix)
                .and_then(|p| p.parse().ok())
                .filter(|p| *p < now.len())
                .with_context(|| format!("unexpected progress key {key}"))?;
            let v: Value = serde_json::from_str(&value)
                .with_context(|| format!("parse progress {key}: {value}"))?;
            now[p] = v["confirmed_decree"]
                .as_u64()
                .with_context(|| format!("no confirmed_decree in {key}: {value}"))?;
        }
        for (p, (now, last)) in now.iter().zip(&self.last).enumerate() {
            if now < last {
                bail!(
                    "the confirmed decree of partition {p} in etcd went back from {last} to {now}"
                );
            }
        }
        self.last.clone_from(&now);
        self.samples += 1;
        Ok(now)
    }
}

/// A TCP relay in front of etcd that the test can close: closed, it forwards nothing (the bytes
/// wait in the socket buffers) and resets nothing, as when the path to etcd is cut. Stops when
/// dropped.
struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Gate {
    fn start(target: SocketAddr) -> Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the etcd relay")?;
        listener.set_nonblocking(true)?;
        let gate = Gate {
            addr: listener.local_addr()?,
            open: Arc::new(AtomicBool::new(true)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (open, stop) = (gate.open.clone(), gate.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                for (from, to) in [(client, s2), (server, c2)] {
                    let (open, stop) = (open.clone(), stop.clone());
                    std::thread::spawn(move || pump(from, to, &open, &stop));
                }
            }
        });
        Ok(gate)
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        // A read in progress forwards what it got; let it finish.
        std::thread::sleep(Duration::from_millis(200));
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` while the gate is open, until either end closes or the gate stops.
fn pump(mut from: TcpStream, mut to: TcpStream, open: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_nonblocking(false);
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        if !open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
