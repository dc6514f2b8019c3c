//! The shipper ⇄ receiver wire protocol (ALPN `ferry/1`): length-prefixed, versioned frames.
//! `docs/protocol.md` describes the sessions these frames make up; this module is the byte
//! layout, and it does no I/O: callers feed it bytes from QUIC streams and write out what
//! [`encode`] appends.
//!
//! ```text
//! frame   = len: u32 | type: u8 | body            len = body length, 0 ..= MAX_FRAME
//! str     = n: u32 | n bytes of UTF-8             n <= MAX_NAME (names) or MAX_MESSAGE (Error)
//! bytes   = n: u32 | n bytes
//!
//! type  frame           body
//!  1    Hello           version: u16 | cluster_id: u8 | dupid: u64 | table: str
//!                       | partition: u32 | fencing_token: u64 | purpose: u8
//!                       [purpose 1: | lineage: str (<= MAX_LINEAGE) | decree: u64]
//!  2    Welcome         confirmed_decree: u64 | n: u32 (<= MAX_PRESENT_FILES)
//!                       | n × (name: str | size: u64 | crc32c: u32)
//!  3    Batch           first_decree: u64 | last_decree: u64 | count: u32 | raw_len: u32
//!                       | zstd: bytes
//!  4    Ack             confirmed_decree: u64
//!  5    Heartbeat       source_timestamp_us: u64 | committed_decree: u64
//!  6    Chunk           file: str | offset: u64 | len: u32 (<= MAX_CHUNK) | crc32c: u32
//!                       | flags: u8 (bit 0: data is zstd) | data: bytes
//!  7    FileDone        file: str | size: u64 | crc32c: u32
//!  8    CheckpointDone  decree: u64 | file_count: u32 | total_bytes: u64
//!  9    Staged          decree: u64
//! 10    Error           code: u16 | message: str
//! 11    ChunkAck        chunks: u64
//! ```
//!
//! Every integer is little-endian and fixed-width. `version` comes first in `Hello` so that a
//! peer of another version is recognised before the rest is read; this is version
//! [`PROTOCOL_VERSION`].
//!
//! [`decode`] never panics and never allocates more than a small multiple of its input: the
//! frame length is checked against [`MAX_FRAME`] before anything else, and every string, byte
//! field and count against both its limit and the bytes actually present. A strict prefix of a
//! frame is [`WireError::Incomplete`]; anything else that is wrong is another typed error,
//! which a receiver answers with an [`Error`] frame before it ends the session.
//!
//! A batch's payload is plog records ([`PlogRecord::encode`], the same bytes as in the plog and
//! the inbox) concatenated and compressed with zstd: see [`pack_batch`] and [`unpack_batch`].

use std::cell::RefCell;

use thiserror::Error as ThisError;

use crate::checkpoint::CheckpointFile;
use crate::ids::{ClusterId, Decree, DupId, PartitionId};
use crate::record::{DecodeError, PlogRecord, RECORD_HEADER_LEN};

/// The protocol version a `Hello` carries. A receiver refuses other versions with
/// [`ErrorCode::UNSUPPORTED_VERSION`].
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes of the `len | type` frame header.
pub const FRAME_HEADER_LEN: usize = 5;
/// Upper bound on a frame body: room for the largest batch (see [`crate::limits`]).
pub use crate::limits::MAX_FRAME;
/// Upper bound on a table or file name.
pub const MAX_NAME: usize = 1024;
/// Upper bound on an `Error` frame's message.
pub const MAX_MESSAGE: usize = 4096;
/// Upper bound on the number of files a `Welcome` lists.
pub const MAX_PRESENT_FILES: usize = 65_536;
/// Upper bound on the uncompressed bytes of one checkpoint chunk.
pub const MAX_CHUNK: usize = 4 << 20;
/// Upper bound on a checkpoint's lineage (the source database's identity).
pub const MAX_LINEAGE: usize = 256;

/// One protocol message. See the module docs for the layout and `docs/protocol.md` for who
/// sends what when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Batch(Batch),
    Ack(Ack),
    Heartbeat(Heartbeat),
    Chunk(Chunk),
    FileDone(FileDone),
    CheckpointDone(CheckpointDone),
    Staged(Staged),
    Error(Error),
    ChunkAck(ChunkAck),
}

/// Shipper → receiver, first frame on every stream: who is shipping what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The source cluster; must match the cluster named by the shipper's certificate.
    pub cluster_id: ClusterId,
    pub dupid: DupId,
    pub table: String,
    /// The source partition.
    pub partition: PartitionId,
    /// The revision of the shipper's election for (dup, partition). A receiver refuses a
    /// session whose token is older than the newest it has seen for that partition.
    pub fencing_token: u64,
    /// What the stream carries.
    pub purpose: Purpose,
}

/// What a stream carries, named by its `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Log shipping: `Batch` and `Heartbeat`, answered by `Ack`.
    Log,
    /// Lane 0 of a checkpoint transfer (full duplication): the checkpoint at `decree` of the
    /// source database `lineage`. Answered by a `Welcome` listing what the target has staged;
    /// carries `Chunk` and `FileDone` frames and, last, `CheckpointDone`, answered by `Staged`.
    Checkpoint { lineage: String, decree: Decree },
    /// Another lane of the checkpoint transfer that the same (dup, partition, token) runs on
    /// lane 0: `Chunk` and `FileDone` frames only, no answer but an `Error`.
    Lane,
}

/// Receiver → shipper, the answer to `Hello`: where to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The highest source decree the target has made durable; shipping resumes after it.
    pub confirmed_decree: Decree,
    /// Checkpoint files the target already holds in its staging directory, complete or not,
    /// with the size and CRC-32C of what it holds. A file whose size and checksum match the
    /// manifest is skipped; a shorter one whose checksum matches that prefix resumes there.
    pub present_files: Vec<CheckpointFile>,
}

/// Shipper → receiver: the plog records `first_decree ..= last_decree`, zstd-compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_decree: Decree,
    pub last_decree: Decree,
    /// Number of records; `last_decree - first_decree + 1` (decrees are gap-free).
    pub count: u32,
    /// Length of the records' encoding before compression.
    pub raw_len: u32,
    pub zstd: Vec<u8>,
}

/// Receiver → shipper: every record up to `confirmed_decree` is durable on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub confirmed_decree: Decree,
}

/// Shipper → receiver, when there is nothing to ship: keeps the lag measurement true on an
/// idle partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The source's clock when it sent the heartbeat.
    pub source_timestamp_us: u64,
    /// The source partition's last committed decree at that time. Once the target has
    /// confirmed it, the target is caught up as of `source_timestamp_us`.
    pub committed_decree: Decree,
}

/// Shipper → receiver: `len` bytes of checkpoint file `file` starting at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub file: String,
    pub offset: u64,
    /// Uncompressed length of this piece of the file, at most [`MAX_CHUNK`].
    pub len: u32,
    /// CRC-32C of the uncompressed bytes.
    pub crc32c: u32,
    /// Whether `data` is zstd-compressed (it is sent raw where compression does not pay).
    pub compressed: bool,
    pub data: Vec<u8>,
}

/// Shipper → receiver: the last chunk of `file` has been sent; the whole file must now have
/// this size and CRC-32C.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDone {
    pub file: String,
    pub size: u64,
    pub crc32c: u32,
}

/// Shipper → receiver: every file of the checkpoint at `decree` has been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointDone {
    pub decree: Decree,
    pub file_count: u32,
    pub total_bytes: u64,
}

/// Receiver → shipper: every file of the checkpoint at `decree` is verified and durable on the
/// target. The target installs it once every source partition's is staged; log shipping then
/// resumes after `decree`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staged {
    pub decree: Decree,
}

/// Receiver → shipper, on a checkpoint lane: the first `chunks` chunks sent on this stream are
/// verified and staged. A shipper keeps at most a few chunks per lane unacknowledged, so what
/// a break makes it send again is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkAck {
    pub chunks: u64,
}

/// Either direction, last frame of a session: why the sender is ending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    /// A sentence for the operator; at most [`MAX_MESSAGE`] bytes.
    pub message: String,
}

/// Why a session ended. Unknown codes are kept as they are, so a newer peer's codes survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A frame did not decode.
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// The `Hello` carries a protocol version the receiver does not speak.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(2);
    /// The certificate's cluster is not in the duplication group, or is not `Hello.cluster_id`.
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(3);
    /// A newer shipper holds this (dup, partition): the fencing token is stale.
    pub const STALE_FENCING_TOKEN: ErrorCode = ErrorCode(4);
    /// The target has no such table, or no duplication for it.
    pub const UNKNOWN_TABLE: ErrorCode = ErrorCode(5);
    /// A frame arrived that the session's state does not allow (e.g. a `Batch` before `Hello`).
    pub const UNEXPECTED_FRAME: ErrorCode = ErrorCode(6);
    /// A batch did not unpack, or its records do not match its header.
    pub const BAD_BATCH: ErrorCode = ErrorCode(7);
    /// A checkpoint chunk or file failed its checksum.
    pub const CHECKSUM_MISMATCH: ErrorCode = ErrorCode(8);
    /// The target cannot take writes now (starting, fenced, shutting down); retry later.
    pub const UNAVAILABLE: ErrorCode = ErrorCode(9);
    /// Anything else; the message says what.
    pub const INTERNAL: ErrorCode = ErrorCode(10);
    /// The same shipper (same fencing token) opened a newer session for this partition, so this
    /// one ends. Not a lost election: a shipper that sees it on a session it still uses
    /// reconnects.
    pub const SUPERSEDED: ErrorCode = ErrorCode(11);
    /// The target's disk is full: nothing more is written until space frees. The sender keeps
    /// what it holds and retries; nothing is lost.
    pub const DISK_FULL: ErrorCode = ErrorCode(12);

    /// A short name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MALFORMED => "malformed",
            ErrorCode::UNSUPPORTED_VERSION => "unsupported_version",
            ErrorCode::UNAUTHORIZED => "unauthorized",
            ErrorCode::STALE_FENCING_TOKEN => "stale_fencing_token",
            ErrorCode::UNKNOWN_TABLE => "unknown_table",
            ErrorCode::UNEXPECTED_FRAME => "unexpected_frame",
            ErrorCode::BAD_BATCH => "bad_batch",
            ErrorCode::CHECKSUM_MISMATCH => "checksum_mismatch",
            ErrorCode::UNAVAILABLE => "unavailable",
            ErrorCode::INTERNAL => "internal",
            ErrorCode::SUPERSEDED => "superseded",
            ErrorCode::DISK_FULL => "disk_full",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, ThisError)]
pub enum WireError {
    /// The input ends before the frame does; `needed` more bytes would complete what is known
    /// of it so far. Read more and try again.
    #[error("frame is incomplete: {needed} more bytes needed")]
    Incomplete { needed: usize },
    /// The header claims a body larger than [`MAX_FRAME`].
    #[error("frame length {len} exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge { len: usize },
    /// The frame type byte is not one this version knows.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A `Hello` of another protocol version.
    #[error("protocol version {version} is not supported; this side speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion { version: u16 },
    /// A string, byte field or count is over its limit.
    #[error("{frame}.{field} has length {len}, over the limit of {max}")]
    FieldTooLong {
        frame: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// The body does not parse: a field runs past its end, bytes trail after the last field,
    /// or a value is out of range.
    #[error("malformed {frame} frame: {reason}")]
    Malformed {
        frame: &'static str,
        reason: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("{frame}.{field} is not valid UTF-8")]
    InvalidUtf8 {
        frame: &'static str,
        field: &'static str,
    },
    /// `unpack_batch`/`unpack_chunk`: the declared uncompressed size is over the caller's
    /// limit, so it was not decompressed.
    #[error("uncompressed size {len} exceeds the limit of {max} bytes")]
    RawTooLarge { len: usize, max: usize },
    /// zstd could not decompress the payload, or it decompressed to another size than declared.
    #[error("payload does not decompress: {0}")]
    Decompress(String),
    /// The batch's records do not match its header.
    #[error("batch does not match its header: {0}")]
    BadBatch(&'static str),
    /// A record inside a batch does not decode.
    #[error("bad record in batch: {0}")]
    Record(DecodeError),
    /// A chunk's data does not match its checksum.
    #[error(
        "chunk of `{file}` at offset {offset}: checksum {actual:#010x}, expected {expected:#010x}"
    )]
    ChunkChecksum {
        file: String,
        offset: u64,
        expected: u32,
        actual: u32,
    },
}

impl WireError {
    /// The code to put in the `Error` frame that ends a session over this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            WireError::RawTooLarge { .. }
            | WireError::Decompress(_)
            | WireError::BadBatch(_)
            | WireError::Record(_) => ErrorCode::BAD_BATCH,
            WireError::ChunkChecksum { .. } => ErrorCode::CHECKSUM_MISMATCH,
            WireError::Incomplete { .. }
            | WireError::TooLarge { .. }
            | WireError::UnknownFrameType(_)
            | WireError::FieldTooLong { .. }
            | WireError::Malformed { .. }
            | WireError::InvalidUtf8 { .. } => ErrorCode::MALFORMED,
        }
    }
}

impl Frame {
    /// The frame's name, as in the module docs.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }

    /// Checks every field against the limits [`decode`] enforces, so that a sender finds out
    /// before the peer does. [`encode`] assumes this holds.
    pub fn check_limits(&self) -> Result<(), WireError> {
        let frame = self.name();
        let field = |field, len, max| {
            if len > max {
                Err(WireError::FieldTooLong {
                    frame,
                    field,
                    len,
                    max,
                })
            } else {
                Ok(())
            }
        };
        match self {
            Frame::Hello(h) => {
                field("table", h.table.len(), MAX_NAME)?;
                if let Purpose::Checkpoint { lineage, .. } = &h.purpose {
                    field("lineage", lineage.len(), MAX_LINEAGE)?;
                }
            }
            Frame::Welcome(w) => {
                field("present_files", w.present_files.len(), MAX_PRESENT_FILES)?;
                for f in &w.present_files {
                    field("present_files.name", f.name.len(), MAX_NAME)?;
                }
            }
            Frame::Chunk(c) => {
                field("file", c.file.len(), MAX_NAME)?;
                field("len", c.len as usize, MAX_CHUNK)?;
            }
            Frame::FileDone(f) => field("file", f.file.len(), MAX_NAME)?,
            Frame::Error(e) => field("message", e.message.len(), MAX_MESSAGE)?,
            Frame::Batch(_)
            | Frame::Ack(_)
            | Frame::Heartbeat(_)
            | Frame::CheckpointDone(_)
            | Frame::Staged(_)
            | Frame::ChunkAck(_) => {}
        }
        let mut body = Vec::new();
        encode_body(self, &mut body);
        field("body", body.len(), MAX_FRAME)
    }

    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello(_) => T_HELLO,
            Frame::Welcome(_) => T_WELCOME,
            Frame::Batch(_) => T_BATCH,
            Frame::Ack(_) => T_ACK,
            Frame::Heartbeat(_) => T_HEARTBEAT,
            Frame::Chunk(_) => T_CHUNK,
            Frame::FileDone(_) => T_FILE_DONE,
            Frame::CheckpointDone(_) => T_CHECKPOINT_DONE,
            Frame::Staged(_) => T_STAGED,
            Frame::Error(_) => T_ERROR,
            Frame::ChunkAck(_) => T_CHUNK_ACK,
        }
    }
}

macro_rules! frame_from {
    ($($t:ident),*) => {$(
        impl From<$t> for Frame {
            fn from(f: $t) -> Frame {
                Frame::$t(f)
            }
        }
    )*};
}
frame_from!(
    Hello,
    Welcome,
    Batch,
    Ack,
    Heartbeat,
    Chunk,
    FileDone,
    CheckpointDone,
    Staged,
    Error,
    ChunkAck
);

/// Appends the encoded frame to `out`. The frame must be within the limits (see
/// [`Frame::check_limits`]); a frame over them is still written, and the peer refuses it.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(frame.type_byte());
    encode_body(frame, out);
    // Saturating: an over-long body then fails the peer's MAX_FRAME check instead of wrapping.
    let body_len = u32::try_from(out.len() - start - FRAME_HEADER_LEN).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
}

/// Decodes one frame from the front of `buf`, returning it and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<(Frame, usize), WireError> {
    let Some((header, rest)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(WireError::Incomplete {
            needed: FRAME_HEADER_LEN - buf.len(),
        });
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let ty = header[4];
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { len });
    }
    let Some(body) = rest.get(..len) else {
        return Err(WireError::Incomplete {
            needed: len - rest.len(),
        });
    };
    let frame = decode_body(ty, body)?;
    Ok((frame, FRAME_HEADER_LEN + len))
}

/// Packs records (in decree order, gap-free) into a batch: their plog encoding, concatenated
/// and compressed with zstd at `level` (clamped to zstd's range). The caller keeps the batch
/// well under [`MAX_FRAME`], as `duplicate_log_batch_bytes` does; an empty slice gives an
/// empty batch with decrees zero.
pub fn pack_batch(records: &[PlogRecord], level: i32) -> Batch {
    let mut raw = Vec::with_capacity(records.iter().map(PlogRecord::encoded_len).sum());
    for r in records {
        r.encode(&mut raw);
    }
    let levels = zstd::compression_level_range();
    let level = level.clamp(*levels.start(), *levels.end());
    Batch {
        first_decree: records.first().map_or(Decree::ZERO, |r| r.decree),
        last_decree: records.last().map_or(Decree::ZERO, |r| r.decree),
        count: u32::try_from(records.len()).unwrap_or(u32::MAX),
        raw_len: u32::try_from(raw.len()).unwrap_or(u32::MAX),
        zstd: compress(&raw, level),
    }
}

/// Decompresses and decodes a batch, after checking `raw_len` against `max_raw` (and the
/// count against what `raw_len` can hold) so that nothing large is allocated for a lying
/// header. The records must be exactly `count`, with decrees `first_decree ..= last_decree`
/// in order and without gaps.
pub fn unpack_batch(batch: &Batch, max_raw: usize) -> Result<Vec<PlogRecord>, WireError> {
    let raw_len = batch.raw_len as usize;
    if raw_len > max_raw {
        return Err(WireError::RawTooLarge {
            len: raw_len,
            max: max_raw,
        });
    }
    let count = batch.count as usize;
    if count > raw_len / MIN_RECORD_LEN {
        return Err(WireError::BadBatch("count is larger than raw_len can hold"));
    }
    if count == 0 {
        if raw_len != 0 || batch.first_decree != Decree::ZERO || batch.last_decree != Decree::ZERO {
            return Err(WireError::BadBatch(
                "an empty batch must have raw_len and decrees zero",
            ));
        }
    } else if batch.last_decree.0.checked_sub(batch.first_decree.0) != Some(count as u64 - 1) {
        return Err(WireError::BadBatch(
            "count is not last_decree - first_decree + 1",
        ));
    }
    let raw = decompress(&batch.zstd, raw_len)?;
    let mut records = Vec::with_capacity(count);
    let mut pos = 0;
    while let Some(rest) = raw.get(pos..).filter(|r| !r.is_empty()) {
        let (record, used) = PlogRecord::decode(rest).map_err(|e| match e {
            DecodeError::Incomplete { .. } => WireError::BadBatch("records end mid-record"),
            e => WireError::Record(e),
        })?;
        if records.len() == count {
            return Err(WireError::BadBatch("more records than count"));
        }
        let expected = Decree(batch.first_decree.0 + records.len() as u64);
        if record.decree != expected {
            return Err(WireError::BadBatch(
                "record decrees do not run first_decree ..= last_decree",
            ));
        }
        records.push(record);
        pos += used;
    }
    if records.len() != count {
        return Err(WireError::BadBatch("fewer records than count"));
    }
    Ok(records)
}

/// Bytes at the start of a chunk that are compressed first, to tell whether the whole chunk is
/// worth compressing: SST blocks are often compressed already, and compressing a MiB that does
/// not shrink costs more CPU than sending it.
const PROBE_BYTES: usize = 64 << 10;

/// Makes the chunk for `data`, the bytes of `file` at `offset`: compressed at `level` where
/// that saves at least an eighth (judged first on its first [`PROBE_BYTES`]), raw otherwise.
/// `data` must be at most [`MAX_CHUNK`] bytes.
pub fn pack_chunk(file: &str, offset: u64, data: &[u8], level: i32) -> Chunk {
    let levels = zstd::compression_level_range();
    let level = level.clamp(*levels.start(), *levels.end());
    let saves = |raw: &[u8], packed: &[u8]| packed.len() < raw.len() - raw.len() / 8;
    let probe = &data[..data.len().min(PROBE_BYTES)];
    let compressed = (probe.len() == data.len() || saves(probe, &compress(probe, level)))
        .then(|| compress(data, level))
        .filter(|c| saves(data, c));
    Chunk {
        file: file.to_owned(),
        offset,
        len: u32::try_from(data.len()).unwrap_or(u32::MAX),
        crc32c: crc32c::crc32c(data),
        compressed: compressed.is_some(),
        data: compressed.unwrap_or_else(|| data.to_vec()),
    }
}

/// The bytes a chunk carries, decompressed if needed, after checking their length and CRC-32C.
pub fn unpack_chunk(chunk: &Chunk) -> Result<Vec<u8>, WireError> {
    let len = chunk.len as usize;
    if len > MAX_CHUNK {
        return Err(WireError::RawTooLarge {
            len,
            max: MAX_CHUNK,
        });
    }
    let data = if chunk.compressed {
        decompress(&chunk.data, len)?
    } else if chunk.data.len() == len {
        chunk.data.clone()
    } else {
        return Err(WireError::Malformed {
            frame: "Chunk",
            reason: "raw data length differs from len",
        });
    };
    let actual = crc32c::crc32c(&data);
    if actual != chunk.crc32c {
        return Err(WireError::ChunkChecksum {
            file: chunk.file.clone(),
            offset: chunk.offset,
            expected: chunk.crc32c,
            actual,
        });
    }
    Ok(data)
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_BATCH: u8 = 3;
const T_ACK: u8 = 4;
const T_HEARTBEAT: u8 = 5;
const T_CHUNK: u8 = 6;
const T_FILE_DONE: u8 = 7;
const T_CHECKPOINT_DONE: u8 = 8;
const T_STAGED: u8 = 9;
const T_ERROR: u8 = 10;
const T_CHUNK_ACK: u8 = 11;

const CHUNK_FLAG_ZSTD: u8 = 1;

const PURPOSE_LOG: u8 = 0;
const PURPOSE_CHECKPOINT: u8 = 1;
const PURPOSE_LANE: u8 = 2;

/// Smallest encoded record: header plus decree, timetag and op count, no ops.
const MIN_RECORD_LEN: usize = RECORD_HEADER_LEN + 8 + 8 + 4;
/// Smallest encoded `Welcome` file entry: empty name, size, crc.
const MIN_FILE_ENTRY_LEN: usize = 4 + 8 + 4;

fn type_name(ty: u8) -> &'static str {
    match ty {
        T_HELLO => "Hello",
        T_WELCOME => "Welcome",
        T_BATCH => "Batch",
        T_ACK => "Ack",
        T_HEARTBEAT => "Heartbeat",
        T_CHUNK => "Chunk",
        T_FILE_DONE => "FileDone",
        T_CHECKPOINT_DONE => "CheckpointDone",
        T_STAGED => "Staged",
        T_ERROR => "Error",
        T_CHUNK_ACK => "ChunkAck",
        _ => "unknown",
    }
}

fn encode_body(frame: &Frame, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    match frame {
        Frame::Hello(h) => {
            w.u16(h.version);
            w.u8(h.cluster_id.get());
            w.u64(h.dupid.0);
            w.bytes(h.table.as_bytes());
            w.u32(h.partition.0);
            w.u64(h.fencing_token);
            match &h.purpose {
                Purpose::Log => w.u8(PURPOSE_LOG),
                Purpose::Checkpoint { lineage, decree } => {
                    w.u8(PURPOSE_CHECKPOINT);
                    w.bytes(lineage.as_bytes());
                    w.u64(decree.0);
                }
                Purpose::Lane => w.u8(PURPOSE_LANE),
            }
        }
        Frame::Welcome(wl) => {
            w.u64(wl.confirmed_decree.0);
            w.len(wl.present_files.len());
            for f in &wl.present_files {
                w.bytes(f.name.as_bytes());
                w.u64(f.size);
                w.u32(f.crc32c);
            }
        }
        Frame::Batch(b) => {
            w.u64(b.first_decree.0);
            w.u64(b.last_decree.0);
            w.u32(b.count);
            w.u32(b.raw_len);
            w.bytes(&b.zstd);
        }
        Frame::Ack(a) => w.u64(a.confirmed_decree.0),
        Frame::Heartbeat(h) => {
            w.u64(h.source_timestamp_us);
            w.u64(h.committed_decree.0);
        }
        Frame::Chunk(c) => {
            w.bytes(c.file.as_bytes());
            w.u64(c.offset);
            w.u32(c.len);
            w.u32(c.crc32c);
            w.u8(if c.compressed { CHUNK_FLAG_ZSTD } else { 0 });
            w.bytes(&c.data);
        }
        Frame::FileDone(f) => {
            w.bytes(f.file.as_bytes());
            w.u64(f.size);
            w.u32(f.crc32c);
        }
        Frame::CheckpointDone(c) => {
            w.u64(c.decree.0);
            w.u32(c.file_count);
            w.u64(c.total_bytes);
        }
        Frame::Staged(i) => w.u64(i.decree.0),
        Frame::ChunkAck(a) => w.u64(a.chunks),
        Frame::Error(e) => {
            w.u16(e.code.0);
            w.bytes(e.message.as_bytes());
        }
    }
}

fn decode_body(ty: u8, body: &[u8]) -> Result<Frame, WireError> {
    let mut r = Reader {
        frame: type_name(ty),
        buf: body,
    };
    let frame = match ty {
        T_HELLO => {
            let version = r.u16()?;
            if version != PROTOCOL_VERSION {
                return Err(WireError::UnsupportedVersion { version });
            }
            let cluster_id = ClusterId::new(r.u8()?).ok_or(WireError::Malformed {
                frame: "Hello",
                reason: "cluster_id is not in 1..=127",
            })?;
            Frame::Hello(Hello {
                version,
                cluster_id,
                dupid: DupId(r.u64()?),
                table: r.string("table", MAX_NAME)?,
                partition: PartitionId(r.u32()?),
                fencing_token: r.u64()?,
                purpose: match r.u8()? {
                    PURPOSE_LOG => Purpose::Log,
                    PURPOSE_CHECKPOINT => Purpose::Checkpoint {
                        lineage: r.string("lineage", MAX_LINEAGE)?,
                        decree: Decree(r.u64()?),
                    },
                    PURPOSE_LANE => Purpose::Lane,
                    _ => {
                        return Err(
                            r.malformed("purpose is not 0 (log), 1 (checkpoint) or 2 (lane)")
                        )
                    }
                },
            })
        }
        T_WELCOME => {
            let confirmed_decree = Decree(r.u64()?);
            let n = r.count("present_files", MAX_PRESENT_FILES, MIN_FILE_ENTRY_LEN)?;
            let mut present_files = Vec::with_capacity(n);
            for _ in 0..n {
                present_files.push(CheckpointFile {
                    name: r.string("present_files.name", MAX_NAME)?,
                    size: r.u64()?,
                    crc32c: r.u32()?,
                });
            }
            Frame::Welcome(Welcome {
                confirmed_decree,
                present_files,
            })
        }
        T_BATCH => Frame::Batch(Batch {
            first_decree: Decree(r.u64()?),
            last_decree: Decree(r.u64()?),
            count: r.u32()?,
            raw_len: r.u32()?,
            zstd: r.bytes("zstd", MAX_FRAME)?.to_vec(),
        }),
        T_ACK => Frame::Ack(Ack {
            confirmed_decree: Decree(r.u64()?),
        }),
        T_HEARTBEAT => Frame::Heartbeat(Heartbeat {
            source_timestamp_us: r.u64()?,
            committed_decree: Decree(r.u64()?),
        }),
        T_CHUNK => {
            let file = r.string("file", MAX_NAME)?;
            let offset = r.u64()?;
            let len = r.u32()?;
            if len as usize > MAX_CHUNK {
                return Err(WireError::FieldTooLong {
                    frame: "Chunk",
                    field: "len",
                    len: len as usize,
                    max: MAX_CHUNK,
                });
            }
            let crc32c = r.u32()?;
            let compressed = match r.u8()? {
                0 => false,
                CHUNK_FLAG_ZSTD => true,
                _ => {
                    return Err(WireError::Malformed {
                        frame: "Chunk",
                        reason: "unknown flags",
                    })
                }
            };
            Frame::Chunk(Chunk {
                file,
                offset,
                len,
                crc32c,
                compressed,
                data: r.bytes("data", MAX_FRAME)?.to_vec(),
            })
        }
        T_FILE_DONE => Frame::FileDone(FileDone {
            file: r.string("file", MAX_NAME)?,
            size: r.u64()?,
            crc32c: r.u32()?,
        }),
        T_CHECKPOINT_DONE => Frame::CheckpointDone(CheckpointDone {
            decree: Decree(r.u64()?),
            file_count: r.u32()?,
            total_bytes: r.u64()?,
        }),
        T_STAGED => Frame::Staged(Staged {
            decree: Decree(r.u64()?),
        }),
        T_CHUNK_ACK => Frame::ChunkAck(ChunkAck { chunks: r.u64()? }),
        T_ERROR => Frame::Error(Error {
            code: ErrorCode(r.u16()?),
            message: r.string("message", MAX_MESSAGE)?,
        }),
        _ => return Err(WireError::UnknownFrameType(ty)),
    };
    if !r.buf.is_empty() {
        return Err(r.malformed("trailing bytes after the last field"));
    }
    Ok(frame)
}

thread_local! {
    /// One zstd context of each kind per thread, reused: creating one costs more than
    /// compressing a small batch. Batches are packed and unpacked on blocking-pool threads, which
    /// live on between batches.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// zstd's compression of an in-memory buffer fails only for an invalid level or when out of
/// memory; the level is clamped to zstd's range by every caller.
fn compress(data: &[u8], level: i32) -> Vec<u8> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let reused = match cell.as_mut() {
            Some(c) => c.set_compression_level(level).is_ok(),
            None => false,
        };
        if !reused {
            *cell = zstd::bulk::Compressor::new(level).ok();
        }
        match cell.as_mut() {
            Some(c) => c.compress(data),
            None => zstd::bulk::compress(data, level),
        }
        .expect("zstd compresses memory at a valid level")
    })
}

/// Decompresses into at most `len` bytes (allocated up front, so `len` must already be
/// bounded) and requires exactly `len`.
fn decompress(data: &[u8], len: usize) -> Result<Vec<u8>, WireError> {
    let raw = DECOMPRESSOR
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = zstd::bulk::Decompressor::new().ok();
            }
            match cell.as_mut() {
                Some(d) => d.decompress(data, len),
                None => zstd::bulk::decompress(data, len),
            }
        })
        .map_err(|e| WireError::Decompress(e.to_string()))?;
    if raw.len() != len {
        return Err(WireError::Decompress(format!(
            "{} bytes, but the header says {len}",
            raw.len()
        )));
    }
    Ok(raw)
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// A length or count; saturating, so that an over-limit value is refused by the peer
    /// rather than wrapped into a wrong but valid-looking one.
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
}

/// A cursor over a complete frame body; running out of bytes here means the body lies about
/// its own contents, which is `Malformed`, not `Incomplete`.
struct Reader<'a> {
    frame: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn malformed(&self, reason: &'static str) -> WireError {
        WireError::Malformed {
            frame: self.frame,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(self.malformed("a field runs past the end of the frame"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length-prefixed byte field of at most `max` bytes, borrowed from the input.
    fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::FieldTooLong {
                frame: self.frame,
                field,
                len: n,
                max,
            });
        }
        self.take(n)
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let b = self.bytes(field, max)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| WireError::InvalidUtf8 {
                frame: self.frame,
                field,
            })
    }

    /// A count of entries of at least `min_entry` bytes each: bounded by `max` and by what the
    /// rest of the body can hold, so the caller may allocate for it.
    fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_entry: usize,
    ) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::FieldTooLong {
                frame: self.frame,
                field,
                len: n,
                max,
            });
        }
        if n > self.buf.len() / min_entry {
            return Err(self.malformed("count larger than the frame can hold"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::Op;
    use crate::timetag::Timetag;

    fn name(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[a-zA-Z0-9_.é-]{{0,{}}}", max.min(40)))
            .expect("valid regex")
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..200)
    }

    fn decree() -> impl Strategy<Value = Decree> {
        any::<u64>().prop_map(Decree)
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let file = || {
            (name(MAX_NAME), any::<u64>(), any::<u32>())
                .prop_map(|(name, size, crc32c)| CheckpointFile { name, size, crc32c })
        };
        prop_oneof![
            (
                1..=ClusterId::MAX,
                any::<u64>(),
                name(MAX_NAME),
                any::<u32>(),
                any::<u64>(),
                prop_oneof![
                    Just(Purpose::Log),
                    Just(Purpose::Lane),
                    (name(MAX_LINEAGE), decree())
                        .prop_map(|(lineage, decree)| Purpose::Checkpoint { lineage, decree }),
                ],
            )
                .prop_map(|(c, d, table, p, fencing_token, purpose)| Frame::Hello(
                    Hello {
                        version: PROTOCOL_VERSION,
                        cluster_id: ClusterId::new(c).expect("in range"),
                        dupid: DupId(d),
                        table,
                        partition: PartitionId(p),
                        fencing_token,
                        purpose,
                    }
                )),
            (decree(), proptest::collection::vec(file(), 0..6)).prop_map(
                |(confirmed_decree, present_files)| Frame::Welcome(Welcome {
                    confirmed_decree,
                    present_files
                })
            ),
            (decree(), decree(), any::<u32>(), any::<u32>(), bytes()).prop_map(
                |(first_decree, last_decree, count, raw_len, zstd)| Frame::Batch(Batch {
                    first_decree,
                    last_decree,
                    count,
                    raw_len,
                    zstd
                })
            ),
            decree().prop_map(|confirmed_decree| Frame::Ack(Ack { confirmed_decree })),
            (any::<u64>(), decree()).prop_map(|(source_timestamp_us, committed_decree)| {
                Frame::Heartbeat(Heartbeat {
                    source_timestamp_us,
                    committed_decree,
                })
            }),
            (
                name(MAX_NAME),
                any::<u64>(),
                0..=MAX_CHUNK as u32,
                any::<u32>(),
                any::<bool>(),
                bytes()
            )
                .prop_map(|(file, offset, len, crc32c, compressed, data)| {
                    Frame::Chunk(Chunk {
                        file,
                        offset,
                        len,
                        crc32c,
                        compressed,
                        data,
                    })
                }),
            (name(MAX_NAME), any::<u64>(), any::<u32>())
                .prop_map(|(file, size, crc32c)| Frame::FileDone(FileDone { file, size, crc32c })),
            (decree(), any::<u32>(), any::<u64>()).prop_map(|(decree, file_count, total_bytes)| {
                Frame::CheckpointDone(CheckpointDone {
                    decree,
                    file_count,
                    total_bytes,
                })
            }),
            decree().prop_map(|decree| Frame::Staged(Staged { decree })),
            any::<u64>().prop_map(|chunks| Frame::ChunkAck(ChunkAck { chunks })),
            (any::<u16>(), name(MAX_MESSAGE)).prop_map(|(code, message)| Frame::Error(Error {
                code: ErrorCode(code),
                message
            })),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let b = || proptest::collection::vec(any::<u8>(), 0..40);
        prop_oneof![
            (b(), b(), any::<u64>()).prop_map(|(key, value, expire_at_ms)| Op::Put {
                key,
                value,
                expire_at_ms
            }),
            b().prop_map(|key| Op::Delete { key }),
        ]
    }

    /// Consecutive records starting at a random decree, as a shipper reads them from the plog.
    fn records() -> impl Strategy<Value = Vec<PlogRecord>> {
        (
            1..u64::MAX / 2,
            proptest::collection::vec((any::<u64>(), proptest::collection::vec(op(), 0..4)), 0..20),
        )
            .prop_map(|(first, recs)| {
                recs.into_iter()
                    .enumerate()
                    .map(|(i, (t, ops))| PlogRecord {
                        decree: Decree(first + i as u64),
                        timetag: Timetag(t),
                        ops,
                    })
                    .collect()
            })
    }

    /// Heap bytes a decoded frame holds, counting capacity: must stay proportional to input.
    fn heap_bytes(frame: &Frame) -> usize {
        match frame {
            Frame::Hello(h) => h.table.capacity(),
            Frame::Welcome(w) => {
                w.present_files.capacity() * std::mem::size_of::<CheckpointFile>()
                    + w.present_files
                        .iter()
                        .map(|f| f.name.capacity())
                        .sum::<usize>()
            }
            Frame::Batch(b) => b.zstd.capacity(),
            Frame::Chunk(c) => c.file.capacity() + c.data.capacity(),
            Frame::FileDone(f) => f.file.capacity(),
            Frame::Error(e) => e.message.capacity(),
            Frame::Ack(_)
            | Frame::Heartbeat(_)
            | Frame::CheckpointDone(_)
            | Frame::Staged(_)
            | Frame::ChunkAck(_) => 0,
        }
    }

    /// What `heap_bytes` may be for an input of `len` bytes: each Welcome entry takes at least
    /// MIN_FILE_ENTRY_LEN input bytes for its in-memory size.
    fn heap_bound(len: usize) -> usize {
        len * std::mem::size_of::<CheckpointFile>().div_ceil(MIN_FILE_ENTRY_LEN) + len
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(frame, &mut buf);
        buf
    }

    proptest! {
        // Cheap cases, and the decoder is the first thing a hostile peer reaches: run many.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn round_trip(frame in frame()) {
            prop_assert_eq!(frame.check_limits(), Ok(()));
            let buf = encoded(&frame);
            let (back, used) = decode(&buf).expect("decode what we encoded");
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn sequence_round_trip(frames in proptest::collection::vec(frame(), 0..6)) {
            let mut buf = Vec::new();
            for f in &frames { encode(f, &mut buf); }
            let mut pos = 0;
            let mut back = Vec::new();
            while pos < buf.len() {
                let (f, n) = decode(&buf[pos..]).expect("decode sequence");
                back.push(f);
                pos += n;
            }
            prop_assert_eq!(back, frames);
        }

        /// Every strict prefix of a frame is `Incomplete`, and says how much more is needed at
        /// most: reading that much more never overshoots the frame.
        #[test]
        fn prefixes_are_incomplete(frame in frame(), cut in 0usize..10_000) {
            let buf = encoded(&frame);
            let cut = cut % buf.len();
            match decode(&buf[..cut]) {
                Err(WireError::Incomplete { needed }) => {
                    prop_assert!(needed >= 1 && cut + needed <= buf.len(), "cut {} needed {}", cut, needed)
                }
                other => prop_assert!(false, "cut at {}: {:?}", cut, other),
            }
        }

        /// Any byte string: no panic, nothing decoded claims more bytes than given, and what is
        /// decoded holds memory proportional to the input.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok((frame, used)) = decode(&buf) {
                prop_assert!(used <= buf.len());
                prop_assert!(heap_bytes(&frame) <= heap_bound(buf.len()));
            }
        }

        /// A valid header of every type over an arbitrary body, to reach deep into each parser.
        #[test]
        fn arbitrary_bodies_never_panic(ty in 0u8..12, body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = Vec::new();
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.push(ty);
            buf.extend_from_slice(&body);
            match decode(&buf) {
                Ok((frame, used)) => {
                    prop_assert_eq!(used, buf.len());
                    prop_assert!(heap_bytes(&frame) <= heap_bound(buf.len()));
                    // Whatever decodes re-encodes to the same bytes.
                    prop_assert_eq!(encoded(&frame), buf);
                }
                Err(e) => prop_assert!(!matches!(e, WireError::Incomplete { .. }), "{:?}", e),
            }
        }

        /// Flipping a byte of a valid frame: no panic, and never `Incomplete` with a complete
        /// frame unless the flip was in the length.
        #[test]
        fn corrupted_frames_never_panic(frame in frame(), pos in 0usize..10_000, x in 1u8..=255) {
            let mut buf = encoded(&frame);
            let pos = pos % buf.len();
            buf[pos] ^= x;
            if let Ok((f, used)) = decode(&buf) {
                prop_assert!(used <= buf.len());
                prop_assert!(heap_bytes(&f) <= heap_bound(buf.len()));
            }
        }

        #[test]
        fn batch_round_trip(recs in records(), level in -5i32..=25) {
            let batch = pack_batch(&recs, level);
            prop_assert_eq!(batch.count as usize, recs.len());
            let frame = Frame::Batch(batch);
            let (back, _) = decode(&encoded(&frame)).expect("decode batch frame");
            let Frame::Batch(batch) = back else { panic!("not a batch: {back:?}") };
            let unpacked = unpack_batch(&batch, MAX_FRAME).expect("unpack");
            prop_assert_eq!(unpacked, recs);
        }

        /// A batch whose header lies about its records is refused, whatever the lie.
        #[test]
        fn lying_batch_headers_are_refused(recs in records(), field in 0..4u8, delta in 1u64..5) {
            prop_assume!(!recs.is_empty());
            let mut batch = pack_batch(&recs, 3);
            match field {
                0 => batch.first_decree = Decree(batch.first_decree.0.wrapping_add(delta)),
                1 => batch.last_decree = Decree(batch.last_decree.0.wrapping_add(delta)),
                2 => batch.count = batch.count.wrapping_add(delta as u32),
                _ => batch.raw_len = batch.raw_len.wrapping_sub(delta as u32),
            }
            prop_assert!(unpack_batch(&batch, MAX_FRAME).is_err());
        }

        #[test]
        fn chunk_round_trip(data in proptest::collection::vec(any::<u8>(), 0..2000), zeros in any::<bool>(), offset in any::<u64>()) {
            // Zeros compress; random bytes do not: both paths are taken.
            let data = if zeros { vec![0; data.len()] } else { data };
            let chunk = pack_chunk("000042.sst", offset, &data, 3);
            if zeros && data.len() >= 64 {
                prop_assert!(chunk.compressed, "zeros compress");
            }
            let (back, _) = decode(&encoded(&Frame::Chunk(chunk))).expect("decode chunk frame");
            let Frame::Chunk(chunk) = back else { panic!("not a chunk: {back:?}") };
            prop_assert_eq!(unpack_chunk(&chunk).expect("unpack chunk"), data);
        }
    }

    fn header(len: u32, ty: u8) -> Vec<u8> {
        let mut buf = len.to_le_bytes().to_vec();
        buf.push(ty);
        buf
    }

    #[test]
    fn oversized_frame_is_refused_before_its_body_arrives() {
        let buf = header(MAX_FRAME as u32 + 1, T_BATCH);
        assert_eq!(
            decode(&buf),
            Err(WireError::TooLarge { len: MAX_FRAME + 1 })
        );
    }

    #[test]
    fn huge_string_length_is_refused_without_allocating() {
        let mut body = PROTOCOL_VERSION.to_le_bytes().to_vec();
        body.push(1);
        body.extend_from_slice(&7u64.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = header(body.len() as u32, T_HELLO);
        buf.extend_from_slice(&body);
        assert_eq!(
            decode(&buf),
            Err(WireError::FieldTooLong {
                frame: "Hello",
                field: "table",
                len: u32::MAX as usize,
                max: MAX_NAME
            })
        );
    }

    #[test]
    fn huge_present_files_count_is_refused() {
        for (count, limit) in [(u32::MAX, true), (1000, false)] {
            let mut body = 5u64.to_le_bytes().to_vec();
            body.extend_from_slice(&count.to_le_bytes());
            let mut buf = header(body.len() as u32, T_WELCOME);
            buf.extend_from_slice(&body);
            let err = decode(&buf).expect_err("count exceeds the body");
            assert_eq!(
                matches!(err, WireError::FieldTooLong { .. }),
                limit,
                "{err:?}"
            );
        }
    }

    #[test]
    fn other_versions_and_cluster_ids_are_refused() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            cluster_id: ClusterId::new(3).expect("in range"),
            dupid: DupId(9),
            table: "users".into(),
            partition: PartitionId(2),
            fencing_token: 17,
            purpose: Purpose::Log,
        };
        let mut buf = encoded(&Frame::Hello(hello.clone()));
        buf[FRAME_HEADER_LEN] = 1;
        let err = decode(&buf).expect_err("version 1");
        assert_eq!(err, WireError::UnsupportedVersion { version: 1 });

        let mut buf = encoded(&Frame::Hello(hello.clone()));
        let last = buf.len() - 1;
        buf[last] = 7;
        assert!(
            matches!(decode(&buf), Err(WireError::Malformed { .. })),
            "unknown purpose"
        );
        assert_eq!(err.code(), ErrorCode::UNSUPPORTED_VERSION);

        let mut buf = encoded(&Frame::Hello(hello));
        buf[FRAME_HEADER_LEN + 2] = 0;
        assert!(matches!(decode(&buf), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn unknown_type_and_trailing_bytes_are_malformed() {
        let buf = header(0, 99);
        assert_eq!(decode(&buf), Err(WireError::UnknownFrameType(99)));

        let mut buf = header(9, T_ACK);
        buf.extend_from_slice(&[0; 9]);
        assert_eq!(
            decode(&buf),
            Err(WireError::Malformed {
                frame: "Ack",
                reason: "trailing bytes after the last field"
            })
        );
    }

    #[test]
    fn batch_raw_len_is_bounded_before_decompressing() {
        let recs = vec![PlogRecord {
            decree: Decree(1),
            timetag: Timetag(1 << 8),
            ops: vec![Op::Put {
                key: b"k".to_vec(),
                value: vec![0; 10_000],
                expire_at_ms: 0,
            }],
        }];
        let batch = pack_batch(&recs, 3);
        assert_eq!(
            unpack_batch(&batch, 1000),
            Err(WireError::RawTooLarge {
                len: batch.raw_len as usize,
                max: 1000
            })
        );
        // A zstd bomb: the payload decompresses to more than raw_len says.
        let mut bomb = batch.clone();
        bomb.raw_len = 100;
        assert!(matches!(
            unpack_batch(&bomb, MAX_FRAME),
            Err(WireError::Decompress(_))
        ));
        let mut garbage = batch;
        garbage.zstd = vec![1, 2, 3];
        assert!(matches!(
            unpack_batch(&garbage, MAX_FRAME),
            Err(WireError::Decompress(_))
        ));
    }

    #[test]
    fn batch_with_a_gap_is_refused() {
        let rec = |d| PlogRecord {
            decree: Decree(d),
            timetag: Timetag(d << 8),
            ops: vec![],
        };
        let mut batch = pack_batch(&[rec(5), rec(7)], 3);
        // Headers consistent with each other but not with the records.
        batch.last_decree = Decree(6);
        assert_eq!(
            unpack_batch(&batch, MAX_FRAME),
            Err(WireError::BadBatch(
                "record decrees do not run first_decree ..= last_decree"
            ))
        );
    }

    #[test]
    fn empty_batch_round_trips() {
        let batch = pack_batch(&[], 3);
        assert_eq!(unpack_batch(&batch, MAX_FRAME), Ok(vec![]));
    }

    #[test]
    fn a_mib_chunk_is_compressed_only_where_its_probe_shrinks() {
        let random = crate::random_bytes(MAX_CHUNK.min(1 << 20));
        let zeros = vec![0u8; random.len()];
        for (data, compressible) in [(&random, false), (&zeros, true)] {
            let chunk = pack_chunk("000007.sst", 0, data, 1);
            assert_eq!(chunk.compressed, compressible);
            assert_eq!(unpack_chunk(&chunk).expect("unpack"), *data);
        }
    }

    #[test]
    fn corrupted_chunk_fails_its_checksum() {
        let mut chunk = pack_chunk("000001.sst", 4096, b"some bytes of an sst file", 3);
        assert!(!chunk.compressed);
        chunk.data[0] ^= 1;
        assert!(matches!(
            unpack_chunk(&chunk),
            Err(WireError::ChunkChecksum { offset: 4096, .. })
        ));
    }

    #[test]
    fn limits_are_checked_before_sending() {
        let frame = Frame::Error(Error {
            code: ErrorCode::INTERNAL,
            message: "x".repeat(MAX_MESSAGE + 1),
        });
        assert!(matches!(
            frame.check_limits(),
            Err(WireError::FieldTooLong {
                field: "message",
                ..
            })
        ));
        // Encoded anyway, the peer refuses it rather than misreading it.
        assert!(matches!(
            decode(&encoded(&frame)),
            Err(WireError::FieldTooLong { .. })
        ));
    }
}
