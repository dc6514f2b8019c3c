//! The partition task of one (table, dup, partition) in `DS_LOG` (or `DS_APP`, where it first
//! sends the checkpoint: [`crate::checkpoint`]): campaign, and while leading, run sessions one
//! after the other (retrying by fail mode) and persist the confirmed decree to
//! etcd every `progress_interval`. Leadership lost → stop shipping at once and campaign again.
//! FAIL_FAST → stop and wait for the operator (a change of fail mode, or pause/start, begins
//! again). A start decree that GC removed → re-bootstrap the partition from a fresh checkpoint
//! ([`crate::rebootstrap`]), or stop with an alarm if `shipper.on_log_gone = "stop"`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_meta::status::{DupStatus, FailMode as StoredFailMode};
use ferry_meta::{DupInfo, MetaError, MetaStore, Progress};
use ferry_proto::Decree;
use serde_json::Map;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checkpoint;
use crate::config::OnLogGone;
use crate::election::{self, Leadership};
use crate::metrics::labels;
use crate::rebootstrap;
use crate::server::Shared;
use crate::session::{self, Carry, Confirmed, Failure, SessionCtx};
use crate::status::{Key, State};
use crate::tail;
use ferry_dup::retry::{Action, FailMode, Retry};

/// How a leadership term ended.
enum TermEnd {
    Cancelled,
    /// Lost the lease, the fence, or the receiver knows a newer shipper.
    Lost(String),
    /// FAIL_FAST, or the records are gone: wait for the operator.
    Stopped(String),
}

/// The fail mode of the retry policy for a stored one.
pub fn fail_mode(m: StoredFailMode) -> FailMode {
    match m {
        StoredFailMode::Slow => FailMode::Slow,
        StoredFailMode::Skip => FailMode::Skip,
        StoredFailMode::Fast => FailMode::Fast,
    }
}

/// Runs until `cancel` (the dup left `DS_LOG`, was removed, or the process stops).
/// Cancellation-safe: it resigns the election and writes the last progress before returning.
pub async fn run(
    shared: Arc<Shared>,
    key: Key,
    mut dup: watch::Receiver<DupInfo>,
    cancel: CancellationToken,
) {
    let l = labels(&key.table, key.dupid, key.partition);
    let meta = shared.meta.clone();
    let name = meta
        .keys()
        .shipper_election(&key.table, key.dupid, key.partition);
    let value = serde_json::to_vec(&serde_json::json!({ "node": shared.config.shipper.node }))
        .unwrap_or_default();
    let mut backoff = Duration::from_millis(200);
    loop {
        shared.board.with(&key, |e| {
            e.state = State::Campaigning;
            e.fencing_token = None;
        });
        let leadership = match election::campaign(
            &meta,
            name.clone(),
            value.clone(),
            shared.config.shipper.lease_ttl,
            &cancel,
        )
        .await
        {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                shared
                    .board
                    .with(&key, |s| s.last_error = Some(e.to_string()));
                tracing::debug!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, error = %e, "campaign failed");
                if sleep_or_cancel(&cancel, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        shared.metrics.leader.get_or_create(&l).set(1);
        shared.metrics.start_series(&l);
        let token = leadership.fencing_token();
        tracing::info!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, token, "leading the shipping of this partition");
        shared.board.with(&key, |e| e.fencing_token = Some(token));
        let end = term(&shared, &key, &mut dup, leadership, &cancel).await;
        // `get`, not `get_or_create`: a removed dup's series were already dropped.
        if let Some(g) = shared.metrics.leader.get(&l) {
            g.set(0);
        }
        match end {
            TermEnd::Cancelled => return,
            // Stopping (pause, remove, shutdown) ends the term's helpers too; not a loss.
            TermEnd::Lost(_) if cancel.is_cancelled() => return,
            TermEnd::Lost(why) => {
                tracing::warn!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, %why, "lost the shipping election; stopped shipping this partition");
                shared.board.with(&key, |e| {
                    e.state = State::Campaigning;
                    e.last_error = Some(why);
                    e.fencing_token = None;
                });
                if sleep_or_cancel(&cancel, Duration::from_millis(500)).await {
                    return;
                }
            }
            TermEnd::Stopped(why) => {
                shared.board.with(&key, |e| {
                    e.state = State::Stopped;
                    e.last_error = Some(why);
                    e.fencing_token = None;
                });
                // Wait for the operator: a new fail mode starts again; pause or remove cancels.
                let mode = dup.borrow().fail_mode;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = dup.changed() => {
                            if r.is_err() { return; }
                            if dup.borrow().fail_mode != mode { break; }
                        }
                    }
                }
            }
        }
    }
}

/// One leadership term.
async fn term(
    shared: &Arc<Shared>,
    key: &Key,
    dup: &mut watch::Receiver<DupInfo>,
    mut leadership: Leadership,
    cancel: &CancellationToken,
) -> TermEnd {
    let fenced = shared.meta.with_fence(leadership.fence());
    let term_cancel = cancel.child_token();
    let confirmed = Arc::new(Mutex::new(Confirmed::default()));
    let plog_dir = shared.plog_dir(&key.table, key.partition);
    let mut progress = tokio::spawn(progress_loop(
        shared.clone(),
        key.clone(),
        fenced.clone(),
        confirmed.clone(),
        term_cancel.clone(),
    ));
    let ctx_base = (leadership.fencing_token(), plog_dir);
    let end = tokio::select! {
        why = leadership.lost() => TermEnd::Lost(why),
        r = &mut progress => match r {
            Ok(Some(why)) => TermEnd::Lost(why),
            // Stopping ends the progress writer too; still leading, so the last progress is
            // written below.
            _ if cancel.is_cancelled() => TermEnd::Cancelled,
            _ => TermEnd::Lost("the progress writer stopped".into()),
        },
        end = async {
            // A full dup copies the checkpoint first, then ships the log after it.
            if dup.borrow().status == DupStatus::App {
                match checkpoint::run(shared, key, dup, ctx_base.0, &term_cancel).await {
                    None => {}
                    Some(Ok(())) => return TermEnd::Cancelled,
                    Some(Err(why)) => return TermEnd::Lost(why),
                }
            }
            sessions(shared, key, dup, &ctx_base, &confirmed, &term_cancel).await
        } => end,
    };
    term_cancel.cancel();
    if !progress.is_finished() {
        let _ = progress.await;
    }
    if !matches!(end, TermEnd::Lost(_)) {
        // Persist what the last session confirmed, while still leading.
        let _ = write_progress(shared, key, &fenced, &confirmed, &mut None).await;
    }
    leadership.resign(&shared.meta).await;
    end
}

/// Sessions one after another, by fail mode.
async fn sessions(
    shared: &Arc<Shared>,
    key: &Key,
    dup: &mut watch::Receiver<DupInfo>,
    (token, plog_dir): &(u64, std::path::PathBuf),
    confirmed: &Arc<Mutex<Confirmed>>,
    cancel: &CancellationToken,
) -> TermEnd {
    let mut retry = Retry::new(fail_mode(dup.borrow().fail_mode));
    let mut carry = Carry::default();
    let mut last_logged: Option<String> = None;
    rebootstrap::take_up(shared, key).await;
    loop {
        let info = dup.borrow_and_update().clone();
        retry.set_mode(fail_mode(info.fail_mode));
        let ctx = SessionCtx {
            shared: shared.clone(),
            key: key.clone(),
            labels: labels(&key.table, key.dupid, key.partition),
            dup: info,
            fencing_token: *token,
            plog_dir: plog_dir.clone(),
            confirmed: confirmed.clone(),
            cancel: cancel.clone(),
        };
        carry.progressed = false;
        let failure = session::run(&ctx, &mut carry).await;
        if carry.progressed {
            retry.on_success();
        }
        let msg = failure.message();
        let action = match &failure {
            Failure::Cancelled => return TermEnd::Cancelled,
            Failure::Fenced(m) => return TermEnd::Lost(m.clone()),
            Failure::Gone(m) if shared.config.shipper.on_log_gone == OnLogGone::Rebootstrap => {
                let at = confirmed.lock().unwrap_or_else(|p| p.into_inner()).decree;
                match rebootstrap::run(shared, key, dup, *token, at, m, cancel).await {
                    rebootstrap::End::Sent => continue,
                    rebootstrap::End::Cancelled => return TermEnd::Cancelled,
                    rebootstrap::End::Fenced(why) => return TermEnd::Lost(why),
                }
            }
            Failure::Gone(m) => {
                let why = format!("{m}; shipper.on_log_gone is `stop`, so the partition stops: set it to `rebootstrap`, or remove the dup and add it again with --full");
                tracing::error!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, "ALARM: {why}");
                return TermEnd::Stopped(why);
            }
            Failure::Batch(_) => retry.on_failure(),
            Failure::Transport(_) => retry.on_transport_failure(),
        };
        shared
            .metrics
            .session_failures
            .get_or_create(&ctx.labels)
            .inc();
        shared.board.with(key, |e| {
            e.last_error = Some(msg.clone());
            e.state = State::Retrying;
        });
        if last_logged.as_deref() != Some(msg.as_str()) {
            tracing::warn!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, error = %msg, "shipping session failed; retrying");
            last_logged = Some(msg.clone());
        }
        match action {
            Action::RetryAfter(d) => {
                if sleep_or_cancel(cancel, d).await {
                    return TermEnd::Cancelled;
                }
            }
            Action::SkipBatch => {
                carry.skip_first = true;
            }
            Action::Stop => {
                let why = format!("FAIL_FAST: shipping stopped after a failure: {msg}; fix the cause, then `ferry dup set-fail-mode` or pause and start the dup to resume");
                tracing::error!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, "{why}");
                return TermEnd::Stopped(why);
            }
        }
    }
}

/// Writes the confirmed decree every `progress_interval` while this term lasts, fenced by the
/// election. Returns `Some(reason)` when the fence failed (another shipper leads) or the dup was
/// removed; `None` when cancelled.
async fn progress_loop(
    shared: Arc<Shared>,
    key: Key,
    fenced: MetaStore,
    confirmed: Arc<Mutex<Confirmed>>,
    cancel: CancellationToken,
) -> Option<String> {
    let mut last: Option<(Decree, Decree, Option<String>)> = None;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(shared.config.shipper.progress_interval) => {}
        }
        match write_progress(&shared, &key, &fenced, &confirmed, &mut last).await {
            Ok(()) => warned = false,
            Err(MetaError::FenceLost) => {
                return Some("the shipping election key is gone (another shipper leads)".into())
            }
            Err(e @ MetaError::NoSuchDup { .. }) => return Some(e.to_string()),
            Err(e) => {
                if !warned {
                    tracing::warn!(table = %key.table, dupid = %key.dupid, partition = key.partition.0, error = %e, "cannot write progress to etcd; retrying");
                    warned = true;
                }
            }
        }
    }
}

/// Writes progress if the confirmed or committed decree moved since `last` (the committed one
/// moving alone still counts, so `ferry status` sees pending mutations grow).
async fn write_progress(
    shared: &Shared,
    key: &Key,
    fenced: &MetaStore,
    confirmed: &Mutex<Confirmed>,
    last: &mut Option<(Decree, Decree, Option<String>)>,
) -> Result<(), MetaError> {
    let c = *confirmed.lock().unwrap_or_else(|p| p.into_inner());
    let committed = tail::committed(&shared.plog_dir(&key.table, key.partition))
        .map(|m| m.decree)
        .unwrap_or_default();
    if !c.known {
        // No session has decided where shipping starts yet; writing 0 would tell a new dup's
        // next session to ship the whole plog.
        return Ok(());
    }
    let last_error = shared.board.get(key).and_then(|e| e.last_error);
    if last.as_ref() == Some(&(c.decree, committed, last_error.clone())) {
        return Ok(());
    }
    let p = Progress {
        confirmed_decree: c.decree,
        last_confirmed_timestamp_ms: c.timestamp_us / 1000,
        committed_decree: committed,
        updated_at_ms: ferry_meta::now_ms(),
        last_error: last_error.clone(),
        extra: Map::new(),
    };
    fenced
        .advance_progress(&key.table, key.dupid, key.partition, &p)
        .await?;
    rebootstrap::done_if_confirmed(shared, key, c.decree).await;
    *last = Some((c.decree, committed, last_error));
    Ok(())
}

/// Sleeps; true if cancelled first.
async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
