//! The shipper (in this process) against the real `receiver` and `coordinator` binaries, a
//! real etcd (both clusters' keys under their own prefixes), real certificates and real source
//! partitions writing their plogs. Checks what a user would: which writes reach the target's
//! inbox, what etcd says the confirmed decree is, what `/replica/duplication` and `/metrics`
//! show, and that a paused dup ships nothing until it is started again.
//!
//! Needs the binaries: `cargo build --release --workspace --bins` (scripts/test.sh does it).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ferry_certs::InitOptions;
use ferry_engine::{Expiry, Partition, PartitionOptions, SetCond, Source, WriteCmd};
use ferry_meta::config::ClusterConfig;
use ferry_meta::dups::DupPolicy;
use ferry_meta::status::DupEvent;
use ferry_meta::{self as meta, DupMode, MetaStore};
use ferry_proto::{ClusterId, Decree, DupId, Op, PartitionId};
use ferry_shipper::config::ShipperConfig;
use ferry_shipper::http::Duplications;
use ferry_tests::etcd::{http_get, Coordinator, CoordinatorSpec, Etcd};
use ferry_tests::inbox::durable_records;
use ferry_tests::netns::Place;
use ferry_tests::procs::{free_port, loopback};
use ferry_tests::receiver::{Receiver, ReceiverSpec};
use tokio_util::sync::CancellationToken;

const SOURCE: &str = "bj";
const TARGET: &str = "tj";
const TABLE: &str = "users";
const SOURCE_NODE: &str = "bj-n1";
const TARGET_NODE: &str = "tj-n1";
const SOURCE_PARTITIONS: u32 = 2;
const TARGET_PARTITIONS: u32 = 3;
const WAIT: Duration = Duration::from_secs(30);

fn cluster(name: &str, id: u8) -> ClusterConfig {
    ClusterConfig {
        name: name.into(),
        id,
        duplication_group: [(SOURCE.to_string(), 1), (TARGET.to_string(), 2)]
            .into_iter()
            .collect(),
        partition_hash: "crc32c".into(),
        plog_format_version: 1,
    }
}

struct World {
    etcd: Etcd,
    dir: tempfile::TempDir,
    _coordinator: Coordinator,
    receiver: Receiver,
    source_meta: MetaStore,
    partitions: Vec<Partition>,
    shipper_http: SocketAddr,
    shipper: tokio::task::JoinHandle<Result<()>>,
    cancel: CancellationToken,
    coordinator_addr: SocketAddr,
    /// More `[shipper]` lines for the next shipper started.
    shipper_toml: String,
}

impl World {
    async fn start() -> Result<World> {
        let mut w = World::without_shipper(64 << 20).await?;
        w.start_shipper()?;
        Ok(w)
    }

    /// Replaces the (not yet started) shipper with a running one.
    fn start_shipper(&mut self) -> Result<()> {
        let (http, handle, cancel) = self.spawn_shipper()?;
        self.shipper_http = http;
        self.shipper = handle;
        self.cancel = cancel;
        Ok(())
    }

    /// Everything but the shipper; source plog segments roll over at `segment_bytes`.
    async fn without_shipper(segment_bytes: u64) -> Result<World> {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await??;
        let dir = tempfile::tempdir()?;
        ferry_certs::init(&InitOptions::new(
            dir.path().join("certs"),
            [SOURCE, TARGET],
        ))?;

        // Target: cluster config, the table on one node, its coordinator and receiver.
        let target_meta =
            MetaStore::connect(&[etcd.endpoint()], TARGET, Duration::from_secs(3)).await?;
        meta::init_or_check_cluster_config(&target_meta, &cluster(TARGET, 2)).await?;
        target_meta
            .create_table(
                TABLE,
                TARGET_PARTITIONS,
                &[TARGET_NODE.to_string()],
                meta::now_ms(),
            )
            .await?;
        let coordinator = {
            let etcd_ref = &etcd;
            let spec = CoordinatorSpec {
                cluster: TARGET.into(),
                cluster_id: 2,
                group: "{ bj = 1, tj = 2 }".into(),
                remotes: vec![r#"bj = ["127.0.0.1:1"]"#.into()],
                lease_ttl: "3s",
            };
            let mut c = Coordinator::start(etcd_ref, dir.path(), "tj-c1", &spec)?;
            c.wait_stage(&["leader"], WAIT)?;
            c
        };
        let receiver = start_receiver(&etcd, dir.path()).await?;

        // Source: cluster config, the table on this node, real partitions.
        let source_meta =
            MetaStore::connect(&[etcd.endpoint()], SOURCE, Duration::from_secs(3)).await?;
        meta::init_or_check_cluster_config(&source_meta, &cluster(SOURCE, 1)).await?;
        source_meta
            .create_table(
                TABLE,
                SOURCE_PARTITIONS,
                &[SOURCE_NODE.to_string()],
                meta::now_ms(),
            )
            .await?;
        let mut partitions = Vec::new();
        for p in 0..SOURCE_PARTITIONS {
            let pdir = dir.path().join("bj-data").join(TABLE).join(p.to_string());
            let mut opts = PartitionOptions::new(ClusterId::new(1).context("id")?);
            opts.plog_segment_bytes = segment_bytes;
            partitions.push(Partition::open(&pdir, PartitionId(p), opts)?.0);
        }

        let coordinator_addr = coordinator.addr;
        Ok(World {
            etcd,
            dir,
            _coordinator: coordinator,
            receiver,
            source_meta,
            partitions,
            shipper_http: loopback(0),
            shipper: tokio::spawn(async { Ok(()) }),
            cancel: CancellationToken::new(),
            coordinator_addr,
            shipper_toml: String::new(),
        })
    }

    /// Starts a shipper for the source node (in this process) on a fresh HTTP port.
    fn spawn_shipper(
        &self,
    ) -> Result<(
        SocketAddr,
        tokio::task::JoinHandle<Result<()>>,
        CancellationToken,
    )> {
        let http = loopback(free_port());
        let config = ShipperConfig::parse(&format!(
            "[cluster]\nname = \"{SOURCE}\"\nid = 1\nduplication_group = {{ bj = 1, tj = 2 }}\n\n\
             [etcd]\nendpoints = [\"{}\"]\n\n\
             [remote_clusters]\ntj = [\"{}\"]\n\n\
             [shipper]\nnode = \"{SOURCE_NODE}\"\ndata_dir = \"{}\"\ncerts_dir = \"{}\"\n\
             http_addr = \"{http}\"\nlease_ttl = \"2s\"\netcd_timeout = \"1s\"\n\
             progress_interval = \"200ms\"\nreconcile_interval = \"300ms\"\n\
             duplicate_log_batch_bytes = 2048\nwindow_batches = 4\nbandwidth_mbps = 100\nrtt_ms = 5\n{}",
            self.etcd.endpoint(),
            self.coordinator_addr,
            self.dir.path().join("bj-data").display(),
            self.dir.path().join("certs").display(),
            self.shipper_toml,
        ))?;
        config.validate()?;
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(ferry_shipper::server::run(config, cancel.clone()));
        Ok((http, handle, cancel))
    }
    async fn write(&self, p: u32, keys: std::ops::Range<u32>) -> Result<BTreeSet<String>> {
        let mut written = BTreeSet::new();
        for i in keys {
            let key = format!("p{p}-key-{i:05}");
            self.partitions[p as usize]
                .write(WriteCmd::Set {
                    key: key.clone().into_bytes(),
                    value: vec![b'x'; 100],
                    expiry: Expiry::Never,
                    cond: SetCond::Always,
                    get_old: false,
                })
                .await?;
            written.insert(key);
        }
        Ok(written)
    }

    async fn add_dup(&self) -> Result<DupId> {
        let policy = DupPolicy {
            local_cluster: SOURCE,
            duplication_group: vec![SOURCE, TARGET],
            remote_clusters: vec![TARGET],
        };
        let (id, _) = self
            .source_meta
            .add_dup(TABLE, TARGET, DupMode::Incremental, &policy, meta::now_ms())
            .await?;
        Ok(id)
    }

    /// Waits until every partition's row satisfies `ok`.
    async fn wait_rows(
        &self,
        what: &str,
        ok: impl Fn(&ferry_shipper::status::View) -> bool,
    ) -> Result<Vec<ferry_shipper::status::View>> {
        if self.shipper.is_finished() {
            bail!("the shipper stopped");
        }
        self.wait_views(self.shipper_http, what, ok).await
    }

    /// Waits until the shipper on `http` shows one row per source partition, each satisfying
    /// `ok`.
    async fn wait_views(
        &self,
        http: SocketAddr,
        what: &str,
        ok: impl Fn(&ferry_shipper::status::View) -> bool,
    ) -> Result<Vec<ferry_shipper::status::View>> {
        let deadline = Instant::now() + WAIT;
        let mut rows = Vec::new();
        while Instant::now() < deadline {
            rows = views(http);
            if rows.len() == SOURCE_PARTITIONS as usize && rows.iter().all(&ok) {
                return Ok(rows);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{what}: not reached within {WAIT:?}; rows: {rows:#?}\nreceiver log:\n{}",
            self.receiver.log_text()
        )
    }

    /// Every key put into the target inboxes for source partition `sp`, and the decrees seen.
    fn inbox(&self, sp: u32) -> Result<(BTreeSet<String>, BTreeSet<u64>)> {
        let mut keys = BTreeSet::new();
        let mut decrees = BTreeSet::new();
        for tp in 0..TARGET_PARTITIONS {
            let pdir = self
                .dir
                .path()
                .join("tj-data")
                .join(TABLE)
                .join(tp.to_string());
            let source = Source {
                cluster: ClusterId::new(1).context("id")?,
                partition: PartitionId(sp),
            };
            for r in durable_records(&pdir, source)? {
                decrees.insert(r.decree.0);
                for op in r.ops {
                    if let Op::Put { key, .. } = op {
                        keys.insert(String::from_utf8_lossy(&key).into_owned());
                    }
                }
            }
        }
        Ok((keys, decrees))
    }
}

/// A shipper's `/replica/duplication` rows.
fn views(http: SocketAddr) -> Vec<ferry_shipper::status::View> {
    http_get(http, "/replica/duplication")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<Duplications>(&b).ok())
        .map(|d| d.duplications)
        .unwrap_or_default()
}

/// The target's receiver, for node `tj-n1` with its data in `dir/tj-data`.
async fn start_receiver(etcd: &Etcd, dir: &Path) -> Result<Receiver> {
    let spec = ReceiverSpec {
        cluster: TARGET.into(),
        cluster_id: 2,
        group: "{ bj = 1, tj = 2 }".into(),
        etcd_endpoint: etcd.endpoint(),
        node: TARGET_NODE.into(),
        data_dir: dir.join("tj-data"),
        certs_dir: dir.join("certs"),
        dir: dir.to_path_buf(),
        place: Place::local(),
        listen: None,
        extra_toml: "bandwidth_mbps = 100\n".into(),
    };
    // Off the runtime: it waits with blocking sleeps.
    tokio::task::spawn_blocking(move || Receiver::start(&spec)).await?
}

/// An incremental dup ships exactly the writes made after it was added, from every partition,
/// through the real receiver into the target inboxes; etcd's progress and the shipper's views
/// agree; a pause ships nothing and shows the pending writes; start catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_dup_ships_new_writes_and_pause_holds_them() -> Result<()> {
    let w = World::start().await?;
    // Before the dup: never shipped.
    let mut before = BTreeSet::new();
    for p in 0..SOURCE_PARTITIONS {
        before.extend(w.write(p, 0..30).await?);
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let dupid = w.add_dup().await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut after: Vec<BTreeSet<String>> = Vec::new();
    for p in 0..SOURCE_PARTITIONS {
        after.push(w.write(p, 100..200).await?);
    }
    let rows = w
        .wait_rows("every partition caught up", |r| {
            r.state == "shipping" && r.committed_decree == 130 && r.confirmed_decree == 130
        })
        .await?;
    for r in &rows {
        assert_eq!(r.pending_mutations, 0);
        assert_eq!(r.lag_ms, 0, "caught up means no lag");
        assert_eq!(r.dupid, dupid.0);
        assert!(r.fencing_token.is_some_and(|t| t > 0));
        assert!(r.receiver.is_some());
    }
    for p in 0..SOURCE_PARTITIONS {
        let (keys, decrees) = w.inbox(p)?;
        assert_eq!(
            keys, after[p as usize],
            "partition {p}: exactly the writes after the dup"
        );
        assert!(keys.is_disjoint(&before));
        assert_eq!(
            decrees,
            (31..=130).collect::<BTreeSet<u64>>(),
            "partition {p}: decrees after the dup's creation, gap-free"
        );
    }
    // etcd's progress catches up within a progress interval.
    let deadline = Instant::now() + WAIT;
    loop {
        let all = futures::future::join_all(
            (0..SOURCE_PARTITIONS).map(|p| w.source_meta.progress(TABLE, dupid, PartitionId(p))),
        )
        .await;
        let done = all.iter().all(|r| {
            matches!(r, Ok(Some(p)) if p.confirmed_decree == Decree(130) && p.committed_decree == Decree(130))
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "progress in etcd: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = http_get(w.shipper_http, "/metrics")?;
    let shipped = format!(
        r#"dup_shipped_ops_total{{table="users",dupid="{}",partition="0"}} 100"#,
        dupid.0
    );
    assert!(metrics.contains(&shipped), "{metrics}");
    assert!(metrics.contains("dup_time_lag_ms_bucket"), "{metrics}");
    if std::env::var_os("SHOW_METRICS").is_some() {
        eprintln!("{metrics}");
    }

    // Pause: new writes stay pending, visible in the view.
    w.source_meta
        .apply_dup_event(TABLE, dupid, DupEvent::Pause)
        .await?;
    w.wait_rows("paused", |r| r.state == "paused").await?;
    let paused_writes = w.write(0, 500..520).await?;
    let rows = w
        .wait_rows("pending shown while paused", |r| {
            r.partition != 0 || (r.pending_mutations == 20 && r.committed_decree == 150)
        })
        .await?;
    let p0 = rows
        .iter()
        .find(|r| r.partition == 0)
        .context("row of p0")?;
    assert_eq!(p0.confirmed_decree, 130);
    assert!(p0.lag_ms < 60_000, "lag is since the first unshipped write");
    assert!(p0.plog_retained_bytes > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        w.inbox(0)?.0.is_disjoint(&paused_writes),
        "nothing ships while paused"
    );

    // Start: catches up.
    w.source_meta
        .apply_dup_event(TABLE, dupid, DupEvent::Start)
        .await?;
    w.wait_rows("caught up after start", |r| {
        r.state == "shipping"
            && r.pending_mutations == 0
            && r.confirmed_decree == r.committed_decree
    })
    .await?;
    let (keys, _) = w.inbox(0)?;
    assert!(paused_writes.is_subset(&keys));

    w.cancel.cancel();
    tokio::time::timeout(WAIT, w.shipper).await???;
    // Stopping resigned every election.
    let left = w
        .etcd
        .get_prefix(&format!("/ferry/{SOURCE}/election/dup/"))?;
    assert!(left.is_empty(), "elections left behind: {left:?}");
    Ok(())
}

/// Two shippers beside one node: each partition has exactly one leader. When the leader stops,
/// the other takes over with a larger fencing token and ships on from the confirmed decree, so
/// the target ends with every write, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_shipper_takes_over_without_losing_writes() -> Result<()> {
    let mut w = World::start().await?;
    let dupid = w.add_dup().await?;
    let mut written: Vec<BTreeSet<String>> = Vec::new();
    for p in 0..SOURCE_PARTITIONS {
        written.push(w.write(p, 0..50).await?);
    }
    let first = w
        .wait_rows("the first shipper leads and catches up", |r| {
            r.fencing_token.is_some() && r.pending_mutations == 0 && r.confirmed_decree == 50
        })
        .await?;
    let (b_http, b_handle, b_cancel) = w.spawn_shipper()?;
    let standby = w
        .wait_views(b_http, "the second shipper campaigns", |r| {
            r.state == "campaigning"
        })
        .await?;
    assert!(
        standby.iter().all(|r| r.fencing_token.is_none()),
        "one leader per partition"
    );

    // The first shipper stops (resigning); the second leads and ships what comes next.
    w.cancel.cancel();
    tokio::time::timeout(WAIT, &mut w.shipper).await???;
    for p in 0..SOURCE_PARTITIONS {
        written[p as usize].extend(w.write(p, 50..80).await?);
    }
    let taken = w
        .wait_views(b_http, "the second shipper catches up", |r| {
            r.state == "shipping" && r.confirmed_decree == 80 && r.pending_mutations == 0
        })
        .await?;
    for r in &taken {
        let old = first
            .iter()
            .find(|f| f.partition == r.partition)
            .and_then(|f| f.fencing_token);
        assert!(
            r.fencing_token > old,
            "the new leader's token is larger: {r:?}"
        );
    }
    for p in 0..SOURCE_PARTITIONS {
        let (keys, decrees) = w.inbox(p)?;
        assert_eq!(
            keys, written[p as usize],
            "partition {p}: every write, none lost"
        );
        assert_eq!(decrees, (1..=80).collect::<BTreeSet<u64>>());
    }
    let _ = dupid;
    b_cancel.cancel();
    tokio::time::timeout(WAIT, b_handle).await???;
    Ok(())
}

/// A dup whose target table does not exist: FAIL_SLOW keeps retrying and says why; after
/// `set-fail-mode FAIL_FAST` the partition stops, with the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_target_table_is_retried_then_stops_under_fail_fast() -> Result<()> {
    let w = World::start().await?;
    w.source_meta
        .create_table(
            "orders",
            SOURCE_PARTITIONS,
            &[SOURCE_NODE.to_string()],
            meta::now_ms(),
        )
        .await?;
    for p in 0..SOURCE_PARTITIONS {
        let pdir = w
            .dir
            .path()
            .join("bj-data")
            .join("orders")
            .join(p.to_string());
        let opts = PartitionOptions::new(ClusterId::new(1).context("id")?);
        drop(Partition::open(&pdir, PartitionId(p), opts)?);
    }
    let policy = DupPolicy {
        local_cluster: SOURCE,
        duplication_group: vec![SOURCE, TARGET],
        remote_clusters: vec![TARGET],
    };
    let (dupid, _) = w
        .source_meta
        .add_dup(
            "orders",
            TARGET,
            DupMode::Incremental,
            &policy,
            meta::now_ms(),
        )
        .await?;
    let rows = w
        .wait_rows("retrying with the reason", |r| {
            r.state == "retrying"
                && r.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("orders"))
        })
        .await?;
    assert!(rows.iter().all(|r| r.fail_mode == "FAIL_SLOW"));
    let reason = rows[0].last_error.clone().unwrap_or_default();
    assert!(reason.contains("tj"), "names the remote cluster: {reason}");
    w.source_meta
        .set_fail_mode("orders", dupid, ferry_meta::status::FailMode::Fast)
        .await?;
    let rows = w
        .wait_rows("stopped by FAIL_FAST", |r| r.state == "stopped")
        .await?;
    for r in &rows {
        let e = r.last_error.as_deref().unwrap_or_default();
        assert!(e.starts_with("FAIL_FAST") && e.contains("orders"), "{e}");
        assert!(
            r.fencing_token.is_none(),
            "a stopped partition holds no election"
        );
    }
    Ok(())
}

/// The records after a partition's confirmed decree were garbage-collected, and the shipper is
/// told to stop then (`on_log_gone = "stop"`; by default it re-bootstraps, see
/// `tests/tests/rebootstrap.rs`): that partition stops with a clear error, and the others ship
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_decree_removed_by_gc_stops_only_that_partition() -> Result<()> {
    let mut w = World::without_shipper(4096).await?;
    let dupid = w.add_dup().await?;
    for p in 0..SOURCE_PARTITIONS {
        w.write(p, 0..200).await?;
    }
    // Partition 0 was confirmed up to 5 once, then its plog below 150 was removed.
    w.source_meta
        .advance_progress(
            TABLE,
            dupid,
            PartitionId(0),
            &ferry_meta::Progress {
                confirmed_decree: Decree(5),
                last_confirmed_timestamp_ms: 0,
                committed_decree: Decree(5),
                updated_at_ms: 0,
                last_error: None,
                extra: Default::default(),
            },
        )
        .await?;
    let plog0 = w
        .dir
        .path()
        .join("bj-data")
        .join(TABLE)
        .join("0")
        .join("plog");
    let removed = ferry_log::plog::remove_segments_below(&plog0, Decree(150))?;
    assert!(!removed.is_empty());
    w.shipper_toml = "on_log_gone = \"stop\"\n".into();
    w.start_shipper()?;
    let rows = w
        .wait_rows("p0 stopped, p1 caught up", |r| {
            if r.partition == 0 {
                r.state == "stopped"
            } else {
                r.confirmed_decree == 200 && r.pending_mutations == 0
            }
        })
        .await?;
    let p0 = rows
        .iter()
        .find(|r| r.partition == 0)
        .context("row of p0")?;
    let e = p0.last_error.as_deref().unwrap_or_default();
    assert!(e.contains("start decree 6 is no longer"), "{e}");
    assert!(e.contains("on_log_gone is `stop`"), "{e}");
    assert_eq!(p0.confirmed_decree, 5);
    assert_eq!(p0.pending_mutations, 195);
    assert!(
        w.inbox(0)?.1.is_empty(),
        "nothing of partition 0 was shipped"
    );
    assert_eq!(w.inbox(1)?.1, (1..=200).collect::<BTreeSet<u64>>());
    Ok(())
}

/// A shipper whose [cluster] differs from the cluster's stored config refuses to start, naming
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_config_mismatch_refuses_to_start() -> Result<()> {
    let w = World::without_shipper(64 << 20).await?;
    let config = ShipperConfig::parse(&format!(
        "[cluster]\nname = \"{SOURCE}\"\nid = 3\nduplication_group = {{ bj = 3, tj = 2 }}\n\n\
         [etcd]\nendpoints = [\"{}\"]\n\n[shipper]\nnode = \"{SOURCE_NODE}\"\ncerts_dir = \"{}\"\n\
         http_addr = \"{}\"\netcd_timeout = \"1s\"\n",
        w.etcd.endpoint(),
        w.dir.path().join("certs").display(),
        loopback(free_port()),
    ))?;
    config.validate()?;
    let err = tokio::time::timeout(
        WAIT,
        ferry_shipper::server::run(config, CancellationToken::new()),
    )
    .await?
    .expect_err("a mismatching config must not start");
    let msg = format!("{err:#}");
    assert!(msg.contains("`cluster.id` is 3 here but 1"), "{msg}");
    Ok(())
}
