//! Everything RocksDB-specific: options, the key layout, meta keys, and the tombstone filter.
//!
//! One column family holds both user data and the partition's meta keys, so a single write batch,
//! and a single memtable flush, moves data and progress together. The RocksDB WAL is off (the
//! plog is the durable log, as in Pegasus); what reached an SST is what survived.
//!
//! Key layout: `b'd' ++ user_key` for data, `b'm' ++ name` for meta (the `META_*` keys).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::{Decree, PartitionId, Source, StoredValue};
use rocksdb::compaction_filter::Decision;
use rocksdb::{
    DBPinnableSlice, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::clock;
use crate::error::StoreError;

pub(crate) const DATA: u8 = b'd';
const META_APPLIED: &[u8] = b"mapplied_decree";
const META_CLOCK: &[u8] = b"mclock_us";
const META_DUP_PREFIX: &[u8] = b"mdup/";

/// How far a partition applied one source partition: the last decree, and the hybrid-clock
/// timestamp of that write (µs since the Unix epoch; 0 if unknown, e.g. after a checkpoint's
/// install). A forced failover reports it as the start of the window of writes that may be lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceProgress {
    pub decree: Decree,
    pub timestamp_us: u64,
}

impl SourceProgress {
    /// Up to `decree`, timestamp unknown.
    pub fn at(decree: Decree) -> SourceProgress {
        SourceProgress {
            decree,
            timestamp_us: 0,
        }
    }
}

/// A user key and its stored value bytes.
pub type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Stored values of this many bytes or more go to RocksDB's blob files instead of SST blocks.
/// Far above a typical value (so most reads touch one block), far below the largest ones.
pub const BLOB_MIN_BYTES: u64 = 16 << 10;

pub struct Engine {
    db: Arc<DB>,
    dir: PathBuf,
    write_opts: WriteOptions,
    /// Reads that may touch only the memtables and the block cache, never the disk.
    cached_only: ReadOptions,
}

fn cached_only() -> ReadOptions {
    let mut opts = ReadOptions::default();
    opts.set_read_tier(rocksdb::ReadTier::BlockCache);
    opts
}

impl Engine {
    /// Opens (or creates) the RocksDB instance in `dir`. Tombstones and expired values older than
    /// `tombstone_retention` are purged by compaction.
    pub fn open(dir: &Path, tombstone_retention: Duration) -> Result<Engine, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // Large values live in blob files, so a small key never shares an SST block with one: a
        // GET of it reads a block of a few KiB, not the megabytes of a neighbour's value.
        opts.set_enable_blob_files(true);
        opts.set_min_blob_size(BLOB_MIN_BYTES);
        opts.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_enable_blob_gc(true);
        // Meta keys must stay behind data on flush: both are in the default CF, so they are.
        let retention_us = tombstone_retention.as_micros() as u64;
        opts.set_compaction_filter(
            "ferry_tombstones",
            move |_level, key: &[u8], value: &[u8]| {
                purge_decision(key, value, clock::wall_us(), retention_us)
            },
        );
        let db = DB::open(&opts, dir).map_err(|e| StoreError::rocks("open", dir, e))?;
        let mut write_opts = WriteOptions::default();
        write_opts.disable_wal(true);
        Ok(Engine {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            write_opts,
            cached_only: cached_only(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last decree whose effects are in RocksDB (memtable or SST).
    pub fn applied_decree(&self) -> Result<Decree, StoreError> {
        Ok(Decree(self.meta_u64(META_APPLIED)?.unwrap_or(0)))
    }

    /// The applied decree of the database in `dir` (a checkpoint), opened read-only.
    pub fn applied_decree_at(dir: &Path) -> Result<Decree, StoreError> {
        let db = DB::open_for_read_only(&Options::default(), dir, false)
            .map_err(|e| StoreError::rocks("open read-only", dir, e))?;
        let engine = Engine {
            db: Arc::new(db),
            dir: dir.to_path_buf(),
            write_opts: WriteOptions::default(),
            cached_only: cached_only(),
        };
        engine.applied_decree()
    }

    /// The last hybrid-clock timestamp written with a batch.
    pub fn clock_us(&self) -> Result<u64, StoreError> {
        Ok(self.meta_u64(META_CLOCK)?.unwrap_or(0))
    }

    /// The last source decree applied from `source`.
    pub fn dup_progress(&self, source: Source) -> Result<Decree, StoreError> {
        Ok(self.dup_progress_at(source)?.decree)
    }

    /// The last source decree applied from `source`, and the timestamp of that write.
    pub fn dup_progress_at(&self, source: Source) -> Result<SourceProgress, StoreError> {
        let key = dup_key(source);
        match self
            .db
            .get_pinned(&key)
            .map_err(|e| StoreError::rocks("get meta", &self.dir, e))?
        {
            Some(v) => self.decode_progress(&key, &v),
            None => Ok(SourceProgress::default()),
        }
    }

    /// A progress value: the decree, then (since the timestamp is kept) its write's time.
    fn decode_progress(&self, key: &[u8], v: &[u8]) -> Result<SourceProgress, StoreError> {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        match v.len() {
            // Written before the timestamp was kept.
            8 => Ok(SourceProgress::at(Decree(word(0)))),
            16 => Ok(SourceProgress {
                decree: Decree(word(0)),
                timestamp_us: word(1),
            }),
            n => Err(StoreError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!(
                    "dup progress key {} has {n} bytes, expected 8 or 16",
                    String::from_utf8_lossy(key)
                ),
            }),
        }
    }

    /// Every duplication progress key (`mdup/...`) and its value, in key order.
    fn dup_entries(&self) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        let iter = self
            .db
            .iterator(IteratorMode::From(META_DUP_PREFIX, Direction::Forward));
        for item in iter {
            let (key, value) =
                item.map_err(|e| StoreError::rocks("scan dup progress", &self.dir, e))?;
            if !key.starts_with(META_DUP_PREFIX) {
                break;
            }
            out.push((key, value));
        }
        Ok(out)
    }

    /// Every source this database applied from, with its progress, in key order.
    pub fn dup_sources(&self) -> Result<Vec<(Source, SourceProgress)>, StoreError> {
        let mut out = Vec::new();
        for (key, value) in self.dup_entries()? {
            let parsed = match &key[META_DUP_PREFIX.len()..] {
                [c, p @ ..] if p.len() == 4 => {
                    ferry_proto::ClusterId::new(*c).map(|cluster| Source {
                        cluster,
                        partition: PartitionId(u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
                    })
                }
                _ => None,
            };
            let Some(source) = parsed else {
                return Err(StoreError::Inconsistent {
                    dir: self.dir.clone(),
                    reason: format!(
                        "dup progress key {} is not a source (cluster id, partition)",
                        String::from_utf8_lossy(&key)
                    ),
                });
            };
            out.push((source, self.decode_progress(&key, &value)?));
        }
        Ok(out)
    }

    /// Deletes every duplication progress key (`mdup/...`): a database opened from another
    /// cluster's checkpoint must not keep that cluster's progress as its own.
    pub fn forget_dup_progress(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (key, _) in self.dup_entries()? {
            batch.delete(&key);
        }
        if !batch.is_empty() {
            self.db
                .write_opt(batch, &self.write_opts)
                .map_err(|e| StoreError::rocks("write", &self.dir, e))?;
        }
        Ok(())
    }

    /// Reads the stored value of a user key, tombstones and expired values included.
    pub fn get_raw(&self, user_key: &[u8]) -> Result<Option<DBPinnableSlice<'_>>, StoreError> {
        self.db
            .get_pinned(data_key(user_key))
            .map_err(|e| StoreError::rocks("get", &self.dir, e))
    }

    /// [`Engine::get_raw`] if it can be answered from memory (the memtables and the block
    /// cache); `None` if it would read the disk.
    pub fn get_raw_cached(
        &self,
        user_key: &[u8],
    ) -> Result<Option<Option<DBPinnableSlice<'_>>>, StoreError> {
        match self
            .db
            .get_pinned_opt(data_key(user_key), &self.cached_only)
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(None),
            Err(e) => Err(StoreError::rocks("get", &self.dir, e)),
        }
    }

    /// The timetag stored for `user_key`, if any (tombstones included).
    pub fn stored_timetag(
        &self,
        user_key: &[u8],
    ) -> Result<Option<ferry_proto::Timetag>, StoreError> {
        let Some(raw) = self.get_raw(user_key)? else {
            return Ok(None);
        };
        Ok(StoredValue::decode(&raw).ok().map(|v| v.timetag))
    }

    /// Iterates data entries with user keys strictly after `after` (or from the start).
    /// Yields `(user_key, stored_value_bytes)`.
    pub fn scan_from(
        &self,
        after: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<KeyValue, StoreError>> + '_ {
        let start = match after {
            Some(k) => {
                let mut s = data_key(k);
                s.push(0); // smallest key strictly greater than `after`
                s
            }
            None => vec![DATA],
        };
        self.db
            .iterator(IteratorMode::From(&start, Direction::Forward))
            .map(|item| item.map_err(|e| StoreError::rocks("iterate", &self.dir, e)))
            .take_while(|item| {
                item.as_ref()
                    .map_or(true, |(k, _)| k.first() == Some(&DATA))
            })
            .map(|item| item.map(|(k, v)| (k[1..].into(), v)))
    }

    pub fn write(&self, batch: Batch) -> Result<(), StoreError> {
        fail::fail_point!("rocksdb-write", |arg| Err(StoreError::io(
            "rocksdb write batch",
            &self.dir,
            ferry_log::error::injected_io_error(arg)
        )));
        self.db
            .write_opt(batch.0, &self.write_opts)
            .map_err(|e| StoreError::rocks("write batch", &self.dir, e))
    }

    /// Flushes the memtable, making every applied decree durable in SSTs.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::rocks("flush", &self.dir, e))
    }

    /// Makes a RocksDB checkpoint (hard links where possible) in `dir`, which must not exist.
    /// The memtable is flushed first, so the checkpoint holds everything applied.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        // With the WAL off, only flushed data can be in a checkpoint: flush explicitly rather
        // than rely on the checkpoint's own flush heuristics.
        self.flush()?;
        let cp = rocksdb::checkpoint::Checkpoint::new(&*self.db)
            .map_err(|e| StoreError::rocks("checkpoint", &self.dir, e))?;
        cp.create_checkpoint(dir)
            .map_err(|e| StoreError::rocks("create checkpoint", &self.dir, e))
    }

    /// Ingests an SST file written in this key layout (moved into the database, not copied).
    pub fn ingest(&self, sst: &Path) -> Result<(), StoreError> {
        let mut opts = rocksdb::IngestExternalFileOptions::default();
        opts.set_move_files(true);
        self.db
            .ingest_external_file_opts(&opts, vec![sst])
            .map_err(|e| StoreError::rocks("ingest sst", &self.dir, e))
    }

    /// Runs a full manual compaction (tests use it to check the tombstone filter).
    pub fn compact_all(&self) {
        self.db.compact_range::<&[u8], &[u8]>(None, None);
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let Some(v) = self
            .db
            .get_pinned(key)
            .map_err(|e| StoreError::rocks("get meta", &self.dir, e))?
        else {
            return Ok(None);
        };
        let bytes: [u8; 8] = v
            .as_ref()
            .try_into()
            .map_err(|_| StoreError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!(
                    "meta key {} has {} bytes, expected 8",
                    String::from_utf8_lossy(key),
                    v.len()
                ),
            })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }
}

/// A write batch in ferry's key layout.
#[derive(Default)]
pub struct Batch(WriteBatch);

impl Batch {
    pub fn put_value(&mut self, user_key: &[u8], stored: &[u8]) {
        self.0.put(data_key(user_key), stored);
    }

    pub fn set_applied(&mut self, decree: Decree, clock_us: u64) {
        self.0.put(META_APPLIED, decree.0.to_be_bytes());
        self.0.put(META_CLOCK, clock_us.to_be_bytes());
    }

    pub fn set_clock(&mut self, clock_us: u64) {
        self.0.put(META_CLOCK, clock_us.to_be_bytes());
    }

    pub fn set_dup_progress(&mut self, source: Source, progress: SourceProgress) {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&progress.decree.0.to_be_bytes());
        v[8..].copy_from_slice(&progress.timestamp_us.to_be_bytes());
        self.0.put(dup_key(source), v);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn data_key(user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user_key.len());
    k.push(DATA);
    k.extend_from_slice(user_key);
    k
}

fn dup_key(source: Source) -> Vec<u8> {
    let mut k = META_DUP_PREFIX.to_vec();
    k.push(source.cluster.get());
    k.extend_from_slice(&source.partition.0.to_be_bytes());
    k
}

/// The tombstone filter's decision for one entry. A tombstone, or a value that expired, is purged
/// once its write time (or expiry) is older than the retention: by then every cluster has seen
/// it, so last-writer-wins no longer needs its timetag. RocksDB turns `Remove` into a deletion
/// marker, so older versions of the key do not come back.
fn purge_decision(key: &[u8], value: &[u8], now_us: u64, retention_us: u64) -> Decision {
    if key.first() != Some(&DATA) {
        return Decision::Keep;
    }
    let Ok(v) = StoredValue::decode(value) else {
        return Decision::Keep;
    };
    let horizon_us = now_us.saturating_sub(retention_us);
    let dead_since_us = if v.is_tombstone() {
        Some(v.timetag.timestamp_us())
    } else if v.expire_at_ms != 0 {
        Some(v.expire_at_ms.saturating_mul(1000))
    } else {
        None
    };
    match dead_since_us {
        Some(t) if t < horizon_us => Decision::Remove,
        _ => Decision::Keep,
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::{ClusterId, Timetag};

    use super::*;

    fn cid() -> ClusterId {
        ClusterId::new(1).expect("valid id")
    }

    #[test]
    fn purge_only_old_tombstones_and_expired() {
        let hour_us = 3_600_000_000;
        let now = 10 * hour_us;
        let old_del = StoredValue {
            timetag: Timetag::new(now - 2 * hour_us, cid(), true),
            expire_at_ms: 0,
            user: b"",
        };
        let new_del = StoredValue {
            timetag: Timetag::new(now - 10, cid(), true),
            ..old_del
        };
        let live = StoredValue {
            timetag: Timetag::new(1, cid(), false),
            expire_at_ms: 0,
            user: b"v",
        };
        let expired = StoredValue {
            expire_at_ms: (now - 2 * hour_us) / 1000,
            ..live
        };
        let d = |v: StoredValue<'_>| purge_decision(&data_key(b"k"), &v.encode(), now, hour_us);
        assert!(matches!(d(old_del), Decision::Remove));
        assert!(matches!(d(new_del), Decision::Keep));
        assert!(
            matches!(d(live), Decision::Keep),
            "values without expiry live forever"
        );
        assert!(matches!(d(expired), Decision::Remove));
        assert!(matches!(
            purge_decision(META_APPLIED, &old_del.encode(), now, hour_us),
            Decision::Keep
        ));
    }

    #[test]
    fn dup_progress_keeps_the_timestamp_and_reads_the_older_8_byte_form() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path(), Duration::from_secs(3600)).expect("open");
        let a = Source {
            cluster: cid(),
            partition: PartitionId(3),
        };
        let b = Source {
            cluster: ClusterId::new(2).expect("valid id"),
            partition: PartitionId(0),
        };
        let mut batch = Batch::default();
        batch.set_dup_progress(
            a,
            SourceProgress {
                decree: Decree(42),
                timestamp_us: 1_700_000_000_000_000,
            },
        );
        // As versions before the timestamp wrote it.
        batch.0.put(dup_key(b), 7u64.to_be_bytes());
        engine.write(batch).expect("write");
        assert_eq!(
            engine.dup_progress_at(a).expect("read"),
            SourceProgress {
                decree: Decree(42),
                timestamp_us: 1_700_000_000_000_000
            }
        );
        assert_eq!(engine.dup_progress(b).expect("read"), Decree(7));
        assert_eq!(engine.dup_progress_at(b).expect("read").timestamp_us, 0);
        let sources: Vec<Source> = engine
            .dup_sources()
            .expect("scan")
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(sources, vec![a, b]);
    }
}
