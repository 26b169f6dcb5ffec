//! Native routing end to end: two clusters of two nodes on one underlay segment (strict
//! rp_filter on every uplink, a router with an external host behind it), every agent in native
//! mode with auto-direct node routes. Endpoint traffic across nodes and clusters crosses the
//! underlay unencapsulated (an AF_PACKET capture on the underlay sees pod addresses and no
//! VXLAN), identity policy holds across clusters with the identity taken from the source
//! address, the agent's node routes follow the nodes, connections survive agent restarts, and
//! the outside reaches endpoints as `world`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use meshd_e2e::capture::UnderlayCapture;
use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions, UNDERLAY_MTU};
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
