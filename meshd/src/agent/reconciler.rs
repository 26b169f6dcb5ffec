//! The one task that owns the eBPF maps.
//!
//! Inputs are two `watch` channels: the merged view's desired state (ipcache, nodes, policy) and
//! this node's endpoints (ENDPOINTS map). `watch` keeps only the latest value, so a burst of
//! changes is applied as one batch. Level-triggered: on start the maps are read back into an
//! "applied" state and diffed against the desired one, so entries that are right are left
//! untouched (no flapping across agent restarts) and stale ones removed; every later round
//! diffs applied against desired again. A failed write leaves that entry un-applied and the
//! round is retried after a pause; a periodic resync re-reads the maps to repair anything
//! changed behind our back.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ipnet::IpNet;
use meshd_datapath::{DatapathMaps, IpcacheEntry, LocalEndpoint, PolicyEntry};
use meshd_ebpf::abi;
use meshd_mesh::{
    diff, DatapathOp, DesiredDatapath, DesiredServices, Direction, IpProto, IpcacheTarget,
    PolicyKey, PolicyValue, Verdict,
};
use meshd_state::{ClusterId, NumericIdentity};
use tokio::sync::watch;

use crate::agent::{now_ms, services};

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
}

const RETRY: Duration = Duration::from_secs(1);
/// Rounds with at least this many writes return freed heap to the system afterwards.
const BIG_ROUND: usize = 10_000;
const RESYNC: Duration = Duration::from_secs(60);

pub struct Reconciler {
    pin_dir: PathBuf,
    maps: DatapathMaps,
    nodes: BpfHashMap<MapData, abi::NodeKey, abi::NodeValue>,
    policy: BpfHashMap<MapData, abi::PolicyKey, abi::PolicyValue>,
    applied: DesiredDatapath,
    applied_endpoints: BTreeMap<Ipv4Addr, LocalEndpoint>,
    /// SERVICES and BACKENDS as written (see `agent::services`).
    applied_services: DesiredServices,
    status: ReconcileStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] meshd_datapath::DatapathError),
    #[error("map {map} pinned at {path}: {reason}")]
    Map {
        map: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// DatapathMaps has no listing of NODES and POLICY values (markers included), which the
/// start-up diff needs; those two are opened here as well, read-only in spirit.
fn open_raw<K: aya::Pod, V: aya::Pod>(
    pin_dir: &std::path::Path,
    map: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, ReconcileError> {
    let path = pin_dir.join("maps").join(map);
    let err = |reason: String| ReconcileError::Map {
        map,
        path: path.clone(),
        reason,
    };
    let data = MapData::from_pin(&path).map_err(|e| err(e.to_string()))?;
    let map_ = Map::from_map_data(data).map_err(|e| err(e.to_string()))?;
    BpfHashMap::try_from(map_).map_err(|e| err(e.to_string()))
}

impl Reconciler {
    pub fn open(pin_dir: PathBuf) -> Result<Self, ReconcileError> {
        let maps = DatapathMaps::open(&pin_dir)?;
        let nodes = open_raw(&pin_dir, meshd_ebpf::maps::NODES)?;
        let policy = open_raw(&pin_dir, meshd_ebpf::maps::POLICY)?;
        Ok(Self {
            pin_dir,
            maps,
            nodes,
            policy,
            applied: DesiredDatapath::default(),
            applied_endpoints: BTreeMap::new(),
            applied_services: DesiredServices::default(),
            status: ReconcileStatus::default(),
        })
    }

    /// Reads what the maps hold into `applied`. Entries that cannot be expressed as desired
    /// state (an invalid identity, a cluster id of 0) are deleted right away: nothing would
    /// ever want them.
    fn read_back(&mut self) -> Result<(), ReconcileError> {
        let mut actual = DesiredDatapath::default();
        for prefix in self.maps.ipcache_prefixes()? {
            let Some(entry) = self.maps.ipcache_entry(prefix)? else {
                continue;
            };
            match NumericIdentity::new(entry.identity) {
                Ok(identity) => {
                    actual.ipcache.insert(
                        IpNet::V4(prefix),
                        IpcacheTarget {
                            identity,
                            tunnel_endpoint: entry.tunnel_endpoint.map(IpAddr::V4),
                            local: entry.flags & abi::IPCACHE_F_LOCAL != 0,
                        },
                    );
                }
                Err(_) => self.maps.delete_ipcache(prefix)?,
            }
        }
        let nodes: Vec<(abi::NodeKey, abi::NodeValue)> =
            self.nodes.iter().filter_map(Result::ok).collect();
        for (k, v) in nodes {
            let ip = abi::ip_from_be(k.addr);
            match ClusterId::new(v.cluster_id) {
                Ok(id) => {
                    actual.nodes.insert(IpAddr::V4(ip), id);
                }
                Err(_) => self.maps.delete_node(ip)?,
            }
        }
        let policy: Vec<(abi::PolicyKey, abi::PolicyValue)> =
            self.policy.iter().filter_map(Result::ok).collect();
        for (k, v) in policy {
            let direction = if k.direction & !abi::POLICY_F_MARKER == abi::DIR_EGRESS {
                Direction::Egress
            } else {
                Direction::Ingress
            };
            let Ok(subject) = NumericIdentity::new(k.subject_identity) else {
                let _ = self.policy.remove(&k);
                continue;
            };
            if k.direction & abi::POLICY_F_MARKER != 0 {
                actual.policy_enabled.insert((subject, direction));
                continue;
            }
            let peer = match k.peer_identity {
                0 => None,
                n => match NumericIdentity::new(n) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        let _ = self.policy.remove(&k);
                        continue;
                    }
                },
            };
            let proto = match k.proto {
                0 => None,
                n => match IpProto::from_number(n) {
                    Some(p) => Some(p),
                    None => {
                        let _ = self.policy.remove(&k);
                        continue;
                    }
                },
            };
            let verdict = match v.verdict {
                abi::VERDICT_DENY => Verdict::Deny,
                _ => Verdict::Allow,
            };
            actual.policy.insert(
                PolicyKey {
                    subject,
                    peer,
                    proto,
                    dport: (k.dport != 0).then_some(k.dport),
                    direction,
                },
                PolicyValue {
                    verdict,
                    cookie: v.cookie,
                },
            );
        }
        self.applied = actual;
        self.applied_services = services::read_back(&mut self.maps)?;
        // ENDPOINTS values are not read back: rewriting an identical value is an atomic
        // replace that no packet notices, so every wanted endpoint is simply upserted again.
        self.applied_endpoints.clear();
        for ip in self.maps.endpoint_addrs()? {
            self.applied_endpoints.insert(
                ip,
                LocalEndpoint {
                    ifindex: 0,
                    identity: 0,
                    mac: [0; 6],
                    node_mac: [0; 6],
                },
            );
        }
        Ok(())
    }

    /// One round: drive the maps from `applied` to `desired`. Returns the number of failed
    /// writes (0: the maps hold exactly the desired state).
    fn round(&mut self, desired: Option<&DesiredDatapath>, endpoints: &LocalEndpoints) -> usize {
        // Until the view is complete (start-up gate), what the maps hold stays as it is.
        let ops = match desired {
            Some(desired) => diff(&self.applied, &ipv4_only(desired)),
            None => Vec::new(),
        };
        let mut failed = 0;
        let mut first_error = None;
        // One forward revision bump for the whole round (finish_round), not one per write.
        self.maps.defer_forward_revision();
        for op in &ops {
            match self.apply(op) {
                Ok(()) => {
                    self.applied.apply_ops(std::slice::from_ref(op));
                    self.status.ops_applied += 1;
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, ?op, "datapath write failed; will retry");
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        if let Some(desired) = desired {
            let round = services::reconcile(
                &mut self.maps,
                &mut self.applied_services,
                &desired.services,
            );
            self.status.ops_applied += round.applied;
            failed += round.failed;
            if let Some(e) = round.first_error {
                first_error.get_or_insert(e);
            }
        }
        // Generation 0: the endpoint manager has not recovered this node's endpoints yet (agent
        // start); what the map holds stays until it has, or a restart would cut local traffic.
        if endpoints.generation == 0 {
            return self.finish_round(failed, first_error, &ops, endpoints);
        }
        // Endpoints: add and change first, then remove (the order of the other maps too).
        for (ip, ep) in &endpoints.endpoints {
            if self.applied_endpoints.get(ip) == Some(ep) {
                continue;
            }
            match self.maps.upsert_endpoint(*ip, *ep) {
                Ok(()) => {
                    self.applied_endpoints.insert(*ip, *ep);
                    self.status.ops_applied += 1;
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        let stale: Vec<Ipv4Addr> = self
            .applied_endpoints
            .keys()
            .filter(|ip| !endpoints.endpoints.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            match self.maps.delete_endpoint(ip) {
                Ok(()) => {
                    self.applied_endpoints.remove(&ip);
                    self.status.ops_applied += 1;
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        self.finish_round(failed, first_error, &ops, endpoints)
    }

    fn finish_round(
        &mut self,
        mut failed: usize,
        mut first_error: Option<String>,
        ops: &[DatapathOp],
        endpoints: &LocalEndpoints,
    ) -> usize {
        if let Err(e) = self.maps.flush_forward_revision() {
            // Cached forwarding answers may be stale until a round bumps it: retry soon.
            failed += 1;
            first_error.get_or_insert(e.to_string());
        }
        self.status.rounds += 1;
        self.status.last_round_ms = now_ms();
        self.status.ipcache_entries = self.applied.ipcache.len();
        self.status.node_entries = self.applied.nodes.len();
        self.status.policy_entries = self.applied.policy.len();
        self.status.endpoint_entries = self.applied_endpoints.len();
        self.status.service_entries = self.applied_services.services.len();
        if failed == 0 {
            self.status.endpoints_generation = endpoints.generation;
            self.status.last_error = None;
        } else {
            self.status.last_error = first_error;
        }
        if !ops.is_empty() {
            tracing::debug!(ops = ops.len(), failed, "reconciled datapath");
        }

        failed
    }

    fn apply(&mut self, op: &DatapathOp) -> Result<(), meshd_datapath::DatapathError> {
        match *op {
            DatapathOp::UpsertNode { ip, cluster_id } => match ip {
                IpAddr::V4(ip) => self.maps.upsert_node(ip, cluster_id.get()),
                IpAddr::V6(_) => Ok(()),
            },
            DatapathOp::DeleteNode { ip } => match ip {
                IpAddr::V4(ip) => self.maps.delete_node(ip),
                IpAddr::V6(_) => Ok(()),
            },
            DatapathOp::UpsertIpcache { prefix, target } => {
                match (prefix, target.tunnel_endpoint) {
                    (IpNet::V4(prefix), None | Some(IpAddr::V4(_))) => self.maps.upsert_ipcache(
                        prefix,
                        IpcacheEntry {
                            identity: target.identity.get(),
                            tunnel_endpoint: match target.tunnel_endpoint {
                                Some(IpAddr::V4(ip)) => Some(ip),
                                _ => None,
                            },
                            flags: if target.local {
                                abi::IPCACHE_F_LOCAL
                            } else {
                                0
                            },
                        },
                    ),
                    _ => Ok(()),
                }
            }
            DatapathOp::DeleteIpcache { prefix } => match prefix {
                IpNet::V4(prefix) => self.maps.delete_ipcache(prefix),
                IpNet::V6(_) => Ok(()),
            },
            DatapathOp::UpsertPolicy { key, value } => self.maps.upsert_policy(
                policy_entry(&key),
                match value.verdict {
                    Verdict::Allow => meshd_datapath::Verdict::Allow,
                    Verdict::Deny => meshd_datapath::Verdict::Deny,
                },
                value.cookie,
            ),
            DatapathOp::DeletePolicy { key } => self.maps.delete_policy(policy_entry(&key)),
            DatapathOp::EnablePolicy { subject, direction } => {
                self.maps
                    .set_policy_enabled(subject.get(), dp_direction(direction), true)
            }
            DatapathOp::DisablePolicy { subject, direction } => {
                self.maps
                    .set_policy_enabled(subject.get(), dp_direction(direction), false)
            }
        }
    }

    /// Runs until both inputs are closed (the agent is shutting down).
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Arc<DesiredDatapath>>>,
        mut endpoints: watch::Receiver<Arc<LocalEndpoints>>,
        status: watch::Sender<ReconcileStatus>,
    ) {
        if let Err(e) = self.read_back() {
            tracing::error!(pin_dir = %self.pin_dir.display(), error = %e, "reading the pinned maps back failed; assuming they are empty");
        } else {
            tracing::info!(
                ipcache = self.applied.ipcache.len(),
                nodes = self.applied.nodes.len(),
                policy = self.applied.policy.len(),
                endpoints = self.applied_endpoints.len(),
                "read back pinned maps"
            );
        }
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            let d = desired.borrow_and_update().clone();
            let e = endpoints.borrow_and_update().clone();
            let before = self.status.ops_applied;
            let failed = self.round(d.as_deref(), &e);
            if self.status.ops_applied - before >= BIG_ROUND as u64 {
                // A big round (an initial sync) leaves freed snapshots and op lists behind;
                // glibc keeps such memory mapped unless asked, which shows as resident memory
                // for good. SAFETY: malloc_trim only releases free heap memory.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
            status.send_replace(self.status.clone());
            let retry = async {
                if failed > 0 {
                    tokio::time::sleep(RETRY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                r = endpoints.changed() => if r.is_err() { return },
                _ = retry => {}
                _ = resync.tick() => {
                    if let Err(e) = self.read_back() {
                        tracing::warn!(error = %e, "periodic read-back of the maps failed");
                    }
                }
            }
        }
    }
}

fn dp_direction(d: Direction) -> meshd_datapath::Direction {
    match d {
        Direction::Ingress => meshd_datapath::Direction::Ingress,
        Direction::Egress => meshd_datapath::Direction::Egress,
    }
}

fn policy_entry(key: &PolicyKey) -> PolicyEntry {
    PolicyEntry {
        subject: key.subject.get(),
        peer: key.peer.map(NumericIdentity::get),
        proto: key.proto.map(IpProto::number),
        dport: key.dport,
        direction: dp_direction(key.direction),
    }
}

/// The datapath is IPv4 only for now: IPv6 prefixes and nodes stay in the view, not the maps.
pub fn ipv4_only(d: &DesiredDatapath) -> std::borrow::Cow<'_, DesiredDatapath> {
    let v6 = d.ipcache.iter().any(|(p, t)| {
        matches!(p, IpNet::V6(_)) || matches!(t.tunnel_endpoint, Some(IpAddr::V6(_)))
    }) || d.nodes.keys().any(IpAddr::is_ipv6);
    // Without IPv6 (the common case) no copy: at 100k entries a copy per round is megabytes.
    if !v6 {
        return std::borrow::Cow::Borrowed(d);
    }
    let mut out = d.clone();
    out.ipcache.retain(|p, t| {
        matches!(p, IpNet::V4(_)) && !matches!(t.tunnel_endpoint, Some(IpAddr::V6(_)))
    });
    out.nodes.retain(|ip, _| ip.is_ipv4());
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
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

    /// Real pinned maps: start-up reconciliation removes what is not wanted, adds what is
    /// missing and rewrites nothing that is right; a second round does nothing; ENDPOINTS is
    /// left alone until the endpoint manager has spoken (generation > 0).
    #[test]
    fn start_up_reconciliation_against_pinned_maps() {
        if !(meshd_testing::require_root() && meshd_testing::require_bpffs()) {
            return;
        }
        let pin = meshd_datapath::bpffs::ScratchPinDir::new(
            std::path::Path::new("/sys/fs/bpf"),
            "meshd-agent-reconciler",
        )
        .unwrap();
        let _datapath = meshd_datapath::Datapath::load(pin.path()).unwrap();
        let c2 = (2 << 16) | 300;
        {
            let mut maps = DatapathMaps::open(pin.path()).unwrap();
            let e = |host: [u8; 4]| IpcacheEntry {
                identity: c2,
                tunnel_endpoint: Some(Ipv4Addr::from(host)),
                flags: 0,
            };
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
        r.read_back().unwrap();
        assert_eq!(r.applied.ipcache.len(), 2);
        assert_eq!(r.applied.nodes.len(), 2);
        let not_yet = LocalEndpoints::default();
        assert_eq!(r.round(Some(&desired), &not_yet), 0);
        // Delete 10.2.0.6, add 10.2.0.7, delete node .3: nothing else was written.
        assert_eq!(r.status.ops_applied, 3);
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

        assert_eq!(r.round(Some(&desired), &not_yet), 0);
        assert_eq!(
            r.status.ops_applied, 3,
            "a second round must change nothing"
        );

        // Once the manager has recovered (none here), stale endpoints go.
        let recovered = LocalEndpoints {
            generation: 1,
            endpoints: BTreeMap::new(),
        };
        assert_eq!(r.round(Some(&desired), &recovered), 0);
        assert!(maps.endpoint_addrs().unwrap().is_empty());
        assert_eq!(r.status.endpoints_generation, 1);

        // Before the view is complete (None), the maps are left as they are.
        assert_eq!(r.round(None, &recovered), 0);
        assert_eq!(maps.ipcache_prefixes().unwrap().len(), 2);
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
