//! Id newtypes, so that a decree is never passed where a partition was meant.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Per-partition, gap-free, increasing sequence number of a committed write. Decree 0 means
/// "nothing yet"; the first write of a partition is decree 1.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Decree(pub u64);

impl Decree {
    pub const ZERO: Decree = Decree(0);

    pub fn next(self) -> Decree {
        Decree(self.0 + 1)
    }
}

/// Index of a partition within its table, `0..partition_count`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PartitionId(pub u32);

/// A cluster's id in the duplication group, 1..=127 (it must fit in 7 bits of the timetag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct ClusterId(u8);

impl ClusterId {
    pub const MAX: u8 = 127;

    /// Returns `None` unless `id` is in 1..=127.
    pub fn new(id: u8) -> Option<ClusterId> {
        (1..=Self::MAX).contains(&id).then_some(ClusterId(id))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for ClusterId {
    type Error = String;

    fn try_from(id: u8) -> Result<Self, Self::Error> {
        ClusterId::new(id).ok_or_else(|| format!("cluster id {id} is out of range; use 1..=127"))
    }
}

impl From<ClusterId> for u8 {
    fn from(id: ClusterId) -> u8 {
        id.0
    }
}

/// Identifies one duplication of one table. Unique and increasing within a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DupId(pub u64);

/// Where a duplicated write came from: a partition of another cluster. A target keeps its inbox
/// and its apply progress per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Source {
    pub cluster: ClusterId,
    pub partition: PartitionId,
}

/// The revision of a won shipping election in etcd: newer elections have larger tokens, so a
/// receiver refuses a session whose token is below one it has seen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct FencingToken(pub u64);

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(Decree, PartitionId, ClusterId, DupId, FencingToken);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_range() {
        assert!(ClusterId::new(0).is_none());
        assert!(ClusterId::new(128).is_none());
        assert_eq!(ClusterId::new(127).map(ClusterId::get), Some(127));
        assert!(serde_json::from_str::<ClusterId>("0").is_err());
    }
}
