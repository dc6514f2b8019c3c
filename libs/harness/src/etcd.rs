//! A private etcd for tests, and the coordinator processes that use it.
//!
//! [`Etcd::start`] runs the distribution's `etcd` on two free loopback ports with a temporary
//! data dir; it is killed when dropped. [`Etcd::stop`] and [`Etcd::restart`] keep the ports and
//! the data, so a test can take etcd away and bring it back. [`Etcd::get`] and
//! [`Etcd::get_prefix`] read keys through `etcdctl`, exactly as an operator would.
//!
//! [`Coordinator`] runs the real `coordinator` binary against it, and [`ferry`] the real CLI.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::{bin_path, free_port, loopback, spawn_logged, wait_for_port, Proc};

/// A running (or stopped) private etcd.
pub struct Etcd {
    proc: Option<Proc>,
    place: crate::netns::Place,
    client: SocketAddr,
    peer: SocketAddr,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data dir and waits until it answers.
    pub fn start() -> Result<Etcd> {
        Etcd::start_in(&crate::netns::Place::local())
    }

    /// Starts etcd in `place` (on its address, free ports picked here), waits until it answers.
    pub fn start_in(place: &crate::netns::Place) -> Result<Etcd> {
        let mut last = None;
        for _ in 0..5 {
            let mut etcd = Etcd {
                proc: None,
                place: place.clone(),
                client: SocketAddr::new(place.ip, free_port()),
                peer: SocketAddr::new(place.ip, free_port()),
                dir: tempfile::tempdir().context("make etcd's temporary dir")?,
            };
            match etcd.spawn() {
                Ok(()) => return Ok(etcd),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    /// The place (namespace) etcd runs in; the cluster's other processes run there too.
    pub fn place(&self) -> &crate::netns::Place {
        &self.place
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Stops etcd (SIGTERM, then SIGKILL); the data dir and ports are kept.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// `etcdctl get KEY --print-value-only`: the value, or `None` if the key does not exist.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.ctl(&["get", key, "--print-value-only"])?;
        let v = out.trim_end_matches('\n');
        Ok((!v.is_empty()).then(|| v.to_string()))
    }

    /// `etcdctl get --prefix PREFIX`: every (key, value) under the prefix, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = self.ctl(&["get", "--prefix", prefix])?;
        let lines: Vec<&str> = out.lines().collect();
        if !lines.len().is_multiple_of(2) {
            bail!("etcdctl printed an odd number of lines for prefix {prefix}: {out}");
        }
        Ok(lines
            .chunks(2)
            .map(|kv| (kv[0].to_string(), kv[1].to_string()))
            .collect())
    }

    /// Registers node `name` of `cluster` the way a `node` does: its JSON under
    /// `/ferry/<cluster>/nodes/<name>`, bound to a fresh lease of `ttl_secs`. Returns the lease id.
    pub fn register_node(&self, cluster: &str, name: &str, ttl_secs: u32) -> Result<String> {
        let out = self.ctl(&["lease", "grant", &ttl_secs.to_string()])?;
        // "lease 694d7b1a2c3e4f01 granted with TTL(120s)"
        let id = out
            .split_whitespace()
            .nth(1)
            .context("read the lease id")?
            .to_string();
        let value = format!(
            r#"{{"name":"{name}","resp_addr":"127.0.0.1:1","receiver_addr":null,"http_addr":null,"registered_at_ms":1}}"#
        );
        self.ctl(&[
            "put",
            &format!("/ferry/{cluster}/nodes/{name}"),
            &value,
            &format!("--lease={id}"),
        ])?;
        Ok(id)
    }

    /// Runs `etcdctl --endpoints <this etcd> ARGS` and returns its standard output.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .context("run etcdctl (install the etcd-client package)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self) -> Result<()> {
        let (client, peer) = (
            format!("http://{}", self.client),
            format!("http://{}", self.peer),
        );
        let mut cmd = self.place.command("etcd");
        cmd.args(["--name", "ferry-test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("ferry-test={peer}")])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("etcd.log"))
                    .context("create etcd.log")?,
            ));
        let mut proc = Proc::spawn("etcd", &mut cmd)
            .context("spawn etcd (install the etcd-server package)")?;
        wait_for_port(self.client, &mut proc.child, Duration::from_secs(20))?;
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("etcd on {} did not become healthy within 20s", self.client)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }
}

/// A `coordinator` process with its own config file.
pub struct Coordinator {
    /// The process (killed on drop).
    pub proc: Proc,
    /// Its admin address.
    pub addr: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its standard error, where it logs.
    pub log: PathBuf,
}

/// What to put in a coordinator's config.
#[derive(Debug, Clone)]
pub struct CoordinatorSpec {
    /// `cluster.name`.
    pub cluster: String,
    /// `cluster.id`.
    pub cluster_id: u8,
    /// `cluster.duplication_group`, as TOML inline table text, e.g. `{ bj = 1, tj = 2 }`.
    pub group: String,
    /// `[remote_clusters]` entries, e.g. `tj = ["127.0.0.1:1"]`.
    pub remotes: Vec<String>,
    /// `coordinator.lease_ttl`.
    pub lease_ttl: &'static str,
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        CoordinatorSpec {
            cluster: "bj".into(),
            cluster_id: 1,
            group: "{ bj = 1, tj = 2, sh = 3 }".into(),
            remotes: vec![r#"tj = ["127.0.0.1:1"]"#.into()],
            lease_ttl: "3s",
        }
    }
}

impl Coordinator {
    /// Writes a config into `dir` and starts a coordinator named `id`, without waiting.
    pub fn spawn(etcd: &Etcd, dir: &Path, id: &str, spec: &CoordinatorSpec) -> Result<Coordinator> {
        Coordinator::spawn_at(etcd, dir, id, spec, loopback(free_port()))
    }

    /// Like [`Coordinator::spawn`], listening on `addr`.
    pub fn spawn_at(
        etcd: &Etcd,
        dir: &Path,
        id: &str,
        spec: &CoordinatorSpec,
        addr: SocketAddr,
    ) -> Result<Coordinator> {
        let config = dir.join(format!("{id}.toml"));
        let text = format!(
            "[cluster]\nname = \"{}\"\nid = {}\nduplication_group = {}\n\n\
             [coordinator]\nid = \"{id}\"\nlisten = \"{addr}\"\nlease_ttl = \"{}\"\n\
             etcd_timeout = \"1s\"\nreconnect_backoff_max = \"1s\"\nreconcile_interval = \"500ms\"\n\n\
             [etcd]\nendpoints = [\"{}\"]\n\n[remote_clusters]\n{}\n",
            spec.cluster,
            spec.cluster_id,
            spec.group,
            spec.lease_ttl,
            etcd.endpoint(),
            spec.remotes.join("\n"),
        );
        std::fs::write(&config, text).context("write the coordinator config")?;
        let log = dir.join(format!("{id}.log"));
        let cmd = etcd.place().command(bin_path("coordinator"));
        let proc = spawn_logged(id, cmd, &config, &log)?;
        Ok(Coordinator {
            proc,
            addr,
            config,
            log,
        })
    }

    /// kill -9, then a start on the same address and config (its log goes on), without
    /// waiting.
    pub fn respawn(&mut self, etcd: &Etcd) -> Result<()> {
        self.proc.kill9();
        let id = self
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "coordinator".into());
        let cmd = etcd.place().command(bin_path("coordinator"));
        self.proc = spawn_logged(&id, cmd, &self.config, &self.log)?;
        Ok(())
    }

    /// Starts a coordinator and waits until its `/health` reports at least `campaigning`.
    pub fn start(etcd: &Etcd, dir: &Path, id: &str, spec: &CoordinatorSpec) -> Result<Coordinator> {
        let mut c = Coordinator::spawn(etcd, dir, id, spec)?;
        c.wait_stage(&["campaigning", "leader"], Duration::from_secs(30))?;
        Ok(c)
    }

    /// `/health`'s JSON.
    pub fn health(&self) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.addr, "/health")?;
        if status != 200 {
            bail!("/health answered {status}: {body}");
        }
        serde_json::from_str(&body).context("parse /health")
    }

    /// The stage `/health` reports, e.g. `leader`.
    pub fn stage(&self) -> Result<String> {
        Ok(self.health()?["stage"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Waits (bounded) until `/health` reports one of `stages`.
    pub fn wait_stage(&mut self, stages: &[&str], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("(no answer)");
        while Instant::now() < deadline {
            if let Some(status) = self.proc.child.try_wait()? {
                bail!("coordinator exited with {status}: {}", self.log_text());
            }
            if let Ok(s) = self.stage() {
                if stages.contains(&s.as_str()) {
                    return Ok(s);
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("coordinator stayed in stage {last} for {timeout:?}, not {stages:?}")
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Total CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.proc.pid()))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // The kernel's USER_HZ is 100 on every Linux this runs on.
        Ok(Duration::from_millis(ticks * 10))
    }
}

/// Runs the real `ferry` CLI against `coordinators` (comma-joined) and returns its output.
pub fn ferry(coordinators: &[SocketAddr], args: &[&str]) -> Result<Output> {
    let list: Vec<String> = coordinators.iter().map(|a| a.to_string()).collect();
    Command::new(bin_path("ferry"))
        .arg("--coordinator")
        .arg(list.join(","))
        .args(args)
        .output()
        .context("run ferry")
}

/// A minimal HTTP/1.1 GET (the tests crate has no HTTP client): `(status, body)`.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http(addr, "GET", path, "")
}

/// A minimal HTTP/1.1 request with a text body: `(status, body)`.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    http_within(addr, method, path, body, Duration::from_secs(5))
}

/// [`http`], waiting at most `timeout` for the answer (a digest of a large table takes a while).
pub fn http_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("read the HTTP status line")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Configures failpoint `name` of the process whose HTTP port is `addr` (`actions` as for
/// `fail::cfg`, e.g. `return`, `return(enospc)`, `off`), or removes it with `None`. Fails with a
/// sentence when the binaries were built without failpoints.
pub fn failpoint(addr: SocketAddr, name: &str, actions: Option<&str>) -> Result<()> {
    let (code, body) = match actions {
        Some(a) => http(addr, "PUT", &format!("/fail/{name}"), a)?,
        None => http(addr, "DELETE", &format!("/fail/{name}"), "")?,
    };
    if code != 200 {
        anyhow::bail!("failpoint {name} on {addr}: HTTP {code}: {}", body.trim());
    }
    Ok(())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(after)) = (rest.get(..n), rest.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        body = after.trim_start_matches("\r\n");
    }
    out
}
