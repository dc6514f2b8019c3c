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
//! node applies with [`Partition::apply_duplicated`], which is exactly-once, so re-reading an
//! inbox from its start after a crash is harmless.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_proto::{ClusterId, Decree, PartitionId, PlogRecord};

use crate::clock;
use crate::engine::Source;
use crate::error::StoreError;
use crate::partition::{ApplyReport, Partition};
use crate::plog::{
    self, Committed, CommittedMarker, CommittedReader, PlogReader, PlogWriter, ReadError,
};

const INBOX_DIR: &str = "inbox";

/// The directory of one source's inbox log inside a partition directory.
pub fn inbox_dir(partition_dir: &Path, source: Source) -> PathBuf {
    partition_dir
        .join(INBOX_DIR)
        .join(format!("{}-{}", source.cluster.get(), source.partition.0))
}

/// Lists the sources that have an inbox log in this partition directory.
pub fn sources(partition_dir: &Path) -> Result<Vec<Source>, StoreError> {
    let dir = partition_dir.join(INBOX_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list inbox", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list inbox", &dir, e))?;
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
    ) -> Result<InboxWriter, StoreError> {
        let dir = inbox_dir(partition_dir, source);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create inbox", &dir, e))?;
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
    pub fn append(&mut self, records: &[PlogRecord]) -> Result<Decree, StoreError> {
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
                return Err(StoreError::Inconsistent {
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

/// The node's end of one source's inbox log: reads what the receiver made durable and applies
/// it to the partition.
pub struct InboxApplier {
    source: Source,
    dir: PathBuf,
    marker: CommittedReader,
    reader: Option<PlogReader>,
}

impl InboxApplier {
    pub fn new(partition_dir: &Path, source: Source) -> InboxApplier {
        let dir = inbox_dir(partition_dir, source);
        InboxApplier {
            source,
            marker: CommittedReader::new(&dir),
            dir,
            reader: None,
        }
    }

    /// Applies everything durable in the inbox that the partition has not applied yet, in chunks
    /// of about `max_bytes`. Returns the total applied by this call.
    pub async fn apply_available(
        &mut self,
        partition: &Partition,
        max_bytes: usize,
    ) -> Result<ApplyReport, StoreError> {
        let mut total = ApplyReport::default();
        let Some(committed) = self.marker.read()? else {
            return Ok(total);
        };
        if self.reader.is_none() {
            let progress = partition.dup_progress(self.source)?;
            let oldest = plog::list_segments(&self.dir)?
                .first()
                .map(|s| s.first_decree);
            let Some(oldest) = oldest else {
                return Ok(total);
            };
            self.reader = Some(PlogReader::new(&self.dir, progress.next().max(oldest)));
        }
        let Some(reader) = self.reader.as_mut() else {
            return Ok(total);
        };
        for _ in 0..1024 {
            let records = match reader.read(committed.decree, max_bytes) {
                Ok(r) => r,
                Err(ReadError::Store(e)) => return Err(e),
                Err(ReadError::Gone { .. }) => {
                    // GC moved past us (we were already applied there): start over from progress.
                    self.reader = None;
                    return Ok(total);
                }
            };
            if records.is_empty() {
                break;
            }
            let r = partition.apply_duplicated(self.source, records).await?;
            total.applied_records += r.applied_records;
            total.skipped_records += r.skipped_records;
            total.stale_ops += r.stale_ops;
            total.progress = r.progress;
        }
        Ok(total)
    }

    pub fn source(&self) -> Source {
        self.source
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{Op, Timetag};

    use super::*;
    use crate::partition::PartitionOptions;

    fn src() -> Source {
        Source {
            cluster: ClusterId::new(2).expect("valid"),
            partition: PartitionId(7),
        }
    }

    fn rec(d: u64, key: Option<&str>) -> PlogRecord {
        let ops = key
            .map(|k| {
                vec![Op::Put {
                    key: k.into(),
                    value: format!("v{d}").into(),
                    expire_at_ms: 0,
                }]
            })
            .unwrap_or_default();
        PlogRecord {
            decree: Decree(d),
            timetag: Timetag::new(d, ClusterId::new(2).expect("valid"), false),
            ops,
        }
    }

    /// Partition 0 of a cluster-1 table in `dir`.
    fn partition(dir: &Path) -> Partition {
        Partition::open(
            dir,
            PartitionId(0),
            PartitionOptions::new(ClusterId::new(1).expect("valid")),
        )
        .expect("open")
        .0
    }

    #[tokio::test]
    async fn receiver_writes_node_applies_exactly_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = partition(dir.path());
        let mut w = InboxWriter::open(dir.path(), src(), 1 << 20).expect("open inbox");
        assert_eq!(w.last_decree(), Decree(0));
        // Shipping starts mid-stream (the dup began at source decree 100).
        let batch: Vec<PlogRecord> = (101..=110)
            .map(|d| rec(d, if d % 3 == 0 { None } else { Some("k") }))
            .collect();
        assert_eq!(w.append(&batch).expect("append"), Decree(110));
        assert_eq!(w.append(&batch).expect("resend is dropped"), Decree(110));
        assert!(
            w.append(&[rec(112, Some("gap"))]).is_err(),
            "a gap is refused"
        );
        assert_eq!(sources(dir.path()).expect("sources"), vec![src()]);

        let mut a = InboxApplier::new(dir.path(), src());
        let r = a.apply_available(&p, 1 << 20).await.expect("apply");
        assert_eq!((r.applied_records, r.progress), (10, Decree(110)));
        assert_eq!(
            p.get(b"k").expect("get").map(|l| l.value),
            Some(b"v110".to_vec())
        );
        let again = a.apply_available(&p, 1 << 20).await.expect("apply again");
        assert_eq!(again.applied_records, 0);

        // A restarted receiver resumes after the last durable decree.
        drop(w);
        let mut w = InboxWriter::open(dir.path(), src(), 1 << 20).expect("reopen inbox");
        assert_eq!(w.last_decree(), Decree(110));
        w.append(&[rec(111, Some("k"))]).expect("append");
        // A restarted applier starts from the partition's stored progress.
        let mut a = InboxApplier::new(dir.path(), src());
        let r = a.apply_available(&p, 1 << 20).await.expect("apply");
        assert_eq!(
            (r.applied_records, r.skipped_records, r.progress),
            (1, 0, Decree(111))
        );
    }

    /// Applied inbox segments are collected, never the newest one nor one holding an
    /// unapplied record, and the inbox goes on working after a collection and a reopen.
    #[tokio::test]
    async fn applied_inbox_segments_are_collected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = partition(dir.path());
        let big = |d: u64| PlogRecord {
            ops: vec![Op::Put {
                key: format!("k{d}").into(),
                value: vec![b'x'; 8 << 10],
                expire_at_ms: 0,
            }],
            ..rec(d, None)
        };
        // 64 KiB segments, 8 KiB records: about 8 records per segment.
        let mut w = InboxWriter::open(dir.path(), src(), 64 << 10).expect("open inbox");
        let all: Vec<PlogRecord> = (1..=40).map(big).collect();
        for chunk in all.chunks(4) {
            w.append(chunk).expect("append");
        }
        let idir = inbox_dir(dir.path(), src());
        let before = plog::list_segments(&idir).expect("list");
        assert!(before.len() >= 4, "{} segments", before.len());
        assert!(
            p.gc_inboxes().await.expect("gc").is_empty(),
            "nothing applied, nothing collected"
        );

        // Apply the first 20 records only.
        let r = p
            .apply_duplicated(src(), all[..20].to_vec())
            .await
            .expect("apply");
        assert_eq!(r.progress, Decree(20));
        let removed = p.gc_inboxes().await.expect("gc");
        let after = plog::list_segments(&idir).expect("list");
        assert!(!removed.is_empty());
        assert_eq!(after.len() + removed.len(), before.len());
        assert!(
            after[0].first_decree <= Decree(21),
            "the segment holding decree 21 stays: {:?}",
            after[0].first_decree
        );

        // Everything applied: only the newest segment is left, and the data is there.
        let mut a = InboxApplier::new(dir.path(), src());
        a.apply_available(&p, 1 << 20).await.expect("apply");
        p.gc_inboxes().await.expect("gc");
        let left = plog::list_segments(&idir).expect("list");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].path, before.last().expect("segments").path);
        assert!(p.get(b"k1").expect("get").is_some());
        assert!(p.get(b"k40").expect("get").is_some());

        // A restarted receiver still resumes after decree 40 and appends.
        drop(w);
        let mut w = InboxWriter::open(dir.path(), src(), 64 << 10).expect("reopen inbox");
        assert_eq!(w.last_decree(), Decree(40));
        assert_eq!(w.append(&[big(41)]).expect("append"), Decree(41));
        let r = a.apply_available(&p, 1 << 20).await.expect("apply");
        assert_eq!(r.progress, Decree(41));
    }
}
