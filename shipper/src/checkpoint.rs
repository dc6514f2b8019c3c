//! The checkpoint transfer of one partition of a full dup in `DS_APP`, while this shipper leads
//! the partition's election: the checkpoint the node made for the dup (`DS_PREPARE`) goes to
//! the receiver of the target table on `checkpoint_lanes` parallel QUIC streams.
//!
//! The protocol decisions are `ferry_dup::transfer::SendCheckpoint`'s; this driver moves bytes:
//! lane 0 is the stream whose `Hello{Checkpoint}` got the `Welcome`, the other lanes are opened
//! with `Hello{Lane}`. Each lane is a task that reads its chunks from the checkpoint files,
//! packs them (zstd where it pays) on the blocking pool and writes them, so the lanes read,
//! compress and send in parallel. After `Done`, the other lanes finish their streams, lane 0
//! sends `CheckpointDone`, and the receiver answers `Staged`. Any failure ends the session and
//! the next one resumes from what the receiver holds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::SendStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use ferry_admin::client::AdminClient;
use ferry_dup::transfer::{SendCheckpoint, SendEvent, TransferConfig, TransferProgress};
use ferry_log::layout::Layout;
use ferry_meta::status::DupStatus;
use ferry_meta::{DupCheckpoint, DupInfo};
use ferry_net::{send_frame, FrameReader};
use ferry_proto::checkpoint::DB_DIR;
use ferry_proto::wire::{self, ErrorCode, Frame, Hello, Purpose};

use crate::metrics::Labels;
use crate::server::Shared;
use crate::session::single_receiver;
use crate::status::{Key, State};

/// Chunks a lane keeps sent but not yet acknowledged (`ChunkAck`): a break makes the shipper
/// send again at most this many chunks per lane. 16 MiB per lane: with 0.1% loss almost every
/// 1 MiB chunk loses a packet, and its stream waits a round trip for the resend, so 4 chunks
/// held a lone partition to ~25 MB/s over 50 ms (`bench checkpoint`); 16 keep it going.
pub const LANE_WINDOW: usize = 16;

/// How a transfer session ended.
pub enum Outcome {
    /// The receiver staged the checkpoint.
    Staged,
    /// The dup left `DS_APP` (or the term ends).
    Left,
    /// A newer shipper holds the partition.
    Fenced(String),
    /// The target's disk is full (its sentence); retried while the alarm is up.
    DiskFull(String),
    /// Anything else: retried.
    Failed(String),
}

/// Runs transfer sessions until the checkpoint is staged, then waits until the dup leaves
/// `DS_APP`. Returns `None` when the dup moved on (to `DS_LOG`: the caller ships the log), or
/// the reason the term ends.
pub async fn run(
    shared: &Arc<Shared>,
    key: &Key,
    dup: &mut watch::Receiver<DupInfo>,
    token: u64,
    cancel: &CancellationToken,
) -> Option<Result<(), String>> {
    copy(shared, key, dup, token, cancel, &Copy::Initial).await
}

/// Which checkpoint a transfer sends.
#[derive(Debug, Clone)]
pub enum Copy {
    /// The full dup's own (`DS_APP`), published in `dups/<table>/<dupid>/checkpoint/<p>`.
    Initial,
    /// A re-bootstrap's fresh checkpoint (`DS_LOG`), from its record.
    Rebootstrap {
        generation: u32,
        checkpoint: Box<DupCheckpoint>,
    },
}

impl Copy {
    /// The dup status the transfer runs in.
    fn phase(&self) -> DupStatus {
        match self {
            Copy::Initial => DupStatus::App,
            Copy::Rebootstrap { .. } => DupStatus::Log,
        }
    }
}

/// Runs transfer sessions of `what` until it is staged. The initial copy then waits until the
/// dup leaves `DS_APP`; a re-bootstrap returns at once. Returns `None` when the caller ships
/// the log next, or the reason the term ends.
pub async fn copy(
    shared: &Arc<Shared>,
    key: &Key,
    dup: &mut watch::Receiver<DupInfo>,
    token: u64,
    cancel: &CancellationToken,
    what: &Copy,
) -> Option<Result<(), String>> {
    let mut backoff = Duration::from_millis(200);
    let mut staged = false;
    let disk_full = shared
        .metrics
        .checkpoint_target_disk_full
        .get_or_create(&labels(key))
        .clone();
    loop {
        if cancel.is_cancelled() {
            return Some(Ok(()));
        }
        if dup.borrow().status != what.phase() {
            return match what {
                Copy::Initial => None,
                // Paused or removed: the partition task ends.
                Copy::Rebootstrap { .. } => Some(Ok(())),
            };
        }
        if staged && matches!(what, Copy::Rebootstrap { .. }) {
            return None;
        }
        if staged {
            // Nothing to send; the coordinator moves the dup on once the target installed it.
            tokio::select! {
                _ = cancel.cancelled() => return Some(Ok(())),
                r = dup.changed() => if r.is_err() { return Some(Ok(())) },
            }
            continue;
        }
        let outcome = tokio::select! {
            o = session(shared, key, dup, token, what) => o,
            _ = cancel.cancelled() => return Some(Ok(())),
        };
        match outcome {
            Outcome::Staged => {
                staged = true;
                backoff = Duration::from_millis(200);
                shared.board.with(key, |e| {
                    e.state = State::Staged;
                    e.last_error = None;
                });
                if let Some(p) = shared.board.get(key).and_then(|e| e.checkpoint) {
                    publish(shared, key, &p, "staged").await;
                }
            }
            Outcome::Left => {}
            Outcome::Fenced(why) => return Some(Err(why)),
            Outcome::DiskFull(why) => {
                if disk_full.get() == 0 {
                    tracing::error!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, error = %why,
                        "ALARM: the target's disk is full; the checkpoint copy is paused and retried every 5 s until space frees");
                }
                disk_full.set(1);
                shared.board.with(key, |e| {
                    e.state = State::TargetDiskFull;
                    e.last_error = Some(why);
                });
                if let Some(p) = shared.board.get(key).and_then(|e| e.checkpoint) {
                    publish(shared, key, &p, "target disk full").await;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Some(Ok(())),
                    _ = tokio::time::sleep(DISK_FULL_RETRY) => {}
                }
            }
            Outcome::Failed(why) => {
                shared
                    .metrics
                    .session_failures
                    .get_or_create(&labels(key))
                    .inc();
                tracing::warn!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, error = %why, "checkpoint transfer session failed; resuming after a pause");
                shared.board.with(key, |e| {
                    e.state = State::Retrying;
                    e.last_error = Some(why);
                });
                tokio::select! {
                    _ = cancel.cancelled() => return Some(Ok(())),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn labels(key: &Key) -> Labels {
    crate::metrics::labels(&key.table, key.dupid, key.partition)
}

/// How often a copy paused by a full target disk tries again.
const DISK_FULL_RETRY: Duration = Duration::from_secs(5);

/// What a lane task is asked to do, in order.
enum LaneWork {
    /// Read, pack and send this piece of a file.
    Chunk {
        file: String,
        offset: u64,
        len: u32,
    },
    Frame(Frame),
}

/// What a lane task reports.
enum LaneDone {
    Sent { lane: usize, wire: u64, file: u64 },
    Failed(String),
}

/// One session: Hello, Welcome, the chunks, CheckpointDone, Staged.
async fn session(
    shared: &Arc<Shared>,
    key: &Key,
    dup: &mut watch::Receiver<DupInfo>,
    token: u64,
    what: &Copy,
) -> Outcome {
    let info = dup.borrow().clone();
    let s = &shared.config.shipper;
    shared.board.with(key, |e| e.state = State::Connecting);
    let layout = Layout::new(&s.data_dir);
    let (cp, dir) = match what {
        Copy::Initial => match shared
            .meta
            .checkpoint(&key.table, key.dupid, key.partition)
            .await
        {
            Ok(Some(cp)) => {
                let dir = layout.dup_checkpoint(&key.table, key.partition, key.dupid);
                (cp, dir)
            }
            Ok(None) => {
                return Outcome::Failed(format!(
                    "dup {} has no published checkpoint of partition {} yet",
                    key.dupid, key.partition
                ))
            }
            Err(e) => return Outcome::Failed(format!("cannot read the checkpoint from etcd: {e}")),
        },
        Copy::Rebootstrap {
            generation,
            checkpoint,
        } => {
            let dir = layout.dup_rebootstrap(&key.table, key.partition, key.dupid, *generation);
            ((**checkpoint).clone(), dir)
        }
    };
    if !dir.join(DB_DIR).is_dir() {
        return Outcome::Failed(format!(
            "the checkpoint of partition {} for dup {} is not in {} on this node (made by node {}); \
             a shipper sends only checkpoints its node made",
            key.partition,
            key.dupid,
            dir.display(),
            cp.node
        ));
    }
    let partitions = match shared.meta.table(&key.table).await {
        Ok(t) => t.partition_count,
        Err(e) => {
            return Outcome::Failed(format!("cannot read table {} from etcd: {e}", key.table))
        }
    };
    let addr = match receiver(shared, &info).await {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(e),
    };
    shared.board.with(key, |e| e.receiver = Some(addr.clone()));
    let conn = match shared.quic.connection(&addr).await {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let hello = |purpose| {
        Frame::Hello(Hello {
            version: wire::PROTOCOL_VERSION,
            cluster_id: shared.cluster_id,
            dupid: key.dupid,
            table: info.remote_table.clone(),
            partition: key.partition,
            fencing_token: token,
            purpose,
        })
    };
    let (mut send0, recv0) = match open_stream(&conn, s.ack_timeout, &addr).await {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e),
    };
    let first = hello(Purpose::Checkpoint {
        lineage: cp.lineage.clone(),
        decree: cp.manifest.decree,
    });
    if let Err(e) = send_frame(&mut send0, &first, "receiver").await {
        return Outcome::Failed(e.to_string());
    }
    let mut frames0 = FrameReader::spawn(recv0, "receiver");
    let welcome = match tokio::time::timeout(s.ack_timeout, frames0.recv()).await {
        Ok(Ok(Frame::Welcome(w))) => w,
        Ok(Ok(Frame::Error(e))) => return refused(&e),
        Ok(Ok(other)) => {
            return Outcome::Failed(format!(
                "the receiver answered a checkpoint Hello with {}, not Welcome",
                other.name()
            ))
        }
        Ok(Err(e)) => return Outcome::Failed(e.to_string()),
        Err(_) => {
            return Outcome::Failed(format!(
                "receiver {addr} sent no Welcome within {:?}",
                s.ack_timeout
            ))
        }
    };
    let config = TransferConfig {
        chunk_bytes: s.checkpoint_chunk_bytes,
        lanes: s.checkpoint_lanes,
        rate: rate_of(&info, partitions),
    };
    let now = Instant::now();
    let mut sender = SendCheckpoint::new(cp.manifest.clone(), &welcome.present_files, &config, now);
    let l = labels(key);
    set_rate_gauge(shared, &l, config.rate);
    let mut counted_present = 0;
    count_present(shared, &l, sender.progress(), &mut counted_present);
    tracing::info!(table = %key.table, dupid = %key.dupid, partition = key.partition.0,
        files = cp.manifest.files.len(), bytes = cp.manifest.total_bytes(),
        bytes_held = sender.progress().bytes_present, receiver = %addr, "sending the checkpoint");
    shared.board.with(key, |e| {
        e.state = State::Copying;
        e.last_error = None;
        e.checkpoint = Some(sender.progress().clone());
    });

    // Lane 0 is the stream that has the Welcome; the others open now.
    let (done_tx, mut done_rx) = mpsc::channel::<LaneDone>(64);
    let (frames_tx, mut lane_frames) = mpsc::channel::<(usize, Result<Frame, String>)>(64);
    let mut lanes: Vec<mpsc::Sender<LaneWork>> = Vec::new();
    let mut windows: Vec<Arc<Semaphore>> = Vec::new();
    let mut acked: Vec<u64> = Vec::new();
    let mut lane_tasks = Vec::new();
    let mut senders = Vec::new();
    let db = dir.join(DB_DIR);
    let level = s.zstd_level;
    let mut send0 = Some(send0);
    for lane in 0..config.lanes.max(1) {
        let send = match send0.take() {
            Some(s0) => s0,
            None => {
                let (mut send, recv) = match open_stream(&conn, s.ack_timeout, &addr).await {
                    Ok(p) => p,
                    Err(e) => return Outcome::Failed(e),
                };
                if let Err(e) = send_frame(&mut send, &hello(Purpose::Lane), "receiver").await {
                    return Outcome::Failed(e.to_string());
                }
                lane_tasks.push(tokio::spawn(forward_frames(
                    lane,
                    FrameReader::spawn(recv, "receiver"),
                    frames_tx.clone(),
                )));
                send
            }
        };
        let (tx, rx) = mpsc::channel(2);
        let window = Arc::new(Semaphore::new(LANE_WINDOW));
        lanes.push(tx);
        windows.push(window.clone());
        acked.push(0);
        senders.push(tokio::spawn(lane_task(
            lane,
            send,
            rx,
            window,
            done_tx.clone(),
            db.clone(),
            level,
        )));
    }
    drop(done_tx);
    drop(frames_tx);
    let _abort = AbortOnDrop(
        lane_tasks
            .iter()
            .chain(senders.iter())
            .map(|t| t.abort_handle())
            .collect(),
    );
    let in_flight = shared
        .metrics
        .checkpoint_in_flight
        .get_or_create(&l)
        .clone();

    let disk_full = shared
        .metrics
        .checkpoint_target_disk_full
        .get_or_create(&l)
        .clone();
    let mut last_export = Instant::now();
    let outcome = loop {
        let now = Instant::now();
        let mut finished = None;
        while let Some(event) = sender.poll(now) {
            match event {
                SendEvent::CheckPrefix { file, len } => {
                    let path = db.join(&file);
                    let crc = tokio::task::spawn_blocking(move || prefix_crc(&path, len)).await;
                    match crc {
                        Ok(Ok(crc)) => sender.handle_prefix(&file, crc),
                        Ok(Err(e)) => break_outcome(&mut finished, e),
                        Err(e) => {
                            break_outcome(&mut finished, format!("prefix CRC thread failed: {e}"))
                        }
                    }
                }
                SendEvent::Read {
                    lane,
                    file,
                    offset,
                    len,
                } => {
                    if lanes[lane]
                        .send(LaneWork::Chunk { file, offset, len })
                        .await
                        .is_err()
                    {
                        break_outcome(&mut finished, format!("lane {lane} ended"));
                    }
                }
                SendEvent::Send { lane, frame } => {
                    if lanes[lane].send(LaneWork::Frame(frame)).await.is_err() {
                        break_outcome(&mut finished, format!("lane {lane} ended"));
                    }
                }
                SendEvent::Done(done) => {
                    finished = Some(Ok(done));
                }
            }
            if finished.is_some() {
                break;
            }
        }
        if last_export.elapsed() >= Duration::from_secs(1) {
            last_export = Instant::now();
            export(shared, key, sender.progress());
            publish(shared, key, sender.progress(), "copying").await;
        }
        match finished {
            Some(Err(why)) => break Outcome::Failed(why),
            Some(Ok(done)) => {
                export(shared, key, sender.progress());
                break finish(shared, key, lanes, senders, &mut frames0, done).await;
            }
            None => {}
        }
        count_present(shared, &l, sender.progress(), &mut counted_present);
        let unacked: usize = windows
            .iter()
            .map(|w| LANE_WINDOW - w.available_permits().min(LANE_WINDOW))
            .sum();
        in_flight.set(unacked as i64);
        let wake = sender.poll_timeout();
        tokio::select! {
            d = done_rx.recv() => match d {
                Some(LaneDone::Sent { lane, wire, file }) => {
                    sender.handle_sent(lane, wire, Instant::now());
                    count_sent(shared, &l, wire, file);
                }
                Some(LaneDone::Failed(why)) => break Outcome::Failed(why),
                None => break Outcome::Failed("every lane ended".into()),
            },
            f = frames0.recv() => match f {
                Ok(Frame::ChunkAck(a)) => {
                    ack(&windows, &mut acked, 0, a.chunks);
                    space_again(key, &disk_full);
                }
                Ok(Frame::Error(e)) => break refused(&e),
                Ok(other) => break Outcome::Failed(format!("the receiver sent {} during the transfer", other.name())),
                Err(e) => break Outcome::Failed(e.to_string()),
            },
            Some((lane, f)) = lane_frames.recv() => match f {
                Ok(Frame::ChunkAck(a)) => {
                    ack(&windows, &mut acked, lane, a.chunks);
                    space_again(key, &disk_full);
                }
                Ok(Frame::Error(e)) => break refused(&e),
                Ok(other) => break Outcome::Failed(format!("the receiver sent {} on lane {lane}", other.name())),
                Err(e) => break Outcome::Failed(e),
            },
            _ = async { tokio::time::sleep_until(wake.expect("guarded").into()).await }, if wake.is_some() => {}
            r = dup.changed() => {
                if r.is_err() {
                    break Outcome::Left;
                }
                let info = dup.borrow().clone();
                if info.status != what.phase() {
                    break Outcome::Left;
                }
                let rate = rate_of(&info, partitions);
                sender.set_rate(rate, Instant::now());
                set_rate_gauge(shared, &labels(key), rate);
            }
        }
    };
    in_flight.set(0);
    export(shared, key, sender.progress());
    outcome
}

/// A chunk was staged: a full-disk alarm, if up, is over.
fn space_again(key: &Key, disk_full: &prometheus_client::metrics::gauge::Gauge) {
    if disk_full.get() != 0 {
        disk_full.set(0);
        tracing::info!(table = %key.table, dupid = %key.dupid, partition = key.partition.0,
            "the target has disk space again; the checkpoint copy resumes");
    }
}

/// A `ChunkAck` of `lane`: its window opens by the chunks newly acknowledged.
fn ack(windows: &[Arc<Semaphore>], acked: &mut [u64], lane: usize, chunks: u64) {
    let (Some(w), Some(a)) = (windows.get(lane), acked.get_mut(lane)) else {
        return;
    };
    if chunks > *a {
        w.add_permits(((chunks - *a) as usize).min(LANE_WINDOW));
        *a = chunks;
    }
}

/// Hands a lane's frames from the receiver (its `ChunkAck`s, an `Error`) to the session.
async fn forward_frames(
    lane: usize,
    mut reader: FrameReader,
    tx: mpsc::Sender<(usize, Result<Frame, String>)>,
) {
    loop {
        match reader.recv().await {
            Ok(f) => {
                if tx.send((lane, Ok(f))).await.is_err() {
                    return;
                }
            }
            // The receiver closes a lane once the transfer ends; lane 0 decides how it ended.
            Err(ferry_net::StreamError::Closed { .. }) => return,
            Err(e) => {
                let _ = tx.send((lane, Err(e.to_string()))).await;
                return;
            }
        }
    }
}

/// After `Done`: the other lanes finish their streams, lane 0 sends `CheckpointDone` last and
/// waits for `Staged`.
async fn finish(
    shared: &Arc<Shared>,
    key: &Key,
    mut lanes: Vec<mpsc::Sender<LaneWork>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    frames0: &mut FrameReader,
    done: wire::CheckpointDone,
) -> Outcome {
    let lane0 = lanes.remove(0);
    drop(lanes);
    let mut tasks = tasks.into_iter();
    let task0 = tasks.next();
    for t in tasks {
        let _ = t.await;
    }
    if lane0
        .send(LaneWork::Frame(Frame::CheckpointDone(done)))
        .await
        .is_err()
    {
        return Outcome::Failed("lane 0 ended before CheckpointDone".into());
    }
    drop(lane0);
    if let Some(t) = task0 {
        let _ = t.await;
    }
    let timeout = shared
        .config
        .shipper
        .ack_timeout
        .max(Duration::from_secs(60));
    let staged = tokio::time::timeout(timeout, async {
        loop {
            match frames0.recv().await {
                Ok(Frame::ChunkAck(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    match staged {
        Ok(Ok(Frame::Staged(s))) if s.decree == done.decree => {
            tracing::info!(table = %key.table, dupid = %key.dupid, partition = key.partition.0,
                decree = s.decree.0, "checkpoint staged on the target");
            Outcome::Staged
        }
        Ok(Ok(Frame::Error(e))) => refused(&e),
        Ok(Ok(other)) => Outcome::Failed(format!(
            "the receiver answered CheckpointDone with {}, not Staged at decree {}",
            other.name(),
            done.decree
        )),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(_) => Outcome::Failed(format!("no Staged within {timeout:?} of CheckpointDone")),
    }
}

/// One lane: reads, packs and sends its chunks and frames in order, then finishes its stream.
async fn lane_task(
    lane: usize,
    mut send: SendStream,
    mut work: mpsc::Receiver<LaneWork>,
    window: Arc<Semaphore>,
    done: mpsc::Sender<LaneDone>,
    db: PathBuf,
    level: i32,
) {
    let mut files: Option<(String, Arc<File>)> = None;
    while let Some(w) = work.recv().await {
        let frame = match w {
            LaneWork::Frame(f) => f,
            LaneWork::Chunk { file, offset, len } => {
                let handle = match &files {
                    Some((name, f)) if *name == file => f.clone(),
                    _ => match File::open(db.join(&file)) {
                        Ok(f) => {
                            let f = Arc::new(f);
                            files = Some((file.clone(), f.clone()));
                            f
                        }
                        Err(e) => {
                            let _ = done
                                .send(LaneDone::Failed(format!(
                                    "cannot open checkpoint file {file}: {e}"
                                )))
                                .await;
                            return;
                        }
                    },
                };
                let name = file.clone();
                let packed = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; len as usize];
                    handle.read_exact_at(&mut buf, offset)?;
                    Ok::<_, std::io::Error>(wire::pack_chunk(&name, offset, &buf, level))
                })
                .await;
                match packed {
                    Ok(Ok(mut chunk)) => {
                        // A chunk damaged on the way, for the fault tests.
                        if fail::eval("checkpoint-chunk-corrupt", |_| ()).is_some() {
                            chunk.crc32c ^= 1;
                        }
                        Frame::Chunk(chunk)
                    }
                    Ok(Err(e)) => {
                        let _ = done
                            .send(LaneDone::Failed(format!(
                                "cannot read checkpoint file {file} at {offset}: {e}"
                            )))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = done
                            .send(LaneDone::Failed(format!("chunk thread failed: {e}")))
                            .await;
                        return;
                    }
                }
            }
        };
        let is_chunk = matches!(frame, Frame::Chunk(_));
        let file_bytes = match &frame {
            Frame::Chunk(c) => u64::from(c.len),
            _ => 0,
        };
        if is_chunk {
            // At most LANE_WINDOW chunks unacknowledged on this lane.
            match window.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
        }
        let mut buf = Vec::new();
        wire::encode(&frame, &mut buf);
        if let Err(e) = send.write_all(&buf).await {
            let _ = done
                .send(LaneDone::Failed(format!(
                    "sending on lane {lane} failed: {e}"
                )))
                .await;
            return;
        }
        if is_chunk {
            let sent = LaneDone::Sent {
                lane,
                wire: buf.len() as u64,
                file: file_bytes,
            };
            if done.send(sent).await.is_err() {
                return;
            }
        }
    }
    let _ = send.finish();
    // Until the receiver has everything: a dropped stream would lose unacknowledged data.
    let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
}

fn refused(e: &wire::Error) -> Outcome {
    if e.code == ErrorCode::STALE_FENCING_TOKEN {
        Outcome::Fenced(format!("the receiver knows a newer shipper: {}", e.message))
    } else if e.code == ErrorCode::DISK_FULL {
        Outcome::DiskFull(e.message.clone())
    } else {
        Outcome::Failed(format!(
            "the receiver ended the transfer ({}): {}",
            e.code, e.message
        ))
    }
}

fn break_outcome(slot: &mut Option<Result<wire::CheckpointDone, String>>, why: String) {
    if slot.is_none() {
        *slot = Some(Err(why));
    }
}

async fn open_stream(
    conn: &quinn::Connection,
    timeout: Duration,
    addr: &str,
) -> Result<(SendStream, quinn::RecvStream), String> {
    match tokio::time::timeout(timeout, conn.open_bi()).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(format!("cannot open a stream to receiver {addr}: {e}")),
        Err(_) => Err(format!(
            "receiver {addr} did not accept a stream within {timeout:?}"
        )),
    }
}

/// The receiver of the target table, asked from the remote coordinators.
async fn receiver(shared: &Shared, info: &DupInfo) -> Result<String, String> {
    let Some(addrs) = shared.config.remote_clusters.get(&info.remote) else {
        return Err(format!(
            "remote cluster `{}` is not in this shipper's [remote_clusters]; add its coordinators' admin addresses and restart the shipper",
            info.remote
        ));
    };
    let client =
        AdminClient::new(addrs, shared.config.shipper.etcd_timeout).map_err(|e| e.to_string())?;
    let receivers = client
        .table_receivers(&info.remote_table)
        .await
        .map_err(|e| {
            format!(
                "cannot find the receiver of table `{}` in cluster `{}`: {e}",
                info.remote_table, info.remote
            )
        })?;
    single_receiver(&receivers).map_err(|e| e.to_string())
}

/// The CRC-32C of the first `len` bytes of a file.
fn prefix_crc(path: &Path, len: u64) -> Result<u32, String> {
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut at, mut crc) = (0u64, 0u32);
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(crc)
}

/// One partition's share of the dup's bandwidth limit for checkpoint transfers (bytes/s on the
/// wire), if one is set: every partition copies at once, so each gets an equal part.
pub fn rate_of(info: &DupInfo, partitions: u32) -> Option<u64> {
    info.checkpoint_rate_bytes()
        .map(|r| (r / u64::from(partitions.max(1))).max(1))
}

fn set_rate_gauge(shared: &Shared, l: &Labels, rate: Option<u64>) {
    let rate = i64::try_from(rate.unwrap_or(0)).unwrap_or(i64::MAX);
    shared
        .metrics
        .checkpoint_rate_limit
        .get_or_create(l)
        .set(rate);
}

/// Counts the bytes found present on the target since the last call (a resumed file's prefix
/// is known only once its CRC is compared).
fn count_present(shared: &Shared, l: &Labels, p: &TransferProgress, counted: &mut u64) {
    if p.bytes_present > *counted {
        kind(shared, l, "present").inc_by(p.bytes_present - *counted);
        *counted = p.bytes_present;
    }
}

fn count_sent(shared: &Shared, l: &Labels, wire: u64, file: u64) {
    kind(shared, l, "wire").inc_by(wire);
    kind(shared, l, "file").inc_by(file);
}

fn kind(shared: &Shared, l: &Labels, kind: &str) -> prometheus_client::metrics::counter::Counter {
    let mut l = l.clone();
    l.push(("kind".into(), kind.into()));
    shared.metrics.checkpoint_bytes.get_or_create(&l).clone()
}

fn export(shared: &Shared, key: &Key, p: &TransferProgress) {
    let l = labels(key);
    shared
        .metrics
        .checkpoint_remaining
        .get_or_create(&l)
        .set(p.bytes_total.saturating_sub(p.bytes_done) as i64);
    shared.board.with(key, |e| e.checkpoint = Some(p.clone()));
}

/// Writes the transfer's progress to etcd for `ferry status` and `ferry dup add --wait`. A
/// failure is only logged: the copy goes on without it.
async fn publish(shared: &Shared, key: &Key, p: &TransferProgress, state: &str) {
    let staged = state == "staged";
    let t = ferry_meta::Transfer {
        state: state.into(),
        files_done: if staged { p.files_total } else { p.files_done },
        files_total: p.files_total,
        bytes_done: if staged { p.bytes_total } else { p.bytes_done },
        bytes_total: p.bytes_total,
        bytes_present: p.bytes_present,
        rate: p.rate,
        eta_ms: if staged {
            Some(0)
        } else {
            p.eta().map(|d| d.as_millis() as u64)
        },
        last_error: shared.board.get(key).and_then(|e| e.last_error),
        updated_at_ms: ferry_meta::now_ms(),
        extra: Default::default(),
    };
    if let Err(e) = shared
        .meta
        .put_transfer(&key.table, key.dupid, key.partition, &t)
        .await
    {
        tracing::debug!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, error = %e, "cannot write the transfer progress to etcd");
    }
}

/// Aborts the lane tasks when a session ends early.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
