//! The receiver's Prometheus metrics, served as text on `/metrics`.
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `receiver_sessions` | gauge | |
//! | `receiver_sessions_rejected_total` | counter | `reason`: `handshake`, `no_identity`, or an error code name (`unauthorized`, `stale_fencing_token`, ...) |
//! | `receiver_batches_total` | counter | |
//! | `receiver_records_total` | counter | |
//! | `receiver_bytes_total` | counter | `kind`: `wire` (frame bytes received), `raw` (uncompressed records) |
//! | `receiver_inbox_write_seconds` | histogram | time to append one batch to every target partition's inbox, fsync included |
//! | `receiver_confirmed_decree` | gauge | `table`, `dupid`, `partition` (the source partition) |
//! | `receiver_checkpoint_chunks_total` | counter | checkpoint chunks verified and staged |
//! | `receiver_checkpoint_chunk_bytes_total` | counter | file bytes of those chunks (uncompressed) |
//! | `receiver_checkpoint_chunks_corrupt_total` | counter | chunks refused by their CRC-32C (sent again) |
//! | `receiver_checkpoints_staged_total` | counter | source partitions' checkpoints staged whole |

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric of the process, registered once; the handles are cheap atomics.
pub struct Metrics {
    registry: Registry,
    pub sessions: Gauge,
    rejected: Family<Labels, Counter>,
    pub batches: Counter,
    pub records: Counter,
    bytes: Family<Labels, Counter>,
    pub inbox_write_seconds: Histogram,
    confirmed: Family<Labels, Gauge>,
    pub chunks: Counter,
    pub chunk_bytes: Counter,
    pub chunks_corrupt: Counter,
    pub checkpoints_staged: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let sessions = Gauge::default();
        let rejected = Family::<Labels, Counter>::default();
        let batches = Counter::default();
        let records = Counter::default();
        let bytes = Family::<Labels, Counter>::default();
        // 0.5 ms .. ~16 s: an fsync on a fast SSD to a stalled disk.
        let inbox_write_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let confirmed = Family::<Labels, Gauge>::default();
        // The encoder appends `_total` to counters.
        registry.register(
            "receiver_sessions",
            "Open shipping sessions",
            sessions.clone(),
        );
        registry.register(
            "receiver_sessions_rejected",
            "Connections and sessions refused, by reason",
            rejected.clone(),
        );
        registry.register(
            "receiver_batches",
            "Batches acknowledged (made durable, or durable already when resent)",
            batches.clone(),
        );
        registry.register(
            "receiver_records",
            "Records written durably to the inboxes (a resent record counts once)",
            records.clone(),
        );
        registry.register(
            "receiver_bytes",
            "Bytes received: wire (frames) and raw (uncompressed records)",
            bytes.clone(),
        );
        registry.register(
            "receiver_inbox_write_seconds",
            "Time to append one batch to every target partition's inbox, fsync included",
            inbox_write_seconds.clone(),
        );
        registry.register(
            "receiver_confirmed_decree",
            "Highest source decree durable in every target partition's inbox",
            confirmed.clone(),
        );
        let chunks = Counter::default();
        let chunk_bytes = Counter::default();
        let chunks_corrupt = Counter::default();
        let checkpoints_staged = Counter::default();
        registry.register(
            "receiver_checkpoint_chunks",
            "Checkpoint chunks verified and staged",
            chunks.clone(),
        );
        registry.register(
            "receiver_checkpoint_chunk_bytes",
            "File bytes of the checkpoint chunks staged (uncompressed)",
            chunk_bytes.clone(),
        );
        registry.register(
            "receiver_checkpoint_chunks_corrupt",
            "Checkpoint chunks refused by their CRC-32C (the shipper sends them again)",
            chunks_corrupt.clone(),
        );
        registry.register(
            "receiver_checkpoints_staged",
            "Source partitions' checkpoints staged whole and verified",
            checkpoints_staged.clone(),
        );
        Metrics {
            chunks,
            chunk_bytes,
            chunks_corrupt,
            checkpoints_staged,
            registry,
            sessions,
            rejected,
            batches,
            records,
            bytes,
            inbox_write_seconds,
            confirmed,
        }
    }
}

impl Metrics {
    /// Counts a refused connection or session.
    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Frame bytes received.
    pub fn wire_bytes(&self, n: usize) {
        self.bytes
            .get_or_create(&vec![("kind".into(), "wire".into())])
            .inc_by(n as u64);
    }

    /// Uncompressed record bytes received.
    pub fn raw_bytes(&self, n: usize) {
        self.bytes
            .get_or_create(&vec![("kind".into(), "raw".into())])
            .inc_by(n as u64);
    }

    /// The confirmed decree of one source partition of one dup.
    pub fn confirmed(&self, table: &str, dupid: u64, partition: u32, decree: u64) {
        self.confirmed
            .get_or_create(&vec![
                ("table".into(), table.into()),
                ("dupid".into(), dupid.to_string()),
                ("partition".into(), partition.to_string()),
            ])
            .set(i64::try_from(decree).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let m = Metrics::default();
        m.sessions.inc();
        m.rejected("unauthorized");
        m.batches.inc();
        m.records.inc_by(7);
        m.wire_bytes(100);
        m.raw_bytes(300);
        m.inbox_write_seconds.observe(0.002);
        m.confirmed("users", 3, 5, 42);
        let text = m.encode();
        for line in [
            "receiver_sessions 1",
            r#"receiver_sessions_rejected_total{reason="unauthorized"} 1"#,
            "receiver_batches_total 1",
            "receiver_records_total 7",
            r#"receiver_bytes_total{kind="wire"} 100"#,
            r#"receiver_bytes_total{kind="raw"} 300"#,
            "receiver_inbox_write_seconds_count 1",
            r#"receiver_confirmed_decree{table="users",dupid="3",partition="5"} 42"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
