//! One remote cluster as the local cluster's cache holds it (`meshd/cache/<cluster>/...`,
//! written by the cluster's mirror, `clustermesh-apiserver --kvstoremesh`), seen under the keys
//! the remote cluster itself uses.
//!
//! [`CachedCluster`] is a [`Backend`] over the local etcd that moves every key it is asked for
//! into the cluster's cache prefix and every key it answers with back out of it. Everything
//! above the trait (list-then-watch, sync canaries, decoding and validation of hostile values,
//! mark-and-sweep) therefore runs unchanged in cache mode: an agent reads a cached cluster with
//! exactly the code that reads it directly, so the two modes cannot drift apart in what they
//! accept. Keys outside `meshd/` have no place in the cache and are refused.

use std::time::Duration;

use futures::StreamExt;
use meshd_state::ClusterName;

use crate::backend::{
    Backend, Compare, Header, LeaseId, RangePage, Txn, TxnOp, TxnResponse, WatchMessage,
    WatchStream,
};
use crate::error::KvError;

/// A remote cluster's cache inside the local store `B`.
#[derive(Clone)]
pub struct CachedCluster<B> {
    local: B,
    cluster: ClusterName,
    /// `meshd/cache/<cluster>/`
    prefix: String,
}

impl<B: Backend> CachedCluster<B> {
    pub fn new(local: B, cluster: ClusterName) -> Self {
        let prefix = meshd_state::keys::cache_prefix(cluster.as_str());
        Self {
            local,
            cluster,
            prefix,
        }
    }

    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// The local store underneath (for reads outside the cluster's cache, e.g. its status).
    pub fn local(&self) -> &B {
        &self.local
    }

    /// The cache key of a key of the remote cluster.
    fn inward(&self, key: &str) -> Result<String, KvError> {
        match key.strip_prefix(meshd_state::keys::ROOT) {
            Some(rest) => Ok(format!("{}{rest}", self.prefix)),
            None => Err(KvError::Config {
                endpoints: self.describe(),
                reason: format!(
                    "key {key:?}: the cache holds only keys under {}",
                    meshd_state::keys::ROOT
                ),
            }),
        }
    }

    /// The remote cluster's key of a cache key. Every key a range or watch of `inward(p)`
    /// returns starts with the cluster's prefix, so this cannot fail for them.
    fn outward(prefix: &str, key: String) -> String {
        match key.strip_prefix(prefix) {
            Some(rest) => format!("{}{rest}", meshd_state::keys::ROOT),
            None => key,
        }
    }
}

impl<B: Backend> Backend for CachedCluster<B> {
    fn describe(&self) -> String {
        format!("cache of {} in {}", self.cluster, self.local.describe())
    }

    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: i64,
        limit: usize,
    ) -> Result<RangePage, KvError> {
        let inner = self.inward(prefix)?;
        let after = after.map(|a| self.inward(a)).transpose()?;
        let mut page = self
            .local
            .range(&inner, after.as_deref(), revision, limit)
            .await?;
        for kv in &mut page.kvs {
            kv.key = Self::outward(&self.prefix, std::mem::take(&mut kv.key));
        }
        Ok(page)
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        let inner = self.inward(prefix)?;
        let stream = self.local.watch(&inner, start_revision).await?;
        let cache = self.prefix.clone();
        Ok(Box::pin(stream.map(move |msg| {
            msg.map(|m| match m {
                WatchMessage::Events { header, mut events } => {
                    for ev in &mut events {
                        ev.kv.key = Self::outward(&cache, std::mem::take(&mut ev.kv.key));
                    }
                    WatchMessage::Events { header, events }
                }
                other => other,
            })
        })))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Header, KvError> {
        self.local.put(&self.inward(key)?, value, lease).await
    }

    async fn delete(&self, key: &str) -> Result<Header, KvError> {
        self.local.delete(&self.inward(key)?).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, KvError> {
        let compare = |c: Compare| -> Result<Compare, KvError> {
            Ok(match c {
                Compare::Absent { key } => Compare::Absent {
                    key: self.inward(&key)?,
                },
                Compare::ModRevision { key, revision } => Compare::ModRevision {
                    key: self.inward(&key)?,
                    revision,
                },
            })
        };
        let op = |o: TxnOp| -> Result<TxnOp, KvError> {
            Ok(match o {
                TxnOp::Put { key, value, lease } => TxnOp::Put {
                    key: self.inward(&key)?,
                    value,
                    lease,
                },
                TxnOp::Delete { key } => TxnOp::Delete {
                    key: self.inward(&key)?,
                },
            })
        };
        let txn = Txn {
            when: txn
                .when
                .into_iter()
                .map(compare)
                .collect::<Result<_, _>>()?,
            then: txn.then.into_iter().map(op).collect::<Result<_, _>>()?,
            otherwise: txn
                .otherwise
                .into_iter()
                .map(op)
                .collect::<Result<_, _>>()?,
        };
        self.local.txn(txn).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        self.local.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), KvError> {
        self.local.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError> {
        self.local.revoke_lease(lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::EventKind;
    use crate::MemoryStore;

    fn c2() -> ClusterName {
        ClusterName::new("c2").unwrap()
    }

    #[tokio::test]
    async fn reads_see_the_cache_under_the_remote_keys_and_nothing_else() {
        let local = MemoryStore::new();
        let cache = CachedCluster::new(local.clone(), c2());
        local
            .put("meshd/cache/c2/state/nodes/v1/c2/n1", b"a".to_vec(), None)
            .await
            .unwrap();
        local
            .put("meshd/cache/c3/state/nodes/v1/c3/n1", b"b".to_vec(), None)
            .await
            .unwrap();
        // The local cluster's own records are not the remote's.
        local
            .put("meshd/state/nodes/v1/c2/n9", b"c".to_vec(), None)
            .await
            .unwrap();
        let page = cache
            .range("meshd/state/nodes/v1/", None, 0, 100)
            .await
            .unwrap();
        let keys: Vec<_> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["meshd/state/nodes/v1/c2/n1"]);
        assert_eq!(page.kvs[0].value, b"a");

        // Paging continues after a remote key.
        local
            .put("meshd/cache/c2/state/nodes/v1/c2/n2", b"d".to_vec(), None)
            .await
            .unwrap();
        let next = cache
            .range(
                "meshd/state/nodes/v1/",
                Some("meshd/state/nodes/v1/c2/n1"),
                0,
                100,
            )
            .await
            .unwrap();
        let keys: Vec<_> = next.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["meshd/state/nodes/v1/c2/n2"]);

        let err = cache.range("other/", None, 0, 1).await.unwrap_err();
        assert!(err.to_string().contains("other/"), "{err}");
    }

    #[tokio::test]
    async fn watches_report_cache_changes_under_the_remote_keys() {
        let local = MemoryStore::new();
        let cache = CachedCluster::new(local.clone(), c2());
        let from = local.revision() + 1;
        let mut w = cache.watch("meshd/synced/", from).await.unwrap();
        local
            .put("meshd/synced/c2/nodes", b"x".to_vec(), None)
            .await
            .unwrap();
        local
            .put("meshd/cache/c2/synced/c2/nodes", b"1".to_vec(), None)
            .await
            .unwrap();
        local
            .delete("meshd/cache/c2/synced/c2/nodes")
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match w.next().await {
                Some(Ok(WatchMessage::Events { events, .. })) => {
                    seen.extend(events.into_iter().map(|e| (e.kind, e.kv.key)))
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("watch ended"),
            }
        }
        assert_eq!(
            seen,
            [
                (EventKind::Put, "meshd/synced/c2/nodes".to_owned()),
                (EventKind::Delete, "meshd/synced/c2/nodes".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn writes_land_in_the_cache() {
        let local = MemoryStore::new();
        let cache = CachedCluster::new(local.clone(), c2());
        cache
            .txn(Txn {
                when: vec![Compare::absent("meshd/state/ip/v1/c2/10.2.0.5")],
                then: vec![TxnOp::put("meshd/state/ip/v1/c2/10.2.0.5", "v")],
                otherwise: vec![],
            })
            .await
            .unwrap();
        let page = local.range("meshd/cache/c2/", None, 0, 10).await.unwrap();
        assert_eq!(page.kvs.len(), 1);
        assert_eq!(page.kvs[0].key, "meshd/cache/c2/state/ip/v1/c2/10.2.0.5");
    }
}
