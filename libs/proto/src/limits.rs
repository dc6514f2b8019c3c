//! The size limits that several processes must agree on, in one place. They nest, so that
//! anything a node acknowledged can always be shipped:
//!
//! a write's ops ≤ [`MAX_WRITE_BYTES`] < a plog record body ≤ [`MAX_RECORD_BODY`];
//! a batch's raw bytes ≤ [`MAX_BATCH_RAW`] (a full batch of [`MAX_BATCH_BYTES`] plus the one
//! record that crosses its end); a frame body ≤ [`MAX_FRAME`] (such a batch after zstd, whose
//! output can be a little larger than its input for incompressible values).

use crate::record::RECORD_HEADER_LEN;

/// Upper bound on a plog record body. Decoders refuse a larger length before allocating.
pub const MAX_RECORD_BODY: usize = 64 << 20;
/// The largest write a node accepts: its ops, keys and values included. The rest of
/// [`MAX_RECORD_BODY`] is room for the record's fixed fields and per-op headers.
pub const MAX_WRITE_BYTES: usize = MAX_RECORD_BODY - 1024;
/// The largest `duplicate_log_batch_bytes` a shipper may be configured with.
pub const MAX_BATCH_BYTES: u64 = 8 << 20;
/// Upper bound on a batch's uncompressed size: a reader stops after the record that reaches
/// the batch size, so a batch holds at most a full batch plus one whole record.
pub const MAX_BATCH_RAW: usize = MAX_BATCH_BYTES as usize + RECORD_HEADER_LEN + MAX_RECORD_BODY;
/// Upper bound on a frame body: the largest batch, compressed, plus the batch's own fields.
pub const MAX_FRAME: usize = zstd_bound(MAX_BATCH_RAW) + 64;

/// zstd's worst case output size for `n` input bytes (`ZSTD_COMPRESSBOUND`).
const fn zstd_bound(n: usize) -> usize {
    let small = if n < (128 << 10) {
        ((128 << 10) - n) >> 11
    } else {
        0
    };
    n + (n >> 8) + small
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_bound_matches_zstd() {
        for n in [0, 1, 1000, 128 << 10, MAX_BATCH_RAW] {
            assert_eq!(zstd_bound(n), zstd::zstd_safe::compress_bound(n), "n = {n}");
        }
    }

    #[test]
    fn incompressible_largest_record_fits_a_frame() {
        // Random bytes do not compress: the frame must still hold them.
        let value = crate::random_bytes(4 << 20);
        let out = zstd::bulk::compress(&value, 3).expect("compress");
        assert!(out.len() > value.len(), "random bytes grew under zstd");
        assert!(out.len() <= zstd_bound(value.len()));
    }
}
