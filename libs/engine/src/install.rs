//! Installing a follower partition from the source cluster's checkpoints (full duplication).
//!
//! With equal partition counts, target partition p is source partition p's checkpoint itself:
//! its SST files are hard-linked into the new database (not rewritten) and only the meta keys
//! change. Otherwise:
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

use crate::engine::{Batch, Engine, SourceProgress, DATA};
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
    /// The partition is the source partition's checkpoint itself (equal partition counts): its
    /// SST files were hard-linked, not rewritten, and `keys`/`skipped` are not counted.
    pub opened_directly: bool,
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
    let own = (sources.len() == partition_count as usize)
        .then(|| sources.iter().find(|c| c.source.partition == partition))
        .flatten();
    let report = match own {
        // Equal counts: the same hash puts every key of source partition p in target
        // partition p, so its checkpoint is this partition already.
        Some(cp) => open_directly(&build, cp, sources, tombstone_retention)?,
        None => re_split(
            partition_dir,
            &build,
            partition,
            partition_count,
            sources,
            tombstone_retention,
        )?,
    };
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

/// Builds the partition in `build` from `cp`, the source partition's own checkpoint.
fn open_directly(
    build: &Path,
    cp: &SourceCheckpoint,
    sources: &[SourceCheckpoint],
    tombstone_retention: Duration,
) -> Result<InstallReport, StoreError> {
    let sst_bytes = link_database(&cp.dir.join(DB_DIR), build)?;
    let engine = Engine::open(build, tombstone_retention)?;
    engine.forget_dup_progress()?;
    let mut meta = Batch::default();
    for cp in sources {
        meta.set_dup_progress(cp.source, SourceProgress::at(cp.decree));
    }
    // Its own plog is empty: nothing of it is applied yet.
    meta.set_applied(Decree(0), engine.clock_us()?);
    engine.write(meta)?;
    engine.flush()?;
    Ok(InstallReport {
        opened_directly: true,
        sst_bytes,
        ..InstallReport::default()
    })
}

/// Builds the partition in `build` from the keys of every checkpoint that hash to it, through
/// one SST file per checkpoint.
fn re_split(
    partition_dir: &Path,
    build: &Path,
    partition: PartitionId,
    partition_count: u32,
    sources: &[SourceCheckpoint],
    tombstone_retention: Duration,
) -> Result<InstallReport, StoreError> {
    fs::create_dir_all(build).map_err(|e| StoreError::io("create install directory", build, e))?;
    let mut report = InstallReport::default();
    let engine = Engine::open(build, tombstone_retention)?;
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
        progress.set_dup_progress(cp.source, SourceProgress::at(cp.decree));
    }
    progress.set_clock(clock_us);
    engine.write(progress)?;
    engine.flush()?;
    Ok(report)
}

/// Makes `to` a copy of the database `from` (a verified checkpoint): SST and blob files
/// hard-linked (RocksDB never changes one), the small rest copied, so opening it cannot touch the staged files; its
/// identity is left out, so the copy gets its own.
/// Returns the bytes of the SST files.
fn link_database(from: &Path, to: &Path) -> Result<u64, StoreError> {
    fs::create_dir_all(to).map_err(|e| StoreError::io("create install directory", to, e))?;
    let mut sst_bytes = 0;
    let entries = fs::read_dir(from).map_err(|e| StoreError::io("list checkpoint", from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list checkpoint", from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_name() == "IDENTITY" {
            // A new database of its own: RocksDB makes a new identity on open.
            continue;
        }
        if src.extension().is_some_and(|e| e == "sst" || e == "blob") {
            // A copy where the staging is on another file system.
            fs::hard_link(&src, &dst)
                .or_else(|_| fs::copy(&src, &dst).map(drop))
                .map_err(|e| StoreError::io("link checkpoint file", &dst, e))?;
            sst_bytes += entry
                .metadata()
                .map_err(|e| StoreError::io("stat checkpoint file", &src, e))?
                .len();
        } else {
            fs::copy(&src, &dst).map_err(|e| StoreError::io("copy checkpoint file", &dst, e))?;
        }
    }
    sync_dir(to)?;
    Ok(sst_bytes)
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

/// Hands the data entries `(user key, stored value)` of the checkpoint in `checkpoint_dir` that
/// hash to `partition` (of `partition_count`) to `each`, in chunks of about `chunk_bytes`, for
/// a re-bootstrap of a serving partition ([`crate::partition::Partition::apply_checkpoint`]).
/// Stops early when `each` returns false. Returns the entries handed over. Blocking.
pub fn read_entries(
    checkpoint_dir: &Path,
    partition: PartitionId,
    partition_count: u32,
    chunk_bytes: usize,
    mut each: impl FnMut(Vec<(Vec<u8>, Vec<u8>)>) -> bool,
) -> Result<u64, StoreError> {
    let db = checkpoint_dir.join(DB_DIR);
    let src = DB::open_for_read_only(&Options::default(), &db, false)
        .map_err(|e| StoreError::rocks("open checkpoint", &db, e))?;
    let (mut chunk, mut bytes, mut count) = (Vec::new(), 0usize, 0u64);
    for item in src.iterator(IteratorMode::From(&[DATA], rocksdb::Direction::Forward)) {
        let (key, value) = item.map_err(|e| StoreError::rocks("read checkpoint", &db, e))?;
        if key.first() != Some(&DATA) {
            break;
        }
        if partition_of(&key[1..], partition_count) != partition {
            continue;
        }
        bytes += key.len() + value.len();
        chunk.push((key[1..].to_vec(), value.to_vec()));
        count += 1;
        if bytes >= chunk_bytes {
            if !each(std::mem::take(&mut chunk)) {
                return Ok(count);
            }
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        each(chunk);
    }
    Ok(count)
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
