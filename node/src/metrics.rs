//! The node's counters and their Prometheus export.
//!
//! The RESP layer bumps plain atomics; the partitions keep their own [`PartitionStats`]. Both are
//! read only when `/metrics` is scraped, into a registry built for that scrape, so the hot path
//! never touches the metrics library.
//!
//! [`PartitionStats`]: ferry_engine::partition::PartitionStats

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::commands::SPECS;
use ferry_engine::table::Table;
use ferry_log::nodelog::NodeLogStats;

/// Counters of the RESP layer.
pub struct Metrics {
    connections: AtomicI64,
    connections_received: AtomicU64,
    rejected_connections: AtomicU64,
    /// One slot per entry of [`SPECS`], then one for unknown commands.
    commands: Vec<AtomicU64>,
    command_errors: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: AtomicI64::new(0),
            connections_received: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
            commands: (0..=SPECS.len()).map(|_| AtomicU64::new(0)).collect(),
            command_errors: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts a request; `spec` is its index in [`SPECS`], `None` for an unknown command.
    pub fn command(&self, spec: Option<usize>) {
        let slot = spec.unwrap_or(SPECS.len());
        if let Some(c) = self.commands.get(slot) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn command_error(&self) {
        self.command_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_received.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn connection_rejected(&self) {
        self.rejected_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn connections_received(&self) -> u64 {
        self.connections_received.load(Ordering::Relaxed)
    }

    pub fn rejected_connections(&self) -> u64 {
        self.rejected_connections.load(Ordering::Relaxed)
    }

    pub fn commands_processed(&self) -> u64 {
        self.commands
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The Prometheus text exposition (OpenMetrics flavour) of these counters, the table's
    /// partition stats, the plog hold limit (`plog_hold_max_bytes`, so alerts can compare what
    /// dups keep with it) and whether client writes are refused now.
    pub fn encode(
        &self,
        table: &Table,
        plog_hold_max_bytes: u64,
        writes_refused: bool,
        commit_log: Option<&NodeLogStats>,
    ) -> String {
        let mut reg = Registry::default();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sum = |f: &dyn Fn(&ferry_engine::partition::PartitionStats) -> u64| -> u64 {
            table.partitions().iter().map(|p| f(p.stats())).sum()
        };

        let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            // The encoder appends `_total` to counters.
            reg.register(name.trim_end_matches("_total"), help, c);
        };
        counter(
            &mut reg,
            "ferry_node_writes_total",
            "Client writes acknowledged",
            sum(&|s| load(&s.writes_total)),
        );
        counter(
            &mut reg,
            "ferry_node_write_errors_total",
            "Client writes that failed",
            sum(&|s| load(&s.write_errors_total)),
        );
        counter(
            &mut reg,
            "ferry_node_group_commits_total",
            "Group commits of a partition (their fsyncs are shared: see ferry_node_commit_log_rounds)",
            sum(&|s| load(&s.group_commits_total)),
        );
        counter(
            &mut reg,
            "ferry_node_plog_bytes_total",
            "Bytes appended to the plogs",
            sum(&|s| load(&s.plog_bytes_total)),
        );
        counter(
            &mut reg,
            "ferry_node_dup_applied_records_total",
            "Duplicated records applied from other clusters",
            sum(&|s| load(&s.dup_applied_records_total)),
        );
        let fsync = Counter::<f64, AtomicU64>::default();
        fsync.inc_by(sum(&|s| load(&s.fsync_micros_total)) as f64 / 1e6);
        reg.register(
            "ferry_node_fsync_seconds",
            "Time partition writers waited for their group to be durable",
            fsync,
        );
        if let Some(log) = commit_log {
            counter(
                &mut reg,
                "ferry_node_commit_log_rounds_total",
                "fdatasync rounds of the node's commit log, each covering every partition's waiting groups",
                load(&log.rounds_total),
            );
            let secs = Counter::<f64, AtomicU64>::default();
            secs.inc_by(load(&log.fsync_micros_total) as f64 / 1e6);
            reg.register(
                "ferry_node_commit_log_fsync_seconds",
                "Time spent in the commit log's fdatasync",
                secs,
            );
            counter(
                &mut reg,
                "ferry_node_plog_syncs_total",
                "Lazy plog fdatasyncs by the commit log's background thread",
                load(&log.plog_syncs_total),
            );
            let live = Gauge::<i64>::default();
            live.set(i64::try_from(load(&log.live_segments)).unwrap_or(i64::MAX));
            reg.register(
                "ferry_node_commit_log_live_segments",
                "Commit log segments still needed by a restart (the rest are spares)",
                live,
            );
        }

        let decrees = Family::<Vec<(String, String)>, Gauge>::default();
        for p in table.partitions() {
            let d = i64::try_from(p.committed_decree().0).unwrap_or(i64::MAX);
            decrees
                .get_or_create(&vec![("partition".to_string(), p.id().0.to_string())])
                .set(d);
        }
        reg.register(
            "ferry_node_committed_decree",
            "Last committed decree per partition",
            decrees,
        );

        let hold = Gauge::<i64>::default();
        hold.set(i64::try_from(plog_hold_max_bytes).unwrap_or(i64::MAX));
        reg.register(
            "ferry_node_plog_hold_max_bytes",
            "Most plog bytes a partition keeps for lagging duplications (0: no limit)",
            hold,
        );
        let refused = Gauge::<i64>::default();
        refused.set(i64::from(writes_refused));
        reg.register(
            "ferry_node_writes_refused",
            "1 while the table refuses client writes (read_only or demoted, e.g. during a failover)",
            refused,
        );

        let connections = Gauge::<i64>::default();
        connections.set(self.connections());
        reg.register(
            "ferry_node_connections",
            "Open client connections",
            connections,
        );
        counter(
            &mut reg,
            "ferry_node_connections_received_total",
            "Client connections accepted",
            self.connections_received(),
        );
        counter(
            &mut reg,
            "ferry_node_rejected_connections_total",
            "Client connections refused at the max_connections limit",
            self.rejected_connections(),
        );

        let commands = Family::<Vec<(String, String)>, Counter>::default();
        for (i, c) in self.commands.iter().enumerate() {
            let n = load(c);
            if n > 0 {
                let name = SPECS.get(i).map_or("unknown", |s| s.name);
                commands
                    .get_or_create(&vec![("cmd".to_string(), name.to_string())])
                    .inc_by(n);
            }
        }
        reg.register(
            "ferry_node_commands",
            "Client commands received, by command",
            commands,
        );
        counter(
            &mut reg,
            "ferry_node_command_errors_total",
            "Commands answered with an error",
            load(&self.command_errors),
        );

        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }
}
