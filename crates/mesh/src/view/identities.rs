//! Admission of identity records: the cluster bits of their cluster's id and the cluster
//! label; admitted identities feed the policy index.

use meshd_state::{ClusterName, IdentityRecord, NumericIdentity, CLUSTER_LABEL};

use super::cluster::{rejected, Status, Stored};
use super::txn::{Txn, Work};
use super::MeshView;
use crate::reject::RejectReason;

impl MeshView {
    pub(super) fn upsert_identity(
        &mut self,
        c: &ClusterName,
        id: NumericIdentity,
        record: IdentityRecord,
        txn: &mut Txn,
    ) {
        let mut labels = record.labels;
        // Every endpoint carries its cluster label; adding it where a publisher left it
        // out keeps selection by cluster working on every identity.
        if labels.get(CLUSTER_LABEL).is_none() {
            labels.insert(CLUSTER_LABEL, c.as_str());
        }
        self.delete_identity(c, id, txn);
        let cs = self.cluster_mut(c);
        cs.identities.insert(id, Stored::new(labels));
        txn.work.push_back(Work::Identity(cs.name.clone(), id));
    }

    pub(super) fn delete_identity(&mut self, c: &ClusterName, id: NumericIdentity, txn: &mut Txn) {
        let Some(cs) = self.clusters.get_mut(c) else {
            return;
        };
        let Some(old) = cs.identities.remove(&id) else {
            return;
        };
        cs.identity_counts.track(old.status.code(), false);
        if old.status == Status::Admitted {
            self.identities_out.remove(&id);
            txn.touched_identities.push(id);
            txn.applied.policy_inputs_changed = true;
        }
    }

    fn identity_status(&self, c: &ClusterName, id: NumericIdentity) -> Option<Status> {
        let cs = self.clusters.get(c)?;
        let labels = &cs.identities.get(&id)?.value;
        let cluster_id = match self.cluster_id_of(cs) {
            Ok(cid) => cid,
            Err(status) => return Some(status),
        };
        if id.cluster_id() != Some(cluster_id) {
            return Some(rejected(RejectReason::IdentityOutOfRange {
                identity: id,
                cluster_id,
            }));
        }
        match labels.get(CLUSTER_LABEL) {
            Some(named) if named != c.as_str() => Some(rejected(RejectReason::WrongCluster {
                named: named.to_owned(),
                actual: c.clone(),
            })),
            _ => Some(Status::Admitted),
        }
    }

    pub(super) fn eval_identity(&mut self, c: &ClusterName, id: NumericIdentity, txn: &mut Txn) {
        let Some(new) = self.identity_status(c, id) else {
            return;
        };
        let cs = self.clusters.get_mut(c).expect("evaluated above");
        let stored = cs.identities.get_mut(&id).expect("evaluated above");
        if stored.status == new {
            return;
        }
        let old = std::mem::replace(&mut stored.status, new.clone());
        cs.identity_counts.track(old.code(), false);
        cs.identity_counts.track(new.code(), true);
        if old == Status::Admitted {
            self.identities_out.remove(&id);
            txn.touched_identities.push(id);
            txn.applied.policy_inputs_changed = true;
        }
        if new == Status::Admitted {
            self.identities_out.insert(id, stored.value.clone());
            txn.touched_identities.push(id);
            txn.applied.policy_inputs_changed = true;
        }
        if !stored.marked {
            stored.marked = true;
            txn.changed_identities.push((cs.name.clone(), id, old));
        }
    }
}
