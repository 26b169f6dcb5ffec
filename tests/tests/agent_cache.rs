//! Remote clusters through the cache: 3 clusters x 2 nodes, each cluster running a mirror
//! (`clustermesh-apiserver --kvstoremesh`) and announcing it, so every agent reads remote
//! clusters from its own etcd (`remote_source` left to the cluster config) and opens no
//! connection outside its cluster. Connectivity, identity policy and a global service across
//! clusters; fail-static while a remote etcd is down and the mirror restarts meanwhile; a dead
//! node withdrawn everywhere; one node switched from direct to cache mode under a connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::netns_io::{connect, echo_round_trip, spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 8080;

fn reach(from: &EndpointInfo, to: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    tcp_check(
        &from.netns,
        SocketAddr::from((to, port)),
        Duration::from_secs(2),
    )
}

/// Every remote of every node is read from the cache, connected and ready.
fn every_remote_is_cached_and_ready(mesh: &Mesh) -> anyhow::Result<()> {
    for (c, n) in mesh.node_names() {
        let status = mesh.status(&c, &n)?;
        for cl in status["clusters"].as_array().into_iter().flatten() {
            if cl["local"] == true {
                continue;
            }
            anyhow::ensure!(cl["source"] == "cache", "{c}/{n}: {cl}");
            anyhow::ensure!(cl["state"] == "ready", "{c}/{n}: {cl}");
            anyhow::ensure!(cl["cache"]["connected"] == true, "{c}/{n}: {cl}");
            anyhow::ensure!(
                cl["cache"]["entries"].as_u64().unwrap_or(0) > 0,
                "{c}/{n}: {cl}"
            );
        }
    }
    Ok(())
}

/// The VIP c1's apiserver gave `default/<name>` (from its service record).
fn vip(mesh: &Mesh, cluster: &str, name: &str) -> anyhow::Result<Ipv4Addr> {
    let key = format!("meshd/state/services/v1/{cluster}/default/{name}");
    let out = mesh
        .cluster(cluster)?
        .etcd
        .etcdctl(&["get", &key, "--print-value-only"])?;
    let rec: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| anyhow::anyhow!("{key}: {e}: {out:?}"))?;
    let ip = rec["frontends"][0]["ip"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{key}: no frontend: {rec}"))?;
    Ok(ip.parse()?)
}

const ECHO_SERVICE: &str = "apiVersion: meshd.io/v1
kind: Service
metadata:
  name: echo
  namespace: default
  annotations:
    service.meshd.io/global: \"true\"
    service.meshd.io/shared: \"true\"
spec:
  selector: { app: echo }
  ports:
    - { name: http, port: 80, targetPort: 8080, protocol: TCP }
";

const POLICY: &str = "apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: echo-from-c1-clients, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client, meshd.io/cluster: c1 } } ]
      toPorts: [ { ports: [ { port: \"8080\", protocol: TCP } ] } ]
";

#[test]
fn a_mesh_read_through_the_cache_connects_enforces_and_fails_static() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites()
        || !meshd_testing::require_workspace_bins(&["clustermesh-apiserver"])
    {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(3, 2).kvstoremesh())?;
    let c1_client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let c3_client = mesh.add_endpoint("c3", "n2", "client3", "app=client")?;
    let echo = mesh.add_endpoint("c2", "n2", "echo", "app=echo")?;
    spawn_echo(&echo.netns, PORT)?;

    // Connectivity across clusters, every remote read from the cache.
    for from in [&c1_client, &c3_client] {
        wait_for(&format!("{} -> echo in c2", from.name), WAIT, || {
            reach(from, echo.ip, PORT)
        })
        .map_err(|e| e.context(mesh.logs()))?;
    }
    wait_for("every remote cached and ready", WAIT, || {
        every_remote_is_cached_and_ready(&mesh)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let table = mesh.meshd("c1", "n1", &["clustermesh", "status"])?;
    assert!(table.contains("Cache"), "{table}");

    // A global service: the same service in every cluster, backends only in c2; c1's client
    // reaches them through c1's own VIP.
    for c in ["c1", "c2", "c3"] {
        mesh.apply_manifest(c, ECHO_SERVICE)?;
    }
    let c1_vip = vip(&mesh, "c1", "echo")?;
    wait_for("c1 client -> c1's echo VIP -> c2 backend", WAIT, || {
        reach(&c1_client, c1_vip, 80)
    })
    .map_err(|e| e.context(mesh.logs()))?;

    // Identity policy across clusters: c2 admits only c1's clients; c3's is shut out.
    mesh.apply_manifest("c2", POLICY)?;
    wait_for("the policy to shut c3's client out", WAIT, || {
        anyhow::ensure!(
            reach(&c3_client, echo.ip, PORT).is_err(),
            "c3 client still reaches echo"
        );
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    reach(&c1_client, echo.ip, PORT).map_err(|e| e.context("c1's client must stay allowed"))?;

    // Fail-static: c2's etcd stops; c1 keeps c2's entries and says c2 is stale; c1's mirror
    // restarts meanwhile (it cannot list c2) and still keeps them.
    let mut held = connect(
        &c1_client.netns,
        SocketAddr::from((echo.ip, PORT)),
        Duration::from_secs(5),
    )?;
    echo_round_trip(&mut held, b"before")?;
    mesh.cluster_mut("c2")?.etcd.stop();
    wait_for("c1 sees c2 stale", WAIT, || {
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["stale"] == true && c2["connected"] == false, "{c2}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    mesh.stop_mirror("c1")?;
    mesh.start_mirror("c1")?;
    // Long enough for the restarted mirror to have tried (and failed) to list c2.
    std::thread::sleep(Duration::from_secs(5));
    for n in ["n1", "n2"] {
        anyhow::ensure!(
            mesh.ipcache_entry("c1", n, echo.ip)?.is_some(),
            "c1/{n} lost c2's endpoint while c2 was down"
        );
    }
    echo_round_trip(&mut held, b"while c2's etcd is down")?;
    reach(&c1_client, echo.ip, PORT)
        .map_err(|e| e.context("new connections while c2's etcd is down"))?;

    mesh.cluster_mut("c2")?.etcd.restart()?;
    wait_for("c2 back and every remote ready", WAIT, || {
        every_remote_is_cached_and_ready(&mesh)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    echo_round_trip(&mut held, b"after")?;
    drop(held);

    // Node death: c2/n1's agent killed; its lease runs out and its node record and endpoints
    // go from c2's etcd, then from every cache and every node of the other clusters.
    let doomed = mesh.add_endpoint("c2", "n1", "doomed", "app=web")?;
    wait_for("c2/n1's endpoint in c1 and c3", WAIT, || {
        for (c, n) in [("c1", "n1"), ("c1", "n2"), ("c3", "n1"), ("c3", "n2")] {
            anyhow::ensure!(mesh.ipcache_entry(c, n, doomed.ip)?.is_some(), "{c}/{n}");
        }
        Ok(())
    })?;
    mesh.kill_agent("c2", "n1")?;
    wait_for("c2/n1's endpoint withdrawn from c1 and c3", WAIT, || {
        for (c, n) in [("c1", "n1"), ("c1", "n2"), ("c3", "n1"), ("c3", "n2")] {
            anyhow::ensure!(
                mesh.ipcache_entry(c, n, doomed.ip)?.is_none(),
                "still in {c}/{n}"
            );
        }
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    // The rest of c2 stays.
    reach(&c1_client, echo.ip, PORT)?;

    // The node comes back with its endpoint; every node's maps end equal to what the etcds
    // hold.
    mesh.start_agent("c2", "n1")?;
    wait_for("c2/n1's endpoint back in c1 and c3", WAIT, || {
        for (c, n) in [("c1", "n1"), ("c3", "n2")] {
            anyhow::ensure!(mesh.ipcache_entry(c, n, doomed.ip)?.is_some(), "{c}/{n}");
        }
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    mesh.wait_maps_match_etcd(WAIT)
        .map_err(|e| e.context(mesh.logs()))?;
    Ok(())
}

#[test]
fn a_node_switches_from_direct_to_cache_under_an_open_connection() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites()
        || !meshd_testing::require_workspace_bins(&["clustermesh-apiserver"])
    {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2).kvstoremesh())?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    spawn_echo(&echo.netns, PORT)?;

    let source_of_c2 = |mesh: &Mesh| -> anyhow::Result<String> {
        Ok(mesh.cluster_status("c1", "n1", "c2")?["source"]
            .as_str()
            .unwrap_or("")
            .to_owned())
    };

    mesh.set_remote_source("c1", "n1", "direct")?;
    wait_for("c1/n1 reads c2 directly and reaches echo", WAIT, || {
        anyhow::ensure!(source_of_c2(&mesh)? == "direct");
        reach(&client, echo.ip, PORT)
    })
    .map_err(|e| e.context(mesh.logs()))?;
    let mut held = connect(
        &client.netns,
        SocketAddr::from((echo.ip, PORT)),
        Duration::from_secs(5),
    )?;
    echo_round_trip(&mut held, b"direct")?;

    mesh.set_remote_source("c1", "n1", "cache")?;
    wait_for("c1/n1 reads c2 from the cache", WAIT, || {
        anyhow::ensure!(source_of_c2(&mesh)? == "cache");
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["state"] == "ready", "{c2}");
        Ok(())
    })
    .map_err(|e| e.context(mesh.logs()))?;
    echo_round_trip(&mut held, b"cache")
        .map_err(|e| e.context("the connection opened in direct mode broke in the switch"))?;
    assert!(mesh.ipcache_entry("c1", "n1", echo.ip)?.is_some());
    mesh.wait_maps_match_etcd(WAIT)
        .map_err(|e| e.context(mesh.logs()))?;
    Ok(())
}
