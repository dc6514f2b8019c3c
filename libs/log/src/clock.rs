//! The wall clock, in the units the log's commit times use.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall clock in Unix microseconds.
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Wall clock in Unix milliseconds.
pub fn wall_ms() -> u64 {
    wall_us() / 1000
}
