//! Lag bookkeeping without I/O: commit times of the records sent and not yet confirmed, what an
//! ack completed, the idle-true lag gauge, and how much plog a dup keeps.
//!
//! Every time here is the *source's* clock: a record's commit time is its timetag timestamp
//! (the node's hybrid clock, which follows wall time), and "now" is the shipper's wall clock on
//! the same machine. So `dup_time_lag_ms` (source commit → the ack that says the target made it
//! durable) is measured on one clock, with no cross-datacenter skew in it.

use std::collections::VecDeque;

use ferry_proto::{Decree, PlogRecord};

/// Commit times of the records read and sent but not yet confirmed, in decree order.
#[derive(Debug, Default)]
pub struct LagTracker {
    batches: VecDeque<TrackedBatch>,
    /// Commit time of the last confirmed record, when known.
    last_confirmed_us: Option<u64>,
}

#[derive(Debug)]
struct TrackedBatch {
    first: Decree,
    /// One commit time per record, `first ..`; trimmed from the front by partial acks.
    times_us: VecDeque<u64>,
}

impl TrackedBatch {
    fn last(&self) -> Decree {
        Decree(self.first.0 + self.times_us.len() as u64 - 1)
    }
}

/// What one ack completed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckLag {
    /// Per batch completed by the ack: now − commit time of its last record, in ms.
    pub batch_lags_ms: Vec<u64>,
    /// Per record confirmed by the ack: now − its commit time, in µs.
    pub write_lags_us: Vec<u64>,
    /// Records confirmed by the ack whose own lag exceeds the threshold.
    pub lagging_writes: u64,
    /// Records confirmed by the ack.
    pub confirmed_records: u64,
}

impl LagTracker {
    /// Records a batch as sent. Batches must follow each other; a batch that does not (after a
    /// reconnect without [`LagTracker::reset`]) replaces what was tracked.
    pub fn on_sent(&mut self, records: &[PlogRecord]) {
        let Some(first) = records.first() else {
            return;
        };
        let follows = self
            .batches
            .back()
            .is_none_or(|b| b.last().next() == first.decree);
        if !follows {
            self.batches.clear();
        }
        self.batches.push_back(TrackedBatch {
            first: first.decree,
            times_us: records.iter().map(|r| r.timetag.timestamp_us()).collect(),
        });
    }

    /// Forgets what was in flight (the connection broke; it will be read and sent again).
    pub fn reset(&mut self) {
        self.batches.clear();
    }

    /// The ack says everything up to `confirmed` is durable on the target.
    pub fn on_ack(&mut self, confirmed: Decree, now_us: u64, threshold_ms: u64) -> AckLag {
        let mut out = AckLag::default();
        while let Some(b) = self.batches.front_mut() {
            if b.first > confirmed {
                break;
            }
            let whole = b.last() <= confirmed;
            let n = (confirmed.0 - b.first.0 + 1).min(b.times_us.len() as u64);
            for _ in 0..n {
                let Some(t) = b.times_us.pop_front() else {
                    break;
                };
                out.confirmed_records += 1;
                out.write_lags_us.push(now_us.saturating_sub(t));
                if ms_between(t, now_us) > threshold_ms {
                    out.lagging_writes += 1;
                }
                self.last_confirmed_us = Some(t);
                if whole && b.times_us.is_empty() {
                    out.batch_lags_ms.push(ms_between(t, now_us));
                }
            }
            b.first = Decree(b.first.0 + n);
            if b.times_us.is_empty() {
                self.batches.pop_front();
            }
        }
        out
    }

    /// Commit time of the oldest record sent and not confirmed.
    pub fn oldest_unconfirmed_us(&self) -> Option<u64> {
        self.batches
            .front()
            .and_then(|b| b.times_us.front().copied())
    }

    /// Commit time of the last confirmed record, when this session saw it.
    pub fn last_confirmed_us(&self) -> Option<u64> {
        self.last_confirmed_us
    }

    /// Seeds the commit time of the confirmed record (from etcd or the new-dup search).
    pub fn set_last_confirmed_us(&mut self, t: u64) {
        if t > 0 {
            self.last_confirmed_us = Some(t);
        }
    }
}

/// The `dup_lag_ms` gauge: 0 when the target has everything committed; otherwise how long the
/// oldest unconfirmed record has waited (now − its commit time). When that record's commit time
/// is not known yet (not read), `fallback_us` stands in: the commit time of the newest commit,
/// which makes the gauge an underestimate for the few milliseconds until the record is read.
/// Never negative, never NaN.
pub fn lag_ms(
    confirmed: Decree,
    committed: Decree,
    oldest_unconfirmed_us: Option<u64>,
    fallback_us: u64,
    now_us: u64,
) -> u64 {
    if confirmed >= committed {
        return 0;
    }
    ms_between(oldest_unconfirmed_us.unwrap_or(fallback_us), now_us)
}

/// Committed records the target does not have yet.
pub fn pending(confirmed: Decree, committed: Decree) -> u64 {
    committed.0.saturating_sub(confirmed.0)
}

/// Milliseconds from `from_us` to `to_us`, 0 if the clock went back.
pub fn ms_between(from_us: u64, to_us: u64) -> u64 {
    to_us.saturating_sub(from_us) / 1000
}

/// Bytes of plog a dup keeps: the segments holding any record after `confirmed` (segment `i`
/// holds decrees `first_i ..= first_{i+1} - 1`; the newest one holds up to `committed`).
/// `segments` is `(first decree, size)`, oldest first.
pub fn retained_bytes(segments: &[(Decree, u64)], confirmed: Decree, committed: Decree) -> u64 {
    let mut total = 0u64;
    for (i, (_, size)) in segments.iter().enumerate() {
        let holds_pending = match segments.get(i + 1) {
            Some((next_first, _)) => next_first.0 > confirmed.0 + 1,
            None => committed > confirmed,
        };
        if holds_pending {
            total = total.saturating_add(*size);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use ferry_proto::{ClusterId, Timetag};

    use super::*;

    fn recs(decrees: std::ops::RangeInclusive<u64>) -> Vec<PlogRecord> {
        let c = ClusterId::new(1).expect("valid id");
        decrees
            .map(|d| PlogRecord {
                decree: Decree(d),
                // Record d was committed at d seconds.
                timetag: Timetag::new(d * 1_000_000, c, false),
                ops: vec![],
            })
            .collect()
    }

    #[test]
    fn acks_complete_batches_and_count_lagging_writes() {
        let mut t = LagTracker::default();
        t.on_sent(&recs(1..=5));
        t.on_sent(&recs(6..=10));
        assert_eq!(t.oldest_unconfirmed_us(), Some(1_000_000));
        // At 12 s, ack up to 7: batch 1..=5 completes (last record 5 s old → 7 s lag), 6 and 7
        // are confirmed out of the second batch. Threshold 6.5 s: records 1..=5 lag over it
        // (11..7 s), 6 and 7 do not (6 s, 5 s).
        let a = t.on_ack(Decree(7), 12_000_000, 6_500);
        assert_eq!(a.batch_lags_ms, vec![7_000]);
        assert_eq!(
            a.write_lags_us,
            vec![11_000_000, 10_000_000, 9_000_000, 8_000_000, 7_000_000, 6_000_000, 5_000_000],
            "one per confirmed record, oldest first"
        );
        assert_eq!(a.confirmed_records, 7);
        assert_eq!(a.lagging_writes, 5);
        assert_eq!(t.oldest_unconfirmed_us(), Some(8_000_000));
        assert_eq!(t.last_confirmed_us(), Some(7_000_000));
        // A repeated or older ack changes nothing.
        assert_eq!(t.on_ack(Decree(7), 13_000_000, 0), AckLag::default());
        let a = t.on_ack(Decree(10), 13_000_000, 60_000);
        assert_eq!(a.batch_lags_ms, vec![3_000], "second batch completes");
        assert_eq!(a.confirmed_records, 3);
        assert_eq!(t.oldest_unconfirmed_us(), None);
    }

    #[test]
    fn a_batch_that_does_not_follow_replaces_the_tracked_ones() {
        let mut t = LagTracker::default();
        t.on_sent(&recs(1..=5));
        t.on_sent(&recs(3..=4));
        assert_eq!(t.oldest_unconfirmed_us(), Some(3_000_000));
        t.reset();
        assert_eq!(t.oldest_unconfirmed_us(), None);
        t.on_sent(&[]);
        assert_eq!(t.oldest_unconfirmed_us(), None);
    }

    #[test]
    fn lag_gauge_is_zero_when_caught_up_and_true_otherwise() {
        assert_eq!(lag_ms(Decree(5), Decree(5), None, 0, 99_000_000), 0);
        assert_eq!(
            lag_ms(Decree(6), Decree(5), Some(1), 1, 99_000_000),
            0,
            "confirmed past committed (marker read earlier) is caught up"
        );
        assert_eq!(
            lag_ms(
                Decree(4),
                Decree(5),
                Some(90_000_000),
                98_000_000,
                99_000_000
            ),
            9_000
        );
        assert_eq!(
            lag_ms(Decree(4), Decree(5), None, 98_000_000, 99_000_000),
            1_000,
            "not read yet: the newest commit time stands in"
        );
        assert_eq!(
            lag_ms(Decree(4), Decree(5), Some(100_000_000), 0, 99_000_000),
            0,
            "a clock that went back gives 0, not a negative or huge value"
        );
        assert_eq!(pending(Decree(4), Decree(9)), 5);
        assert_eq!(pending(Decree(9), Decree(4)), 0);
    }

    #[test]
    fn retained_bytes_counts_segments_holding_unconfirmed_records() {
        // Segments: 1..=9, 10..=19, 20..=29, 30..=committed.
        let segs = [
            (Decree(1), 100),
            (Decree(10), 200),
            (Decree(20), 300),
            (Decree(30), 400),
        ];
        assert_eq!(retained_bytes(&segs, Decree(0), Decree(35)), 1000);
        assert_eq!(
            retained_bytes(&segs, Decree(9), Decree(35)),
            900,
            "first done"
        );
        assert_eq!(retained_bytes(&segs, Decree(8), Decree(35)), 1000);
        assert_eq!(retained_bytes(&segs, Decree(29), Decree(35)), 400);
        assert_eq!(
            retained_bytes(&segs, Decree(35), Decree(35)),
            0,
            "caught up"
        );
        assert_eq!(retained_bytes(&[], Decree(0), Decree(0)), 0);
    }
}
