//! The shipper's Prometheus metrics, with Pegasus's duplication names, labelled by `table`,
//! `dupid` and `partition`. Counters end in `_total` in the exposition.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use ferry_proto::{DupId, PartitionId};

/// `table`, `dupid`, `partition`.
pub type Labels = Vec<(String, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The label set of one (table, dup, partition).
pub fn labels(table: &str, dupid: DupId, partition: PartitionId) -> Labels {
    vec![
        ("table".into(), table.into()),
        ("dupid".into(), dupid.0.to_string()),
        ("partition".into(), partition.0.to_string()),
    ]
}

/// Every metric of one shipper process.
pub struct Metrics {
    registry: Registry,
    /// Records confirmed by the target (`dup_shipped_ops_total`).
    pub shipped_ops: Family<Labels, Counter>,
    /// Records skipped after bounded retries under FAIL_SKIP (`dup_failed_shipping_ops_total`).
    pub failed_ops: Family<Labels, Counter>,
    /// Source commit → target durable, per acknowledged batch (its last record), in ms.
    pub time_lag: HistogramFamily,
    /// Source commit → target durable, per write (every record), in ms, in fine buckets.
    pub write_lag: HistogramFamily,
    /// Records whose lag exceeded `dup_lagging_write_threshold_ms`.
    pub lagging_writes: Family<Labels, Counter>,
    /// Committed − confirmed.
    pub pending: Family<Labels, Gauge>,
    /// Plog bytes read.
    pub log_read_bytes: Family<Labels, Counter>,
    /// Batch bytes on the wire (compressed).
    pub shipped_bytes: Family<Labels, Counter>,
    /// Batch bytes before compression.
    pub shipped_raw_bytes: Family<Labels, Counter>,
    /// The confirmed decree.
    pub confirmed: Family<Labels, Gauge>,
    /// 0 when caught up, else now − commit time of the oldest unconfirmed record, in ms.
    pub lag: Family<Labels, Gauge>,
    /// Plog bytes kept since the confirmed decree.
    pub retained: Family<Labels, Gauge>,
    /// Sessions that ended in a failure (connect, receiver error, ack timeout).
    pub session_failures: Family<Labels, Counter>,
    /// 1 while this shipper holds the (dup, partition) election.
    pub leader: Family<Labels, Gauge>,
    /// Checkpoint transfer bytes, by `kind`: `file` (file bytes sent, again after a break
    /// too), `wire` (chunk frames, after compression), `present` (held by the target already,
    /// not sent).
    pub checkpoint_bytes: Family<Labels, Counter>,
    /// Checkpoint file bytes the target does not hold yet.
    pub checkpoint_remaining: Family<Labels, Gauge>,
    /// Checkpoint chunks sent and not yet acknowledged as staged: what a break would send
    /// again (at most `LANE_WINDOW` per lane).
    pub checkpoint_in_flight: Family<Labels, Gauge>,
    /// The partition's share of its dup's checkpoint bandwidth limit, bytes/s (0: none).
    pub checkpoint_rate_limit: Family<Labels, Gauge>,
    /// 1 while the partition's checkpoint copy is paused by a full disk on the target (an
    /// alarm).
    pub checkpoint_target_disk_full: Family<Labels, Gauge>,
    /// Re-bootstraps done (the log was gone; the partition was filled from a fresh checkpoint).
    pub rebootstraps: Family<Labels, Counter>,
    /// 1 while the partition re-bootstraps.
    pub rebootstrap_active: Family<Labels, Gauge>,
}

fn lag_histogram() -> Histogram {
    // 1 ms .. ~9 min: loopback acks to a long outage.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 2.0, 20,
    ))
}

fn write_lag_histogram() -> Histogram {
    // 0.5 ms .. ~2.4 min in steps of 25%: fine enough for p50/p99 within a few percent once
    // interpolated inside a bucket, as `histogram_quantile` does.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.5, 1.25, 57,
    ))
}

impl Metrics {
    /// Creates the partition's failure and checkpoint series at 0 when it starts shipping, so
    /// that `rate()` and alerts see them before the first failure or copy.
    pub fn start_series(&self, l: &Labels) {
        let _ = self.failed_ops.get_or_create(l);
        let _ = self.session_failures.get_or_create(l);
        let _ = self.checkpoint_bytes.get_or_create(l);
        let _ = self.checkpoint_remaining.get_or_create(l);
    }

    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            shipped_ops: Family::default(),
            failed_ops: Family::default(),
            time_lag: Family::new_with_constructor(lag_histogram as fn() -> Histogram),
            write_lag: Family::new_with_constructor(write_lag_histogram as fn() -> Histogram),
            lagging_writes: Family::default(),
            pending: Family::default(),
            log_read_bytes: Family::default(),
            shipped_bytes: Family::default(),
            shipped_raw_bytes: Family::default(),
            confirmed: Family::default(),
            lag: Family::default(),
            retained: Family::default(),
            session_failures: Family::default(),
            leader: Family::default(),
            checkpoint_bytes: Family::default(),
            checkpoint_remaining: Family::default(),
            checkpoint_in_flight: Family::default(),
            checkpoint_rate_limit: Family::default(),
            checkpoint_target_disk_full: Family::default(),
            rebootstraps: Family::default(),
            rebootstrap_active: Family::default(),
        };
        registry.register(
            "dup_shipped_ops",
            "plog records confirmed durable by the target",
            m.shipped_ops.clone(),
        );
        registry.register(
            "dup_failed_shipping_ops",
            "plog records skipped after bounded retries (FAIL_SKIP)",
            m.failed_ops.clone(),
        );
        registry.register(
            "dup_time_lag_ms",
            "source commit to target durable, per acknowledged batch, in ms",
            m.time_lag.clone(),
        );
        registry.register(
            "dup_write_lag_ms",
            "source commit to target durable, per write, in ms",
            m.write_lag.clone(),
        );
        registry.register(
            "dup_lagging_writes",
            "records whose lag exceeded dup_lagging_write_threshold_ms",
            m.lagging_writes.clone(),
        );
        registry.register(
            "dup_pending_mutations",
            "committed records the target has not confirmed",
            m.pending.clone(),
        );
        registry.register(
            "dup_log_read_bytes",
            "plog bytes read for shipping",
            m.log_read_bytes.clone(),
        );
        registry.register(
            "dup_shipped_bytes",
            "batch bytes sent on the wire (zstd)",
            m.shipped_bytes.clone(),
        );
        registry.register(
            "dup_shipped_raw_bytes",
            "batch bytes sent, before compression",
            m.shipped_raw_bytes.clone(),
        );
        registry.register(
            "dup_confirmed_decree",
            "highest decree the target made durable",
            m.confirmed.clone(),
        );
        registry.register(
            "dup_lag_ms",
            "0 when caught up, else ms since the oldest unconfirmed record was committed",
            m.lag.clone(),
        );
        registry.register(
            "dup_plog_retained_bytes",
            "plog bytes kept since the confirmed decree",
            m.retained.clone(),
        );
        registry.register(
            "dup_session_failures",
            "shipping sessions that failed",
            m.session_failures.clone(),
        );
        registry.register(
            "dup_shipper_is_leader",
            "1 while this shipper holds the shipping election of the partition",
            m.leader.clone(),
        );
        registry.register(
            "dup_checkpoint_bytes",
            "checkpoint transfer bytes: file (sent), wire (after compression), present (held by the target, not sent)",
            m.checkpoint_bytes.clone(),
        );
        registry.register(
            "dup_checkpoint_remaining_bytes",
            "checkpoint file bytes the target does not hold yet",
            m.checkpoint_remaining.clone(),
        );
        registry.register(
            "dup_checkpoint_chunks_in_flight",
            "checkpoint chunks sent and not yet acknowledged as staged (sent again after a break)",
            m.checkpoint_in_flight.clone(),
        );
        registry.register(
            "dup_checkpoint_rate_limit_bytes",
            "this partition's share of its dup's checkpoint bandwidth limit, bytes/s on the wire (0: none)",
            m.checkpoint_rate_limit.clone(),
        );
        registry.register(
            "dup_checkpoint_target_disk_full",
            "1 while the checkpoint copy is paused because the target's disk is full (an alarm: free space there)",
            m.checkpoint_target_disk_full.clone(),
        );
        registry.register(
            "dup_rebootstraps",
            "re-bootstraps done: the plog was collected past what the dup confirmed, so the partition was filled again from a fresh checkpoint",
            m.rebootstraps.clone(),
        );
        registry.register(
            "dup_rebootstrap_active",
            "1 while the partition re-bootstraps from a fresh checkpoint",
            m.rebootstrap_active.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Drops every series of a (table, dup, partition) that is no longer shipped here.
    pub fn forget(&self, l: &Labels) {
        self.shipped_ops.remove(l);
        self.failed_ops.remove(l);
        self.time_lag.remove(l);
        self.write_lag.remove(l);
        self.lagging_writes.remove(l);
        self.pending.remove(l);
        self.log_read_bytes.remove(l);
        self.shipped_bytes.remove(l);
        self.shipped_raw_bytes.remove(l);
        self.confirmed.remove(l);
        self.lag.remove(l);
        self.retained.remove(l);
        self.session_failures.remove(l);
        self.leader.remove(l);
        self.checkpoint_remaining.remove(l);
        self.checkpoint_in_flight.remove(l);
        self.checkpoint_rate_limit.remove(l);
        self.checkpoint_target_disk_full.remove(l);
        self.rebootstraps.remove(l);
        self.rebootstrap_active.remove(l);
        for kind in ["file", "wire", "present"] {
            let mut k = l.clone();
            k.push(("kind".into(), kind.into()));
            self.checkpoint_bytes.remove(&k);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
