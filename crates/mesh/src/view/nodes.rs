//! Admission of node records: cluster name and id, node IPs unique against the local cluster
//! and across remotes (lower cluster id wins); the local cluster's nodes add to the prefixes
//! remote entries must not overlap.

use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{ClusterName, NodeRecord};

use super::cluster::{rejected, ClusterState, Status, StatusCode, Stored};
use super::txn::{Txn, Work};
use super::{host_net, MeshView};
use crate::prefix::overlapping;
use crate::reject::RejectReason;

/// An admitted node other than this one, with its pod CIDRs: what native routing routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    pub cluster: ClusterName,
    pub name: String,
    pub node_ip: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
}

impl MeshView {
    /// Every admitted node of every cluster except this node, in (cluster, name) order. Walks
    /// the nodes (not the ipcache): for changes of nodes and admissions, not per event.
    pub fn peer_nodes(&self) -> Vec<PeerNode> {
        self.clusters
            .iter()
            .flat_map(|(c, cs)| {
                cs.nodes
                    .iter()
                    .filter(move |(name, n)| {
                        n.status == Status::Admitted
                            && !(cs.is_local() && **name == self.local.node_name)
                    })
                    .map(move |(name, n)| PeerNode {
                        cluster: c.clone(),
                        name: name.clone(),
                        node_ip: n.value.node_ip,
                        pod_cidrs: n.value.pod_cidrs.clone(),
                    })
            })
            .collect()
    }

    pub(super) fn upsert_node(&mut self, c: &ClusterName, record: NodeRecord, txn: &mut Txn) {
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
    pub(super) fn forget_node(&mut self, c: &ClusterName, old: Stored<NodeRecord>, txn: &mut Txn) {
        let ip = old.value.node_ip;
        let local_cluster = *c == self.local.cluster;
        let cs = self.clusters.get_mut(c).expect("node's cluster exists");
        cs.node_counts.track(old.status.code(), false);
        if let Some(names) = cs.node_ips.get_mut(&ip) {
            names.remove(&old.value.name);
            if names.is_empty() {
                cs.node_ips.remove(&ip);
            }
        }
        if old.status == Status::Admitted {
            Self::unadmit_node_ip(cs, ip);
            self.no_masquerade_sources_changed(&old.value.pod_cidrs, false, txn);
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
                                .is_some_and(|s| s.status != StatusCode::New)
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
    pub(super) fn push_remote_overlapping(&self, p: &IpNet, txn: &mut Txn) {
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

    pub(super) fn eval_node(&mut self, c: &ClusterName, name: &str, txn: &mut Txn) {
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
        let admission_changed = (old == Status::Admitted) != (new == Status::Admitted);
        let cidrs = admission_changed.then(|| stored.value.pod_cidrs.clone());
        if !stored.marked {
            stored.marked = true;
            txn.changed_nodes
                .push((cs.name.clone(), name.to_owned(), old.clone()));
        }
        cs.node_counts.track(old.code(), false);
        cs.node_counts.track(new.code(), true);
        if old == Status::Admitted {
            Self::unadmit_node_ip(cs, ip);
        }
        if new == Status::Admitted {
            *cs.admitted_node_ips.entry(ip).or_default() += 1;
        }
        if let Some(cidrs) = cidrs {
            self.no_masquerade_sources_changed(&cidrs, new == Status::Admitted, txn);
        }
        self.node_ip_changed(c, ip, txn);
    }

    /// `cidrs` gained (`added`) or lost a source of "never masqueraded": an admitted node's
    /// pod CIDRs (traffic to another cluster's pods keeps the endpoint's address, even to an
    /// address the ipcache does not know yet), this node's own, a configured exception.
    pub(super) fn no_masquerade_sources_changed(
        &mut self,
        cidrs: &[IpNet],
        added: bool,
        txn: &mut Txn,
    ) {
        for p in cidrs.iter().map(IpNet::trunc) {
            if added {
                *self.no_masquerade_sources.entry(p).or_default() += 1;
            } else if let Some(n) = self.no_masquerade_sources.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.no_masquerade_sources.remove(&p);
                }
            }
            txn.touched_no_masquerade.push(p);
        }
    }
}
