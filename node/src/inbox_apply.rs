//! Applies what the receiver wrote into each partition's inbox (see [`ferry_engine::inbox`]): one task
//! per partition, last-writer-wins and exactly once through [`Partition::apply_duplicated`].
//!
//! The receiver publishes each inbox's `committed` marker after its fsync; a task looks at the
//! markers every `interval` (a 20-byte read per source, so a few milliseconds cost nothing
//! against a WAN round trip) and lists the inbox directory for new sources once a second.
//!
//! [`Partition::apply_duplicated`]: ferry_engine::partition::Partition::apply_duplicated

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use ferry_engine::inbox::InboxApplier;
use ferry_engine::partition::Partition;

/// Most bytes of inbox records applied in one RocksDB batch.
const APPLY_CHUNK_BYTES: usize = 4 << 20;
/// How often each partition's inbox directory is listed for new sources.
const RESCAN: Duration = Duration::from_secs(1);

/// Runs one applier task per partition until cancelled. Cancellation-safe: a cancelled apply
/// either committed its RocksDB batch (with its progress) or did not.
///
/// `resets` counts inbox restarts (a re-bootstrap restarts a source's inbox after its
/// checkpoint): when it moves, every applier starts over from the partition's progress.
pub async fn run(
    partitions: Vec<Arc<Partition>>,
    interval: Duration,
    resets: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    for p in partitions {
        tasks.spawn(apply_partition(p, interval, resets.clone(), cancel.clone()));
    }
    while tasks.join_next().await.is_some() {}
}

async fn apply_partition(
    partition: Arc<Partition>,
    interval: Duration,
    resets: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut appliers: Vec<InboxApplier> = Vec::new();
    let mut scanned: Option<Instant> = None;
    let mut failing = false;
    let mut seen = resets.load(Ordering::Acquire);
    loop {
        if resets.load(Ordering::Acquire) != seen {
            seen = resets.load(Ordering::Acquire);
            appliers.clear();
            scanned = None;
        }
        if scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            scanned = Some(Instant::now());
            let dir = partition.dir().to_path_buf();
            let listed =
                match tokio::task::spawn_blocking(move || ferry_log::inbox::sources(&dir)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("the inbox listing task failed ({e})")),
                };
            match listed {
                Ok(sources) => {
                    for s in sources {
                        if !appliers.iter().any(|a| a.source() == s) {
                            tracing::info!(
                                partition = partition.id().0,
                                source_cluster = s.cluster.get(),
                                source_partition = s.partition.0,
                                "applying a new inbox"
                            );
                            appliers.push(InboxApplier::new(partition.dir(), s));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = partition.id().0, error = %e, "list the inbox")
                }
            }
        }
        let mut ok = true;
        for a in &mut appliers {
            if let Err(e) = a.apply_available(&partition, APPLY_CHUNK_BYTES).await {
                ok = false;
                // Logged once per failure streak, not every few milliseconds.
                if !failing {
                    tracing::error!(partition = partition.id().0, error = %e,
                        "cannot apply duplicated writes from the inbox; retrying");
                }
            }
        }
        if ok && failing {
            tracing::info!(partition = partition.id().0, "inbox applies again");
        }
        failing = !ok;
        let pause = if ok {
            interval
        } else {
            interval.max(Duration::from_millis(500))
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
