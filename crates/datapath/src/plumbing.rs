//! Network plumbing the agent needs around the datapath: endpoint namespaces and veths, and
//! the VXLAN device. Done through netlink (`meshd-netlink`), each step in its namespace, with
//! errors that name the link and the namespace.
//!
//! Endpoint wiring: the endpoint's `eth0` gets its address as a /32, a default route via a
//! link-local gateway, and a permanent neighbour entry mapping that gateway to the MAC of the
//! host side veth. So the endpoint never ARPs, every packet it sends reaches from_endpoint with
//! the host veth as destination MAC, and IPv6 autoconfiguration is off (IPv4 only for now).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use meshd_netlink::{netns, with_netlink, NetlinkError, Route};

/// The gateway address every endpoint routes through (answered by nobody: the neighbour entry
/// is static, and from_endpoint handles the packets).
pub const ENDPOINT_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// VXLAN's encapsulation overhead over IPv4: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner
/// Ethernet (14). Endpoint MTU = underlay MTU - this; with a full 1500 inside a 1500 underlay,
/// TCP measured ~1 Gbit/s with retransmits instead of ~10 Gbit/s (DESIGN.md).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Default VXLAN UDP port (the Linux kernel's and Cilium's).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// A failed plumbing step.
#[derive(Debug, thiserror::Error)]
pub enum PlumbingError {
    /// A netlink or namespace operation; the error names the link and the namespace.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

type Result<T, E = PlumbingError> = std::result::Result<T, E>;

/// What the datapath needs to know about a link.
pub use meshd_netlink::LinkInfo;

/// Reads ifindex, MAC and MTU of `dev` in `netns` (None = the caller's namespace).
pub fn link_info(netns: Option<&str>, dev: &str) -> Result<LinkInfo> {
    Ok(with_netlink(netns, |nl| nl.existing_link(dev))?)
}

/// The interface holding IPv4 address `addr` in `netns` (None = the caller's namespace), e.g.
/// the node's uplink by its node IP; `None` if no interface has it.
pub fn device_with_addr(netns: Option<&str>, addr: Ipv4Addr) -> Result<Option<String>> {
    Ok(with_netlink(netns, |nl| nl.link_with_address(addr))?)
}

/// Turns on IPv4 forwarding for packets entering through `dev` only (see create_endpoint).
pub fn enable_forwarding(netns: Option<&str>, dev: &str) -> Result<()> {
    Ok(with_netlink(netns, |nl| nl.enable_ipv4_forwarding(dev))?)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Creates the node's VXLAN device `name` in external (collect-metadata) mode on UDP `dstport`,
/// so one device serves every remote node, chosen per packet by from_endpoint's tunnel key.
/// Idempotent: an existing device of that name is kept. Returns its ifindex.
pub fn create_vxlan(netns: Option<&str>, name: &str, dstport: u16) -> Result<u32> {
    Ok(with_netlink(netns, |nl| {
        if nl.link(name)?.is_none() {
            nl.add_vxlan_external(name, dstport)?;
            // Packets only ever reach it through bpf_redirect; no IPv6 autoconf chatter.
            nl.set_no_ipv6_addrgen(name)?;
        }
        nl.set_up(name)?;
        nl.index(name)
    })?)
}

/// Deletes link `name` in `netns` (None = the caller's namespace) if it exists.
pub fn delete_link_if_present(netns: Option<&str>, name: &str) -> Result<()> {
    Ok(with_netlink(netns, |nl| {
        if nl.link(name)?.is_some() {
            nl.delete_link(name)?;
        }
        Ok(())
    })?)
}

/// An endpoint to create: a veth from the node's namespace into the endpoint's.
#[derive(Clone, Debug)]
pub struct EndpointSpec<'a> {
    /// The node's namespace (None = the caller's).
    pub node_netns: Option<&'a str>,
    /// The endpoint's namespace; must exist (see [`add_netns`]).
    pub endpoint_netns: &'a str,
    /// Name of the host side veth in the node's namespace (at most 15 bytes).
    pub host_ifname: &'a str,
    /// The endpoint's address (a /32 on its eth0).
    pub ip: Ipv4Addr,
    /// MTU of the node's underlay; the endpoint gets this minus [`VXLAN_OVERHEAD`] when its
    /// traffic is encapsulated, all of it in native routing.
    pub underlay_mtu: u32,
    /// Tunnel mode: endpoint packets cross the underlay inside VXLAN.
    pub encapsulated: bool,
}

/// The MTU of endpoints over an underlay of `underlay_mtu` (None: too small to carry 576).
pub fn endpoint_mtu(underlay_mtu: u32, encapsulated: bool) -> Option<u32> {
    let overhead = if encapsulated { VXLAN_OVERHEAD } else { 0 };
    underlay_mtu.checked_sub(overhead).filter(|m| *m >= 576)
}

/// The result of [`create_endpoint`]: what `DatapathMaps::upsert_endpoint` needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLink {
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub endpoint_mac: [u8; 6],
    pub mtu: u32,
}

/// Name of the interface inside every endpoint namespace.
pub const ENDPOINT_IFNAME: &str = "eth0";

/// Creates the endpoint's veth pair and configures its namespace (address, MTU, routes, static
/// gateway neighbour), plus a /32 route to it in the node's namespace. Fails if the host side
/// interface already exists.
pub fn create_endpoint(spec: &EndpointSpec<'_>) -> Result<EndpointLink> {
    if spec.host_ifname.is_empty() || spec.host_ifname.len() > 15 {
        return Err(PlumbingError::Invalid {
            what: "host interface name",
            detail: spec.host_ifname.to_owned(),
        });
    }
    let mtu = endpoint_mtu(spec.underlay_mtu, spec.encapsulated).ok_or_else(|| {
        PlumbingError::Invalid {
            what: "underlay MTU",
            detail: format!("{} leaves endpoints less than 576", spec.underlay_mtu),
        }
    })?;
    let host = spec.host_ifname;
    let addr = Ipv4Net::from(spec.ip);
    let host_info = with_netlink(spec.node_netns, |nl| {
        nl.add_veth(host, ENDPOINT_IFNAME, Some(spec.endpoint_netns), Some(mtu))?;
        nl.set_no_ipv6_addrgen(host)?;
        nl.set_up(host)?;
        // from_endpoint routes world-bound packets with bpf_fib_lookup, which refuses to
        // (BPF_FIB_LKUP_RET_FWD_DISABLED) when their input device does not forward.
        nl.enable_ipv4_forwarding(host)?;
        nl.existing_link(host)
    })?;
    let gateway = Ipv4Net::from(ENDPOINT_GATEWAY);
    let ep_info = with_netlink(Some(spec.endpoint_netns), |nl| {
        nl.set_up("lo")?;
        nl.set_no_ipv6_addrgen(ENDPOINT_IFNAME)?;
        nl.add_address(ENDPOINT_IFNAME, addr)?;
        nl.set_up(ENDPOINT_IFNAME)?;
        nl.add_route(
            &Route {
                destination: gateway,
                dev: ENDPOINT_IFNAME,
                gateway: None,
                link_scope: true,
            },
            false,
        )?;
        nl.add_route(
            &Route {
                destination: Ipv4Net::default(),
                dev: ENDPOINT_IFNAME,
                gateway: Some(ENDPOINT_GATEWAY),
                link_scope: false,
            },
            false,
        )?;
        nl.replace_permanent_neighbour(ENDPOINT_IFNAME, ENDPOINT_GATEWAY, host_info.mac)?;
        nl.existing_link(ENDPOINT_IFNAME)
    })?;
    // The node's own stack reaches the endpoint through its veth (replies to traffic that
    // from_endpoint handed to the stack, health checks). ip_forward stays as it is: nothing
    // else is routed this way.
    with_netlink(spec.node_netns, |nl| {
        nl.add_route(
            &Route {
                destination: addr,
                dev: host,
                gateway: None,
                link_scope: true,
            },
            true,
        )
    })?;
    Ok(EndpointLink {
        host_ifindex: host_info.ifindex,
        host_mac: host_info.mac,
        endpoint_mac: ep_info.mac,
        mtu,
    })
}

/// Deletes the endpoint's veth pair (both ends go with the host side). Idempotent.
pub fn delete_endpoint(node_netns: Option<&str>, host_ifname: &str) -> Result<()> {
    Ok(with_netlink(node_netns, |nl| {
        if nl.link(host_ifname)?.is_some() {
            nl.delete_link(host_ifname)?;
        }
        Ok(())
    })?)
}

/// Creates the named network namespace `name` (idempotent).
pub fn add_netns(name: &str) -> Result<()> {
    if netns::exists(name) {
        return Ok(());
    }
    Ok(netns::create(name)?)
}

/// Deletes the named network namespace `name` (idempotent).
pub fn delete_netns(name: &str) -> Result<()> {
    Ok(netns::delete(name)?)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_reject_garbage() {
        let mac = [0x02, 0, 0xab, 0xcd, 0xef, 0x10];
        assert_eq!(parse_mac(&format_mac(mac)), Some(mac));
        assert_eq!(parse_mac("02:00:ab:cd:ef"), None);
        assert_eq!(parse_mac("02:00:ab:cd:ef:10:11"), None);
        assert_eq!(parse_mac("zz:00:ab:cd:ef:10"), None);
    }
}
