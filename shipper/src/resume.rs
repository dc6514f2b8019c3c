//! Where a session starts shipping.
//!
//! After a break, shipping resumes after the highest decree either side knows the target made
//! durable: the receiver's `Welcome.confirmed_decree` (its inbox) or the progress stored in etcd
//! (written by whichever shipper led before). Either may be ahead: an ack can be lost with a
//! connection before it reached etcd, and a receiver can lose an inbox that etcd still
//! remembers (its partition moved). Re-sending is harmless, skipping is not, but both values are
//! "the target has it", so the larger one is right.
//!
//! A new incremental dup has neither. It ships the writes made from its creation on: records
//! whose timetag timestamp is before the dup's `create_timestamp_ms` are not sent, and the
//! session starts after the last of them (the inbox accepts a first batch at any decree). The
//! shipper then stores that decree as the dup's confirmed decree, so a restart does not have to
//! search again and the node's plog GC can release what came before. The search is a pure
//! function of the plog, so two shippers computing it reach the same decree.

use std::path::Path;

use ferry_log::plog::{list_segments, PlogReader, ReadError};
use ferry_meta::Progress;
use ferry_proto::{Decree, PlogRecord};

/// Where a session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Ship the records after this decree.
    After(Decree),
    /// No progress anywhere: a new dup; find its first record with [`new_dup_start`].
    NewDup,
}

/// The resume point from the receiver's `Welcome` and the progress stored in etcd.
pub fn start_point(welcome: Decree, stored: Option<&Progress>) -> Start {
    match stored {
        Some(p) => Start::After(welcome.max(p.confirmed_decree)),
        None if welcome > Decree::ZERO => Start::After(welcome),
        None => Start::NewDup,
    }
}

/// What [`new_dup_start`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDupStart {
    /// Ship the records after this decree.
    pub after: Decree,
    /// The commit time (µs) of the record at `after`, 0 when there is none.
    pub after_timestamp_us: u64,
    /// The oldest record still in the plog was already written after the dup's creation, and the
    /// plog does not start at decree 1: older records that belonged to the dup may have been
    /// garbage-collected before the shipper saw them.
    pub maybe_incomplete: bool,
}

/// For a new dup: the last committed record written before `create_us` (Unix µs), so that
/// shipping starts with the first record written at or after it. Reads only records up to
/// `committed`. Blocking (file reads); call it from `spawn_blocking`.
///
/// Segments are skipped by their first record's timestamp (timestamps never go backwards
/// within a partition), so only one segment is scanned record by record.
pub fn new_dup_start(
    plog_dir: &Path,
    create_us: u64,
    committed: Decree,
) -> Result<NewDupStart, ReadError> {
    let segments = list_segments(plog_dir)?;
    let mut scan_from = None;
    let mut oldest_first_is_new = false;
    for (i, seg) in segments.iter().enumerate().rev() {
        if seg.first_decree > committed {
            continue;
        }
        let mut reader = PlogReader::new(plog_dir, seg.first_decree);
        let first = match reader.read(committed, 1) {
            Ok(recs) => recs.into_iter().next(),
            // GC removed the segment since the listing: older ones are gone too.
            Err(ReadError::Gone { .. }) => break,
            Err(e) => return Err(e),
        };
        let Some(first) = first else { continue };
        if first.timetag.timestamp_us() < create_us {
            scan_from = Some(seg.first_decree);
            break;
        }
        if i == 0 {
            oldest_first_is_new = first.decree > Decree(1);
        }
    }
    let Some(from) = scan_from else {
        // Every committed record was written after the dup's creation (or there is none).
        let oldest = segments
            .first()
            .map_or(committed.next(), |s| s.first_decree);
        return Ok(NewDupStart {
            after: Decree(oldest.0.saturating_sub(1)).min(committed),
            after_timestamp_us: 0,
            maybe_incomplete: oldest_first_is_new,
        });
    };
    let mut reader = PlogReader::new(plog_dir, from);
    let mut last: Option<PlogRecord> = None;
    loop {
        let records = reader.read(committed, 1 << 20)?;
        if records.is_empty() {
            break;
        }
        for r in records {
            if r.timetag.timestamp_us() >= create_us {
                return Ok(found(last.as_ref(), from));
            }
            last = Some(r);
        }
    }
    Ok(found(last.as_ref(), from))
}

fn found(last_old: Option<&PlogRecord>, from: Decree) -> NewDupStart {
    match last_old {
        Some(r) => NewDupStart {
            after: r.decree,
            after_timestamp_us: r.timetag.timestamp_us(),
            maybe_incomplete: false,
        },
        None => NewDupStart {
            after: Decree(from.0.saturating_sub(1)),
            after_timestamp_us: 0,
            maybe_incomplete: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use ferry_log::plog::{remove_segments_below, PlogWriter};
    use ferry_proto::{ClusterId, Op, Timetag};
    use serde_json::Map;

    use super::*;

    fn progress(d: u64) -> Progress {
        Progress {
            confirmed_decree: Decree(d),
            last_confirmed_timestamp_ms: 0,
            committed_decree: Decree(0),
            updated_at_ms: 0,
            last_error: None,
            extra: Map::new(),
        }
    }

    #[test]
    fn resume_after_the_larger_confirmed_decree() {
        assert_eq!(
            start_point(Decree(10), Some(&progress(7))),
            Start::After(Decree(10)),
            "an ack lost before it reached etcd"
        );
        assert_eq!(
            start_point(Decree(3), Some(&progress(7))),
            Start::After(Decree(7)),
            "etcd remembers more than a fresh receiver"
        );
        assert_eq!(
            start_point(Decree(0), Some(&progress(0))),
            Start::After(Decree(0)),
            "stored progress at 0 is still progress: ship from the start"
        );
        assert_eq!(start_point(Decree(5), None), Start::After(Decree(5)));
        assert_eq!(start_point(Decree(0), None), Start::NewDup);
    }

    /// Writes records `decrees` with timestamp `decree * 1000` µs, in small segments.
    fn write(dir: &Path, decrees: std::ops::RangeInclusive<u64>) {
        let cluster = ClusterId::new(1).expect("valid id");
        let mut w = PlogWriter::open(dir, Decree(*decrees.start()), 600).expect("writer");
        for d in decrees {
            let r = PlogRecord {
                decree: Decree(d),
                timetag: Timetag::new(d * 1000, cluster, false),
                ops: vec![Op::Put {
                    key: format!("k{d}").into_bytes(),
                    value: vec![1; 40],
                    expire_at_ms: 0,
                }],
            };
            let mut buf = Vec::new();
            r.encode(&mut buf);
            w.append(&buf).expect("append");
            w.sync().expect("sync");
            w.roll_if_full(Decree(d + 1)).expect("roll");
        }
    }

    #[test]
    fn new_dup_starts_after_the_last_record_before_its_creation() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), 1..=100);
        assert!(list_segments(dir.path()).expect("list").len() > 3);
        // Created between record 41 (41_000 µs) and record 42.
        let s = new_dup_start(dir.path(), 41_500, Decree(100)).expect("search");
        assert_eq!(s.after, Decree(41));
        assert_eq!(s.after_timestamp_us, 41_000);
        assert!(!s.maybe_incomplete);
        // Created exactly at record 42's timestamp: 42 is shipped.
        let s = new_dup_start(dir.path(), 42_000, Decree(100)).expect("search");
        assert_eq!(s.after, Decree(41));
        // Created after everything committed so far: start after the committed decree, even if
        // later (uncommitted) records exist.
        let s = new_dup_start(dir.path(), 1_000_000, Decree(80)).expect("search");
        assert_eq!(s.after, Decree(80));
        // Created before everything: ship from decree 1.
        let s = new_dup_start(dir.path(), 10, Decree(100)).expect("search");
        assert_eq!(s.after, Decree(0));
        assert!(!s.maybe_incomplete);
    }

    #[test]
    fn new_dup_after_gc_is_flagged_when_records_may_be_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), 1..=100);
        remove_segments_below(dir.path(), Decree(50)).expect("gc");
        let oldest = list_segments(dir.path()).expect("list")[0].first_decree;
        assert!(oldest > Decree(1));
        let s = new_dup_start(dir.path(), 10, Decree(100)).expect("search");
        assert_eq!(s.after, Decree(oldest.0 - 1));
        assert!(s.maybe_incomplete, "records after the creation may be gone");
        let s = new_dup_start(dir.path(), 70_500, Decree(100)).expect("search");
        assert_eq!(s.after, Decree(70));
    }

    #[test]
    fn new_dup_on_an_empty_plog_starts_at_the_committed_decree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = new_dup_start(dir.path(), 5, Decree(0)).expect("search");
        assert_eq!(s.after, Decree(0));
        std::fs::create_dir_all(dir.path().join("x")).expect("mkdir");
        let missing = dir.path().join("missing");
        assert!(
            new_dup_start(&missing, 5, Decree(0)).is_err(),
            "no plog dir"
        );
    }
}
