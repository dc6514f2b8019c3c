//! The simulated world: source, etcd, shippers, receiver, connections, faults, and the event
//! loop that advances virtual time from one due event to the next. See the parent module.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ferry_proto::wire::{ErrorCode, Frame};
use ferry_proto::{partition_of, ClusterId, Decree, DupId, Op, PartitionId, PlogRecord, Timetag};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Report, SimConfig, SimFailure};
use crate::receive::{self, Admission, HelloContext, ReceiveEvent, ReceiveSession, TableView};
use crate::retry::{Action, FailMode, Retry};
use crate::route;
use crate::ship::{Carry, Confirmed, Failure, SessionId, ShipConfig, ShipEvent, ShipSession};

/// Virtual time, in µs since the run's base instant.
type T = u64;

/// Wall clock (µs since the epoch) at virtual time 0: record timestamps and lag use it.
const WALL_BASE_US: u64 = 1_700_000_000_000_000;
/// What the receiver may decompress a batch to.
const MAX_RAW: usize = 16 << 20;
const MS: T = 1_000;
/// How long a connection attempt to an unreachable receiver takes to fail.
const CONNECT_TIMEOUT: T = 20 * MS;
/// A shipper whose term was lost waits this long before campaigning again (as the shipper does).
const CAMPAIGN_PAUSE: T = 500 * MS;
/// Virtual time allowed after the faults end for everything to settle.
const SETTLE: T = 300_000 * MS;

/// Per-seed parameters, all drawn from the seed.
#[derive(Debug, Clone)]
struct Params {
    records: u64,
    commit_gap: (T, T),
    burst: u64,
    two_shippers: bool,
    fail_mode: FailMode,
    ship: ShipConfig,
    delay: (T, T),
    fsync: (T, T),
    detect: (T, T),
    lease_ttl: T,
    progress_interval: T,
    restart: (T, T),
    /// Mean time between faults (0: none).
    fault_gap: T,
    /// How long faults go on after the source stopped committing.
    fault_tail: T,
    /// The target table's partitions: one inbox each, each with its own fsync.
    target_partitions: u32,
}

impl Params {
    fn draw(rng: &mut StdRng, config: &SimConfig) -> Params {
        let max = config.max_records.max(5);
        let fault_gap = match rng.random_range(0..10) {
            0 => 0,
            1..=3 => rng.random_range(50..300) * MS,
            _ => rng.random_range(5..50) * MS,
        };
        let heartbeat = rng.random_range(10..40) * MS;
        Params {
            records: rng.random_range(max / 5..=max),
            commit_gap: (100, rng.random_range(200..4_000)),
            burst: rng.random_range(1..=5),
            two_shippers: rng.random_bool(0.6),
            fail_mode: if rng.random_bool(0.25) {
                FailMode::Skip
            } else {
                FailMode::Slow
            },
            ship: ShipConfig {
                window_batches: rng.random_range(1..=8),
                batch_bytes: rng.random_range(100..4_000),
                heartbeat_interval: Duration::from_micros(heartbeat),
                ack_timeout: Duration::from_micros(rng.random_range(100..400) * MS),
                lagging_threshold_ms: 50,
                ..ShipConfig::default()
            },
            delay: (200, rng.random_range(500..20_000)),
            fsync: (100, rng.random_range(200..3_000)),
            detect: (5 * MS, rng.random_range(10..300) * MS),
            lease_ttl: rng.random_range(50..300) * MS,
            progress_interval: rng.random_range(20..100) * MS,
            restart: (5 * MS, rng.random_range(10..300) * MS),
            fault_gap,
            fault_tail: rng.random_range(0..300) * MS,
            // Drawn last, so that the other parameters of a seed stay what they were.
            target_partitions: rng.random_range(1..=4),
        }
    }
}

/// The source partition: its plog and committed decree.
struct Source {
    plog: Vec<PlogRecord>,
    next_commit_at: T,
}

impl Source {
    fn committed(&self) -> Decree {
        Decree(self.plog.len() as u64)
    }

    /// Like the plog reader: records `from ..= upto`, at most `max_bytes` (at least one).
    fn read(&self, from: Decree, upto: Decree, max_bytes: u64) -> Vec<PlogRecord> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let upto = upto.min(self.committed());
        let mut d = from.0.max(1);
        while d <= upto.0 {
            let Some(r) = self.plog.get((d - 1) as usize) else {
                break;
            };
            let len = r.encoded_len() as u64;
            if !out.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            out.push(r.clone());
            d += 1;
        }
        out
    }
}

/// etcd: the shipping election and the persisted progress of the one partition.
#[derive(Default)]
struct Etcd {
    revision: u64,
    /// (shipper, token) holding the election key.
    leader: Option<(usize, u64)>,
    /// The crashed leader's lease expires then.
    expiry: Option<(T, u64)>,
    /// Persisted confirmed decree and its timestamp (ms).
    progress: Option<(Decree, u64)>,
}

struct Sess {
    conn: u64,
    ship: ShipSession,
    /// Monotonic check (e): the session's confirmed decree.
    confirmed: Decree,
}

struct Term {
    token: u64,
    carry: Carry,
    confirmed: Confirmed,
    retry: Retry,
    session: Option<Sess>,
    /// A connection attempt that will fail then (receiver unreachable).
    connect_fail_at: Option<T>,
    next_session_at: T,
    next_progress_at: T,
    written: Option<Decree>,
    /// FAIL_FAST or Gone: wait for an operator (never in these runs, but modelled).
    stopped: bool,
    /// The election key was lost (a takeover); the shipper notices then.
    lease_lost_at: Option<T>,
}

struct Shipper {
    alive: bool,
    incarnation: u64,
    restart_at: Option<T>,
    campaign_after: T,
    term: Option<Term>,
}

enum RState {
    AwaitHello,
    /// Admitted, waiting for the inbox slot (the preempted session's append).
    WaitSlot,
    Open(Box<ReceiveSession>),
    Done,
}

struct RSess {
    token: u64,
    state: RState,
}

/// One target partition's inbox of the source partition: its durable records.
#[derive(Default)]
struct Inbox {
    records: Vec<PlogRecord>,
}

impl Inbox {
    fn last(&self) -> Decree {
        self.records.last().map_or(Decree::ZERO, |r| r.decree)
    }

    /// The real inbox writer's rule (`ferry_log::inbox::InboxWriter::append`): records at or
    /// below the last decree are skipped (a resend is harmless), the rest must follow it without
    /// a gap (an empty inbox starts anywhere). Else the first record out of place and the decree
    /// expected instead; nothing is appended then.
    fn append(&mut self, records: Vec<PlogRecord>) -> Result<(), (Decree, Decree)> {
        let last = self.last();
        let fresh: Vec<PlogRecord> = records.into_iter().filter(|r| r.decree > last).collect();
        let mut expect = match fresh.first() {
            Some(first) if self.records.is_empty() => first.decree,
            _ => last.next(),
        };
        for r in &fresh {
            if r.decree != expect {
                return Err((r.decree, expect));
            }
            expect = expect.next();
        }
        self.records.extend(fresh);
        Ok(())
    }
}

/// An append in progress: the session's records split by target partition, each part with its
/// own fsync (the real receiver appends to every partition's inbox in parallel).
struct Append {
    conn: u64,
    /// Per target partition, its part and when its fsync completes; `None` once done.
    parts: Vec<Option<(Vec<PlogRecord>, T)>>,
    /// A part's fsync failed: the append fails once every part is done.
    failed: bool,
}

struct Receiver {
    alive: bool,
    incarnation: u64,
    restart_at: Option<T>,
    /// The stored fencing token (durable).
    fence: u64,
    /// One inbox per target partition.
    inboxes: Vec<Inbox>,
    append: Option<Append>,
    sessions: BTreeMap<u64, RSess>,
    live: Option<u64>,
    disk_bad_until: T,
}

impl Receiver {
    /// What every target partition holds durably: the smallest last decree of the inboxes,
    /// which the Welcome reports and acks confirm (the real receiver's `confirmed`).
    fn durable(&self) -> Decree {
        self.inboxes
            .iter()
            .map(Inbox::last)
            .min()
            .unwrap_or(Decree::ZERO)
    }

    /// Each target partition's last durable decree, for the schedule.
    fn lasts(&self) -> String {
        let lasts: Vec<String> = self.inboxes.iter().map(|i| i.last().to_string()).collect();
        lasts.join(", ")
    }

    /// Whether the target partitions hold different last decrees (a crash or a disk fault in
    /// the middle of an append).
    fn uneven(&self) -> bool {
        self.inboxes.iter().any(|i| i.last() != self.durable())
    }
}

enum Msg {
    Frame(Frame),
    /// The sender finished (or lost) the stream.
    Fin,
}

struct Conn {
    shipper: usize,
    ship_inc: u64,
    recv_inc: u64,
    delay: T,
    to_recv: VecDeque<(T, Msg)>,
    to_ship: VecDeque<(T, Msg)>,
    ship_open: bool,
    recv_open: bool,
    /// Broken: nothing sent from now on arrives.
    broken: bool,
    ship_detect_at: Option<T>,
    recv_detect_at: Option<T>,
}

pub(super) struct World {
    seed: u64,
    rng: StdRng,
    base: Instant,
    now: T,
    p: Params,
    max_steps: usize,
    source: Source,
    etcd: Etcd,
    shippers: Vec<Shipper>,
    receiver: Receiver,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    link_down_until: T,
    next_fault_at: T,
    /// Set when the source has committed everything: no faults after it.
    faults_end: Option<T>,
    log: Vec<String>,
    report: Report,
    /// The highest decree any shipper saw confirmed.
    acked_max: Decree,
    /// FAIL_SKIP: decrees up to here may have been stripped.
    skipped_max: Decree,
    last_progress: Decree,
    last_durable: Decree,
    /// Check (e) per target partition: each inbox's last decree.
    last_inboxes: Vec<Decree>,
}

/// Fails with a named invariant.
macro_rules! violated {
    ($w:expr, $inv:expr, $($arg:tt)*) => {
        return Err($w.failure($inv, format!($($arg)*)))
    };
}

impl World {
    pub(super) fn new(seed: u64, config: &SimConfig) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let p = Params::draw(&mut rng, config);
        let n_shippers = if p.two_shippers { 2 } else { 1 };
        let shippers = (0..n_shippers)
            .map(|_| Shipper {
                alive: true,
                incarnation: 0,
                restart_at: None,
                campaign_after: 0,
                term: None,
            })
            .collect();
        let first_fault = if p.fault_gap > 0 {
            rng.random_range(0..p.fault_gap * 2)
        } else {
            T::MAX
        };
        let mut log = Vec::new();
        log.push(format!(
            "seed {seed}: {} records, burst {}, {} shipper(s), {:?}, window {}, batch {} B, \
             heartbeat {:?}, ack timeout {:?}, delay {:?} µs, fsync {:?} µs, fault gap {} ms, \
             {} target partition(s)",
            p.records,
            p.burst,
            n_shippers,
            p.fail_mode,
            p.ship.window_batches,
            p.ship.batch_bytes,
            p.ship.heartbeat_interval,
            p.ship.ack_timeout,
            p.delay,
            p.fsync,
            p.fault_gap / MS,
            p.target_partitions
        ));
        World {
            seed,
            rng,
            base: Instant::now(),
            now: 0,
            max_steps: config.max_steps,
            source: Source {
                plog: Vec::new(),
                next_commit_at: 0,
            },
            etcd: Etcd::default(),
            shippers,
            receiver: Receiver {
                alive: true,
                incarnation: 0,
                restart_at: None,
                fence: 0,
                inboxes: (0..p.target_partitions).map(|_| Inbox::default()).collect(),
                append: None,
                sessions: BTreeMap::new(),
                live: None,
                disk_bad_until: 0,
            },
            conns: BTreeMap::new(),
            next_conn: 1,
            link_down_until: 0,
            next_fault_at: first_fault,
            faults_end: None,
            log,
            report: Report {
                seed,
                ..Report::default()
            },
            acked_max: Decree::ZERO,
            skipped_max: Decree::ZERO,
            last_progress: Decree::ZERO,
            last_durable: Decree::ZERO,
            last_inboxes: vec![Decree::ZERO; p.target_partitions as usize],
            p,
        }
    }

    pub(super) fn run(&mut self) -> Result<Report, SimFailure> {
        for step in 0..self.max_steps {
            self.report.steps = step;
            if self.quiescent() {
                self.final_check()?;
                self.report.records = self.p.records;
                self.report.virtual_time = Duration::from_micros(self.now);
                return Ok(self.report.clone());
            }
            if let Some(end) = self.faults_end {
                if self.now > end + SETTLE {
                    violated!(
                        self,
                        "(b) quiescence",
                        "not settled {} s after the faults ended: committed {}, durable {}, \
                         persisted {:?}",
                        SETTLE / 1_000_000,
                        self.source.committed(),
                        self.receiver.durable(),
                        self.etcd.progress
                    );
                }
            }
            let Some(t) = self.next_time() else {
                violated!(
                    self,
                    "(b) quiescence",
                    "nothing left to do before quiescence"
                );
            };
            self.now = self.now.max(t);
            self.process_due()?;
            self.check()?;
        }
        violated!(
            self,
            "(b) quiescence",
            "not settled within {} steps: committed {}, durable {}, persisted {:?}",
            self.max_steps,
            self.source.committed(),
            self.receiver.durable(),
            self.etcd.progress
        )
    }

    // ---- time ----

    /// The events so far.
    pub(super) fn schedule(&self) -> &[String] {
        &self.log
    }

    fn at(&self, t: T) -> Instant {
        self.base + Duration::from_micros(t)
    }

    fn to_t(&self, i: Instant) -> T {
        let d = i.saturating_duration_since(self.base);
        // Rounded up, so that at the returned time the deadline has passed.
        u64::try_from(d.as_nanos().div_ceil(1_000)).unwrap_or(T::MAX)
    }

    fn wall_us(&self, t: T) -> u64 {
        WALL_BASE_US + t
    }

    fn rand(&mut self, (lo, hi): (T, T)) -> T {
        if hi <= lo {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    fn event(&mut self, what: String) {
        self.log
            .push(format!("[{:>10.3} ms] {what}", self.now as f64 / 1000.0));
    }

    fn failure(&self, invariant: &'static str, message: String) -> SimFailure {
        SimFailure {
            seed: self.seed,
            invariant,
            message: format!("at {:.3} ms: {message}", self.now as f64 / 1000.0),
            schedule: self.log.clone(),
        }
    }

    fn faults_active(&self) -> bool {
        self.p.fault_gap > 0 && self.faults_end.is_none_or(|e| self.now < e)
    }

    /// The earliest time anything is due.
    fn next_time(&self) -> Option<T> {
        let mut ts: Vec<T> = Vec::new();
        if self.faults_active() {
            ts.push(self.next_fault_at);
        }
        if self.link_down_until > self.now {
            ts.push(self.link_down_until);
        }
        if self.receiver.disk_bad_until > self.now {
            ts.push(self.receiver.disk_bad_until);
        }
        ts.extend(self.receiver.restart_at);
        if let Some(a) = &self.receiver.append {
            ts.extend(a.parts.iter().flatten().map(|(_, t)| *t));
        }
        ts.extend(self.etcd.expiry.map(|(t, _)| t));
        if self.source.committed().0 < self.p.records {
            ts.push(self.source.next_commit_at);
        }
        for c in self.conns.values() {
            ts.extend(c.to_recv.front().map(|(t, _)| *t));
            ts.extend(c.to_ship.front().map(|(t, _)| *t));
            ts.extend(c.ship_detect_at);
            ts.extend(c.recv_detect_at);
        }
        for s in &self.shippers {
            ts.extend(s.restart_at);
            if !s.alive {
                continue;
            }
            match &s.term {
                None if self.etcd.leader.is_none() => ts.push(s.campaign_after.max(self.now)),
                None => {}
                Some(term) => {
                    ts.push(term.next_progress_at);
                    ts.extend(term.lease_lost_at);
                    ts.extend(term.connect_fail_at);
                    match &term.session {
                        Some(sess) => ts.extend(sess.ship.poll_timeout().map(|i| self.to_t(i))),
                        None if !term.stopped && term.connect_fail_at.is_none() => {
                            ts.push(term.next_session_at)
                        }
                        None => {}
                    }
                }
            }
        }
        ts.into_iter().min()
    }

    fn quiescent(&self) -> bool {
        let n = Decree(self.p.records);
        self.faults_end.is_some_and(|e| self.now >= e)
            && self.source.committed() == n
            && self.receiver.durable() == n
            && self.etcd.progress.is_some_and(|(d, _)| d == n)
            && self.link_down_until <= self.now
    }

    // ---- the step ----

    fn process_due(&mut self) -> Result<(), SimFailure> {
        let now = self.now;
        if self.faults_active() && now >= self.next_fault_at {
            self.inject_fault()?;
            let gap = self.p.fault_gap;
            self.next_fault_at = now + self.rand((gap / 4, gap * 2)).max(1);
        }
        if self.link_down_until != 0 && self.link_down_until <= now {
            self.link_down_until = 0;
            self.event("link heals".into());
        }
        if self.receiver.disk_bad_until != 0 && self.receiver.disk_bad_until <= now {
            self.receiver.disk_bad_until = 0;
            self.event("receiver disk healthy again".into());
        }
        if self.receiver.restart_at.is_some_and(|t| t <= now) {
            self.receiver.restart_at = None;
            self.receiver.alive = true;
            if self.receiver.uneven() {
                self.report.uneven_restarts += 1;
            }
            self.event(format!(
                "receiver restarts: inbox durable ..={} (per target partition [{}]), fence {}",
                self.receiver.durable(),
                self.receiver.lasts(),
                self.receiver.fence
            ));
        }
        for i in 0..self.shippers.len() {
            if self.shippers[i].restart_at.is_some_and(|t| t <= now) {
                self.shippers[i].restart_at = None;
                self.shippers[i].alive = true;
                self.event(format!("shipper {i} restarts"));
            }
        }
        if let Some((t, token)) = self.etcd.expiry {
            if t <= now {
                self.etcd.expiry = None;
                if self.etcd.leader.is_some_and(|(_, tok)| tok == token) {
                    self.etcd.leader = None;
                    self.event(format!("lease of token {token} expires"));
                }
            }
        }
        self.commit_due()?;
        self.deliver_due()?;
        self.fsync_due()?;
        for i in 0..self.shippers.len() {
            self.shipper_due(i)?;
        }
        Ok(())
    }

    fn commit_due(&mut self) -> Result<(), SimFailure> {
        let now = self.now;
        if self.source.committed().0 >= self.p.records || self.source.next_commit_at > now {
            return Ok(());
        }
        let n = self.rng.random_range(1..=self.p.burst);
        let cluster = ClusterId::new(1).expect("1 is a valid cluster id");
        for k in 0..n {
            let d = self.source.committed().0 + 1;
            if d > self.p.records {
                break;
            }
            // Several ops, so that a record splits across target partitions; they share the
            // value bytes of one op, so that records stay as large as with one.
            let n_ops = self.rng.random_range(1..=3);
            let ops = (0..n_ops)
                .map(|_| {
                    let key = format!("k{}", self.rng.random_range(0..40)).into_bytes();
                    if self.rng.random_bool(0.15) {
                        Op::Delete { key }
                    } else {
                        let len = self.rng.random_range(0..80 / n_ops);
                        Op::Put {
                            key,
                            value: vec![(d % 251) as u8; len],
                            expire_at_ms: 0,
                        }
                    }
                })
                .collect();
            self.source.plog.push(PlogRecord {
                decree: Decree(d),
                // Timestamps strictly increase within a burst, like the hybrid clock.
                timetag: Timetag::new(self.wall_us(now) + k, cluster, false),
                ops,
            });
        }
        let gap = self.p.commit_gap;
        self.source.next_commit_at = now + self.rand(gap);
        let committed = self.source.committed();
        self.event(format!("source commits ..={committed}"));
        if committed.0 >= self.p.records {
            let tail = self.p.fault_tail;
            self.faults_end = Some(now + tail);
            self.event(format!("source done; faults end at +{} ms", tail / MS));
        }
        let at = self.at(now);
        let ts = self.wall_us(now);
        for i in 0..self.shippers.len() {
            if let Some(sess) = self.session_mut(i) {
                sess.ship.handle_committed(committed, ts, at);
                self.pump_ship(i)?;
            }
        }
        Ok(())
    }

    fn deliver_due(&mut self) -> Result<(), SimFailure> {
        let now = self.now;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            // Bounded: what is left is still due at the next step.
            for _ in 0..10_000 {
                let Some(c) = self.conns.get_mut(&id) else {
                    break;
                };
                if c.to_recv.front().is_some_and(|(t, _)| *t <= now) {
                    let Some((_, msg)) = c.to_recv.pop_front() else {
                        break;
                    };
                    self.at_receiver(id, msg)?;
                } else if c.to_ship.front().is_some_and(|(t, _)| *t <= now) {
                    let Some((_, msg)) = c.to_ship.pop_front() else {
                        break;
                    };
                    self.at_shipper(id, msg)?;
                } else {
                    break;
                }
            }
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.ship_detect_at.is_some_and(|t| t <= now) {
                c.ship_detect_at = None;
                c.to_ship.clear();
                let shipper = c.shipper;
                let open = c.ship_open && c.ship_inc == self.shippers[shipper].incarnation;
                c.ship_open = false;
                if open {
                    self.event(format!("conn {id}: shipper {shipper} notices the loss"));
                    let at = self.at(now);
                    if let Some(sess) = self.session_for_conn(shipper, id) {
                        sess.ship
                            .handle_connection_lost("connection lost (idle timeout)", at);
                        self.pump_ship(shipper)?;
                    }
                }
            }
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.recv_detect_at.is_some_and(|t| t <= now) {
                c.recv_detect_at = None;
                c.to_recv.clear();
                let open = c.recv_open && c.recv_inc == self.receiver.incarnation;
                c.recv_open = false;
                if open {
                    self.event(format!("conn {id}: receiver notices the loss"));
                    self.receiver_closed(id)?;
                }
            }
            self.gc_conn(id);
        }
        Ok(())
    }

    fn gc_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.get(&id) {
            if !c.ship_open
                && !c.recv_open
                && c.to_recv.is_empty()
                && c.to_ship.is_empty()
                && c.ship_detect_at.is_none()
                && c.recv_detect_at.is_none()
            {
                self.conns.remove(&id);
            }
        }
    }

    // ---- connections ----

    fn send(&mut self, id: u64, to_receiver: bool, msg: Msg) {
        let now = self.now;
        let jitter_max = self.conns.get(&id).map_or(0, |c| c.delay / 4);
        let jitter = self.rand((0, jitter_max));
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let open = if to_receiver {
            c.ship_open
        } else {
            c.recv_open
        };
        if !open || c.broken {
            return;
        }
        let q = if to_receiver {
            &mut c.to_recv
        } else {
            &mut c.to_ship
        };
        // In order within a stream.
        let t = q.back().map_or(0, |(t, _)| *t).max(now + c.delay + jitter);
        q.push_back((t, msg));
    }

    /// Both sides lose the connection; each notices after its own delay.
    fn break_conn(&mut self, id: u64, why: &str) {
        let (a, b) = (self.rand(self.p.detect), self.rand(self.p.detect));
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&id) {
            c.broken = true;
            c.to_recv.clear();
            c.to_ship.clear();
            if c.ship_open {
                c.ship_detect_at = Some(now + a);
            }
            if c.recv_open {
                c.recv_detect_at = Some(now + b);
            }
            self.event(format!(
                "conn {id} breaks ({why}); shipper notices +{} ms, receiver +{} ms",
                a / MS,
                b / MS
            ));
        }
    }

    // ---- faults ----

    fn inject_fault(&mut self) -> Result<(), SimFailure> {
        self.report.faults += 1;
        match self.rng.random_range(0..100) {
            0..=24 => {
                let open: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| !c.broken && (c.ship_open || c.recv_open))
                    .map(|(id, _)| *id)
                    .collect();
                if !open.is_empty() {
                    let id = open[self.rng.random_range(0..open.len())];
                    self.break_conn(id, "loss");
                }
            }
            25..=39 => self.abandon_conn()?,
            40..=49 => {
                let dur = self.rng.random_range(10..500) * MS;
                self.link_down_until = self.now + dur;
                self.event(format!("link partitioned for {} ms", dur / MS));
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                for id in ids {
                    self.break_conn(id, "partition");
                }
            }
            50..=64 => {
                let i = self.rng.random_range(0..self.shippers.len());
                self.crash_shipper(i)?;
            }
            65..=79 => self.crash_receiver()?,
            80..=92 => self.takeover(),
            _ => {
                let dur = self.rng.random_range(50..4_000) * MS;
                self.receiver.disk_bad_until = self.now + dur;
                self.event(format!("receiver disk fails fsyncs for {} ms", dur / MS));
            }
        }
        Ok(())
    }

    /// The shipper gives up on its connection (say its own idle timeout fired first) while the
    /// frames it sent are still on their way: they reach the receiver late, possibly after the
    /// next session's.
    fn abandon_conn(&mut self) -> Result<(), SimFailure> {
        let open: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ship_open && !c.broken)
            .map(|(id, _)| *id)
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let id = open[self.rng.random_range(0..open.len())];
        let extra = self.rng.random_range(50..600) * MS;
        let detect = self.rand(self.p.detect);
        let now = self.now;
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let shipper = c.shipper;
        c.ship_open = false;
        c.to_ship.clear();
        for (t, _) in c.to_recv.iter_mut() {
            *t += extra;
        }
        let last = c.to_recv.back().map_or(now, |(t, _)| *t);
        if c.recv_open {
            c.recv_detect_at = Some(last.max(now) + detect);
        }
        self.event(format!(
            "conn {id}: shipper {shipper} abandons it; its frames in flight arrive {} ms late",
            extra / MS
        ));
        let at = self.at(now);
        if let Some(sess) = self.session_for_conn(shipper, id) {
            sess.ship
                .handle_connection_lost("abandoned (simulated idle timeout)", at);
            self.pump_ship(shipper)?;
        }
        Ok(())
    }

    fn crash_shipper(&mut self, i: usize) -> Result<(), SimFailure> {
        if !self.shippers[i].alive {
            return Ok(());
        }
        let restart = self.rand(self.p.restart);
        let now = self.now;
        let s = &mut self.shippers[i];
        s.alive = false;
        s.incarnation += 1;
        s.restart_at = Some(now + restart);
        s.campaign_after = 0;
        let term = s.term.take();
        self.note_skips(term.as_ref());
        if let Some((leader, token)) = self.etcd.leader {
            if leader == i {
                self.etcd.expiry = Some((now + self.p.lease_ttl, token));
            }
        }
        self.event(format!(
            "CRASH shipper {i} (restarts in {} ms)",
            restart / MS
        ));
        let detect = self.rand(self.p.detect);
        for c in self.conns.values_mut().filter(|c| c.shipper == i) {
            c.ship_open = false;
            c.to_ship.clear();
            if c.recv_open && c.recv_detect_at.is_none() {
                let last = c.to_recv.back().map_or(now, |(t, _)| *t);
                c.recv_detect_at = Some(last.max(now) + detect);
            }
        }
        Ok(())
    }

    fn crash_receiver(&mut self) -> Result<(), SimFailure> {
        if !self.receiver.alive {
            return Ok(());
        }
        let restart = self.rand(self.p.restart);
        // Each target partition's fsync still running is lost, or its data had reached the
        // disk anyway (never acknowledged, so either is allowed), independently.
        let mut fates = Vec::new();
        if let Some(a) = self.receiver.append.take() {
            let healthy = self.receiver.disk_bad_until <= self.now;
            for (tp, part) in a.parts.into_iter().enumerate() {
                let Some((records, _)) = part else {
                    continue;
                };
                if healthy && self.rng.random_bool(0.5) {
                    fates.push(format!("partition {tp}'s lands"));
                    self.land(tp, a.conn, records)?;
                } else {
                    fates.push(format!("partition {tp}'s is lost"));
                }
            }
        }
        let fates = if fates.is_empty() {
            String::new()
        } else {
            format!("; of the fsyncs in flight, {}", fates.join(", "))
        };
        let r = &mut self.receiver;
        r.alive = false;
        r.incarnation += 1;
        r.restart_at = Some(self.now + restart);
        r.sessions.clear();
        r.live = None;
        self.event(format!(
            "CRASH receiver (restarts in {} ms){fates}; durable ..={} ([{}])",
            restart / MS,
            self.receiver.durable(),
            self.receiver.lasts()
        ));
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            let detect = self.rand(self.p.detect);
            let now = self.now;
            if let Some(c) = self.conns.get_mut(&id) {
                c.recv_open = false;
                c.to_recv.clear();
                if c.ship_open && c.ship_detect_at.is_none() {
                    let last = c.to_ship.back().map_or(now, |(t, _)| *t);
                    c.ship_detect_at = Some(last.max(now) + detect);
                }
            }
        }
        Ok(())
    }

    /// The other shipper wins the election (the leader's lease was lost without it knowing):
    /// the old leader goes on shipping as a zombie until it notices.
    fn takeover(&mut self) {
        let Some((old, _)) = self.etcd.leader else {
            return;
        };
        let Some(new) = (0..self.shippers.len())
            .find(|&i| i != old && self.shippers[i].alive && self.shippers[i].term.is_none())
        else {
            return;
        };
        self.etcd.revision += 1;
        let token = self.etcd.revision;
        self.etcd.leader = Some((new, token));
        let notice = self.rand((0, self.p.lease_ttl));
        let now = self.now;
        if let Some(term) = self.shippers[old].term.as_mut() {
            term.lease_lost_at = Some(now + notice);
        }
        self.start_term(new, token);
        self.event(format!(
            "TAKEOVER: shipper {new} wins with token {token}; shipper {old} notices in {} ms",
            notice / MS
        ));
    }

    // ---- shippers ----

    fn session_mut(&mut self, i: usize) -> Option<&mut Sess> {
        self.shippers[i].term.as_mut()?.session.as_mut()
    }

    fn session_for_conn(&mut self, i: usize, conn: u64) -> Option<&mut Sess> {
        self.session_mut(i).filter(|s| s.conn == conn)
    }

    fn start_term(&mut self, i: usize, token: u64) {
        let now = self.now;
        let interval = self.p.progress_interval;
        self.shippers[i].term = Some(Term {
            token,
            carry: Carry::default(),
            confirmed: Confirmed::default(),
            retry: Retry::new(self.p.fail_mode),
            session: None,
            connect_fail_at: None,
            next_session_at: now,
            next_progress_at: now + interval,
            written: None,
            stopped: false,
            lease_lost_at: None,
        });
    }

    fn shipper_due(&mut self, i: usize) -> Result<(), SimFailure> {
        let now = self.now;
        if !self.shippers[i].alive {
            return Ok(());
        }
        if self.shippers[i].term.is_none() {
            if self.etcd.leader.is_none() && self.shippers[i].campaign_after <= now {
                self.etcd.revision += 1;
                let token = self.etcd.revision;
                self.etcd.leader = Some((i, token));
                self.start_term(i, token);
                self.event(format!("shipper {i} wins the election: token {token}"));
            }
            return Ok(());
        }
        if self.shippers[i]
            .term
            .as_ref()
            .and_then(|t| t.lease_lost_at)
            .is_some_and(|t| t <= now)
        {
            self.event(format!("shipper {i} notices it lost the election"));
            return self.end_term(i, true);
        }
        // Session timers.
        let timeout = self
            .session_mut(i)
            .and_then(|s| s.ship.poll_timeout())
            .map(|d| self.to_t(d));
        if timeout.is_some_and(|t| t <= now) {
            let at = self.at(now);
            if let Some(s) = self.session_mut(i) {
                s.ship.handle_timeout(at);
            }
            self.pump_ship(i)?;
        }
        // Connection attempts.
        let Some(term) = self.shippers[i].term.as_mut() else {
            return Ok(());
        };
        if term.connect_fail_at.is_some_and(|t| t <= now) {
            term.connect_fail_at = None;
            self.session_over(
                i,
                Failure::Transport("cannot connect to the receiver (unreachable)".into()),
                None,
            )?;
        } else if term.session.is_none()
            && term.connect_fail_at.is_none()
            && !term.stopped
            && term.next_session_at <= now
        {
            self.start_session(i)?;
        }
        // Progress writer.
        let due = self.shippers[i]
            .term
            .as_ref()
            .is_some_and(|t| t.next_progress_at <= now);
        if due {
            self.write_progress(i)?;
        }
        Ok(())
    }

    fn start_session(&mut self, i: usize) -> Result<(), SimFailure> {
        let now = self.now;
        self.report.sessions += 1;
        let reachable = self.receiver.alive && self.link_down_until <= now;
        let Some(term) = self.shippers[i].term.as_mut() else {
            return Ok(());
        };
        if !reachable {
            term.connect_fail_at = Some(now + CONNECT_TIMEOUT);
            return Ok(());
        }
        let token = term.token;
        let mut carry = term.carry.clone();
        carry.progressed = false;
        let id = self.next_conn;
        self.next_conn += 1;
        let delay = self.rand(self.p.delay);
        self.conns.insert(
            id,
            Conn {
                shipper: i,
                ship_inc: self.shippers[i].incarnation,
                recv_inc: self.receiver.incarnation,
                delay,
                to_recv: VecDeque::new(),
                to_ship: VecDeque::new(),
                ship_open: true,
                recv_open: true,
                broken: false,
                ship_detect_at: None,
                recv_detect_at: None,
            },
        );
        let ship = ShipSession::new(
            self.p.ship.clone(),
            SessionId {
                receiver: "receiver:7000".into(),
                cluster_id: ClusterId::new(1).expect("1 is a valid cluster id"),
                dupid: DupId(1),
                table: "users".into(),
                partition: PartitionId(0),
                fencing_token: token,
            },
            carry,
            self.at(now),
            self.wall_us(now),
        );
        if let Some(term) = self.shippers[i].term.as_mut() {
            term.session = Some(Sess {
                conn: id,
                ship,
                confirmed: Decree::ZERO,
            });
        }
        self.event(format!(
            "shipper {i} opens conn {id} (token {token}, one-way {} µs)",
            delay
        ));
        self.pump_ship(i)
    }

    /// Drains the session's outputs.
    fn pump_ship(&mut self, i: usize) -> Result<(), SimFailure> {
        for _ in 0..100_000 {
            let now = self.now;
            let at = self.at(now);
            let Some(sess) = self.session_mut(i) else {
                return Ok(());
            };
            let conn = sess.conn;
            let Some(ev) = sess.ship.poll() else {
                return Ok(());
            };
            match ev {
                ShipEvent::ReadPlog {
                    from,
                    upto,
                    max_bytes,
                } => {
                    let records = self.source.read(from, upto, max_bytes);
                    if let Some(sess) = self.session_mut(i) {
                        sess.ship.handle_records(records, at);
                    }
                }
                ShipEvent::Send(frame) => {
                    match &frame {
                        Frame::Batch(_) => self.report.batches += 1,
                        Frame::Heartbeat(_) => self.report.heartbeats += 1,
                        _ => {}
                    }
                    self.send(conn, true, Msg::Frame(frame));
                }
                ShipEvent::Confirmed(c) => {
                    let durable = self.receiver.durable();
                    if c.decree > durable {
                        violated!(
                            self,
                            "(b) acknowledged => durable",
                            "shipper {i} saw decree {} confirmed (conn {conn}) but the target \
                             holds only ..={durable} durably",
                            c.decree
                        );
                    }
                    let Some(term) = self.shippers[i].term.as_mut() else {
                        return Ok(());
                    };
                    let before = term.confirmed;
                    term.confirmed.merge(c);
                    let after = term.confirmed.decree;
                    let sess_before = term.session.as_ref().map_or(Decree::ZERO, |s| s.confirmed);
                    if let Some(s) = term.session.as_mut() {
                        s.confirmed = c.decree;
                    }
                    if after < before.decree || c.decree < sess_before {
                        violated!(
                            self,
                            "(e) progress monotonic",
                            "shipper {i}'s confirmed decree went from {} to {} (session {} → {})",
                            before.decree,
                            after,
                            sess_before,
                            c.decree
                        );
                    }
                    self.acked_max = self.acked_max.max(c.decree);
                }
                ShipEvent::Lag(_) => {}
                ShipEvent::End(f) => {
                    return self.session_over(i, f, Some(conn));
                }
            }
        }
        violated!(
            self,
            "(liveness)",
            "shipper {i}'s session produced 100000 events at once"
        )
    }

    /// A session ended (or its connection attempt failed): retry by fail mode, as the
    /// partition task does.
    fn session_over(
        &mut self,
        i: usize,
        failure: Failure,
        conn: Option<u64>,
    ) -> Result<(), SimFailure> {
        let now = self.now;
        if let Some(id) = conn {
            // The shipper finishes its stream.
            self.send(id, true, Msg::Fin);
            if let Some(c) = self.conns.get_mut(&id) {
                c.ship_open = false;
                c.to_ship.clear();
            }
        }
        let Some(term) = self.shippers[i].term.as_mut() else {
            return Ok(());
        };
        if let Some(sess) = term.session.take() {
            let stats = sess.ship.stats().clone();
            term.carry = sess.ship.into_carry();
            self.report.skipped_ops += stats.skipped_ops;
            self.skipped_max = self.skipped_max.max(term.carry.skipped_through);
        }
        if term.carry.progressed {
            term.retry.on_success();
        }
        let token = term.token;
        let action = match &failure {
            Failure::Cancelled => None,
            Failure::Fenced(_) => {
                self.event(format!("shipper {i} session ends: FENCED: {failure}"));
                if self.etcd.leader == Some((i, token)) {
                    violated!(
                        self,
                        "(f) only a lost election fences",
                        "shipper {i} was told its token {token} is stale while it still leads \
                         its election"
                    );
                }
                return self.end_term(i, false);
            }
            Failure::Gone(_) => {
                term.stopped = true;
                None
            }
            Failure::Batch(_) => Some(term.retry.on_failure()),
            Failure::Transport(_) => Some(term.retry.on_transport_failure()),
        };
        let what = match action {
            Some(Action::RetryAfter(d)) => {
                term.next_session_at = now + d.as_micros() as u64;
                format!("retry in {} ms", d.as_millis())
            }
            Some(Action::SkipBatch) => {
                term.carry.skip_first = true;
                term.next_session_at = now;
                "FAIL_SKIP: skip the first batch".to_string()
            }
            Some(Action::Stop) => {
                term.stopped = true;
                "FAIL_FAST: stop".to_string()
            }
            None => "no retry".to_string(),
        };
        let conn = conn.map_or("no conn".to_string(), |c| format!("conn {c}"));
        self.event(format!(
            "shipper {i} session ends ({conn}): {failure:?}; {what}"
        ));
        Ok(())
    }

    /// Remembers how far a term's FAIL_SKIP stripped ops, before the term is dropped.
    fn note_skips(&mut self, term: Option<&Term>) {
        if let Some(term) = term {
            let live = term
                .session
                .as_ref()
                .map(|s| s.ship.carry().skipped_through);
            let through = term.carry.skipped_through.max(live.unwrap_or_default());
            self.skipped_max = self.skipped_max.max(through);
        }
    }

    /// The term ends: the session is cancelled, the election resigned if still held.
    fn end_term(&mut self, i: usize, lease_lost: bool) -> Result<(), SimFailure> {
        let Some(mut term) = self.shippers[i].term.take() else {
            return Ok(());
        };
        self.note_skips(Some(&term));
        if let Some(mut sess) = term.session.take() {
            sess.ship.cancel();
            let conn = sess.conn;
            self.send(conn, true, Msg::Fin);
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ship_open = false;
                c.to_ship.clear();
            }
        }
        if !lease_lost && self.etcd.leader == Some((i, term.token)) {
            self.etcd.leader = None;
        }
        self.shippers[i].campaign_after = self.now + CAMPAIGN_PAUSE;
        self.event(format!("shipper {i} term of token {} ends", term.token));
        Ok(())
    }

    /// The progress writer: fenced by the election, as `advance_progress` on a fenced store.
    fn write_progress(&mut self, i: usize) -> Result<(), SimFailure> {
        let interval = self.p.progress_interval;
        let now = self.now;
        let leader = self.etcd.leader;
        let stored = self.etcd.progress;
        let fence = self.receiver.fence;
        let Some(term) = self.shippers[i].term.as_mut() else {
            return Ok(());
        };
        term.next_progress_at = now + interval;
        let c = term.confirmed;
        if !c.known || term.written == Some(c.decree) {
            return Ok(());
        }
        let token = term.token;
        if leader != Some((i, token)) {
            self.report.fenced_writes += 1;
            self.event(format!(
                "shipper {i} progress write ..={} refused: the election key of token {token} is gone",
                c.decree
            ));
            return self.end_term(i, true);
        }
        term.written = Some(c.decree);
        if token < fence {
            violated!(
                self,
                "(c) fenced shipper advanced progress",
                "shipper {i} with token {token} wrote progress {} while the receiver holds fence {fence}",
                c.decree
            );
        }
        if let Some((d, _)) = stored {
            if c.decree < d {
                violated!(
                    self,
                    "(e) progress monotonic",
                    "the leader (shipper {i}, token {token}) wrote progress {} below the stored {d}",
                    c.decree
                );
            }
        }
        self.etcd.progress = Some((c.decree, c.timestamp_us / 1000));
        self.event(format!(
            "shipper {i} persists progress ..={} (token {token})",
            c.decree
        ));
        Ok(())
    }

    fn at_shipper(&mut self, id: u64, msg: Msg) -> Result<(), SimFailure> {
        let Some(c) = self.conns.get(&id) else {
            return Ok(());
        };
        let i = c.shipper;
        if !c.ship_open || c.ship_inc != self.shippers[i].incarnation || !self.shippers[i].alive {
            return Ok(());
        }
        let at = self.at(self.now);
        let stored = self.etcd.progress;
        let committed = self.source.committed();
        let wall = self.wall_us(self.now);
        let Some(term) = self.shippers[i].term.as_mut() else {
            return Ok(());
        };
        let local = term.confirmed;
        let Some(sess) = term.session.as_mut().filter(|s| s.conn == id) else {
            return Ok(());
        };
        match msg {
            Msg::Frame(Frame::Welcome(w)) => {
                // The driver's resume point (the shipper's `resume::start_point`).
                let (start, ts) = match stored {
                    Some((d, ms)) => {
                        let after = w.confirmed_decree.max(d);
                        let ts = if after == d { ms * 1000 } else { 0 };
                        (after.max(local.decree), ts)
                    }
                    None if w.confirmed_decree > Decree::ZERO => {
                        (w.confirmed_decree.max(local.decree), 0)
                    }
                    None if local.known => (local.decree, local.timestamp_us),
                    // A new dup, created before the first write.
                    None => (Decree::ZERO, 0),
                };
                sess.ship.handle_welcome(&w, start, ts, at);
                sess.ship.handle_committed(committed, wall, at);
                let msg = format!(
                    "shipper {i} conn {id}: Welcome ..={}, stored {:?}, starts after {start}",
                    w.confirmed_decree,
                    stored.map(|(d, _)| d)
                );
                self.event(msg);
            }
            Msg::Frame(Frame::Ack(a)) => sess.ship.handle_ack(a.confirmed_decree, at),
            Msg::Frame(Frame::Error(e)) => sess.ship.handle_error(&e, at),
            Msg::Frame(other) => sess.ship.handle_unexpected(&other, at),
            Msg::Fin => {
                sess.ship
                    .handle_connection_lost("the receiver finished the stream", at);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.ship_open = false;
                }
            }
        }
        self.pump_ship(i)
    }

    // ---- receiver ----

    fn at_receiver(&mut self, id: u64, msg: Msg) -> Result<(), SimFailure> {
        let Some(c) = self.conns.get(&id) else {
            return Ok(());
        };
        if !c.recv_open || c.recv_inc != self.receiver.incarnation || !self.receiver.alive {
            return Ok(());
        }
        let frame = match msg {
            Msg::Fin => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.recv_open = false;
                }
                return self.receiver_closed(id);
            }
            Msg::Frame(f) => f,
        };
        let rs = self.receiver.sessions.entry(id).or_insert(RSess {
            token: 0,
            state: RState::AwaitHello,
        });
        match &mut rs.state {
            RState::AwaitHello => self.hello(id, frame),
            RState::Open(s) => {
                s.handle_frame(&frame, MAX_RAW);
                self.pump_receiver(id)
            }
            // The real session reads nothing before its Welcome; a frame that comes early
            // waits in the stream. Here the shipper sends nothing before the Welcome either.
            RState::WaitSlot | RState::Done => Ok(()),
        }
    }

    fn hello(&mut self, id: u64, frame: Frame) -> Result<(), SimFailure> {
        let Frame::Hello(hello) = frame else {
            return self.refuse(
                id,
                receive::Refusal {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message: "the first frame of a session must be Hello".into(),
                },
            );
        };
        let table = TableView {
            partition_count: self.p.target_partitions,
            placement: vec![Some("n1".into()); self.p.target_partitions as usize],
        };
        let ctx = HelloContext {
            peer_cluster: "bj",
            peer_cluster_id: ClusterId::new(1).expect("1 is a valid cluster id"),
            our_cluster: "tj",
            node: "n1",
            table: Some(&table),
        };
        if let Err(r) = receive::check_hello(&hello, &ctx) {
            return self.refuse(id, r);
        }
        let token = hello.fencing_token;
        let live = self.receiver.live.and_then(|l| {
            self.receiver
                .sessions
                .get(&l)
                .filter(|s| !matches!(s.state, RState::Done))
                .map(|s| (l, s.token))
        });
        match receive::admit(self.receiver.fence, live, token) {
            Admission::Stale { newest } => {
                self.report.stale_refusals += 1;
                self.event(format!(
                    "receiver refuses conn {id}: token {token} < {newest}"
                ));
                self.refuse(
                    id,
                    receive::stale_refusal(token, newest, "dup 1 partition 0 of table `users`"),
                )
            }
            Admission::Accept { persist, preempt } => {
                if persist {
                    self.receiver.fence = token;
                }
                if let Some(s) = self.receiver.sessions.get_mut(&id) {
                    s.token = token;
                    s.state = RState::WaitSlot;
                }
                self.receiver.live = Some(id);
                self.event(format!(
                    "receiver admits conn {id} (token {token}{}{})",
                    if persist { ", stored" } else { "" },
                    preempt.map_or(String::new(), |p| format!(", preempts conn {p}"))
                ));
                if let Some(old) = preempt {
                    let old_token = self.receiver.sessions.get(&old).map_or(0, |s| s.token);
                    let reason = receive::preempted(old_token, token, "partition 0");
                    match self.receiver.sessions.get_mut(&old).map(|s| &mut s.state) {
                        Some(RState::Open(s)) => {
                            s.stop(reason);
                            self.pump_receiver(old)?;
                        }
                        Some(st @ RState::WaitSlot) => {
                            *st = RState::Done;
                            self.send(old, false, Msg::Frame(Frame::Error(reason)));
                            self.send(old, false, Msg::Fin);
                            if let Some(c) = self.conns.get_mut(&old) {
                                c.recv_open = false;
                            }
                        }
                        _ => {}
                    }
                }
                self.open_waiting()
            }
        }
    }

    fn refuse(&mut self, id: u64, r: receive::Refusal) -> Result<(), SimFailure> {
        if let Some(s) = self.receiver.sessions.get_mut(&id) {
            s.state = RState::Done;
        }
        self.send(id, false, Msg::Frame(r.frame()));
        self.send(id, false, Msg::Fin);
        if let Some(c) = self.conns.get_mut(&id) {
            c.recv_open = false;
        }
        Ok(())
    }

    /// Opens the session waiting for the inbox slot, once no other session holds it.
    fn open_waiting(&mut self) -> Result<(), SimFailure> {
        let busy = self.receiver.append.is_some()
            || self
                .receiver
                .sessions
                .values()
                .any(|s| matches!(&s.state, RState::Open(rs) if !rs.is_ended()));
        if busy {
            return Ok(());
        }
        let Some(id) = self
            .receiver
            .sessions
            .iter()
            .find(|(_, s)| matches!(s.state, RState::WaitSlot))
            .map(|(id, _)| *id)
        else {
            return Ok(());
        };
        let durable = self.receiver.durable();
        if self.receiver.uneven() {
            self.report.uneven_welcomes += 1;
        }
        if let Some(s) = self.receiver.sessions.get_mut(&id) {
            s.state = RState::Open(Box::new(ReceiveSession::new(s.token, durable)));
        }
        self.pump_receiver(id)
    }

    fn receiver_closed(&mut self, id: u64) -> Result<(), SimFailure> {
        if let Some(RState::Open(s)) = self.receiver.sessions.get_mut(&id).map(|s| &mut s.state) {
            s.handle_closed();
            self.pump_receiver(id)?;
        }
        if let Some(s) = self.receiver.sessions.get_mut(&id) {
            if !matches!(s.state, RState::Open(_)) {
                s.state = RState::Done;
            }
        }
        self.session_done(id)
    }

    fn session_done(&mut self, id: u64) -> Result<(), SimFailure> {
        let ended = match self.receiver.sessions.get(&id).map(|s| &s.state) {
            Some(RState::Open(s)) => s.is_ended(),
            Some(RState::Done) | None => true,
            _ => false,
        };
        if ended {
            if self.receiver.live == Some(id) {
                self.receiver.live = None;
            }
            // Keep the entry while its append runs; drop it otherwise.
            if self.receiver.append.as_ref().is_none_or(|a| a.conn != id) {
                self.receiver.sessions.remove(&id);
            }
            return self.open_waiting();
        }
        Ok(())
    }

    fn pump_receiver(&mut self, id: u64) -> Result<(), SimFailure> {
        for _ in 0..100_000 {
            let Some(RState::Open(s)) = self.receiver.sessions.get_mut(&id).map(|s| &mut s.state)
            else {
                return Ok(());
            };
            let token = s.token();
            let Some(ev) = s.poll() else {
                return Ok(());
            };
            match ev {
                ReceiveEvent::Append {
                    first,
                    last,
                    records,
                } => {
                    if token != self.receiver.fence || self.receiver.live != Some(id) {
                        violated!(
                            self,
                            "(c) fenced session appended",
                            "conn {id} (token {token}) starts an append {first}..={last} while \
                             the fence is {} and the live session is {:?}",
                            self.receiver.fence,
                            self.receiver.live
                        );
                    }
                    if let Some(a) = &self.receiver.append {
                        violated!(
                            self,
                            "(d) one append at a time",
                            "conn {id} starts an append while conn {} has one in fsync",
                            a.conn
                        );
                    }
                    // What the session hands over follows what every target partition holds
                    // (the session's resend filter); each inbox then skips what it has itself.
                    let durable = self.receiver.durable();
                    let mut expect = if durable == Decree::ZERO {
                        first
                    } else {
                        durable.next()
                    };
                    for r in &records {
                        if r.decree != expect {
                            violated!(
                                self,
                                "(d) appended at most once, contiguous",
                                "conn {id}'s append {first}..={last} has decree {} where every \
                                 target partition holds ..={durable}, so {expect} comes next",
                                r.decree
                            );
                        }
                        expect = expect.next();
                    }
                    let parts = route::split(records, self.p.target_partitions)
                        .into_iter()
                        .map(|part| Some((part, self.now + self.rand(self.p.fsync))))
                        .collect();
                    self.event(format!("receiver conn {id}: append {first}..={last}"));
                    self.receiver.append = Some(Append {
                        conn: id,
                        parts,
                        failed: false,
                    });
                }
                ReceiveEvent::Send(frame) => self.send(id, false, Msg::Frame(frame)),
                ReceiveEvent::End(err) => {
                    if let Some(e) = &err {
                        self.event(format!(
                            "receiver ends conn {id}: {} {}",
                            e.code.name(),
                            e.message
                        ));
                        self.send(id, false, Msg::Frame(Frame::Error(e.clone())));
                    }
                    self.send(id, false, Msg::Fin);
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.recv_open = false;
                    }
                    return self.session_done(id);
                }
            }
        }
        violated!(
            self,
            "(liveness)",
            "receive session of conn {id} produced 100000 events at once"
        )
    }

    /// Completes the fsyncs that are due, each target partition's on its own; once every part
    /// is done, the session learns the outcome: the append failed if any part's fsync did
    /// (the parts that completed keep their records, as on a real disk), else it is durable up
    /// to the minimum over the target partitions.
    fn fsync_due(&mut self) -> Result<(), SimFailure> {
        let now = self.now;
        let Some(a) = self.receiver.append.as_mut() else {
            return Ok(());
        };
        let conn = a.conn;
        let bad = self.receiver.disk_bad_until > now;
        let mut done = Vec::new();
        for (tp, part) in a.parts.iter_mut().enumerate() {
            if part.as_ref().is_some_and(|(_, t)| *t <= now) {
                if let Some((records, _)) = part.take() {
                    done.push((tp, records));
                }
            }
        }
        if bad && !done.is_empty() {
            a.failed = true;
        }
        let finished = a.parts.iter().all(Option::is_none);
        for (tp, records) in done {
            if bad {
                self.event(format!(
                    "receiver fsync of target partition {tp} fails (conn {conn})"
                ));
            } else {
                self.land(tp, conn, records)?;
                let last = self.receiver.inboxes[tp].last();
                self.event(format!(
                    "receiver fsync of target partition {tp} done: ..={last} (conn {conn})"
                ));
            }
        }
        if !finished {
            return Ok(());
        }
        let Some(a) = self.receiver.append.take() else {
            return Ok(());
        };
        let durable = self.receiver.durable();
        if !a.failed {
            self.report.appends += 1;
            self.event(format!(
                "receiver append done: durable ..={durable} ([{}])",
                self.receiver.lasts()
            ));
        }
        if let Some(RState::Open(s)) = self.receiver.sessions.get_mut(&conn).map(|s| &mut s.state) {
            if a.failed {
                s.handle_append_failed("cannot write the inbox: injected fsync failure");
            } else {
                s.handle_appended(durable);
            }
        }
        self.pump_receiver(conn)?;
        self.session_done(conn)
    }

    /// Target partition `tp`'s part of conn `conn`'s append reached its disk: the inbox rule
    /// applies, and a part it refuses violates (d).
    fn land(&mut self, tp: usize, conn: u64, records: Vec<PlogRecord>) -> Result<(), SimFailure> {
        let Some(inbox) = self.receiver.inboxes.get_mut(tp) else {
            return Ok(());
        };
        let last = inbox.last();
        if let Err((got, expect)) = inbox.append(records) {
            violated!(
                self,
                "(d) appended at most once, contiguous",
                "conn {conn}'s append has decree {got} where target partition {tp}'s inbox \
                 (durable ..={last}) expects {expect}"
            );
        }
        Ok(())
    }

    // ---- invariants ----

    fn check(&mut self) -> Result<(), SimFailure> {
        let durable = self.receiver.durable();
        let progress = self.etcd.progress.map_or(Decree::ZERO, |(d, _)| d);
        if progress > durable {
            violated!(
                self,
                "(a) persisted progress <= durable",
                "etcd holds confirmed decree {progress} but the target holds only ..={durable} durably"
            );
        }
        if self.acked_max > durable {
            violated!(
                self,
                "(b) acknowledged => durable",
                "a shipper saw decree {} confirmed but the target holds only ..={durable} durably",
                self.acked_max
            );
        }
        if progress < self.last_progress {
            violated!(
                self,
                "(e) progress monotonic",
                "persisted progress went from {} to {progress}",
                self.last_progress
            );
        }
        if durable < self.last_durable {
            violated!(
                self,
                "(e) progress monotonic",
                "the durable inbox went from ..={} to ..={durable}",
                self.last_durable
            );
        }
        for (tp, inbox) in self.receiver.inboxes.iter().enumerate() {
            let (was, last) = (self.last_inboxes[tp], inbox.last());
            if last < was {
                violated!(
                    self,
                    "(e) progress monotonic",
                    "target partition {tp}'s inbox went from ..={was} to ..={last}"
                );
            }
            self.last_inboxes[tp] = last;
        }
        self.last_progress = progress;
        self.last_durable = durable;
        Ok(())
    }

    fn final_check(&mut self) -> Result<(), SimFailure> {
        // Sessions still running may have stripped a batch too.
        for i in 0..self.shippers.len() {
            let term = self.shippers[i].term.take();
            self.note_skips(term.as_ref());
            self.shippers[i].term = term;
        }
        // Every target partition holds every committed decree, with exactly the source's ops
        // whose key maps to it.
        let n = self.p.target_partitions;
        for (tp, inbox) in self.receiver.inboxes.iter().enumerate() {
            if inbox.records.len() != self.source.plog.len() {
                violated!(
                    self,
                    "(b) target holds every committed record",
                    "target partition {tp}'s inbox holds {} records, the source committed {}",
                    inbox.records.len(),
                    self.source.plog.len()
                );
            }
            for (got, want) in inbox.records.iter().zip(&self.source.plog) {
                let ops: Vec<&Op> = want
                    .ops
                    .iter()
                    .filter(|op| partition_of(op.key(), n).0 as usize == tp)
                    .collect();
                let stripped_ok = got.ops.is_empty()
                    && got.decree <= self.skipped_max
                    && self.p.fail_mode == FailMode::Skip;
                if got.decree != want.decree
                    || got.timetag != want.timetag
                    || (!got.ops.iter().eq(ops.iter().copied()) && !stripped_ok)
                {
                    let (d, w) = (got.decree, want.decree);
                    violated!(
                        self,
                        "(b) target holds every committed record",
                        "target partition {tp}'s inbox record at decree {d} differs from the \
                         source's decree {w} (ops {} vs {} of the source's {} that map to it; \
                         FAIL_SKIP skipped through {})",
                        got.ops.len(),
                        ops.len(),
                        want.ops.len(),
                        self.skipped_max
                    );
                }
            }
        }
        Ok(())
    }
}
