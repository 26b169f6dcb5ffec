//! Two-node (or more) test topologies in network namespaces, wired like meshd wires a node:
//! underlay veth to a shared bridge, a VXLAN device in external mode with from_overlay, and
//! endpoints (namespace + veth, MTU = underlay - 50) with from_endpoint; with
//! [`Topology::with_encap`], each node's VXLAN written by the device or by the programs, and
//! from_netdev on every uplink, as the agent wires it.

use meshd_state::NumericIdentity;
use std::net::IpAddr;
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use meshd_datapath::{
    bpffs::ScratchPinDir,
    netns::run_in,
    plumbing::{self, EndpointSpec},
    Datapath, DatapathMaps, IpcacheTarget, LocalEndpoint, NodeConfig, TunnelEncap,
};
use meshd_testing::netns::{Netns, Underlay};

pub const VXLAN_IFNAME: &str = "meshd_vxlan";

/// One endpoint: its namespace, address, identity and host-side veth.
pub struct TestEndpoint {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub host_ifname: String,
}

/// One node: its datapath (maps pinned in a scratch dir) and endpoints.
pub struct TestNode {
    pub index: usize,
    pub node_ip: Ipv4Addr,
    pub cluster_id: u8,
    pub datapath: Option<Datapath>,
    pub maps: DatapathMaps,
    pub endpoints: Vec<TestEndpoint>,
    // Dropped after the endpoints and the datapath handles: unpinning detaches everything.
    pub pin_dir: ScratchPinDir,
}

/// Nodes on one underlay.
pub struct Topology {
    pub nodes: Vec<TestNode>,
    pub underlay: Underlay,
}

impl Topology {
    /// `clusters[i]` is node i's cluster id; node i has underlay IP 192.168.60.(i+1) and
    /// endpoints 10.(i+1).0.(j+2) for j in 0..endpoints_per_node, identity
    /// (cluster << 16) | (1000 + j).
    pub fn new(
        prefix: &str,
        clusters: &[u8],
        endpoints_per_node: usize,
    ) -> anyhow::Result<Topology> {
        Self::with_routing(prefix, clusters, endpoints_per_node, false)
    }

    /// As [`Topology::new`]; `native`: native routing as the agent sets it up (no VXLAN
    /// device, from_netdev on the uplink, endpoint MTU = underlay MTU, every other node's
    /// endpoint /24 routed via its node IP).
    pub fn with_routing(
        prefix: &str,
        clusters: &[u8],
        endpoints_per_node: usize,
        native: bool,
    ) -> anyhow::Result<Topology> {
        Self::build(prefix, clusters, endpoints_per_node, native, &[])
    }

    /// As [`Topology::new`] in tunnel mode, node i's VXLAN written by `encaps[i]` (the device
    /// or the programs), and from_netdev on every node's uplink, as the agent attaches it.
    pub fn with_encap(
        prefix: &str,
        clusters: &[u8],
        endpoints_per_node: usize,
        encaps: &[TunnelEncap],
    ) -> anyhow::Result<Topology> {
        anyhow::ensure!(encaps.len() == clusters.len(), "one encapsulation per node");
        Self::build(prefix, clusters, endpoints_per_node, false, encaps)
    }

    fn build(
        prefix: &str,
        clusters: &[u8],
        endpoints_per_node: usize,
        native: bool,
        encaps: &[TunnelEncap],
    ) -> anyhow::Result<Topology> {
        let mut underlay = Underlay::new(prefix, 1500)?;
        let mut nodes = Vec::new();
        for (i, &cluster_id) in clusters.iter().enumerate() {
            let node_ip = Ipv4Addr::new(192, 168, 60, i as u8 + 1);
            let index = underlay.add_node(&format!("{prefix}-n{i}"), node_ip)?;
            let node_ns = underlay.node(index);
            let pin_dir = ScratchPinDir::new(
                Path::new(meshd_datapath::bpffs::DEFAULT_ROOT),
                "meshd-nstest",
            )?;
            let mut datapath = Datapath::load(pin_dir.path())?;
            let mut maps = DatapathMaps::open(pin_dir.path())?;
            let vxlan_ifindex = if native {
                0
            } else {
                plumbing::create_vxlan(
                    Some(node_ns.name()),
                    VXLAN_IFNAME,
                    plumbing::DEFAULT_VXLAN_PORT,
                )?
            };
            maps.set_config(NodeConfig {
                vxlan_ifindex,
                node_ip,
                cluster_id,
            })?;
            maps.set_native_routing(native)?;
            if native {
                let uplink = meshd_testing::netns::UNDERLAY_IFNAME;
                run_in(&node_ns.path(), || datapath.attach_netdev(uplink))?;
                for (k, _) in clusters.iter().enumerate().filter(|(k, _)| *k != i) {
                    node_ns.ip(&[
                        "route",
                        "add",
                        &format!("10.{}.0.0/24", k + 1),
                        "via",
                        &format!("192.168.60.{}", k + 1),
                    ])?;
                }
            } else {
                run_in(&node_ns.path(), || datapath.attach_overlay(VXLAN_IFNAME))?;
                if let Some(&encap) = encaps.get(i) {
                    maps.set_tunnel_encap(encap, plumbing::DEFAULT_VXLAN_PORT)?;
                    let uplink = meshd_testing::netns::UNDERLAY_IFNAME;
                    run_in(&node_ns.path(), || datapath.attach_netdev(uplink))?;
                }
            }

            let mut endpoints = Vec::new();
            for j in 0..endpoints_per_node {
                let ip = Ipv4Addr::new(10, i as u8 + 1, 0, j as u8 + 2);
                let identity = (u32::from(cluster_id) << 16) | (1000 + j as u32);
                let netns = Netns::new(&format!("{prefix}-e{i}{j}"))?;
                let host_ifname = format!("lxc{j}");
                let link = plumbing::create_endpoint(&EndpointSpec {
                    node_netns: Some(node_ns.name()),
                    endpoint_netns: netns.name(),
                    host_ifname: &host_ifname,
                    ip,
                    underlay_mtu: underlay.mtu(),
                    encapsulated: !native,
                })?;
                maps.upsert_endpoint(
                    ip,
                    LocalEndpoint {
                        ifindex: link.host_ifindex,
                        identity,
                        mac: link.endpoint_mac,
                        node_mac: link.host_mac,
                    },
                )?;
                run_in(&node_ns.path(), || datapath.attach_endpoint(&host_ifname))?;
                endpoints.push(TestEndpoint {
                    netns,
                    ip,
                    identity,
                    host_ifname,
                });
            }
            nodes.push(TestNode {
                index,
                node_ip,
                cluster_id,
                datapath: Some(datapath),
                maps,
                endpoints,
                pin_dir,
            });
        }
        // What the agents' reconcilers would write from the merged view: every other node and
        // its endpoints.
        type RemoteNode = (Ipv4Addr, u8, Vec<(Ipv4Addr, u32)>);
        let remote: Vec<RemoteNode> = nodes
            .iter()
            .map(|n| {
                (
                    n.node_ip,
                    n.cluster_id,
                    n.endpoints.iter().map(|e| (e.ip, e.identity)).collect(),
                )
            })
            .collect();
        for node in &mut nodes {
            for (node_ip, cluster, eps) in &remote {
                if *node_ip == node.node_ip {
                    continue;
                }
                node.maps.upsert_node(*node_ip, *cluster)?;
                for (ip, identity) in eps {
                    node.maps.upsert_ipcache(
                        Ipv4Net::new(*ip, 32)?,
                        IpcacheTarget {
                            identity: NumericIdentity::new(*identity).unwrap(),
                            tunnel_endpoint: Some(IpAddr::from(*node_ip)),
                            local: false,
                        },
                    )?;
                }
            }
        }
        Ok(Topology { nodes, underlay })
    }

    pub fn ep(&self, node: usize, ep: usize) -> &TestEndpoint {
        &self.nodes[node].endpoints[ep]
    }

    /// Fails the test if any node's datapath dropped a packet (counted a drop reason).
    pub fn assert_no_drops(&self) {
        for node in &self.nodes {
            for c in node.maps.counters().unwrap() {
                assert!(c.reason > 0, "node {} dropped packets: {c:?}", node.node_ip);
            }
        }
    }

    /// What node `node`'s VXLAN device has sent and received so far.
    pub fn vxlan_traffic(&self, node: usize) -> anyhow::Result<VxlanTraffic> {
        let ns = self.underlay.node(self.nodes[node].index);
        let out = ns.ip(&["-j", "-s", "link", "show", VXLAN_IFNAME])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -j -s link")?;
        let stats = &v[0]["stats64"];
        let get = |dir: &str, what: &str| {
            stats[dir][what]
                .as_u64()
                .with_context(|| format!("no {dir} {what} in {out}"))
        };
        Ok(VxlanTraffic {
            tx_packets: get("tx", "packets")?,
            tx_bytes: get("tx", "bytes")?,
            rx_packets: get("rx", "packets")?,
            rx_bytes: get("rx", "bytes")?,
        })
    }
}

/// A VXLAN device's counters (`ip -s link`): what the device encapsulated (tx) and
/// decapsulated (rx), i.e. what the programs left to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VxlanTraffic {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// Runs `f` in the endpoint's namespace.
pub fn in_ep<T: Send>(
    ep: &TestEndpoint,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    run_in(&ep.netns.path(), f)
}

/// Sends ICMP echo requests from `from` to `to` until one is answered (or `tries` run out).
pub fn ping(from: &TestEndpoint, to: Ipv4Addr, tries: u32) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = in_ep(from, || {
        Ok(Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::ICMPV4),
        )?)
    })?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let id: u16 =
        (std::process::id() as u16) ^ (u16::from(to.octets()[3]) << 8) ^ from.ip.octets()[3] as u16;
    let dest = SockAddr::from(SocketAddr::new(to.into(), 0));
    for seq in 0..tries {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&(seq as u16).to_be_bytes());
        pkt.extend_from_slice(b"meshd-ping-payload");
        let sum = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        sock.send_to(&pkt, &dest)?;
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        while std::time::Instant::now() < deadline {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                break;
            };
            // SAFETY: recv_from initialised the first n bytes.
            let bytes: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let ihl = usize::from(bytes[0] & 0x0f) * 4;
            if bytes.len() >= ihl + 8
                && bytes[12..16] == to.octets()
                && bytes[ihl] == 0
                && bytes[ihl + 4..ihl + 6] == id.to_be_bytes()
            {
                return Ok(());
            }
        }
    }
    bail!("no echo reply from {to} to {} after {tries} tries", from.ip)
}

fn icmp_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP listener in `ep`'s namespace.
pub fn tcp_listen(ep: &TestEndpoint, port: u16) -> anyhow::Result<TcpListener> {
    let ip = ep.ip;
    in_ep(ep, move || Ok(TcpListener::bind((ip, port))?))
}

/// Connects from `from` to `to:port` (timeout `timeout`).
pub fn tcp_connect(
    from: &TestEndpoint,
    to: Ipv4Addr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    in_ep(from, move || {
        let s = TcpStream::connect_timeout(&SocketAddr::new(to.into(), port), timeout)
            .with_context(|| format!("connecting to {to}:{port}"))?;
        Ok(s)
    })
}

/// A request/response over TCP: connects, sends `msg`, expects it echoed by a one-shot echo
/// server running on `listener`.
pub fn tcp_echo(
    from: &TestEndpoint,
    listener: &TcpListener,
    to: Ipv4Addr,
    msg: &[u8],
) -> anyhow::Result<()> {
    let port = listener.local_addr()?.port();
    let listener = listener.try_clone()?;
    let len = msg.len();
    // The server reads the whole message before echoing and closing: closing a socket with
    // unread data makes the kernel answer with RST, which a single read() of a multi-segment
    // message would provoke (seen as "connection reset" on a loaded machine).
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        Ok(())
    });
    let mut client = tcp_connect(from, to, port, Duration::from_secs(5))?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    client.read_exact(&mut got)?;
    anyhow::ensure!(got == msg, "echo mismatch");
    server.join().expect("echo server")?;
    Ok(())
}

/// A UDP datagram of `size` bytes from `from` to `to`'s socket and back (sizes above the MTU
/// are fragmented by the endpoints' stacks).
pub fn udp_echo(
    from: &TestEndpoint,
    to: &TestEndpoint,
    port: u16,
    size: usize,
) -> anyhow::Result<()> {
    let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let to_ip = to.ip;
    let server = in_ep(to, move || Ok(UdpSocket::bind((to_ip, port))?))?;
    let client = in_ep(from, || Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?))?;
    server.set_read_timeout(Some(Duration::from_millis(500)))?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    for _ in 0..10 {
        client.send_to(&msg, (to_ip, port))?;
        let mut buf = vec![0u8; 65536];
        let Ok((n, peer)) = server.recv_from(&mut buf) else {
            continue;
        };
        anyhow::ensure!(
            peer.ip() == std::net::IpAddr::V4(from.ip),
            "source {peer} is not {}",
            from.ip
        );
        server.send_to(&buf[..n], peer)?;
        if let Ok((m, _)) = client.recv_from(&mut buf) {
            anyhow::ensure!(buf[..m] == msg[..], "udp echo mismatch");
            return Ok(());
        }
    }
    bail!("no UDP exchange between {} and {to_ip}:{port}", from.ip)
}
