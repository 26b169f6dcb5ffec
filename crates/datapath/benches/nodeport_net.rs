//! External client -> NodePort -> backend on another node (issue 14): meshd's eBPF datapath
//! (from-netdev load-balances, DNATs and SNATs on the receiving node and routes natively to the
//! backend's node; the replies come back through it and are translated back) against what
//! kube-proxy does, nftables DNAT and MASQUERADE on a plain receiving node routing to a plain
//! backend node. Both pairs of nodes stand side by side on one underlay behind one router, and
//! the client is the same external host, in the same run. Native routing on the meshd side, so
//! neither path encapsulates (the backend endpoints have MTU 1500 on both).
//!
//! - TCP throughput: iperf3 from the external host through the node port, 1 and 4 streams,
//!   runs alternating;
//! - new connections per second: `--threads` loops of connect, 1-byte request and answer,
//!   close, to both node ports at once (load drift hits both alike), each path to its own
//!   server on fresh ports each run.
//!
//! `cargo bench -p meshd-datapath --bench nodeport_net -- [--runs N] [--seconds S]
//! [--connections PER_THREAD] [--threads T]` (root, bpffs, iperf3, nft).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use common::bench::{
    arg, load_average, plain_endpoint_mtu, spawn_byte_server, Comparison, Iperf3Pair, Iperf3Path,
};
use common::public::{expose_node_port, with_outside, ROUTER};
use ipnet::Ipv4Net;
use meshd_datapath::Direction;
use meshd_ebpf::abi;
use meshd_testing::netns::Netns;

/// The plain receiving node and the plain backend node beside the meshd ones.
const KP_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 100);
const KP_BACKEND_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 101);
const KP_EP_NET: &str = "10.9.0.0/24";
const KP_EP_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
const TCP: u8 = 6;
/// iperf3's node ports (meshd, nftables); a backend listens on the same port number.
const IPERF_PORTS: [u16; 2] = [30201, 30202];
/// Connection-rate node ports: run r uses CONN_PORT_BASE + 2r + path.
const CONN_PORT_BASE: u16 = 31000;

/// kube-proxy's NodePort path in nftables terms: the receiving node DNATs its node ports to the
/// backend (the port kept) and masquerades what it forwards to it, so replies come back; its
/// route to the backend's subnet goes via the backend's node. The backend node is a plain
/// router with the endpoint (MTU 1500) behind a veth.
fn kube_proxy_nodes(receiving: &Netns, backend_node: &Netns) -> anyhow::Result<Netns> {
    let ep = plain_endpoint_mtu(
        backend_node,
        "exb-kpe",
        "lxck",
        "10.9.0.1/24".parse()?,
        Ipv4Net::new(KP_EP_IP, 24)?,
        1500,
    )?;
    backend_node.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    receiving.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    receiving.ip(&["route", "add", "default", "via", &ROUTER.to_string()])?;
    receiving.ip(&[
        "route",
        "add",
        KP_EP_NET,
        "via",
        &KP_BACKEND_NODE_IP.to_string(),
    ])?;
    for rule in [
        "add table ip exkp",
        "add chain ip exkp pre { type nat hook prerouting priority dstnat; }",
        &format!(
            "add rule ip exkp pre ip daddr {KP_NODE_IP} tcp dport 30000-32767 dnat to {KP_EP_IP}"
        ),
        "add chain ip exkp post { type nat hook postrouting priority srcnat; }",
        &format!("add rule ip exkp post ip daddr {KP_EP_IP} ct status dnat masquerade"),
    ] {
        let args: Vec<&str> = rule.split(' ').collect();
        receiving
            .run("nft", &args)
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

    // meshd: node 0 (192.168.60.1) receives, its backend 10.2.0.2 is behind node 1; a SNAT
    // range of 1024-32767 so a run's connections (mappings live 10 s after they close) never
    // exhaust it.
    let (mut meshd, outside) = with_outside("exb", &[1, 1], true, 1024..=29999)?;
    let node_ip = meshd.nodes[0].node_ip;
    let backend = meshd.ep(1, 0).ip;
    let kp_index = meshd.underlay.add_node("exb-kn", KP_NODE_IP)?;
    let kp_backend_index = meshd.underlay.add_node("exb-kb", KP_BACKEND_NODE_IP)?;
    let kp_ep = kube_proxy_nodes(
        meshd.underlay.node(kp_index),
        meshd.underlay.node(kp_backend_index),
    )?;
    let mut expose_port = |port: u16| -> anyhow::Result<()> {
        expose_node_port(
            &mut meshd.nodes[0].maps,
            node_ip,
            port,
            TCP,
            (backend, port),
        )
    };
    expose_port(IPERF_PORTS[0])?;
    for run in 0..runs {
        expose_port(CONN_PORT_BASE + 2 * run as u16)?;
    }
    let names = ["meshd eBPF node port", "nftables DNAT (kube-proxy)"];
    let node_ips = [node_ip, KP_NODE_IP];
    let backends: [&Netns; 2] = [&meshd.ep(1, 0).netns, &kp_ep];

    // An iperf3 server per path, in its backend; the external host the client of both.
    let mut iperf = Iperf3Pair::start([0, 1].map(|i| Iperf3Path {
        name: names[i],
        server: backends[i],
        client: &outside.host,
        to: node_ips[i],
        port: IPERF_PORTS[i],
    }))?;
    iperf.check()?;
    anyhow::ensure!(
        !meshd.nodes[0].maps.nat_mappings()?.is_empty(),
        "meshd's transfer went without a SNAT mapping (not through the node port?)"
    );

    println!(
        "external host -> router -> node port -> backend on another node (native routing, MTU 1500), {runs} runs each; load average {}",
        load_average()
    );
    let comparison = Comparison {
        label: "nodeport",
        path: "through the node port",
        note: "(issue 14)",
        runs,
    };
    comparison.throughput(seconds, |i, streams| iperf.sample(i, streams, seconds))?;
    iperf.finish();

    comparison.connection_rate(threads, per_thread, |run| {
        let port = |i: usize| CONN_PORT_BASE + 2 * run as u16 + i as u16;
        // meshd's backend port is its node port's number, as kube-proxy's DNAT keeps it.
        for (i, addr) in [backend, KP_EP_IP].into_iter().enumerate() {
            spawn_byte_server(
                &backends[i].path(),
                SocketAddr::from((addr, port(i))),
                4 * threads,
            )?;
        }
        let to = |i: usize| SocketAddr::from((node_ips[i], port(i)));
        Ok([(outside.host.path(), to(0)), (outside.host.path(), to(1))])
    })?;
    println!("load average at the end: {}", load_average());

    let maps = &meshd.nodes[0].maps;
    for c in maps.counters()? {
        anyhow::ensure!(
            c.reason > 0,
            "the receiving meshd node dropped packets: {c:?}"
        );
    }
    anyhow::ensure!(
        maps.counter(Direction::Ingress, abi::DROP_NAT_NO_PORT)? == 0,
        "SNAT ports ran out"
    );
    Ok(())
}
