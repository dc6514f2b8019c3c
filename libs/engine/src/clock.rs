//! The hybrid clock that stamps a partition's writes.
//!
//! It follows the wall clock, but never goes backwards and never repeats: each tick is at least
//! one microsecond after the previous one. Duplicated writes and replayed plog records are
//! `observe`d, so a local write made after them always carries a larger timetag. That is what
//! lets a local write skip the last-writer-wins comparison: it is newer than anything stored.

pub use ferry_log::clock::{wall_ms, wall_us};

#[derive(Debug, Default)]
pub struct HybridClock {
    last_us: u64,
}

impl HybridClock {
    pub fn starting_after(last_us: u64) -> HybridClock {
        HybridClock { last_us }
    }

    /// The next timestamp, given the wall clock reading `wall_us`.
    pub fn tick(&mut self, wall_us: u64) -> u64 {
        self.last_us = wall_us.max(self.last_us + 1);
        self.last_us
    }

    /// Makes every later tick larger than `ts_us`.
    pub fn observe(&mut self, ts_us: u64) {
        self.last_us = self.last_us.max(ts_us);
    }

    pub fn last(&self) -> u64 {
        self.last_us
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the wall clock does (jumps back, stalls), ticks strictly increase, and stay
        /// above everything observed.
        #[test]
        fn strictly_increasing(steps in proptest::collection::vec((0u64..1_000_000, any::<bool>()), 1..200)) {
            let mut c = HybridClock::default();
            let mut prev = 0;
            let mut max_observed = 0;
            for (reading, is_observe) in steps {
                if is_observe {
                    c.observe(reading);
                    max_observed = max_observed.max(reading);
                } else {
                    let t = c.tick(reading);
                    prop_assert!(t > prev);
                    prop_assert!(t > max_observed);
                    prop_assert!(t >= reading);
                    prev = t;
                }
            }
        }
    }
}
