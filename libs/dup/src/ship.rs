//! One shipping session of one (dup, source partition), without I/O: [`ShipSession`].
//!
//! In the style of quinn-proto's `Connection`: the driver (the shipper's tokio task, or the
//! simulator in [`crate::sim`]) feeds it events, each with the current time, and asks it what to
//! do next. It never reads a clock, a file or a socket.
//!
//! ```text
//! new ─▶ poll: Send(Hello)
//! handle_welcome(welcome, start)            (the driver decides the start, see below)
//! loop:
//!   poll: ReadPlog{from, upto, max_bytes}  ─▶ handle_records(records) / handle_read_gone / …
//!   poll: Send(Batch) … (at most `window_batches` unacknowledged)
//!   poll: Send(Heartbeat) when idle for `heartbeat_interval`
//!   handle_committed(decree)                (the node's committed marker moved)
//!   handle_ack(confirmed) ─▶ poll: Confirmed{decree} (to persist), Lag(AckLag) (metrics)
//!   handle_timeout at poll_timeout()        (small-batch hold, heartbeat, ack timeout)
//! poll: End(Failure)                        (then nothing more)
//! ```
//!
//! Order of calls: after every input, call [`ShipSession::poll`] until it returns `None`, then
//! wait for the next input or for [`ShipSession::poll_timeout`], whichever comes first.
//!
//! Where to resume stays in the driver (it needs etcd and, for a new dup, a plog search): it is
//! the larger of the `Welcome`'s decree, the stored progress and what this leadership term has
//! confirmed (see the shipper's `resume` module). The driver passes it to
//! [`ShipSession::handle_welcome`].
//!
//! Wall time: lag is measured on the source's wall clock (see [`crate::lag`]). The session
//! derives it from one anchor (`now` ↔ wall µs) given at construction, re-anchored by
//! [`ShipSession::set_wall_clock`] as often as the driver likes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ferry_proto::wire::{self, ErrorCode, Frame, Heartbeat, Hello, Welcome};
use ferry_proto::{ClusterId, Decree, DupId, PartitionId, PlogRecord};
use thiserror::Error;

use crate::lag::{AckLag, LagTracker};
use crate::window::{Limits, Window};

/// While a batch is unacknowledged, a batch that would be less than half full is sent at most
/// this long after the previous one (it waits for more commits to fill it, or for the ack).
/// Every batch costs the receiver one fsync per target partition, so a few fuller batches reach
/// the target sooner than a small one per group commit; a backlog still fills the whole window
/// with full batches, and on a long link a batch waits at most this long, not a round trip.
/// Measured with `bench dup` (see docs/quic-tuning.md).
pub const SMALL_BATCH_GAP: Duration = Duration::from_millis(5);

/// After a read came back empty although the committed marker said there was more, look again
/// after this long (the shipper's fallback poll of the committed marker).
pub const EMPTY_READ_RETRY: Duration = Duration::from_millis(50);

/// How long to wait for the receiver's `Error` frame after a send failed (it stops the stream
/// first, then says why).
pub const REASON_WAIT: Duration = Duration::from_secs(1);

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Failure {
    /// The connection, the receiver lookup or the receiver's session checks failed; nothing is
    /// wrong with any batch. Retried (FAIL_FAST stops).
    #[error("{0}")]
    Transport(String),
    /// A batch was refused or never acknowledged. FAIL_SKIP may skip it after bounded retries.
    #[error("{0}")]
    Batch(String),
    /// The receiver knows a newer shipper for this partition: stop shipping, campaign again.
    #[error("{0}")]
    Fenced(String),
    /// The records to ship were garbage-collected: full duplication is needed.
    #[error("{0}")]
    Gone(String),
    /// The partition task is stopping.
    #[error("stopped")]
    Cancelled,
}

impl Failure {
    /// The sentence to show an operator (`last_error` on the status board).
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// What the progress writer persists; updated from [`ShipEvent::Confirmed`], read every
/// `progress_interval`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confirmed {
    /// The highest decree the target made durable.
    pub decree: Decree,
    /// Commit time of the record at `decree` (µs), 0 if unknown.
    pub timestamp_us: u64,
    /// Whether a session has decided the start (before that, nothing is written to etcd).
    pub known: bool,
}

impl Confirmed {
    /// Merges what a session reported into the progress cell: it only moves forward, and the
    /// first report makes it known.
    pub fn merge(&mut self, reported: Confirmed) {
        if reported.decree > self.decree || !self.known {
            let timestamp_us = if reported.timestamp_us > 0 || reported.decree > self.decree {
                reported.timestamp_us
            } else {
                self.timestamp_us
            };
            *self = Confirmed {
                decree: self.decree.max(reported.decree),
                timestamp_us,
                known: true,
            };
        }
    }
}

/// What carries over from one session to the next within one leadership term.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carry {
    /// FAIL_SKIP gave up on the first unconfirmed batch: send it without its ops.
    pub skip_first: bool,
    /// Records up to here were already counted as skipped.
    pub skipped_through: Decree,
    /// An ack advanced the confirmed decree during the last session (the retry backoff resets).
    pub progressed: bool,
}

/// Records sent with their ops removed: decrees stay contiguous (the inbox needs that), the
/// writes are not applied on the target. How FAIL_SKIP skips a batch. Returns how many records
/// had ops.
pub fn strip_ops(records: &mut [PlogRecord]) -> u64 {
    let mut n = 0;
    for r in records {
        if !r.ops.is_empty() {
            n += 1;
        }
        r.ops.clear();
    }
    n
}

/// The receiver's `Error` frame as a failure. A stale fencing token means a newer shipper
/// leads; batch-level codes count against the batch in flight (FAIL_SKIP may skip it); the rest
/// (`unknown_table`, `unauthorized`, `unavailable`, ...) are retried without skipping anything.
pub fn refused(addr: &str, e: &wire::Error, batch_in_flight: bool) -> Failure {
    let msg = format!(
        "receiver {addr} refused: {} ({})",
        e.message.trim(),
        e.code.name()
    );
    match e.code {
        ErrorCode::STALE_FENCING_TOKEN => Failure::Fenced(msg),
        ErrorCode::BAD_BATCH | ErrorCode::INTERNAL | ErrorCode::MALFORMED if batch_in_flight => {
            Failure::Batch(msg)
        }
        _ => Failure::Transport(msg),
    }
}

/// Tuning of a session; the shipper's `[shipper]` config keys in brackets.
#[derive(Debug, Clone)]
pub struct ShipConfig {
    /// Unacknowledged batches at most (`window_batches`).
    pub window_batches: usize,
    /// Plog bytes per batch at most (`duplicate_log_batch_bytes`).
    pub batch_bytes: u64,
    /// See [`SMALL_BATCH_GAP`].
    pub small_batch_gap: Duration,
    /// A heartbeat after this long without sending anything (`heartbeat_interval`).
    pub heartbeat_interval: Duration,
    /// The Welcome, and the ack of the oldest batch in flight, must come within this
    /// (`ack_timeout`).
    pub ack_timeout: Duration,
    /// A confirmed write older than this counts as lagging (`dup_lagging_write_threshold_ms`).
    pub lagging_threshold_ms: u64,
    /// zstd level of the batches (`zstd_level`).
    pub zstd_level: i32,
}

impl Default for ShipConfig {
    /// The shipper's defaults.
    fn default() -> Self {
        ShipConfig {
            window_batches: 8,
            batch_bytes: 1 << 20,
            small_batch_gap: SMALL_BATCH_GAP,
            heartbeat_interval: Duration::from_millis(500),
            ack_timeout: Duration::from_secs(30),
            lagging_threshold_ms: 10_000,
            zstd_level: 1,
        }
    }
}

/// Who this session ships for, and to whom: what goes into the `Hello`.
#[derive(Debug, Clone)]
pub struct SessionId {
    /// The receiver's address, for messages.
    pub receiver: String,
    /// This (source) cluster's id.
    pub cluster_id: ClusterId,
    pub dupid: DupId,
    /// The target table.
    pub table: String,
    /// The source partition.
    pub partition: PartitionId,
    /// The revision of this shipper's election for the partition.
    pub fencing_token: u64,
}

/// What the driver must do next. See the module docs for the order of calls.
#[derive(Debug, Clone, PartialEq)]
pub enum ShipEvent {
    /// Read committed plog records `from ..= upto`, at most `max_bytes` of them (at least one
    /// record if any exists), and answer with [`ShipSession::handle_records`] (or
    /// [`ShipSession::handle_read_gone`] / [`ShipSession::handle_read_failed`]). At most one
    /// read is outstanding.
    ReadPlog {
        from: Decree,
        upto: Decree,
        max_bytes: u64,
    },
    /// Send this frame on the session's stream, in order.
    Send(Frame),
    /// The target made everything up to here durable: merge it into the progress cell
    /// ([`Confirmed::merge`]) that the progress writer persists.
    Confirmed(Confirmed),
    /// What an ack completed, for the lag histograms and counters.
    Lag(AckLag),
    /// The session is over; nothing follows. The driver decides by fail mode what next.
    End(Failure),
}

/// Counters of one session, for the driver to export (`dup_*` metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShipStats {
    /// Records confirmed by acks (`dup_shipped_ops_total`).
    pub shipped_ops: u64,
    /// Records whose ops FAIL_SKIP stripped, each counted once per term
    /// (`dup_failed_shipping_ops_total`).
    pub skipped_ops: u64,
    /// Plog bytes read (`dup_log_read_bytes_total`).
    pub log_read_bytes: u64,
    /// Uncompressed batch bytes sent.
    pub raw_bytes: u64,
    /// Compressed batch bytes sent (`dup_shipped_bytes_total`).
    pub wire_bytes: u64,
    /// Batches sent.
    pub batches: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Confirmed writes over the lagging threshold (`dup_lagging_writes_total`).
    pub lagging_writes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hello sent (or about to be), waiting for the Welcome until the deadline.
    AwaitWelcome {
        deadline: Instant,
    },
    Shipping,
    /// A send failed: waiting up to the deadline for the receiver's reason.
    Closing {
        deadline: Instant,
    },
    Ended,
}

/// One shipping session, without I/O. See the module docs.
#[derive(Debug)]
pub struct ShipSession {
    config: ShipConfig,
    id: SessionId,
    carry: Carry,
    state: State,
    out: VecDeque<ShipEvent>,
    hello_sent: bool,
    window: Window,
    tracker: LagTracker,
    stats: ShipStats,
    /// The committed marker, as last told.
    committed: Decree,
    committed_time_us: u64,
    /// A read request is outstanding.
    reading: bool,
    /// An empty read: do not read again before this.
    read_retry_at: Option<Instant>,
    /// The small-batch hold: the next batch waits until then.
    hold_until: Option<Instant>,
    last_send: Instant,
    now: Instant,
    /// The wall clock anchor: `wall_us` at `wall_at`.
    wall_at: Instant,
    wall_us: u64,
    first_batch: bool,
    /// Encoded bytes per record in the last batch read (0: not known yet).
    record_bytes: u64,
    /// Why the send failed, while closing.
    send_error: String,
}

impl ShipSession {
    /// A session that will say `Hello` for `id`; `now` and `wall_us` anchor its wall clock.
    pub fn new(
        config: ShipConfig,
        id: SessionId,
        carry: Carry,
        now: Instant,
        wall_us: u64,
    ) -> ShipSession {
        let limits = Limits {
            max_batches: config.window_batches,
            // Bytes are bounded by the batch count; this only guards against oversized records.
            max_bytes: config
                .batch_bytes
                .saturating_mul(config.window_batches as u64)
                .saturating_mul(2),
        };
        ShipSession {
            state: State::AwaitWelcome {
                deadline: now + config.ack_timeout,
            },
            config,
            id,
            carry,
            out: VecDeque::new(),
            hello_sent: false,
            window: Window::new(Decree::ZERO, limits),
            tracker: LagTracker::default(),
            stats: ShipStats::default(),
            committed: Decree::ZERO,
            committed_time_us: 0,
            reading: false,
            read_retry_at: None,
            hold_until: None,
            last_send: now,
            now,
            wall_at: now,
            wall_us,
            first_batch: true,
            record_bytes: 0,
            send_error: String::new(),
        }
    }

    // ---- getters ----

    /// The highest decree the target confirmed in this session (the start before any ack).
    pub fn confirmed(&self) -> Decree {
        self.window.confirmed()
    }

    /// The first decree of the next batch to send.
    pub fn next_decree(&self) -> Decree {
        self.window.next_decree()
    }

    /// The committed decree and its commit time, as last told.
    pub fn committed(&self) -> (Decree, u64) {
        (self.committed, self.committed_time_us)
    }

    /// Batches sent and not acknowledged.
    pub fn in_flight_batches(&self) -> usize {
        self.window.in_flight_batches()
    }

    /// Commit time of the oldest record sent and not confirmed (for the lag gauge).
    pub fn oldest_unconfirmed_us(&self) -> Option<u64> {
        self.tracker.oldest_unconfirmed_us()
    }

    /// Whether the Welcome came and shipping runs.
    pub fn is_shipping(&self) -> bool {
        self.state == State::Shipping
    }

    /// Whether the session ended (its `End` may still be waiting in [`ShipSession::poll`]).
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// This session's counters.
    pub fn stats(&self) -> &ShipStats {
        &self.stats
    }

    /// What carries over to the next session of this term.
    pub fn carry(&self) -> &Carry {
        &self.carry
    }

    /// The carry-over, once the session is done.
    pub fn into_carry(self) -> Carry {
        self.carry
    }

    // ---- inputs ----

    /// Re-anchors the wall clock: at `now` it is `wall_us`.
    pub fn set_wall_clock(&mut self, now: Instant, wall_us: u64) {
        self.wall_at = now;
        self.wall_us = wall_us;
    }

    /// The receiver's `Welcome` came; ship the records after `start` (the driver's resume
    /// point: never below the Welcome's decree, which wins if it is larger).
    /// `start_timestamp_us` is the commit time of the record at `start`, 0 if unknown.
    pub fn handle_welcome(
        &mut self,
        welcome: &Welcome,
        start: Decree,
        start_timestamp_us: u64,
        now: Instant,
    ) {
        self.now = now;
        if !matches!(self.state, State::AwaitWelcome { .. }) {
            if self.state == State::Shipping {
                self.end(Failure::Transport(format!(
                    "receiver {} sent a second Welcome",
                    self.id.receiver
                )));
            }
            return;
        }
        let (start, ts) = if welcome.confirmed_decree > start {
            // The receiver holds more than the driver knew: acks will say so, and the window
            // must not call them "beyond what was sent".
            (welcome.confirmed_decree, 0)
        } else {
            (start, start_timestamp_us)
        };
        self.tracker.set_last_confirmed_us(ts);
        self.window = Window::new(
            start,
            Limits {
                max_batches: self.config.window_batches,
                max_bytes: self
                    .config
                    .batch_bytes
                    .saturating_mul(self.config.window_batches as u64)
                    .saturating_mul(2),
            },
        );
        self.state = State::Shipping;
        self.last_send = now;
        self.out.push_back(ShipEvent::Confirmed(Confirmed {
            decree: start,
            timestamp_us: ts,
            known: true,
        }));
    }

    /// The node's committed marker: records up to `decree` are durable in the plog.
    pub fn handle_committed(&mut self, decree: Decree, commit_time_us: u64, now: Instant) {
        self.now = now;
        self.committed = decree;
        self.committed_time_us = commit_time_us;
        self.read_retry_at = None;
    }

    /// The answer to [`ShipEvent::ReadPlog`]: the records read, in decree order from `from`.
    pub fn handle_records(&mut self, mut records: Vec<PlogRecord>, now: Instant) {
        self.now = now;
        if self.state != State::Shipping || !self.reading {
            return;
        }
        self.reading = false;
        if records.is_empty() {
            self.read_retry_at = Some(now + EMPTY_READ_RETRY);
            return;
        }
        let read_bytes: u64 = records.iter().map(|r| r.encoded_len() as u64).sum();
        self.record_bytes = (read_bytes / records.len() as u64).max(1);
        let strip = self.carry.skip_first && self.first_batch;
        if strip {
            // Counted once per record: a retried skip strips the same records again. (The
            // shipper counted the whole batch again whenever it reached past the last one.)
            let through = self.carry.skipped_through;
            let new = records
                .iter()
                .filter(|r| r.decree > through && !r.ops.is_empty())
                .count() as u64;
            strip_ops(&mut records);
            self.stats.skipped_ops += new;
        }
        let batch = wire::pack_batch(&records, self.config.zstd_level);
        let (first, last) = (batch.first_decree, batch.last_decree);
        if strip {
            self.carry.skipped_through = self.carry.skipped_through.max(last);
        }
        self.first_batch = false;
        let raw = u64::from(batch.raw_len);
        let wire_len = batch.zstd.len() as u64;
        let frame = Frame::Batch(batch);
        if let Err(e) = frame.check_limits() {
            return self.end(Failure::Batch(format!(
                "batch {first}..={last} is too large to send ({e}); lower duplicate_log_batch_bytes, or a single record exceeds the frame limit"
            )));
        }
        if let Err(e) = self.window.on_sent(first, last, wire_len, now) {
            return self.end(Failure::Transport(format!("internal: {e}")));
        }
        self.out.push_back(ShipEvent::Send(frame));
        self.last_send = now;
        self.tracker.on_sent(&records);
        self.stats.log_read_bytes += read_bytes;
        self.stats.raw_bytes += raw;
        self.stats.wire_bytes += wire_len;
        self.stats.batches += 1;
    }

    /// The answer to [`ShipEvent::ReadPlog`]: GC removed `wanted`; the plog begins at `oldest`.
    pub fn handle_read_gone(&mut self, wanted: Decree, oldest: Decree, now: Instant) {
        self.now = now;
        self.reading = false;
        self.end(Failure::Gone(format!(
            "start decree {wanted} is no longer in the plog of partition {} (it begins at {oldest}): the source collected it before the target confirmed it",
            self.id.partition
        )));
    }

    /// The answer to [`ShipEvent::ReadPlog`]: reading failed.
    pub fn handle_read_failed(&mut self, message: &str, now: Instant) {
        self.now = now;
        self.reading = false;
        self.end(Failure::Transport(format!(
            "reading the plog failed: {message}"
        )));
    }

    /// An `Ack` came.
    pub fn handle_ack(&mut self, confirmed: Decree, now: Instant) {
        self.now = now;
        match self.state {
            State::Shipping => {}
            // Acks before the reason carry nothing the next Welcome would not tell.
            State::Closing { .. } => return,
            State::AwaitWelcome { .. } => {
                return self.end(Failure::Transport(format!(
                    "receiver {} answered Hello with Ack, not Welcome",
                    self.id.receiver
                )))
            }
            State::Ended => return,
        }
        let before = self.window.confirmed();
        if let Err(e) = self.window.on_ack(confirmed, now) {
            return self.end(Failure::Transport(format!(
                "receiver {} broke the protocol: {e}",
                self.id.receiver
            )));
        }
        let confirmed = self.window.confirmed();
        if confirmed <= before {
            return;
        }
        let lag = self.tracker.on_ack(
            confirmed,
            self.wall_clock_us(now),
            self.config.lagging_threshold_ms,
        );
        self.stats.shipped_ops += lag.confirmed_records;
        self.stats.lagging_writes += lag.lagging_writes;
        self.out.push_back(ShipEvent::Confirmed(Confirmed {
            decree: confirmed,
            timestamp_us: self.tracker.last_confirmed_us().unwrap_or(0),
            known: true,
        }));
        self.out.push_back(ShipEvent::Lag(lag));
        if self.carry.skip_first && confirmed >= self.carry.skipped_through {
            self.carry.skip_first = false;
        }
        self.carry.progressed = true;
    }

    /// The receiver's `Error` frame came: the session ends, classified by [`refused`].
    pub fn handle_error(&mut self, e: &wire::Error, now: Instant) {
        self.now = now;
        if self.state == State::Ended {
            return;
        }
        // Before the Welcome the window is empty: nothing in flight to blame.
        let in_flight = self.window.in_flight_batches() > 0;
        self.end(refused(&self.id.receiver, e, in_flight));
    }

    /// Another frame came than `Welcome`, `Ack` or `Error`: the receiver broke the protocol.
    pub fn handle_unexpected(&mut self, frame: &Frame, now: Instant) {
        self.now = now;
        let what = if matches!(self.state, State::AwaitWelcome { .. }) {
            format!("answered Hello with {}, not Welcome", frame.name())
        } else {
            format!("sent an unexpected {} frame", frame.name())
        };
        self.end(Failure::Transport(format!(
            "receiver {} {what}",
            self.id.receiver
        )));
    }

    /// Sending failed (the receiver stopped the stream, or flow control stalled past
    /// `ack_timeout`). The receiver says why in an `Error` frame if it can: keep feeding frames
    /// (acks are ignored now); without one by [`REASON_WAIT`] it is a transport failure.
    pub fn handle_send_failed(&mut self, error: &str, now: Instant) {
        self.now = now;
        if matches!(self.state, State::Ended | State::Closing { .. }) {
            return;
        }
        self.send_error = error.to_string();
        self.state = State::Closing {
            deadline: now + REASON_WAIT,
        };
    }

    /// The connection or stream broke, with no frame left to read.
    pub fn handle_connection_lost(&mut self, error: &str, now: Instant) {
        self.now = now;
        let msg = match self.state {
            State::Closing { .. } => self.send_error.clone(),
            _ => format!("receiver {}: {error}", self.id.receiver),
        };
        self.end(Failure::Transport(msg));
    }

    /// Time passed; call at (or after) [`ShipSession::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        match self.state {
            State::AwaitWelcome { deadline } if now >= deadline => {
                let msg = format!(
                    "receiver {} did not answer Hello within {:?}",
                    self.id.receiver, self.config.ack_timeout
                );
                self.end(Failure::Transport(msg));
            }
            State::Closing { deadline } if now >= deadline => {
                let msg = self.send_error.clone();
                self.end(Failure::Transport(msg));
            }
            State::Shipping => {
                if let Some(waited) = self.window.oldest_wait(now) {
                    if waited >= self.config.ack_timeout {
                        let msg = format!(
                            "receiver {} has not acknowledged batch {} and later within {:?}",
                            self.id.receiver,
                            self.window.confirmed().next(),
                            self.config.ack_timeout
                        );
                        self.end(Failure::Batch(msg));
                    }
                }
            }
            _ => {}
        }
    }

    /// The partition task is stopping.
    pub fn cancel(&mut self) {
        self.end(Failure::Cancelled);
    }

    // ---- outputs ----

    /// The next thing to do, if any. Call until `None` after every input.
    pub fn poll(&mut self) -> Option<ShipEvent> {
        if !self.hello_sent {
            self.hello_sent = true;
            if matches!(self.state, State::AwaitWelcome { .. }) {
                return Some(ShipEvent::Send(Frame::Hello(Hello {
                    version: wire::PROTOCOL_VERSION,
                    cluster_id: self.id.cluster_id,
                    dupid: self.id.dupid,
                    table: self.id.table.clone(),
                    partition: self.id.partition,
                    fencing_token: self.id.fencing_token,
                    purpose: wire::Purpose::Log,
                })));
            }
        }
        if self.out.is_empty() && self.state == State::Shipping {
            self.step();
        }
        self.out.pop_front()
    }

    /// When [`ShipSession::handle_timeout`] must be called next, if anything waits on time.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitWelcome { deadline } | State::Closing { deadline } => Some(deadline),
            State::Ended => None,
            State::Shipping => {
                let ack = self
                    .window
                    .oldest_wait(self.now)
                    .map(|waited| self.now + self.config.ack_timeout.saturating_sub(waited));
                let heartbeat = self
                    .is_idle()
                    .then(|| self.last_send + self.config.heartbeat_interval);
                let retry = if self.reading {
                    None
                } else {
                    self.read_retry_at
                };
                [ack, heartbeat, self.hold_until, retry]
                    .into_iter()
                    .flatten()
                    .min()
            }
        }
    }

    // ---- helpers ----

    /// Fills the window, or sends a heartbeat when idle.
    fn step(&mut self) {
        let now = self.now;
        self.hold_until = None;
        if self.reading {
            return;
        }
        if self.read_retry_at.is_some_and(|t| now < t) {
            return self.maybe_heartbeat();
        }
        self.read_retry_at = None;
        if !self.window.has_room() {
            return;
        }
        let next = self.window.next_decree();
        if next > self.committed {
            return self.maybe_heartbeat();
        }
        let pending = self.committed.0 + 1 - next.0;
        let due = self.last_send + self.config.small_batch_gap;
        if self.window.in_flight_batches() > 0
            && now < due
            && pending.saturating_mul(self.record_bytes) < self.config.batch_bytes / 2
        {
            self.hold_until = Some(due);
            return;
        }
        self.reading = true;
        self.out.push_back(ShipEvent::ReadPlog {
            from: next,
            upto: self.committed,
            max_bytes: self.config.batch_bytes.max(1),
        });
    }

    /// Nothing to read and nothing in flight: shipping is idle.
    fn is_idle(&self) -> bool {
        self.state == State::Shipping
            && !self.reading
            && self.window.in_flight_batches() == 0
            && (self.window.next_decree() > self.committed || self.read_retry_at.is_some())
    }

    fn maybe_heartbeat(&mut self) {
        let now = self.now;
        if self.is_idle()
            && now.saturating_duration_since(self.last_send) >= self.config.heartbeat_interval
        {
            self.out
                .push_back(ShipEvent::Send(Frame::Heartbeat(Heartbeat {
                    source_timestamp_us: self.wall_clock_us(now),
                    committed_decree: self.committed,
                })));
            self.last_send = now;
            self.stats.heartbeats += 1;
        }
    }

    fn wall_clock_us(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.wall_at).as_micros();
        self.wall_us
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }

    fn end(&mut self, failure: Failure) {
        if self.state == State::Ended {
            return;
        }
        self.state = State::Ended;
        self.hold_until = None;
        // Whatever was queued (a batch to send, a read) is moot, except progress and lag the
        // driver must still record.
        self.out
            .retain(|e| matches!(e, ShipEvent::Confirmed(_) | ShipEvent::Lag(_)));
        self.out.push_back(ShipEvent::End(failure));
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Op, Timetag};

    use super::*;

    const WALL: u64 = 1_000_000_000;

    fn config() -> ShipConfig {
        ShipConfig {
            window_batches: 2,
            batch_bytes: 10_000,
            small_batch_gap: Duration::from_millis(5),
            heartbeat_interval: Duration::from_millis(500),
            ack_timeout: Duration::from_secs(3),
            lagging_threshold_ms: 1_000,
            zstd_level: 1,
        }
    }

    fn id() -> SessionId {
        SessionId {
            receiver: "r:7000".into(),
            cluster_id: ClusterId::new(1).expect("valid id"),
            dupid: DupId(3),
            table: "users".into(),
            partition: PartitionId(2),
            fencing_token: 42,
        }
    }

    fn recs(decrees: std::ops::RangeInclusive<u64>) -> Vec<PlogRecord> {
        let c = ClusterId::new(1).expect("valid id");
        decrees
            .map(|d| PlogRecord {
                decree: Decree(d),
                // Committed at WALL + d ms.
                timetag: Timetag::new(WALL + d * 1000, c, false),
                ops: vec![Op::Put {
                    key: format!("k{d}").into_bytes(),
                    value: vec![1; 10],
                    expire_at_ms: 0,
                }],
            })
            .collect()
    }

    fn welcome(d: u64) -> Welcome {
        Welcome {
            confirmed_decree: Decree(d),
            present_files: vec![],
        }
    }

    fn drain(s: &mut ShipSession) -> Vec<ShipEvent> {
        std::iter::from_fn(|| s.poll()).collect()
    }

    /// A session past its Welcome, shipping after `start`, with `committed` committed.
    fn shipping(
        config: ShipConfig,
        carry: Carry,
        start: u64,
        committed: u64,
    ) -> (ShipSession, Instant) {
        let t = Instant::now();
        let mut s = ShipSession::new(config, id(), carry, t, WALL);
        assert!(
            matches!(s.poll(), Some(ShipEvent::Send(Frame::Hello(h))) if h.fencing_token == 42 && h.partition == PartitionId(2))
        );
        s.handle_welcome(&welcome(start), Decree(start), 0, t);
        s.handle_committed(Decree(committed), 0, t);
        (s, t)
    }

    fn batch_of(e: &ShipEvent) -> &wire::Batch {
        match e {
            ShipEvent::Send(Frame::Batch(b)) => b,
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn hello_welcome_then_reads_after_the_start() {
        let (mut s, _) = shipping(config(), Carry::default(), 7, 20);
        let evs = drain(&mut s);
        assert_eq!(
            evs,
            vec![
                ShipEvent::Confirmed(Confirmed {
                    decree: Decree(7),
                    timestamp_us: 0,
                    known: true
                }),
                ShipEvent::ReadPlog {
                    from: Decree(8),
                    upto: Decree(20),
                    max_bytes: 10_000
                },
            ]
        );
        assert!(s.is_shipping());
    }

    #[test]
    fn the_welcome_wins_when_it_is_ahead_of_the_start() {
        let t = Instant::now();
        let mut s = ShipSession::new(config(), id(), Carry::default(), t, WALL);
        drain(&mut s);
        s.handle_welcome(&welcome(9), Decree(4), 0, t);
        assert_eq!(s.confirmed(), Decree(9));
        assert_eq!(s.next_decree(), Decree(10));
    }

    #[test]
    fn the_window_fills_then_waits_for_acks() {
        let mut c = config();
        c.small_batch_gap = Duration::ZERO;
        let (mut s, t) = shipping(c, Carry::default(), 0, 100);
        drain(&mut s);
        s.handle_records(recs(1..=10), t);
        let evs = drain(&mut s);
        assert_eq!(batch_of(&evs[0]).first_decree, Decree(1));
        assert_eq!(
            evs[1],
            ShipEvent::ReadPlog {
                from: Decree(11),
                upto: Decree(100),
                max_bytes: 10_000
            }
        );
        s.handle_records(recs(11..=20), t);
        let evs = drain(&mut s);
        assert_eq!(evs.len(), 1, "window of 2 is full: no more reads ({evs:?})");
        assert_eq!(s.in_flight_batches(), 2);
        s.handle_ack(Decree(10), t);
        let evs = drain(&mut s);
        assert!(matches!(
            evs[0],
            ShipEvent::Confirmed(Confirmed {
                decree: Decree(10),
                ..
            })
        ));
        assert!(matches!(&evs[1], ShipEvent::Lag(l) if l.confirmed_records == 10));
        assert_eq!(
            evs[2],
            ShipEvent::ReadPlog {
                from: Decree(21),
                upto: Decree(100),
                max_bytes: 10_000
            }
        );
        assert_eq!(s.stats().shipped_ops, 10);
        assert_eq!(s.stats().batches, 2);
        assert!(s.carry().progressed);
    }

    #[test]
    fn a_small_batch_waits_while_one_is_in_flight() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 1);
        drain(&mut s);
        s.handle_records(recs(1..=1), t);
        drain(&mut s);
        // Two more records: far less than half a batch, and a batch is in flight.
        let t1 = t + Duration::from_millis(1);
        s.handle_committed(Decree(3), 0, t1);
        assert_eq!(drain(&mut s), vec![], "held");
        assert_eq!(
            s.poll_timeout(),
            Some(t + Duration::from_millis(5)),
            "until the gap passes"
        );
        s.handle_timeout(t + Duration::from_millis(5));
        assert_eq!(
            drain(&mut s),
            vec![ShipEvent::ReadPlog {
                from: Decree(2),
                upto: Decree(3),
                max_bytes: 10_000
            }]
        );
    }

    #[test]
    fn a_backlog_is_not_held() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 1);
        drain(&mut s);
        s.handle_records(recs(1..=1), t);
        drain(&mut s);
        // ~45 bytes a record: 1000 pending records fill well over half a batch.
        s.handle_committed(Decree(1001), 0, t);
        assert_eq!(
            drain(&mut s),
            vec![ShipEvent::ReadPlog {
                from: Decree(2),
                upto: Decree(1001),
                max_bytes: 10_000
            }]
        );
    }

    #[test]
    fn an_idle_session_sends_heartbeats() {
        let (mut s, t) = shipping(config(), Carry::default(), 5, 5);
        drain(&mut s);
        let due = t + Duration::from_millis(500);
        assert_eq!(s.poll_timeout(), Some(due));
        s.handle_timeout(due - Duration::from_millis(1));
        assert_eq!(drain(&mut s), vec![]);
        s.handle_timeout(due);
        assert_eq!(
            drain(&mut s),
            vec![ShipEvent::Send(Frame::Heartbeat(Heartbeat {
                source_timestamp_us: WALL + 500_000,
                committed_decree: Decree(5),
            }))]
        );
        assert_eq!(s.stats().heartbeats, 1);
        assert_eq!(s.poll_timeout(), Some(due + Duration::from_millis(500)));
        // The ack of a heartbeat confirms nothing new.
        s.handle_ack(Decree(5), due);
        assert_eq!(drain(&mut s), vec![]);
    }

    #[test]
    fn an_unacknowledged_batch_times_out() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 3);
        drain(&mut s);
        s.handle_records(recs(1..=3), t);
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(3)));
        s.handle_timeout(t + Duration::from_secs(3));
        let evs = drain(&mut s);
        assert!(
            matches!(&evs[..], [ShipEvent::End(Failure::Batch(m))] if m.contains("batch 1 and later") && m.contains("r:7000")),
            "{evs:?}"
        );
        assert!(s.is_ended());
        s.handle_ack(Decree(3), t);
        assert_eq!(drain(&mut s), vec![], "nothing after the end");
    }

    #[test]
    fn fail_skip_strips_the_first_batch_and_counts_it_once() {
        let carry = Carry {
            skip_first: true,
            ..Carry::default()
        };
        let (mut s, t) = shipping(config(), carry, 0, 4);
        drain(&mut s);
        s.handle_records(recs(1..=4), t);
        let evs = drain(&mut s);
        let b = batch_of(&evs[0]);
        let sent = wire::unpack_batch(b, 1 << 20).expect("valid batch");
        assert_eq!(
            sent.iter().map(|r| r.decree.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert!(sent.iter().all(|r| r.ops.is_empty()), "ops stripped");
        assert_eq!(s.stats().skipped_ops, 4);
        assert_eq!(s.carry().skipped_through, Decree(4));
        // The session fails before the ack: the next one strips again, without counting again.
        let carry = s.into_carry();
        assert!(carry.skip_first);
        let (mut s, t) = shipping(config(), carry, 0, 6);
        drain(&mut s);
        s.handle_records(recs(1..=6), t);
        let evs = drain(&mut s);
        let sent = wire::unpack_batch(batch_of(&evs[0]), 1 << 20).expect("valid batch");
        assert!(sent.iter().all(|r| r.ops.is_empty()));
        assert_eq!(s.stats().skipped_ops, 2, "only 5 and 6 are new");
        s.handle_ack(Decree(6), t);
        drain(&mut s);
        assert!(!s.carry().skip_first, "confirmed past the skipped batch");
        // Later batches keep their ops.
        s.handle_committed(Decree(7), 0, t);
        drain(&mut s);
        s.handle_records(recs(7..=7), t);
        let evs = drain(&mut s);
        let sent = wire::unpack_batch(batch_of(&evs[0]), 1 << 20).expect("valid batch");
        assert_eq!(sent[0].ops.len(), 1);
    }

    #[test]
    fn an_ack_beyond_what_was_sent_breaks_the_protocol() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 3);
        drain(&mut s);
        s.handle_records(recs(1..=3), t);
        drain(&mut s);
        s.handle_ack(Decree(4), t);
        assert!(
            matches!(&drain(&mut s)[..], [ShipEvent::End(Failure::Transport(m))] if m.contains("broke the protocol"))
        );
    }

    #[test]
    fn the_welcome_must_come_in_time() {
        let t = Instant::now();
        let mut s = ShipSession::new(config(), id(), Carry::default(), t, WALL);
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(3)));
        s.handle_timeout(t + Duration::from_secs(3));
        assert!(
            matches!(&drain(&mut s)[..], [ShipEvent::End(Failure::Transport(m))] if m.contains("did not answer Hello"))
        );
    }

    #[test]
    fn a_refusal_before_the_welcome_is_classified() {
        let t = Instant::now();
        let mut s = ShipSession::new(config(), id(), Carry::default(), t, WALL);
        drain(&mut s);
        s.handle_error(
            &wire::Error {
                code: ErrorCode::STALE_FENCING_TOKEN,
                message: "newer".into(),
            },
            t,
        );
        assert!(matches!(
            &drain(&mut s)[..],
            [ShipEvent::End(Failure::Fenced(_))]
        ));
    }

    #[test]
    fn after_a_failed_send_the_reason_decides() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 3);
        drain(&mut s);
        s.handle_records(recs(1..=3), t);
        drain(&mut s);
        s.handle_send_failed("stream stopped", t);
        s.handle_ack(Decree(3), t);
        assert_eq!(drain(&mut s), vec![], "acks before the reason are ignored");
        s.handle_error(
            &wire::Error {
                code: ErrorCode::BAD_BATCH,
                message: "bad".into(),
            },
            t,
        );
        assert!(matches!(
            &drain(&mut s)[..],
            [ShipEvent::End(Failure::Batch(_))]
        ));

        let (mut s, t) = shipping(config(), Carry::default(), 0, 0);
        drain(&mut s);
        s.handle_send_failed("stream stopped", t);
        assert_eq!(s.poll_timeout(), Some(t + REASON_WAIT));
        s.handle_timeout(t + REASON_WAIT);
        assert_eq!(
            drain(&mut s),
            vec![ShipEvent::End(Failure::Transport("stream stopped".into()))]
        );
    }

    #[test]
    fn cancel_ends_at_once_but_keeps_progress() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 3);
        drain(&mut s);
        s.handle_records(recs(1..=3), t);
        drain(&mut s);
        s.handle_ack(Decree(3), t);
        s.cancel();
        let evs = drain(&mut s);
        assert!(matches!(
            evs[0],
            ShipEvent::Confirmed(Confirmed {
                decree: Decree(3),
                ..
            })
        ));
        assert_eq!(evs.last(), Some(&ShipEvent::End(Failure::Cancelled)));
    }

    #[test]
    fn lag_is_measured_on_the_anchored_wall_clock() {
        let (mut s, t) = shipping(config(), Carry::default(), 0, 2);
        drain(&mut s);
        s.handle_records(recs(1..=2), t);
        drain(&mut s);
        // Record 2 was committed at WALL + 2 ms; acked at WALL + 1.002 s: 1000 ms of lag.
        s.handle_ack(Decree(2), t + Duration::from_millis(1002));
        let evs = drain(&mut s);
        let ShipEvent::Lag(lag) = &evs[1] else {
            panic!("{evs:?}")
        };
        assert_eq!(lag.batch_lags_ms, vec![1000]);
        assert_eq!(
            lag.lagging_writes, 1,
            "record 1 is 1001 ms old, over the 1000 ms threshold"
        );
        assert_eq!(
            evs[0],
            ShipEvent::Confirmed(Confirmed {
                decree: Decree(2),
                timestamp_us: WALL + 2000,
                known: true
            })
        );
    }

    #[test]
    fn confirmed_only_moves_forward() {
        let mut c = Confirmed::default();
        c.merge(Confirmed {
            decree: Decree(0),
            timestamp_us: 0,
            known: true,
        });
        assert!(c.known, "the first report makes it known, even at 0");
        c.merge(Confirmed {
            decree: Decree(5),
            timestamp_us: 50,
            known: true,
        });
        c.merge(Confirmed {
            decree: Decree(3),
            timestamp_us: 30,
            known: true,
        });
        assert_eq!(
            c,
            Confirmed {
                decree: Decree(5),
                timestamp_us: 50,
                known: true
            }
        );
    }

    #[test]
    fn skipping_keeps_decrees_and_drops_ops() {
        let mut r = recs(1..=3);
        r[1].ops.clear();
        assert_eq!(strip_ops(&mut r), 2, "records that had ops");
        assert!(r.iter().all(|r| r.ops.is_empty()));
        assert_eq!(
            r.iter().map(|r| r.decree.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn receiver_errors_are_classified() {
        let err = |code, msg: &str| wire::Error {
            code,
            message: msg.into(),
        };
        assert!(matches!(
            refused("r", &err(ErrorCode::STALE_FENCING_TOKEN, "newer"), true),
            Failure::Fenced(_)
        ));
        assert!(matches!(
            refused("r", &err(ErrorCode::BAD_BATCH, "bad"), true),
            Failure::Batch(_)
        ));
        assert!(
            matches!(
                refused("r", &err(ErrorCode::BAD_BATCH, "bad"), false),
                Failure::Transport(_)
            ),
            "no batch in flight: nothing to skip"
        );
        let f = refused("r:1", &err(ErrorCode::UNKNOWN_TABLE, "no table t"), true);
        assert!(
            matches!(&f, Failure::Transport(m) if m.contains("no table t") && m.contains("r:1"))
        );
        assert!(matches!(
            refused("r", &err(ErrorCode::UNAVAILABLE, "busy"), true),
            Failure::Transport(_)
        ));
        assert!(
            matches!(
                refused("r", &err(ErrorCode::SUPERSEDED, "same token"), true),
                Failure::Transport(_)
            ),
            "a session replaced by the same shipper's newer one is retried, not fenced"
        );
    }
}
