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
//! At scale (`--services N`, N > 1): N - 1 more services (ClusterIP, each with its own backend)
//! are installed in both arms before the measured node ports, in meshd's SERVICES/BACKENDS and in
//! the baseline, laid out as kube-proxy lays them out (`--baseline`):
//!
//! - `nftables` (default): today's single `dnat` of the node port range (no per-service rules;
//!   what it costs does not depend on N, so it ignores `--services`);
//! - `nftables-map`: kube-proxy's nftables mode, verdict maps (cluster IP . proto . port and
//!   proto . node port) jumping to per-service and per-endpoint chains;
//! - `iptables`: kube-proxy's iptables mode, KUBE-SERVICES with one rule per service's cluster
//!   IP, walked in order by every new connection's first packet, its last rule the jump to
//!   KUBE-NODEPORTS (so a node port's first packet always passes all N cluster-IP rules: where
//!   kube-proxy puts them, not a chosen worst case), then KUBE-EXT / KUBE-SVC / KUBE-SEP chains,
//!   MARK and DNAT, and KUBE-POSTROUTING's MASQUERADE of the marked traffic. Whatever
//!   `iptables-restore` is installed (nf_tables or legacy backend).
//! - `routed`: no translation; the client connects to the baseline's endpoint itself, routed
//!   through the plain node. No proxy can do this; it is the floor of the receiving node's cost,
//!   the most a NAT implementation there could save.
//!
//! The baseline's counters of the measured services are checked after the runs: their DNAT
//! must have been hit by every measured connection.
//!
//! `cargo bench -p meshd-datapath --bench nodeport_net -- [--runs N] [--seconds S]
//! [--connections PER_THREAD] [--threads T] [--services N] [--baseline nftables|nftables-map|iptables|routed]`
//! (root, bpffs, iperf3, nft; iptables-restore for `iptables`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context;
use common::bench::{
    arg, load_average, plain_endpoint_mtu, spawn_byte_server, Comparison, Iperf3Pair, Iperf3Path,
};
use common::public::{expose, expose_node_port, with_outside, ROUTER};
use ipnet::Ipv4Net;
use meshd_datapath::{Direction, LbFrontend};
use meshd_ebpf::abi;
use meshd_testing::netns::{Netns, EXTERNAL_NET};

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
/// The measured services' and the other services' cluster IPs: the i-th is 10.96.0.0 + 1 + i.
const CLUSTER_IP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
/// The other services' backends (never reached): 10.200.0.0 + 1 + i, port 8080.
const OTHER_BACKEND_BASE: u32 = u32::from_be_bytes([10, 200, 0, 0]);
const SERVICE_PORT: u16 = 80;
const OTHER_BACKEND_PORT: u16 = 8080;

/// How the baseline node translates its node ports.
#[derive(Clone, Copy, PartialEq)]
enum Baseline {
    /// One `dnat` of the whole node port range (no per-service state).
    Nftables,
    /// kube-proxy's nftables mode: verdict maps.
    NftablesMap,
    /// kube-proxy's iptables mode: one rule per service in KUBE-SERVICES.
    Iptables,
    /// No translation at all: the client connects to the backend's own address, which the
    /// router and the plain node route to it. Not what any proxy can do; it is the floor of the
    /// receiving node's cost (forwarding only), so meshd against it says how much of a
    /// connection's cost any NAT implementation on that node could still remove.
    Routed,
}

impl Baseline {
    fn from_args() -> anyhow::Result<Self> {
        let args: Vec<String> = std::env::args().collect();
        let name = args
            .iter()
            .position(|a| a == "--baseline")
            .and_then(|i| args.get(i + 1))
            .map_or("nftables", String::as_str);
        match name {
            "nftables" => Ok(Self::Nftables),
            "nftables-map" => Ok(Self::NftablesMap),
            "iptables" => Ok(Self::Iptables),
            "routed" => Ok(Self::Routed),
            other => {
                anyhow::bail!(
                    "--baseline {other}: expected nftables, nftables-map, iptables or routed"
                )
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::NftablesMap => "nftables-map",
            Self::Iptables => "iptables",
            Self::Routed => "routed",
        }
    }
}

fn nth(base: u32, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(base + 1 + i)
}

/// The services of a run at scale: `others` ClusterIP services (cluster IP i, port 80, one
/// backend each) and then the measured node ports (each also with a cluster IP, as a NodePort
/// service has, numbered after the others).
struct Services {
    others: u32,
    node_ports: Vec<u16>,
}

impl Services {
    fn measured_cluster_ip(&self, k: usize) -> Ipv4Addr {
        nth(CLUSTER_IP_BASE, self.others + k as u32)
    }

    /// kube-proxy's iptables-mode nat table for these services (iptables-restore input).
    fn iptables_rules(&self) -> String {
        use std::fmt::Write;
        let mut chains = String::new();
        let mut rules = String::new();
        for chain in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            writeln!(chains, ":{chain} - [0:0]").unwrap();
        }
        rules.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
             -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n",
        );
        let mut service = |name: String, cluster_ip: Ipv4Addr, backend: (Ipv4Addr, u16)| {
            let (svc, sep) = (format!("KUBE-SVC-{name}"), format!("KUBE-SEP-{name}"));
            writeln!(chains, ":{svc} - [0:0]\n:{sep} - [0:0]").unwrap();
            writeln!(
                rules,
                "-A KUBE-SERVICES -d {cluster_ip}/32 -p tcp -m tcp --dport {SERVICE_PORT} -j {svc}\n\
                 -A {svc} -j {sep}\n\
                 -A {sep} -s {}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m tcp -j DNAT --to-destination {}:{}",
                backend.0, backend.0, backend.1
            )
            .unwrap();
        };
        for i in 0..self.others {
            service(
                format!("O{i}"),
                nth(CLUSTER_IP_BASE, i),
                (nth(OTHER_BACKEND_BASE, i), OTHER_BACKEND_PORT),
            );
        }
        for (k, port) in self.node_ports.iter().enumerate() {
            service(
                format!("N{port}"),
                self.measured_cluster_ip(k),
                (KP_EP_IP, *port),
            );
        }
        rules.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        for port in &self.node_ports {
            writeln!(chains, ":KUBE-EXT-N{port} - [0:0]").unwrap();
            writeln!(
                rules,
                "-A KUBE-NODEPORTS -p tcp -m tcp --dport {port} -j KUBE-EXT-N{port}\n\
                 -A KUBE-EXT-N{port} -j KUBE-MARK-MASQ\n\
                 -A KUBE-EXT-N{port} -j KUBE-SVC-N{port}"
            )
            .unwrap();
        }
        format!("*nat\n{chains}{rules}COMMIT\n")
    }

    /// kube-proxy's nftables-mode table for these services (nft -f input); the measured
    /// services' endpoint chains count.
    fn nftables_map_rules(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from(
            "table ip exkp {\n\
             map service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
             map service-nodeports { type inet_proto . inet_service : verdict; }\n\
             chain mark-for-masquerade { meta mark set meta mark | 0x4000; }\n\
             chain masquerading { meta mark & 0x4000 == 0 return; meta mark set meta mark ^ 0x4000; masquerade fully-random; }\n\
             chain nat-prerouting { type nat hook prerouting priority dstnat; jump services; }\n\
             chain nat-postrouting { type nat hook postrouting priority srcnat; jump masquerading; }\n\
             chain services { ip daddr . meta l4proto . th dport vmap @service-ips; fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports; }\n",
        );
        let mut elements = Vec::new();
        let service = |out: &mut String,
                       elements: &mut Vec<String>,
                       name: String,
                       cluster_ip: Ipv4Addr,
                       backend: (Ipv4Addr, u16),
                       counter: &str| {
            writeln!(
                out,
                "chain svc-{name} {{ numgen random mod 1 vmap {{ 0 : goto ep-{name} }}; }}\n\
                 chain ep-{name} {{ ip saddr {} jump mark-for-masquerade; {counter} meta l4proto tcp dnat to {}:{}; }}",
                backend.0, backend.0, backend.1
            )
            .unwrap();
            elements.push(format!(
                "add element ip exkp service-ips {{ {cluster_ip} . tcp . {SERVICE_PORT} : goto svc-{name} }}"
            ));
        };
        for i in 0..self.others {
            service(
                &mut out,
                &mut elements,
                format!("o{i}"),
                nth(CLUSTER_IP_BASE, i),
                (nth(OTHER_BACKEND_BASE, i), OTHER_BACKEND_PORT),
                "",
            );
        }
        for (k, port) in self.node_ports.iter().enumerate() {
            service(
                &mut out,
                &mut elements,
                format!("n{port}"),
                self.measured_cluster_ip(k),
                (KP_EP_IP, *port),
                "counter",
            );
            writeln!(
                out,
                "chain ext-n{port} {{ jump mark-for-masquerade; goto svc-n{port}; }}"
            )
            .unwrap();
            elements.push(format!(
                "add element ip exkp service-nodeports {{ tcp . {port} : goto ext-n{port} }}"
            ));
        }
        out.push_str("}\n");
        for element in elements {
            out.push_str(&element);
            out.push('\n');
        }
        out
    }
}

/// kube-proxy's NodePort path in nftables terms: the receiving node DNATs its node ports to the
/// backend (the port kept) and masquerades what it forwards to it, so replies come back; its
/// route to the backend's subnet goes via the backend's node. The backend node is a plain
/// router with the endpoint (MTU 1500) behind a veth.
fn kube_proxy_nodes(
    receiving: &Netns,
    backend_node: &Netns,
    router: &Netns,
    baseline: Baseline,
    services: &Services,
) -> anyhow::Result<Netns> {
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
    match baseline {
        Baseline::Nftables => {}
        Baseline::Routed => {
            // The client reaches the endpoint itself: the router sends its prefix to the plain
            // node, and the backend node returns the outside's traffic the same way.
            router.ip(&["route", "add", KP_EP_NET, "via", &KP_NODE_IP.to_string()])?;
            let [a, b, c] = EXTERNAL_NET;
            backend_node.ip(&[
                "route",
                "add",
                &format!("{a}.{b}.{c}.0/24"),
                "via",
                &KP_NODE_IP.to_string(),
            ])?;
            return Ok(ep);
        }
        Baseline::NftablesMap => {
            return load_file(receiving, "nft", &["-f"], &services.nftables_map_rules())
                .map(|()| ep);
        }
        Baseline::Iptables => {
            return load_file(
                receiving,
                // No `-w`: it takes an optional argument and would swallow the file name
                // (iptables-restore then reads an empty stdin and installs nothing).
                "iptables-restore",
                &[],
                &services.iptables_rules(),
            )
            .map(|()| ep);
        }
    }
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

/// Runs `program args... FILE` in `netns` with `text` in FILE (a rule set too long for argv).
fn load_file(netns: &Netns, program: &str, args: &[&str], text: &str) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("exb-{}-{program}.rules", std::process::id()));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let file = path.to_string_lossy().into_owned();
    let mut all = args.to_vec();
    all.push(&file);
    let result = netns.run(program, &all).map(drop);
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("{program} {file} ({} lines)", text.lines().count()))
}

/// Checks that the baseline translated every measured connection through the rules laid out
/// for it (so the baseline paid for its rule set): at least `min_connections` hits on the
/// measured services' DNAT rules together (each connection passes one of them once; the
/// iperf3 service's connections come on top).
fn check_baseline_hits(
    receiving: &Netns,
    baseline: Baseline,
    min_connections: u64,
) -> anyhow::Result<()> {
    let hits: u64 = match baseline {
        Baseline::Nftables | Baseline::Routed => return Ok(()),
        Baseline::Iptables => {
            // `[packets:bytes] -A KUBE-SEP-N<port> -p tcp -m tcp -j DNAT ...`
            let saved = receiving.run("iptables-save", &["-c", "-t", "nat"])?;
            let mut hits = 0;
            for line in saved.lines() {
                if line.contains("-A KUBE-SEP-N") && line.contains("-j DNAT") {
                    let packets = line
                        .trim_start_matches('[')
                        .split(':')
                        .next()
                        .and_then(|p| p.parse::<u64>().ok())
                        .with_context(|| format!("iptables-save -c line {line:?}"))?;
                    hits += packets;
                }
            }
            let jumps = saved
                .lines()
                .find(|l| l.contains("-j KUBE-NODEPORTS"))
                .context("no KUBE-NODEPORTS jump in iptables-save")?;
            println!("iptables: KUBE-SERVICES' jump to KUBE-NODEPORTS {jumps:?}");
            hits
        }
        Baseline::NftablesMap => {
            // `... counter packets P bytes B meta l4proto tcp dnat to ...` in the ep-n chains.
            let listed = receiving.run("nft", &["list", "table", "ip", "exkp"])?;
            let mut hits = 0;
            for line in listed.lines() {
                if let Some(rest) = line.split("counter packets ").nth(1) {
                    hits += rest
                        .split(' ')
                        .next()
                        .and_then(|p| p.parse::<u64>().ok())
                        .with_context(|| format!("nft counter line {line:?}"))?;
                }
            }
            hits
        }
    };
    println!(
        "{}: the measured services' DNAT rules hit {hits} times (at least {min_connections} connections measured)",
        baseline.name()
    );
    anyhow::ensure!(
        hits >= min_connections,
        "{}'s measured DNAT rules were hit {hits} times, fewer than the {min_connections} connections measured: the baseline did not go through its rule set",
        baseline.name()
    );
    Ok(())
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
    let service_count = arg("--services", 1).max(1);
    let baseline = Baseline::from_args()?;
    if baseline == Baseline::Iptables
        && !meshd_testing::require(
            "iptables-restore",
            meshd_testing::have_binary("iptables-restore"),
        )
    {
        return Ok(());
    }
    let mut node_ports = vec![IPERF_PORTS[1]];
    node_ports.extend((0..runs).map(|run| CONN_PORT_BASE + 2 * run as u16 + 1));
    let services = Services {
        others: service_count - 1,
        node_ports,
    };

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
        &outside.router,
        baseline,
        &services,
    )?;
    // meshd's other services first, as the baseline's, then the measured node ports.
    for i in 0..services.others {
        expose(
            &mut meshd.nodes[0].maps,
            LbFrontend {
                addr: nth(CLUSTER_IP_BASE, i),
                port: SERVICE_PORT,
                proto: TCP,
            },
            &[(nth(OTHER_BACKEND_BASE, i), OTHER_BACKEND_PORT)],
            0,
        )?;
    }
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
    let names = [
        "meshd eBPF node port",
        match baseline {
            Baseline::Nftables => "nftables DNAT (kube-proxy)",
            Baseline::NftablesMap => "nftables verdict maps (kube-proxy nftables mode)",
            Baseline::Iptables => "iptables KUBE-SERVICES (kube-proxy iptables mode)",
            Baseline::Routed => "plain routing to the backend (no translation)",
        },
    ];
    // What the client connects to on each path: the node port, or the endpoint when routed.
    let node_ips = [
        node_ip,
        if baseline == Baseline::Routed {
            KP_EP_IP
        } else {
            KP_NODE_IP
        },
    ];
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
        "external host -> router -> node port -> backend on another node (native routing, MTU 1500), {runs} runs each, {service_count} service(s) in each arm, baseline {}; load average {}",
        baseline.name(),
        load_average()
    );
    let comparison = Comparison {
        label: "nodeport",
        path: "through the node port",
        note: "(issue 14)",
        baseline: baseline.name(),
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
    check_baseline_hits(
        meshd.underlay.node(kp_index),
        baseline,
        u64::from(runs * threads * per_thread),
    )?;

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
