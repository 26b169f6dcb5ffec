//! Network plumbing the agent needs around the datapath: endpoint namespaces and veths, and
//! the VXLAN device. Done with the `ip` command (iproute2), with errors that name the command
//! and device.
//!
//! Endpoint wiring: the endpoint's `eth0` gets its address as a /32, a default route via a
//! link-local gateway, and a permanent neighbour entry mapping that gateway to the MAC of the
//! host side veth. So the endpoint never ARPs, every packet it sends reaches from_endpoint with
//! the host veth as destination MAC, and IPv6 autoconfiguration is off (IPv4 only for now).

use std::{net::Ipv4Addr, process::Command};

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
    #[error("`{command}` failed for {device}: {stderr}")]
    Command {
        command: String,
        device: String,
        stderr: String,
    },
    #[error("running `{command}` for {device}: {source}")]
    Spawn {
        command: String,
        device: String,
        source: std::io::Error,
    },
    #[error("unexpected output of `{command}` for {device}: {detail}")]
    Output {
        command: String,
        device: String,
        detail: String,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

type Result<T, E = PlumbingError> = std::result::Result<T, E>;

/// Runs `ip [-n netns] args...`, returning stdout.
pub fn ip(netns: Option<&str>, device: &str, args: &[&str]) -> Result<String> {
    let mut full: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        full.extend(["-n", ns]);
    }
    full.extend_from_slice(args);
    let command = format!("ip {}", full.join(" "));
    let out = Command::new("ip")
        .args(&full)
        .output()
        .map_err(|source| PlumbingError::Spawn {
            command: command.clone(),
            device: device.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(PlumbingError::Command {
            command,
            device: device.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the datapath needs to know about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// Reads ifindex, MAC and MTU of `dev` in `netns` (None = the caller's namespace).
pub fn link_info(netns: Option<&str>, dev: &str) -> Result<LinkInfo> {
    let out = ip(netns, dev, &["-j", "link", "show", "dev", dev])?;
    let command = format!("ip -j link show dev {dev}");
    let bad = |detail: String| PlumbingError::Output {
        command: command.clone(),
        device: dev.to_owned(),
        detail,
    };
    let json: serde_json::Value = serde_json::from_str(&out).map_err(|e| bad(e.to_string()))?;
    let link = json.get(0).ok_or_else(|| bad("no link in output".into()))?;
    let ifindex = link["ifindex"]
        .as_u64()
        .ok_or_else(|| bad("no ifindex".into()))? as u32;
    let mtu = link["mtu"].as_u64().ok_or_else(|| bad("no mtu".into()))? as u32;
    let mac = parse_mac(link["address"].as_str().unwrap_or_default())
        .ok_or_else(|| bad(format!("bad address {}", link["address"])))?;
    Ok(LinkInfo { ifindex, mac, mtu })
}

/// The interface holding IPv4 address `addr` in `netns` (None = the caller's namespace), e.g.
/// the node's uplink by its node IP; `None` if no interface has it.
pub fn device_with_addr(netns: Option<&str>, addr: std::net::Ipv4Addr) -> Result<Option<String>> {
    let out = ip(netns, "*", &["-j", "-4", "addr", "show"])?;
    let json: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| PlumbingError::Output {
            command: "ip -j -4 addr show".into(),
            device: "*".into(),
            detail: e.to_string(),
        })?;
    let want = addr.to_string();
    Ok(json.as_array().into_iter().flatten().find_map(|link| {
        let has = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["local"].as_str() == Some(want.as_str()));
        has.then(|| link["ifname"].as_str().map(str::to_owned))
            .flatten()
    }))
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
    if link_info(netns, name).is_err() {
        let port = dstport.to_string();
        ip(
            netns,
            name,
            &[
                "link",
                "add",
                name,
                "type",
                "vxlan",
                "external",
                "dstport",
                &port,
                "nolearning",
            ],
        )?;
        // Packets only ever reach it through bpf_redirect; no IPv6 autoconf chatter.
        ip(netns, name, &["link", "set", name, "addrgenmode", "none"])?;
    }
    ip(netns, name, &["link", "set", name, "up"])?;
    Ok(link_info(netns, name)?.ifindex)
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
    /// MTU of the node's underlay; the endpoint gets this minus [`VXLAN_OVERHEAD`].
    pub underlay_mtu: u32,
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
    let mtu = spec
        .underlay_mtu
        .checked_sub(VXLAN_OVERHEAD)
        .filter(|m| *m >= 576)
        .ok_or_else(|| PlumbingError::Invalid {
            what: "underlay MTU",
            detail: format!("{} leaves no room for VXLAN", spec.underlay_mtu),
        })?;
    let mtu_s = mtu.to_string();
    let node = spec.node_netns;
    let ep = Some(spec.endpoint_netns);
    let host = spec.host_ifname;
    ip(
        node,
        host,
        &[
            "link",
            "add",
            host,
            "mtu",
            &mtu_s,
            "type",
            "veth",
            "peer",
            "name",
            ENDPOINT_IFNAME,
            "mtu",
            &mtu_s,
            "netns",
            spec.endpoint_netns,
        ],
    )?;
    ip(node, host, &["link", "set", host, "addrgenmode", "none"])?;
    ip(node, host, &["link", "set", host, "up"])?;
    enable_forwarding(node, host)?;
    let host_info = link_info(node, host)?;
    let mac = format_mac(host_info.mac);
    let addr = format!("{}/32", spec.ip);
    let gw = ENDPOINT_GATEWAY.to_string();
    let dev = format!("{}:{ENDPOINT_IFNAME}", spec.endpoint_netns);
    ip(ep, &dev, &["link", "set", "lo", "up"])?;
    ip(
        ep,
        &dev,
        &["link", "set", ENDPOINT_IFNAME, "addrgenmode", "none"],
    )?;
    ip(ep, &dev, &["addr", "add", &addr, "dev", ENDPOINT_IFNAME])?;
    ip(ep, &dev, &["link", "set", ENDPOINT_IFNAME, "up"])?;
    ip(
        ep,
        &dev,
        &["route", "add", &gw, "dev", ENDPOINT_IFNAME, "scope", "link"],
    )?;
    ip(
        ep,
        &dev,
        &[
            "route",
            "add",
            "default",
            "via",
            &gw,
            "dev",
            ENDPOINT_IFNAME,
        ],
    )?;
    ip(
        ep,
        &dev,
        &[
            "neigh",
            "replace",
            &gw,
            "dev",
            ENDPOINT_IFNAME,
            "lladdr",
            &mac,
            "nud",
            "permanent",
        ],
    )?;
    // The node's own stack reaches the endpoint through its veth (replies to traffic that
    // from_endpoint handed to the stack, health checks). ip_forward stays as it is: nothing
    // else is routed this way.
    ip(
        node,
        host,
        &["route", "replace", &addr, "dev", host, "scope", "link"],
    )?;
    let ep_info = link_info(ep, ENDPOINT_IFNAME)?;
    Ok(EndpointLink {
        host_ifindex: host_info.ifindex,
        host_mac: host_info.mac,
        endpoint_mac: ep_info.mac,
        mtu,
    })
}

/// Turns on IPv4 forwarding for packets entering through `dev` only: from_endpoint routes
/// world-bound packets with bpf_fib_lookup, which refuses to (BPF_FIB_LKUP_RET_FWD_DISABLED)
/// when the input device does not forward. Nothing else on the node starts forwarding.
pub fn enable_forwarding(netns: Option<&str>, dev: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{dev}/forwarding");
    match netns {
        None => std::fs::write(&path, "1").map_err(|source| PlumbingError::Spawn {
            command: format!("write 1 to {path}"),
            device: dev.to_owned(),
            source,
        }),
        Some(ns) => {
            // nsenter, not `ip netns exec`, which remounts /sys (DESIGN.md, "Facts found").
            let command = format!(
                "nsenter --net=/run/netns/{ns} sysctl -qw net/ipv4/conf/{dev}/forwarding=1"
            );
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .args(["--", "sysctl", "-qw"])
                .arg(format!("net/ipv4/conf/{dev}/forwarding=1"))
                .output()
                .map_err(|source| PlumbingError::Spawn {
                    command: command.clone(),
                    device: dev.to_owned(),
                    source,
                })?;
            if !out.status.success() {
                return Err(PlumbingError::Command {
                    command,
                    device: dev.to_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            Ok(())
        }
    }
}

/// Deletes the endpoint's veth pair (both ends go with the host side). Idempotent.
pub fn delete_endpoint(node_netns: Option<&str>, host_ifname: &str) -> Result<()> {
    if link_info(node_netns, host_ifname).is_err() {
        return Ok(());
    }
    ip(node_netns, host_ifname, &["link", "del", host_ifname]).map(|_| ())
}

/// Creates the named network namespace `name` (idempotent).
pub fn add_netns(name: &str) -> Result<()> {
    if std::path::Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    ip(None, name, &["netns", "add", name]).map(|_| ())
}

/// Deletes the named network namespace `name` (idempotent).
pub fn delete_netns(name: &str) -> Result<()> {
    if !std::path::Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    ip(None, name, &["netns", "del", name]).map(|_| ())
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
