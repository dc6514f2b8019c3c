//! The receiver's side of a shipping session, without I/O.
//!
//! - [`authorize`]: may a shipper of this certificate's cluster ship here at all (connection
//!   level: in the duplication group, not this cluster).
//! - [`check_hello`]: the `Hello` checks against what the receiver knows (protocol version, the
//!   claimed cluster id against the certificate, the table, its placement on this node).
//! - [`admit`]: the fencing rule (the receiver's `fence` module persists the tokens and calls it).
//! - [`ReceiveSession`]: after the `Welcome`, batches in, appends out, acks only once the append
//!   is durable.
//!
//! ```text
//! new(token, durable)  ─▶ poll: Send(Welcome{durable})
//! handle_batch / handle_heartbeat        (frames, in stream order)
//! poll: Append{records}                   (one at a time; queued batches that follow are merged)
//! handle_appended(durable)  ─▶ poll: Send(Ack{durable})
//! handle_finished(error)                  (no more frames: the queue is still written, then End)
//! stop(reason)                            (preempted: no ack for the append in progress)
//! poll: End(error frame to answer with, if any)
//! ```

use std::collections::VecDeque;

use ferry_proto::wire::{self, ErrorCode, Frame, Hello, WireError, PROTOCOL_VERSION};
use ferry_proto::{ClusterId, Decree, PlogRecord};

/// Batches unpacked ahead of the one being written: they keep the disk busy and are merged into
/// the next write (one fsync for all of them). While this many wait, the driver reads no more
/// frames ([`ReceiveSession::wants_frames`]).
pub const PIPELINE: usize = 4;

/// Why a `Hello` (or a connection) was not admitted: the code and sentence of the `Error` frame
/// to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    /// The `Error` frame that says so.
    pub fn frame(&self) -> Frame {
        Frame::Error(self.error())
    }

    /// The `Error` body.
    pub fn error(&self) -> wire::Error {
        wire::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// The id of `cluster` if a shipper of it may ship to cluster `ours`: it must be in the
/// duplication `group` (name → id), and not `ours` itself. Else the sentence to refuse it with.
pub fn authorize<'a>(
    ours: &str,
    group: impl IntoIterator<Item = (&'a str, u8)> + Clone,
    cluster: &str,
) -> Result<ClusterId, Refusal> {
    let refuse = |message: String| Refusal {
        code: ErrorCode::UNAUTHORIZED,
        message,
    };
    if cluster == ours {
        return Err(refuse(format!(
            "the shipper's certificate is for cluster `{cluster}`, which is this receiver's own \
             cluster; a cluster does not duplicate to itself, so give the shipper the certificate \
             of its source cluster"
        )));
    }
    let Some(id) = group
        .clone()
        .into_iter()
        .find(|(n, _)| *n == cluster)
        .map(|(_, id)| id)
    else {
        let names: Vec<&str> = group.into_iter().map(|(n, _)| n).collect();
        return Err(refuse(format!(
            "cluster `{cluster}` is not in the duplication group of cluster `{ours}` ({}); add it \
             with its id to cluster.duplication_group of every cluster, or give the shipper a \
             certificate of a cluster in the group",
            names.join(", ")
        )));
    };
    ClusterId::new(id).ok_or_else(|| {
        refuse(format!(
            "cluster `{cluster}` has id {id} in the duplication group, outside 1..=127; fix \
             cluster.duplication_group"
        ))
    })
}

/// What the receiver knows when a `Hello` comes.
#[derive(Debug, Clone)]
pub struct HelloContext<'a> {
    /// The cluster named by the shipper's certificate, and its id in the group.
    pub peer_cluster: &'a str,
    pub peer_cluster_id: ClusterId,
    /// This receiver's cluster and node.
    pub our_cluster: &'a str,
    pub node: &'a str,
    /// The target table as etcd describes it; `None` if it does not exist.
    pub table: Option<&'a TableView>,
}

/// A target table as the receiver needs it: partition count and the node of each partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableView {
    pub partition_count: u32,
    /// One entry per partition in etcd, `None` where it is not placed yet.
    pub placement: Vec<Option<String>>,
}

/// The checks of a `Hello` that need nothing but the connection: the protocol version, and the
/// cluster id it claims against the certificate's cluster. [`check_hello`] makes them too; a
/// driver calls this first, before it reads the table from etcd.
pub fn check_peer(
    hello: &Hello,
    peer_cluster: &str,
    peer_cluster_id: ClusterId,
) -> Result<(), Refusal> {
    let refuse = |code, message: String| Refusal { code, message };
    if hello.version != PROTOCOL_VERSION {
        return Err(refuse(
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "protocol version {} is not supported; this receiver speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    if hello.cluster_id != peer_cluster_id {
        return Err(refuse(
            ErrorCode::UNAUTHORIZED,
            format!(
                "the Hello claims cluster id {} but the certificate is for cluster `{}` (id {}); \
                 give the shipper its own cluster's certificate, or fix its cluster.id",
                hello.cluster_id, peer_cluster, peer_cluster_id
            ),
        ));
    }
    Ok(())
}

/// Checks a `Hello` before the fence. Returns the target table's partition count.
pub fn check_hello(hello: &Hello, ctx: &HelloContext<'_>) -> Result<u32, Refusal> {
    let refuse = |code, message: String| Refusal { code, message };
    check_peer(hello, ctx.peer_cluster, ctx.peer_cluster_id)?;
    let ours = ctx.our_cluster;
    let Some(desc) = ctx.table else {
        return Err(refuse(
            ErrorCode::UNKNOWN_TABLE,
            format!(
                "table `{}` does not exist in cluster `{ours}`; create it with `ferry table create` \
                 (with the partition count you want) before adding the duplication",
                hello.table
            ),
        ));
    };
    for (p, entry) in desc.placement.iter().enumerate() {
        match entry.as_deref() {
            Some(n) if n == ctx.node => {}
            None => {
                return Err(refuse(
                    ErrorCode::UNAVAILABLE,
                    format!(
                        "partition {p} of table `{}` in cluster `{ours}` is not placed on a node \
                         yet; retry once the table is available",
                        hello.table
                    ),
                ))
            }
            Some(other) => {
                return Err(refuse(
                    ErrorCode::UNAVAILABLE,
                    format!(
                        "partition {p} of table `{}` in cluster `{ours}` is on node `{other}`, but \
                         this receiver writes only for node `{}`; multi-node target tables are \
                         not supported yet, so place every partition of a duplicated table on one \
                         node",
                        hello.table, ctx.node
                    ),
                ))
            }
        }
    }
    let n = desc.partition_count;
    if n == 0 || desc.placement.len() != n as usize {
        return Err(refuse(
            ErrorCode::UNAVAILABLE,
            format!(
                "table `{}` has no partitions in etcd yet; retry once it is available",
                hello.table
            ),
        ));
    }
    Ok(n)
}

/// What [`admit`] decided for a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admit it. `persist`: the token is newer than the stored one and must be stored first.
    /// `preempt`: the live session of the same inbox to stop.
    Accept {
        persist: bool,
        preempt: Option<LiveId>,
    },
    /// Refuse it: `newest` is the newer token that holds the partition.
    Stale { newest: u64 },
}

/// A live session's id, unique within the receiver process.
pub type LiveId = u64;

/// The fencing rule. `stored` is the newest token stored for the `Hello`'s fence key (0 if
/// none); `live` the (id, token) of the session that now owns the same inbox, if any.
///
/// - An older token than the stored one is refused (`STALE_FENCING_TOKEN`).
/// - A newer token preempts the live session of the same inbox.
/// - An equal token is the same shipper reconnecting: admitted, its old session is ended (see
///   [`preempted`]).
pub fn admit(stored: u64, live: Option<(LiveId, u64)>, token: u64) -> Admission {
    if token < stored {
        return Admission::Stale { newest: stored };
    }
    match live {
        // Another dup of the same source cluster writing the same inbox, with a newer election
        // (tokens are revisions of the source's one etcd, so they compare across dups).
        Some((_, live_token)) if live_token > token => Admission::Stale { newest: live_token },
        _ => Admission::Accept {
            persist: token > stored,
            preempt: live.map(|(id, _)| id),
        },
    }
}

/// The `Error` a stale `Hello` is refused with.
pub fn stale_refusal(token: u64, newest: u64, what: &str) -> Refusal {
    Refusal {
        code: ErrorCode::STALE_FENCING_TOKEN,
        message: format!(
            "fencing token {token} of {what} is older than token {newest}, which a newer shipper \
             holds; this shipper lost its election and must stop shipping the partition"
        ),
    }
}

/// The `Error` a live session (of token `old`) is ended with when a session of `token` for the
/// same inbox is admitted: a newer token took over (`STALE_FENCING_TOKEN`: that shipper lost its
/// election), or the same shipper reconnected (`SUPERSEDED`: it retries, and its newer session
/// goes on). `what` names the partition.
pub fn preempted(old: u64, token: u64, what: &str) -> wire::Error {
    if old < token {
        wire::Error {
            code: ErrorCode::STALE_FENCING_TOKEN,
            message: format!(
                "a shipper with the newer fencing token {token} took over {what}; this session \
                 (token {old}) ends and its further batches are not written"
            ),
        }
    } else {
        wire::Error {
            code: ErrorCode::SUPERSEDED,
            message: format!(
                "the same shipper (fencing token {token}) opened a new session for {what}; this \
                 older session ends"
            ),
        }
    }
}

/// A batch unpacked: its header and records (still unsplit by target partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub first: Decree,
    pub last: Decree,
    pub count: u32,
    pub raw_len: u32,
    /// Wire batches merged into this one (1 when unpacked).
    pub batches: u64,
    pub records: Vec<PlogRecord>,
}

impl Incoming {
    /// Decompresses and checks a batch (see [`wire::unpack_batch`]); `max_raw` bounds what it may
    /// decompress to. CPU work: a driver may run it on another thread.
    pub fn unpack(batch: &wire::Batch, max_raw: usize) -> Result<Incoming, WireError> {
        let records = wire::unpack_batch(batch, max_raw)?;
        Ok(Incoming {
            first: batch.first_decree,
            last: batch.last_decree,
            count: batch.count,
            raw_len: batch.raw_len,
            batches: 1,
            records,
        })
    }

    /// Appends the batch that directly follows this one, so both reach the disk with one fsync.
    /// Gives `next` back when it does not follow directly.
    fn absorb(&mut self, next: Incoming) -> Result<(), Incoming> {
        let follows = self.count > 0 && next.count > 0 && next.first.0 == self.last.0 + 1;
        if !follows {
            return Err(next);
        }
        self.last = next.last;
        self.count = self.count.saturating_add(next.count);
        self.raw_len = self.raw_len.saturating_add(next.raw_len);
        self.batches += next.batches;
        self.records.extend(next.records);
        Ok(())
    }
}

/// What the receiver's driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiveEvent {
    /// Append these records (contiguous, `first ..= last`, all after the durable decree) to the
    /// inbox (split by target partition), fsync, and answer with
    /// [`ReceiveSession::handle_appended`]. At most one is outstanding.
    Append {
        first: Decree,
        last: Decree,
        records: Vec<PlogRecord>,
    },
    /// Send this frame to the shipper, in order.
    Send(Frame),
    /// The session is over: answer with this `Error` frame if any, then finish the stream.
    End(Option<wire::Error>),
}

/// Counters of one session, for the driver to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Wire batches acknowledged: made durable, or found durable already (resent).
    pub batches: u64,
    /// Records made durable.
    pub records: u64,
    /// Uncompressed bytes of the batches made durable.
    pub raw_bytes: u64,
    /// Appends (fsyncs) done: fewer than `batches` when merging.
    pub appends: u64,
    /// Acks sent.
    pub acks: u64,
}

#[derive(Debug)]
enum Work {
    Batch(Incoming),
    Heartbeat,
}

#[derive(Debug, Clone, Copy)]
struct Appending {
    batches: u64,
    count: u64,
    raw_len: u64,
}

/// The receiving session of one (dup, source partition) after its `Hello` was admitted.
#[derive(Debug)]
pub struct ReceiveSession {
    token: u64,
    durable: Decree,
    queue: VecDeque<Work>,
    appending: Option<Appending>,
    /// No more frames come; once the queue is written the session ends with this error (if any).
    finishing: Option<Option<wire::Error>>,
    stopped: Option<wire::Error>,
    out: VecDeque<ReceiveEvent>,
    ended: bool,
    stats: ReceiveStats,
}

impl ReceiveSession {
    /// A session admitted with `token`, whose inbox holds decrees up to `durable`. Its first
    /// output is the `Welcome`.
    pub fn new(token: u64, durable: Decree) -> ReceiveSession {
        let mut out = VecDeque::new();
        out.push_back(ReceiveEvent::Send(Frame::Welcome(wire::Welcome {
            confirmed_decree: durable,
            present_files: vec![],
        })));
        ReceiveSession {
            token,
            durable,
            queue: VecDeque::new(),
            appending: None,
            finishing: None,
            stopped: None,
            out,
            ended: false,
            stats: ReceiveStats::default(),
        }
    }

    /// The fencing token this session was admitted with.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The last decree durable in the inbox, as this session knows it.
    pub fn durable(&self) -> Decree {
        self.durable
    }

    /// Whether an append is outstanding.
    pub fn is_appending(&self) -> bool {
        self.appending.is_some()
    }

    /// Whether the session ended (its `End` may still wait in [`ReceiveSession::poll`]).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Whether the driver should read more frames now (back-pressure: at most [`PIPELINE`]
    /// batches wait behind the append).
    pub fn wants_frames(&self) -> bool {
        !self.ended
            && self.stopped.is_none()
            && self.finishing.is_none()
            && self.queue.len() < PIPELINE
    }

    /// This session's counters.
    pub fn stats(&self) -> &ReceiveStats {
        &self.stats
    }

    /// A `Batch` frame came: unpack it (bounded by `max_raw`) and queue it.
    pub fn handle_batch_frame(&mut self, batch: &wire::Batch, max_raw: usize) {
        match Incoming::unpack(batch, max_raw) {
            Ok(b) => self.handle_batch(b),
            Err(e) => self.handle_finished(Some(wire::Error {
                code: e.code(),
                message: format!("bad batch: {e}"),
            })),
        }
    }

    /// An unpacked batch came (see [`Incoming::unpack`]).
    pub fn handle_batch(&mut self, batch: Incoming) {
        if self.ended || self.stopped.is_some() || self.finishing.is_some() {
            return;
        }
        self.queue.push_back(Work::Batch(batch));
    }

    /// A `Heartbeat` came: it is answered with the durable decree, in order after the batches
    /// before it.
    pub fn handle_heartbeat(&mut self) {
        if self.ended || self.stopped.is_some() || self.finishing.is_some() {
            return;
        }
        self.queue.push_back(Work::Heartbeat);
    }

    /// Any frame after the `Welcome`: batches, heartbeats, the shipper's `Error`; anything else
    /// ends the session (after what came before it is written and acknowledged).
    pub fn handle_frame(&mut self, frame: &Frame, max_raw: usize) {
        match frame {
            Frame::Batch(b) => self.handle_batch_frame(b, max_raw),
            Frame::Heartbeat(_) => self.handle_heartbeat(),
            Frame::Error(_) => self.end(None),
            Frame::Chunk(_) | Frame::FileDone(_) | Frame::CheckpointDone(_) => self
                .handle_finished(Some(wire::Error {
                    code: ErrorCode::UNEXPECTED_FRAME,
                    message: format!(
                        "{} (checkpoint transfer) is not supported by this receiver yet; use an \
                         incremental duplication",
                        frame.name()
                    ),
                })),
            other => self.handle_finished(Some(wire::Error {
                code: ErrorCode::UNEXPECTED_FRAME,
                message: format!(
                    "{} is not expected from a shipper after the Welcome; send Batch or Heartbeat",
                    other.name()
                ),
            })),
        }
    }

    /// The stream or connection broke, or the shipper gave up: nothing more is written or sent.
    pub fn handle_closed(&mut self) {
        self.end(None);
    }

    /// No more frames come: the shipper finished its stream (`None`), or sent something this
    /// session refuses (the `Error` to answer with). What is queued is still written and
    /// acknowledged; then the session ends. The first call wins.
    pub fn handle_finished(&mut self, error: Option<wire::Error>) {
        if self.ended || self.finishing.is_some() {
            return;
        }
        self.finishing = Some(error);
    }

    /// The outstanding append is durable: the inbox now holds decrees up to `durable`.
    pub fn handle_appended(&mut self, durable: Decree) {
        let Some(a) = self.appending.take() else {
            return;
        };
        self.durable = self.durable.max(durable);
        self.stats.batches += a.batches;
        self.stats.records += a.count;
        self.stats.raw_bytes += a.raw_len;
        self.stats.appends += 1;
        if self.ended {
            return;
        }
        // Preempted while writing: the data is durable but this shipper is no longer the owner,
        // so it gets no ack, only the reason.
        if let Some(reason) = self.stopped.clone() {
            return self.end(Some(reason));
        }
        self.ack();
    }

    /// The outstanding append failed.
    pub fn handle_append_failed(&mut self, message: &str) {
        self.appending = None;
        self.end(Some(wire::Error {
            code: ErrorCode::INTERNAL,
            message: message.to_string(),
        }));
    }

    /// Stops the session (preempted by a newer one, or the receiver is stopping), answering the
    /// shipper with `reason` once the append in progress, if any, has finished.
    pub fn stop(&mut self, reason: wire::Error) {
        if self.stopped.is_none() {
            self.stopped = Some(reason);
        }
    }

    /// The next thing to do, if any. Call until `None` after every input.
    pub fn poll(&mut self) -> Option<ReceiveEvent> {
        if self.out.is_empty() && !self.ended && self.appending.is_none() {
            self.step();
        }
        self.out.pop_front()
    }

    fn step(&mut self) {
        if let Some(reason) = self.stopped.clone() {
            return self.end(Some(reason));
        }
        let Some(work) = self.queue.pop_front() else {
            if let Some(error) = self.finishing.take() {
                self.end(error);
            }
            return;
        };
        let mut b = match work {
            Work::Heartbeat => return self.ack(),
            Work::Batch(b) => b,
        };
        // Batches already queued behind this one are written with it.
        while let Some(Work::Batch(_)) = self.queue.front() {
            let Some(Work::Batch(next)) = self.queue.pop_front() else {
                break;
            };
            if let Err(next) = b.absorb(next) {
                self.queue.push_front(Work::Batch(next));
                break;
            }
        }
        let durable = self.durable;
        // An empty inbox takes a first batch at any decree (a new dup starts where it starts).
        if b.count > 0 && durable.0 > 0 && b.first.0 > durable.0 + 1 {
            return self.end(Some(wire::Error {
                code: ErrorCode::BAD_BATCH,
                message: format!(
                    "batch {}..={} starts after a gap: the inbox holds decrees up to {durable} \
                     only; resume after the confirmed decree of the Welcome",
                    b.first, b.last
                ),
            }));
        }
        // A resent batch: what is durable already is not written again.
        let raw_len = u64::from(b.raw_len);
        let mut records = b.records;
        records.retain(|r| r.decree > durable);
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            self.stats.batches += b.batches;
            return self.ack();
        };
        let (first, last) = (first.decree, last.decree);
        self.appending = Some(Appending {
            batches: b.batches,
            count: records.len() as u64,
            raw_len,
        });
        self.out.push_back(ReceiveEvent::Append {
            first,
            last,
            records,
        });
    }

    fn ack(&mut self) {
        self.stats.acks += 1;
        self.out.push_back(ReceiveEvent::Send(Frame::Ack(wire::Ack {
            confirmed_decree: self.durable,
        })));
    }

    fn end(&mut self, error: Option<wire::Error>) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.queue.clear();
        self.out.push_back(ReceiveEvent::End(error));
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{DupId, Op, PartitionId, Timetag};

    use super::*;

    fn recs(first: u64, last: u64) -> Vec<PlogRecord> {
        (first..=last)
            .map(|d| PlogRecord {
                decree: Decree(d),
                timetag: Timetag(d << 8),
                ops: vec![Op::Delete {
                    key: format!("k{d}").into_bytes(),
                }],
            })
            .collect()
    }

    fn batch(first: u64, last: u64) -> Incoming {
        Incoming::unpack(&wire::pack_batch(&recs(first, last), 1), 1 << 20).expect("valid batch")
    }

    fn drain(s: &mut ReceiveSession) -> Vec<ReceiveEvent> {
        std::iter::from_fn(|| s.poll()).collect()
    }

    fn ack(d: u64) -> ReceiveEvent {
        ReceiveEvent::Send(Frame::Ack(wire::Ack {
            confirmed_decree: Decree(d),
        }))
    }

    fn opened(durable: u64) -> ReceiveSession {
        let mut s = ReceiveSession::new(7, Decree(durable));
        assert_eq!(
            drain(&mut s),
            vec![ReceiveEvent::Send(Frame::Welcome(wire::Welcome {
                confirmed_decree: Decree(durable),
                present_files: vec![],
            }))]
        );
        s
    }

    #[test]
    fn queued_batches_are_merged_and_acked_once_durable() {
        let mut s = opened(0);
        s.handle_batch(batch(1, 3));
        assert_eq!(
            drain(&mut s),
            vec![ReceiveEvent::Append {
                first: Decree(1),
                last: Decree(3),
                records: recs(1, 3)
            }]
        );
        // Two more arrive while the first is in fsync: no ack yet, no second append.
        s.handle_batch(batch(4, 6));
        s.handle_batch(batch(7, 9));
        assert_eq!(drain(&mut s), vec![]);
        s.handle_appended(Decree(3));
        assert_eq!(
            drain(&mut s),
            vec![
                ack(3),
                ReceiveEvent::Append {
                    first: Decree(4),
                    last: Decree(9),
                    records: recs(4, 9)
                },
            ],
            "the two queued batches go to disk with one fsync"
        );
        s.handle_appended(Decree(9));
        assert_eq!(drain(&mut s), vec![ack(9)], "one ack for the merged append");
        assert_eq!(s.stats().batches, 3);
        assert_eq!(s.stats().appends, 2);
        assert_eq!(s.stats().acks, 2);
        assert_eq!(s.stats().records, 9);
    }

    #[test]
    fn a_heartbeat_is_answered_in_order() {
        let mut s = opened(0);
        s.handle_batch(batch(1, 2));
        drain(&mut s);
        s.handle_heartbeat();
        assert_eq!(drain(&mut s), vec![], "behind the append");
        s.handle_appended(Decree(2));
        assert_eq!(drain(&mut s), vec![ack(2), ack(2)]);
    }

    #[test]
    fn a_batch_after_a_gap_is_refused() {
        let mut s = opened(5);
        s.handle_batch(batch(8, 9));
        let evs = drain(&mut s);
        assert!(
            matches!(&evs[..], [ReceiveEvent::End(Some(e))] if e.code == ErrorCode::BAD_BATCH && e.message.contains("8..=9") && e.message.contains("up to 5")),
            "{evs:?}"
        );
        // An empty inbox takes a first batch at any decree (a new dup).
        let mut s = opened(0);
        s.handle_batch(batch(8, 9));
        assert!(matches!(
            &drain(&mut s)[..],
            [ReceiveEvent::Append {
                first: Decree(8),
                ..
            }]
        ));
    }

    #[test]
    fn what_came_before_the_end_of_the_frames_is_still_written_and_acked() {
        let mut s = opened(0);
        s.handle_batch(batch(1, 2));
        drain(&mut s);
        s.handle_batch(batch(3, 4));
        // A frame the session refuses, while 3..=4 waits behind the append of 1..=2.
        s.handle_frame(
            &Frame::Welcome(wire::Welcome {
                confirmed_decree: Decree(1),
                present_files: vec![],
            }),
            1 << 20,
        );
        assert!(!s.wants_frames(), "nothing more is read");
        s.handle_batch(batch(5, 6));
        s.handle_appended(Decree(2));
        let evs = drain(&mut s);
        assert_eq!(
            evs[..2],
            [
                ack(2),
                ReceiveEvent::Append {
                    first: Decree(3),
                    last: Decree(4),
                    records: recs(3, 4)
                }
            ],
            "{evs:?}"
        );
        assert_eq!(
            evs.len(),
            2,
            "a batch after the bad frame is not taken: {evs:?}"
        );
        s.handle_appended(Decree(4));
        let evs = drain(&mut s);
        assert!(
            matches!(&evs[..], [a, ReceiveEvent::End(Some(e))] if *a == ack(4) && e.code == ErrorCode::UNEXPECTED_FRAME),
            "{evs:?}"
        );

        // A clean end of the stream: the queue is written, then the session ends quietly.
        let mut s = opened(0);
        s.handle_batch(batch(1, 2));
        s.handle_finished(None);
        assert!(matches!(&drain(&mut s)[..], [ReceiveEvent::Append { .. }]));
        s.handle_appended(Decree(2));
        assert_eq!(drain(&mut s), vec![ack(2), ReceiveEvent::End(None)]);
    }

    #[test]
    fn a_resent_batch_appends_only_what_is_new() {
        let mut s = opened(5);
        s.handle_batch(batch(3, 5));
        assert_eq!(
            drain(&mut s),
            vec![ack(5)],
            "all durable already: acked without an append"
        );
        s.handle_batch(batch(4, 8));
        assert_eq!(
            drain(&mut s),
            vec![ReceiveEvent::Append {
                first: Decree(6),
                last: Decree(8),
                records: recs(6, 8)
            }]
        );
    }

    #[test]
    fn a_preempted_session_gets_no_ack_for_its_last_append() {
        let mut s = opened(0);
        s.handle_batch(batch(1, 2));
        drain(&mut s);
        s.handle_batch(batch(3, 4));
        let reason = wire::Error {
            code: ErrorCode::STALE_FENCING_TOKEN,
            message: "newer".into(),
        };
        s.stop(reason.clone());
        assert!(!s.wants_frames());
        s.handle_batch(batch(5, 6));
        assert_eq!(drain(&mut s), vec![], "waits for the append in progress");
        s.handle_appended(Decree(2));
        assert_eq!(
            drain(&mut s),
            vec![ReceiveEvent::End(Some(reason))],
            "no ack, no further append"
        );
        assert_eq!(s.durable(), Decree(2));
    }

    #[test]
    fn a_failed_append_ends_the_session_without_an_ack() {
        let mut s = opened(0);
        s.handle_batch(batch(1, 2));
        drain(&mut s);
        s.handle_append_failed("disk full");
        let evs = drain(&mut s);
        assert!(matches!(&evs[..], [ReceiveEvent::End(Some(e))] if e.code == ErrorCode::INTERNAL));
    }

    #[test]
    fn bad_frames_end_the_session() {
        let mut s = opened(0);
        let mut b = wire::pack_batch(&recs(1, 2), 1);
        b.count = 3;
        s.handle_frame(&Frame::Batch(b), 1 << 20);
        assert!(
            matches!(&drain(&mut s)[..], [ReceiveEvent::End(Some(e))] if e.code == ErrorCode::BAD_BATCH)
        );
        let mut s = opened(0);
        s.handle_frame(
            &Frame::Ack(wire::Ack {
                confirmed_decree: Decree(1),
            }),
            1 << 20,
        );
        assert!(
            matches!(&drain(&mut s)[..], [ReceiveEvent::End(Some(e))] if e.code == ErrorCode::UNEXPECTED_FRAME)
        );
    }

    #[test]
    fn pipeline_back_pressure() {
        let mut s = opened(0);
        s.handle_batch(batch(1, 1));
        drain(&mut s);
        for d in 2..=(PIPELINE as u64 + 1) {
            assert!(s.wants_frames());
            s.handle_batch(batch(d, d));
        }
        assert!(
            !s.wants_frames(),
            "{PIPELINE} batches wait behind the append"
        );
    }

    #[test]
    fn a_preempted_session_is_told_whether_its_election_is_lost() {
        let e = preempted(5, 7, "partition 3");
        assert_eq!(e.code, ErrorCode::STALE_FENCING_TOKEN);
        assert!(e.message.contains("newer fencing token 7") && e.message.contains("token 5"));
        let e = preempted(7, 7, "partition 3");
        assert_eq!(
            e.code,
            ErrorCode::SUPERSEDED,
            "the same shipper reconnecting keeps its election"
        );
        assert!(e.message.contains("partition 3"), "{}", e.message);
    }

    #[test]
    fn the_fencing_rule() {
        assert_eq!(
            admit(5, None, 4),
            Admission::Stale { newest: 5 },
            "older than stored"
        );
        assert_eq!(
            admit(5, None, 5),
            Admission::Accept {
                persist: false,
                preempt: None
            }
        );
        assert_eq!(
            admit(5, None, 7),
            Admission::Accept {
                persist: true,
                preempt: None
            }
        );
        assert_eq!(
            admit(5, Some((1, 5)), 5),
            Admission::Accept {
                persist: false,
                preempt: Some(1)
            },
            "the same shipper reconnecting ends its old session"
        );
        assert_eq!(
            admit(5, Some((1, 5)), 6),
            Admission::Accept {
                persist: true,
                preempt: Some(1)
            }
        );
        assert_eq!(
            admit(0, Some((1, 9)), 6),
            Admission::Stale { newest: 9 },
            "a newer live session"
        );
        let r = stale_refusal(4, 5, "dup 1 partition 0");
        assert_eq!(r.code, ErrorCode::STALE_FENCING_TOKEN);
        assert!(r.message.contains("token 4") && r.message.contains("token 5"));
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster_id: ClusterId::new(1).expect("valid"),
            dupid: DupId(1),
            table: "users".into(),
            partition: PartitionId(0),
            fencing_token: 3,
            purpose: wire::Purpose::Log,
        }
    }

    #[test]
    fn hello_checks() {
        let table = TableView {
            partition_count: 2,
            placement: vec![Some("n1".into()), Some("n1".into())],
        };
        let ctx = HelloContext {
            peer_cluster: "bj",
            peer_cluster_id: ClusterId::new(1).expect("valid"),
            our_cluster: "tj",
            node: "n1",
            table: Some(&table),
        };
        assert_eq!(check_hello(&hello(), &ctx), Ok(2));
        let code = |h: &Hello, c: &HelloContext<'_>| check_hello(h, c).map_err(|r| r.code);
        let mut h = hello();
        h.version = 9;
        assert_eq!(code(&h, &ctx), Err(ErrorCode::UNSUPPORTED_VERSION));
        let mut h = hello();
        h.cluster_id = ClusterId::new(2).expect("valid");
        assert_eq!(code(&h, &ctx), Err(ErrorCode::UNAUTHORIZED));
        assert_eq!(
            code(
                &hello(),
                &HelloContext {
                    table: None,
                    ..ctx.clone()
                }
            ),
            Err(ErrorCode::UNKNOWN_TABLE)
        );
        let elsewhere = TableView {
            partition_count: 2,
            placement: vec![Some("n1".into()), Some("n2".into())],
        };
        let r = check_hello(
            &hello(),
            &HelloContext {
                table: Some(&elsewhere),
                ..ctx.clone()
            },
        )
        .expect_err("elsewhere");
        assert!(
            r.code == ErrorCode::UNAVAILABLE && r.message.contains("node `n2`"),
            "{r:?}"
        );
        let unplaced = TableView {
            partition_count: 1,
            placement: vec![None],
        };
        assert_eq!(
            code(
                &hello(),
                &HelloContext {
                    table: Some(&unplaced),
                    ..ctx.clone()
                }
            ),
            Err(ErrorCode::UNAVAILABLE)
        );
        let empty = TableView {
            partition_count: 0,
            placement: vec![],
        };
        assert_eq!(
            code(
                &hello(),
                &HelloContext {
                    table: Some(&empty),
                    ..ctx
                }
            ),
            Err(ErrorCode::UNAVAILABLE)
        );
    }

    #[test]
    fn only_other_clusters_of_the_group_are_authorized() {
        let group = [("bj", 1u8), ("tj", 2u8)];
        assert_eq!(
            authorize("tj", group, "bj"),
            Ok(ClusterId::new(1).expect("valid"))
        );
        let e = authorize("tj", group, "sh").expect_err("outside the group");
        assert!(
            e.message
                .contains("cluster `sh` is not in the duplication group of cluster `tj` (bj, tj)"),
            "{}",
            e.message
        );
        assert!(authorize("tj", group, "tj").is_err(), "not itself");
        assert!(
            authorize("tj", [("bj", 200u8)], "bj").is_err(),
            "id out of range"
        );
    }
}
