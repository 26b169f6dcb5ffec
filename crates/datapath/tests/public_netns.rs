//! Public endpoints with real kernels and sockets (issue 14): a host outside the mesh, behind a
//! router on the underlay, connects to node 0's IP at a NodePort; from_netdev on node 0's uplink
//! balances it to a backend on node 0 (the backend sees the client's own address) or on node 1
//! (SNATed to node 0 and tunnelled, or natively routed; the backend sees node 0). The client's
//! socket talks to node 0:NodePort only, so every answer it accepts proves the translation back
//! (and the checksums, which the real stacks verify). Namespaces are prefixed `ex`.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::can_run;
use common::public::{expose, expose_node_port, udp_from_outside, with_outside};
use common::topology::*;
use meshd_datapath::{netns::run_in, Direction, LbFrontend};
use meshd_ebpf::abi;
use meshd_testing::netns::External;

const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
const TCP: u8 = 6;

/// Two nodes (clusters 1 and 1), one endpoint each, and an outside (`common::public`).
fn setup(native: bool) -> Option<(Topology, External)> {
    if !can_run() {
        return None;
    }
    let prefix = if native { "exn" } else { "ext" };
    Some(with_outside(prefix, &[1, 1], native, 61000..=61999).expect("topology"))
}

fn node_port(topo: &Topology) -> LbFrontend {
    LbFrontend {
        addr: topo.nodes[0].node_ip,
        port: NODE_PORT,
        proto: TCP,
    }
}

/// Node 0's NodePort, balanced over `backends` (endpoints' addresses).
fn expose_on_node0(topo: &mut Topology, backends: &[Ipv4Addr], flags: u32) {
    let frontend = node_port(topo);
    let backends: Vec<(Ipv4Addr, u16)> = backends.iter().map(|a| (*a, BACKEND_PORT)).collect();
    expose(&mut topo.nodes[0].maps, frontend, &backends, flags).unwrap();
}

/// Connects from the external host to `to`.
fn connect_from_outside(ext: &External, to: SocketAddr) -> anyhow::Result<TcpStream> {
    run_in::<_, anyhow::Error, _>(&ext.host.path(), move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
    })
}

/// One exchange from the external host to node 0:NodePort, served by `listener` (in the
/// backend's namespace); returns the address the backend saw the client connect from.
fn exchange(ext: &External, node_ip: Ipv4Addr, listener: &TcpListener) -> anyhow::Result<IpAddr> {
    let listener = listener.try_clone()?;
    let server = std::thread::spawn(move || -> anyhow::Result<IpAddr> {
        let (mut s, peer) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; 20000];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        Ok(peer.ip())
    });
    let to = SocketAddr::from((node_ip, NODE_PORT));
    let mut client = connect_from_outside(ext, to)?;
    assert_eq!(client.peer_addr()?, to);
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Several full-sized segments each way: their checksums are the stacks' to verify.
    let msg: Vec<u8> = (0..20000).map(|i| (i % 251) as u8).collect();
    client.write_all(&msg)?;
    let mut got = vec![0u8; msg.len()];
    client.read_exact(&mut got)?;
    anyhow::ensure!(got == msg, "echo mismatch");
    server.join().expect("server thread")
}

/// Node 0's node port balanced to node `on`'s endpoint, one exchange from outside: the
/// topology, the outside and the address the backend saw.
fn through_node_port_to(on: usize, native: bool) -> Option<(Topology, External, IpAddr)> {
    let (mut topo, ext) = setup(native)?;
    let backend = topo.ep(on, 0).ip;
    expose_on_node0(&mut topo, &[backend], abi::SERVICE_F_NODE_PORT);
    let listener = tcp_listen(topo.ep(on, 0), BACKEND_PORT).unwrap();
    let seen = exchange(&ext, topo.nodes[0].node_ip, &listener).unwrap();
    Some((topo, ext, seen))
}

fn outside_to_local_backend(native: bool) {
    let Some((topo, ext, seen)) = through_node_port_to(0, native) else {
        return;
    };
    assert_eq!(seen, IpAddr::V4(ext.host_ip), "the client's own address");
    assert!(
        topo.nodes[0].maps.nat_mappings().unwrap().is_empty(),
        "no SNAT"
    );
}

fn outside_to_remote_backend(native: bool) {
    let Some((topo, _ext, seen)) = through_node_port_to(1, native) else {
        return;
    };
    assert_eq!(
        seen,
        IpAddr::V4(topo.nodes[0].node_ip),
        "SNATed to the node it came in by"
    );
    let fwd = if native {
        abi::FWD_NATIVE
    } else {
        abi::FWD_TUNNEL
    };
    let maps = &topo.nodes[0].maps;
    assert!(maps.counter(Direction::Ingress, fwd).unwrap() > 0);
    assert!(
        maps.counter(Direction::Ingress, abi::FWD_WORLD).unwrap() > 0,
        "replies routed out"
    );
}

#[test]
fn an_outside_client_reaches_a_backend_on_the_node_through_its_node_port() {
    outside_to_local_backend(false);
}

#[test]
fn an_outside_client_reaches_a_backend_on_another_node_through_the_tunnel() {
    outside_to_remote_backend(false);
}

#[test]
fn an_outside_client_reaches_a_backend_on_another_node_by_native_routing() {
    outside_to_remote_backend(true);
}

#[test]
fn local_policy_serves_from_the_node_and_refuses_without_a_local_backend() {
    let Some((mut topo, ext)) = setup(false) else {
        return;
    };
    let flags = abi::SERVICE_F_NODE_PORT | abi::SERVICE_F_LOCAL;
    // No backend on node 0 (the agent writes none for a Local frontend): refused, counted.
    expose_on_node0(&mut topo, &[], flags);
    let to = SocketAddr::from((topo.nodes[0].node_ip, NODE_PORT));
    let err = run_in::<_, anyhow::Error, _>(&ext.host.path(), move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1)))
    })
    .unwrap();
    assert!(err.is_err(), "connected without a local backend");
    let drops = topo.nodes[0]
        .maps
        .counter(Direction::Ingress, abi::DROP_NO_LOCAL_BACKEND)
        .unwrap();
    assert!(drops > 0, "the SYN counted as no-local-backend");

    let backend = topo.ep(0, 0).ip;
    expose_on_node0(&mut topo, &[backend], flags);
    let listener = tcp_listen(topo.ep(0, 0), BACKEND_PORT).unwrap();
    let seen = exchange(&ext, topo.nodes[0].node_ip, &listener).unwrap();
    assert_eq!(seen, IpAddr::V4(ext.host_ip), "the client's own address");
}

#[test]
fn new_connections_avoid_a_backend_deleted_under_traffic() {
    let Some((mut topo, ext)) = setup(false) else {
        return;
    };
    let (b0, b1) = (topo.ep(0, 0).ip, topo.ep(1, 0).ip);
    expose_on_node0(&mut topo, &[b0, b1], abi::SERVICE_F_NODE_PORT);
    let l0 = tcp_listen(topo.ep(0, 0), BACKEND_PORT).unwrap();
    let l1 = tcp_listen(topo.ep(1, 0), BACKEND_PORT).unwrap();
    let node_ip = topo.nodes[0].node_ip;
    // A live connection to each backend: connect until both have one.
    let to = SocketAddr::from((node_ip, NODE_PORT));
    let mut open = Vec::new();
    for _ in 0..64 {
        open.push(connect_from_outside(&ext, to).unwrap());
        l0.set_nonblocking(true).unwrap();
        l1.set_nonblocking(true).unwrap();
        if let Ok((s, _)) = l0.accept() {
            open.push(s);
        }
        if let Ok((s, _)) = l1.accept() {
            open.push(s);
        }
        if l0_l1_both(&open, b0, b1) {
            break;
        }
    }
    assert!(
        l0_l1_both(&open, b0, b1),
        "both backends chosen in 64 connections"
    );
    // Backend 1 goes away under traffic: the agent lowers the count, then deletes its slot.
    let frontend = node_port(&topo);
    topo.nodes[0]
        .maps
        .upsert_service(frontend, 1, abi::SERVICE_F_NODE_PORT)
        .unwrap();
    topo.nodes[0].maps.delete_backend(frontend, 1).unwrap();
    l0.set_nonblocking(false).unwrap();
    for _ in 0..8 {
        let seen = exchange(&ext, node_ip, &l0).unwrap();
        assert_eq!(
            seen,
            IpAddr::V4(ext.host_ip),
            "every new connection on node 0's backend"
        );
    }
}

/// Whether the accepted sockets in `open` include one on each backend.
fn l0_l1_both(open: &[TcpStream], b0: Ipv4Addr, b1: Ipv4Addr) -> bool {
    let local = |ip: Ipv4Addr| {
        open.iter().any(|s| {
            s.local_addr()
                .map(|a| a.ip() == IpAddr::V4(ip))
                .unwrap_or(false)
        })
    };
    local(b0) && local(b1)
}

/// UDP through the node port to a backend on the other node (tunnel): the client's connected
/// socket accepts only datagrams from node 0:NodePort, so its answer proves both translations
/// back (reverse SNAT, then reverse DNAT).
#[test]
fn udp_from_outside_reaches_a_backend_on_another_node_and_its_answer_comes_back() {
    let Some((mut topo, ext)) = setup(false) else {
        return;
    };
    const UDP: u8 = 17;
    let node_ip = topo.nodes[0].node_ip;
    let backend = topo.ep(1, 0).ip;
    expose_node_port(
        &mut topo.nodes[0].maps,
        node_ip,
        NODE_PORT,
        UDP,
        (backend, BACKEND_PORT),
    )
    .unwrap();
    let server = in_ep(topo.ep(1, 0), move || {
        Ok(UdpSocket::bind((backend, BACKEND_PORT))?)
    })
    .unwrap();
    let seen = udp_from_outside(&ext, SocketAddr::from((node_ip, NODE_PORT)), &server).unwrap();
    assert_eq!(
        seen,
        Some(IpAddr::V4(node_ip)),
        "answered from node 0:{NODE_PORT}, SNATed to node 0"
    );
}
