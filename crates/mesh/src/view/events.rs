//! What goes into the view (one watcher event, one policy change, who this node is) and what
//! comes out of one call ([`Applied`]).

use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{
    ClusterConfig, ClusterId, ClusterName, IdentityRecord, IpcacheEntry, NodeRecord,
    NumericIdentity, RoutingMode, ServiceRecord,
};

use crate::desired::{order_ops, DatapathOp};
use crate::policy::NetworkPolicy;
use crate::reject::{ClusterRefusal, PendingEntry, Rejection};
use crate::services::ServiceOp;

/// Who this node is. The local cluster's events come through [`MeshView::apply`](super::MeshView::apply) like any
/// other cluster's; this is what the node knows before reading any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    /// This node's routing mode: a remote cluster announcing the other one is refused.
    pub routing_mode: RoutingMode,
    /// Destinations never masqueraded besides every admitted node's pod CIDRs (the agent's
    /// `non_masquerade_cidrs`).
    pub non_masquerade: Vec<IpNet>,
}

/// One change seen by a cluster's watcher.
#[derive(Debug, Clone)]
pub struct ClusterEvent {
    pub cluster: ClusterName,
    pub kind: EventKind,
    /// When the event was made: the watcher makes it as the change arrives from etcd (decoded),
    /// so the time from here to the map write is the agent's share of propagation. Records
    /// carry no write time, and etcd gives revisions, not times, so nothing earlier is known.
    received: std::time::Instant,
}

impl ClusterEvent {
    pub fn new(cluster: ClusterName, kind: EventKind) -> Self {
        Self {
            cluster,
            kind,
            received: std::time::Instant::now(),
        }
    }

    /// When [`ClusterEvent::new`] made it.
    pub fn received(&self) -> std::time::Instant {
        self.received
    }
}

/// The same change, whenever it was received.
impl PartialEq for ClusterEvent {
    fn eq(&self, other: &Self) -> bool {
        self.cluster == other.cluster && self.kind == other.kind
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
    /// A cluster's service record: see [`MeshView::desired_services`](super::MeshView::desired_services).
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

/// What one call of [`MeshView::apply`](super::MeshView::apply) (or [`MeshView::update_policy`](super::MeshView::update_policy)) did.
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
    /// [`MeshView::update_policy`](super::MeshView::update_policy): the stored policies changed.
    pub policies_changed: bool,
}

impl Applied {
    pub(super) fn merge(&mut self, other: Applied) {
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
