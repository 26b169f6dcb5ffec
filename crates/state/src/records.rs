//! The JSON records stored under the keys of [`crate::keys`].
//!
//! Unknown fields are ignored when decoding so a newer writer can add optional fields without
//! breaking older readers; an incompatible change takes a new version segment (`v2`) in the key.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::identity::NumericIdentity;
use crate::labels::Labels;
use crate::names::{check_dns_label, check_dns_subdomain, ClusterId, ClusterName};

/// `meshd/cluster-config/<cluster>`: who a cluster is and what its control plane supports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub name: ClusterName,
    pub id: ClusterId,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How this cluster's nodes carry endpoint traffic; every cluster of a mesh must agree.
    /// Absent in configs written before it existed: those clusters tunnel.
    #[serde(default)]
    pub routing_mode: RoutingMode,
}

/// How endpoint traffic crosses the underlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// VXLAN between nodes; the sender's identity travels in the VNI.
    #[default]
    Tunnel,
    /// No encapsulation: pod CIDRs are routed to their nodes, and the receiver takes the
    /// sender's identity from the ipcache by source address (the underlay must be trusted).
    Native,
}

impl RoutingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Tunnel => "tunnel",
            RoutingMode::Native => "native",
        }
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RoutingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tunnel" => Ok(RoutingMode::Tunnel),
            "native" => Ok(RoutingMode::Native),
            _ => Err(format!("{s:?} is not a routing mode (tunnel or native)")),
        }
    }
}

/// Features a cluster's publishers support, so readers know what to wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Publishers write `meshd/synced/...` canaries; readers wait for them before using state.
    #[serde(default)]
    pub sync_canaries: bool,
    /// Largest cluster id in the mesh this cluster was configured for.
    #[serde(default = "default_max_clusters")]
    pub max_connected_clusters: u16,
    /// The cluster runs a mirror (`clustermesh-apiserver --kvstoremesh`) that keeps every
    /// remote cluster in its etcd (`meshd/cache/<cluster>/`): its agents read remote clusters
    /// there unless told otherwise (`remote_source`).
    #[serde(default)]
    pub cached: bool,
}

fn default_max_clusters() -> u16 {
    255
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            sync_canaries: true,
            max_connected_clusters: default_max_clusters(),
            cached: false,
        }
    }
}

/// `meshd/state/nodes/v1/<cluster>/<node>`: one node, published by its agent under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    /// Underlay address: the tunnel endpoint for this node's endpoints.
    pub node_ip: IpAddr,
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub labels: Labels,
    /// Changes on every reboot, so peers can drop state (conntrack, tunnels) of the old boot.
    pub boot_id: String,
}

impl NodeRecord {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        check_dns_subdomain("name", &self.name)?;
        for (i, cidr) in self.pod_cidrs.iter().enumerate() {
            check_canonical(&format!("pod_cidrs[{i}]"), cidr)?;
        }
        self.labels.validate("labels")?;
        if self.boot_id.is_empty() {
            return Err(FieldError::new("boot_id", "must not be empty"));
        }
        Ok(())
    }
}

/// `meshd/state/ip/v1/<cluster>/<ip>`: where an endpoint address lives and who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcacheEntry {
    pub prefix: IpNet,
    pub identity: NumericIdentity,
    /// Node IP hosting the endpoint: the remote end of the tunnel towards it.
    pub host_ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl IpcacheEntry {
    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        check_canonical("prefix", &self.prefix)?;
        if let Some(ep) = &self.endpoint {
            check_dns_subdomain("endpoint", ep)?;
        }
        if let Some(ns) = &self.namespace {
            check_dns_label("namespace", ns)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// Which backends of a global service are preferred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Remote backends only while no local backend is ready.
    Local,
    /// Local backends only while no remote backend is ready.
    Remote,
    #[default]
    None,
}

/// Kubernetes' service type: where a service is reachable from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    /// Only through its VIP, from inside the mesh.
    #[default]
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// Also on every node's IP at each port's node port, from outside the mesh.
    NodePort,
    /// A node port service that an external load balancer (or a router sending
    /// `loadBalancerIP` to the nodes) fronts.
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }

    /// Node ports are allocated for its ports (NodePort and LoadBalancer, as in Kubernetes).
    pub fn has_node_ports(self) -> bool {
        self != ServiceType::ClusterIp
    }

    fn is_cluster_ip(&self) -> bool {
        *self == ServiceType::ClusterIp
    }
}

impl std::fmt::Display for ServiceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kubernetes' `externalTrafficPolicy`: which backends serve clients from outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrafficPolicy {
    /// Every backend the VIP uses (global ones included); the entry node may translate the
    /// client's address.
    #[default]
    Cluster,
    /// Only the entry node's own backends; the client's address is kept, and a node without a
    /// local backend refuses (its health check node port says so).
    Local,
}

impl TrafficPolicy {
    fn is_cluster(&self) -> bool {
        *self == TrafficPolicy::Cluster
    }
}

/// An address clients connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceFrontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Port name, matching backends of other clusters by name rather than number.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    /// The port this service port also answers on every node's IP (NodePort and LoadBalancer
    /// services); absent otherwise and in records written before node ports existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// An endpoint serving a service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceBackend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub ready: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
}

/// `meshd/state/services/v1/<cluster>/<namespace>/<name>`: a service and this cluster's backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub frontends: Vec<ServiceFrontend>,
    #[serde(default)]
    pub backends: Vec<ServiceBackend>,
    /// Merge backends of the same namespace/name from every cluster.
    #[serde(default)]
    pub global: bool,
    /// Export this cluster's backends to the others.
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub affinity: Affinity,
    /// Fields below came with public endpoints (NodePort / LoadBalancer); records written
    /// before them still parse, as ClusterIP services.
    #[serde(
        rename = "type",
        default,
        skip_serializing_if = "ServiceType::is_cluster_ip"
    )]
    pub service_type: ServiceType,
    /// Addresses a router sends to the nodes; the service's ports answer on them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<IpAddr>,
    /// LoadBalancer services: the load balancer's address, answered like an external IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "TrafficPolicy::is_cluster")]
    pub external_traffic_policy: TrafficPolicy,
    /// `Local` policy: the node port answering an external load balancer's health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

impl ServiceRecord {
    /// Every address outside the mesh the service's ports answer on (external IPs, then the
    /// load balancer's), without repeats.
    pub fn external_addresses(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for ip in self.external_ips.iter().chain(&self.load_balancer_ip) {
            if !out.contains(ip) {
                out.push(*ip);
            }
        }
        out
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        check_dns_label("namespace", &self.namespace)?;
        check_dns_label("name", &self.name)?;
        for (i, f) in self.frontends.iter().enumerate() {
            if f.port == 0 {
                return Err(FieldError::new(
                    format!("frontends[{i}].port"),
                    "must not be 0",
                ));
            }
            if f.node_port == Some(0) {
                return Err(FieldError::new(
                    format!("frontends[{i}].node_port"),
                    "must not be 0",
                ));
            }
        }
        for (i, b) in self.backends.iter().enumerate() {
            if b.port == 0 {
                return Err(FieldError::new(
                    format!("backends[{i}].port"),
                    "must not be 0",
                ));
            }
        }
        Ok(())
    }
}

/// `meshd/synced/<cluster>/<resource>`: the publisher's initial state of `resource` is in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncCanary {
    /// Unix time in milliseconds when the initial sync completed.
    pub synced_at_ms: u64,
}

/// `meshd/cache-status/v1/<cluster>`: how the local mirror (`clustermesh-apiserver
/// --kvstoremesh`) of remote `cluster` stands. Written by the mirror only; agents reading the
/// cache (`remote_source: cache`) take `ready` as the remote's initial sync being complete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub cluster: String,
    /// The mirror holds a session (list or watch) with the remote's etcd now.
    pub connected: bool,
    /// The remote's full list is in the cache and its sync canaries are mirrored after it.
    pub ready: bool,
    /// Unix ms since which the remote is unreachable; the cache keeps its entries meanwhile
    /// (fail-static). `None` while connected.
    #[serde(default)]
    pub stale_since: Option<u64>,
    /// Unix ms of the last completed list or mirrored event (0: never).
    #[serde(default)]
    pub last_sync_unix_ms: u64,
    /// Keys of this remote in the cache now.
    #[serde(default)]
    pub entries: u64,
    /// Remote keys not mirrored: over `limit`, malformed (outside `meshd/`, empty key), or
    /// with a value over the size bound.
    #[serde(default)]
    pub rejected: u64,
    /// The most keys mirrored from one remote.
    #[serde(default)]
    pub limit: u64,
    /// Of `rejected`: keys refused for `limit` since the last list. While not zero the cache
    /// holds only part of the remote (degraded).
    #[serde(default)]
    pub over_limit: u64,
    /// Of `rejected`: keys refused for the size of their value since the last list (over the
    /// bound agents hold values to, `meshd_kvstore::MAX_VALUE_BYTES`).
    #[serde(default)]
    pub oversized: u64,
    /// Milliseconds between the remote's event and its write into the cache, for the last
    /// write (0 when unknown; etcd events carry no time, so it is measured from receipt).
    #[serde(default)]
    pub lag_ms: u64,
    #[serde(default)]
    pub last_error: Option<String>,
}

fn check_canonical(field: &str, net: &IpNet) -> Result<(), FieldError> {
    if net.trunc() == *net {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{net} has host bits set (expected {})", net.trunc()),
        ))
    }
}
