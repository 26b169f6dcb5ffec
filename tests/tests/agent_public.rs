//! Public endpoints end to end (issue 14): real agents of one cluster of two nodes, an
//! external host behind the underlay's router (strict rp_filter everywhere), and a NodePort
//! service published in etcd as the apiserver would. The external host connects to a node's
//! IP at the node port and is served by an endpoint on that node (which sees the client's own
//! address) or on the other node (SNATed to the node it came in by, through the tunnel);
//! `externalTrafficPolicy: Local` refuses on a node without a backend (counted as
//! `no-local-backend` in `meshd status`), and its health check node port answers 200 / 503.
//! A policy that admits no `world` keeps the outside client out on both paths; a backend
//! deleted under traffic resets its open connections (never a black hole) while new ones go to
//! the backends left. Tunnel and native routing.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions, UNDERLAY_MTU};
use meshd_e2e::netns_io::{self, read_seen_address, spawn_whoami};
use meshd_e2e::wait_for;
use meshd_state::{
    Affinity, Protocol, ServiceBackend, ServiceFrontend, ServiceRecord, ServiceType, TrafficPolicy,
};

const NODE_PORT: u16 = 30080;
const HEALTH_PORT: u16 = 32000;
const BACKEND_PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(5);
const CONVERGE: Duration = Duration::from_secs(30);

fn record(backends: &[&EndpointInfo], policy: TrafficPolicy) -> ServiceRecord {
    ServiceRecord {
        namespace: "default".into(),
        name: "web".into(),
        frontends: vec![ServiceFrontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            port_name: "http".into(),
            node_port: Some(NODE_PORT),
        }],
        backends: backends
            .iter()
            .map(|ep| ServiceBackend {
                ip: IpAddr::V4(ep.ip),
                port: BACKEND_PORT,
                protocol: Protocol::Tcp,
                ready: true,
                port_name: "http".into(),
            })
            .collect(),
        global: false,
        shared: false,
        affinity: Affinity::None,
        service_type: ServiceType::NodePort,
        external_ips: Vec::new(),
        load_balancer_ip: None,
        external_traffic_policy: policy,
        health_check_node_port: (policy == TrafficPolicy::Local).then_some(HEALTH_PORT),
    }
}

struct Setup {
    mesh: Mesh,
    /// A backend on n1 and one on n2, each serving whoami.
    web: [EndpointInfo; 2],
    n1: Ipv4Addr,
    n2: Ipv4Addr,
}

/// One cluster of two nodes and the outside, in tunnel or native routing.
fn outside(native: bool) -> MeshOptions {
    let opts = MeshOptions::clusters(1, 2).external(UNDERLAY_MTU);
    if native {
        opts.native()
    } else {
        opts
    }
}

fn start() -> anyhow::Result<Option<Setup>> {
    start_with(outside(false))
}

fn start_with(opts: MeshOptions) -> anyhow::Result<Option<Setup>> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(None);
    }
    let mesh = Mesh::start(opts)?;
    mesh.check_strict_rp_filter()?;
    let web = [
        mesh.add_endpoint("c1", "n1", "web1", "app=web")?,
        mesh.add_endpoint("c1", "n2", "web2", "app=web")?,
    ];
    for ep in &web {
        spawn_whoami(&ep.netns, BACKEND_PORT)?;
    }
    let (n1, n2) = (mesh.node("c1", "n1")?.ip, mesh.node("c1", "n2")?.ip);
    Ok(Some(Setup { mesh, web, n1, n2 }))
}

/// A connection from the external host to `node`:`port`.
fn from_outside(mesh: &Mesh, node: Ipv4Addr, port: u16) -> anyhow::Result<TcpStream> {
    let ext = mesh.external.as_ref().expect("outside");
    let s = netns_io::connect(&ext.host.path(), SocketAddr::from((node, port)), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// From the external host to `node`:NODE_PORT: the address the backend saw, after an echo.
fn via_node_port(mesh: &Mesh, node: Ipv4Addr) -> anyhow::Result<SocketAddr> {
    let mut s = from_outside(mesh, node, NODE_PORT)?;
    let seen = read_seen_address(&mut s)?;
    netns_io::echo_round_trip(&mut s, b"from outside")?;
    Ok(seen)
}

/// `GET /` from the external host to `node`:HEALTH_PORT: the status code and body.
fn health(mesh: &Mesh, node: Ipv4Addr) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut s = from_outside(mesh, node, HEALTH_PORT)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {out:?}"))?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((code, serde_json::from_str(body)?))
}

#[test]
fn an_outside_client_reaches_backends_on_the_node_and_on_another_through_a_node_port(
) -> anyhow::Result<()> {
    outside_client_through_a_node_port(outside(false))
}

#[test]
fn in_native_routing_an_outside_client_reaches_backends_through_a_node_port() -> anyhow::Result<()>
{
    outside_client_through_a_node_port(outside(true))
}

fn outside_client_through_a_node_port(opts: MeshOptions) -> anyhow::Result<()> {
    let Some(Setup { mesh, web, n1, .. }) = start_with(opts)? else {
        return Ok(());
    };
    let ext_ip = IpAddr::V4(mesh.external.as_ref().expect("outside").host_ip);
    // Only the backend on n1: n1 keeps the client's address.
    mesh.publish_service("c1", &record(&[&web[0]], TrafficPolicy::Cluster))?;
    let seen = wait_for("n1's node port to serve", CONVERGE, || {
        via_node_port(&mesh, n1)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    assert_eq!(seen.ip(), ext_ip, "a local backend sees the client");

    // Only the backend on n2: n1 SNATs and tunnels; n2's backend sees n1.
    mesh.publish_service("c1", &record(&[&web[1]], TrafficPolicy::Cluster))?;
    let seen = wait_for("n1's node port to reach n2's backend", CONVERGE, || {
        let seen = via_node_port(&mesh, n1)?;
        anyhow::ensure!(seen.ip() != ext_ip, "still the local backend: {seen}");
        Ok(seen)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    assert_eq!(
        seen.ip(),
        IpAddr::V4(n1),
        "SNATed to the node the client came in by"
    );
    // Several connections, each on its own SNAT port.
    let ports: std::collections::BTreeSet<u16> = (0..4)
        .map(|_| via_node_port(&mesh, n1).map(|s| s.port()))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(ports.len(), 4, "{ports:?}");
    Ok(())
}

#[test]
fn local_policy_refuses_without_a_local_backend_and_the_health_check_says_so() -> anyhow::Result<()>
{
    let Some(Setup { mesh, web, n1, n2 }) = start()? else {
        return Ok(());
    };
    let ext_ip = IpAddr::V4(mesh.external.as_ref().expect("outside").host_ip);
    mesh.publish_service("c1", &record(&[&web[0]], TrafficPolicy::Local))?;
    let (code, body) = wait_for("n1's health check", CONVERGE, || health(&mesh, n1))
        .map_err(|e| e.context(mesh.logs()))?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "web");
    let (code, body) = wait_for("n2's health check", CONVERGE, || health(&mesh, n2))?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["localEndpoints"], 0);

    let seen = wait_for("n1's node port", CONVERGE, || via_node_port(&mesh, n1))?;
    assert_eq!(seen.ip(), ext_ip, "Local keeps the client's address");
    let before = mesh.counted("c1", "n2", "no-local-backend")?;
    assert!(
        via_node_port(&mesh, n2).is_err(),
        "n2 has no backend of its own"
    );
    let after = mesh.counted("c1", "n2", "no-local-backend")?;
    assert!(after > before, "counted: {before} -> {after}");

    // The health check follows the backends: n2's own backend joins.
    mesh.publish_service(
        "c1",
        &record(&web.iter().collect::<Vec<_>>(), TrafficPolicy::Local),
    )?;
    wait_for("n2's health check to turn 200", CONVERGE, || {
        let (code, body) = health(&mesh, n2)?;
        anyhow::ensure!(code == 200, "{code} {body}");
        Ok(())
    })?;
    let seen = wait_for("n2's node port", CONVERGE, || via_node_port(&mesh, n2))?;
    assert_eq!(seen.ip(), ext_ip);

    // Back to Cluster: no health check node port any more.
    mesh.publish_service("c1", &record(&[&web[0]], TrafficPolicy::Cluster))?;
    wait_for("the health check node port to close", CONVERGE, || {
        anyhow::ensure!(health(&mesh, n1).is_err(), "still answering");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_policy_without_world_keeps_outside_clients_out_on_both_paths() -> anyhow::Result<()> {
    policy_without_world(outside(false))
}

/// Native routing: the path to a backend on another node arrives there from the entry node's
/// address (SNAT, no VNI to carry `world`): a policy admitting neither keeps it out as well.
#[test]
fn in_native_routing_a_policy_without_world_keeps_outside_clients_out_on_both_paths(
) -> anyhow::Result<()> {
    policy_without_world(outside(true))
}

fn policy_without_world(opts: MeshOptions) -> anyhow::Result<()> {
    let Some(Setup { mesh, web, n1, .. }) = start_with(opts)? else {
        return Ok(());
    };
    mesh.apply_policy(
        "c1",
        "apiVersion: meshd.io/v1\nkind: NetworkPolicy\nmetadata: { name: web-from-clients }\nspec:\n  endpointSelector: { matchLabels: { app: web } }\n  ingress:\n    - fromEndpoints: [ { matchLabels: { app: client } } ]\n",
    )?;
    for (i, backend) in web.iter().enumerate() {
        let node = if i == 0 { "n1" } else { "n2" };
        mesh.publish_service("c1", &record(&[backend], TrafficPolicy::Cluster))?;
        let before = mesh.counted("c1", node, "policy-denied")?;
        // Until the service and the policy are in the maps, a try may fail or pass for other
        // reasons: try until one is refused and the backend's node counts a policy drop.
        wait_for(
            "the backend's policy to deny the outside client",
            CONVERGE,
            || {
                let tried = via_node_port(&mesh, n1);
                anyhow::ensure!(tried.is_err(), "an outside client got through: {tried:?}");
                let now = mesh.counted("c1", node, "policy-denied")?;
                anyhow::ensure!(now > before, "no policy drop on {node} yet");
                Ok(())
            },
        )
        .map_err(|e| e.context(mesh.logs()))?;
        assert!(via_node_port(&mesh, n1).is_err(), "denied via {node}");
    }
    Ok(())
}

/// An open connection from outside through `node`'s node port, served by the backend for which
/// `served(seen address)` holds (connections are retried until one lands there).
fn connection_served_by(
    mesh: &Mesh,
    node: Ipv4Addr,
    what: &str,
    served: impl Fn(SocketAddr) -> bool,
) -> anyhow::Result<TcpStream> {
    wait_for(what, CONVERGE, || {
        let mut s = from_outside(mesh, node, NODE_PORT)?;
        let seen = read_seen_address(&mut s)?;
        anyhow::ensure!(served(seen), "served elsewhere (seen as {seen})");
        netns_io::echo_round_trip(&mut s, b"before")?;
        Ok(s)
    })
}

/// What became of an open connection whose backend was deleted: the next write must be
/// answered by a reset (or an error the kernel reports, such as an ICMP unreachable), never by
/// silence until the timeout (a black hole).
fn after_its_backend_left(stream: &mut TcpStream) -> anyhow::Result<std::io::ErrorKind> {
    let started = std::time::Instant::now();
    let kind = match netns_io::echo_round_trip(stream, b"after") {
        Ok(()) => anyhow::bail!("a deleted backend still answered"),
        Err(e) => e
            .chain()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind)
            .ok_or_else(|| anyhow::anyhow!("not an I/O error: {e:#}"))?,
    };
    anyhow::ensure!(
        !matches!(
            kind,
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "no answer within {:?} (a black hole): {kind:?}",
        started.elapsed()
    );
    Ok(kind)
}

#[test]
fn a_backend_deleted_under_traffic_resets_its_connections_and_new_ones_go_elsewhere(
) -> anyhow::Result<()> {
    backend_deleted_under_traffic(outside(false))
}

#[test]
fn in_native_routing_a_backend_deleted_under_traffic_resets_its_connections() -> anyhow::Result<()>
{
    backend_deleted_under_traffic(outside(true))
}

fn backend_deleted_under_traffic(opts: MeshOptions) -> anyhow::Result<()> {
    let Some(Setup { mesh, web, n1, n2 }) = start_with(opts)? else {
        return Ok(());
    };
    let ext_ip = IpAddr::V4(mesh.external.as_ref().expect("outside").host_ip);
    let is_local = move |seen: SocketAddr| seen.ip() == ext_ip;
    let is_remote = move |seen: SocketAddr| seen.ip() == IpAddr::V4(n1);
    mesh.publish_service("c1", &record(&[&web[0], &web[1]], TrafficPolicy::Cluster))?;
    // Through n1: one connection to its own backend, one to n2's (SNATed).
    let mut to_local = connection_served_by(&mesh, n1, "a connection to n1's backend", is_local)
        .map_err(|e| e.context(mesh.logs()))?;
    let mut to_remote = connection_served_by(&mesh, n1, "a connection to n2's backend", is_remote)?;

    // n2's backend goes (the endpoint, then the service's backend, as the apiserver follows).
    mesh.delete_endpoint(&web[1])?;
    mesh.publish_service("c1", &record(&[&web[0]], TrafficPolicy::Cluster))?;
    wait_for("new connections to stay on n1", CONVERGE, || {
        for _ in 0..10 {
            let seen = via_node_port(&mesh, n1)?;
            anyhow::ensure!(is_local(seen), "still sent to n2 (seen as {seen})");
        }
        Ok(())
    })?;
    let kind = after_its_backend_left(&mut to_remote).map_err(|e| e.context(mesh.logs()))?;
    eprintln!("a connection to the deleted remote backend: {kind:?}");
    netns_io::echo_round_trip(&mut to_local, b"still there")
        .map_err(|e| e.context("a connection to a backend that stayed"))?;

    // Now the other way round: n1's own backend goes while a connection to it is open, and a
    // new backend on n2 takes the new connections.
    let web3 = mesh.add_endpoint("c1", "n2", "web3", "app=web")?;
    spawn_whoami(&web3.netns, BACKEND_PORT)?;
    mesh.publish_service("c1", &record(&[&web[0], &web3], TrafficPolicy::Cluster))?;
    let mut to_remote =
        connection_served_by(&mesh, n1, "a connection to n2's new backend", is_remote)?;
    mesh.delete_endpoint(&web[0])?;
    mesh.publish_service("c1", &record(&[&web3], TrafficPolicy::Cluster))?;
    wait_for("new connections to go to n2", CONVERGE, || {
        for _ in 0..10 {
            let seen = via_node_port(&mesh, n1)?;
            anyhow::ensure!(is_remote(seen), "still served on n1 (seen as {seen})");
        }
        Ok(())
    })?;
    let kind = after_its_backend_left(&mut to_local).map_err(|e| e.context(mesh.logs()))?;
    eprintln!("a connection to the deleted local backend: {kind:?}");
    netns_io::echo_round_trip(&mut to_remote, b"still there")
        .map_err(|e| e.context("a connection to a backend that stayed"))?;
    // n2 serves the same through its own node port, to its own backend.
    assert_eq!(via_node_port(&mesh, n2)?.ip(), ext_ip);
    Ok(())
}

/// The NodePort of `record` for TCP plus the same for UDP, on `backend` only.
fn tcp_and_udp_record(backend: &EndpointInfo) -> ServiceRecord {
    let mut r = record(&[backend], TrafficPolicy::Cluster);
    r.frontends.push(ServiceFrontend {
        protocol: Protocol::Udp,
        port_name: "udp".into(),
        ..r.frontends[0].clone()
    });
    r.backends.push(ServiceBackend {
        protocol: Protocol::Udp,
        port_name: "udp".into(),
        ..r.backends[0].clone()
    });
    r
}

/// DSR through agents (`service_lb_mode: dsr`, native routing): n1's NodePort balanced to
/// n2's backend, which sees the outside client's own address and answers it from n1's
/// NodePort by itself, TCP and UDP; n1 routes no answer out (no `forwarded-world` there).
#[test]
fn in_native_routing_dsr_keeps_the_client_and_the_backends_node_answers_it() -> anyhow::Result<()> {
    let opts = outside(true).agent_config("service_lb_mode: dsr");
    let Some(Setup { mesh, web, n1, .. }) = start_with(opts)? else {
        return Ok(());
    };
    let status = mesh.status("c1", "n1")?;
    assert_eq!(status["routing"]["service_lb_mode"], "dsr", "{status}");
    let ext = mesh.external.as_ref().expect("outside");
    let ext_ip = IpAddr::V4(ext.host_ip);
    netns_io::spawn_udp_echo(&web[1].netns, BACKEND_PORT)?;
    mesh.publish_service("c1", &tcp_and_udp_record(&web[1]))?;
    let seen = wait_for("n1's node port to reach n2's backend", CONVERGE, || {
        via_node_port(&mesh, n1)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    assert_eq!(seen.ip(), ext_ip, "DSR keeps the client's address");
    // The echo server answers to the address it saw; the client's datagram socket takes only
    // n1:NODE_PORT.
    netns_io::udp_round_trip(
        &ext.host.path(),
        SocketAddr::from((n1, NODE_PORT)),
        b"dsr datagram",
        CONVERGE,
    )
    .map_err(|e| e.context(mesh.logs()))?;
    assert_eq!(
        mesh.counted("c1", "n1", "forwarded-world")?,
        0,
        "no answer routed out by the entry node"
    );
    assert!(mesh.counted("c1", "n2", "forwarded-world")? > 0);
    Ok(())
}

/// A client's source port used again (RELIABILITY.md, the node-port flake): first through
/// n1's NodePort (DSR to n2's backend), then, while n2 still holds that closed connection's
/// entries, through n2's own NodePort (the same backend, local there). Both reach the backend
/// as the same tuple; the second is answered from n2's NodePort, not from n1's, which the
/// client would ignore through every retransmission.
#[test]
fn in_dsr_a_client_port_used_again_through_the_backends_own_node_port_is_answered(
) -> anyhow::Result<()> {
    let opts = outside(true).agent_config("service_lb_mode: dsr");
    let Some(Setup { mesh, web, n1, n2 }) = start_with(opts)? else {
        return Ok(());
    };
    mesh.publish_service("c1", &record(&[&web[1]], TrafficPolicy::Cluster))?;
    wait_for("n1's node port to reach n2's backend", CONVERGE, || {
        via_node_port(&mesh, n1)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    wait_for("n2's node port to reach its backend", CONVERGE, || {
        via_node_port(&mesh, n2)
    })
    .map_err(|e| e.context(mesh.logs()))?;

    let ext = mesh.external.as_ref().expect("outside");
    const CLIENT_PORT: u16 = 41000;
    for (node, through) in [(n1, "n1's node port (DSR)"), (n2, "n2's own node port")] {
        let to = SocketAddr::from((node, NODE_PORT));
        let mut s = netns_io::connect_from_port(&ext.host.path(), CLIENT_PORT, to, TIMEOUT)
            .map_err(|e| e.context(format!("from port {CLIENT_PORT} through {through}")))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let seen = read_seen_address(&mut s)?;
        assert_eq!(
            seen,
            SocketAddr::from((ext.host_ip, CLIENT_PORT)),
            "through {through}"
        );
        netns_io::echo_round_trip(&mut s, b"the same client port")?;
    }
    Ok(())
}
