//! VXLAN written by the programs (`tunnel_encap: program`, lib/vxlan.h) with real traffic: two
//! nodes in two clusters, both encapsulating in the program, and a mixed pair (one node in
//! the program, one with the device) that must talk both ways, since the wire format is the
//! device's. The VXLAN devices' own counters tell who did the work: the programs leave a
//! device idle for what they encapsulate and decapsulate themselves.

mod common;

use std::time::Duration;

use common::can_run;
use common::topology::*;
use meshd_datapath::{Direction, TunnelEncap};
use meshd_ebpf::abi;

/// Bytes pushed from `from` to `to:port` over one TCP connection, all read on the other side.
fn tcp_stream(from: &TestEndpoint, to: &TestEndpoint, port: u16, bytes: usize) {
    use std::io::{Read, Write};
    let listener = tcp_listen(to, port).unwrap();
    let reader = std::thread::spawn(move || -> anyhow::Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    });
    let mut client = tcp_connect(from, to.ip, port, Duration::from_secs(5)).unwrap();
    client.write_all(&vec![0x5au8; bytes]).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().expect("reader").expect("stream"), bytes);
}

#[test]
fn program_encapsulation_carries_ping_tcp_and_udp_without_the_vxlan_devices() {
    if !can_run() {
        return;
    }
    let program = TunnelEncap::Program;
    let topo = Topology::with_encap("encp", &[1, 2], 2, &[program, program]).expect("topology");
    let (a0, a1) = (topo.ep(0, 0), topo.ep(0, 1));
    let (b0, b1) = (topo.ep(1, 0), topo.ep(1, 1));
    let mtu = meshd_datapath::plumbing::link_info(Some(a0.netns.name()), "eth0")
        .unwrap()
        .mtu;
    assert_eq!(mtu, 1450, "the endpoint MTU leaves VXLAN's room");

    ping(a0, b0.ip, 10).expect("ping across nodes");
    ping(b1, a1.ip, 10).expect("ping across nodes, other way");
    let listener = tcp_listen(b0, 7101).unwrap();
    tcp_echo(a0, &listener, b0.ip, b"across").expect("tcp across nodes");
    udp_echo(a1, b1, 7102, 64).expect("udp across nodes");
    // Bulk TCP: GSO super-packets are encapsulated whole (the underlay veths carry them as
    // they are and the receiver's program takes them apart), full-size segments too.
    tcp_stream(a0, b0, 7103, 8 << 20);
    let listener = tcp_listen(a0, 7104).unwrap();
    tcp_echo(b1, &listener, a0.ip, &[7u8; 20000]).expect("bulk tcp echo across nodes");
    // Fragments the endpoint's stack made.
    udp_echo(a0, b1, 7105, 4000).expect("fragmented udp across nodes");
    // Everything fit the underlay: neither device saw any of it.
    for node in 0..2 {
        assert_eq!(
            topo.vxlan_traffic(node).unwrap(),
            VxlanTraffic::default(),
            "node {node}'s VXLAN device carried traffic the program should have"
        );
    }
    let n0 = &topo.nodes[0].maps;
    assert!(n0.counter(Direction::Egress, abi::FWD_TUNNEL).unwrap() > 0);
    assert!(n0.counter(Direction::Ingress, abi::FWD_LOCAL).unwrap() > 0);

    // Over the route's MTU: the device takes it and fragments the outer packet, as before.
    let node0 = topo.underlay.node(topo.nodes[0].index);
    node0
        .ip(&[
            "route",
            "add",
            &format!("{}/32", topo.nodes[1].node_ip),
            "dev",
            meshd_testing::netns::UNDERLAY_IFNAME,
            "mtu",
            "lock",
            "1300",
        ])
        .unwrap();
    let before = topo.vxlan_traffic(0).unwrap();
    udp_echo(a0, b0, 7106, 1350).expect("udp over the underlay route's MTU");
    let after = topo.vxlan_traffic(0).unwrap();
    assert!(
        after.tx_packets > before.tx_packets,
        "the oversized datagram did not go through the device"
    );
    ping(a0, b0.ip, 10).expect("small packets still in the program");
    topo.assert_no_drops();
}

#[test]
fn a_node_encapsulating_in_the_program_and_one_using_the_device_talk_both_ways() {
    if !can_run() {
        return;
    }
    let topo = Topology::with_encap(
        "encm",
        &[1, 2],
        1,
        &[TunnelEncap::Program, TunnelEncap::Device],
    )
    .expect("topology");
    let (p, d) = (topo.ep(0, 0), topo.ep(1, 0));

    ping(p, d.ip, 10).expect("ping program -> device");
    ping(d, p.ip, 10).expect("ping device -> program");
    let listener = tcp_listen(d, 7201).unwrap();
    tcp_echo(p, &listener, d.ip, b"to the device node").expect("tcp program -> device");
    let listener = tcp_listen(p, 7202).unwrap();
    tcp_echo(d, &listener, p.ip, b"to the program node").expect("tcp device -> program");
    udp_echo(p, d, 7203, 64).expect("udp program -> device");
    udp_echo(d, p, 7204, 64).expect("udp device -> program");

    // The program node's device did nothing; the device node's did all of its side.
    assert_eq!(topo.vxlan_traffic(0).unwrap(), VxlanTraffic::default());
    let device = topo.vxlan_traffic(1).unwrap();
    assert!(
        device.tx_packets > 0 && device.rx_packets > 0,
        "the device node's VXLAN device: {device:?}"
    );

    tcp_stream(p, d, 7205, 4 << 20);
    tcp_stream(d, p, 7206, 4 << 20);
    udp_echo(p, d, 7207, 4000).expect("fragmented udp program -> device");
    udp_echo(d, p, 7208, 4000).expect("fragmented udp device -> program");
    topo.assert_no_drops();
}
