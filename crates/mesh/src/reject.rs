//! Why the merged view refused something. Every rejection names the cluster and the etcd key,
//! so the log line an agent writes from it is enough to find the culprit.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{
    ClusterId, ClusterName, IdentityKey, IpcacheKey, NodeKey, NumericIdentity, RoutingMode,
};

/// The stored key a rejection or pending state is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectedKey {
    Node(NodeKey),
    Ipcache(IpcacheKey),
    Identity(IdentityKey),
}

impl fmt::Display for RejectedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectedKey::Node(k) => k.fmt(f),
            RejectedKey::Ipcache(k) => k.fmt(f),
            RejectedKey::Identity(k) => k.fmt(f),
        }
    }
}

/// Why one entry of a cluster was kept out of the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RejectReason {
    #[error("identity {identity} is outside the range of cluster id {cluster_id} (its cluster bits are {})", identity.get() >> 16)]
    IdentityOutOfRange {
        identity: NumericIdentity,
        cluster_id: ClusterId,
    },
    #[error("reserved identity {identity} may not be published for an endpoint")]
    ReservedIdentity { identity: NumericIdentity },
    #[error("prefix {prefix} overlaps the local prefix {local}")]
    OverlapsLocal { prefix: IpNet, local: IpNet },
    #[error("prefix {prefix} is already claimed by cluster {by} (lower cluster id wins)")]
    PrefixClaimed { prefix: IpNet, by: ClusterName },
    #[error("record names cluster {named:?}, but it came from cluster {actual:?}")]
    WrongCluster { named: String, actual: ClusterName },
    #[error("node record carries cluster id {record}, but the cluster's id is {cluster}")]
    NodeClusterIdMismatch {
        record: ClusterId,
        cluster: ClusterId,
    },
    #[error("node IP {ip} is already the IP of {owner}")]
    NodeIpConflict { ip: IpAddr, owner: String },
}

/// One rejected entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("cluster {cluster}: key {key}: {reason}")]
pub struct Rejection {
    pub cluster: ClusterName,
    pub key: RejectedKey,
    pub reason: RejectReason,
}

/// An ipcache entry waiting for the node it tunnels to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[error("cluster {cluster}: key {key}: tunnel endpoint {host_ip} is not a known node of the cluster (yet); held back until it is")]
pub struct PendingEntry {
    pub cluster: ClusterName,
    pub key: IpcacheKey,
    pub host_ip: IpAddr,
}

/// Why a whole remote cluster was refused: nothing of it enters the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ClusterRefusal {
    #[error("cluster {configured}: its cluster config names it {published:?}")]
    NameMismatch {
        configured: ClusterName,
        published: ClusterName,
    },
    #[error("cluster {cluster}: cluster id {id} is the local cluster's id")]
    IdConflictLocal { cluster: ClusterName, id: ClusterId },
    #[error("cluster {cluster}: cluster id {id} is already used by connected cluster {with}")]
    IdConflict {
        cluster: ClusterName,
        id: ClusterId,
        with: ClusterName,
    },
    /// Every cluster of a mesh routes the same way: a tunnelled packet reaching a native node
    /// (or the reverse) would arrive without the identity the receiver expects.
    #[error("cluster {cluster}: it announces routing mode {announced}, and this cluster runs {local}; every cluster of a mesh must use the same routing mode")]
    RoutingModeMismatch {
        cluster: ClusterName,
        announced: RoutingMode,
        local: RoutingMode,
    },
    /// The local cluster's own etcd publishes a config that disagrees with this node's
    /// configuration. Reported, never acted on: the configured values stay in force.
    #[error("local cluster {configured} ({configured_id}): its etcd publishes name {published:?} id {published_id}; keeping the configured values")]
    LocalConfigMismatch {
        configured: ClusterName,
        configured_id: ClusterId,
        published: ClusterName,
        published_id: ClusterId,
    },
}
