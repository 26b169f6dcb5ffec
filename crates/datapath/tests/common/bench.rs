//! What the datapath benchmarks share: their arguments and the summaries of their samples.

/// The number after `name` on the command line, or `default`.
pub fn arg(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
    use anyhow::Context;
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
