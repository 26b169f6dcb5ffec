//! Endpoint-to-endpoint traffic across two nodes: the meshd eBPF datapath against the same
//! topology wired the plain kernel way (a VXLAN device with a fixed remote, IP forwarding and
//! routes, no eBPF), both built side by side and measured alternately in the same run. With
//! `--native 1`: meshd's native routing against the kernel's routed path (veth, forwarding,
//! `<endpoint subnet> via <node IP>` routes, no VXLAN, no eBPF).
//!
//! - TCP throughput: iperf3, 1 and 4 streams;
//! - TCP request/response latency (TCP_RR style): 1-byte ping-pong on one connection.
//!
//! `cargo bench -p meshd-datapath --bench datapath_net -- [--runs N] [--seconds S] [--rr N]
//! [--profile 1] [--tunnel-encap device|program|both]`
//!
//! `--tunnel-encap program`: meshd's nodes write and take off VXLAN in the programs
//! (lib/vxlan.h; from_netdev on the uplinks) instead of the device; the run ends with what the
//! VXLAN devices still carried. `--tunnel-encap both`: a meshd topology of each kind, measured
//! alternately with the baseline in one run (ratios against the baseline and program/device).
//!
//! `--offloads show` prints the offload settings of every interface of both topologies;
//! `--offloads gro|bigtcp|gro,bigtcp` applies a tuning to both topologies alike before
//! measuring (see `tune`).
//!
//! `--profile 1` adds a pass after the measured runs with the kernel's BPF run-time statistics
//! on (BPF_ENABLE_STATS, held only for that pass: the statistics cost every program two clock
//! reads, which the no-eBPF baseline would not pay): per program, runs per second, ns per run
//! and bytes per run (GSO super-packets count once) during an iperf3 run of each size.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context;
use common::bench::{
    arg, iperf3_gbps, load_average, median, plain_endpoint, plain_endpoint_mtu, spread, tcp_args,
    tcp_rr, two_routing_nodes, NODE_IPS,
};
use common::topology::Topology;
use meshd_datapath::{netns::run_in, TunnelEncap};
use meshd_testing::netns::{ChildGuard, Netns, Underlay, UNDERLAY_IFNAME};

/// Two nodes with one endpoint each, wired without eBPF: endpoint veth with a /24 and the
/// node as gateway, `ip_forward`, a VXLAN device per node pointing at the other node, and a
/// route to the other node's endpoint subnet through it. Same MTUs as the meshd topology.
struct Baseline {
    // Field order = drop order: endpoints, then nodes and bridge.
    endpoints: Vec<Netns>,
    underlay: Underlay,
}

impl Baseline {
    /// `native`: the kernel's routed path instead (no VXLAN): endpoint MTU 1500 and each
    /// node's route to the other's endpoint subnet via the other node's underlay address.
    fn new(prefix: &str, native: bool) -> anyhow::Result<Baseline> {
        let underlay = two_routing_nodes(prefix)?;
        let node_ips = NODE_IPS;
        let mut endpoints = Vec::new();
        for i in 0..2usize {
            let node = underlay.node(i);
            let other = 1 - i;
            if native {
                node.ip(&[
                    "route",
                    "add",
                    &format!("10.{}.0.0/24", other + 1),
                    "via",
                    &node_ips[other].to_string(),
                ])?;
                endpoints.push(plain_endpoint_mtu(
                    node,
                    &format!("{prefix}-e{i}"),
                    "veth0",
                    format!("10.{}.0.1/24", i + 1).parse()?,
                    format!("10.{}.0.2/24", i + 1).parse()?,
                    1500,
                )?);
                continue;
            }
            node.ip(&[
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "8472",
                "remote",
                &node_ips[other].to_string(),
                "local",
                &node_ips[i].to_string(),
                "dev",
                UNDERLAY_IFNAME,
                "nolearning",
            ])?;
            node.ip(&[
                "addr",
                "add",
                &format!("172.16.0.{}/24", i + 1),
                "dev",
                "vx0",
            ])?;
            node.ip(&["link", "set", "vx0", "up"])?;
            node.ip(&[
                "route",
                "add",
                &format!("10.{}.0.0/24", other + 1),
                "via",
                &format!("172.16.0.{}", other + 1),
                "dev",
                "vx0",
            ])?;
            let ep = plain_endpoint(
                node,
                &format!("{prefix}-e{i}"),
                "veth0",
                format!("10.{}.0.1/24", i + 1).parse()?,
                format!("10.{}.0.2/24", i + 1).parse()?,
            )?;
            endpoints.push(ep);
        }
        Ok(Baseline {
            endpoints,
            underlay,
        })
    }
}

/// Every interface but loopback of a namespace.
fn links(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let out = ns.ip(&["-j", "link", "show"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    Ok(v.as_array()
        .context("ip -j link: not an array")?
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .filter(|n| n != "lo")
        .collect())
}

/// The offload features that matter here, as "name=on/off" of `ethtool -k`.
fn offload_summary(ns: &Netns, dev: &str) -> anyhow::Result<String> {
    const SHOWN: [&str; 8] = [
        "tx-checksumming",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "rx-gro-list",
        "rx-udp-gro-forwarding",
        "tx-udp_tnl-segmentation",
        "rx-checksumming",
    ];
    let out = ns.run("ethtool", &["-k", dev])?;
    let mut parts = Vec::new();
    for line in out.lines() {
        if let Some((name, value)) = line.trim().split_once(": ") {
            if SHOWN.contains(&name) {
                parts.push(format!(
                    "{name}={}",
                    value.split_whitespace().next().unwrap_or("")
                ));
            }
        }
    }
    let details = ns.ip(&["-d", "-j", "link", "show", dev])?;
    let d: serde_json::Value = serde_json::from_str(&details).context("ip -d -j link")?;
    for key in [
        "gso_max_size",
        "gso_ipv4_max_size",
        "gro_max_size",
        "gro_ipv4_max_size",
    ] {
        parts.push(format!("{key}={}", d[0][key]));
    }
    Ok(parts.join(" "))
}

/// Applies one tuning to every interface of the given namespaces:
/// - `gro`: GRO on every veth (which gives a veth NAPI receive, so the bridge and the node
///   get coalesced packets) and UDP GRO forwarding;
/// - `bigtcp`: BIG TCP sizes (GSO/GRO up to 192 KiB for IPv4 and IPv6) on every device but
///   the VXLAN ones.
fn tune(namespaces: &[&Netns], what: &str) -> anyhow::Result<()> {
    for ns in namespaces {
        for dev in links(ns)? {
            for t in what.split(',') {
                match t {
                    "gro" => {
                        ns.run("ethtool", &["-K", &dev, "gro", "on"])?;
                        // Not every device has it (the bridge does not): best effort.
                        let _ = ns.run("ethtool", &["-K", &dev, "rx-udp-gro-forwarding", "on"]);
                    }
                    // Kernel 6.18's VXLAN device refuses gso_max_size above 64 KiB ("too
                    // big gso_max_size": its tso_max_size is 64 KiB): everything else.
                    "bigtcp" if dev.contains("vx") => {}
                    "bigtcp" => {
                        ns.ip(&[
                            "link",
                            "set",
                            &dev,
                            "gso_max_size",
                            "196608",
                            "gro_max_size",
                            "196608",
                        ])?;
                        set_ipv4_gso_gro_max(ns, &dev, 196_608)?;
                    }
                    other => anyhow::bail!("unknown tuning {other:?}"),
                }
            }
        }
    }
    Ok(())
}

/// Sets a device's IPv4 GSO and GRO maximum sizes (IPv4 BIG TCP) with RTM_NEWLINK:
/// iproute2 6.1 (Debian 12) has no words for IFLA_GSO_IPV4_MAX_SIZE / IFLA_GRO_IPV4_MAX_SIZE
/// (kernel 6.3+), and the kernel applies gso_max_size/gro_max_size above 64 KiB to IPv6 only.
fn set_ipv4_gso_gro_max(ns: &Netns, dev: &str, size: u32) -> anyhow::Result<()> {
    const RTM_NEWLINK: u16 = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
    const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;
    let out = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    let ifindex = v[0]["ifindex"].as_i64().context("no ifindex")? as i32;
    let mut msg = Vec::new();
    msg.extend_from_slice(&48u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    msg.extend_from_slice(&[0, 0, 0, 0]); // ifinfomsg: family, pad, type
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    msg.extend_from_slice(&[0; 8]); // flags, change
    for attr in [IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE] {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&attr.to_ne_bytes());
        msg.extend_from_slice(&size.to_ne_bytes());
    }
    let error = run_in(&ns.path(), move || -> anyhow::Result<i32> {
        // SAFETY: plain socket syscalls on a buffer we own; the fd is closed below.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            anyhow::ensure!(
                fd >= 0,
                "netlink socket: {}",
                std::io::Error::last_os_error()
            );
            let sent = libc::send(fd, msg.as_ptr().cast(), msg.len(), 0);
            let mut buf = [0u8; 1024];
            let got = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            libc::close(fd);
            anyhow::ensure!(sent == msg.len() as isize && got >= 20, "netlink send/recv");
            anyhow::ensure!(
                u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR,
                "netlink: no ack"
            );
            Ok(i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]))
        }
    })?;
    anyhow::ensure!(
        error == 0,
        "RTM_NEWLINK IPv4 GSO/GRO max size on {dev}: {}",
        std::io::Error::from_raw_os_error(-error)
    );
    Ok(())
}

/// A client namespace, a server namespace and the server's address.
struct Pair<'a> {
    client: &'a Netns,
    server: &'a Netns,
    server_ip: Ipv4Addr,
}

fn iperf_server(pair: &Pair<'_>, port: u16) -> anyhow::Result<ChildGuard> {
    let guard = pair
        .server
        .spawn("iperf3", &["-s", "-p", &port.to_string()])?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(guard)
}

fn iperf(pair: &Pair<'_>, port: u16, streams: u32, seconds: u32) -> anyhow::Result<f64> {
    iperf3_gbps(pair.client, pair.server_ip, port, streams, seconds)
}

/// (runs, total run time in ns) of a loaded program, from the kernel's statistics (bpftool:
/// aya 0.14's `ProgramInfo` does not expose them).
fn prog_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "-j"])
        .output()
        .context("bpftool prog show")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok((
        v["run_cnt"].as_u64().unwrap_or(0),
        v["run_time_ns"].as_u64().unwrap_or(0),
    ))
}

/// One iperf3 run of each size with BPF run-time statistics on: what each program of the
/// sending node (node 0) and the receiving node (node 1) costs per run and per byte.
fn profile(
    meshd: &Topology,
    pair: &Pair<'_>,
    seconds: u32,
    native: bool,
    encap: TunnelEncap,
) -> anyhow::Result<()> {
    use meshd_ebpf::programs::{FROM_ENDPOINT, FROM_NETDEV, FROM_OVERLAY};
    let (receive, receive_role, ack_role) = if native || encap == TunnelEncap::Program {
        (
            FROM_NETDEV,
            "receiver from_netdev (data)",
            "sender from_netdev (ACKs)",
        )
    } else {
        (
            FROM_OVERLAY,
            "receiver from_overlay (data)",
            "sender from_overlay (ACKs)",
        )
    };
    let mut progs = Vec::new();
    for (node, name, role) in [
        (0, FROM_ENDPOINT, "sender from_endpoint (data)"),
        (1, receive, receive_role),
        (1, FROM_ENDPOINT, "receiver from_endpoint (ACKs)"),
        (0, receive, ack_role),
    ] {
        let dp = meshd.nodes[node]
            .datapath
            .as_ref()
            .context("node without datapath")?;
        progs.push((role, dp.program(name)?.info()?.id()));
    }
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    for streams in [1u32, 4] {
        let before: Vec<_> = progs
            .iter()
            .map(|(_, id)| prog_stats(*id))
            .collect::<anyhow::Result<_>>()?;
        let gbps = iperf(pair, 5201, streams, seconds)?;
        println!("profile, {streams} stream(s), {gbps:.2} Gbit/s with statistics on:");
        for ((role, id), (cnt0, ns0)) in progs.iter().zip(before) {
            let (cnt1, ns1) = prog_stats(*id)?;
            let (cnt, ns) = (cnt1 - cnt0, ns1 - ns0);
            let per_run = if cnt > 0 { ns as f64 / cnt as f64 } else { 0.0 };
            // Data bytes per run of the data-path programs: how many wire packets one run
            // stands for (1450-byte MTU), since TSO/GRO super-packets pass the program once.
            let bytes_per_run = gbps * 1e9 / 8.0 * f64::from(seconds) / cnt.max(1) as f64;
            println!(
                "PROFILE {streams}stream {role}: {:.0} runs/s, {per_run:.0} ns/run, {:.1}% of a CPU, ~{bytes_per_run:.0} payload bytes/run",
                cnt as f64 / f64::from(seconds),
                ns as f64 / (f64::from(seconds) * 1e9) * 100.0
            );
        }
    }
    Ok(())
}

/// The meshd topologies `--tunnel-encap` asks for, with their names: `device` (default) or
/// `program`, or `both`: one of each, measured alternately with the baseline in one run.
fn encaps_asked() -> anyhow::Result<Vec<TunnelEncap>> {
    match std::env::args()
        .skip_while(|a| a != "--tunnel-encap")
        .nth(1)
        .as_deref()
    {
        None => Ok(vec![TunnelEncap::Device]),
        Some("both") => Ok(vec![TunnelEncap::Device, TunnelEncap::Program]),
        Some(s) => Ok(vec![s.parse().map_err(anyhow::Error::msg)?]),
    }
}

/// Each path's median and spread.
fn summarize(results: Vec<Vec<f64>>) -> (Vec<f64>, Vec<String>) {
    let spreads = results.iter().map(|r| spread(r)).collect();
    (results.into_iter().map(median).collect(), spreads)
}

/// Each path measured `runs` times, the paths taking turns within a run (a change in the
/// machine's load then hits them alike): the median and spread of each path's figures.
fn alternate(
    pairs: &[(String, Pair<'_>)],
    runs: u32,
    mut measure: impl FnMut(&Pair<'_>, u32) -> anyhow::Result<f64>,
) -> anyhow::Result<(Vec<f64>, Vec<String>)> {
    let mut results = vec![Vec::new(); pairs.len()];
    for run in 0..runs {
        for (i, (_, pair)) in pairs.iter().enumerate() {
            results[i].push(measure(pair, run)?);
        }
    }
    Ok(summarize(results))
}

fn main() -> anyhow::Result<()> {
    let Some(args) = tcp_args() else {
        return Ok(());
    };
    let (runs, seconds, rr_transactions) = (args.runs, args.seconds, args.rr_transactions);
    let profile_pass = arg("--profile", 0) != 0;
    // `--native 1`: native routing against the kernel's routed path (no VXLAN either side).
    let native = arg("--native", 0) != 0;
    let (mode, baseline_name, ep_mtu) = if native {
        ("native", "kernel routing", 1500)
    } else {
        ("tunnel", "kernel VXLAN + routes", 1450)
    };

    let encaps = encaps_asked()?;
    anyhow::ensure!(
        !native || encaps == [TunnelEncap::Device],
        "--tunnel-encap program is tunnel mode"
    );
    let mut meshd = Vec::new();
    for &encap in &encaps {
        meshd.push(match encap {
            TunnelEncap::Device if encaps.len() == 1 => {
                Topology::with_routing("bnm", &[1, 2], 1, native)?
            }
            // Two meshd topologies: each its own prefix.
            TunnelEncap::Device => Topology::with_routing("encd", &[1, 2], 1, native)?,
            TunnelEncap::Program => Topology::with_encap("encp", &[1, 2], 1, &[encap, encap])?,
        });
    }
    let baseline = Baseline::new("bnb", native)?;
    // The meshd paths first (one per topology), the baseline last.
    let mut pairs: Vec<(String, Pair<'_>)> = meshd
        .iter()
        .zip(&encaps)
        .map(|(topo, encap)| {
            (
                if native {
                    "meshd eBPF".to_owned()
                } else {
                    format!("meshd eBPF (VXLAN by the {encap})")
                },
                Pair {
                    client: &topo.ep(0, 0).netns,
                    server: &topo.ep(1, 0).netns,
                    server_ip: topo.ep(1, 0).ip,
                },
            )
        })
        .collect();
    pairs.push((
        baseline_name.to_owned(),
        Pair {
            client: &baseline.endpoints[0],
            server: &baseline.endpoints[1],
            server_ip: Ipv4Addr::new(10, 2, 0, 2),
        },
    ));
    let base = pairs.len() - 1;
    let mut namespaces: Vec<(&str, &Netns)> = Vec::new();
    for topo in &meshd {
        namespaces.push(("bridge", topo.underlay.bridge()));
        for node in &topo.nodes {
            namespaces.push(("meshd node", topo.underlay.node(node.index)));
            for ep in &node.endpoints {
                namespaces.push(("meshd endpoint", &ep.netns));
            }
        }
    }
    namespaces.push(("baseline bridge", baseline.underlay.bridge()));
    for i in 0..2 {
        namespaces.push(("baseline node", baseline.underlay.node(i)));
        namespaces.push(("baseline endpoint", &baseline.endpoints[i]));
    }
    let offloads = std::env::args()
        .skip_while(|a| a != "--offloads")
        .nth(1)
        .unwrap_or_default();
    if !offloads.is_empty() && offloads != "show" {
        let all: Vec<&Netns> = namespaces.iter().map(|(_, ns)| *ns).collect();
        tune(&all, &offloads)?;
        println!("tuning applied to every topology: {offloads}");
    }
    if !offloads.is_empty() {
        for (role, ns) in &namespaces {
            for dev in links(ns)? {
                println!(
                    "OFFLOADS {role} {} {dev}: {}",
                    ns.name(),
                    offload_summary(ns, &dev)?
                );
            }
        }
    }

    let servers: Vec<ChildGuard> = pairs
        .iter()
        .map(|(_, p)| iperf_server(p, 5201))
        .collect::<anyhow::Result<_>>()?;

    let names: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "{mode} routing: two nodes on a veth/bridge underlay (MTU 1500), endpoint MTU {ep_mtu}, {} against {baseline_name}, {runs} alternating runs each; load average {}",
        names[..base].join(" and "),
        load_average()
    );
    let name = if native {
        "datapath-native"
    } else {
        "datapath"
    };
    let issue = if native { 13 } else { 18 };
    let tag = |i: usize| -> String {
        if native {
            String::new()
        } else {
            format!(" encap={}", encaps[i])
        }
    };
    for streams in [1u32, 4] {
        let (medians, spreads) =
            alternate(&pairs, runs, |pair, _| iperf(pair, 5201, streams, seconds))?;
        let b = medians[base];
        for i in 0..base {
            let m = medians[i];
            println!(
                "TCP throughput, {streams} stream(s): {} {m:.2} Gbit/s [{}], baseline {b:.2} Gbit/s [{}] (median of {runs} x {seconds}s)",
                names[i], spreads[i], spreads[base]
            );
            println!("RESULT {name}-tcp-{streams}stream{} meshd_gbps={m:.2} baseline_gbps={b:.2} ratio={:.3}x goal>=1.1x (issue {issue})", tag(i), m / b);
        }
        if base == 2 {
            println!(
                "RESULT {name}-tcp-{streams}stream program/device={:.3}x",
                medians[1] / medians[0]
            );
        }
    }
    if profile_pass {
        for (i, topo) in meshd.iter().enumerate() {
            profile(topo, &pairs[i].1, seconds, native, encaps[i])?;
        }
    }
    // `--perf 1`: a system-wide perf profile (cpu-clock, call graphs) of one 4-stream run of
    // each path, in /tmp/meshd-perf-{meshd,meshd1,...,baseline}.data, for `perf report --comm
    // iperf3`.
    if arg("--perf", 0) != 0 {
        for (i, (_, pair)) in pairs.iter().enumerate() {
            let file = match i {
                _ if i == base => "baseline".to_owned(),
                0 => "meshd".to_owned(),
                _ => format!("meshd{i}"),
            };
            let perf = std::process::Command::new("perf")
                .args(["record", "-q", "-a", "-g", "-e", "cpu-clock", "-o"])
                .arg(format!("/tmp/meshd-perf-{file}.data"))
                .args(["--", "sleep", &seconds.to_string()])
                .spawn()
                .context("perf record")?;
            let gbps = iperf(pair, 5201, 4, seconds)?;
            perf.wait_with_output()?;
            println!("perf {file}: {gbps:.2} Gbit/s");
        }
    }
    drop(servers);

    let (medians, spreads) = alternate(&pairs, runs, |pair, run| {
        tcp_rr(
            pair.client,
            pair.server,
            pair.server_ip,
            6000 + run as u16,
            rr_transactions,
        )
    })?;
    let b = medians[base];
    for i in 0..base {
        let m = medians[i];
        println!(
            "TCP_RR ({rr_transactions} x 1 byte): {} {m:.1} µs [{}], baseline {b:.1} µs [{}] per transaction (median of {runs})",
            names[i], spreads[i], spreads[base]
        );
        println!(
            "RESULT {name}-tcp-rr{} meshd_us={m:.1} baseline_us={b:.1} ratio={:.3}x goal<=0.9x (issue {issue})",
            tag(i),
            m / b
        );
    }
    if base == 2 {
        println!(
            "RESULT {name}-tcp-rr program/device={:.3}x",
            medians[1] / medians[0]
        );
    }
    println!("load average at the end: {}", load_average());

    for (topo, encap) in meshd.iter().zip(&encaps) {
        if *encap == TunnelEncap::Program {
            for i in 0..topo.nodes.len() {
                println!(
                    "VXLAN device of meshd node {i} (what the programs left to it): {:?}",
                    topo.vxlan_traffic(i)?
                );
            }
        }
        for node in &topo.nodes {
            for c in node.maps.counters()? {
                anyhow::ensure!(
                    c.reason > 0,
                    "meshd node {} dropped packets: {c:?}",
                    node.node_ip
                );
            }
        }
    }
    Ok(())
}
