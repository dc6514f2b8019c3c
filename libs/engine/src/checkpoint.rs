//! Checkpoints: a RocksDB checkpoint of a partition at a known decree, with a manifest of every
//! file's name, size and CRC-32C. Full duplication ships them; `install` verifies one and puts it
//! in place for a partition to open.
//!
//! Layout of a checkpoint directory: `db/` (the RocksDB checkpoint) and `manifest.json`.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use ferry_log::plog::sync_dir;
use ferry_proto::checkpoint::{DB_DIR, MANIFEST_FILE};
use ferry_proto::{CheckpointFile, CheckpointManifest, PartitionId};

use crate::engine::Engine;
use crate::error::StoreError;

/// Makes a checkpoint of `engine` in `dir` (which must not exist). Call it from the partition's
/// writer thread, so no write lands between the checkpoint and reading its decree.
pub(crate) fn create(
    engine: &Engine,
    partition: PartitionId,
    dir: &Path,
) -> Result<CheckpointManifest, StoreError> {
    if dir.exists() {
        return Err(StoreError::BadCheckpoint {
            dir: dir.to_path_buf(),
            reason: "directory already exists; pick a new one".into(),
        });
    }
    fs::create_dir_all(dir).map_err(|e| StoreError::io("create checkpoint directory", dir, e))?;
    let db_dir = dir.join(DB_DIR);
    engine.checkpoint(&db_dir)?;
    // From the checkpoint itself: writes go on while it is made (it runs beside the writer
    // thread), so the live database may be past what the checkpoint holds.
    let decree = Engine::applied_decree_at(&db_dir)?;
    let manifest = CheckpointManifest {
        partition,
        decree,
        files: describe_files(&db_dir)?,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| StoreError::io("encode manifest", dir, io::Error::other(e)))?;
    let path = dir.join(MANIFEST_FILE);
    let write = || -> io::Result<()> {
        let mut f = File::create(&path)?;
        f.write_all(&json)?;
        f.sync_all()
    };
    write().map_err(|e| StoreError::io("write checkpoint manifest", &path, e))?;
    sync_dir(dir)?;
    Ok(manifest)
}

/// Reads a checkpoint's manifest and checks every file in it (present, same size, same CRC).
pub fn verify(dir: &Path) -> Result<CheckpointManifest, StoreError> {
    let bad = |reason: String| StoreError::BadCheckpoint {
        dir: dir.to_path_buf(),
        reason,
    };
    let path = dir.join(MANIFEST_FILE);
    let bytes =
        fs::read(&path).map_err(|e| StoreError::io("read checkpoint manifest", &path, e))?;
    let manifest: CheckpointManifest = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("manifest.json does not parse: {e}")))?;
    let db_dir = dir.join(DB_DIR);
    for f in &manifest.files {
        if f.name.contains('/') || f.name.contains("..") || f.name.is_empty() {
            return Err(bad(format!("manifest names an unsafe file {:?}", f.name)));
        }
        let (size, crc) = file_crc(&db_dir.join(&f.name))
            .map_err(|e| bad(format!("file {} cannot be read: {e}", f.name)))?;
        if size != f.size || crc != f.crc32c {
            return Err(bad(format!(
                "file {} has size {size} and crc32c {crc:#010x}, the manifest says {} and {:#010x}",
                f.name, f.size, f.crc32c
            )));
        }
    }
    Ok(manifest)
}

/// Verifies the checkpoint in `checkpoint_dir` and copies its RocksDB files into `db_dir`, which
/// must be absent or empty. Files are synced before the directory is.
pub(crate) fn install(
    checkpoint_dir: &Path,
    db_dir: &Path,
) -> Result<CheckpointManifest, StoreError> {
    let manifest = verify(checkpoint_dir)?;
    let occupied = fs::read_dir(db_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if occupied {
        return Err(StoreError::BadCheckpoint {
            dir: checkpoint_dir.to_path_buf(),
            reason: format!(
                "target {} already holds data; install into an empty partition directory",
                db_dir.display()
            ),
        });
    }
    fs::create_dir_all(db_dir)
        .map_err(|e| StoreError::io("create partition db directory", db_dir, e))?;
    let src_dir = checkpoint_dir.join(DB_DIR);
    for f in &manifest.files {
        let (src, dst) = (src_dir.join(&f.name), db_dir.join(&f.name));
        fs::copy(&src, &dst).map_err(|e| StoreError::io("copy checkpoint file", &dst, e))?;
        File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("fsync installed file", &dst, e))?;
    }
    sync_dir(db_dir)?;
    Ok(manifest)
}

fn describe_files(db_dir: &Path) -> Result<Vec<CheckpointFile>, StoreError> {
    let mut files = Vec::new();
    let entries = fs::read_dir(db_dir).map_err(|e| StoreError::io("list checkpoint", db_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list checkpoint", db_dir, e))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let (size, crc32c) =
            file_crc(&path).map_err(|e| StoreError::io("checksum checkpoint file", &path, e))?;
        files.push(CheckpointFile {
            name: entry.file_name().to_string_lossy().into_owned(),
            size,
            crc32c,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Size and CRC-32C of a file, read in 1 MiB chunks.
pub fn file_crc(path: &Path) -> io::Result<(u64, u32)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((size, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
}
