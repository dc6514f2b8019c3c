//! ferry's shared formats. Every process (node, shipper, receiver, coordinator, tools) uses these
//! definitions, so a field is defined once. This crate does no I/O.
//!
//! - [`ids`]: newtypes for decrees, partitions, clusters, dups.
//! - [`timetag`]: the cross-cluster write order, `timestamp_us << 8 | cluster_id << 1 | delete_flag`.
//! - [`value`]: how a value is stored in RocksDB (timetag + expiry + user bytes).
//! - [`record`]: the plog record (length, CRC32C, decree, timetag, ops).
//! - [`hash`]: the stable key → partition mapping.
//! - [`limits`]: the size limits every process must agree on.
//! - [`wire`]: the shipper ⇄ receiver frames (ALPN `ferry/1`).

pub mod checkpoint;
pub mod hash;
pub mod ids;
pub mod limits;
pub mod record;
pub mod timetag;
pub mod value;
pub mod wire;

pub use checkpoint::{CheckpointFile, CheckpointManifest};
pub use hash::partition_of;
pub use ids::{ClusterId, Decree, DupId, FencingToken, PartitionId, Source};
pub use record::{DecodeError, Op, PlogRecord};
pub use timetag::Timetag;
pub use value::StoredValue;

/// `len` pseudo-random (xorshift), incompressible bytes for tests.
#[cfg(test)]
pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
