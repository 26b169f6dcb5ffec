//! Direct server return under BPF_PROG_RUN (issue 14, see DSR in `meshd_abi.h`): the entry
//! node's from_netdev keeps the client's address and inserts the option naming the frontend
//! (bytes, header length, checksums), on every SYN and every UDP datagram; `hybrid` leaves UDP
//! to SNAT; a packet the option would push over the MTU is answered with fragmentation needed.
//! The backend's node takes the option out before delivery and its from_endpoint gives the
//! replies the frontend as source, routed to the client.
//!
//! One namespace per test (`common::world`), native routing: B is an endpoint of this node, X
//! the client outside, R a backend behind NODE2.

mod common;

use std::net::Ipv4Addr;

use common::{frames::*, world::*, *};
use meshd_datapath::{Direction, LbBackend, LbFrontend, ServiceLbMode};
use meshd_ebpf::abi;

const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=61007;
const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
/// Another node's IP, the frontend a client used when this node is the backend's.
const ENTRY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
/// The uplink's MTU in `common::world`.
const MTU: usize = 1500;

fn setup(mode: ServiceLbMode) -> Option<World> {
    let mut w = native_world(NAT_PORTS)?;
    w.dp.maps.set_service_lb_mode(mode).unwrap();
    Some(w)
}

/// This node's NodePort for `proto`, balanced to R only.
fn expose_remote(w: &mut World, proto: u8) {
    let frontend = LbFrontend {
        addr: NODE,
        port: NODE_PORT,
        proto,
    };
    w.dp.maps
        .upsert_backend(
            frontend,
            0,
            LbBackend {
                addr: R,
                port: BACKEND_PORT,
                cluster_id: 2,
            },
        )
        .unwrap();
    w.dp.maps
        .upsert_service(frontend, 1, abi::SERVICE_F_NODE_PORT)
        .unwrap();
}

/// IPv4 header length of a frame, in bytes.
fn ihl(frame: &[u8]) -> usize {
    usize::from(frame[ETH] & 0x0f) * 4
}

fn tot_len(frame: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]))
}

/// (source port, destination port) behind however long a header.
fn ports(frame: &[u8]) -> (u16, u16) {
    let l4 = ETH + ihl(frame);
    (
        u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
        u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
    )
}

/// The DSR option right after the fixed header: (type, len, address, port).
fn option(frame: &[u8]) -> (u8, u8, Ipv4Addr, u16) {
    let o = ETH + 20;
    (
        frame[o],
        frame[o + 1],
        Ipv4Addr::new(frame[o + 4], frame[o + 5], frame[o + 6], frame[o + 7]),
        u16::from_be_bytes([frame[o + 2], frame[o + 3]]),
    )
}

/// Header checksum over the whole header, L4 checksum over the pseudo-header and the segment
/// behind it, whatever the header length.
fn assert_valid_with_options(frame: &[u8], what: &str) {
    let hl = ihl(frame);
    assert_eq!(
        fold(sum16(&frame[ETH..ETH + hl], 0)),
        0xffff,
        "{what}: IPv4 header checksum"
    );
    assert_eq!(tot_len(frame), frame.len() - ETH, "{what}: tot_len");
    // The L4 checksum does not cover the IP header: the frame without its options must check.
    let mut plain = frame[..ETH + 20].to_vec();
    plain[ETH] = 0x45;
    plain[ETH + 2..ETH + 4]
        .copy_from_slice(&((frame.len() - ETH - (hl - 20)) as u16).to_be_bytes());
    plain.extend_from_slice(&frame[ETH + hl..]);
    assert_eq!(l4_sum(&plain), 0xffff, "{what}: L4 checksum");
}

/// `frame` (20-byte header) with the DSR option naming `addr:port` inserted, as the entry
/// node sends it.
fn with_option(frame: &[u8], addr: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut out = frame[..ETH + 20].to_vec();
    out.extend_from_slice(&[abi::DSR_OPT_TYPE, abi::DSR_OPT_LEN]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&addr.octets());
    out.extend_from_slice(&frame[ETH + 20..]);
    out[ETH] = 0x47;
    let len = (out.len() - ETH) as u16;
    out[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
    out[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let csum = !fold(sum16(&out[ETH..ETH + 28], 0));
    out[ETH + 10..ETH + 12].copy_from_slice(&csum.to_be_bytes());
    out
}

fn udp_sized(saddr: Ipv4Addr, daddr: Ipv4Addr, payload: usize, df: bool) -> Vec<u8> {
    let mut p = Packet::udp(saddr, 5353, daddr, NODE_PORT);
    p.payload = vec![0x5a; payload];
    p.frag_off = if df { 0x4000 } else { 0 };
    with_l4_checksum(p.bytes())
}

#[test]
fn a_syn_to_a_remote_backend_keeps_the_client_and_carries_the_frontend_in_the_option() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_remote(&mut w, TCP);
    let (verdict, out) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed to the backend's node");
    assert_eq!(&out[0..6], &NODE2_MAC);
    assert_eq!(saddr(&out), X, "the client's own address: no SNAT");
    assert_eq!(daddr(&out), R, "DNATed");
    assert_eq!(ports(&out), (50000, BACKEND_PORT));
    assert_eq!(ihl(&out), 28, "the 8-byte option after the fixed header");
    assert_eq!(
        option(&out),
        (abi::DSR_OPT_TYPE, abi::DSR_OPT_LEN, NODE, NODE_PORT),
        "the frontend the client connected to"
    );
    assert_valid_with_options(&out, "SYN with the option");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_NATIVE), 1);
    assert!(w.dp.maps.nat_mappings().unwrap().is_empty(), "no SNAT");

    // The rest of the connection follows it without the option.
    let (verdict, ack) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x10));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(ihl(&ack), 20, "only the SYN carries it");
    assert_eq!((saddr(&ack), daddr(&ack)), (X, R));
    assert_checksums_valid(&ack, "DNATed ACK");
    // A retransmitted SYN carries it again (the first may have been lost).
    let (_, again) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(ihl(&again), 28);
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

#[test]
fn every_udp_datagram_carries_the_option_and_hybrid_leaves_udp_to_snat() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_remote(&mut w, UDP);
    expose_remote(&mut w, TCP);
    for _ in 0..2 {
        let (verdict, out) = w.uplink(&udp(X, 5353, NODE, NODE_PORT));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!((saddr(&out), daddr(&out)), (X, R));
        assert_eq!(option(&out).2, NODE);
        assert_eq!(option(&out).3, NODE_PORT);
        assert_valid_with_options(&out, "datagram with the option");
    }

    w.dp.maps
        .set_service_lb_mode(ServiceLbMode::Hybrid)
        .unwrap();
    let (_, out) = w.uplink(&udp(X, 5354, NODE, NODE_PORT));
    assert_eq!(ihl(&out), 20, "hybrid: no option for UDP");
    assert_eq!(saddr(&out), NODE, "hybrid: UDP SNATed");
    assert_checksums_valid(&out, "SNATed datagram");
    let (_, syn) = w.uplink(&tcp(X, 50001, NODE, NODE_PORT, 0x02));
    assert_eq!((saddr(&syn), ihl(&syn)), (X, 28), "hybrid: DSR for TCP");

    w.dp.maps.set_service_lb_mode(ServiceLbMode::Snat).unwrap();
    let (_, syn) = w.uplink(&tcp(X, 50002, NODE, NODE_PORT, 0x02));
    assert_eq!((saddr(&syn), ihl(&syn)), (NODE, 20), "snat: SNAT for TCP");
}

#[test]
fn dsr_needs_native_routing_in_the_datapath_too() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_remote(&mut w, UDP);
    w.dp.maps.set_native_routing(false).unwrap();
    // Tunnel mode (no VXLAN device here: the tunnel's own failure): never the option.
    let (_, out) = w.uplink(&udp(X, 5353, NODE, NODE_PORT));
    assert_eq!(ihl(&out), 20, "no option in tunnel mode");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_NATIVE), 0);
}

#[test]
fn a_datagram_the_option_would_push_over_the_mtu_is_answered_with_fragmentation_needed() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_remote(&mut w, UDP);
    // IP length MTU - 8 fits with the option.
    let fits = udp_sized(X, NODE, MTU - 8 - 28, true);
    let (verdict, out) = w.uplink(&fits);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len() - ETH, MTU, "exactly the MTU with the option");
    assert_valid_with_options(&out, "largest datagram");

    // One byte more does not: with DF, the client hears the MTU it can use.
    let big = udp_sized(X, NODE, MTU - 8 - 28 + 1, true);
    let (verdict, icmp) = w.uplink(&big);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_FRAG_NEEDED), 1);
    assert_eq!(icmp.len(), ETH + 20 + 8 + 28, "header, ICMP, quote");
    assert_eq!(&icmp[0..6], &big[6..12], "to the hop it came from");
    assert_eq!(&icmp[6..12], &big[0..6]);
    assert_eq!(icmp[ETH + 9], ICMP);
    assert_eq!((saddr(&icmp), daddr(&icmp)), (NODE, X));
    assert_eq!(
        (icmp[ETH + 20], icmp[ETH + 21]),
        (3, 4),
        "fragmentation needed"
    );
    let next_hop_mtu = u16::from_be_bytes([icmp[ETH + 26], icmp[ETH + 27]]);
    assert_eq!(usize::from(next_hop_mtu), MTU - 8, "room for the option");
    assert_eq!(
        quoted(&icmp),
        ((X, 5353), (NODE, NODE_PORT)),
        "the datagram as the client sent it"
    );
    assert_icmp_error_valid(&icmp, "fragmentation needed");

    // Without DF the node's stack fragments it, the option in every fragment.
    let (verdict, out) = w.uplink(&udp_sized(X, NODE, MTU - 8 - 28 + 1, false));
    assert_eq!(verdict, TC_ACT_OK, "to the stack");
    assert_eq!(option(&out).2, NODE);
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_STACK), 1);
}

#[test]
fn a_tcp_syn_too_big_for_the_option_hears_of_it_quoting_the_frontend() {
    let Some(mut w) = setup(ServiceLbMode::Hybrid) else {
        return;
    };
    expose_remote(&mut w, TCP);
    let mut p = Packet::tcp(X, 50000, NODE, NODE_PORT, 0x02);
    p.payload = vec![1; MTU - 40 - 4];
    let (verdict, icmp) = w.uplink(&with_l4_checksum(p.bytes()));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((icmp[ETH + 20], icmp[ETH + 21]), (3, 4));
    assert_eq!(quoted(&icmp), ((X, 50000), (NODE, NODE_PORT)));
    assert_icmp_error_valid(&icmp, "fragmentation needed for a SYN");
}

/// The backend's node: a SYN and the rest of a connection through ENTRY:NODE_PORT to B.
#[test]
fn the_backend_node_takes_the_option_out_and_replies_leave_from_the_frontend() {
    // The backend's node needs no DSR mode of its own: it honours the option in native mode.
    let Some(mut w) = setup(ServiceLbMode::Snat) else {
        return;
    };
    let plain = tcp(X, 50000, B, BACKEND_PORT, 0x02);
    let (verdict, out) = w.uplink(&with_option(&plain, ENTRY, NODE_PORT));
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to B");
    assert_eq!(&out[0..6], &B_MAC);
    assert_eq!(
        &out[ETH..],
        &plain[ETH..],
        "exactly what the entry node DNATed: option out, header as before"
    );
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 1);

    // B's SYN-ACK: the frontend as source, routed straight to the client.
    let (verdict, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out");
    assert_eq!(&back[0..6], &GATEWAY_MAC, "to the client's gateway");
    assert_eq!((saddr(&back), sport(&back)), (ENTRY, NODE_PORT));
    assert_eq!((daddr(&back), dport(&back)), (X, 50000));
    assert_checksums_valid(&back, "reply from the frontend");
    assert!(
        w.dp.maps.nat_mappings().unwrap().is_empty(),
        "not masqueraded"
    );

    // The client's ACK (no option) and B's data keep the translation.
    let (_, ack) = w.uplink(&tcp(X, 50000, B, BACKEND_PORT, 0x10));
    assert_eq!(&ack[ETH..], &tcp(X, 50000, B, BACKEND_PORT, 0x10)[ETH..]);
    let (_, data) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x18), w.b_if);
    assert_eq!((saddr(&data), sport(&data)), (ENTRY, NODE_PORT));
    assert_checksums_valid(&data, "data from the frontend");
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

/// This node's own NodePort for TCP, balanced to its endpoint B.
fn expose_local(w: &mut World) {
    let frontend = LbFrontend {
        addr: NODE,
        port: NODE_PORT,
        proto: TCP,
    };
    w.dp.maps
        .upsert_backend(
            frontend,
            0,
            LbBackend {
                addr: B,
                port: BACKEND_PORT,
                cluster_id: 1,
            },
        )
        .unwrap();
    w.dp.maps
        .upsert_service(frontend, 1, abi::SERVICE_F_NODE_PORT)
        .unwrap();
}

/// A closed connection X:50000 -> B through `frontend` as the backend's node saw it: SYN,
/// SYN-ACK, FIN both ways. Its entries live on for a while (closing).
fn connect_and_close(w: &World, syn: &[u8], frontend: (Ipv4Addr, u16)) {
    let (verdict, _) = w.uplink(syn);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the first connection's SYN delivered"
    );
    let (_, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
    assert_eq!(
        (saddr(&back), sport(&back)),
        frontend,
        "the first connection's SYN-ACK"
    );
    w.uplink(&tcp(X, 50000, B, BACKEND_PORT, 0x11));
    w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x11), w.b_if);
}

/// The lab's rare unanswered node-port connection (RELIABILITY.md): a client's source port
/// used again, first through another node's NodePort (DSR to B here), then through this
/// node's own (B local, DNAT here). Both arrive at B as X:50000 -> B:8080, so the second SYN
/// found the first connection's closing entries, and B's answers left from the other node's
/// frontend, which the client ignores, through every retransmission.
#[test]
fn a_client_port_used_again_through_this_nodes_own_node_port_is_answered_from_it() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_local(&mut w);
    let plain = tcp(X, 50000, B, BACKEND_PORT, 0x02);
    connect_and_close(
        &w,
        &with_option(&plain, ENTRY, NODE_PORT),
        (ENTRY, NODE_PORT),
    );

    for attempt in ["SYN", "retransmitted SYN"] {
        let (verdict, out) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{attempt} delivered to B");
        assert_eq!(
            (daddr(&out), dport(&out)),
            (B, BACKEND_PORT),
            "{attempt} DNATed"
        );
        let (_, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
        assert_eq!(
            (saddr(&back), sport(&back)),
            (NODE, NODE_PORT),
            "the answer to the {attempt} leaves from the frontend the client used now"
        );
        assert_checksums_valid(&back, "SYN-ACK from this node's frontend");
    }
    // The rest of the connection keeps it.
    w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x10));
    let (_, data) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x18), w.b_if);
    assert_eq!((saddr(&data), sport(&data)), (NODE, NODE_PORT));
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

/// The other order: through this node's own NodePort first, then through another node's by
/// DSR; and the DSR connection's packets after its SYN (no option) keep its frontend.
#[test]
fn a_client_port_used_again_through_another_nodes_node_port_is_answered_from_that_one() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_local(&mut w);
    connect_and_close(&w, &tcp(X, 50000, NODE, NODE_PORT, 0x02), (NODE, NODE_PORT));

    let plain = tcp(X, 50000, B, BACKEND_PORT, 0x02);
    let (verdict, _) = w.uplink(&with_option(&plain, ENTRY, NODE_PORT));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (_, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
    assert_eq!((saddr(&back), sport(&back)), (ENTRY, NODE_PORT));
    w.uplink(&tcp(X, 50000, B, BACKEND_PORT, 0x10));
    let (_, data) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x18), w.b_if);
    assert_eq!(
        (saddr(&data), sport(&data)),
        (ENTRY, NODE_PORT),
        "a packet without the option names no frontend and changes nothing"
    );
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

#[test]
fn without_the_option_a_reply_keeps_the_backend_address() {
    let Some(w) = setup(ServiceLbMode::Snat) else {
        return;
    };
    w.uplink(&tcp(X, 50000, B, BACKEND_PORT, 0x02));
    let (_, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
    assert_eq!((saddr(&back), sport(&back)), (B, BACKEND_PORT));
}

#[test]
fn the_backend_node_follows_the_option_of_every_udp_datagram() {
    let Some(w) = setup(ServiceLbMode::Snat) else {
        return;
    };
    let plain = udp(X, 5353, B, BACKEND_PORT);
    let (verdict, out) = w.uplink(&with_option(&plain, ENTRY, NODE_PORT));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[ETH..], &plain[ETH..], "option out");
    let (_, back) = w.egress(&udp(B, BACKEND_PORT, X, 5353), w.b_if);
    assert_eq!((saddr(&back), sport(&back)), (ENTRY, NODE_PORT));
    assert_checksums_valid(&back, "UDP reply from the frontend");

    // The same tuple through another frontend (another entry node): the next datagram's option
    // wins, its reply comes from there.
    let other = Ipv4Addr::new(192, 0, 2, 10);
    let (_, out) = w.uplink(&with_option(&plain, other, NODE_PORT + 1));
    assert_eq!(&out[ETH..], &plain[ETH..]);
    let (_, back) = w.egress(&udp(B, BACKEND_PORT, X, 5353), w.b_if);
    assert_eq!((saddr(&back), sport(&back)), (other, NODE_PORT + 1));
    assert_checksums_valid(&back, "UDP reply from the other frontend");
}

#[test]
fn the_option_is_honoured_in_native_routing_only() {
    let Some(mut w) = setup(ServiceLbMode::Snat) else {
        return;
    };
    w.dp.maps.set_native_routing(false).unwrap();
    let plain = udp(X, 5353, B, BACKEND_PORT);
    let (_, out) = w.uplink(&with_option(&plain, ENTRY, NODE_PORT));
    assert_eq!(ihl(&out), 28, "left in: tunnel mode knows no DSR");
    let (_, back) = w.egress(&udp(B, BACKEND_PORT, X, 5353), w.b_if);
    assert_eq!(saddr(&back), B);
}

#[test]
fn a_mode_change_applies_to_new_connections_and_established_ones_keep_theirs() {
    let Some(mut w) = setup(ServiceLbMode::Dsr) else {
        return;
    };
    expose_remote(&mut w, TCP);
    expose_remote(&mut w, UDP);
    let (_, dsr_syn) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(saddr(&dsr_syn), X);
    let (_, dsr_udp) = w.uplink(&udp(X, 5353, NODE, NODE_PORT));
    assert_eq!(saddr(&dsr_udp), X);

    w.dp.maps.set_service_lb_mode(ServiceLbMode::Snat).unwrap();
    let (_, ack) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x10));
    assert_eq!(saddr(&ack), X, "the DSR connection stays DSR");
    let (_, next) = w.uplink(&udp(X, 5353, NODE, NODE_PORT));
    assert_eq!(
        (saddr(&next), ihl(&next)),
        (X, 28),
        "the UDP flow keeps its option"
    );
    let (_, snat_syn) = w.uplink(&tcp(X, 50001, NODE, NODE_PORT, 0x02));
    assert_eq!(saddr(&snat_syn), NODE, "a new connection SNATs");
    let nat_port = sport(&snat_syn);

    w.dp.maps.set_service_lb_mode(ServiceLbMode::Dsr).unwrap();
    let (_, snat_ack) = w.uplink(&tcp(X, 50001, NODE, NODE_PORT, 0x10));
    assert_eq!(
        (saddr(&snat_ack), sport(&snat_ack)),
        (NODE, nat_port),
        "the SNAT connection stays SNATed"
    );
}
