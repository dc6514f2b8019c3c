//! A link emulator: two network namespaces, `a` and `b`, whose only way to each other is this
//! process. It carries every IP packet (TCP, UDP, ICMP alike) with a one-way delay, seeded random
//! loss, a rate limit and a cut, all changeable while it runs. It does what `tc netem` would,
//! which this kernel lacks, for any protocol: QUIC between ferry's processes, and the TCP
//! baselines (iperf3, rsync over ssh) the bench compares them with.
//!
//! ```text
//!   ns a: 10.99.0.1 ── tun fla… ─┐                           ┌─ tun flb… ── 10.99.0.2 :ns b
//!                                └─> thread a→b: read, cut? loss? buffer full? ──> queue
//!                                    (due = when the rate has sent it + delay) ──> at due,
//!                                    cut? else write ──> tun flb…        (and b→a alike)
//! ```
//!
//! The rate is paced here rather than by a `tbf` qdisc: the bottleneck then sits behind the
//! sender, in the path, with a buffer that fills and drops as a WAN router's does, instead of in
//! the sender's own qdisc, where TCP would feel it as local back-pressure and never lose a
//! packet to it. And one lock holds every setting, so a test changes any of them the same way.
//!
//! Every link uses the same two addresses: each pair exists only in its own two namespaces.
//! IPv6 is off on the link, so the only packets on it are the callers'. See
//! `docs/link-emulator.md` for use and limits.

use std::collections::VecDeque;
use std::fs::File;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sched::CloneFlags;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tun_rs::{DeviceBuilder, InterruptEvent, SyncDevice};

use crate::netns::Place;

/// Packets queued per direction (in flight or waiting for the rate) before the link drops.
const QUEUE: usize = 65_536;
/// Packets taken in per wake-up before the due ones are sent, so a flood cannot starve them.
const BATCH: usize = 256;
/// How long drop waits for the forwarding threads (they wake at once when told to stop).
const JOIN: Duration = Duration::from_secs(2);

/// What the link does to every packet, in each direction alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Delay each way (RTT = 2 × this). Order is kept.
    pub one_way: Duration,
    /// Probability that a packet is lost, each independently (0.0 ..= 1.0).
    pub loss: f64,
    /// The rate each way, bits per second (IP packets, headers included); `None`: as fast as
    /// the forwarding threads go.
    pub rate_bps: Option<u64>,
    /// The longest a packet waits for the rate before the link drops it instead: the
    /// bottleneck's buffer, in time (at 200 Mbit/s, 50 ms is 1.25 MB).
    pub buffer: Duration,
    /// Seed of the loss draws: the same seed loses the same packets of the same sequence.
    pub seed: u64,
}

impl Default for LinkConfig {
    /// No delay, no loss, no rate limit, a 50 ms buffer, seed 0.
    fn default() -> Self {
        LinkConfig {
            one_way: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            buffer: Duration::from_millis(50),
            seed: 0,
        }
    }
}

/// What one direction did with the packets it read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Packets written to the far end.
    pub packets: u64,
    /// Bytes of those packets (IP headers included).
    pub bytes: u64,
    /// Packets dropped by the random loss.
    pub lost: u64,
    /// Packets dropped because the link was cut when they were sent or due.
    pub cut: u64,
    /// Packets dropped because the buffer (or the queue) was full.
    pub overflow: u64,
}

/// Counters of both directions, since the link was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub a_to_b: DirectionStats,
    pub b_to_a: DirectionStats,
}

/// One side of the link: a namespace, its TUN device and its address.
#[derive(Debug, Clone)]
pub struct End {
    /// The namespace (`ip netns exec <ns> …`).
    pub ns: String,
    /// The TUN device inside it.
    pub dev: String,
    /// This side's address; the other side reaches it over the link.
    pub ip: Ipv4Addr,
}

impl End {
    /// Where processes of this side run: `ip netns exec <ns>`, on [`End::ip`].
    pub fn place(&self) -> Place {
        Place {
            ip: IpAddr::V4(self.ip),
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), self.ns.clone()],
        }
    }

    /// Runs `f` on a thread inside this namespace and returns what it returns. Sockets made in
    /// `f` stay in the namespace, so a test can bind there and use them from anywhere.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.ns);
        let ns = File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::scope(|s| {
            let thread = s.spawn(move || -> Result<T> {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("enter the namespace {}", self.ns))?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// A running link; on drop its threads end, and its namespaces and devices are deleted.
pub struct Link {
    a: End,
    b: End,
    shared: Arc<Shared>,
    stop: Arc<InterruptEvent>,
    threads: Vec<JoinHandle<()>>,
}

/// Why the emulator cannot run here (no `/dev/net/tun`, not root, no `ip netns`), or `None`.
/// Tests skip with this message.
pub fn unavailable() -> Option<String> {
    if let Err(e) = File::options().read(true).write(true).open("/dev/net/tun") {
        return Some(format!(
            "cannot open /dev/net/tun ({e}): needs root and TUN support"
        ));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip` ({e}): install iproute2")),
    }
}

impl Link {
    /// Makes both namespaces and devices and starts forwarding.
    pub fn create(config: LinkConfig) -> Result<Link> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        check(&config)?;
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let end = |side: &str, last: u8| End {
            ns: format!("fl-{side}-{pid}-{n}"),
            // 15 bytes at most (IFNAMSIZ); unique in the host namespace, where it is made.
            dev: format!("fl{side}{pid}-{}", n % 10_000),
            ip: Ipv4Addr::new(10, 99, 0, last),
        };
        let mut link = Link {
            a: end("a", 1),
            b: end("b", 2),
            shared: Arc::new(Shared {
                config: Mutex::new(config),
                cut: AtomicBool::new(false),
                a_to_b: Counters::default(),
                b_to_a: Counters::default(),
            }),
            stop: Arc::new(InterruptEvent::new().context("make the stop event")?),
            threads: Vec::new(),
        };
        // From here on, drop deletes whatever was made.
        let dev_a = Arc::new(open_end(&link.a, &link.b)?);
        let dev_b = Arc::new(open_end(&link.b, &link.a)?);
        for (from, to, a_to_b) in [(&dev_a, &dev_b, true), (&dev_b, &dev_a, false)] {
            let (from, to) = (from.clone(), to.clone());
            let (shared, stop) = (link.shared.clone(), link.stop.clone());
            let seed = config.seed ^ u64::from(a_to_b);
            let thread = std::thread::Builder::new()
                .name(if a_to_b { "link a→b" } else { "link b→a" }.into())
                .spawn(move || forward(&from, &to, &shared, a_to_b, &stop, seed))
                .context("start a forwarding thread")?;
            link.threads.push(thread);
        }
        Ok(link)
    }

    pub fn a(&self) -> &End {
        &self.a
    }

    pub fn b(&self) -> &End {
        &self.b
    }

    /// Cuts the link (`true`: every packet is dropped, both ways, also those in flight) or
    /// heals it.
    pub fn set_cut(&self, cut: bool) {
        self.shared.cut.store(cut, Ordering::Relaxed);
    }

    /// The settings in force.
    pub fn config(&self) -> LinkConfig {
        *self.shared.config.lock()
    }

    /// New settings, for the packets read from now on (those in flight keep their times).
    pub fn set_config(&self, config: LinkConfig) -> Result<()> {
        check(&config)?;
        *self.shared.config.lock() = config;
        Ok(())
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            a_to_b: self.shared.a_to_b.snapshot(),
            b_to_a: self.shared.b_to_a.snapshot(),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stop.trigger();
        let deadline = Instant::now() + JOIN;
        for thread in self.threads.drain(..) {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            // One still running is left behind (it holds its devices until this process ends).
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        // The devices went with the threads' handles; a namespace outlives this only while a
        // process the caller started still runs in it.
        for end in [&self.a, &self.b] {
            let _ = ip(&["netns", "del", &end.ns]);
        }
    }
}

/// Carries packets from `from` to `to` until `stop` fires: the whole data path of one direction.
fn forward(
    from: &SyncDevice,
    to: &SyncDevice,
    shared: &Shared,
    a_to_b: bool,
    stop: &InterruptEvent,
    seed: u64,
) {
    let counters = if a_to_b {
        &shared.a_to_b
    } else {
        &shared.b_to_a
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    // When the rate limit has sent the last packet taken in.
    let mut busy_until = Instant::now();
    let mut buf = vec![0u8; 65_536];
    loop {
        let wait = queue
            .front()
            .map(|(due, _)| due.saturating_duration_since(Instant::now()));
        match from.wait_readable_intr_timeout(stop, wait) {
            _ if stop.is_trigger() => return,
            Err(e) if !matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                return; // the device is broken (deleted under us): end rather than spin
            }
            _ => {} // readable, or the next packet is due (or a signal): look at both ends
        }
        let config = *shared.config.lock();
        for _ in 0..BATCH {
            let Ok(n) = from.recv(&mut buf) else {
                break; // WouldBlock: nothing more to read now
            };
            let now = Instant::now();
            let start = busy_until.max(now);
            if shared.cut.load(Ordering::Relaxed) {
                counters.cut.fetch_add(1, Ordering::Relaxed);
            } else if config.loss > 0.0 && rng.random_bool(config.loss) {
                counters.lost.fetch_add(1, Ordering::Relaxed);
            } else if start - now > config.buffer || queue.len() >= QUEUE {
                counters.overflow.fetch_add(1, Ordering::Relaxed);
            } else {
                busy_until = start + config.rate_bps.map_or(Duration::ZERO, |r| on_wire(n, r));
                let last = queue.back().map_or(now, |(due, _)| *due);
                queue.push_back(((busy_until + config.one_way).max(last), buf[..n].to_vec()));
            }
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, packet)) = queue.pop_front() else {
                break;
            };
            if shared.cut.load(Ordering::Relaxed) {
                counters.cut.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Counted before the write, so that whoever has seen the packet sees it counted.
            let len = packet.len() as u64;
            counters.packets.fetch_add(1, Ordering::Relaxed);
            counters.bytes.fetch_add(len, Ordering::Relaxed);
            if to.send(&packet).is_err() {
                counters.packets.fetch_sub(1, Ordering::Relaxed);
                counters.bytes.fetch_sub(len, Ordering::Relaxed);
            }
        }
    }
}

/// How long `bytes` take on a wire of `rate_bps`.
fn on_wire(bytes: usize, rate_bps: u64) -> Duration {
    Duration::from_nanos(bytes as u64 * 8 * 1_000_000_000 / rate_bps)
}

/// Settings and counters, shared by the owner and both forwarding threads.
struct Shared {
    config: Mutex<LinkConfig>,
    cut: AtomicBool,
    a_to_b: Counters,
    b_to_a: Counters,
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    cut: AtomicU64,
    overflow: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            packets: read(&self.packets),
            bytes: read(&self.bytes),
            lost: read(&self.lost),
            cut: read(&self.cut),
            overflow: read(&self.overflow),
        }
    }
}

fn check(config: &LinkConfig) -> Result<()> {
    ensure!(
        (0.0..=1.0).contains(&config.loss),
        "link loss {} is not a probability (0.0 ..= 1.0)",
        config.loss
    );
    ensure!(
        config.rate_bps != Some(0),
        "a link rate of 0 bit/s carries nothing: use set_cut(true) to cut the link"
    );
    Ok(())
}

/// Makes the namespace of `end` and its TUN device, moved in and addressed point-to-point to
/// `peer`. The device is deleted when the returned handle is dropped (it is not persistent).
fn open_end(end: &End, peer: &End) -> Result<SyncDevice> {
    ip(&["netns", "add", &end.ns])?;
    // Devices moved in take the namespace's defaults: no IPv6, so no router solicitations.
    ip(&[
        "netns",
        "exec",
        &end.ns,
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.disable_ipv6=1",
    ])?;
    let dev = DeviceBuilder::new()
        .name(&end.dev)
        .enable(false) // up only inside the namespace, or it solicits IPv6 routers here
        .build_sync()
        .with_context(|| format!("create the TUN device {}", end.dev))?;
    dev.set_nonblocking(true)
        .context("make the TUN device non-blocking")?;
    let (local, remote) = (end.ip.to_string(), peer.ip.to_string());
    ip(&["link", "set", &end.dev, "netns", &end.ns])?;
    let n = |args: &[&str]| ip(&[&["-n", end.ns.as_str()], args].concat());
    n(&["addr", "add", &local, "peer", &remote, "dev", &end.dev])?;
    n(&["link", "set", &end.dev, "up"])?;
    n(&["link", "set", "lo", "up"])?;
    Ok(dev)
}

/// Runs `ip args…`; the error carries its message.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_takes_its_size_over_the_rate_on_the_wire() {
        assert_eq!(on_wire(1500, 1_000_000_000), Duration::from_micros(12));
        assert_eq!(on_wire(1250, 10_000_000), Duration::from_millis(1));
    }

    #[test]
    fn settings_that_mean_nothing_are_refused() {
        let bad_loss = LinkConfig {
            loss: 1.5,
            ..LinkConfig::default()
        };
        assert!(check(&bad_loss).is_err());
        assert!(check(&LinkConfig {
            loss: f64::NAN,
            ..LinkConfig::default()
        })
        .is_err());
        assert!(check(&LinkConfig {
            rate_bps: Some(0),
            ..LinkConfig::default()
        })
        .is_err());
        assert!(check(&LinkConfig::default()).is_ok());
    }
}
