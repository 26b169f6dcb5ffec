//! The mesh end to end: 2 clusters x 2 nodes x 2 endpoints, real etcd per cluster (TLS,
//! client-certificate auth, RBAC), real datapath in network namespaces, agents as the built
//! `meshd` binary.

use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;

use meshd_e2e::mesh::{ping, EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::netns_io::{spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const ECHO_PORT: u16 = 8080;

/// Two endpoints per node: "a<c><n>" with app=client on the first node of each cluster and
/// app=web elsewhere, "b<c><n>" with app=echo.
fn endpoints(mesh: &Mesh) -> anyhow::Result<Vec<EndpointInfo>> {
    let mut eps = Vec::new();
    for (c, n) in mesh.node_names() {
        let a_app = if n == "n1" { "client" } else { "web" };
        eps.push(mesh.add_endpoint(&c, &n, &format!("a{c}{n}"), &format!("app={a_app}"))?);
        eps.push(mesh.add_endpoint(&c, &n, &format!("b{c}{n}"), "app=echo")?);
    }
    for ep in &eps {
        spawn_echo(&ep.netns, ECHO_PORT)?;
    }
    Ok(eps)
}

#[test]
fn every_endpoint_reaches_every_other_across_clusters() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let eps = endpoints(&mesh)?;
    assert_eq!(eps.len(), 8);
    // Control: an address no cluster published is not reachable, so the pings below prove
    // the mesh's entries, not some default route.
    assert!(ping(&eps[0].netns, "10.2.9.9".parse()?).is_err());
    // One label set, one identity per cluster: both nodes of a cluster allocated app=echo
    // (through the etcd transaction) and got the same number; the other cluster's differs
    // and carries its cluster id in bits 16-23.
    let echo = |c: &str, n: &str| {
        eps.iter()
            .find(|e| e.name == format!("b{c}{n}"))
            .expect("echo endpoint")
            .identity
    };
    assert_eq!(echo("c1", "n1"), echo("c1", "n2"));
    assert_eq!(echo("c2", "n1"), echo("c2", "n2"));
    assert_ne!(echo("c1", "n1"), echo("c2", "n1"));
    assert_eq!(echo("c1", "n1") >> 16, 1);
    assert_eq!(echo("c2", "n1") >> 16, 2);

    for from in &eps {
        for to in &eps {
            if from.name == to.name {
                continue;
            }
            wait_for(
                &format!("ping {} -> {} ({})", from.name, to.name, to.ip),
                Duration::from_secs(30),
                || ping(&from.netns, to.ip),
            )
            .map_err(|e| e.context(mesh.logs()))?;
            tcp_check(
                &from.netns,
                SocketAddr::from((to.ip, ECHO_PORT)),
                Duration::from_secs(5),
            )
            .map_err(|e| e.context(format!("TCP {} -> {}", from.name, to.name)))?;
        }
    }

    // Status, as people read it.
    let table = mesh.meshd("c1", "n1", &["status"])?;
    for want in ["Node:", "c1 (local)", "c2", "ready", "bc1n1"] {
        assert!(table.contains(want), "{want:?} missing from:\n{table}");
    }
    let c2 = mesh.cluster_status("c1", "n1", "c2")?;
    assert_eq!(c2["nodes"], 2, "{c2}");
    assert_eq!(c2["endpoints"], 4, "{c2}");
    assert!(c2["identities"].as_u64() >= Some(2), "{c2}");
    assert!(c2["last_sync_ms"].as_u64() > Some(0), "{c2}");

    // Certificates in use, with their expiry: the harness issues leaves for 2 days, inside the
    // default 30-day warning window, and its CA for 30 days.
    let status = mesh.status("c1", "n1")?;
    let certs = status["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let node_cert = certs
        .iter()
        .find(|c| c["used_for"] == "local etcd" && c["kind"] == "certificate")
        .with_context(|| format!("no local etcd certificate in {certs:?}"))?;
    assert!(
        node_cert["path"]
            .as_str()
            .unwrap_or("")
            .ends_with("node.pem"),
        "{node_cert}"
    );
    assert!(
        node_cert["subject"]
            .as_str()
            .unwrap_or("")
            .contains("CN=node-c1-n1"),
        "{node_cert}"
    );
    assert_eq!(node_cert["expiring"], true, "{node_cert}");
    assert!(
        node_cert["days_left"]
            .as_i64()
            .is_some_and(|d| (0..=2).contains(&d)),
        "{node_cert}"
    );
    let remote = certs
        .iter()
        .find(|c| c["used_for"] == "remote c2" && c["kind"] == "certificate")
        .with_context(|| format!("no certificate for c2 in {certs:?}"))?;
    assert!(
        remote["subject"]
            .as_str()
            .unwrap_or("")
            .contains("CN=remote-c1"),
        "{remote}"
    );
    assert!(
        table.contains("WARNING: certificate") && table.contains("node.pem"),
        "no expiry warning in:\n{table}"
    );
    let cm = mesh.meshd("c1", "n1", &["clustermesh", "status"])?;
    assert!(cm.contains("WARNING: certificate"), "{cm}");

    // Under systemd (Type=notify) every agent said it was ready: its maps follow the view.
    for (c, n) in mesh.node_names() {
        let sent = mesh.notifications(&c, &n)?;
        assert!(
            sent.iter().any(|m| m.lines().any(|l| l == "READY=1")),
            "{c}/{n} sent {sent:?}"
        );
    }
    Ok(())
}
