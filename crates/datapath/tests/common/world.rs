//! A datapath inside a namespace of its own, for the BPF_PROG_RUN tests of the paths that leave
//! the mesh (masquerade, world and host, the mutation trials).
//!
//! from_endpoint routes world-bound packets with bpf_fib_lookup, which answers from the FIB of
//! the namespace running the program and wants the packet's input device there. So the calling
//! thread enters its own namespace holding veths standing for endpoints' host sides (their
//! ifindex is the packets' ingress) and for the uplink (with the node IP, a default route via a
//! gateway and a permanent neighbour entry for it). This kernel has no dummy interfaces.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;

use meshd_datapath::{plumbing, Direction, EgressConfig, LocalEndpoint, NodeConfig};
use meshd_ebpf::programs;
use meshd_testing::netns::Netns;

use super::{can_run, TestDatapath};

pub const CLUSTER1: u32 = 1 << 16;
pub const CLIENT: u32 = CLUSTER1 | 1001;
pub const WEB: u32 = CLUSTER1 | 1000;
pub const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
pub const A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
pub const A_GW_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0xfe];
pub const B_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x03];
pub const B_GW_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0xfe];
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x47, 0x57, 0, 0, 0xfe];
/// An external host (documentation range), reached by the default route.
pub const X: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

pub struct World {
    pub dp: TestDatapath,
    pub a_if: u32,
    pub b_if: u32,
    pub up_if: u32,
    pub up_mac: [u8; 6],
    // Last: the namespace outlives nothing that refers to it.
    _ns: Netns,
}

/// A datapath with endpoints A (CLIENT) and B (WEB) and masquerade on `nat_ports`, this
/// thread inside a namespace wired as the module doc says. `None` where datapath tests cannot
/// run (see [`can_run`]).
pub fn world(nat_ports: RangeInclusive<u16>) -> Option<World> {
    world_named("mq", nat_ports)
}

/// [`world`] in a namespace named after `name` (a test binary's own prefix).
pub fn world_named(name: &str, nat_ports: RangeInclusive<u16>) -> Option<World> {
    if !can_run() {
        return None;
    }
    let ns = Netns::new(name).expect("netns");
    for args in [
        &[
            "link",
            "add",
            "mq_a",
            "type",
            "veth",
            "peer",
            "name",
            "mq_a_peer",
        ][..],
        &[
            "link",
            "add",
            "mq_b",
            "type",
            "veth",
            "peer",
            "name",
            "mq_b_peer",
        ],
        &[
            "link",
            "add",
            "mq_up",
            "type",
            "veth",
            "peer",
            "name",
            "mq_up_peer",
        ],
        &["link", "set", "mq_a", "up"],
        &["link", "set", "mq_b", "up"],
        &["link", "set", "mq_a_peer", "up"],
        &["link", "set", "mq_b_peer", "up"],
        &["link", "set", "mq_up_peer", "up"],
        &["addr", "add", "192.0.2.1/24", "dev", "mq_up"],
        &["link", "set", "mq_up", "up"],
        &[
            "neigh",
            "replace",
            "192.0.2.254",
            "lladdr",
            "02:47:57:00:00:fe",
            "dev",
            "mq_up",
            "nud",
            "permanent",
        ],
        &["route", "add", "default", "via", "192.0.2.254"],
        &["route", "add", "blackhole", "203.0.113.0/24"],
    ] {
        ns.ip(args).expect("ip");
    }
    for dev in ["mq_a", "mq_b"] {
        plumbing::enable_forwarding(Some(ns.name()), dev).expect("forwarding");
    }
    let info = |dev| plumbing::link_info(Some(ns.name()), dev).expect("link info");
    let (a_if, b_if, up) = (info("mq_a").ifindex, info("mq_b").ifindex, info("mq_up"));
    // BPF_PROG_RUN and bpf_fib_lookup use the namespace of the calling thread.
    let file = std::fs::File::open(ns.path()).expect("open netns");
    // SAFETY: a valid namespace fd; CLONE_NEWNET changes only this (test) thread.
    assert_eq!(
        unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns"
    );

    let mut dp = TestDatapath::new();
    let m = &mut dp.maps;
    m.set_config(NodeConfig {
        vxlan_ifindex: 0,
        node_ip: NODE,
        cluster_id: 1,
    })
    .unwrap();
    m.set_egress(&EgressConfig {
        masquerade: true,
        nat_ports,
    })
    .unwrap();
    for (ip, ifindex, identity, mac, node_mac) in [
        (A, a_if, CLIENT, A_MAC, A_GW_MAC),
        (B, b_if, WEB, B_MAC, B_GW_MAC),
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
    Some(World {
        dp,
        a_if,
        b_if,
        up_if: up.ifindex,
        up_mac: up.mac,
        _ns: ns,
    })
}

impl World {
    pub fn run(&self, program: &'static str, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.dp.run(program, frame, ifindex, [0; 5]);
        (verdict, out)
    }

    pub fn egress(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.run(programs::FROM_ENDPOINT, frame, ifindex)
    }

    pub fn uplink(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(programs::FROM_NETDEV, frame, self.up_if)
    }

    /// A permanent neighbour entry on the uplink: `ip` is at `mac` (`aa:bb:...`).
    #[allow(dead_code)] // not every test binary adds any
    pub fn uplink_neighbour(&self, ip: Ipv4Addr, mac: &str) {
        self.ip(&[
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            mac,
            "dev",
            "mq_up",
            "nud",
            "permanent",
        ]);
    }

    /// `ip ARGS` in the world's namespace (routes and neighbours a test adds).
    #[allow(dead_code)] // not every test binary adds any
    pub fn ip(&self, args: &[&str]) {
        self._ns.ip(args).expect("ip");
    }

    pub fn counter(&self, direction: Direction, reason: i32) -> u64 {
        self.dp.maps.counter(direction, reason).unwrap()
    }
}

/// A backend behind NODE2, in [`native_world`] (`10.2.0.0/24 via NODE2`).
pub const R: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 5);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const NODE2_MAC: [u8; 6] = [0x02, 0x47, 0x57, 0, 0, 0x02];
pub const REMOTE_ID: u32 = (2 << 16) | 1000;

/// [`world`] in native routing mode, with another node NODE2 on the uplink's segment (a
/// permanent neighbour) routing cluster 2's 10.2.0.0/24, as the agent has them: the forwarding
/// decision to a remote backend is visible in the frame (its MAC).
pub fn native_world(nat_ports: RangeInclusive<u16>) -> Option<World> {
    let mut w = world(nat_ports)?;
    w.dp.maps.set_native_routing(true).unwrap();
    w.ip(&[
        "neigh",
        "replace",
        &NODE2.to_string(),
        "lladdr",
        "02:47:57:00:00:02",
        "dev",
        "mq_up",
        "nud",
        "permanent",
    ]);
    w.ip(&["route", "add", "10.2.0.0/24", "via", &NODE2.to_string()]);
    super::add_remote_prefix(&mut w.dp.maps, "10.2.0.0/24", REMOTE_ID, NODE2, 2);
    Some(w)
}
