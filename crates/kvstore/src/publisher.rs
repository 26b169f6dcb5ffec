//! Lease-backed publishing of a node's records.
//!
//! Everything a publisher writes is attached to its lease, so when the agent dies its records
//! expire by themselves. The publisher remembers what it holds: if the lease is lost (etcd
//! restarted and the TTL ran out, a partition longer than the TTL, a revoke), it takes a new
//! lease and writes everything again. Writes that fail while etcd is unreachable are redone in
//! the background once it answers again, so the caller's view and etcd converge.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use meshd_state::{
    encode, ClusterName, FieldError, Resource, ResourceKey, StateError, SyncCanary, SyncCanaryKey,
};
use tracing::Instrument;

use crate::backend::{Backend, LeaseId};
use crate::backoff::{Backoff, BackoffConfig};
use crate::error::KvError;

#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Lease TTL: how long records outlive a dead agent. Refreshed every third of it.
    pub ttl: Duration,
    pub backoff: BackoffConfig,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(15),
            backoff: BackoffConfig::default(),
        }
    }
}

#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Leases granted (the first one included): more than one means a lease was lost.
    pub leases: AtomicU64,
    /// Full re-writes of everything held.
    pub republishes: AtomicU64,
}

struct State {
    lease: LeaseId,
    /// Rendered key -> encoded value of everything published and not deleted.
    held: BTreeMap<String, Vec<u8>>,
    /// Deletes that did not reach etcd yet.
    pending_deletes: BTreeSet<String>,
    /// Some write failed: etcd may lag behind `held`.
    dirty: bool,
}

struct Shared<B: Backend> {
    backend: B,
    cluster: ClusterName,
    config: PublisherConfig,
    state: tokio::sync::Mutex<State>,
    stats: PublisherStats,
}

/// Publishes records of one cluster under one lease. Dropping it stops the keep-alive without
/// revoking (as a crash would: records expire after the TTL); [`Publisher::close`] removes them
/// at once.
pub struct Publisher<B: Backend> {
    shared: Arc<Shared<B>>,
    task: tokio::task::JoinHandle<()>,
}

/// Concurrent writes while re-publishing everything.
const REPUBLISH_CONCURRENCY: usize = 32;

impl<B: Backend> Publisher<B> {
    /// Takes a lease and starts keeping it alive.
    pub async fn start(
        backend: B,
        cluster: ClusterName,
        config: PublisherConfig,
    ) -> Result<Self, KvError> {
        let lease = backend.grant_lease(config.ttl).await?;
        let shared = Arc::new(Shared {
            backend,
            cluster,
            config,
            state: tokio::sync::Mutex::new(State {
                lease,
                held: BTreeMap::new(),
                pending_deletes: BTreeSet::new(),
                dirty: false,
            }),
            stats: PublisherStats::default(),
        });
        shared.stats.leases.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("publisher", cluster = %shared.cluster, etcd = %shared.backend.describe());
        let task = tokio::spawn(keep_alive(shared.clone()).instrument(span));
        Ok(Self { shared, task })
    }

    pub fn cluster(&self) -> &ClusterName {
        &self.shared.cluster
    }

    pub fn stats(&self) -> &PublisherStats {
        &self.shared.stats
    }

    /// The current lease.
    pub async fn lease(&self) -> LeaseId {
        self.shared.state.lock().await.lease
    }

    /// Number of records held (published and not deleted).
    pub async fn len(&self) -> usize {
        self.shared.state.lock().await.held.len()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Writes a record under the lease. Invalid records are refused. On a transient error the
    /// record is still held and written again in the background; the error is returned so the
    /// caller can log it.
    pub async fn publish<R: Resource>(&self, key: &R::Key, value: &R) -> Result<(), KvError> {
        self.check_cluster::<R>(key)?;
        let bytes = encode(key, value)?;
        let raw = key.to_string();
        let mut st = self.shared.state.lock().await;
        st.pending_deletes.remove(&raw);
        st.held.insert(raw.clone(), bytes.clone());
        let lease = st.lease;
        match self.shared.backend.put(&raw, bytes, Some(lease)).await {
            Ok(_) => Ok(()),
            Err(KvError::LeaseNotFound { .. }) => self.shared.renew(&mut st).await,
            Err(e) => {
                st.dirty = true;
                Err(e)
            }
        }
    }

    /// A publisher writes only its own cluster's state: a key of another cluster is a bug.
    fn check_cluster<R: Resource>(&self, key: &R::Key) -> Result<(), KvError> {
        if key.cluster() == &self.shared.cluster {
            return Ok(());
        }
        Err(StateError::field(
            key.to_string(),
            FieldError::new(
                "cluster",
                format!(
                    "the publisher of cluster {} does not write records of cluster {}",
                    self.shared.cluster,
                    key.cluster()
                ),
            ),
        )
        .into())
    }

    /// Removes a record. Like [`Self::publish`], a failed delete is retried in the background.
    pub async fn delete<R: Resource>(&self, key: &R::Key) -> Result<(), KvError> {
        self.check_cluster::<R>(key)?;
        let raw = key.to_string();
        let mut st = self.shared.state.lock().await;
        st.held.remove(&raw);
        match self.shared.backend.delete(&raw).await {
            Ok(_) => {
                st.pending_deletes.remove(&raw);
                Ok(())
            }
            Err(e) => {
                st.pending_deletes.insert(raw);
                st.dirty = true;
                Err(e)
            }
        }
    }

    /// Declares the initial state of `R` complete: once everything held is in etcd, writes
    /// `meshd/synced/<cluster>/<R::KIND>` (without lease: the canary says a sync happened, and
    /// stays meaningful while a restarted agent re-publishes).
    pub async fn mark_synced<R: Resource>(&self) -> Result<(), KvError> {
        let mut st = self.shared.state.lock().await;
        if st.dirty {
            self.shared.republish(&mut st).await?;
        }
        let key = SyncCanaryKey {
            cluster: self.shared.cluster.clone(),
            resource: R::KIND.to_owned(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let value = encode(&key, &SyncCanary { synced_at_ms: now })?;
        self.shared
            .backend
            .put(&key.to_string(), value, None)
            .await?;
        Ok(())
    }

    /// Revokes the lease (etcd deletes every record at once) and stops.
    pub async fn close(self) -> Result<(), KvError> {
        self.task.abort();
        let lease = self.shared.state.lock().await.lease;
        match self.shared.backend.revoke_lease(lease).await {
            Ok(()) | Err(KvError::LeaseNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl<B: Backend> Drop for Publisher<B> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<B: Backend> Shared<B> {
    /// Takes a new lease and writes everything again under it.
    async fn renew(&self, st: &mut State) -> Result<(), KvError> {
        let old = st.lease;
        st.dirty = true;
        st.lease = self.backend.grant_lease(self.config.ttl).await?;
        self.stats.leases.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            old = format_args!("{old:x}"),
            new = format_args!("{:x}", st.lease),
            records = st.held.len(),
            "lease lost; re-publishing under a new lease"
        );
        self.republish(st).await
    }

    /// Writes everything held and every pending delete; clears `dirty` only if all succeeded.
    async fn republish(&self, st: &mut State) -> Result<(), KvError> {
        let lease = st.lease;
        // Owned copies: the futures must not borrow `st` (and spawned tasks need 'static).
        let items: Vec<(String, Vec<u8>)> = st
            .held
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let backend = self.backend.clone();
        let mut puts = futures::stream::iter(items)
            .map(move |(k, v)| {
                let backend = backend.clone();
                async move { backend.put(&k, v, Some(lease)).await }
            })
            .buffer_unordered(REPUBLISH_CONCURRENCY);
        let mut first_err = None;
        while let Some(r) = puts.next().await {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        drop(puts);
        let deletes: Vec<String> = st.pending_deletes.iter().cloned().collect();
        for k in deletes {
            match self.backend.delete(&k).await {
                Ok(_) => {
                    st.pending_deletes.remove(&k);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.stats.republishes.fetch_add(1, Ordering::Relaxed);
        match first_err {
            None => {
                st.dirty = false;
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

async fn keep_alive<B: Backend>(shared: Arc<Shared<B>>) {
    let interval = (shared.config.ttl / 3).max(Duration::from_millis(100));
    let mut backoff = Backoff::new(shared.config.backoff);
    let mut delay = interval;
    loop {
        tokio::time::sleep(delay).await;
        let lease = shared.state.lock().await.lease;
        let result = match shared.backend.keep_alive(lease).await {
            Ok(()) => {
                let mut st = shared.state.lock().await;
                if st.dirty && st.lease == lease {
                    shared.republish(&mut st).await
                } else {
                    Ok(())
                }
            }
            Err(KvError::LeaseNotFound { .. }) => {
                let mut st = shared.state.lock().await;
                if st.lease == lease {
                    shared.renew(&mut st).await
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        delay = match result {
            Ok(()) => {
                backoff.reset();
                interval
            }
            Err(e) => {
                let d = backoff.next_delay().min(interval);
                tracing::warn!(error = %e, retry_in = ?d, "lease keep-alive or re-publish failed");
                d
            }
        };
    }
}
