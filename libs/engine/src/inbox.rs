//! The node's end of an inbox ([`ferry_log::inbox`]): reads what the receiver made durable and
//! applies it to the partition with [`Partition::apply_duplicated`], which is exactly-once, so
//! re-reading an inbox from its start after a crash is harmless.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_log::inbox::inbox_dir;
use ferry_log::plog::{self, CommittedReader, PlogReader, ReadError};
use ferry_proto::{Decree, PlogRecord, Source};

use crate::error::StoreError;
use crate::partition::{ApplyReport, Partition};

/// The node's end of one source's inbox log: reads what the receiver made durable and applies
/// it to the partition.
pub struct InboxApplier {
    source: Source,
    state: ReadState,
    /// What the partition has applied from this inbox, once known: while the committed marker
    /// shows nothing past it, an apply is a single marker read.
    applied: Option<Decree>,
}

/// The reading side of an applier, moved to a blocking thread for each read.
struct ReadState {
    dir: PathBuf,
    marker: CommittedReader,
    reader: Option<PlogReader>,
}

impl ReadState {
    /// An empty state, only ever held while the real one is on a blocking thread.
    fn placeholder() -> ReadState {
        ReadState {
            dir: PathBuf::new(),
            marker: CommittedReader::new(Path::new("")),
            reader: None,
        }
    }

    /// The next durable records the partition has not applied, about `max_bytes` of them;
    /// empty when there are none. Blocking: file reads, and RocksDB for the progress.
    fn next_chunk(
        &mut self,
        partition: &Partition,
        source: Source,
        max_bytes: usize,
    ) -> Result<Vec<PlogRecord>, StoreError> {
        let Some(committed) = self.marker.read()? else {
            return Ok(Vec::new());
        };
        if self.reader.is_none() {
            let progress = partition.dup_progress(source)?;
            let oldest = plog::list_segments(&self.dir)?
                .first()
                .map(|s| s.first_decree);
            let Some(oldest) = oldest else {
                return Ok(Vec::new());
            };
            self.reader = Some(PlogReader::new(&self.dir, progress.next().max(oldest)));
        }
        let Some(reader) = self.reader.as_mut() else {
            return Ok(Vec::new());
        };
        match reader.read(committed.decree, max_bytes) {
            Ok(r) => Ok(r),
            Err(ReadError::Log(e)) => Err(e.into()),
            Err(ReadError::Gone { .. }) => {
                // GC moved past us (we were already applied there): start over from progress.
                self.reader = None;
                Ok(Vec::new())
            }
        }
    }
}

impl InboxApplier {
    pub fn new(partition_dir: &Path, source: Source) -> InboxApplier {
        let dir = inbox_dir(partition_dir, source);
        InboxApplier {
            source,
            applied: None,
            state: ReadState {
                marker: CommittedReader::new(&dir),
                dir,
                reader: None,
            },
        }
    }

    /// Applies everything durable in the inbox that the partition has not applied yet, in chunks
    /// of about `max_bytes`. Returns the total applied by this call. The file and RocksDB reads
    /// run on the blocking pool, never on the async runtime's threads.
    pub async fn apply_available(
        &mut self,
        partition: &Arc<Partition>,
        max_bytes: usize,
    ) -> Result<ApplyReport, StoreError> {
        let mut total = ApplyReport::default();
        // The marker is one 20-byte pread of a cached page on a file kept open, so an idle
        // inbox (polled every few ms) is checked here; only records to read go to the pool.
        let Some(committed) = self.state.marker.read()? else {
            return Ok(total);
        };
        if self.applied.is_some_and(|a| a >= committed.decree) {
            return Ok(total);
        }
        for _ in 0..1024 {
            let mut state = std::mem::replace(&mut self.state, ReadState::placeholder());
            let p = partition.clone();
            let source = self.source;
            let (state, read) = tokio::task::spawn_blocking(move || {
                let r = state.next_chunk(&p, source, max_bytes);
                (state, r)
            })
            .await
            // Only a panic in the read or the runtime's shutdown loses the task.
            .map_err(|_| StoreError::Closed(partition.id().0))?;
            self.state = state;
            let records = read?;
            if records.is_empty() {
                break;
            }
            let r = partition.apply_duplicated(self.source, records).await?;
            self.applied = Some(r.progress);
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
    use ferry_log::inbox::InboxWriter;
    use ferry_proto::{ClusterId, Op, PartitionId, Timetag};

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
        let p = Arc::new(partition(dir.path()));
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
        assert_eq!(
            ferry_log::inbox::sources(dir.path()).expect("sources"),
            vec![src()]
        );

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
        let p = Arc::new(partition(dir.path()));
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
