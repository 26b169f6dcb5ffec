//! Policy towards the world, end to end: a `toCIDR` rule lets an endpoint reach one external
//! address and not another (both on the same external host, behind the underlay router), and
//! `toEntities: [host]` lets it reach its own node and nothing else.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions, UNDERLAY_MTU};
use meshd_e2e::netns_io::{spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);

fn reach(from: &EndpointInfo, to: Ipv4Addr) -> anyhow::Result<()> {
    tcp_check(&from.netns, SocketAddr::from((to, PORT)), TIMEOUT)
}

fn denied(from: &EndpointInfo, to: Ipv4Addr) -> anyhow::Result<()> {
    match reach(from, to) {
        Ok(()) => anyhow::bail!("{} still reaches {to}", from.name),
        Err(_) => Ok(()),
    }
}

#[test]
fn cidr_and_host_rules_choose_what_outside_the_mesh_an_endpoint_reaches() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(1, 2).external(UNDERLAY_MTU))?;
    let ext = mesh.external.as_ref().expect("outside");
    // A second address on the external host, on the same link.
    let allowed = ext.host_ip;
    let other = Ipv4Addr::new(203, 0, 113, 11);
    ext.host
        .ip(&["addr", "add", &format!("{other}/24"), "dev", "eth0"])?;
    spawn_echo(&ext.host.path(), PORT)?;
    let node = mesh.node("c1", "n1")?;
    spawn_echo(&node.netns, PORT)?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let peer = mesh.add_endpoint("c1", "n2", "peer", "app=peer")?;
    spawn_echo(&peer.netns, PORT)?;

    // Without policy: both external addresses, the node and the peer.
    for to in [allowed, other, node.ip, peer.ip] {
        wait_for(
            &format!("client -> {to} before any policy"),
            Duration::from_secs(30),
            || reach(&client, to),
        )
        .map_err(|e| e.context(mesh.logs()))?;
    }

    mesh.apply_policy(
        "c1",
        &format!(
            "apiVersion: meshd.io/v1\nkind: NetworkPolicy\nmetadata: {{ name: one-address }}\nspec:\n  endpointSelector: {{ matchLabels: {{ app: client }} }}\n  egress:\n    - toCIDR: [ {allowed}/32 ]\n"
        ),
    )?;
    wait_for(
        "the other external address to be denied",
        Duration::from_secs(30),
        || denied(&client, other),
    )
    .map_err(|e| e.context(mesh.logs()))?;
    reach(&client, allowed).map_err(|e| {
        let datapath = mesh.status("c1", "n1").map(|s| s["datapath"].to_string());
        e.context(format!(
            "the named address stays allowed; datapath: {datapath:?}"
        ))
    })?;
    denied(&client, peer.ip)?;
    let status = mesh.status("c1", "n1")?;
    assert_eq!(status["warnings"], serde_json::json!([]), "{status}");

    // The same endpoint, now allowed its node only.
    mesh.apply_policy(
        "c1",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: { name: one-address }\nspec:\n  endpointSelector: { matchLabels: { app: client } }\n  egress:\n  - toEntities: [ host ]\n",
    )?;
    wait_for(
        "the external host to be denied",
        Duration::from_secs(30),
        || denied(&client, allowed),
    )
    .map_err(|e| e.context(mesh.logs()))?;
    reach(&client, node.ip).map_err(|e| e.context("its node is `host`"))?;
    denied(&client, other)?;
    denied(&client, peer.ip)?;
    Ok(())
}
