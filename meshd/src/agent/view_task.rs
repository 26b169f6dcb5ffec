//! The single writer of the merged view: applies watcher events to `meshd_mesh::MeshView` and
//! publishes snapshots (desired datapath state for the reconciler, cluster status for the API).
//!
//! Start-up gate: the reconciler must not act on a view that has not heard from every cluster
//! yet, or an agent restart would delete every remote entry from the maps and re-add it a
//! moment later. So no desired state is published until the local cluster and every remote
//! configured at start are ready (their sync canaries seen), or until `gate_timeout` passes
//! (a remote that is down at start must not block the node forever).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meshd_mesh::{ClusterStatus, DesiredDatapath, MeshView};
use meshd_state::ClusterName;
use tokio::sync::{mpsc, watch};

use crate::agent::watcher::ViewInput;

/// Identity number -> its labels, rendered canonically.
pub type IdentityLabels = BTreeMap<u32, String>;

/// Most inputs applied before a snapshot is published: bounds the latency of a huge burst
/// (an initial sync of 100k entries) without publishing per event.
const BATCH: usize = 4096;

pub struct ViewTask {
    pub view: MeshView,
    pub inputs: mpsc::Receiver<ViewInput>,
    /// `None` until the start-up gate opens.
    pub desired: watch::Sender<Option<Arc<DesiredDatapath>>>,
    pub status: watch::Sender<Arc<Vec<ClusterStatus>>>,
    /// Number of local policies in force.
    pub policies: watch::Sender<usize>,
    /// Every admitted identity's labels, rendered (for `meshd monitor`); republished when they
    /// change, which is rare next to ipcache churn.
    pub identities: watch::Sender<Arc<IdentityLabels>>,
    /// Clusters to wait for before the first desired state (the local one included).
    pub wait_for: BTreeSet<ClusterName>,
    pub gate_timeout: Duration,
}

impl ViewTask {
    pub async fn run(mut self) {
        let deadline = tokio::time::Instant::now() + self.gate_timeout;
        let mut gate_open = false;
        loop {
            let first = if gate_open {
                self.inputs.recv().await
            } else {
                tokio::select! {
                    i = self.inputs.recv() => i,
                    _ = tokio::time::sleep_until(deadline) => {
                        let waiting: Vec<String> = self.unready().iter().map(|c| c.to_string()).collect();
                        tracing::warn!(?waiting, "start-up sync not complete in time; reconciling with what is known");
                        gate_open = true;
                        self.publish(true);
                        continue;
                    }
                }
            };
            let Some(first) = first else { return };
            let mut policy_changed = self.apply(first);
            for _ in 0..BATCH {
                match self.inputs.try_recv() {
                    Ok(i) => policy_changed |= self.apply(i),
                    Err(_) => break,
                }
            }
            if policy_changed {
                self.publish_identities();
            }
            if !gate_open && self.unready().is_empty() {
                tracing::info!("initial sync of every cluster complete");
                gate_open = true;
            }
            self.publish(gate_open);
        }
    }

    fn unready(&self) -> Vec<ClusterName> {
        self.wait_for
            .iter()
            .filter(|c| !self.view.cluster_status(c).is_some_and(|s| s.ready))
            .cloned()
            .collect()
    }

    fn apply(&mut self, input: ViewInput) -> bool {
        match input {
            ViewInput::Cluster(event) => {
                let cluster = event.cluster.clone();
                let applied = self.view.apply(event);
                for r in &applied.rejected {
                    tracing::warn!(%cluster, rejection = %r, "rejected remote entry");
                }
                for r in &applied.refusals {
                    tracing::error!(%cluster, refusal = %r, "cluster refused");
                }
                applied.policy_inputs_changed
            }
            ViewInput::Policy(event) => match self.view.apply_policy(event) {
                Ok(changed) => changed,
                Err(e) => {
                    tracing::warn!(error = %e, "policy refused; the previous version stays in force");
                    false
                }
            },
        }
    }

    fn publish_identities(&self) {
        let labels = self
            .view
            .identities()
            .iter()
            .map(|(id, labels)| (id.get(), labels.to_string()))
            .collect();
        self.identities.send_replace(Arc::new(labels));
    }

    fn publish(&self, gate_open: bool) {
        if gate_open {
            self.desired
                .send_replace(Some(Arc::new(self.view.desired())));
        }
        self.status.send_replace(Arc::new(self.view.status()));
        self.policies.send_replace(self.view.policies().count());
    }
}
