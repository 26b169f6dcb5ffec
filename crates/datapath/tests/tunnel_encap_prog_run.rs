//! VXLAN written and taken off by the programs (`tunnel_encap: program`, lib/vxlan.h) under
//! BPF_PROG_RUN: the bytes from_endpoint puts on the wire (the kernel device's format, checked
//! field by field against a frame built here), what it leaves to the device, and the uplink's
//! decapsulation in from_netdev with the identity checks and policy from_overlay applies.
//!
//! Each test runs on a thread inside a namespace of its own (`common::world`): the program
//! looks the underlay route up in that namespace's FIB.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use common::{frames::*, mutations::mutate, world::*, *};
use meshd_datapath::{Direction, NodeConfig, PolicyEntry, TunnelEncap, Verdict};
use meshd_ebpf::{abi, programs};
use meshd_testing::trials::{env_u64, Rng};

/// Another node on the uplink's segment (a permanent neighbour), owning 10.2.0.0/24.
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PEER_MAC: [u8; 6] = [0x02, 0x47, 0x57, 0, 0, 0x07];
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const REMOTE_IDENTITY: u32 = (2 << 16) | 1000;
const VXLAN_PORT: u16 = 8472;
/// Stands for the VXLAN device: BPF_PROG_RUN never delivers a redirect.
const VXLAN_IF: u32 = 4242;
const ENCAP_LEN: usize = 50;

fn setup(encap: TunnelEncap) -> Option<World> {
    let mut w = world_named("enc", 61000..=61007)?;
    w.uplink_neighbour(PEER, "02:47:57:00:00:07");
    let m = &mut w.dp.maps;
    m.set_config(NodeConfig {
        vxlan_ifindex: VXLAN_IF,
        node_ip: NODE,
        cluster_id: 1,
    })
    .unwrap();
    m.set_tunnel_encap(encap, VXLAN_PORT).unwrap();
    assert_eq!(m.tunnel_encap().unwrap(), (encap, VXLAN_PORT));
    add_remote_prefix(m, "10.2.0.0/24", REMOTE_IDENTITY, PEER, 2);
    Some(w)
}

/// `frame` with IPv4 TOS `tos` (header checksum fixed).
fn with_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
    frame[ETH + 1] = tos;
    frame[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let sum = !fold(sum16(&frame[ETH..ETH + 20], 0));
    frame[ETH + 10..ETH + 12].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// A VXLAN packet as the kernel device sends it: `inner` from `outer_src` to `outer_dst` on UDP
/// `port`, VNI `vni`, frame `inner` inside.
fn vxlan_frame(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    port: u16,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0x47, 0x57, 0, 0, 0x01]);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + 8 + inner.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0, 0, 64, UDP, 0, 0]);
    ip.extend_from_slice(&outer_src.octets());
    ip.extend_from_slice(&outer_dst.octets());
    let sum = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&50000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0x08, 0, 0, 0]);
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(inner);
    f
}

/// Checks `out` is `inner` encapsulated the way the kernel's VXLAN device does it from NODE to
/// PEER with VNI `vni` (outer MACs from the FIB's answer); returns the UDP source port.
fn assert_vxlan_of(w: &World, out: &[u8], inner: &[u8], vni: u32, outer_tos: u8) -> u16 {
    assert_eq!(out.len(), inner.len() + ENCAP_LEN, "outer headers added");
    assert_eq!(
        &out[0..6],
        &PEER_MAC,
        "outer destination MAC: the neighbour"
    );
    assert_eq!(&out[6..12], &w.up_mac, "outer source MAC: the uplink");
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    let ip = &out[ETH..ETH + 20];
    assert_eq!(ip[0], 0x45, "IPv4 without options");
    assert_eq!(ip[1], outer_tos, "outer TOS: the inner ECN");
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(total, inner.len() - ETH + ENCAP_LEN);
    assert_eq!(&ip[6..8], &[0, 0], "no DF, as the device without df set");
    assert_eq!(ip[8], 64, "outer TTL");
    assert_eq!(ip[9], UDP);
    assert_eq!(&ip[12..16], &NODE.octets());
    assert_eq!(&ip[16..20], &PEER.octets());
    assert_eq!(fold(sum16(ip, 0)), 0xffff, "outer IPv4 header checksum");
    let udp = &out[ETH + 20..ETH + 28];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    assert!(
        (32768..61000).contains(&sport),
        "source port {sport} in the default ephemeral range"
    );
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), VXLAN_PORT);
    assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, total - 20);
    assert_eq!(
        &udp[6..8],
        &[0, 0],
        "zero UDP checksum, the device's IPv4 default"
    );
    let vxlan = &out[ETH + 28..ETH + 36];
    assert_eq!(&vxlan[0..4], &[0x08, 0, 0, 0], "only the I flag");
    assert_eq!(
        u32::from_be_bytes(vxlan[4..8].try_into().unwrap()),
        vni << 8
    );
    assert_eq!(&out[ENCAP_LEN..], inner, "the endpoint's frame as it came");
    sport
}

#[test]
fn from_endpoint_writes_the_frame_the_vxlan_device_would() {
    let Some(w) = setup(TunnelEncap::Program) else {
        return;
    };
    let syn = tcp(A, 40000, REMOTE, 8080, 0x02);
    let (verdict, out) = w.egress(&syn, w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let sport = assert_vxlan_of(&w, &out, &syn, CLIENT, 0);
    assert_eq!(w.counter(Direction::Egress, abi::FWD_TUNNEL), 1);

    // The connection's next packets come from the forwarding cache: same frame, same source
    // port (hashed from the inner flow, so one flow keeps one outer tuple).
    for i in 0..3 {
        let ack = tcp(A, 40000, REMOTE, 8080, 0x10);
        let (verdict, out) = w.egress(&ack, w.a_if);
        assert_eq!(verdict, TC_ACT_REDIRECT, "packet {i}");
        assert_eq!(
            assert_vxlan_of(&w, &out, &ack, CLIENT, 0),
            sport,
            "packet {i}"
        );
    }
    assert_eq!(w.counter(Direction::Egress, abi::FWD_TUNNEL), 4);

    // ECN as ip_tunnel_ecn_encap: ECT copied, CE becomes ECT(0); DSCP stays inside.
    for (inner_tos, outer_tos) in [(0x01, 0x01), (0x02, 0x02), (0x03, 0x02), (0xb8, 0)] {
        let pkt = with_tos(udp(A, 5000, REMOTE, 53), inner_tos);
        let (verdict, out) = w.egress(&pkt, w.a_if);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_vxlan_of(&w, &out, &pkt, CLIENT, outer_tos);
    }
}

#[test]
fn the_device_keeps_what_the_program_leaves_to_it() {
    // Device mode: the packet leaves untouched, for the device (tunnel key and redirect).
    let Some(w) = setup(TunnelEncap::Device) else {
        return;
    };
    let pkt = udp(A, 5000, REMOTE, 53);
    let (verdict, out) = w.egress(&pkt, w.a_if);
    assert_eq!((verdict, out), (TC_ACT_REDIRECT, pkt.clone()));
    assert_eq!(w.counter(Direction::Egress, abi::FWD_TUNNEL), 1);
    drop(w);

    let Some(w) = setup(TunnelEncap::Program) else {
        return;
    };
    // Over the underlay route's MTU once encapsulated: the device fragments the outer packet
    // (its behaviour before), so the program leaves the packet as it is. (bpf_fib_lookup
    // honours a route's MTU when it is locked, or learned from the path, not a plain metric.)
    w.ip(&[
        "route",
        "add",
        &format!("{PEER}/32"),
        "dev",
        "mq_up",
        "mtu",
        "lock",
        "600",
    ]);
    let mut big = Packet::udp(A, 5001, REMOTE, 53);
    big.payload = vec![0x42; 600 - 20 - 8 - ENCAP_LEN + 1];
    let big = with_l4_checksum(big.bytes());
    let (verdict, out) = w.egress(&big, w.a_if);
    assert_eq!(
        (verdict, out),
        (TC_ACT_REDIRECT, big.clone()),
        "left to the device"
    );
    // One byte less fits, and the program takes it.
    let mut fits = Packet::udp(A, 5002, REMOTE, 53);
    fits.payload = vec![0x42; 600 - 20 - 8 - ENCAP_LEN];
    let fits = with_l4_checksum(fits.bytes());
    let (verdict, out) = w.egress(&fits, w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_vxlan_of(&w, &out, &fits, CLIENT, 0);
    // No route to the tunnel endpoint at all: the device's own lookup decides, as before.
    w.ip(&["route", "replace", "blackhole", &format!("{PEER}/32")]);
    let (verdict, out) = w.egress(&pkt, w.a_if);
    assert_eq!((verdict, out), (TC_ACT_REDIRECT, pkt));
    assert_eq!(w.counter(Direction::Egress, abi::FWD_TUNNEL), 3);
}

#[test]
fn the_uplink_decapsulates_vxlan_for_this_node_and_delivers_by_the_vni() {
    let Some(mut w) = setup(TunnelEncap::Program) else {
        return;
    };
    let mut inner = Packet::tcp(REMOTE, 33000, A, 8080, 0x02);
    inner.dst_mac = [0x02, 0xde, 0xad, 0, 0, 1]; // whatever the sender's endpoint had there
    let inner = with_l4_checksum(inner.bytes());
    let frame = vxlan_frame(PEER, NODE, VXLAN_PORT, REMOTE_IDENTITY, &inner);
    let (verdict, out) = w.uplink(&frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &A_MAC, "to the endpoint");
    assert_eq!(&out[6..12], &A_GW_MAC, "from its gateway");
    assert_eq!(
        &out[12..],
        &inner[12..],
        "the inner packet, nothing else changed"
    );
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 1);

    // The VNI is believed only from a known node of the identity's cluster.
    let spoofed = vxlan_frame(PEER, NODE, VXLAN_PORT, CLIENT, &inner);
    assert_eq!(w.uplink(&spoofed).0, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Ingress, abi::DROP_INVALID_IDENTITY), 1);
    let stranger = vxlan_frame(
        Ipv4Addr::new(192, 0, 2, 99),
        NODE,
        VXLAN_PORT,
        REMOTE_IDENTITY,
        &inner,
    );
    assert_eq!(w.uplink(&stranger).0, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Ingress, abi::DROP_UNKNOWN_NODE), 1);

    // Ingress policy on the decapsulated packet, by the VNI's identity.
    let m = &mut w.dp.maps;
    m.set_policy_enabled(CLIENT, Direction::Ingress, true)
        .unwrap();
    m.drain_drop_events();
    let other_port = vxlan_frame(
        PEER,
        NODE,
        VXLAN_PORT,
        REMOTE_IDENTITY,
        &tcp(REMOTE, 33001, A, 9090, 0x02),
    );
    assert_eq!(w.uplink(&other_port).0, TC_ACT_SHOT);
    let drops = w.dp.maps.drain_drop_events();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(
        (
            drops[0].reason,
            drops[0].src_identity,
            drops[0].dst_identity,
            drops[0].dport
        ),
        (abi::DROP_POLICY, REMOTE_IDENTITY, CLIENT, 9090)
    );
    w.dp.maps
        .upsert_policy(
            PolicyEntry {
                subject: CLIENT,
                peer: Some(REMOTE_IDENTITY),
                proto: Some(TCP),
                dport: Some(9090),
                direction: Direction::Ingress,
            },
            Verdict::Allow,
            1,
        )
        .unwrap();
    w.dp.maps.bump_policy_revision().unwrap();
    assert_eq!(w.uplink(&other_port).0, TC_ACT_REDIRECT);
}

#[test]
fn the_uplink_leaves_other_udp_and_what_the_device_must_handle_untouched() {
    let Some(w) = setup(TunnelEncap::Program) else {
        return;
    };
    let inner = tcp(REMOTE, 33000, A, 8080, 0x02);
    let untouched = |frame: Vec<u8>, what: &str| {
        let (verdict, out) = w.uplink(&frame);
        assert_eq!((verdict, out), (TC_ACT_OK, frame), "{what}");
    };
    untouched(
        vxlan_frame(PEER, NODE, 4789, REMOTE_IDENTITY, &inner),
        "another UDP port",
    );
    untouched(
        vxlan_frame(
            PEER,
            Ipv4Addr::new(192, 0, 2, 50),
            VXLAN_PORT,
            REMOTE_IDENTITY,
            &inner,
        ),
        "not for this node",
    );
    let mut fragment = vxlan_frame(PEER, NODE, VXLAN_PORT, REMOTE_IDENTITY, &inner);
    fragment[ETH + 6] = 0x20; // more fragments: the stack reassembles, the device takes it
    fragment[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let sum = !fold(sum16(&fragment[ETH..ETH + 20], 0));
    fragment[ETH + 10..ETH + 12].copy_from_slice(&sum.to_be_bytes());
    untouched(fragment, "an outer fragment");
    let mut flags = vxlan_frame(PEER, NODE, VXLAN_PORT, REMOTE_IDENTITY, &inner);
    flags[ETH + 28] = 0x88; // a flag the device refuses
    untouched(flags, "other VXLAN flags");
    let mut arp = vxlan_frame(PEER, NODE, VXLAN_PORT, REMOTE_IDENTITY, &inner);
    arp[ENCAP_LEN + 12..ENCAP_LEN + 14].copy_from_slice(&0x0806u16.to_be_bytes());
    untouched(arp, "a frame that is not IPv4");
    let counted = w.dp.maps.counters().unwrap();
    assert!(
        counted.is_empty(),
        "none of these is the program's: {counted:?}"
    );
    drop(w);

    // Device mode: the device decapsulates everything.
    let Some(w) = setup(TunnelEncap::Device) else {
        return;
    };
    let frame = vxlan_frame(PEER, NODE, VXLAN_PORT, REMOTE_IDENTITY, &inner);
    let (verdict, out) = w.uplink(&frame);
    assert_eq!((verdict, out), (TC_ACT_OK, frame));
}

/// Seeded trials, as in prog_run_mutations.rs: endpoint frames into from_endpoint and VXLAN
/// packets into from_netdev, mutated (outer and inner bytes alike) or intact. Whatever comes in,
/// the program encapsulates it whole, takes the outer headers off whole, or leaves it as it
/// was (for the device or the stack), or drops it: never half a header.
#[test]
fn mutated_packets_are_encapsulated_or_decapsulated_whole_or_left_alone() {
    let Some(w) = setup(TunnelEncap::Program) else {
        return;
    };
    let seed = env_u64("MESHD_PACKET_SEED", 1).unwrap();
    let trials = env_u64("MESHD_PACKET_TRIALS", 5_000).unwrap();
    let replay = format!(
        "replay: MESHD_PACKET_SEED={seed} MESHD_PACKET_TRIALS={trials} cargo test -p meshd-datapath --test tunnel_encap_prog_run"
    );
    let known = [A, B, REMOTE, NODE, PEER];
    let outbound = [
        tcp(A, 40000, REMOTE, 8080, 0x02),
        tcp(A, 40000, REMOTE, 8080, 0x10),
        udp(A, 5000, REMOTE, 53),
    ];
    let inbound: Vec<Vec<u8>> = [
        tcp(REMOTE, 33000, A, 8080, 0x02),
        tcp(REMOTE, 33000, A, 8080, 0x10),
        udp(REMOTE, 53, B, 5000),
    ]
    .iter()
    .map(|inner| vxlan_frame(PEER, NODE, VXLAN_PORT, REMOTE_IDENTITY, inner))
    .collect();
    let mut rng = Rng(seed);
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    for trial in 0..trials {
        let uplink = rng.below(2) == 0;
        let mut frame = if uplink {
            rng.pick(&inbound).unwrap().clone()
        } else {
            rng.pick(&outbound).unwrap().clone()
        };
        if rng.below(5) != 0 {
            for _ in 0..rng.range(1..=3) {
                mutate(&mut rng, &mut frame, &known);
            }
        }
        let (program, ifindex) = if uplink {
            (programs::FROM_NETDEV, w.up_if)
        } else {
            (programs::FROM_ENDPOINT, w.a_if)
        };
        let Ok((verdict, out, _)) = w.dp.try_run(program, &frame, ifindex, [0; 5]) else {
            *outcomes.entry("refused by BPF_PROG_RUN").or_default() += 1;
            continue;
        };
        let what =
            || format!("trial {trial}: {program} with {frame:02x?}\nout {out:02x?}\n{replay}");
        let outcome = match verdict {
            TC_ACT_SHOT => "dropped",
            TC_ACT_OK => {
                assert_eq!(out, frame, "passed on changed: {}", what());
                "passed untouched"
            }
            TC_ACT_REDIRECT if uplink && out.len() + ENCAP_LEN == frame.len() => {
                assert_eq!(
                    &out[12..],
                    &frame[ENCAP_LEN + 12..],
                    "decapsulated: {}",
                    what()
                );
                "decapsulated"
            }
            TC_ACT_REDIRECT if !uplink && out.len() == frame.len() + ENCAP_LEN => {
                assert_vxlan_of(&w, &out, &frame, CLIENT, out[ETH + 1]);
                "encapsulated"
            }
            TC_ACT_REDIRECT => {
                assert_eq!(
                    out.len(),
                    frame.len(),
                    "redirected with another length: {}",
                    what()
                );
                "redirected as it was"
            }
            other => panic!("verdict {other}: {}", what()),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("{trials} packets (seed {seed}): {outcomes:?}");
    for outcome in [
        "decapsulated",
        "encapsulated",
        "passed untouched",
        "dropped",
    ] {
        assert!(
            outcomes.get(outcome).copied().unwrap_or(0) > trials / 50,
            "too few {outcome}: {outcomes:?}"
        );
    }
}
