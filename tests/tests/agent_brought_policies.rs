//! Policies users bring, with real connections: Cilium's documentation examples (a default
//! deny with `ingress: [{}]`, a cross-cluster allow with `io.cilium.k8s.policy.cluster`) and a
//! Kubernetes `NetworkPolicy` with `podSelector`/`from`/`ports`. Each document goes through the
//! manifest crate, as the apiserver does, and is stored in meshd's form.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::netns_io::{spawn_echo, tcp_check};
use meshd_e2e::wait_for;

/// Cilium's cluster mesh documentation; its cluster names are this mesh's c1 and c2.
fn cross_cluster() -> String {
    include_str!("../../examples/policies/cilium-cross-cluster.yaml")
        .replace("cluster1", "c1")
        .replace("cluster2", "c2")
}

/// Cilium's documentation: "Ingress Default Deny".
const DEFAULT_DENY: &str = include_str!("../../examples/policies/cilium-default-deny.yaml");

/// Kubernetes: the database accepts the frontend on its port only.
const K8S_DB: &str = include_str!("../../examples/policies/kubernetes-db-from-frontend.yaml");

fn reach(from: &EndpointInfo, to: &EndpointInfo, port: u16) -> anyhow::Result<()> {
    tcp_check(
        &from.netns,
        SocketAddr::from((to.ip, port)),
        Duration::from_secs(2),
    )
}

fn denied(from: &EndpointInfo, to: &EndpointInfo, port: u16) -> anyhow::Result<()> {
    match reach(from, to, port) {
        Ok(()) => anyhow::bail!("{} still reaches {}:{port}", from.name, to.name),
        Err(_) => Ok(()),
    }
}

#[test]
fn cilium_and_kubernetes_policies_hold_on_real_connections() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let x_wing = mesh.add_endpoint("c1", "n1", "x-wing", "name=x-wing")?;
    let frontend = mesh.add_endpoint("c1", "n2", "frontend", "role=frontend")?;
    let rebel_base = mesh.add_endpoint("c2", "n1", "rebel-base", "name=rebel-base")?;
    let outpost = mesh.add_endpoint("c2", "n2", "outpost", "name=outpost")?;
    let restricted = mesh.add_endpoint("c2", "n2", "restricted", "role=restricted")?;
    let db = mesh.add_endpoint("c2", "n1", "db", "role=db")?;
    for ep in [&rebel_base, &outpost, &restricted, &db, &frontend] {
        spawn_echo(&ep.netns, 80)?;
    }
    spawn_echo(&db.netns, 6379)?;

    // Without policies everything connects (and the mesh is complete).
    for (from, to) in [
        (&x_wing, &rebel_base),
        (&x_wing, &outpost),
        (&x_wing, &restricted),
        (&frontend, &db),
        (&outpost, &db),
    ] {
        wait_for(
            &format!("{} -> {} before any policy", from.name, to.name),
            Duration::from_secs(30),
            || reach(from, to, 80),
        )
        .map_err(|e| e.context(mesh.logs()))?;
    }

    // The cross-cluster allow: x-wing's egress is enforced, rebel-base of c2 allowed.
    mesh.apply_policy("c1", &cross_cluster())?;
    wait_for(
        "x-wing's egress to be enforced",
        Duration::from_secs(30),
        || denied(&x_wing, &outpost, 80),
    )
    .map_err(|e| e.context(mesh.logs()))?;
    reach(&x_wing, &rebel_base, 80).map_err(|e| e.context("x-wing -> rebel-base is allowed"))?;
    reach(&frontend, &outpost, 80).map_err(|e| e.context("frontend is no subject"))?;

    // The default deny: nothing gets into restricted; restricted itself still gets out.
    mesh.apply_policy("c2", DEFAULT_DENY)?;
    wait_for(
        "restricted's ingress to be denied",
        Duration::from_secs(30),
        || denied(&frontend, &restricted, 80),
    )
    .map_err(|e| e.context(mesh.logs()))?;
    denied(&outpost, &restricted, 80)?;
    reach(&restricted, &outpost, 80).map_err(|e| e.context("restricted's egress stays open"))?;

    // The Kubernetes policy: the frontend, from the other cluster, on 6379 only.
    reach(&frontend, &db, 6379)?;
    mesh.apply_policy("c2", K8S_DB)?;
    wait_for(
        "db's ingress to be enforced",
        Duration::from_secs(30),
        || denied(&outpost, &db, 6379),
    )
    .map_err(|e| e.context(mesh.logs()))?;
    reach(&frontend, &db, 6379).map_err(|e| e.context("frontend -> db:6379 is allowed"))?;
    denied(&frontend, &db, 80)?;

    // A CIDR over the pod CIDRs is accepted; status says endpoints are matched by identity.
    mesh.apply_policy(
        "c2",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: { name: private }\nspec:\n  endpointSelector: { matchLabels: { name: outpost } }\n  egress:\n  - toCIDR: [ 10.0.0.0/8 ]\n",
    )?;
    wait_for(
        "status to warn about the CIDR",
        Duration::from_secs(30),
        || {
            let status = mesh.status("c2", "n2")?;
            let warnings = status["warnings"].to_string();
            anyhow::ensure!(
            warnings.contains("CIDR 10.0.0.0/8 in policy default/private overlaps the pod CIDRs of cluster c1, c2"),
            "warnings: {warnings}"
        );
            Ok(())
        },
    )?;
    Ok(())
}
