//! List-then-watch of one cluster's etcd, turned into typed [`ClusterEvent`]s for the view.
//!
//! Per prefix (nodes, ipcache, identities, sync canaries, cluster config; for the local cluster
//! also policies): list everything (paginated, at one revision), send upserts, send deletions
//! for keys held from before that were not listed again (mark-and-sweep), then watch from the
//! listed revision + 1. A broken watch, a compaction or an unreachable etcd ends the round;
//! the prefix is listed again after a capped, jittered backoff. Nothing is deleted because a
//! cluster is unreachable: its last state stays (fail-static) until a relist says otherwise.
//!
//! Values are decoded and validated here (`meshd_state::decode`): a malformed entry is logged
//! with cluster and key, counted, and never reaches the view.
//!
//! kvstore's own watcher was not there when this was written; this one is built on its
//! `Backend` trait so it can be swapped for it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshd_kvstore::{Backend, EventKind as RawKind, KvError};
use meshd_mesh::{ClusterEvent, EventKind, NetworkPolicy, PolicyEvent, ResourceKind};
use meshd_state::{
    decode, ClusterConfig, ClusterName, IdentityRecord, IpcacheEntry, NodeRecord, Resource,
    ServiceRecord, SyncCanary,
};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::agent::now_ms;

/// What the view task receives.
#[derive(Debug)]
pub enum ViewInput {
    Cluster(ClusterEvent),
    Policy(PolicyEvent),
}

/// Where policies of the local cluster live.
pub const POLICIES_PREFIX: &str = "meshd/config/policies/v1/";

/// Connection state of one cluster's etcd, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connection {
    pub connected: bool,
    /// Unreachable since (ms); 0 while connected or before the first connection.
    pub stale_since_ms: u64,
    pub last_error: Option<String>,
    /// Last complete list of every prefix (ms).
    pub last_sync_ms: u64,
    /// Entries that failed to decode or validate (bad JSON, bad key...).
    pub malformed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    ClusterConfig,
    Nodes,
    Ipcache,
    Identities,
    Services,
    Canaries,
    Policies,
}

impl Prefix {
    fn path(self, cluster: &ClusterName) -> String {
        match self {
            Prefix::ClusterConfig => ClusterConfig::cluster_prefix(cluster),
            Prefix::Nodes => NodeRecord::cluster_prefix(cluster),
            Prefix::Ipcache => IpcacheEntry::cluster_prefix(cluster),
            Prefix::Identities => IdentityRecord::cluster_prefix(cluster),
            Prefix::Services => ServiceRecord::cluster_prefix(cluster),
            Prefix::Canaries => SyncCanary::cluster_prefix(cluster),
            Prefix::Policies => POLICIES_PREFIX.to_owned(),
        }
    }

    fn resource(self) -> Option<ResourceKind> {
        match self {
            Prefix::Nodes => Some(ResourceKind::Nodes),
            Prefix::Ipcache => Some(ResourceKind::Ipcache),
            Prefix::Identities => Some(ResourceKind::Identities),
            Prefix::Services => Some(ResourceKind::Services),
            _ => None,
        }
    }
}

/// The canary name (`meshd/synced/<cluster>/<name>`) of a resource: its `Resource::KIND`.
fn canary_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Nodes => NodeRecord::KIND,
        ResourceKind::Ipcache => IpcacheEntry::KIND,
        ResourceKind::Identities => IdentityRecord::KIND,
        ResourceKind::Services => ServiceRecord::KIND,
    }
}

/// Shared between the prefix tasks of one cluster: which lists completed and which canaries
/// exist, so `Synced` is sent once both hold for a resource.
#[derive(Debug, Default)]
struct SyncState {
    listed: BTreeSet<ResourceKind>,
    canaries: BTreeSet<String>,
    announced: BTreeSet<ResourceKind>,
}

/// Watches one cluster. Runs until aborted (the cluster's file removed, the agent stopping).
pub struct ClusterWatcher<B: Backend> {
    pub cluster: ClusterName,
    pub backend: B,
    pub local: bool,
    pub tx: mpsc::Sender<ViewInput>,
    pub connection: watch::Sender<Connection>,
}

const PAGE: usize = 1000;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl<B: Backend> ClusterWatcher<B> {
    pub async fn run(self) {
        let me = Arc::new(self);
        let sync = Arc::new(std::sync::Mutex::new(SyncState::default()));
        let mut prefixes = vec![
            Prefix::ClusterConfig,
            Prefix::Canaries,
            Prefix::Nodes,
            Prefix::Ipcache,
            Prefix::Identities,
            Prefix::Services,
        ];
        if me.local {
            prefixes.push(Prefix::Policies);
        }
        let listed = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
        let n = prefixes.len();
        let tasks: Vec<_> = prefixes
            .into_iter()
            .map(|p| {
                let me = me.clone();
                let sync = sync.clone();
                let listed = listed.clone();
                tokio::spawn(async move { me.prefix_loop(p, sync, listed, n).await })
            })
            .collect();
        // Abort the prefix tasks when this future is dropped or aborted.
        let _guard = AbortOnDrop(tasks.iter().map(|t| t.abort_handle()).collect());
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn prefix_loop(
        &self,
        prefix: Prefix,
        sync: Arc<std::sync::Mutex<SyncState>>,
        listed_prefixes: Arc<std::sync::Mutex<BTreeSet<String>>>,
        prefix_count: usize,
    ) {
        let path = prefix.path(&self.cluster);
        let mut known: BTreeSet<String> = BTreeSet::new();
        let mut backoff = BACKOFF_MIN;
        loop {
            let err = match self
                .list_and_watch(
                    prefix,
                    &path,
                    &mut known,
                    &sync,
                    &listed_prefixes,
                    prefix_count,
                )
                .await
            {
                Ok(()) => format!("watch of {path} ended"),
                Err(e) => e.to_string(),
            };
            listed_prefixes.lock().expect("not poisoned").remove(&path);
            self.connection.send_modify(|c| {
                if c.connected {
                    c.stale_since_ms = now_ms();
                }
                c.connected = false;
                c.last_error = Some(err.clone());
            });
            tracing::warn!(cluster = %self.cluster, prefix = %path, error = %err, "etcd watch interrupted; keeping last known state");
            let jitter = rand::thread_rng().gen_range(0.8..1.2);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            // A successful round resets the backoff (see below); keep it if lists keep failing.
            if self.connection.borrow().connected {
                backoff = BACKOFF_MIN;
            }
        }
    }

    async fn list_and_watch(
        &self,
        prefix: Prefix,
        path: &str,
        known: &mut BTreeSet<String>,
        sync: &std::sync::Mutex<SyncState>,
        listed_prefixes: &std::sync::Mutex<BTreeSet<String>>,
        prefix_count: usize,
    ) -> Result<(), KvError> {
        // List, paginated, all pages at the revision of the first.
        let mut seen = BTreeSet::new();
        let mut revision = 0;
        let mut after: Option<String> = None;
        let mut cluster_id = 0;
        loop {
            let page = self
                .backend
                .range(path, after.as_deref(), revision, PAGE)
                .await?;
            if revision == 0 {
                revision = page.header.revision;
                cluster_id = page.header.cluster_id;
            }
            for kv in &page.kvs {
                // The cluster-config "prefix" is a single key; a range over it also returns
                // longer keys (e.g. cluster c1 vs c10): only the exact key counts.
                if prefix == Prefix::ClusterConfig && kv.key != path {
                    continue;
                }
                seen.insert(kv.key.clone());
                self.upsert(prefix, &kv.key, &kv.value, sync).await;
            }
            after = page.kvs.last().map(|kv| kv.key.clone());
            if !page.more || after.is_none() {
                break;
            }
        }
        for gone in known.difference(&seen).cloned().collect::<Vec<_>>() {
            self.delete(prefix, &gone, sync).await;
        }
        *known = seen;
        if let Some(kind) = prefix.resource() {
            sync.lock().expect("not poisoned").listed.insert(kind);
            self.maybe_synced(sync).await;
        }
        {
            let mut listed = listed_prefixes.lock().expect("not poisoned");
            listed.insert(path.to_owned());
            if listed.len() == prefix_count {
                self.connection.send_modify(|c| {
                    c.connected = true;
                    c.stale_since_ms = 0;
                    c.last_error = None;
                    c.last_sync_ms = now_ms();
                });
            }
        }

        let mut stream = self.backend.watch(path, revision + 1).await?;
        while let Some(msg) = stream.next().await {
            match msg? {
                meshd_kvstore::WatchMessage::Compacted { compact_revision } => {
                    return Err(KvError::Compacted {
                        endpoints: self.backend.describe(),
                        op: "watch",
                        key: path.to_owned(),
                        revision: revision + 1,
                        compact_revision,
                    });
                }
                meshd_kvstore::WatchMessage::Events { header, events } => {
                    if header.cluster_id != 0 && cluster_id != 0 && header.cluster_id != cluster_id
                    {
                        // Another etcd answers now (restored or replaced): our revisions mean
                        // nothing there. List again.
                        return Err(KvError::Unavailable {
                            endpoints: self.backend.describe(),
                            op: "watch",
                            key: path.to_owned(),
                            reason: format!(
                                "etcd cluster id changed from {cluster_id:x} to {:x}",
                                header.cluster_id
                            ),
                        });
                    }
                    for ev in events {
                        if prefix == Prefix::ClusterConfig && ev.kv.key != path {
                            continue;
                        }
                        match ev.kind {
                            RawKind::Put => {
                                known.insert(ev.kv.key.clone());
                                self.upsert(prefix, &ev.kv.key, &ev.kv.value, sync).await;
                            }
                            RawKind::Delete => {
                                known.remove(&ev.kv.key);
                                self.delete(prefix, &ev.kv.key, sync).await;
                            }
                        }
                    }
                    if header.revision > 0 {
                        self.connection.send_modify(|c| c.last_sync_ms = now_ms());
                    }
                }
            }
        }
        Ok(())
    }

    async fn send(&self, kind: EventKind) {
        let _ = self
            .tx
            .send(ViewInput::Cluster(ClusterEvent::new(
                self.cluster.clone(),
                kind,
            )))
            .await;
    }

    fn malformed(&self, key: &str, reason: &str) {
        tracing::warn!(cluster = %self.cluster, key, reason, "rejected malformed entry");
        self.connection.send_modify(|c| c.malformed += 1);
    }

    async fn upsert(
        &self,
        prefix: Prefix,
        key: &str,
        value: &[u8],
        sync: &std::sync::Mutex<SyncState>,
    ) {
        let kind = match prefix {
            Prefix::ClusterConfig => {
                decode::<ClusterConfig>(key, value).map(|(_, c)| EventKind::ClusterConfig(c))
            }
            Prefix::Nodes => {
                decode::<NodeRecord>(key, value).map(|(_, n)| EventKind::UpsertNode(n))
            }
            Prefix::Ipcache => {
                decode::<IpcacheEntry>(key, value).map(|(_, e)| EventKind::UpsertIpcache(e))
            }
            Prefix::Identities => decode::<IdentityRecord>(key, value)
                .map(|(k, record)| EventKind::UpsertIdentity { id: k.id, record }),
            Prefix::Services => {
                decode::<ServiceRecord>(key, value).map(|(_, s)| EventKind::UpsertService(s))
            }
            Prefix::Canaries => {
                match decode::<SyncCanary>(key, value) {
                    Ok((k, _)) => {
                        sync.lock()
                            .expect("not poisoned")
                            .canaries
                            .insert(k.resource);
                        self.maybe_synced(sync).await;
                    }
                    Err(e) => self.malformed(key, &e.to_string()),
                }
                return;
            }
            Prefix::Policies => {
                let text = String::from_utf8_lossy(value);
                match NetworkPolicy::from_yaml(&text) {
                    Ok(p) => {
                        let _ = self
                            .tx
                            .send(ViewInput::Policy(PolicyEvent::Upsert(p)))
                            .await;
                    }
                    Err(e) => self.malformed(key, &e.to_string()),
                }
                return;
            }
        };
        match kind {
            // The key was malformed: whatever the view held under it stays until a valid
            // value or a delete comes (decisions depend on content, never on garbage).
            Err(e) => self.malformed(key, &e.to_string()),
            Ok(kind) => self.send(kind).await,
        }
    }

    async fn delete(&self, prefix: Prefix, key: &str, sync: &std::sync::Mutex<SyncState>) {
        use meshd_state::ResourceKey;
        let kind = match prefix {
            Prefix::ClusterConfig | Prefix::Services => {
                if prefix == Prefix::Services {
                    if let Ok(k) = meshd_state::ServiceKey::parse(key) {
                        self.send(EventKind::DeleteService {
                            namespace: k.namespace,
                            name: k.name,
                        })
                        .await;
                    }
                }
                return;
            }
            Prefix::Nodes => {
                meshd_state::NodeKey::parse(key).map(|k| EventKind::DeleteNode { name: k.node })
            }
            Prefix::Ipcache => meshd_state::IpcacheKey::parse(key)
                .map(|k| EventKind::DeleteIpcache { prefix: k.prefix }),
            Prefix::Identities => {
                meshd_state::IdentityKey::parse(key).map(|k| EventKind::DeleteIdentity { id: k.id })
            }
            Prefix::Canaries => {
                if let Ok(k) = meshd_state::SyncCanaryKey::parse(key) {
                    sync.lock()
                        .expect("not poisoned")
                        .canaries
                        .remove(&k.resource);
                }
                return;
            }
            Prefix::Policies => {
                if let Some((ns, name)) = key
                    .strip_prefix(POLICIES_PREFIX)
                    .and_then(|r| r.split_once('/'))
                {
                    let _ = self
                        .tx
                        .send(ViewInput::Policy(PolicyEvent::Delete {
                            namespace: ns.to_owned(),
                            name: name.to_owned(),
                        }))
                        .await;
                }
                return;
            }
        };
        // A key we could not parse never entered the view: nothing to remove.
        if let Ok(kind) = kind {
            self.send(kind).await
        }
    }

    /// Sends `Synced(kind)` for each resource whose list completed and whose canary exists.
    async fn maybe_synced(&self, sync: &std::sync::Mutex<SyncState>) {
        let ready: Vec<ResourceKind> = {
            let mut s = sync.lock().expect("not poisoned");
            let ready: Vec<ResourceKind> = s
                .listed
                .iter()
                .filter(|k| !s.announced.contains(*k) && s.canaries.contains(canary_name(**k)))
                .copied()
                .collect();
            s.announced.extend(ready.iter().copied());
            ready
        };
        for kind in ready {
            self.send(EventKind::Synced(kind)).await;
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
