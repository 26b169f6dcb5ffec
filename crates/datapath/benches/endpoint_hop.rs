//! What one veth hop on an endpoint's egress costs: the kernel's routed path between two
//! endpoints on two nodes (as `datapath_net --native 1` builds its baseline), against the same
//! path with one extra veth hop on each endpoint's way out. Measured alternately in one run.
//!
//! Why: a netkit device pair (kernel >= 6.7, `CONFIG_NETKIT`) runs the endpoint's egress
//! program inside the endpoint's own transmit, so a packet leaving an endpoint skips the
//! veth backlog queue hop (`veth_xmit` -> `enqueue_to_backlog` -> softirq ->
//! `__netif_receive_skb_core` -> tc ingress) that meshd's veth endpoints take before
//! from_endpoint runs. That hop is the only kernel work netkit removes from meshd's path
//! (delivery into an endpoint already uses `bpf_redirect_peer`). Where netkit cannot be
//! created (the check below says so), adding the hop measures its cost from the other side:
//! the hop path is the plain path plus, in each node, IPv4 arriving on the endpoint's host veth
//! redirected (tc u32 + mirred) out of a veth pair `hx0` -> `hx1` whose `hx1` (same MAC as the
//! host veth) hands it to the node's forwarding. That adds the hop plus a classifier and an
//! action, so the difference is an upper estimate of what netkit would save.
//!
//! `cargo bench -p meshd-datapath --bench endpoint_hop -- [--runs N] [--seconds S] [--rr N]`
//! (needs root, iperf3, and `tc` with the u32 classifier and the mirred action).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;

use anyhow::Context;
use common::bench::{
    iperf3_gbps, load_average, median, plain_endpoint_mtu, spread, tcp_args, tcp_rr,
    two_routing_nodes, NODE_IPS,
};
use meshd_testing::netns::{ChildGuard, Netns, Underlay};

/// Namespace prefix (the test helpers add the process id and a counter).
const PREFIX: &str = "nkh";

/// Two nodes, each with a plain endpoint (10.<node+1>.0.2 behind `veth0`) and a hop endpoint
/// (10.<node+3>.0.2 behind `veth1`, egress through the extra hop).
struct Nodes {
    // Field order = drop order: endpoints, then nodes and bridge.
    plain: Vec<Netns>,
    hop: Vec<Netns>,
    underlay: Underlay,
}

impl Nodes {
    fn new() -> anyhow::Result<Nodes> {
        let underlay = two_routing_nodes(PREFIX)?;
        let (mut plain, mut hop) = (Vec::new(), Vec::new());
        for i in 0..2usize {
            let node = underlay.node(i);
            let other = NODE_IPS[1 - i].to_string();
            for (list, subnet, host_if) in
                [(&mut plain, i + 1, "veth0"), (&mut hop, i + 3, "veth1")]
            {
                let other_subnet = if subnet % 2 == 1 {
                    subnet + 1
                } else {
                    subnet - 1
                };
                node.ip(&[
                    "route",
                    "add",
                    &format!("10.{other_subnet}.0.0/24"),
                    "via",
                    &other,
                ])?;
                list.push(plain_endpoint_mtu(
                    node,
                    &format!("{PREFIX}-e{subnet}"),
                    host_if,
                    format!("10.{subnet}.0.1/24").parse()?,
                    format!("10.{subnet}.0.2/24").parse()?,
                    1500,
                )?);
            }
            add_hop(node, "veth1")?;
        }
        Ok(Nodes {
            plain,
            hop,
            underlay,
        })
    }
}

/// Sends IPv4 arriving on `host_if` (from its endpoint) through one more veth hop before the
/// node's forwarding sees it (see the module header).
fn add_hop(node: &Netns, host_if: &str) -> anyhow::Result<()> {
    let out = node.ip(&["-j", "link", "show", "dev", host_if])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    let mac = v[0]["address"]
        .as_str()
        .context("no MAC address")?
        .to_owned();
    node.ip(&[
        "link", "add", "hx0", "mtu", "1500", "type", "veth", "peer", "name", "hx1",
    ])?;
    node.ip(&["link", "set", "hx1", "mtu", "1500", "address", &mac])?;
    // hx1 receives packets whose source routes back through `host_if`: no reverse-path check.
    for conf in ["all", "default", "hx1"] {
        node.run(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{conf}.rp_filter=0")],
        )?;
    }
    node.ip(&["link", "set", "hx0", "up"])?;
    node.ip(&["link", "set", "hx1", "up"])?;
    node.run("tc", &["qdisc", "add", "dev", host_if, "clsact"])?;
    node.run(
        "tc",
        &[
            "filter", "add", "dev", host_if, "ingress", "protocol", "ip", "u32", "match", "u32",
            "0", "0", "action", "mirred", "egress", "redirect", "dev", "hx0",
        ],
    )
    .context("tc u32 + mirred (kernel needs CONFIG_NET_CLS_U32 and CONFIG_NET_ACT_MIRRED)")?;
    Ok(())
}

/// Packets received by `hx1` of every node: proof the hop path took the hop.
fn hop_packets(nodes: &Nodes) -> anyhow::Result<Vec<u64>> {
    (0..2)
        .map(|i| {
            let out = nodes
                .underlay
                .node(i)
                .ip(&["-s", "-j", "link", "show", "dev", "hx1"])?;
            let v: serde_json::Value = serde_json::from_str(&out).context("ip -s -j link")?;
            v[0]["stats64"]["rx"]["packets"]
                .as_u64()
                .context("no rx packet count")
        })
        .collect()
}

/// Whether this kernel can create a netkit pair, and if not what it says.
fn netkit_support(ns: &Netns) -> String {
    match ns.ip(&["link", "add", "nkprobe", "type", "netkit"]) {
        Ok(_) => {
            let _ = ns.ip(&["link", "del", "nkprobe"]);
            "netkit available on this kernel".into()
        }
        Err(e) => format!("netkit not available here ({})", format!("{e:#}").trim()),
    }
}

fn main() -> anyhow::Result<()> {
    let Some(args) = tcp_args() else {
        return Ok(());
    };
    let (runs, seconds, rr_transactions) = (args.runs, args.seconds, args.rr_transactions);
    let nodes = Nodes::new()?;
    println!("{}", netkit_support(nodes.underlay.node(0)));
    let paths: [(&str, &Netns, &Netns, Ipv4Addr); 2] = [
        (
            "plain",
            &nodes.plain[0],
            &nodes.plain[1],
            Ipv4Addr::new(10, 2, 0, 2),
        ),
        (
            "hop",
            &nodes.hop[0],
            &nodes.hop[1],
            Ipv4Addr::new(10, 4, 0, 2),
        ),
    ];
    let _servers: Vec<ChildGuard> = paths
        .iter()
        .map(|(_, _, server, _)| server.spawn("iperf3", &["-s", "-p", "5201"]))
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    println!(
        "kernel routed path, endpoint -> endpoint across two nodes (MTU 1500), without and with one extra veth hop per endpoint egress, {runs} alternating runs; load average {}",
        load_average()
    );
    // Each run measures both paths, the first one alternating, so a load drift hits both alike.
    let order = |run: u32| if run % 2 == 0 { [0, 1] } else { [1, 0] };
    for streams in [1u32, 4] {
        let mut results = [Vec::new(), Vec::new()];
        for run in 0..runs {
            for i in order(run) {
                let (_, client, _, ip) = paths[i];
                results[i].push(iperf3_gbps(client, ip, 5201, streams, seconds)?);
            }
        }
        let spreads = [spread(&results[0]), spread(&results[1])];
        let [p, h] = results.map(median);
        println!(
            "TCP throughput, {streams} stream(s): plain {p:.2} Gbit/s [{}], with the hop {h:.2} Gbit/s [{}] (median of {runs} x {seconds}s)",
            spreads[0], spreads[1]
        );
        println!(
            "RESULT endpoint-hop-tcp-{streams}stream plain_gbps={p:.2} hop_gbps={h:.2} plain/hop={:.3}x",
            p / h
        );
    }
    let mut results = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for i in order(run) {
            let (_, client, server, ip) = paths[i];
            let port = 6000 + (2 * run + i as u32) as u16;
            results[i].push(tcp_rr(client, server, ip, port, rr_transactions)?);
        }
    }
    let spreads = [spread(&results[0]), spread(&results[1])];
    let [p, h] = results.map(median);
    println!(
        "TCP_RR ({rr_transactions} x 1 byte): plain {p:.1} µs [{}], with the hop {h:.1} µs [{}] per transaction (median of {runs})",
        spreads[0], spreads[1]
    );
    println!("load average at the end: {}", load_average());
    let through_hop = hop_packets(&nodes)?;
    anyhow::ensure!(
        through_hop.iter().all(|&n| n > u64::from(rr_transactions)),
        "the hop path did not take the hop: hx1 received {through_hop:?} packets"
    );
    println!(
        "RESULT endpoint-hop-tcp-rr plain_us={p:.1} hop_us={h:.1} plain/hop={:.3}x",
        p / h
    );
    Ok(())
}
