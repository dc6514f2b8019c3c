//! Running ferry's real binaries from tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::etcd::http_get;

/// Path of a workspace binary built in the same profile as the running test.
///
/// Tests live in `target/<profile>/deps/`; binaries in `target/<profile>/`.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // Tests live in target/<profile>/deps, `bench` beside the binaries in target/<profile>.
    let parent = exe.parent().expect("a binary lives in a directory");
    let dir = if parent.file_name().is_some_and(|n| n == "deps") {
        parent.parent().expect("target/<profile>/deps has a parent")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --release --workspace --bins` \
         (scripts/test.sh does this)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (the OS picks it; another process could still take it, so
/// callers retry start-up on "address in use"). Never one this process was given before: the
/// OS may hand a just-released port out again, and two addresses of one process must differ.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no loopback port that this process was not given already, after 1000 tries")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts TCP connections on `addr`, or the child exits, or `timeout`.
pub fn wait_for_port(addr: SocketAddr, child: &mut Child, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("process exited with {status} before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listened on {addr} within {timeout:?}")
}

/// Spawns `cmd`, a ferry binary, with `--config config` and `RUST_LOG` (this process's, or
/// `info`), its standard error (where it logs) appended to `log`.
pub fn spawn_logged(name: &str, mut cmd: Command, config: &Path, log: &Path) -> Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open the log {}", log.display()))?;
    cmd.arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    Proc::spawn(name, &mut cmd)
}

/// Waits until `/health` on `http` reports `stage`, or fails once the process exited or
/// `timeout` passed, with what `log()` returns (the process's log) in the error.
pub fn wait_health(
    proc: &mut Proc,
    http: SocketAddr,
    stage: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let want = format!(r#""stage":"{stage}""#);
    while Instant::now() < deadline {
        if let Some(status) = proc.child.try_wait()? {
            bail!("{} exited with {status}: {}", proc.name, log());
        }
        if let Ok((200, body)) = http_get(http, "/health") {
            if body.contains(&want) {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} did not report `{stage}` within {timeout:?}: {}",
        proc.name,
        log()
    )
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit; SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY-free: `kill` via the command line keeps this crate free of unsafe code.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `node`: one table of `partitions` partitions in `data_dir`.
pub struct Node {
    pub proc: Proc,
    pub resp: SocketAddr,
    pub http: SocketAddr,
}

impl Node {
    /// Starts a node on fresh loopback ports and waits until its client port is open.
    pub fn start(data_dir: &Path, partitions: u32, extra: &[&str]) -> Result<Node> {
        let mut last_err = None;
        for _ in 0..5 {
            let (resp, http) = (loopback(free_port()), loopback(free_port()));
            let mut cmd = Command::new(bin_path("node"));
            cmd.arg("--data-dir")
                .arg(data_dir)
                .args(["--partitions", &partitions.to_string(), "--cluster-id", "1"])
                .args([
                    "--resp-addr",
                    &resp.to_string(),
                    "--http-addr",
                    &http.to_string(),
                ])
                .args(extra)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                );
            let mut proc = Proc::spawn("node", &mut cmd)?;
            match wait_for_port(resp, &mut proc.child, Duration::from_secs(60)) {
                Ok(()) => return Ok(Node { proc, resp, http }),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("node did not start")))
    }

    pub fn redis_url(&self) -> String {
        format!("redis://{}/", self.resp)
    }
}
