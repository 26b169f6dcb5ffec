//! Leaving the mesh, end to end: endpoints of a real agent reach an external host behind an
//! underlay router (every uplink with strict rp_filter), masqueraded to their node's IP by the
//! eBPF datapath, and their replies (and ICMP errors about their packets) find them again.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions, UNDERLAY_MTU};
use meshd_e2e::netns_io::{self, connect_from_port, read_seen_address, spawn_whoami};
use meshd_e2e::wait_for;

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(10);

fn external_addr(mesh: &Mesh) -> SocketAddr {
    let ext = mesh.external.as_ref().expect("mesh with an outside");
    SocketAddr::from((ext.host_ip, PORT))
}

/// A mesh of one node with an outside, a whoami server on the external host, and `n`
/// endpoints.
fn start(opts: MeshOptions, n: usize) -> anyhow::Result<Option<(Mesh, Vec<EndpointInfo>)>> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(None);
    }
    let mesh = Mesh::start(opts)?;
    let ext = mesh.external.as_ref().expect("outside");
    // Every test here runs with strict reverse-path filtering on the uplinks: make sure it
    // holds (with the agent running), so a pass cannot come from a loose setting.
    mesh.check_strict_rp_filter()?;
    spawn_whoami(&ext.host.path(), PORT)?;
    let eps = (0..n)
        .map(|i| mesh.add_endpoint("c1", "n1", &format!("w{i}"), "app=client"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some((mesh, eps)))
}

#[test]
fn two_endpoints_on_one_node_share_a_source_port_to_one_external_address() -> anyhow::Result<()> {
    let Some((mesh, eps)) = start(MeshOptions::clusters(1, 1).external(UNDERLAY_MTU), 2)? else {
        return Ok(());
    };
    let node_ip = mesh.node("c1", "n1")?.ip;
    let to = external_addr(&mesh);
    // Both at once: the first connection stays open while the second is made.
    let mut conns = Vec::new();
    for ep in &eps {
        let mut s = connect_from_port(&ep.netns, 40000, to, TIMEOUT)
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
        let seen = read_seen_address(&mut s)?;
        conns.push((s, seen));
    }
    let seen: Vec<SocketAddr> = conns.iter().map(|(_, a)| *a).collect();
    for a in &seen {
        assert_eq!(
            a.ip(),
            IpAddr::V4(node_ip),
            "masqueraded to the node IP: {seen:?}"
        );
    }
    assert_ne!(
        seen[0].port(),
        seen[1].port(),
        "two flows, two ports: {seen:?}"
    );
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        netns_io::echo_round_trip(s, format!("from endpoint {i}").as_bytes())?;
    }
    Ok(())
}

#[test]
fn an_endpoint_pings_the_external_host_and_reaches_it_unmasqueraded_when_told() -> anyhow::Result<()>
{
    let Some((mesh, eps)) = start(MeshOptions::clusters(1, 1).external(UNDERLAY_MTU), 1)? else {
        return Ok(());
    };
    let ext = mesh.external.as_ref().expect("outside");
    netns_io::icmp_ping(&eps[0].netns, ext.host_ip, TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    // The node itself is `host`: reachable from its endpoint.
    let node_ip = mesh.node("c1", "n1")?.ip;
    netns_io::icmp_ping(&eps[0].netns, node_ip, TIMEOUT)?;
    Ok(())
}

#[test]
fn without_masquerade_the_external_host_sees_the_endpoint() -> anyhow::Result<()> {
    let opts = MeshOptions::clusters(1, 1)
        .external(UNDERLAY_MTU)
        .agent_config("masquerade: false");
    let Some((mesh, eps)) = start(opts, 1)? else {
        return Ok(());
    };
    let node = mesh.node("c1", "n1")?;
    let ext = mesh.external.as_ref().expect("outside");
    // The router carries pod addresses only if it routes the pod CIDRs to their nodes.
    ext.route_to(&node.pod_cidr.to_string(), node.ip)?;
    let mut s = netns_io::connect(&eps[0].netns, external_addr(&mesh), TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    let seen = read_seen_address(&mut s)?;
    assert_eq!(
        seen.ip(),
        IpAddr::V4(eps[0].ip),
        "the endpoint's own address"
    );
    netns_io::echo_round_trip(&mut s, b"unmasqueraded")?;
    netns_io::icmp_ping(&eps[0].netns, ext.host_ip, TIMEOUT)?;
    // And the outside can start connections to the endpoint (default-allow, no policy).
    netns_io::spawn_echo(&eps[0].netns, 9000)?;
    netns_io::tcp_check(
        &ext.host.path(),
        SocketAddr::from((eps[0].ip, 9000)),
        TIMEOUT,
    )?;
    Ok(())
}

/// The router's interface towards the external host has an MTU of 1280: the endpoint's
/// full-size DF segments (MTU 1450) draw "fragmentation needed" from the router, addressed to
/// the node IP they came from; from-netdev translates it back to the endpoint, whose TCP lowers
/// its path MTU and completes the transfer. (The host answers with a byte count only: its side
/// of that link keeps MTU 1500, so its own full-size segments would not fit the router's.)
#[test]
fn an_icmp_frag_needed_about_a_masqueraded_flow_reaches_the_endpoint() -> anyhow::Result<()> {
    let Some((mesh, eps)) = start(MeshOptions::clusters(1, 1).external(1280), 1)? else {
        return Ok(());
    };
    let ext = mesh.external.as_ref().expect("outside");
    const SINK: u16 = 9100;
    netns_io::spawn_sink(&ext.host.path(), SINK)?;
    netns_io::upload_to_sink(
        &eps[0].netns,
        SocketAddr::from((ext.host_ip, SINK)),
        256 * 1024,
    )
    .map_err(|e| e.context(mesh.frag_needed_diagnostics("c1", "n1", &eps[0].netns, ext.host_ip)))?;
    // The endpoint's kernel learned the path MTU: the router's error reached it.
    let route = netns_io::route_get(&eps[0].netns, ext.host_ip)?;
    assert!(route.contains("mtu 1280"), "no learned path MTU: {route}");
    Ok(())
}

/// Drops of `reason_name` on the node, as `meshd status` counts them.
fn dropped(mesh: &Mesh, reason_name: &str) -> anyhow::Result<u64> {
    mesh.counted("c1", "n1", reason_name)
}

/// With 8 SNAT ports, 8 connections to one external address:port hold them all; the ninth is
/// dropped as `nat-no-port` (shown by `meshd monitor`, counted by `meshd status`), and once a
/// connection has closed (its mapping expires with it) a new one gets through.
#[test]
fn exhausting_the_snat_ports_shows_nat_no_port_and_recovers() -> anyhow::Result<()> {
    let opts = MeshOptions::clusters(1, 1)
        .external(UNDERLAY_MTU)
        .agent_config("snat_port_range: 61000-61007");
    let Some((mesh, eps)) = start(opts, 1)? else {
        return Ok(());
    };
    let ep = &eps[0];
    let to = external_addr(&mesh);
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = netns_io::connect(&ep.netns, to, TIMEOUT)
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
        read_seen_address(&mut s)?;
        held.push(s);
    }

    let node = mesh.node("c1", "n1")?;
    let mut monitor = Command::new(meshd_e2e::mesh::meshd_binary()?)
        .args(["monitor", "-o", "json", "--count", "1", "--socket"])
        .arg(&node.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // The monitor may still be subscribing when the first SYN goes: retry until it saw one.
    let ninth = netns_io::connect(&ep.netns, to, Duration::from_secs(3));
    assert!(ninth.is_err(), "a ninth connection got a port");
    let deadline = Instant::now() + Duration::from_secs(30);
    while monitor.try_wait()?.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "monitor showed no drop");
        let _ = netns_io::connect(&ep.netns, to, Duration::from_secs(1));
    }
    let mut out = String::new();
    monitor
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)?;
    let drop: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(drop["reason_name"], "nat-no-port", "{drop}");
    assert_eq!(drop["saddr"], ep.ip.to_string(), "{drop}");
    assert_eq!(drop["dport"], PORT, "{drop}");
    assert!(dropped(&mesh, "nat-no-port")? > 0);

    // One connection closes; its mapping lives as long as its CT entry (10 s once closing).
    drop_connection(held.pop().expect("eight"));
    wait_for("a port to be free again", Duration::from_secs(40), || {
        let mut s = netns_io::connect(&ep.netns, to, Duration::from_secs(2))?;
        read_seen_address(&mut s)?;
        Ok(())
    })?;
    Ok(())
}

fn drop_connection(s: std::net::TcpStream) {
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// A masqueraded connection survives a restart of the agent: maps and links are pinned, the
/// new agent writes the same egress settings, and NAT mappings are never rewritten.
#[test]
fn an_agent_restart_breaks_no_masqueraded_connection() -> anyhow::Result<()> {
    let Some((mut mesh, eps)) = start(MeshOptions::clusters(1, 1).external(UNDERLAY_MTU), 1)?
    else {
        return Ok(());
    };
    let mut s = netns_io::connect(&eps[0].netns, external_addr(&mesh), TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    let before = read_seen_address(&mut s)?;
    netns_io::echo_round_trip(&mut s, b"before the restart")?;
    mesh.start_agent("c1", "n1")?;
    mesh.wait_all_ready(Duration::from_secs(60))?;
    netns_io::echo_round_trip(&mut s, b"after the restart")?;
    // A new connection from the same endpoint gets through too, on another mapping.
    let mut t = netns_io::connect(&eps[0].netns, external_addr(&mesh), TIMEOUT)?;
    let after = read_seen_address(&mut t)?;
    assert_eq!(after.ip(), before.ip());
    netns_io::echo_round_trip(&mut t, b"new")?;
    Ok(())
}

/// "Destinations outside every cluster's pod CIDRs" are masqueraded, the others never: an
/// address inside cluster c2's pod CIDR that no ipcache entry names (here one the router
/// carries to the external host) is reached with the endpoint's own address while c2 is in
/// the mesh, and masqueraded once c1 disconnects from c2 (NO_MASQ follows the remotes).
#[test]
fn another_clusters_pod_cidr_is_never_masqueraded_while_it_is_in_the_mesh() -> anyhow::Result<()> {
    let Some((mesh, eps)) = start(MeshOptions::clusters(2, 1).external(UNDERLAY_MTU), 1)? else {
        return Ok(());
    };
    let ext = mesh.external.as_ref().expect("outside");
    let (c1, c2) = (mesh.node("c1", "n1")?, mesh.node("c2", "n1")?);
    let stray = std::net::Ipv4Addr::from(u32::from(c2.pod_cidr.network()) + 200);
    ext.host
        .ip(&["addr", "add", &format!("{stray}/32"), "dev", "eth0"])?;
    ext.route_to(&format!("{stray}/32"), ext.host_ip)?;
    // Replies to an unmasqueraded source find their way back.
    ext.route_to(&c1.pod_cidr.to_string(), c1.ip)?;
    let no_masq = || -> anyhow::Result<Vec<ipnet::Ipv4Net>> {
        Ok(meshd_datapath::DatapathMaps::open(&c1.pin_dir)?.no_masquerade()?)
    };
    let have = no_masq()?;
    anyhow::ensure!(
        have.contains(&c2.pod_cidr) && have.contains(&c1.pod_cidr),
        "NO_MASQ of c1/n1: {have:?}"
    );
    let to = SocketAddr::from((stray, PORT));
    let mut s = netns_io::connect(&eps[0].netns, to, TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", mesh.logs()))?;
    let seen = read_seen_address(&mut s)?;
    assert_eq!(
        seen.ip(),
        IpAddr::V4(eps[0].ip),
        "c2's pod CIDR sees the endpoint"
    );

    std::fs::remove_file(mesh.remotes_dir("c1").join("c2"))?;
    wait_for(
        "c2's pod CIDR to leave NO_MASQ",
        Duration::from_secs(30),
        || {
            let have = no_masq()?;
            anyhow::ensure!(!have.contains(&c2.pod_cidr), "{have:?}");
            Ok(())
        },
    )?;
    assert!(no_masq()?.contains(&c1.pod_cidr), "the node's own stays");
    let mut s = netns_io::connect(&eps[0].netns, to, TIMEOUT)?;
    let seen = read_seen_address(&mut s)?;
    assert_eq!(seen.ip(), IpAddr::V4(c1.ip), "now the world: masqueraded");
    Ok(())
}
