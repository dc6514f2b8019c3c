//! The receiver's staging directory of one incoming checkpoint (full duplication): one source
//! partition's checkpoint files as they arrive, partial ones too, kept across restarts so that an
//! interrupted copy resumes instead of starting again.
//!
//! ```text
//! <data_dir>/<table>/.staging/<cid>-<sp>/LINEAGE        which source lineage the files are of
//! <data_dir>/<table>/.staging/<cid>-<sp>/db/<file>      the files, as far as they arrived
//! <data_dir>/<table>/.staging/<cid>-<sp>/manifest.json  written last, once every file verified
//! ```
//!
//! Rules:
//! - What [`Staging::present`] reports (size and CRC-32C of every file) is read back from the
//!   files at open, so it is what a crash left, never more; the shipper resumes a file only if
//!   that prefix's CRC equals its own. So a chunk is not fsynced on its own: a file is fsynced
//!   when its `FileDone` verifies it, and the checkpoint counts as staged only after every file
//!   was.
//! - Chunks of a file come in order: at the file's current size (append) or at 0 (the shipper
//!   found our prefix differs from its file and starts it again). Anything else is refused.
//! - Files of another lineage (another source database, a re-created partition) are never mixed
//!   in: opening with a different lineage deletes what is staged.
//! - Once complete ([`Staging::finish`]), the directory is a checkpoint directory as the engine
//!   verifies and opens it (`db/` + `manifest.json`); files not in the checkpoint are deleted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_proto::checkpoint::{DB_DIR, MANIFEST_FILE};
use ferry_proto::wire::{CheckpointDone, MAX_NAME};
use ferry_proto::{CheckpointFile, CheckpointManifest, PartitionId};

use crate::error::LogError;
use crate::plog::sync_dir;

/// The file naming the lineage of what is staged.
pub const LINEAGE_FILE: &str = "LINEAGE";
/// Longest lineage accepted.
pub const MAX_LINEAGE: usize = 256;

/// Why a chunk, a file or the checkpoint was refused. The receiver answers the shipper with it.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(
        "checkpoint file name {name:?} is not a plain file name (empty, too long, `.`/`..`, or \
         with a path separator); the shipper's checkpoint is not one of ours"
    )]
    BadName { name: String },
    #[error(
        "chunk of {file} at offset {offset} does not follow what is staged ({held} bytes); \
         chunks must come in order, so reconnect and resume from the Welcome"
    )]
    OutOfOrder {
        file: String,
        offset: u64,
        held: u64,
    },
    #[error(
        "checkpoint file {file} does not match its FileDone: staged {held_size} bytes with \
         CRC-32C {held_crc:08x}, announced {size} bytes with {crc:08x}; it is sent again from \
         the start after a reconnect"
    )]
    Mismatch {
        file: String,
        held_size: u64,
        held_crc: u32,
        size: u64,
        crc: u32,
    },
    #[error(
        "checkpoint at decree {decree} is incomplete: {reason}; the shipper resumes the transfer \
         after a reconnect"
    )]
    Incomplete { decree: u64, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Staged {
    size: u64,
    crc: u32,
    /// Announced complete with this size and CRC by a `FileDone` this session.
    done: bool,
}

/// One source partition's staging directory, open for writing.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    files: BTreeMap<String, Staged>,
}

impl Staging {
    /// Opens (or creates) the staging directory `dir` for `lineage`. What another lineage left
    /// there is deleted first.
    pub fn open(dir: &Path, lineage: &str) -> Result<Staging, StagingError> {
        if lineage.is_empty() || lineage.len() > MAX_LINEAGE || lineage.contains('\n') {
            return Err(StagingError::BadName {
                name: lineage.to_string(),
            });
        }
        let marker = dir.join(LINEAGE_FILE);
        let ours = match fs::read_to_string(&marker) {
            Ok(s) => s.trim_end() == lineage,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(LogError::io("read staging lineage", &marker, e).into()),
        };
        if !ours {
            if dir.exists() {
                fs::remove_dir_all(dir)
                    .map_err(|e| LogError::io("delete staging of another lineage", dir, e))?;
            }
            fs::create_dir_all(dir.join(DB_DIR))
                .map_err(|e| LogError::io("create staging directory", dir, e))?;
            write_durably(&marker, format!("{lineage}\n").as_bytes())?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        // A transfer begins: until it finishes, the directory is no finished checkpoint (a
        // re-bootstrap may change files a finished one had).
        let manifest = dir.join(MANIFEST_FILE);
        match fs::remove_file(&manifest) {
            Ok(()) => sync_dir(dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io("delete staged manifest", &manifest, e).into()),
        }
        let db = dir.join(DB_DIR);
        fs::create_dir_all(&db).map_err(|e| LogError::io("create staging directory", &db, e))?;
        let mut files = BTreeMap::new();
        let entries = fs::read_dir(&db).map_err(|e| LogError::io("list staging", &db, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LogError::io("list staging", &db, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            let (size, crc) = crc_of(&path)?;
            files.insert(
                name,
                Staged {
                    size,
                    crc,
                    done: false,
                },
            );
        }
        Ok(Staging {
            dir: dir.to_path_buf(),
            files,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What is staged, for the `Welcome`.
    pub fn present(&self) -> Vec<CheckpointFile> {
        self.files
            .iter()
            .map(|(name, s)| CheckpointFile {
                name: name.clone(),
                size: s.size,
                crc32c: s.crc,
            })
            .collect()
    }

    /// Writes `data` (a verified chunk) at `offset` of `file` (fsynced by its `FileDone`).
    pub fn write_chunk(
        &mut self,
        file: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StagingError> {
        check_name(file)?;
        let held = self.files.get(file).map_or(0, |s| s.size);
        if offset != held && offset != 0 {
            return Err(StagingError::OutOfOrder {
                file: file.to_string(),
                offset,
                held,
            });
        }
        let path = self.dir.join(DB_DIR).join(file);
        let new = !self.files.contains_key(file);
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| LogError::io("open staged file", &path, e))?;
        if offset == 0 && held > 0 {
            f.set_len(0)
                .map_err(|e| LogError::io("truncate staged file", &path, e))?;
        }
        f.write_all_at(data, offset)
            .map_err(|e| LogError::io("write staged file", &path, e))?;
        if new {
            sync_dir(&self.dir.join(DB_DIR))?;
        }
        let base = if offset == 0 {
            0
        } else {
            self.files.get(file).map_or(0, |s| s.crc)
        };
        self.files.insert(
            file.to_string(),
            Staged {
                size: offset + data.len() as u64,
                crc: crc32c::crc32c_append(base, data),
                done: false,
            },
        );
        Ok(())
    }

    /// A `FileDone`: `file` must be staged whole with this size and CRC-32C. A mismatching copy
    /// is deleted, so that the next session sends it again.
    pub fn finish_file(&mut self, file: &str, size: u64, crc: u32) -> Result<(), StagingError> {
        check_name(file)?;
        let held = self.files.get(file).copied();
        match held {
            Some(s) if s.size == size && s.crc == crc => {
                let path = self.dir.join(DB_DIR).join(file);
                File::open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| LogError::io("fsync staged file", &path, e))?;
                self.files
                    .insert(file.to_string(), Staged { done: true, ..s });
                Ok(())
            }
            None if size == 0 => {
                // An empty file sends no chunk.
                self.write_chunk(file, 0, &[])?;
                self.finish_file(file, size, crc)
            }
            other => {
                let (held_size, held_crc) = other.map_or((0, 0), |s| (s.size, s.crc));
                self.forget(file)?;
                Err(StagingError::Mismatch {
                    file: file.to_string(),
                    held_size,
                    held_crc,
                    size,
                    crc,
                })
            }
        }
    }

    /// `CheckpointDone`: every file of the checkpoint must have had its `FileDone`, with the
    /// totals announced. Deletes staged files that are not in it and writes the manifest, which
    /// makes the directory a checkpoint directory. Returns the manifest.
    pub fn finish(
        &mut self,
        partition: PartitionId,
        done: &CheckpointDone,
    ) -> Result<CheckpointManifest, StagingError> {
        let incomplete = |reason: String| StagingError::Incomplete {
            decree: done.decree.0,
            reason,
        };
        let files: Vec<CheckpointFile> = self
            .files
            .iter()
            .filter(|(_, s)| s.done)
            .map(|(name, s)| CheckpointFile {
                name: name.clone(),
                size: s.size,
                crc32c: s.crc,
            })
            .collect();
        let total: u64 = files.iter().map(|f| f.size).sum();
        if files.len() != done.file_count as usize || total != done.total_bytes {
            return Err(incomplete(format!(
                "{} files of {total} bytes are verified, the shipper announced {} files of {} bytes",
                files.len(),
                done.file_count,
                done.total_bytes
            )));
        }
        let extra: Vec<String> = self
            .files
            .iter()
            .filter(|(_, s)| !s.done)
            .map(|(n, _)| n.clone())
            .collect();
        for name in extra {
            self.forget(&name)?;
        }
        let manifest = CheckpointManifest {
            partition,
            decree: done.decree,
            files,
        };
        let json = serde_json_bytes(&manifest);
        write_durably(&self.dir.join(MANIFEST_FILE), &json)?;
        Ok(manifest)
    }

    /// Deletes the whole staging directory (install complete, or the dup is gone).
    pub fn remove(self) -> Result<(), LogError> {
        fs::remove_dir_all(&self.dir)
            .map_err(|e| LogError::io("delete staging directory", &self.dir, e))?;
        match self.dir.parent() {
            Some(p) => sync_dir(p),
            None => Ok(()),
        }
    }

    fn forget(&mut self, file: &str) -> Result<(), LogError> {
        let path = self.dir.join(DB_DIR).join(file);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io("delete staged file", &path, e)),
        }
        self.files.remove(file);
        sync_dir(&self.dir.join(DB_DIR))
    }
}

/// The manifest of the checkpoint staged whole in `dir`, if one is: `None` while a transfer
/// fills it, or when nothing is there.
pub fn staged_manifest(dir: &Path) -> Result<Option<CheckpointManifest>, LogError> {
    let path = dir.join(MANIFEST_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            LogError::io(
                "parse staged manifest",
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::io("read staged manifest", &path, e)),
    }
}

fn check_name(name: &str) -> Result<(), StagingError> {
    let plain = !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0']);
    if plain {
        Ok(())
    } else {
        Err(StagingError::BadName {
            name: name.chars().take(100).collect(),
        })
    }
}

/// Size and CRC-32C of a whole file.
fn crc_of(path: &Path) -> Result<(u64, u32), LogError> {
    let mut f = File::open(path).map_err(|e| LogError::io("open staged file", path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut crc) = (0u64, 0u32);
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| LogError::io("read staged file", path, e))?;
        if n == 0 {
            return Ok((size, crc));
        }
        size += n as u64;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

/// Writes `bytes` to `path` through a temporary file, fsynced and renamed, and fsyncs the
/// directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| LogError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| LogError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| LogError::io("rename into place", path, e))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// The manifest as the engine reads it (`checkpoint::verify`).
fn serde_json_bytes(m: &CheckpointManifest) -> Vec<u8> {
    serde_json::to_vec_pretty(m).expect("a manifest always serializes")
}

#[cfg(test)]
mod tests {
    use ferry_proto::Decree;

    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    fn file(name: &str, data: &[u8]) -> CheckpointFile {
        CheckpointFile {
            name: name.into(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(data),
        }
    }

    #[test]
    fn an_interrupted_copy_resumes_from_what_is_durable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("users/.staging/1-3");
        let a = bytes(10_000, 1);
        let b = bytes(3_000, 2);
        let mut s = Staging::open(&dir, "db-identity-1").expect("open");
        assert!(s.present().is_empty());
        s.write_chunk("000007.sst", 0, &a[..4_000]).expect("chunk");
        s.write_chunk("000007.sst", 4_000, &a[4_000..6_000])
            .expect("chunk");
        s.write_chunk("MANIFEST-000005", 0, &b).expect("chunk");
        drop(s);

        // A restart: the same lineage sees what was written, size and CRC of the prefix.
        let mut s = Staging::open(&dir, "db-identity-1").expect("reopen");
        assert_eq!(
            s.present(),
            vec![file("000007.sst", &a[..6_000]), file("MANIFEST-000005", &b)]
        );
        let e = s
            .write_chunk("000007.sst", 8_000, &a[8_000..])
            .expect_err("a hole");
        assert!(
            matches!(e, StagingError::OutOfOrder { held: 6_000, .. }),
            "{e}"
        );
        s.write_chunk("000007.sst", 6_000, &a[6_000..])
            .expect("resume");
        s.finish_file("000007.sst", a.len() as u64, crc32c::crc32c(&a))
            .expect("whole");
        s.finish_file("MANIFEST-000005", b.len() as u64, crc32c::crc32c(&b))
            .expect("whole");
        s.finish_file("empty.log", 0, 0)
            .expect("an empty file has no chunk");
        let m = s
            .finish(
                PartitionId(3),
                &CheckpointDone {
                    decree: Decree(77),
                    file_count: 3,
                    total_bytes: 13_000,
                },
            )
            .expect("complete");
        assert_eq!(m.decree, Decree(77));
        assert_eq!(m.files.len(), 3);
        let on_disk: CheckpointManifest =
            serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).expect("manifest written"))
                .expect("parses");
        assert_eq!(on_disk, m);
        assert_eq!(
            fs::read(dir.join(DB_DIR).join("000007.sst")).expect("read"),
            a
        );
    }

    #[test]
    fn another_lineage_is_never_mixed_in() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("s");
        let mut s = Staging::open(&dir, "lineage-a").expect("open");
        s.write_chunk("000001.sst", 0, &bytes(100, 3))
            .expect("chunk");
        drop(s);
        let s = Staging::open(&dir, "lineage-b").expect("open b");
        assert!(s.present().is_empty(), "lineage a's files are deleted");
        assert!(!dir.join(DB_DIR).join("000001.sst").exists());
    }

    #[test]
    fn a_mismatching_file_is_dropped_and_the_checkpoint_stays_incomplete() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("s");
        let data = bytes(1_000, 4);
        let mut s = Staging::open(&dir, "l").expect("open");
        s.write_chunk("a.sst", 0, &data).expect("chunk");
        let e = s
            .finish_file("a.sst", 1_000, crc32c::crc32c(&data) ^ 1)
            .expect_err("crc differs");
        assert!(matches!(e, StagingError::Mismatch { .. }), "{e}");
        assert!(
            s.present().is_empty(),
            "sent again from the start next time"
        );
        let e = s
            .finish(
                PartitionId(0),
                &CheckpointDone {
                    decree: Decree(1),
                    file_count: 1,
                    total_bytes: 1_000,
                },
            )
            .expect_err("incomplete");
        assert!(matches!(e, StagingError::Incomplete { .. }), "{e}");
        assert!(!dir.join(MANIFEST_FILE).exists());
    }

    #[test]
    fn a_restart_from_zero_replaces_the_old_prefix_and_bad_names_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("s");
        let mut s = Staging::open(&dir, "l").expect("open");
        s.write_chunk("a.sst", 0, &bytes(500, 5)).expect("chunk");
        let fresh = bytes(200, 6);
        s.write_chunk("a.sst", 0, &fresh).expect("start again");
        assert_eq!(s.present(), vec![file("a.sst", &fresh)]);
        assert_eq!(
            fs::read(dir.join(DB_DIR).join("a.sst")).expect("read"),
            fresh
        );
        for bad in ["", ".", "..", "../x", "a/b", "x\0"] {
            assert!(
                matches!(
                    s.write_chunk(bad, 0, b"x"),
                    Err(StagingError::BadName { .. })
                ),
                "{bad:?}"
            );
        }
        s.remove().expect("remove");
        assert!(!dir.exists());
    }
}
