//! The merged view of the local cluster and every remote cluster: what each cluster published,
//! what was admitted, held back or rejected, and the desired maps that follow (ipcache, nodes,
//! policy, services), maintained incrementally so one event costs a few map operations, not a
//! recomputation.
//!
//! Every admission decision is a function of the current content (see the crate docs for the
//! rules). One event pushes the keys it may affect onto a work list; each is re-evaluated, and
//! a key whose status changed pushes the keys that depend on it (the ipcache entries tunnelling
//! to a node, the other claimants of a prefix or node IP, the remote prefixes overlapping a
//! local one). At the end, every prefix and node IP touched is resolved against the view and
//! compared with the maintained desired maps, which yields the operations of [`Applied::ops`].
//! Identities admitted or withdrawn go to the policy index ([`PolicyIndex`]), services whose
//! records (or whose clusters' admission) changed are recomputed one by one
//! (`refresh_services`); their operations join the same [`Applied`].

use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use meshd_state::{
    ClusterConfig, ClusterId, ClusterName, IdentityKey, IdentityRecord, IpcacheEntry, IpcacheKey,
    Labels, NodeKey, NodeRecord, NumericIdentity, ServiceRecord, CLUSTER_LABEL,
};

use crate::desired::{order_ops, DatapathOp, DesiredDatapath, IpcacheTarget};
use crate::policy::{compile, CompiledPolicy, NetworkPolicy, PolicyErrors, PolicyIndex};
use crate::prefix::{overlapping, Lengths, PrefixSet};
use crate::reject::{ClusterRefusal, PendingEntry, RejectReason, RejectedKey, Rejection};
use crate::services::{desired_services, ClusterService, DesiredServices, Frontend, ServiceOp};

/// Who this node is. The local cluster's events come through [`MeshView::apply`] like any
/// other cluster's; this is what the node knows before reading any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
}

/// One change seen by a cluster's watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterEvent {
    pub cluster: ClusterName,
    pub kind: EventKind,
}

impl ClusterEvent {
    pub fn new(cluster: ClusterName, kind: EventKind) -> Self {
        Self { cluster, kind }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    UpsertNode(NodeRecord),
    DeleteNode {
        name: String,
    },
    UpsertIpcache(IpcacheEntry),
    DeleteIpcache {
        prefix: IpNet,
    },
    UpsertIdentity {
        id: NumericIdentity,
        record: IdentityRecord,
    },
    DeleteIdentity {
        id: NumericIdentity,
    },
    /// A cluster's service record: see [`MeshView::desired_services`].
    UpsertService(ServiceRecord),
    DeleteService {
        namespace: String,
        name: String,
    },
    /// The cluster's publishers finished the initial sync of a resource (its canary is there
    /// and the watcher's list is complete). Stale entries are swept by the watcher, which
    /// sends their deletions; the view only records readiness.
    Synced(ResourceKind),
    /// The remote's `meshd/cluster-config/<name>` as it published it.
    ClusterConfig(ClusterConfig),
    /// The cluster was disconnected for good (its file removed): drain everything of it.
    ClusterRemoved,
}

/// The resources a watcher lists and watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    Nodes,
    Ipcache,
    Identities,
    Services,
}

/// A change of the local cluster's policies.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyEvent {
    Upsert(NetworkPolicy),
    Delete { namespace: String, name: String },
}

/// What one call of [`MeshView::apply`] (or [`MeshView::update_policy`]) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// Operations on the ipcache, node and policy maps: exactly the diff between the desired
    /// state before and after the event(s), in safe order. A reconciler whose maps hold the
    /// previous desired state applies them as they are.
    pub ops: Vec<DatapathOp>,
    /// Operations on the SERVICES and BACKENDS maps, likewise (only the services whose records
    /// or clusters changed are looked at), in [`ServiceOp::phase`] order.
    pub service_ops: Vec<ServiceOp>,
    /// Keys that became rejected (log each, it names cluster and key).
    pub rejected: Vec<Rejection>,
    /// Ipcache entries that became pending on their node.
    pub pending: Vec<PendingEntry>,
    /// Clusters refused by this event (or the local cluster's config disagreeing).
    pub refusals: Vec<ClusterRefusal>,
    /// The admitted identities changed (the policy was recompiled; its changes are in `ops`).
    pub policy_inputs_changed: bool,
    /// [`MeshView::update_policy`]: the stored policies changed.
    pub policies_changed: bool,
}

impl Applied {
    fn merge(&mut self, other: Applied) {
        self.ops.extend(other.ops);
        order_ops(&mut self.ops);
        self.rejected.extend(other.rejected);
        self.pending.extend(other.pending);
        self.refusals.extend(other.refusals);
        self.policy_inputs_changed |= other.policy_inputs_changed;
        self.policies_changed |= other.policies_changed;
        self.service_ops.extend(other.service_ops);
        self.service_ops.sort_by_key(ServiceOp::phase);
    }
}

/// Sizes of the desired maps ([`MeshView::desired_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DesiredCounts {
    pub ipcache: usize,
    pub nodes: usize,
    /// Policy entries, markers not included.
    pub policy: usize,
    /// Service frontends.
    pub services: usize,
}

/// Counts of one kind of record of one cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCounts {
    /// Everything the cluster published and the view holds.
    pub stored: usize,
    pub admitted: usize,
    pub pending: usize,
    /// Currently rejected (the total over time is [`ClusterStatus::rejected_total`]).
    pub rejected: usize,
}

/// What `meshd clustermesh status` shows about one cluster, as far as the view knows.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    pub name: ClusterName,
    pub local: bool,
    /// The config the cluster published, if seen.
    pub config: Option<ClusterConfig>,
    /// The id in force: the local configured id, or an accepted remote's published id.
    pub cluster_id: Option<ClusterId>,
    pub refused: Option<ClusterRefusal>,
    pub synced: BTreeSet<ResourceKind>,
    /// Accepted (or local) and nodes, ipcache and identities synced.
    pub ready: bool,
    pub nodes: KindCounts,
    pub ipcache: KindCounts,
    pub identities: KindCounts,
    pub services: usize,
    /// Rejections since the cluster was added (each rejected update counts).
    pub rejected_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// Just stored, not evaluated yet.
    New,
    Admitted,
    /// Waiting for the cluster's config.
    AwaitingConfig,
    /// Waiting for the node the entry tunnels to.
    AwaitingNode(IpAddr),
    /// Boxed: rejections are rare, and a small status keeps 100k stored entries small.
    Rejected(Box<RejectReason>),
    /// The cluster is refused.
    Blocked,
}

fn rejected(reason: RejectReason) -> Status {
    Status::Rejected(Box::new(reason))
}

/// What the view keeps of an ipcache entry: what decisions and the datapath need. The
/// endpoint and namespace names are not kept (about half the memory at 100k entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryValue {
    identity: NumericIdentity,
    host_ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Admission {
    Local,
    AwaitingConfig,
    Accepted(ClusterId),
    Refused(ClusterRefusal),
}

#[derive(Debug, Clone)]
struct Stored<T> {
    value: T,
    status: Status,
    /// Its status before the transaction is recorded in the transaction's change list.
    marked: bool,
}

impl<T> Stored<T> {
    fn new(value: T) -> Self {
        Self {
            value,
            status: Status::New,
            marked: false,
        }
    }
}

impl KindCounts {
    fn track(&mut self, status: &Status, up: bool) {
        let slot = match status {
            Status::Admitted => &mut self.admitted,
            Status::AwaitingConfig | Status::AwaitingNode(_) => &mut self.pending,
            Status::Rejected(_) => &mut self.rejected,
            Status::New | Status::Blocked => return,
        };
        if up {
            *slot += 1;
        } else {
            *slot -= 1;
        }
    }
}

#[derive(Debug, Clone)]
struct ClusterState {
    /// Shared by the work items of the cluster, so queueing a key allocates nothing.
    name: Arc<ClusterName>,
    admission: Admission,
    config: Option<ClusterConfig>,
    synced: BTreeSet<ResourceKind>,
    nodes: BTreeMap<String, Stored<NodeRecord>>,
    /// Stored nodes by IP.
    node_ips: HashMap<IpAddr, BTreeSet<String>>,
    /// Admitted nodes by IP (a count: two records may share an IP during a rename).
    admitted_node_ips: HashMap<IpAddr, u32>,
    ipcache: BTreeMap<IpNet, Stored<EntryValue>>,
    ipcache_lengths: Lengths,
    /// Ipcache prefixes by the node IP they tunnel to.
    by_host: HashMap<IpAddr, BTreeSet<IpNet>>,
    identities: BTreeMap<NumericIdentity, Stored<Labels>>,
    services: BTreeMap<(String, String), ServiceRecord>,
    node_counts: KindCounts,
    ipcache_counts: KindCounts,
    identity_counts: KindCounts,
    rejected_total: u64,
}

impl ClusterState {
    fn new(name: &ClusterName, admission: Admission) -> Self {
        Self {
            name: Arc::new(name.clone()),
            admission,
            config: None,
            synced: BTreeSet::new(),
            nodes: BTreeMap::new(),
            node_ips: HashMap::new(),
            admitted_node_ips: HashMap::new(),
            ipcache: BTreeMap::new(),
            ipcache_lengths: Lengths::default(),
            by_host: HashMap::new(),
            identities: BTreeMap::new(),
            services: BTreeMap::new(),
            node_counts: KindCounts::default(),
            ipcache_counts: KindCounts::default(),
            identity_counts: KindCounts::default(),
            rejected_total: 0,
        }
    }

    fn is_local(&self) -> bool {
        self.admission == Admission::Local
    }

    fn accepted_id(&self) -> Option<ClusterId> {
        match self.admission {
            Admission::Accepted(id) => Some(id),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Work {
    Node(Arc<ClusterName>, String),
    Entry(Arc<ClusterName>, IpNet),
    Identity(Arc<ClusterName>, NumericIdentity),
}

/// Keys to re-evaluate. Nodes go first and identities next: entries depend on nodes, never
/// the other way round, so an entry is judged once its node's fate is known.
#[derive(Default)]
struct WorkQueue {
    nodes: VecDeque<Work>,
    identities: VecDeque<Work>,
    entries: VecDeque<Work>,
}

impl WorkQueue {
    fn push_back(&mut self, work: Work) {
        match work {
            Work::Node(..) => self.nodes.push_back(work),
            Work::Identity(..) => self.identities.push_back(work),
            Work::Entry(..) => self.entries.push_back(work),
        }
    }

    fn extend(&mut self, works: impl IntoIterator<Item = Work>) {
        works.into_iter().for_each(|w| self.push_back(w));
    }

    fn pop_front(&mut self) -> Option<Work> {
        self.nodes
            .pop_front()
            .or_else(|| self.identities.pop_front())
            .or_else(|| self.entries.pop_front())
    }
}

/// The bookkeeping of one `apply`.
#[derive(Default)]
struct Txn {
    work: WorkQueue,
    /// Status of each key before its first change in this transaction, so only the net
    /// outcome is reported (an entry judged pending and then admitted in one batch is not).
    changed_nodes: Vec<(Arc<ClusterName>, String, Status)>,
    changed_entries: Vec<(Arc<ClusterName>, IpNet, Status)>,
    changed_identities: Vec<(Arc<ClusterName>, NumericIdentity, Status)>,
    /// Prefixes to resolve again (sorted and deduplicated at the end: cheaper than a set).
    touched_prefixes: Vec<IpNet>,
    touched_node_ips: BTreeSet<IpAddr>,
    /// Identities admitted or withdrawn (the policy follows them at the end).
    touched_identities: Vec<NumericIdentity>,
    /// Services (namespace, name) whose records changed.
    touched_services: BTreeSet<ServiceName>,
    /// A cluster's admission changed or it went: every service is looked at again (rare).
    all_services_touched: bool,
    applied: Applied,
}

/// A service's namespace and name: records of the same name in several clusters are one
/// (global) service.
type ServiceName = (String, String);

/// The merged view. A single owner (the agent's view task) applies events; readers get
/// [`MeshView::desired`] snapshots.
#[derive(Debug, Clone)]
pub struct MeshView {
    local: LocalNode,
    clusters: BTreeMap<ClusterName, ClusterState>,
    /// Everything a remote prefix must not overlap.
    local_prefixes: PrefixSet,
    /// This node's IP and every stored local-cluster node's IP: no remote node may use them.
    local_node_ips: HashMap<IpAddr, u32>,
    ipcache_out: BTreeMap<IpNet, IpcacheTarget>,
    nodes_out: BTreeMap<IpAddr, ClusterId>,
    identities_out: BTreeMap<NumericIdentity, Labels>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
    /// The policy map content, maintained per identity and per policy (never touched by
    /// ipcache or node events).
    policy_index: PolicyIndex,
    /// SERVICES/BACKENDS content, maintained per service (see [`MeshView::refresh_services`]).
    services_out: DesiredServices,
    /// What each service contributes on its own (its local frontends over its backends).
    service_parts: BTreeMap<ServiceName, DesiredServices>,
    /// The services declaring each frontend: two may (a misconfiguration); the greatest
    /// (namespace, name) wins, as in [`desired_services`].
    frontend_owners: BTreeMap<Frontend, BTreeSet<ServiceName>>,
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

impl MeshView {
    pub fn new(local: LocalNode) -> Self {
        let mut view = Self {
            clusters: BTreeMap::new(),
            local_prefixes: PrefixSet::default(),
            local_node_ips: HashMap::new(),
            ipcache_out: BTreeMap::new(),
            nodes_out: BTreeMap::new(),
            identities_out: BTreeMap::new(),
            policies: BTreeMap::new(),
            policy_index: PolicyIndex::new(local.cluster_id),
            services_out: DesiredServices::default(),
            service_parts: BTreeMap::new(),
            frontend_owners: BTreeMap::new(),
            local,
        };
        view.clusters.insert(
            view.local.cluster.clone(),
            ClusterState::new(&view.local.cluster, Admission::Local),
        );
        view.local_prefixes.add(host_net(view.local.node_ip));
        for cidr in view.local.pod_cidrs.clone() {
            view.local_prefixes.add(cidr.trunc());
        }
        *view.local_node_ips.entry(view.local.node_ip).or_default() += 1;
        // This node's own IP is an ipcache entry (host) from the start.
        let p = host_net(view.local.node_ip);
        if let Some(t) = view.resolve_prefix(&p) {
            view.ipcache_out.insert(p, t);
        }
        view
    }

    pub fn local(&self) -> &LocalNode {
        &self.local
    }

    /// Applies one watcher event.
    pub fn apply(&mut self, event: ClusterEvent) -> Applied {
        self.apply_batch(std::iter::once(event))
    }

    /// Applies several events as one transaction: one set of operations (the net diff) and
    /// one report of net status changes, so an initial list reports no entry as pending whose
    /// node comes later in the same batch, and a key changed twice yields one operation.
    pub fn apply_batch(&mut self, events: impl IntoIterator<Item = ClusterEvent>) -> Applied {
        let mut txn = Txn::default();
        for event in events {
            self.mutate(event, &mut txn);
            // Evaluated right away, while the key is hot in cache (measured: about twice as
            // fast at 100k entries as evaluating everything after the last event). Transient
            // outcomes are not reported: `report` compares with the status before the batch.
            self.drain_work(&mut txn);
        }
        self.finish(txn)
    }

    fn mutate(&mut self, event: ClusterEvent, txn: &mut Txn) {
        let c = event.cluster;
        match event.kind {
            EventKind::UpsertNode(record) => self.upsert_node(&c, record, txn),
            EventKind::DeleteNode { name } => {
                if let Some(cs) = self.clusters.get_mut(&c) {
                    if let Some(old) = cs.nodes.remove(&name) {
                        self.forget_node(&c, old, txn);
                    }
                }
            }
            EventKind::UpsertIpcache(entry) => self.upsert_entry(&c, entry, txn),
            EventKind::DeleteIpcache { prefix } => self.delete_entry(&c, &prefix, txn),
            EventKind::UpsertIdentity { id, record } => {
                let mut labels = record.labels;
                // Every endpoint carries its cluster label; adding it where a publisher left it
                // out keeps selection by cluster working on every identity.
                if labels.get(CLUSTER_LABEL).is_none() {
                    labels.insert(CLUSTER_LABEL, c.as_str());
                }
                self.delete_identity(&c, id, txn);
                let cs = self.cluster_mut(&c);
                cs.identities.insert(id, Stored::new(labels));
                txn.work.push_back(Work::Identity(cs.name.clone(), id));
            }
            EventKind::DeleteIdentity { id } => self.delete_identity(&c, id, txn),
            EventKind::UpsertService(s) => {
                let key = (s.namespace.clone(), s.name.clone());
                txn.touched_services.insert(key.clone());
                self.cluster_mut(&c).services.insert(key, s);
            }
            EventKind::DeleteService { namespace, name } => {
                if let Some(cs) = self.clusters.get_mut(&c) {
                    let key = (namespace, name);
                    if cs.services.remove(&key).is_some() {
                        txn.touched_services.insert(key);
                    }
                }
            }
            EventKind::Synced(kind) => {
                self.cluster_mut(&c).synced.insert(kind);
            }
            EventKind::ClusterConfig(config) => self.cluster_config(&c, config, txn),
            EventKind::ClusterRemoved => self.remove_cluster(&c, txn),
        }
    }

    fn cluster_mut(&mut self, c: &ClusterName) -> &mut ClusterState {
        // Looked up first: `entry` would clone the name on every event of the hot path.
        if !self.clusters.contains_key(c) {
            self.clusters
                .insert(c.clone(), ClusterState::new(c, Admission::AwaitingConfig));
        }
        self.clusters.get_mut(c).expect("inserted above")
    }

    fn cluster_config(&mut self, c: &ClusterName, config: ClusterConfig, txn: &mut Txn) {
        if *c == self.local.cluster {
            if config.name != self.local.cluster || config.id != self.local.cluster_id {
                txn.applied
                    .refusals
                    .push(ClusterRefusal::LocalConfigMismatch {
                        configured: self.local.cluster.clone(),
                        configured_id: self.local.cluster_id,
                        published: config.name.clone(),
                        published_id: config.id,
                    });
            }
            self.cluster_mut(c).config = Some(config);
            return;
        }
        self.cluster_mut(c).config = Some(config);
        self.readmit(txn);
    }

    /// What a remote cluster's admission should be, given the others' current admissions.
    fn admission_for(&self, c: &ClusterName) -> Admission {
        let cs = &self.clusters[c];
        let Some(config) = &cs.config else {
            return Admission::AwaitingConfig;
        };
        if config.name != *c {
            return Admission::Refused(ClusterRefusal::NameMismatch {
                configured: c.clone(),
                published: config.name.clone(),
            });
        }
        if config.id == self.local.cluster_id {
            return Admission::Refused(ClusterRefusal::IdConflictLocal {
                cluster: c.clone(),
                id: config.id,
            });
        }
        // The incumbent keeps its id: a newcomer must not evict a working cluster.
        for (other, os) in &self.clusters {
            if other != c && os.accepted_id() == Some(config.id) {
                return Admission::Refused(ClusterRefusal::IdConflict {
                    cluster: c.clone(),
                    id: config.id,
                    with: other.clone(),
                });
            }
        }
        Admission::Accepted(config.id)
    }

    /// Re-examines every remote's admission until nothing changes (in name order, so two
    /// clusters freed at once are decided the same way every time).
    fn readmit(&mut self, txn: &mut Txn) {
        for _ in 0..=self.clusters.len() {
            let mut changed = false;
            let names: Vec<ClusterName> = self
                .clusters
                .iter()
                .filter(|(_, cs)| !cs.is_local())
                .map(|(n, _)| n.clone())
                .collect();
            for c in names {
                let new = self.admission_for(&c);
                let cs = self.clusters.get_mut(&c).expect("listed above");
                if cs.admission == new {
                    continue;
                }
                changed = true;
                txn.all_services_touched = true;
                if let Admission::Refused(r) = &new {
                    txn.applied.refusals.push(r.clone());
                }
                cs.admission = new;
                Self::push_all(cs, txn);
            }
            if !changed {
                break;
            }
        }
    }

    fn push_all(cs: &ClusterState, txn: &mut Txn) {
        let c = &cs.name;
        txn.work
            .extend(cs.nodes.keys().map(|n| Work::Node(c.clone(), n.clone())));
        txn.work
            .extend(cs.ipcache.keys().map(|p| Work::Entry(c.clone(), *p)));
        txn.work.extend(
            cs.identities
                .keys()
                .map(|id| Work::Identity(c.clone(), *id)),
        );
    }

    fn remove_cluster(&mut self, c: &ClusterName, txn: &mut Txn) {
        let Some(cs) = self.clusters.get(c) else {
            return;
        };
        let nodes: Vec<String> = cs.nodes.keys().cloned().collect();
        let prefixes: Vec<IpNet> = cs.ipcache.keys().copied().collect();
        let ids: Vec<NumericIdentity> = cs.identities.keys().copied().collect();
        for p in prefixes {
            self.delete_entry(c, &p, txn);
        }
        for n in nodes {
            let old = self
                .clusters
                .get_mut(c)
                .and_then(|cs| cs.nodes.remove(&n))
                .expect("listed above");
            self.forget_node(c, old, txn);
        }
        for id in ids {
            self.delete_identity(c, id, txn);
        }
        txn.all_services_touched = true;
        if *c == self.local.cluster {
            // The local cluster stays: this node belongs to it whatever its etcd says.
            let cs = self.cluster_mut(c);
            cs.synced.clear();
            cs.services.clear();
            cs.config = None;
        } else {
            self.clusters.remove(c);
            self.readmit(txn);
        }
    }

    // ---- nodes ----

    fn upsert_node(&mut self, c: &ClusterName, record: NodeRecord, txn: &mut Txn) {
        if let Some(old) = self.cluster_mut(c).nodes.remove(&record.name) {
            self.forget_node(c, old, txn);
        }
        let ip = record.node_ip;
        let name = record.name.clone();
        let local_cluster = *c == self.local.cluster;
        let cidrs = record.pod_cidrs.clone();
        let cs = self.cluster_mut(c);
        cs.node_ips.entry(ip).or_default().insert(name.clone());
        cs.nodes.insert(name.clone(), Stored::new(record));
        if local_cluster {
            self.local_node_added(ip, &cidrs, txn);
        }
        let arc = self.clusters[c].name.clone();
        txn.work.push_back(Work::Node(arc, name));
    }

    /// Undoes everything a stored node contributed; the record is already out of the map.
    fn forget_node(&mut self, c: &ClusterName, old: Stored<NodeRecord>, txn: &mut Txn) {
        let ip = old.value.node_ip;
        let local_cluster = *c == self.local.cluster;
        let cs = self.clusters.get_mut(c).expect("node's cluster exists");
        cs.node_counts.track(&old.status, false);
        if let Some(names) = cs.node_ips.get_mut(&ip) {
            names.remove(&old.value.name);
            if names.is_empty() {
                cs.node_ips.remove(&ip);
            }
        }
        if old.status == Status::Admitted {
            Self::unadmit_node_ip(cs, ip);
        }
        self.node_ip_changed(c, ip, txn);
        if local_cluster {
            self.local_node_removed(ip, &old.value.pod_cidrs, txn);
        }
    }

    fn unadmit_node_ip(cs: &mut ClusterState, ip: IpAddr) {
        if let Some(n) = cs.admitted_node_ips.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                cs.admitted_node_ips.remove(&ip);
            }
        }
    }

    /// Whether `ip` is a node of `c` changed: the entries tunnelling to it and the other
    /// clusters' nodes claiming it are re-examined; its map entries are resolved again.
    fn node_ip_changed(&self, c: &ClusterName, ip: IpAddr, txn: &mut Txn) {
        txn.touched_node_ips.insert(ip);
        txn.touched_prefixes.push(host_net(ip));
        if let Some(cs) = self.clusters.get(c) {
            if let Some(prefixes) = cs.by_host.get(&ip) {
                // Entries stored in this transaction are queued already.
                txn.work.extend(
                    prefixes
                        .iter()
                        .filter(|p| {
                            cs.ipcache
                                .get(p)
                                .is_some_and(|s| !matches!(s.status, Status::New))
                        })
                        .map(|p| Work::Entry(cs.name.clone(), *p)),
                );
            }
        }
        self.push_node_claimants(Some(c), ip, txn);
    }

    fn push_node_claimants(&self, except: Option<&ClusterName>, ip: IpAddr, txn: &mut Txn) {
        for (other, os) in &self.clusters {
            if Some(other) == except || os.is_local() {
                continue;
            }
            if let Some(names) = os.node_ips.get(&ip) {
                txn.work
                    .extend(names.iter().map(|n| Work::Node(os.name.clone(), n.clone())));
            }
        }
    }

    fn local_node_added(&mut self, ip: IpAddr, cidrs: &[IpNet], txn: &mut Txn) {
        *self.local_node_ips.entry(ip).or_default() += 1;
        self.push_node_claimants(None, ip, txn);
        for p in std::iter::once(host_net(ip)).chain(cidrs.iter().map(IpNet::trunc)) {
            if self.local_prefixes.add(p) {
                self.push_remote_overlapping(&p, txn);
            }
        }
    }

    fn local_node_removed(&mut self, ip: IpAddr, cidrs: &[IpNet], txn: &mut Txn) {
        if let Some(n) = self.local_node_ips.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.local_node_ips.remove(&ip);
            }
        }
        self.push_node_claimants(None, ip, txn);
        for p in std::iter::once(host_net(ip)).chain(cidrs.iter().map(IpNet::trunc)) {
            if self.local_prefixes.remove(&p) {
                self.push_remote_overlapping(&p, txn);
            }
        }
    }

    /// The local prefix set gained or lost `p`: every remote entry overlapping it may change.
    fn push_remote_overlapping(&self, p: &IpNet, txn: &mut Txn) {
        for cs in self.clusters.values() {
            if cs.is_local() {
                continue;
            }
            txn.work.extend(
                overlapping(&cs.ipcache, &cs.ipcache_lengths, p)
                    .map(|q| Work::Entry(cs.name.clone(), q)),
            );
        }
    }

    /// The id entries of `cs` are checked against; `Err` is the status of all its entries
    /// while it has none.
    fn cluster_id_of(&self, cs: &ClusterState) -> Result<ClusterId, Status> {
        match &cs.admission {
            Admission::Local => Ok(self.local.cluster_id),
            Admission::Accepted(id) => Ok(*id),
            Admission::AwaitingConfig => Err(Status::AwaitingConfig),
            Admission::Refused(_) => Err(Status::Blocked),
        }
    }

    fn node_base_status(&self, c: &ClusterName, name: &str) -> Option<Status> {
        let cs = self.clusters.get(c)?;
        let record = &cs.nodes.get(name)?.value;
        let id = match self.cluster_id_of(cs) {
            Ok(id) => id,
            Err(status) => return Some(status),
        };
        if record.cluster != *c {
            return Some(rejected(RejectReason::WrongCluster {
                named: record.cluster.to_string(),
                actual: c.clone(),
            }));
        }
        if record.cluster_id != id {
            return Some(rejected(RejectReason::NodeClusterIdMismatch {
                record: record.cluster_id,
                cluster: id,
            }));
        }
        let ip = record.node_ip;
        if cs.is_local() {
            if ip == self.local.node_ip && record.name != self.local.node_name {
                return Some(rejected(RejectReason::NodeIpConflict {
                    ip,
                    owner: format!("this node ({})", self.local.node_name),
                }));
            }
        } else if self.local_node_ips.contains_key(&ip) {
            return Some(rejected(RejectReason::NodeIpConflict {
                ip,
                owner: format!("a node of the local cluster {}", self.local.cluster),
            }));
        }
        Some(Status::Admitted)
    }

    fn node_status(&self, c: &ClusterName, name: &str) -> Option<Status> {
        let base = self.node_base_status(c, name)?;
        let cs = &self.clusters[c];
        let Some(my_id) = cs.accepted_id() else {
            return Some(base);
        };
        if base != Status::Admitted {
            return Some(base);
        }
        let ip = cs.nodes[name].value.node_ip;
        for (other, os) in &self.clusters {
            let Some(their_id) = os.accepted_id() else {
                continue;
            };
            if other == c || their_id >= my_id {
                continue;
            }
            if let Some(names) = os.node_ips.get(&ip) {
                for n in names {
                    if self.node_base_status(other, n) == Some(Status::Admitted) {
                        return Some(rejected(RejectReason::NodeIpConflict {
                            ip,
                            owner: format!("node {n} of cluster {other} (lower cluster id wins)"),
                        }));
                    }
                }
            }
        }
        Some(Status::Admitted)
    }

    fn eval_node(&mut self, c: &ClusterName, name: &str, txn: &mut Txn) {
        let Some(new) = self.node_status(c, name) else {
            return;
        };
        let cs = self.clusters.get_mut(c).expect("evaluated above");
        let stored = cs.nodes.get_mut(name).expect("evaluated above");
        if stored.status == new {
            return;
        }
        let old = std::mem::replace(&mut stored.status, new.clone());
        let ip = stored.value.node_ip;
        if !stored.marked {
            stored.marked = true;
            txn.changed_nodes
                .push((cs.name.clone(), name.to_owned(), old.clone()));
        }
        cs.node_counts.track(&old, false);
        cs.node_counts.track(&new, true);
        if old == Status::Admitted {
            Self::unadmit_node_ip(cs, ip);
        }
        if new == Status::Admitted {
            *cs.admitted_node_ips.entry(ip).or_default() += 1;
        }
        self.node_ip_changed(c, ip, txn);
    }

    // ---- ipcache ----

    fn upsert_entry(&mut self, c: &ClusterName, entry: IpcacheEntry, txn: &mut Txn) {
        let p = entry.prefix;
        let value = EntryValue {
            identity: entry.identity,
            host_ip: entry.host_ip,
        };
        let local_cluster = *c == self.local.cluster;
        let cs = self.cluster_mut(c);
        let arc = cs.name.clone();
        let host = entry.host_ip;
        let mut new_prefix = false;
        match cs.ipcache.get_mut(&p) {
            Some(stored) => {
                let old_host = stored.value.host_ip;
                // A rewritten key is judged afresh: a repeated bad update is reported again.
                cs.ipcache_counts.track(&stored.status, false);
                stored.status = Status::New;
                stored.value = value;
                if old_host != host {
                    remove_by_host(&mut cs.by_host, old_host, &p);
                    cs.by_host.entry(host).or_default().insert(p);
                }
            }
            None => {
                cs.ipcache.insert(p, Stored::new(value));
                cs.ipcache_lengths.add(&p);
                cs.by_host.entry(host).or_default().insert(p);
                new_prefix = true;
            }
        }
        txn.touched_prefixes.push(p);
        // Other claimants of the prefix are re-examined when this entry's (reset) status
        // changes, in `eval_entry`.
        if local_cluster && new_prefix && self.local_prefixes.add(p) {
            self.push_remote_overlapping(&p, txn);
        }
        txn.work.push_back(Work::Entry(arc, p));
    }

    fn delete_entry(&mut self, c: &ClusterName, p: &IpNet, txn: &mut Txn) {
        let local_cluster = *c == self.local.cluster;
        let Some(cs) = self.clusters.get_mut(c) else {
            return;
        };
        let Some(old) = cs.ipcache.remove(p) else {
            return;
        };
        cs.ipcache_counts.track(&old.status, false);
        cs.ipcache_lengths.remove(p);
        remove_by_host(&mut cs.by_host, old.value.host_ip, p);
        txn.touched_prefixes.push(*p);
        if local_cluster {
            if self.local_prefixes.remove(p) {
                self.push_remote_overlapping(p, txn);
            }
        } else {
            self.push_prefix_claimants(c, p, txn);
        }
    }

    fn push_prefix_claimants(&self, c: &ClusterName, p: &IpNet, txn: &mut Txn) {
        for (other, os) in &self.clusters {
            if other != c && !os.is_local() && os.ipcache.contains_key(p) {
                txn.work.push_back(Work::Entry(os.name.clone(), *p));
            }
        }
    }

    fn entry_base_status(&self, c: &ClusterName, p: &IpNet) -> Option<Status> {
        let cs = self.clusters.get(c)?;
        let entry = &cs.ipcache.get(p)?.value;
        let id = match self.cluster_id_of(cs) {
            Ok(id) => id,
            Err(status) => return Some(status),
        };
        let identity = entry.identity;
        if identity.is_reserved() {
            return Some(rejected(RejectReason::ReservedIdentity { identity }));
        }
        if identity.cluster_id() != Some(id) {
            return Some(rejected(RejectReason::IdentityOutOfRange {
                identity,
                cluster_id: id,
            }));
        }
        if !cs.is_local() {
            if let Some(local) = self.local_prefixes.first_overlap(p) {
                return Some(rejected(RejectReason::OverlapsLocal { prefix: *p, local }));
            }
        }
        let host = entry.host_ip;
        let known = cs.admitted_node_ips.contains_key(&host)
            || (cs.is_local() && host == self.local.node_ip);
        if !known {
            return Some(Status::AwaitingNode(host));
        }
        Some(Status::Admitted)
    }

    fn entry_status(&self, c: &ClusterName, p: &IpNet) -> Option<Status> {
        let base = self.entry_base_status(c, p)?;
        let Some(my_id) = self.clusters[c].accepted_id() else {
            return Some(base);
        };
        if base != Status::Admitted {
            return Some(base);
        }
        for (other, os) in &self.clusters {
            let Some(their_id) = os.accepted_id() else {
                continue;
            };
            if other != c
                && their_id < my_id
                && os.ipcache.contains_key(p)
                && self.entry_base_status(other, p) == Some(Status::Admitted)
            {
                return Some(rejected(RejectReason::PrefixClaimed {
                    prefix: *p,
                    by: other.clone(),
                }));
            }
        }
        Some(Status::Admitted)
    }

    fn eval_entry(&mut self, c: &ClusterName, p: &IpNet, txn: &mut Txn) {
        let Some(new) = self.entry_status(c, p) else {
            return;
        };
        let cs = self.clusters.get_mut(c).expect("evaluated above");
        let stored = cs.ipcache.get_mut(p).expect("evaluated above");
        if stored.status == new {
            return;
        }
        let old = std::mem::replace(&mut stored.status, new.clone());
        cs.ipcache_counts.track(&old, false);
        cs.ipcache_counts.track(&new, true);
        txn.touched_prefixes.push(*p);
        // A key written in this transaction (New) is reported by its final status alone, so
        // the common New -> Admitted needs no record.
        let fresh_and_admitted = old == Status::New && new == Status::Admitted;
        if !stored.marked && !fresh_and_admitted {
            stored.marked = true;
            txn.changed_entries.push((cs.name.clone(), *p, old));
        }
        if !cs.is_local() {
            self.push_prefix_claimants(c, p, txn);
        }
    }

    // ---- identities ----

    fn delete_identity(&mut self, c: &ClusterName, id: NumericIdentity, txn: &mut Txn) {
        let Some(cs) = self.clusters.get_mut(c) else {
            return;
        };
        let Some(old) = cs.identities.remove(&id) else {
            return;
        };
        cs.identity_counts.track(&old.status, false);
        if old.status == Status::Admitted {
            self.identities_out.remove(&id);
            txn.touched_identities.push(id);
            txn.applied.policy_inputs_changed = true;
        }
    }

    fn identity_status(&self, c: &ClusterName, id: NumericIdentity) -> Option<Status> {
        let cs = self.clusters.get(c)?;
        let labels = &cs.identities.get(&id)?.value;
        let cluster_id = match self.cluster_id_of(cs) {
            Ok(cid) => cid,
            Err(status) => return Some(status),
        };
        if id.cluster_id() != Some(cluster_id) {
            return Some(rejected(RejectReason::IdentityOutOfRange {
                identity: id,
                cluster_id,
            }));
        }
        match labels.get(CLUSTER_LABEL) {
            Some(named) if named != c.as_str() => Some(rejected(RejectReason::WrongCluster {
                named: named.to_owned(),
                actual: c.clone(),
            })),
            _ => Some(Status::Admitted),
        }
    }

    fn eval_identity(&mut self, c: &ClusterName, id: NumericIdentity, txn: &mut Txn) {
        let Some(new) = self.identity_status(c, id) else {
            return;
        };
        let cs = self.clusters.get_mut(c).expect("evaluated above");
        let stored = cs.identities.get_mut(&id).expect("evaluated above");
        if stored.status == new {
            return;
        }
        let old = std::mem::replace(&mut stored.status, new.clone());
        cs.identity_counts.track(&old, false);
        cs.identity_counts.track(&new, true);
        if old == Status::Admitted {
            self.identities_out.remove(&id);
            txn.touched_identities.push(id);
            txn.applied.policy_inputs_changed = true;
        }
        if new == Status::Admitted {
            self.identities_out.insert(id, stored.value.clone());
            txn.touched_identities.push(id);
            txn.applied.policy_inputs_changed = true;
        }
        if !stored.marked {
            stored.marked = true;
            txn.changed_identities.push((cs.name.clone(), id, old));
        }
    }

    // ---- resolution ----

    fn drain_work(&mut self, txn: &mut Txn) {
        while let Some(work) = txn.work.pop_front() {
            match work {
                Work::Node(c, name) => self.eval_node(&c, &name, txn),
                Work::Entry(c, p) => self.eval_entry(&c, &p, txn),
                Work::Identity(c, id) => self.eval_identity(&c, id, txn),
            }
        }
    }

    fn finish(&mut self, mut txn: Txn) -> Applied {
        self.drain_work(&mut txn);
        self.report(&mut txn);
        let mut ops = Vec::new();
        for ip in std::mem::take(&mut txn.touched_node_ips) {
            let new = self.resolve_node(ip);
            if self.nodes_out.get(&ip) != new.as_ref() {
                match new {
                    Some(cluster_id) => {
                        self.nodes_out.insert(ip, cluster_id);
                        ops.push(DatapathOp::UpsertNode { ip, cluster_id });
                    }
                    None => {
                        self.nodes_out.remove(&ip);
                        ops.push(DatapathOp::DeleteNode { ip });
                    }
                }
            }
        }
        let mut touched = std::mem::take(&mut txn.touched_prefixes);
        touched.sort_unstable();
        touched.dedup();
        for prefix in touched {
            let new = self.resolve_prefix(&prefix);
            match (self.ipcache_out.entry(prefix), new) {
                (btree_map::Entry::Occupied(o), None) => {
                    o.remove();
                    ops.push(DatapathOp::DeleteIpcache { prefix });
                }
                (btree_map::Entry::Occupied(mut o), Some(target)) => {
                    if *o.get() != target {
                        o.insert(target);
                        ops.push(DatapathOp::UpsertIpcache { prefix, target });
                    }
                }
                (btree_map::Entry::Vacant(v), Some(target)) => {
                    v.insert(target);
                    ops.push(DatapathOp::UpsertIpcache { prefix, target });
                }
                (btree_map::Entry::Vacant(_), None) => {}
            }
        }
        let mut identities = std::mem::take(&mut txn.touched_identities);
        identities.sort_unstable();
        identities.dedup();
        for id in identities {
            self.policy_index
                .set_identity(id, self.identities_out.get(&id));
        }
        self.policy_index.flush(&mut ops);
        let service_ops = self.refresh_services(&mut txn);
        order_ops(&mut ops);
        let mut applied = std::mem::take(&mut txn.applied);
        applied.merge(Applied {
            ops,
            service_ops,
            ..Applied::default()
        });
        applied
    }

    /// What one service contributes, from its records in every admitted cluster (a lookup per
    /// cluster).
    fn service_part(&self, key: &ServiceName) -> DesiredServices {
        let records = self.clusters.iter().filter_map(|(c, cs)| {
            let cluster_id = self.cluster_id_of(cs).ok()?;
            let record = cs.services.get(key)?;
            Some(ClusterService {
                cluster: c,
                cluster_id,
                record,
            })
        });
        desired_services(&self.local.cluster, records)
    }

    /// Brings `services_out` up to date for the services touched in `txn` and returns the
    /// operations, in phase order. A backend change costs its own service's frontends only.
    fn refresh_services(&mut self, txn: &mut Txn) -> Vec<ServiceOp> {
        let keys: BTreeSet<ServiceName> = if std::mem::take(&mut txn.all_services_touched) {
            self.clusters
                .values()
                .flat_map(|cs| cs.services.keys().cloned())
                .chain(self.service_parts.keys().cloned())
                .collect()
        } else {
            std::mem::take(&mut txn.touched_services)
        };
        txn.touched_services.clear();
        let mut affected = BTreeSet::new();
        for key in keys {
            let part = self.service_part(&key);
            if let Some(old) = self.service_parts.remove(&key) {
                for f in old.services.keys() {
                    affected.insert(*f);
                    if let Some(owners) = self.frontend_owners.get_mut(f) {
                        owners.remove(&key);
                        if owners.is_empty() {
                            self.frontend_owners.remove(f);
                        }
                    }
                }
            }
            for f in part.services.keys() {
                affected.insert(*f);
                self.frontend_owners
                    .entry(*f)
                    .or_default()
                    .insert(key.clone());
            }
            if !part.services.is_empty() {
                self.service_parts.insert(key, part);
            }
        }
        let mut ops = Vec::new();
        for frontend in affected {
            let want = self
                .frontend_owners
                .get(&frontend)
                .and_then(|owners| owners.last())
                .and_then(|owner| self.service_parts.get(owner))
                .map(|part| part.backends_of(&frontend));
            let old_count = self.services_out.services.get(&frontend).copied();
            let new_count = want.as_ref().map(|b| b.len() as u32);
            for (slot, backend) in want.iter().flatten().enumerate() {
                let slot = crate::services::BackendSlot {
                    frontend,
                    slot: slot as u32,
                };
                if self.services_out.backends.get(&slot) != Some(backend) {
                    ops.push(ServiceOp::UpsertBackend {
                        slot,
                        backend: *backend,
                    });
                }
            }
            match (old_count, new_count) {
                (old, Some(count)) if old != Some(count) => {
                    ops.push(ServiceOp::UpsertService { frontend, count })
                }
                (Some(_), None) => ops.push(ServiceOp::DeleteService { frontend }),
                _ => {}
            }
            for slot in new_count.unwrap_or(0)..old_count.unwrap_or(0) {
                ops.push(ServiceOp::DeleteBackend {
                    slot: crate::services::BackendSlot { frontend, slot },
                });
            }
        }
        ops.sort_by_key(ServiceOp::phase);
        self.services_out.apply_ops(&ops);
        ops
    }

    /// Reports and counts the keys whose status changed, net over the transaction, and
    /// clears their marks.
    fn report(&mut self, txn: &mut Txn) {
        let mut rejected = Vec::new();
        for (c, name, before) in std::mem::take(&mut txn.changed_nodes) {
            let Some(now) = self
                .clusters
                .get_mut(&*c)
                .and_then(|cs| cs.nodes.get_mut(&name))
                .and_then(|s| std::mem::take(&mut s.marked).then_some(s))
            else {
                continue;
            };
            if let Status::Rejected(reason) = &now.status {
                if now.status != before {
                    rejected.push(Rejection {
                        cluster: (*c).clone(),
                        key: RejectedKey::Node(NodeKey {
                            cluster: (*c).clone(),
                            node: name,
                        }),
                        reason: (**reason).clone(),
                    });
                }
            }
        }
        for (c, prefix, before) in std::mem::take(&mut txn.changed_entries) {
            let Some(now) = self
                .clusters
                .get_mut(&*c)
                .and_then(|cs| cs.ipcache.get_mut(&prefix))
                .and_then(|s| std::mem::take(&mut s.marked).then_some(s))
            else {
                continue;
            };
            if now.status == before {
                continue;
            }
            let key = IpcacheKey {
                cluster: (*c).clone(),
                prefix,
            };
            match &now.status {
                Status::Rejected(reason) => rejected.push(Rejection {
                    cluster: (*c).clone(),
                    key: RejectedKey::Ipcache(key),
                    reason: (**reason).clone(),
                }),
                Status::AwaitingNode(host_ip) => txn.applied.pending.push(PendingEntry {
                    cluster: (*c).clone(),
                    key,
                    host_ip: *host_ip,
                }),
                _ => {}
            }
        }
        for (c, id, before) in std::mem::take(&mut txn.changed_identities) {
            let Some(now) = self
                .clusters
                .get_mut(&*c)
                .and_then(|cs| cs.identities.get_mut(&id))
                .and_then(|s| std::mem::take(&mut s.marked).then_some(s))
            else {
                continue;
            };
            if let Status::Rejected(reason) = &now.status {
                if now.status != before {
                    rejected.push(Rejection {
                        cluster: (*c).clone(),
                        key: RejectedKey::Identity(IdentityKey {
                            cluster: (*c).clone(),
                            id,
                        }),
                        reason: (**reason).clone(),
                    });
                }
            }
        }
        for r in &rejected {
            if let Some(cs) = self.clusters.get_mut(&r.cluster) {
                cs.rejected_total += 1;
            }
        }
        txn.applied.rejected.extend(rejected);
    }

    fn endpoint_target(&self, entry: &EntryValue) -> IpcacheTarget {
        let here = entry.host_ip == self.local.node_ip;
        IpcacheTarget {
            identity: entry.identity,
            tunnel_endpoint: (!here).then_some(entry.host_ip),
            local: here,
        }
    }

    /// What the ipcache should say for `p`, from the view alone. Endpoint entries first (the
    /// local cluster's, then the one admitted remote claimant), then node IPs.
    fn resolve_prefix(&self, p: &IpNet) -> Option<IpcacheTarget> {
        let admitted = |cs: &ClusterState| {
            cs.ipcache
                .get(p)
                .filter(|s| s.status == Status::Admitted)
                .map(|s| self.endpoint_target(&s.value))
        };
        if let Some(t) = self.clusters.get(&self.local.cluster).and_then(admitted) {
            return Some(t);
        }
        if let Some(t) = self
            .clusters
            .values()
            .filter(|cs| !cs.is_local())
            .find_map(admitted)
        {
            return Some(t);
        }
        if p.prefix_len() != p.max_prefix_len() {
            return None;
        }
        let ip = p.addr();
        if ip == self.local.node_ip {
            return Some(IpcacheTarget {
                identity: NumericIdentity::HOST,
                tunnel_endpoint: None,
                local: true,
            });
        }
        self.clusters
            .values()
            .any(|cs| cs.admitted_node_ips.contains_key(&ip))
            .then_some(IpcacheTarget {
                identity: NumericIdentity::REMOTE_NODE,
                tunnel_endpoint: None,
                local: false,
            })
    }

    fn resolve_node(&self, ip: IpAddr) -> Option<ClusterId> {
        if ip == self.local.node_ip {
            return None;
        }
        self.clusters
            .values()
            .find(|cs| cs.admitted_node_ips.contains_key(&ip))
            .and_then(|cs| self.cluster_id_of(cs).ok())
    }

    // ---- policy ----

    /// Stores or removes a local policy. An invalid update is refused and the previous version
    /// of that policy (if any) stays in force: a typo must not silently open a workload.
    /// Returns whether the stored policies changed.
    pub fn apply_policy(&mut self, event: PolicyEvent) -> Result<bool, PolicyErrors> {
        self.update_policy(event).map(|a| a.policies_changed)
    }

    /// [`MeshView::apply_policy`], with the policy map operations it implies.
    pub fn update_policy(&mut self, event: PolicyEvent) -> Result<Applied, PolicyErrors> {
        let (key, changed) = self.store_policy(event)?;
        let mut applied = Applied {
            policies_changed: changed,
            ..Applied::default()
        };
        if changed {
            self.policy_index.set_policy(
                key.clone(),
                self.policies.get(&key),
                &self.identities_out,
            );
            self.policy_index.flush(&mut applied.ops);
            order_ops(&mut applied.ops);
        }
        Ok(applied)
    }

    fn store_policy(
        &mut self,
        event: PolicyEvent,
    ) -> Result<((String, String), bool), PolicyErrors> {
        match event {
            PolicyEvent::Upsert(policy) => {
                policy.validate()?;
                let key = (
                    policy.metadata.namespace.clone(),
                    policy.metadata.name.clone(),
                );
                let changed = self.policies.get(&key) != Some(&policy);
                self.policies.insert(key.clone(), policy);
                Ok((key, changed))
            }
            PolicyEvent::Delete { namespace, name } => {
                let key = (namespace, name);
                let changed = self.policies.remove(&key).is_some();
                Ok((key, changed))
            }
        }
    }

    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.policies.values()
    }

    /// The policy entries and markers for the local cluster's identities, compiled against
    /// every admitted identity of every cluster.
    pub fn compile_policy(&self) -> CompiledPolicy {
        compile(
            self.policies.values(),
            &self.identities_out,
            self.local.cluster_id,
        )
    }

    // ---- outputs ----

    /// The whole desired datapath state, as maintained: a copy, for the reconciler's full
    /// diff (start-up, after a failed write, the safety-net timer), not for every event.
    pub fn desired(&self) -> DesiredDatapath {
        DesiredDatapath {
            ipcache: self.ipcache_out.clone(),
            nodes: self.nodes_out.clone(),
            policy: self.policy_index.compiled().entries.clone(),
            policy_enabled: self.policy_index.compiled().enabled.clone(),
            services: self.services_out.clone(),
        }
    }

    /// Sizes of the maintained desired maps (for status, without copying them).
    pub fn desired_counts(&self) -> DesiredCounts {
        DesiredCounts {
            ipcache: self.ipcache_out.len(),
            nodes: self.nodes_out.len(),
            policy: self.policy_index.compiled().entries.len(),
            services: self.services_out.services.len(),
        }
    }

    pub fn desired_ipcache(&self) -> &BTreeMap<IpNet, IpcacheTarget> {
        &self.ipcache_out
    }

    pub fn desired_nodes(&self) -> &BTreeMap<IpAddr, ClusterId> {
        &self.nodes_out
    }

    /// Admitted identities of every cluster, with their cluster label.
    pub fn identities(&self) -> &BTreeMap<NumericIdentity, Labels> {
        &self.identities_out
    }

    /// Services of the local cluster and of accepted remotes.
    pub fn services(&self) -> impl Iterator<Item = (&ClusterName, &ServiceRecord)> {
        self.clusters
            .iter()
            .filter(|(_, cs)| matches!(cs.admission, Admission::Local | Admission::Accepted(_)))
            .flat_map(|(c, cs)| cs.services.values().map(move |s| (c, s)))
    }

    /// The SERVICES/BACKENDS content for this node: the local cluster's frontends over the
    /// backends the rules of [`crate::services`] pick from every admitted cluster's records.
    pub fn desired_services(&self) -> DesiredServices {
        let records = self.clusters.iter().filter_map(|(c, cs)| {
            let id = self.cluster_id_of(cs).ok()?;
            Some(cs.services.values().map(move |record| ClusterService {
                cluster: c,
                cluster_id: id,
                record,
            }))
        });
        desired_services(&self.local.cluster, records.flatten())
    }

    /// Status of every cluster, the local one included, by name.
    pub fn status(&self) -> Vec<ClusterStatus> {
        self.clusters
            .keys()
            .filter_map(|c| self.cluster_status(c))
            .collect()
    }

    pub fn cluster_status(&self, c: &ClusterName) -> Option<ClusterStatus> {
        let cs = self.clusters.get(c)?;
        let synced_all = [
            ResourceKind::Nodes,
            ResourceKind::Ipcache,
            ResourceKind::Identities,
        ]
        .iter()
        .all(|k| cs.synced.contains(k));
        let with_stored = |mut counts: KindCounts, stored: usize| {
            counts.stored = stored;
            counts
        };
        Some(ClusterStatus {
            name: c.clone(),
            local: cs.is_local(),
            config: cs.config.clone(),
            cluster_id: self.cluster_id_of(cs).ok(),
            refused: match &cs.admission {
                Admission::Refused(r) => Some(r.clone()),
                _ => None,
            },
            ready: self.cluster_id_of(cs).is_ok() && synced_all,
            synced: cs.synced.clone(),
            nodes: with_stored(cs.node_counts, cs.nodes.len()),
            ipcache: with_stored(cs.ipcache_counts, cs.ipcache.len()),
            identities: with_stored(cs.identity_counts, cs.identities.len()),
            services: cs.services.len(),
            rejected_total: cs.rejected_total,
        })
    }

    /// The current rejections of a cluster (a scan: for status output, not the hot path).
    pub fn rejections(&self, c: &ClusterName) -> Vec<Rejection> {
        let Some(cs) = self.clusters.get(c) else {
            return Vec::new();
        };
        let rejection = |key: RejectedKey, status: &Status| match status {
            Status::Rejected(reason) => Some(Rejection {
                cluster: c.clone(),
                key,
                reason: (**reason).clone(),
            }),
            _ => None,
        };
        let nodes = cs.nodes.iter().filter_map(|(n, s)| {
            rejection(
                RejectedKey::Node(NodeKey {
                    cluster: c.clone(),
                    node: n.clone(),
                }),
                &s.status,
            )
        });
        let entries = cs.ipcache.iter().filter_map(|(p, s)| {
            rejection(
                RejectedKey::Ipcache(IpcacheKey {
                    cluster: c.clone(),
                    prefix: *p,
                }),
                &s.status,
            )
        });
        let ids = cs.identities.iter().filter_map(|(id, s)| {
            rejection(
                RejectedKey::Identity(IdentityKey {
                    cluster: c.clone(),
                    id: *id,
                }),
                &s.status,
            )
        });
        nodes.chain(entries).chain(ids).collect()
    }

    /// The ipcache entries of a cluster waiting for their node.
    pub fn pending(&self, c: &ClusterName) -> Vec<PendingEntry> {
        let Some(cs) = self.clusters.get(c) else {
            return Vec::new();
        };
        cs.ipcache
            .iter()
            .filter_map(|(p, s)| match s.status {
                Status::AwaitingNode(host_ip) => Some(PendingEntry {
                    cluster: c.clone(),
                    key: IpcacheKey {
                        cluster: c.clone(),
                        prefix: *p,
                    },
                    host_ip,
                }),
                _ => None,
            })
            .collect()
    }

    /// Recomputes the desired ipcache and node maps from scratch, ignoring the incremental
    /// bookkeeping: tests compare it with the maintained maps.
    pub fn recompute_from_scratch(
        &self,
    ) -> (BTreeMap<IpNet, IpcacheTarget>, BTreeMap<IpAddr, ClusterId>) {
        let fresh = self.replayed();
        (fresh.ipcache_out, fresh.nodes_out)
    }

    /// The whole desired state recomputed from what the view stores: every stored record
    /// replayed into a new view as one batch, the policy compiled and the services computed by
    /// the plain functions. The oracle the maintained state (and the operations emitted on the
    /// way) is checked against.
    pub fn desired_from_scratch(&self) -> DesiredDatapath {
        let fresh = self.replayed();
        let compiled = compile(
            self.policies.values(),
            &fresh.identities_out,
            self.local.cluster_id,
        );
        DesiredDatapath {
            services: fresh.desired_services(),
            ipcache: fresh.ipcache_out,
            nodes: fresh.nodes_out,
            policy: compiled.entries,
            policy_enabled: compiled.enabled,
        }
    }

    fn replayed(&self) -> MeshView {
        let mut fresh = MeshView::new(self.local.clone());
        let mut events = Vec::new();
        // Accepted clusters first: they are the incumbents of their ids, the one decision
        // that depends on history rather than on content.
        let mut configs: Vec<(bool, &ClusterName, &ClusterConfig)> = self
            .clusters
            .iter()
            .filter_map(|(c, cs)| Some((cs.accepted_id().is_none(), c, cs.config.as_ref()?)))
            .collect();
        configs.sort_by_key(|(later, _, _)| *later);
        for (_, c, config) in configs {
            events.push(ClusterEvent::new(
                c.clone(),
                EventKind::ClusterConfig(config.clone()),
            ));
        }
        for (c, cs) in &self.clusters {
            for n in cs.nodes.values() {
                events.push(ClusterEvent::new(
                    c.clone(),
                    EventKind::UpsertNode(n.value.clone()),
                ));
            }
            for (p, e) in &cs.ipcache {
                events.push(ClusterEvent::new(
                    c.clone(),
                    EventKind::UpsertIpcache(IpcacheEntry {
                        prefix: *p,
                        identity: e.value.identity,
                        host_ip: e.value.host_ip,
                        endpoint: None,
                        namespace: None,
                    }),
                ));
            }
            for (id, labels) in &cs.identities {
                events.push(ClusterEvent::new(
                    c.clone(),
                    EventKind::UpsertIdentity {
                        id: *id,
                        record: IdentityRecord {
                            labels: labels.value.clone(),
                        },
                    },
                ));
            }
            for s in cs.services.values() {
                events.push(ClusterEvent::new(
                    c.clone(),
                    EventKind::UpsertService(s.clone()),
                ));
            }
        }
        fresh.apply_batch(events);
        fresh
    }
}

fn remove_by_host(by_host: &mut HashMap<IpAddr, BTreeSet<IpNet>>, host: IpAddr, p: &IpNet) {
    if let Some(set) = by_host.get_mut(&host) {
        set.remove(p);
        if set.is_empty() {
            by_host.remove(&host);
        }
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
