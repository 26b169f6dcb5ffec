//! Leaving the mesh under BPF_PROG_RUN: world and host destinations, masquerade in
//! from_endpoint (SNAT) and its reverse in from_netdev, checksums included.
//!
//! Each test runs on a thread inside a namespace of its own (`common::world`).

mod common;

use std::net::Ipv4Addr;

use common::{frames::*, world::*, *};
use meshd_datapath::{Direction, EgressConfig, PolicyEntry, Verdict};
use meshd_ebpf::abi;

/// A range of 8 ports, so that exhaustion is easy to reach.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=61007;

fn setup() -> Option<World> {
    world(NAT_PORTS)
}

fn icmp_echo(saddr: Ipv4Addr, daddr: Ipv4Addr, id: u16, reply: bool) -> Vec<u8> {
    with_icmp_checksum(Packet::icmp_echo(saddr, daddr, id, reply).bytes())
}

fn echo_id(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[ETH + 24], frame[ETH + 25]])
}

#[test]
fn tcp_to_world_leaves_masqueraded_and_its_replies_come_back_translated() {
    let Some(mut w) = setup() else { return };
    let syn = tcp(A, 40000, X, 80, 0x02);
    let (verdict, out) = w.egress(&syn, w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out by the program");
    assert_eq!(saddr(&out), NODE, "masqueraded to the node IP");
    let nat_port = sport(&out);
    assert!(
        NAT_PORTS.contains(&nat_port),
        "40000 is outside the SNAT range: a port of the range ({nat_port})"
    );
    assert_eq!((daddr(&out), dport(&out)), (X, 80));
    assert_eq!(&out[0..6], &GATEWAY_MAC, "to the default gateway's MAC");
    assert_eq!(&out[6..12], &w.up_mac, "from the uplink's MAC");
    assert_eq!(out[ETH + 8], 63, "TTL decremented as a router would");
    assert_checksums_valid(&out, "masqueraded SYN");
    assert_eq!(w.counter(Direction::Egress, abi::FWD_WORLD), 1);
    let mappings = w.dp.maps.nat_mappings().unwrap();
    assert_eq!(mappings.len(), 1, "{mappings:?}");
    assert_eq!(
        (
            mappings[0].endpoint,
            mappings[0].endpoint_port,
            mappings[0].nat_addr,
            mappings[0].nat_port
        ),
        (A, 40000, NODE, nat_port)
    );

    // The same flow keeps its port.
    let (_, again) = w.egress(&tcp(A, 40000, X, 80, 0x10), w.a_if);
    assert_eq!((saddr(&again), sport(&again)), (NODE, nat_port));

    // The reply, on the uplink.
    let syn_ack = tcp(X, 80, NODE, nat_port, 0x12);
    let (verdict, back) = w.uplink(&syn_ack);
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to the endpoint");
    assert_eq!((daddr(&back), dport(&back)), (A, 40000));
    assert_eq!((saddr(&back), sport(&back)), (X, 80));
    assert_eq!(&back[0..6], &A_MAC);
    assert_eq!(&back[6..12], &A_GW_MAC);
    assert_checksums_valid(&back, "reverse-translated SYN-ACK");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 1);

    // A packet to the node IP of no masqueraded flow is the node's own: untouched, uncounted.
    let own = tcp(X, 80, NODE, 33000, 0x12);
    let (verdict, out) = w.uplink(&own);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, own);
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 1);
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

#[test]
fn an_endpoint_port_in_the_range_is_kept_when_free_and_changed_when_taken() {
    let Some(w) = setup() else { return };
    let (_, a) = w.egress(&udp(A, 61003, X, 53), w.a_if);
    assert_eq!((saddr(&a), sport(&a)), (NODE, 61003), "kept");
    assert_checksums_valid(&a, "UDP from A");
    // B uses the same source port to the same destination at the same time.
    let (verdict, b) = w.egress(&udp(B, 61003, X, 53), w.b_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(saddr(&b), NODE);
    assert_ne!(sport(&b), 61003, "taken by A: another port");
    assert!(NAT_PORTS.contains(&sport(&b)));
    assert_checksums_valid(&b, "UDP from B");

    // Each reply finds its own endpoint.
    for (port, ep, ep_mac) in [(61003, A, A_MAC), (sport(&b), B, B_MAC)] {
        let (verdict, back) = w.uplink(&udp(X, 53, NODE, port));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!((daddr(&back), dport(&back)), (ep, 61003));
        assert_eq!(&back[0..6], &ep_mac);
        assert_checksums_valid(&back, "UDP reply");
    }
}

#[test]
fn icmp_echo_is_masqueraded_by_its_identifier() {
    let Some(w) = setup() else { return };
    let (verdict, out) = w.egress(&icmp_echo(A, X, 7, false), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(saddr(&out), NODE);
    let id = echo_id(&out);
    assert!(NAT_PORTS.contains(&id), "identifier {id} from the range");
    assert_eq!(icmp_sum(&out), 0xffff, "ICMP checksum");
    assert_eq!(fold(sum16(&out[ETH..ETH + 20], 0)), 0xffff, "IP checksum");

    let (verdict, back) = w.uplink(&icmp_echo(X, NODE, id, true));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((daddr(&back), echo_id(&back)), (A, 7));
    assert_eq!(icmp_sum(&back), 0xffff, "ICMP checksum of the reply");
    assert_eq!(fold(sum16(&back[ETH..ETH + 20], 0)), 0xffff);
}

#[test]
fn an_icmp_error_about_a_masqueraded_flow_reaches_the_endpoint() {
    let Some(w) = setup() else { return };
    let (_, out) = w.egress(&tcp(A, 40000, X, 80, 0x02), w.a_if);
    let nat_port = sport(&out);
    // The gateway's "fragmentation needed" (here: port unreachable, the same path) quotes the
    // packet as it left the node.
    let quoted_packet = Packet::tcp(NODE, nat_port, X, 80, 0x02);
    let error = icmp_error(GATEWAY, NODE, &quoted_packet);
    let (verdict, back) = w.uplink(&error);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(daddr(&back), A, "outer destination: the endpoint");
    assert_eq!(saddr(&back), GATEWAY, "the router keeps its own source");
    assert_eq!(quoted(&back), ((A, 40000), (X, 80)), "quoted as A sent it");
    assert_icmp_error_valid(&back, "translated ICMP error");
    // Related to a live connection: no policy, delivered.
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 1);
}

#[test]
fn an_exhausted_range_drops_with_nat_no_port_and_recovers_when_a_connection_ends() {
    let Some(mut w) = setup() else { return };
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..8u16 {
        let (verdict, out) = w.egress(&tcp(A, 40000 + i, X, 80, 0x02), w.a_if);
        assert_eq!(verdict, TC_ACT_REDIRECT, "flow {i}");
        ports.insert(sport(&out));
    }
    assert_eq!(ports.len(), 8, "eight flows, eight ports: {ports:?}");
    let (verdict, _) = w.egress(&tcp(A, 40100, X, 80, 0x02), w.a_if);
    assert_eq!(verdict, TC_ACT_SHOT, "the ninth finds no port");
    assert_eq!(w.counter(Direction::Egress, abi::DROP_NAT_NO_PORT), 1);
    let events = w.dp.maps.drain_drop_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(abi::reason_name(events[0].reason), "nat-no-port");
    assert_eq!((events[0].saddr, events[0].sport), (A, 40100));
    // Another destination port is another tuple: the same NAT ports are free for it.
    let (verdict, _) = w.egress(&tcp(A, 40100, X, 443, 0x02), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);

    // One connection ends (RST): its mapping goes when its CT entry does (closing lifetime).
    let (verdict, _) = w.egress(&tcp(A, 40003, X, 80, 0x04), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    std::thread::sleep(std::time::Duration::from_secs(11));
    let (verdict, out) = w.egress(&tcp(A, 40100, X, 80, 0x02), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT, "a port is free again");
    assert!(ports.contains(&sport(&out)));
    assert_eq!(w.counter(Direction::Egress, abi::DROP_NAT_NO_PORT), 1);
}

/// Masquerade never launders a forged source: a packet to the world from an endpoint's veth
/// with another endpoint's address, or with an address no endpoint has, is dropped before any
/// mapping is made.
#[test]
fn spoofed_sources_to_the_world_stay_dropped_and_get_no_mapping() {
    let Some(w) = setup() else { return };
    for (i, forged) in [B, Ipv4Addr::new(10, 1, 0, 99), NODE]
        .into_iter()
        .enumerate()
    {
        let (verdict, _) = w.egress(&tcp(forged, 40000, X, 80, 0x02), w.a_if);
        assert_eq!(verdict, TC_ACT_SHOT, "{forged} sent from A's veth");
        assert_eq!(
            w.counter(Direction::Egress, abi::DROP_INVALID_SOURCE),
            i as u64 + 1
        );
    }
    assert_eq!(w.counter(Direction::Egress, abi::FWD_WORLD), 0);
    assert!(w.dp.maps.nat_mappings().unwrap().is_empty());
    // A's own address still leaves.
    let (verdict, out) = w.egress(&tcp(A, 40000, X, 80, 0x02), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(saddr(&out), NODE);
}

#[test]
fn replies_of_connections_from_outside_keep_the_endpoints_address() {
    let Some(w) = setup() else { return };
    // Routed to the endpoint's own address (masquerade off on the far side, a router with a
    // pod CIDR route): delivered, tracked.
    let (verdict, inbound) = w.uplink(&tcp(X, 5000, B, 8080, 0x02));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(daddr(&inbound), B);
    let (verdict, reply) = w.egress(&tcp(B, 8080, X, 5000, 0x12), w.b_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        (saddr(&reply), sport(&reply)),
        (B, 8080),
        "a reply is never masqueraded"
    );
    assert_checksums_valid(&reply, "reply");
    assert!(w.dp.maps.nat_mappings().unwrap().is_empty());
}

#[test]
fn world_and_host_are_identities_for_policy_both_ways() {
    let Some(mut w) = setup() else { return };
    let allow = |subject, peer, dport, direction| {
        (
            PolicyEntry {
                subject,
                peer: Some(peer),
                proto: Some(TCP),
                dport: Some(dport),
                direction,
            },
            Verdict::Allow,
        )
    };
    let m = &mut w.dp.maps;
    m.set_policy_enabled(CLIENT, Direction::Egress, true)
        .unwrap();
    m.set_policy_enabled(WEB, Direction::Ingress, true).unwrap();
    for (entry, verdict) in [
        allow(CLIENT, abi::IDENTITY_WORLD, 80, Direction::Egress),
        allow(CLIENT, abi::IDENTITY_HOST, 22, Direction::Egress),
        allow(WEB, abi::IDENTITY_WORLD, 8080, Direction::Ingress),
    ] {
        m.upsert_policy(entry, verdict, 1).unwrap();
    }
    m.bump_policy_revision().unwrap();

    assert_eq!(
        w.egress(&tcp(A, 40000, X, 80, 0x02), w.a_if).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(w.egress(&tcp(A, 40000, X, 81, 0x02), w.a_if).0, TC_ACT_SHOT);
    // The node's own address (the FIB says local): host, handed to the node's stack as sent.
    let to_node = tcp(A, 40000, NODE, 22, 0x02);
    let (verdict, out) = w.egress(&to_node, w.a_if);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, to_node, "never masqueraded");
    assert_eq!(
        w.egress(&tcp(A, 40000, NODE, 80, 0x02), w.a_if).0,
        TC_ACT_SHOT
    );
    let drops = w.dp.maps.drain_drop_events();
    let dst: Vec<(u16, u32)> = drops.iter().map(|d| (d.dport, d.dst_identity)).collect();
    assert_eq!(dst, [(81, abi::IDENTITY_WORLD), (80, abi::IDENTITY_HOST)]);

    // Ingress from world, on the uplink.
    assert_eq!(w.uplink(&tcp(X, 5000, B, 8080, 0x02)).0, TC_ACT_REDIRECT);
    assert_eq!(w.uplink(&tcp(X, 5000, B, 22, 0x02)).0, TC_ACT_SHOT);
    let drops = w.dp.maps.drain_drop_events();
    assert_eq!(drops.len(), 1);
    assert_eq!(
        (drops[0].src_identity, drops[0].reason, drops[0].direction),
        (abi::IDENTITY_WORLD, abi::DROP_POLICY, Direction::Ingress)
    );
}

#[test]
fn non_masquerade_destinations_switching_off_and_unroutable_destinations() {
    let Some(mut w) = setup() else { return };
    w.dp.maps
        .set_no_masquerade(&["198.51.100.0/24".parse().unwrap()])
        .unwrap();
    let (verdict, out) = w.egress(&tcp(A, 40000, X, 80, 0x02), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        (saddr(&out), sport(&out)),
        (A, 40000),
        "in non_masquerade_cidrs"
    );
    assert_checksums_valid(&out, "unmasqueraded");

    let y = Ipv4Addr::new(192, 0, 2, 77); // on the uplink's subnet, no neighbour yet
    w.dp.maps
        .set_egress(&EgressConfig {
            masquerade: false,
            nat_ports: NAT_PORTS,
        })
        .unwrap();
    let (verdict, out) = w.egress(&tcp(A, 40001, y, 80, 0x02), w.a_if);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "redirect_neigh resolves the next hop"
    );
    assert_eq!(saddr(&out), A, "masquerade off");
    assert!(w.dp.maps.nat_mappings().unwrap().is_empty());

    // No route (a blackhole): unknown destination, as before the mesh let anything out.
    let (verdict, _) = w.egress(
        &tcp(A, 40002, Ipv4Addr::new(203, 0, 113, 5), 80, 0x02),
        w.a_if,
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Egress, abi::DROP_UNKNOWN_DEST), 1);
}

/// Native routing: a remote endpoint's packets leave by the node's route to its node, with
/// their addresses as sent (no tunnel, no masquerade); packets from a remote endpoint arriving
/// on the uplink take their identity from the ipcache (unknown sources are world) for the
/// receiver's ingress policy.
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const PEER_NODE_MAC: [u8; 6] = [0x02, 0x47, 0x57, 0, 0, 0x07];
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
const REMOTE_ID: u32 = (2 << 16) | 1000;

/// A world in native routing mode with masquerade on: REMOTE (identity REMOTE_ID) is an
/// endpoint behind PEER_NODE, which the node routes 10.2.0.0/24 to.
fn native_setup() -> Option<World> {
    let mut w = setup()?;
    for args in [
        &[
            "neigh",
            "replace",
            "192.0.2.7",
            "lladdr",
            "02:47:57:00:00:07",
            "dev",
            "mq_up",
            "nud",
            "permanent",
        ][..],
        &["route", "add", "10.2.0.0/24", "via", "192.0.2.7"],
    ] {
        w.ip(args);
    }
    let m = &mut w.dp.maps;
    m.set_native_routing(true).unwrap();
    assert!(m.native_routing().unwrap());
    m.set_egress(&EgressConfig {
        masquerade: true,
        nat_ports: NAT_PORTS,
    })
    .unwrap();
    assert!(m.native_routing().unwrap(), "egress settings keep the mode");
    m.upsert_ipcache(
        "10.2.0.5/32".parse().unwrap(),
        meshd_datapath::IpcacheTarget {
            identity: meshd_state::NumericIdentity::new(REMOTE_ID).unwrap(),
            tunnel_endpoint: Some(PEER_NODE.into()),
            local: false,
        },
    )
    .unwrap();
    Some(w)
}

#[test]
fn native_routing_forwards_by_the_fib_and_takes_identities_from_the_ipcache() {
    let Some(mut w) = native_setup() else { return };
    let m = &mut w.dp.maps;
    m.set_policy_enabled(WEB, Direction::Ingress, true).unwrap();
    m.upsert_policy(
        PolicyEntry {
            subject: WEB,
            peer: Some(REMOTE_ID),
            proto: Some(TCP),
            dport: Some(8080),
            direction: Direction::Ingress,
        },
        Verdict::Allow,
        1,
    )
    .unwrap();
    // CLIENT may reach WEB too: but never from the underlay (see below).
    m.upsert_policy(
        PolicyEntry {
            subject: WEB,
            peer: Some(CLIENT),
            proto: Some(TCP),
            dport: Some(8080),
            direction: Direction::Ingress,
        },
        Verdict::Allow,
        1,
    )
    .unwrap();
    m.bump_policy_revision().unwrap();

    let syn = tcp(A, 40000, REMOTE, 8080, 0x02);
    let (verdict, out) = w.egress(&syn, w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out by the program");
    assert_eq!((saddr(&out), sport(&out)), (A, 40000), "never masqueraded");
    assert_eq!((daddr(&out), dport(&out)), (REMOTE, 8080));
    assert_eq!(
        &out[0..6],
        &PEER_NODE_MAC,
        "to the peer node, not the gateway"
    );
    assert_eq!(&out[6..12], &w.up_mac);
    assert_eq!(out[ETH + 8], 63, "TTL decremented");
    assert_checksums_valid(&out, "natively routed SYN");
    assert_eq!(w.counter(Direction::Egress, abi::FWD_NATIVE), 1);
    assert_eq!(w.counter(Direction::Egress, abi::FWD_TUNNEL), 0);
    assert!(w.dp.maps.nat_mappings().unwrap().is_empty());

    // Its reply on the uplink is delivered to A (a reply of A's connection).
    let (verdict, back) = w.uplink(&tcp(REMOTE, 8080, A, 40000, 0x12));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&back[0..6], &A_MAC);

    // The remote endpoint's own connection to WEB: allowed by its identity. The same from an
    // address the ipcache does not know is world, which WEB's policy does not allow.
    assert_eq!(
        w.uplink(&tcp(REMOTE, 5000, B, 8080, 0x02)).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(w.uplink(&tcp(X, 5000, B, 8080, 0x02)).0, TC_ACT_SHOT);
    // A local endpoint never speaks from the underlay: a packet there claiming A's address is
    // world, though A's own identity may reach WEB.
    assert_eq!(w.uplink(&tcp(A, 5002, B, 8080, 0x02)).0, TC_ACT_SHOT);
    let drops = w.dp.maps.drain_drop_events();
    assert_eq!(drops.len(), 2, "{drops:?}");
    for d in &drops {
        assert_eq!(
            (d.src_identity, d.reason),
            (abi::IDENTITY_WORLD, abi::DROP_POLICY)
        );
    }

    // Back to tunnel mode: without a VXLAN device there is nowhere to send it.
    w.dp.maps.set_native_routing(false).unwrap();
    assert_eq!(
        w.egress(&tcp(A, 40001, REMOTE, 8080, 0x02), w.a_if).0,
        TC_ACT_SHOT
    );
    // And only the tunnel vouches for a remote endpoint: the same bare SYN on the underlay is
    // anyone's (world) now, which WEB's policy does not allow.
    w.dp.maps.drain_drop_events();
    assert_eq!(w.uplink(&tcp(REMOTE, 5001, B, 8080, 0x02)).0, TC_ACT_SHOT);
    let drops = w.dp.maps.drain_drop_events();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(
        (drops[0].src_identity, drops[0].reason, drops[0].direction),
        (abi::IDENTITY_WORLD, abi::DROP_POLICY, Direction::Ingress)
    );
}

/// Native routing from the forwarding cache (lib/fwd_cache.h): an established connection's
/// packets skip the ENDPOINTS, IPCACHE and policy lookups but not the FIB, so they follow a
/// neighbour's new MAC and a new route at once, and every map change the cached answers came
/// from (the sender's interface, policy, the destination's ipcache entry) still reaches them.
#[test]
fn native_cached_forwarding_follows_the_fib_and_every_map_change() {
    let Some(mut w) = native_setup() else { return };
    let pkt = |flags| tcp(A, 40000, REMOTE, 8080, flags);
    assert_eq!(w.egress(&pkt(0x02), w.a_if).0, TC_ACT_REDIRECT);
    // The first established packet fills the cache, the next ones use it.
    for i in 0..3 {
        let (verdict, out) = w.egress(&pkt(0x10), w.a_if);
        assert_eq!(verdict, TC_ACT_REDIRECT, "packet {i}");
        assert_eq!(&out[0..6], &PEER_NODE_MAC, "packet {i}");
        assert_eq!((saddr(&out), daddr(&out)), (A, REMOTE), "never masqueraded");
        assert_eq!(out[ETH + 8], 63, "TTL decremented (packet {i})");
        assert_checksums_valid(&out, "cached native packet");
    }
    assert_eq!(w.counter(Direction::Egress, abi::FWD_NATIVE), 4);

    // The peer node's MAC changes (no map write): the FIB knows at once.
    w.ip(&[
        "neigh",
        "replace",
        "192.0.2.7",
        "lladdr",
        "02:47:57:00:00:77",
        "dev",
        "mq_up",
        "nud",
        "permanent",
    ]);
    let (_, out) = w.egress(&pkt(0x10), w.a_if);
    assert_eq!(&out[0..6], &[0x02, 0x47, 0x57, 0, 0, 0x77]);
    // The route moves to the gateway (a router took over the prefix).
    w.ip(&["route", "replace", "10.2.0.0/24", "via", "192.0.2.254"]);
    let (_, out) = w.egress(&pkt(0x10), w.a_if);
    assert_eq!(&out[0..6], &GATEWAY_MAC);

    // Another endpoint sending with A's tuple.
    assert_eq!(w.egress(&pkt(0x10), w.b_if).0, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Egress, abi::DROP_INVALID_SOURCE), 1);

    // A policy change that no longer allows the connection cuts it.
    let m = &mut w.dp.maps;
    m.set_policy_enabled(CLIENT, Direction::Egress, true)
        .unwrap();
    assert_eq!(w.egress(&pkt(0x10), w.a_if).0, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Egress, abi::DROP_POLICY), 1);
    w.dp.maps
        .set_policy_enabled(CLIENT, Direction::Egress, false)
        .unwrap();
    assert_eq!(w.egress(&pkt(0x10), w.a_if).0, TC_ACT_REDIRECT);

    // The destination leaves the ipcache: it is world now (masqueraded, by the same route).
    w.dp.maps
        .delete_ipcache("10.2.0.5/32".parse().unwrap())
        .unwrap();
    let (verdict, out) = w.egress(&pkt(0x10), w.a_if);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(saddr(&out), NODE, "world traffic is masqueraded");
    assert_eq!(w.counter(Direction::Egress, abi::FWD_WORLD), 1);
}
