//! A real partition checkpoint carried file by file through the transfer machine
//! (`ferry_dup::transfer::SendCheckpoint`), the wire's chunk packing and the receiver's staging
//! directory (`ferry_log::staging`), interrupted and resumed, with a corrupt chunk on the way;
//! the staged result opens as a partition with the source's digest. No network: the frames go
//! straight from one side to the other, which is what the shipper and receiver drivers will carry.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use ferry_dup::transfer::{SendCheckpoint, SendEvent, TransferConfig};
use ferry_engine::{Expiry, Partition, PartitionOptions, SetCond, WriteCmd};
use ferry_log::staging::Staging;
use ferry_proto::checkpoint::DB_DIR;
use ferry_proto::wire::{self, Frame, WireError};
use ferry_proto::{CheckpointManifest, ClusterId, PartitionId};

fn opts() -> PartitionOptions {
    PartitionOptions::new(ClusterId::new(1).expect("valid id"))
}

/// What one session of the transfer did.
#[derive(Debug, Default)]
struct Session {
    /// File bytes read and sent as chunks.
    sent: u64,
    /// Chunk frame bytes on the wire (zstd where it saves an eighth).
    wire: u64,
    /// Chunks sent compressed.
    compressed: u64,
    chunks: u64,
    /// Chunks the receiver refused by their checksum.
    corrupt: u64,
    manifest: Option<CheckpointManifest>,
}

/// One session: the receiver's staging reports what it holds, the sender sends the rest. Stops
/// after `max_chunks` chunks (a break), or at the first corrupt chunk (the receiver ends the
/// session with CHECKSUM_MISMATCH); `corrupt_at` flips a byte of that chunk number.
fn session(
    cp: &Path,
    manifest: &CheckpointManifest,
    staging_dir: &Path,
    max_chunks: u64,
    corrupt_at: Option<u64>,
) -> Session {
    let mut staging = Staging::open(staging_dir, "source-db-1").expect("staging");
    let config = TransferConfig {
        chunk_bytes: 64 << 10,
        lanes: 3,
        rate: None,
    };
    let now = Instant::now();
    let mut s = SendCheckpoint::new(manifest.clone(), &staging.present(), &config, now);
    let mut out = Session::default();
    let mut files: BTreeMap<String, File> = BTreeMap::new();
    let mut read = |name: &str, offset: u64, len: usize| -> Vec<u8> {
        let f = files
            .entry(name.to_string())
            .or_insert_with(|| File::open(cp.join(DB_DIR).join(name)).expect("open"));
        let mut buf = vec![0; len];
        f.read_exact_at(&mut buf, offset).expect("read");
        buf
    };
    for _ in 0..1_000_000 {
        let Some(event) = s.poll(now) else {
            panic!("stalled with no rate limit");
        };
        match event {
            SendEvent::CheckPrefix { file, len } => {
                let crc = crc32c::crc32c(&read(&file, 0, len as usize));
                s.handle_prefix(&file, crc);
            }
            SendEvent::Read {
                lane,
                file,
                offset,
                len,
            } => {
                if out.chunks == max_chunks {
                    return out;
                }
                let data = read(&file, offset, len as usize);
                let mut chunk = wire::pack_chunk(&file, offset, &data, 1);
                if corrupt_at == Some(out.chunks) {
                    chunk.data[0] ^= 0xff;
                }
                out.chunks += 1;
                out.sent += u64::from(len);
                let mut frame = Vec::new();
                wire::encode(&Frame::Chunk(chunk.clone()), &mut frame);
                out.wire += frame.len() as u64;
                out.compressed += u64::from(chunk.compressed);
                match wire::unpack_chunk(&chunk) {
                    Ok(bytes) => staging
                        .write_chunk(&chunk.file, chunk.offset, &bytes)
                        .expect("stage"),
                    Err(WireError::ChunkChecksum { .. } | WireError::Decompress(_)) => {
                        out.corrupt += 1;
                        return out;
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
                s.handle_sent(lane, frame.len() as u64, now);
            }
            SendEvent::Send {
                frame: Frame::FileDone(d),
                ..
            } => staging
                .finish_file(&d.file, d.size, d.crc32c)
                .expect("file verifies"),
            SendEvent::Send { frame, .. } => panic!("unexpected {}", frame.name()),
            SendEvent::Done(done) => {
                out.manifest = Some(staging.finish(manifest.partition, &done).expect("complete"));
                return out;
            }
        }
    }
    panic!("the transfer did not end")
}

#[tokio::test]
async fn a_checkpoint_copied_in_interrupted_sessions_opens_with_the_source_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Partition::open(&dir.path().join("src"), PartitionId(2), opts())
        .expect("open")
        .0;
    for i in 0..20_000u32 {
        p.write(WriteCmd::Set {
            key: format!("key-{i:06}").into_bytes(),
            value: format!("value-{i}-{}", "x".repeat((i % 200) as usize)).into_bytes(),
            expiry: Expiry::Never,
            cond: SetCond::Always,
            get_old: false,
        })
        .await
        .expect("set");
    }
    let cp = dir.path().join("cp");
    let manifest = p.checkpoint(cp.clone()).await.expect("checkpoint");
    let digest = p.digest().expect("digest");
    let total = manifest.total_bytes();
    assert!(total > 3 * (64 << 10), "several chunks: {total} bytes");
    let staging = dir.path().join("tj/users/.staging/1-2");

    // A break after 3 chunks, then a corrupt chunk, then a clean session to the end.
    let first = session(&cp, &manifest, &staging, 3, None);
    assert_eq!((first.chunks, first.manifest.is_some()), (3, false));
    let second = session(&cp, &manifest, &staging, u64::MAX, Some(1));
    assert_eq!(
        second.corrupt, 1,
        "the corrupt chunk is caught by its checksum"
    );
    let third = session(&cp, &manifest, &staging, u64::MAX, None);
    let staged = third.manifest.expect("the third session completes");
    assert_eq!(staged.decree, manifest.decree);
    assert_eq!(staged.files.len(), manifest.files.len());

    // What was sent again is bounded by the chunks in flight at each break: here the corrupt
    // chunk only (a break between chunks resends nothing).
    let chunk = 64u64 << 10;
    let sent = first.sent + second.sent + third.sent;
    assert!(
        sent <= total + chunk,
        "sent {sent} bytes for a {total}-byte checkpoint"
    );
    assert!(sent >= total, "every byte was sent at least once");
    let chunks = first.chunks + second.chunks + third.chunks;
    eprintln!(
        "checkpoint of {} files, {total} bytes: {chunks} chunks, {} sent compressed; {sent} file \
         bytes took {} bytes on the wire ({:.2}x)",
        manifest.files.len(),
        first.compressed + second.compressed + third.compressed,
        first.wire + second.wire + third.wire,
        sent as f64 / (first.wire + second.wire + third.wire) as f64
    );

    let (copy, report) = Partition::open_from_checkpoint(
        &staging,
        &dir.path().join("tj/users/2"),
        PartitionId(2),
        opts(),
    )
    .expect("the staged checkpoint opens");
    assert_eq!(report.committed, manifest.decree);
    assert_eq!(copy.digest().expect("digest"), digest);
}
