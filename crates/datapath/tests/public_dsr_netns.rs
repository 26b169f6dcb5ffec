//! Direct server return with real kernels and sockets (issue 14): native routing, a host
//! outside the mesh behind a router connects to node 0's NodePort, balanced to a backend on
//! node 1. With DSR the backend sees the client's own address, and its replies leave node 1
//! with node 0's address and NodePort as source, straight to the router: node 0's uplink never
//! receives them (its byte counter is read around a transfer a hundred times bigger one way
//! than the other). The client's socket talks to node 0:NodePort only, so every answer it
//! accepts proves the translation and the checksums. Strict rp_filter everywhere (the router
//! and the external host have it already; the nodes' uplinks get it here). Namespaces `dsr`.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::can_run;
use common::public::{expose_node_port, udp_from_outside, with_outside};
use common::topology::*;
use meshd_datapath::{netns::run_in, Direction, ServiceLbMode};
use meshd_ebpf::abi;
use meshd_testing::netns::{External, UNDERLAY_IFNAME};

const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
const TCP: u8 = 6;
const UDP: u8 = 17;
/// What the client sends, and what the backend answers: the answer is what must not cross
/// the entry node.
const REQUEST: usize = 1000;
const RESPONSE: usize = 200_000;

/// Two native nodes, one endpoint each, an outside, every node in `mode` with strict
/// rp_filter on its uplink, and node 0's NodePort (TCP and UDP) balanced to node 1's endpoint.
fn setup(prefix: &str, mode: ServiceLbMode) -> Option<(Topology, External)> {
    if !can_run() {
        return None;
    }
    let (mut topo, ext) = with_outside(prefix, &[1, 1], true, 61000..=61999).expect("topology");
    for i in 0..topo.nodes.len() {
        let ns = topo.underlay.node(i);
        for key in ["all", "default", UNDERLAY_IFNAME] {
            ns.run(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{key}.rp_filter=1")],
            )
            .expect("sysctl rp_filter");
        }
        topo.nodes[i].maps.set_service_lb_mode(mode).unwrap();
    }
    let node_ip = topo.nodes[0].node_ip;
    let backend = (topo.ep(1, 0).ip, BACKEND_PORT);
    for proto in [TCP, UDP] {
        expose_node_port(&mut topo.nodes[0].maps, node_ip, NODE_PORT, proto, backend).unwrap();
    }
    Some((topo, ext))
}

/// Bytes node 0's uplink has received.
fn entry_rx_bytes(topo: &Topology) -> u64 {
    let out = topo
        .underlay
        .node(0)
        .ip(&["-j", "-s", "link", "show", "dev", UNDERLAY_IFNAME])
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    json[0]["stats64"]["rx"]["bytes"]
        .as_u64()
        .expect("rx bytes")
}

/// One request from the external host to node 0:NodePort, answered by `listener` (node 1's
/// endpoint) with RESPONSE bytes; returns the client's address as the backend saw it.
fn request(ext: &External, node_ip: Ipv4Addr, listener: &TcpListener) -> anyhow::Result<IpAddr> {
    let listener = listener.try_clone()?;
    let server = std::thread::spawn(move || -> anyhow::Result<IpAddr> {
        let (mut s, peer) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; REQUEST];
        s.read_exact(&mut buf)?;
        let answer: Vec<u8> = (0..RESPONSE).map(|i| (i % 253) as u8).collect();
        s.write_all(&answer)?;
        Ok(peer.ip())
    });
    let to = SocketAddr::from((node_ip, NODE_PORT));
    let mut client = run_in::<_, anyhow::Error, _>(&ext.host.path(), move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
    })?;
    anyhow::ensure!(client.peer_addr()? == to, "connected to {to}");
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    client.write_all(&[7u8; REQUEST])?;
    let mut got = vec![0u8; RESPONSE];
    client.read_exact(&mut got)?;
    anyhow::ensure!(
        got.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8),
        "answer mismatch"
    );
    server.join().expect("server thread")
}

/// One [`request`] to node 0's NodePort served by node 1's endpoint: the client's address as
/// the backend saw it, and the bytes node 0's uplink received meanwhile.
fn measured_request(topo: &Topology, ext: &External) -> (IpAddr, u64) {
    let listener = tcp_listen(topo.ep(1, 0), BACKEND_PORT).unwrap();
    let before = entry_rx_bytes(topo);
    let seen = request(ext, topo.nodes[0].node_ip, &listener).unwrap();
    (seen, entry_rx_bytes(topo) - before)
}

#[test]
fn dsr_tcp_keeps_the_client_and_its_answer_skips_the_entry_node() {
    let Some((topo, ext)) = setup("dsrt", ServiceLbMode::Dsr) else {
        return;
    };
    let (seen, received) = measured_request(&topo, &ext);
    assert_eq!(seen, IpAddr::V4(ext.host_ip), "the client's own address");
    assert!(
        received < (RESPONSE / 2) as u64,
        "node 0's uplink received {received} bytes for a {RESPONSE}-byte answer: the answer came through it"
    );
    let entry = &topo.nodes[0].maps;
    assert!(entry.nat_mappings().unwrap().is_empty(), "no SNAT");
    assert!(entry.counter(Direction::Ingress, abi::FWD_NATIVE).unwrap() > 0);
    assert_eq!(
        entry.counter(Direction::Ingress, abi::FWD_WORLD).unwrap(),
        0,
        "no reply routed out by the entry node"
    );
    // Node 1's from_endpoint routed the answer out to the client itself.
    let backend_node = &topo.nodes[1].maps;
    assert!(
        backend_node
            .counter(Direction::Egress, abi::FWD_WORLD)
            .unwrap()
            > 0
    );
}

/// The same through SNAT: the answer crosses node 0 (the comparison that makes the DSR test's
/// byte count mean something).
#[test]
fn snat_tcp_answers_come_back_through_the_entry_node() {
    let Some((topo, ext)) = setup("dsrs", ServiceLbMode::Snat) else {
        return;
    };
    let (seen, received) = measured_request(&topo, &ext);
    assert_eq!(
        seen,
        IpAddr::V4(topo.nodes[0].node_ip),
        "SNATed to the entry node"
    );
    assert!(received > RESPONSE as u64, "{received}");
}

/// UDP: the backend sees the client and answers it from node 0:NodePort (the client's
/// connected socket takes nothing else); `hybrid` SNATs UDP. The address the backend saw, the
/// outside and node 0's IP.
fn udp_exchange(mode: ServiceLbMode, prefix: &str) -> Option<(IpAddr, External, Ipv4Addr)> {
    let (topo, ext) = setup(prefix, mode)?;
    let node_ip = topo.nodes[0].node_ip;
    let backend = topo.ep(1, 0).ip;
    let server = in_ep(topo.ep(1, 0), move || {
        Ok(UdpSocket::bind((backend, BACKEND_PORT))?)
    })
    .unwrap();
    let to = SocketAddr::from((node_ip, NODE_PORT));
    let seen = udp_from_outside(&ext, to, &server).unwrap();
    let seen = seen.unwrap_or_else(|| panic!("no answer from {to} in {mode} mode"));
    Some((seen, ext, node_ip))
}

#[test]
fn dsr_udp_keeps_the_client_and_its_answer_comes_from_the_node_port() {
    let Some((seen, ext, _)) = udp_exchange(ServiceLbMode::Dsr, "dsru") else {
        return;
    };
    assert_eq!(seen, IpAddr::V4(ext.host_ip), "the client's own address");
}

#[test]
fn hybrid_snats_udp() {
    let Some((seen, _, node_ip)) = udp_exchange(ServiceLbMode::Hybrid, "dsrh") else {
        return;
    };
    assert_eq!(seen, IpAddr::V4(node_ip), "SNATed to the entry node");
}
