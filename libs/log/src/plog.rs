//! The plog: a partition's private write-ahead log, and the source of truth for shipping.
//!
//! A plog is a directory of segment files named `<first_decree:020>.plog`. A segment starts with
//! a 16-byte header (`b"FRYPLOG1"`, then the first decree as u64 LE), followed by records in the
//! format of [`ferry_proto::record`], with consecutive decrees. Segments roll over by size. Only
//! the newest segment is ever appended to.
//!
//! Recovery reads every segment. A bad record in the newest segment, with no valid record anywhere
//! after it, is a *torn tail*: the end of a write whose fsync never returned, so it was never
//! acknowledged. It is cut off and reported. Any other bad record is *corruption*: records after it
//! were committed, so recovery stops with an error that names the file and the offset.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_proto::record::RECORD_HEADER_LEN;
use ferry_proto::{Decree, PlogRecord};

use crate::error::LogError;

pub const SEGMENT_MAGIC: &[u8; 8] = b"FRYPLOG1";
pub const SEGMENT_HEADER_LEN: usize = 16;
const SEGMENT_SUFFIX: &str = ".plog";

/// One segment file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first_decree: Decree,
    pub path: PathBuf,
}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The last decree in the plog, or `None` for a plog without records.
    pub last_decree: Option<Decree>,
    /// Records handed to the caller (those after `applied`).
    pub replayed: u64,
    pub segments: usize,
    pub torn_tail: Option<TornTail>,
}

/// A torn tail that recovery cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes_dropped: u64,
    pub reason: String,
}

/// Lists the segments of a plog directory, oldest first.
pub fn list_segments(dir: &Path) -> Result<Vec<Segment>, LogError> {
    let mut segs = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| LogError::io("list plog directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("list plog directory", dir, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        let Ok(first) = stem.parse::<u64>() else {
            continue;
        };
        segs.push(Segment {
            first_decree: Decree(first),
            path: entry.path(),
        });
    }
    segs.sort_by_key(|s| s.first_decree);
    Ok(segs)
}

/// Reads every record of the plog in `dir`, checks it, cuts a torn tail off the newest segment,
/// and calls `replay` for each record with a decree after `applied`, in order.
pub fn recover<E: From<LogError>>(
    dir: &Path,
    applied: Decree,
    replay: impl FnMut(PlogRecord) -> Result<(), E>,
) -> Result<RecoveryReport, E> {
    recover_segments(dir, applied, false, replay)
}

/// What a writer reopening a log needs, reading only its newest segment: the last decree, with a
/// torn tail cut. The older segments are never written again (each was synced whole before the
/// next one was created), so a log of any length reopens in the time of one segment. Without a
/// record in the newest segment, the last decree is the one before that segment's first.
pub fn recover_newest(dir: &Path) -> Result<RecoveryReport, LogError> {
    recover_segments(dir, Decree(u64::MAX), true, |_| Ok::<(), LogError>(()))
}

/// Cuts the newest segment after its last intact record, for a plog whose records from decree
/// `held` on are also held by the node's commit log, which writes them back: a bad record at
/// `held` or later is only a tail that was never synced, whatever follows it (pages of an
/// unsynced file reach the disk in any order). A bad record before `held` is corruption.
/// Returns the decree before the first one missing, or `None` for a plog without segments.
pub fn cut_unsynced_tail(dir: &Path, held: Decree) -> Result<Option<Decree>, LogError> {
    let segments = list_segments(dir)?;
    let Some(newest) = segments.last() else {
        return Ok(None);
    };
    let (bytes, header_ok) = read_segment(newest)?;
    if !header_ok {
        return Err(LogError::corrupt(
            &newest.path,
            0,
            "bad segment header".into(),
        ));
    }
    let mut pos = SEGMENT_HEADER_LEN;
    let mut next = newest.first_decree;
    while pos < bytes.len() {
        match PlogRecord::peek_decree(&bytes[pos..]) {
            Ok((decree, used)) if decree == next && decree.0 != u64::MAX => {
                next = next.next();
                pos += used;
            }
            _ if next >= held => {
                truncate_durably(&newest.path, pos as u64)?;
                break;
            }
            Ok((decree, _)) => {
                return Err(LogError::corrupt(
                    &newest.path,
                    pos as u64,
                    format!("expected decree {next}, found {decree}"),
                ))
            }
            Err(e) => return Err(LogError::corrupt(&newest.path, pos as u64, e.to_string())),
        }
    }
    Ok(Some(Decree(next.0.saturating_sub(1))))
}

fn recover_segments<E: From<LogError>>(
    dir: &Path,
    applied: Decree,
    newest_only: bool,
    mut replay: impl FnMut(PlogRecord) -> Result<(), E>,
) -> Result<RecoveryReport, E> {
    let segments = list_segments(dir)?;
    let mut report = RecoveryReport {
        segments: segments.len(),
        ..Default::default()
    };
    let skip = if newest_only {
        segments.len().saturating_sub(1)
    } else {
        0
    };
    if let Some(newest) = segments.get(skip).filter(|_| skip > 0) {
        report.last_decree = Some(Decree(newest.first_decree.0.saturating_sub(1)));
    }
    let mut expected: Option<Decree> = None;
    for (i, seg) in segments.iter().enumerate().skip(skip) {
        let newest = i + 1 == segments.len();
        if let Some(exp) = expected {
            if seg.first_decree != exp {
                return Err(E::from(LogError::corrupt(
                    &seg.path,
                    0,
                    format!(
                        "segment starts at decree {} but the previous one ended before {}",
                        seg.first_decree, exp
                    ),
                )));
            }
        }
        let (bytes, header_ok) = read_segment(seg)?;
        if !header_ok {
            if newest && bytes.len() < SEGMENT_HEADER_LEN {
                // Crashed while creating the segment; it never held a record.
                remove_file_durably(&seg.path)?;
                report.torn_tail = Some(TornTail {
                    file: seg.path.clone(),
                    offset: 0,
                    bytes_dropped: bytes.len() as u64,
                    reason: "segment header incomplete; empty segment removed".into(),
                });
                report.segments -= 1;
                break;
            }
            return Err(E::from(LogError::corrupt(
                &seg.path,
                0,
                "bad segment header".into(),
            )));
        }
        let mut pos = SEGMENT_HEADER_LEN;
        let mut next = seg.first_decree;
        while pos < bytes.len() {
            match PlogRecord::decode(&bytes[pos..]) {
                Ok((rec, used)) => {
                    if rec.decree != next {
                        return Err(E::from(LogError::corrupt(
                            &seg.path,
                            pos as u64,
                            format!("expected decree {next}, found {}", rec.decree),
                        )));
                    }
                    if rec.decree.0 == u64::MAX {
                        // No decree follows it; only a damaged or forged file holds one.
                        return Err(E::from(LogError::corrupt(
                            &seg.path,
                            pos as u64,
                            format!("decree {} is out of range", rec.decree),
                        )));
                    }
                    if rec.decree > applied {
                        replay(rec)?;
                        report.replayed += 1;
                    }
                    report.last_decree = Some(next);
                    next = next.next();
                    pos += used;
                }
                Err(err) => {
                    let last_good = Decree(next.0.saturating_sub(1));
                    if !newest || valid_record_after(&bytes, pos + 1, last_good) {
                        return Err(E::from(LogError::corrupt(
                            &seg.path,
                            pos as u64,
                            err.to_string(),
                        )));
                    }
                    truncate_durably(&seg.path, pos as u64)?;
                    report.torn_tail = Some(TornTail {
                        file: seg.path.clone(),
                        offset: pos as u64,
                        bytes_dropped: (bytes.len() - pos) as u64,
                        reason: err.to_string(),
                    });
                    break;
                }
            }
        }
        expected = Some(next);
    }
    Ok(report)
}

/// True when some byte offset at or after `from` holds a complete, checksummed record with a
/// decree after `last_good`. Such a record proves that the damage is not a torn tail.
/// A segment's bytes, and whether its header is intact and names its first decree.
fn read_segment(seg: &Segment) -> Result<(Vec<u8>, bool), LogError> {
    let bytes = fs::read(&seg.path).map_err(|e| LogError::io("read plog segment", &seg.path, e))?;
    let header_ok = bytes.len() >= SEGMENT_HEADER_LEN
        && &bytes[..8] == SEGMENT_MAGIC
        && bytes[8..16] == seg.first_decree.0.to_le_bytes();
    Ok((bytes, header_ok))
}

fn valid_record_after(bytes: &[u8], from: usize, last_good: Decree) -> bool {
    let end = bytes.len().saturating_sub(RECORD_HEADER_LEN + 8);
    (from..end).any(|pos| {
        // Cheap filter first: the decree field must be plausible before the CRC is computed.
        let decree_at = pos + RECORD_HEADER_LEN;
        let Some(d) = bytes.get(decree_at..decree_at + 8) else {
            return false;
        };
        let mut a = [0u8; 8];
        a.copy_from_slice(d);
        let d = u64::from_le_bytes(a);
        d > last_good.0
            && d - last_good.0 < (1 << 32)
            && PlogRecord::peek_decree(&bytes[pos..]).is_ok()
    })
}

/// Appends to the newest segment, and rolls over to a new one by size.
///
/// Not thread-safe by design: the partition's single writer thread owns it.
pub struct PlogWriter {
    dir: PathBuf,
    segment_bytes: u64,
    /// Shared with the node's commit log, whose background thread fdatasyncs it.
    file: Arc<File>,
    path: PathBuf,
    len: u64,
}

impl PlogWriter {
    /// Opens the plog in `dir` for appending; `next_decree` is the decree of the next record.
    /// Creates the directory and a first segment when there is none.
    pub fn open(
        dir: &Path,
        next_decree: Decree,
        segment_bytes: u64,
    ) -> Result<PlogWriter, LogError> {
        fs::create_dir_all(dir).map_err(|e| LogError::io("create plog directory", dir, e))?;
        let path = match list_segments(dir)?.pop() {
            Some(seg) => seg.path,
            None => create_segment(dir, next_decree)?,
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| LogError::io("open plog segment", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| LogError::io("stat plog segment", &path, e))?
            .len();
        Ok(PlogWriter {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(256),
            file: Arc::new(file),
            path,
            len,
        })
    }

    /// Writes encoded records at the end of the newest segment. On failure (a full disk, say) the
    /// segment is cut back to where it was, so a partial record never stays behind.
    pub fn append(&mut self, buf: &[u8]) -> Result<(), LogError> {
        fail::fail_point!("plog-append", |arg| Err(LogError::io(
            "append to plog segment",
            &self.path,
            crate::error::injected_io_error(arg)
        )));
        if let Err(e) = (&*self.file).write_all(buf) {
            // Best effort: if even this fails, recovery treats the partial record as a torn tail.
            let _ = self.file.set_len(self.len);
            return Err(LogError::io("append to plog segment", &self.path, e));
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Makes everything appended so far durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), LogError> {
        fail::fail_point!("plog-fsync", |arg| Err(LogError::io(
            "fsync plog segment",
            &self.path,
            crate::error::injected_io_error(arg)
        )));
        self.file
            .sync_data()
            .map_err(|e| LogError::io("fsync plog segment", &self.path, e))
    }

    /// Cuts the newest segment back to `len` bytes (from [`PlogWriter::segment_len`]), taking back
    /// appends that were never committed.
    pub fn cut_back(&mut self, len: u64) -> Result<(), LogError> {
        self.file
            .set_len(len)
            .map_err(|e| LogError::io("cut back plog segment", &self.path, e))?;
        self.len = len;
        Ok(())
    }

    /// The newest segment's length in bytes (its header included).
    pub fn segment_len(&self) -> u64 {
        self.len
    }

    /// The newest segment's file, for a commit log that syncs it later.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Starts a new segment when the current one is full, with the decree the next record will
    /// have. The full segment is synced first: recovery trusts every segment but the newest.
    pub fn roll_if_full(&mut self, next_decree: Decree) -> Result<bool, LogError> {
        if self.len < self.segment_bytes {
            return Ok(false);
        }
        self.sync()?;
        let path = create_segment(&self.dir, next_decree)?;
        self.file = Arc::new(
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| LogError::io("open plog segment", &path, e))?,
        );
        self.path = path;
        self.len = SEGMENT_HEADER_LEN as u64;
        Ok(true)
    }

    pub fn current_segment(&self) -> &Path {
        &self.path
    }
}

/// Deletes every segment whose records all have decrees below `below`. The newest segment is
/// always kept. Returns the deleted paths.
pub fn remove_segments_below(dir: &Path, below: Decree) -> Result<Vec<PathBuf>, LogError> {
    let segs = list_segments(dir)?;
    let mut removed = Vec::new();
    for pair in segs.windows(2) {
        // Segment pair[0] holds decrees first..pair[1].first-1.
        if pair[1].first_decree <= below {
            fs::remove_file(&pair[0].path)
                .map_err(|e| LogError::io("delete plog segment", &pair[0].path, e))?;
            removed.push(pair[0].path.clone());
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Name of the file in a plog directory that publishes the committed decree to other processes
/// (the shipper), rewritten after every group commit. It is a hint, not a log: it is never
/// fsynced, because the plog itself is the durable record; after a crash the node rewrites it
/// from recovery before taking writes.
pub const COMMITTED_FILE: &str = "committed";
const COMMITTED_LEN: usize = 20;

/// What the `committed` marker says: every record up to `decree` is durable, and the last one
/// was committed at `commit_time_us` (Unix microseconds, for lag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    pub decree: Decree,
    pub commit_time_us: u64,
}

impl Committed {
    fn encode(&self) -> [u8; COMMITTED_LEN] {
        let mut b = [0u8; COMMITTED_LEN];
        b[..8].copy_from_slice(&self.decree.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.commit_time_us.to_le_bytes());
        let crc = crc32c::crc32c(&b[..16]);
        b[16..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Committed> {
        let b: &[u8; COMMITTED_LEN] = b.get(..COMMITTED_LEN)?.try_into().ok()?;
        let crc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        if crc32c::crc32c(&b[..16]) != crc {
            return None;
        }
        let mut d = [0u8; 8];
        d.copy_from_slice(&b[..8]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[8..16]);
        Some(Committed {
            decree: Decree(u64::from_le_bytes(d)),
            commit_time_us: u64::from_le_bytes(t),
        })
    }

    /// Reads the marker of the plog in `dir`. `Ok(None)` when it does not exist yet. A read that
    /// raced with a rewrite fails its checksum and is retried.
    pub fn read(dir: &Path) -> Result<Option<Committed>, LogError> {
        let path = dir.join(COMMITTED_FILE);
        for _ in 0..100 {
            match fs::read(&path) {
                Ok(bytes) => {
                    if let Some(c) = Committed::decode(&bytes) {
                        return Ok(Some(c));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(LogError::io("read committed marker", &path, e)),
            }
            std::thread::yield_now();
        }
        Err(LogError::corrupt(
            &path,
            0,
            "committed marker keeps failing its checksum".into(),
        ))
    }
}

/// Reads one plog's `committed` marker again and again with one `pread` each, the file kept
/// open: for the loops that look at it every few milliseconds. The file is opened again every
/// second, so a marker that was deleted and made anew (a partition dropped and re-created) is
/// followed.
pub struct CommittedReader {
    path: PathBuf,
    file: Option<(File, std::time::Instant)>,
}

impl CommittedReader {
    pub fn new(dir: &Path) -> CommittedReader {
        CommittedReader {
            path: dir.join(COMMITTED_FILE),
            file: None,
        }
    }

    /// As [`Committed::read`].
    pub fn read(&mut self) -> Result<Option<Committed>, LogError> {
        use std::os::unix::fs::FileExt;
        const REOPEN: std::time::Duration = std::time::Duration::from_secs(1);
        if self
            .file
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= REOPEN)
        {
            self.file = None;
        }
        let file = match &self.file {
            Some((f, _)) => f,
            None => match File::open(&self.path) {
                Ok(f) => &self.file.insert((f, std::time::Instant::now())).0,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(LogError::io("open committed marker", &self.path, e)),
            },
        };
        let mut b = [0u8; COMMITTED_LEN];
        for _ in 0..100 {
            let n = file
                .read_at(&mut b, 0)
                .map_err(|e| LogError::io("read committed marker", &self.path, e))?;
            if let Some(c) = Committed::decode(&b[..n]) {
                return Ok(Some(c));
            }
            std::thread::yield_now();
        }
        Err(LogError::corrupt(
            &self.path,
            0,
            "committed marker keeps failing its checksum".into(),
        ))
    }
}

/// Rewrites the `committed` marker in place (one pwrite; no fsync, see [`COMMITTED_FILE`]).
pub struct CommittedMarker {
    file: File,
    path: PathBuf,
}

impl CommittedMarker {
    pub fn open(dir: &Path) -> Result<CommittedMarker, LogError> {
        let path = dir.join(COMMITTED_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io("open committed marker", &path, e))?;
        Ok(CommittedMarker { file, path })
    }

    pub fn publish(&self, c: Committed) -> Result<(), LogError> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(&c.encode(), 0)
            .map_err(|e| LogError::io("write committed marker", &self.path, e))
    }
}

/// Why a [`PlogReader`] cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The records wanted were garbage-collected: shipping must restart from a checkpoint.
    #[error("start decree {wanted} is no longer available in {}: the oldest segment starts at {oldest}", dir.display())]
    Gone {
        dir: PathBuf,
        wanted: Decree,
        oldest: Decree,
    },
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Reads a plog from a given decree onward, following new segments, from any process. It never
/// returns a record past the `upto` bound its caller passes (the committed decree), so it never
/// ships a write that a crash could still take back.
pub struct PlogReader {
    dir: PathBuf,
    next: Decree,
    seg: Option<OpenSegment>,
}

struct OpenSegment {
    first: Decree,
    path: PathBuf,
    file: File,
    /// File offset just after the last record returned (or skipped).
    pos: u64,
}

impl PlogReader {
    /// A reader whose first record will be `from`.
    pub fn new(dir: &Path, from: Decree) -> PlogReader {
        PlogReader {
            dir: dir.to_path_buf(),
            next: from,
            seg: None,
        }
    }

    /// The decree of the next record this reader returns.
    pub fn next_decree(&self) -> Decree {
        self.next
    }

    /// Reads the records from `next_decree()` up to `upto` (inclusive), stopping after about
    /// `max_bytes` of encoded records. Returns fewer (or none) when the rest is not written yet.
    pub fn read(&mut self, upto: Decree, max_bytes: usize) -> Result<Vec<PlogRecord>, ReadError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while self.next <= upto && bytes < max_bytes {
            if self.seg.is_none() {
                self.seg = Some(self.locate()?);
            }
            let Some(seg) = self.seg.as_mut() else { break };
            // No bigger than what the segment holds past `pos`: a zeroed buffer of the full
            // allowance for a few new records cost more than reading them.
            let avail = seg
                .file
                .metadata()
                .map_err(|e| LogError::io("stat plog segment", &seg.path, e))?
                .len()
                .saturating_sub(seg.pos);
            let want = max_bytes
                .saturating_sub(bytes)
                .clamp(64 << 10, 8 << 20)
                .min(usize::try_from(avail).unwrap_or(usize::MAX));
            let mut buf = vec![0u8; want];
            let n = read_at(&seg.file, &mut buf, seg.pos)
                .map_err(|e| LogError::io("read plog segment", &seg.path, e))?;
            buf.truncate(n);
            let mut used = 0;
            let mut progressed = false;
            while used < buf.len() && self.next <= upto {
                match PlogRecord::decode(&buf[used..]) {
                    Ok((rec, len)) => {
                        if rec.decree != self.next {
                            if rec.decree < self.next && rec.decree >= seg.first {
                                used += len; // before the start point: skip
                                continue;
                            }
                            return Err(LogError::corrupt(
                                &seg.path,
                                seg.pos + used as u64,
                                format!("expected decree {}, found {}", self.next, rec.decree),
                            )
                            .into());
                        }
                        used += len;
                        bytes += len;
                        self.next = self.next.next();
                        out.push(rec);
                        progressed = true;
                        if bytes >= max_bytes {
                            break;
                        }
                    }
                    Err(ferry_proto::DecodeError::Incomplete { .. }) if n < want || used > 0 => {
                        break
                    }
                    Err(ferry_proto::DecodeError::Incomplete { .. }) => {
                        // A record larger than the read buffer: read exactly its length.
                        let mut big = vec![0u8; max_record_len(&buf)];
                        let m = read_at(&seg.file, &mut big, seg.pos)
                            .map_err(|e| LogError::io("read plog segment", &seg.path, e))?;
                        if m < big.len() {
                            break;
                        }
                        buf = big;
                    }
                    Err(e) => {
                        // Committed records are never damaged in a healthy plog.
                        return Err(LogError::corrupt(
                            &seg.path,
                            seg.pos + used as u64,
                            e.to_string(),
                        )
                        .into());
                    }
                }
            }
            seg.pos += used as u64;
            let current_first = seg.first;
            if !progressed && self.next <= upto {
                // Nothing more in this segment although `upto` says there is: it continues in
                // the next one, if that exists yet. (The segment starting at `next` may be this
                // very one, still empty: then there is nothing to read yet, found by the fuzzer.)
                let segs = list_segments(&self.dir)?;
                match segs.iter().find(|s| s.first_decree == self.next) {
                    Some(s) if s.first_decree != current_first => self.seg = None,
                    _ => break,
                }
            }
        }
        Ok(out)
    }

    /// Opens the segment holding `next`, skipping to it.
    fn locate(&self) -> Result<OpenSegment, ReadError> {
        let segs = list_segments(&self.dir)?;
        let Some(seg) = segs.iter().rev().find(|s| s.first_decree <= self.next) else {
            let oldest = segs.first().map_or(Decree(0), |s| s.first_decree);
            return Err(ReadError::Gone {
                dir: self.dir.clone(),
                wanted: self.next,
                oldest,
            });
        };
        let file = File::open(&seg.path).map_err(|e| match e.kind() {
            // GC removed it between the listing and the open.
            io::ErrorKind::NotFound => ReadError::Gone {
                dir: self.dir.clone(),
                wanted: self.next,
                oldest: seg.first_decree.next(),
            },
            _ => LogError::io("open plog segment", &seg.path, e).into(),
        })?;
        Ok(OpenSegment {
            first: seg.first_decree,
            path: seg.path.clone(),
            file,
            pos: SEGMENT_HEADER_LEN as u64,
        })
    }
}

fn read_at(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], pos + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Encoded length of the record whose header starts `buf` (bounded by the record size limit).
fn max_record_len(buf: &[u8]) -> usize {
    let len = buf
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    RECORD_HEADER_LEN + len.min(ferry_proto::record::MAX_RECORD_BODY)
}

/// Creates a segment atomically: header written and synced under a temporary name, then renamed.
fn create_segment(dir: &Path, first: Decree) -> Result<PathBuf, LogError> {
    let path = dir.join(format!("{:020}{SEGMENT_SUFFIX}", first.0));
    let tmp = dir.join(format!("{:020}.tmp", first.0));
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..].copy_from_slice(&first.0.to_le_bytes());
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&header)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| LogError::io("create plog segment", &path, e))?;
    sync_dir(dir)?;
    Ok(path)
}

fn truncate_durably(path: &Path, len: u64) -> Result<(), LogError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| LogError::io("open plog segment", path, e))?;
    f.set_len(len)
        .map_err(|e| LogError::io("truncate torn plog tail", path, e))?;
    f.sync_all()
        .map_err(|e| LogError::io("fsync plog segment", path, e))
}

fn remove_file_durably(path: &Path) -> Result<(), LogError> {
    fs::remove_file(path).map_err(|e| LogError::io("delete plog segment", path, e))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Op, Timetag};

    use super::*;

    fn rec(d: u64) -> PlogRecord {
        PlogRecord {
            decree: Decree(d),
            timetag: Timetag(d << 8 | 2),
            ops: vec![Op::Put {
                key: format!("k{d}").into_bytes(),
                value: vec![7; 30],
                expire_at_ms: 0,
            }],
        }
    }

    fn write_records(dir: &Path, decrees: std::ops::RangeInclusive<u64>, seg_bytes: u64) {
        let mut w =
            PlogWriter::open(dir, Decree(*decrees.start()), seg_bytes).expect("open writer");
        for d in decrees {
            let mut buf = Vec::new();
            rec(d).encode(&mut buf);
            w.append(&buf).expect("append");
            w.sync().expect("sync");
            w.roll_if_full(Decree(d + 1)).expect("roll");
        }
    }

    fn recover_all(dir: &Path) -> Result<(Vec<u64>, RecoveryReport), LogError> {
        let mut seen = Vec::new();
        let report = recover(dir, Decree(0), |r| {
            seen.push(r.decree.0);
            Ok(())
        })?;
        Ok((seen, report))
    }

    #[test]
    fn round_trip_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=100, 512);
        let segs = list_segments(dir.path()).expect("list");
        assert!(segs.len() > 5, "segments roll over by size: {}", segs.len());
        let (seen, report) = recover_all(dir.path()).expect("recover");
        assert_eq!(seen, (1..=100).collect::<Vec<_>>());
        assert_eq!(report.last_decree, Some(Decree(100)));
        assert_eq!(report.torn_tail, None);
    }

    #[test]
    fn the_newest_segment_alone_gives_the_last_decree_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=100, 512);
        let segs = list_segments(dir.path()).expect("list");
        assert!(segs.len() > 5);
        // The last write rolled over: the newest segment may hold no record yet.
        let r = recover_newest(dir.path()).expect("recover newest");
        assert_eq!(r.last_decree, Some(Decree(100)));
        assert_eq!(r.torn_tail, None);
        // A torn record at the end of the newest segment is cut, as full recovery would.
        let newest = segs.last().expect("segments");
        let mut buf = Vec::new();
        rec(101).encode(&mut buf);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&newest.path)
            .expect("open");
        f.write_all(&buf[..buf.len() / 2]).expect("write half");
        let r = recover_newest(dir.path()).expect("recover newest");
        assert_eq!(r.last_decree, Some(Decree(100)));
        assert!(r.torn_tail.is_some());
        let (seen, full) = recover_all(dir.path()).expect("full recovery agrees");
        assert_eq!(
            (seen.len(), full.last_decree, full.torn_tail),
            (100, Some(Decree(100)), None)
        );
        // One segment only: the same as full recovery.
        let one = tempfile::tempdir().expect("tempdir");
        write_records(one.path(), 5..=9, 1 << 20);
        assert_eq!(
            recover_newest(one.path()).expect("recover").last_decree,
            Some(Decree(9))
        );
    }

    #[test]
    fn replays_only_after_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=20, 1 << 20);
        let mut seen = Vec::new();
        recover(dir.path(), Decree(15), |r| {
            seen.push(r.decree.0);
            Ok::<(), LogError>(())
        })
        .expect("recover");
        assert_eq!(seen, vec![16, 17, 18, 19, 20]);
    }

    #[test]
    fn torn_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=10, 1 << 20);
        let seg = list_segments(dir.path())
            .expect("list")
            .pop()
            .expect("one segment");
        let full = fs::metadata(&seg.path).expect("stat").len();
        // A half-written 11th record: its fsync never returned.
        let mut buf = Vec::new();
        rec(11).encode(&mut buf);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .expect("open");
        f.write_all(&buf[..buf.len() / 2]).expect("write");
        drop(f);

        let (seen, report) = recover_all(dir.path()).expect("torn tail is not an error");
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        let torn = report.torn_tail.expect("torn tail reported");
        assert_eq!(torn.offset, full);
        assert_eq!(torn.bytes_dropped, (buf.len() / 2) as u64);
        assert_eq!(
            fs::metadata(&seg.path).expect("stat").len(),
            full,
            "tail truncated on disk"
        );
        // And the plog is appendable again at decree 11.
        write_records(dir.path(), 11..=12, 1 << 20);
        let (seen, _) = recover_all(dir.path()).expect("recover again");
        assert_eq!(seen, (1..=12).collect::<Vec<_>>());
    }

    #[test]
    fn zeroed_tail_is_torn() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=3, 1 << 20);
        let seg = list_segments(dir.path())
            .expect("list")
            .pop()
            .expect("segment");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&seg.path)
            .expect("open");
        f.write_all(&[0; 4096]).expect("write zeros");
        drop(f);
        let (seen, report) = recover_all(dir.path()).expect("recover");
        assert_eq!(seen, vec![1, 2, 3]);
        assert_eq!(report.torn_tail.map(|t| t.bytes_dropped), Some(4096));
    }

    #[test]
    fn an_unsynced_tail_is_cut_only_where_the_commit_log_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=10, 1 << 20);
        let seg = list_segments(dir.path())
            .expect("list")
            .pop()
            .expect("segment");
        let mut bytes = fs::read(&seg.path).expect("read");
        // Decree 6 is damaged; 7..=10 are intact after it.
        let at6 = SEGMENT_HEADER_LEN + (0..5).map(|d| rec(d + 1).encoded_len()).sum::<usize>();
        bytes[at6 + RECORD_HEADER_LEN + 2] ^= 0xff;
        fs::write(&seg.path, &bytes).expect("write");

        // The commit log holds 8 on only: decree 6 was synced, so this is corruption.
        let err = cut_unsynced_tail(dir.path(), Decree(8)).expect_err("corrupt");
        assert!(matches!(err, LogError::CorruptPlog { offset, .. } if offset == at6 as u64));
        // It holds 5 on: everything from 6 is cut, whatever follows.
        assert_eq!(
            cut_unsynced_tail(dir.path(), Decree(5)).expect("cut"),
            Some(Decree(5))
        );
        let (seen, _) = recover_all(dir.path()).expect("recover");
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn corruption_in_the_middle_names_file_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=10, 1 << 20);
        let seg = list_segments(dir.path())
            .expect("list")
            .pop()
            .expect("segment");
        let mut bytes = fs::read(&seg.path).expect("read");
        let rec_len = rec(1).encoded_len();
        // Flip a byte inside the body of the 4th record.
        let offset = SEGMENT_HEADER_LEN + 3 * rec_len;
        bytes[offset + RECORD_HEADER_LEN + 12] ^= 0x40;
        fs::write(&seg.path, &bytes).expect("write");

        let err = recover_all(dir.path()).expect_err("mid-log corruption must be an error");
        let msg = err.to_string();
        assert!(msg.contains(&seg.path.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("byte {offset}")), "{msg}");
        assert!(matches!(err, LogError::CorruptPlog { offset: o, .. } if o == offset as u64));
        // Nothing was truncated: the evidence stays for the operator.
        assert_eq!(fs::read(&seg.path).expect("read").len(), bytes.len());
    }

    #[test]
    fn corruption_in_an_older_segment_is_an_error_even_at_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=40, 512);
        let first = list_segments(dir.path()).expect("list").remove(0);
        let len = fs::metadata(&first.path).expect("stat").len();
        let f = OpenOptions::new()
            .write(true)
            .open(&first.path)
            .expect("open");
        f.set_len(len - 3).expect("truncate");
        let err = recover_all(dir.path()).expect_err("older segment damage is corruption");
        assert!(matches!(err, LogError::CorruptPlog { .. }), "{err}");
    }

    #[test]
    fn gc_removes_whole_segments_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=100, 512);
        let before = list_segments(dir.path()).expect("list");
        let removed = remove_segments_below(dir.path(), Decree(50)).expect("gc");
        assert!(!removed.is_empty());
        let after = list_segments(dir.path()).expect("list");
        assert!(
            after[0].first_decree <= Decree(50),
            "decree 50 is still readable"
        );
        assert_eq!(before.len(), after.len() + removed.len());
        let mut seen = Vec::new();
        recover(dir.path(), Decree(0), |r| {
            seen.push(r.decree.0);
            Ok::<(), LogError>(())
        })
        .expect("recover after gc");
        assert_eq!(seen.first(), Some(&after[0].first_decree.0));
        assert_eq!(seen.last(), Some(&100));
        // The newest segment is never removed.
        remove_segments_below(dir.path(), Decree(1_000)).expect("gc all");
        assert_eq!(list_segments(dir.path()).expect("list").len(), 1);
    }

    #[test]
    fn reader_follows_segments_and_respects_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=100, 600);
        let mut r = PlogReader::new(dir.path(), Decree(5));
        let first = r.read(Decree(50), 1 << 20).expect("read");
        assert_eq!(first.first().map(|x| x.decree), Some(Decree(5)));
        assert_eq!(
            first.last().map(|x| x.decree),
            Some(Decree(50)),
            "stops at the bound"
        );
        let mut rest = Vec::new();
        for _ in 0..100 {
            let got = r.read(Decree(100), 300).expect("read");
            if got.is_empty() {
                break;
            }
            rest.extend(got);
        }
        assert_eq!(
            rest.iter().map(|x| x.decree.0).collect::<Vec<_>>(),
            (51..=100).collect::<Vec<_>>()
        );
        assert!(
            r.read(Decree(200), 1 << 20).expect("read").is_empty(),
            "nothing past the end"
        );
        write_records(dir.path(), 101..=103, 600);
        let tail = r.read(Decree(103), 1 << 20).expect("read");
        assert_eq!(
            tail.iter().map(|x| x.decree.0).collect::<Vec<_>>(),
            vec![101, 102, 103]
        );
    }

    /// Found by fuzzing: a reader at the first decree of a segment that holds no record yet,
    /// with `upto` past it, used to look the same segment up again forever.
    #[test]
    fn reader_on_an_empty_newest_segment_returns_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("{:020}.plog", 1));
        let mut header = SEGMENT_MAGIC.to_vec();
        header.extend_from_slice(&1u64.to_le_bytes());
        std::fs::write(&path, &header).expect("write");
        let mut r = PlogReader::new(dir.path(), Decree(1));
        assert!(r.read(Decree(u64::MAX), 1 << 20).expect("read").is_empty());
        assert_eq!(r.next_decree(), Decree(1));
    }

    /// Found by fuzzing: a record with decree u64::MAX (no decree can follow it) is corruption,
    /// not an overflow.
    #[test]
    fn a_record_at_the_last_decree_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = [
            0x46, 0x52, 0x59, 0x50, 0x4c, 0x4f, 0x47, 0x31, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0x14, 0x00, 0x00, 0x00, 0xea, 0x9a, 0x70, 0x42, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00,
        ];
        std::fs::write(dir.path().join(format!("{:020}.plog", u64::MAX)), bytes).expect("write");
        let err = recover(dir.path(), Decree(0), |_| Ok::<(), LogError>(())).expect_err("corrupt");
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn reader_reports_gc_as_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_records(dir.path(), 1..=100, 600);
        remove_segments_below(dir.path(), Decree(60)).expect("gc");
        let mut r = PlogReader::new(dir.path(), Decree(3));
        match r.read(Decree(100), 1 << 20) {
            Err(ReadError::Gone { wanted, oldest, .. }) => {
                assert_eq!(wanted, Decree(3));
                assert!(oldest > Decree(3) && oldest <= Decree(60));
            }
            other => panic!("expected Gone, got {other:?}"),
        }
    }

    #[test]
    fn committed_marker_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Committed::read(dir.path()).expect("read"), None);
        let m = CommittedMarker::open(dir.path()).expect("open");
        let c = Committed {
            decree: Decree(42),
            commit_time_us: 7,
        };
        m.publish(c).expect("publish");
        assert_eq!(Committed::read(dir.path()).expect("read"), Some(c));
        fs::write(dir.path().join(COMMITTED_FILE), [1u8; COMMITTED_LEN]).expect("garble");
        assert!(Committed::read(dir.path()).is_err());
        let mut r = CommittedReader::new(dir.path());
        assert!(
            r.read().is_err(),
            "the kept-open reader sees the garbled marker too"
        );
        m.publish(c).expect("publish");
        assert_eq!(r.read().expect("read"), Some(c));
        let later = Committed {
            decree: Decree(8),
            commit_time_us: 9,
        };
        m.publish(later).expect("publish");
        assert_eq!(r.read().expect("read"), Some(later), "rewrites are seen");
        assert_eq!(
            CommittedReader::new(&dir.path().join("none"))
                .read()
                .expect("read"),
            None
        );
    }
}
