//! What the view stores per cluster, each key with its admission status, and the admission of
//! the clusters themselves (config, name and id checks, cluster-id incumbency, removal).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use meshd_state::{
    ClusterConfig, ClusterId, ClusterName, Labels, NodeRecord, NumericIdentity, ServiceRecord,
};

use super::status::KindCounts;
use super::txn::{Txn, Work};
use super::{MeshView, ResourceKind};
use crate::prefix::Lengths;
use crate::reject::{ClusterRefusal, RejectReason};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Status {
    /// Just stored, not evaluated yet.
    New,
    Admitted,
    /// Waiting for the cluster's config.
    AwaitingConfig,
    /// Waiting for the node the entry tunnels to (its `host_ip`: not repeated here, so the
    /// status of 100k stored entries stays small).
    AwaitingNode,
    /// Boxed: rejections are rare, and a small status keeps 100k stored entries small.
    Rejected(Box<RejectReason>),
    /// The cluster is refused.
    Blocked,
}

pub(super) fn rejected(reason: RejectReason) -> Status {
    Status::Rejected(Box::new(reason))
}

/// A status without its rejection reason, in one byte: how a stored ipcache entry keeps it
/// (500k of them), the reason of the few rejected ones kept beside
/// ([`ClusterState::entry_reasons`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StatusCode {
    New,
    Admitted,
    AwaitingConfig,
    AwaitingNode,
    Rejected,
    Blocked,
}

impl Status {
    pub(super) fn code(&self) -> StatusCode {
        match self {
            Status::New => StatusCode::New,
            Status::Admitted => StatusCode::Admitted,
            Status::AwaitingConfig => StatusCode::AwaitingConfig,
            Status::AwaitingNode => StatusCode::AwaitingNode,
            Status::Rejected(_) => StatusCode::Rejected,
            Status::Blocked => StatusCode::Blocked,
        }
    }
}

/// What the view keeps of an ipcache entry: what decisions and the datapath need. The
/// endpoint and namespace names are not kept (about half the memory at 100k entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EntryValue {
    pub(super) identity: NumericIdentity,
    pub(super) host_ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Admission {
    Local,
    AwaitingConfig,
    Accepted(ClusterId),
    Refused(ClusterRefusal),
}

/// A stored ipcache entry: 24 bytes (a [`Stored`] with its full status took 40).
#[derive(Debug, Clone)]
pub(super) struct StoredEntry {
    pub(super) value: EntryValue,
    pub(super) status: StatusCode,
    /// As [`Stored::marked`].
    pub(super) marked: bool,
}

impl StoredEntry {
    pub(super) fn new(value: EntryValue) -> Self {
        Self {
            value,
            status: StatusCode::New,
            marked: false,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Stored<T> {
    pub(super) value: T,
    pub(super) status: Status,
    /// Its status before the transaction is recorded in the transaction's change list.
    pub(super) marked: bool,
}

impl<T> Stored<T> {
    pub(super) fn new(value: T) -> Self {
        Self {
            value,
            status: Status::New,
            marked: false,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct ClusterState {
    /// Shared by the work items of the cluster, so queueing a key allocates nothing.
    pub(super) name: Arc<ClusterName>,
    pub(super) admission: Admission,
    pub(super) config: Option<ClusterConfig>,
    pub(super) synced: BTreeSet<ResourceKind>,
    pub(super) nodes: BTreeMap<String, Stored<NodeRecord>>,
    /// Stored nodes by IP.
    pub(super) node_ips: HashMap<IpAddr, BTreeSet<String>>,
    /// Admitted nodes by IP (a count: two records may share an IP during a rename).
    pub(super) admitted_node_ips: HashMap<IpAddr, u32>,
    pub(super) ipcache: BTreeMap<IpNet, StoredEntry>,
    /// The reasons of the rejected ipcache entries (their status says `Rejected`).
    pub(super) entry_reasons: BTreeMap<IpNet, Box<RejectReason>>,
    pub(super) ipcache_lengths: Lengths,
    /// Ipcache prefixes by the node IP they tunnel to.
    pub(super) by_host: HashMap<IpAddr, BTreeSet<IpNet>>,
    pub(super) identities: BTreeMap<NumericIdentity, Stored<Labels>>,
    pub(super) services: BTreeMap<(String, String), ServiceRecord>,
    pub(super) node_counts: KindCounts,
    pub(super) ipcache_counts: KindCounts,
    pub(super) identity_counts: KindCounts,
    pub(super) rejected_total: u64,
}

impl ClusterState {
    pub(super) fn new(name: &ClusterName, admission: Admission) -> Self {
        Self {
            name: Arc::new(name.clone()),
            admission,
            config: None,
            synced: BTreeSet::new(),
            nodes: BTreeMap::new(),
            node_ips: HashMap::new(),
            admitted_node_ips: HashMap::new(),
            ipcache: BTreeMap::new(),
            entry_reasons: BTreeMap::new(),
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

    pub(super) fn is_local(&self) -> bool {
        self.admission == Admission::Local
    }

    /// The full status of a stored ipcache entry.
    pub(super) fn entry_status(&self, p: &IpNet, code: StatusCode) -> Status {
        match code {
            StatusCode::New => Status::New,
            StatusCode::Admitted => Status::Admitted,
            StatusCode::AwaitingConfig => Status::AwaitingConfig,
            StatusCode::AwaitingNode => Status::AwaitingNode,
            StatusCode::Rejected => Status::Rejected(
                self.entry_reasons
                    .get(p)
                    .cloned()
                    .expect("a rejected entry's reason is kept"),
            ),
            StatusCode::Blocked => Status::Blocked,
        }
    }

    /// Sets a stored ipcache entry's status; its old one if it changed.
    pub(super) fn replace_entry_status(&mut self, p: &IpNet, new: Status) -> Option<Status> {
        let code = self.ipcache.get(p)?.status;
        let unchanged = code == new.code()
            && match &new {
                Status::Rejected(reason) => self.entry_reasons.get(p) == Some(reason),
                _ => true,
            };
        if unchanged {
            return None;
        }
        let old = self.entry_status(p, code);
        self.ipcache.get_mut(p)?.status = new.code();
        match new {
            Status::Rejected(reason) => {
                self.entry_reasons.insert(*p, reason);
            }
            _ => {
                self.entry_reasons.remove(p);
            }
        }
        Some(old)
    }

    pub(super) fn accepted_id(&self) -> Option<ClusterId> {
        match self.admission {
            Admission::Accepted(id) => Some(id),
            _ => None,
        }
    }
}

impl MeshView {
    pub(super) fn cluster_mut(&mut self, c: &ClusterName) -> &mut ClusterState {
        // Looked up first: `entry` would clone the name on every event of the hot path.
        if !self.clusters.contains_key(c) {
            self.clusters
                .insert(c.clone(), ClusterState::new(c, Admission::AwaitingConfig));
        }
        self.clusters.get_mut(c).expect("inserted above")
    }

    pub(super) fn cluster_config(&mut self, c: &ClusterName, config: ClusterConfig, txn: &mut Txn) {
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
        if config.routing_mode != self.local.routing_mode {
            return Admission::Refused(ClusterRefusal::RoutingModeMismatch {
                cluster: c.clone(),
                announced: config.routing_mode,
                local: self.local.routing_mode,
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

    pub(super) fn remove_cluster(&mut self, c: &ClusterName, txn: &mut Txn) {
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

    /// The id entries of `cs` are checked against; `Err` is the status of all its entries
    /// while it has none.
    pub(super) fn cluster_id_of(&self, cs: &ClusterState) -> Result<ClusterId, Status> {
        match &cs.admission {
            Admission::Local => Ok(self.local.cluster_id),
            Admission::Accepted(id) => Ok(*id),
            Admission::AwaitingConfig => Err(Status::AwaitingConfig),
            Admission::Refused(_) => Err(Status::Blocked),
        }
    }
}
