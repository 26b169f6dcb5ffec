//! Leader election among the replicas of one cluster's apiserver, so that exactly one publishes
//! service records and collects identities at a time.
//!
//! The leader holds `meshd/leader/clustermesh-apiserver/<cluster>` (value: its replica id)
//! under an etcd lease it keeps alive. Every write the leader makes is a transaction guarded by
//! "the leader key holds my id" (`Leader::guard`), so a replica that lost the lease without
//! noticing yet (paused, partitioned) cannot overwrite the new leader's work: leadership is
//! enforced by etcd, not by timing.

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use meshd_kvstore::{Backend, EtcdStore, KvError, LeaseId};

use crate::store::txn_call;

#[derive(Clone)]
pub struct Leader {
    store: EtcdStore,
    key: String,
    id: String,
    ttl: Duration,
}

impl Leader {
    pub fn new(store: EtcdStore, key: String, id: String, ttl: Duration) -> Self {
        Self {
            store,
            key,
            id,
            ttl,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Holds for a transaction exactly while this replica is the leader.
    pub fn guard(&self) -> Compare {
        Compare::value(self.key.as_str(), CompareOp::Equal, self.id.as_bytes())
    }

    fn tick(&self) -> Duration {
        self.ttl / 3
    }

    /// Waits until this replica holds the leader key; returns the lease it is held under.
    /// Errors (etcd unreachable) are retried: a replica that cannot reach etcd simply waits.
    pub async fn acquire(&self) -> LeaseId {
        loop {
            match self.try_acquire().await {
                Ok(lease) => return lease,
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "leader election failed; retrying");
                    tokio::time::sleep(self.tick()).await;
                }
            }
        }
    }

    async fn try_acquire(&self) -> Result<LeaseId, KvError> {
        let lease = self.store.grant_lease(self.ttl).await?;
        loop {
            let txn = Txn::new()
                .when(vec![Compare::create_revision(
                    self.key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    self.key.as_str(),
                    self.id.as_bytes(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let won = txn_call(&self.store, txn, "leader election")
                .await
                .map_err(|e| KvError::Unavailable {
                    endpoints: self.store.describe(),
                    op: "txn",
                    key: self.key.clone(),
                    reason: e.to_string(),
                })?
                .succeeded();
            if won {
                tracing::info!(key = %self.key, id = %self.id, "became leader");
                return Ok(lease);
            }
            // Someone else leads; keep our lease alive meanwhile so taking over is one txn.
            tokio::time::sleep(self.tick()).await;
            self.store.keep_alive(lease).await?;
        }
    }

    /// Keeps the lease alive; returns once leadership is lost: the lease expired or was
    /// revoked, the key no longer holds our id, or etcd could not be reached for a whole TTL
    /// (after which the lease must be assumed gone).
    pub async fn hold(&self, lease: LeaseId) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.tick()).await;
            let alive = async {
                self.store.keep_alive(lease).await?;
                let page = self.store.range(&self.key, None, 0, 1).await?;
                Ok::<bool, KvError>(
                    page.kvs
                        .first()
                        .is_some_and(|kv| kv.key == self.key && kv.value == self.id.as_bytes()),
                )
            }
            .await;
            match alive {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) | Err(KvError::LeaseNotFound { .. }) => {
                    tracing::warn!(key = %self.key, "lost leadership");
                    return;
                }
                Err(e) if last_ok.elapsed() >= self.ttl => {
                    tracing::warn!(key = %self.key, error = %e, "lost leadership: etcd unreachable for a whole lease TTL");
                    return;
                }
                Err(e) => {
                    tracing::debug!(key = %self.key, error = %e, "lease keep-alive failed; retrying")
                }
            }
        }
    }

    /// Gives leadership up at once (on shutdown), so another replica takes over without
    /// waiting for the lease to expire.
    pub async fn release(&self, lease: LeaseId) {
        if let Err(e) = self.store.revoke_lease(lease).await {
            tracing::debug!(key = %self.key, error = %e, "revoking the leader lease");
        }
    }
}
