//! Services: each cluster's records as published, and the SERVICES/BACKENDS content kept up
//! to date one service at a time.

use std::collections::{BTreeMap, BTreeSet};

use meshd_state::{ClusterName, ServiceRecord};

use super::cluster::Admission;
use super::txn::Txn;
use super::MeshView;
use crate::services::{
    desired_services, health_check, ClusterService, DesiredServices, HealthCheck, ServiceNode,
    ServiceOp,
};

/// A service's namespace and name: records of the same name in several clusters are one
/// (global) service.
pub(super) type ServiceName = (String, String);

impl MeshView {
    pub(super) fn upsert_service(&mut self, c: &ClusterName, s: ServiceRecord, txn: &mut Txn) {
        let key = (s.namespace.clone(), s.name.clone());
        txn.touched_services.insert(key.clone());
        self.cluster_mut(c).services.insert(key, s);
    }

    pub(super) fn delete_service(&mut self, c: &ClusterName, key: ServiceName, txn: &mut Txn) {
        if let Some(cs) = self.clusters.get_mut(c) {
            if cs.services.remove(&key).is_some() {
                txn.touched_services.insert(key);
            }
        }
    }

    /// This node, as the service rules see it.
    fn service_node(&self) -> ServiceNode<'_> {
        ServiceNode {
            cluster: &self.local.cluster,
            node_ip: self.local.node_ip,
            pod_cidrs: &self.local.pod_cidrs,
        }
    }

    /// What one service contributes, from its records in every admitted cluster (a lookup per
    /// cluster): its VIP frontends and its public ones (node ports, external addresses).
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
        desired_services(&self.service_node(), records)
    }

    /// Brings `services_out` up to date for the services touched in `txn` and returns the
    /// operations, in phase order. A backend change costs its own service's frontends only.
    pub(super) fn refresh_services(&mut self, txn: &mut Txn) -> Vec<ServiceOp> {
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
            self.refresh_health_check(&key);
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
                .and_then(|part| {
                    let value = *part.services.get(&frontend)?;
                    Some((value, part.backends_of(&frontend)))
                });
            let old = self.services_out.services.get(&frontend).copied();
            let new = want.as_ref().map(|(value, _)| *value);
            let old_count = old.map(|v| v.count);
            let new_count = new.map(|v| v.count);
            for (slot, backend) in want.iter().flat_map(|(_, b)| b).enumerate() {
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
            match (old, new) {
                (old, Some(value)) if old != Some(value) => {
                    ops.push(ServiceOp::UpsertService { frontend, value })
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

    /// The health check of the local cluster's service `key`, if it has one.
    fn refresh_health_check(&mut self, key: &ServiceName) {
        let want = self
            .clusters
            .get(&self.local.cluster)
            .and_then(|cs| cs.services.get(key))
            .and_then(|record| health_check(&self.service_node(), record));
        let changed = match want {
            Some(hc) => self.health_checks.insert(key.clone(), hc.clone()) != Some(hc),
            None => self.health_checks.remove(key).is_some(),
        };
        if changed {
            self.health_checks_revision += 1;
        }
    }

    /// The health check node ports this node serves (port -> what it answers), and a revision
    /// that moves whenever they change. Two services never share a port (the apiserver
    /// allocates them); if they did, the greatest (namespace, name) would answer.
    pub fn health_checks(&self) -> (u64, BTreeMap<u16, HealthCheck>) {
        (
            self.health_checks_revision,
            self.health_checks.values().cloned().collect(),
        )
    }

    /// The revision of [`MeshView::health_checks`]: compare before copying them.
    pub fn health_checks_revision(&self) -> u64 {
        self.health_checks_revision
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
        desired_services(&self.service_node(), records.flatten())
    }
}
