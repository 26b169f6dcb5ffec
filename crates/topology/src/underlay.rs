//! Namespaces on one L2 underlay: a bridge in a namespace of its own, hosts (nodes, control
//! planes) plugged into it by a veth each, and optionally a link from the caller's namespace.
//!
//! The bridge lives in a namespace, never in the root one, where Docker's FORWARD policy would
//! drop bridged traffic (DESIGN.md, "Facts found").

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use meshd_netlink::{with_netlink, NetlinkError};

use crate::error::{Result, StepContext, TopologyError};
use crate::netns;

/// The bridge inside the underlay namespace.
pub const BRIDGE_IFNAME: &str = "br0";
/// Each host's interface on the underlay.
pub const UNDERLAY_IFNAME: &str = "ul0";

/// The underlay: a namespace holding the bridge.
#[derive(Debug, Clone)]
pub struct UnderlaySpec {
    /// The bridge's namespace.
    pub netns: String,
    /// An address of the bridge itself (the e2e harness relays etcd there), if any.
    pub bridge_address: Option<Ipv4Net>,
    /// MTU of every veth on the underlay.
    pub mtu: u32,
}

/// A host on the underlay: a namespace with [`UNDERLAY_IFNAME`] = `address`.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub netns: String,
    /// The veth's end on the bridge (at most 15 bytes, unique within the underlay).
    pub bridge_port: String,
    pub address: Ipv4Net,
}

/// A veth from the caller's namespace to the bridge, so the caller reaches every host.
#[derive(Debug, Clone)]
pub struct RootLinkSpec {
    /// The link in the caller's namespace.
    pub name: String,
    /// Its peer on the bridge.
    pub bridge_port: String,
    pub address: Ipv4Net,
}

/// The owner of a topology: it records every namespace and host link it creates, as it
/// creates them, and [`Topology::teardown`] (or drop) removes them in reverse order, killing
/// what still runs inside first. A half-built topology is torn down the same way.
///
/// An owner that must outlive this process (the lab, which records what it built in its state
/// file) calls [`Topology::disown`] and removes the recorded names later with
/// [`remove`].
#[derive(Debug)]
pub struct Topology {
    underlay: UnderlaySpec,
    /// Creation order.
    namespaces: Vec<String>,
    root_links: Vec<String>,
    owned: bool,
}

impl Topology {
    /// Creates the underlay namespace with its bridge up.
    pub fn create(underlay: UnderlaySpec) -> Result<Topology> {
        let mut topo = Topology {
            underlay,
            namespaces: Vec::new(),
            root_links: Vec::new(),
            owned: true,
        };
        let ns = topo.underlay.netns.clone();
        topo.add_namespace(&ns)?;
        let address = topo.underlay.bridge_address;
        with_netlink(Some(&ns), |nl| {
            nl.add_bridge(BRIDGE_IFNAME)?;
            if let Some(addr) = address {
                nl.add_address(BRIDGE_IFNAME, addr)?;
            }
            nl.set_up(BRIDGE_IFNAME)
        })
        .step(|| format!("creating the underlay bridge in {ns}"))?;
        Ok(topo)
    }

    /// Creates a namespace owned by this topology (not on the underlay), with `lo` up.
    pub fn add_namespace(&mut self, name: &str) -> Result<()> {
        netns::create(name).map_err(|e| match e {
            exists @ NetlinkError::NetnsExists { .. } => TopologyError::Netlink(exists),
            other => TopologyError::Step {
                what: format!("creating network namespace {name}"),
                source: other,
            },
        })?;
        self.namespaces.push(name.to_owned());
        Ok(())
    }

    /// Creates the host's namespace and plugs it into the bridge.
    pub fn add_host(&mut self, host: &HostSpec) -> Result<()> {
        self.add_namespace(&host.netns)?;
        let ul = self.underlay.netns.as_str();
        let what = || format!("adding host {} to the underlay {ul}", host.netns);
        with_netlink(Some(ul), |nl| {
            nl.add_veth(
                &host.bridge_port,
                UNDERLAY_IFNAME,
                Some(&host.netns),
                Some(self.underlay.mtu),
            )?;
            nl.set_master_up(&host.bridge_port, BRIDGE_IFNAME)
        })
        .step(what)?;
        with_netlink(Some(&host.netns), |nl| {
            nl.add_address(UNDERLAY_IFNAME, host.address)?;
            nl.set_up(UNDERLAY_IFNAME)
        })
        .step(what)
    }

    /// Links the caller's namespace to the bridge.
    pub fn add_root_link(&mut self, link: &RootLinkSpec) -> Result<()> {
        let ul = self.underlay.netns.clone();
        let what = || format!("linking the host namespace to the underlay {ul}");
        with_netlink(None, |nl| {
            nl.add_veth(&link.name, &link.bridge_port, Some(&ul), None)
        })
        .step(what)?;
        self.root_links.push(link.name.clone());
        with_netlink(None, |nl| {
            nl.add_address(&link.name, link.address)?;
            nl.set_up(&link.name)
        })
        .step(what)?;
        with_netlink(Some(&ul), |nl| {
            nl.set_master_up(&link.bridge_port, BRIDGE_IFNAME)
        })
        .step(what)
    }

    pub fn underlay(&self) -> &UnderlaySpec {
        &self.underlay
    }

    /// Namespaces created so far, in creation order (the underlay's first).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Links created in the caller's namespace.
    pub fn root_links(&self) -> &[String] {
        &self.root_links
    }

    /// Gives up ownership: nothing is removed on drop. The caller keeps the names
    /// ([`Topology::namespaces`], [`Topology::root_links`]) and removes them with [`remove`].
    pub fn disown(mut self) {
        self.owned = false;
    }

    /// Kills what runs inside, then removes every namespace (last created first) and root
    /// link. Idempotent; the first error is returned after trying everything.
    pub fn teardown(&mut self) -> Result<()> {
        let result = remove(&self.namespaces, &self.root_links);
        self.namespaces.clear();
        self.root_links.clear();
        result
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.teardown();
        }
    }
}

/// Removes namespaces (given in creation order; removed last first, after killing every
/// process inside) and links of the caller's namespace. Missing ones are skipped; the first
/// error is returned after trying everything.
pub fn remove(namespaces: &[String], root_links: &[String]) -> Result<()> {
    let mut first_error = None;
    for ns in namespaces.iter().rev() {
        netns::kill_processes(ns);
        if let Err(e) = netns::delete(ns).step(|| format!("removing network namespace {ns}")) {
            first_error.get_or_insert(e);
        }
    }
    for link in root_links {
        // Normally gone with its peer's namespace.
        let removed = with_netlink(None, |nl| {
            if nl.link(link)?.is_some() {
                nl.delete_link(link)?;
            }
            Ok(())
        })
        .step(|| format!("removing host link {link}"));
        if let Err(e) = removed {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `address/prefix_len` of a host on an underlay subnet.
pub fn host_address(address: Ipv4Addr, subnet: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(address, subnet.prefix_len()).expect("a subnet's prefix length is valid")
}
