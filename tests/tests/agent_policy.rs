//! Identity policy across clusters, with real connections: c2 allows only
//! `app=client, meshd.io/cluster=c1` into `app=echo` on TCP 8080.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::netns_io::{spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const PORT: u16 = 8080;
const POLICY_KEY: &str = "meshd/config/policies/v1/default/echo-from-c1-clients";
const POLICY: &str = r#"{"apiVersion":"meshd.io/v1","kind":"NetworkPolicy",
  "metadata":{"name":"echo-from-c1-clients","namespace":"default"},
  "spec":{"endpointSelector":{"matchLabels":{"app":"echo"}},
          "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"client","meshd.io/cluster":"c1"}}],
                      "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

fn reach(from: &EndpointInfo, to: &EndpointInfo) -> anyhow::Result<()> {
    tcp_check(
        &from.netns,
        SocketAddr::from((to.ip, PORT)),
        Duration::from_secs(2),
    )
}

#[test]
fn c2_policy_admits_only_c1_clients_into_echo() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let c1_client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let c1_web = mesh.add_endpoint("c1", "n2", "web", "app=web")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    let c2_client = mesh.add_endpoint("c2", "n1", "client2", "app=client")?;
    let c2_web = mesh.add_endpoint("c2", "n2", "web2", "app=web")?;
    spawn_echo(&echo.netns, PORT)?;

    // Without a policy everyone gets in (and the mesh is complete).
    for from in [&c1_client, &c1_web, &c2_client, &c2_web] {
        wait_for(
            &format!("{} -> echo before the policy", from.name),
            Duration::from_secs(30),
            || reach(from, &echo),
        )
        .map_err(|e| e.context(mesh.logs()))?;
    }

    mesh.cluster("c2")?
        .etcd
        .etcdctl(&["put", POLICY_KEY, POLICY])?;
    wait_for(
        "the policy to shut c1's web out",
        Duration::from_secs(30),
        || match reach(&c1_web, &echo) {
            Ok(()) => anyhow::bail!("c1 web still reaches echo"),
            Err(_) => Ok(()),
        },
    )
    .map_err(|e| e.context(mesh.logs()))?;

    reach(&c1_client, &echo).map_err(|e| e.context("the c1 client must stay allowed"))?;
    assert!(
        reach(&c2_client, &echo).is_err(),
        "a c2 client (same node) must be denied"
    );
    assert!(
        reach(&c2_web, &echo).is_err(),
        "a c2 web endpoint (other node) must be denied"
    );
    assert!(reach(&c1_web, &echo).is_err(), "c1 web must be denied");
    drops_are_reported(&mesh, &c1_web, &echo)?;

    // A c1 identity that appears after the policy is picked up with no action.
    let late = mesh.add_endpoint("c1", "n2", "late-client", "app=client,team=late")?;
    assert_ne!(late.identity, c1_client.identity);
    wait_for(
        "a new c1 client identity to be admitted",
        Duration::from_secs(30),
        || reach(&late, &echo),
    )
    .map_err(|e| e.context(mesh.logs()))?;

    let policies = mesh.cluster_status("c2", "n1", "c2")?["policies"].as_u64();
    assert_eq!(policies, Some(1));

    // Removing the policy opens echo again.
    mesh.cluster("c2")?.etcd.etcdctl(&["del", POLICY_KEY])?;
    wait_for("echo open again", Duration::from_secs(30), || {
        reach(&c2_web, &echo)
    })?;
    Ok(())
}

/// `meshd monitor -o json` on echo's node shows the denied connection as it happens (reason,
/// addresses, identities), and `meshd status` counts it.
fn drops_are_reported(mesh: &Mesh, from: &EndpointInfo, to: &EndpointInfo) -> anyhow::Result<()> {
    let monitor = mesh.meshd_stream(&to.cluster, &to.node, &["monitor", "-o", "json"])?;
    let rx = &monitor.lines;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let found = loop {
        // Each attempt sends SYNs that echo's node drops; the monitor may still be
        // subscribing when the first ones go.
        let _ = reach(from, to);
        let mut hit = None;
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v["saddr"] == from.ip.to_string() && v["daddr"] == to.ip.to_string() {
                hit = Some(v);
                break;
            }
            seen.push(line);
        }
        if let Some(v) = hit {
            break v;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no drop of {} -> {} reported; other drops seen: {seen:?}",
            from.ip,
            to.ip
        );
    };
    drop(monitor);
    assert_eq!(found["reason_name"], "policy-denied", "{found}");
    assert_eq!(found["direction"], "ingress", "{found}");
    assert_eq!(found["dport"], PORT, "{found}");
    assert_eq!(found["src_identity"], from.identity, "{found}");
    assert_eq!(found["dst_identity"], to.identity, "{found}");
    assert_eq!(
        found["src"],
        format!("{}/{}", from.cluster, from.identity & 0xffff),
        "{found}"
    );
    // Both identities' labels, as the node knows them (the source is another cluster's).
    let labels = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    assert!(
        labels(&found["src_labels"]).contains("app=web")
            && labels(&found["src_labels"]).contains(&format!("meshd.io/cluster={}", from.cluster)),
        "{found}"
    );
    assert!(labels(&found["dst_labels"]).contains("app=echo"), "{found}");

    wait_for(
        "status to count policy drops",
        Duration::from_secs(10),
        || {
            let status = mesh.status(&to.cluster, &to.node)?;
            let counters = status["datapath"]["counters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            anyhow::ensure!(
            counters
                .iter()
                .any(|c| c["reason_name"] == "policy-denied" && c["packets"].as_u64() > Some(0)),
            "counters: {counters:?}"
        );
            Ok(())
        },
    )
}
