//! The local cluster's policies: validated, stored, and followed by the policy index.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};

use super::cluster::Status;
use super::{Applied, MeshView, PolicyEvent};
use crate::desired::order_ops;
use crate::policy::{
    compile, egress_peers, ingress_peers, CompiledPolicy, NetworkPolicy, PolicyErrors,
};

/// Whether `policy` names `prefix` in one of its rules.
fn policy_names(policy: &NetworkPolicy, prefix: &Ipv4Net) -> bool {
    let ingress = policy.spec.ingress.iter().flatten().map(ingress_peers);
    let egress = policy.spec.egress.iter().flatten().map(egress_peers);
    ingress
        .chain(egress)
        .flatten()
        .any(|set| set.prefixes().any(|p| p == *prefix))
}

impl MeshView {
    /// Stores or removes a local policy. An invalid update is refused and the previous version
    /// of that policy (if any) stays in force: a typo must not silently open a workload.
    /// Returns whether the stored policies changed.
    pub fn apply_policy(&mut self, event: PolicyEvent) -> Result<bool, PolicyErrors> {
        self.update_policy(event).map(|a| a.policies_changed)
    }

    /// [`MeshView::apply_policy`], with the policy map operations it implies.
    pub fn update_policy(&mut self, event: PolicyEvent) -> Result<Applied, PolicyErrors> {
        let (key, changed) = self.store_policy(event)?;
        let mut applied = Applied {
            policies_changed: changed,
            ..Applied::default()
        };
        if changed {
            self.policy_index.set_policy(
                key.clone(),
                self.policies.get(&key),
                &self.identities_out,
            );
            self.policy_index.flush(&mut applied.ops);
            // Prefixes the policies began or ceased to name enter or leave the ipcache.
            for prefix in self.policy_index.take_touched_cidrs() {
                self.refresh_prefix(prefix.into(), &mut applied.ops);
            }
            order_ops(&mut applied.ops);
        }
        Ok(applied)
    }

    fn store_policy(
        &mut self,
        event: PolicyEvent,
    ) -> Result<((String, String), bool), PolicyErrors> {
        match event {
            PolicyEvent::Upsert(policy) => {
                policy.validate()?;
                let key = (
                    policy.metadata.namespace.clone(),
                    policy.metadata.name.clone(),
                );
                let changed = self.policies.get(&key) != Some(&policy);
                self.policies.insert(key.clone(), policy);
                Ok((key, changed))
            }
            PolicyEvent::Delete { namespace, name } => {
                let key = (namespace, name);
                let changed = self.policies.remove(&key).is_some();
                Ok((key, changed))
            }
        }
    }

    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.policies.values()
    }

    /// What `meshd status` warns about the policies in force: a CIDR rule whose prefix
    /// overlaps a cluster's pod CIDR is accepted, but the endpoints there are matched by their
    /// identity, never by the CIDR (as in Cilium). For status only: it walks every named
    /// prefix against every admitted node.
    pub fn policy_warnings(&self) -> Vec<String> {
        let named = self.policy_index.cidr_identities();
        if named.is_empty() {
            return Vec::new();
        }
        let mut pod_cidrs: BTreeMap<Ipv4Net, BTreeSet<&str>> = BTreeMap::new();
        for cidr in &self.local.pod_cidrs {
            if let IpNet::V4(c) = cidr {
                pod_cidrs
                    .entry(*c)
                    .or_default()
                    .insert(self.local.cluster.as_str());
            }
        }
        for cs in self.clusters.values() {
            for node in cs.nodes.values().filter(|n| n.status == Status::Admitted) {
                for cidr in &node.value.pod_cidrs {
                    if let IpNet::V4(c) = cidr {
                        pod_cidrs.entry(*c).or_default().insert(cs.name.as_str());
                    }
                }
            }
        }
        let mut warnings = Vec::new();
        for (prefix, _) in named.iter() {
            let overlapping: BTreeSet<&str> = pod_cidrs
                .iter()
                .filter(|(c, _)| prefix.contains(&c.network()) || c.contains(&prefix.network()))
                .flat_map(|(_, clusters)| clusters.iter().copied())
                .collect();
            if overlapping.is_empty() {
                continue;
            }
            let naming: Vec<String> = self
                .policies
                .values()
                .filter(|p| policy_names(p, &prefix))
                .map(NetworkPolicy::id)
                .collect();
            warnings.push(format!(
                "CIDR {prefix} in policy {} overlaps the pod CIDRs of cluster {}: endpoints there are matched by their identity, not by this CIDR",
                naming.join(", "),
                overlapping.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        if named.exhausted > 0 {
            warnings.push(format!(
                "{} policy CIDRs found no local identity (65,535 prefixes are named already) and match nothing",
                named.exhausted
            ));
        }
        warnings
    }

    /// The policy entries and markers for the local cluster's identities, compiled against
    /// every admitted identity of every cluster.
    pub fn compile_policy(&self) -> CompiledPolicy {
        let mut identities = self.identities_out.clone();
        identities.extend(self.policy_index.cidr_identities().labelled());
        compile(self.policies.values(), &identities, self.local.cluster_id)
    }
}
