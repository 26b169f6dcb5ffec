//! The narrow interface the kvstore needs from etcd, implemented by the real client
//! ([`crate::EtcdStore`]) and by an in-memory store ([`crate::MemoryStore`]) so that everything
//! above it (list-then-watch, mark-and-sweep, publishing) runs the same tests against both.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

use crate::error::KvError;

/// An etcd lease id.
pub type LeaseId = i64;

/// What every response carries: the store's revision and the id of the etcd cluster that
/// answered. A different cluster id means a different etcd (restored, replaced), whose
/// revisions are unrelated to the ones we saw: readers must list again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub revision: i64,
    pub cluster_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: LeaseId,
}

/// One page of a range read.
#[derive(Debug, Clone)]
pub struct RangePage {
    pub header: Header,
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one of this page.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key. For deletes `value` is empty and `mod_revision` is the revision of the
/// delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A message on a watch stream.
#[derive(Debug, Clone)]
pub enum WatchMessage {
    /// Events (possibly none: creation and progress notifications) at `header.revision`.
    Events {
        header: Header,
        events: Vec<RawEvent>,
    },
    /// The start revision was compacted; the watch is over and the reader must list again.
    Compacted { compact_revision: i64 },
}

/// A condition of a [`Txn`], checked against the store's state when the transaction runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (etcd: its create revision is 0).
    Absent { key: String },
    /// The key exists and was last written at `revision`: nobody changed it since it was read.
    ModRevision { key: String, revision: i64 },
}

impl Compare {
    pub fn absent(key: impl Into<String>) -> Self {
        Self::Absent { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Self::Absent { key } | Self::ModRevision { key, .. } => key,
        }
    }
}

/// A write inside a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }
}

/// etcd's compare-and-swap: if every condition of `when` holds, the writes of `then` are
/// applied, else those of `otherwise`, atomically and at one revision. A key may be written
/// once per branch (etcd refuses duplicates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<TxnOp>,
    pub otherwise: Vec<TxnOp>,
}

impl Txn {
    /// The key named in errors: the first one the transaction looks at.
    pub fn first_key(&self) -> &str {
        self.when
            .first()
            .map(Compare::key)
            .or_else(|| self.then.first().map(TxnOp::key))
            .or_else(|| self.otherwise.first().map(TxnOp::key))
            .unwrap_or("")
    }
}

/// What a [`Txn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResponse {
    pub header: Header,
    /// Every condition held (`then` was applied).
    pub succeeded: bool,
}

/// A watch; it ends (`None` or an error) when the connection is lost.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, KvError>> + Send>>;

/// The operations of etcd meshd uses.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Names the store (its endpoints) in logs and errors.
    fn describe(&self) -> String;

    /// Up to `limit` keys under `prefix`, in key order, strictly after `after` if given, as of
    /// `revision` (0: the latest).
    fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: i64,
        limit: usize,
    ) -> impl Future<Output = Result<RangePage, KvError>> + Send;

    /// Watches `prefix` from `start_revision` on (inclusive).
    fn watch(
        &self,
        prefix: &str,
        start_revision: i64,
    ) -> impl Future<Output = Result<WatchStream, KvError>> + Send;

    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Header, KvError>> + Send;

    fn delete(&self, key: &str) -> impl Future<Output = Result<Header, KvError>> + Send;

    /// Runs a compare-and-swap transaction. Transient failures are retried for a while; a
    /// guarded transaction whose earlier attempt was applied but unanswered then reports its
    /// conditions as failed, so callers read `succeeded == false` as "look again", never as
    /// "not written".
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnResponse, KvError>> + Send;

    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, KvError>> + Send;

    /// Refreshes a lease once; `Err(LeaseNotFound)` when it is gone.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), KvError>> + Send;

    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<(), KvError>> + Send;
}

/// Every key-value under `prefix` now, read in pages of 1,000 (for small prefixes read once,
/// such as status keys; what must stay current is watched instead).
pub async fn list_prefix<B: Backend>(backend: &B, prefix: &str) -> Result<Vec<KeyValue>, KvError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = backend.range(prefix, after.as_deref(), 0, 1000).await?;
        let last = page.kvs.last().map(|kv| kv.key.clone());
        out.extend(page.kvs);
        match (page.more, last) {
            (true, Some(last)) => after = Some(last),
            _ => return Ok(out),
        }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix is empty): to the end of the key space.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("meshd/"), b"meshd0");
        assert_eq!(prefix_end("a"), b"b");
        assert_eq!(prefix_end(""), vec![0]);
    }
}
