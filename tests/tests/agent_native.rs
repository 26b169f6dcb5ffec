//! Native routing end to end: two clusters of two nodes on one underlay segment (strict
//! rp_filter on every uplink, a router with an external host behind it), every agent in native
//! mode with auto-direct node routes; and a node behind the router, routed by the network. Endpoint traffic across nodes and clusters crosses the
//! underlay unencapsulated (an AF_PACKET capture on the underlay sees pod addresses and no
//! VXLAN), identity policy holds across clusters with the identity taken from the source
//! address, the agent's node routes follow the nodes, connections survive agent restarts, and
//! the outside reaches endpoints as `world`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use meshd_e2e::capture::UnderlayCapture;
use meshd_e2e::mesh::{far_net, EndpointInfo, LineStream, Mesh, MeshOptions, UNDERLAY_MTU};
use meshd_e2e::netns_io::{self, spawn_echo, spawn_udp_echo, tcp_check, udp_round_trip};
use meshd_e2e::wait_for;
use meshd_state::RoutingMode;

const PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;
const TIMEOUT: Duration = Duration::from_secs(10);
/// c2 lets only c1's clients into its echo endpoints (TCP 8080): not the world.
const POLICY: &str = r#"{"apiVersion":"meshd.io/v1","kind":"NetworkPolicy",
  "metadata":{"name":"echo-from-c1-clients","namespace":"default"},
  "spec":{"endpointSelector":{"matchLabels":{"app":"echo"}},
          "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"client","meshd.io/cluster":"c1"}}],
                      "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

/// The agent's routes in a node's main table (`ip route show proto 211`), as "DEST via GW".
fn agent_routes(mesh: &Mesh, cluster: &str, node: &str) -> anyhow::Result<Vec<String>> {
    let n = mesh.node(cluster, node)?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", n.netns.display()))
        .args(["ip", "-4", "route", "show", "proto", "211"])
        .output()?;
    anyhow::ensure!(out.status.success(), "ip route: {out:?}");
    let mut routes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect();
    routes.sort();
    Ok(routes)
}

fn endpoint_mtu(ep: &EndpointInfo) -> anyhow::Result<u32> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ep.netns.display()))
        .args(["ip", "-o", "link", "show", "eth0"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu");
    Ok(words
        .next()
        .ok_or_else(|| anyhow::anyhow!("no mtu in {text}"))?
        .parse()?)
}

fn tcp_to(from: &EndpointInfo, to: Ipv4Addr) -> anyhow::Result<()> {
    tcp_check(
        &from.netns,
        SocketAddr::from((to, PORT)),
        Duration::from_secs(2),
    )
}

fn ping_udp_tcp(from: &EndpointInfo, to: &EndpointInfo) -> anyhow::Result<()> {
    netns_io::icmp_ping(&from.netns, to.ip, TIMEOUT)?;
    tcp_check(&from.netns, SocketAddr::from((to.ip, PORT)), TIMEOUT)?;
    udp_round_trip(
        &from.netns,
        SocketAddr::from((to.ip, UDP_PORT)),
        format!("{} -> {}", from.name, to.name).as_bytes(),
        TIMEOUT,
    )
}

#[test]
fn a_native_mesh_routes_endpoints_unencapsulated_and_keeps_identities() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2).native().external(UNDERLAY_MTU))?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let web = mesh.add_endpoint("c1", "n1", "web", "app=web")?;
    let near = mesh.add_endpoint("c1", "n2", "near", "app=echo")?;
    let far = mesh.add_endpoint("c2", "n1", "far", "app=echo")?;
    for ep in [&near, &far, &client] {
        spawn_echo(&ep.netns, PORT)?;
        spawn_udp_echo(&ep.netns, UDP_PORT)?;
    }
    assert_eq!(endpoint_mtu(&client)?, UNDERLAY_MTU, "no tunnel overhead");
    // Every uplink filters by reverse path strictly, as a careful network does: a pass below
    // cannot come from a loose setting.
    mesh.check_strict_rp_filter()?;

    // Node routes for every other node of both clusters, all on the segment.
    wait_for("c1/n1's node routes", Duration::from_secs(30), || {
        let routes = agent_routes(&mesh, "c1", "n1")?;
        let want = [
            "10.1.2.0/24 via 192.168.77.12",
            "10.2.1.0/24 via 192.168.77.21",
            "10.2.2.0/24 via 192.168.77.22",
        ];
        anyhow::ensure!(routes == want, "{routes:?}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let status = mesh.status("c1", "n1")?;
    assert_eq!(status["routing"]["mode"], "native", "{status}");
    assert_eq!(status["routing"]["routes_installed"], 3, "{status}");
    assert_eq!(status["routing"]["native_routing_cidr"], "10.0.0.0/8");
    let text = mesh.meshd("c1", "n1", &["status"])?;
    assert!(text.contains("the underlay must be trusted"), "{text}");

    // Across nodes and across clusters, with a capture on the underlay.
    let capture = UnderlayCapture::start(&mesh.underlay.bridge().path())?;
    for to in [&near, &far] {
        wait_for(
            &format!("client -> {}", to.name),
            Duration::from_secs(30),
            || ping_udp_tcp(&client, to),
        )
        .map_err(|e| e.context(mesh.logs()))?;
    }
    // And back: the far side starts connections too.
    ping_udp_tcp(&far, &client)?;
    let seen = capture.finish();
    assert_eq!(seen.vxlan, 0, "no VXLAN on the underlay: {seen:?}");
    assert!(
        seen.pod_ipv4 > 10,
        "endpoint traffic crossed the underlay as it is: {seen:?}"
    );
    // Sent by from-endpoint's FIB redirect, not by the node's stack or a tunnel.
    let status = mesh.status("c1", "n1")?;
    let counted = |name: &str| -> u64 {
        status["datapath"]["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["reason_name"] == name && c["direction"] == "egress")
            .filter_map(|c| c["packets"].as_u64())
            .sum()
    };
    assert!(counted("forwarded-native") > 10, "{status}");
    assert_eq!(counted("forwarded-tunnel"), 0, "{status}");

    // Identity policy across clusters: the receiver takes the sender's identity from its
    // source address.
    mesh.apply_policy("c2", POLICY)?;
    wait_for(
        "the policy to shut c1's web out",
        Duration::from_secs(30),
        || match tcp_to(&web, far.ip) {
            Ok(()) => anyhow::bail!("c1 web still reaches far"),
            Err(_) => Ok(()),
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;
    tcp_to(&client, far.ip).map_err(|e| e.context("the c1 client must stay allowed"))?;

    // The outside: the router routes c1/n1's and c2/n1's pod CIDRs to their nodes (the pod
    // addresses are routable). Without a policy selecting it, an endpoint takes world's
    // connections; far's policy does not allow world.
    let ext = mesh.external.as_ref().expect("outside");
    for (c, n) in [("c1", "n1"), ("c2", "n1")] {
        let node = mesh.node(c, n)?;
        ext.route_to(&node.pod_cidr.to_string(), node.ip)?;
    }
    tcp_check(
        &ext.host.path(),
        SocketAddr::from((client.ip, PORT)),
        TIMEOUT,
    )
    .map_err(|e| e.context(mesh.logs()))?;
    assert!(
        tcp_check(
            &ext.host.path(),
            SocketAddr::from((far.ip, PORT)),
            Duration::from_secs(2)
        )
        .is_err(),
        "world is not allowed into far"
    );

    // Connections outlive agent restarts on both ends.
    let mut conn = netns_io::connect(&client.netns, SocketAddr::from((far.ip, PORT)), TIMEOUT)?;
    netns_io::echo_round_trip(&mut conn, b"before")?;
    mesh.stop_agent("c1", "n1")?;
    mesh.stop_agent("c2", "n1")?;
    netns_io::echo_round_trip(&mut conn, b"while the agents are away")?;
    mesh.start_agent("c1", "n1")?;
    mesh.start_agent("c2", "n1")?;
    netns_io::echo_round_trip(&mut conn, b"after")?;
    mesh.wait_all_ready(Duration::from_secs(60))?;
    netns_io::echo_round_trip(&mut conn, b"after the resync")?;

    // A node goes: its lease runs out, its route goes, the others stay.
    mesh.stop_agent("c1", "n2")?;
    wait_for(
        "c1/n2's route to go from c1/n1",
        Duration::from_secs(30),
        || {
            let routes = agent_routes(&mesh, "c1", "n1")?;
            let want = [
                "10.2.1.0/24 via 192.168.77.21",
                "10.2.2.0/24 via 192.168.77.22",
            ];
            anyhow::ensure!(routes == want, "{routes:?}");
            Ok(())
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;
    tcp_to(&client, far.ip)?;
    Ok(())
}

/// A cluster whose config announces tunnel mode is refused by native nodes, and `clustermesh
/// status` says why; nothing of it enters their maps.
#[test]
fn a_remote_announcing_tunnel_mode_is_refused_by_native_nodes() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(
        MeshOptions::clusters(2, 1)
            .native()
            .announce("c2", RoutingMode::Tunnel),
    )?;
    let ep = mesh.add_endpoint("c2", "n1", "tunnelled", "app=echo")?;
    let c2 = wait_for("c1/n1 to refuse c2", Duration::from_secs(30), || {
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["state"] == "refused", "{c2}");
        Ok(c2)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let refused = c2["refused"].as_str().unwrap_or_default();
    assert!(
        refused.contains("routing mode tunnel") && refused.contains("native"),
        "{refused}"
    );
    let text = mesh.meshd("c1", "n1", &["clustermesh", "status"])?;
    assert!(text.contains("routing mode tunnel"), "{text}");
    assert_eq!(mesh.ipcache_entry("c1", "n1", ep.ip)?, None);
    Ok(())
}

/// Ping, TCP and UDP from each `from` to its `to`, waited for (routes and maps take a moment).
fn reach_each_other(mesh: &Mesh, pairs: &[(&EndpointInfo, &EndpointInfo)]) -> anyhow::Result<()> {
    for (from, to) in pairs {
        wait_for(
            &format!("{} -> {}", from.name, to.name),
            Duration::from_secs(30),
            || ping_udp_tcp(from, to),
        )
        .map_err(|e| e.context(mesh.logs()))?;
    }
    Ok(())
}

/// The routing part of a node's `meshd status -o json`.
fn routing(mesh: &Mesh, cluster: &str, node: &str) -> anyhow::Result<serde_json::Value> {
    Ok(mesh.status(cluster, node)?["routing"].clone())
}

/// The value of an unlabelled metric in a node's `/metrics`.
fn metric(mesh: &Mesh, cluster: &str, node: &str, name: &str) -> anyhow::Result<u64> {
    let text = mesh.metrics(cluster, node)?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no {name} in:\n{text}"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} in:\n{text}"))
}

/// The routes of a node's main table for `prefix` (`ip route show PREFIX`), as printed.
fn routes_for(mesh: &Mesh, cluster: &str, node: &str, prefix: &str) -> anyhow::Result<String> {
    let n = mesh.node(cluster, node)?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", n.netns.display()))
        .args(["ip", "-4", "route", "show", prefix])
        .output()?;
    anyhow::ensure!(out.status.success(), "ip route: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `ip ARGS` in a node's namespace.
fn node_ip_cmd(mesh: &Mesh, cluster: &str, node: &str, args: &[&str]) -> anyhow::Result<()> {
    let n = mesh.node(cluster, node)?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", n.netns.display()))
        .arg("ip")
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "ip {args:?}: {out:?}");
    Ok(())
}

/// c1/n2 sits behind the underlay router on a link of its own (192.168.101.0/24); the router
/// routes its pod CIDR (static routes standing in for a routing protocol) and the pod CIDRs of
/// the nodes on the segment (c1/n1, c2/n1), whose default route is the router. The agents give
/// c1/n2 no direct route (it is not on their uplink's segment): a status line, a counter and a
/// metric, never a crash; c1/n2's agent likewise routes nothing itself. Endpoints on c1/n2 and
/// on both segment nodes reach each other both ways (ping, TCP, UDP) through the router,
/// unencapsulated, with strict rp_filter on every uplink and on the router.
#[test]
fn a_node_behind_the_router_is_routed_by_the_network_and_skipped_by_direct_routes(
) -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut opts = MeshOptions::clusters(2, 1)
        .native()
        .external(UNDERLAY_MTU)
        .node_behind_router("c1", UNDERLAY_MTU);
    opts.clusters[0].2 = 2;
    opts.metrics_port = Some(9962);
    let mesh = Mesh::start(opts)?;
    mesh.check_strict_rp_filter()?;
    let far_node = mesh.node("c1", "n2")?;
    assert!(far_node.behind_router);
    let far_ip = far_node.ip;
    assert!(far_net(1).contains(&far_ip), "{far_ip}");

    // The segment nodes: a direct route to each other, none to c1/n2, and a line saying why.
    wait_for("c1/n1's node routes", Duration::from_secs(30), || {
        let routes = agent_routes(&mesh, "c1", "n1")?;
        anyhow::ensure!(routes == ["10.2.1.0/24 via 192.168.77.21"], "{routes:?}");
        let r = routing(&mesh, "c1", "n1")?;
        anyhow::ensure!(
            r["skipped_nodes"].as_array().map(Vec::len) == Some(1),
            "{r}"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    for (c, n, installed) in [("c1", "n1", 1), ("c2", "n1", 1), ("c1", "n2", 0)] {
        let r = routing(&mesh, c, n)?;
        assert_eq!(r["routes_installed"], installed, "{c}/{n}: {r}");
        assert_eq!(r["route_failures"], 0, "{c}/{n}: {r}");
        assert_eq!(r["route_error"], "", "{c}/{n}: {r}");
    }
    for (c, n) in [("c1", "n1"), ("c2", "n1")] {
        let r = routing(&mesh, c, n)?;
        let lines: Vec<&str> = r["skipped_nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
            .collect();
        assert_eq!(lines.len(), 1, "{c}/{n}: {r}");
        assert!(
            lines[0].contains(&format!("c1/n2 ({far_ip})")) && lines[0].contains("10.1.2.0/24"),
            "{c}/{n}: {r}"
        );
        assert_eq!(r["skipped_total"], 1, "{c}/{n}: {r}");
        assert_eq!(
            metric(&mesh, c, n, "meshd_node_routes_skipped_nodes")?,
            1,
            "{c}/{n}"
        );
        assert_eq!(metric(&mesh, c, n, "meshd_node_routes_installed")?, 1);
        assert!(
            routes_for(&mesh, c, n, "10.1.2.0/24")?.is_empty(),
            "no route of its own for the far pods: the default route (the router) carries them"
        );
    }
    let text = mesh.meshd("c1", "n1", &["status"])?;
    assert!(text.contains("skipped: node c1/n2"), "{text}");
    // Behind the router, nothing is on c1/n2's segment: every other node is skipped.
    wait_for("c1/n2 to skip both others", Duration::from_secs(30), || {
        let r = routing(&mesh, "c1", "n2")?;
        anyhow::ensure!(
            r["skipped_nodes"].as_array().map(Vec::len) == Some(2),
            "{r}"
        );
        anyhow::ensure!(r["skipped_total"] == 2, "{r}");
        Ok(())
    })?;
    assert!(agent_routes(&mesh, "c1", "n2")?.is_empty());

    let far = mesh.add_endpoint("c1", "n2", "far", "app=echo")?;
    let near = mesh.add_endpoint("c1", "n1", "near", "app=echo")?;
    let other = mesh.add_endpoint("c2", "n1", "other", "app=echo")?;
    for ep in [&far, &near, &other] {
        spawn_echo(&ep.netns, PORT)?;
        spawn_udp_echo(&ep.netns, UDP_PORT)?;
    }
    let capture = UnderlayCapture::start(&mesh.underlay.bridge().path())?;
    reach_each_other(
        &mesh,
        &[(&far, &near), (&near, &far), (&far, &other), (&other, &far)],
    )?;
    let seen = capture.finish();
    assert_eq!(seen.vxlan, 0, "no VXLAN on the underlay: {seen:?}");
    assert!(
        seen.pod_ipv4 > 10,
        "endpoint traffic crossed the segment (to and from the router) as it is: {seen:?}"
    );
    // Still serving, still saying the same.
    let r = routing(&mesh, "c1", "n1")?;
    assert_eq!(r["skipped_total"], 1, "{r}");
    assert_eq!(r["route_failures"], 0, "{r}");
    Ok(())
}

/// A node route the agent cannot install: while it was down, someone put a route of their own
/// for c1/n2's pod CIDR in c1/n1's table (a dead gateway, proto static). The restarted agent
/// deletes none of its routes while it resyncs, leaves the obstacle alone, reports the failure (status, counter, metric), keeps retrying, installs
/// every other route and keeps serving; once the obstacle goes, its route follows within a
/// retry and traffic to c1/n2 flows.
#[test]
fn a_route_that_cannot_be_installed_is_retried_and_reported() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut opts = MeshOptions::clusters(2, 1).native();
    opts.clusters[0].2 = 2;
    opts.metrics_port = Some(9962);
    let mut mesh = Mesh::start(opts)?;
    let both = [
        "10.1.2.0/24 via 192.168.77.12",
        "10.2.1.0/24 via 192.168.77.21",
    ];
    wait_for("c1/n1's node routes", Duration::from_secs(30), || {
        let routes = agent_routes(&mesh, "c1", "n1")?;
        anyhow::ensure!(routes == both, "{routes:?}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;

    mesh.stop_agent("c1", "n1")?;
    node_ip_cmd(
        &mesh,
        "c1",
        "n1",
        &["route", "del", "10.1.2.0/24", "proto", "211"],
    )?;
    // Every change of c1/n1's routes from here on: the restarted agent must delete none of
    // its own (a first pass on a view that has not heard from every cluster yet would).
    let monitor = RouteMonitor::start(&mesh.node("c1", "n1")?.netns, "ul0")?;
    node_ip_cmd(
        &mesh,
        "c1",
        "n1",
        &[
            "route",
            "add",
            "10.1.2.0/24",
            "via",
            "192.168.77.99",
            "dev",
            "ul0",
            "proto",
            "static",
        ],
    )?;
    mesh.start_agent("c1", "n1")?;
    mesh.wait_all_ready(Duration::from_secs(60))?;
    // Reported, and retried: the failures keep counting while the obstacle stays.
    let r = wait_for(
        "the failure reported twice",
        Duration::from_secs(30),
        || {
            let r = routing(&mesh, "c1", "n1")?;
            anyhow::ensure!(r["route_failures"].as_u64() >= Some(2), "{r}");
            Ok(r)
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;
    let error = r["route_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("10.1.2.0/24") && error.contains("another route"),
        "{r}"
    );
    assert_eq!(r["routes_installed"], 1, "{r}");
    assert!(metric(&mesh, "c1", "n1", "meshd_node_route_failures_total")? >= 2);
    let text = mesh.meshd("c1", "n1", &["status"])?;
    assert!(
        text.contains("last error: ") && text.contains("10.1.2.0/24"),
        "{text}"
    );
    // Everything else stands: the other route, the obstacle untouched, traffic across clusters.
    assert_eq!(
        agent_routes(&mesh, "c1", "n1")?,
        ["10.2.1.0/24 via 192.168.77.21"]
    );
    let obstacle = routes_for(&mesh, "c1", "n1", "10.1.2.0/24")?;
    assert!(
        obstacle.contains("via 192.168.77.99") && obstacle.contains("proto static"),
        "{obstacle}"
    );
    let near = mesh.add_endpoint("c1", "n1", "near", "app=echo")?;
    let peer = mesh.add_endpoint("c1", "n2", "peer", "app=echo")?;
    let other = mesh.add_endpoint("c2", "n1", "other", "app=echo")?;
    for ep in [&near, &peer, &other] {
        spawn_echo(&ep.netns, PORT)?;
        spawn_udp_echo(&ep.netns, UDP_PORT)?;
    }
    reach_each_other(&mesh, &[(&near, &other), (&other, &near)])?;

    // The obstacle goes: the agent's route follows, the error clears, c1/n2 is reached.
    node_ip_cmd(
        &mesh,
        "c1",
        "n1",
        &["route", "del", "10.1.2.0/24", "proto", "static"],
    )?;
    wait_for("c1/n1's route to c1/n2", Duration::from_secs(30), || {
        let routes = agent_routes(&mesh, "c1", "n1")?;
        anyhow::ensure!(routes == both, "{routes:?}");
        let r = routing(&mesh, "c1", "n1")?;
        anyhow::ensure!(r["route_error"] == "" && r["routes_installed"] == 2, "{r}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    reach_each_other(&mesh, &[(&near, &peer), (&peer, &near)])?;
    let changes = monitor.finish();
    assert!(
        changes
            .iter()
            .any(|l| l.starts_with("10.1.2.0/24 via 192.168.77.12") && l.contains("proto 211")),
        "the monitor saw the route come: {changes:#?}"
    );
    assert!(
        !changes
            .iter()
            .any(|l| l.starts_with("Deleted") && l.contains("proto 211")),
        "the restarted agent deleted a route of its own: {changes:#?}"
    );
    Ok(())
}

/// `ip -4 monitor route` in a node's namespace, killed (and reaped) on drop.
struct RouteMonitor(LineStream);

impl RouteMonitor {
    /// Starts the monitor and returns once it listens: marker routes (198.51.100.N/32 on
    /// `dev`, TEST-NET-2) are added until one shows in its output.
    fn start(netns: &std::path::Path, dev: &str) -> anyhow::Result<RouteMonitor> {
        let stream = LineStream::spawn(
            Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["ip", "-4", "monitor", "route"]),
        )?;
        for n in 1..=50 {
            let marker = format!("198.51.100.{n}");
            let out = Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["ip", "route", "add", &format!("{marker}/32"), "dev", dev])
                .output()?;
            anyhow::ensure!(out.status.success(), "marker route: {out:?}");
            let seen = stream
                .lines
                .recv_timeout(Duration::from_millis(200))
                .is_ok_and(|l| l.starts_with(&format!("{marker} ")));
            if seen {
                return Ok(RouteMonitor(stream));
            }
        }
        anyhow::bail!(
            "ip monitor in {} printed none of 50 marker routes",
            netns.display()
        )
    }

    /// Stops the monitor; every line it printed since it listened.
    fn finish(self) -> Vec<String> {
        self.0.finish()
    }
}

/// The router's side of the link to c1/n2 (behind it) has an MTU of 1280: an endpoint on the
/// segment uploading to an endpoint on c1/n2 with full-size DF segments draws "fragmentation
/// needed" from the router, addressed to the endpoint's own (routable) address; c1/n1's
/// from-netdev delivers it, the endpoint's TCP lowers its path MTU and the transfer completes.
/// (The sink answers with a byte count only, so the way back needs no such error.)
#[test]
fn a_df_transfer_to_a_node_behind_a_narrower_router_link_completes() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(
        MeshOptions::clusters(1, 2)
            .native()
            .external(UNDERLAY_MTU)
            .node_behind_router("c1", 1280),
    )?;
    mesh.check_strict_rp_filter()?;
    let near = mesh.add_endpoint("c1", "n1", "near", "app=client")?;
    let far = mesh.add_endpoint("c1", "n2", "far", "app=sink")?;
    assert_eq!(endpoint_mtu(&near)?, UNDERLAY_MTU);
    const SINK: u16 = 9100;
    netns_io::spawn_sink(&far.netns, SINK)?;
    wait_for("near -> far", Duration::from_secs(30), || {
        netns_io::icmp_ping(&near.netns, far.ip, TIMEOUT)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    netns_io::upload_to_sink(&near.netns, SocketAddr::from((far.ip, SINK)), 256 * 1024)
        .map_err(|e| e.context(mesh.frag_needed_diagnostics("c1", "n1", &near.netns, far.ip)))?;
    // The endpoint's kernel learned the path MTU: the router's error reached it.
    let route = netns_io::route_get(&near.netns, far.ip)?;
    assert!(route.contains("mtu 1280"), "no learned path MTU: {route}");
    Ok(())
}
