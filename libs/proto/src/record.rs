//! The plog record: one committed write of one partition.
//!
//! ```text
//! record = len: u32 LE | crc: u32 LE | body            (len = body length, crc = CRC-32C of body)
//! body   = decree: u64 LE | timetag: u64 LE | op_count: u32 LE | op*
//! op     = 1u8 | key_len: u32 LE | key | value_len: u32 LE | value | expire_at_ms: u64 LE   (put)
//!        | 2u8 | key_len: u32 LE | key                                                    (delete)
//! ```
//!
//! The record's timetag never has the delete flag; a delete op stores it with the flag set. The
//! same bytes are used in the plog, in the target's inbox and inside shipped batches. Every length
//! is checked against the bytes actually present before anything is allocated, so no input can
//! make the decoder panic or allocate more than the input's size.

use thiserror::Error;

use crate::ids::Decree;
use crate::timetag::Timetag;

/// Bytes of the `len | crc` record header.
pub const RECORD_HEADER_LEN: usize = 8;
/// Upper bound on a record body; see [`crate::limits`].
pub use crate::limits::MAX_RECORD_BODY;

const BODY_FIXED_LEN: usize = 8 + 8 + 4;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
/// Smallest encoded op (a delete of the empty key), used to bound `op_count`.
const MIN_OP_LEN: usize = 1 + 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        expire_at_ms: u64,
    },
    Delete {
        key: Vec<u8>,
    },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Op::Put { key, value, .. } => 1 + 4 + key.len() + 4 + value.len() + 8,
            Op::Delete { key } => 1 + 4 + key.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlogRecord {
    pub decree: Decree,
    pub timetag: Timetag,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ends before the record does; `needed` more bytes would complete what is known
    /// of it so far. At the end of a log this is a torn tail.
    #[error("record is incomplete: {needed} more bytes needed")]
    Incomplete { needed: usize },
    /// The header claims a body larger than [`MAX_RECORD_BODY`].
    #[error("record length {len} exceeds the limit of {MAX_RECORD_BODY} bytes")]
    TooLarge { len: usize },
    /// The body's CRC-32C does not match the header.
    #[error("record checksum mismatch: header says {expected:#010x}, body has {actual:#010x}")]
    BadChecksum { expected: u32, actual: u32 },
    /// The checksum matched but the body does not parse.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

impl PlogRecord {
    /// Length of the body (without the 8-byte header).
    pub fn body_len(&self) -> usize {
        BODY_FIXED_LEN + self.ops.iter().map(Op::encoded_len).sum::<usize>()
    }

    /// Full encoded length, header included.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.body_len()
    }

    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(self.encoded_len());
        out.extend_from_slice(&[0; RECORD_HEADER_LEN]);
        out.extend_from_slice(&self.decree.0.to_le_bytes());
        out.extend_from_slice(&self.timetag.0.to_le_bytes());
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        for op in &self.ops {
            match op {
                Op::Put {
                    key,
                    value,
                    expire_at_ms,
                } => {
                    out.push(OP_PUT);
                    put_bytes(out, key);
                    put_bytes(out, value);
                    out.extend_from_slice(&expire_at_ms.to_le_bytes());
                }
                Op::Delete { key } => {
                    out.push(OP_DELETE);
                    put_bytes(out, key);
                }
            }
        }
        let body_len = (out.len() - start - RECORD_HEADER_LEN) as u32;
        let crc = crc32c::crc32c(&out[start + RECORD_HEADER_LEN..]);
        out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one record from the front of `buf`, returning it and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(PlogRecord, usize), DecodeError> {
        let body = frame(buf)?;
        let record = decode_body(body)?;
        Ok((record, RECORD_HEADER_LEN + body.len()))
    }

    /// Reads only the decree of the record at the front of `buf`, after checking its frame and
    /// checksum. Cheaper than [`PlogRecord::decode`] when the ops are not needed.
    pub fn peek_decree(buf: &[u8]) -> Result<(Decree, usize), DecodeError> {
        let body = frame(buf)?;
        let mut r = Reader(body);
        let decree = Decree(r.u64()?);
        Ok((decree, RECORD_HEADER_LEN + body.len()))
    }
}

/// Checks the header and checksum and returns the body.
fn frame(buf: &[u8]) -> Result<&[u8], DecodeError> {
    let Some((header, rest)) = buf.split_first_chunk::<RECORD_HEADER_LEN>() else {
        return Err(DecodeError::Incomplete {
            needed: RECORD_HEADER_LEN - buf.len(),
        });
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let expected = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_BODY {
        return Err(DecodeError::TooLarge { len });
    }
    if len < BODY_FIXED_LEN {
        return Err(DecodeError::Malformed(
            "record body shorter than its fixed fields",
        ));
    }
    let Some(body) = rest.get(..len) else {
        return Err(DecodeError::Incomplete {
            needed: len - rest.len(),
        });
    };
    let actual = crc32c::crc32c(body);
    if actual != expected {
        return Err(DecodeError::BadChecksum { expected, actual });
    }
    Ok(body)
}

fn decode_body(body: &[u8]) -> Result<PlogRecord, DecodeError> {
    let mut r = Reader(body);
    let decree = Decree(r.u64()?);
    let timetag = Timetag(r.u64()?);
    let count = r.u32()? as usize;
    if count > r.0.len() / MIN_OP_LEN {
        return Err(DecodeError::Malformed(
            "op count larger than the body can hold",
        ));
    }
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let op = match r.u8()? {
            OP_PUT => {
                let key = r.bytes()?.to_vec();
                let value = r.bytes()?.to_vec();
                Op::Put {
                    key,
                    value,
                    expire_at_ms: r.u64()?,
                }
            }
            OP_DELETE => Op::Delete {
                key: r.bytes()?.to_vec(),
            },
            _ => return Err(DecodeError::Malformed("unknown op kind")),
        };
        ops.push(op);
    }
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes after the last op"));
    }
    Ok(PlogRecord {
        decree,
        timetag,
        ops,
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A cursor over a checksummed body; running out of bytes here means the body lies about its
/// own contents, which is `Malformed`, not `Incomplete`.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.0.len() {
            return Err(DecodeError::Malformed(
                "field runs past the end of the record",
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn op() -> impl Strategy<Value = Op> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        prop_oneof![
            (bytes(), bytes(), any::<u64>()).prop_map(|(key, value, expire_at_ms)| Op::Put {
                key,
                value,
                expire_at_ms
            }),
            bytes().prop_map(|key| Op::Delete { key }),
        ]
    }

    fn record() -> impl Strategy<Value = PlogRecord> {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(op(), 0..8),
        )
            .prop_map(|(d, t, ops)| PlogRecord {
                decree: Decree(d),
                timetag: Timetag(t),
                ops,
            })
    }

    proptest! {
        #[test]
        fn round_trip(rec in record()) {
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            prop_assert_eq!(buf.len(), rec.encoded_len());
            let (back, used) = PlogRecord::decode(&buf).expect("decode what we encoded");
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(back, rec.clone());
            prop_assert_eq!(PlogRecord::peek_decree(&buf), Ok((rec.decree, buf.len())));
        }

        #[test]
        fn sequence_round_trip(recs in proptest::collection::vec(record(), 0..6)) {
            let mut buf = Vec::new();
            for r in &recs { r.encode(&mut buf); }
            let mut pos = 0;
            let mut back = Vec::new();
            while pos < buf.len() {
                let (r, n) = PlogRecord::decode(&buf[pos..]).expect("decode sequence");
                back.push(r);
                pos += n;
            }
            prop_assert_eq!(back, recs);
        }

        /// Any byte string: no panic, and nothing decoded claims more bytes than it was given.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok((rec, used)) = PlogRecord::decode(&buf) {
                prop_assert!(used <= buf.len());
                prop_assert!(rec.ops.len() <= buf.len());
            }
        }

        /// A valid header and checksum over garbage: still no panic, and the op count can't
        /// trigger a large allocation.
        #[test]
        fn checksummed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 20..512)) {
            let mut buf = Vec::new();
            buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            if let Ok((rec, _)) = PlogRecord::decode(&buf) {
                prop_assert!(rec.ops.len() <= body.len() / MIN_OP_LEN);
            }
        }

        /// Every strict prefix of a record is `Incomplete`, never a wrong record.
        #[test]
        fn prefixes_are_incomplete(rec in record(), cut in 0usize..1000) {
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            let cut = cut % buf.len();
            prop_assert!(
                matches!(PlogRecord::decode(&buf[..cut]), Err(DecodeError::Incomplete { .. })),
                "cut at {}", cut
            );
        }

        /// Flipping any bit of the body is caught by the checksum.
        #[test]
        fn bit_flips_are_caught(rec in record(), pos in 0usize..10_000, bit in 0u8..8) {
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            let pos = RECORD_HEADER_LEN + pos % (buf.len() - RECORD_HEADER_LEN);
            buf[pos] ^= 1 << bit;
            prop_assert!(
                matches!(PlogRecord::decode(&buf), Err(DecodeError::BadChecksum { .. })),
                "flip at {}", pos
            );
        }
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut buf = vec![0xff, 0xff, 0xff, 0x7f];
        buf.extend_from_slice(&[0; 4]);
        assert!(matches!(
            PlogRecord::decode(&buf),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn huge_op_count_is_refused() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = Vec::new();
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        buf.extend_from_slice(&body);
        assert_eq!(
            PlogRecord::decode(&buf),
            Err(DecodeError::Malformed(
                "op count larger than the body can hold"
            ))
        );
    }
}
