//! What the maps should say for one prefix or node IP, from the view alone, and the
//! maintained desired maps as readers get them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{ClusterId, Labels, NumericIdentity};

use super::cluster::{ClusterState, EntryValue, StatusCode};
use super::MeshView;
use crate::desired::{DesiredDatapath, IpcacheTarget};

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

impl MeshView {
    fn endpoint_target(&self, entry: &EntryValue) -> IpcacheTarget {
        let here = entry.host_ip == self.local.node_ip;
        IpcacheTarget {
            identity: entry.identity,
            tunnel_endpoint: (!here).then_some(entry.host_ip),
            local: here,
        }
    }

    /// What the ipcache should say for `p`, from the view alone. Endpoint entries first (the
    /// local cluster's, then the one admitted remote claimant), then node IPs, then the
    /// identity of a prefix policies name (the mesh's own entries win: its addresses are
    /// matched by identity, never by CIDR).
    pub(super) fn resolve_prefix(&self, p: &IpNet) -> Option<IpcacheTarget> {
        self.resolve_mesh_prefix(p).or_else(|| {
            let IpNet::V4(v4) = p else { return None };
            self.policy_index
                .cidr_identity(v4)
                .map(|identity| IpcacheTarget {
                    identity,
                    tunnel_endpoint: None,
                    local: false,
                })
        })
    }

    fn resolve_mesh_prefix(&self, p: &IpNet) -> Option<IpcacheTarget> {
        let admitted = |cs: &ClusterState| {
            cs.ipcache
                .get(p)
                .filter(|s| s.status == StatusCode::Admitted)
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

    pub(super) fn resolve_node(&self, ip: IpAddr) -> Option<ClusterId> {
        if ip == self.local.node_ip {
            return None;
        }
        self.clusters
            .values()
            .find(|cs| cs.admitted_node_ips.contains_key(&ip))
            .and_then(|cs| self.cluster_id_of(cs).ok())
    }

    /// The whole desired datapath state, as maintained: a copy, for the reconciler's full
    /// diff (start-up, after a failed write, the safety-net timer), not for every event.
    pub fn desired(&self) -> DesiredDatapath {
        DesiredDatapath {
            ipcache: self.ipcache_out.clone(),
            nodes: self.nodes_out.clone(),
            policy: self.policy_index.compiled().entries.clone(),
            policy_enabled: self.policy_index.compiled().enabled.clone(),
            services: self.services_out.clone(),
            no_masquerade: self.no_masquerade_out.clone(),
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
}
