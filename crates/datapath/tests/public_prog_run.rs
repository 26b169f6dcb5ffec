//! Public endpoints under BPF_PROG_RUN (issue 14): connections from outside the mesh to a
//! NodePort on the node's IP or to an external IP, load-balanced by from_netdev on the uplink;
//! the replies' translation back (from_endpoint for a backend on this node, from_netdev for one
//! on another node, SNATed), checksums included; externalTrafficPolicy Local.
//!
//! Each test runs on a thread inside a namespace of its own (`common::world`): endpoint B is
//! the local backend, X the client outside, R a backend behind another node (native routing,
//! so the forwarding decision is visible in the frame; the tunnel is covered by
//! `public_netns`).

mod common;

use std::net::Ipv4Addr;

use common::{frames::*, world::*, *};
use meshd_datapath::{Direction, LbBackend, LbFrontend};
use meshd_ebpf::abi;

const NAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=61007;
const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 8080;
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);

fn setup() -> Option<World> {
    native_world(NAT_PORTS)
}

fn node_port(proto: u8) -> LbFrontend {
    LbFrontend {
        addr: NODE,
        port: NODE_PORT,
        proto,
    }
}

/// Points `frontend` at `backends`, with `flags`.
fn expose(w: &mut World, frontend: LbFrontend, backends: &[Ipv4Addr], flags: u32) {
    for (slot, addr) in backends.iter().enumerate() {
        w.dp.maps
            .upsert_backend(
                frontend,
                slot as u32,
                LbBackend {
                    addr: *addr,
                    port: BACKEND_PORT,
                    cluster_id: if *addr == R { 2 } else { 1 },
                },
            )
            .unwrap();
    }
    w.dp.maps
        .upsert_service(frontend, backends.len() as u32, flags)
        .unwrap();
}

#[test]
fn a_node_port_to_a_local_backend_keeps_the_client_and_the_reply_leaves_from_the_node_port() {
    let Some(mut w) = setup() else { return };
    expose(&mut w, node_port(TCP), &[B], abi::SERVICE_F_NODE_PORT);

    let syn = tcp(X, 50000, NODE, NODE_PORT, 0x02);
    let (verdict, out) = w.uplink(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to the backend");
    assert_eq!((daddr(&out), dport(&out)), (B, BACKEND_PORT), "DNATed");
    assert_eq!(
        (saddr(&out), sport(&out)),
        (X, 50000),
        "the client's own address"
    );
    assert_eq!(&out[0..6], &B_MAC);
    assert_checksums_valid(&out, "DNATed SYN");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 1);

    // The backend's SYN-ACK leaves by from_endpoint with the frontend as its source, routed to
    // the client, not masqueraded.
    let (verdict, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out by the program");
    assert_eq!(
        (saddr(&back), sport(&back)),
        (NODE, NODE_PORT),
        "reverse DNAT"
    );
    assert_eq!((daddr(&back), dport(&back)), (X, 50000));
    assert_eq!(&back[0..6], &GATEWAY_MAC);
    assert_checksums_valid(&back, "reverse-DNATed SYN-ACK");
    assert!(w.dp.maps.nat_mappings().unwrap().is_empty(), "no SNAT");

    // The client's next packet follows the connection.
    let (_, ack) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x10));
    assert_eq!((daddr(&ack), dport(&ack)), (B, BACKEND_PORT));
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_LOCAL), 2);
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

#[test]
fn a_node_port_to_a_remote_backend_is_snated_and_its_replies_are_translated_twice() {
    let Some(mut w) = setup() else { return };
    expose(&mut w, node_port(TCP), &[R], abi::SERVICE_F_NODE_PORT);

    let (verdict, out) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed to the backend's node");
    assert_eq!((daddr(&out), dport(&out)), (R, BACKEND_PORT), "DNATed");
    assert_eq!(
        saddr(&out),
        NODE,
        "SNATed to the node, so the replies come back"
    );
    let nat_port = sport(&out);
    assert!(
        NAT_PORTS.contains(&nat_port),
        "a port of the range: {nat_port}"
    );
    assert_eq!(&out[0..6], &NODE2_MAC, "to the backend's node");
    assert_checksums_valid(&out, "DNATed and SNATed SYN");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_NATIVE), 1);

    // A second client port: its own NAT port.
    let (_, other) = w.uplink(&tcp(X, 50001, NODE, NODE_PORT, 0x02));
    assert_ne!(sport(&other), nat_port, "two connections, two ports");

    // The backend's SYN-ACK arrives on the uplink addressed to the node.
    let (verdict, back) = w.uplink(&tcp(R, BACKEND_PORT, NODE, nat_port, 0x12));
    assert_eq!(verdict, TC_ACT_REDIRECT, "routed out to the client");
    assert_eq!(
        (saddr(&back), sport(&back)),
        (NODE, NODE_PORT),
        "the frontend"
    );
    assert_eq!((daddr(&back), dport(&back)), (X, 50000), "the client");
    assert_eq!(&back[0..6], &GATEWAY_MAC);
    assert_checksums_valid(&back, "reply translated back");
    assert_eq!(w.counter(Direction::Ingress, abi::FWD_WORLD), 1);

    // Established: the same backend and NAT port.
    let (_, ack) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x10));
    assert_eq!((saddr(&ack), sport(&ack)), (NODE, nat_port));
    assert_eq!(daddr(&ack), R);
    assert!(w.dp.maps.drain_drop_events().is_empty());
}

#[test]
fn an_icmp_error_from_a_remote_backend_reaches_the_client_about_the_frontend() {
    let Some(mut w) = setup() else { return };
    expose(&mut w, node_port(UDP), &[R], abi::SERVICE_F_NODE_PORT);
    let (_, out) = w.uplink(&udp(X, 5353, NODE, NODE_PORT));
    let nat_port = sport(&out);
    // The backend answers "port unreachable" about the datagram as it received it.
    let mut seen = Packet::udp(NODE, nat_port, R, BACKEND_PORT);
    seen.saddr = NODE;
    let (verdict, back) = w.uplink(&icmp_error(R, NODE, &seen));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(daddr(&back), X);
    assert_eq!(saddr(&back), NODE, "from the frontend, not the backend");
    assert_eq!(
        quoted(&back),
        ((X, 5353), (NODE, NODE_PORT)),
        "the datagram as the client sent it"
    );
    assert_icmp_error_valid(&back, "translated port unreachable");
}

#[test]
fn an_external_ip_is_balanced_like_a_node_port_and_a_vip_from_outside_is_not() {
    let Some(mut w) = setup() else { return };
    let ext = LbFrontend {
        addr: EXTERNAL_IP,
        port: 80,
        proto: TCP,
    };
    expose(&mut w, ext, &[B], abi::SERVICE_F_EXTERNAL_IP);
    let (verdict, out) = w.uplink(&tcp(X, 50000, EXTERNAL_IP, 80, 0x02));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((daddr(&out), dport(&out)), (B, BACKEND_PORT));
    let (_, back) = w.egress(&tcp(B, BACKEND_PORT, X, 50000, 0x12), w.b_if);
    assert_eq!((saddr(&back), sport(&back)), (EXTERNAL_IP, 80));
    assert_checksums_valid(&back, "reply from the external IP");

    // A VIP is the mesh's own: a packet from outside to it is the node's business.
    let vip = LbFrontend {
        addr: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        proto: TCP,
    };
    expose(&mut w, vip, &[B], 0);
    let to_vip = tcp(X, 50001, vip.addr, 80, 0x02);
    let (verdict, out) = w.uplink(&to_vip);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, to_vip, "untouched");
}

#[test]
fn local_policy_without_a_local_backend_drops_new_connections_with_its_own_reason() {
    let Some(mut w) = setup() else { return };
    let flags = abi::SERVICE_F_NODE_PORT | abi::SERVICE_F_LOCAL;
    expose(&mut w, node_port(TCP), &[], flags);
    let (verdict, _) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Ingress, abi::DROP_NO_LOCAL_BACKEND), 1);
    assert_eq!(
        w.counter(Direction::Ingress, abi::DROP_NO_SERVICE_BACKEND),
        0
    );
    let events = w.dp.maps.drain_drop_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(abi::reason_name(events[0].reason), "no-local-backend");

    // With a local backend, the client's address is kept.
    expose(&mut w, node_port(TCP), &[B], flags);
    let (verdict, out) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((saddr(&out), daddr(&out)), (X, B));
}

#[test]
fn established_connections_keep_their_backend_and_new_ones_avoid_a_deleted_one() {
    let Some(mut w) = setup() else { return };
    expose(&mut w, node_port(TCP), &[B, R], abi::SERVICE_F_NODE_PORT);
    // Find one client port that went to B and one that went to R.
    let mut picks = std::collections::BTreeMap::new();
    for port in 50000..50064 {
        let (_, out) = w.uplink(&tcp(X, port, NODE, NODE_PORT, 0x02));
        picks.entry(daddr(&out)).or_insert(port);
    }
    assert_eq!(
        picks.len(),
        2,
        "both backends picked in 64 tries: {picks:?}"
    );
    for (backend, port) in &picks {
        for _ in 0..8 {
            let (_, out) = w.uplink(&tcp(X, *port, NODE, NODE_PORT, 0x10));
            assert_eq!(
                daddr(&out),
                *backend,
                "client port {port} follows its choice"
            );
        }
    }
    // R leaves (the agent lowers the count, then deletes the slot): new connections go to B.
    w.dp.maps
        .upsert_service(node_port(TCP), 1, abi::SERVICE_F_NODE_PORT)
        .unwrap();
    w.dp.maps.delete_backend(node_port(TCP), 1).unwrap();
    for port in 51000..51016 {
        let (_, out) = w.uplink(&tcp(X, port, NODE, NODE_PORT, 0x02));
        assert_eq!(daddr(&out), B, "new connection {port}");
    }
}

#[test]
fn a_policy_without_world_keeps_outside_clients_from_a_local_backend() {
    let Some(mut w) = setup() else { return };
    expose(&mut w, node_port(TCP), &[B], abi::SERVICE_F_NODE_PORT);
    // WEB admits CLIENT only.
    w.dp.maps
        .set_policy_enabled(WEB, Direction::Ingress, true)
        .unwrap();
    allow_ingress_from(&mut w.dp.maps, WEB, CLIENT);
    w.dp.maps.bump_policy_revision().unwrap();
    let (verdict, _) = w.uplink(&tcp(X, 50000, NODE, NODE_PORT, 0x02));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(w.counter(Direction::Ingress, abi::DROP_POLICY), 1);
    let events = w.dp.maps.drain_drop_events();
    assert_eq!(events[0].src_identity, abi::IDENTITY_WORLD, "{events:?}");
}
