//! What the datapath benchmarks share: their arguments and the summaries of their samples.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// The number after `name` on the command line, or `default`.
pub fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Keeps the CPUs out of idle states slower to leave than `us` microseconds for as long as the
/// returned file stays open (the kernel's PM QoS request `/dev/cpu_dma_latency`; what
/// cyclictest and tuned's latency-performance profile do). On an idle VM a halted vCPU's
/// wake-up costs tens of microseconds, paid by every round trip whatever path it takes, so a
/// latency comparison would mostly measure it.
pub fn hold_cpu_latency(us: i32) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    use std::io::Write;
    let path = "/dev/cpu_dma_latency";
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    file.write_all(&us.to_ne_bytes())
        .with_context(|| format!("writing {us} to {path}"))?;
    Ok(file)
}

/// The arguments of the endpoint-to-endpoint TCP benches: `--runs N` (default 9), `--seconds S`
/// (4, per iperf3 run), `--rr N` (20000 TCP_RR transactions per run).
pub struct TcpArgs {
    pub runs: u32,
    pub seconds: u32,
    pub rr_transactions: u32,
}

/// [`TcpArgs`] from the command line, or `None` (after saying why) where such a bench cannot
/// run: not root, no bpffs, no iperf3.
pub fn tcp_args() -> Option<TcpArgs> {
    if !super::can_run() || !meshd_testing::require("iperf3", meshd_testing::have_binary("iperf3"))
    {
        return None;
    }
    Some(TcpArgs {
        runs: arg("--runs", 9),
        seconds: arg("--seconds", 4),
        rr_transactions: arg("--rr", 20_000),
    })
}

/// The two nodes' underlay addresses in the baselines wired the plain kernel way.
pub const NODE_IPS: [std::net::Ipv4Addr; 2] = [
    std::net::Ipv4Addr::new(192, 168, 61, 1),
    std::net::Ipv4Addr::new(192, 168, 61, 2),
];

/// A bridge underlay (MTU 1500) with two node namespaces `{prefix}-n0` and `{prefix}-n1` at
/// [`NODE_IPS`], IP forwarding on in both.
pub fn two_routing_nodes(prefix: &str) -> anyhow::Result<meshd_testing::netns::Underlay> {
    let mut underlay = meshd_testing::netns::Underlay::new(prefix, 1500)?;
    for (i, ip) in NODE_IPS.iter().enumerate() {
        underlay.add_node(&format!("{prefix}-n{i}"), *ip)?;
        underlay
            .node(i)
            .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    }
    Ok(underlay)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// "min..max" of the samples: with other work on the machine the spread is the honest error bar.
pub fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}..{max:.2}")
}

/// The machine's load average over 1, 5 and 15 minutes.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A baseline endpoint wired the plain kernel way (no eBPF): a namespace named after `prefix`
/// behind a veth `host_ifname` of `node` (MTU 1450, as meshd's endpoints on a 1500 underlay),
/// the node's side `gateway`, the endpoint's `address` (same subnet) with a default route via
/// the node.
pub fn plain_endpoint(
    node: &meshd_testing::netns::Netns,
    prefix: &str,
    host_ifname: &str,
    gateway: ipnet::Ipv4Net,
    address: ipnet::Ipv4Net,
) -> anyhow::Result<meshd_testing::netns::Netns> {
    plain_endpoint_mtu(node, prefix, host_ifname, gateway, address, 1450)
}

/// [`plain_endpoint`] with veth MTU `mtu` (1500: native routing's full underlay MTU).
pub fn plain_endpoint_mtu(
    node: &meshd_testing::netns::Netns,
    prefix: &str,
    host_ifname: &str,
    gateway: ipnet::Ipv4Net,
    address: ipnet::Ipv4Net,
    mtu: u32,
) -> anyhow::Result<meshd_testing::netns::Netns> {
    let mtu = mtu.to_string();
    let ep = meshd_testing::netns::Netns::new(prefix)?;
    node.ip(&[
        "link",
        "add",
        host_ifname,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "mtu",
        &mtu,
        "netns",
        ep.name(),
    ])?;
    node.ip(&["addr", "add", &gateway.to_string(), "dev", host_ifname])?;
    node.ip(&["link", "set", host_ifname, "up"])?;
    ep.ip(&["addr", "add", &address.to_string(), "dev", "eth0"])?;
    ep.ip(&["link", "set", "eth0", "up"])?;
    ep.ip(&[
        "route",
        "add",
        "default",
        "via",
        &gateway.addr().to_string(),
    ])?;
    Ok(ep)
}

/// One iperf3 TCP run from `client` to the server at `server:port`: the received rate in
/// Gbit/s. Bounded: iperf3 waits forever for a server stuck in an earlier test (seen here:
/// a server left with a closed control connection), so the client has a connect timeout and
/// is killed when it overruns its run by far; the caller sees an error.
pub fn iperf3_gbps(
    client: &meshd_testing::netns::Netns,
    server: std::net::Ipv4Addr,
    port: u16,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<f64> {
    let limit = (3 * seconds + 20).to_string();
    let out = client.run(
        "timeout",
        &[
            "-k",
            "5",
            &limit,
            "iperf3",
            "--connect-timeout",
            "5000",
            "-c",
            &server.to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// Mean round trip (µs) of `transactions` 1-byte request/responses on one TCP connection
/// from `client` to a one-connection echo server on `server_ip:port` in `server` (TCP_RR
/// style, Nagle off both ends, after 100 warm-up transactions).
pub fn tcp_rr(
    client: &meshd_testing::netns::Netns,
    server: &meshd_testing::netns::Netns,
    server_ip: std::net::Ipv4Addr,
    port: u16,
    transactions: u32,
) -> anyhow::Result<f64> {
    let listener =
        meshd_datapath::netns::run_in(&server.path(), || -> anyhow::Result<TcpListener> {
            Ok(TcpListener::bind((server_ip, port))?)
        })?;
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read(&mut b)? == 1 {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = meshd_datapath::netns::run_in(&client.path(), || -> anyhow::Result<TcpStream> {
        Ok(TcpStream::connect((server_ip, port))?)
    })?;
    c.set_nodelay(true)?;
    let mut b = [1u8; 1];
    for _ in 0..100 {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    let start = Instant::now();
    for _ in 0..transactions {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    let elapsed = start.elapsed();
    drop(c);
    echo.join().expect("rr server")?;
    Ok(elapsed.as_secs_f64() * 1e6 / f64::from(transactions))
}

/// A server in `netns` answering each connection's byte, then waiting for the
/// client to close: `workers` threads accepting on one listener, each serving its connection
/// itself (a thread spawned per connection made the server, shared by both paths, the
/// bottleneck). Its threads live as long as the bench.
pub fn spawn_byte_server(netns: &Path, addr: SocketAddr, workers: u32) -> anyhow::Result<()> {
    let listener = Arc::new(meshd_datapath::netns::run_in(
        netns,
        || -> anyhow::Result<TcpListener> { Ok(TcpListener::bind(addr)?) },
    )?);
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
pub fn connect_loop(
    client: &Path,
    to: SocketAddr,
    threads: u32,
    per_thread: u32,
) -> anyhow::Result<f64> {
    meshd_datapath::netns::run_in(client, || -> anyhow::Result<f64> {
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

/// A meshd path against its nftables baseline, measured alike and printed alike: how it names
/// itself in the output.
pub struct Comparison<'a> {
    /// The RESULT lines' prefix (`masquerade`, `nodeport`).
    pub label: &'a str,
    /// The path, as the summary lines say it ("to the external host").
    pub path: &'a str,
    /// After the ratio on the RESULT lines ("goal>=1.0x (issue 12)").
    pub note: &'a str,
    /// The baseline's name in the output and the RESULT keys (`nftables`, `iptables`).
    pub baseline: &'a str,
    pub runs: u32,
}

impl Comparison<'_> {
    /// TCP throughput with 1 and 4 streams: `runs` samples of each path in turn
    /// (`sample(path, streams)`, 0 meshd and 1 the baseline, in Gbit/s), their medians and
    /// spreads, the ratio of the medians and the median of the per-run ratios (each run's two
    /// samples are neighbours in time, so their ratio shares the load of that moment).
    pub fn throughput(
        &self,
        seconds: u32,
        mut sample: impl FnMut(usize, u32) -> anyhow::Result<f64>,
    ) -> anyhow::Result<()> {
        let (runs, label, path, note) = (self.runs, self.label, self.path, self.note);
        let base = self.baseline;
        for streams in [1u32, 4] {
            let mut results = [Vec::new(), Vec::new()];
            for _ in 0..runs {
                for (i, result) in results.iter_mut().enumerate() {
                    result.push(sample(i, streams)?);
                }
            }
            let ratios: Vec<f64> = results[0]
                .iter()
                .zip(&results[1])
                .map(|(m, b)| m / b)
                .collect();
            let spreads = [spread(&results[0]), spread(&results[1]), spread(&ratios)];
            let [m, b] = results.map(median);
            let r = median(ratios);
            println!(
                "TCP throughput {path}, {streams} stream(s): meshd {m:.2} Gbit/s [{}], {base} {b:.2} Gbit/s [{}] (median of {runs} x {seconds}s); per-run ratio median {r:.2}x [{}]",
                spreads[0], spreads[1], spreads[2]
            );
            println!(
                "RESULT {label}-tcp-{streams}stream meshd_gbps={m:.2} {base}_gbps={b:.2} ratio={:.3}x run_ratio={r:.3}x {note}",
                m / b
            );
        }
        Ok(())
    }

    /// New connections per second: each run both paths at once (load drift on a shared machine
    /// hits both alike), `threads` loops of `per_thread` connections from `clients[path].0` to
    /// `clients[path].1` (`clients(run)`, fresh servers and ports per run); the medians, their
    /// spreads and the median ratio.
    pub fn connection_rate(
        &self,
        threads: u32,
        per_thread: u32,
        mut clients: impl FnMut(u32) -> anyhow::Result<[(std::path::PathBuf, SocketAddr); 2]>,
    ) -> anyhow::Result<()> {
        let (label, path, note, base) = (self.label, self.path, self.note, self.baseline);
        let mut rates = [Vec::new(), Vec::new()];
        let mut ratios = Vec::new();
        for run in 0..self.runs {
            let [(mc, mto), (bc, bto)] = clients(run)?;
            let (m, b) = std::thread::scope(|scope| {
                let m = scope.spawn(|| connect_loop(&mc, mto, threads, per_thread));
                let b = scope.spawn(|| connect_loop(&bc, bto, threads, per_thread));
                (
                    m.join().expect("meshd loop"),
                    b.join().expect("baseline loop"),
                )
            });
            let (m, b) = (m.context("meshd")?, b.context(base.to_string())?);
            println!(
                "run {run}: meshd {m:.0} conn/s, {base} {b:.0} conn/s = {:.2}x",
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
            "new connections/s {path} ({threads} threads x {per_thread} each way, both at once): meshd {m:.0} [{}], {base} {b:.0} [{}]; ratio median {r:.2}x [{}]",
            spreads[0], spreads[1], spreads[2]
        );
        println!("RESULT {label}-connrate meshd_cps={m:.0} {base}_cps={b:.0} ratio={r:.3}x {note}");
        Ok(())
    }
}

/// One path of an iperf3 comparison: its server's namespace (it listens on `port`) and the
/// client's, which connects to `to`:`port`.
pub struct Iperf3Path<'a> {
    pub name: &'a str,
    pub server: &'a meshd_testing::netns::Netns,
    pub client: &'a meshd_testing::netns::Netns,
    pub to: std::net::Ipv4Addr,
    pub port: u16,
}

/// Two paths' iperf3 servers (one each, so that a server stuck in one path's test never holds
/// up the other's) and their samples: a failed sample restarts its path's server and is
/// retried once, and every failure is counted.
pub struct Iperf3Pair<'a> {
    paths: [Iperf3Path<'a>; 2],
    servers: [Option<meshd_testing::netns::ChildGuard>; 2],
    failures: [u32; 2],
}

impl<'a> Iperf3Pair<'a> {
    pub fn start(paths: [Iperf3Path<'a>; 2]) -> anyhow::Result<Self> {
        let mut pair = Iperf3Pair {
            paths,
            servers: [None, None],
            failures: [0; 2],
        };
        for i in 0..2 {
            pair.restart(i)?;
        }
        Ok(pair)
    }

    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i] = None;
        let p = &self.paths[i];
        let guard = p
            .server
            .spawn("iperf3", &["-s", "-p", &p.port.to_string()])?;
        std::thread::sleep(Duration::from_millis(300));
        self.servers[i] = Some(guard);
        Ok(())
    }

    /// One sample of path `i` (Gbit/s).
    pub fn sample(&mut self, i: usize, streams: u32, seconds: u32) -> anyhow::Result<f64> {
        let p = &self.paths[i];
        let (name, client, to, port) = (p.name, p.client, p.to, p.port);
        match iperf3_gbps(client, to, port, streams, seconds) {
            Ok(gbps) => Ok(gbps),
            Err(e) => {
                self.failures[i] += 1;
                println!("{name}: a {streams}-stream sample failed ({e:#}); its server restarts");
                self.restart(i)?;
                iperf3_gbps(client, to, port, streams, seconds)
                    .with_context(|| format!("{name}: a {streams}-stream sample failed twice"))
            }
        }
    }

    /// Checks that both paths carry a transfer at all.
    pub fn check(&mut self) -> anyhow::Result<()> {
        for i in 0..2 {
            let name = self.paths[i].name;
            self.sample(i, 1, 1)
                .with_context(|| format!("{name}: first transfer"))?;
        }
        Ok(())
    }

    /// Prints the failed samples and stops the servers.
    pub fn finish(self) {
        println!(
            "failed throughput samples (retried): {} {}, {} {}",
            self.paths[0].name, self.failures[0], self.paths[1].name, self.failures[1]
        );
    }
}
