//! The inbox: where a target node receives duplicated writes.
//!
//! The receiver process writes, and the node process applies. Per target partition, each source
//! partition has its own log, `<partition dir>/inbox/<cluster_id>-<source_partition>/`, in the plog
//! format ([`crate::plog`]), so one shipping session never waits on another. Decrees are the source
//! decrees and stay contiguous: when a source record has no op for this target partition (the
//! tables have different partition counts), the receiver writes the record with no ops. So each
//! target partition's progress reaches the source's decree, and failover can prove catch-up per
//! partition.
//!
//! The receiver acknowledges a batch only after [`InboxWriter::append`] returned (fsync done). The
//! node applies with `Partition::apply_duplicated` (in `ferry-engine`), which is exactly-once, so re-reading an
//! inbox from its start after a crash is harmless.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_proto::{ClusterId, Decree, PartitionId, PlogRecord, Source};

use crate::clock;
use crate::error::LogError;
pub use crate::layout::inbox_dir;
use crate::layout::INBOX_DIR;
use crate::plog::{self, Committed, CommittedMarker, PlogWriter};

/// Lists the sources that have an inbox log in this partition directory.
pub fn sources(partition_dir: &Path) -> Result<Vec<Source>, LogError> {
    let dir = partition_dir.join(INBOX_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::io("list inbox", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("list inbox", &dir, e))?;
        let name = entry.file_name();
        let Some((c, p)) = name.to_str().and_then(|n| n.split_once('-')) else {
            continue;
        };
        let (Some(cluster), Ok(partition)) =
            (c.parse().ok().and_then(ClusterId::new), p.parse::<u32>())
        else {
            continue;
        };
        out.push(Source {
            cluster,
            partition: PartitionId(partition),
        });
    }
    out.sort_by_key(|s| (s.cluster, s.partition));
    Ok(out)
}

/// Makes the inbox of `source` in `partition_dir` start after `decree`: what a target partition
/// installed from a checkpoint at `decree` does, so that shipping resumes right after it and a
/// batch that would leave a gap is refused. What the inbox held before is deleted. Durable when
/// it returns.
pub fn start_after(
    partition_dir: &Path,
    source: Source,
    decree: Decree,
    segment_bytes: u64,
) -> Result<(), LogError> {
    let dir = inbox_dir(partition_dir, source);
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LogError::io("clear inbox", &dir, e)),
    }
    // An empty first segment named after the next decree: `InboxWriter::open` reads `decree`
    // as the last one held.
    drop(PlogWriter::open(&dir, decree.next(), segment_bytes)?);
    CommittedMarker::open(&dir)?.publish(Committed {
        decree,
        commit_time_us: clock::wall_us(),
    })?;
    if let Some(parent) = dir.parent() {
        plog::sync_dir(parent)?;
    }
    Ok(())
}

/// The receiver's end of one source's inbox log.
pub struct InboxWriter {
    dir: PathBuf,
    plog: Option<PlogWriter>,
    marker: CommittedMarker,
    /// The last decree durable in this inbox (0 if none yet).
    last: Decree,
    segment_bytes: u64,
}

impl InboxWriter {
    /// Opens (or creates) the inbox for `source` in `partition_dir`. It recovers the log: a torn
    /// tail left by a crashed receiver is cut, and `last_decree()` tells where shipping resumes.
    pub fn open(
        partition_dir: &Path,
        source: Source,
        segment_bytes: u64,
    ) -> Result<InboxWriter, LogError> {
        let dir = inbox_dir(partition_dir, source);
        fs::create_dir_all(&dir).map_err(|e| LogError::io("create inbox", &dir, e))?;
        let report = plog::recover_newest(&dir)?;
        if let Some(torn) = &report.torn_tail {
            tracing::warn!(inbox = %dir.display(), offset = torn.offset, bytes = torn.bytes_dropped,
                "cut torn inbox tail (never acknowledged to the shipper)");
        }
        let marker = CommittedMarker::open(&dir)?;
        // No segment yet: the first append creates one named after its first decree.
        let last = match report.last_decree {
            Some(d) => d,
            None => plog::list_segments(&dir)?
                .last()
                .map_or(Decree(0), |s| Decree(s.first_decree.0.saturating_sub(1))),
        };
        let plog = match plog::list_segments(&dir)?.is_empty() {
            true => None,
            false => Some(PlogWriter::open(&dir, last.next(), segment_bytes)?),
        };
        marker.publish(Committed {
            decree: last,
            commit_time_us: clock::wall_us(),
        })?;
        Ok(InboxWriter {
            dir,
            plog,
            marker,
            last,
            segment_bytes,
        })
    }

    /// The last decree durable in this inbox; the shipper resumes after it.
    pub fn last_decree(&self) -> Decree {
        self.last
    }

    /// Appends records (contiguous decrees, continuing after `last_decree()`, except for the
    /// first append to an empty inbox), fsyncs, and publishes the new last decree. Records at or
    /// below `last_decree()` are dropped: a resent batch is harmless.
    pub fn append(&mut self, records: &[PlogRecord]) -> Result<Decree, LogError> {
        fail::fail_point!("inbox-append", |arg| {
            // `return(D)` fails only a batch that holds decree D with its ops (a poison batch:
            // FAIL_SKIP's stripped resend then passes); a bare `return` fails every append.
            let poisoned = match arg.as_deref().map(str::parse::<u64>) {
                Some(Ok(d)) => records.iter().any(|r| r.decree.0 == d && !r.ops.is_empty()),
                _ => true,
            };
            if poisoned {
                Err(LogError::io(
                    "append to inbox",
                    &self.dir,
                    crate::error::injected_io_error(None),
                ))
            } else {
                self.append_durably(records)
            }
        });
        self.append_durably(records)
    }

    fn append_durably(&mut self, records: &[PlogRecord]) -> Result<Decree, LogError> {
        let fresh: Vec<&PlogRecord> = records.iter().filter(|r| r.decree > self.last).collect();
        let Some(first) = fresh.first() else {
            return Ok(self.last);
        };
        let mut expect = if self.plog.is_none() {
            first.decree
        } else {
            self.last.next()
        };
        let mut buf = Vec::new();
        for r in &fresh {
            if r.decree != expect {
                return Err(LogError::Inconsistent {
                    dir: self.dir.clone(),
                    reason: format!(
                        "inbox expects decree {expect} next, the batch has {}",
                        r.decree
                    ),
                });
            }
            r.encode(&mut buf);
            expect = expect.next();
        }
        let plog = match &mut self.plog {
            Some(p) => p,
            None => self.plog.insert(PlogWriter::open(
                &self.dir,
                first.decree,
                self.segment_bytes,
            )?),
        };
        plog.append(&buf)?;
        plog.sync()?;
        self.last = Decree(expect.0 - 1);
        plog.roll_if_full(self.last.next())?;
        self.marker.publish(Committed {
            decree: self.last,
            commit_time_us: clock::wall_us(),
        })?;
        Ok(self.last)
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Op, Timetag};

    use super::*;

    fn record(cluster: ClusterId, decree: u64) -> PlogRecord {
        PlogRecord {
            decree: Decree(decree),
            timetag: Timetag::new(decree, cluster, false),
            ops: vec![Op::Put {
                key: format!("k{decree}").into_bytes(),
                value: b"v".to_vec(),
                expire_at_ms: 0,
            }],
        }
    }

    #[test]
    fn an_inbox_started_after_a_checkpoint_resumes_there_and_refuses_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = ClusterId::new(1).expect("valid");
        let source = Source {
            cluster,
            partition: PartitionId(3),
        };
        // Whatever was there before is replaced.
        let mut w = InboxWriter::open(dir.path(), source, 1 << 20).expect("open");
        w.append(&[record(cluster, 1), record(cluster, 2)])
            .expect("append");
        drop(w);
        start_after(dir.path(), source, Decree(40), 1 << 20).expect("start after 40");

        let mut w = InboxWriter::open(dir.path(), source, 1 << 20).expect("reopen");
        assert_eq!(w.last_decree(), Decree(40));
        let err = w
            .append(&[record(cluster, 42)])
            .expect_err("a gap after 40");
        assert!(err.to_string().contains("expects decree 41"), "{err}");
        assert_eq!(w.append(&[record(cluster, 41)]).expect("41"), Decree(41));
        let committed = plog::Committed::read(&inbox_dir(dir.path(), source))
            .expect("read marker")
            .expect("a marker");
        assert_eq!(committed.decree, Decree(41));
    }
}
