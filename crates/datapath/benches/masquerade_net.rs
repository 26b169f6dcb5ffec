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

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::bench::{arg, iperf3_gbps, load_average, median, plain_endpoint, spread};
use common::topology::Topology;
use ipnet::Ipv4Net;
use meshd_datapath::netns::run_in;
use meshd_datapath::{plumbing, Direction, EgressConfig};
use meshd_testing::netns::{ChildGuard, Netns};

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

/// A server on the external host answering each connection's byte, then waiting for the
/// client to close: `workers` threads accepting on one listener, each serving its connection
/// itself (a thread spawned per connection made the server, shared by both paths, the
/// bottleneck). Its threads live as long as the bench.
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

    // A server per path (ports 5201 and 5202), so that a server stuck in one path's test
    // never holds up the other's; a failed sample restarts its path's server and is retried
    // once, and every failure is reported.
    let server = |i: usize| -> anyhow::Result<ChildGuard> {
        let guard = outside
            .host
            .spawn("iperf3", &["-s", "-p", &(5201 + i).to_string()])?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(guard)
    };
    let mut servers = [server(0)?, server(1)?];
    let mut failures = [0u32; 2];
    let mut sample = |i: usize, streams: u32, seconds: u32| -> anyhow::Result<f64> {
        let (name, client) = clients[i];
        let port = 5201 + i as u16;
        match iperf3_gbps(client, ext_ip, port, streams, seconds) {
            Ok(gbps) => Ok(gbps),
            Err(e) => {
                failures[i] += 1;
                println!("{name}: a {streams}-stream sample failed ({e:#}); its server restarts");
                servers[i] = server(i)?;
                iperf3_gbps(client, ext_ip, port, streams, seconds)
                    .with_context(|| format!("{name}: a {streams}-stream sample failed twice"))
            }
        }
    };
    // Both paths work, which takes masquerade: the router has no route to either endpoint
    // subnet, only to the node IPs.
    for i in 0..2 {
        sample(i, 1, 1).with_context(|| format!("{}: first transfer", clients[i].0))?;
    }
    anyhow::ensure!(
        !meshd.nodes[0].maps.nat_mappings()?.is_empty(),
        "meshd's transfer went without a NAT mapping"
    );

    println!(
        "endpoint (MTU 1450) -> node -> router -> external host, veth/bridge underlay MTU 1500, {runs} runs each; load average {}",
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
            "TCP throughput to the external host, {streams} stream(s): meshd {m:.2} Gbit/s [{}], nftables {b:.2} Gbit/s [{}] (median of {runs} x {seconds}s)",
            spreads[0], spreads[1]
        );
        println!(
            "RESULT masquerade-tcp-{streams}stream meshd_gbps={m:.2} nftables_gbps={b:.2} ratio={:.3}x goal>=1.0x (issue 12)",
            m / b
        );
    }
    drop(sample);
    println!(
        "failed throughput samples (retried): meshd {}, nftables {}",
        failures[0], failures[1]
    );
    drop(servers);

    let mut rates = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for run in 0..runs {
        // A server per path, so neither waits for the other's; fresh ports each run.
        let to = |i: u16| SocketAddr::from((ext_ip, 7000 + 2 * run as u16 + i));
        for i in 0..2 {
            spawn_byte_server(&outside.host.path(), to(i), 4 * threads)?;
        }
        let (m, b) = std::thread::scope(|scope| {
            let m = scope.spawn(|| connect_loop(&clients[0].1.path(), to(0), threads, per_thread));
            let b = scope.spawn(|| connect_loop(&clients[1].1.path(), to(1), threads, per_thread));
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
        "new connections/s to the external host ({threads} threads x {per_thread} each way, both at once): meshd {m:.0} [{}], nftables {b:.0} [{}]; ratio median {r:.2}x [{}]",
        spreads[0], spreads[1], spreads[2]
    );
    println!("RESULT masquerade-connrate meshd_cps={m:.0} nftables_cps={b:.0} ratio={r:.3}x goal>=1.0x (issue 12)");
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
