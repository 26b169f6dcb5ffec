//! Public endpoints' test and bench set-up (issue 14): a topology with an outside (a router on
//! the underlay and an external host behind it), every node wired as the agent wires it for
//! the world, and frontends written as the agent writes them.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;
use meshd_datapath::{
    netns::run_in, DatapathMaps, EgressConfig, IpcacheTarget, LbBackend, LbFrontend,
};
use meshd_state::NumericIdentity;
use meshd_testing::netns::{External, UNDERLAY_IFNAME};

use super::topology::Topology;

/// The router's address on the underlay.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 254);

/// `Topology::with_routing(prefix, clusters, 1, native)` plus an outside, each node with
/// from_netdev on its uplink, egress on (masquerade, SNAT ports `nat_ports`), its default route
/// via the router and every node IP in its ipcache (its own as `host`, the others as
/// `remote-node`, no tunnel), as the agent has them.
pub fn with_outside(
    prefix: &str,
    clusters: &[u8],
    native: bool,
    nat_ports: RangeInclusive<u16>,
) -> anyhow::Result<(Topology, External)> {
    let mut topo = Topology::with_routing(prefix, clusters, 1, native)?;
    let external = topo.underlay.add_external(prefix, ROUTER, 1500)?;
    let node_ips: Vec<Ipv4Addr> = topo.nodes.iter().map(|n| n.node_ip).collect();
    for i in 0..topo.nodes.len() {
        let ns = topo.underlay.node(i).path();
        topo.underlay
            .node(i)
            .ip(&["route", "replace", "default", "via", &ROUTER.to_string()])?;
        let node = &mut topo.nodes[i];
        if !native {
            // Native topologies attach it already.
            let dp = node.datapath.as_mut().expect("datapath");
            run_in(&ns, || dp.attach_netdev(UNDERLAY_IFNAME))?;
        }
        node.maps.set_egress(&EgressConfig {
            masquerade: true,
            nat_ports: nat_ports.clone(),
        })?;
        for ip in &node_ips {
            let (identity, local) = if *ip == node.node_ip {
                (NumericIdentity::HOST, true)
            } else {
                (NumericIdentity::REMOTE_NODE, false)
            };
            node.maps.upsert_ipcache(
                Ipv4Net::new(*ip, 32)?,
                IpcacheTarget {
                    identity,
                    tunnel_endpoint: None,
                    local,
                },
            )?;
        }
    }
    Ok((topo, external))
}

/// Points `frontend` at `backends` (address, port; cluster 1) with `flags` (`SERVICE_F_*`), in
/// the agent's order: slots first, then the count.
pub fn expose(
    maps: &mut DatapathMaps,
    frontend: LbFrontend,
    backends: &[(Ipv4Addr, u16)],
    flags: u32,
) -> anyhow::Result<()> {
    for (slot, (addr, port)) in backends.iter().enumerate() {
        maps.upsert_backend(
            frontend,
            slot as u32,
            LbBackend {
                addr: *addr,
                port: *port,
                cluster_id: 1,
            },
        )?;
    }
    maps.upsert_service(frontend, backends.len() as u32, flags)?;
    Ok(())
}

/// `node_ip`:`port`/`proto` as a NodePort frontend balanced to `backend` alone.
pub fn expose_node_port(
    maps: &mut DatapathMaps,
    node_ip: Ipv4Addr,
    port: u16,
    proto: u8,
    backend: (Ipv4Addr, u16),
) -> anyhow::Result<()> {
    let frontend = LbFrontend {
        addr: node_ip,
        port,
        proto,
    };
    expose(
        maps,
        frontend,
        &[backend],
        meshd_ebpf::abi::SERVICE_F_NODE_PORT,
    )
}

/// UDP from the external host to `to` (a frontend), served once by `server` (the backend's
/// socket, echoing): the client's socket is connected to `to`, so it takes only answers from
/// there. Returns the client's address as the backend saw it, once an answer arrived (`None`
/// if none did in 10 tries).
pub fn udp_from_outside(
    ext: &External,
    to: std::net::SocketAddr,
    server: &std::net::UdpSocket,
) -> anyhow::Result<Option<std::net::IpAddr>> {
    use std::time::Duration;
    server.set_read_timeout(Some(Duration::from_millis(500)))?;
    let client = run_in::<_, anyhow::Error, _>(&ext.host.path(), move || {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(to)?;
        Ok(s)
    })?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    let msg = b"ping from outside";
    let mut buf = [0u8; 1500];
    for _ in 0..10 {
        client.send(msg)?;
        let Ok((n, peer)) = server.recv_from(&mut buf) else {
            continue;
        };
        server.send_to(&buf[..n], peer)?;
        if let Ok(m) = client.recv(&mut buf) {
            anyhow::ensure!(&buf[..m] == msg, "answer mismatch");
            return Ok(Some(peer.ip()));
        }
    }
    Ok(None)
}
