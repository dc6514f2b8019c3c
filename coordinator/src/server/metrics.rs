//! The coordinator's Prometheus metrics, served on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric of one coordinator process.
pub struct Metrics {
    registry: Registry,
    /// 1 while this instance leads, else 0.
    pub is_leader: Gauge,
    /// How many times this instance became leader.
    pub leader_elections: Counter,
    /// etcd requests that failed (unreachable, timed out).
    pub etcd_errors: Counter,
    /// Admin API requests by method and answer code.
    pub admin_requests: Family<Labels, Counter>,
    /// Tables in the cluster (leader only; refreshed by the reconcile loop).
    pub tables: Gauge,
    /// Dups in the cluster by status (leader only; refreshed by the reconcile loop).
    pub dups: Family<Labels, Gauge>,
    /// Install-complete events of full dups, by `side`: `source` (one per source partition),
    /// `target` (one per target partition).
    pub install_complete: Family<Labels, Counter>,
    /// Planned failovers this instance started, finished, and rolled back (leader only).
    pub failovers_started: Counter,
    pub failovers_done: Counter,
    pub failovers_rolled_back: Counter,
    /// Failovers running in the cluster, either side (leader only).
    pub failovers_running: Gauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            is_leader: Gauge::default(),
            leader_elections: Counter::default(),
            etcd_errors: Counter::default(),
            admin_requests: Family::default(),
            tables: Gauge::default(),
            dups: Family::default(),
            install_complete: Family::default(),
            failovers_started: Counter::default(),
            failovers_done: Counter::default(),
            failovers_rolled_back: Counter::default(),
            failovers_running: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "coordinator_is_leader",
            "1 while this coordinator leads",
            m.is_leader.clone(),
        );
        registry.register(
            "coordinator_leader_elections",
            "times this coordinator became leader",
            m.leader_elections.clone(),
        );
        registry.register(
            "coordinator_etcd_errors",
            "etcd requests that failed",
            m.etcd_errors.clone(),
        );
        registry.register(
            "coordinator_admin_requests",
            "admin API requests by method and status code",
            m.admin_requests.clone(),
        );
        registry.register(
            "coordinator_tables",
            "tables in the cluster",
            m.tables.clone(),
        );
        registry.register(
            "coordinator_dups",
            "duplications in the cluster by status",
            m.dups.clone(),
        );
        registry.register(
            "coordinator_install_complete",
            "install-complete events of full dups: source partitions (side=source) and target partitions (side=target)",
            m.install_complete.clone(),
        );
        registry.register(
            "coordinator_failovers_started",
            "planned failovers this coordinator started as the source",
            m.failovers_started.clone(),
        );
        registry.register(
            "coordinator_failovers_done",
            "planned failovers this coordinator finished as the source",
            m.failovers_done.clone(),
        );
        registry.register(
            "coordinator_failovers_rolled_back",
            "planned failovers that failed a step and were rolled back",
            m.failovers_rolled_back.clone(),
        );
        registry.register(
            "coordinator_failovers_running",
            "failovers running in the cluster, either side (leader only)",
            m.failovers_running.clone(),
        );
        Metrics { registry, ..m }
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

impl Metrics {
    /// Counts install-complete events on one side.
    pub fn install_complete(&self, side: &str, n: usize) {
        self.install_complete
            .get_or_create(&vec![("side".into(), side.into())])
            .inc_by(n as u64);
    }
}
