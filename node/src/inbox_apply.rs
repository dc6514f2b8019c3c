//! Applies what the receiver wrote into each partition's inbox (see [`ferry_engine::inbox`]): one task
//! per partition, last-writer-wins and exactly once through [`Partition::apply_duplicated`].
//!
//! The receiver rewrites each inbox's `committed` marker after its fsync; a task sleeps until
//! inotify reports such a write ([`CommitWatcher`]), so an idle partition costs no CPU and a
//! batch is applied as soon as it is durable. It lists the inbox directory for new sources once
//! a second. Where inotify cannot watch an inbox, the task looks at its marker every `interval`
//! instead.
//!
//! [`Partition::apply_duplicated`]: ferry_engine::partition::Partition::apply_duplicated

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use ferry_engine::inbox::InboxApplier;
use ferry_engine::partition::Partition;
use ferry_log::layout::inbox_dir;
use ferry_log::watch::{CommitWatcher, Subscription};

/// Most bytes of inbox records applied in one RocksDB batch.
const APPLY_CHUNK_BYTES: usize = 4 << 20;
/// How often each partition's inbox directory is listed for new sources; also the longest an
/// applier sleeps between two looks at a watched marker (inotify may overflow).
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
    let watcher = CommitWatcher::new();
    let mut tasks = JoinSet::new();
    for p in partitions {
        let w = watcher.clone();
        tasks.spawn(apply_partition(
            p,
            w,
            interval,
            resets.clone(),
            cancel.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

async fn apply_partition(
    partition: Arc<Partition>,
    watcher: CommitWatcher,
    interval: Duration,
    resets: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    // Each applier with the subscription to its inbox's marker, taken before its first look so
    // that no write after that look goes unnoticed.
    let mut appliers: Vec<(InboxApplier, Subscription)> = Vec::new();
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
                        if !appliers.iter().any(|(a, _)| a.source() == s) {
                            tracing::info!(
                                partition = partition.id().0,
                                source_cluster = s.cluster.get(),
                                source_partition = s.partition.0,
                                "applying a new inbox"
                            );
                            let sub = watcher.subscribe(&inbox_dir(partition.dir(), s));
                            appliers.push((InboxApplier::new(partition.dir(), s), sub));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = partition.id().0, error = %e, "list the inbox")
                }
            }
        }
        let mut ok = true;
        let mut applied = false;
        for (a, _) in &mut appliers {
            match a.apply_available(&partition, APPLY_CHUNK_BYTES).await {
                Ok(r) => applied |= r.applied_records + r.skipped_records > 0,
                Err(e) => {
                    ok = false;
                    // Logged once per failure streak, not every few milliseconds.
                    if !failing {
                        tracing::error!(partition = partition.id().0, error = %e,
                            "cannot apply duplicated writes from the inbox; retrying");
                    }
                }
            }
        }
        if ok && failing {
            tracing::info!(partition = partition.id().0, "inbox applies again");
        }
        failing = !ok;
        if applied && ok {
            // Look again at once: more may have become durable while this batch applied.
            continue;
        }
        let pause = if !ok {
            interval.max(Duration::from_millis(500))
        } else if appliers.iter().all(|(_, sub)| sub.is_watched()) {
            RESCAN
        } else {
            interval
        };
        if appliers.is_empty() || !ok {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            continue;
        }
        // Each wait ends by its marker's write or by `pause`, whichever comes first.
        let markers = futures::future::select_all(
            appliers
                .iter_mut()
                .map(|(_, sub)| Box::pin(sub.changed(pause))),
        );
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = markers => {}
        }
    }
}
