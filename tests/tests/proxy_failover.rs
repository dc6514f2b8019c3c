//! `ferry proxy` across planned failovers, on real processes: one client writes through the
//! proxy while the table's writes move bj → tj and back, and sees nothing but retryable
//! errors; every write it was told succeeded is on the new primary, read straight from that
//! node; the proxy switched by itself and logged each switch.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

use ferry_tests::dup::{Cluster, TwoClusters};
use ferry_tests::procs::{bin_path, free_port, loopback, wait_for_port, Proc};

const TABLE: &str = "users";

/// `ferry proxy -t users` for bj and tj (in that order) on a free loopback port, its output
/// (the start-up line and the log) in `log`. Returns once it accepts clients.
fn start_proxy(w: &TwoClusters, log: &Path) -> Result<(Proc, String)> {
    let endpoint = w.etcd.endpoint();
    let mut last = None;
    for _ in 0..5 {
        let addr = loopback(free_port());
        let out = File::create(log).context("create the proxy's log")?;
        let mut cmd = Command::new(bin_path("ferry"));
        cmd.args(["proxy", "-t", TABLE, "--listen", &addr.to_string()])
            .args(["--cluster", &format!("bj={endpoint}")])
            .args(["--cluster", &format!("tj={endpoint}")])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let mut proxy = Proc::spawn("ferry proxy", &mut cmd)?;
        match wait_for_port(addr, &mut proxy.child, Duration::from_secs(30)) {
            Ok(()) => return Ok((proxy, format!("redis://{addr}/"))),
            Err(e) => last = Some(e.context(std::fs::read_to_string(log).unwrap_or_default())),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("the proxy did not start")))
}

/// What the client saw.
#[derive(Debug, Default)]
struct Seen {
    /// Acknowledged keys (the value is the key) and when each was acknowledged.
    acked: Vec<(String, Instant)>,
    /// Every error, as (code, message).
    errors: Vec<(Option<String>, String)>,
}

/// One client writing unique keys `<prefix><i>` through the proxy, one at a time, until told
/// to stop or `limit` passed. A refused key is tried again after 5 ms.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Writer {
    fn start(url: &str, prefix: &str, limit: Duration) -> Result<Writer> {
        let mut con = redis::Client::open(url)?
            .get_connection_with_timeout(Duration::from_secs(5))
            .context("connect to the proxy")?;
        con.set_read_timeout(Some(Duration::from_secs(10)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, prefix) = (stop.clone(), prefix.to_string());
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let end = Instant::now() + limit;
            let mut i = 0u64;
            // Bounded: at most one write or one 5 ms pause per turn, and the loop ends at `end`.
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                let key = format!("{prefix}{i}");
                let r: redis::RedisResult<()> =
                    redis::cmd("SET").arg(&key).arg(&key).query(&mut con);
                match r {
                    Ok(()) => {
                        seen.acked.push((key, Instant::now()));
                        i += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        let broken = e.is_io_error() || e.is_connection_dropped();
                        seen.errors
                            .push((e.code().map(str::to_string), e.to_string()));
                        if broken {
                            return seen;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            seen
        });
        Ok(Writer { stop, thread })
    }

    fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| Seen {
            errors: vec![(None, "the writer thread panicked".into())],
            ..Seen::default()
        })
    }
}

/// Runs `ferry failover` on `from` while a writer writes through the proxy, then keeps writing
/// until the proxy took writes after the failover ended (bounded); checks what the writer saw,
/// and that every acknowledged key reads back from `to`'s node. Returns the writer's record.
fn failover_through_proxy(
    proxy_url: &str,
    from: &Cluster,
    to: &Cluster,
    prefix: &str,
    extra: &[&str],
) -> Result<Seen> {
    let writer = Writer::start(proxy_url, prefix, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(2));
    let mut args = vec!["failover", "-t", TABLE, "--to", to.name.as_str()];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let out = from.ferry_ok(&args)?;
    let ended = Instant::now();
    eprintln!(
        "failover {} -> {} in {:?}:\n{out}",
        from.name,
        to.name,
        ended - started
    );
    ensure!(out.contains("step done"), "{out}");
    // Two more seconds of writes, so that some land after the failover ended.
    std::thread::sleep(Duration::from_secs(2));
    let seen = writer.stop();
    let before = seen.acked.iter().filter(|(_, at)| *at < started).count();
    let after = seen.acked.iter().filter(|(_, at)| *at > ended).count();
    let tryagain = seen.errors.len();
    eprintln!(
        "{} acked writes through the proxy: {before} before the failover, {after} after it; {tryagain} errors",
        seen.acked.len()
    );
    if let Some((_, first)) = seen.errors.first() {
        eprintln!("first error: {first}");
    }
    if let Some((_, last)) = seen.errors.last() {
        eprintln!("last error:  {last}");
    }
    // (1) Nothing but retryable errors.
    let other: Vec<&String> = seen
        .errors
        .iter()
        .filter(|(code, _)| code.as_deref() != Some("TRYAGAIN"))
        .map(|(_, m)| m)
        .collect();
    ensure!(
        other.is_empty(),
        "the client got errors that are not TRYAGAIN: {other:?}"
    );
    // (2) The proxy switched by itself: writes went on after the failover.
    ensure!(
        before > 0 && after > 0,
        "acked {before} writes before the failover and {after} after it"
    );
    // (3) Every acknowledged write is on the new primary, read from its node directly.
    check_on(to, &seen)?;
    Ok(seen)
}

/// Every key of `seen` reads back, with its value, from `c`'s node (not through the proxy).
fn check_on(c: &Cluster, seen: &Seen) -> Result<()> {
    let mut con = c.redis()?;
    for chunk in seen.acked.chunks(500) {
        let keys: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con)?;
        for (key, value) in keys.iter().zip(got) {
            if value.as_deref() != Some(*key) {
                bail!(
                    "acknowledged write {key} reads {value:?} from {}'s node",
                    c.name
                );
            }
        }
    }
    Ok(())
}

#[test]
fn a_client_through_the_proxy_follows_failover_and_failback() -> Result<()> {
    let w = TwoClusters::start(TABLE, 4, 4)?;
    w.tj.ferry_ok(&["table", "set-state", TABLE, "demoted"])?;
    w.bj.add_dup(TABLE, "tj")?;
    let log = w.dir.path().join("proxy.log");
    let (_proxy, url) = start_proxy(&w, &log)?;
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        text.contains(&format!("proxy for table {TABLE} on"))
            && text.contains("; primary: bj (node bj-n1 at"),
        "{text}"
    );

    // bj -> tj, adding the dup back for the failback.
    let a = failover_through_proxy(&url, &w.bj, &w.tj, "a", &["--reverse"])?;
    // tj -> bj: every write of both rounds is on bj (the first round's through the dup back).
    let b = failover_through_proxy(&url, &w.tj, &w.bj, "b", &[])?;
    check_on(&w.bj, &a)?;

    // (4) The proxy logged both switches.
    let text = std::fs::read_to_string(&log)?;
    for switch in ["primary of users: bj → tj", "primary of users: tj → bj"] {
        ensure!(
            text.contains(switch),
            "the proxy's log lacks `{switch}`:\n{text}"
        );
    }
    check_pipeline_and_bad_input(&url)?;
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("primary")).collect();
    eprintln!("the proxy's output:\n{}", lines.join("\n"));
    // Logged at debug (RUST_LOG=ferry_coordinator::proxy=debug): commands sent again after
    // a refusal from the demoted side.
    eprintln!(
        "resent after a switch: {} times",
        text.matches("sending again").count()
    );
    eprintln!(
        "{} + {} acked writes through the proxy, all on the new primary",
        a.acked.len(),
        b.acked.len()
    );
    Ok(())
}

/// A pipeline comes back in order; commands nodes lack are refused with a sentence; bytes that
/// are not RESP get a protocol error and close that connection only.
fn check_pipeline_and_bad_input(url: &str) -> Result<()> {
    let mut con = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(5))?;
    con.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut p = redis::pipe();
    for i in 0..200 {
        p.cmd("SET").arg(format!("p{i}")).arg(i).ignore();
        p.cmd("INCR").arg(format!("p{i}"));
        p.cmd("GET").arg(format!("p{i}"));
    }
    let got: Vec<i64> = p.query(&mut con)?;
    let want: Vec<i64> = (0..200).flat_map(|i| [i + 1, i + 1]).collect();
    ensure!(got == want, "pipelined replies out of order: {got:?}");
    let e = redis::cmd("MULTI")
        .query::<()>(&mut con)
        .expect_err("MULTI is refused");
    ensure!(e.to_string().contains("no transactions"), "{e}");

    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let mut raw = std::net::TcpStream::connect(addr)?;
    raw.set_read_timeout(Some(Duration::from_secs(10)))?;
    use std::io::{Read as _, Write as _};
    raw.write_all(b"*1\r\n$4\r\nPING\r\n*2\r\n$x\r\n")?;
    let mut answer = String::new();
    raw.read_to_string(&mut answer)?;
    ensure!(
        answer.starts_with("+PONG\r\n-ERR Protocol error"),
        "{answer:?}"
    );
    let pong: String = redis::cmd("PING").query(&mut con)?;
    ensure!(pong == "PONG", "{pong}");
    Ok(())
}
