//! Outside the mesh (DESIGN.md, "Test topology on one machine"): a router namespace on the
//! underlay and, behind it on a link of its own, an external host standing for the internet or
//! a datacenter service, with an address from a documentation range. The lab and the e2e tests
//! build it here, the same way.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use meshd_netlink::{with_netlink, Route};

use crate::error::{Result, StepContext};
use crate::underlay::{HostSpec, Topology, UNDERLAY_IFNAME};

/// The router's interface towards the external host.
pub const ROUTER_EXTERNAL_IFNAME: &str = "ext0";
/// The external host's only interface.
pub const EXTERNAL_HOST_IFNAME: &str = "eth0";

/// A host behind the router on a link of its own (native routing's node behind a gateway): not
/// on the underlay's segment, so no node can route to it directly; the router carries its
/// traffic, and routes to its pod CIDRs (static routes standing in for a routing protocol).
#[derive(Debug, Clone)]
pub struct FarHostSpec {
    /// The router's namespace ([`OutsideSpec::router_netns`], built first).
    pub router_netns: String,
    /// The router's end of the link (unique within the router).
    pub router_port: String,
    /// The host's namespace; its end of the link is [`UNDERLAY_IFNAME`], its uplink.
    pub netns: String,
    /// The router's address on the link and the host's (one prefix).
    pub router_address: Ipv4Net,
    pub address: Ipv4Net,
    /// MTU of the host's side; the router's side gets `router_side_mtu` (smaller: the router
    /// answers big DF packets towards the host with "fragmentation needed").
    pub mtu: u32,
    pub router_side_mtu: u32,
    /// Prefixes the router routes to the host (its pod CIDRs).
    pub routed: Vec<Ipv4Net>,
    /// Strict reverse-path filtering on both ends of the link.
    pub strict_rp_filter: bool,
}

/// A router and the external host behind it.
#[derive(Debug, Clone)]
pub struct OutsideSpec {
    /// The router's namespace, on the underlay like a host.
    pub router_netns: String,
    /// The router's veth end on the bridge (unique within the underlay).
    pub bridge_port: String,
    /// The router's address on the underlay.
    pub router_address: Ipv4Net,
    /// The external host's namespace.
    pub host_netns: String,
    /// The external link: the router is its first address, the host `host_ip`.
    pub net: Ipv4Net,
    pub host_ip: Ipv4Addr,
    /// MTU of the router's interface towards the host (the host's side keeps the underlay's),
    /// so a smaller one makes the router answer big DF packets with "fragmentation needed".
    pub router_side_mtu: u32,
    /// Prefixes the router forwards to a next hop on the underlay (pod CIDRs to their nodes,
    /// when pod addresses leave the nodes unmasqueraded).
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Strict reverse-path filtering on the router's and the host's links, as a careful
    /// network has.
    pub strict_rp_filter: bool,
}

impl OutsideSpec {
    /// The router's address on the external link.
    pub fn router_external_address(&self) -> Ipv4Net {
        Ipv4Net::new(
            Ipv4Addr::from(u32::from(self.net.network()) + 1),
            self.net.prefix_len(),
        )
        .expect("a network's prefix length is valid")
    }
}

impl Topology {
    /// Builds the router (a host of the underlay, forwarding between it and the external
    /// link) and the external host behind it (default route via the router). Both namespaces
    /// belong to this topology.
    pub fn add_outside(&mut self, spec: &OutsideSpec) -> Result<()> {
        self.add_host(&HostSpec {
            netns: spec.router_netns.clone(),
            bridge_port: spec.bridge_port.clone(),
            address: spec.router_address,
        })?;
        self.add_namespace(&spec.host_netns)?;
        let router_ext = spec.router_external_address();
        let host_mtu = self.underlay().mtu;
        with_netlink(Some(&spec.router_netns), |nl| {
            nl.add_veth(
                ROUTER_EXTERNAL_IFNAME,
                EXTERNAL_HOST_IFNAME,
                Some(&spec.host_netns),
                Some(host_mtu),
            )?;
            // The pair is made with the host's MTU; the router's side gets its own.
            if spec.router_side_mtu != host_mtu {
                nl.set_mtu(ROUTER_EXTERNAL_IFNAME, spec.router_side_mtu)?;
            }
            nl.add_address(ROUTER_EXTERNAL_IFNAME, router_ext)?;
            nl.set_up(ROUTER_EXTERNAL_IFNAME)?;
            for link in [ROUTER_EXTERNAL_IFNAME, UNDERLAY_IFNAME] {
                nl.enable_ipv4_forwarding(link)?;
                if spec.strict_rp_filter {
                    nl.set_strict_rp_filter(link)?;
                }
            }
            for &(destination, gateway) in &spec.routes {
                nl.add_route(
                    &Route {
                        destination,
                        dev: UNDERLAY_IFNAME,
                        gateway: Some(gateway),
                        link_scope: false,
                    },
                    false,
                )?;
            }
            Ok(())
        })
        .step(|| format!("{}: the router's external link", spec.router_netns))?;
        with_netlink(Some(&spec.host_netns), |nl| {
            nl.add_address(
                EXTERNAL_HOST_IFNAME,
                Ipv4Net::new(spec.host_ip, spec.net.prefix_len()).expect("valid prefix length"),
            )?;
            nl.set_up(EXTERNAL_HOST_IFNAME)?;
            if spec.strict_rp_filter {
                nl.set_strict_rp_filter(EXTERNAL_HOST_IFNAME)?;
            }
            nl.add_route(
                &Route {
                    destination: Ipv4Net::default(),
                    dev: EXTERNAL_HOST_IFNAME,
                    gateway: Some(router_ext.addr()),
                    link_scope: false,
                },
                false,
            )
        })
        .step(|| format!("{}: the external host's link", spec.host_netns))?;
        Ok(())
    }

    /// Builds a host behind the router (see [`FarHostSpec`]): its namespace, the link from the
    /// router, its default route via the router, and the router's routes to it.
    pub fn add_host_behind_router(&mut self, spec: &FarHostSpec) -> Result<()> {
        self.add_namespace(&spec.netns)?;
        let host = spec.address.addr();
        with_netlink(Some(&spec.router_netns), |nl| {
            nl.add_veth(
                &spec.router_port,
                UNDERLAY_IFNAME,
                Some(&spec.netns),
                Some(spec.mtu),
            )?;
            if spec.router_side_mtu != spec.mtu {
                nl.set_mtu(&spec.router_port, spec.router_side_mtu)?;
            }
            nl.add_address(&spec.router_port, spec.router_address)?;
            nl.set_up(&spec.router_port)?;
            nl.enable_ipv4_forwarding(&spec.router_port)?;
            if spec.strict_rp_filter {
                nl.set_strict_rp_filter(&spec.router_port)?;
            }
            for &destination in &spec.routed {
                nl.add_route(
                    &Route {
                        destination,
                        dev: &spec.router_port,
                        gateway: Some(host),
                        link_scope: false,
                    },
                    false,
                )?;
            }
            Ok(())
        })
        .step(|| format!("{}: the link to {}", spec.router_netns, spec.netns))?;
        with_netlink(Some(&spec.netns), |nl| {
            nl.add_address(UNDERLAY_IFNAME, spec.address)?;
            nl.set_up(UNDERLAY_IFNAME)?;
            if spec.strict_rp_filter {
                nl.set_strict_rp_filter(UNDERLAY_IFNAME)?;
            }
            nl.add_route(
                &Route {
                    destination: Ipv4Net::default(),
                    dev: UNDERLAY_IFNAME,
                    gateway: Some(spec.router_address.addr()),
                    link_scope: false,
                },
                false,
            )
        })
        .step(|| format!("{}: its link to the router", spec.netns))
    }
}
