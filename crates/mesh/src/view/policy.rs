//! The local cluster's policies: validated, stored, and followed by the policy index.

use super::{Applied, MeshView, PolicyEvent};
use crate::desired::order_ops;
use crate::policy::{compile, CompiledPolicy, NetworkPolicy, PolicyErrors};

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

    /// The policy entries and markers for the local cluster's identities, compiled against
    /// every admitted identity of every cluster.
    pub fn compile_policy(&self) -> CompiledPolicy {
        let mut identities = self.identities_out.clone();
        identities.extend(self.policy_index.cidr_identities().labelled());
        compile(self.policies.values(), &identities, self.local.cluster_id)
    }
}
