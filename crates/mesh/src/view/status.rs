//! What the view tells about each cluster: counts, readiness, refusal, the current rejections
//! and the entries waiting for their node (for `meshd clustermesh status`, not the hot path).

use std::collections::BTreeSet;

use meshd_state::{ClusterConfig, ClusterId, ClusterName, IdentityKey, IpcacheKey, NodeKey};

use super::cluster::{Admission, Status, StatusCode};
use super::{MeshView, ResourceKind};
use crate::reject::{ClusterRefusal, PendingEntry, RejectedKey, Rejection};

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

impl KindCounts {
    pub(super) fn track(&mut self, status: StatusCode, up: bool) {
        let slot = match status {
            StatusCode::Admitted => &mut self.admitted,
            StatusCode::AwaitingConfig | StatusCode::AwaitingNode => &mut self.pending,
            StatusCode::Rejected => &mut self.rejected,
            StatusCode::New | StatusCode::Blocked => return,
        };
        if up {
            *slot += 1;
        } else {
            *slot -= 1;
        }
    }
}

impl MeshView {
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
        let entries = cs.entry_reasons.iter().map(|(p, reason)| Rejection {
            cluster: c.clone(),
            key: RejectedKey::Ipcache(IpcacheKey {
                cluster: c.clone(),
                prefix: *p,
            }),
            reason: (**reason).clone(),
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
                StatusCode::AwaitingNode => Some(PendingEntry {
                    cluster: c.clone(),
                    key: IpcacheKey {
                        cluster: c.clone(),
                        prefix: *p,
                    },
                    host_ip: s.value.host_ip,
                }),
                _ => None,
            })
            .collect()
    }
}
