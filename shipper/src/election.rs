//! Who ships a (dup, partition): an etcd election per pair, under
//! `/ferry/<cluster>/election/dup/<table>/<dupid>/<p>`, with a lease kept alive by this process.
//!
//! The leader key's create revision is the fencing token: it goes into `Hello`, so a receiver
//! refuses a stale shipper, and it fences the progress writes in etcd (they succeed only while
//! the key exists with that revision). When the lease may have expired, [`Leadership::lost`]
//! returns and the caller stops shipping at once.

use std::time::Duration;

use etcd_client::{LeaderKey, ResignOptions};
use ferry_meta::registry::{keep_lease_alive, LeaseEnd};
use ferry_meta::{Fence, MetaError, MetaStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// This process leads one election.
pub struct Leadership {
    leader: LeaderKey,
    lease: i64,
    keeper: JoinHandle<LeaseEnd>,
    keeper_cancel: CancellationToken,
    ended: Option<String>,
}

impl Leadership {
    /// The fencing token: the create revision of the leader key.
    pub fn fencing_token(&self) -> u64 {
        u64::try_from(self.leader.rev()).unwrap_or(0)
    }

    /// The fence for metadata writes made as this leader.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.leader.key().to_vec(),
            revision: self.leader.rev(),
        }
    }

    /// Resolves when the lease is lost (or may be): stop shipping. Cancellation-safe; after it
    /// returned once it returns the same reason at once.
    pub async fn lost(&mut self) -> String {
        if let Some(why) = &self.ended {
            return why.clone();
        }
        let why = match (&mut self.keeper).await {
            Ok(LeaseEnd::Lost(why)) => why,
            Ok(LeaseEnd::Cancelled) => "the lease keeper was stopped".to_string(),
            Err(e) => format!("the lease keeper failed: {e}"),
        };
        self.ended = Some(why.clone());
        why
    }

    /// Gives the election up (deletes the leader key, then revokes the lease). Best effort: if
    /// etcd is unreachable the lease expires by itself within its TTL.
    pub async fn resign(self, meta: &MetaStore) {
        self.keeper_cancel.cancel();
        let mut ec = meta.client().election_client();
        let opts = ResignOptions::new().with_leader(self.leader.clone());
        let _ = tokio::time::timeout(meta.timeout(), ec.resign(Some(opts))).await;
        meta.revoke_lease(self.lease).await;
    }
}

/// Campaigns under `name` with `value` until this process leads (`Ok(Some)`), `cancel` fires
/// (`Ok(None)`), or the lease is lost first (`Err`). While another process leads, this waits.
/// Cancellation-safe: an abandoned campaign's lease is revoked.
pub async fn campaign(
    meta: &MetaStore,
    name: String,
    value: Vec<u8>,
    ttl: Duration,
    cancel: &CancellationToken,
) -> Result<Option<Leadership>, MetaError> {
    let lease = meta.grant_lease(ttl).await?;
    let keeper_cancel = cancel.child_token();
    let mut keeper = {
        let meta = meta.clone();
        let token = keeper_cancel.clone();
        tokio::spawn(async move { keep_lease_alive(&meta, lease, ttl, &token).await })
    };
    let mut ec = meta.client().election_client();
    let result = tokio::select! {
        // Cancellation first: it also stops the keeper, whose end is then no error.
        biased;
        _ = cancel.cancelled() => Ok(None),
        end = &mut keeper => if cancel.is_cancelled() { Ok(None) } else { Err(meta.unavailable(match end {
            Ok(LeaseEnd::Lost(why)) => why,
            _ => "the lease keeper stopped".to_string(),
        })) },
        r = ec.campaign(name, value, lease) => match r {
            Ok(mut resp) => match resp.take_leader() {
                Some(leader) => Ok(Some(leader)),
                None => Err(meta.unavailable("etcd answered the campaign without a leader key")),
            },
            Err(e) => Err(meta.unavailable(e)),
        },
    };
    match result {
        Ok(Some(leader)) => Ok(Some(Leadership {
            leader,
            lease,
            keeper,
            keeper_cancel,
            ended: None,
        })),
        other => {
            keeper_cancel.cancel();
            meta.revoke_lease(lease).await;
            other.map(|_| None)
        }
    }
}

#[cfg(test)]
mod tests {

    use ferry_proto::{DupId, PartitionId};
    use ferry_tests::etcd::Etcd;

    use super::*;

    async fn store(etcd: &Etcd) -> MetaStore {
        MetaStore::connect(&[etcd.endpoint()], "bj", Duration::from_secs(3))
            .await
            .expect("etcd client")
    }

    /// Two shippers campaign for one partition against a real etcd: one leads; the other waits
    /// until the first resigns, then leads with a larger fencing token; a write fenced by the
    /// first leader's token fails after that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_per_partition_and_tokens_grow() {
        let etcd = Etcd::start().expect("start etcd");
        let a = store(&etcd).await;
        let b = store(&etcd).await;
        let name = a.keys().shipper_election("users", DupId(7), PartitionId(3));
        assert_eq!(name, "/ferry/bj/election/dup/users/7/3");
        let cancel = CancellationToken::new();
        let ttl = Duration::from_secs(2);
        let first = campaign(&a, name.clone(), b"a".to_vec(), ttl, &cancel)
            .await
            .expect("campaign")
            .expect("leads");
        let first_token = first.fencing_token();
        assert!(first_token > 0);

        let second = {
            let b = b.clone();
            let name = name.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { campaign(&b, name, b"b".to_vec(), ttl, &cancel).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!second.is_finished(), "b waits while a leads");
        // Leadership survives several lease TTLs while the keeper runs.
        tokio::time::sleep(ttl * 2).await;
        assert!(!second.is_finished(), "a's lease is kept alive");

        let fenced = a.with_fence(first.fence());
        assert!(fenced.fence_holds().await.expect("read fence"));
        first.resign(&a).await;
        let second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("b leads soon after a resigned")
            .expect("join")
            .expect("campaign")
            .expect("leads");
        assert!(
            second.fencing_token() > first_token,
            "the new leader's token is larger"
        );
        assert!(
            !fenced.fence_holds().await.expect("read fence"),
            "the old leader's fence no longer holds"
        );
        second.resign(&b).await;
    }

    /// A leader whose etcd goes away learns within about a lease TTL that it must stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn losing_etcd_ends_the_leadership_within_the_ttl() {
        let mut etcd = Etcd::start().expect("start etcd");
        let a = store(&etcd).await;
        let name = a.keys().shipper_election("t", DupId(1), PartitionId(0));
        let cancel = CancellationToken::new();
        let ttl = Duration::from_secs(2);
        let mut l = campaign(&a, name, b"a".to_vec(), ttl, &cancel)
            .await
            .expect("campaign")
            .expect("leads");
        etcd.stop();
        // Bounded wait for the observable loss (the keeper notices within about a TTL).
        let why = tokio::time::timeout(Duration::from_secs(10), l.lost())
            .await
            .expect("the loss is noticed");
        assert!(!why.is_empty());
        assert_eq!(l.lost().await, why, "asking again answers at once");
    }

    /// A cancelled campaign returns `None` and leaves no candidate key behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_campaign_leaves_nothing() {
        let etcd = Etcd::start().expect("start etcd");
        let a = store(&etcd).await;
        let name = a.keys().shipper_election("t", DupId(1), PartitionId(0));
        let cancel = CancellationToken::new();
        let holder = campaign(
            &a,
            name.clone(),
            b"a".to_vec(),
            Duration::from_secs(5),
            &cancel,
        )
        .await
        .expect("campaign")
        .expect("leads");
        let waiter_cancel = CancellationToken::new();
        let waiter = {
            let a = a.clone();
            let name = name.clone();
            let c = waiter_cancel.clone();
            tokio::spawn(async move {
                campaign(&a, name, b"b".to_vec(), Duration::from_secs(5), &c).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        waiter_cancel.cancel();
        let r = waiter.await.expect("join").expect("no error");
        assert!(r.is_none());
        let keys = etcd.get_prefix(&format!("{name}/")).expect("etcdctl");
        assert_eq!(keys.len(), 1, "only the leader's key is left: {keys:?}");
        holder.resign(&a).await;
        assert!(etcd
            .get_prefix(&format!("{name}/"))
            .expect("etcdctl")
            .is_empty());
    }
}
