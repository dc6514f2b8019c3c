//! One shipping session: one bidirectional QUIC stream for one (dup, source partition).
//!
//! ```text
//! Hello ──▶ checks (version, cluster id, table, placement, fencing) ──▶ Welcome{confirmed}
//! Batch ──▶ unpack, split by target partition, append to every inbox (fsync) ──▶ Ack{last}
//! Heartbeat ──▶ Ack{confirmed}
//! ```
//!
//! The protocol after the `Welcome` (merging queued batches, the gap check, resends, acks only
//! once durable, preemption) is `ferry_dup::receive::ReceiveSession`; this module only moves
//! bytes for it. Two tasks: the *reader* decodes frames and unpacks (decompresses) the next
//! batch, the *writer* feeds the session, sends what it says in order and runs its appends
//! (split by target partition, every partition's inbox in parallel). Any error ends the session
//! with an `Error` frame; nothing past it is written or acknowledged, and the process and the
//! other sessions go on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use ferry_dup::receive::{
    self, HelloContext, Incoming, ReceiveEvent, ReceiveSession, ReceiveStats, TableView,
};
use ferry_dup::route;
use ferry_log::inbox::InboxWriter;
use ferry_log::LogError;
use ferry_meta::MetaError;
use ferry_proto::wire::{self, ErrorCode, Frame, Purpose, WireError, FRAME_HEADER_LEN};
use ferry_proto::{ClusterId, Decree, PlogRecord, Source};

use crate::fence::{FenceKey, Refusal, StopSignal};
use crate::server::Context;

/// How long a new stream may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the final `Error` frame may take to be written before the stream is dropped.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest single read from the stream.
const READ_CHUNK: usize = 256 << 10;

/// Who is at the other end of a connection, established once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The cluster named by the shipper's certificate.
    pub cluster: String,
    /// That cluster's id in the duplication group.
    pub cluster_id: ClusterId,
    pub addr: SocketAddr,
}

/// Runs one session to its end. Never panics on peer input; logs its outcome once.
pub async fn run(ctx: Arc<Context>, peer: Arc<Peer>, send: SendStream, recv: RecvStream) {
    let span = tracing::info_span!(
        "session",
        cluster = %peer.cluster,
        peer = %peer.addr,
        table = tracing::field::Empty,
        dupid = tracing::field::Empty,
        partition = tracing::field::Empty,
    );
    async move {
        let mut s = Session {
            ctx: ctx.clone(),
            peer,
            send,
            welcomed: false,
        };
        let end = s.serve(recv).await;
        s.finish(end).await;
    }
    .instrument(span)
    .await
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The shipper finished its stream.
    Clean,
    /// The stream or connection broke; nothing can be sent.
    Lost(String),
    /// The shipper sent an `Error` frame.
    PeerError(wire::Error),
    /// The `Hello` was refused.
    Refused(Refusal),
    /// A frame did not decode, or is not allowed here.
    Malformed(ErrorCode, String),
    /// Writing the inbox (or something else on our side) failed.
    Failed(ErrorCode, String),
    /// Preempted by a newer session, or the receiver is stopping.
    Stopped(wire::Error),
}

/// What the reader hands the writer.
enum Work {
    Batch(Incoming),
    Heartbeat,
    /// The last frame the reader takes: the shipper's `Error`, or one not allowed here.
    Last(Frame),
    End(End),
}

pub(crate) struct Session {
    pub(crate) ctx: Arc<Context>,
    pub(crate) peer: Arc<Peer>,
    send: SendStream,
    pub(crate) welcomed: bool,
}

/// The admitted state of a session: what it writes, and the protocol state.
struct Open {
    key: FenceKey,
    writers: Vec<InboxWriter>,
    session: ReceiveSession,
    stop: StopSignal,
}

impl Session {
    async fn serve(&mut self, mut recv: RecvStream) -> End {
        let mut frames = FrameBuffer::default();
        let first =
            tokio::time::timeout(HELLO_TIMEOUT, next_frame(&mut recv, &mut frames, &self.ctx))
                .await;
        let hello = match first {
            Err(_) => {
                return End::Malformed(
                    ErrorCode::UNEXPECTED_FRAME,
                    format!(
                        "no Hello within {}s of opening the stream; send Hello first",
                        HELLO_TIMEOUT.as_secs()
                    ),
                )
            }
            Ok(Err(end)) => return end,
            Ok(Ok(None)) => return End::Clean,
            Ok(Ok(Some(Frame::Hello(h)))) => h,
            Ok(Ok(Some(other))) => {
                return End::Malformed(
                    ErrorCode::UNEXPECTED_FRAME,
                    format!(
                        "the first frame of a session must be Hello, not {}",
                        other.name()
                    ),
                )
            }
        };
        let span = tracing::Span::current();
        span.record("table", hello.table.as_str());
        span.record("dupid", hello.dupid.0);
        span.record("partition", hello.partition.0);
        match &hello.purpose {
            Purpose::Log => {}
            Purpose::Checkpoint { .. } => return self.serve_checkpoint(&hello, recv, frames).await,
            Purpose::Lane => return self.serve_lane(&hello, recv, frames).await,
        }

        let (admitted, open) = match self.admit(&hello).await {
            Ok(v) => v,
            Err(end) => return end,
        };
        let Some((slot, open)) = open else {
            return End::Stopped(admitted.stop.reason());
        };
        let end = self.steady(recv, frames, open).await;
        // In this order: the writers are closed (in `steady`), then the inbox slot is released
        // for a preempting session, then the registration ends.
        drop(slot);
        drop(admitted);
        end
    }

    /// Checks the `Hello`, admits it past the fence, takes the inbox slot, opens the writers and
    /// sends the `Welcome`.
    async fn admit(
        &mut self,
        hello: &wire::Hello,
    ) -> Result<(crate::fence::Admitted, Option<(OwnedMutexGuard<()>, Open)>), End> {
        let ctx = self.ctx.clone();
        receive::check_peer(hello, &self.peer.cluster, self.peer.cluster_id)
            .map_err(End::Refused)?;
        let table = match ctx.meta.describe_table(&hello.table).await {
            Ok(desc) => Some(TableView {
                partition_count: desc.info.partition_count,
                placement: desc
                    .partitions
                    .iter()
                    .map(|e| e.as_ref().and_then(|e| e.node.clone()))
                    .collect(),
            }),
            Err(MetaError::NoSuchTable(_)) => None,
            Err(e) => {
                return Err(End::Refused(Refusal {
                    code: ErrorCode::UNAVAILABLE,
                    message: format!("cannot read table `{}` from etcd: {e}", hello.table),
                }))
            }
        };
        let partition_count = receive::check_hello(
            hello,
            &HelloContext {
                peer_cluster: &self.peer.cluster,
                peer_cluster_id: self.peer.cluster_id,
                our_cluster: &ctx.config.cluster.name,
                node: &ctx.config.receiver.node,
                table: table.as_ref(),
            },
        )
        .map_err(End::Refused)?;

        let key = FenceKey {
            cluster: hello.cluster_id,
            dupid: hello.dupid,
            table: hello.table.clone(),
            partition: hello.partition,
        };
        let admitted = ctx
            .fences
            .admit(&key, hello.fencing_token)
            .await
            .map_err(End::Refused)?;
        let stop = admitted.stop.clone();
        // The preempted session, if any, finishes the append it is in and closes its writers.
        let slot = tokio::select! {
            g = admitted.slot.clone().lock_owned() => g,
            _ = stop.stopped() => return Ok((admitted, None)),
        };

        let source = Source {
            cluster: hello.cluster_id,
            partition: hello.partition,
        };
        let writers = open_writers(
            ctx.config.receiver.data_dir.join(&hello.table),
            source,
            partition_count,
            ctx.config.receiver.inbox_segment_bytes,
        )
        .await
        .map_err(|e| End::Failed(ErrorCode::INTERNAL, e.to_string()))?;
        let confirmed = confirmed(&writers);
        let staging = ferry_log::layout::Layout::new(&ctx.config.receiver.data_dir)
            .staging(&hello.table, source);
        if let Ok(Ok(Some(m))) =
            tokio::task::spawn_blocking(move || ferry_log::staging::staged_manifest(&staging)).await
        {
            if m.decree > confirmed {
                return Err(End::Refused(Refusal {
                    code: ErrorCode::UNAVAILABLE,
                    message: format!(
                        "a re-bootstrap checkpoint of source partition {} at decree {} is staged \
                         here and not applied yet (the inboxes hold up to {confirmed}); node {} \
                         applies it, then shipping resumes after it",
                        hello.partition, m.decree, ctx.config.receiver.node
                    ),
                }));
            }
        }
        if stop.is_stopped() {
            return Ok((admitted, None));
        }
        // A new session's only output is its Welcome (nothing has come yet to answer).
        let mut session = ReceiveSession::new(hello.fencing_token, confirmed);
        while let Some(ReceiveEvent::Send(frame)) = session.poll() {
            self.send_frame(&frame).await?;
        }
        self.welcomed = true;
        ctx.metrics.sessions.inc();
        ctx.metrics
            .confirmed(&key.table, key.dupid.0, key.partition.0, confirmed.0);
        tracing::info!(
            token = hello.fencing_token,
            confirmed = confirmed.0,
            target_partitions = partition_count,
            "session open"
        );
        Ok((
            admitted,
            Some((
                slot,
                Open {
                    key,
                    writers,
                    session,
                    stop,
                },
            )),
        ))
    }

    /// Drives the session: frames in, its outputs out, its appends run, until it ends.
    async fn steady(&mut self, recv: RecvStream, frames: FrameBuffer, mut open: Open) -> End {
        // The session queues up to `receive::PIPELINE` batches itself; the channel only lets
        // the reader unpack the next one meanwhile, so a session holds at most PIPELINE + 2.
        let (tx, mut rx) = mpsc::channel(1);
        let reader = AbortOnDropHandle::new(tokio::spawn(
            read_loop(self.ctx.clone(), recv, frames, tx).instrument(tracing::Span::current()),
        ));
        let partition_count = open.writers.len() as u32;
        let max_raw = self.ctx.config.max_batch_raw();
        let mut append: Option<Append> = None;
        let mut reading = true;
        let mut told_to_stop = false;
        // Why the stream ended, when the session ends with no error of its own.
        let mut cause = None;
        let mut counted = ReceiveStats::default();
        let end = 'session: loop {
            self.count(&open, &mut counted);
            while let Some(event) = open.session.poll() {
                match event {
                    ReceiveEvent::Send(frame) => {
                        if let Err(end) = self.send_frame(&frame).await {
                            open.session.handle_closed();
                            cause = Some(end);
                        }
                    }
                    ReceiveEvent::Append { records, .. } => {
                        let writers = std::mem::take(&mut open.writers);
                        append = Some(Append::start(writers, records, partition_count));
                    }
                    ReceiveEvent::End(None) => break 'session cause.take().unwrap_or(End::Clean),
                    ReceiveEvent::End(Some(e)) if told_to_stop && e == open.stop.reason() => {
                        break 'session End::Stopped(e)
                    }
                    ReceiveEvent::End(Some(e)) if e.code == ErrorCode::INTERNAL => {
                        break 'session End::Failed(e.code, e.message)
                    }
                    ReceiveEvent::End(Some(e)) => break 'session End::Malformed(e.code, e.message),
                }
            }
            tokio::select! {
                biased;
                done = async { append.as_mut().expect("guarded").done().await }, if append.is_some() => {
                    append = None;
                    let (writers, result, took) = done;
                    open.writers = writers;
                    match result {
                        Ok(durable) => {
                            self.ctx.metrics.inbox_write_seconds.observe(took.as_secs_f64());
                            open.session.handle_appended(durable);
                        }
                        Err(e) => open.session.handle_append_failed(&e.to_string()),
                    }
                }
                _ = open.stop.stopped(), if !told_to_stop => {
                    told_to_stop = true;
                    open.session.stop(open.stop.reason());
                }
                work = rx.recv(), if reading && open.session.wants_frames() => match work {
                    Some(Work::Batch(b)) => open.session.handle_batch(b),
                    Some(Work::Heartbeat) => open.session.handle_heartbeat(),
                    Some(Work::Last(frame)) => {
                        reading = false;
                        if let Frame::Error(e) = &frame {
                            cause = Some(End::PeerError(e.clone()));
                        }
                        open.session.handle_frame(&frame, max_raw);
                    }
                    Some(Work::End(End::Clean)) => {
                        reading = false;
                        open.session.handle_finished(None);
                    }
                    Some(Work::End(End::Malformed(code, message))) => {
                        reading = false;
                        open.session.handle_finished(Some(wire::Error { code, message }));
                    }
                    Some(Work::End(end)) => {
                        reading = false;
                        cause = Some(end);
                        open.session.handle_closed();
                    }
                    None => {
                        reading = false;
                        cause = Some(End::Lost("the stream reader ended".into()));
                        open.session.handle_closed();
                    }
                },
                else => break End::Failed(
                    ErrorCode::INTERNAL,
                    "the receive session has nothing left to wait for but did not end; the \
                     shipper reconnects (please report this)"
                        .into(),
                ),
            }
        };
        self.count(&open, &mut counted);
        // An append still running owns the writers; they close before the slot is released
        // (by the caller), so a preempting session opens them only after this one.
        if let Some(mut append) = append {
            let _ = append.done().await;
        }
        drop(reader);
        drop(open.writers);
        end
    }

    /// Exports what the session made durable since the last count.
    fn count(&self, open: &Open, counted: &mut ReceiveStats) {
        let now = open.session.stats();
        if now == counted {
            return;
        }
        let m = &self.ctx.metrics;
        m.batches.inc_by(now.batches - counted.batches);
        m.records.inc_by(now.records - counted.records);
        m.raw_bytes(usize::try_from(now.raw_bytes - counted.raw_bytes).unwrap_or(usize::MAX));
        m.confirmed(
            &open.key.table,
            open.key.dupid.0,
            open.key.partition.0,
            open.session.durable().0,
        );
        *counted = now.clone();
    }

    pub(crate) async fn send_frame(&mut self, frame: &Frame) -> Result<(), End> {
        let mut buf = Vec::new();
        wire::encode(frame, &mut buf);
        self.send
            .write_all(&buf)
            .await
            .map_err(|e| End::Lost(format!("cannot send {}: {e}", frame.name())))
    }

    /// Logs the outcome once, and tells the shipper why with an `Error` frame where it can.
    async fn finish(&mut self, end: End) {
        let ctx = self.ctx.clone();
        if self.welcomed {
            ctx.metrics.sessions.dec();
        }
        let peer = self.peer.addr;
        let error = match end {
            End::Clean => {
                tracing::debug!("shipper finished the session");
                None
            }
            End::Lost(why) => {
                tracing::info!(%why, "session lost");
                None
            }
            End::PeerError(e) => {
                tracing::info!(code = %e.code, reason = %e.message, "shipper ended the session with an error");
                None
            }
            End::Refused(r) => {
                ctx.metrics.rejected(r.code.name());
                tracing::warn!(%peer, code = %r.code, reason = %r.message, "session refused");
                Some((r.code, r.message))
            }
            End::Malformed(code, message) => {
                if !self.welcomed {
                    ctx.metrics.rejected(code.name());
                }
                tracing::warn!(%peer, %code, reason = %message, "bad frame from the shipper; session ended");
                Some((code, message))
            }
            End::Failed(code, message) => {
                if !self.welcomed {
                    ctx.metrics.rejected(code.name());
                }
                // Our own failure (the disk) needs a person; a bad batch is the shipper's.
                if code == ErrorCode::INTERNAL {
                    tracing::error!(%peer, %code, reason = %message, "session failed");
                } else {
                    tracing::warn!(%peer, %code, reason = %message, "session failed");
                }
                Some((code, message))
            }
            End::Stopped(e) => {
                tracing::info!(code = %e.code, reason = %e.message, "session stopped");
                Some((e.code, e.message))
            }
        };
        // Finishing delivers what was written even after the stream is dropped, for as long as
        // the connection lives.
        let Some((code, message)) = error else {
            let _ = self.send.finish();
            return;
        };
        let frame = Frame::Error(wire::Error {
            code,
            message: truncate(message, wire::MAX_MESSAGE),
        });
        let goodbye = async {
            self.send_frame(&frame).await.ok()?;
            self.send.finish().ok()?;
            // Until the shipper has the Error frame: at shutdown the endpoint closes right
            // after the sessions end, which would discard it.
            self.send.stopped().await.ok()
        };
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
    }
}

/// The reader task: frames → work for the writer, batches unpacked on the blocking pool. Ends
/// at the end of the stream, at a frame it does not decode, and after the first frame that is
/// neither a batch nor a heartbeat (the session decides about that one), telling the writer.
/// Cancellation-safe (the writer aborts it when it ends).
async fn read_loop(
    ctx: Arc<Context>,
    mut recv: RecvStream,
    mut frames: FrameBuffer,
    tx: mpsc::Sender<Work>,
) {
    let max_raw = ctx.config.max_batch_raw();
    let end = loop {
        let frame = match next_frame(&mut recv, &mut frames, &ctx).await {
            Ok(Some(f)) => f,
            Ok(None) => break End::Clean,
            Err(end) => break end,
        };
        let work = match frame {
            Frame::Batch(batch) => {
                let unpacked =
                    tokio::task::spawn_blocking(move || Incoming::unpack(&batch, max_raw)).await;
                match unpacked {
                    Ok(Ok(b)) => Work::Batch(b),
                    Ok(Err(e)) => break End::Malformed(e.code(), format!("bad batch: {e}")),
                    Err(e) => {
                        break End::Failed(
                            ErrorCode::INTERNAL,
                            format!("the batch-unpacking thread failed ({e})"),
                        )
                    }
                }
            }
            Frame::Heartbeat(_) => Work::Heartbeat,
            last => {
                if !matches!(last, Frame::Error(_)) {
                    // Tell the peer to stop sending; the session's Error frame follows.
                    let _ = recv.stop(VarInt::from_u32(0));
                }
                let _ = tx.send(Work::Last(last)).await;
                return;
            }
        };
        if tx.send(work).await.is_err() {
            return;
        }
    };
    if !matches!(end, End::Clean | End::Lost(_)) {
        let _ = recv.stop(VarInt::from_u32(0));
    }
    let _ = tx.send(Work::End(end)).await;
}

/// Reads until the next whole frame: `None` at a clean end of the stream (between frames).
/// Cancellation-safe: bytes already read stay in `frames`.
pub(crate) async fn next_frame(
    recv: &mut RecvStream,
    frames: &mut FrameBuffer,
    ctx: &Context,
) -> Result<Option<Frame>, End> {
    loop {
        match frames.next_frame() {
            Ok(Some((frame, len))) => {
                ctx.metrics.wire_bytes(len);
                return Ok(Some(frame));
            }
            Ok(None) => {}
            Err(e) => return Err(End::Malformed(e.code(), format!("bad frame: {e}"))),
        }
        match recv.read_chunk(frames.want(), true).await {
            Ok(Some(chunk)) => frames.extend(&chunk.bytes),
            Ok(None) if frames.is_empty() => return Ok(None),
            Ok(None) => {
                return Err(End::Malformed(
                    ErrorCode::MALFORMED,
                    "the stream ended in the middle of a frame".into(),
                ))
            }
            Err(e) => return Err(End::Lost(format!("read failed: {e}"))),
        }
    }
}

/// Bytes received but not yet decoded. It never holds more than the frame being decoded: reads
/// ask for at most what that frame still needs ([`FrameBuffer::want`]), and `decode` refuses a
/// header over `MAX_FRAME` before its body is read.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    needed: usize,
}

impl Default for FrameBuffer {
    fn default() -> Self {
        FrameBuffer {
            buf: Vec::new(),
            needed: FRAME_HEADER_LEN,
        }
    }
}

impl FrameBuffer {
    /// The next whole frame and its length on the wire, if the buffer holds one.
    pub fn next_frame(&mut self) -> Result<Option<(Frame, usize)>, WireError> {
        match wire::decode(&self.buf) {
            Ok((frame, used)) => {
                self.buf.drain(..used);
                self.needed = FRAME_HEADER_LEN.saturating_sub(self.buf.len()).max(1);
                Ok(Some((frame, used)))
            }
            Err(WireError::Incomplete { needed }) => {
                self.needed = needed.max(1);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// How many bytes to read next: what the current frame still needs, at most a chunk.
    pub fn want(&self) -> usize {
        self.needed.clamp(1, READ_CHUNK)
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
}

/// An inbox could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("cannot {action} the inbox of target partition {partition}: {source}")]
    Log {
        action: &'static str,
        partition: u32,
        #[source]
        source: LogError,
    },
    #[error("the thread {action} the inbox of target partition {partition} failed ({source})")]
    Thread {
        action: &'static str,
        partition: u32,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the thread splitting a batch by target partition failed ({0})")]
    Split(#[source] tokio::task::JoinError),
}

/// An append running on the blocking pool; the writers go with it and come back.
struct Append {
    task: tokio::task::JoinHandle<(Vec<InboxWriter>, Result<Decree, InboxError>)>,
    started: Instant,
}

impl Append {
    /// Splits `records` by target partition and appends each part to its writer.
    fn start(writers: Vec<InboxWriter>, records: Vec<PlogRecord>, partition_count: u32) -> Append {
        let task = tokio::spawn(async move {
            match tokio::task::spawn_blocking(move || route::split(records, partition_count)).await
            {
                Ok(parts) => append_all(writers, parts).await,
                Err(e) => (writers, Err(InboxError::Split(e))),
            }
        });
        Append {
            task,
            started: Instant::now(),
        }
    }

    /// Waits for it: the writers (none if its task failed), the decree now durable in every
    /// target partition or why not, and how long it took. Cancellation-safe.
    async fn done(&mut self) -> (Vec<InboxWriter>, Result<Decree, InboxError>, Duration) {
        let (writers, result) = match (&mut self.task).await {
            Ok(v) => v,
            Err(e) => (
                Vec::new(),
                Err(InboxError::Thread {
                    action: "appending to",
                    partition: 0,
                    source: e,
                }),
            ),
        };
        (writers, result, self.started.elapsed())
    }
}

/// Opens (recovering) the inbox of `source` in each of the table's `partition_count` partition
/// directories under `table_dir`, in parallel.
async fn open_writers(
    table_dir: std::path::PathBuf,
    source: Source,
    partition_count: u32,
    segment_bytes: u64,
) -> Result<Vec<InboxWriter>, InboxError> {
    let handles: Vec<_> = (0..partition_count)
        .map(|tp| {
            let dir = table_dir.join(tp.to_string());
            tokio::task::spawn_blocking(move || InboxWriter::open(&dir, source, segment_bytes))
        })
        .collect();
    let mut writers = Vec::with_capacity(handles.len());
    let mut failure = None;
    for (partition, h) in (0..).zip(handles) {
        match h.await {
            Ok(Ok(w)) => writers.push(w),
            Ok(Err(source)) => {
                failure.get_or_insert(InboxError::Log {
                    action: "open",
                    partition,
                    source,
                });
            }
            Err(source) => {
                failure.get_or_insert(InboxError::Thread {
                    action: "opening",
                    partition,
                    source,
                });
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(writers),
    }
}

/// Appends each target partition's records to its writer, all in parallel, and waits for every
/// one of them (so no append is still running when this returns). Returns the writers that are
/// still usable, and the new confirmed decree or the first failure.
async fn append_all(
    writers: Vec<InboxWriter>,
    parts: Vec<Vec<PlogRecord>>,
) -> (Vec<InboxWriter>, Result<Decree, InboxError>) {
    let handles: Vec<_> = writers
        .into_iter()
        .zip(parts)
        .map(|(mut w, records)| {
            tokio::task::spawn_blocking(move || {
                let r = w.append(&records);
                (w, r)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(handles.len());
    let mut failure = None;
    for (partition, h) in (0..).zip(handles) {
        match h.await {
            Ok((w, Ok(_))) => back.push(w),
            Ok((w, Err(source))) => {
                back.push(w);
                failure.get_or_insert(InboxError::Log {
                    action: "write",
                    partition,
                    source,
                });
            }
            Err(source) => {
                failure.get_or_insert(InboxError::Thread {
                    action: "writing",
                    partition,
                    source,
                });
            }
        }
    }
    match failure {
        Some(e) => (back, Err(e)),
        None => {
            let c = confirmed(&back);
            (back, Ok(c))
        }
    }
}

/// What every target partition holds: the smallest last decree of the inboxes.
fn confirmed(writers: &[InboxWriter]) -> Decree {
    writers
        .iter()
        .map(InboxWriter::last_decree)
        .min()
        .unwrap_or(Decree::ZERO)
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use ferry_proto::{DupId, Op, PartitionId, Timetag};

    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Hello(wire::Hello {
                version: wire::PROTOCOL_VERSION,
                cluster_id: ClusterId::new(1).expect("valid"),
                dupid: DupId(4),
                table: "users".into(),
                partition: PartitionId(3),
                fencing_token: 99,
                purpose: wire::Purpose::Log,
            }),
            Frame::Batch(wire::pack_batch(
                &[PlogRecord {
                    decree: Decree(1),
                    timetag: Timetag(1 << 8),
                    ops: vec![Op::Put {
                        key: b"k".to_vec(),
                        value: vec![7; 100_000],
                        expire_at_ms: 0,
                    }],
                }],
                1,
            )),
            Frame::Heartbeat(wire::Heartbeat {
                source_timestamp_us: 5,
                committed_decree: Decree(1),
            }),
        ]
    }

    #[test]
    fn frames_split_anywhere_decode_whole_and_the_buffer_stays_bounded() {
        let mut bytes = Vec::new();
        for f in frames() {
            wire::encode(&f, &mut bytes);
        }
        let longest = frames()
            .iter()
            .map(|f| {
                let mut b = Vec::new();
                wire::encode(f, &mut b);
                b.len()
            })
            .max()
            .expect("frames");
        for step in [1usize, 2, 3, 7, 4096, 1 << 20] {
            let mut buf = FrameBuffer::default();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < bytes.len() {
                // Read as the session does: never more than the buffer asks for.
                let n = step.min(buf.want()).min(bytes.len() - pos);
                buf.extend(&bytes[pos..pos + n]);
                pos += n;
                assert!(
                    buf.len() <= longest,
                    "buffer holds {} > {longest}",
                    buf.len()
                );
                while let Some((f, _)) = buf.next_frame().expect("valid frames") {
                    got.push(f);
                }
            }
            assert!(buf.is_empty());
            assert_eq!(got, frames(), "step {step}");
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_body() {
        let mut buf = FrameBuffer::default();
        buf.extend(&(u32::MAX).to_le_bytes());
        assert_eq!(buf.next_frame().expect("header incomplete"), None);
        assert_eq!(buf.want(), 1);
        buf.extend(&[3]);
        let e = buf.next_frame().expect_err("too large");
        assert_eq!(e.code(), ErrorCode::MALFORMED);
    }

    #[test]
    fn messages_are_cut_at_a_character_boundary() {
        let s = "é".repeat(3000);
        let t = truncate(s, wire::MAX_MESSAGE);
        assert!(t.len() <= wire::MAX_MESSAGE && t.len() >= wire::MAX_MESSAGE - 1);
        assert_eq!(truncate("short".into(), 10), "short");
    }

    #[tokio::test]
    async fn appends_split_records_to_every_partition_and_confirms_the_minimum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = Source {
            cluster: ClusterId::new(1).expect("valid"),
            partition: PartitionId(6),
        };
        let writers = open_writers(dir.path().join("users"), source, 3, 1 << 20)
            .await
            .expect("open");
        assert_eq!(confirmed(&writers), Decree(0));
        let records: Vec<PlogRecord> = (1..=20)
            .map(|d| PlogRecord {
                decree: Decree(d),
                timetag: Timetag(d << 8),
                ops: vec![Op::Put {
                    key: format!("key{d}").into_bytes(),
                    value: b"v".to_vec(),
                    expire_at_ms: 0,
                }],
            })
            .collect();
        let (writers, r) = append_all(writers, route::split(records.clone(), 3)).await;
        assert_eq!(r.expect("append"), Decree(20));
        // A resend is harmless.
        let (writers, r) = append_all(writers, route::split(records, 3)).await;
        assert_eq!(r.expect("resend"), Decree(20));
        drop(writers);
        let again = open_writers(dir.path().join("users"), source, 3, 1 << 20)
            .await
            .expect("reopen");
        assert_eq!(confirmed(&again), Decree(20));
        // A gap is refused by the inbox and reported with the partition.
        let gap = vec![PlogRecord {
            decree: Decree(30),
            timetag: Timetag(30 << 8),
            ops: vec![],
        }];
        let (_, r) = append_all(again, route::split(gap, 3)).await;
        let e = r.expect_err("gap");
        assert!(matches!(e, InboxError::Log { partition: 0, .. }), "{e}");
        assert!(e.to_string().contains("target partition 0"), "{e}");
    }
}
