//! Clients that write across a failover, and what they saw: each acknowledged write's key,
//! the side that took it, and when it was sent and acknowledged (one clock for every client),
//! so a test can check that nothing acknowledged is missing on the new primary and that the
//! two sides never took writes at the same time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// One acknowledged write.
#[derive(Debug, Clone)]
pub struct Acked {
    pub key: String,
    pub value: String,
    /// Index of the side (into the addresses given to [`Clients::start`]) that took it.
    pub side: usize,
    pub sent: Instant,
    pub acked: Instant,
}

/// What one client saw, besides its acknowledged writes.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub acked: Vec<Acked>,
    /// Retryable refusals (`TRYAGAIN ...`), by side.
    pub retryable: [u64; 2],
    /// Any other error: the test fails on it.
    pub other: Vec<String>,
}

/// How [`Clients`] write.
#[derive(Debug, Clone)]
pub struct Load {
    /// Client connections (one thread each).
    pub clients: usize,
    /// Keys are `<prefix><client>:<i>`.
    pub prefix: String,
    /// SETs per round trip (1: one at a time).
    pub pipe: usize,
    /// Writes per second over all clients (0: as fast as they are answered).
    pub rate: f64,
    /// Pause after each acknowledged round trip.
    pub pause: Duration,
    /// Every client stops after this long.
    pub limit: Duration,
}

impl Load {
    /// `clients` clients writing one key at a time, `pause` between writes, for at most `limit`.
    pub fn one_at_a_time(clients: usize, prefix: &str, pause: Duration, limit: Duration) -> Load {
        Load {
            clients,
            prefix: prefix.into(),
            pipe: 1,
            rate: 0.0,
            pause,
            limit,
        }
    }
}

/// Clients that write their own keys to side 0 first, and move to the other side when told the
/// table is demoted (the old primary's answer); any other `TRYAGAIN` is retried after 5 ms, on
/// the same keys. Each stops when told or after its limit.
pub struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Seen>>,
}

impl Clients {
    /// [`Load::one_at_a_time`] clients.
    pub fn start(
        sides: [String; 2],
        n: usize,
        prefix: &str,
        pause: Duration,
        limit: Duration,
    ) -> Result<Clients> {
        Clients::start_with(sides, &Load::one_at_a_time(n, prefix, pause, limit))
    }

    /// Clients writing as `load` says. Their connections and threads start in the calling
    /// thread's network namespace.
    pub fn start_with(sides: [String; 2], load: &Load) -> Result<Clients> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let started = Instant::now();
        for c in 0..load.clients {
            let mut cons = Vec::new();
            for url in &sides {
                let con = redis::Client::open(url.as_str())?
                    .get_connection_with_timeout(Duration::from_secs(5))
                    .with_context(|| format!("connect to {url}"))?;
                con.set_read_timeout(Some(Duration::from_secs(10)))?;
                cons.push(con);
            }
            let stop = stop.clone();
            let mut load = load.clone();
            load.prefix = format!("{}{c}:", load.prefix);
            load.rate /= load.clients as f64;
            threads.push(std::thread::spawn(move || {
                write_loop(cons, &load, started, &stop)
            }));
        }
        Ok(Clients { stop, threads })
    }

    /// Stops every client; what each saw.
    pub fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| Seen {
                    other: vec!["a client thread panicked".into()],
                    ..Seen::default()
                })
            })
            .collect()
    }
}

/// One client: `load.rate` is its own share.
fn write_loop(
    mut cons: Vec<redis::Connection>,
    load: &Load,
    started: Instant,
    stop: &AtomicBool,
) -> Seen {
    let mut seen = Seen::default();
    let end = started + load.limit;
    let mut side = 0usize;
    let mut i = 0u64;
    let pipe = load.pipe.max(1) as u64;
    // Bounded: every iteration either writes, sleeps or ends, and the loop ends at `end`.
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        if load.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / load.rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let mut p = redis::pipe();
        for k in i..i + pipe {
            p.cmd("SET")
                .arg(format!("{}{k}", load.prefix))
                .arg(format!("v{k}"))
                .ignore();
        }
        let sent = Instant::now();
        match p.query::<()>(&mut cons[side]) {
            Ok(()) => {
                let acked = Instant::now();
                for k in i..i + pipe {
                    seen.acked.push(Acked {
                        key: format!("{}{k}", load.prefix),
                        value: format!("v{k}"),
                        side,
                        sent,
                        acked,
                    });
                }
                i += pipe;
                if !load.pause.is_zero() {
                    std::thread::sleep(load.pause);
                }
            }
            Err(e) if e.code() == Some("TRYAGAIN") => {
                seen.retryable[side] += 1;
                if e.to_string().contains("demoted") {
                    side = 1 - side;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                seen.other
                    .push(format!("{}{i} on side {side}: {e}", load.prefix));
                return seen;
            }
        }
    }
    seen
}

/// The write gap of a failover from side `first`: from the last write side `first`
/// acknowledged to the first write the other side acknowledged; `None` if one side took none.
pub fn write_gap(seen: &[Seen], first: usize) -> Option<Duration> {
    let all: Vec<&Acked> = seen.iter().flat_map(|s| &s.acked).collect();
    let last_old = all
        .iter()
        .filter(|a| a.side == first)
        .map(|a| a.acked)
        .max()?;
    let first_new = all
        .iter()
        .filter(|a| a.side != first)
        .map(|a| a.acked)
        .min()?;
    Some(first_new.saturating_duration_since(last_old))
}

/// When side 1 acknowledged its first write.
pub fn first_on_new(seen: &[Seen], first: usize) -> Option<Instant> {
    seen.iter()
        .flat_map(|s| &s.acked)
        .filter(|a| a.side != first)
        .map(|a| a.acked)
        .min()
}

/// Checks what the clients saw: no error but retryable ones, and the sides never took writes
/// at the same time: every write side `first` acknowledged was acknowledged before any write
/// that side `1 - first` took was sent. Returns (acked on `first`, acked on the other).
pub fn check_no_overlap(seen: &[Seen], first: usize) -> Result<(usize, usize)> {
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.other).collect();
    if !errors.is_empty() {
        bail!("clients got errors that are not retryable: {errors:?}");
    }
    let all: Vec<&Acked> = seen.iter().flat_map(|s| &s.acked).collect();
    let last_old = all
        .iter()
        .filter(|a| a.side == first)
        .map(|a| a.acked)
        .max();
    let first_new = all.iter().filter(|a| a.side != first).map(|a| a.sent).min();
    if let (Some(old), Some(new)) = (last_old, first_new) {
        if old >= new {
            bail!(
                "both sides took writes at once: side {first} acknowledged a write {:?} after side {} was sent one it took",
                old - new,
                1 - first
            );
        }
    }
    Ok((
        all.iter().filter(|a| a.side == first).count(),
        all.iter().filter(|a| a.side != first).count(),
    ))
}

/// Every acknowledged write reads back from `url` with its value.
pub fn check_present(url: &str, seen: &[Seen]) -> Result<usize> {
    let mut con = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(5))?;
    let all: Vec<&Acked> = seen.iter().flat_map(|s| &s.acked).collect();
    for chunk in all.chunks(500) {
        let keys: Vec<&str> = chunk.iter().map(|a| a.key.as_str()).collect();
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con)?;
        for (a, v) in chunk.iter().zip(got) {
            if v.as_deref() != Some(a.value.as_str()) {
                bail!(
                    "acknowledged write {} = {} (taken by side {}) reads {v:?} from {url}",
                    a.key,
                    a.value,
                    a.side
                );
            }
        }
    }
    Ok(all.len())
}
