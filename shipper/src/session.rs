//! One shipping session: a QUIC stream to the receiver that owns the target table, for one
//! (dup, source partition), while this process leads its election.
//!
//! `Hello` → `Welcome`, resume after the larger confirmed decree (see [`crate::resume`]), then
//! loop: read committed plog records after the last one sent (at most
//! `duplicate_log_batch_bytes`), compress, send, keep at most `window_batches` unacknowledged
//! ([`crate::window`]; a batch that would be small waits up to [`SMALL_BATCH_GAP`] while another
//! is in flight), and advance the confirmed decree on acks. With nothing to read, wait for
//! the node's committed marker to change (inotify, 50 ms fallback) and send a heartbeat every
//! `heartbeat_interval`. The session ends with a [`Failure`]; the partition task decides by fail
//! mode what comes next.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_coordinator::api::TableReceivers;
use ferry_coordinator::client::AdminClient;
use ferry_coordinator::meta::DupInfo;
use ferry_proto::wire::{self, ErrorCode, Frame, Heartbeat, Hello};
use ferry_proto::{Decree, PlogRecord};
use ferry_store::plog::{CommittedReader, PlogReader, ReadError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::lag::{self, LagTracker};
use crate::metrics::Labels;
use crate::resume::{self, Start};
use crate::server::Shared;
use crate::status::{Key, State};
use crate::tail;
use crate::window::{Limits, Window};

/// How long to wait for the committed marker before looking again anyway.
pub const FALLBACK_POLL: Duration = Duration::from_millis(50);

/// While a batch is unacknowledged, a batch that would be less than half full is sent at most
/// this long after the previous one (it waits for more commits to fill it, or for the ack).
/// Every batch costs the receiver one fsync per target partition, so a few fuller batches reach
/// the target sooner than a small one per group commit; a backlog still fills the whole window
/// with full batches, and on a long link a batch waits at most this long, not a round trip.
/// Measured with `bench dup` (see docs/quic-tuning.md).
pub const SMALL_BATCH_GAP: Duration = Duration::from_millis(5);

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The connection, the receiver lookup or the receiver's session checks failed; nothing is
    /// wrong with any batch. Retried (FAIL_FAST stops).
    Transport(String),
    /// A batch was refused or never acknowledged. FAIL_SKIP may skip it after bounded retries.
    Batch(String),
    /// The receiver knows a newer shipper for this partition: stop shipping, campaign again.
    Fenced(String),
    /// The records to ship were garbage-collected: full duplication is needed.
    Gone(String),
    /// The partition task is stopping.
    Cancelled,
}

impl Failure {
    pub fn message(&self) -> String {
        match self {
            Failure::Transport(m) | Failure::Batch(m) | Failure::Fenced(m) | Failure::Gone(m) => {
                m.clone()
            }
            Failure::Cancelled => "stopped".into(),
        }
    }
}

/// What the progress writer persists; updated by sessions, read every `progress_interval`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confirmed {
    pub decree: Decree,
    /// Commit time of the record at `decree` (µs), 0 if unknown.
    pub timestamp_us: u64,
    /// Whether a session has decided the start (before that, nothing is written to etcd).
    pub known: bool,
}

/// What carries over from one session to the next within one leadership term.
#[derive(Debug, Default)]
pub struct Carry {
    /// FAIL_SKIP gave up on the first unconfirmed batch: send it without its ops.
    pub skip_first: bool,
    /// Records up to here were already counted as skipped.
    pub skipped_through: Decree,
    /// An ack advanced the confirmed decree during the last session (the retry backoff resets).
    pub progressed: bool,
}

/// Everything one session needs.
pub struct SessionCtx {
    pub shared: Arc<Shared>,
    pub key: Key,
    pub labels: Labels,
    pub dup: DupInfo,
    pub fencing_token: u64,
    pub plog_dir: PathBuf,
    pub confirmed: Arc<Mutex<Confirmed>>,
    pub cancel: CancellationToken,
}

/// Runs one session until it fails or is cancelled. Cancellation-safe (through `ctx.cancel`).
pub async fn run(ctx: &SessionCtx, carry: &mut Carry) -> Failure {
    let span = tracing::info_span!("session", table = %ctx.key.table, dupid = %ctx.key.dupid,
        partition = ctx.key.partition.0, remote = %ctx.dup.remote, token = ctx.fencing_token);
    ship(ctx, carry).instrument(span).await
}

/// The receiver that owns every partition of the target table. One receiver per target table
/// for now: a table spread over several receivers is refused with a clear message.
pub fn single_receiver(t: &TableReceivers) -> Result<String, String> {
    let mut addr: Option<&str> = None;
    if t.partitions.is_empty() {
        return Err(format!(
            "target table `{}` has no partitions placed yet; retrying",
            t.table
        ));
    }
    for p in &t.partitions {
        let Some(a) = p.receiver_addr.as_deref() else {
            return Err(format!(
                "target partition {} of table `{}` has no receiver{}; start the receiver beside that node",
                p.partition,
                t.table,
                p.node.as_deref().map(|n| format!(" (node {n})")).unwrap_or_default()
            ));
        };
        match addr {
            None => addr = Some(a),
            Some(prev) if prev == a => {}
            Some(prev) => {
                return Err(format!(
                    "target table `{}` is spread over receivers {prev} and {a}; this shipper supports one receiver per target table for now",
                    t.table
                ))
            }
        }
    }
    addr.map(str::to_owned)
        .ok_or_else(|| format!("target table `{}` has no receiver", t.table))
}

/// Records sent with their ops removed: decrees stay contiguous (the inbox needs that), the
/// writes are not applied on the target. How FAIL_SKIP skips a batch.
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

async fn ship(ctx: &SessionCtx, carry: &mut Carry) -> Failure {
    let shared = &ctx.shared;
    let s = &shared.config.shipper;
    let key = &ctx.key;
    shared.board.with(key, |e| e.state = State::Connecting);

    // Which receiver, asked again at every session start.
    let Some(remote_addrs) = shared.config.remote_clusters.get(&ctx.dup.remote) else {
        return Failure::Transport(format!(
            "remote cluster `{}` is not in this shipper's [remote_clusters]; add its coordinators' admin addresses and restart the shipper",
            ctx.dup.remote
        ));
    };
    let client = match AdminClient::new(remote_addrs, s.etcd_timeout) {
        Ok(c) => c,
        Err(e) => return Failure::Transport(e.to_string()),
    };
    let receivers = match client.table_receivers(&ctx.dup.remote_table).await {
        Ok(r) => r,
        Err(e) => {
            return Failure::Transport(format!(
                "cannot find the receiver of table `{}` in cluster `{}`: {e}",
                ctx.dup.remote_table, ctx.dup.remote
            ))
        }
    };
    let addr = match single_receiver(&receivers) {
        Ok(a) => a,
        Err(e) => return Failure::Transport(e),
    };
    shared.board.with(key, |e| e.receiver = Some(addr.clone()));

    let conn = match shared.quic.connection(&addr).await {
        Ok(c) => c,
        Err(e) => return Failure::Transport(e),
    };
    let (mut send, recv) = match tokio::time::timeout(s.ack_timeout, conn.open_bi()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Failure::Transport(format!("cannot open a stream to receiver {addr}: {e}"))
        }
        Err(_) => {
            return Failure::Transport(format!(
                "receiver {addr} did not accept a stream within {:?}",
                s.ack_timeout
            ))
        }
    };
    let mut frames = crate::quic::FrameReader::spawn(recv);
    let hello = Frame::Hello(Hello {
        version: wire::PROTOCOL_VERSION,
        cluster_id: shared.cluster_id,
        dupid: key.dupid,
        table: ctx.dup.remote_table.clone(),
        partition: key.partition,
        fencing_token: ctx.fencing_token,
    });
    if let Err(e) = crate::quic::send_frame(&mut send, &hello).await {
        return Failure::Transport(e);
    }
    let welcome = tokio::select! {
        _ = ctx.cancel.cancelled() => return Failure::Cancelled,
        f = tokio::time::timeout(s.ack_timeout, frames.recv()) => match f {
            Err(_) => return Failure::Transport(format!("receiver {addr} did not answer Hello within {:?}", s.ack_timeout)),
            Ok(Err(e)) => return Failure::Transport(e),
            Ok(Ok(Frame::Welcome(w))) => w,
            Ok(Ok(Frame::Error(e))) => return refused(&addr, &e, false),
            Ok(Ok(other)) => return Failure::Transport(format!("receiver {addr} answered Hello with {}, not Welcome", frame_name(&other))),
        },
    };

    // Where to start.
    let stored = match shared
        .meta
        .progress(&key.table, key.dupid, key.partition)
        .await
    {
        Ok(p) => p,
        Err(e) => return Failure::Transport(e.to_string()),
    };
    let local = *lock(&ctx.confirmed);
    let mut tracker = LagTracker::default();
    let start = match resume::start_point(welcome.confirmed_decree, stored.as_ref()) {
        Start::After(d) => {
            let ts = stored
                .as_ref()
                .filter(|p| p.confirmed_decree == d)
                .map_or(0, |p| p.last_confirmed_timestamp_ms * 1000);
            tracker.set_last_confirmed_us(ts);
            d.max(local.decree)
        }
        Start::NewDup if local.known => local.decree,
        Start::NewDup => match new_dup_start(ctx).await {
            Ok(d) => d,
            Err(f) => return f,
        },
    };
    {
        let mut c = lock(&ctx.confirmed);
        if start > c.decree || !c.known {
            *c = Confirmed {
                decree: start.max(c.decree),
                timestamp_us: tracker.last_confirmed_us().unwrap_or(c.timestamp_us),
                known: true,
            };
        }
    }
    tracing::info!(%addr, welcome = %welcome.confirmed_decree,
        stored = %stored.as_ref().map_or(Decree::ZERO, |p| p.confirmed_decree), from = %start.next(),
        "session started");
    shared.board.with(key, |e| {
        e.state = State::Shipping;
        e.confirmed = start;
        e.oldest_unconfirmed_us = None;
    });

    let limits = Limits {
        max_batches: s.window_batches,
        // Bytes are bounded by the batch count; this only guards against oversized records.
        max_bytes: s.duplicate_log_batch_bytes * s.window_batches as u64 * 2,
    };
    let mut window = Window::new(start, limits);
    let mut reader = Some(PlogReader::new(&ctx.plog_dir, start.next()));
    let mut sub = shared.watcher.subscribe(&ctx.plog_dir);
    let mut last_send = Instant::now();
    let mut first_batch = true;
    let threshold_ms = s.dup_lagging_write_threshold_ms;
    let m = &shared.metrics;
    let l = &ctx.labels;
    let mut marker = CommittedReader::new(&ctx.plog_dir);
    let mut committed = tail::committed_from(&mut marker).unwrap_or_default();
    // Encoded bytes per record in the last batch read (0: not known yet).
    let mut record_bytes = 0u64;

    loop {
        // Fill the window with committed records.
        let mut drained = false;
        // A small batch waits until then (see SMALL_BATCH_GAP).
        let mut hold_until: Option<Instant> = None;
        while window.has_room() {
            match tail::committed_from(&mut marker) {
                Ok(c) => committed = c,
                Err(e) => {
                    return Failure::Transport(format!(
                        "cannot read the committed marker in {}: {e}",
                        ctx.plog_dir.display()
                    ))
                }
            }
            shared.board.with(key, |e| {
                e.committed = committed.decree;
                e.committed_time_us = committed.commit_time_us;
            });
            if window.next_decree() > committed.decree {
                drained = true;
                break;
            }
            let pending = committed.decree.0 + 1 - window.next_decree().0;
            let due = last_send + SMALL_BATCH_GAP;
            if window.in_flight_batches() > 0
                && Instant::now() < due
                && pending.saturating_mul(record_bytes) < s.duplicate_log_batch_bytes / 2
            {
                hold_until = Some(due);
                drained = true;
                break;
            }
            let Some(mut r) = reader.take() else {
                return Failure::Transport("the plog reader was lost after a failed read".into());
            };
            let upto = committed.decree;
            let max = s.duplicate_log_batch_bytes;
            let level = s.zstd_level;
            let strip = carry.skip_first && first_batch;
            let joined = tokio::task::spawn_blocking(move || {
                let read = tail::read_batch(&mut r, upto, max);
                let packed = read.map(|mut records| {
                    let read_bytes = tail::encoded_bytes(&records);
                    let stripped = if strip { strip_ops(&mut records) } else { 0 };
                    let batch = wire::pack_batch(&records, level);
                    (records, batch, read_bytes, stripped)
                });
                (r, packed)
            })
            .await;
            let (r, packed) = match joined {
                Ok(x) => x,
                Err(e) => return Failure::Transport(format!("the plog read task failed: {e}")),
            };
            reader = Some(r);
            let (records, batch, read_bytes, stripped) = match packed {
                Ok(x) => x,
                Err(ReadError::Gone { wanted, oldest, .. }) => {
                    return Failure::Gone(format!(
                        "start decree {wanted} is no longer in the plog of {} (it begins at {oldest}); this dup needs full duplication (`ferry dup add --full`) for partition {}",
                        ctx.plog_dir.display(), key.partition.0
                    ))
                }
                Err(e) => return Failure::Transport(format!("reading the plog failed: {e}")),
            };
            if records.is_empty() {
                drained = true;
                break;
            }
            record_bytes = (read_bytes / records.len() as u64).max(1);
            let (first, last) = (batch.first_decree, batch.last_decree);
            if strip {
                if last > carry.skipped_through {
                    m.failed_ops.get_or_create(l).inc_by(stripped);
                }
                carry.skipped_through = carry.skipped_through.max(last);
                tracing::warn!(%first, %last, ops = stripped, "FAIL_SKIP: skipping a batch that kept failing; its writes are not duplicated");
            }
            first_batch = false;
            let raw = u64::from(batch.raw_len);
            let wire_len = batch.zstd.len() as u64;
            let frame = Frame::Batch(batch);
            if let Err(e) = frame.check_limits() {
                return Failure::Batch(format!(
                    "batch {first}..={last} is too large to send ({e}); lower duplicate_log_batch_bytes, or a single record exceeds the frame limit"
                ));
            }
            if let Err(e) = timed_send(&mut send, &frame, s.ack_timeout).await {
                return send_failed(&mut frames, &addr, e, true).await;
            }
            last_send = Instant::now();
            if let Err(e) = window.on_sent(first, last, wire_len, last_send) {
                return Failure::Transport(format!("internal: {e}"));
            }
            tracker.on_sent(&records);
            m.log_read_bytes.get_or_create(l).inc_by(read_bytes);
            m.shipped_raw_bytes.get_or_create(l).inc_by(raw);
            m.shipped_bytes.get_or_create(l).inc_by(wire_len);
            let oldest = tracker.oldest_unconfirmed_us();
            shared.board.with(key, |e| e.oldest_unconfirmed_us = oldest);
        }

        let now = Instant::now();
        if window.in_flight_batches() == 0 && drained && now - last_send >= s.heartbeat_interval {
            let hb = Frame::Heartbeat(Heartbeat {
                source_timestamp_us: lag::now_us(),
                committed_decree: committed.decree,
            });
            if let Err(e) = timed_send(&mut send, &hb, s.ack_timeout).await {
                return send_failed(&mut frames, &addr, e, window.in_flight_batches() > 0).await;
            }
            last_send = now;
        }
        if let Some(waited) = window.oldest_wait(now) {
            if waited > s.ack_timeout {
                return Failure::Batch(format!(
                    "receiver {addr} has not acknowledged batch {} and later within {:?}",
                    window.next_decree(),
                    s.ack_timeout
                ));
            }
        }

        let wait_commit = drained && window.has_room();
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => return Failure::Cancelled,
            f = frames.recv() => match f {
                Ok(Frame::Ack(a)) => {
                    let before = window.confirmed();
                    if let Err(e) = window.on_ack(a.confirmed_decree, Instant::now()) {
                        return Failure::Transport(format!("receiver {addr} broke the protocol: {e}"));
                    }
                    if window.confirmed() > before {
                        on_confirmed(ctx, &mut tracker, window.confirmed(), threshold_ms);
                        if carry.skip_first && window.confirmed() >= carry.skipped_through {
                            carry.skip_first = false;
                        }
                        carry.progressed = true;
                    }
                }
                Ok(Frame::Error(e)) => return refused(&addr, &e, window.in_flight_batches() > 0),
                Ok(other) => return Failure::Transport(format!("receiver {addr} sent an unexpected {} frame", frame_name(&other))),
                Err(e) => return Failure::Transport(format!("receiver {addr}: {e}")),
            },
            _ = tokio::time::sleep_until(hold_until.unwrap_or(now).into()), if hold_until.is_some() => {}
            _ = sub.changed(FALLBACK_POLL), if wait_commit && hold_until.is_none() => {}
            _ = tokio::time::sleep(s.heartbeat_interval.min(Duration::from_millis(200))), if !wait_commit => {}
        }
    }
}

/// An ack advanced the confirmed decree: metrics, the board and the progress cell.
fn on_confirmed(ctx: &SessionCtx, tracker: &mut LagTracker, confirmed: Decree, threshold_ms: u64) {
    let m = &ctx.shared.metrics;
    let l = &ctx.labels;
    let lag = tracker.on_ack(confirmed, lag::now_us(), threshold_ms);
    m.shipped_ops.get_or_create(l).inc_by(lag.confirmed_records);
    if lag.lagging_writes > 0 {
        m.lagging_writes.get_or_create(l).inc_by(lag.lagging_writes);
    }
    let h = m.time_lag.get_or_create(l);
    for ms in lag.batch_lags_ms {
        h.observe(ms as f64);
    }
    let h = m.write_lag.get_or_create(l);
    for us in lag.write_lags_us {
        h.observe(us as f64 / 1000.0);
    }
    let ts = tracker.last_confirmed_us().unwrap_or(0);
    {
        let mut c = lock(&ctx.confirmed);
        if confirmed > c.decree {
            *c = Confirmed {
                decree: confirmed,
                timestamp_us: ts,
                known: true,
            };
        }
    }
    let oldest = tracker.oldest_unconfirmed_us();
    ctx.shared.board.with(&ctx.key, |e| {
        e.confirmed = confirmed;
        e.oldest_unconfirmed_us = oldest;
        e.last_error = None;
    });
}

/// A new dup: ship writes from its creation on (see [`crate::resume`]).
async fn new_dup_start(ctx: &SessionCtx) -> Result<Decree, Failure> {
    let dir = ctx.plog_dir.clone();
    let create_us = ctx.dup.create_timestamp_ms.saturating_mul(1000);
    let committed = tail::committed(&dir)
        .map_err(|e| Failure::Transport(format!("cannot read the committed marker: {e}")))?
        .decree;
    let found =
        tokio::task::spawn_blocking(move || resume::new_dup_start(&dir, create_us, committed))
            .await
            .map_err(|e| Failure::Transport(format!("the plog search task failed: {e}")))?
            .map_err(|e| {
                Failure::Transport(format!(
                    "searching the plog for the dup's first write failed: {e}"
                ))
            })?;
    if found.maybe_incomplete {
        tracing::warn!(after = %found.after, "the plog's oldest record was written after this dup was created: writes between the dup's creation and decree {} may have been garbage-collected before shipping started", found.after.next());
    }
    tracing::info!(after = %found.after, create_timestamp_ms = ctx.dup.create_timestamp_ms,
        "new dup: shipping the writes made from its creation on");
    *lock(&ctx.confirmed) = Confirmed {
        decree: found.after,
        timestamp_us: found.after_timestamp_us,
        known: true,
    };
    Ok(found.after)
}

/// The receiver's `Error` frame as a failure. A stale fencing token means a newer shipper
/// leads; batch-level codes count against the batch in flight (FAIL_SKIP may skip it); the rest
/// (`unknown_table`, `unauthorized`, `unavailable`, ...) are retried without skipping anything.
fn refused(addr: &str, e: &wire::Error, batch_in_flight: bool) -> Failure {
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

/// How long to wait for the receiver's `Error` frame after it stopped the stream.
const REASON_WAIT: Duration = Duration::from_secs(1);

/// Sending failed. A receiver that ends a session stops the stream and then says why in an
/// `Error` frame; if that frame comes, the failure is classified by its code (a stale token is
/// `Fenced`, a bad batch counts against the batch), else it is a transport failure.
async fn send_failed(
    frames: &mut crate::quic::FrameReader,
    addr: &str,
    error: String,
    batch_in_flight: bool,
) -> Failure {
    // Bounded: at most a window of acks can precede the reason.
    for _ in 0..64 {
        match tokio::time::timeout(REASON_WAIT, frames.recv()).await {
            // Acks written before the stop carry nothing the next session would not learn
            // from the Welcome.
            Ok(Ok(Frame::Ack(_))) => continue,
            Ok(Ok(Frame::Error(e))) => return refused(addr, &e, batch_in_flight),
            _ => return Failure::Transport(error),
        }
    }
    Failure::Transport(error)
}

async fn timed_send(
    send: &mut quinn::SendStream,
    frame: &Frame,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, crate::quic::send_frame(send, frame)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the receiver did not take more data within {timeout:?} (flow control stalled)"
        )),
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Welcome(_) => "Welcome",
        Frame::Batch(_) => "Batch",
        Frame::Ack(_) => "Ack",
        Frame::Heartbeat(_) => "Heartbeat",
        Frame::Chunk(_) => "Chunk",
        Frame::FileDone(_) => "FileDone",
        Frame::CheckpointDone(_) => "CheckpointDone",
        Frame::Installed(_) => "Installed",
        Frame::Error(_) => "Error",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use ferry_coordinator::api::PartitionReceiver;
    use ferry_coordinator::meta::TableState;
    use ferry_proto::{ClusterId, Op, Timetag};

    use super::*;

    fn table(addrs: &[Option<&str>]) -> TableReceivers {
        TableReceivers {
            table: "users".into(),
            partition_count: addrs.len() as u32,
            state: TableState::Available,
            partitions: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| PartitionReceiver {
                    partition: i as u32,
                    node: Some(format!("n{i}")),
                    receiver_addr: a.map(str::to_owned),
                })
                .collect(),
        }
    }

    #[test]
    fn one_receiver_per_target_table() {
        assert_eq!(
            single_receiver(&table(&[Some("r:1"), Some("r:1")])),
            Ok("r:1".to_string())
        );
        let e = single_receiver(&table(&[Some("r:1"), Some("r:2")])).expect_err("spread");
        assert!(e.contains("r:1") && e.contains("r:2"), "{e}");
        let e = single_receiver(&table(&[Some("r:1"), None])).expect_err("missing");
        assert!(e.contains("partition 1") && e.contains("n1"), "{e}");
        assert!(single_receiver(&table(&[])).is_err());
    }

    #[test]
    fn skipping_keeps_decrees_and_drops_ops() {
        let c = ClusterId::new(1).expect("valid id");
        let mut recs: Vec<PlogRecord> = (1..=3)
            .map(|d| PlogRecord {
                decree: Decree(d),
                timetag: Timetag::new(d, c, false),
                ops: if d == 2 {
                    vec![]
                } else {
                    vec![Op::Delete { key: b"k".to_vec() }]
                },
            })
            .collect();
        assert_eq!(strip_ops(&mut recs), 2, "records that had ops");
        assert!(recs.iter().all(|r| r.ops.is_empty()));
        assert_eq!(
            recs.iter().map(|r| r.decree.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let b = wire::pack_batch(&recs, 1);
        assert_eq!(
            (b.first_decree, b.last_decree, b.count),
            (Decree(1), Decree(3), 3)
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
    }
}
