//! Native routing's node routes (`auto_direct_node_routes`): `<pod CIDR> via <node IP>` in the
//! node's main table for every other node, local or remote, that sits on the uplink's own
//! segment. The agent owns exactly the routes tagged with [`ROUTE_PROTOCOL`] and reconciles
//! them like the maps (level-triggered: desired from the view's nodes, actual read back, the
//! difference applied; again on every node change, after a failure and on a timer, but never
//! before the view's start-up gate, like the maps); it never touches another route, not even
//! one for the same prefix (that route is reported and the agent's retried until it goes). A node behind a gateway cannot be reached by a direct route: it is
//! skipped (a status line and a counter), and its pod CIDR must come from the network (a router's
//! routes or a routing protocol).
//!
//! Forwarding: nothing here turns it on. Endpoints' packets leave through from-endpoint's FIB
//! redirect (forwarding is on for the endpoint veths only, which bpf_fib_lookup needs), and
//! packets for local endpoints are delivered by from-netdev before the stack routes them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use meshd_mesh::PeerNode;
use meshd_netlink::{with_netlink, OwnedRoute};
use tokio::sync::watch;

/// Route protocol number of the agent's routes (`ip route show proto 211`). Unassigned in
/// iproute2's rt_protos.
pub const ROUTE_PROTOCOL: u8 = 211;

/// How often the routes are compared with the kernel's even without a node change (someone
/// may have deleted one), and how soon a failed change is retried.
const RESYNC: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(2);

/// What `meshd status` shows of the node routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutesStatus {
    /// The agent manages routes (native mode with auto_direct_node_routes).
    pub enabled: bool,
    /// Routes of the agent's protocol in the table after the last reconcile.
    pub installed: u64,
    /// One line per node skipped because it is not on the uplink's segment.
    pub skipped: Vec<String>,
    /// Nodes skipped, counted at each change of the skipped set.
    pub skipped_total: u64,
    /// Route changes that failed (each retried), counted per attempt.
    pub failures: u64,
    /// What failed in the last pass, one `; `-separated line per change (empty: nothing).
    pub last_error: String,
    /// Remote pod CIDRs outside native_routing_cidr: their traffic would be masqueraded.
    pub outside_native_cidr: Vec<String>,
}

/// The routes the nodes call for, the lines for the nodes that cannot have one, and the pod
/// CIDRs outside the native routing CIDR. Pure.
pub fn plan(
    nodes: &[PeerNode],
    uplink_ifindex: u32,
    uplink_networks: &[Ipv4Net],
    native_cidr: Option<Ipv4Net>,
) -> (BTreeMap<Ipv4Net, OwnedRoute>, Vec<String>, Vec<String>) {
    let mut routes = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut outside = Vec::new();
    for n in nodes {
        let IpAddr::V4(node_ip) = n.node_ip else {
            continue;
        };
        let cidrs: Vec<Ipv4Net> = n
            .pod_cidrs
            .iter()
            .filter_map(|c| match c {
                IpNet::V4(c) => Some(c.trunc()),
                IpNet::V6(_) => None,
            })
            .collect();
        if let Some(native) = native_cidr {
            for c in cidrs.iter().filter(|c| !native.contains(*c)) {
                outside.push(format!(
                    "node {}/{}: pod CIDR {c} is outside native_routing_cidr {native}: its traffic would be masqueraded and lose its identity",
                    n.cluster, n.name
                ));
            }
        }
        if cidrs.is_empty() {
            continue;
        }
        if !on_segment(node_ip, uplink_networks) {
            skipped.push(format!(
                "node {}/{} ({node_ip}) is not on the uplink's segment: no direct route for {}; its pod CIDRs must be routed by the network",
                n.cluster,
                n.name,
                cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        }
        for c in cidrs {
            routes.insert(
                c,
                OwnedRoute {
                    destination: c,
                    gateway: node_ip,
                    ifindex: uplink_ifindex,
                },
            );
        }
    }
    (routes, skipped, outside)
}

/// The route owner. One task; the kernel's table is read back on every pass.
pub struct RouteReconciler {
    /// None: the agent installs no routes (and removes any of its protocol left behind).
    pub uplink: Option<String>,
    pub native_cidr: Option<Ipv4Net>,
    /// None until the view's start-up gate opens: nothing is touched before (see
    /// `ViewTask::peers`).
    pub nodes: watch::Receiver<Option<Arc<Vec<PeerNode>>>>,
    pub status: watch::Sender<RoutesStatus>,
}

impl RouteReconciler {
    pub async fn run(mut self) {
        let mut last_skipped: BTreeSet<String> = BTreeSet::new();
        let mut last_errors: Vec<String> = Vec::new();
        // A restarted agent's first pass on an empty or partial view would delete the routes
        // of every node not heard from yet, and live connections with them.
        while self.nodes.borrow_and_update().is_none() {
            if self.nodes.changed().await.is_err() {
                return;
            }
        }
        loop {
            let nodes = self.nodes.borrow_and_update().clone().unwrap_or_default();
            let result = tokio::task::spawn_blocking({
                let uplink = self.uplink.clone();
                let native_cidr = self.native_cidr;
                move || reconcile(uplink.as_deref(), &nodes, native_cidr)
            })
            .await
            .unwrap_or_else(|e| Err(format!("route task: {e}")));
            let errors = match &result {
                Ok(pass) => pass.errors.clone(),
                Err(e) => vec![e.clone()],
            };
            // Logged when they change, not at every retry.
            if errors != last_errors {
                for e in &errors {
                    tracing::warn!(error = e.as_str(), "node route not in place; retrying");
                }
                if errors.is_empty() && !last_errors.is_empty() {
                    tracing::info!("every node route in place again");
                }
                last_errors = errors.clone();
            }
            self.status.send_modify(|s| {
                s.enabled = self.uplink.is_some();
                s.failures += errors.len() as u64;
                s.last_error = errors.join("; ");
                if let Ok(pass) = result {
                    let now: BTreeSet<String> = pass.skipped.iter().cloned().collect();
                    s.skipped_total += now.difference(&last_skipped).count() as u64;
                    for line in now.difference(&last_skipped) {
                        tracing::warn!("{line}");
                    }
                    last_skipped = now;
                    s.installed = pass.installed;
                    s.skipped = pass.skipped;
                    s.outside_native_cidr = pass.outside;
                }
            });
            let wait = if errors.is_empty() { RESYNC } else { RETRY };
            tokio::select! {
                changed = self.nodes.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

struct Pass {
    /// The agent's routes in place after the pass.
    installed: u64,
    skipped: Vec<String>,
    outside: Vec<String>,
    /// The changes that failed, one line each (retried by the next pass).
    errors: Vec<String>,
}

/// One pass: read the uplink and the agent's routes, write the difference. Every change is
/// tried; the ones that fail are reported (and retried) without holding up the others. Fails
/// as a whole only when the table or the uplink cannot be read. Blocking.
fn reconcile(
    uplink: Option<&str>,
    nodes: &[PeerNode],
    native_cidr: Option<Ipv4Net>,
) -> Result<Pass, String> {
    with_netlink(None, |nl| {
        let (want, skipped, outside) = match uplink {
            Some(dev) => {
                let ifindex = nl.index(dev)?;
                plan(nodes, ifindex, &nl.ipv4_networks(dev)?, native_cidr)
            }
            None => Default::default(),
        };
        let have: BTreeMap<Ipv4Net, OwnedRoute> = nl
            .owned_routes(ROUTE_PROTOCOL)?
            .into_iter()
            .map(|r| (r.destination, r))
            .collect();
        let mut errors = Vec::new();
        let mut installed = 0;
        for (dst, route) in &want {
            if have.get(dst) == Some(route) {
                installed += 1;
                continue;
            }
            // Our own route is replaced in place; a new one is only added, never over a route
            // someone else put there for the same prefix (a replace would take it whatever
            // its protocol).
            match nl.put_owned_route(route, ROUTE_PROTOCOL, have.contains_key(dst)) {
                Ok(()) => {
                    installed += 1;
                    tracing::info!(destination = %dst, via = %route.gateway, "node route in place")
                }
                Err(e) if e.is_exists() => errors.push(format!(
                    "{dst} via {}: another route for {dst} (not of proto {ROUTE_PROTOCOL}) is in the table; left alone, retrying until it goes",
                    route.gateway
                )),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for dst in have.keys().filter(|d| !want.contains_key(*d)) {
            match nl.delete_owned_route(*dst, ROUTE_PROTOCOL) {
                Ok(()) => tracing::info!(destination = %dst, "node route removed"),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Ok(Pass {
            installed,
            skipped,
            outside,
            errors,
        })
    })
    .map_err(|e| e.to_string())
}

/// Whether `ip` lies on one of `networks` (a directly reachable neighbour).
pub fn on_segment(ip: Ipv4Addr, networks: &[Ipv4Net]) -> bool {
    networks.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_state::ClusterName;

    fn peer(cluster: &str, name: &str, ip: &str, cidr: &str) -> PeerNode {
        PeerNode {
            cluster: ClusterName::new(cluster).unwrap(),
            name: name.into(),
            node_ip: ip.parse().unwrap(),
            pod_cidrs: vec![cidr.parse().unwrap()],
        }
    }

    #[test]
    fn nodes_on_the_segment_get_routes_and_the_others_a_line() {
        let nodes = [
            peer("c1", "n2", "192.168.77.12", "10.1.2.0/24"),
            peer("c2", "n1", "192.168.77.21", "10.2.1.0/24"),
            peer("c2", "n2", "192.168.88.22", "10.2.2.0/24"),
            peer("c3", "n1", "192.168.77.31", "172.16.1.0/24"),
        ];
        let (routes, skipped, outside) = plan(
            &nodes,
            7,
            &["192.168.77.11/24".parse().unwrap()],
            Some("10.0.0.0/8".parse().unwrap()),
        );
        let got: Vec<String> = routes
            .values()
            .map(|r| format!("{} via {} #{}", r.destination, r.gateway, r.ifindex))
            .collect();
        assert_eq!(
            got,
            [
                "10.1.2.0/24 via 192.168.77.12 #7",
                "10.2.1.0/24 via 192.168.77.21 #7",
                "172.16.1.0/24 via 192.168.77.31 #7"
            ]
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("c2/n2 (192.168.88.22)"), "{skipped:?}");
        assert!(skipped[0].contains("10.2.2.0/24"), "{skipped:?}");
        assert_eq!(outside.len(), 1, "{outside:?}");
        assert!(
            outside[0].contains("172.16.1.0/24 is outside native_routing_cidr 10.0.0.0/8"),
            "{outside:?}"
        );
        assert!(on_segment(
            "192.168.77.99".parse().unwrap(),
            &["192.168.77.11/24".parse().unwrap()]
        ));
    }
}
