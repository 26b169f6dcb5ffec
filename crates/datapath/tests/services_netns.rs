//! Service load-balancing with real kernels and sockets: TCP and UDP (a fragmented datagram
//! too) through a VIP to a backend on the client's node, on another node, and to the client
//! itself (hairpin); and "port unreachable" from either side reaching the other's socket. The client's
//! socket talks to the VIP only, so every answer it accepts proves the reverse NAT (and the
//! checksums, which the real stacks verify, unlike BPF_PROG_RUN).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::can_run;
use common::topology::*;
use meshd_datapath::{Direction, LbBackend, LbFrontend};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP: u8 = 6;
const UDP: u8 = 17;

fn point(topo: &mut Topology, port: u16, proto: u8, backend: Ipv4Addr, backend_port: u16) {
    let frontend = LbFrontend {
        addr: VIP,
        port,
        proto,
    };
    let maps = &mut topo.nodes[0].maps;
    maps.upsert_backend(
        frontend,
        0,
        LbBackend {
            addr: backend,
            port: backend_port,
            cluster_id: 1,
        },
    )
    .unwrap();
    maps.upsert_service(frontend, 1, 0).unwrap();
}

/// The address a backend sees a client connect from: its own, but for a client that is its own
/// backend (hairpin), which is SNATed to the service loopback address.
fn seen_from(from: &TestEndpoint, backend: &TestEndpoint) -> Ipv4Addr {
    if from.ip == backend.ip {
        meshd_ebpf::abi::SERVICE_LOOPBACK_ADDR
    } else {
        from.ip
    }
}

/// One TCP exchange from `from` to VIP:`port`; the backend (listening on `backend`) sees the
/// client's own address (see `seen_from`), the client sees the VIP.
fn tcp_via_vip(from: &TestEndpoint, backend: &TestEndpoint, port: u16, backend_port: u16) {
    let listener = tcp_listen(backend, backend_port).unwrap();
    let client_ip = seen_from(from, backend);
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(client_ip),
            "the client's address"
        );
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        while total < 30000 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
    });
    let mut client = tcp_connect(from, VIP, port, Duration::from_secs(5)).expect("connect to VIP");
    assert_eq!(
        client.peer_addr().unwrap(),
        SocketAddr::new(VIP.into(), port)
    );
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Several segments each way, so checksums of full-sized segments are exercised too.
    let msg: Vec<u8> = (0..30000).map(|i| (i % 253) as u8).collect();
    client.write_all(&msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    client.read_exact(&mut got).unwrap();
    assert!(got == msg, "echo through the VIP");
    server.join().unwrap();
}

/// A UDP datagram of `size` bytes to VIP:`port` and its answer, which must come from VIP:port.
fn udp_via_vip(
    from: &TestEndpoint,
    backend: &TestEndpoint,
    port: u16,
    backend_port: u16,
    size: usize,
) {
    let backend_ip = backend.ip;
    let server = in_ep(backend, move || {
        Ok(UdpSocket::bind((backend_ip, backend_port))?)
    })
    .unwrap();
    let client = in_ep(from, || Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?)).unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    for _ in 0..10 {
        client.send_to(&msg, (VIP, port)).unwrap();
        let mut buf = vec![0u8; 65536];
        let Ok((n, peer)) = server.recv_from(&mut buf) else {
            continue;
        };
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(seen_from(from, backend)),
            "the client's address"
        );
        assert_eq!(&buf[..n], &msg[..], "datagram intact after DNAT");
        server.send_to(&buf[..n], peer).unwrap();
        if let Ok((m, answered_by)) = client.recv_from(&mut buf) {
            assert_eq!(
                answered_by,
                SocketAddr::new(VIP.into(), port),
                "reverse NAT"
            );
            assert_eq!(&buf[..m], &msg[..]);
            return;
        }
    }
    panic!("no UDP answer through {VIP}:{port} ({size} bytes)");
}

/// A datagram to VIP:`port` whose backend listens on nothing: the backend's port unreachable,
/// translated back to name the frontend, reaches the client's connected socket as
/// ECONNREFUSED (untranslated, it names a socket the client does not have, and the client
/// waits).
fn udp_refused_via_vip(from: &TestEndpoint, port: u16) {
    let client = in_ep(from, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((VIP, port))?;
        Ok(s)
    })
    .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let refused = |r: std::io::Result<usize>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        // A refusal still pending from the previous round surfaces on send.
        if refused(client.send(b"anyone?")) || refused(client.recv(&mut buf)) {
            return;
        }
    }
    panic!("no ECONNREFUSED through {VIP}:{port}");
}

/// The other way: the backend answers (through the VIP) a client whose socket has closed; the
/// client's kernel answers with port unreachable about the frontend's datagram, which reaches
/// the backend translated, and its connected socket gets ECONNREFUSED.
fn backend_hears_the_client_is_gone(
    from: &TestEndpoint,
    backend: &TestEndpoint,
    port: u16,
    backend_port: u16,
) {
    let backend_ip = backend.ip;
    let server = in_ep(backend, move || {
        Ok(UdpSocket::bind((backend_ip, backend_port))?)
    })
    .unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let peer = (0..10)
        .find_map(|_| {
            let client = in_ep(from, || Ok(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?)).unwrap();
            client.send_to(b"hello", (VIP, port)).unwrap();
            let (_, peer) = server.recv_from(&mut buf).ok()?;
            drop(client);
            Some(peer)
        })
        .unwrap_or_else(|| panic!("no datagram through {VIP}:{port}"));
    server.connect(peer).unwrap();
    let refused = |r: std::io::Result<usize>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    for _ in 0..10 {
        if refused(server.send(b"still there?")) || refused(server.recv(&mut buf)) {
            return;
        }
    }
    panic!("the backend {backend_ip}:{backend_port} never heard that {peer} is gone");
}

#[test]
fn tcp_and_udp_through_a_vip_to_local_and_remote_backends() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new("dps", &[1, 1], 2).expect("topology");
    let (a1_ip, b0_ip) = (topo.ep(0, 1).ip, topo.ep(1, 0).ip);
    point(&mut topo, 80, TCP, b0_ip, 8080);
    point(&mut topo, 81, TCP, a1_ip, 8081);
    point(&mut topo, 53, UDP, b0_ip, 5353);
    point(&mut topo, 54, UDP, a1_ip, 5354);
    // Hairpin: a0 is the only backend of these.
    let a0_ip = topo.ep(0, 0).ip;
    point(&mut topo, 82, TCP, a0_ip, 8082);
    point(&mut topo, 55, UDP, a0_ip, 5355);
    // Nothing listens on these backend ports.
    point(&mut topo, 56, UDP, b0_ip, 5356);
    point(&mut topo, 57, UDP, a1_ip, 5357);
    point(&mut topo, 58, UDP, b0_ip, 5358);
    point(&mut topo, 59, UDP, a1_ip, 5359);
    let (a0, a1, b0) = (topo.ep(0, 0), topo.ep(0, 1), topo.ep(1, 0));

    tcp_via_vip(a0, b0, 80, 8080);
    tcp_via_vip(a0, a1, 81, 8081);
    udp_via_vip(a0, b0, 53, 5353, 64);
    udp_via_vip(a0, a1, 54, 5354, 64);
    // Larger than the endpoint MTU: the client's stack fragments it, and every fragment must
    // follow the first one's backend.
    udp_via_vip(a0, b0, 53, 5353, 4000);
    udp_via_vip(a0, a1, 54, 5354, 4000);
    tcp_via_vip(a0, a0, 82, 8082);
    udp_via_vip(a0, a0, 55, 5355, 64);
    udp_refused_via_vip(a0, 56);
    udp_refused_via_vip(a0, 57);
    backend_hears_the_client_is_gone(a0, b0, 58, 5358);
    backend_hears_the_client_is_gone(a0, a1, 59, 5359);

    topo.assert_no_drops();
    let n0 = &topo.nodes[0].maps;
    assert!(
        n0.counter(Direction::Ingress, meshd_ebpf::abi::FWD_LOCAL)
            .unwrap()
            > 0
    );
}
