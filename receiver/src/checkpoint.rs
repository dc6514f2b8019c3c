//! Checkpoint transfer sessions (full duplication): one source partition's checkpoint files
//! arrive on a control stream (lane 0) and on further lane streams of the same shipper, and are
//! staged in `<data_dir>/<table>/.staging/<cid>-<sp>/` ([`ferry_log::staging`]).
//!
//! ```text
//! lane 0: Hello{Checkpoint{lineage, decree}} ──▶ checks (peer, follower table, placement,
//!         fencing) ──▶ Welcome{present_files}
//!         Chunk / FileDone ... ──▶ stage       CheckpointDone ──▶ every file verified ──▶ Staged
//! lane n: Hello{Lane} (same dup, partition, token) ──▶ Chunk / FileDone ... ──▶ stage
//! ```
//!
//! Each staged chunk is acknowledged on its stream (`ChunkAck`, the count so far), so a shipper
//! keeps only a few chunks per lane in flight. Chunks are checked against their CRC-32C before
//! they are written; a bad one ends the
//! transfer with `CHECKSUM_MISMATCH`, and the shipper's next session resumes from what is
//! staged (the `Welcome` reports the size and CRC of every file as read back from disk, and
//! the shipper compares that prefix with its own, so a resumed file is never corrupt). A file
//! is fsynced when its `FileDone` verifies it; `Staged` is sent only once every file is.
//! The target node installs the partition when every source partition's checkpoint is staged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quinn::RecvStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use ferry_dup::receive;
use ferry_log::layout::Layout;
use ferry_log::staging::{Staging, StagingError};
use ferry_meta::{MetaError, TableState};
use ferry_proto::wire::{self, CheckpointDone, ErrorCode, Frame, Hello, Purpose};
use ferry_proto::{Decree, Source};

use crate::fence::{FenceKey, Refusal};
use crate::session::{next_frame, End, FrameBuffer, Session};

/// How long `CheckpointDone` waits for the other lanes' last `FileDone`s.
const LANES_GRACE: Duration = Duration::from_secs(30);

/// The checkpoint transfers open on this receiver, so that lane streams find theirs.
#[derive(Default)]
pub struct Transfers {
    open: Mutex<HashMap<FenceKey, Arc<Transfer>>>,
}

/// One open transfer: what its lanes write into.
pub struct Transfer {
    token: u64,
    staging: Arc<Mutex<Staging>>,
    /// Lanes reading now.
    lanes: AtomicUsize,
    /// Files verified by a `FileDone` this session.
    files_done: AtomicUsize,
    changed: Notify,
    /// Cancelled when the transfer ends (a lane failed, the control stream ended, preempted).
    stop: CancellationToken,
    /// The first failure of a lane, which ends the transfer.
    failure: Mutex<Option<(ErrorCode, String)>>,
}

impl Transfer {
    fn fail(&self, code: ErrorCode, message: String) {
        self.failure.lock().get_or_insert((code, message));
        self.stop.cancel();
        self.changed.notify_waiters();
    }
}

fn fence_key(hello: &Hello) -> FenceKey {
    FenceKey {
        cluster: hello.cluster_id,
        dupid: hello.dupid,
        table: hello.table.clone(),
        partition: hello.partition,
    }
}

impl Session {
    /// Lane 0 of a transfer, after its `Hello`.
    pub(crate) async fn serve_checkpoint(
        &mut self,
        hello: &Hello,
        mut recv: RecvStream,
        mut frames: FrameBuffer,
    ) -> End {
        let Purpose::Checkpoint { lineage, decree } = &hello.purpose else {
            return End::Malformed(ErrorCode::UNEXPECTED_FRAME, "not a checkpoint Hello".into());
        };
        let ctx = self.ctx.clone();
        if let Err(r) = receive::check_peer(hello, &self.peer.cluster, self.peer.cluster_id) {
            return End::Refused(r);
        }
        if let Err(r) = self.check_follower(hello).await {
            return End::Refused(r);
        }
        let key = fence_key(hello);
        let admitted = match ctx.fences.admit(&key, hello.fencing_token).await {
            Ok(a) => a,
            Err(r) => return End::Refused(r),
        };
        let stop = admitted.stop.clone();
        let _slot = tokio::select! {
            g = admitted.slot.clone().lock_owned() => g,
            _ = stop.stopped() => return End::Stopped(stop.reason()),
        };
        let source = Source {
            cluster: hello.cluster_id,
            partition: hello.partition,
        };
        let dir = Layout::new(&ctx.config.receiver.data_dir).staging(&hello.table, source);
        let lineage = lineage.clone();
        let opened = tokio::task::spawn_blocking(move || Staging::open(&dir, &lineage)).await;
        let staging = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let (code, message) = staging_failure(&e);
                return End::Failed(code, message);
            }
            Err(e) => {
                return End::Failed(
                    ErrorCode::INTERNAL,
                    format!("the thread opening the staging directory failed ({e})"),
                )
            }
        };
        let present = staging.present();
        let held: u64 = present.iter().map(|f| f.size).sum();
        let transfer = Arc::new(Transfer {
            token: hello.fencing_token,
            staging: Arc::new(Mutex::new(staging)),
            lanes: AtomicUsize::new(0),
            files_done: AtomicUsize::new(0),
            changed: Notify::new(),
            stop: CancellationToken::new(),
            failure: Mutex::new(None),
        });
        ctx.transfers
            .open
            .lock()
            .insert(key.clone(), transfer.clone());
        let welcome = Frame::Welcome(wire::Welcome {
            confirmed_decree: Decree(0),
            present_files: present.clone(),
        });
        let end = match self.send_frame(&welcome).await {
            Err(end) => end,
            Ok(()) => {
                self.welcomed = true;
                ctx.metrics.sessions.inc();
                tracing::info!(
                    token = hello.fencing_token,
                    decree = decree.0,
                    files_held = present.len(),
                    bytes_held = held,
                    "checkpoint transfer open"
                );
                let stopped = stop.clone();
                tokio::select! {
                    end = self.control_loop(&transfer, &mut recv, &mut frames, hello) => end,
                    _ = stopped.stopped() => End::Stopped(stop.reason()),
                }
            }
        };
        // Lanes end with the transfer; the next session opens the staging only after they did.
        transfer.stop.cancel();
        {
            let mut open = ctx.transfers.open.lock();
            if open.get(&key).is_some_and(|t| Arc::ptr_eq(t, &transfer)) {
                open.remove(&key);
            }
        }
        let drained = tokio::time::timeout(LANES_GRACE, async {
            while transfer.lanes.load(Ordering::Acquire) > 0 {
                let notified = transfer.changed.notified();
                if transfer.lanes.load(Ordering::Acquire) == 0 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("checkpoint lanes still busy after the transfer ended");
        }
        drop(admitted);
        end
    }

    /// The frames of lane 0 until `CheckpointDone` is answered, or the transfer fails.
    async fn control_loop(
        &mut self,
        transfer: &Arc<Transfer>,
        recv: &mut RecvStream,
        frames: &mut FrameBuffer,
        hello: &Hello,
    ) -> End {
        let mut chunks = 0u64;
        loop {
            let frame = tokio::select! {
                f = next_frame(recv, frames, &self.ctx) => f,
                _ = transfer.stop.cancelled() => return failure_end(transfer),
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => return End::Clean,
                Err(end) => return end,
            };
            match frame {
                Frame::CheckpointDone(done) => {
                    return self.finish_checkpoint(transfer, hello, done).await
                }
                Frame::Error(e) => return End::PeerError(e),
                other => {
                    let chunk = matches!(other, Frame::Chunk(_));
                    if let Err((code, message)) = stage_frame(&self.ctx, transfer, other).await {
                        transfer.fail(code, message);
                        return failure_end(transfer);
                    }
                    if chunk {
                        chunks += 1;
                        if let Err(end) = self
                            .send_frame(&Frame::ChunkAck(wire::ChunkAck { chunks }))
                            .await
                        {
                            return end;
                        }
                    }
                }
            }
        }
    }

    /// `CheckpointDone`: once every lane's files are verified, writes the manifest and answers
    /// `Staged`.
    async fn finish_checkpoint(
        &mut self,
        transfer: &Arc<Transfer>,
        hello: &Hello,
        done: CheckpointDone,
    ) -> End {
        let want = done.file_count as usize;
        let waited = tokio::time::timeout(LANES_GRACE, async {
            loop {
                let notified = transfer.changed.notified();
                if transfer.files_done.load(Ordering::Acquire) >= want
                    || transfer.stop.is_cancelled()
                {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        })
        .await;
        if transfer.stop.is_cancelled() {
            return failure_end(transfer);
        }
        if waited.is_err() {
            tracing::warn!(
                files_done = transfer.files_done.load(Ordering::Acquire),
                want,
                "CheckpointDone came but not every file was verified in time"
            );
        }
        let staging = transfer.staging.clone();
        let partition = hello.partition;
        let finished =
            tokio::task::spawn_blocking(move || staging.lock().finish(partition, &done)).await;
        match finished {
            Ok(Ok(manifest)) => {
                self.ctx.metrics.checkpoints_staged.inc();
                tracing::info!(
                    decree = manifest.decree.0,
                    files = manifest.files.len(),
                    bytes = manifest.total_bytes(),
                    "checkpoint staged; the node installs it once every source partition's is"
                );
                let staged = Frame::Staged(wire::Staged {
                    decree: manifest.decree,
                });
                match self.send_frame(&staged).await {
                    Ok(()) => End::Clean,
                    Err(end) => end,
                }
            }
            Ok(Err(e)) => {
                let (code, message) = staging_failure(&e);
                End::Failed(code, message)
            }
            Err(e) => End::Failed(
                ErrorCode::INTERNAL,
                format!("the thread finishing the checkpoint failed ({e})"),
            ),
        }
    }

    /// A lane stream, after its `Hello`.
    pub(crate) async fn serve_lane(
        &mut self,
        hello: &Hello,
        mut recv: RecvStream,
        mut frames: FrameBuffer,
    ) -> End {
        if let Err(r) = receive::check_peer(hello, &self.peer.cluster, self.peer.cluster_id) {
            return End::Refused(r);
        }
        let key = fence_key(hello);
        let transfer = self.ctx.transfers.open.lock().get(&key).cloned();
        let Some(transfer) = transfer.filter(|t| t.token == hello.fencing_token) else {
            return End::Refused(Refusal {
                code: ErrorCode::UNEXPECTED_FRAME,
                message: format!(
                    "no checkpoint transfer of table {} partition {} with token {} is open here; \
                     open lane 0 (a Checkpoint Hello) first",
                    hello.table, hello.partition, hello.fencing_token
                ),
            });
        };
        transfer.lanes.fetch_add(1, Ordering::AcqRel);
        let mut chunks = 0u64;
        let end = loop {
            let frame = tokio::select! {
                f = next_frame(&mut recv, &mut frames, &self.ctx) => f,
                _ = transfer.stop.cancelled() => break End::Clean,
            };
            match frame {
                Ok(Some(Frame::Error(e))) => break End::PeerError(e),
                Ok(Some(f)) => {
                    let chunk = matches!(f, Frame::Chunk(_));
                    if let Err((code, message)) = stage_frame(&self.ctx, &transfer, f).await {
                        transfer.fail(code, message.clone());
                        break End::Failed(code, message);
                    }
                    if chunk {
                        chunks += 1;
                        let ack = Frame::ChunkAck(wire::ChunkAck { chunks });
                        if let Err(end) = self.send_frame(&ack).await {
                            break end;
                        }
                    }
                }
                Ok(None) => break End::Clean,
                Err(end) => break end,
            }
        };
        transfer.lanes.fetch_sub(1, Ordering::AcqRel);
        transfer.changed.notify_waiters();
        end
    }

    /// The target table must be placed here in full; a follower table must be this dup's.
    async fn check_follower(&self, hello: &Hello) -> Result<(), Refusal> {
        let unknown = |message: String| Refusal {
            code: ErrorCode::UNKNOWN_TABLE,
            message,
        };
        let desc = match self.ctx.meta.describe_table(&hello.table).await {
            Ok(d) => d,
            Err(MetaError::NoSuchTable(_)) => {
                return Err(Refusal {
                    code: ErrorCode::UNAVAILABLE,
                    message: format!(
                        "cluster {} has no table `{}` yet; its coordinator creates the follower \
                         table when the dup enters DS_APP, retry then",
                        self.ctx.config.cluster.name, hello.table
                    ),
                })
            }
            Err(e) => {
                return Err(Refusal {
                    code: ErrorCode::UNAVAILABLE,
                    message: format!("cannot read table `{}` from etcd: {e}", hello.table),
                })
            }
        };
        // A table that serves takes a checkpoint too: a re-bootstrap of a partition whose log
        // the source collected. Its node applies it, last-writer-wins.
        if let Some(f) = &desc.info.follower {
            if f.source_cluster != self.peer.cluster || f.dupid != hello.dupid {
                return Err(unknown(format!(
                    "table `{}` is the target of dup {} from {}, not of dup {} from {}",
                    hello.table, f.dupid, f.source_cluster, hello.dupid, self.peer.cluster
                )));
            }
            if hello.partition.0 >= f.source_partitions {
                return Err(unknown(format!(
                    "source partition {} is out of range: the dup copies {} partitions",
                    hello.partition, f.source_partitions
                )));
            }
        }
        if desc.info.state != TableState::Creating {
            tracing::info!(table = %hello.table, dupid = %hello.dupid, source_partition = hello.partition.0,
                state = %desc.info.state, "a checkpoint for a table that serves: a re-bootstrap");
        }
        let node = &self.ctx.config.receiver.node;
        let here = desc
            .partitions
            .iter()
            .all(|e| e.as_ref().and_then(|e| e.node.as_deref()) == Some(node.as_str()));
        if !here {
            return Err(Refusal {
                code: ErrorCode::UNAVAILABLE,
                message: format!(
                    "table `{}` is not placed in full on node {node} yet; retry once it is",
                    hello.table
                ),
            });
        }
        Ok(())
    }
}

/// Verifies and stages one `Chunk` or `FileDone`.
async fn stage_frame(
    ctx: &crate::server::Context,
    transfer: &Arc<Transfer>,
    frame: Frame,
) -> Result<(), (ErrorCode, String)> {
    let staging = transfer.staging.clone();
    let metrics = ctx.metrics.clone();
    let name = frame.name();
    let work = move || -> Result<bool, (ErrorCode, String)> {
        match frame {
            Frame::Chunk(chunk) => {
                let data = match wire::unpack_chunk(&chunk) {
                    Ok(d) => d,
                    Err(e) => {
                        metrics.chunks_corrupt.inc();
                        return Err((
                            e.code(),
                            format!(
                                "chunk of {} at offset {} is refused: {e}; the shipper sends it \
                                 again after reconnecting",
                                chunk.file, chunk.offset
                            ),
                        ));
                    }
                };
                staging
                    .lock()
                    .write_chunk(&chunk.file, chunk.offset, &data)
                    .map_err(|e| staging_failure(&e))?;
                metrics.chunk_bytes.inc_by(data.len() as u64);
                metrics.chunks.inc();
                Ok(false)
            }
            Frame::FileDone(f) => {
                staging
                    .lock()
                    .finish_file(&f.file, f.size, f.crc32c)
                    .map_err(|e| staging_failure(&e))?;
                Ok(true)
            }
            other => Err((
                ErrorCode::UNEXPECTED_FRAME,
                format!(
                    "a checkpoint stream carries Chunk, FileDone and (lane 0) CheckpointDone, \
                     not {}",
                    other.name()
                ),
            )),
        }
    };
    let file_done = tokio::task::spawn_blocking(work).await.map_err(|e| {
        (
            ErrorCode::INTERNAL,
            format!("the thread staging a {name} failed ({e})"),
        )
    })??;
    if file_done {
        transfer.files_done.fetch_add(1, Ordering::AcqRel);
        transfer.changed.notify_waiters();
    }
    Ok(())
}

/// A staging error as the `Error` frame that ends the transfer.
fn staging_failure(e: &StagingError) -> (ErrorCode, String) {
    let code = staging_code(e);
    if code == ErrorCode::DISK_FULL {
        tracing::error!(error = %e, "the disk of the checkpoint staging is full; the copy waits until space frees");
        return (
            code,
            format!(
                "{e}: the target's disk is full. Free space on it; the copy keeps what is staged \
                 and resumes by itself"
            ),
        );
    }
    (code, e.to_string())
}

fn staging_code(e: &StagingError) -> ErrorCode {
    match e {
        StagingError::Log(e) if e.is_disk_full() => ErrorCode::DISK_FULL,
        StagingError::Log(_) => ErrorCode::INTERNAL,
        StagingError::Mismatch { .. } => ErrorCode::CHECKSUM_MISMATCH,
        StagingError::BadName { .. } | StagingError::OutOfOrder { .. } => ErrorCode::MALFORMED,
        StagingError::Incomplete { .. } => ErrorCode::UNAVAILABLE,
    }
}

fn failure_end(transfer: &Transfer) -> End {
    match transfer.failure.lock().clone() {
        Some((code, message)) => End::Failed(code, message),
        None => End::Clean,
    }
}
