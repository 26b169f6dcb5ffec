//! A store whose writes take effect only while a condition holds: a leader's writes fenced by
//! its leader key, so that a replica that lost leadership (and does not know it yet) cannot
//! overwrite what its successor wrote.
//!
//! Every put, delete and transaction becomes one transaction whose only condition is the
//! fence; reads, watches and leases pass through. A write refused by the fence is an error
//! ([`KvError::Unavailable`] naming the fence), never a silent no-op.

use std::time::Duration;

use crate::backend::{
    Backend, Compare, Header, LeaseId, RangePage, Txn, TxnOp, TxnResponse, WatchStream,
};
use crate::error::KvError;

#[derive(Clone)]
pub struct Fenced<B> {
    inner: B,
    fence: Compare,
}

impl<B: Backend> Fenced<B> {
    /// Writes through `inner` only while `fence` holds (typically: the leader key is still at
    /// the revision this replica wrote it at).
    pub fn new(inner: B, fence: Compare) -> Self {
        Self { inner, fence }
    }

    fn refused(&self, op: &'static str, key: &str) -> KvError {
        KvError::Unavailable {
            endpoints: self.inner.describe(),
            op,
            key: key.to_owned(),
            reason: format!(
                "the fence on {:?} no longer holds (leadership lost?)",
                self.fence.key()
            ),
        }
    }

    async fn fenced(&self, op: &'static str, then: Vec<TxnOp>) -> Result<TxnResponse, KvError> {
        let key = then.first().map(|o| o.key().to_owned()).unwrap_or_default();
        let r = self
            .inner
            .txn(Txn {
                when: vec![self.fence.clone()],
                then,
                otherwise: vec![],
            })
            .await?;
        if r.succeeded {
            Ok(r)
        } else {
            Err(self.refused(op, &key))
        }
    }
}

impl<B: Backend> Backend for Fenced<B> {
    fn describe(&self) -> String {
        format!("{} (fenced by {})", self.inner.describe(), self.fence.key())
    }

    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: i64,
        limit: usize,
    ) -> Result<RangePage, KvError> {
        self.inner.range(prefix, after, revision, limit).await
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        self.inner.watch(prefix, start_revision).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Header, KvError> {
        let op = TxnOp::Put {
            key: key.to_owned(),
            value,
            lease,
        };
        Ok(self.fenced("put", vec![op]).await?.header)
    }

    async fn delete(&self, key: &str) -> Result<Header, KvError> {
        Ok(self
            .fenced("delete", vec![TxnOp::delete(key)])
            .await?
            .header)
    }

    /// Only unconditional transactions: the fence is their one condition, so that a refusal
    /// can only mean the fence (a caller's own conditions would make `succeeded == false`
    /// ambiguous).
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, KvError> {
        if !txn.when.is_empty() || !txn.otherwise.is_empty() {
            return Err(KvError::Config {
                endpoints: self.describe(),
                reason: format!(
                    "transaction on {:?}: a fenced store runs only unconditional transactions",
                    txn.first_key()
                ),
            });
        }
        self.fenced("txn", txn.then).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), KvError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError> {
        self.inner.revoke_lease(lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn writes_hold_only_while_the_fence_does() {
        let store = MemoryStore::new();
        let h = store.put("leader", b"me".to_vec(), None).await.unwrap();
        let fenced = Fenced::new(
            store.clone(),
            Compare::ModRevision {
                key: "leader".into(),
                revision: h.revision,
            },
        );
        fenced.put("a", b"1".to_vec(), None).await.unwrap();
        fenced
            .txn(Txn {
                when: vec![],
                then: vec![TxnOp::put("b", b"2".to_vec())],
                otherwise: vec![],
            })
            .await
            .unwrap();
        fenced.delete("a").await.unwrap();
        // Another replica takes the key over: every later write is refused, and says why.
        store.put("leader", b"other".to_vec(), None).await.unwrap();
        let e = fenced.put("c", b"3".to_vec(), None).await.unwrap_err();
        assert!(e.to_string().contains("fence on \"leader\""), "{e}");
        assert!(fenced.delete("b").await.is_err());
        let page = store.range("", None, 0, 10).await.unwrap();
        let keys: Vec<_> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["b", "leader"]);
        // A conditional transaction is refused outright rather than made ambiguous.
        let e = fenced
            .txn(Txn {
                when: vec![Compare::absent("x")],
                then: vec![],
                otherwise: vec![],
            })
            .await
            .unwrap_err();
        assert!(matches!(e, KvError::Config { .. }), "{e}");
    }
}
