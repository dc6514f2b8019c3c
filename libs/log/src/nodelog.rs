//! The node's commit log: one log for every partition of a node, so that a round of client
//! writes to any number of partitions costs **one** fsync.
//!
//! Each partition writer still appends its group's records to its own plog (the shipper's source
//! and the partition's replay log), but without an fsync: it hands the same bytes to
//! [`NodeLog::commit`], which returns once they are durable here. Writers that commit while a
//! round is being written wait for the next round, so one fdatasync covers every writer that
//! arrived meanwhile (leader/follower group commit, no thread of its own).
//!
//! The fsync is cheap because nothing but data changes: segments are written full of zeros when
//! they are made (in the background) and reused afterwards, so the file's size and extents never
//! change while it takes entries, and ext4 has no journal commit to wait for.
//!
//! The plogs are made durable lazily, by a background thread that fdatasyncs every plog written
//! since its last pass. Once a pass is done, every entry older than the point where it started is
//! durable in its plog, and the segments holding only such entries are reused. After a crash
//! that lost part of a plog's unsynced tail, [`NodeLog::open`] writes the missing records back
//! from here before any partition opens.
//!
//! Layout: `<data_dir>/.nodelog/<n>.nlog`, each segment
//!
//! ```text
//! header = magic "FRYNLOG1" | seq: u64 LE | crc: u32 LE (of magic and seq) | 0u32
//! entry  = len: u32 LE | crc: u32 LE (of lsn and payload) | lsn: u64 LE | payload
//! payload = kind: u8 | key_len: u16 LE | key | data
//! ```
//!
//! `seq` numbers the segments in the order they were used; 0 marks a spare. An entry's `lsn` is
//! `seq << 32 | offset`, so a stale entry of an earlier use of the file is never read as new. The
//! key is the partition directory relative to the data dir (`users/3`). Kind 1 holds the plog
//! records of one group commit; kind 2 says the partition was closed with its plog synced, so
//! its earlier entries are never written back (its directory may be replaced afterwards).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_proto::{Decree, PlogRecord};

use crate::error::LogError;
use crate::layout::NODELOG_DIR;
use crate::plog::{self, PlogWriter};

/// The default segment size. Every segment is this size on disk from the start.
pub const DEFAULT_SEGMENT_BYTES: u64 = 32 << 20;
/// The smallest segment size a node accepts.
pub const MIN_SEGMENT_BYTES: u64 = 1 << 20;

const MAGIC: &[u8; 8] = b"FRYNLOG1";
const HEADER_LEN: u64 = 24;
const ENTRY_HEADER_LEN: usize = 16;
const KIND_RECORDS: u8 = 1;
const KIND_CLOSE: u8 = 2;
const SUFFIX: &str = ".nlog";
/// Spare segments kept for reuse; more are deleted.
const MAX_SPARES: usize = 2;
/// The background thread's longest sleep; plogs written since its last pass are synced at least
/// this often, so a restart has little to write back.
const PLOG_SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// Counters of the commit log, for the node's metrics.
#[derive(Debug, Default)]
pub struct NodeLogStats {
    /// fdatasync rounds of the commit log.
    pub rounds_total: AtomicU64,
    /// Entries committed (one per partition group commit).
    pub entries_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub fsync_micros_total: AtomicU64,
    /// Plog fdatasyncs made by the background thread.
    pub plog_syncs_total: AtomicU64,
    /// Segments in use (the current one and those still needed for a restart).
    pub live_segments: AtomicU64,
}

/// What [`NodeLog::open`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeLogRecovery {
    pub segments_read: usize,
    pub entries_read: u64,
    /// Plog records written back into plogs that had lost them.
    pub records_restored: u64,
    /// The partitions (keys) that had records written back.
    pub partitions_restored: Vec<String>,
}

/// A plog with appends that are durable only in the commit log so far.
struct DirtyPlog {
    file: Arc<File>,
    path: PathBuf,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    seq: u64,
    bytes: u64,
}

/// Bytes waiting for the next round: a run of entries at `offset` of one segment.
struct Chunk {
    file: Arc<File>,
    path: PathBuf,
    offset: u64,
    bytes: Vec<u8>,
}

struct State {
    current: Segment,
    /// Where the next entry goes in `current`.
    offset: u64,
    /// Segments before `current` whose entries may still be needed, oldest first.
    older: Vec<Segment>,
    spares: Vec<Segment>,
    pending: Vec<Chunk>,
    /// Every entry below this lsn is durable.
    durable: u64,
    /// A round is being written by some committer.
    writing: bool,
    /// Set after a failed write or fsync: nothing here can be trusted until a restart reads it.
    failed: Option<String>,
    next_file: u64,
    stop: bool,
}

struct Inner {
    root: PathBuf,
    dir: PathBuf,
    segment_bytes: u64,
    state: Mutex<State>,
    /// Signalled when a round ends.
    round_done: Condvar,
    /// Wakes the background thread (a segment was taken, or the log is closing).
    wake: Condvar,
    dirty: Mutex<HashMap<String, DirtyPlog>>,
    stats: NodeLogStats,
}

/// The node's commit log. Cheap to share: every partition of the node holds it.
pub struct NodeLog {
    inner: Arc<Inner>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NodeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLog")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// Why a commit was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Nothing was written (no room for a new segment, say); a later commit may succeed.
    #[error("{0}")]
    Refused(LogError),
    /// A write or fsync of the commit log failed: what reached the disk is uncertain, so this
    /// and every later commit fail until the node restarts and recovers from its logs.
    #[error("the node's commit log failed ({0}); restart the node to recover from its logs")]
    Failed(String),
}

impl CommitError {
    pub fn is_disk_full(&self) -> bool {
        matches!(self, CommitError::Refused(e) if e.is_disk_full())
    }
}

fn lsn(seq: u64, offset: u64) -> u64 {
    (seq << 32) | offset
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NodeLog {
    /// Opens the commit log of the data dir `root`, creating it if there is none. A log left by
    /// an earlier run is read first: each plog that lost records it holds (a crash before the
    /// plog's lazy fsync) gets them back, and is synced. Call before opening any partition.
    pub fn open(root: &Path, segment_bytes: u64) -> Result<(NodeLog, NodeLogRecovery), LogError> {
        let segment_bytes = segment_bytes.clamp(MIN_SEGMENT_BYTES, u32::MAX as u64);
        let dir = root.join(NODELOG_DIR);
        fs::create_dir_all(&dir).map_err(|e| LogError::io("create node log directory", &dir, e))?;
        let mut live = Vec::new();
        let mut spares = Vec::new();
        let mut next_file = 0u64;
        for entry in fs::read_dir(&dir).map_err(|e| LogError::io("list node log", &dir, e))? {
            let entry = entry.map_err(|e| LogError::io("list node log", &dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                if name.to_str().is_some_and(|n| n.ends_with(".tmp")) {
                    // A segment whose making was interrupted.
                    let _ = fs::remove_file(&path);
                }
                continue;
            };
            next_file = next_file.max(n + 1);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| LogError::io("open node log segment", &path, e))?;
            let bytes = file
                .metadata()
                .map_err(|e| LogError::io("stat node log segment", &path, e))?
                .len();
            let seg = Segment {
                seq: read_header(&file).unwrap_or(0),
                file: Arc::new(file),
                path,
                bytes,
            };
            if seg.seq == 0 {
                spares.push(seg);
            } else {
                live.push(seg);
            }
        }
        live.sort_by_key(|s| s.seq);
        let recovery = restore(root, &live)?;
        let next_seq = live.last().map_or(1, |s| s.seq + 1);
        // Every plog now holds what the old segments held: they become spares.
        for seg in live {
            write_header(&seg, 0)?;
            spares.push(seg);
        }
        let mut current = match spares.iter().position(|s| s.bytes >= segment_bytes) {
            Some(i) => spares.swap_remove(i),
            None => {
                next_file += 1;
                make_segment(&dir, next_file - 1, segment_bytes)?
            }
        };
        write_header(&current, next_seq)?;
        current.seq = next_seq;
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            dir,
            segment_bytes,
            state: Mutex::new(State {
                durable: lsn(next_seq, HEADER_LEN),
                current,
                offset: HEADER_LEN,
                older: Vec::new(),
                spares,
                pending: Vec::new(),
                writing: false,
                failed: None,
                next_file,
                stop: false,
            }),
            round_done: Condvar::new(),
            wake: Condvar::new(),
            dirty: Mutex::new(HashMap::new()),
            stats: NodeLogStats::default(),
        });
        inner.stats.live_segments.store(1, Ordering::Relaxed);
        let bg = inner.clone();
        let syncer = std::thread::Builder::new()
            .name("ferry-nodelog".into())
            .spawn(move || bg.background())
            .map_err(|e| LogError::io("spawn node log thread", root, e))?;
        Ok((
            NodeLog {
                inner,
                syncer: Mutex::new(Some(syncer)),
            },
            recovery,
        ))
    }

    pub fn stats(&self) -> &NodeLogStats {
        &self.inner.stats
    }

    /// The key of a partition directory: its path relative to the data dir.
    pub fn key_of(&self, partition_dir: &Path) -> Result<String, LogError> {
        partition_dir
            .strip_prefix(&self.inner.root)
            .ok()
            .and_then(|p| p.to_str())
            .filter(|k| !k.is_empty() && k.len() <= u16::MAX as usize)
            .map(str::to_string)
            .ok_or_else(|| LogError::Inconsistent {
                dir: partition_dir.to_path_buf(),
                reason: format!(
                    "the partition is not inside the node's data dir {}, whose commit log it would use",
                    self.inner.root.display()
                ),
            })
    }

    /// Makes `records` (encoded plog records of partition `key`, already appended to its plog
    /// in `plog`) durable; returns once they are. Many partitions' commits share one fsync.
    pub fn commit(&self, key: &str, plog: &PlogWriter, records: &[u8]) -> Result<(), CommitError> {
        self.mark_dirty(key, plog);
        self.submit(KIND_RECORDS, key, records)
    }

    /// Records that partition `key` closed with its plog synced (the caller has synced it), so a
    /// restart never writes its earlier entries back.
    pub fn close(&self, key: &str) -> Result<(), CommitError> {
        lock(&self.inner.dirty).remove(key);
        self.submit(KIND_CLOSE, key, &[])
    }

    /// Registers the plog before its entry can be committed: the background thread's pass then
    /// syncs it before it counts the entry as durable in the plog.
    fn mark_dirty(&self, key: &str, plog: &PlogWriter) {
        let mut dirty = lock(&self.inner.dirty);
        match dirty.get_mut(key) {
            Some(d) if Arc::ptr_eq(&d.file, plog.file()) => {}
            Some(d) => {
                // The plog rolled over (its finished segment was synced first): follow it.
                d.file = plog.file().clone();
                d.path = plog.current_segment().to_path_buf();
            }
            None => {
                dirty.insert(
                    key.to_string(),
                    DirtyPlog {
                        file: plog.file().clone(),
                        path: plog.current_segment().to_path_buf(),
                    },
                );
            }
        }
    }

    fn submit(&self, kind: u8, key: &str, data: &[u8]) -> Result<(), CommitError> {
        fail::fail_point!("nodelog-fsync", |_| {
            let reason = "fsync node log: Input/output error (os error 5)".to_string();
            lock(&self.inner.state).failed = Some(reason.clone());
            Err(CommitError::Failed(reason))
        });
        let inner = &*self.inner;
        let mut st = lock(&inner.state);
        if let Some(reason) = &st.failed {
            return Err(CommitError::Failed(reason.clone()));
        }
        let end = inner.append(&mut st, kind, key, data)?;
        loop {
            if st.durable >= end {
                return Ok(());
            }
            if let Some(reason) = &st.failed {
                return Err(CommitError::Failed(reason.clone()));
            }
            if st.writing {
                st = inner.round_done.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // This committer writes the round for everyone waiting.
            st.writing = true;
            let chunks = std::mem::take(&mut st.pending);
            let round_end = lsn(st.current.seq, st.offset);
            drop(st);
            let result = inner.write_round(&chunks);
            st = lock(&inner.state);
            st.writing = false;
            match result {
                Ok(()) => st.durable = round_end,
                Err(e) => {
                    tracing::error!(error = %e, "node commit log write failed; every partition refuses writes until a restart");
                    st.failed = Some(e.to_string());
                }
            }
            inner.round_done.notify_all();
        }
    }
}

impl Drop for NodeLog {
    fn drop(&mut self) {
        lock(&self.inner.state).stop = true;
        self.inner.wake.notify_all();
        if let Some(h) = lock(&self.syncer).take() {
            let _ = h.join();
        }
    }
}

impl Inner {
    /// Places an entry after the pending ones (in a new segment if it does not fit), and returns
    /// the lsn just after it.
    fn append(&self, st: &mut State, kind: u8, key: &str, data: &[u8]) -> Result<u64, CommitError> {
        let len = ENTRY_HEADER_LEN + 3 + key.len() + data.len();
        if st.offset + len as u64 > st.current.bytes {
            self.switch(st, len as u64)?;
        }
        let at = lsn(st.current.seq, st.offset);
        let offset = st.offset;
        let same_run = st.pending.last().is_some_and(|c| {
            Arc::ptr_eq(&c.file, &st.current.file) && c.offset + c.bytes.len() as u64 == offset
        });
        if !same_run {
            st.pending.push(Chunk {
                file: st.current.file.clone(),
                path: st.current.path.clone(),
                offset,
                bytes: Vec::with_capacity(len),
            });
        }
        let buf = &mut st
            .pending
            .last_mut()
            .expect("a chunk was just ensured")
            .bytes;
        let start = buf.len();
        buf.extend_from_slice(&[0u8; 8]);
        buf.extend_from_slice(&at.to_le_bytes());
        buf.push(kind);
        buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(data);
        let body_len = (buf.len() - start - ENTRY_HEADER_LEN) as u32;
        let crc = crc32c::crc32c(&buf[start + 8..]);
        buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        st.offset += len as u64;
        self.stats.entries_total.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_total
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(at + len as u64)
    }

    /// Moves on to a fresh segment with room for an entry of `need` bytes.
    fn switch(&self, st: &mut State, need: u64) -> Result<(), CommitError> {
        let need = need + HEADER_LEN;
        let next_seq = st.current.seq + 1;
        let seg = match st.spares.iter().position(|s| s.bytes >= need) {
            Some(i) => st.spares.swap_remove(i),
            None => {
                // No spare ready (the background thread makes them): make one now, inline.
                let n = st.next_file;
                let seg = make_segment(&self.dir, n, self.segment_bytes.max(need))
                    .map_err(CommitError::Refused)?;
                st.next_file += 1;
                seg
            }
        };
        // The header goes out with the segment's first round, in the same fsync.
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(&header_bytes(next_seq));
        st.pending.push(Chunk {
            file: seg.file.clone(),
            path: seg.path.clone(),
            offset: 0,
            bytes: header,
        });
        let old = std::mem::replace(&mut st.current, seg);
        st.current.seq = next_seq;
        st.older.push(old);
        st.offset = HEADER_LEN;
        self.stats
            .live_segments
            .store(st.older.len() as u64 + 1, Ordering::Relaxed);
        self.wake.notify_all();
        Ok(())
    }

    /// Writes a round's chunks and fdatasyncs each file they touch.
    fn write_round(&self, chunks: &[Chunk]) -> Result<(), LogError> {
        for c in chunks {
            c.file
                .write_all_at(&c.bytes, c.offset)
                .map_err(|e| LogError::io("write node log segment", &c.path, e))?;
        }
        let t = Instant::now();
        let mut synced: Vec<&Arc<File>> = Vec::with_capacity(2);
        for c in chunks {
            if synced.iter().any(|f| Arc::ptr_eq(f, &c.file)) {
                continue;
            }
            c.file
                .sync_data()
                .map_err(|e| LogError::io("fsync node log segment", &c.path, e))?;
            synced.push(&c.file);
        }
        self.stats
            .fsync_micros_total
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.rounds_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The background thread: keeps a spare segment ready, syncs plogs, reuses old segments.
    fn background(self: Arc<Inner>) {
        let mut last_pass = Instant::now();
        let mut plog_sync_failed = false;
        let mut spare_failed = false;
        loop {
            let (want_spare, freeable, durable) = {
                let mut st = lock(&self.state);
                let urgent = |st: &State| {
                    st.spares.is_empty()
                        || !plog_sync_failed
                            && st.older.first().is_some_and(|s| s.seq < st.durable >> 32)
                };
                if !st.stop && !urgent(&st) {
                    st = self
                        .wake
                        .wait_timeout(st, PLOG_SYNC_INTERVAL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if st.stop {
                    return;
                }
                let freeable = st.older.first().is_some_and(|s| s.seq < st.durable >> 32);
                (st.spares.is_empty(), freeable, st.durable)
            };
            if want_spare {
                let n = {
                    let mut st = lock(&self.state);
                    st.next_file += 1;
                    st.next_file - 1
                };
                match make_segment(&self.dir, n, self.segment_bytes) {
                    Ok(seg) => {
                        lock(&self.state).spares.push(seg);
                        spare_failed = false;
                    }
                    Err(e) => {
                        if !spare_failed {
                            tracing::warn!(error = %e, "cannot make a spare node log segment (retrying every second); a commit that needs one makes it, or is refused");
                        }
                        spare_failed = true;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            let dirty_now = !lock(&self.dirty).is_empty();
            if plog_syncs_held() {
                continue;
            }
            if plog_sync_failed
                || !(freeable || dirty_now && last_pass.elapsed() >= PLOG_SYNC_INTERVAL)
            {
                continue;
            }
            // Every entry below `durable` was registered dirty before it was committed, so it is
            // in the set taken now (or synced by an earlier pass).
            let taken = std::mem::take(&mut *lock(&self.dirty));
            last_pass = Instant::now();
            let mut failed = None;
            for d in taken.values() {
                if let Err(e) = d.file.sync_data() {
                    failed = Some(LogError::io("fsync plog segment", &d.path, e));
                    break;
                }
            }
            self.stats
                .plog_syncs_total
                .fetch_add(taken.len() as u64, Ordering::Relaxed);
            if let Some(e) = failed {
                // The plog may have lost data the commit log still holds: keep every segment,
                // so a restart writes it back.
                tracing::error!(error = %e, "plog fsync failed; the node keeps its commit log and needs a restart to repair the plog");
                plog_sync_failed = true;
                continue;
            }
            let durable_seq = durable >> 32;
            let freed: Vec<Segment> = {
                let mut st = lock(&self.state);
                let (freed, kept) = std::mem::take(&mut st.older)
                    .into_iter()
                    .partition(|s| s.seq < durable_seq);
                st.older = kept;
                self.stats
                    .live_segments
                    .store(st.older.len() as u64 + 1, Ordering::Relaxed);
                freed
            };
            for seg in freed {
                let room = lock(&self.state).spares.len() < MAX_SPARES;
                let kept = room && seg.bytes == self.segment_bytes && write_header(&seg, 0).is_ok();
                if kept {
                    lock(&self.state).spares.push(seg);
                } else if let Err(e) = fs::remove_file(&seg.path) {
                    tracing::warn!(file = %seg.path.display(), error = %e, "cannot delete an old node log segment");
                }
            }
        }
    }
}

/// Failpoint `nodelog-hold-plogs`: the background thread syncs no plog (and so reuses no
/// segment), as if the machine lost power before any plog reached the disk.
fn plog_syncs_held() -> bool {
    fail::fail_point!("nodelog-hold-plogs", |_| true);
    false
}

fn header_bytes(seq: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The segment's seq, or `None` for a header that is not intact.
fn read_header(file: &File) -> Option<u64> {
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0).ok()?;
    let ok = &h[..8] == MAGIC && h[16..20] == crc32c::crc32c(&h[..16]).to_le_bytes();
    ok.then(|| u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")))
}

fn write_header(seg: &Segment, seq: u64) -> Result<(), LogError> {
    seg.file
        .write_all_at(&header_bytes(seq), 0)
        .and_then(|()| seg.file.sync_data())
        .map_err(|e| LogError::io("write node log segment header", &seg.path, e))
}

/// Makes a segment of `bytes` zeros (so later fsyncs change no metadata), as a spare.
fn make_segment(dir: &Path, n: u64, bytes: u64) -> Result<Segment, LogError> {
    let path = dir.join(format!("{n:020}{SUFFIX}"));
    let tmp = dir.join(format!("{n:020}.tmp"));
    let write = || -> io::Result<File> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.write_all_at(&header_bytes(0), 0)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(f)
    };
    let file = write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        LogError::io("make node log segment", &path, e)
    })?;
    plog::sync_dir(dir)?;
    Ok(Segment {
        file: Arc::new(file),
        path,
        seq: 0,
        bytes,
    })
}

/// Reads the live segments and writes back into each plog the records it lost.
fn restore(root: &Path, live: &[Segment]) -> Result<NodeLogRecovery, LogError> {
    let mut report = NodeLogRecovery::default();
    // Per partition, the records of its entries after its last close, in order.
    let mut by_key: HashMap<String, Vec<u8>> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for pair in live.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(LogError::Inconsistent {
                dir: pair[1].path.clone(),
                reason: format!(
                    "node log segment {} follows segment {}: the segments between are missing, \
                     so writes they held may be lost; restore the data dir from a backup or \
                     another cluster",
                    pair[1].seq, pair[0].seq
                ),
            });
        }
    }
    for seg in live {
        let bytes =
            fs::read(&seg.path).map_err(|e| LogError::io("read node log segment", &seg.path, e))?;
        report.segments_read += 1;
        let mut pos = HEADER_LEN as usize;
        while let Some((kind, key, data, used)) = parse_entry(&bytes, pos, seg.seq) {
            report.entries_read += 1;
            let key = key.to_string();
            match kind {
                KIND_CLOSE => {
                    by_key.remove(&key);
                }
                _ => {
                    if !by_key.contains_key(&key) {
                        order.push(key.clone());
                    }
                    by_key.entry(key).or_default().extend_from_slice(data);
                }
            }
            pos += used;
        }
    }
    for key in order {
        let Some(records) = by_key.remove(&key) else {
            continue;
        };
        let restored = restore_plog(root, &key, &records)?;
        if restored > 0 {
            report.records_restored += restored;
            report.partitions_restored.push(key);
        }
    }
    Ok(report)
}

/// The entry at `pos` if it is intact and belongs to this use of the segment.
fn parse_entry(bytes: &[u8], pos: usize, seq: u64) -> Option<(u8, &str, &[u8], usize)> {
    let head = bytes.get(pos..pos + ENTRY_HEADER_LEN)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let at = u64::from_le_bytes(head[8..16].try_into().ok()?);
    if at != lsn(seq, pos as u64) || len < 3 {
        return None;
    }
    let body = bytes.get(pos + 8..pos + ENTRY_HEADER_LEN + len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let payload = &body[8..];
    let kind = payload[0];
    let key_len = u16::from_le_bytes([payload[1], payload[2]]) as usize;
    let key = std::str::from_utf8(payload.get(3..3 + key_len)?).ok()?;
    let data = &payload[3 + key_len..];
    Some((kind, key, data, ENTRY_HEADER_LEN + len))
}

/// Writes back into partition `key`'s plog the logged records it lacks; returns how many.
fn restore_plog(root: &Path, key: &str, records: &[u8]) -> Result<u64, LogError> {
    let plog_dir = crate::layout::plog_dir(&root.join(key));
    if key.split('/').any(|c| c == ".." || c.is_empty()) || !plog_dir.is_dir() {
        // The partition was deleted (its table dropped) after these writes.
        tracing::info!(
            partition = key,
            "node log holds writes of a partition that no longer exists; skipped"
        );
        return Ok(0);
    }
    let mut recs = Vec::new();
    let mut pos = 0;
    while pos < records.len() {
        let (rec, used) =
            PlogRecord::decode(&records[pos..]).map_err(|e| LogError::Inconsistent {
                dir: plog_dir.clone(),
                reason: format!("a node log entry holds an undecodable plog record: {e}"),
            })?;
        recs.push((rec.decree, pos..pos + used));
        pos += used;
    }
    let Some(first_logged) = recs.first().map(|(d, _)| *d) else {
        return Ok(0);
    };
    let last = plog::cut_unsynced_tail(&plog_dir, first_logged)?;
    let mut next = last.map_or(first_logged, Decree::next);
    let mut writer: Option<PlogWriter> = None;
    let mut restored = 0;
    for (decree, range) in recs {
        if decree < next {
            continue;
        }
        if decree > next {
            return Err(LogError::Inconsistent {
                dir: plog_dir,
                reason: format!(
                    "the plog ends before decree {next} but the node log's next record is {decree}; \
                     records between are lost. Restore the partition from a checkpoint or another cluster"
                ),
            });
        }
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(PlogWriter::open(&plog_dir, next, u64::MAX)?),
        };
        w.append(&records[range])?;
        next = next.next();
        restored += 1;
    }
    // Synced whether or not records came back: the old segments are about to be reused, and
    // what this plog holds beyond its last sync may still be only in the page cache.
    match writer {
        Some(mut w) => {
            w.sync()?;
            tracing::warn!(
                partition = key,
                records = restored,
                "restored plog records from the node log (lost in a crash before the plog's fsync)"
            );
        }
        None => PlogWriter::open(&plog_dir, next, u64::MAX)?.sync()?,
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Op, Timetag};

    use super::*;

    fn rec(d: u64) -> PlogRecord {
        PlogRecord {
            decree: Decree(d),
            timetag: Timetag(d << 8 | 1),
            ops: vec![Op::Put {
                key: format!("k{d}").into_bytes(),
                value: vec![b'v'; 40],
                expire_at_ms: 0,
            }],
        }
    }

    fn encode(decrees: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut buf = Vec::new();
        for d in decrees {
            rec(d).encode(&mut buf);
        }
        buf
    }

    fn decrees(plog_dir: &Path) -> Vec<u64> {
        let mut out = Vec::new();
        plog::recover(plog_dir, Decree(0), |r| {
            out.push(r.decree.0);
            Ok::<(), LogError>(())
        })
        .expect("recover");
        out
    }

    /// Writes decrees 1..=n to partition `key` through the node log, as a writer does.
    fn write(log: &NodeLog, root: &Path, key: &str, n: u64) -> PlogWriter {
        let dir = crate::layout::plog_dir(&root.join(key));
        let mut w = PlogWriter::open(&dir, Decree(1), 64 << 20).expect("open plog");
        for d in 1..=n {
            let buf = encode(d..=d);
            w.append(&buf).expect("append");
            log.commit(key, &w, &buf).expect("commit");
        }
        w
    }

    #[test]
    fn a_plog_that_lost_its_unsynced_tail_gets_it_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let (log, report) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("open");
        assert_eq!(report.records_restored, 0);
        let w = write(&log, root.path(), "t/0", 50);
        let seg = w.current_segment().to_path_buf();
        drop(w);
        drop(log); // a crash: dropping the log syncs nothing
                   // The plog lost everything after decree 20, and garbage follows (a page never written).
        let dir = crate::layout::plog_dir(&root.path().join("t/0"));
        let mut bytes = fs::read(&seg).expect("read");
        let cut = plog::SEGMENT_HEADER_LEN + encode(1..=20).len();
        bytes.truncate(cut);
        bytes.extend_from_slice(&[0u8; 300]);
        bytes.extend_from_slice(&encode(40..=41));
        fs::write(&seg, &bytes).expect("write");

        let (_log, report) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("reopen");
        assert_eq!(report.records_restored, 30);
        assert_eq!(report.partitions_restored, vec!["t/0".to_string()]);
        assert_eq!(decrees(&dir), (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn a_closed_partition_is_never_written_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let (log, _) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("open");
        let mut w = write(&log, root.path(), "t/0", 10);
        w.sync().expect("sync");
        log.close("t/0").expect("close");
        drop(w);
        drop(log);
        // The partition is replaced by one whose plog starts at 3 (an install, say).
        let dir = crate::layout::plog_dir(&root.path().join("t/0"));
        fs::remove_dir_all(&dir).expect("rm");
        let mut w = PlogWriter::open(&dir, Decree(3), 64 << 20).expect("open");
        w.append(&encode(3..=3)).expect("append");
        w.sync().expect("sync");
        drop(w);

        let (_log, report) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("reopen");
        assert_eq!(report.records_restored, 0);
        assert_eq!(decrees(&dir), vec![3]);
    }

    #[test]
    fn segments_are_reused_once_the_plogs_are_synced() {
        let root = tempfile::tempdir().expect("tempdir");
        let (log, _) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("open");
        // About 3 MiB of entries through 1 MiB segments.
        let key = "t/1";
        let dir = crate::layout::plog_dir(&root.path().join(key));
        let mut w = PlogWriter::open(&dir, Decree(1), 64 << 20).expect("open plog");
        let mut d = 1;
        for _ in 0..600 {
            let mut buf = Vec::new();
            for _ in 0..80 {
                rec(d).encode(&mut buf);
                d += 1;
            }
            w.append(&buf).expect("append");
            log.commit(key, &w, &buf).expect("commit");
        }
        assert!(log.stats().rounds_total.load(Ordering::Relaxed) >= 600);
        // The background thread syncs the plog and frees the old segments (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(30);
        while log.stats().live_segments.load(Ordering::Relaxed) > 1 {
            assert!(Instant::now() < deadline, "old segments were never freed");
            std::thread::sleep(Duration::from_millis(50));
        }
        let files = fs::read_dir(root.path().join(NODELOG_DIR))
            .expect("list")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
            })
            .count();
        assert!(files <= 1 + MAX_SPARES + 1, "{files} segment files kept");
        drop(log);
        let (_log, report) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("reopen");
        assert_eq!(report.records_restored, 0);
        assert_eq!(decrees(&dir).len() as u64, d - 1);
    }

    #[test]
    fn commits_from_many_threads_all_come_back_after_a_crash() {
        let root = tempfile::tempdir().expect("tempdir");
        let (log, _) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("open");
        std::thread::scope(|s| {
            for t in 0..8 {
                let log = &log;
                let root = root.path();
                s.spawn(move || write(log, root, &format!("t/{t}"), 100));
            }
        });
        assert_eq!(log.stats().entries_total.load(Ordering::Relaxed), 800);
        drop(log); // a crash before any plog was synced: dropping syncs nothing
                   // Every plog lost everything after its header.
        for t in 0..8 {
            let dir = crate::layout::plog_dir(&root.path().join(format!("t/{t}")));
            let seg = plog::list_segments(&dir).expect("list").remove(0);
            let f = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .expect("open");
            f.set_len(plog::SEGMENT_HEADER_LEN as u64)
                .expect("truncate");
        }
        let (_log, report) = NodeLog::open(root.path(), MIN_SEGMENT_BYTES).expect("reopen");
        assert_eq!(report.records_restored, 800);
        for t in 0..8 {
            let dir = crate::layout::plog_dir(&root.path().join(format!("t/{t}")));
            assert_eq!(
                decrees(&dir),
                (1..=100).collect::<Vec<_>>(),
                "partition {t}"
            );
        }
    }
}
