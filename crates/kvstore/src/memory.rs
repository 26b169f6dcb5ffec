//! An in-memory [`Backend`] with etcd's semantics where the kvstore depends on them: one global
//! revision, range reads at a past revision, watches from a revision, compaction, leases that
//! expire, and a cluster id. It also simulates failures for tests: a partition of one client
//! handle ([`MemoryStore::cut`]), a server restart ([`MemoryStore::restart`]) and a replaced
//! cluster ([`MemoryStore::replace_cluster`]). Meant for tests and pure-logic checks: history
//! grows until [`MemoryStore::compact`] is called.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::{
    Backend, Compare, EventKind, Header, KeyValue, LeaseId, RangePage, RawEvent, Txn, TxnOp,
    TxnResponse, WatchMessage, WatchStream,
};
use crate::error::KvError;

#[derive(Debug, Clone)]
struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
    lease: LeaseId,
}

/// One change, with what it replaced, so reads at a past revision can undo it.
#[derive(Debug, Clone)]
struct Change {
    revision: i64,
    key: String,
    new: Option<Stored>,
    prev: Option<Stored>,
}

impl Change {
    fn event(&self) -> RawEvent {
        RawEvent {
            kind: if self.new.is_some() {
                EventKind::Put
            } else {
                EventKind::Delete
            },
            kv: KeyValue {
                key: self.key.clone(),
                value: self
                    .new
                    .as_ref()
                    .map(|s| s.value.clone())
                    .unwrap_or_default(),
                mod_revision: self.revision,
                lease: self.new.as_ref().map(|s| s.lease).unwrap_or(0),
            },
        }
    }
}

struct Watcher {
    handle: u64,
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchMessage, KvError>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

struct Mem {
    cluster_id: u64,
    revision: i64,
    compact_revision: i64,
    kvs: BTreeMap<String, Stored>,
    history: Vec<Change>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
    next_handle: u64,
}

impl Mem {
    fn header(&self) -> Header {
        Header {
            revision: self.revision,
            cluster_id: self.cluster_id,
        }
    }

    /// Sends the changes of one revision to every watcher of their keys, in one message.
    fn notify(&mut self, changes: &[Change]) {
        let header = self.header();
        self.watchers.retain(|w| {
            let events: Vec<RawEvent> = changes
                .iter()
                .filter(|c| c.key.starts_with(&w.prefix))
                .map(Change::event)
                .collect();
            events.is_empty()
                || w.tx
                    .send(Ok(WatchMessage::Events { header, events }))
                    .is_ok()
        });
    }

    fn write(&mut self, key: &str, new: Option<Stored>) {
        self.commit(vec![(key.to_owned(), new)]);
    }

    /// Applies writes at one new revision, like an etcd transaction.
    fn commit(&mut self, writes: Vec<(String, Option<Stored>)>) {
        if writes.is_empty() {
            return;
        }
        self.revision += 1;
        let mut changes = Vec::with_capacity(writes.len());
        for (key, new) in writes {
            let new = new.map(|mut s| {
                s.mod_revision = self.revision;
                s
            });
            let prev = match &new {
                Some(s) => self.kvs.insert(key.clone(), s.clone()),
                None => self.kvs.remove(&key),
            };
            changes.push(Change {
                revision: self.revision,
                key,
                new,
                prev,
            });
        }
        self.notify(&changes);
        self.history.extend(changes);
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::Absent { key } => !self.kvs.contains_key(key),
            Compare::ModRevision { key, revision } => {
                self.kvs.get(key).map(|s| s.mod_revision) == Some(*revision)
            }
        }
    }

    fn expire_leases(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: LeaseId) -> bool {
        if self.leases.remove(&id).is_none() {
            return false;
        }
        let keys: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, s)| s.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.write(&k, None);
        }
        true
    }
}

/// A handle on an in-memory etcd. Clones share the data and the partition state of the handle
/// they came from; [`MemoryStore::new_handle`] makes an independent client of the same data.
#[derive(Clone)]
pub struct MemoryStore {
    mem: Arc<Mutex<Mem>>,
    handle: u64,
    cut: Arc<AtomicBool>,
}

static CLUSTER_IDS: AtomicU64 = AtomicU64::new(0x5eed_0000_0000_0001);

impl MemoryStore {
    /// A new, empty store. Needs a Tokio runtime: a background task expires leases.
    pub fn new() -> Self {
        let mem = Arc::new(Mutex::new(Mem {
            cluster_id: CLUSTER_IDS.fetch_add(1, Ordering::Relaxed),
            revision: 1,
            compact_revision: 0,
            kvs: BTreeMap::new(),
            history: Vec::new(),
            leases: HashMap::new(),
            next_lease: 0x1000,
            watchers: Vec::new(),
            next_handle: 1,
        }));
        let weak: Weak<Mutex<Mem>> = Arc::downgrade(&mem);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let Some(mem) = weak.upgrade() else { return };
                mem.lock()
                    .expect("memory store lock")
                    .expire_leases(Instant::now());
            }
        });
        Self {
            mem,
            handle: 0,
            cut: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Another client of the same data, with its own connection state (so it can be cut
    /// while the others keep working).
    pub fn new_handle(&self) -> Self {
        let mut mem = self.lock();
        let handle = mem.next_handle;
        mem.next_handle += 1;
        Self {
            mem: self.mem.clone(),
            handle,
            cut: Arc::new(AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().expect("memory store lock")
    }

    /// Partitions this handle: its requests fail and its watches end until [`Self::heal`].
    pub fn cut(&self) {
        let handle = self.handle;
        // Under the lock, as `watch` checks it: a watch being opened is then either registered
        // before the cut (and ended here) or refused, never registered just after this sweep
        // and left running through the partition.
        let mut mem = self.lock();
        self.cut.store(true, Ordering::SeqCst);
        mem.watchers.retain(|w| w.handle != handle);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Like an etcd restart: every watch of every handle ends; data and leases stay.
    pub fn restart(&self) {
        self.lock().watchers.clear();
    }

    /// Like etcd replaced by a new cluster behind the same address: new cluster id, no data,
    /// revisions start over. Open watches stay open and see the new cluster id in their next
    /// response (as behind a load balancer), which must make readers relist.
    pub fn replace_cluster(&self) {
        let mut mem = self.lock();
        mem.cluster_id = CLUSTER_IDS.fetch_add(1, Ordering::Relaxed);
        mem.revision = 1;
        mem.compact_revision = 0;
        mem.kvs.clear();
        mem.history.clear();
        mem.leases.clear();
    }

    /// Forgets history up to `revision` (inclusive of older ones), like `etcdctl compact`.
    pub fn compact(&self, revision: i64) {
        let mut mem = self.lock();
        let revision = revision.min(mem.revision);
        mem.compact_revision = mem.compact_revision.max(revision);
        // Like etcd, the compaction revision itself stays readable and watchable.
        mem.history.retain(|c| c.revision >= revision);
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Drops a lease as if it had expired (its keys are deleted).
    pub fn expire_lease(&self, lease: LeaseId) -> bool {
        self.lock().drop_lease(lease)
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), KvError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(self.unavailable(op, key, "partitioned (test)"));
        }
        Ok(())
    }

    fn unavailable(&self, op: &'static str, key: &str, reason: &str) -> KvError {
        KvError::Unavailable {
            endpoints: self.describe(),
            op,
            key: key.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for MemoryStore {
    fn describe(&self) -> String {
        format!("memory#{}", self.handle)
    }

    async fn range(
        &self,
        prefix: &str,
        after: Option<&str>,
        revision: i64,
        limit: usize,
    ) -> Result<RangePage, KvError> {
        self.check("range", prefix)?;
        let mem = self.lock();
        if revision > 0 && revision < mem.compact_revision {
            return Err(KvError::Compacted {
                endpoints: self.describe(),
                op: "range",
                key: prefix.to_owned(),
                revision,
                compact_revision: mem.compact_revision,
            });
        }
        let in_range = |k: &str| k.starts_with(prefix) && after.is_none_or(|a| k > a);
        // The state at `revision`: the current one with later changes undone.
        let mut view: BTreeMap<String, Option<Stored>> = BTreeMap::new();
        if revision > 0 && revision < mem.revision {
            for c in mem
                .history
                .iter()
                .rev()
                .take_while(|c| c.revision > revision)
            {
                if in_range(&c.key) {
                    view.insert(c.key.clone(), c.prev.clone());
                }
            }
        }
        let mut kvs = Vec::new();
        let current = mem
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| in_range(k))
            .filter(|(k, _)| !view.contains_key(*k))
            .map(|(k, s)| (k.clone(), s.clone()));
        let undone = view
            .iter()
            .filter_map(|(k, s)| s.clone().map(|s| (k.clone(), s)));
        let mut merged: BTreeMap<String, Stored> = current.collect();
        merged.extend(undone);
        let mut more = false;
        for (key, s) in merged {
            if kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(KeyValue {
                key,
                value: s.value,
                mod_revision: s.mod_revision,
                lease: s.lease,
            });
        }
        let header = Header {
            revision: if revision > 0 { revision } else { mem.revision },
            cluster_id: mem.cluster_id,
        };
        Ok(RangePage { header, kvs, more })
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut mem = self.lock();
        // Checked under the lock (see `cut`).
        self.check("watch", prefix)?;
        if start_revision < mem.compact_revision {
            let _ = tx.send(Ok(WatchMessage::Compacted {
                compact_revision: mem.compact_revision,
            }));
        } else {
            // Like etcd: a created response, then the history from the start revision.
            let _ = tx.send(Ok(WatchMessage::Events {
                header: mem.header(),
                events: Vec::new(),
            }));
            let header = mem.header();
            for c in mem.history.iter().filter(|c| c.revision >= start_revision) {
                if !c.key.starts_with(prefix) {
                    continue;
                }
                let _ = tx.send(Ok(WatchMessage::Events {
                    header,
                    events: vec![c.event()],
                }));
            }
            mem.watchers.push(Watcher {
                handle: self.handle,
                prefix: prefix.to_owned(),
                tx,
            });
        }
        Ok(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Header, KvError> {
        self.check("put", key)?;
        let mut mem = self.lock();
        let lease = lease.unwrap_or(0);
        if lease != 0 && !mem.leases.contains_key(&lease) {
            return Err(KvError::LeaseNotFound {
                endpoints: self.describe(),
                lease,
            });
        }
        mem.write(
            key,
            Some(Stored {
                value,
                mod_revision: 0,
                lease,
            }),
        );
        Ok(mem.header())
    }

    async fn delete(&self, key: &str) -> Result<Header, KvError> {
        self.check("delete", key)?;
        let mut mem = self.lock();
        if mem.kvs.contains_key(key) {
            mem.write(key, None);
        }
        Ok(mem.header())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, KvError> {
        self.check("txn", txn.first_key())?;
        let mut mem = self.lock();
        let succeeded = txn.when.iter().all(|c| mem.holds(c));
        let ops = if succeeded { txn.then } else { txn.otherwise };
        let mut writes = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let lease = lease.unwrap_or(0);
                    if lease != 0 && !mem.leases.contains_key(&lease) {
                        return Err(KvError::LeaseNotFound {
                            endpoints: self.describe(),
                            lease,
                        });
                    }
                    let stored = Stored {
                        value,
                        mod_revision: 0,
                        lease,
                    };
                    writes.push((key, Some(stored)));
                }
                // Like etcd, deleting nothing writes nothing.
                TxnOp::Delete { key } if mem.kvs.contains_key(&key) => writes.push((key, None)),
                TxnOp::Delete { .. } => {}
            }
        }
        mem.commit(writes);
        Ok(TxnResponse {
            header: mem.header(),
            succeeded,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        self.check("lease grant", "")?;
        let mut mem = self.lock();
        let id = mem.next_lease;
        mem.next_lease += 1;
        mem.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), KvError> {
        self.check("lease keep-alive", "")?;
        let mut mem = self.lock();
        mem.expire_leases(Instant::now());
        match mem.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(KvError::LeaseNotFound {
                endpoints: self.describe(),
                lease,
            }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), KvError> {
        self.check("lease revoke", "")?;
        if self.lock().drop_lease(lease) {
            Ok(())
        } else {
            Err(KvError::LeaseNotFound {
                endpoints: self.describe(),
                lease,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn keys_at(store: &MemoryStore, revision: i64) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .range("p/", after.as_deref(), revision, 2)
                .await
                .unwrap();
            out.extend(page.kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())));
            after = page.kvs.last().map(|kv| kv.key.clone());
            if !page.more {
                return out;
            }
        }
    }

    fn kv(k: &str, v: &str) -> (String, Vec<u8>) {
        (k.to_owned(), v.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn reads_at_a_past_revision_see_that_revision() {
        let s = MemoryStore::new();
        for (k, v) in [("p/a", "1"), ("p/b", "1"), ("p/c", "1"), ("q/x", "1")] {
            s.put(k, v.into(), None).await.unwrap();
        }
        let then = s.revision();
        s.put("p/a", "2".into(), None).await.unwrap();
        s.delete("p/b").await.unwrap();
        s.put("p/d", "1".into(), None).await.unwrap();
        s.put("p/a", "3".into(), None).await.unwrap();

        assert_eq!(
            keys_at(&s, then).await,
            [kv("p/a", "1"), kv("p/b", "1"), kv("p/c", "1")]
        );
        assert_eq!(
            keys_at(&s, 0).await,
            [kv("p/a", "3"), kv("p/c", "1"), kv("p/d", "1")]
        );

        s.compact(then + 1);
        let err = s.range("p/", None, then, 10).await.unwrap_err();
        assert!(matches!(err, KvError::Compacted { .. }), "{err}");
        assert!(
            s.range("p/", None, then + 1, 10).await.is_ok(),
            "the compaction revision stays readable"
        );
    }

    #[tokio::test]
    async fn watches_replay_history_and_refuse_compacted_starts() {
        use futures::StreamExt;
        let s = MemoryStore::new();
        s.put("p/a", "1".into(), None).await.unwrap();
        let from = s.revision();
        s.put("p/b", "1".into(), None).await.unwrap();
        s.delete("p/a").await.unwrap();
        let mut w = s.watch("p/", from).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            if let Some(Ok(WatchMessage::Events { events, .. })) = w.next().await {
                seen.extend(events.into_iter().map(|e| (e.kind, e.kv.key)));
            }
        }
        assert_eq!(
            seen,
            [
                (EventKind::Put, "p/a".to_owned()),
                (EventKind::Put, "p/b".to_owned()),
                (EventKind::Delete, "p/a".to_owned())
            ]
        );
        s.compact(s.revision());
        let mut w = s.watch("p/", from).await.unwrap();
        assert!(matches!(
            w.next().await,
            Some(Ok(WatchMessage::Compacted { .. }))
        ));
    }
}
