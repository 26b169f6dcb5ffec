//! The from-scratch oracle, for tests only: the desired state recomputed from what the view
//! stores (every stored record replayed into a new view as one batch, the policy compiled and
//! the services computed by the plain functions). The maintained state, and the operations
//! emitted on the way, are checked against it after every event.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use meshd_state::{
    ClusterConfig, ClusterId, ClusterName, IdentityRecord, IpcacheEntry, NumericIdentity,
};

use super::{ClusterEvent, EventKind, MeshView};
use crate::desired::{DesiredDatapath, IpcacheTarget};
use crate::policy::{cidr_labels, compile, egress_peers, ingress_peers};

impl MeshView {
    /// Recomputes the desired ipcache and node maps from scratch, ignoring the incremental
    /// bookkeeping: tests compare it with the maintained maps.
    pub fn recompute_from_scratch(
        &self,
    ) -> (BTreeMap<IpNet, IpcacheTarget>, BTreeMap<IpAddr, ClusterId>) {
        let desired = self.desired_from_scratch();
        (desired.ipcache, desired.nodes)
    }

    /// The whole desired state recomputed from what the view stores: every stored record
    /// replayed into a new view as one batch, the policy compiled and the services computed by
    /// the plain functions. The oracle the maintained state (and the operations emitted on the
    /// way) is checked against.
    pub fn desired_from_scratch(&self) -> DesiredDatapath {
        let fresh = self.replayed();
        // The prefixes the policies name, from the policies themselves; their numbers are the
        // maintained ones (any free number would do, but the entries must agree). A named
        // prefix without a maintained identity gets none here, so the comparison fails.
        let named: BTreeSet<Ipv4Net> = self
            .policies
            .values()
            .flat_map(|p| {
                let ingress = p.spec.ingress.iter().flatten().map(ingress_peers);
                let egress = p.spec.egress.iter().flatten().map(egress_peers);
                ingress.chain(egress).flatten().collect::<Vec<_>>()
            })
            .flat_map(|set| set.prefixes().collect::<Vec<_>>())
            .collect();
        let maintained = self.policy_index.cidr_identities();
        let cidrs: BTreeMap<Ipv4Net, NumericIdentity> = maintained
            .iter()
            .filter(|(p, _)| named.contains(p))
            .collect();
        let mut identities = fresh.identities_out.clone();
        identities.extend(cidrs.iter().map(|(p, id)| (*id, cidr_labels(*p))));
        let compiled = compile(self.policies.values(), &identities, self.local.cluster_id);
        let mut ipcache = fresh.ipcache_out.clone();
        for (prefix, identity) in cidrs {
            ipcache.entry(IpNet::V4(prefix)).or_insert(IpcacheTarget {
                identity,
                tunnel_endpoint: None,
                local: false,
            });
        }
        DesiredDatapath {
            no_masquerade: fresh.no_masquerade_from_scratch(),
            services: fresh.desired_services(),
            ipcache,
            nodes: fresh.nodes_out,
            policy: compiled.entries,
            policy_enabled: compiled.enabled,
        }
    }

    /// NO_MASQ from what is stored: this node's pod CIDRs, the configured exceptions and the
    /// pod CIDRs of every admitted node.
    fn no_masquerade_from_scratch(&self) -> BTreeSet<IpNet> {
        let admitted = self.clusters.values().flat_map(|cs| {
            cs.nodes
                .values()
                .filter(|n| n.status == super::cluster::Status::Admitted)
                .flat_map(|n| n.value.pod_cidrs.iter())
        });
        self.local
            .pod_cidrs
            .iter()
            .chain(&self.local.non_masquerade)
            .chain(admitted)
            .map(IpNet::trunc)
            .collect()
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
