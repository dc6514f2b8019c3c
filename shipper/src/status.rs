//! What every (table, dup, partition) of this shipper is doing, shared by the partition tasks
//! (which write it), `/replica/duplication` and `/metrics` (which read it). Lag and pending
//! mutations are computed when read, from the commit times kept here, so they stay true while a
//! session is idle, retrying or paused.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use ferry_proto::{Decree, DupId, PartitionId};
use serde::Serialize;

use crate::metrics::{labels, Metrics};
use ferry_dup::lag;

/// Identifies one shipped partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub table: String,
    pub dupid: DupId,
    pub partition: PartitionId,
}

/// What a partition task is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting to win the shipping election (another shipper holds it, or etcd is away).
    Campaigning,
    /// Leading; connecting to the receiver.
    Connecting,
    /// Leading; a session is up.
    Shipping,
    /// Leading; the last session failed, waiting before the next.
    Retrying,
    /// Stopped by FAIL_FAST or because the start decree is gone; `last_error` says why.
    Stopped,
    /// The dup is paused; numbers come from the progress in etcd.
    Paused,
    /// Full dup (`DS_APP`): sending the partition's checkpoint.
    Copying,
    /// Full dup (`DS_APP`): the target staged the checkpoint; waiting for the install.
    Staged,
    /// Full dup (`DS_APP`): the target's disk is full; the copy waits and retries.
    TargetDiskFull,
    /// The log was collected past what the dup confirmed: the partition is filled again from a
    /// fresh checkpoint (the copy itself shows as `copying`).
    Rebootstrapping,
}

/// One partition's entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub appid: u32,
    pub remote: String,
    pub remote_table: String,
    pub dup_status: String,
    pub fail_mode: String,
    pub state: State,
    pub confirmed: Decree,
    pub committed: Decree,
    /// When the newest committed record was published (µs), the lag's stand-in.
    pub committed_time_us: u64,
    /// Commit time of the oldest record sent and not confirmed (µs), when known.
    pub oldest_unconfirmed_us: Option<u64>,
    pub fencing_token: Option<u64>,
    pub receiver: Option<String>,
    pub last_error: Option<String>,
    pub retained_bytes: u64,
    /// Full dup: the checkpoint transfer's progress, once one started.
    pub checkpoint: Option<ferry_dup::transfer::TransferProgress>,
    /// A re-bootstrap sent its checkpoint: (generation, decree). Done once confirmed gets there.
    pub rebootstrap: Option<(u32, ferry_proto::Decree)>,
}

/// `GET /replica/duplication` rows.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct View {
    pub appid: u32,
    pub table: String,
    pub dupid: u64,
    pub partition: u32,
    pub remote: String,
    pub remote_table: String,
    /// The dup's status (`DS_LOG`, `DS_PAUSE`).
    pub status: String,
    pub fail_mode: String,
    /// What the shipper is doing for it (`campaigning`, `connecting`, `shipping`, `retrying`,
    /// `stopped`, `paused`).
    pub state: String,
    pub confirmed_decree: u64,
    pub committed_decree: u64,
    pub pending_mutations: u64,
    pub lag_ms: u64,
    pub fencing_token: Option<u64>,
    pub receiver: Option<String>,
    pub last_error: Option<String>,
    pub plog_retained_bytes: u64,
}

/// The shared board.
#[derive(Default)]
pub struct Board {
    entries: Mutex<BTreeMap<Key, Entry>>,
}

impl Entry {
    pub fn new(appid: u32, remote: &str, remote_table: &str, state: State) -> Entry {
        Entry {
            appid,
            remote: remote.into(),
            remote_table: remote_table.into(),
            dup_status: String::new(),
            fail_mode: String::new(),
            state,
            confirmed: Decree::ZERO,
            committed: Decree::ZERO,
            committed_time_us: 0,
            oldest_unconfirmed_us: None,
            fencing_token: None,
            receiver: None,
            last_error: None,
            retained_bytes: 0,
            checkpoint: None,
            rebootstrap: None,
        }
    }

    /// The idle-true lag at `now_us`.
    pub fn lag_ms(&self, now_us: u64) -> u64 {
        lag::lag_ms(
            self.confirmed,
            self.committed,
            self.oldest_unconfirmed_us,
            self.committed_time_us,
            now_us,
        )
    }
}

impl Board {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, Entry>> {
        // Plain data: a panic elsewhere while holding the lock leaves it usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the entry if missing, then applies `f`.
    pub fn update(&self, key: &Key, make: impl FnOnce() -> Entry, f: impl FnOnce(&mut Entry)) {
        let mut m = self.lock();
        f(m.entry(key.clone()).or_insert_with(make));
    }

    /// Applies `f` to an existing entry.
    pub fn with(&self, key: &Key, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.lock().get_mut(key) {
            f(e);
        }
    }

    /// A copy of one entry.
    pub fn get(&self, key: &Key) -> Option<Entry> {
        self.lock().get(key).cloned()
    }

    pub fn remove(&self, key: &Key) {
        self.lock().remove(key);
    }

    pub fn keys(&self) -> Vec<Key> {
        self.lock().keys().cloned().collect()
    }

    /// Rows for `/replica/duplication`, of one table id or all.
    pub fn views(&self, appid: Option<u32>, now_us: u64) -> Vec<View> {
        self.lock()
            .iter()
            .filter(|(_, e)| appid.is_none_or(|a| a == e.appid))
            .map(|(k, e)| View {
                appid: e.appid,
                table: k.table.clone(),
                dupid: k.dupid.0,
                partition: k.partition.0,
                remote: e.remote.clone(),
                remote_table: e.remote_table.clone(),
                status: e.dup_status.clone(),
                fail_mode: e.fail_mode.clone(),
                state: serde_json::to_value(e.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                confirmed_decree: e.confirmed.0,
                committed_decree: e.committed.0,
                pending_mutations: lag::pending(e.confirmed, e.committed),
                lag_ms: e.lag_ms(now_us),
                fencing_token: e.fencing_token,
                receiver: e.receiver.clone(),
                last_error: e.last_error.clone(),
                plog_retained_bytes: e.retained_bytes,
            })
            .collect()
    }

    /// Sets the gauges computed from the board (lag, pending, confirmed, retained) before a
    /// scrape.
    pub fn export(&self, metrics: &Metrics, now_us: u64) {
        for (k, e) in self.lock().iter() {
            let l = labels(&k.table, k.dupid, k.partition);
            metrics.lag.get_or_create(&l).set(gauge(e.lag_ms(now_us)));
            metrics
                .pending
                .get_or_create(&l)
                .set(gauge(lag::pending(e.confirmed, e.committed)));
            metrics
                .confirmed
                .get_or_create(&l)
                .set(gauge(e.confirmed.0));
            metrics
                .retained
                .get_or_create(&l)
                .set(gauge(e.retained_bytes));
        }
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_compute_lag_and_pending_when_read() {
        let b = Board::default();
        let k = Key {
            table: "t".into(),
            dupid: DupId(7),
            partition: PartitionId(2),
        };
        b.update(
            &k,
            || Entry::new(3, "tj", "t", State::Shipping),
            |e| {
                e.confirmed = Decree(10);
                e.committed = Decree(15);
                e.oldest_unconfirmed_us = Some(1_000_000);
                e.committed_time_us = 2_000_000;
            },
        );
        let v = b.views(None, 4_000_000);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pending_mutations, 5);
        assert_eq!(v[0].lag_ms, 3_000);
        assert_eq!(v[0].state, "shipping");
        assert!(b.views(Some(4), 0).is_empty(), "other table id");
        b.with(&k, |e| e.confirmed = Decree(15));
        assert_eq!(b.views(Some(3), 9_000_000)[0].lag_ms, 0, "caught up");

        let m = Metrics::new();
        b.export(&m, 9_000_000);
        let text = m.render();
        assert!(
            text.contains(r#"dup_pending_mutations{table="t",dupid="7",partition="2"} 0"#),
            "{text}"
        );
        assert!(text.contains(r#"dup_confirmed_decree{table="t",dupid="7",partition="2"} 15"#));
        assert!(text.contains(r#"dup_lag_ms{table="t",dupid="7",partition="2"} 0"#));
    }
}
