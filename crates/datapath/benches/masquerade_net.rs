//! Masqueraded endpoint -> external host (issue 12): the meshd eBPF datapath (from-endpoint
//! routes and masquerades to the node IP, from-netdev translates the replies back) against
//! nftables MASQUERADE on a plain node (endpoint veth, IP forwarding, no eBPF), built side by
//! side on one underlay behind one router, to one external host, in the same run.
//!
//! - TCP throughput: iperf3 to the external host, 1 and 4 streams, runs alternating;
//! - new connections per second: `--threads` loops per client of connect, 1-byte request and
//!   answer, close (the client closes first, so TIME_WAIT stays in the client's namespace),
//!   both clients at once so load drift on a shared machine hits both alike; each path to its
//!   own server (worker threads accepting on one listener), on fresh ports each run (a fresh
//!   set of 4-tuples).
//!
//! The meshd node's SNAT range is 1024-32767 (outside the endpoints' ephemeral range, as the
//! agent requires), so a run's connections, whose mappings live 10 s after they close, never
//! exhaust it; a `nat-no-port` drop fails the bench.
//!
//! `cargo bench -p meshd-datapath --bench masquerade_net -- [--runs N] [--seconds S]
//! [--connections PER_THREAD] [--threads T]` (root, bpffs, iperf3, nft).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use common::bench::{
    arg, load_average, plain_endpoint, spawn_byte_server, Comparison, Iperf3Pair, Iperf3Path,
};
use common::topology::Topology;
use ipnet::Ipv4Net;
use meshd_datapath::netns::run_in;
use meshd_datapath::{plumbing, Direction, EgressConfig};
use meshd_testing::netns::Netns;

const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 254);
const BASELINE_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 100);
const BASELINE_EP_NET: &str = "10.9.0.0/24";
const BASELINE_EP_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

/// The plain node: its endpoint behind a veth (MTU 1450, as meshd's endpoints), the node
/// forwarding with a default route via the router, and nftables masquerading the endpoint's
/// subnet out of the uplink.
fn baseline_endpoint(node: &Netns) -> anyhow::Result<Netns> {
    let ep = plain_endpoint(
        node,
        "bmq-be",
        "lxcb",
        "10.9.0.1/24".parse()?,
        Ipv4Net::new(BASELINE_EP_IP, 24)?,
    )?;
    node.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    for rule in [
        "add table ip bmq",
        "add chain ip bmq post { type nat hook postrouting priority srcnat; }",
        &format!("add rule ip bmq post ip saddr {BASELINE_EP_NET} oifname \"ul0\" masquerade"),
    ] {
        let args: Vec<&str> = rule.split(' ').collect();
        node.run("nft", &args)
            .with_context(|| format!("nft {rule}"))?;
    }
    Ok(ep)
}

fn main() -> anyhow::Result<()> {
    if !common::can_run()
        || !meshd_testing::require("iperf3", meshd_testing::have_binary("iperf3"))
        || !meshd_testing::require("nft", meshd_testing::have_binary("nft"))
    {
        return Ok(());
    }
    let runs = arg("--runs", 7);
    let seconds = arg("--seconds", 4);
    let per_thread = arg("--connections", 500);
    let threads = arg("--threads", 2);

    // The meshd node (192.168.60.1, endpoint 10.1.0.2) with masquerade on, from-netdev on its
    // uplink; the plain node beside it; the router and the external host behind them.
    let mut meshd = Topology::new("bmq", &[1], 1)?;
    let outside = meshd.underlay.add_external("bmq", ROUTER_IP, 1500)?;
    let ext_ip = outside.host_ip;
    let node_ns = meshd.underlay.node(meshd.nodes[0].index).name().to_owned();
    let base_index = meshd.underlay.add_node("bmq-bn", BASELINE_NODE_IP)?;
    for index in [meshd.nodes[0].index, base_index] {
        meshd.underlay.node(index).ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_IP.to_string(),
        ])?;
    }
    {
        let node = &mut meshd.nodes[0];
        plumbing::enable_forwarding(Some(&node_ns), &node.endpoints[0].host_ifname)?;
        node.maps.set_egress(&EgressConfig {
            masquerade: true,
            nat_ports: 1024..=32767,
        })?;
        node.maps
            .set_no_masquerade(&[Ipv4Net::new(Ipv4Addr::new(10, 1, 0, 0), 24)?])?;
        let datapath = node.datapath.as_mut().context("datapath")?;
        run_in(&meshd.underlay.node(node.index).path(), || {
            datapath.attach_netdev(meshd_testing::netns::UNDERLAY_IFNAME)
        })?;
    }
    let base_ep = baseline_endpoint(meshd.underlay.node(base_index))?;
    let clients: [(&str, &Netns); 2] = [
        ("meshd eBPF masquerade", &meshd.ep(0, 0).netns),
        ("nftables MASQUERADE", &base_ep),
    ];

    // A server per path (ports 5201 and 5202). Both paths work, which takes masquerade: the
    // router has no route to either endpoint subnet, only to the node IPs.
    let mut iperf = Iperf3Pair::start([0, 1].map(|i| Iperf3Path {
        name: clients[i].0,
        server: &outside.host,
        client: clients[i].1,
        to: ext_ip,
        port: 5201 + i as u16,
    }))?;
    iperf.check()?;
    anyhow::ensure!(
        !meshd.nodes[0].maps.nat_mappings()?.is_empty(),
        "meshd's transfer went without a NAT mapping"
    );

    println!(
        "endpoint (MTU 1450) -> node -> router -> external host, veth/bridge underlay MTU 1500, {runs} runs each; load average {}",
        load_average()
    );
    let comparison = Comparison {
        label: "masquerade",
        path: "to the external host",
        note: "goal>=1.0x (issue 12)",
        baseline: "nftables",
        runs,
    };
    comparison.throughput(seconds, |i, streams| iperf.sample(i, streams, seconds))?;
    iperf.finish();

    comparison.connection_rate(threads, per_thread, |run| {
        // A server per path, so neither waits for the other's; fresh ports each run.
        let to = |i: u16| SocketAddr::from((ext_ip, 7000 + 2 * run as u16 + i));
        for i in 0..2 {
            spawn_byte_server(&outside.host.path(), to(i), 4 * threads)?;
        }
        Ok([(clients[0].1.path(), to(0)), (clients[1].1.path(), to(1))])
    })?;
    println!("load average at the end: {}", load_average());

    let maps = &meshd.nodes[0].maps;
    for c in maps.counters()? {
        anyhow::ensure!(c.reason > 0, "the meshd node dropped packets: {c:?}");
    }
    anyhow::ensure!(
        maps.counter(Direction::Egress, meshd_ebpf::abi::DROP_NAT_NO_PORT)? == 0,
        "SNAT ports ran out"
    );
    Ok(())
}
