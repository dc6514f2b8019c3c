//! Tailing a node's plog: reading the committed marker and batches of records. Sessions wait
//! for the node's next group commit with [`CommitWatcher`] (inotify on the marker, in ferry-log).

use std::path::Path;

use ferry_log::plog::{Committed, CommittedReader, PlogReader, ReadError};
pub use ferry_log::watch::{CommitWatcher, Subscription};
use ferry_proto::{Decree, PlogRecord};

/// The committed marker of a plog directory; a missing marker (the node has not opened the
/// partition yet) reads as nothing committed.
pub fn committed(plog_dir: &Path) -> Result<Committed, ReadError> {
    Ok(Committed::read(plog_dir)?.unwrap_or_default())
}

/// [`committed`] through a reader that keeps the marker open, for loops that look often.
pub fn committed_from(marker: &mut CommittedReader) -> Result<Committed, ReadError> {
    Ok(marker.read()?.unwrap_or_default())
}

/// Reads the next batch: the records after what `reader` returned last, up to `upto` (the
/// committed decree), ending with the record that reaches `max_bytes`. Blocking.
pub fn read_batch(
    reader: &mut PlogReader,
    upto: Decree,
    max_bytes: u64,
) -> Result<Vec<PlogRecord>, ReadError> {
    reader.read(upto, max_bytes.max(1) as usize)
}

/// Encoded bytes of records, as read from the plog.
pub fn encoded_bytes(records: &[PlogRecord]) -> u64 {
    records.iter().map(|r| r.encoded_len() as u64).sum()
}

#[cfg(test)]
mod tests {

    use ferry_engine::{Expiry, Partition, PartitionOptions, SetCond, WriteCmd};
    use ferry_proto::{ClusterId, PartitionId};

    use std::time::Duration;

    use super::*;

    fn set(key: String, len: usize) -> WriteCmd {
        WriteCmd::Set {
            key: key.into_bytes(),
            value: vec![b'v'; len],
            expiry: Expiry::Never,
            cond: SetCond::Always,
            get_old: false,
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> Partition {
        let mut opts = PartitionOptions::new(ClusterId::new(1).expect("valid id"));
        opts.plog_segment_bytes = segment_bytes;
        Partition::open(dir, PartitionId(0), opts)
            .expect("open partition")
            .0
    }

    /// A real partition commits writes; the watcher wakes a waiting tail at once (well before
    /// the fallback timer), and the reader returns exactly the committed records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inotify_wakes_the_tail_when_the_node_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path(), 64 << 20);
        let plog = dir.path().join("plog");
        let watcher = CommitWatcher::new();
        let mut sub = watcher.subscribe(&plog);
        assert!(watcher.is_watched(&plog), "inotify is available on Linux");
        let mut reader = PlogReader::new(&plog, Decree(1));
        let mut seen = 0u64;
        for i in 0..20u64 {
            let write = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                p.write(set(format!("k{i}"), 10)).await.expect("write")
            };
            let (woke, _) = tokio::join!(sub.changed(Duration::from_secs(10)), write);
            assert!(woke, "woken by inotify, not the 10 s fallback");
            let c = committed(&plog).expect("marker");
            let got = read_batch(&mut reader, c.decree, 1 << 20).expect("read");
            seen += got.len() as u64;
            if let Some(last) = got.last() {
                assert_eq!(last.decree, c.decree, "read up to the marker, not past it");
            }
        }
        let c = committed(&plog).expect("marker");
        seen += read_batch(&mut reader, c.decree, 1 << 20)
            .expect("read")
            .len() as u64;
        assert_eq!(c.decree, Decree(20));
        assert_eq!(seen, 20, "every committed write read once");
        // Nothing new: the wait ends by the fallback timer, although reading the marker opens
        // it (reads must not wake the reader).
        committed(&plog).expect("marker");
        assert!(!sub.changed(Duration::from_millis(200)).await);
        drop(sub);
        assert!(
            !watcher.is_watched(&plog),
            "the last subscription unwatches"
        );
    }

    /// Batches end with the record that reaches the byte limit, follow segment roll-overs, and
    /// never pass the committed decree.
    #[tokio::test]
    async fn batches_are_cut_by_bytes_and_bounded_by_the_committed_decree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open(dir.path(), 64 << 10);
        for i in 0..400u64 {
            p.write(set(format!("key-{i}"), 300)).await.expect("write");
        }
        let plog = dir.path().join("plog");
        assert!(
            ferry_log::plog::list_segments(&plog).expect("list").len() > 1,
            "the writes span several segments"
        );
        let c = committed(&plog).expect("marker");
        assert_eq!(c.decree, Decree(400));
        let one = {
            let mut r = PlogReader::new(&plog, Decree(1));
            encoded_bytes(&read_batch(&mut r, Decree(1), 1 << 20).expect("read"))
        };
        let limit = 4096u64;
        let mut reader = PlogReader::new(&plog, Decree(1));
        let mut next = 1u64;
        // Stop short of the end: the bound is respected.
        loop {
            let batch = read_batch(&mut reader, Decree(350), limit).expect("read");
            if batch.is_empty() {
                break;
            }
            let bytes = encoded_bytes(&batch);
            assert!(
                bytes < limit + one,
                "a batch ends with the record that reaches the limit"
            );
            for r in &batch {
                assert_eq!(r.decree, Decree(next), "contiguous");
                next += 1;
            }
        }
        assert_eq!(next, 351, "stopped at the bound");
        let rest = read_batch(&mut reader, c.decree, 1 << 30).expect("read");
        assert_eq!(rest.first().map(|r| r.decree), Some(Decree(351)));
        assert_eq!(rest.last().map(|r| r.decree), Some(Decree(400)));
    }
}
