//! One shipping session: one bidirectional QUIC stream for one (dup, source partition).
//!
//! ```text
//! Hello ──▶ checks (version, cluster id, table, placement, fencing) ──▶ Welcome{confirmed}
//! Batch ──▶ unpack, split by target partition, append to every inbox (fsync) ──▶ Ack{last}
//! Heartbeat ──▶ Ack{confirmed}
//! ```
//!
//! After the `Welcome`, two tasks share the session, joined by a bounded channel: the *reader*
//! decodes frames and unpacks (decompresses and splits) the next batch while the *writer*
//! appends the previous one to the inboxes and acknowledges it. The writer alone sends frames, in
//! order, and acknowledges a batch only after every target partition's append (with its fsync)
//! returned. Any error ends the session with an `Error` frame; nothing past it is written or
//! acknowledged, and the process and the other sessions go on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument as _;

use ferry_log::inbox::InboxWriter;
use ferry_meta::MetaError;
use ferry_proto::wire::{self, ErrorCode, Frame, WireError, FRAME_HEADER_LEN};
use ferry_proto::Source;
use ferry_proto::{ClusterId, Decree, PlogRecord};

use crate::fence::{FenceKey, Refusal, StopSignal};
use crate::server::Context;
use ferry_dup::receive::{self, HelloContext, TableView};
use ferry_dup::route;

/// Batches unpacked ahead of the one being written: they keep the disk busy while the next batch
/// is decompressed, and are merged into the next write (one fsync per target partition for all
/// of them). Small enough to bound memory to a few batches per session.
const PIPELINE: usize = 4;
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
enum End {
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
    Batch(Unpacked),
    Heartbeat,
    End(End),
}

/// A batch unpacked and split by target partition; possibly several consecutive batches merged
/// (see [`Unpacked::absorb`]).
struct Unpacked {
    first: Decree,
    last: Decree,
    count: u32,
    raw_len: u32,
    /// How many wire batches this holds.
    batches: u64,
    parts: Vec<Vec<PlogRecord>>,
}

impl Unpacked {
    /// Appends the batch that directly follows this one, so that both reach the disk with one
    /// fsync per target partition (group commit across the batches queued behind a write).
    /// Gives `next` back when it does not follow directly; the gap check then sees it alone.
    fn absorb(&mut self, next: Unpacked) -> Result<(), Unpacked> {
        let follows = self.count > 0 && next.count > 0 && next.first.0 == self.last.0 + 1;
        if !follows {
            return Err(next);
        }
        self.last = next.last;
        self.count = self.count.saturating_add(next.count);
        self.raw_len = self.raw_len.saturating_add(next.raw_len);
        self.batches += next.batches;
        for (mine, theirs) in self.parts.iter_mut().zip(next.parts) {
            mine.extend(theirs);
        }
        Ok(())
    }
}

struct Session {
    ctx: Arc<Context>,
    peer: Arc<Peer>,
    send: SendStream,
    welcomed: bool,
}

/// The admitted state of a session: what it writes and where it stands.
struct Open {
    key: FenceKey,
    writers: Vec<InboxWriter>,
    confirmed: Decree,
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
        .map_err(|m| End::Failed(ErrorCode::INTERNAL, m))?;
        let confirmed = confirmed(&writers);
        if stop.is_stopped() {
            return Ok((admitted, None));
        }
        self.send_frame(&Frame::Welcome(wire::Welcome {
            confirmed_decree: confirmed,
            present_files: vec![],
        }))
        .await?;
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
                    confirmed,
                    stop,
                },
            )),
        ))
    }

    /// Batches and heartbeats until the session ends.
    async fn steady(&mut self, recv: RecvStream, frames: FrameBuffer, mut open: Open) -> End {
        let (tx, mut rx) = mpsc::channel(PIPELINE);
        let partition_count = open.writers.len() as u32;
        let reader = AbortOnDropHandle::new(tokio::spawn(
            read_loop(self.ctx.clone(), recv, frames, tx, partition_count)
                .instrument(tracing::Span::current()),
        ));
        // Work taken from the queue while merging batches, to be handled next.
        let mut held: Option<Work> = None;
        let end = loop {
            let work = match held.take() {
                Some(w) => Some(w),
                None => tokio::select! {
                    biased;
                    _ = open.stop.stopped() => break End::Stopped(open.stop.reason()),
                    w = rx.recv() => w,
                },
            };
            match work {
                None => break End::Lost("the stream reader ended".into()),
                Some(Work::End(end)) => break end,
                Some(Work::Heartbeat) => {
                    let ack = Frame::Ack(wire::Ack {
                        confirmed_decree: open.confirmed,
                    });
                    if let Err(end) = self.send_frame(&ack).await {
                        break end;
                    }
                }
                Some(Work::Batch(mut b)) => {
                    // Batches already unpacked behind this one are written with it.
                    while let Ok(w) = rx.try_recv() {
                        match w {
                            Work::Batch(next) => {
                                if let Err(next) = b.absorb(next) {
                                    held = Some(Work::Batch(next));
                                    break;
                                }
                            }
                            other => {
                                held = Some(other);
                                break;
                            }
                        }
                    }
                    if let Err(end) = self.write_batch(&mut open, b).await {
                        break end;
                    }
                }
            }
        };
        drop(reader);
        // The writers close before the slot is released (by the caller).
        drop(open.writers);
        end
    }

    /// Appends one batch to every target partition's inbox, in parallel, and acknowledges it
    /// once all of them are durable.
    async fn write_batch(&mut self, open: &mut Open, b: Unpacked) -> Result<(), End> {
        if b.count > 0 {
            if let Some((tp, last)) = open
                .writers
                .iter()
                .enumerate()
                .map(|(tp, w)| (tp, w.last_decree()))
                .find(|(_, last)| last.0 > 0 && b.first.0 > last.0 + 1)
            {
                return Err(End::Failed(
                    ErrorCode::BAD_BATCH,
                    format!(
                        "batch {}..={} starts after a gap: target partition {tp} holds decrees up \
                         to {last} only; resume after the confirmed decree of the Welcome",
                        b.first, b.last
                    ),
                ));
            }
        }
        let started = Instant::now();
        let writers = std::mem::take(&mut open.writers);
        let (writers, result) = append_all(writers, b.parts).await;
        open.writers = writers;
        let confirmed = result.map_err(|m| End::Failed(ErrorCode::INTERNAL, m))?;
        let m = &self.ctx.metrics;
        m.inbox_write_seconds
            .observe(started.elapsed().as_secs_f64());
        m.batches.inc_by(b.batches);
        m.records.inc_by(u64::from(b.count));
        m.raw_bytes(b.raw_len as usize);
        open.confirmed = confirmed;
        m.confirmed(
            &open.key.table,
            open.key.dupid.0,
            open.key.partition.0,
            confirmed.0,
        );
        // Preempted while writing: the data is durable but this shipper is no longer the owner,
        // so it gets no ack, only the reason.
        if open.stop.is_stopped() {
            return Err(End::Stopped(open.stop.reason()));
        }
        self.send_frame(&Frame::Ack(wire::Ack {
            confirmed_decree: confirmed,
        }))
        .await
    }

    async fn send_frame(&mut self, frame: &Frame) -> Result<(), End> {
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

/// The reader task: frames → work for the writer. Ends at the first error or at the end of
/// the stream, telling the writer how. Cancellation-safe (the writer aborts it when it ends).
async fn read_loop(
    ctx: Arc<Context>,
    mut recv: RecvStream,
    mut frames: FrameBuffer,
    tx: mpsc::Sender<Work>,
    partition_count: u32,
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
                    tokio::task::spawn_blocking(move || unpack(batch, max_raw, partition_count))
                        .await;
                match unpacked {
                    Ok(Ok(u)) => Work::Batch(u),
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
            Frame::Error(e) => break End::PeerError(e),
            Frame::Chunk(_) | Frame::FileDone(_) | Frame::CheckpointDone(_) => {
                break End::Malformed(
                    ErrorCode::UNEXPECTED_FRAME,
                    format!(
                        "{} (checkpoint transfer) is not supported by this receiver yet; \
                         use an incremental duplication",
                        frame.name()
                    ),
                )
            }
            other => {
                break End::Malformed(
                    ErrorCode::UNEXPECTED_FRAME,
                    format!(
                    "{} is not expected from a shipper after the Welcome; send Batch or Heartbeat",
                    other.name()
                ),
                )
            }
        };
        if tx.send(work).await.is_err() {
            return;
        }
    };
    if !matches!(end, End::Clean | End::Lost(_) | End::PeerError(_)) {
        // Tell the peer to stop sending; the Error frame follows from the writer.
        let _ = recv.stop(VarInt::from_u32(0));
    }
    let _ = tx.send(Work::End(end)).await;
}

fn unpack(batch: wire::Batch, max_raw: usize, partition_count: u32) -> Result<Unpacked, WireError> {
    let records = wire::unpack_batch(&batch, max_raw)?;
    Ok(Unpacked {
        first: batch.first_decree,
        last: batch.last_decree,
        count: batch.count,
        raw_len: batch.raw_len,
        batches: 1,
        parts: route::split(records, partition_count),
    })
}

/// Reads until the next whole frame: `None` at a clean end of the stream (between frames).
/// Cancellation-safe: bytes already read stay in `frames`.
async fn next_frame(
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

/// Opens (recovering) the inbox of `source` in each of the table's `partition_count` partition
/// directories under `table_dir`, in parallel.
async fn open_writers(
    table_dir: std::path::PathBuf,
    source: Source,
    partition_count: u32,
    segment_bytes: u64,
) -> Result<Vec<InboxWriter>, String> {
    let handles: Vec<_> = (0..partition_count)
        .map(|tp| {
            let dir = table_dir.join(tp.to_string());
            tokio::task::spawn_blocking(move || InboxWriter::open(&dir, source, segment_bytes))
        })
        .collect();
    let mut writers = Vec::with_capacity(handles.len());
    let mut failure = None;
    for (tp, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok(Ok(w)) => writers.push(w),
            Ok(Err(e)) => {
                failure.get_or_insert(format!(
                    "cannot open the inbox of target partition {tp}: {e}"
                ));
            }
            Err(e) => {
                failure.get_or_insert(format!(
                    "the thread opening the inbox of target partition {tp} failed ({e})"
                ));
            }
        }
    }
    match failure {
        Some(m) => Err(m),
        None => Ok(writers),
    }
}

/// Appends each target partition's records to its writer, all in parallel, and waits for every
/// one of them (so no append is still running when this returns). Returns the writers that are
/// still usable, and the new confirmed decree or the first failure.
async fn append_all(
    writers: Vec<InboxWriter>,
    parts: Vec<Vec<PlogRecord>>,
) -> (Vec<InboxWriter>, Result<Decree, String>) {
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
    for (tp, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok((w, Ok(_))) => back.push(w),
            Ok((w, Err(e))) => {
                back.push(w);
                failure.get_or_insert(format!(
                    "cannot write the inbox of target partition {tp}: {e}"
                ));
            }
            Err(e) => {
                failure.get_or_insert(format!(
                    "the thread writing the inbox of target partition {tp} failed ({e})"
                ));
            }
        }
    }
    match failure {
        Some(m) => (back, Err(m)),
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

    fn unpacked(first: u64, last: u64) -> Unpacked {
        let c = ClusterId::new(1).expect("valid");
        let records: Vec<PlogRecord> = (first..=last)
            .map(|d| PlogRecord {
                decree: Decree(d),
                timetag: Timetag::new(d, c, false),
                ops: vec![Op::Delete {
                    key: format!("k{d}").into_bytes(),
                }],
            })
            .collect();
        Unpacked {
            first: Decree(first),
            last: Decree(last),
            count: (last - first + 1) as u32,
            raw_len: 10,
            batches: 1,
            parts: route::split(records, 3),
        }
    }

    #[test]
    fn only_a_directly_following_batch_is_merged() {
        let mut a = unpacked(1, 4);
        assert!(a.absorb(unpacked(5, 9)).is_ok());
        assert_eq!(
            (a.first, a.last, a.count, a.batches),
            (Decree(1), Decree(9), 9, 2)
        );
        for part in &a.parts {
            let decrees: Vec<u64> = part.iter().map(|r| r.decree.0).collect();
            assert_eq!(
                decrees,
                (1..=9).collect::<Vec<_>>(),
                "every inbox stays contiguous"
            );
        }
        let ops: usize = a.parts.iter().flatten().map(|r| r.ops.len()).sum();
        assert_eq!(ops, 9, "each write lands in exactly one target partition");
        let back = a.absorb(unpacked(11, 12)).expect_err("a gap is not merged");
        assert_eq!(back.first, Decree(11));
        assert!(
            a.absorb(unpacked(9, 12)).is_err(),
            "an overlap is not merged"
        );
        assert_eq!(a.last, Decree(9));
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
        assert!(r.expect_err("gap").contains("target partition 0"));
    }
}
