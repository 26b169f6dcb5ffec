//! The C programs under BPF_PROG_RUN: built packets in, verdicts, rewritten bytes, counters and
//! drop events out.
//!
//! BPF_PROG_RUN packets carry no tunnel metadata and the kernel does not report the tunnel key a
//! program set, so tunnel behaviour is tested through the `*_probe` entry points: the same
//! handlers, with `from_endpoint_probe` returning the key it set in skb->cb and
//! `from_overlay_probe` taking outer source and VNI from skb->cb. The attached entry points'
//! own key handling is exercised by the network-namespace tests.

mod common;

use meshd_state::NumericIdentity;
use std::net::IpAddr;
use std::net::Ipv4Addr;

use common::*;
use meshd_datapath::{
    Direction, EventLimit, FlowVerdict, IpcacheTarget, LocalEndpoint, NodeConfig, PolicyEntry,
    Verdict,
};
use meshd_ebpf::{abi, programs};

const CLUSTER1: u32 = 1 << 16;
const CLUSTER2: u32 = 2 << 16;
const CLIENT: u32 = CLUSTER1 | 1001;
const WEB: u32 = CLUSTER1 | 1000;
const REMOTE: u32 = CLUSTER2 | 600;

const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2); // local endpoint, identity CLIENT
const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3); // local endpoint, identity WEB
const R: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5); // remote endpoint in cluster 2
const A_IF: u32 = 101;
const B_IF: u32 = 102;
const A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
const B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x03];
const A_GW_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0xfe];
const B_GW_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0xfe];
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2); // owns 10.2.0.0/24, cluster 2
const VXLAN_IF: u32 = 77;

/// Two local endpoints, one remote prefix behind NODE2, NODE2 known as cluster 2.
fn setup() -> Option<TestDatapath> {
    if !can_run() {
        return None;
    }
    let mut dp = TestDatapath::new();
    let m = &mut dp.maps;
    m.set_config(NodeConfig {
        vxlan_ifindex: VXLAN_IF,
        node_ip: Ipv4Addr::new(192, 168, 50, 1),
        cluster_id: 1,
    })
    .unwrap();
    for (ip, ifindex, identity, mac, node_mac) in [
        (A, A_IF, CLIENT, A_MAC, A_GW_MAC),
        (B, B_IF, WEB, B_MAC, B_GW_MAC),
    ] {
        m.upsert_endpoint(
            ip,
            LocalEndpoint {
                ifindex,
                identity,
                mac,
                node_mac,
            },
        )
        .unwrap();
    }
    add_remote_prefix(m, "10.2.0.0/24", REMOTE, NODE2, 2);
    Some(dp)
}

fn counter(dp: &TestDatapath, direction: Direction, reason: i32) -> u64 {
    dp.maps.counter(direction, reason).unwrap()
}

#[test]
fn local_delivery_rewrites_macs_and_redirects() {
    let Some(dp) = setup() else { return };
    let pkt = Packet::tcp(A, 40000, B, 8080, 0x02);
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &B_MAC, "destination MAC = endpoint B");
    assert_eq!(
        &out[6..12],
        &B_GW_MAC,
        "source MAC = B's gateway (host veth)"
    );
    assert_eq!(
        &out[12..],
        &pkt.bytes()[12..],
        "nothing but the MACs changes"
    );
    assert_eq!(counter(&dp, Direction::Egress, abi::FWD_LOCAL), 1);
    assert_eq!(
        dp.maps.ct_len(),
        2,
        "the connection is tracked, one entry per direction"
    );
}

#[test]
fn remote_destination_is_encapsulated_with_the_source_identity_as_vni() {
    let Some(dp) = setup() else { return };
    let pkt = Packet::udp(A, 5000, R, 53);
    let (verdict, out, cb) = dp.run(programs::FROM_ENDPOINT_PROBE, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        Ipv4Addr::from(cb[0]),
        NODE2,
        "tunnel remote = node owning the prefix"
    );
    assert_eq!(cb[1], CLIENT, "VNI = sender identity");
    assert_eq!(cb[2], 64, "outer TTL");
    assert_eq!(out, pkt.bytes(), "inner packet untouched");
    assert_eq!(counter(&dp, Direction::Egress, abi::FWD_TUNNEL), 1);

    // The attached entry point takes the same path.
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(counter(&dp, Direction::Egress, abi::FWD_TUNNEL), 2);
}

#[test]
fn unknown_destination_is_dropped_with_an_event() {
    let Some(mut dp) = setup() else { return };
    let pkt = Packet::tcp(A, 40000, Ipv4Addr::new(10, 9, 9, 9), 80, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_UNKNOWN_DEST), 1);
    let events = dp.maps.drain_drop_events();
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = events[0];
    assert_eq!(ev.reason, abi::DROP_UNKNOWN_DEST);
    assert_eq!(ev.src_identity, CLIENT);
    assert_eq!((ev.saddr, ev.daddr), (A, Ipv4Addr::new(10, 9, 9, 9)));
    assert_eq!((ev.sport, ev.dport, ev.proto), (40000, 80, TCP));
    assert_eq!(ev.direction, Direction::Egress);

    // An address the ipcache places on this very node, but no local endpoint has (any more).
    let gone: ipnet::Ipv4Net = "10.1.0.77/32".parse().unwrap();
    dp.maps
        .upsert_ipcache(
            gone,
            IpcacheTarget {
                identity: NumericIdentity::new(WEB).unwrap(),
                tunnel_endpoint: Some(IpAddr::from(Ipv4Addr::new(192, 168, 50, 1))),
                local: true,
            },
        )
        .unwrap();
    let pkt = Packet::tcp(A, 40000, gone.addr(), 80, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT, "not tunnelled to ourselves");
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_UNKNOWN_DEST), 2);
}

#[test]
fn spoofed_source_address_is_dropped() {
    let Some(dp) = setup() else { return };
    // B's address sent from A's interface.
    let pkt = Packet::tcp(B, 40000, R, 80, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_INVALID_SOURCE), 1);
    // An address no endpoint has.
    let pkt = Packet::tcp(Ipv4Addr::new(10, 1, 0, 99), 40000, R, 80, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_INVALID_SOURCE), 2);
}

#[test]
fn ingress_policy_allows_listed_port_and_denies_the_rest() {
    let Some(mut dp) = setup() else { return };
    dp.maps
        .set_policy_enabled(WEB, Direction::Ingress, true)
        .unwrap();
    dp.maps
        .upsert_policy(
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

    let allowed = Packet::tcp(A, 40000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &allowed.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT, "client -> web:8080 is allowed");

    let denied = Packet::tcp(A, 40001, B, 9090, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &denied.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT, "client -> web:9090 is not");
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_POLICY), 1);
    let ev = dp.maps.drain_drop_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].reason, ev[0].src_identity, ev[0].dst_identity),
        (abi::DROP_POLICY, CLIENT, WEB)
    );

    // An explicit deny for any peer on a port wins over the default allow of another subject.
    dp.maps
        .set_policy_enabled(CLIENT, Direction::Ingress, false)
        .unwrap();
    dp.maps
        .upsert_policy(
            PolicyEntry {
                subject: WEB,
                peer: None,
                proto: Some(TCP),
                dport: Some(22),
                direction: Direction::Ingress,
            },
            Verdict::Deny,
            2,
        )
        .unwrap();
    let ssh = Packet::tcp(A, 40002, B, 22, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &ssh.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_POLICY_DENY), 1);

    // A policy change re-checks established connections: removing the rule cuts client ->
    // web:8080 although its connection is tracked.
    let more = Packet::tcp(A, 40000, B, 8080, 0x10);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &more.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT, "established and still allowed");
    dp.maps
        .delete_policy(PolicyEntry {
            subject: WEB,
            peer: Some(CLIENT),
            proto: Some(TCP),
            dport: Some(8080),
            direction: Direction::Ingress,
        })
        .unwrap();
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &more.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT, "established but no longer allowed");

    // Without the marker the direction is default-allow again.
    dp.maps
        .set_policy_enabled(WEB, Direction::Ingress, false)
        .unwrap();
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &denied.bytes(), A_IF, [0; 5]);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "unselected endpoints allow everything"
    );
}

#[test]
fn replies_and_related_icmp_errors_pass_despite_default_deny() {
    let Some(dp_) = setup() else { return };
    let mut dp = dp_;
    // web may send nothing on its own.
    dp.maps
        .set_policy_enabled(WEB, Direction::Egress, true)
        .unwrap();

    let syn = Packet::tcp(A, 40000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &syn.bytes(), A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);

    let reply = Packet::tcp(B, 8080, A, 40000, 0x12);
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &reply.bytes(), B_IF, [0; 5]);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "SYN-ACK of an allowed connection passes"
    );
    assert_eq!(&out[0..6], &A_MAC);

    let icmp_err = Packet::icmp_error(B, A, &syn);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &icmp_err.bytes(), B_IF, [0; 5]);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "ICMP error about the connection passes"
    );

    let new_conn = Packet::tcp(B, 8081, A, 40000, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &new_conn.bytes(), B_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT, "a new connection from web is denied");
    let unrelated_err = Packet::icmp_error(B, A, &Packet::udp(A, 1, B, 2));
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &unrelated_err.bytes(),
        B_IF,
        [0; 5],
    );
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "an ICMP error about no connection is denied"
    );
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_POLICY), 2);

    // Echo request/reply are tracked by identifier.
    let ping = Packet::icmp_echo(A, B, 7, false);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &ping.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT
    );
    let pong = Packet::icmp_echo(B, A, 7, true);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &pong.bytes(), B_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT
    );
    let stray_pong = Packet::icmp_echo(B, A, 8, true);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &stray_pong.bytes(), B_IF, [0; 5])
            .0,
        TC_ACT_SHOT
    );
}

fn overlay_cb(outer: Ipv4Addr, vni: u32) -> [u32; 5] {
    [abi::ip_to_be(outer), vni, 0, 0, 0]
}

#[test]
fn overlay_delivers_to_the_endpoint_with_its_macs() {
    let Some(dp) = setup() else { return };
    let mut pkt = Packet::tcp(R, 33000, B, 8080, 0x02);
    pkt.dst_mac = [0xde, 0xad, 0, 0, 0, 1]; // whatever the sender left there
    let (verdict, out, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &pkt.bytes(),
        VXLAN_IF,
        overlay_cb(NODE2, REMOTE),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &B_MAC);
    assert_eq!(&out[6..12], &B_GW_MAC);
    assert_eq!(&out[12..], &pkt.bytes()[12..]);
    assert_eq!(counter(&dp, Direction::Ingress, abi::FWD_LOCAL), 1);
}

#[test]
fn overlay_from_unknown_node_is_dropped() {
    let Some(mut dp) = setup() else { return };
    let pkt = Packet::tcp(R, 33000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &pkt.bytes(),
        VXLAN_IF,
        overlay_cb(Ipv4Addr::new(192, 168, 50, 99), REMOTE),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_UNKNOWN_NODE), 1);
    let ev = dp.maps.drain_drop_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].reason, ev[0].src_identity),
        (abi::DROP_UNKNOWN_NODE, REMOTE)
    );
}

#[test]
fn overlay_identity_of_another_cluster_than_the_node_is_dropped() {
    let Some(dp) = setup() else { return };
    // NODE2 is in cluster 2 but claims a cluster-1 identity.
    let pkt = Packet::tcp(R, 33000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &pkt.bytes(),
        VXLAN_IF,
        overlay_cb(NODE2, CLIENT),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    // A reserved identity (cluster bits 0) is not accepted from the overlay either...
    for reserved in [abi::IDENTITY_HOST, abi::IDENTITY_REMOTE_NODE] {
        let (verdict, _, _) = dp.run(
            programs::FROM_OVERLAY_PROBE,
            &pkt.bytes(),
            VXLAN_IF,
            overlay_cb(NODE2, reserved),
        );
        assert_eq!(verdict, TC_ACT_SHOT, "identity {reserved}");
    }
    assert_eq!(
        counter(&dp, Direction::Ingress, abi::DROP_INVALID_IDENTITY),
        3
    );
}

/// ...but `world`, the least privileged identity, is: it is how a node forwards a client from
/// outside the mesh to a backend here (a public endpoint). A node could get the same treatment
/// with a bare packet on the underlay, so accepting it grants no node anything new.
#[test]
fn overlay_world_from_a_known_node_is_delivered_as_world() {
    let Some(mut dp) = setup() else { return };
    let pkt = Packet::tcp(NODE2, 61000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &pkt.bytes(),
        VXLAN_IF,
        overlay_cb(NODE2, abi::IDENTITY_WORLD),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(counter(&dp, Direction::Ingress, abi::FWD_LOCAL), 1);
    // Not from an unknown node.
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &pkt.bytes(),
        VXLAN_IF,
        overlay_cb(Ipv4Addr::new(192, 168, 50, 99), abi::IDENTITY_WORLD),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    let ev = dp.maps.drain_drop_events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].reason, abi::DROP_UNKNOWN_NODE);
}

#[test]
fn overlay_unknown_destination_and_missing_tunnel_key_are_dropped() {
    let Some(dp) = setup() else { return };
    let pkt = Packet::tcp(R, 33000, Ipv4Addr::new(10, 1, 0, 200), 80, 0x02);
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &pkt.bytes(),
        VXLAN_IF,
        overlay_cb(NODE2, REMOTE),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_UNKNOWN_DEST), 1);

    // The attached entry point reads the real tunnel key, which test-run packets lack.
    let pkt = Packet::tcp(R, 33000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(programs::FROM_OVERLAY, &pkt.bytes(), VXLAN_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_NO_TUNNEL_KEY), 1);
}

#[test]
fn overlay_ingress_policy_and_replies_of_outgoing_connections() {
    let Some(dp_) = setup() else { return };
    let mut dp = dp_;
    for subject in [WEB, CLIENT] {
        dp.maps
            .set_policy_enabled(subject, Direction::Ingress, true)
            .unwrap();
    }
    allow_ingress_from(&mut dp.maps, WEB, CLIENT);
    let cb = overlay_cb(NODE2, REMOTE);

    let from_remote = Packet::tcp(R, 33000, B, 8080, 0x02);
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &from_remote.bytes(),
        VXLAN_IF,
        cb,
    );
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "cluster-2 identity is not allowed into web"
    );
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_POLICY), 1);

    dp.maps
        .upsert_policy(
            PolicyEntry {
                subject: WEB,
                peer: Some(REMOTE),
                proto: Some(TCP),
                dport: Some(8080),
                direction: Direction::Ingress,
            },
            Verdict::Allow,
            2,
        )
        .unwrap();
    let (verdict, _, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &from_remote.bytes(),
        VXLAN_IF,
        cb,
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "now it is");

    // client's ingress is default-deny, but replies to its own connections come back.
    let out = Packet::tcp(A, 41000, R, 443, 0x02);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &out.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT
    );
    let reply = Packet::tcp(R, 443, A, 41000, 0x12);
    assert_eq!(
        dp.run(programs::FROM_OVERLAY_PROBE, &reply.bytes(), VXLAN_IF, cb)
            .0,
        TC_ACT_REDIRECT
    );
    let unsolicited = Packet::tcp(R, 443, A, 41001, 0x02);
    assert_eq!(
        dp.run(
            programs::FROM_OVERLAY_PROBE,
            &unsolicited.bytes(),
            VXLAN_IF,
            cb
        )
        .0,
        TC_ACT_SHOT
    );
}

#[test]
fn later_fragments_follow_the_verdict_of_their_first_fragment() {
    let Some(mut dp) = setup() else { return };
    dp.maps
        .set_policy_enabled(WEB, Direction::Ingress, true)
        .unwrap();
    dp.maps
        .upsert_policy(
            PolicyEntry {
                subject: WEB,
                peer: Some(CLIENT),
                proto: Some(UDP),
                dport: Some(53),
                direction: Direction::Ingress,
            },
            Verdict::Allow,
            1,
        )
        .unwrap();

    let first = Packet::udp(A, 5000, B, 53).first_fragment(77);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &first.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT
    );
    let later = Packet::udp(A, 0, B, 0).later_fragment(77, 1448, true);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &later.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT,
        "a later fragment of an allowed datagram passes"
    );

    // A datagram to a port the policy does not allow: its later fragments are dropped too.
    let first = Packet::udp(A, 5000, B, 54).first_fragment(78);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &first.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_SHOT
    );
    let later = Packet::udp(A, 0, B, 0).later_fragment(78, 1448, true);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &later.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&dp, Direction::Ingress, abi::DROP_POLICY), 2);

    // A fragment whose first one never came has no ports to judge by.
    let orphan = Packet::udp(A, 0, B, 0).later_fragment(79, 1448, true);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &orphan.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_FRAG_NOT_FOUND), 1);
    dp.maps.drain_drop_events();
}

#[test]
fn host_entries_win_over_covering_prefixes_and_deleting_them_falls_back() {
    let Some(mut dp) = setup() else { return };
    let node3 = Ipv4Addr::new(192, 168, 50, 3);
    let host: ipnet::Ipv4Net = "10.2.0.5/32".parse().unwrap();
    dp.maps
        .upsert_ipcache(
            host,
            IpcacheTarget {
                identity: NumericIdentity::new(REMOTE + 1).unwrap(),
                tunnel_endpoint: Some(IpAddr::from(node3)),
                local: false,
            },
        )
        .unwrap();
    let mut prefixes = dp.maps.ipcache_prefixes().unwrap();
    prefixes.sort();
    assert_eq!(prefixes, vec!["10.2.0.0/24".parse().unwrap(), host]);

    let to = |dp: &TestDatapath, dst: Ipv4Addr| {
        let pkt = Packet::udp(A, 5000, dst, 53);
        let (verdict, _, cb) = dp.run(programs::FROM_ENDPOINT_PROBE, &pkt.bytes(), A_IF, [0; 5]);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        Ipv4Addr::from(cb[0])
    };
    assert_eq!(to(&dp, R), node3, "the /32 wins");
    assert_eq!(
        to(&dp, Ipv4Addr::new(10, 2, 0, 6)),
        NODE2,
        "the /24 covers the rest"
    );
    dp.maps.delete_ipcache(host).unwrap();
    assert_eq!(dp.maps.ipcache_entry(host).unwrap(), None);
    assert_eq!(to(&dp, R), NODE2, "back to the /24");
}

#[test]
fn a_reply_passes_when_the_lru_evicted_only_the_reply_half() {
    let Some(mut dp) = setup() else { return };
    dp.maps
        .set_policy_enabled(WEB, Direction::Egress, true)
        .unwrap();
    let syn = Packet::tcp(A, 40000, B, 8080, 0x02);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &syn.bytes(), A_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT
    );

    // Drop the reply half, as LRU eviction might.
    let mut ct = ct_map(&dp);
    let reply_key = ct_key(B, 8080, A, 40000, TCP);
    assert_eq!(ct.get(&reply_key, 0).unwrap().flags, abi::CT_F_REPLY);
    ct.remove(&reply_key).unwrap();
    assert_eq!(dp.maps.ct_len(), 1);

    let reply = Packet::tcp(B, 8080, A, 40000, 0x12);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &reply.bytes(), B_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT,
        "the original half vouches for the reply"
    );
    assert_eq!(dp.maps.ct_len(), 2, "the reply half is back");
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_POLICY), 0);
}

/// An established tunnelled connection is forwarded from its CT entry's cache (no ENDPOINTS or
/// IPCACHE lookups), so every change the cached answers came from has to reach it: the
/// destination moving to another node, the sender's identity, the destination going away, a
/// packet of the connection from another interface, and a policy change.
#[test]
fn cached_forwarding_follows_every_map_change() {
    let Some(mut dp) = setup() else { return };
    let node3 = Ipv4Addr::new(192, 168, 50, 3);
    let host: ipnet::Ipv4Net = "10.2.0.5/32".parse().unwrap();
    let pkt = |flags| Packet::tcp(A, 40000, R, 443, flags).bytes();
    let send = |dp: &TestDatapath, ifindex| {
        dp.run(programs::FROM_ENDPOINT_PROBE, &pkt(0x10), ifindex, [0; 5])
    };
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT_PROBE, &pkt(0x02), A_IF, [0; 5])
            .0,
        TC_ACT_REDIRECT
    );
    for _ in 0..3 {
        let (verdict, _, cb) = send(&dp, A_IF);
        assert_eq!(
            (verdict, Ipv4Addr::from(cb[0]), cb[1]),
            (TC_ACT_REDIRECT, NODE2, CLIENT)
        );
    }

    // The destination moves to node 3.
    dp.maps
        .upsert_ipcache(
            host,
            IpcacheTarget {
                identity: NumericIdentity::new(REMOTE).unwrap(),
                tunnel_endpoint: Some(IpAddr::from(node3)),
                local: false,
            },
        )
        .unwrap();
    for _ in 0..2 {
        let (_, _, cb) = send(&dp, A_IF);
        assert_eq!(Ipv4Addr::from(cb[0]), node3, "new tunnel endpoint");
    }

    // The sender's identity changes (labels changed).
    dp.maps
        .upsert_endpoint(
            A,
            LocalEndpoint {
                ifindex: A_IF,
                identity: CLIENT + 7,
                mac: A_MAC,
                node_mac: A_GW_MAC,
            },
        )
        .unwrap();
    for _ in 0..2 {
        let (_, _, cb) = send(&dp, A_IF);
        assert_eq!(cb[1], CLIENT + 7, "new VNI");
    }

    // Another endpoint sending with A's address (and A's connection's tuple).
    let (verdict, _, _) = send(&dp, B_IF);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_INVALID_SOURCE), 1);

    // A policy change that no longer allows the connection cuts it.
    dp.maps
        .set_policy_enabled(CLIENT + 7, Direction::Egress, true)
        .unwrap();
    assert_eq!(send(&dp, A_IF).0, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_POLICY), 1);
    dp.maps
        .set_policy_enabled(CLIENT + 7, Direction::Egress, false)
        .unwrap();
    assert_eq!(send(&dp, A_IF).0, TC_ACT_REDIRECT);

    // The destination is gone from the ipcache.
    dp.maps.delete_ipcache(host).unwrap();
    dp.maps
        .delete_ipcache("10.2.0.0/24".parse().unwrap())
        .unwrap();
    assert_eq!(send(&dp, A_IF).0, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_UNKNOWN_DEST), 1);
}

/// The CT map of a test datapath, opened from its pin (DatapathMaps keeps it private).
fn ct_map(dp: &TestDatapath) -> aya::maps::HashMap<aya::maps::MapData, abi::CtKey, abi::CtValue> {
    let ct_path = dp.pin_dir.path().join("maps").join(meshd_ebpf::maps::CT);
    aya::maps::HashMap::try_from(
        aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&ct_path).unwrap()).unwrap(),
    )
    .unwrap()
}

/// The CT key of one direction of a connection, as the datapath writes it.
fn ct_key(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, proto: u8) -> abi::CtKey {
    abi::CtKey {
        saddr: abi::ip_to_be(saddr),
        daddr: abi::ip_to_be(daddr),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        pad: [0; 3],
    }
}

/// Every CT entry, sorted, for comparing the whole map before and after.
fn ct_snapshot(dp: &TestDatapath) -> Vec<(abi::CtKey, abi::CtValue)> {
    let mut entries: Vec<_> = ct_map(dp).iter().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|(k, _)| (k.saddr, k.daddr, k.sport, k.dport, k.proto));
    entries
}

/// An established connection's packets leave its conntrack entries alone within the refresh
/// interval (1 s, CT_REFRESH_NS in ct.h): a write per packet to an entry every CPU of the
/// connection reads would bounce its cache line between them. The entries change when the
/// interval has passed (last_seen only) and when the policy revision moves (the verdict).
#[test]
fn established_packets_do_not_rewrite_their_conntrack_entries_within_the_refresh_interval() {
    let Some(mut dp) = setup() else { return };
    // Policy on both ways, so that the cached verdicts are what lets the packets through.
    dp.maps
        .set_policy_enabled(CLIENT, Direction::Egress, true)
        .unwrap();
    dp.maps
        .set_policy_enabled(CLIENT, Direction::Ingress, true)
        .unwrap();
    for (direction, peer) in [(Direction::Egress, REMOTE), (Direction::Ingress, WEB)] {
        dp.maps
            .upsert_policy(
                PolicyEntry {
                    subject: CLIENT,
                    peer: Some(peer),
                    proto: None,
                    dport: None,
                    direction,
                },
                Verdict::Allow,
                1,
            )
            .unwrap();
    }
    let cb = overlay_cb(NODE2, REMOTE);
    // A -> R through the tunnel and its replies from the overlay; B -> A on this node.
    let out = |flags| Packet::tcp(A, 40000, R, 443, flags).bytes();
    let back = |flags| Packet::tcp(R, 443, A, 40000, flags).bytes();
    let local = |flags| Packet::tcp(B, 41000, A, 8080, flags).bytes();
    let local_back = |flags| Packet::tcp(A, 8080, B, 41000, flags).bytes();
    let send = |dp: &TestDatapath, flags_out: u8, flags_back: u8| {
        assert_eq!(
            dp.run(programs::FROM_ENDPOINT, &out(flags_out), A_IF, [0; 5])
                .0,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            dp.run(programs::FROM_OVERLAY_PROBE, &back(flags_back), 0, cb)
                .0,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            dp.run(programs::FROM_ENDPOINT, &local(flags_out), B_IF, [0; 5])
                .0,
            TC_ACT_REDIRECT
        );
        assert_eq!(
            dp.run(
                programs::FROM_ENDPOINT,
                &local_back(flags_back),
                A_IF,
                [0; 5]
            )
            .0,
            TC_ACT_REDIRECT
        );
    };
    send(&dp, 0x02, 0x12); // SYN, SYN-ACK
    send(&dp, 0x10, 0x10); // the handshake's last ACK and the first data
    let before = ct_snapshot(&dp);
    assert_eq!(
        before.len(),
        4,
        "two connections, one entry per direction: {before:?}"
    );

    // Spread over several ticks of the coarse clock conntrack reads (at most 10 ms apart), so
    // that a write per packet would change last_seen.
    let start = std::time::Instant::now();
    for _ in 0..5 {
        for _ in 0..20 {
            send(&dp, 0x10, 0x10);
        }
        std::thread::sleep(std::time::Duration::from_millis(15));
    }
    let after = ct_snapshot(&dp);
    // A runner descheduled for a second would see the refresh this test is not about.
    if start.elapsed() < std::time::Duration::from_millis(900) {
        assert_eq!(
            after, before,
            "established packets rewrote conntrack entries"
        );
    }

    // The refresh itself: an entry last refreshed 10 s ago gets a new last_seen and nothing
    // else (so the comparison above would have seen a write).
    let mut ct = ct_map(&dp);
    let (key, value) = after
        .iter()
        .find(|(k, _)| k.saddr == abi::ip_to_be(A) && k.daddr == abi::ip_to_be(R))
        .copied()
        .unwrap();
    let old = abi::CtValue {
        last_seen_ns: value.last_seen_ns - 10_000_000_000,
        ..value
    };
    ct.insert(key, old, 0).unwrap();
    send(&dp, 0x10, 0x10);
    let refreshed = ct.get(&key, 0).unwrap();
    assert!(
        refreshed.last_seen_ns >= value.last_seen_ns,
        "{refreshed:?} after {old:?}"
    );
    assert_eq!(
        abi::CtValue {
            last_seen_ns: 0,
            ..refreshed
        },
        abi::CtValue {
            last_seen_ns: 0,
            ..value
        }
    );

    // A policy change re-checks the established direction once, then leaves it alone again.
    dp.maps
        .upsert_policy(
            PolicyEntry {
                subject: CLIENT,
                peer: Some(REMOTE),
                proto: Some(TCP),
                dport: Some(443),
                direction: Direction::Egress,
            },
            Verdict::Allow,
            2,
        )
        .unwrap();
    send(&dp, 0x10, 0x10);
    let rechecked = ct.get(&key, 0).unwrap();
    assert_eq!(
        rechecked.policy_revision,
        dp.maps.policy_revision().unwrap()
    );
    let settled = ct_snapshot(&dp);
    send(&dp, 0x10, 0x10);
    assert_eq!(ct_snapshot(&dp), settled);
}

/// Each CPU's cache of the coarse clock in from_endpoint's object (CT_CLOCK, lib/maps.h):
/// [jiffies, coarse ns] per CPU. Found through the program's own maps, since every datapath this
/// test binary loads has one (the map is not pinned).
fn ct_clock(dp: &TestDatapath) -> Vec<[u64; 2]> {
    let program = dp.datapath.program(programs::FROM_ENDPOINT).unwrap();
    let ids = program
        .info()
        .unwrap()
        .map_ids()
        .unwrap()
        .unwrap_or_default();
    for id in ids {
        let map = aya::maps::MapData::from_id(id).unwrap();
        if map.info().unwrap().name_as_str() == Some("CT_CLOCK") {
            let clock: aya::maps::PerCpuArray<_, [u64; 2]> =
                aya::maps::PerCpuArray::try_from(aya::maps::Map::from_map_data(map).unwrap())
                    .unwrap();
            return clock.get(&0, 0).unwrap().iter().copied().collect();
        }
    }
    panic!("from_endpoint has no CT_CLOCK map");
}

/// An established connection's packets forwarded from the CT entry's cache age the entry by
/// conntrack's coarse clock as each CPU cached it for the current tick (ct_now_cached in
/// lib/ct.h), not by a clock read per packet: the cache holds the coarse clock (not the fine
/// one, not jiffies), and an entry past its lifetime is still not forwarded from its cache but
/// opens the connection again.
#[test]
fn cached_forwarding_ages_entries_by_the_per_cpu_clock_cache() {
    let Some(dp) = setup() else { return };
    let pkt = Packet::udp(A, 5000, R, 53).bytes();
    let send = |dp: &TestDatapath| {
        let (verdict, _, cb) = dp.run(programs::FROM_ENDPOINT_PROBE, &pkt, A_IF, [0; 5]);
        assert_eq!((verdict, Ipv4Addr::from(cb[0])), (TC_ACT_REDIRECT, NODE2));
    };
    // Opens the connection, fills the forwarding cache, is forwarded from it.
    let before = monotonic_coarse_ns();
    for _ in 0..3 {
        send(&dp);
    }
    let after = monotonic_coarse_ns();
    // At most two ticks behind the clock (a fill racing a tick), a tick being 10 ms at most.
    let cached: Vec<_> = ct_clock(&dp)
        .into_iter()
        .filter(|&[jiffies, now]| jiffies != 0 && now + 20_000_000 >= before && now <= after)
        .collect();
    assert!(
        !cached.is_empty(),
        "no CPU cached the coarse clock of [{before}, {after}]: {:?}",
        ct_clock(&dp)
    );

    let mut ct = ct_map(&dp);
    let key = ct_key(A, 5000, R, 53, UDP);
    let entry = ct.get(&key, 0).unwrap();
    assert_ne!(entry.fwd_tunnel_endpoint, 0, "the cache is filled");
    // Last seen 61 s ago: past UDP's lifetime (MESHD_CT_LIFETIME_OTHER_NS, 60 s).
    let expired = abi::CtValue {
        last_seen_ns: entry.last_seen_ns.wrapping_sub(61_000_000_000),
        ..entry
    };
    ct.insert(key, expired, 0).unwrap();
    send(&dp);
    let reopened = ct.get(&key, 0).unwrap();
    assert_eq!(
        reopened.fwd_tunnel_endpoint, 0,
        "an expired entry was forwarded from its cache: {reopened:?}"
    );
    assert!(reopened.last_seen_ns >= entry.last_seen_ns, "{reopened:?}");
}

#[test]
fn listings_reflect_what_was_written() {
    let Some(mut dp) = setup() else { return };
    let entry = PolicyEntry {
        subject: WEB,
        peer: None,
        proto: Some(UDP),
        dport: Some(53),
        direction: Direction::Egress,
    };
    dp.maps.upsert_policy(entry, Verdict::Deny, 42).unwrap();
    dp.maps
        .set_policy_enabled(WEB, Direction::Egress, true)
        .unwrap();
    assert_eq!(
        dp.maps.policy_entries().unwrap(),
        vec![(entry, Verdict::Deny, 42)]
    );
    assert_eq!(
        dp.maps.policy_enabled().unwrap(),
        vec![(WEB, Direction::Egress)]
    );
    assert_eq!(
        dp.maps.policy_revision().unwrap(),
        2,
        "one bump per policy write"
    );
    assert_eq!(dp.maps.nodes().unwrap(), vec![(NODE2, 2)]);
    assert_eq!(dp.maps.endpoint(B).unwrap().map(|e| e.identity), Some(WEB));
    let mut addrs = dp.maps.endpoint_addrs().unwrap();
    addrs.sort();
    assert_eq!(addrs, vec![A, B]);

    dp.maps.delete_policy(entry).unwrap();
    dp.maps.delete_policy(entry).unwrap(); // deletes are idempotent
    dp.maps.delete_endpoint(B).unwrap();
    dp.maps.delete_node(NODE2).unwrap();
    assert!(dp.maps.policy_entries().unwrap().is_empty());
    assert_eq!(dp.maps.endpoint(B).unwrap(), None);
    assert!(dp.maps.nodes().unwrap().is_empty());
    assert!(dp
        .maps
        .upsert_node(NODE2, 0)
        .is_err_and(|e| e.to_string().contains("cluster ids are 1-255")));
    assert!(dp
        .maps
        .upsert_policy(
            PolicyEntry {
                dport: Some(80),
                proto: None,
                ..entry
            },
            Verdict::Allow,
            0
        )
        .is_err());
}

#[test]
fn arp_passes_to_the_node_only_for_the_endpoints_own_address() {
    let Some(dp) = setup() else { return };
    let node_ip = Ipv4Addr::new(192, 168, 50, 1);
    let own = arp_reply(A_MAC, A, node_ip);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &own, A_IF, [0; 5]).0,
        TC_ACT_OK
    );
    assert_eq!(counter(&dp, Direction::Egress, abi::FWD_STACK), 1);
    let claims_b = arp_reply(A_MAC, B, node_ip);
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &claims_b, A_IF, [0; 5]).0,
        TC_ACT_SHOT
    );
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_INVALID_SOURCE), 1);
}

#[test]
fn new_connections_are_reported_once_when_flow_events_are_on() {
    let Some(mut dp) = setup() else { return };
    let pkt = Packet::udp(A, 5001, R, 53);
    // As loaded (EVENT_LIMIT not written): drops only.
    dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    assert!(dp.maps.drain_events().is_empty());
    dp.maps.flush_ct().unwrap();

    dp.maps
        .set_event_limit(EventLimit {
            rate_per_cpu: 0,
            flows: true,
        })
        .unwrap();
    for _ in 0..3 {
        let (verdict, _, _) = dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    let events = dp.maps.drain_events();
    assert_eq!(
        events.len(),
        1,
        "only the packet that opened the connection: {events:?}"
    );
    let ev = events[0];
    assert_eq!(ev.verdict, FlowVerdict::Forwarded);
    assert_eq!(ev.reason, abi::FWD_TUNNEL);
    assert_eq!(ev.direction, Direction::Egress);
    assert_eq!((ev.src_identity, ev.dst_identity), (CLIENT, REMOTE));
    assert_eq!(
        (ev.saddr, ev.sport, ev.daddr, ev.dport, ev.proto),
        (A, 5001, R, 53, 17)
    );
    assert_eq!(ev.service, None);

    // A drop is still reported, as a drop.
    let bad = Packet::tcp(A, 40000, Ipv4Addr::new(10, 9, 9, 9), 80, 0x02);
    dp.run(programs::FROM_ENDPOINT, &bad.bytes(), A_IF, [0; 5]);
    let events = dp.maps.drain_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].verdict, FlowVerdict::Dropped);
    assert_eq!(events[0].reason, abi::DROP_UNKNOWN_DEST);
}

fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn events_are_stamped_with_the_coarse_monotonic_clock() {
    let Some(mut dp) = setup() else { return };
    dp.maps
        .set_event_limit(EventLimit {
            rate_per_cpu: 1000,
            flows: true,
        })
        .unwrap();
    // A new connection (the clock conntrack read) and a drop before conntrack (read for the
    // event): the coarse clock, so between two coarse reads around the run. The fine clock
    // (bpf_ktime_get_ns) is up to a tick ahead of the coarse one read after.
    let open = Packet::udp(A, 5002, R, 53);
    let drop = Packet::tcp(A, 40000, Ipv4Addr::new(10, 9, 9, 9), 80, 0x02);
    for pkt in [open, drop] {
        let before = monotonic_coarse_ns();
        dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
        let after = monotonic_coarse_ns();
        let events = dp.maps.drain_events();
        assert_eq!(events.len(), 1, "{events:?}");
        let stamp = events[0].timestamp_ns;
        assert!(
            (before..=after).contains(&stamp),
            "{:?} stamped {stamp}, not within [{before}, {after}]",
            events[0].verdict
        );
    }
}

/// Edge-triggered epoll on the EVENTS ring: what the agent's reader sees.
struct RingWaiter(std::os::fd::OwnedFd);

impl RingWaiter {
    fn new(dp: &TestDatapath) -> RingWaiter {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a plain syscall, no memory handed to the kernel.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(
            epoll >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: epoll_create1 returned a new fd that nothing else owns.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(epoll) };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        let fd = dp.maps.drop_events_fd().as_raw_fd();
        // SAFETY: both fds are open for the call; ev outlives it.
        let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        RingWaiter(epoll)
    }

    /// Whether the ring signalled readiness (a wakeup) since the last call.
    fn woken(&self, timeout_ms: i32) -> bool {
        use std::os::fd::AsRawFd;
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: ev is valid for the one event asked for.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), &mut ev, 1, timeout_ms) };
        assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
        n == 1
    }
}

#[test]
fn the_reader_is_woken_only_when_the_ring_fills_past_half() {
    let Some(mut dp) = setup() else { return };
    dp.maps
        .set_event_limit(EventLimit {
            rate_per_cpu: 0,
            flows: true,
        })
        .unwrap();
    dp.maps.drain_events();
    let waiter = RingWaiter::new(&dp);
    waiter.woken(0);
    // A reader that has caught up is not woken by one event (it reads on a timer)...
    let drop = Packet::tcp(A, 40000, Ipv4Addr::new(10, 9, 9, 9), 80, 0x02).bytes();
    assert_eq!(
        dp.run(programs::FROM_ENDPOINT, &drop, A_IF, [0; 5]).0,
        TC_ACT_SHOT
    );
    assert!(!waiter.woken(100), "woken by a single event");
    // ...but by the event that fills the ring past half (64 bytes an event with its header).
    let half = abi::EVENTS_BYTES / 2 / 64;
    dp.run_times(programs::FROM_ENDPOINT, &drop, A_IF, half - 2);
    assert!(!waiter.woken(100), "woken below half the ring");
    dp.run_times(programs::FROM_ENDPOINT, &drop, A_IF, 2);
    assert!(waiter.woken(1000), "not woken at half the ring");
    // Once: the events after it do not wake a reader that stays behind.
    dp.run_times(programs::FROM_ENDPOINT, &drop, A_IF, 100);
    assert!(!waiter.woken(100), "woken again past half the ring");
    let events = dp.maps.drain_events();
    assert_eq!(events.len() as u32, 1 + half + 100);
}

#[test]
fn events_over_the_rate_limit_are_counted_as_lost() {
    let Some(mut dp) = setup() else { return };
    dp.maps
        .set_event_limit(EventLimit {
            rate_per_cpu: 2,
            flows: true,
        })
        .unwrap();
    let lost_before = dp.maps.events_lost().unwrap();
    const CONNECTIONS: u16 = 12;
    for sport in 0..CONNECTIONS {
        let pkt = Packet::udp(A, 6000 + sport, R, 53);
        dp.run(programs::FROM_ENDPOINT, &pkt.bytes(), A_IF, [0; 5]);
    }
    let sent = dp.maps.drain_events().len() as u64;
    let lost = dp.maps.events_lost().unwrap() - lost_before;
    // Two per CPU per second: the test thread may run on either CPU, and a second may turn.
    assert_eq!(
        sent + lost,
        u64::from(CONNECTIONS),
        "sent {sent}, lost {lost}"
    );
    assert!(lost >= 1 && sent >= 2, "sent {sent}, lost {lost}");
}
