//! One shipping session: a QUIC stream to the receiver that owns the target table, for one
//! (dup, source partition), while this process leads its election.
//!
//! The protocol is [`ferry_dup::ship::ShipSession`]'s, without I/O: `Hello` → `Welcome`, the
//! window of batches, the small-batch hold, heartbeats, the ack timeout, FAIL_SKIP's carry-over
//! and the lag bookkeeping. This module is its driver: it finds the receiver, opens the stream,
//! decides where to resume after the `Welcome` (see [`crate::resume`]), reads the plog when the
//! session asks, wakes on the node's committed marker (inotify; a look every second anyway, every
//! 50 ms without inotify) and on the session's timers, and reports what was confirmed. The
//! session ends with a [`Failure`]; the partition task decides by fail mode what comes next.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_admin::api::TableReceivers;
use ferry_admin::client::AdminClient;
use ferry_dup::ship::{SessionId, ShipConfig, ShipEvent, ShipSession, ShipStats};
use ferry_log::plog::{CommittedReader, PlogReader, ReadError};
use ferry_meta::DupInfo;
use ferry_proto::wire::{Frame, Welcome};
use ferry_proto::Decree;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use ferry_dup::ship::{strip_ops, Carry, Confirmed, Failure, SMALL_BATCH_GAP};

use crate::error::ShipperError;
use crate::metrics::Labels;
use crate::resume::{self, Start};
use crate::server::Shared;
use crate::status::{Key, State};
use crate::tail;

/// How long to wait for the committed marker before looking again anyway, when inotify cannot
/// watch the plog directory.
pub const FALLBACK_POLL: Duration = Duration::from_millis(50);
/// The same with an inotify watch: a look now and then covers an overflowed event queue, and an
/// idle partition costs next to nothing.
pub const WATCHED_POLL: Duration = Duration::from_secs(1);

/// Everything one session needs.
pub struct SessionCtx {
    pub shared: Arc<Shared>,
    pub key: Key,
    pub labels: Labels,
    pub dup: DupInfo,
    pub fencing_token: u64,
    pub plog_dir: PathBuf,
    pub confirmed: Arc<Mutex<Confirmed>>,
    pub cancel: CancellationToken,
}

/// Runs one session until it fails or is cancelled. Cancellation-safe (through `ctx.cancel`).
pub async fn run(ctx: &SessionCtx, carry: &mut Carry) -> Failure {
    let span = tracing::info_span!("session", table = %ctx.key.table, dupid = %ctx.key.dupid,
        partition = ctx.key.partition.0, remote = %ctx.dup.remote, token = ctx.fencing_token);
    ship(ctx, carry).instrument(span).await
}

/// The receiver that owns every partition of the target table. One receiver per target table
/// for now: a table spread over several receivers is refused with a clear message.
pub fn single_receiver(t: &TableReceivers) -> Result<String, ShipperError> {
    let mut addr: Option<&str> = None;
    for p in &t.partitions {
        let Some(a) = p.receiver_addr.as_deref() else {
            return Err(ShipperError::NoReceiver {
                table: t.table.clone(),
                partition: p.partition,
                node: p.node.clone(),
            });
        };
        match addr {
            None => addr = Some(a),
            Some(prev) if prev == a => {}
            Some(prev) => {
                return Err(ShipperError::SpreadReceivers {
                    table: t.table.clone(),
                    first: prev.to_owned(),
                    second: a.to_owned(),
                })
            }
        }
    }
    // Every partition has a receiver, so `addr` is set unless there are no partitions.
    addr.map(str::to_owned)
        .ok_or_else(|| ShipperError::NoPartitions {
            table: t.table.clone(),
        })
}

async fn ship(ctx: &SessionCtx, carry: &mut Carry) -> Failure {
    let shared = &ctx.shared;
    let s = &shared.config.shipper;
    let key = &ctx.key;
    shared.board.with(key, |e| e.state = State::Connecting);

    // Which receiver, asked again at every session start.
    let Some(remote_addrs) = shared.config.remote_clusters.get(&ctx.dup.remote) else {
        return Failure::Transport(format!(
            "remote cluster `{}` is not in this shipper's [remote_clusters]; add its coordinators' admin addresses and restart the shipper",
            ctx.dup.remote
        ));
    };
    let client = match AdminClient::new(remote_addrs, s.etcd_timeout) {
        Ok(c) => c,
        Err(e) => return Failure::Transport(e.to_string()),
    };
    let receivers = match client.table_receivers(&ctx.dup.remote_table).await {
        Ok(r) => r,
        Err(e) => {
            return Failure::Transport(format!(
                "cannot find the receiver of table `{}` in cluster `{}`: {e}",
                ctx.dup.remote_table, ctx.dup.remote
            ))
        }
    };
    let addr = match single_receiver(&receivers) {
        Ok(a) => a,
        Err(e) => return Failure::Transport(e.to_string()),
    };
    shared.board.with(key, |e| e.receiver = Some(addr.clone()));

    let conn = match shared.quic.connection(&addr).await {
        Ok(c) => c,
        Err(e) => return Failure::Transport(e.to_string()),
    };
    let (mut send, recv) = match tokio::time::timeout(s.ack_timeout, conn.open_bi()).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return Failure::Transport(format!("cannot open a stream to receiver {addr}: {e}"))
        }
        Err(_) => {
            return Failure::Transport(format!(
                "receiver {addr} did not accept a stream within {:?}",
                s.ack_timeout
            ))
        }
    };
    let mut frames = ferry_net::FrameReader::spawn(recv, "receiver");
    let config = ShipConfig {
        window_batches: s.window_batches,
        batch_bytes: s.duplicate_log_batch_bytes,
        small_batch_gap: SMALL_BATCH_GAP,
        heartbeat_interval: s.heartbeat_interval,
        ack_timeout: s.ack_timeout,
        lagging_threshold_ms: s.dup_lagging_write_threshold_ms,
        zstd_level: s.zstd_level,
    };
    let id = SessionId {
        receiver: addr.clone(),
        cluster_id: shared.cluster_id,
        dupid: key.dupid,
        table: ctx.dup.remote_table.clone(),
        partition: key.partition,
        fencing_token: ctx.fencing_token,
    };
    let mut session = ShipSession::new(
        config,
        id,
        std::mem::take(carry),
        Instant::now(),
        ferry_log::clock::wall_us(),
    );
    let failure = drive(ctx, &addr, &mut session, &mut send, &mut frames).await;
    *carry = session.into_carry();
    failure
}

/// Moves bytes for `session` until it ends: frames to and from the receiver, plog reads,
/// committed-marker wake-ups, timers; and reports what it confirmed (progress cell, status
/// board, metrics). The protocol decisions are all the session's.
async fn drive(
    ctx: &SessionCtx,
    addr: &str,
    session: &mut ShipSession,
    send: &mut quinn::SendStream,
    frames: &mut ferry_net::FrameReader,
) -> Failure {
    let shared = &ctx.shared;
    let s = &shared.config.shipper;
    let key = &ctx.key;
    let m = &shared.metrics;
    let l = &ctx.labels;
    let mut reader: Option<PlogReader> = None;
    let mut marker = CommittedReader::new(&ctx.plog_dir);
    let mut sub = shared.watcher.subscribe(&ctx.plog_dir);
    let mut exported = ShipStats::default();
    loop {
        // The committed marker: one pread, so it is looked at on every turn.
        match tail::committed_from(&mut marker) {
            Ok(c) if c.decree != session.committed().0 => {
                session.handle_committed(c.decree, c.commit_time_us, Instant::now());
                shared.board.with(key, |e| {
                    e.committed = c.decree;
                    e.committed_time_us = c.commit_time_us;
                });
            }
            Ok(_) => {}
            Err(e) => {
                return Failure::Transport(format!(
                    "cannot read the committed marker in {}: {e}",
                    ctx.plog_dir.display()
                ))
            }
        }
        session.set_wall_clock(Instant::now(), ferry_log::clock::wall_us());
        while let Some(event) = session.poll() {
            match event {
                ShipEvent::Send(frame) => {
                    if let Err(e) = timed_send(send, &frame, s.ack_timeout).await {
                        session.handle_send_failed(&e.to_string(), Instant::now());
                    }
                }
                ShipEvent::ReadPlog {
                    from,
                    upto,
                    max_bytes,
                } => {
                    let r = match reader.as_mut() {
                        Some(r) if r.next_decree() == from => r,
                        _ => reader.insert(PlogReader::new(&ctx.plog_dir, from)),
                    };
                    // The read and the batch's compression block: off the runtime's workers.
                    tokio::task::block_in_place(|| match tail::read_batch(r, upto, max_bytes) {
                        Ok(records) => session.handle_records(records, Instant::now()),
                        Err(ReadError::Gone { wanted, oldest, .. }) => {
                            session.handle_read_gone(wanted, oldest, Instant::now())
                        }
                        Err(e) => session.handle_read_failed(&e.to_string(), Instant::now()),
                    });
                }
                ShipEvent::Confirmed(c) => {
                    lock(&ctx.confirmed).merge(c);
                    let oldest = session.oldest_unconfirmed_us();
                    let shipping = session.is_shipping();
                    shared.board.with(key, |e| {
                        if shipping && e.state != State::Shipping {
                            e.state = State::Shipping;
                        }
                        e.confirmed = c.decree;
                        e.oldest_unconfirmed_us = oldest;
                        e.last_error = None;
                    });
                }
                ShipEvent::Lag(lag) => {
                    let h = m.time_lag.get_or_create(l);
                    for ms in lag.batch_lags_ms {
                        h.observe(ms as f64);
                    }
                    let h = m.write_lag.get_or_create(l);
                    for us in lag.write_lags_us {
                        h.observe(us as f64 / 1000.0);
                    }
                }
                ShipEvent::End(failure) => {
                    export(ctx, session.stats(), &mut exported);
                    return failure;
                }
            }
        }
        export(ctx, session.stats(), &mut exported);
        let oldest = session.oldest_unconfirmed_us();
        shared.board.with(key, |e| e.oldest_unconfirmed_us = oldest);

        let deadline = session.poll_timeout();
        tokio::select! {
            biased;
            _ = ctx.cancel.cancelled() => session.cancel(),
            f = frames.recv() => {
                let now = Instant::now();
                match f {
                    Ok(Frame::Welcome(w)) => match start_point(ctx, &w).await {
                        Ok((start, ts)) => {
                            tracing::info!(%addr, welcome = %w.confirmed_decree, from = %start.next(), "session started");
                            session.handle_welcome(&w, start, ts, Instant::now());
                            shared.board.with(key, |e| {
                                e.state = State::Shipping;
                                e.confirmed = start.max(w.confirmed_decree);
                                e.oldest_unconfirmed_us = None;
                            });
                        }
                        Err(f) => return f,
                    },
                    Ok(Frame::Ack(a)) => session.handle_ack(a.confirmed_decree, now),
                    Ok(Frame::Error(e)) => session.handle_error(&e, now),
                    Ok(other) => session.handle_unexpected(&other, now),
                    Err(e) => session.handle_connection_lost(&e.to_string(), now),
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                session.handle_timeout(Instant::now());
            }
            _ = sub.changed(if sub.is_watched() { WATCHED_POLL } else { FALLBACK_POLL }) => {}
        }
    }
}

/// Where the session starts after the receiver's `Welcome` (see [`crate::resume`]): after the
/// larger of the Welcome's decree, the stored progress and what this term confirmed; or, for a
/// new dup, after the writes made before its creation. With the commit time of that record.
async fn start_point(ctx: &SessionCtx, welcome: &Welcome) -> Result<(Decree, u64), Failure> {
    let key = &ctx.key;
    let stored = ctx
        .shared
        .meta
        .progress(&key.table, key.dupid, key.partition)
        .await
        .map_err(|e| Failure::Transport(e.to_string()))?;
    let local = *lock(&ctx.confirmed);
    match resume::start_point(welcome.confirmed_decree, stored.as_ref()) {
        Start::After(d) => {
            let ts = stored
                .as_ref()
                .filter(|p| p.confirmed_decree == d)
                .map_or(0, |p| p.last_confirmed_timestamp_ms * 1000);
            if local.decree > d {
                Ok((local.decree, local.timestamp_us))
            } else {
                Ok((d, ts))
            }
        }
        Start::NewDup if local.known => Ok((local.decree, local.timestamp_us)),
        Start::NewDup => new_dup_start(ctx)
            .await
            .map(|d| (d, lock(&ctx.confirmed).timestamp_us)),
    }
}

/// Adds what the session counted since the last call to the process's metrics.
fn export(ctx: &SessionCtx, now: &ShipStats, last: &mut ShipStats) {
    let m = &ctx.shared.metrics;
    let l = &ctx.labels;
    let delta = |a: u64, b: u64| a.saturating_sub(b);
    m.shipped_ops
        .get_or_create(l)
        .inc_by(delta(now.shipped_ops, last.shipped_ops));
    let skipped = delta(now.skipped_ops, last.skipped_ops);
    if skipped > 0 {
        m.failed_ops.get_or_create(l).inc_by(skipped);
        tracing::warn!(
            ops = skipped,
            "FAIL_SKIP: skipped a batch that kept failing; its writes are not duplicated"
        );
    }
    let lagging = delta(now.lagging_writes, last.lagging_writes);
    if lagging > 0 {
        m.lagging_writes.get_or_create(l).inc_by(lagging);
    }
    m.log_read_bytes
        .get_or_create(l)
        .inc_by(delta(now.log_read_bytes, last.log_read_bytes));
    m.shipped_raw_bytes
        .get_or_create(l)
        .inc_by(delta(now.raw_bytes, last.raw_bytes));
    m.shipped_bytes
        .get_or_create(l)
        .inc_by(delta(now.wire_bytes, last.wire_bytes));
    *last = now.clone();
}

/// A new dup: ship writes from its creation on (see [`crate::resume`]).
async fn new_dup_start(ctx: &SessionCtx) -> Result<Decree, Failure> {
    let dir = ctx.plog_dir.clone();
    let create_us = ctx.dup.create_timestamp_ms.saturating_mul(1000);
    let committed = tail::committed(&dir)
        .map_err(|e| Failure::Transport(format!("cannot read the committed marker: {e}")))?
        .decree;
    let found =
        tokio::task::spawn_blocking(move || resume::new_dup_start(&dir, create_us, committed))
            .await
            .map_err(|e| Failure::Transport(format!("the plog search task failed: {e}")))?
            .map_err(|e| {
                Failure::Transport(format!(
                    "searching the plog for the dup's first write failed: {e}"
                ))
            })?;
    if found.maybe_incomplete {
        tracing::warn!(after = %found.after, "the plog's oldest record was written after this dup was created: writes between the dup's creation and decree {} may have been garbage-collected before shipping started", found.after.next());
    }
    tracing::info!(after = %found.after, create_timestamp_ms = ctx.dup.create_timestamp_ms,
        "new dup: shipping the writes made from its creation on");
    *lock(&ctx.confirmed) = Confirmed {
        decree: found.after,
        timestamp_us: found.after_timestamp_us,
        known: true,
    };
    Ok(found.after)
}

async fn timed_send(
    send: &mut quinn::SendStream,
    frame: &Frame,
    timeout: Duration,
) -> Result<(), ShipperError> {
    match tokio::time::timeout(timeout, ferry_net::send_frame(send, frame, "receiver")).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ShipperError::SendStalled { timeout }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use ferry_admin::api::PartitionReceiver;
    use ferry_meta::TableState;

    use super::*;

    fn table(addrs: &[Option<&str>]) -> TableReceivers {
        TableReceivers {
            table: "users".into(),
            partition_count: addrs.len() as u32,
            state: TableState::Available,
            partitions: addrs
                .iter()
                .enumerate()
                .map(|(i, a)| PartitionReceiver {
                    partition: i as u32,
                    node: Some(format!("n{i}")),
                    receiver_addr: a.map(str::to_owned),
                })
                .collect(),
        }
    }

    #[test]
    fn one_receiver_per_target_table() {
        assert_eq!(
            single_receiver(&table(&[Some("r:1"), Some("r:1")])).expect("one receiver"),
            "r:1"
        );
        let e = single_receiver(&table(&[Some("r:1"), Some("r:2")]))
            .expect_err("spread")
            .to_string();
        assert!(e.contains("r:1") && e.contains("r:2"), "{e}");
        let e = single_receiver(&table(&[Some("r:1"), None]))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("partition 1") && e.contains("(node n1)"), "{e}");
        let e = single_receiver(&table(&[])).expect_err("no partitions");
        assert!(
            matches!(&e, ShipperError::NoPartitions { table } if table == "users"),
            "{e}"
        );
    }
}
