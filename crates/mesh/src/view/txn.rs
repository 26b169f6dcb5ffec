//! One transaction of the view: the work list of keys to re-evaluate, the record of what
//! changed, and its end: the touched prefixes, node IPs, identities and services resolved
//! into operations, and the net status changes reported.

use std::collections::{btree_map, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use meshd_state::{ClusterName, IdentityKey, IpcacheKey, NodeKey, NumericIdentity};

use super::cluster::{Status, Stored};
use super::services::ServiceName;
use super::{Applied, MeshView};
use crate::desired::{order_ops, DatapathOp};
use crate::reject::{PendingEntry, RejectReason, RejectedKey, Rejection};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Work {
    Node(Arc<ClusterName>, String),
    Entry(Arc<ClusterName>, IpNet),
    Identity(Arc<ClusterName>, NumericIdentity),
}

/// Keys to re-evaluate. Nodes go first and identities next: entries depend on nodes, never
/// the other way round, so an entry is judged once its node's fate is known.
#[derive(Default)]
pub(super) struct WorkQueue {
    nodes: VecDeque<Work>,
    identities: VecDeque<Work>,
    entries: VecDeque<Work>,
}

impl WorkQueue {
    pub(super) fn push_back(&mut self, work: Work) {
        match work {
            Work::Node(..) => self.nodes.push_back(work),
            Work::Identity(..) => self.identities.push_back(work),
            Work::Entry(..) => self.entries.push_back(work),
        }
    }

    pub(super) fn extend(&mut self, works: impl IntoIterator<Item = Work>) {
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
pub(super) struct Txn {
    pub(super) work: WorkQueue,
    /// Status of each key before its first change in this transaction, so only the net
    /// outcome is reported (an entry judged pending and then admitted in one batch is not).
    pub(super) changed_nodes: Vec<(Arc<ClusterName>, String, Status)>,
    /// Entries also keep the host they tunnelled to: pending on another node is a change.
    pub(super) changed_entries: Vec<(Arc<ClusterName>, IpNet, Status, IpAddr)>,
    pub(super) changed_identities: Vec<(Arc<ClusterName>, NumericIdentity, Status)>,
    /// Prefixes to resolve again (sorted and deduplicated at the end: cheaper than a set).
    pub(super) touched_prefixes: Vec<IpNet>,
    pub(super) touched_node_ips: BTreeSet<IpAddr>,
    /// Prefixes whose "never masqueraded" sources changed.
    pub(super) touched_no_masquerade: Vec<IpNet>,
    /// Identities admitted or withdrawn (the policy follows them at the end).
    pub(super) touched_identities: Vec<NumericIdentity>,
    /// Services (namespace, name) whose records changed.
    pub(super) touched_services: BTreeSet<ServiceName>,
    /// A cluster's admission changed or it went: every service is looked at again (rare).
    pub(super) all_services_touched: bool,
    pub(super) applied: Applied,
}

impl MeshView {
    pub(super) fn drain_work(&mut self, txn: &mut Txn) {
        while let Some(work) = txn.work.pop_front() {
            match work {
                Work::Node(c, name) => self.eval_node(&c, &name, txn),
                Work::Entry(c, p) => self.eval_entry(&c, &p, txn),
                Work::Identity(c, id) => self.eval_identity(&c, id, txn),
            }
        }
    }

    pub(super) fn finish(&mut self, mut txn: Txn) -> Applied {
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
        let mut no_masq = std::mem::take(&mut txn.touched_no_masquerade);
        no_masq.sort_unstable();
        no_masq.dedup();
        for prefix in no_masq {
            let wanted = self.no_masquerade_sources.contains_key(&prefix);
            if wanted && self.no_masquerade_out.insert(prefix) {
                ops.push(DatapathOp::UpsertNoMasquerade { prefix });
            } else if !wanted && self.no_masquerade_out.remove(&prefix) {
                ops.push(DatapathOp::DeleteNoMasquerade { prefix });
            }
        }
        let mut touched = std::mem::take(&mut txn.touched_prefixes);
        touched.sort_unstable();
        touched.dedup();
        for prefix in touched {
            self.refresh_prefix(prefix, &mut ops);
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

    /// Brings the maintained ipcache entry of `prefix` in line with what the view resolves
    /// for it, with the operation that does the same to the map.
    pub(super) fn refresh_prefix(&mut self, prefix: IpNet, ops: &mut Vec<DatapathOp>) {
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
                self.ipcache_inserts += 1;
                ops.push(DatapathOp::UpsertIpcache { prefix, target });
            }
            (btree_map::Entry::Vacant(_), None) => {}
        }
    }

    /// Reports and counts the keys whose status changed, net over the transaction, and
    /// clears their marks.
    pub(super) fn report(&mut self, txn: &mut Txn) {
        let mut rejected = Vec::new();
        for (c, name, before) in std::mem::take(&mut txn.changed_nodes) {
            let stored = self
                .clusters
                .get_mut(&*c)
                .and_then(|cs| cs.nodes.get_mut(&name));
            if let Some(reason) = newly_rejected(stored, &before) {
                rejected.push(Rejection {
                    cluster: (*c).clone(),
                    key: RejectedKey::Node(NodeKey {
                        cluster: (*c).clone(),
                        node: name,
                    }),
                    reason,
                });
            }
        }
        for (c, prefix, before, host_before) in std::mem::take(&mut txn.changed_entries) {
            let Some(cs) = self.clusters.get_mut(&*c) else {
                continue;
            };
            let Some(stored) = cs
                .ipcache
                .get_mut(&prefix)
                .and_then(|s| std::mem::take(&mut s.marked).then_some(s))
            else {
                continue;
            };
            let host_ip = stored.value.host_ip;
            let code = stored.status;
            let status = cs.entry_status(&prefix, code);
            if status == before && (status != Status::AwaitingNode || host_ip == host_before) {
                continue;
            }
            let key = IpcacheKey {
                cluster: (*c).clone(),
                prefix,
            };
            match &status {
                Status::Rejected(reason) => rejected.push(Rejection {
                    cluster: (*c).clone(),
                    key: RejectedKey::Ipcache(key),
                    reason: (**reason).clone(),
                }),
                Status::AwaitingNode => txn.applied.pending.push(PendingEntry {
                    cluster: (*c).clone(),
                    key,
                    host_ip,
                }),
                _ => {}
            }
        }
        for (c, id, before) in std::mem::take(&mut txn.changed_identities) {
            let stored = self
                .clusters
                .get_mut(&*c)
                .and_then(|cs| cs.identities.get_mut(&id));
            if let Some(reason) = newly_rejected(stored, &before) {
                rejected.push(Rejection {
                    cluster: (*c).clone(),
                    key: RejectedKey::Identity(IdentityKey {
                        cluster: (*c).clone(),
                        id,
                    }),
                    reason,
                });
            }
        }
        for r in &rejected {
            if let Some(cs) = self.clusters.get_mut(&r.cluster) {
                cs.rejected_total += 1;
            }
        }
        txn.applied.rejected.extend(rejected);
    }
}

/// For a key the transaction changed (`stored`: it now, if still stored; `before`: its status
/// when the transaction first touched it): clears its mark, and gives the reason it is
/// rejected if it is rejected now and was not so before. Unmarked: already reported.
fn newly_rejected<T>(stored: Option<&mut Stored<T>>, before: &Status) -> Option<RejectReason> {
    let now = stored.and_then(|s| std::mem::take(&mut s.marked).then_some(s))?;
    match &now.status {
        Status::Rejected(reason) if now.status != *before => Some((**reason).clone()),
        _ => None,
    }
}
