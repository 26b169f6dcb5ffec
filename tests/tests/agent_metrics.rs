//! The agent's `/metrics` in a real mesh: the text is valid exposition, and it shows what the
//! test causes: a remote put timed by the propagation delay histogram, a policy drop counted
//! with its reason and direction, and a remote cluster whose etcd stops going from ready to not
//! ready.

use std::net::SocketAddr;
use std::time::Duration;

use meshd_e2e::exposition;
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::netns_io::{spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const PORT: u16 = 8080;
const METRICS_PORT: u16 = 9962;
const WAIT: Duration = Duration::from_secs(30);
const POLICY_KEY: &str = "meshd/config/policies/v1/default/echo-from-clients";
const POLICY: &str = r#"{"apiVersion":"meshd.io/v1","kind":"NetworkPolicy",
  "metadata":{"name":"echo-from-clients","namespace":"default"},
  "spec":{"endpointSelector":{"matchLabels":{"app":"echo"}},
          "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"client"}}],
                      "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

const PROPAGATION_COUNT: &str = "meshd_propagation_delay_seconds_count";
const POLICY_DROPS: &str = "meshd_datapath_dropped_packets_total";
const INGRESS_POLICY: &[(&str, &str)] = &[("direction", "ingress"), ("reason", "policy-denied")];

/// Scrapes and checks the format every time, so any state the test passes through is checked.
fn scrape(mesh: &Mesh, cluster: &str, node: &str) -> anyhow::Result<String> {
    let text = mesh.metrics(cluster, node)?;
    exposition::check(&text, "meshd_")?;
    exposition::promtool_check(&text)?;
    Ok(text)
}

fn c2_ready_seen_from(mesh: &Mesh, node: &str) -> anyhow::Result<Option<f64>> {
    let text = scrape(mesh, "c1", node)?;
    Ok(exposition::value(
        &text,
        "meshd_remote_cluster_ready",
        &[("cluster", "c2")],
    ))
}

#[test]
fn metrics_count_a_policy_drop_and_show_a_stopped_remote_not_ready() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions {
        metrics_port: Some(METRICS_PORT),
        ..MeshOptions::clusters(2, 2)
    })?;
    // Under CI=true a missing promtool fails the test; elsewhere the test's own reader checks.
    meshd_testing::require(
        "promtool on PATH (scripts/install-deps.sh)",
        exposition::promtool_check("")?,
    );

    // The mesh is ready: every node shows the other cluster ready, with its entries.
    let text = scrape(&mesh, "c1", "n1")?;
    assert_eq!(
        exposition::value(&text, "meshd_remote_cluster_ready", &[("cluster", "c2")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        exposition::value(
            &text,
            "meshd_remote_cluster_entries",
            &[("cluster", "c2"), ("kind", "nodes")]
        ),
        Some(2.0),
        "{text}"
    );

    let web = mesh.add_endpoint("c1", "n2", "web", "app=web")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    spawn_echo(&echo.netns, PORT)?;
    let echo_addr = SocketAddr::from((echo.ip, PORT));
    let reach = || tcp_check(&web.netns, echo_addr, Duration::from_secs(2));
    wait_for("web -> echo before the policy", WAIT, reach).map_err(|e| e.context(mesh.logs()))?;
    // The connection is in echo's node's conntrack, shown against the map's capacity.
    let text = scrape(&mesh, "c2", "n1")?;
    let conntrack = [("map", "conntrack")];
    let ct = exposition::value(&text, "meshd_datapath_map_entries", &conntrack);
    assert!(
        ct.unwrap_or(0.0) >= 2.0,
        "conntrack entries {ct:?}:\n{text}"
    );
    assert_eq!(
        exposition::value(&text, "meshd_datapath_map_capacity", &conntrack),
        Some(f64::from(meshd_ebpf::abi::CT_MAX)),
        "{text}"
    );
    // A put in c2's etcd (a new endpoint's ipcache entry) reaches c1's maps: c1/n1 times it.
    let propagated = |text: &str| exposition::value(text, PROPAGATION_COUNT, &[]).unwrap_or(0.0);
    let before = propagated(&scrape(&mesh, "c1", "n1")?);
    mesh.add_endpoint("c2", "n1", "echo2", "app=echo")?;
    wait_for("c1/n1 to time the remote put", WAIT, || {
        let text = scrape(&mesh, "c1", "n1")?;
        let after = propagated(&text);
        anyhow::ensure!(
            after > before,
            "{PROPAGATION_COUNT} {before} -> {after}:\n{text}"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;

    let before = exposition::value(&scrape(&mesh, "c2", "n1")?, POLICY_DROPS, INGRESS_POLICY);
    assert!(
        before.unwrap_or(0.0) == 0.0,
        "policy drops before any policy: {before:?}"
    );

    // Only app=client may reach echo: web's SYNs are dropped at echo's node, on ingress.
    mesh.cluster("c2")?
        .etcd
        .etcdctl(&["put", POLICY_KEY, POLICY])?;
    wait_for("the policy to shut web out", WAIT, || match reach() {
        Ok(()) => anyhow::bail!("web still reaches echo"),
        Err(_) => Ok(()),
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let dropped = wait_for("the drop counted on /metrics", WAIT, || {
        let _ = reach();
        let text = scrape(&mesh, "c2", "n1")?;
        match exposition::value(&text, POLICY_DROPS, INGRESS_POLICY) {
            Some(v) if v > 0.0 => Ok(v),
            other => anyhow::bail!("{POLICY_DROPS} {INGRESS_POLICY:?} is {other:?}:\n{text}"),
        }
    })?;
    // Counted where it happened only: the sender's node dropped nothing for policy.
    let sender = scrape(&mesh, "c1", "n2")?;
    assert!(
        exposition::value(&sender, POLICY_DROPS, INGRESS_POLICY).unwrap_or(0.0) == 0.0,
        "{sender}"
    );
    assert!(dropped >= 1.0);

    // c2's etcd stops: c1's nodes show it not ready (stale), and ready again once it is back.
    mesh.cluster_mut("c2")?.etcd.stop();
    wait_for("c1 shows c2 not ready on /metrics", WAIT, || {
        for n in ["n1", "n2"] {
            let ready = c2_ready_seen_from(&mesh, n)?;
            anyhow::ensure!(ready == Some(0.0), "c1/{n}: c2 ready {ready:?}");
        }
        let text = scrape(&mesh, "c1", "n1")?;
        let stale = exposition::value(&text, "meshd_remote_cluster_stale", &[("cluster", "c2")]);
        anyhow::ensure!(stale == Some(1.0), "c2 stale {stale:?}");
        let failures = exposition::value(
            &text,
            "meshd_remote_cluster_failures_total",
            &[("cluster", "c2")],
        );
        anyhow::ensure!(failures >= Some(1.0), "c2 failures {failures:?}");
        Ok(())
    })?;
    mesh.cluster_mut("c2")?.etcd.restart()?;
    wait_for("c1 shows c2 ready again on /metrics", WAIT, || {
        let ready = c2_ready_seen_from(&mesh, "n1")?;
        anyhow::ensure!(ready == Some(1.0), "c2 ready {ready:?}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_metrics_port_in_use_stops_the_agent_naming_the_field() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions {
        metrics_port: Some(METRICS_PORT),
        ..MeshOptions::clusters(1, 1)
    })?;
    let node = mesh.node("c1", "n1")?;
    // A second agent on the same config in the same namespace: the port is the running one's.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns.display()))
        .arg("--")
        .arg(meshd_e2e::mesh::meshd_binary()?)
        .args(["agent", "--config"])
        .arg(&node.config)
        .args(["--api-socket"])
        .arg(node.socket.with_extension("second"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("metrics_addr"), "{stderr}");
    Ok(())
}
