//! Re-bootstrap of one partition whose log is gone: the source collected the plog past what the
//! dup confirmed (`node.plog_hold_max_bytes`, after a long pause or outage). Instead of stopping,
//! the partition is filled again from a fresh checkpoint, and the log follows after it:
//!
//! 1. the shipper records the request (`dups/<table>/<dupid>/rebootstrap/<p>`, `requested`);
//! 2. the source node makes a checkpoint at once and records it (`checkpointed`);
//! 3. the shipper sends it like a full dup's, resumably, skipping what the target holds of the
//!    same lineage (`staged`);
//! 4. the target node applies it to the live partitions, last-writer-wins, and restarts the
//!    source's inboxes after its decree; until then the receiver refuses log sessions;
//! 5. the next log session's Welcome starts at the checkpoint's decree, and once the dup
//!    confirmed it the record is `done` (logged, `dup_rebootstraps_total`).
//!
//! Every step is in etcd or on disk, so a restart anywhere resumes it; an open request is
//! reused, never doubled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use ferry_meta::{DupInfo, Rebootstrap, RebootstrapState};
use ferry_proto::Decree;

use crate::checkpoint::{self, Copy};
use crate::server::Shared;
use crate::status::{Key, State};

/// How often the re-bootstrap record is read while the source node makes the checkpoint.
const POLL: Duration = Duration::from_millis(500);

/// How a re-bootstrap attempt ended.
pub enum End {
    /// The checkpoint is on the target: ship the log next.
    Sent,
    /// Cancelled, or the dup left `DS_LOG`.
    Cancelled,
    /// A newer shipper holds the partition.
    Fenced(String),
}

/// Requests (or takes up) the partition's re-bootstrap and sends its checkpoint. `why` is the
/// session's sentence about the missing log.
pub async fn run(
    shared: &Arc<Shared>,
    key: &Key,
    dup: &mut watch::Receiver<DupInfo>,
    token: u64,
    confirmed: Decree,
    why: &str,
    cancel: &CancellationToken,
) -> End {
    let metrics = &shared.metrics;
    let l = crate::metrics::labels(&key.table, key.dupid, key.partition);
    let mut record = loop {
        match shared
            .meta
            .request_rebootstrap(&key.table, key.dupid, key.partition, confirmed, why)
            .await
        {
            Ok(r) => break r,
            Err(e) => {
                shared.board.with(key, |b| {
                    b.last_error = Some(format!("{why}; cannot record the re-bootstrap: {e}"))
                });
                if sleep_or_cancel(cancel, POLL * 4).await {
                    return End::Cancelled;
                }
            }
        }
    };
    metrics.rebootstrap_active.get_or_create(&l).set(1);
    tracing::error!(table = %key.table, dupid = %key.dupid, partition = key.partition.0,
        generation = record.generation, state = ?record.state, "{why}: re-bootstrapping the partition from a fresh checkpoint");
    shared.board.with(key, |b| {
        b.state = State::Rebootstrapping;
        b.last_error = Some(format!("{why}: re-bootstrapping from a fresh checkpoint"));
    });
    while record.state == RebootstrapState::Requested {
        if sleep_or_cancel(cancel, POLL).await {
            return End::Cancelled;
        }
        match shared
            .meta
            .rebootstrap(&key.table, key.dupid, key.partition)
            .await
        {
            Ok(Some(r)) => record = r,
            Ok(None) => return End::Cancelled,
            Err(e) => tracing::debug!(error = %e, "read the re-bootstrap record"),
        }
    }
    let Some(cp) = record.checkpoint.clone() else {
        return End::Cancelled;
    };
    let decree = cp.manifest.decree;
    if record.state == RebootstrapState::Checkpointed {
        let what = Copy::Rebootstrap {
            generation: record.generation,
            checkpoint: Box::new(cp),
        };
        match checkpoint::copy(shared, key, dup, token, cancel, &what).await {
            None => {}
            Some(Ok(())) => return End::Cancelled,
            Some(Err(why)) => return End::Fenced(why),
        }
        mark(shared, key, &record, RebootstrapState::Staged).await;
        tracing::info!(table = %key.table, dupid = %key.dupid, partition = key.partition.0,
            generation = record.generation, decree = decree.0,
            "re-bootstrap: the checkpoint is staged on the target; the log follows once it is applied");
    }
    shared
        .board
        .with(key, |b| b.rebootstrap = Some((record.generation, decree)));
    End::Sent
}

/// Takes up a re-bootstrap whose checkpoint an earlier term already sent, so that it is marked
/// done once confirmed (called when a term starts). Requested or unsent ones resume by
/// themselves: the next session finds the log gone again.
pub async fn take_up(shared: &Shared, key: &Key) {
    let Ok(Some(r)) = shared
        .meta
        .rebootstrap(&key.table, key.dupid, key.partition)
        .await
    else {
        return;
    };
    if r.state != RebootstrapState::Staged {
        return;
    }
    if let Some(cp) = &r.checkpoint {
        let l = crate::metrics::labels(&key.table, key.dupid, key.partition);
        shared.metrics.rebootstrap_active.get_or_create(&l).set(1);
        let decree = cp.manifest.decree;
        shared
            .board
            .with(key, |b| b.rebootstrap = Some((r.generation, decree)));
    }
}

/// Marks the re-bootstrap done once the dup confirmed its checkpoint's decree (called with each
/// progress write). Logged and counted once.
pub async fn done_if_confirmed(shared: &Shared, key: &Key, confirmed: Decree) {
    let Some((generation, decree)) = shared.board.get(key).and_then(|b| b.rebootstrap) else {
        return;
    };
    if confirmed < decree {
        return;
    }
    let r = shared
        .meta
        .update_rebootstrap(&key.table, key.dupid, key.partition, |r| {
            if r.generation == generation && r.is_open() {
                r.state = RebootstrapState::Done;
                r.done_at_ms = Some(ferry_meta::now_ms());
            }
            Ok(())
        })
        .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "mark the re-bootstrap done; retried with the next progress");
        return;
    }
    let l = crate::metrics::labels(&key.table, key.dupid, key.partition);
    shared.metrics.rebootstraps.get_or_create(&l).inc();
    shared.metrics.rebootstrap_active.get_or_create(&l).set(0);
    shared.board.with(key, |b| {
        b.rebootstrap = None;
        b.last_error = None;
    });
    tracing::info!(table = %key.table, dupid = %key.dupid, partition = key.partition.0,
        generation, decree = decree.0, confirmed = confirmed.0,
        "re-bootstrap done: the target confirmed the fresh checkpoint's decree and ships the log after it");
}

async fn mark(shared: &Shared, key: &Key, record: &Rebootstrap, state: RebootstrapState) {
    let generation = record.generation;
    for _ in 0..20 {
        let r = shared
            .meta
            .update_rebootstrap(&key.table, key.dupid, key.partition, |r| {
                if r.generation == generation && r.is_open() {
                    r.state = state;
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "record the re-bootstrap state; retrying");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
