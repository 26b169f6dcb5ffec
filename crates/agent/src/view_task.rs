//! The single writer of the merged view: applies watcher events to `meshd_mesh::MeshView` and
//! hands the reconciler what each batch changed (the view's own operations, so one event costs
//! O(1) map writes however big the mesh is), and publishes cluster status for the API.
//!
//! Start-up gate: the reconciler must not act on a view that has not heard from every cluster
//! yet, or an agent restart would delete every remote entry from the maps and re-add it a
//! moment later. So nothing goes to the reconciler until the local cluster and every remote
//! configured at start are ready (their sync canaries seen), or until `gate_timeout` passes
//! (a remote that is down at start must not block the node forever). Then the whole desired
//! state goes once, for the full diff against the pinned maps; after that only changes, and a
//! whole copy again whenever the reconciler asks for one (after a failed write, and on its
//! safety-net timer).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshd_mesh::{
    ClusterStatus, DatapathOp, DesiredCounts, DesiredDatapath, EventKind, MeshView, ServiceOp,
};
use meshd_state::ClusterName;
use tokio::sync::{mpsc, watch};

use crate::health_check::HealthChecks;
use crate::inputs::Inputs;
use crate::watcher::ViewInput;

/// Identity number -> its labels, rendered canonically.
pub type IdentityLabels = BTreeMap<u32, String>;

/// Most inputs applied (or map writes accumulated) before their changes are handed on: a
/// burst (an initial sync of 100k entries) goes in batches, not a message per event. Small
/// enough that a batch is written in milliseconds: the reconciler writes batches in order, so
/// a quiet cluster's change, taken in the next round whatever another cluster's backlog
/// ([`crate::inputs`]), waits for at most the batches already on their way (the datapath
/// channel holds one), not for the backlog (with 4096 and 64 batches in flight, a flood's
/// 260k writes were queued in front of it).
const BATCH: usize = 1024;

/// Turns of at least this many inputs are applied off the runtime's worker; an event or a
/// few, under churn, cost less than the hand-off.
const BIG_TURN: usize = 64;

/// What the view task hands the reconciler, in order.
#[derive(Debug)]
pub enum DatapathUpdate {
    /// Everything the maps should hold: diff it against the maps read back.
    Full {
        desired: Box<DesiredDatapath>,
        counts: DesiredCounts,
    },
    /// The net change of one batch of events, to apply as it is on top of what came before.
    Changes {
        ops: Vec<DatapathOp>,
        service_ops: Vec<ServiceOp>,
        counts: DesiredCounts,
        /// Each cluster event of the batch that changed the datapath: the propagation delay
        /// histogram's start times, and the propagation traces'.
        received: Vec<Received>,
    },
}

/// A cluster event that changed the datapath.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the watcher made it (see [`ClusterEvent::received`](meshd_mesh::ClusterEvent::received)).
    pub at: Instant,
    /// Its cluster and what changed, kept only while propagation traces are exported
    /// ([`meshd_telemetry::propagation`]).
    pub traced: Option<(ClusterName, &'static str)>,
}

/// What a cluster event changes, as a propagation trace names it.
fn change_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::UpsertNode(_) => "node upsert",
        EventKind::DeleteNode { .. } => "node delete",
        EventKind::UpsertIpcache(_) => "ipcache upsert",
        EventKind::DeleteIpcache { .. } => "ipcache delete",
        EventKind::UpsertIdentity { .. } => "identity upsert",
        EventKind::DeleteIdentity { .. } => "identity delete",
        EventKind::UpsertService(_) => "service upsert",
        EventKind::DeleteService { .. } => "service delete",
        EventKind::Synced(_) => "synced",
        EventKind::ClusterConfig(_) => "cluster config",
        EventKind::ClusterRemoved => "cluster removed",
    }
}

/// Rejection log lines per cluster and second at most: a cluster rewriting invalid entries
/// thousands of times a second must not flood the node's log (every rejection is counted in
/// status and metrics whatever is logged).
const REJECTIONS_LOGGED_PER_SECOND: u32 = 20;

/// How many rejection lines each cluster may still log this second.
#[derive(Default)]
struct RejectionLog {
    /// Cluster -> (start of its current second, lines logged in it, lines not logged since the
    /// last one that was).
    clusters: BTreeMap<ClusterName, (Instant, u32, u64)>,
}

impl RejectionLog {
    /// Whether a line for `cluster` may be logged now; if so, how many were left out before it.
    fn allow(&mut self, cluster: &ClusterName, now: Instant) -> Option<u64> {
        if !self.clusters.contains_key(cluster) {
            self.clusters.insert(cluster.clone(), (now, 0, 0));
        }
        let (start, lines, skipped) = self.clusters.get_mut(cluster).expect("inserted above");
        if now.duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *lines = 0;
        }
        if *lines >= REJECTIONS_LOGGED_PER_SECOND {
            *skipped += 1;
            return None;
        }
        *lines += 1;
        Some(std::mem::take(skipped))
    }

    fn forget(&mut self, cluster: &ClusterName) {
        self.clusters.remove(cluster);
    }
}

/// What the status shows of the local policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySummary {
    pub count: usize,
    /// See [`MeshView::policy_warnings`].
    pub warnings: Vec<String>,
}

pub struct ViewTask {
    pub view: MeshView,
    /// Every cluster's events, a queue per cluster taken in turns ([`crate::inputs`]).
    pub inputs: Inputs,
    /// To the reconciler; nothing until the start-up gate opens.
    pub datapath: mpsc::Sender<DatapathUpdate>,
    /// The reconciler asking for a [`DatapathUpdate::Full`].
    pub full_requests: mpsc::Receiver<()>,
    pub status: watch::Sender<Arc<Vec<ClusterStatus>>>,
    /// The local policies in force: how many, and what status should warn about them.
    pub policies: watch::Sender<PolicySummary>,
    /// Every admitted identity's labels, rendered (for `meshd monitor`); republished when they
    /// change, which is rare next to ipcache churn.
    pub identities: watch::Sender<Arc<IdentityLabels>>,
    /// Clusters to wait for before the first desired state (the local one included).
    pub wait_for: BTreeSet<ClusterName>,
    pub gate_timeout: Duration,
    /// Every admitted node but this one (native routing's node routes), republished when nodes
    /// or admissions change. None until the start-up gate opens, for the same reason the
    /// reconciler waits: on a partial view the route owner would delete the routes of the
    /// nodes not heard from yet.
    pub peers: watch::Sender<Option<Arc<Vec<meshd_mesh::PeerNode>>>>,
    /// The health check node ports to serve (crate::health_check), republished when they
    /// change.
    pub health_checks: watch::Sender<Arc<HealthChecks>>,
}

/// What a batch changed, accumulated until it is handed on.
#[derive(Default)]
struct Pending {
    ops: Vec<DatapathOp>,
    service_ops: Vec<ServiceOp>,
    /// See [`DatapathUpdate::Changes`].
    received: Vec<Received>,
    identities_changed: bool,
    /// A policy or a node (or a cluster's admission) changed: the policy warnings, which
    /// compare policy CIDRs with nodes' pod CIDRs, are recomputed (not on every ipcache batch).
    warnings_stale: bool,
}

impl ViewTask {
    pub async fn run(mut self) {
        let deadline = tokio::time::Instant::now() + self.gate_timeout;
        let mut gate_open = false;
        // False once the reconciler dropped its end: a closed channel is always ready, and
        // polling it would spin.
        let mut requests_open = true;
        let mut log = RejectionLog::default();
        let mut turn = Vec::new();
        loop {
            let more = if gate_open {
                tokio::select! {
                    more = self.inputs.next_turn(&mut turn) => more,
                    r = self.full_requests.recv(), if requests_open => {
                        match r {
                            Some(()) => if !self.send_full().await {
                                return;
                            },
                            None => requests_open = false,
                        }
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    more = self.inputs.next_turn(&mut turn) => more,
                    _ = tokio::time::sleep_until(deadline) => {
                        let waiting: Vec<String> = self.unready().iter().map(|c| c.to_string()).collect();
                        tracing::warn!(?waiting, "start-up sync not complete in time; reconciling with what is known");
                        gate_open = true;
                        self.publish_status(true);
                        self.publish_peers();
                        if !self.send_full().await {
                            return;
                        }
                        continue;
                    }
                }
            };
            if !more {
                return;
            }
            // One round: one pass, a turn of each cluster with events when it began, in
            // round-robin order, at most BATCH events or writes. One pass, not turns until the
            // batch is full: a quiet cluster's change then leaves with at most a turn of each
            // busy cluster (256 events), not in a batch that busy clusters' further turns fill
            // (1024), all of which the reconciler writes before the change is in the maps.
            let mut pending = Pending::default();
            let mut taken = 0;
            let mut turns_left = self.inputs.others_waiting();
            loop {
                taken += turn.len();
                if turn.len() >= BIG_TURN {
                    // A list or a flood: applied off the runtime's worker, so the watchers
                    // decode the next events meanwhile (see `meshd_kvstore::off_the_worker`).
                    meshd_kvstore::off_the_worker(|| {
                        for i in turn.drain(..) {
                            self.apply(i, &mut pending, &mut log);
                        }
                    });
                } else {
                    for i in turn.drain(..) {
                        self.apply(i, &mut pending, &mut log);
                    }
                }
                let writes = pending.ops.len() + pending.service_ops.len();
                if turns_left == 0
                    || taken >= BATCH
                    || writes >= BATCH
                    || !self.inputs.try_turn(&mut turn)
                {
                    break;
                }
                turns_left -= 1;
            }
            if pending.identities_changed {
                self.publish_identities();
            }
            self.publish_health_checks();
            self.publish_status(pending.warnings_stale);
            let opening = !gate_open && self.unready().is_empty();
            if opening || (gate_open && pending.warnings_stale) {
                self.publish_peers();
            }
            if opening {
                tracing::info!("initial sync of every cluster complete");
                gate_open = true;
                if !self.send_full().await {
                    return;
                }
            } else if gate_open && !(pending.ops.is_empty() && pending.service_ops.is_empty()) {
                let update = DatapathUpdate::Changes {
                    ops: pending.ops,
                    service_ops: pending.service_ops,
                    counts: self.view.desired_counts(),
                    received: pending.received,
                };
                if self.datapath.send(update).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Hands the reconciler the whole desired state (a copy: at start, after a failed write
    /// and on the safety-net timer, never per event). False once the reconciler is gone.
    async fn send_full(&mut self) -> bool {
        // A copy of every entry (500k: a tenth of a second or more): off the worker.
        let desired = meshd_kvstore::off_the_worker(|| Box::new(self.view.desired()));
        let update = DatapathUpdate::Full {
            desired,
            counts: self.view.desired_counts(),
        };
        self.datapath.send(update).await.is_ok()
    }

    fn unready(&self) -> Vec<ClusterName> {
        self.wait_for
            .iter()
            .filter(|c| !self.view.cluster_status(c).is_some_and(|s| s.ready))
            .cloned()
            .collect()
    }

    fn apply(&mut self, input: ViewInput, pending: &mut Pending, log: &mut RejectionLog) {
        let applied = match input {
            ViewInput::Cluster(event) => {
                let cluster = event.cluster.clone();
                let received = Received {
                    at: event.received(),
                    traced: meshd_telemetry::propagation::exporting()
                        .then(|| (cluster.clone(), change_name(&event.kind))),
                };
                pending.warnings_stale |= !matches!(
                    event.kind,
                    EventKind::UpsertIpcache(_)
                        | EventKind::DeleteIpcache { .. }
                        | EventKind::UpsertIdentity { .. }
                        | EventKind::DeleteIdentity { .. }
                        | EventKind::UpsertService(_)
                        | EventKind::DeleteService { .. }
                );
                let removed = matches!(event.kind, EventKind::ClusterRemoved);
                let applied = self.view.apply(event);
                let now = Instant::now();
                for r in &applied.rejected {
                    if let Some(skipped) = log.allow(&cluster, now) {
                        tracing::warn!(%cluster, rejection = %r, not_logged_before = skipped, "rejected remote entry");
                    }
                }
                if removed {
                    log.forget(&cluster);
                }
                for r in &applied.refusals {
                    tracing::error!(%cluster, refusal = %r, "cluster refused");
                }
                // Held back, not rejected: usually a node record still on its way. One line per
                // event (an event carries one entry; a relist's batch says it once).
                if let Some(first) = applied.pending.first() {
                    tracing::info!(%cluster, count = applied.pending.len(), entry = %first, "remote entries held back until their node is known");
                }
                if !(applied.ops.is_empty() && applied.service_ops.is_empty()) {
                    pending.received.push(received);
                }
                applied
            }
            ViewInput::Policy(event) => match self.view.update_policy(event).inspect(|_| {
                pending.warnings_stale = true;
            }) {
                Ok(applied) => applied,
                Err(e) => {
                    tracing::warn!(error = %e, "policy refused; the previous version stays in force");
                    return;
                }
            },
        };
        pending.identities_changed |= applied.policy_inputs_changed;
        // Each event's operations are in safe order and are applied in arrival order: the
        // concatenation is a valid sequence (no re-sorting across events, which could put a
        // delete of one event before the upsert of an earlier one for the same key).
        pending.ops.extend(applied.ops);
        pending.service_ops.extend(applied.service_ops);
    }

    /// Publishes the peer nodes when they changed (call only once the gate is open).
    fn publish_peers(&self) {
        let peers = self.view.peer_nodes();
        self.peers.send_if_modified(|old| {
            let changed = old.as_deref() != Some(&peers);
            if changed {
                *old = Some(Arc::new(peers));
            }
            changed
        });
    }

    /// Publishes the health checks when the view's revision of them moved (a copy of a few
    /// entries, only then).
    fn publish_health_checks(&self) {
        if self.health_checks.borrow().revision == self.view.health_checks_revision() {
            return;
        }
        let (revision, ports) = self.view.health_checks();
        self.health_checks
            .send_replace(Arc::new(HealthChecks { revision, ports }));
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

    /// Publishes cluster and policy status; `refresh_warnings`: recompute the policy warnings
    /// (see [`Pending::warnings_stale`]), else keep the last ones.
    fn publish_status(&self, refresh_warnings: bool) {
        self.status.send_replace(Arc::new(self.view.status()));
        let warnings = if refresh_warnings {
            self.view.policy_warnings()
        } else {
            self.policies.borrow().warnings.clone()
        };
        let summary = PolicySummary {
            count: self.view.policies().count(),
            warnings,
        };
        self.policies.send_if_modified(|old| {
            let changed = *old != summary;
            *old = summary;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use meshd_mesh::{ClusterEvent, DatapathOp, EventKind, LocalNode, ResourceKind};
    use meshd_state::{ClusterId, IpcacheEntry, NumericIdentity};

    use super::*;

    fn c1() -> ClusterName {
        ClusterName::new("c1").unwrap()
    }

    fn event(kind: EventKind) -> ViewInput {
        ViewInput::Cluster(ClusterEvent::new(c1(), kind))
    }

    fn endpoint(ip: &str) -> ViewInput {
        event(EventKind::UpsertIpcache(IpcacheEntry {
            prefix: ip.parse::<std::net::IpAddr>().unwrap().into(),
            identity: NumericIdentity::new((1 << 16) | 300).unwrap(),
            host_ip: "192.168.1.1".parse().unwrap(),
            endpoint: None,
            namespace: None,
        }))
    }

    #[test]
    fn rejection_lines_are_rationed_per_cluster_and_second() {
        let mut log = RejectionLog::default();
        let t0 = Instant::now();
        let c2 = ClusterName::new("c2").unwrap();
        let allowed = (0..100).filter(|_| log.allow(&c2, t0).is_some()).count();
        assert_eq!(allowed, REJECTIONS_LOGGED_PER_SECOND as usize);
        // Another cluster has its own budget.
        assert_eq!(log.allow(&c1(), t0), Some(0));
        // The next second: the first line says how many were left out.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.allow(&c2, t1), Some(100 - allowed as u64));
        assert_eq!(log.allow(&c2, t1), Some(0));
    }

    /// The task, its queues, what it hands the reconciler, the reconciler's request end, the
    /// peers it publishes.
    type Harness = (
        ViewTask,
        crate::inputs::InputQueues,
        mpsc::Receiver<DatapathUpdate>,
        mpsc::Sender<()>,
        watch::Receiver<Option<Arc<Vec<meshd_mesh::PeerNode>>>>,
    );

    /// A view task of c1/n1 (waiting for c1 alone) on queues of `capacity` events a cluster,
    /// with a datapath channel of `updates` batches.
    fn view_task(capacity: usize, updates: usize) -> Harness {
        let (queues, inputs) = crate::inputs::input_queues(capacity);
        let (datapath, updates) = mpsc::channel(updates);
        let (requests_tx, full_requests) = mpsc::channel(1);
        let (peers_tx, peers) = watch::channel(None);
        let task = ViewTask {
            view: MeshView::new(LocalNode {
                cluster: c1(),
                cluster_id: ClusterId::new(1).unwrap(),
                node_name: "n1".into(),
                node_ip: "192.168.1.1".parse().unwrap(),
                pod_cidrs: vec!["10.1.1.0/24".parse().unwrap()],
                routing_mode: Default::default(),
                non_masquerade: Vec::new(),
            }),
            inputs,
            datapath,
            full_requests,
            status: watch::channel(Arc::new(Vec::new())).0,
            policies: watch::channel(PolicySummary::default()).0,
            identities: watch::channel(Arc::new(IdentityLabels::new())).0,
            wait_for: [c1()].into(),
            gate_timeout: Duration::from_secs(3600),
            peers: peers_tx,
            health_checks: watch::channel(Arc::new(HealthChecks::default())).0,
        };
        (task, queues, updates, requests_tx, peers)
    }

    /// Nothing reaches the reconciler before the start-up gate; then the whole state once,
    /// then only each batch's operations, and a whole copy again when the reconciler asks.
    #[tokio::test]
    async fn the_reconciler_gets_one_full_state_then_operations() {
        let (task, queues, mut updates, requests_tx, peers) = view_task(16, 16);
        let inputs_tx = queues.sender(&c1());
        let handle = tokio::spawn(task.run());

        inputs_tx.send(endpoint("10.1.1.5")).await.unwrap();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(updates.try_recv().is_err(), "nothing before the gate");
        assert!(
            peers.borrow().is_none(),
            "no nodes for the route owner before the gate"
        );

        for kind in [
            ResourceKind::Nodes,
            ResourceKind::Ipcache,
            ResourceKind::Identities,
        ] {
            inputs_tx
                .send(event(EventKind::Synced(kind)))
                .await
                .unwrap();
        }
        match updates.recv().await.unwrap() {
            DatapathUpdate::Full { desired, counts } => {
                assert!(desired
                    .ipcache
                    .contains_key(&"10.1.1.5/32".parse().unwrap()));
                assert_eq!(counts.ipcache, desired.ipcache.len());
            }
            other => panic!("expected the whole state first, got {other:?}"),
        }
        // Published before the whole state went (no other node here: an empty list).
        assert_eq!(peers.borrow().as_deref().map(Vec::len), Some(0));

        inputs_tx.send(endpoint("10.1.1.6")).await.unwrap();
        match updates.recv().await.unwrap() {
            DatapathUpdate::Changes {
                ops, service_ops, ..
            } => {
                assert!(service_ops.is_empty());
                assert!(
                    matches!(ops.as_slice(), [DatapathOp::UpsertIpcache { prefix, .. }] if *prefix == "10.1.1.6/32".parse::<ipnet::IpNet>().unwrap()),
                    "{ops:?}"
                );
            }
            other => panic!("expected one operation, got {other:?}"),
        }

        requests_tx.send(()).await.unwrap();
        match updates.recv().await.unwrap() {
            DatapathUpdate::Full { desired, .. } => {
                assert!(desired
                    .ipcache
                    .contains_key(&"10.1.1.6/32".parse().unwrap()));
            }
            other => panic!("expected a whole copy on request, got {other:?}"),
        }

        // The reconciler's request end gone, then the inputs: the task ends.
        drop(requests_tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop((inputs_tx, queues));
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("the view task ends with its inputs")
            .unwrap();
    }

    /// A flooding cluster's backlog does not delay another cluster's change: with c3's 20,000
    /// entries queued first, c1's one change is in the first batch the reconciler gets, and
    /// every batch is bounded. (One shared channel handed it over after all 20,000.)
    #[tokio::test]
    async fn a_change_is_not_queued_behind_another_clusters_backlog() {
        let flood = 20_000;
        let (task, queues, mut updates, _requests, _peers) = view_task(flood, 1);
        let local = queues.sender(&c1());
        for kind in [
            ResourceKind::Nodes,
            ResourceKind::Ipcache,
            ResourceKind::Identities,
        ] {
            local.send(event(EventKind::Synced(kind))).await.unwrap();
        }
        let c3 = ClusterName::new("c3").unwrap();
        let remote = queues.sender(&c3);
        let c3_event = |kind| ViewInput::Cluster(ClusterEvent::new(c3.clone(), kind));
        remote
            .send(c3_event(EventKind::ClusterConfig(
                meshd_state::ClusterConfig {
                    name: c3.clone(),
                    id: ClusterId::new(3).unwrap(),
                    capabilities: Default::default(),
                    routing_mode: Default::default(),
                },
            )))
            .await
            .unwrap();
        remote
            .send(c3_event(EventKind::UpsertNode(meshd_state::NodeRecord {
                name: "n1".into(),
                cluster: c3.clone(),
                cluster_id: ClusterId::new(3).unwrap(),
                node_ip: "192.168.3.1".parse().unwrap(),
                pod_cidrs: vec!["10.3.0.0/16".parse().unwrap()],
                labels: Default::default(),
                boot_id: "b".into(),
            })))
            .await
            .unwrap();
        let handle = tokio::spawn(task.run());
        match updates.recv().await.unwrap() {
            DatapathUpdate::Full { .. } => {}
            other => panic!("expected the whole state first, got {other:?}"),
        }

        // c3's backlog, all queued before c1's change: the view task runs on this thread only
        // once the test waits (unconstrained: no yield for the cooperative budget).
        tokio::task::unconstrained(async {
            for n in 0..flood as u32 {
                let ip =
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 3, 0, 0)) + n);
                remote
                    .send(c3_event(EventKind::UpsertIpcache(IpcacheEntry {
                        prefix: std::net::IpAddr::from(ip).into(),
                        identity: NumericIdentity::new((3 << 16) | 300).unwrap(),
                        host_ip: "192.168.3.1".parse().unwrap(),
                        endpoint: None,
                        namespace: None,
                    })))
                    .await
                    .unwrap();
            }
            local.send(endpoint("10.1.1.7")).await.unwrap();
        })
        .await;
        let wanted: ipnet::IpNet = "10.1.1.7/32".parse().unwrap();

        let mut c3_writes_before = 0;
        let mut batches = 0;
        let with_it = loop {
            let update = tokio::time::timeout(Duration::from_secs(30), updates.recv())
                .await
                .expect("a batch within 30 s")
                .expect("the view task runs");
            let DatapathUpdate::Changes { ops, .. } = update else {
                panic!("expected changes, got {update:?}");
            };
            batches += 1;
            assert!(
                ops.len() <= BATCH + crate::inputs::PER_TURN,
                "a batch of {} writes",
                ops.len()
            );
            if ops.iter().any(
                |op| matches!(op, DatapathOp::UpsertIpcache { prefix, .. } if *prefix == wanted),
            ) {
                break ops.len() - 1;
            }
            c3_writes_before += ops.len();
        };
        assert_eq!(
            (batches, c3_writes_before),
            (1, 0),
            "c1's change came after {c3_writes_before} of c3's {flood} writes"
        );
        // And in a batch with one turn of c3's, not one that c3's further turns filled: the
        // reconciler writes the whole batch before c1's change is in the maps.
        assert!(
            with_it <= crate::inputs::PER_TURN,
            "c1's change went out with {with_it} of c3's writes"
        );
        handle.abort();
    }
}
