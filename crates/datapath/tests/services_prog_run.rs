//! Service load-balancing under BPF_PROG_RUN: DNAT of connections to a frontend (bytes and
//! checksums), the backend kept for the connection's life, reverse NAT of replies on both
//! paths back into the client (from a local backend through from-endpoint, from a remote one
//! through from-overlay), policy against the backend, and frontends without backends.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::{frames::*, *};
use meshd_datapath::{
    Direction, LbBackend, LbFrontend, LocalEndpoint, NodeConfig, PolicyEntry, Verdict,
};
use meshd_ebpf::{abi, programs};

const CLUSTER1: u32 = 1 << 16;
const CLUSTER2: u32 = 2 << 16;
const CLIENT: u32 = CLUSTER1 | 1001;
const WEB: u32 = CLUSTER1 | 1000;
const REMOTE: u32 = CLUSTER2 | 600;

const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2); // local client
const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3); // local backend (WEB)
const C: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 4); // second local backend (WEB)
const R: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5); // remote backend in cluster 2
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const A_IF: u32 = 101;
const B_IF: u32 = 102;
const C_IF: u32 = 103;
const NODE2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);

fn mac(last: u8) -> [u8; 6] {
    [0x02, 0xaa, 0, 0, 0, last]
}

fn setup() -> Option<TestDatapath> {
    if !can_run() {
        return None;
    }
    let mut dp = TestDatapath::new();
    let m = &mut dp.maps;
    m.set_config(NodeConfig {
        vxlan_ifindex: 77,
        node_ip: Ipv4Addr::new(192, 168, 50, 1),
        cluster_id: 1,
    })
    .unwrap();
    for (ip, ifindex, identity) in [(A, A_IF, CLIENT), (B, B_IF, WEB), (C, C_IF, WEB)] {
        m.upsert_endpoint(
            ip,
            LocalEndpoint {
                ifindex,
                identity,
                mac: mac(ip.octets()[3]),
                node_mac: mac(0xf0 | ip.octets()[3]),
            },
        )
        .unwrap();
    }
    add_remote_prefix(m, "10.2.0.0/24", REMOTE, NODE2, 2);
    Some(dp)
}

fn frontend(proto: u8) -> LbFrontend {
    LbFrontend {
        addr: VIP,
        port: 80,
        proto,
    }
}

/// Points `frontend` at `backends` (port 8080), slots first, then the count.
fn set_backends(dp: &mut TestDatapath, frontend: LbFrontend, backends: &[(Ipv4Addr, u8)]) {
    for (slot, (addr, cluster_id)) in backends.iter().enumerate() {
        dp.maps
            .upsert_backend(
                frontend,
                slot as u32,
                LbBackend {
                    addr: *addr,
                    port: 8080,
                    cluster_id: *cluster_id,
                },
            )
            .unwrap();
    }
    dp.maps
        .upsert_service(frontend, backends.len() as u32, 0)
        .unwrap();
}

fn counter(dp: &TestDatapath, direction: Direction, reason: i32) -> u64 {
    dp.maps.counter(direction, reason).unwrap()
}

#[test]
fn a_connection_to_a_frontend_is_dnated_to_a_local_backend_with_valid_checksums() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[(B, 1)]);
    let syn = tcp(A, 40000, VIP, 80, 0x02);
    assert_checksums_valid(&syn, "the built packet");
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &syn, A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((daddr(&out), dport(&out)), (B, 8080), "DNAT to the backend");
    assert_eq!((saddr(&out), sport(&out)), (A, 40000), "source untouched");
    assert_eq!(&out[0..6], &mac(3), "delivered to the backend's MAC");
    assert_checksums_valid(&out, "after DNAT");
    assert_eq!(
        &out[ETH + 20 + 20..],
        &syn[ETH + 20 + 20..],
        "payload untouched"
    );
    // The frontend's service entry plus both halves of the translated connection.
    assert_eq!(dp.maps.ct_len(), 3);

    // The backend's reply, through from-endpoint of the backend (same node): source back to
    // the frontend.
    let reply = tcp(B, 8080, A, 40000, 0x12);
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &reply, B_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((saddr(&out), sport(&out)), (VIP, 80), "reverse NAT");
    assert_eq!((daddr(&out), dport(&out)), (A, 40000));
    assert_eq!(&out[0..6], &mac(2), "delivered to the client");
    assert_checksums_valid(&out, "after reverse NAT");
    assert_eq!(counter(&dp, Direction::Egress, abi::FWD_LOCAL), 2);
}

/// Hairpin: the client is the frontend's only backend. The request comes back to it from the
/// service loopback address (its own address as source would be a martian to its kernel), and
/// the reply to that address goes back to it from the frontend. Policy does not stand between
/// an endpoint and itself; it still holds for another endpoint of the same identity.
#[test]
fn a_client_load_balanced_to_itself_talks_through_the_service_loopback_address() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[(B, 1)]);
    // WEB admits nothing: not even WEB.
    dp.maps
        .set_policy_enabled(WEB, Direction::Ingress, true)
        .unwrap();
    let lo = abi::SERVICE_LOOPBACK_ADDR;

    let syn = tcp(B, 41000, VIP, 80, 0x02);
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &syn, B_IF, [0; 5]);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "hairpin past WEB's ingress policy"
    );
    assert_eq!((daddr(&out), dport(&out)), (B, 8080), "DNAT to itself");
    assert_eq!(
        (saddr(&out), sport(&out)),
        (lo, 41000),
        "SNAT to the loopback address"
    );
    assert_eq!(&out[0..6], &mac(3), "back to the client's MAC");
    assert_checksums_valid(&out, "after DNAT and SNAT");

    let synack = tcp(B, 8080, lo, 41000, 0x12);
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &synack, B_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        (saddr(&out), sport(&out)),
        (VIP, 80),
        "source back to the frontend"
    );
    assert_eq!(
        (daddr(&out), dport(&out)),
        (B, 41000),
        "destination back to the client"
    );
    assert_eq!(&out[0..6], &mac(3));
    assert_checksums_valid(&out, "after reverse NAT");

    // The connection goes on the same way.
    let (_, out, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(B, 41000, VIP, 80, 0x10),
        B_IF,
        [0; 5],
    );
    assert_eq!((saddr(&out), daddr(&out)), (lo, B));

    // A packet to the loopback address that belongs to no hairpin connection goes nowhere.
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(B, 8080, lo, 42000, 0x12),
        B_IF,
        [0; 5],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert!(counter(&dp, Direction::Egress, abi::DROP_UNKNOWN_DEST) > 0);

    // Another WEB endpoint to B through the frontend: policy applies.
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(C, 41001, VIP, 80, 0x02),
        C_IF,
        [0; 5],
    );
    assert_eq!(verdict, TC_ACT_SHOT, "WEB admits no WEB but itself");
}

#[test]
fn a_connection_keeps_its_backend_and_new_ones_spread() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[(B, 1), (C, 1)]);
    let mut seen = BTreeSet::new();
    for port in 40000..40064u16 {
        let (v, first, _) = dp.run(
            programs::FROM_ENDPOINT,
            &tcp(A, port, VIP, 80, 0x02),
            A_IF,
            [0; 5],
        );
        assert_eq!(v, TC_ACT_REDIRECT);
        let backend = daddr(&first);
        seen.insert(backend);
        for flags in [0x10, 0x18, 0x10] {
            let (_, next, _) = dp.run(
                programs::FROM_ENDPOINT,
                &tcp(A, port, VIP, 80, flags),
                A_IF,
                [0; 5],
            );
            assert_eq!(daddr(&next), backend, "port {port} keeps its backend");
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from([B, C]),
        "64 connections over 2 backends"
    );

    // The backends change: an established connection keeps its backend, which is no longer
    // in the table; a new connection only gets the new one.
    let (_, out, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 50000, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    let kept = daddr(&out);
    let other = if kept == B { C } else { B };
    set_backends(&mut dp, frontend(TCP), &[(other, 1)]);
    let (_, out, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 50000, VIP, 80, 0x10),
        A_IF,
        [0; 5],
    );
    assert_eq!(
        daddr(&out),
        kept,
        "an established connection keeps its backend"
    );
    for port in 51000..51010u16 {
        let (_, out, _) = dp.run(
            programs::FROM_ENDPOINT,
            &tcp(A, port, VIP, 80, 0x02),
            A_IF,
            [0; 5],
        );
        assert_eq!(daddr(&out), other);
    }

    // The kept backend is deleted: the connection's next segment goes to a backend of now
    // (whose kernel resets a connection it does not know), not into the void; and stays there.
    dp.maps.delete_endpoint(kept).unwrap();
    for flags in [0x18, 0x10] {
        let (verdict, out, _) = dp.run(
            programs::FROM_ENDPOINT,
            &tcp(A, 50000, VIP, 80, flags),
            A_IF,
            [0; 5],
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(daddr(&out), other, "a deleted backend's connection moves");
        assert_checksums_valid(&out, "after DNAT to the new backend");
    }

    // After FIN the tuple is closing; a SYN reusing it picks among today's backends.
    dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 50000, VIP, 80, 0x11),
        A_IF,
        [0; 5],
    );
    let (_, out, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 50000, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(daddr(&out), other, "a reused port is a new connection");
    let reply = tcp(other, 8080, A, 50000, 0x12);
    let (_, out, _) = dp.run(
        programs::FROM_ENDPOINT,
        &reply,
        if other == B { B_IF } else { C_IF },
        [0; 5],
    );
    assert_eq!((saddr(&out), sport(&out)), (VIP, 80));
}

/// A backend's ICMP error about a client's packet (port unreachable for UDP) must name the
/// frontend the client sent to, or the client's kernel finds no socket for it: from a local
/// backend through from-endpoint, from a remote one through from-overlay, and from a router on
/// the way (which keeps its own source).
#[test]
fn icmp_errors_about_a_service_connection_are_translated_back_to_the_frontend() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(UDP), &[(B, 1)]);
    let (v, out, _) = dp.run(
        programs::FROM_ENDPOINT,
        &udp(A, 40000, VIP, 80),
        A_IF,
        [0; 5],
    );
    assert_eq!((v, daddr(&out)), (TC_ACT_REDIRECT, B));

    // B's kernel quotes the datagram as it got it: A:40000 -> B:8080.
    let seen = Packet::udp(A, 40000, B, 8080);
    let err = icmp_error(B, A, &seen);
    assert_icmp_error_valid(&err, "the built error");
    let (v, out, _) = dp.run(programs::FROM_ENDPOINT, &err, B_IF, [0; 5]);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &mac(2), "delivered to the client");
    assert_eq!(saddr(&out), VIP, "from the frontend");
    assert_eq!(daddr(&out), A);
    assert_eq!(quoted(&out), ((A, 40000), (VIP, 80)), "quotes the frontend");
    assert_icmp_error_valid(&out, "after translation");

    // A remote backend, over the overlay.
    set_backends(&mut dp, frontend(TCP), &[(R, 2)]);
    let (v, _, _) = dp.run(
        programs::FROM_ENDPOINT_PROBE,
        &tcp(A, 40001, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let seen = Packet::tcp(A, 40001, R, 8080, 0x02);
    let overlay = [abi::ip_to_be(NODE2), REMOTE, 0, 0, 0];
    let err = icmp_error(R, A, &seen);
    let (v, out, _) = dp.run(programs::FROM_OVERLAY_PROBE, &err, 0, overlay);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(saddr(&out), VIP);
    assert_eq!(quoted(&out), ((A, 40001), (VIP, 80)));
    assert_icmp_error_valid(&out, "after translation in from-overlay");

    // The same error from a router on the way: it keeps its source.
    let router = Ipv4Addr::new(10, 2, 0, 1);
    let err = icmp_error(router, A, &seen);
    let (v, out, _) = dp.run(programs::FROM_OVERLAY_PROBE, &err, 0, overlay);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(saddr(&out), router);
    assert_eq!(quoted(&out), ((A, 40001), (VIP, 80)));
    assert_icmp_error_valid(&out, "a router's error");

    // An error about a connection that is not to a service is left as it is.
    let direct = Packet::udp(A, 40002, B, 9999);
    dp.run(
        programs::FROM_ENDPOINT,
        &with_l4_checksum(direct.bytes()),
        A_IF,
        [0; 5],
    );
    let err = icmp_error(B, A, &direct);
    let (v, out, _) = dp.run(programs::FROM_ENDPOINT, &err, B_IF, [0; 5]);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(&out[ETH..], &err[ETH..], "untouched");
}

/// The other way: a client's ICMP error about a reply it got from the frontend (port
/// unreachable for a UDP reply to a closed socket) goes to the connection's backend, quoting
/// the backend, for a local and for a remote backend; so the backend's socket hears of it.
#[test]
fn a_clients_icmp_error_about_a_reply_goes_to_the_backend() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(UDP), &[(B, 1)]);
    let (v, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &udp(A, 40010, VIP, 80),
        A_IF,
        [0; 5],
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let (v, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &udp(B, 8080, A, 40010),
        B_IF,
        [0; 5],
    );
    assert_eq!(v, TC_ACT_REDIRECT);

    // A's kernel quotes the reply as it got it: VIP:80 -> A:40010.
    let seen = Packet::udp(VIP, 80, A, 40010);
    let err = icmp_error(A, VIP, &seen);
    let (v, out, _) = dp.run(programs::FROM_ENDPOINT, &err, A_IF, [0; 5]);
    assert_eq!(
        v, TC_ACT_REDIRECT,
        "not dropped as to an unknown destination"
    );
    assert_eq!(&out[0..6], &mac(3), "delivered to the backend");
    assert_eq!((saddr(&out), daddr(&out)), (A, B));
    assert_eq!(quoted(&out), ((B, 8080), (A, 40010)), "quotes the backend");
    assert_icmp_error_valid(&out, "after translation");

    // A remote backend: tunnelled to its node.
    set_backends(&mut dp, frontend(UDP), &[(R, 2)]);
    let (v, _, _) = dp.run(
        programs::FROM_ENDPOINT_PROBE,
        &udp(A, 40011, VIP, 80),
        A_IF,
        [0; 5],
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let seen = Packet::udp(VIP, 80, A, 40011);
    let err = icmp_error(A, VIP, &seen);
    let (v, out, cb) = dp.run(programs::FROM_ENDPOINT_PROBE, &err, A_IF, [0; 5]);
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        Ipv4Addr::from(cb[0]),
        NODE2,
        "tunnelled to the backend's node"
    );
    assert_eq!(daddr(&out), R);
    assert_eq!(quoted(&out), ((R, 8080), (A, 40011)));
    assert_icmp_error_valid(&out, "after translation to a remote backend");

    // About a port of the frontend no connection of A's used: nothing to translate.
    let seen = Packet::udp(VIP, 80, A, 49999);
    let err = icmp_error(A, VIP, &seen);
    let (v, _, _) = dp.run(programs::FROM_ENDPOINT, &err, A_IF, [0; 5]);
    assert_eq!(v, TC_ACT_SHOT);
}

#[test]
fn a_remote_backend_is_tunnelled_to_and_its_reply_reverse_natted_in_from_overlay() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[(R, 2)]);
    let syn = tcp(A, 40001, VIP, 80, 0x02);
    let (verdict, out, cb) = dp.run(programs::FROM_ENDPOINT_PROBE, &syn, A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        Ipv4Addr::from(cb[0]),
        NODE2,
        "tunnelled to the backend's node"
    );
    assert_eq!(cb[1], CLIENT, "VNI = client identity");
    assert_eq!((daddr(&out), dport(&out)), (R, 8080));
    assert_checksums_valid(&out, "after DNAT");

    // The reply comes back over the overlay from NODE2 with the backend's identity.
    let reply = tcp(R, 8080, A, 40001, 0x12);
    let (verdict, out, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &reply,
        0,
        [abi::ip_to_be(NODE2), REMOTE, 0, 0, 0],
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((saddr(&out), sport(&out)), (VIP, 80), "reverse NAT");
    assert_eq!((daddr(&out), dport(&out)), (A, 40001));
    assert_checksums_valid(&out, "after reverse NAT");

    // A direct connection to the backend's address is not translated, nor are its replies.
    let direct = tcp(A, 40002, R, 8080, 0x02);
    let (_, out, _) = dp.run(programs::FROM_ENDPOINT_PROBE, &direct, A_IF, [0; 5]);
    assert_eq!(out, direct);
    let reply = tcp(R, 8080, A, 40002, 0x12);
    let (_, out, _) = dp.run(
        programs::FROM_OVERLAY_PROBE,
        &reply,
        0,
        [abi::ip_to_be(NODE2), REMOTE, 0, 0, 0],
    );
    assert_eq!(&out[12..], &reply[12..], "only the MACs change");
}

#[test]
fn udp_is_balanced_and_a_zero_udp_checksum_stays_zero() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(UDP), &[(B, 1)]);
    let dgram = udp(A, 5353, VIP, 80);
    assert_checksums_valid(&dgram, "the built datagram");
    let (verdict, out, _) = dp.run(programs::FROM_ENDPOINT, &dgram, A_IF, [0; 5]);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((daddr(&out), dport(&out)), (B, 8080));
    assert_checksums_valid(&out, "UDP after DNAT");
    let reply = udp(B, 8080, A, 5353);
    let (_, out, _) = dp.run(programs::FROM_ENDPOINT, &reply, B_IF, [0; 5]);
    assert_eq!((saddr(&out), sport(&out)), (VIP, 80));
    assert_checksums_valid(&out, "UDP after reverse NAT");

    // No checksum (0) is legal for UDP over IPv4 and must not become a wrong one.
    let bare = Packet::udp(A, 5354, VIP, 80).bytes();
    let (_, out, _) = dp.run(programs::FROM_ENDPOINT, &bare, A_IF, [0; 5]);
    assert_eq!(daddr(&out), B);
    let off = l4_csum_off(&out);
    assert_eq!(&out[off..off + 2], &[0, 0]);
    assert_eq!(fold(sum16(&out[ETH..ETH + 20], 0)), 0xffff);
    // A TCP frontend on the same address and port is another frontend: UDP only here.
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 40000, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(verdict, TC_ACT_SHOT, "no TCP frontend: unknown destination");
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_UNKNOWN_DEST), 1);
}

#[test]
fn a_frontend_without_backends_refuses_new_connections() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[]);
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 40000, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(
        counter(&dp, Direction::Egress, abi::DROP_NO_SERVICE_BACKEND),
        1
    );
    let events = dp.maps.drain_drop_events();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].daddr, events[0].dport), (VIP, 80));
    assert_eq!(abi::reason_name(events[0].reason), "no-service-backend");

    // Deleting the frontend: the VIP is no destination at all any more.
    dp.maps.delete_service(frontend(TCP)).unwrap();
    assert!(dp.maps.services().unwrap().is_empty());
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 40000, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Direction::Egress, abi::DROP_UNKNOWN_DEST), 1);
}

#[test]
fn policy_is_decided_against_the_backend() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[(B, 1)]);
    // WEB admits CLIENT on 8080 only (the backend port, not the frontend's 80).
    dp.maps
        .set_policy_enabled(WEB, Direction::Ingress, true)
        .unwrap();
    let allow = |dport| PolicyEntry {
        subject: WEB,
        peer: Some(CLIENT),
        proto: Some(TCP),
        dport: Some(dport),
        direction: Direction::Ingress,
    };
    dp.maps
        .upsert_policy(allow(8080), Verdict::Allow, 1)
        .unwrap();
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 40000, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "allowed to the backend's port");

    dp.maps.delete_policy(allow(8080)).unwrap();
    dp.maps.upsert_policy(allow(80), Verdict::Allow, 2).unwrap();
    let (verdict, _, _) = dp.run(
        programs::FROM_ENDPOINT,
        &tcp(A, 40001, VIP, 80, 0x02),
        A_IF,
        [0; 5],
    );
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a rule for the frontend port admits nothing"
    );
    let events = dp.maps.drain_drop_events();
    let ev = events.last().expect("a drop event");
    assert_eq!(ev.reason, abi::DROP_POLICY);
    assert_eq!(
        ev.dst_identity, WEB,
        "decided against the backend's identity"
    );
    assert_eq!((ev.daddr, ev.dport), (B, 8080));
}

#[test]
fn maps_list_what_was_written() {
    let Some(mut dp) = setup() else { return };
    set_backends(&mut dp, frontend(TCP), &[(B, 1), (R, 2)]);
    assert_eq!(dp.maps.services().unwrap(), [(frontend(TCP), 2, 0)]);
    let mut backends = dp.maps.backends().unwrap();
    backends.sort();
    assert_eq!(
        backends,
        [
            (
                frontend(TCP),
                0,
                LbBackend {
                    addr: B,
                    port: 8080,
                    cluster_id: 1
                }
            ),
            (
                frontend(TCP),
                1,
                LbBackend {
                    addr: R,
                    port: 8080,
                    cluster_id: 2
                }
            ),
        ]
    );
    dp.maps.delete_backend(frontend(TCP), 1).unwrap();
    dp.maps.delete_backend(frontend(TCP), 1).unwrap();
    assert_eq!(dp.maps.backends().unwrap().len(), 1);
    assert!(dp
        .maps
        .upsert_service(
            LbFrontend {
                proto: ICMP,
                ..frontend(TCP)
            },
            1,
            0
        )
        .is_err());
}
