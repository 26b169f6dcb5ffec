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

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::bench::{arg, iperf3_gbps, load_average, median, plain_endpoint_mtu, spread};
use common::public::{expose, with_outside, ROUTER};
use ipnet::Ipv4Net;
use meshd_datapath::netns::run_in;
use meshd_datapath::{Direction, LbFrontend};
use meshd_ebpf::abi;
use meshd_testing::netns::{ChildGuard, Netns};

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

/// A server in `netns` answering each connection's byte, then waiting for the client to close:
/// `workers` threads accepting on one listener. Its threads live as long as the bench.
fn spawn_byte_server(netns: &Path, addr: SocketAddr, workers: u32) -> anyhow::Result<()> {
    let listener = Arc::new(run_in(netns, || -> anyhow::Result<TcpListener> {
        Ok(TcpListener::bind(addr)?)
    })?);
    for _ in 0..workers {
        let listener = listener.clone();
        std::thread::spawn(move || {
            while let Ok((mut s, _)) = listener.accept() {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
                    let _ = s.read(&mut b);
                }
            }
        });
    }
    Ok(())
}

/// `threads` loops of `per_thread` connections from `client` to `to`; connections per second
/// over the wall time. Any failed connection fails the run.
fn connect_loop(
    client: &Path,
    to: SocketAddr,
    threads: u32,
    per_thread: u32,
) -> anyhow::Result<f64> {
    run_in(client, || -> anyhow::Result<f64> {
        let failed = AtomicUsize::new(0);
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    for _ in 0..per_thread {
                        let ok = (|| -> std::io::Result<()> {
                            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
                            s.set_read_timeout(Some(Duration::from_secs(3)))?;
                            let mut b = [7u8; 1];
                            s.write_all(&b)?;
                            s.read_exact(&mut b)?;
                            Ok(())
                        })();
                        if ok.is_err() {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let failed = failed.load(Ordering::Relaxed);
        anyhow::ensure!(failed == 0, "{failed} connections to {to} failed");
        Ok(f64::from(threads * per_thread) / start.elapsed().as_secs_f64())
    })
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
        let frontend = LbFrontend {
            addr: node_ip,
            port,
            proto: TCP,
        };
        expose(
            &mut meshd.nodes[0].maps,
            frontend,
            &[(backend, port)],
            abi::SERVICE_F_NODE_PORT,
        )
    };
    expose_port(IPERF_PORTS[0])?;
    for run in 0..runs {
        expose_port(CONN_PORT_BASE + 2 * run as u16)?;
    }
    let names = ["meshd eBPF node port", "nftables DNAT (kube-proxy)"];
    let node_ips = [node_ip, KP_NODE_IP];
    let backends: [&Netns; 2] = [&meshd.ep(1, 0).netns, &kp_ep];

    // An iperf3 server per path, in its backend; a failed sample restarts its path's server
    // and is retried once, and every failure is reported.
    let server = |i: usize| -> anyhow::Result<ChildGuard> {
        let guard = backends[i].spawn("iperf3", &["-s", "-p", &IPERF_PORTS[i].to_string()])?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(guard)
    };
    let mut servers = [server(0)?, server(1)?];
    let mut failures = [0u32; 2];
    let mut sample = |i: usize, streams: u32, seconds: u32| -> anyhow::Result<f64> {
        let (to, port) = (node_ips[i], IPERF_PORTS[i]);
        match iperf3_gbps(&outside.host, to, port, streams, seconds) {
            Ok(gbps) => Ok(gbps),
            Err(e) => {
                failures[i] += 1;
                println!(
                    "{}: a {streams}-stream sample failed ({e:#}); its server restarts",
                    names[i]
                );
                servers[i] = server(i)?;
                iperf3_gbps(&outside.host, to, port, streams, seconds).with_context(|| {
                    format!("{}: a {streams}-stream sample failed twice", names[i])
                })
            }
        }
    };
    for (i, name) in names.iter().enumerate() {
        sample(i, 1, 1).with_context(|| format!("{name}: first transfer"))?;
    }
    anyhow::ensure!(
        !meshd.nodes[0].maps.nat_mappings()?.is_empty(),
        "meshd's transfer went without a SNAT mapping (not through the node port?)"
    );

    println!(
        "external host -> router -> node port -> backend on another node (native routing, MTU 1500), {runs} runs each; load average {}",
        load_average()
    );
    for streams in [1u32, 4] {
        let mut results = [Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (i, result) in results.iter_mut().enumerate() {
                result.push(sample(i, streams, seconds)?);
            }
        }
        let spreads = [spread(&results[0]), spread(&results[1])];
        let [m, b] = results.map(median);
        println!(
            "TCP throughput through the node port, {streams} stream(s): meshd {m:.2} Gbit/s [{}], nftables {b:.2} Gbit/s [{}] (median of {runs} x {seconds}s)",
            spreads[0], spreads[1]
        );
        println!(
            "RESULT nodeport-tcp-{streams}stream meshd_gbps={m:.2} nftables_gbps={b:.2} ratio={:.3}x (issue 14)",
            m / b
        );
    }
    println!(
        "failed throughput samples (retried): meshd {}, nftables {}",
        failures[0], failures[1]
    );
    drop(servers);

    let mut rates = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for run in 0..runs {
        let port = |i: usize| CONN_PORT_BASE + 2 * run as u16 + i as u16;
        // meshd's backend port is its node port's number, as kube-proxy's DNAT keeps it.
        spawn_byte_server(
            &backends[0].path(),
            SocketAddr::from((backend, port(0))),
            4 * threads,
        )?;
        spawn_byte_server(
            &backends[1].path(),
            SocketAddr::from((KP_EP_IP, port(1))),
            4 * threads,
        )?;
        let host = outside.host.path();
        let to = [0, 1].map(|i| SocketAddr::from((node_ips[i], port(i))));
        let (m, b) = std::thread::scope(|scope| {
            let m = scope.spawn(|| connect_loop(&host, to[0], threads, per_thread));
            let b = scope.spawn(|| connect_loop(&host, to[1], threads, per_thread));
            (m.join().expect("meshd loop"), b.join().expect("nft loop"))
        });
        let (m, b) = (m.context("meshd")?, b.context("nftables")?);
        println!(
            "run {run}: meshd {m:.0} conn/s, nftables {b:.0} conn/s = {:.2}x",
            m / b
        );
        rates[0].push(m);
        rates[1].push(b);
        ratios.push(m / b);
    }
    let spreads = [spread(&rates[0]), spread(&rates[1]), spread(&ratios)];
    let [m, b] = rates.map(median);
    let r = median(ratios);
    println!(
        "new connections/s through the node port ({threads} threads x {per_thread} each path, both at once): meshd {m:.0} [{}], nftables {b:.0} [{}]; ratio median {r:.2}x [{}]",
        spreads[0], spreads[1], spreads[2]
    );
    println!(
        "RESULT nodeport-connrate meshd_cps={m:.0} nftables_cps={b:.0} ratio={r:.3}x (issue 14)"
    );
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
