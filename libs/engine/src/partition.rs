//! A partition: one RocksDB instance plus one plog, with a single writer thread.
//!
//! Every change goes through the writer thread, in arrival order:
//! 1. it takes all write requests waiting in its queue (a *group*);
//! 2. it resolves each into plain puts and deletes (INCR becomes the put of its result, SET NX
//!    becomes a put or nothing), giving each write the next decree and a hybrid-clock timetag;
//! 3. it appends the group's records to the plog and issues **one fsync** for all of them;
//! 4. it applies them to RocksDB in one write batch (WAL off: the plog is the durable log);
//! 5. only then does it acknowledge each write.
//!
//! Duplicated writes from another cluster go through the same thread (`apply_duplicated`), are
//! compared by timetag (last-writer-wins), and are never written to the plog, so they are never
//! shipped back. Reads go straight to RocksDB from any thread.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_log::inbox;
use ferry_log::layout::{db_dir, plog_dir};
use ferry_log::nodelog::{CommitError, NodeLog};
use ferry_log::plog::{self, Committed, CommittedMarker, PlogWriter, RecoveryReport};
use ferry_proto::limits::MAX_WRITE_BYTES;
use ferry_proto::{
    value, CheckpointManifest, ClusterId, Decree, Op, PartitionId, PlogRecord, Source, StoredValue,
    Timetag,
};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint;
use crate::clock::{self, HybridClock};
use crate::engine::{Batch, Engine, SourceProgress};
use crate::error::StoreError;

/// Tuning of one partition. The defaults suit a node with a few partitions on one SSD.
#[derive(Debug, Clone)]
pub struct PartitionOptions {
    /// This cluster's id, stamped into every timetag.
    pub cluster: ClusterId,
    /// A plog segment rolls over once it reaches this size.
    pub plog_segment_bytes: u64,
    /// Tombstones (and expired values) are kept this long so late duplicated writes still lose
    /// to them, then purged by compaction.
    pub tombstone_retention: Duration,
    /// Most writes in one group commit.
    pub max_group_writes: usize,
    /// Requests that may wait for the writer before senders are slowed down.
    pub queue_depth: usize,
    /// The node's commit log, shared by all its partitions: a group is durable once it is
    /// there, and the plog is synced lazily. Without one, the plog is fsynced for every group.
    pub commit_log: Option<Arc<NodeLog>>,
}

impl PartitionOptions {
    pub fn new(cluster: ClusterId) -> PartitionOptions {
        PartitionOptions {
            cluster,
            plog_segment_bytes: 64 << 20,
            tombstone_retention: Duration::from_secs(24 * 3600),
            max_group_writes: 4096,
            queue_depth: 8192,
            commit_log: None,
        }
    }
}

/// When a value set by SET expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Never,
    /// Unix milliseconds.
    At(u64),
    /// Keep the expiry the key already has (SET ... KEEPTTL).
    Keep,
}

/// SET's NX / XX condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetCond {
    Always,
    IfAbsent,
    IfPresent,
}

/// A client write, before it is resolved into plain puts and deletes.
#[derive(Debug, Clone)]
pub enum WriteCmd {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        expiry: Expiry,
        cond: SetCond,
        get_old: bool,
    },
    /// Puts of several keys, all in this partition, as one record.
    MSet {
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Deletes of several keys, all in this partition, as one record. A tombstone is written even
    /// for a key that is absent here: it may exist in another cluster, and the delete must win
    /// over older writes there.
    Del {
        keys: Vec<Vec<u8>>,
    },
    IncrBy {
        key: Vec<u8>,
        delta: i64,
    },
    /// Sets the expiry of a live key. `None` removes it (PERSIST); a time in the past deletes it.
    Expire {
        key: Vec<u8>,
        at_ms: Option<u64>,
    },
    /// A transaction (MULTI/EXEC), all of its keys in this partition. If any `watched` key's
    /// stored version differs from the one given (see [`Partition::version`]), nothing runs
    /// and the outcome is [`WriteOutcome::WatchChanged`]. Otherwise `cmds` run in order, each
    /// seeing the effects of the ones before, and their ops go into **one** record: one
    /// decree, one timetag, so the transaction is made durable, applied and duplicated whole.
    /// A command that fails on the data (INCR of a non-integer) writes nothing and the others
    /// still apply, as in Redis.
    Multi {
        watched: Vec<(Vec<u8>, Option<Timetag>)>,
        cmds: Vec<TxCmd>,
    },
}

/// One command of a [`WriteCmd::Multi`].
#[derive(Debug, Clone)]
pub enum TxCmd {
    /// A write, resolved as it would be on its own.
    Write(WriteCmd),
    /// Reads the live values of keys, seeing the transaction's earlier writes. The outcome is
    /// [`WriteOutcome::Values`].
    Read { keys: Vec<Vec<u8>> },
}

impl WriteCmd {
    fn payload_len(&self) -> usize {
        match self {
            WriteCmd::Set { key, value, .. } => key.len() + value.len(),
            WriteCmd::MSet { pairs } => pairs.iter().map(|(k, v)| k.len() + v.len() + 17).sum(),
            WriteCmd::Del { keys } => keys.iter().map(|k| k.len() + 5).sum(),
            WriteCmd::IncrBy { key, .. } | WriteCmd::Expire { key, .. } => key.len() + 32,
            // Reads and watches write nothing, but they are held in memory until the writer
            // runs them, so they count too.
            WriteCmd::Multi { watched, cmds } => {
                let watched: usize = watched.iter().map(|(k, _)| k.len() + 9).sum();
                let cmds: usize = cmds
                    .iter()
                    .map(|c| match c {
                        TxCmd::Write(w) => w.payload_len(),
                        TxCmd::Read { keys } => keys.iter().map(|k| k.len() + 5).sum(),
                    })
                    .sum();
                watched + cmds
            }
        }
    }

    /// Whether the command may change data: a fenced partition refuses it. A transaction of
    /// reads only is not refused.
    fn writes(&self) -> bool {
        match self {
            WriteCmd::Multi { cmds, .. } => cmds.iter().any(|c| matches!(c, TxCmd::Write(_))),
            _ => true,
        }
    }

    /// The keys the command may change.
    fn written_keys(&self) -> Vec<&[u8]> {
        match self {
            WriteCmd::Set { key, .. }
            | WriteCmd::IncrBy { key, .. }
            | WriteCmd::Expire { key, .. } => {
                vec![key]
            }
            WriteCmd::MSet { pairs } => pairs.iter().map(|(k, _)| &k[..]).collect(),
            WriteCmd::Del { keys } => keys.iter().map(|k| &k[..]).collect(),
            WriteCmd::Multi { cmds, .. } => cmds
                .iter()
                .flat_map(|c| match c {
                    TxCmd::Write(w) => w.written_keys(),
                    TxCmd::Read { .. } => Vec::new(),
                })
                .collect(),
        }
    }
}

/// What a write did, for the client's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// SET: whether it was applied (NX/XX), and the old value when asked for.
    Set { applied: bool, old: Option<Vec<u8>> },
    /// MSET.
    Done,
    /// DEL: how many of the keys were live.
    Deleted(u64),
    /// INCRBY: the new value.
    Integer(i64),
    /// EXPIRE / PERSIST: whether the key's expiry changed.
    Changed(bool),
    /// INCRBY on a value that is not a 64-bit decimal integer. Nothing was written.
    NotInteger,
    /// INCRBY would overflow. Nothing was written.
    Overflow,
    /// A transaction's read ([`TxCmd::Read`]): per key, its live value and expiry (unix ms, 0
    /// for none), or `None`.
    Values(Vec<Option<(Vec<u8>, u64)>>),
    /// A transaction ran: the outcome of each of its commands, in order.
    Multi(Vec<WriteOutcome>),
    /// A transaction's watched key changed since it was watched. Nothing was written.
    WatchChanged,
}

/// A live value as a read sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub value: Vec<u8>,
    /// Unix milliseconds, 0 for no expiry.
    pub expire_at_ms: u64,
    pub timetag: Timetag,
}

/// One page of a SCAN.
#[derive(Debug, Default)]
pub struct ScanPage {
    pub keys: Vec<Vec<u8>>,
    /// Where the next page starts (exclusive), or `None` when the partition is done.
    pub next_after: Option<Vec<u8>>,
}

/// What [`Partition::key_counts`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCounts {
    pub keys: u64,
    /// Keys with an expiry.
    pub expires: u64,
    /// The sum of their remaining times to live.
    pub ttl_ms_total: u64,
}

/// What `apply_duplicated` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Records with a decree past the stored progress.
    pub applied_records: u64,
    /// Records at or below the stored progress: already applied, skipped (exactly-once).
    pub skipped_records: u64,
    /// Ops that lost last-writer-wins against a newer stored value or tombstone.
    pub stale_ops: u64,
    /// The source decree now stored as progress.
    pub progress: Decree,
}

/// What opening a partition found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub partition: PartitionId,
    /// Last decree RocksDB held before replay.
    pub applied_before_replay: Decree,
    pub plog: RecoveryReport,
    pub committed: Decree,
}

/// Counters a node exports as metrics.
#[derive(Debug, Default)]
pub struct PartitionStats {
    pub committed_decree: AtomicU64,
    pub writes_total: AtomicU64,
    pub group_commits_total: AtomicU64,
    pub fsync_micros_total: AtomicU64,
    pub plog_bytes_total: AtomicU64,
    pub dup_applied_records_total: AtomicU64,
    pub write_errors_total: AtomicU64,
}

pub struct Partition {
    id: PartitionId,
    dir: PathBuf,
    engine: Arc<Engine>,
    tx: mpsc::Sender<Request>,
    stats: Arc<PartitionStats>,
    writer: Option<JoinHandle<()>>,
}

impl Partition {
    /// Opens the partition stored in `dir` (creating it if empty): opens RocksDB, replays the plog
    /// after the last decree RocksDB holds, and starts the writer thread.
    pub fn open(
        dir: &Path,
        id: PartitionId,
        opts: PartitionOptions,
    ) -> Result<(Partition, OpenReport), StoreError> {
        fs::create_dir_all(dir)
            .map_err(|e| StoreError::io("create partition directory", dir, e))?;
        let engine = Arc::new(Engine::open(&db_dir(dir), opts.tombstone_retention)?);
        let applied = engine.applied_decree()?;
        let mut clock = HybridClock::starting_after(engine.clock_us()?);
        let plog_dir = plog_dir(dir);
        fs::create_dir_all(&plog_dir)
            .map_err(|e| StoreError::io("create plog directory", &plog_dir, e))?;

        // Replay in batches; local records go through last-writer-wins too, because duplicated
        // writes applied before the crash may have been flushed while these were not.
        let mut replay = ReplayBatch::default();
        let report = plog::recover(&plog_dir, applied, |rec| {
            clock.observe(rec.timetag.timestamp_us());
            replay.add(&engine, &rec)?;
            if replay.records >= 1024 {
                replay.flush(&engine, rec.decree, clock.last())?;
            }
            Ok::<(), StoreError>(())
        })?;
        if let Some(last) = report.last_decree.filter(|_| replay.records > 0) {
            replay.flush(&engine, last, clock.last())?;
        }
        let committed = match report.last_decree {
            Some(last) if last < applied => {
                return Err(StoreError::Inconsistent {
                    dir: dir.to_path_buf(),
                    reason: format!("RocksDB has applied decree {applied} but the plog ends at {last}; plog segments are missing"),
                })
            }
            Some(last) => last,
            None => applied,
        };
        if let Some(torn) = &report.torn_tail {
            tracing::warn!(partition = id.0, file = %torn.file.display(), offset = torn.offset,
                bytes = torn.bytes_dropped, reason = %torn.reason, "cut torn plog tail (unacknowledged writes)");
        }
        let plog = PlogWriter::open(&plog_dir, committed.next(), opts.plog_segment_bytes)?;
        let commit_log = match &opts.commit_log {
            Some(log) => Some((log.clone(), log.key_of(dir)?)),
            None => None,
        };
        let marker = CommittedMarker::open(&plog_dir)?;
        marker.publish(Committed {
            decree: committed,
            commit_time_us: clock::wall_us(),
        })?;

        let stats = Arc::new(PartitionStats::default());
        stats.committed_decree.store(committed.0, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(opts.queue_depth.max(1));
        let writer = Writer {
            id,
            opts: opts.clone(),
            engine: engine.clone(),
            plog,
            commit_log,
            marker,
            marker_failed: false,
            clock,
            next: committed.next(),
            stats: stats.clone(),
            poisoned: None,
            fenced: None,
            dup_progress: HashMap::new(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("ferry-writer-{}", id.0))
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::io("spawn partition writer thread", dir, e))?;
        let open_report = OpenReport {
            partition: id,
            applied_before_replay: applied,
            plog: report,
            committed,
        };
        let partition = Partition {
            id,
            dir: dir.to_path_buf(),
            engine,
            tx,
            stats,
            writer: Some(handle),
        };
        Ok((partition, open_report))
    }

    /// Opens a partition in `dir` from a checkpoint made by [`Partition::checkpoint`], after
    /// verifying every file against the manifest. `dir` must not hold a partition yet.
    pub fn open_from_checkpoint(
        checkpoint_dir: &Path,
        dir: &Path,
        id: PartitionId,
        opts: PartitionOptions,
    ) -> Result<(Partition, OpenReport), StoreError> {
        let manifest = checkpoint::install(checkpoint_dir, &db_dir(dir))?;
        let (partition, report) = Partition::open(dir, id, opts)?;
        if report.committed != manifest.decree {
            return Err(StoreError::BadCheckpoint {
                dir: checkpoint_dir.to_path_buf(),
                reason: format!(
                    "manifest says decree {} but the data holds {}",
                    manifest.decree, report.committed
                ),
            });
        }
        Ok((partition, report))
    }

    pub fn id(&self) -> PartitionId {
        self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> &PartitionStats {
        &self.stats
    }

    /// The last decree that is durable in the plog and applied.
    pub fn committed_decree(&self) -> Decree {
        Decree(self.stats.committed_decree.load(Ordering::Acquire))
    }

    /// Commits a client write; returns once it is durable (fsynced) and applied.
    pub async fn write(&self, cmd: WriteCmd) -> Result<WriteOutcome, StoreError> {
        let len = cmd.payload_len();
        if len > MAX_WRITE_BYTES {
            return Err(StoreError::TooLarge {
                len,
                limit: MAX_WRITE_BYTES,
            });
        }
        self.call(|reply| Request::Write { cmd, reply }).await
    }

    /// Fences the partition (`Some(error)`: every client write queued after this call is refused
    /// with [`StoreError::Fenced`]`(error)`) or lifts the fence (`None`). Returns the committed
    /// decree once every write queued before the call is durable and applied, so while fenced
    /// it is the partition's last decree. Duplicated writes are applied either way.
    pub async fn fence(&self, error: Option<String>) -> Result<Decree, StoreError> {
        self.call(|reply| Request::Fence { error, reply }).await
    }

    /// Applies records duplicated from `source`, exactly once and last-writer-wins. Records at or
    /// below the stored progress for `source` are skipped. The progress is stored in the same
    /// RocksDB batch as the data. Durability comes from the caller's inbox: after a crash,
    /// re-apply from [`Partition::dup_progress`].
    pub async fn apply_duplicated(
        &self,
        source: Source,
        records: Vec<PlogRecord>,
    ) -> Result<ApplyReport, StoreError> {
        self.call(|reply| Request::ApplyDup {
            source,
            records,
            reply,
        })
        .await
    }

    /// Applies stored entries `(user key, stored value)` of `source`'s checkpoint to this serving
    /// partition, last-writer-wins against what it holds (tombstones included), in one RocksDB
    /// batch: a re-bootstrap. With `upto` (the checkpoint's decree, on the last chunk) the
    /// progress for `source` becomes at least `upto`, so the log after it applies next.
    /// Applying a checkpoint again is harmless.
    pub async fn apply_checkpoint(
        &self,
        source: Source,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        upto: Option<Decree>,
    ) -> Result<ApplyReport, StoreError> {
        self.call(|reply| Request::ApplyCheckpoint {
            source,
            entries,
            upto,
            reply,
        })
        .await
    }

    /// The last source decree applied from `source`.
    pub fn dup_progress(&self, source: Source) -> Result<Decree, StoreError> {
        self.engine.dup_progress(source)
    }

    /// Every source this partition applied from, with its progress.
    pub fn dup_sources(&self) -> Result<Vec<(Source, SourceProgress)>, StoreError> {
        self.engine.dup_sources()
    }

    /// The last source decree applied from `source`, with that write's timestamp.
    pub fn dup_progress_at(&self, source: Source) -> Result<SourceProgress, StoreError> {
        self.engine.dup_progress_at(source)
    }

    /// Makes a checkpoint in `dir` (which must not exist) at the current committed decree, with a
    /// manifest of every file's name, size and CRC-32C.
    /// Runs on the blocking pool, beside the writer thread, so client writes go on meanwhile.
    pub async fn checkpoint(&self, dir: PathBuf) -> Result<CheckpointManifest, StoreError> {
        let (engine, id) = (self.engine.clone(), self.id);
        self.blocking(move || checkpoint::create(&engine, id, &dir))
            .await
    }

    /// Deletes whole plog segments whose records are all below `below` and already durable in
    /// RocksDB (the memtable is flushed first). Returns the deleted files.
    /// Runs on the blocking pool, so the flush does not stall client writes.
    pub async fn gc_plog(&self, below: Decree) -> Result<Vec<PathBuf>, StoreError> {
        let (engine, dir) = (self.engine.clone(), plog_dir(&self.dir));
        self.blocking(move || gc_plog(&engine, &dir, below)).await
    }

    /// Deletes whole inbox segments whose records this partition has applied, durably (the
    /// memtable is flushed first, and only when some segment can go). The newest segment of each
    /// inbox stays: the receiver appends to it. Returns the deleted files.
    /// Runs on the blocking pool, like [`Partition::gc_plog`].
    pub async fn gc_inboxes(&self) -> Result<Vec<PathBuf>, StoreError> {
        let (engine, dir) = (self.engine.clone(), self.dir.clone());
        self.blocking(move || gc_inboxes(&engine, &dir)).await
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        tokio::task::spawn_blocking(f)
            .await
            // Only a panic in `f` or the runtime's shutdown loses the task.
            .map_err(|_| StoreError::Closed(self.id.0))?
    }

    /// Reads a live value: `None` for absent, deleted or expired keys.
    pub fn get(&self, key: &[u8]) -> Result<Option<Live>, StoreError> {
        let Some(raw) = self.engine.get_raw(key)? else {
            return Ok(None);
        };
        Ok(live_from(&raw, clock::wall_ms()))
    }

    /// [`Partition::get`] if it can be answered from memory, without reading the disk; `None`
    /// if it cannot.
    pub fn get_cached(&self, key: &[u8]) -> Result<Option<Option<Live>>, StoreError> {
        Ok(self
            .engine
            .get_raw_cached(key)?
            .map(|raw| raw.and_then(|raw| live_from(&raw, clock::wall_ms()))))
    }

    /// Up to `count` entries after `after`, returning the live keys among them.
    pub fn scan(&self, after: Option<&[u8]>, count: usize) -> Result<ScanPage, StoreError> {
        let now = clock::wall_ms();
        let mut page = ScanPage::default();
        let mut seen = 0;
        for item in self.engine.scan_from(after) {
            let (key, raw) = item?;
            if live_from(&raw, now).is_some() {
                page.keys.push(key.to_vec());
            }
            seen += 1;
            if seen >= count.max(1) {
                page.next_after = Some(key.to_vec());
                break;
            }
        }
        Ok(page)
    }

    /// Number of live keys (a full scan).
    pub fn count_live(&self) -> Result<u64, StoreError> {
        Ok(self.key_counts()?.keys)
    }

    /// The live keys, those with an expiry, and their mean time to live, in one scan.
    pub fn key_counts(&self) -> Result<KeyCounts, StoreError> {
        let now = clock::wall_ms();
        let mut c = KeyCounts::default();
        for item in self.engine.scan_from(None) {
            let (_, raw) = item?;
            if let Some(live) = live_from(&raw, now) {
                c.keys += 1;
                if live.expire_at_ms > 0 {
                    c.expires += 1;
                    c.ttl_ms_total += live.expire_at_ms.saturating_sub(now);
                }
            }
        }
        Ok(c)
    }

    /// Both digests of the partition's content in one scan (see [`Digests`]).
    pub fn digests(&self) -> Result<Digests, StoreError> {
        let mut d = Digests::default();
        let mut ordered = Fnv64::default();
        for item in self.engine.scan_from(None) {
            let (key, raw) = item?;
            let mut entry = Fnv64::default();
            for h in [&mut ordered, &mut entry] {
                h.write(&(key.len() as u64).to_le_bytes());
                h.write(&key);
                h.write(&(raw.len() as u64).to_le_bytes());
                h.write(&raw);
            }
            d.unordered = d.unordered.wrapping_add(entry.0);
            d.entries += 1;
        }
        d.ordered = ordered.0;
        Ok(d)
    }

    /// A digest of the partition's content: every stored entry (tombstones included) with its
    /// timetag, expiry and bytes, in key order. Two partitions with equal digests hold the same
    /// data. Returns (entries, digest).
    pub fn digest(&self) -> Result<(u64, u64), StoreError> {
        let d = self.digests()?;
        Ok((d.entries, d.ordered))
    }

    /// Runs a full manual compaction (the tombstone filter runs during it).
    pub fn compact(&self) {
        self.engine.compact_all();
    }

    /// The version of a key that WATCH remembers: the timetag stored with it, tombstones
    /// included, or `None` when nothing is stored. Any write to the key changes it, a
    /// duplicated one from another cluster too; an expiry alone does not (the stored value
    /// stays until compaction purges it, which does change it).
    pub fn version(&self, key: &[u8]) -> Result<Option<Timetag>, StoreError> {
        self.engine.stored_timetag(key)
    }

    /// The raw stored value of a key, tombstones included (for tests and tools).
    pub fn stored(&self, key: &[u8]) -> Result<Option<(Timetag, u64, Vec<u8>)>, StoreError> {
        let Some(raw) = self.engine.get_raw(key)? else {
            return Ok(None);
        };
        Ok(StoredValue::decode(&raw)
            .ok()
            .map(|v| (v.timetag, v.expire_at_ms, v.user.to_vec())))
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed(self.id.0))?;
        rx.await.map_err(|_| StoreError::Closed(self.id.0))?
    }
}

impl Drop for Partition {
    /// Stops the writer after the requests already queued, and flushes RocksDB so the next open
    /// replays little.
    fn drop(&mut self) {
        if self.tx.try_send(Request::Shutdown).is_ok() {
            if let Some(h) = self.writer.take() {
                let _ = h.join();
            }
        }
    }
}

enum Request {
    Write {
        cmd: WriteCmd,
        reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
    },
    ApplyDup {
        source: Source,
        records: Vec<PlogRecord>,
        reply: oneshot::Sender<Result<ApplyReport, StoreError>>,
    },
    ApplyCheckpoint {
        source: Source,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        upto: Option<Decree>,
        reply: oneshot::Sender<Result<ApplyReport, StoreError>>,
    },
    Fence {
        error: Option<String>,
        reply: oneshot::Sender<Result<Decree, StoreError>>,
    },
    Shutdown,
}

/// A group's writes so far, by key, as later writes of the group must see them: the value and
/// expiry put, or `None` for a delete.
type Overlay = HashMap<Vec<u8>, OverlayEntry>;

/// One key's entry in an [`Overlay`].
type OverlayEntry = Option<(Vec<u8>, u64)>;

type Pending = (
    oneshot::Sender<Result<WriteOutcome, StoreError>>,
    WriteOutcome,
);

/// The state owned by the writer thread.
struct Writer {
    id: PartitionId,
    opts: PartitionOptions,
    engine: Arc<Engine>,
    plog: PlogWriter,
    /// The node's commit log and this partition's key in it, or `None` to fsync the plog.
    commit_log: Option<(Arc<NodeLog>, String)>,
    /// Publishes the committed decree to the shipper after every group commit.
    marker: CommittedMarker,
    marker_failed: bool,
    clock: HybridClock,
    /// Decree of the next local write.
    next: Decree,
    stats: Arc<PartitionStats>,
    /// Set after a failure that leaves the durable state uncertain.
    poisoned: Option<String>,
    /// Set while fenced: client writes are refused with it.
    fenced: Option<String>,
    dup_progress: HashMap<Source, SourceProgress>,
}

impl Writer {
    /// Runs until the partition is dropped. Blocking: owns a dedicated OS thread.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut group: Vec<(WriteCmd, oneshot::Sender<Result<WriteOutcome, StoreError>>)> =
            Vec::new();
        let mut deferred: Option<Request> = None;
        loop {
            let first = match deferred.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(r) => r,
                    None => break,
                },
            };
            match first {
                Request::Write { cmd, reply } => {
                    group.push((cmd, reply));
                    // Take whatever else is waiting; a non-write ends the group and runs after it.
                    while group.len() < self.opts.max_group_writes {
                        match rx.try_recv() {
                            Ok(Request::Write { cmd, reply }) => group.push((cmd, reply)),
                            Ok(other) => {
                                deferred = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit_group(std::mem::take(&mut group));
                }
                Request::ApplyDup {
                    source,
                    records,
                    reply,
                } => {
                    let _ = reply.send(self.apply_dup(source, records));
                }
                Request::ApplyCheckpoint {
                    source,
                    entries,
                    upto,
                    reply,
                } => {
                    let _ = reply.send(self.apply_checkpoint(source, entries, upto));
                }
                Request::Fence { error, reply } => {
                    self.fenced = error;
                    let _ = reply.send(Ok(Decree(self.next.0.saturating_sub(1))));
                }
                Request::Shutdown => break,
            }
        }
        if let Err(e) = self.engine.flush() {
            tracing::warn!(partition = self.id.0, error = %e, "flush on shutdown failed; the next open replays the plog");
        }
        if let Some((log, key)) = &self.commit_log {
            // The plog holds everything now; the commit log must never write this partition's
            // entries back (its directory may be replaced once it is closed).
            let closed = self
                .plog
                .sync()
                .map_err(StoreError::from)
                .and_then(|()| log.close(key).map_err(StoreError::from));
            if let Err(e) = closed {
                tracing::warn!(partition = self.id.0, error = %e, "cannot close the partition in the node's commit log; a restart restores its plog from it");
            }
        }
    }

    fn commit_group(
        &mut self,
        group: Vec<(WriteCmd, oneshot::Sender<Result<WriteOutcome, StoreError>>)>,
    ) {
        if let Some(reason) = &self.poisoned {
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::Poisoned {
                    partition: self.id.0,
                    reason: reason.clone(),
                }));
            }
            return;
        }
        let first_decree = self.next;
        let mut overlay = Overlay::new();
        let mut buf = Vec::new();
        let mut batch = Batch::default();
        let mut pending: Vec<Pending> = Vec::with_capacity(group.len());
        let now_ms = clock::wall_ms();
        let mut records = 0u64;
        for (cmd, reply) in group {
            if let Some(error) = self.fenced.as_ref().filter(|_| cmd.writes()) {
                let _ = reply.send(Err(StoreError::Fenced(error.clone())));
                continue;
            }
            match self.resolve(cmd, &mut overlay, now_ms) {
                Ok((ops, outcome)) => {
                    if !ops.is_empty() {
                        let ops = last_op_per_key(ops);
                        let tag = Timetag::new(
                            self.clock.tick(clock::wall_us()),
                            self.opts.cluster,
                            false,
                        );
                        let rec = PlogRecord {
                            decree: self.next,
                            timetag: tag,
                            ops,
                        };
                        rec.encode(&mut buf);
                        stage_record(&mut batch, &rec);
                        self.next = self.next.next();
                        records += 1;
                    }
                    pending.push((reply, outcome));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if records > 0 {
            if let Err(e) = self.persist(&buf, batch) {
                // Nothing of this group is acknowledged. A failed append was cut back, so the
                // decrees can be reused; any other failure poisoned the partition.
                self.next = first_decree;
                self.stats
                    .write_errors_total
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                tracing::error!(partition = self.id.0, error = %e, "group commit failed");
                // Every waiter gets its own copy; whether the disk was full is kept as a kind,
                // so the client hears "disk is full" without anyone parsing the message.
                let disk_full = e.is_disk_full();
                let reason = e.to_string();
                for (reply, _) in pending {
                    let _ = reply.send(Err(StoreError::CommitFailed {
                        disk_full,
                        reason: reason.clone(),
                    }));
                }
                return;
            }
        }
        self.stats
            .writes_total
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        for (reply, outcome) in pending {
            let _ = reply.send(Ok(outcome));
        }
        if records > 0 {
            if let Err(e) = self.plog.roll_if_full(self.next) {
                tracing::error!(partition = self.id.0, error = %e, "plog rollover failed; the partition stops taking writes");
                self.poisoned = Some(e.to_string());
            }
        }
    }

    /// Appends, makes durable and applies one group. Everything here happens before any ack.
    fn persist(&mut self, buf: &[u8], mut batch: Batch) -> Result<(), StoreError> {
        let mark = self.plog.segment_len();
        self.plog.append(buf)?;
        let t = Instant::now();
        let shared = self
            .commit_log
            .as_ref()
            .map(|(log, key)| log.commit(key, &self.plog, buf));
        match shared {
            Some(Ok(())) => {}
            Some(Err(e @ CommitError::Refused(_))) => {
                // Nothing was logged; with the plog cut back as it was, the decrees can be reused.
                if let Err(cut) = self.plog.cut_back(mark) {
                    self.poisoned = Some(cut.to_string());
                    return Err(cut.into());
                }
                return Err(e.into());
            }
            Some(Err(e @ CommitError::Failed(_))) => {
                self.poisoned = Some(e.to_string());
                return Err(e.into());
            }
            None => {
                if let Err(e) = self.plog.sync() {
                    // After a failed fsync the kernel may have dropped dirty pages: nothing on
                    // disk can be trusted until recovery re-reads the plog.
                    self.poisoned = Some(e.to_string());
                    return Err(e.into());
                }
            }
        }
        self.stats
            .fsync_micros_total
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let last = Decree(self.next.0 - 1);
        batch.set_applied(last, self.clock.last());
        if let Err(e) = self.engine.write(batch) {
            self.poisoned = Some(e.to_string());
            return Err(e);
        }
        self.stats.committed_decree.store(last.0, Ordering::Release);
        match self.marker.publish(Committed {
            decree: last,
            commit_time_us: clock::wall_us(),
        }) {
            Ok(()) => self.marker_failed = false,
            Err(e) if !self.marker_failed => {
                // Not a durability problem (the plog is durable); shipping lags until it works.
                tracing::warn!(partition = self.id.0, error = %e, "cannot publish the committed decree");
                self.marker_failed = true;
            }
            Err(_) => {}
        }
        self.stats
            .group_commits_total
            .fetch_add(1, Ordering::Relaxed);
        self.stats
            .plog_bytes_total
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Turns a command into plain ops, reading the current state (this group's earlier writes
    /// first, then RocksDB) where the command depends on it.
    fn resolve(
        &self,
        cmd: WriteCmd,
        overlay: &mut Overlay,
        now_ms: u64,
    ) -> Result<(Vec<Op>, WriteOutcome), StoreError> {
        let current = |overlay: &Overlay, key: &[u8]| self.current(overlay, key, now_ms);
        let put = |overlay: &mut Overlay, key: Vec<u8>, value: Vec<u8>, exp: u64| {
            overlay.insert(key.clone(), Some((value.clone(), exp)));
            Op::Put {
                key,
                value,
                expire_at_ms: exp,
            }
        };
        Ok(match cmd {
            WriteCmd::Set {
                key,
                value,
                expiry,
                cond,
                get_old,
            } => {
                let needs_read = get_old || cond != SetCond::Always || expiry == Expiry::Keep;
                let old = if needs_read {
                    current(overlay, &key)?
                } else {
                    None
                };
                let applied = match cond {
                    SetCond::Always => true,
                    SetCond::IfAbsent => old.is_none(),
                    SetCond::IfPresent => old.is_some(),
                };
                let exp = match expiry {
                    Expiry::Never => 0,
                    Expiry::At(ms) => ms,
                    Expiry::Keep => old.as_ref().map_or(0, |(_, e)| *e),
                };
                let old_value = if get_old { old.map(|(v, _)| v) } else { None };
                let ops = if applied {
                    vec![put(overlay, key, value, exp)]
                } else {
                    vec![]
                };
                (
                    ops,
                    WriteOutcome::Set {
                        applied,
                        old: old_value,
                    },
                )
            }
            WriteCmd::MSet { pairs } => {
                let ops = pairs
                    .into_iter()
                    .map(|(k, v)| put(overlay, k, v, 0))
                    .collect();
                (ops, WriteOutcome::Done)
            }
            WriteCmd::Del { keys } => {
                let mut live = 0;
                let mut ops = Vec::with_capacity(keys.len());
                for key in keys {
                    live += u64::from(current(overlay, &key)?.is_some());
                    overlay.insert(key.clone(), None);
                    ops.push(Op::Delete { key });
                }
                (ops, WriteOutcome::Deleted(live))
            }
            WriteCmd::IncrBy { key, delta } => {
                let old = current(overlay, &key)?;
                let (n, exp) = match &old {
                    None => (0, 0),
                    Some((v, exp)) => match parse_i64(v) {
                        Some(n) => (n, *exp),
                        None => return Ok((vec![], WriteOutcome::NotInteger)),
                    },
                };
                let Some(new) = n.checked_add(delta) else {
                    return Ok((vec![], WriteOutcome::Overflow));
                };
                (
                    vec![put(overlay, key, new.to_string().into_bytes(), exp)],
                    WriteOutcome::Integer(new),
                )
            }
            WriteCmd::Expire { key, at_ms } => match current(overlay, &key)? {
                None => (vec![], WriteOutcome::Changed(false)),
                Some((value, exp)) => match at_ms {
                    None if exp == 0 => (vec![], WriteOutcome::Changed(false)),
                    None => (
                        vec![put(overlay, key, value, 0)],
                        WriteOutcome::Changed(true),
                    ),
                    Some(at) if at <= now_ms => {
                        overlay.insert(key.clone(), None);
                        (vec![Op::Delete { key }], WriteOutcome::Changed(true))
                    }
                    Some(at) => (
                        vec![put(overlay, key, value, at)],
                        WriteOutcome::Changed(true),
                    ),
                },
            },
            WriteCmd::Multi { watched, cmds } => {
                return self.resolve_multi(watched, cmds, overlay, now_ms)
            }
        })
    }

    /// Resolves a transaction ([`WriteCmd::Multi`]) in one piece: if it fails, `overlay` is
    /// left as it was, so the group's later writes do not see half of it.
    fn resolve_multi(
        &self,
        watched: Vec<(Vec<u8>, Option<Timetag>)>,
        cmds: Vec<TxCmd>,
        overlay: &mut Overlay,
        now_ms: u64,
    ) -> Result<(Vec<Op>, WriteOutcome), StoreError> {
        for (key, seen) in &watched {
            // A key this group already wrote changed after any WATCH could read it: the
            // group's writes reach RocksDB only after every one of them is resolved.
            if overlay.contains_key(key) || self.engine.stored_timetag(key)? != *seen {
                return Ok((Vec::new(), WriteOutcome::WatchChanged));
            }
        }
        // Per key the transaction may write, its overlay entry before (`None`: it had none).
        let saved: Vec<(Vec<u8>, Option<OverlayEntry>)> = cmds
            .iter()
            .flat_map(|c| match c {
                TxCmd::Write(w) => w.written_keys(),
                TxCmd::Read { .. } => Vec::new(),
            })
            .map(|k| (k.to_vec(), overlay.get(k).cloned()))
            .collect();
        let mut ops = Vec::new();
        let mut outcomes = Vec::with_capacity(cmds.len());
        let run = |overlay: &mut Overlay| -> Result<(), StoreError> {
            for cmd in cmds {
                match cmd {
                    TxCmd::Write(w) => {
                        let (more, outcome) = self.resolve(w, overlay, now_ms)?;
                        ops.extend(more);
                        outcomes.push(outcome);
                    }
                    TxCmd::Read { keys } => {
                        let values = keys
                            .iter()
                            .map(|k| self.current(overlay, k, now_ms))
                            .collect::<Result<_, _>>()?;
                        outcomes.push(WriteOutcome::Values(values));
                    }
                }
            }
            Ok(())
        };
        if let Err(e) = run(overlay) {
            for (key, before) in saved {
                match before {
                    Some(v) => overlay.insert(key, v),
                    None => overlay.remove(&key),
                };
            }
            return Err(e);
        }
        Ok((ops, WriteOutcome::Multi(outcomes)))
    }

    /// The live value and expiry of `key` as the group sees it: its earlier writes first, then
    /// RocksDB.
    fn current(
        &self,
        overlay: &Overlay,
        key: &[u8],
        now_ms: u64,
    ) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        if let Some(v) = overlay.get(key) {
            return Ok(v.clone().filter(|(_, exp)| *exp == 0 || *exp > now_ms));
        }
        let Some(raw) = self.engine.get_raw(key)? else {
            return Ok(None);
        };
        Ok(live_from(&raw, now_ms).map(|l| (l.value, l.expire_at_ms)))
    }

    fn apply_dup(
        &mut self,
        source: Source,
        records: Vec<PlogRecord>,
    ) -> Result<ApplyReport, StoreError> {
        if let Some(reason) = &self.poisoned {
            return Err(StoreError::Poisoned {
                partition: self.id.0,
                reason: reason.clone(),
            });
        }
        let mut progress = match self.dup_progress.get(&source) {
            Some(d) => *d,
            None => self.engine.dup_progress_at(source)?,
        };
        let mut report = ApplyReport::default();
        let mut newest: HashMap<Vec<u8>, Timetag> = HashMap::new();
        let mut batch = Batch::default();
        for rec in &records {
            if rec.decree <= progress.decree {
                report.skipped_records += 1;
                continue;
            }
            for op in &rec.ops {
                let tag = op_timetag(rec.timetag, op);
                let stored = match newest.get(op.key()) {
                    Some(t) => Some(*t),
                    None => self.engine.stored_timetag(op.key())?,
                };
                if stored.is_some_and(|s| s >= tag) {
                    report.stale_ops += 1;
                    continue;
                }
                stage_op(&mut batch, tag, op);
                newest.insert(op.key().to_vec(), tag);
            }
            self.clock.observe(rec.timetag.timestamp_us());
            progress = SourceProgress {
                decree: rec.decree,
                timestamp_us: rec.timetag.timestamp_us(),
            };
            report.applied_records += 1;
        }
        report.progress = progress.decree;
        if report.applied_records > 0 {
            batch.set_dup_progress(source, progress);
            batch.set_clock(self.clock.last());
            self.engine.write(batch)?;
            self.dup_progress.insert(source, progress);
            self.stats
                .dup_applied_records_total
                .fetch_add(report.applied_records, Ordering::Relaxed);
        }
        Ok(report)
    }
}

impl Writer {
    fn apply_checkpoint(
        &mut self,
        source: Source,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        upto: Option<Decree>,
    ) -> Result<ApplyReport, StoreError> {
        if let Some(reason) = &self.poisoned {
            return Err(StoreError::Poisoned {
                partition: self.id.0,
                reason: reason.clone(),
            });
        }
        let mut report = ApplyReport::default();
        let mut batch = Batch::default();
        for (key, raw) in &entries {
            let Ok(v) = StoredValue::decode(raw) else {
                report.stale_ops += 1;
                continue;
            };
            if self
                .engine
                .stored_timetag(key)?
                .is_some_and(|s| s >= v.timetag)
            {
                report.stale_ops += 1;
                continue;
            }
            self.clock.observe(v.timetag.timestamp_us());
            batch.put_value(key, raw);
            report.applied_records += 1;
        }
        let mut progress = match self.dup_progress.get(&source) {
            Some(d) => *d,
            None => self.engine.dup_progress_at(source)?,
        };
        if let Some(upto) = upto.filter(|u| *u > progress.decree) {
            progress = SourceProgress::at(upto);
            batch.set_dup_progress(source, progress);
        }
        report.progress = progress.decree;
        if !batch.is_empty() {
            batch.set_clock(self.clock.last());
            self.engine.write(batch)?;
            self.dup_progress.insert(source, progress);
        }
        Ok(report)
    }
}

/// Deletes the plog segments below `below` whose records are durable in RocksDB's SSTs.
/// Flushes the memtable only when a segment can go.
///
/// Safe beside the writer thread: the applied decree is read *before* the flush, and everything
/// applied by then is in a memtable that the flush writes out; later writes only go to newer
/// segments, and the newest segment is never deleted.
fn gc_plog(engine: &Engine, plog_dir: &Path, below: Decree) -> Result<Vec<PathBuf>, StoreError> {
    let applied = engine.applied_decree()?;
    // The oldest segment can go only once the next one starts at or below the bound; until
    // then a flush would only make small SSTs and compete with the plog's fsyncs.
    let bound = below.min(applied.next());
    let segments = plog::list_segments(plog_dir)?;
    if segments.get(1).is_none_or(|s| s.first_decree > bound) {
        return Ok(Vec::new());
    }
    engine.flush()?;
    Ok(plog::remove_segments_below(plog_dir, bound)?)
}

/// Deletes the inbox segments a partition has applied durably, with the same read-then-flush
/// order as [`gc_plog`]. Flushes only when some segment can go.
fn gc_inboxes(engine: &Engine, partition_dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut inboxes = Vec::new();
    for source in inbox::sources(partition_dir)? {
        let idir = inbox::inbox_dir(partition_dir, source);
        let segs = plog::list_segments(&idir)?;
        // Segment i holds decrees up to segment i+1's first - 1: whole once that is applied.
        let applied = engine.dup_progress(source)?;
        if segs
            .get(1)
            .is_some_and(|s| s.first_decree <= applied.next())
        {
            inboxes.push((idir, applied));
        }
    }
    if inboxes.is_empty() {
        return Ok(Vec::new());
    }
    engine.flush()?;
    let mut removed = Vec::new();
    for (idir, applied) in inboxes {
        removed.extend(plog::remove_segments_below(&idir, applied.next())?);
    }
    Ok(removed)
}

/// Collects replayed plog records into RocksDB batches, with last-writer-wins against what is
/// stored.
#[derive(Default)]
struct ReplayBatch {
    batch: Batch,
    newest: HashMap<Vec<u8>, Timetag>,
    records: usize,
}

impl ReplayBatch {
    fn add(&mut self, engine: &Engine, rec: &PlogRecord) -> Result<(), StoreError> {
        for op in &rec.ops {
            let tag = op_timetag(rec.timetag, op);
            let stored = match self.newest.get(op.key()) {
                Some(t) => Some(*t),
                None => engine.stored_timetag(op.key())?,
            };
            if stored.is_none_or(|s| s < tag) {
                stage_op(&mut self.batch, tag, op);
                self.newest.insert(op.key().to_vec(), tag);
            }
        }
        self.records += 1;
        Ok(())
    }

    fn flush(&mut self, engine: &Engine, applied: Decree, clock_us: u64) -> Result<(), StoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.set_applied(applied, clock_us);
        engine.write(batch)?;
        self.newest.clear();
        self.records = 0;
        Ok(())
    }
}

/// The ops of one record with only the last op of each key, in order. The ops of a record
/// share its timetag, so replay and duplicated applies (last-writer-wins by timetag) would keep
/// the *first* op of a key and drop the rest; the last one is the key's state after the record.
fn last_op_per_key(ops: Vec<Op>) -> Vec<Op> {
    if ops.len() < 2 {
        return ops;
    }
    let mut seen = std::collections::HashSet::with_capacity(ops.len());
    let mut keep = vec![false; ops.len()];
    for (op, keep) in ops.iter().zip(keep.iter_mut()).rev() {
        *keep = seen.insert(op.key());
    }
    ops.into_iter()
        .zip(keep)
        .filter_map(|(op, keep)| keep.then_some(op))
        .collect()
}

/// The timetag stored with an op: the record's, with the delete flag for deletes.
fn op_timetag(record: Timetag, op: &Op) -> Timetag {
    record.with_delete(matches!(op, Op::Delete { .. }))
}

fn stage_record(batch: &mut Batch, rec: &PlogRecord) {
    for op in &rec.ops {
        stage_op(batch, op_timetag(rec.timetag, op), op);
    }
}

fn stage_op(batch: &mut Batch, tag: Timetag, op: &Op) {
    let mut stored = Vec::new();
    match op {
        Op::Put {
            key,
            value,
            expire_at_ms,
        } => {
            value::encode_into(tag, *expire_at_ms, value, &mut stored);
            batch.put_value(key, &stored);
        }
        Op::Delete { key } => {
            value::encode_into(tag, 0, &[], &mut stored);
            batch.put_value(key, &stored);
        }
    }
}

fn live_from(raw: &[u8], now_ms: u64) -> Option<Live> {
    let v = StoredValue::decode(raw).ok()?;
    v.is_live(now_ms).then(|| Live {
        value: v.user.to_vec(),
        expire_at_ms: v.expire_at_ms,
        timetag: v.timetag,
    })
}

/// Parses a value as Redis does for INCR: a plain decimal 64-bit integer, no spaces, no '+'.
fn parse_i64(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    if s.is_empty()
        || s.starts_with('+')
        || (s.len() > 1 && (s.starts_with('0') || s.starts_with("-0")))
    {
        return None;
    }
    s.parse().ok()
}

/// What [`Partition::digests`] computes over every stored entry (key, timetag, expiry, value;
/// tombstones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub entries: u64,
    /// FNV-1a over the entries in key order.
    pub ordered: u64,
    /// Wrapping sum of one FNV-1a per entry: independent of order, so sums over the partitions
    /// of two tables with different partition counts can be compared.
    pub unordered: u64,
}

/// FNV-1a, 64-bit: a stable, dependency-free digest for comparing partitions across clusters.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_parsing_follows_redis() {
        assert_eq!(parse_i64(b"42"), Some(42));
        assert_eq!(parse_i64(b"-7"), Some(-7));
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"+1"), None);
        assert_eq!(parse_i64(b"01"), None);
        assert_eq!(parse_i64(b" 1"), None);
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b""), None);
    }

    fn open_test_partition(dir: &Path) -> Partition {
        let cluster = ClusterId::new(1).expect("1 is a valid cluster id");
        Partition::open(dir, PartitionId(0), PartitionOptions::new(cluster))
            .expect("open partition")
            .0
    }

    fn incr(key: &str) -> TxCmd {
        TxCmd::Write(WriteCmd::IncrBy {
            key: key.into(),
            delta: 1,
        })
    }

    fn set_cmd(key: &str, value: &str) -> WriteCmd {
        WriteCmd::Set {
            key: key.into(),
            value: value.into(),
            expiry: Expiry::Never,
            cond: SetCond::Always,
            get_old: false,
        }
    }

    fn set(key: &str, value: &str) -> TxCmd {
        TxCmd::Write(set_cmd(key, value))
    }

    /// The live value of `key`.
    fn value(p: &Partition, key: &[u8]) -> Option<Vec<u8>> {
        p.get(key).expect("get").map(|l| l.value)
    }

    #[test]
    fn a_record_keeps_the_last_op_of_each_key() {
        let put = |k: &str, v: &str| Op::Put {
            key: k.into(),
            value: v.into(),
            expire_at_ms: 0,
        };
        let del = |k: &str| Op::Delete { key: k.into() };
        let ops = vec![
            put("a", "1"),
            put("b", "1"),
            del("a"),
            put("c", "1"),
            put("b", "2"),
        ];
        assert_eq!(
            last_op_per_key(ops),
            vec![del("a"), put("c", "1"), put("b", "2")]
        );
        assert_eq!(last_op_per_key(vec![put("a", "1")]), vec![put("a", "1")]);
    }

    #[tokio::test]
    async fn a_transaction_is_one_record_and_sees_its_own_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open_test_partition(dir.path());
        p.write(set_cmd("s", "abc")).await.expect("set");
        let before = p.committed_decree();
        let cmds = vec![
            incr("c"),
            incr("s"),
            incr("c"),
            TxCmd::Read {
                keys: vec![b"c".to_vec(), b"none".to_vec()],
            },
        ];
        let outcome = p
            .write(WriteCmd::Multi {
                watched: vec![],
                cmds,
            })
            .await
            .expect("multi");
        assert_eq!(
            outcome,
            WriteOutcome::Multi(vec![
                WriteOutcome::Integer(1),
                WriteOutcome::NotInteger,
                WriteOutcome::Integer(2),
                WriteOutcome::Values(vec![Some((b"2".to_vec(), 0)), None]),
            ])
        );
        assert_eq!(p.committed_decree(), before.next(), "one decree");
        assert_eq!(value(&p, b"c"), Some(b"2".to_vec()));
        assert_eq!(value(&p, b"s"), Some(b"abc".to_vec()));
    }

    #[tokio::test]
    async fn a_changed_watched_key_applies_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open_test_partition(dir.path());
        assert_eq!(p.version(b"w").expect("version"), None);
        let multi = |watched| WriteCmd::Multi {
            watched,
            cmds: vec![set("w", "mine"), set("other", "x")],
        };
        p.write(set_cmd("w", "theirs")).await.expect("set");
        let before = p.committed_decree();
        let outcome = p
            .write(multi(vec![(b"w".to_vec(), None)]))
            .await
            .expect("multi");
        assert_eq!(outcome, WriteOutcome::WatchChanged);
        assert_eq!(p.committed_decree(), before, "no record");
        assert_eq!(value(&p, b"w"), Some(b"theirs".to_vec()));
        assert_eq!(p.get(b"other").expect("get"), None);

        // With the current version it runs.
        let seen = p.version(b"w").expect("version");
        assert!(seen.is_some());
        let outcome = p
            .write(multi(vec![(b"w".to_vec(), seen)]))
            .await
            .expect("multi");
        assert!(matches!(outcome, WriteOutcome::Multi(_)), "{outcome:?}");
        assert_eq!(value(&p, b"w"), Some(b"mine".to_vec()));
    }

    #[tokio::test]
    async fn a_fenced_partition_refuses_a_writing_transaction_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open_test_partition(dir.path());
        p.fence(Some("TRYAGAIN fenced".into()))
            .await
            .expect("fence");
        let e = p
            .write(WriteCmd::Multi {
                watched: vec![],
                cmds: vec![set("a", "1")],
            })
            .await
            .expect_err("refused");
        assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
        assert_eq!(p.get(b"a").expect("get"), None);
        let reads = p
            .write(WriteCmd::Multi {
                watched: vec![],
                cmds: vec![TxCmd::Read {
                    keys: vec![b"a".to_vec()],
                }],
            })
            .await
            .expect("a transaction of reads runs");
        assert_eq!(
            reads,
            WriteOutcome::Multi(vec![WriteOutcome::Values(vec![None])])
        );
    }
}
