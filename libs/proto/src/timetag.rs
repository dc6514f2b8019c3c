//! The timetag orders writes across clusters for last-writer-wins.
//!
//! Layout (as in Pegasus): `timestamp_us << 8 | cluster_id << 1 | delete_flag`. The 56-bit
//! microsecond timestamp comes first, so comparing two timetags as integers compares their times.
//! Equal times are broken by cluster id, then by the delete flag, so a delete beats a put from
//! the same cluster at the same microsecond. Every cluster computes the same order.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::ClusterId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timetag(pub u64);

impl Timetag {
    /// Largest timestamp that fits in the 56 bits the layout leaves for it.
    pub const MAX_TIMESTAMP_US: u64 = (1 << 56) - 1;

    /// Builds a timetag. Timestamps wider than 56 bits are clamped to the maximum.
    pub fn new(timestamp_us: u64, cluster: ClusterId, delete: bool) -> Timetag {
        let ts = timestamp_us.min(Self::MAX_TIMESTAMP_US);
        Timetag(ts << 8 | u64::from(cluster.get()) << 1 | u64::from(delete))
    }

    pub fn timestamp_us(self) -> u64 {
        self.0 >> 8
    }

    /// The cluster that made the write. `None` only for a malformed timetag with cluster id 0.
    pub fn cluster(self) -> Option<ClusterId> {
        ClusterId::new(((self.0 >> 1) & 0x7f) as u8)
    }

    pub fn is_delete(self) -> bool {
        self.0 & 1 == 1
    }

    /// The same write time and cluster, with the delete flag set as given.
    pub fn with_delete(self, delete: bool) -> Timetag {
        Timetag(self.0 & !1 | u64::from(delete))
    }
}

impl fmt::Display for Timetag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cluster = self.cluster().map_or(0, ClusterId::get);
        write!(f, "{}@{}", self.timestamp_us(), cluster)?;
        if self.is_delete() {
            f.write_str("(del)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cid(id: u8) -> ClusterId {
        ClusterId::new(id).expect("test cluster ids are in range")
    }

    #[test]
    fn fields_round_trip() {
        let t = Timetag::new(1_700_000_000_000_000, cid(5), true);
        assert_eq!(t.timestamp_us(), 1_700_000_000_000_000);
        assert_eq!(t.cluster(), Some(cid(5)));
        assert!(t.is_delete());
        assert!(!t.with_delete(false).is_delete());
    }

    #[test]
    fn tie_order_time_then_cluster_then_delete() {
        let put1 = Timetag::new(100, cid(1), false);
        let del1 = Timetag::new(100, cid(1), true);
        let put2 = Timetag::new(100, cid(2), false);
        let later = Timetag::new(101, cid(1), false);
        assert!(
            put1 < del1,
            "a delete beats a put from the same cluster at the same time"
        );
        assert!(del1 < put2, "the higher cluster id wins a tie in time");
        assert!(put2 < later, "time dominates cluster id");
    }

    proptest! {
        #[test]
        fn order_follows_time(a in 0..Timetag::MAX_TIMESTAMP_US, b in 0..Timetag::MAX_TIMESTAMP_US,
                              ca in 1u8..=127, cb in 1u8..=127, da: bool, db: bool) {
            let ta = Timetag::new(a, cid(ca), da);
            let tb = Timetag::new(b, cid(cb), db);
            if a != b {
                prop_assert_eq!(a < b, ta < tb);
            }
            prop_assert_eq!(ta.timestamp_us(), a);
            prop_assert_eq!(ta.cluster(), Some(cid(ca)));
            prop_assert_eq!(ta.is_delete(), da);
        }
    }
}
