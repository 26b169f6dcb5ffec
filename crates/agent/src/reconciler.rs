//! The one task that owns the eBPF maps.
//!
//! Inputs: the view task's [`DatapathUpdate`]s, and this node's endpoints (ENDPOINTS) as a
//! `watch` channel from the endpoint manager.
//!
//! Incremental: each [`DatapathUpdate::Changes`] holds the exact operations of a batch of
//! events (the view computes them), applied as they come, so an ipcache or node event costs
//! one map write whatever the size of the mesh. Level-triggered where it matters: a full
//! read-back diff ([`DatapathUpdate::Full`], diffed against the maps read back through
//! `meshd_datapath`'s typed seam) runs at start (entries that are right are left untouched, so
//! an agent restart does not flap, and stale ones go), after any failed write, and on a slow
//! safety-net timer. What the safety net has to fix is counted as corrections, which should
//! stay 0: anything else means an incremental operation went missing. A failed write (map
//! full, kernel error) is counted, shown in status and retried by the next full diff; it never
//! stops the other writes of its batch.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use meshd_datapath::{ipv4_only, DatapathError, DatapathMaps, LocalEndpoint};
use meshd_mesh::{diff, diff_services, DatapathOp, DesiredCounts, DesiredDatapath, ServiceOp};
use tokio::sync::{mpsc, watch};

use crate::metrics::PropagationDelay;
use crate::now_ms;
use crate::view_task::DatapathUpdate;
use meshd_telemetry::propagation::Propagated;

/// This node's endpoints as the ENDPOINTS map should hold them, with a generation number the
/// endpoint manager waits on ("my change is in the maps").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalEndpoints {
    pub generation: u64,
    pub endpoints: BTreeMap<Ipv4Addr, LocalEndpoint>,
}

/// What the reconciler reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileStatus {
    /// Highest [`LocalEndpoints::generation`] fully in the maps.
    pub endpoints_generation: u64,
    /// Batches applied (incremental or full).
    pub rounds: u64,
    pub ops_applied: u64,
    pub last_round_ms: u64,
    pub last_error: Option<String>,
    pub ipcache_entries: usize,
    pub node_entries: usize,
    pub policy_entries: usize,
    pub endpoint_entries: usize,
    /// Service frontends in SERVICES.
    pub service_entries: usize,
    /// Full read-back diffs run (start, after failed writes, safety net).
    pub full_diffs: u64,
    /// Writes the safety-net diff had to make: maps that differed from what the incremental
    /// operations should have left. Stays 0 unless something is wrong.
    pub corrections: u64,
    /// Writes that failed (each retried by a full diff).
    pub failed_writes: u64,
}

/// Pause after a failed write before the full diff retries it.
const RETRY: Duration = Duration::from_secs(1);
/// Batches with at least this many writes are written off the runtime's worker (see
/// [`meshd_kvstore::off_the_worker`]); smaller ones, an event's few writes, cost less than
/// the hand-off.
const BIG_BATCH: usize = 256;
/// Batches with at least this many writes return freed heap to the system afterwards.
const BIG_ROUND: usize = 10_000;

/// Why a full diff was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FullDiff {
    Start,
    AfterFailure,
    SafetyNet,
}

pub struct Reconciler {
    pin_dir: PathBuf,
    maps: DatapathMaps,
    applied_endpoints: BTreeMap<Ipv4Addr, LocalEndpoint>,
    status: ReconcileStatus,
    /// The full diff the next [`DatapathUpdate::Full`] is for; `Start` until the first.
    next_full: Option<FullDiff>,
    /// A write of the view's maps failed since the last full diff.
    dirty: bool,
    /// An ENDPOINTS write failed: the endpoints are driven again after a pause.
    endpoints_dirty: bool,
    /// Observed once per cluster event whose incremental writes all went through.
    propagation_delay: PropagationDelay,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Outcome of applying a list of operations.
#[derive(Debug, Default)]
struct Writes {
    applied: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Writes {
    fn record(&mut self, result: Result<(), DatapathError>, what: &dyn std::fmt::Debug) {
        match result {
            Ok(()) => self.applied += 1,
            Err(e) => {
                tracing::warn!(error = %e, op = ?what, "datapath write failed; the next full diff retries it");
                self.failed += 1;
                self.first_error.get_or_insert(e.to_string());
            }
        }
    }
}

impl Reconciler {
    pub fn open(pin_dir: PathBuf) -> Result<Self, ReconcileError> {
        let mut maps = DatapathMaps::open(&pin_dir)?;
        // The start-up settings are written before the reconciler opens the maps, and nothing
        // writes CONFIG after that but this map owner: its forward revision bump per round
        // need not read CONFIG back first.
        maps.own_config();
        Ok(Self {
            pin_dir,
            maps,
            applied_endpoints: BTreeMap::new(),
            status: ReconcileStatus::default(),
            next_full: Some(FullDiff::Start),
            dirty: false,
            endpoints_dirty: false,
            propagation_delay: PropagationDelay::default(),
        })
    }

    /// The histogram this reconciler observes into (for `/metrics`).
    pub fn propagation_delay(&self) -> PropagationDelay {
        self.propagation_delay.clone()
    }

    /// Applies operations in order. A failed write does not stop the others, except that a
    /// service whose slot failed gets no further write in this batch (its count must not cover
    /// a slot that is not there); the full diff puts it right.
    fn write(&mut self, ops: &[DatapathOp], service_ops: &[ServiceOp]) -> Writes {
        let mut w = Writes::default();
        for op in ops {
            w.record(self.maps.apply(op), op);
        }
        let mut broken = Vec::new();
        for op in service_ops {
            let frontend = match op {
                ServiceOp::UpsertBackend { slot, .. } | ServiceOp::DeleteBackend { slot } => {
                    slot.frontend
                }
                ServiceOp::UpsertService { frontend, .. }
                | ServiceOp::DeleteService { frontend } => *frontend,
            };
            if broken.contains(&frontend) {
                w.failed += 1;
                continue;
            }
            let before = w.failed;
            w.record(self.maps.apply_service(op), op);
            if w.failed > before {
                broken.push(frontend);
            }
        }
        w
    }

    /// Reads the maps back and drives them to `desired`. Returns the writes it made.
    fn full_diff(&mut self, desired: &DesiredDatapath, why: FullDiff) -> Writes {
        let actual = match self.maps.read_back() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(pin_dir = %self.pin_dir.display(), error = %e, "reading the maps back failed; retrying");
                return Writes {
                    failed: 1,
                    first_error: Some(e.to_string()),
                    ..Writes::default()
                };
            }
        };
        let desired = ipv4_only(desired);
        let ops = diff(&actual, &desired);
        let service_ops = diff_services(&actual.services, &desired.services);
        drop(actual);
        let w = self.write(&ops, &service_ops);
        self.status.full_diffs += 1;
        if why == FullDiff::SafetyNet {
            self.status.corrections += w.applied;
            if w.applied > 0 {
                tracing::error!(corrections = w.applied, "the safety-net diff found maps differing from the view: an incremental write went missing");
            }
        }
        tracing::info!(
            ?why,
            writes = w.applied,
            failed = w.failed,
            "full diff of the maps"
        );
        w
    }

    /// Applies one update from the view task.
    fn update(&mut self, update: DatapathUpdate) {
        // One forward revision bump for the whole round (in `finish`), not one per write: two
        // CONFIG syscalls per ipcache write would slow an initial sync by about a third.
        self.maps.defer_forward_revision();
        let mut received = Vec::new();
        let mut write_start = SystemTime::now();
        let (w, counts) = match update {
            DatapathUpdate::Full { desired, counts } => {
                let mut why = self.next_full.take().unwrap_or(FullDiff::SafetyNet);
                // A write failed while the safety net's copy was on its way: this diff is the
                // retry, and what it writes is no correction.
                if self.dirty && why == FullDiff::SafetyNet {
                    why = FullDiff::AfterFailure;
                }
                self.dirty = false;
                // Reading 500k entries back and writing the difference takes seconds of
                // syscalls: off the runtime's worker (the agent runs one, see `crate::run`),
                // whose other tasks (the view, the API, lease keep-alives) go on meanwhile.
                let w = meshd_kvstore::off_the_worker(|| self.full_diff(&desired, why));
                (w, counts)
            }
            DatapathUpdate::Changes {
                ops,
                service_ops,
                counts,
                received: batch,
            } => {
                received = batch;
                write_start = SystemTime::now();
                let w = if ops.len() + service_ops.len() >= BIG_BATCH {
                    // A flood's batch: the view goes on with the next one meanwhile.
                    meshd_kvstore::off_the_worker(|| self.write(&ops, &service_ops))
                } else {
                    self.write(&ops, &service_ops)
                };
                (w, counts)
            }
        };
        // A batch with a failed write reaches the maps with a later full diff: not timed.
        let timed = w.failed == 0;
        let writes = w.applied;
        self.finish(w, Some(counts));
        if timed {
            let (now, now_sys) = (Instant::now(), SystemTime::now());
            for r in received {
                self.propagation_delay.observe(r.at);
                if let Some((cluster, change)) = &r.traced {
                    meshd_telemetry::propagation::record(&Propagated {
                        cluster: cluster.as_str(),
                        change,
                        received: now_sys - now.saturating_duration_since(r.at),
                        write_start,
                        write_end: now_sys,
                        batch_writes: writes,
                    });
                }
            }
        }
    }

    fn finish(&mut self, mut w: Writes, counts: Option<DesiredCounts>) {
        if let Err(e) = self.maps.flush_forward_revision() {
            // Forwarding answers cached in conntrack may be stale until a bump goes through:
            // the maps keep it pending, and the full diff this failure asks for retries it.
            w.failed += 1;
            w.first_error.get_or_insert(e.to_string());
            self.dirty = true;
        }
        self.status.rounds += 1;
        self.status.last_round_ms = now_ms();
        self.status.ops_applied += w.applied;
        self.status.failed_writes += w.failed;
        if let Some(c) = counts {
            self.status.ipcache_entries = c.ipcache;
            self.status.node_entries = c.nodes;
            self.status.policy_entries = c.policy;
            self.status.service_entries = c.services;
        }
        self.status.endpoint_entries = self.applied_endpoints.len();
        if w.failed > 0 {
            // Only the view's maps are retried by a full diff; ENDPOINTS by `endpoints`.
            self.dirty |= counts.is_some();
            self.status.last_error = w.first_error;
        } else if !self.dirty {
            self.status.last_error = None;
        }
        if w.applied >= BIG_ROUND as u64 {
            // A big batch (an initial sync) leaves freed snapshots and op lists behind; glibc
            // keeps such memory mapped unless asked, which shows as resident memory for good.
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Drives ENDPOINTS to `endpoints` (this node's, a few hundred at most, so a diff).
    fn endpoints(&mut self, endpoints: &LocalEndpoints) {
        // Generation 0: the endpoint manager has not recovered this node's endpoints yet (agent
        // start); what the map holds stays until it has, or a restart would cut local traffic.
        if endpoints.generation == 0 {
            return;
        }
        self.maps.defer_forward_revision();
        let mut w = Writes::default();
        // Add and change first, then remove (the order of the other maps too).
        for (ip, ep) in &endpoints.endpoints {
            if self.applied_endpoints.get(ip) == Some(ep) {
                continue;
            }
            let result = self.maps.upsert_endpoint(*ip, *ep);
            if result.is_ok() {
                self.applied_endpoints.insert(*ip, *ep);
            }
            w.record(result, ip);
        }
        let stale: Vec<Ipv4Addr> = self
            .applied_endpoints
            .keys()
            .filter(|ip| !endpoints.endpoints.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            let result = self.maps.delete_endpoint(ip);
            if result.is_ok() {
                self.applied_endpoints.remove(&ip);
            }
            w.record(result, &ip);
        }
        if w.failed == 0 {
            self.status.endpoints_generation = endpoints.generation;
        }
        // ENDPOINTS is retried from `applied_endpoints` (what is known written), not by the
        // full diff of the view's maps.
        self.endpoints_dirty = w.failed > 0;
        self.finish(w, None);
    }

    /// What ENDPOINTS holds: values are not read back, since rewriting an identical value is
    /// an atomic replace no packet notices, so every wanted endpoint is simply upserted again.
    fn read_back_endpoints(&mut self) {
        match self.maps.endpoint_addrs() {
            Ok(addrs) => {
                self.applied_endpoints = addrs
                    .into_iter()
                    .map(|ip| {
                        (
                            ip,
                            LocalEndpoint {
                                ifindex: 0,
                                identity: 0,
                                mac: [0; 6],
                                node_mac: [0; 6],
                            },
                        )
                    })
                    .collect();
            }
            Err(e) => {
                tracing::error!(pin_dir = %self.pin_dir.display(), error = %e, "reading ENDPOINTS back failed; assuming it is empty");
            }
        }
    }

    /// Runs until the view task and the endpoint manager are gone (the agent is shutting down).
    pub async fn run(
        mut self,
        mut updates: mpsc::Receiver<DatapathUpdate>,
        full_requests: mpsc::Sender<()>,
        mut endpoints: watch::Receiver<std::sync::Arc<LocalEndpoints>>,
        status: watch::Sender<ReconcileStatus>,
        // The safety net's period (`resync_interval_secs`, 300 s by default): reading 500k
        // entries back takes a second or more of syscalls, during which nothing else is
        // applied, so it is a backstop, not a path.
        resync: Duration,
    ) {
        self.read_back_endpoints();
        self.status.endpoint_entries = self.applied_endpoints.len();
        let mut safety_net = tokio::time::interval(resync);
        safety_net.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        safety_net.tick().await;
        loop {
            status.send_replace(self.status.clone());
            let retry = async {
                if self.endpoints_dirty || (self.dirty && self.next_full.is_none()) {
                    tokio::time::sleep(RETRY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                u = updates.recv() => match u {
                    Some(u) => self.update(u),
                    None => return,
                },
                r = endpoints.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let e = endpoints.borrow_and_update().clone();
                    self.endpoints(&e);
                }
                _ = retry => {
                    if self.endpoints_dirty {
                        let e = endpoints.borrow().clone();
                        self.endpoints(&e);
                    }
                    if self.dirty {
                        self.ask_full(&full_requests, FullDiff::AfterFailure);
                    }
                }
                _ = safety_net.tick() => {
                    if self.next_full.is_none() {
                        self.ask_full(&full_requests, FullDiff::SafetyNet);
                    }
                }
            }
        }
    }

    fn ask_full(&mut self, requests: &mpsc::Sender<()>, why: FullDiff) {
        // One request at a time: the view task answers each with one full copy.
        if requests.try_send(()).is_ok() {
            self.next_full = Some(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use meshd_mesh::{Direction, IpProto, IpcacheTarget, PolicyKey, PolicyValue, Verdict};
    use meshd_state::{ClusterId, NumericIdentity};

    use super::*;

    fn id(n: u32) -> NumericIdentity {
        NumericIdentity::new(n).unwrap()
    }

    fn remote(identity: u32, host: [u8; 4]) -> IpcacheTarget {
        IpcacheTarget {
            identity: id(identity),
            tunnel_endpoint: Some(IpAddr::from(host)),
            local: false,
        }
    }

    fn full(desired: &DesiredDatapath) -> DatapathUpdate {
        DatapathUpdate::Full {
            desired: Box::new(desired.clone()),
            counts: DesiredCounts::default(),
        }
    }

    fn scratch(
        name: &str,
    ) -> Option<(
        meshd_datapath::bpffs::ScratchPinDir,
        meshd_datapath::Datapath,
    )> {
        if !(meshd_testing::require_root() && meshd_testing::require_bpffs()) {
            return None;
        }
        let pin =
            meshd_datapath::bpffs::ScratchPinDir::new(std::path::Path::new("/sys/fs/bpf"), name)
                .unwrap();
        let datapath = meshd_datapath::Datapath::load(pin.path()).unwrap();
        Some((pin, datapath))
    }

    /// Real pinned maps: the start-up full diff removes what is not wanted, adds what is
    /// missing and rewrites nothing that is right; a second full diff does nothing; ENDPOINTS
    /// is left alone until the endpoint manager has spoken (generation > 0).
    #[test]
    fn start_up_reconciliation_against_pinned_maps() {
        let Some((pin, _datapath)) = scratch("meshd-agent-reconciler") else {
            return;
        };
        let c2 = (2 << 16) | 300;
        {
            let mut maps = DatapathMaps::open(pin.path()).unwrap();
            let e = |host: [u8; 4]| remote(c2, host);
            maps.upsert_ipcache("10.2.0.5/32".parse().unwrap(), e([192, 168, 0, 2]))
                .unwrap();
            maps.upsert_ipcache("10.2.0.6/32".parse().unwrap(), e([192, 168, 0, 2]))
                .unwrap();
            maps.upsert_node([192, 168, 0, 2].into(), 2).unwrap();
            maps.upsert_node([192, 168, 0, 3].into(), 2).unwrap();
            maps.upsert_endpoint(
                [10, 1, 0, 9].into(),
                LocalEndpoint {
                    ifindex: 7,
                    identity: (1 << 16) | 300,
                    mac: [2, 0, 0, 0, 0, 1],
                    node_mac: [2, 0, 0, 0, 0, 2],
                },
            )
            .unwrap();
        }
        let mut desired = DesiredDatapath::default();
        desired
            .ipcache
            .insert("10.2.0.5/32".parse().unwrap(), remote(c2, [192, 168, 0, 2]));
        desired
            .ipcache
            .insert("10.2.0.7/32".parse().unwrap(), remote(c2, [192, 168, 0, 2]));
        desired
            .nodes
            .insert([192, 168, 0, 2].into(), ClusterId::new(2).unwrap());

        let mut r = Reconciler::open(pin.path().to_owned()).unwrap();
        let actual = r.maps.read_back().unwrap();
        assert_eq!(actual.ipcache.len(), 2);
        assert_eq!(actual.nodes.len(), 2);
        let not_yet = LocalEndpoints::default();
        r.update(full(&desired));
        r.endpoints(&not_yet);
        assert_eq!(r.status.failed_writes, 0);
        // Delete 10.2.0.6, add 10.2.0.7, delete node .3: nothing else was written.
        assert_eq!(r.status.ops_applied, 3);
        assert_eq!(
            r.status.corrections, 0,
            "the start-up diff is no correction"
        );
        let maps = DatapathMaps::open(pin.path()).unwrap();
        let mut prefixes = maps.ipcache_prefixes().unwrap();
        prefixes.sort();
        assert_eq!(
            prefixes,
            vec![
                "10.2.0.5/32".parse().unwrap(),
                "10.2.0.7/32".parse().unwrap()
            ]
        );
        assert_eq!(
            maps.endpoint_addrs().unwrap().len(),
            1,
            "ENDPOINTS touched too early"
        );

        r.update(full(&desired));
        assert_eq!(r.status.failed_writes, 0);
        assert_eq!(
            r.status.ops_applied, 3,
            "a second round must change nothing"
        );

        // Once the manager has recovered (none here), stale endpoints go.
        let recovered = LocalEndpoints {
            generation: 1,
            endpoints: BTreeMap::new(),
        };
        r.read_back_endpoints();
        r.endpoints(&recovered);
        assert_eq!(r.status.failed_writes, 0);
        assert!(maps.endpoint_addrs().unwrap().is_empty());
        assert_eq!(r.status.endpoints_generation, 1);

        // Until the view is complete nothing comes from the view task (its start-up gate); an
        // empty batch leaves the maps as they are.
        r.update(DatapathUpdate::Changes {
            ops: Vec::new(),
            service_ops: Vec::new(),
            counts: DesiredCounts::default(),
            received: Vec::new(),
        });
        assert_eq!(r.status.failed_writes, 0);
        assert_eq!(maps.ipcache_prefixes().unwrap().len(), 2);
    }

    /// A write that fails is counted and shown, does not stop the rest of its batch, and is
    /// retried by the next full diff; the safety net counts what it had to correct.
    #[test]
    fn a_failed_write_is_counted_and_does_not_stop_the_batch() {
        let Some((pin, _datapath)) = scratch("meshd-agent-reconciler-fail") else {
            return;
        };
        let mut r = Reconciler::open(pin.path().to_owned()).unwrap();
        let c2 = (2 << 16) | 300;
        let a: ipnet::IpNet = "10.2.0.5/32".parse().unwrap();
        let b: ipnet::IpNet = "10.2.0.6/32".parse().unwrap();
        // A port without a protocol: the datapath refuses to encode it.
        let bad = PolicyKey {
            subject: id((1 << 16) | 300),
            peer: None,
            proto: None,
            dport: Some(80),
            direction: Direction::Ingress,
        };
        let good = PolicyKey {
            proto: Some(IpProto::Tcp),
            ..bad
        };
        let allow = PolicyValue {
            verdict: Verdict::Allow,
            cookie: 1,
        };
        r.update(full(&DesiredDatapath::default()));
        r.update(DatapathUpdate::Changes {
            ops: vec![
                DatapathOp::UpsertIpcache {
                    prefix: a,
                    target: remote(c2, [192, 168, 0, 2]),
                },
                DatapathOp::UpsertPolicy {
                    key: bad,
                    value: allow,
                },
                DatapathOp::UpsertIpcache {
                    prefix: b,
                    target: remote(c2, [192, 168, 0, 2]),
                },
            ],
            service_ops: Vec::new(),
            counts: DesiredCounts::default(),
            received: vec![crate::view_task::Received {
                at: Instant::now(),
                traced: None,
            }],
        });
        assert_eq!(r.status.failed_writes, 1);
        // Part of the batch reaches the maps only with the full diff: its event is not timed.
        assert_eq!(r.propagation_delay().count(), 0);
        assert!(r
            .status
            .last_error
            .as_deref()
            .unwrap()
            .contains("needs a protocol"));
        assert!(r.dirty, "a full diff is due");
        let maps = DatapathMaps::open(pin.path()).unwrap();
        assert_eq!(
            maps.ipcache_prefixes().unwrap().len(),
            2,
            "the rest was written"
        );

        // The view meanwhile holds the valid rule: the full diff after the failure writes it
        // and clears the error.
        r.next_full = Some(FullDiff::AfterFailure);
        let mut desired = DesiredDatapath::default();
        desired.ipcache.insert(a, remote(c2, [192, 168, 0, 2]));
        desired.ipcache.insert(b, remote(c2, [192, 168, 0, 2]));
        desired.policy.insert(good, allow);
        r.update(full(&desired));
        assert_eq!(r.status.failed_writes, 1);
        assert!(!r.dirty);
        assert_eq!(r.status.last_error, None);
        assert_eq!(r.status.corrections, 0);
        assert_eq!(maps.policy_entries().unwrap().len(), 1);

        // Something changed behind the agent's back: the safety net puts it right and counts.
        let mut raw = DatapathMaps::open(pin.path()).unwrap();
        raw.delete_ipcache("10.2.0.5/32".parse().unwrap()).unwrap();
        r.next_full = Some(FullDiff::SafetyNet);
        r.update(full(&desired));
        assert_eq!(r.status.corrections, 1);
        assert_eq!(maps.ipcache_prefixes().unwrap().len(), 2);
        assert_eq!(r.status.full_diffs, 3);
        assert_eq!(r.propagation_delay().count(), 0, "full diffs are not timed");

        // An event whose writes all go through is timed once.
        r.update(one_ipcache_change("10.2.0.7/32", c2, None));
        assert_eq!(r.status.failed_writes, 1);
        assert_eq!(r.propagation_delay().count(), 1);
    }

    /// One received event's one ipcache write (a remote endpoint of `identity`).
    fn one_ipcache_change(
        prefix: &str,
        identity: u32,
        traced: Option<(meshd_state::ClusterName, &'static str)>,
    ) -> DatapathUpdate {
        DatapathUpdate::Changes {
            ops: vec![DatapathOp::UpsertIpcache {
                prefix: prefix.parse().unwrap(),
                target: remote(identity, [192, 168, 0, 2]),
            }],
            service_ops: Vec::new(),
            counts: DesiredCounts::default(),
            received: vec![crate::view_task::Received {
                at: Instant::now(),
                traced,
            }],
        }
    }

    /// With an exporter configured, a change whose writes went through is one trace: the
    /// etcd event and the map write under one root, named by its cluster and change.
    #[test]
    fn a_written_change_is_exported_as_one_trace() {
        let Some((pin, _datapath)) = scratch("meshd-agent-reconciler-trace") else {
            return;
        };
        let collector = meshd_telemetry::propagation::Collector::install_global();
        let mut r = Reconciler::open(pin.path().to_owned()).unwrap();
        r.update(full(&DesiredDatapath::default()));
        r.update(one_ipcache_change(
            "10.9.0.5/32",
            (9 << 16) | 300,
            Some((
                meshd_state::ClusterName::new("c9").unwrap(),
                "ipcache upsert",
            )),
        ));
        assert_eq!(r.status.failed_writes, 0);
        let spans = collector.finished();
        let c9 = ("meshd.cluster".to_owned(), "c9".to_owned());
        let roots: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "meshd.propagation" && s.attributes.contains(&c9))
            .collect();
        assert_eq!(roots.len(), 1, "{spans:#?}");
        let root = roots[0];
        assert!(
            root.attributes
                .contains(&("meshd.change".into(), "ipcache upsert".into())),
            "{root:?}"
        );
        let mut children: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent_span_id == root.span_id)
            .map(|s| s.name.as_str())
            .collect();
        children.sort();
        assert_eq!(children, ["datapath.map_write", "etcd.watch_event"]);
        assert!(root.start <= root.end);
    }

    #[test]
    fn ipv6_stays_out_of_the_maps() {
        let mut d = DesiredDatapath::default();
        let id = NumericIdentity::new((1 << 16) | 300).unwrap();
        d.ipcache.insert(
            "10.1.0.5/32".parse().unwrap(),
            IpcacheTarget {
                identity: id,
                tunnel_endpoint: Some("192.168.0.1".parse().unwrap()),
                local: false,
            },
        );
        d.ipcache.insert(
            "fd00::5/128".parse().unwrap(),
            IpcacheTarget {
                identity: id,
                tunnel_endpoint: Some("192.168.0.1".parse().unwrap()),
                local: false,
            },
        );
        d.ipcache.insert(
            "10.1.0.6/32".parse().unwrap(),
            IpcacheTarget {
                identity: id,
                tunnel_endpoint: Some("fd00::1".parse().unwrap()),
                local: false,
            },
        );
        d.nodes
            .insert("fd00::1".parse().unwrap(), ClusterId::new(1).unwrap());
        d.nodes
            .insert("192.168.0.1".parse().unwrap(), ClusterId::new(1).unwrap());
        let v4 = ipv4_only(&d);
        assert_eq!(v4.ipcache.len(), 1);
        assert_eq!(v4.nodes.len(), 1);
    }
}
