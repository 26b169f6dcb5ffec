//! Service load-balancing: which backends each of this cluster's service frontends (VIP, port,
//! protocol) spreads new connections over, computed from every cluster's published
//! [`ServiceRecord`]s, and the diff that drives the datapath's SERVICES and BACKENDS maps.
//!
//! # Rules
//!
//! * Frontends are the *local* cluster's: a client reaches a service through its own cluster's
//!   VIP. A service that exists only in remote clusters has no frontend here.
//! * A non-global service uses the local cluster's backends only.
//! * A global service (the local record says `global`) merges the backends of the same
//!   namespace/name from every cluster whose record is `shared` (which the apiserver only sets
//!   on global services). The local cluster's own backends always count, shared or not: a
//!   cluster that does not share still uses its own backends and the others'.
//! * Affinity (from the local record), decided per frontend: `local` uses remote backends only
//!   while no local backend is ready; `remote` uses local backends only while no remote backend
//!   is ready; `none` uses all.
//! * A backend serves a frontend when it has the same protocol and port name (ports of other
//!   clusters are matched by name, as their target port numbers may differ). Only ready
//!   backends count. A backend whose address family differs from the frontend's is skipped.
//! * SCTP frontends are skipped: the datapath balances TCP and UDP only.
//!
//! # Public endpoints
//!
//! A NodePort or LoadBalancer service (the local record's `type`) also has, per port, a
//! frontend on this node's IP at the port's node port ([`Exposure::NodePort`]), and every
//! service a frontend per port on each of its external IPs and its load balancer IP
//! ([`Exposure::ExternalIp`]), as Kubernetes has them. Their backends are the VIP's, but with
//! `externalTrafficPolicy: Local` (on a NodePort or LoadBalancer service): then only the
//! backends of this node (the local cluster's ready backends inside this node's pod CIDRs),
//! affinity aside, and the frontend says so ([`FrontendValue::local_only`]). Only IPv4
//! frontends of these kinds exist (the datapath's node ports are IPv4).
//!
//! The Cilium annotation aliases are normalised by the manifest parser (`meshd-manifest`)
//! before the apiserver publishes a record, so records only carry the three booleans.
//!
//! # Map shape
//!
//! [`DesiredServices`] mirrors the two maps: `services` (frontend -> backend count) and
//! `backends` ((frontend, slot) -> backend), slots `0..count`. Backends are in a deterministic
//! order (by cluster id, address, port), so the desired state is a function of content only and
//! a restarted agent reading the maps back finds nothing to change. Connections keep their
//! backend through conntrack, so moving a backend to another slot does not move a connection.
//!
//! [`diff_services`] orders writes so that a packet never meets a slot beyond what is written:
//! new and changed slots first, then the count, then deleted services, then slots beyond the new
//! count.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{Affinity, ClusterId, ClusterName, Protocol, ServiceRecord, TrafficPolicy};

use crate::desired::{diff_maps, IpProto};

/// What a client connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: IpProto,
}

/// How clients reach a frontend: the datapath serves the kinds outside the mesh on the
/// node's uplink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exposure {
    /// A service VIP, reached from inside the mesh.
    #[default]
    Vip,
    /// This node's IP at a port's node port.
    NodePort,
    /// An external IP or the load balancer IP of the service, at a service port.
    ExternalIp,
}

/// A frontend's entry of SERVICES.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendValue {
    /// Backends in slots `0..count`; 0 = no backend: new connections are refused.
    pub count: u32,
    pub exposure: Exposure,
    /// `externalTrafficPolicy: Local`: the backends are this node's only, and the client's
    /// address is kept.
    pub local_only: bool,
}

/// The node the desired services are for: node port frontends are on its IP, and `Local`
/// policy keeps the backends inside its pod CIDRs.
#[derive(Debug, Clone, Copy)]
pub struct ServiceNode<'a> {
    pub cluster: &'a ClusterName,
    pub node_ip: IpAddr,
    pub pod_cidrs: &'a [IpNet],
}

/// Where a connection to a frontend is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// The backend's cluster first, so a frontend's slots group by cluster.
    pub cluster_id: ClusterId,
    pub ip: IpAddr,
    pub port: u16,
}

/// One slot of a frontend's backend table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlot {
    pub frontend: Frontend,
    pub slot: u32,
}

/// The content of the SERVICES and BACKENDS maps. Also the shape of their content read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredServices {
    /// Frontend -> number of backends (slots `0..count` of `backends`) and kind. Count 0 = the
    /// service exists but has no ready backend: the datapath refuses new connections to it.
    pub services: BTreeMap<Frontend, FrontendValue>,
    pub backends: BTreeMap<BackendSlot, Backend>,
}

impl DesiredServices {
    /// The backends of a frontend, in slot order (the slots `0..count` present).
    pub fn backends_of(&self, frontend: &Frontend) -> Vec<Backend> {
        let count = self.services.get(frontend).map_or(0, |v| v.count);
        (0..count)
            .filter_map(|slot| {
                self.backends
                    .get(&BackendSlot {
                        frontend: *frontend,
                        slot,
                    })
                    .copied()
            })
            .collect()
    }

    /// Applies operations as a map writer would (an in-memory stand-in for the maps).
    pub fn apply_ops(&mut self, ops: &[ServiceOp]) {
        for op in ops {
            match *op {
                ServiceOp::UpsertBackend { slot, backend } => {
                    self.backends.insert(slot, backend);
                }
                ServiceOp::UpsertService { frontend, value } => {
                    self.services.insert(frontend, value);
                }
                ServiceOp::DeleteService { frontend } => {
                    self.services.remove(&frontend);
                }
                ServiceOp::DeleteBackend { slot } => {
                    self.backends.remove(&slot);
                }
            }
        }
    }

    fn insert(
        &mut self,
        frontend: Frontend,
        backends: &BTreeSet<Backend>,
        exposure: Exposure,
        local_only: bool,
    ) {
        for (slot, backend) in backends.iter().enumerate() {
            let slot = u32::try_from(slot).expect("fewer than 2^32 backends");
            self.backends
                .insert(BackendSlot { frontend, slot }, *backend);
        }
        let count = u32::try_from(backends.len()).expect("fewer than 2^32 backends");
        // Two services declaring the same frontend: the later one replaces the earlier one
        // whole, so no slot of the earlier one lingers beyond the count.
        let beyond: Vec<BackendSlot> = self
            .backends
            .range(
                BackendSlot {
                    frontend,
                    slot: count,
                }..=BackendSlot {
                    frontend,
                    slot: u32::MAX,
                },
            )
            .map(|(s, _)| *s)
            .collect();
        for slot in beyond {
            self.backends.remove(&slot);
        }
        self.services.insert(
            frontend,
            FrontendValue {
                count,
                exposure,
                local_only,
            },
        );
    }
}

/// One write to the SERVICES or BACKENDS map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceOp {
    UpsertBackend {
        slot: BackendSlot,
        backend: Backend,
    },
    UpsertService {
        frontend: Frontend,
        value: FrontendValue,
    },
    DeleteService {
        frontend: Frontend,
    },
    DeleteBackend {
        slot: BackendSlot,
    },
}

impl ServiceOp {
    /// Position in a batch: a count never covers a slot not yet written, and a slot is removed
    /// only once no count covers it.
    pub fn phase(&self) -> u8 {
        match self {
            ServiceOp::UpsertBackend { .. } => 0,
            ServiceOp::UpsertService { .. } => 1,
            ServiceOp::DeleteService { .. } => 2,
            ServiceOp::DeleteBackend { .. } => 3,
        }
    }
}

/// Operations turning the maps' `actual` content into `desired`, in phase order. Unchanged
/// entries produce nothing.
pub fn diff_services(actual: &DesiredServices, desired: &DesiredServices) -> Vec<ServiceOp> {
    let mut ops = Vec::new();
    diff_maps(&actual.backends, &desired.backends, |slot, backend| {
        ops.push(match backend {
            Some(backend) => ServiceOp::UpsertBackend {
                slot: *slot,
                backend: *backend,
            },
            None => ServiceOp::DeleteBackend { slot: *slot },
        })
    });
    diff_maps(&actual.services, &desired.services, |frontend, value| {
        ops.push(match value {
            Some(value) => ServiceOp::UpsertService {
                frontend: *frontend,
                value: *value,
            },
            None => ServiceOp::DeleteService {
                frontend: *frontend,
            },
        })
    });
    ops.sort_by_key(ServiceOp::phase);
    ops
}

/// One cluster's published record of a service, as the view admits it.
#[derive(Debug, Clone, Copy)]
pub struct ClusterService<'a> {
    pub cluster: &'a ClusterName,
    pub cluster_id: ClusterId,
    pub record: &'a ServiceRecord,
}

fn ip_proto(p: Protocol) -> Option<IpProto> {
    match p {
        Protocol::Tcp => Some(IpProto::Tcp),
        Protocol::Udp => Some(IpProto::Udp),
        Protocol::Sctp => None,
    }
}

/// The desired SERVICES/BACKENDS content for `node`, from the records of every admitted
/// cluster (the local one included). See the module docs for the rules.
pub fn desired_services<'a>(
    node: &ServiceNode<'_>,
    records: impl IntoIterator<Item = ClusterService<'a>>,
) -> DesiredServices {
    let local = node.cluster;
    // Group by namespace/name: the local record (if any) and the remote ones.
    let mut by_service: BTreeMap<(&str, &str), (Option<ClusterService<'a>>, Vec<_>)> =
        BTreeMap::new();
    for cs in records {
        let slot = by_service
            .entry((cs.record.namespace.as_str(), cs.record.name.as_str()))
            .or_default();
        if cs.cluster == local {
            slot.0 = Some(cs);
        } else {
            slot.1.push(cs);
        }
    }
    let mut out = DesiredServices::default();
    for (own, remotes) in by_service.values() {
        let Some(own) = own else {
            continue;
        };
        let record = own.record;
        let remotes: &[ClusterService<'_>] = if record.global { remotes } else { &[] };
        let node_ports = record.service_type.has_node_ports();
        let local_only = node_ports && record.external_traffic_policy == TrafficPolicy::Local;
        let external = record.external_addresses();
        for f in &record.frontends {
            let Some(proto) = ip_proto(f.protocol) else {
                continue;
            };
            let frontend = Frontend {
                ip: f.ip,
                port: f.port,
                proto,
            };
            let serving = |cs: &ClusterService<'_>| -> BTreeSet<Backend> {
                cs.record
                    .backends
                    .iter()
                    .filter(|b| {
                        b.ready
                            && b.protocol == f.protocol
                            && b.port_name == f.port_name
                            && b.ip.is_ipv4() == f.ip.is_ipv4()
                    })
                    .map(|b| Backend {
                        cluster_id: cs.cluster_id,
                        ip: b.ip,
                        port: b.port,
                    })
                    .collect()
            };
            let local_backends = serving(own);
            let remote_backends: BTreeSet<Backend> = remotes
                .iter()
                .filter(|cs| cs.record.global && cs.record.shared)
                .flat_map(serving)
                .collect();
            let chosen: BTreeSet<Backend> = match record.affinity {
                Affinity::Local if !local_backends.is_empty() => local_backends.clone(),
                Affinity::Remote if !remote_backends.is_empty() => remote_backends,
                _ => local_backends.union(&remote_backends).copied().collect(),
            };
            out.insert(frontend, &chosen, Exposure::Vip, false);

            // Public endpoints: the same port on this node's IP and on the external addresses.
            let mut public = Vec::new();
            if let Some(node_port) = f.node_port.filter(|_| node_ports) {
                public.push((node.node_ip, node_port, Exposure::NodePort));
            }
            for ip in &external {
                public.push((*ip, f.port, Exposure::ExternalIp));
            }
            public.retain(|(ip, _, _)| ip.is_ipv4() && f.ip.is_ipv4());
            if public.is_empty() {
                continue;
            }
            let on_this_node: BTreeSet<Backend>;
            let backends = if local_only {
                on_this_node = local_backends
                    .into_iter()
                    .filter(|b| node.pod_cidrs.iter().any(|c| c.contains(&b.ip)))
                    .collect();
                &on_this_node
            } else {
                &chosen
            };
            for (ip, port, exposure) in public {
                out.insert(Frontend { ip, port, proto }, backends, exposure, local_only);
            }
        }
    }
    out
}

/// What an external load balancer's health check of a `Local` service asks this node: does it
/// have a backend of the service? Served on the node IP at the service's health check node port
/// (kube-proxy's contract: 200 with at least one local endpoint, 503 without).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready backends of the local record on this node (distinct addresses: one per pod, as
    /// kube-proxy counts endpoints, whatever the number of ports).
    pub local_endpoints: usize,
}

/// The health check node port of the local cluster's `record` on `node` and what it answers, if
/// the record has one (a NodePort or LoadBalancer service with `externalTrafficPolicy: Local`
/// and a health check node port allocated).
pub fn health_check(node: &ServiceNode<'_>, record: &ServiceRecord) -> Option<(u16, HealthCheck)> {
    if !record.service_type.has_node_ports()
        || record.external_traffic_policy != TrafficPolicy::Local
    {
        return None;
    }
    let port = record.health_check_node_port?;
    let local: BTreeSet<IpAddr> = record
        .backends
        .iter()
        .filter(|b| b.ready && node.pod_cidrs.iter().any(|c| c.contains(&b.ip)))
        .map(|b| b.ip)
        .collect();
    Some((
        port,
        HealthCheck {
            namespace: record.namespace.clone(),
            name: record.name.clone(),
            local_endpoints: local.len(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use meshd_state::{ServiceBackend, ServiceFrontend, ServiceType};

    use super::*;

    fn cn(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn cid(n: u32) -> ClusterId {
        ClusterId::new(n).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const VIP: &str = "10.96.0.10";
    const NODE_IP: &str = "192.168.1.1";
    const POD_CIDR: &str = "10.1.1.0/24";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn frontend() -> Frontend {
        Frontend {
            ip: ip(VIP),
            port: 80,
            proto: IpProto::Tcp,
        }
    }

    fn record(vip: &str, backends: &[&str], global: bool, shared: bool) -> ServiceRecord {
        ServiceRecord {
            namespace: "default".into(),
            name: "echo".into(),
            frontends: vec![ServiceFrontend {
                ip: ip(vip),
                port: 80,
                protocol: Protocol::Tcp,
                port_name: "http".into(),
                node_port: None,
            }],
            backends: backends
                .iter()
                .map(|b| ServiceBackend {
                    ip: ip(b),
                    port: 8080,
                    protocol: Protocol::Tcp,
                    ready: true,
                    port_name: "http".into(),
                })
                .collect(),
            global,
            shared,
            affinity: Affinity::None,
            service_type: Default::default(),
            external_ips: Vec::new(),
            load_balancer_ip: None,
            external_traffic_policy: Default::default(),
            health_check_node_port: None,
        }
    }

    struct Mesh {
        records: Vec<(ClusterName, ClusterId, ServiceRecord)>,
    }

    impl Mesh {
        fn new() -> Self {
            Self {
                records: Vec::new(),
            }
        }

        fn with(mut self, cluster: &str, id: u32, r: ServiceRecord) -> Self {
            self.records.push((cn(cluster), cid(id), r));
            self
        }

        fn desired(&self, local: &str) -> DesiredServices {
            let cluster = cn(local);
            desired_services(
                &ServiceNode {
                    cluster: &cluster,
                    node_ip: ip(NODE_IP),
                    pod_cidrs: &[net(POD_CIDR)],
                },
                self.records.iter().map(|(c, id, r)| ClusterService {
                    cluster: c,
                    cluster_id: *id,
                    record: r,
                }),
            )
        }

        /// The backend IPs the node of `local` balances `vip:80/tcp` over.
        fn ips(&self, local: &str, vip: &str) -> Vec<String> {
            let f = Frontend {
                ip: ip(vip),
                ..frontend()
            };
            let d = self.desired(local);
            assert!(
                d.services.contains_key(&f),
                "{vip} is a frontend in {local}"
            );
            d.backends_of(&f).iter().map(|b| b.ip.to_string()).collect()
        }
    }

    fn with_affinity(mut r: ServiceRecord, a: Affinity) -> ServiceRecord {
        r.affinity = a;
        r
    }

    #[test]
    fn global_service_merges_every_shared_cluster() {
        let mesh = Mesh::new()
            .with("c1", 1, record(VIP, &["10.1.0.5", "10.1.0.6"], true, true))
            .with("c2", 2, record("10.97.0.10", &["10.2.0.5"], true, true))
            .with("c3", 3, record("10.98.0.10", &["10.3.0.5"], true, true));
        assert_eq!(
            mesh.ips("c1", VIP),
            ["10.1.0.5", "10.1.0.6", "10.2.0.5", "10.3.0.5"]
        );
        let d = mesh.desired("c1");
        let backends = d.backends_of(&frontend());
        assert_eq!(
            backends.iter().map(|b| b.cluster_id).collect::<Vec<_>>(),
            [cid(1), cid(1), cid(2), cid(3)]
        );
        assert!(backends.iter().all(|b| b.port == 8080));
        // Frontends are the local cluster's VIPs only.
        assert_eq!(d.services.len(), 1);
        assert_eq!(mesh.ips("c2", "10.97.0.10").len(), 4);
    }

    #[test]
    fn a_cluster_that_does_not_share_uses_the_others_but_exports_none() {
        let mesh = Mesh::new()
            .with("c1", 1, record(VIP, &["10.1.0.5"], true, true))
            .with("c2", 2, record("10.97.0.10", &["10.2.0.5"], true, false));
        assert_eq!(mesh.ips("c1", VIP), ["10.1.0.5"]);
        assert_eq!(mesh.ips("c2", "10.97.0.10"), ["10.1.0.5", "10.2.0.5"]);
    }

    #[test]
    fn a_non_global_service_stays_in_its_cluster() {
        let mesh = Mesh::new()
            .with("c1", 1, record(VIP, &["10.1.0.5"], false, false))
            .with("c2", 2, record("10.97.0.10", &["10.2.0.5"], true, true));
        assert_eq!(mesh.ips("c1", VIP), ["10.1.0.5"]);
        // c2's global record does not pull in c1's non-shared backends either.
        assert_eq!(mesh.ips("c2", "10.97.0.10"), ["10.2.0.5"]);
        // A remote record that is shared but not global (never published so) is not merged.
        let mut odd = record("10.97.0.10", &["10.2.0.5"], false, true);
        odd.global = false;
        let mesh = Mesh::new()
            .with("c1", 1, record(VIP, &["10.1.0.5"], true, true))
            .with("c2", 2, odd);
        assert_eq!(mesh.ips("c1", VIP), ["10.1.0.5"]);
    }

    #[test]
    fn a_service_only_in_remote_clusters_has_no_frontend_here() {
        let mesh = Mesh::new().with("c2", 2, record("10.97.0.10", &["10.2.0.5"], true, true));
        assert_eq!(mesh.desired("c1"), DesiredServices::default());
    }

    #[test]
    fn affinity_local_uses_remote_backends_only_without_local_ones() {
        let c1 =
            |backends: &[&str]| with_affinity(record(VIP, backends, true, true), Affinity::Local);
        let c2 = record("10.97.0.10", &["10.2.0.5"], true, true);
        let mesh = Mesh::new()
            .with("c1", 1, c1(&["10.1.0.5"]))
            .with("c2", 2, c2.clone());
        assert_eq!(mesh.ips("c1", VIP), ["10.1.0.5"]);
        let mesh = Mesh::new().with("c1", 1, c1(&[])).with("c2", 2, c2.clone());
        assert_eq!(mesh.ips("c1", VIP), ["10.2.0.5"]);
        // Unready local backends do not count as local backends.
        let mut unready = c1(&["10.1.0.5"]);
        unready.backends[0].ready = false;
        let mesh = Mesh::new().with("c1", 1, unready).with("c2", 2, c2);
        assert_eq!(mesh.ips("c1", VIP), ["10.2.0.5"]);
    }

    #[test]
    fn affinity_remote_uses_local_backends_only_without_remote_ones() {
        let c1 = with_affinity(record(VIP, &["10.1.0.5"], true, true), Affinity::Remote);
        let mesh = Mesh::new().with("c1", 1, c1.clone()).with(
            "c2",
            2,
            record("10.97.0.10", &["10.2.0.5"], true, true),
        );
        assert_eq!(mesh.ips("c1", VIP), ["10.2.0.5"]);
        let mesh = Mesh::new().with("c1", 1, c1.clone()).with(
            "c2",
            2,
            record("10.97.0.10", &[], true, true),
        );
        assert_eq!(mesh.ips("c1", VIP), ["10.1.0.5"]);
        // A remote that does not share is no remote backend.
        let mesh = Mesh::new().with("c1", 1, c1).with(
            "c2",
            2,
            record("10.97.0.10", &["10.2.0.5"], true, false),
        );
        assert_eq!(mesh.ips("c1", VIP), ["10.1.0.5"]);
    }

    #[test]
    fn no_backend_anywhere_keeps_the_frontend_with_count_zero() {
        let mesh = Mesh::new()
            .with("c1", 1, record(VIP, &[], true, true))
            .with("c2", 2, record("10.97.0.10", &[], true, true));
        let d = mesh.desired("c1");
        assert_eq!(d.services.get(&frontend()).map(|v| v.count), Some(0));
        assert!(d.backends.is_empty());
    }

    #[test]
    fn ports_match_by_protocol_and_name() {
        let mut c1 = record(VIP, &["10.1.0.5"], true, true);
        c1.frontends.push(ServiceFrontend {
            ip: ip(VIP),
            port: 53,
            protocol: Protocol::Udp,
            port_name: "dns".into(),
            node_port: None,
        });
        c1.frontends.push(ServiceFrontend {
            ip: ip(VIP),
            port: 9,
            protocol: Protocol::Sctp,
            port_name: "sctp".into(),
            node_port: None,
        });
        c1.backends.push(ServiceBackend {
            ip: ip("10.1.0.5"),
            port: 5353,
            protocol: Protocol::Udp,
            ready: true,
            port_name: "dns".into(),
        });
        let mut c2 = record("10.97.0.10", &["10.2.0.5"], true, true);
        // c2 serves http on another target port, and dns over TCP only.
        c2.backends[0].port = 9090;
        c2.backends.push(ServiceBackend {
            ip: ip("10.2.0.5"),
            port: 53,
            protocol: Protocol::Tcp,
            ready: true,
            port_name: "dns".into(),
        });
        // An IPv6 backend never serves an IPv4 frontend.
        c2.backends.push(ServiceBackend {
            ip: ip("fd00::5"),
            port: 8080,
            protocol: Protocol::Tcp,
            ready: true,
            port_name: "http".into(),
        });
        let d = Mesh::new()
            .with("c1", 1, c1)
            .with("c2", 2, c2)
            .desired("c1");
        assert_eq!(d.services.len(), 2, "SCTP is skipped");
        let http = d.backends_of(&frontend());
        assert_eq!(
            http.iter().map(|b| (b.ip, b.port)).collect::<Vec<_>>(),
            [(ip("10.1.0.5"), 8080), (ip("10.2.0.5"), 9090)]
        );
        let dns = d.backends_of(&Frontend {
            ip: ip(VIP),
            port: 53,
            proto: IpProto::Udp,
        });
        assert_eq!(
            dns.iter().map(|b| (b.ip, b.port)).collect::<Vec<_>>(),
            [(ip("10.1.0.5"), 5353)]
        );
    }

    /// A sample of map contents: services with varying backend sets.
    fn sample(seed: u32) -> DesiredServices {
        let mut d = DesiredServices::default();
        for s in 0..6u32 {
            if (s + seed) % 4 == 0 {
                continue;
            }
            let f = Frontend {
                ip: ip(&format!("10.96.0.{s}")),
                port: 80 + (s as u16 % 2),
                proto: if s % 3 == 0 {
                    IpProto::Udp
                } else {
                    IpProto::Tcp
                },
            };
            let backends: BTreeSet<Backend> = (0..(seed * 7 + s) % 5)
                .map(|b| Backend {
                    cluster_id: cid(1 + (b + seed) % 3),
                    ip: ip(&format!("10.{}.0.{}", s, b * (seed + 1))),
                    port: 8080,
                })
                .collect();
            let exposure = [Exposure::Vip, Exposure::NodePort, Exposure::ExternalIp]
                [((s + seed) % 3) as usize];
            d.insert(
                f,
                &backends,
                exposure,
                exposure != Exposure::Vip && seed % 2 == 0,
            );
        }
        d
    }

    #[test]
    fn diff_converges_is_idempotent_and_leaves_equal_entries_alone() {
        for a in 0..8 {
            assert!(diff_services(&sample(a), &sample(a)).is_empty());
            for b in 0..8 {
                let (mut actual, desired) = (sample(a), sample(b));
                let ops = diff_services(&actual, &desired);
                actual.apply_ops(&ops);
                assert_eq!(actual, desired, "from {a} to {b}");
                assert!(diff_services(&actual, &desired).is_empty());
                actual.apply_ops(&ops);
                assert_eq!(actual, desired);
            }
        }
    }

    /// Applying the ops one at a time, a frontend's count never covers a missing slot, so the
    /// datapath never picks a slot that is not there.
    #[test]
    fn every_intermediate_state_is_consistent() {
        for a in 0..8 {
            for b in 0..8 {
                let mut state = sample(a);
                for op in diff_services(&state, &sample(b)) {
                    state.apply_ops(&[op]);
                    for (f, count) in &state.services {
                        assert_eq!(
                            state.backends_of(f).len() as u32,
                            count.count,
                            "{f:?} after {op:?} ({a} -> {b})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn losing_the_last_local_backend_fails_over_in_one_diff() {
        let c1 =
            |backends: &[&str]| with_affinity(record(VIP, backends, true, true), Affinity::Local);
        let c2 = record("10.97.0.10", &["10.2.0.5", "10.2.0.6"], true, true);
        let before = Mesh::new()
            .with("c1", 1, c1(&["10.1.0.5"]))
            .with("c2", 2, c2.clone())
            .desired("c1");
        let after = Mesh::new()
            .with("c1", 1, c1(&[]))
            .with("c2", 2, c2)
            .desired("c1");
        let ops = diff_services(&before, &after);
        let slot = |slot| BackendSlot {
            frontend: frontend(),
            slot,
        };
        let b = |ip_: &str| Backend {
            cluster_id: cid(2),
            ip: ip(ip_),
            port: 8080,
        };
        assert_eq!(
            ops,
            [
                ServiceOp::UpsertBackend {
                    slot: slot(0),
                    backend: b("10.2.0.5")
                },
                ServiceOp::UpsertBackend {
                    slot: slot(1),
                    backend: b("10.2.0.6")
                },
                ServiceOp::UpsertService {
                    frontend: frontend(),
                    value: FrontendValue {
                        count: 2,
                        ..Default::default()
                    }
                },
            ]
        );
    }

    /// A NodePort / LoadBalancer record of c1 with node port 30080 on its port.
    fn public(
        kind: ServiceType,
        policy: TrafficPolicy,
        backends: &[&str],
        external: &[&str],
    ) -> ServiceRecord {
        let mut r = record(VIP, backends, true, true);
        r.service_type = kind;
        r.external_traffic_policy = policy;
        r.frontends[0].node_port = Some(30080);
        r.external_ips = external.iter().map(|e| ip(e)).collect();
        r
    }

    fn value_and_ips(d: &DesiredServices, f: Frontend) -> (FrontendValue, Vec<String>) {
        let value = *d
            .services
            .get(&f)
            .unwrap_or_else(|| panic!("{f:?} in {d:?}"));
        let ips = d.backends_of(&f).iter().map(|b| b.ip.to_string()).collect();
        (value, ips)
    }

    fn at(addr: &str, port: u16) -> Frontend {
        Frontend {
            ip: ip(addr),
            port,
            proto: IpProto::Tcp,
        }
    }

    #[test]
    fn node_port_and_external_frontends_use_the_vips_backends() {
        let mut c1 = public(
            ServiceType::LoadBalancer,
            TrafficPolicy::Cluster,
            &["10.1.1.5", "10.1.2.5"],
            &["203.0.113.10"],
        );
        c1.load_balancer_ip = Some(ip("198.51.100.7"));
        let mesh = Mesh::new().with("c1", 1, c1).with(
            "c2",
            2,
            record("10.97.0.10", &["10.2.0.5"], true, true),
        );
        let d = mesh.desired("c1");
        let all = ["10.1.1.5", "10.1.2.5", "10.2.0.5"];
        let (vip, vip_ips) = value_and_ips(&d, frontend());
        assert_eq!(vip.exposure, Exposure::Vip);
        assert_eq!(vip_ips, all);
        for (f, exposure) in [
            (at(NODE_IP, 30080), Exposure::NodePort),
            (at("203.0.113.10", 80), Exposure::ExternalIp),
            (at("198.51.100.7", 80), Exposure::ExternalIp),
        ] {
            let (value, ips) = value_and_ips(&d, f);
            assert_eq!(
                value,
                FrontendValue {
                    count: 3,
                    exposure,
                    local_only: false
                },
                "{f:?}"
            );
            assert_eq!(ips, all, "{f:?}: global backends included");
        }
        assert_eq!(d.services.len(), 4);
        // c2's node port is not this node's frontend: node ports are the local record's.
        let mut c2 = public(
            ServiceType::NodePort,
            TrafficPolicy::Cluster,
            &["10.2.0.5"],
            &[],
        );
        c2.frontends[0].ip = ip("10.97.0.10");
        c2.frontends[0].node_port = Some(30999);
        let d = Mesh::new()
            .with("c1", 1, record(VIP, &["10.1.1.5"], true, true))
            .with("c2", 2, c2)
            .desired("c1");
        assert_eq!(d.services.len(), 1, "{d:?}");
    }

    #[test]
    fn local_policy_uses_this_nodes_backends_only() {
        // 10.1.1.5 is on this node (its pod CIDR), 10.1.2.5 on another node of c1.
        let c1 = |backends: &[&str]| {
            with_affinity(
                public(
                    ServiceType::NodePort,
                    TrafficPolicy::Local,
                    backends,
                    &["203.0.113.10"],
                ),
                Affinity::Remote,
            )
        };
        let c2 = record("10.97.0.10", &["10.2.0.5"], true, true);
        let d = Mesh::new()
            .with("c1", 1, c1(&["10.1.1.5", "10.1.2.5"]))
            .with("c2", 2, c2.clone())
            .desired("c1");
        for f in [at(NODE_IP, 30080), at("203.0.113.10", 80)] {
            let (value, ips) = value_and_ips(&d, f);
            assert!(value.local_only, "{f:?}");
            assert_eq!(ips, ["10.1.1.5"], "{f:?}: affinity aside, this node only");
        }
        // The VIP is unchanged (remote affinity: c2's backend).
        assert_eq!(value_and_ips(&d, frontend()).1, ["10.2.0.5"]);
        // No backend on this node: the frontends stay, with count 0 (refuse, counted).
        let d = Mesh::new()
            .with("c1", 1, c1(&["10.1.2.5"]))
            .with("c2", 2, c2)
            .desired("c1");
        let (value, ips) = value_and_ips(&d, at(NODE_IP, 30080));
        assert!(value.local_only && value.count == 0 && ips.is_empty());
    }

    #[test]
    fn a_local_service_with_a_health_check_port_counts_the_pods_on_this_node() {
        let cluster = cn("c1");
        let cidrs = [net(POD_CIDR)];
        let node = ServiceNode {
            cluster: &cluster,
            node_ip: ip(NODE_IP),
            pod_cidrs: &cidrs,
        };
        // Two ready pods here (one of them twice, by two ports), one elsewhere, one not ready.
        let mut r = record(VIP, &["10.1.1.5", "10.1.1.6", "10.1.2.7"], false, false);
        let mut second_port = r.backends[0].clone();
        second_port.port = 9090;
        r.backends.push(second_port);
        let mut unready = r.backends[0].clone();
        unready.ip = ip("10.1.1.9");
        unready.ready = false;
        r.backends.push(unready);
        assert_eq!(health_check(&node, &r), None, "ClusterIP, Cluster policy");
        r.service_type = meshd_state::ServiceType::NodePort;
        r.external_traffic_policy = TrafficPolicy::Local;
        assert_eq!(health_check(&node, &r), None, "no port allocated");
        r.health_check_node_port = Some(32000);
        let (port, hc) = health_check(&node, &r).expect("a health check");
        assert_eq!(port, 32000);
        assert_eq!(
            (hc.namespace.as_str(), hc.name.as_str()),
            ("default", "echo")
        );
        assert_eq!(hc.local_endpoints, 2);
        r.backends.retain(|b| b.ip == ip("10.1.2.7"));
        assert_eq!(health_check(&node, &r).unwrap().1.local_endpoints, 0);
        r.external_traffic_policy = TrafficPolicy::Cluster;
        assert_eq!(health_check(&node, &r), None, "Cluster policy");
    }

    #[test]
    fn cluster_ip_services_have_no_node_port_frontends() {
        // A node port left in a ClusterIP record (never published so) is not served; external
        // IPs are, as in Kubernetes, with Cluster policy.
        let mut r = public(
            ServiceType::ClusterIp,
            TrafficPolicy::Local,
            &["10.1.2.5"],
            &["203.0.113.10"],
        );
        r.frontends[0].node_port = Some(30080);
        let d = Mesh::new().with("c1", 1, r).desired("c1");
        assert!(!d.services.contains_key(&at(NODE_IP, 30080)));
        let (value, ips) = value_and_ips(&d, at("203.0.113.10", 80));
        assert_eq!(value.exposure, Exposure::ExternalIp);
        assert!(!value.local_only);
        assert_eq!(ips, ["10.1.2.5"]);
    }

    /// Through the merged view: only admitted clusters count, and a removed cluster's backends go.
    #[test]
    fn the_view_merges_admitted_clusters_only() {
        use meshd_state::{Capabilities, ClusterConfig};

        use crate::view::{ClusterEvent, EventKind, LocalNode, MeshView};

        let mut view = MeshView::new(LocalNode {
            cluster: cn("c1"),
            cluster_id: cid(1),
            node_name: "n1".into(),
            node_ip: ip("192.168.1.1"),
            pod_cidrs: vec!["10.1.1.0/24".parse().unwrap()],
            routing_mode: Default::default(),
            non_masquerade: Vec::new(),
        });
        let ev = |c: &str, kind| ClusterEvent::new(cn(c), kind);
        let config = |name: &str, id: u32| {
            EventKind::ClusterConfig(ClusterConfig {
                name: cn(name),
                id: cid(id),
                capabilities: Capabilities::default(),
                routing_mode: Default::default(),
            })
        };
        let ips = |view: &MeshView| -> Vec<String> {
            view.desired_services()
                .backends_of(&frontend())
                .iter()
                .map(|b| b.ip.to_string())
                .collect()
        };
        view.apply(ev(
            "c1",
            EventKind::UpsertService(record(VIP, &["10.1.1.5"], true, true)),
        ));
        view.apply(ev(
            "c2",
            EventKind::UpsertService(record("10.97.0.10", &["10.2.0.5"], true, true)),
        ));
        assert_eq!(ips(&view), ["10.1.1.5"], "c2 awaits its config");
        view.apply(ev("c2", config("c2", 2)));
        assert_eq!(ips(&view), ["10.1.1.5", "10.2.0.5"]);
        // c3 claims c2's id: refused, its backends stay out.
        view.apply(ev(
            "c3",
            EventKind::UpsertService(record("10.98.0.10", &["10.3.0.5"], true, true)),
        ));
        view.apply(ev("c3", config("c3", 2)));
        assert_eq!(ips(&view), ["10.1.1.5", "10.2.0.5"]);
        view.apply(ev(
            "c2",
            EventKind::DeleteService {
                namespace: "default".into(),
                name: "echo".into(),
            },
        ));
        assert_eq!(ips(&view), ["10.1.1.5"]);
        view.apply(ev(
            "c2",
            EventKind::UpsertService(record("10.97.0.10", &["10.2.0.5"], true, true)),
        ));
        view.apply(ev("c2", EventKind::ClusterRemoved));
        // c2 gone: c3 takes id 2 and its backends come in.
        assert_eq!(ips(&view), ["10.1.1.5", "10.3.0.5"]);
        view.apply(ev("c1", EventKind::ClusterRemoved));
        assert_eq!(view.desired_services(), DesiredServices::default());
    }
}
