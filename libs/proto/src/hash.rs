//! The stable key → partition mapping. Every cluster, the receiver and any tool must compute the
//! same partition for the same key, so this is part of the format: `crc32c(key) % partition_count`
//! (CRC-32C, the Castagnoli polynomial, as used by iSCSI and ext4). See `docs/partitioning.md`.

use crate::ids::PartitionId;

/// The partition that owns `key` in a table of `partition_count` partitions.
///
/// A count of 0 is treated as 1: a table always has at least one partition, and this function
/// must not panic on a bad config value.
pub fn partition_of(key: &[u8], partition_count: u32) -> PartitionId {
    PartitionId(crc32c::crc32c(key) % partition_count.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if these change, clusters built with different versions disagree.
    #[test]
    fn stable_values() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(partition_of(b"123456789", 8), PartitionId(0xE306_9283 % 8));
        assert_eq!(partition_of(b"", 8), PartitionId(0));
        assert_eq!(partition_of(b"anything", 0), PartitionId(0));
    }

    #[test]
    fn spreads_keys() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(format!("key:{i:012}").as_bytes(), 8).0 as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
