//! One cluster's etcd, turned into [`ClusterEvent`]s for the view.
//!
//! The list-then-watch work (pagination, mark-and-sweep relists, compaction and cluster-id
//! changes, backoff, decoding and validation of every value) is `meshd_kvstore`'s watcher:
//! here one watch per resource of the cluster (cluster config, nodes, ipcache, identities,
//! services, sync canaries; for the local cluster also policies) is mapped onto the view's
//! events. A resource is announced `Synced` once its list completed *and* the cluster's
//! publishers wrote its sync canary. Nothing is deleted because a cluster is unreachable: the
//! watchers keep the last state (fail-static) until a relist says otherwise.
//!
//! Connection state for status comes from a probe of the etcd (a one-key read of the cluster's
//! sync canaries per second): connected, unreachable since when, and the last error. The probe
//! reads rather than asking for etcd's status because a read also checks the certificate's
//! permission: etcd checks permissions when a watch starts, not while it runs, so a cluster that
//! disconnected this one (`meshd clustermesh disconnect`) would otherwise go on feeding the
//! watches opened before. On a refusal the watches are ended and relisted, which fails until the
//! access comes back; the last state stays in the datapath meanwhile (fail-static).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meshd_kvstore::{
    watch_cluster, watch_prefix, Backend, EntryQuota, EntryRoom, EtcdStore, WatchConfig,
    WatchEvent, WatchHandle, WatchStats,
};
use meshd_mesh::{ClusterEvent, EventKind, PolicyEvent, ResourceKind};
use meshd_state::{
    ClusterConfig, ClusterName, IdentityRecord, IpcacheEntry, NetworkPolicy, NodeRecord, Resource,
    ServiceRecord, SyncCanary,
};
use tokio::sync::watch;

use crate::inputs::InputSender;
use crate::now_ms;

/// What the view task receives.
#[derive(Debug)]
pub enum ViewInput {
    Cluster(ClusterEvent),
    Policy(PolicyEvent),
}

/// Connection state of one cluster's etcd, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connection {
    pub connected: bool,
    /// Unreachable since (ms); 0 while connected or before the first connection.
    pub stale_since_ms: u64,
    pub last_error: Option<String>,
    /// Last completed list or event from the cluster (ms).
    pub last_sync_ms: u64,
    /// Entries that failed to decode or validate (bad JSON, bad key, a value over the size
    /// bound...), skipped.
    pub malformed: u64,
    /// `malformed` by kind (`nodes`, `ipcache`, ...; kinds with none are absent).
    pub malformed_by_kind: BTreeMap<&'static str, u64>,
    /// Of `malformed`: values refused unread for their size.
    pub oversized: u64,
    /// The cluster's entry limit (0: none), the keys held against it, and the new keys refused
    /// for it since the cluster was added.
    pub entry_limit: u64,
    pub entries_held: u64,
    pub over_limit: u64,
    /// Why the cluster is degraded (served, but not all of it): keys refused for the limit
    /// since the last admission round. None when it is served whole.
    pub degraded: Option<String>,
    /// The etcd answers but refuses this node's certificate (disconnected, or never connected).
    pub access_denied: bool,
    /// Times the etcd became unreachable or refused access (a failed probe after a good one,
    /// or the first one).
    pub failures: u64,
    /// Cache mode: the mirror's status of the cluster, as last read.
    pub cache: Option<meshd_state::CacheStatus>,
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

/// Watches one cluster. Runs until aborted (the cluster's file removed, the agent stopping).
///
/// `backend` is the cluster's own etcd, or its copy in the local etcd's cache
/// ([`meshd_kvstore::CachedCluster`]): the same watches, checks and canaries either way.
pub struct ClusterWatcher<B: Backend = EtcdStore> {
    pub cluster: ClusterName,
    pub backend: B,
    /// Where the connection state comes from.
    pub probe: Probe,
    pub local: bool,
    /// The cluster's own queue to the view task.
    pub tx: InputSender,
    pub connection: watch::Sender<Connection>,
    /// What the cluster may make this node hold (nothing bounds the local cluster).
    pub limits: RemoteLimits,
}

/// What a remote cluster may make this node hold.
#[derive(Debug, Clone, Default)]
pub struct RemoteLimits {
    /// Keys of the cluster held at most (`remote_entry_limit`); None: no limit, and no room
    /// either.
    pub per_cluster: Option<u64>,
    /// The node's room for every remote cluster's keys together, shared with the others
    /// ([`EntryRoom`]).
    pub room: Option<Arc<EntryRoom>>,
}

/// The room the node's maps have for remote clusters' keys: IPCACHE_HOSTS, less an eighth
/// (131,072 entries) kept for the local cluster's endpoints, which no limit bounds. Every key
/// of a remote cluster counts (nodes, identities and services too), so the room errs towards
/// refusing early.
pub fn remote_room() -> u64 {
    let hosts = u64::from(meshd_ebpf::abi::IPCACHE_HOSTS_MAX);
    hosts - hosts / 8
}

/// How a watcher learns whether its cluster is reachable.
#[derive(Clone)]
pub enum Probe {
    /// A read of the cluster's sync canaries in its own etcd, every second (direct mode, and
    /// the local cluster).
    Etcd(Box<EtcdStore>),
    /// Kept by whoever started the watcher: in cache mode, from the mirror's status of the
    /// cluster (watched, [`crate::cache_source`]) and the local etcd's reachability, since the
    /// mirror, not this node, talks to the remote.
    Fed,
}

const PROBE: Duration = Duration::from_secs(1);
/// How often the counters of the watches are read into the connection state (refused keys
/// produce no event that would do it).
const COUNTERS: Duration = Duration::from_secs(1);
/// Keys refused for the entry limit are listed again at most this often once there is room
/// (the mirror waits as long before its own relist): a cluster flooding at its limit costs a
/// full list per period, not one per freed key.
const READMIT: Duration = Duration::from_secs(30);

/// The watches' kinds, in the order of the watcher's stats.
const KINDS: [&str; 7] = [
    "cluster-config",
    "nodes",
    "ipcache",
    "identities",
    "services",
    "canaries",
    "policies",
];

/// Lists done and canaries seen, so `Synced` goes out once both hold for a resource.
#[derive(Debug, Default)]
struct SyncState {
    listed: BTreeSet<ResourceKind>,
    canaries: BTreeSet<String>,
    announced: BTreeSet<ResourceKind>,
}

impl SyncState {
    fn ready(&mut self) -> Vec<ResourceKind> {
        let ready: Vec<ResourceKind> = self
            .listed
            .iter()
            .filter(|k| !self.announced.contains(*k) && self.canaries.contains(canary_name(**k)))
            .copied()
            .collect();
        self.announced.extend(ready.iter().copied());
        ready
    }
}

impl<B: Backend> ClusterWatcher<B> {
    pub async fn run(self) {
        let probe = match self.probe.clone() {
            Probe::Etcd(store) => tokio::spawn(probe(
                *store,
                self.cluster.clone(),
                self.local,
                self.connection.clone(),
            )),
            Probe::Fed => tokio::spawn(std::future::ready(())),
        };
        let _abort_probe = AbortOnDrop(probe.abort_handle());
        let quota = self.limits.per_cluster.map(|l| {
            let q = EntryQuota::new(l);
            Arc::new(match self.limits.room.clone() {
                Some(room) => q.in_room(room),
                None => q,
            })
        });
        let cfg = || WatchConfig {
            quota: quota.clone(),
            ..WatchConfig::default()
        };
        let c = &self.cluster;
        let b = || self.backend.clone();
        // Every cluster config the etcd holds, not only ours: an etcd that publishes only
        // another name is a misconfigured remote (a file named after the wrong cluster), which
        // the view refuses by name instead of waiting forever.
        let mut config: WatchHandle<ClusterConfig> = watch_prefix(
            b(),
            meshd_state::keys::CLUSTER_CONFIG_PREFIX.to_owned(),
            None,
            cfg(),
        );
        let mut configs: BTreeMap<ClusterName, ClusterConfig> = BTreeMap::new();
        let mut nodes: WatchHandle<NodeRecord> = watch_cluster(b(), c, cfg());
        let mut ipcache: WatchHandle<IpcacheEntry> = watch_cluster(b(), c, cfg());
        let mut identities: WatchHandle<IdentityRecord> = watch_cluster(b(), c, cfg());
        let mut services: WatchHandle<ServiceRecord> = watch_cluster(b(), c, cfg());
        let mut canaries: WatchHandle<SyncCanary> = watch_cluster(b(), c, cfg());
        let mut policies: Option<WatchHandle<NetworkPolicy>> = self
            .local
            .then(|| watch_prefix(b(), NetworkPolicy::PREFIX.to_owned(), None, cfg()));
        let mut stats = vec![
            config.stats(),
            nodes.stats(),
            ipcache.stats(),
            identities.stats(),
            services.stats(),
            canaries.stats(),
        ];
        stats.extend(policies.as_ref().map(|p| p.stats()));
        let mut sync = SyncState::default();
        let mut access = self.connection.subscribe();
        let mut denied = false;
        let mut counters = tokio::time::interval(COUNTERS);
        counters.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_round = tokio::time::Instant::now();
        // Every watch lists again (a macro: the handles are borrowed mutably by the loop).
        macro_rules! relist_all {
            () => {
                config.relist();
                nodes.relist();
                ipcache.relist();
                identities.relist();
                services.relist();
                canaries.relist();
                if let Some(p) = &policies {
                    p.relist();
                }
            };
        }
        loop {
            let mut out: Vec<EventKind> = Vec::new();
            tokio::select! {
                _ = counters.tick() => {
                    if let Some(q) = quota.as_ref().filter(|q| q.room_for_refused()) {
                        if last_round.elapsed() >= READMIT {
                            // A new round: what it refuses again says whether the cluster is
                            // still over its limit.
                            tracing::info!(cluster = %self.cluster, held = q.held(), limit = q.limit(), "room under the entry limit; listing again for the keys refused");
                            last_round = tokio::time::Instant::now();
                            q.begin_round();
                            relist_all!();
                        }
                    }
                    self.connection.send_if_modified(|c| counts_into(c, &stats, quota.as_deref()));
                    continue;
                }
                Ok(()) = access.changed() => {
                    let now_denied = access.borrow_and_update().access_denied;
                    if now_denied && !denied {
                        tracing::warn!(cluster = %self.cluster, "access refused; ending the watches opened before");
                        relist_all!();
                    }
                    denied = now_denied;
                    continue;
                }
                Some(ev) = config.next() => {
                    let before = effective_config(&self.cluster, &configs).cloned();
                    match ev {
                        WatchEvent::Upsert { key, value } => { configs.insert(key.cluster, value); }
                        WatchEvent::Delete { key } => { configs.remove(&key.cluster); }
                        WatchEvent::Synced { .. } => {}
                    }
                    let after = effective_config(&self.cluster, &configs).cloned();
                    if let (Some(cfg), true) = (after.as_ref(), after != before) {
                        out.push(EventKind::ClusterConfig(cfg.clone()));
                    }
                }
                Some(ev) = nodes.next() => match ev {
                    WatchEvent::Upsert { value, .. } => out.push(EventKind::UpsertNode(value)),
                    WatchEvent::Delete { key } => out.push(EventKind::DeleteNode { name: key.node }),
                    WatchEvent::Synced { .. } => { sync.listed.insert(ResourceKind::Nodes); }
                },
                Some(ev) = ipcache.next() => match ev {
                    WatchEvent::Upsert { value, .. } => out.push(EventKind::UpsertIpcache(value)),
                    WatchEvent::Delete { key } => out.push(EventKind::DeleteIpcache { prefix: key.prefix }),
                    WatchEvent::Synced { .. } => { sync.listed.insert(ResourceKind::Ipcache); }
                },
                Some(ev) = identities.next() => match ev {
                    WatchEvent::Upsert { key, value } => out.push(EventKind::UpsertIdentity { id: key.id, record: value }),
                    WatchEvent::Delete { key } => out.push(EventKind::DeleteIdentity { id: key.id }),
                    WatchEvent::Synced { .. } => { sync.listed.insert(ResourceKind::Identities); }
                },
                Some(ev) = services.next() => match ev {
                    WatchEvent::Upsert { value, .. } => out.push(EventKind::UpsertService(value)),
                    WatchEvent::Delete { key } => out.push(EventKind::DeleteService { namespace: key.namespace, name: key.name }),
                    WatchEvent::Synced { .. } => { sync.listed.insert(ResourceKind::Services); }
                },
                Some(ev) = canaries.next() => match ev {
                    WatchEvent::Upsert { key, .. } => { sync.canaries.insert(key.resource); }
                    WatchEvent::Delete { key } => { sync.canaries.remove(&key.resource); }
                    WatchEvent::Synced { .. } => {}
                },
                Some(ev) = async { match policies.as_mut() { Some(p) => p.next().await, None => std::future::pending().await } } => {
                    let input = match ev {
                        WatchEvent::Upsert { value, .. } => Some(PolicyEvent::Upsert(value)),
                        WatchEvent::Delete { key } => Some(PolicyEvent::Delete { namespace: key.namespace, name: key.name }),
                        WatchEvent::Synced { .. } => None,
                    };
                    if let Some(input) = input {
                        if self.tx.send(ViewInput::Policy(input)).await.is_err() {
                            return;
                        }
                    }
                },
                else => return,
            }
            out.extend(sync.ready().into_iter().map(EventKind::Synced));
            // Readers borrow the time of the last event; only a change of the counts notifies
            // (a notification per event woke this loop's own `access` branch for nothing, an
            // extra turn of the loop per event under churn).
            self.connection.send_if_modified(|c| {
                c.last_sync_ms = now_ms();
                counts_into(c, &stats, quota.as_deref())
            });
            for kind in out {
                let ev = ClusterEvent::new(self.cluster.clone(), kind);
                if self.tx.send(ViewInput::Cluster(ev)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Copies the watches' counters and the quota's into `c`; whether anything changed.
fn counts_into(c: &mut Connection, stats: &[Arc<WatchStats>], quota: Option<&EntryQuota>) -> bool {
    // What status shows as a problem; the held count moves with every new key and is read on
    // the next notification or borrow, without one of its own.
    let problems = |c: &Connection| (c.malformed, c.oversized, c.over_limit, c.degraded.is_some());
    let before = problems(c);
    c.malformed = stats.iter().map(|s| s.malformed()).sum();
    c.oversized = stats.iter().map(|s| s.oversized()).sum();
    if c.malformed != before.0 {
        c.malformed_by_kind = KINDS
            .iter()
            .zip(stats)
            .filter(|(_, s)| s.malformed() > 0)
            .map(|(k, s)| (*k, s.malformed()))
            .collect();
    }
    if let Some(q) = quota {
        c.entry_limit = q.limit();
        c.entries_held = q.held();
        c.over_limit = q.refused_total();
        c.degraded = (q.refused_recent() > 0).then(|| match q.room() {
            Some(room) if q.refused_for_room() > 0 => format!(
                "over its share of the node's room for remote entries: {} keys refused since its last full list (room {} for {} remote clusters: {} each, the other half to whoever needs it first; its own limit {}); the rest is served",
                q.refused_recent(),
                room.room(),
                room.members(),
                room.share(),
                q.limit()
            ),
            _ => format!(
                "over its entry limit: {} keys refused since its last full list (limit {}); the rest is served",
                q.refused_recent(),
                q.limit()
            ),
        });
    }
    problems(c) != before
}

/// The config that speaks for `cluster`: its own, or else (misconfiguration) the one another
/// name publishes there.
fn effective_config<'a>(
    cluster: &ClusterName,
    configs: &'a BTreeMap<ClusterName, ClusterConfig>,
) -> Option<&'a ClusterConfig> {
    configs.get(cluster).or_else(|| configs.values().next())
}

/// Reads one key of the cluster's sync canaries every second; records reachability and
/// whether etcd still lets this node's certificate read.
async fn probe(
    backend: EtcdStore,
    cluster: ClusterName,
    local: bool,
    connection: watch::Sender<Connection>,
) {
    let prefix = format!("{}{cluster}/", meshd_state::keys::SYNCED_PREFIX);
    let mut tick = tokio::time::interval(PROBE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match backend.check_read(&prefix).await {
            Ok(_) => connection.send_if_modified(|c| {
                let changed = !c.connected || c.last_error.is_some() || c.access_denied;
                c.connected = true;
                c.access_denied = false;
                c.stale_since_ms = 0;
                c.last_error = None;
                changed
            }),
            Err(e) => connection.send_if_modified(|c| {
                let denied = e.is_permission_denied();
                if c.connected || c.last_error.is_none() {
                    c.failures += 1;
                }
                if c.connected {
                    c.stale_since_ms = now_ms();
                    tracing::warn!(etcd = %backend.describe(), error = %e, "etcd unreachable or refusing access; keeping its last known state");
                }
                c.connected = false;
                c.access_denied = denied;
                c.last_error = Some(if denied {
                    access_denied_hint(&cluster, local, &e)
                } else {
                    e.to_string()
                });
                true
            }),
        };
    }
}

/// What a refusal means and who can fix it.
fn access_denied_hint(cluster: &ClusterName, local: bool, e: &meshd_kvstore::KvError) -> String {
    if local {
        format!(
            "access denied: {e}; this node's certificate may not read its own cluster's etcd (is its user node-{cluster}-<node> there? `meshd etcd bootstrap --node <node>`)"
        )
    } else {
        format!(
            "access denied: {e}; cluster {cluster} does not let this cluster read it (never connected, or disconnected): `meshd clustermesh connect <this cluster>` against {cluster}'s etcd restores it"
        )
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_needs_both_the_list_and_the_canary() {
        let mut s = SyncState::default();
        s.listed.insert(ResourceKind::Nodes);
        assert!(s.ready().is_empty());
        s.canaries.insert("nodes".into());
        assert_eq!(s.ready(), vec![ResourceKind::Nodes]);
        // Announced once.
        assert!(s.ready().is_empty());
    }
}
