//! What the lab is made of. Addresses are derived from positions, so a third cluster is one
//! more entry in `clusters` (see README, "Adding a cluster").

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
pub use meshd_datapath::ServiceLbMode;
use meshd_state::RoutingMode;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct LabSpec {
    /// Prefix of every namespace and host link name; keeps labs apart from anything else.
    pub prefix: String,
    /// Underlay subnet shared by nodes, etcd servers and apiservers (inside the lab's bridge).
    pub underlay: Ipv4Net,
    /// Address of the host side of the host <-> underlay veth.
    pub host_ip: Ipv4Addr,
    /// Underlay MTU; endpoints get 50 less (VXLAN).
    pub mtu: u32,
    pub tunnel_port: u16,
    pub clusters: Vec<ClusterSpec>,
    /// Endpoints' traffic to the world leaves with their node's address (the agents'
    /// `masquerade`); without it the router routes every pod CIDR to its node.
    pub masquerade: bool,
    /// The host outside the mesh, behind the underlay router.
    pub external: ExternalSpec,
    /// Every cluster's routing mode. Native: no tunnel, the agents route pod CIDRs on the
    /// segment, and the router routes every pod CIDR to its node (pod addresses are routable,
    /// so the external host reaches endpoints as `world`).
    pub routing: RoutingMode,
    /// Every cluster runs a mirror of the others in its etcd (its apiserver with
    /// `--kvstoremesh`), and its agents read remote clusters there; on by default from 3
    /// clusters ([`LabSpec::with_clusters`]).
    pub kvstoremesh: bool,
    /// How a node port connection reaches a backend on another node: `snat` (the agents'
    /// default), or `dsr` / `hybrid` (native routing only, see [`LabSpec::with_service_lb_mode`]).
    #[serde(serialize_with = "display")]
    pub service_lb_mode: ServiceLbMode,
}

fn display<S: serde::Serializer>(v: &impl std::fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterSpec {
    pub name: String,
    pub id: u8,
    /// etcd and the apiserver listen here (control-plane namespace).
    pub control_plane_ip: Ipv4Addr,
    /// Client port of the first etcd member; member `m` listens on `etcd_port + 10 * m` and
    /// peers on the port after it (see [`ClusterSpec::etcd_member_ports`]).
    pub etcd_port: u16,
    /// Members of the cluster's etcd (1, or 3 for a replicated one), all in the control-plane
    /// namespace.
    pub etcd_members: u8,
    pub apiserver_port: u16,
    pub apiserver_health_port: u16,
    pub service_cidr: Ipv4Net,
    pub nodes: Vec<NodeSpec>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeSpec {
    pub name: String,
    /// On the underlay, or for a node behind the router on its link ([`LabSpec::far_net`]).
    pub ip: Ipv4Addr,
    /// Native routing: the node sits behind the router, on a link of its own, instead of on
    /// the underlay; the router routes its pod CIDR (static routes standing in for a routing
    /// protocol), since no other node can route to it directly.
    pub behind_router: bool,
    pub pod_cidr: Ipv4Net,
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    /// `k=v` pairs (the agent adds `meshd.io/namespace` and `meshd.io/cluster`).
    pub labels: Vec<(String, String)>,
    /// Runs `meshd workload echo` on TCP 8080 inside the endpoint.
    pub echo: bool,
}

/// A router on the underlay and, behind it on a link of its own, an external host with an
/// address from a documentation range (TEST-NET-3), running the lab's HTTP echo.
#[derive(Debug, Clone, Serialize)]
pub struct ExternalSpec {
    /// The router's address on the underlay.
    pub router_ip: Ipv4Addr,
    /// The external link: the router's side is .1, the host's `ip`.
    pub net: Ipv4Net,
    pub ip: Ipv4Addr,
}

pub const ECHO_PORT: u16 = 8080;
/// Prometheus /metrics of every agent (on its node IP) and apiserver (on its control plane).
pub const AGENT_METRICS_PORT: u16 = 9962;
pub const APISERVER_METRICS_PORT: u16 = 9963;
pub const SERVICE_PORT: u16 = 80;

impl LabSpec {
    /// The default lab: clusters c1 and c2 (ids 1, 2), two nodes each, and on every node one
    /// `app=echo` endpoint (running the echo workload), one `app=client` endpoint and one
    /// `app=web` endpoint (the same echo, behind the lab's public node ports).
    ///
    /// `underlay` is a /24 (10.77.0.0/24 for `make lab`; tests use another one so they can run
    /// beside a user's lab): the host gets .1, control planes .10x, nodes .<10*cluster + node>.
    pub fn two_clusters(prefix: &str, underlay: Ipv4Net) -> LabSpec {
        Self::with_clusters(prefix, underlay, 2)
    }

    /// Clusters c1..c<count> (ids 1..count, at most [`MAX_CLUSTERS`]), two nodes each.
    pub fn with_clusters(prefix: &str, underlay: Ipv4Net, count: u8) -> LabSpec {
        let base = underlay.network().octets();
        let clusters = (1..=count.clamp(1, MAX_CLUSTERS))
            .map(|id| cluster(base, id, 2))
            .collect();
        LabSpec {
            prefix: prefix.to_owned(),
            underlay,
            host_ip: Ipv4Addr::new(base[0], base[1], base[2], 1),
            mtu: 1500,
            tunnel_port: 8472,
            clusters,
            masquerade: true,
            routing: RoutingMode::Tunnel,
            kvstoremesh: count >= 3,
            service_lb_mode: ServiceLbMode::Snat,
            external: ExternalSpec {
                router_ip: Ipv4Addr::new(base[0], base[1], base[2], 254),
                net: Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 0), 24).expect("/24"),
                ip: Ipv4Addr::new(203, 0, 113, 10),
            },
        }
    }

    /// The mirror in every cluster on or off (default: on from 3 clusters).
    pub fn with_kvstoremesh(mut self, on: bool) -> LabSpec {
        self.kvstoremesh = on;
        self
    }

    /// Every agent's `service_lb_mode`. DSR needs native routing: the agents refuse it in tunnel
    /// mode, and so does `meshd lab up`.
    pub fn with_service_lb_mode(mut self, mode: ServiceLbMode) -> LabSpec {
        self.service_lb_mode = mode;
        self
    }

    /// Masquerade on (the default) or off.
    pub fn with_masquerade(mut self, masquerade: bool) -> LabSpec {
        self.masquerade = masquerade;
        self
    }

    /// Tunnel (the default) or native routing. Native puts the last node of every cluster of
    /// two or more nodes behind the router.
    pub fn with_routing(mut self, routing: RoutingMode) -> LabSpec {
        self.routing = routing;
        if routing == RoutingMode::Native {
            for i in 0..self.clusters.len() {
                let far = self.far_net(self.clusters[i].id);
                let c = &mut self.clusters[i];
                if let [_, .., last] = c.nodes.as_mut_slice() {
                    last.behind_router = true;
                    last.ip = Ipv4Addr::from(u32::from(far.network()) + 2);
                }
            }
        }
        self
    }

    /// The link between the router (.1) and cluster `id`'s node behind it (.2): the /24 after
    /// the underlay's `id`-th (10.77.1.0/24 for c1 on the default underlay).
    pub fn far_net(&self, id: u8) -> Ipv4Net {
        let base = u32::from(self.underlay.network()) + (u32::from(id) << 8);
        Ipv4Net::new(Ipv4Addr::from(base), 24).expect("/24")
    }

    /// The router's address on `far_net(id)`.
    pub fn far_router_ip(&self, id: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.far_net(id).network()) + 1)
    }

    /// Whether any node sits behind the router.
    pub fn has_far_nodes(&self) -> bool {
        self.clusters
            .iter()
            .any(|c| c.nodes.iter().any(|n| n.behind_router))
    }

    /// The prefix native routing covers: every pod CIDR of the lab (10.<cluster>.<node>.0/24).
    pub fn native_routing_cidr(&self) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).expect("/8")
    }

    /// Whether the router carries pod addresses (routes every pod CIDR to its node).
    pub fn pods_routable(&self) -> bool {
        !self.masquerade || self.routing == RoutingMode::Native
    }

    pub fn router_netns(&self) -> String {
        format!("{}-rt", self.prefix)
    }

    pub fn external_netns(&self) -> String {
        format!("{}-ext", self.prefix)
    }

    /// Every cluster's etcd on `members` members (1 to [`MAX_ETCD_MEMBERS`]).
    pub fn with_etcd_members(mut self, members: u8) -> LabSpec {
        for c in &mut self.clusters {
            c.etcd_members = members.clamp(1, MAX_ETCD_MEMBERS);
        }
        self
    }

    pub fn cluster(&self, name: &str) -> Option<&ClusterSpec> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn underlay_netns(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    pub fn host_link(&self) -> String {
        format!("{}-host", self.prefix)
    }

    pub fn control_plane_netns(&self, cluster: &ClusterSpec) -> String {
        format!("{}-{}-cp", self.prefix, cluster.name)
    }

    pub fn node_netns(&self, cluster: &ClusterSpec, node: &NodeSpec) -> String {
        format!("{}-{}-{}", self.prefix, cluster.name, node.name)
    }

    /// CLI context name of a cluster (like kind's `kind-<name>`).
    pub fn context(&self, cluster: &ClusterSpec) -> String {
        format!("lab-{}", cluster.name)
    }
}

impl ClusterSpec {
    /// Client and peer port of etcd member `m` (0-based).
    pub fn etcd_member_ports(&self, m: u8) -> (u16, u16) {
        let client = self.etcd_port + 10 * u16::from(m);
        (client, client + 1)
    }

    /// Client URL of every etcd member, in member order: what agents, the apiserver and the
    /// other clusters' remote files list.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        (0..self.etcd_members)
            .map(|m| {
                let (client, _) = self.etcd_member_ports(m);
                format!("https://{}:{client}", self.control_plane_ip)
            })
            .collect()
    }
}

/// etcd members per cluster: ports are spaced by 10 from 2379, below the apiserver's 9443.
pub const MAX_ETCD_MEMBERS: u8 = 5;

/// Node addresses are .<10*id + n> and control planes .<100 + id> in one /24: up to 9 clusters.
pub const MAX_CLUSTERS: u8 = 9;

/// The underlay of `make lab`.
pub const DEFAULT_UNDERLAY: &str = "10.77.0.0/24";

/// Cluster `c<id>`: control plane at <underlay>.<100+id>, nodes at <underlay>.<10*id + n>, pod
/// CIDRs 10.<id>.<n>.0/24, services from 10.96.<id>.0/24.
fn cluster(base: [u8; 4], id: u8, nodes: u8) -> ClusterSpec {
    let at = |host: u8| Ipv4Addr::new(base[0], base[1], base[2], host);
    let name = format!("c{id}");
    ClusterSpec {
        nodes: (1..=nodes)
            .map(|n| NodeSpec {
                name: format!("n{n}"),
                ip: at(10 * id + n),
                behind_router: false,
                pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, id, n, 0), 24).expect("/24"),
                endpoints: vec![
                    EndpointSpec {
                        name: format!("echo-{name}-n{n}"),
                        namespace: "default".into(),
                        labels: vec![("app".into(), "echo".into())],
                        echo: true,
                    },
                    EndpointSpec {
                        name: format!("client-{name}-n{n}"),
                        namespace: "default".into(),
                        labels: vec![("app".into(), "client".into())],
                        echo: false,
                    },
                    EndpointSpec {
                        name: format!("web-{name}-n{n}"),
                        namespace: "default".into(),
                        labels: vec![("app".into(), "web".into())],
                        echo: true,
                    },
                ],
            })
            .collect(),
        name,
        id,
        control_plane_ip: at(100 + id),
        etcd_port: 2379,
        etcd_members: 1,
        apiserver_port: 9443,
        apiserver_health_port: 9444,
        service_cidr: Ipv4Net::new(Ipv4Addr::new(10, 96, id, 0), 24).expect("/24"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_addresses_are_distinct_and_inside_the_underlay() {
        for count in [2, MAX_CLUSTERS] {
            check_addresses(&LabSpec::with_clusters(
                "mlab",
                DEFAULT_UNDERLAY.parse().unwrap(),
                count,
            ));
        }
    }

    #[test]
    fn native_routing_puts_one_node_per_cluster_behind_the_router() {
        let spec = LabSpec::two_clusters("mlab", DEFAULT_UNDERLAY.parse().unwrap())
            .with_routing(RoutingMode::Native);
        for c in &spec.clusters {
            let far: Vec<_> = c.nodes.iter().filter(|n| n.behind_router).collect();
            assert_eq!(far.len(), 1, "{c:?}");
            assert_eq!(far[0].name, "n2");
            assert!(spec.far_net(c.id).contains(&far[0].ip));
            assert!(!spec.underlay.contains(&far[0].ip));
            assert_ne!(far[0].ip, spec.far_router_ip(c.id));
        }
        assert_eq!(spec.far_net(1).to_string(), "10.77.1.0/24");
        assert_eq!(spec.clusters[1].nodes[1].ip.to_string(), "10.77.2.2");
    }

    #[test]
    fn etcd_members_have_distinct_ports_and_one_endpoint_each() {
        let spec = LabSpec::two_clusters("mlab", DEFAULT_UNDERLAY.parse().unwrap());
        assert_eq!(
            spec.clusters[0].etcd_endpoints(),
            ["https://10.77.0.101:2379"],
            "one member by default, on the port the lab always used"
        );
        let spec = spec.with_etcd_members(3);
        let c = &spec.clusters[1];
        assert_eq!(
            c.etcd_endpoints(),
            [
                "https://10.77.0.102:2379",
                "https://10.77.0.102:2389",
                "https://10.77.0.102:2399"
            ]
        );
        let mut ports: Vec<u16> = (0..MAX_ETCD_MEMBERS)
            .flat_map(|m| {
                let (a, b) = c.etcd_member_ports(m);
                [a, b]
            })
            .collect();
        ports.push(c.apiserver_port);
        ports.push(c.apiserver_health_port);
        let count = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), count, "ports collide: {ports:?}");
    }

    fn check_addresses(spec: &LabSpec) {
        let mut ips = vec![spec.host_ip];
        for c in &spec.clusters {
            ips.push(c.control_plane_ip);
            ips.extend(c.nodes.iter().map(|n| n.ip));
        }
        let count = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), count, "duplicate underlay address");
        assert!(ips.iter().all(|ip| spec.underlay.contains(ip)));
        let pods: Vec<_> = spec
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| n.pod_cidr))
            .collect();
        for (i, a) in pods.iter().enumerate() {
            for b in &pods[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} overlaps {b}");
            }
        }
    }
}
