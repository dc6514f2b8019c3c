//! Installing a follower partition from the source cluster's checkpoints (full duplication).
//!
//! A target partition takes, from every source partition's checkpoint, the keys that hash to
//! it (`partition_of(key, target count)`), so the two tables may have different partition
//! counts. The keys are written into SST files with RocksDB's `SstFileWriter`, one per source
//! checkpoint, and ingested into a fresh database; only data keys are taken, never the source's
//! meta keys (its applied decree and its own duplication progress). Each source partition's
//! checkpoint decree becomes the partition's duplication progress for that source, and its inbox
//! starts right after it ([`ferry_log::inbox::start_after`]), so shipping resumes there and
//! nothing written during the copy is lost or applied twice.
//!
//! Crash safety: everything is built in `db.installing/` and renamed to `db/` as the last step
//! but one; the last writes the `INSTALLED` marker. A partition directory without the marker is
//! built again from the start, so an install interrupted at any point ends the same way.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_log::inbox;
use ferry_log::layout::{db_dir, plog_dir};
use ferry_log::plog::sync_dir;
use ferry_proto::checkpoint::DB_DIR;
use ferry_proto::{partition_of, Decree, PartitionId, Source, StoredValue};
use rocksdb::{IteratorMode, Options, SstFileWriter, DB};

use crate::engine::{Batch, Engine, DATA};
use crate::error::StoreError;

/// The file that marks a partition directory as installed.
pub const INSTALLED_FILE: &str = "INSTALLED";
/// The directory an install is built in.
const BUILD_DIR: &str = "db.installing";

/// One source partition's verified checkpoint to install from.
#[derive(Debug, Clone)]
pub struct SourceCheckpoint {
    pub source: Source,
    /// The checkpoint directory (`db/` and `manifest.json`).
    pub dir: PathBuf,
    pub decree: Decree,
}

/// What an install did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Keys taken into this partition.
    pub keys: u64,
    /// Keys of the checkpoints that belong to other target partitions.
    pub skipped: u64,
    /// Bytes of the SST files ingested.
    pub sst_bytes: u64,
}

/// Whether `partition_dir` holds an installed partition.
pub fn is_installed(partition_dir: &Path) -> bool {
    partition_dir.join(INSTALLED_FILE).exists()
}

/// Builds target partition `partition` (of `partition_count`) in `partition_dir` from the
/// checkpoints, as the module docs say. `partition_dir` must not hold a partition that serves
/// (its `db/`, plog and these sources' inboxes are replaced). Blocking.
pub fn install(
    partition_dir: &Path,
    partition: PartitionId,
    partition_count: u32,
    sources: &[SourceCheckpoint],
    tombstone_retention: Duration,
    inbox_segment_bytes: u64,
) -> Result<InstallReport, StoreError> {
    let build = partition_dir.join(BUILD_DIR);
    for dir in [
        build.clone(),
        db_dir(partition_dir),
        plog_dir(partition_dir),
    ] {
        remove_dir(&dir)?;
    }
    fs::create_dir_all(&build)
        .map_err(|e| StoreError::io("create install directory", &build, e))?;
    let mut report = InstallReport::default();
    {
        let engine = Engine::open(&build, tombstone_retention)?;
        let mut clock_us = 0u64;
        let mut progress = Batch::default();
        for (i, cp) in sources.iter().enumerate() {
            let sst = partition_dir.join(format!("install-{i}.sst"));
            let (keys, skipped, newest_us) =
                write_sst(&cp.dir.join(DB_DIR), &sst, partition, partition_count)?;
            report.keys += keys;
            report.skipped += skipped;
            clock_us = clock_us.max(newest_us);
            if keys > 0 {
                report.sst_bytes += fs::metadata(&sst)
                    .map_err(|e| StoreError::io("stat install sst", &sst, e))?
                    .len();
                engine.ingest(&sst)?;
            }
            remove_file(&sst)?;
            progress.set_dup_progress(cp.source, cp.decree);
        }
        progress.set_clock(clock_us);
        engine.write(progress)?;
        engine.flush()?;
    }
    for cp in sources {
        inbox::start_after(partition_dir, cp.source, cp.decree, inbox_segment_bytes)?;
    }
    let db = db_dir(partition_dir);
    fs::rename(&build, &db).map_err(|e| StoreError::io("move installed database", &db, e))?;
    sync_dir(partition_dir)?;
    let marker = partition_dir.join(INSTALLED_FILE);
    fs::write(&marker, b"")
        .and_then(|()| fs::File::open(&marker)?.sync_all())
        .map_err(|e| StoreError::io("write install marker", &marker, e))?;
    sync_dir(partition_dir)?;
    Ok(report)
}

/// Writes the data keys of the checkpoint database `db` that hash to `partition` into `sst`, in
/// key order. Returns (keys taken, keys skipped, newest timetag in µs).
fn write_sst(
    db: &Path,
    sst: &Path,
    partition: PartitionId,
    partition_count: u32,
) -> Result<(u64, u64, u64), StoreError> {
    let src = DB::open_for_read_only(&Options::default(), db, false)
        .map_err(|e| StoreError::rocks("open checkpoint", db, e))?;
    let mut opts = Options::default();
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut writer = SstFileWriter::create(&opts);
    let (mut keys, mut skipped, mut newest) = (0u64, 0u64, 0u64);
    let mut opened = false;
    for item in src.iterator(IteratorMode::From(&[DATA], rocksdb::Direction::Forward)) {
        let (key, value) = item.map_err(|e| StoreError::rocks("read checkpoint", db, e))?;
        if key.first() != Some(&DATA) {
            break;
        }
        if partition_of(&key[1..], partition_count) != partition {
            skipped += 1;
            continue;
        }
        if !opened {
            writer
                .open(sst)
                .map_err(|e| StoreError::rocks("create install sst", sst, e))?;
            opened = true;
        }
        if let Ok(v) = StoredValue::decode(&value) {
            newest = newest.max(v.timetag.timestamp_us());
        }
        writer
            .put(&key, &value)
            .map_err(|e| StoreError::rocks("write install sst", sst, e))?;
        keys += 1;
    }
    if opened {
        writer
            .finish()
            .map_err(|e| StoreError::rocks("finish install sst", sst, e))?;
    }
    Ok((keys, skipped, newest))
}

fn remove_dir(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("clear partition directory", dir, e)),
    }
}

fn remove_file(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("delete install sst", path, e)),
    }
}
