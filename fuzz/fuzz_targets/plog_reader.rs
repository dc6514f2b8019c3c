//! Plog recovery and the plog reader (`ferry_log::plog`) over a segment file whose bytes are the
//! input: `<first_decree:020>.plog` in a scratch directory (one per process, on /dev/shm when
//! there is one, so that the recovery's fsyncs are cheap). The file name's decree is taken from
//! the input's header bytes 8..16, so that a well-formed header is reachable; inputs shorter than
//! a header use decree 1.
//!
//! Each input runs twice: as given, and with every record's CRC made right. Each run:
//! 1. `recover` (full recovery): on success the replayed records have consecutive decrees from
//!    the segment's first, no more of them than fit in the file, and they account for every byte
//!    up to the torn tail (if any), which is cut on disk to exactly that offset. A refusal is a
//!    `CorruptPlog` that leaves the file as it was.
//! 2. `recover_newest` on the same bytes agrees with it (one segment: it is the newest).
//! 3. A `PlogReader` from the segment's first decree up to the last recovered decree (the
//!    caller's contract: never past what is committed), in reads of a size chosen by the input:
//!    it returns exactly the records recovery replayed, in order, with consecutive decrees.
//!
//! With `FERRY_FUZZ_READ_AHEAD=1` in the environment it also reads once with `upto` past the end
//! of the log, which the reader documents as "returns fewer (or none)"; run with `-timeout=` to
//! catch a reader that never returns.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferry_fuzz::{fix_record_crcs, u64_at, MIN_RECORD_LEN};
use ferry_log::plog::{
    list_segments, recover, recover_newest, PlogReader, RecoveryReport, SEGMENT_HEADER_LEN,
};
use ferry_log::LogError;
use ferry_proto::{Decree, PlogRecord};
use libfuzzer_sys::fuzz_target;

fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        remove_stale_dirs(&base);
        let dir = base.join(format!("{DIR_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the scratch plog directory");
        dir
    })
}

const DIR_PREFIX: &str = "ferry-fuzz-plog-";

/// Removes the scratch directories of earlier runs whose process is gone (a fuzzer process ends
/// without running destructors, so each leaves its directory behind).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn read_ahead() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERRY_FUZZ_READ_AHEAD").is_some_and(|v| v == "1"))
}

fuzz_target!(|data: &[u8]| {
    segment(data);
    let mut fixed = data.to_vec();
    if fix_record_crcs(&mut fixed, SEGMENT_HEADER_LEN) {
        segment(&fixed);
    }
});

/// Writes `bytes` as the only segment of the scratch directory; returns its path and decree.
fn write_segment(bytes: &[u8]) -> (PathBuf, u64) {
    let dir = scratch_dir();
    for entry in fs::read_dir(dir).expect("list scratch dir") {
        let path = entry.expect("scratch dir entry").path();
        fs::remove_file(&path).expect("clear scratch dir");
    }
    let first = u64_at(bytes, 8).unwrap_or(1);
    let path = dir.join(format!("{first:020}.plog"));
    fs::write(&path, bytes).expect("write segment");
    (path, first)
}

fn segment(bytes: &[u8]) {
    let dir = scratch_dir();
    let (path, first) = write_segment(bytes);
    let segs = list_segments(dir).expect("list segments");
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].first_decree, Decree(first));

    // 1. Full recovery. `applied` 0: every record but a decree-0 one is replayed.
    let mut replayed: Vec<PlogRecord> = Vec::new();
    let full = recover(dir, Decree(0), |r| {
        replayed.push(r);
        Ok(())
    });
    check_replayed(first, &replayed);
    let after_full = fs::read(&path).ok();
    match &full {
        Ok(report) => check_report(bytes, first, &replayed, report, after_full.as_deref()),
        Err(e) => {
            assert!(
                matches!(e, LogError::CorruptPlog { .. }),
                "refusal is corruption: {e}"
            );
            assert_eq!(
                after_full.as_deref(),
                Some(bytes),
                "a refused segment is left as it was"
            );
        }
    }

    // 2. Newest-segment recovery of the same bytes agrees.
    write_segment(bytes);
    let newest = recover_newest(dir);
    match (&full, &newest) {
        (Ok(a), Ok(b)) => assert_eq!(
            (a.last_decree, &a.torn_tail, a.segments),
            (b.last_decree, &b.torn_tail, b.segments)
        ),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("recover: {a:?}, recover_newest: {b:?}"),
    }

    // 3. The reader, up to what recovery found (before any torn tail was cut).
    write_segment(bytes);
    let upto = match &full {
        Ok(report) => report.last_decree,
        // Up to the last record replayed before the corruption.
        Err(_) => replayed.last().map(|r| r.decree),
    };
    let max_bytes = match bytes.len() % 4 {
        0 => 1,
        1 => 100,
        2 => 4096,
        _ => 1 << 20,
    };
    if let Some(upto) = upto.filter(|u| u.0 >= first) {
        let got = read_all(first, upto, max_bytes);
        let got: Vec<_> = got.into_iter().filter(|r| r.decree.0 > 0).collect();
        assert_eq!(
            got, replayed,
            "the reader returns the records recovery replayed"
        );
    }
    if read_ahead() {
        write_segment(bytes);
        let mut reader = PlogReader::new(dir, Decree(first));
        if let Ok(got) = reader.read(Decree(u64::MAX), max_bytes) {
            check_consecutive(first, &got);
        }
    }
}

fn check_replayed(first: u64, replayed: &[PlogRecord]) {
    // Decree 0 is not replayed (it is not after `applied`).
    let start = first.max(1);
    for (i, r) in replayed.iter().enumerate() {
        assert_eq!(
            Some(r.decree.0),
            start.checked_add(i as u64),
            "replayed in decree order"
        );
    }
}

fn check_consecutive(first: u64, recs: &[PlogRecord]) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(
            Some(r.decree.0),
            first.checked_add(i as u64),
            "read in decree order"
        );
    }
}

fn check_report(
    bytes: &[u8],
    first: u64,
    replayed: &[PlogRecord],
    report: &RecoveryReport,
    after: Option<&[u8]>,
) {
    assert_eq!(report.replayed, replayed.len() as u64);
    // Records recovered, the decree-0 one included.
    let count = match report.last_decree {
        Some(last) => {
            assert!(
                last.0 >= first,
                "last decree {last} before the first {first}"
            );
            last.0 - first + 1
        }
        None => 0,
    };
    let skipped = u64::from(first == 0 && count > 0);
    assert_eq!(count, replayed.len() as u64 + skipped);
    let room = bytes.len().saturating_sub(SEGMENT_HEADER_LEN) as u64;
    assert!(
        count.saturating_mul(MIN_RECORD_LEN as u64) <= room,
        "{count} records cannot fit in {room} bytes"
    );
    let record_bytes: u64 = replayed.iter().map(|r| r.encoded_len() as u64).sum();
    match &report.torn_tail {
        None => {
            assert_eq!(report.segments, 1);
            assert_eq!(after, Some(bytes), "a clean segment is not touched");
            if skipped == 0 {
                assert_eq!(SEGMENT_HEADER_LEN as u64 + record_bytes, bytes.len() as u64);
            }
        }
        Some(torn) if torn.offset == 0 => {
            // A header cut short: the empty segment is removed.
            assert!(bytes.len() < SEGMENT_HEADER_LEN, "{torn:?}");
            assert_eq!(torn.bytes_dropped, bytes.len() as u64);
            assert_eq!(report.segments, 0);
            assert_eq!(after, None, "the segment is removed");
        }
        Some(torn) => {
            assert_eq!(report.segments, 1);
            assert_eq!(
                torn.offset + torn.bytes_dropped,
                bytes.len() as u64,
                "{torn:?}"
            );
            assert!(torn.bytes_dropped > 0);
            if skipped == 0 {
                assert_eq!(SEGMENT_HEADER_LEN as u64 + record_bytes, torn.offset);
            }
            assert_eq!(
                after,
                Some(&bytes[..torn.offset as usize]),
                "the torn tail is cut on disk"
            );
        }
    }
}

/// Reads `first ..= upto` with a fresh reader, `max_bytes` at a time, until a read returns nothing.
fn read_all(first: u64, upto: Decree, max_bytes: usize) -> Vec<PlogRecord> {
    let mut reader = PlogReader::new(scratch_dir(), Decree(first));
    let mut out = Vec::new();
    // Every read but the last returns at least one record, so this bounds the loop.
    for _ in 0..=upto.0.saturating_sub(first).saturating_add(1).min(100_000) {
        let got = match reader.read(upto, max_bytes) {
            Ok(got) => got,
            Err(e) => panic!("the reader refuses records recovery replayed: {e}"),
        };
        if got.is_empty() {
            break;
        }
        assert!(
            got.last().is_some_and(|r| r.decree <= upto),
            "read past upto"
        );
        out.extend(got);
    }
    check_consecutive(first, &out);
    assert_eq!(reader.next_decree().0, first.wrapping_add(out.len() as u64));
    out
}
