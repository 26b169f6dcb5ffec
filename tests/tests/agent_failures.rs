//! The mesh when things go away: endpoints deleted, agents killed or restarted, a cluster's
//! etcd stopped. Each test builds its own 2 clusters x 2 nodes mesh.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshd_e2e::mesh::{EndpointInfo, Mesh, MeshOptions};
use meshd_e2e::netns_io::{connect, echo_round_trip, spawn_echo, tcp_check};
use meshd_e2e::wait_for;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

/// Waits until `ep` is in (`present`) or out of the ipcache map of every listed node.
fn wait_in_maps(
    mesh: &Mesh,
    ep: &EndpointInfo,
    nodes: &[(&str, &str)],
    present: bool,
) -> anyhow::Result<()> {
    for (c, n) in nodes {
        wait_for(
            &format!(
                "{} ({}) {} the maps of {c}/{n}",
                ep.name,
                ep.ip,
                if present { "in" } else { "gone from" }
            ),
            WAIT,
            || {
                let entry = mesh.ipcache_entry(c, n, ep.ip)?;
                match (present, entry) {
                    (true, Some(e)) if e.identity.get() == ep.identity => Ok(()),
                    (false, None) => Ok(()),
                    (_, other) => anyhow::bail!("entry is {other:?}"),
                }
            },
        )
        .map_err(|e| e.context(mesh.logs()))?;
    }
    Ok(())
}

const C2_NODES: [(&str, &str); 2] = [("c2", "n1"), ("c2", "n2")];

#[test]
fn an_endpoint_deleted_in_c1_disappears_from_c2_maps() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let ep = mesh.add_endpoint("c1", "n1", "short-lived", "app=web")?;
    let keep = mesh.add_endpoint("c1", "n1", "stays", "app=web")?;
    wait_in_maps(
        &mesh,
        &ep,
        &[("c2", "n1"), ("c2", "n2"), ("c1", "n2")],
        true,
    )?;
    // The tunnel endpoint is the node that hosts it.
    let entry = mesh.ipcache_entry("c2", "n1", ep.ip)?.expect("present");
    assert_eq!(
        entry.tunnel_endpoint,
        Some(mesh.node("c1", "n1")?.ip.into()),
        "{entry:?}"
    );
    mesh.delete_endpoint(&ep)?;
    wait_in_maps(
        &mesh,
        &ep,
        &[("c2", "n1"), ("c2", "n2"), ("c1", "n2")],
        false,
    )?;
    // Nothing else went with it.
    wait_in_maps(&mesh, &keep, &C2_NODES, true)?;
    let listed = mesh.meshd("c1", "n1", &["endpoint", "list", "-o", "json"])?;
    assert!(
        !listed.contains("short-lived") && listed.contains("stays"),
        "{listed}"
    );
    Ok(())
}

#[test]
fn a_killed_agents_endpoints_leave_c2_when_its_lease_expires() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let doomed = mesh.add_endpoint("c1", "n2", "on-dead-node", "app=web")?;
    let alive = mesh.add_endpoint("c1", "n1", "on-live-node", "app=web")?;
    wait_in_maps(&mesh, &doomed, &C2_NODES, true)?;
    wait_in_maps(&mesh, &alive, &C2_NODES, true)?;
    mesh.kill_agent("c1", "n2")?;
    wait_in_maps(&mesh, &doomed, &C2_NODES, false)?;
    wait_in_maps(&mesh, &alive, &C2_NODES, true)?;
    wait_for("c2 sees one node of c1", WAIT, || {
        let c1 = mesh.cluster_status("c2", "n1", "c1")?;
        anyhow::ensure!(c1["nodes"] == 1, "{c1}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn c2_etcd_down_keeps_traffic_and_shows_stale_then_catches_up() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    let doomed = mesh.add_endpoint("c2", "n2", "deleted-meanwhile", "app=web")?;
    spawn_echo(&echo.netns, PORT)?;
    let echo_addr = SocketAddr::from((echo.ip, PORT));
    wait_for("client -> echo", WAIT, || {
        tcp_check(&client.netns, echo_addr, Duration::from_secs(2))
    })?;
    wait_in_maps(&mesh, &doomed, &[("c1", "n1"), ("c1", "n2")], true)?;
    let mut conn = connect(&client.netns, echo_addr, Duration::from_secs(5))?;
    echo_round_trip(&mut conn, b"before")?;

    mesh.cluster_mut("c2")?.etcd.stop();
    wait_for("c1 nodes see c2 stale", WAIT, || {
        for n in ["n1", "n2"] {
            let c2 = mesh.cluster_status("c1", n, "c2")?;
            anyhow::ensure!(c2["state"] == "stale" && c2["stale"] == true, "{c2}");
            anyhow::ensure!(c2["stale_since_ms"].as_u64() > Some(0), "{c2}");
        }
        Ok(())
    })?;
    // Fail-static: the established connection and new ones keep working.
    for i in 0..10 {
        echo_round_trip(&mut conn, format!("during outage {i}").as_bytes())?;
        std::thread::sleep(Duration::from_millis(200));
    }
    tcp_check(&client.netns, echo_addr, Duration::from_secs(2))?;

    // Deleted while c2's etcd is down: c1 cannot know yet and keeps the entry.
    mesh.delete_endpoint(&doomed)?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        mesh.ipcache_entry("c1", "n1", doomed.ip)?.is_some(),
        "c1 dropped a c2 entry while c2 was unreachable"
    );

    mesh.cluster_mut("c2")?.etcd.restart()?;
    wait_in_maps(&mesh, &doomed, &[("c1", "n1"), ("c1", "n2")], false)?;
    wait_for("c1 sees c2 ready again", WAIT, || {
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["state"] == "ready", "{c2}");
        Ok(())
    })?;
    echo_round_trip(&mut conn, b"after")?;
    wait_in_maps(&mesh, &echo, &[("c1", "n1"), ("c1", "n2")], true)?;
    Ok(())
}

/// A hung etcd (SIGSTOP: the connection stays open and nothing answers) is worse than a stopped
/// one, which refuses at once: c1 must notice through its probe and keepalives, keep c2's last
/// state (fail-static) and its traffic, and catch up when c2's etcd runs again.
#[test]
fn c2_etcd_hung_keeps_traffic_and_shows_stale_then_catches_up() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 1))?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    spawn_echo(&echo.netns, PORT)?;
    let echo_addr = SocketAddr::from((echo.ip, PORT));
    wait_for("client -> echo", WAIT, || {
        tcp_check(&client.netns, echo_addr, Duration::from_secs(2))
    })?;
    let mut conn = connect(&client.netns, echo_addr, Duration::from_secs(5))?;
    echo_round_trip(&mut conn, b"before")?;

    mesh.cluster_mut("c2")?.etcd.pause();
    let stale = wait_for("c1 sees hung c2 stale", WAIT, || {
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["state"] == "stale" && c2["stale"] == true, "{c2}");
        Ok(())
    });
    if stale.is_err() {
        mesh.cluster_mut("c2")?.etcd.resume();
    }
    stale.map_err(|e| e.context(mesh.logs()))?;
    for i in 0..10 {
        echo_round_trip(&mut conn, format!("while hung {i}").as_bytes())?;
        std::thread::sleep(Duration::from_millis(200));
    }
    tcp_check(&client.netns, echo_addr, Duration::from_secs(2))?;
    assert!(
        mesh.ipcache_entry("c1", "n1", echo.ip)?.is_some(),
        "c1 dropped c2's entry while c2's etcd hung"
    );

    mesh.cluster_mut("c2")?.etcd.resume();
    wait_for("c1 sees c2 ready again", WAIT, || {
        let c2 = mesh.cluster_status("c1", "n1", "c2")?;
        anyhow::ensure!(c2["state"] == "ready", "{c2}");
        Ok(())
    })?;
    // What c2 publishes after the hang reaches c1: its watch resumed or relisted.
    let later = mesh.add_endpoint("c2", "n1", "later", "app=web")?;
    wait_in_maps(&mesh, &later, &[("c1", "n1")], true)?;
    echo_round_trip(&mut conn, b"after")?;
    Ok(())
}

/// A node whose own etcd is down still starts an endpoint whose label set one of its endpoints
/// already has (the identity is known on the node): it reaches the node's other endpoints at
/// once, and its ipcache record reaches etcd, and so the other cluster, when etcd is back. A
/// label set the node does not know is refused, saying why.
#[test]
fn an_endpoint_of_known_labels_starts_while_the_local_etcd_is_down() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 1))?;
    let first = mesh.add_endpoint("c1", "n1", "web-1", "app=web")?;
    wait_in_maps(&mesh, &first, &[("c2", "n1")], true)?;

    mesh.cluster_mut("c1")?.etcd.stop();
    let second = mesh.add_endpoint("c1", "n1", "web-2", "app=web")?;
    assert_eq!(second.identity, first.identity, "the identity of app=web");
    wait_for("web-1 -> web-2 while c1's etcd is down", WAIT, || {
        meshd_e2e::mesh::ping(&first.netns, second.ip)
    })?;
    let refused = mesh
        .add_endpoint("c1", "n1", "db", "app=db")
        .expect_err("a new label set needs etcd");
    assert!(
        format!("{refused:#}").contains("cannot be known without etcd"),
        "{refused:#}"
    );

    mesh.cluster_mut("c1")?.etcd.restart()?;
    wait_in_maps(&mesh, &second, &[("c2", "n1")], true)?;
    mesh.add_endpoint("c1", "n1", "db", "app=db")?;
    Ok(())
}

/// Round trips on every connection, as fast as they go, counting failures, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    rounds: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(conns: Vec<std::net::TcpStream>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let rounds = Arc::new(AtomicU64::new(0));
        let threads = conns
            .into_iter()
            .map(|mut conn| {
                let (stop, failures, rounds) = (stop.clone(), failures.clone(), rounds.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        if echo_round_trip(&mut conn, format!("round {i}").as_bytes()).is_err() {
                            failures.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        rounds.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            failures,
            rounds,
            threads,
        }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.failures.load(Ordering::Relaxed),
            self.rounds.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn restarting_agents_under_traffic_breaks_no_connection() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mut mesh = Mesh::start(MeshOptions::clusters(2, 2))?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let remote_echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    let peer_echo = mesh.add_endpoint("c1", "n2", "echo", "app=echo")?;
    let local_echo = mesh.add_endpoint("c1", "n1", "echo", "app=echo")?;
    let mut conns = Vec::new();
    for echo in [&remote_echo, &peer_echo, &local_echo] {
        spawn_echo(&echo.netns, PORT)?;
        let addr = SocketAddr::from((echo.ip, PORT));
        wait_for(&format!("client -> {}", echo.name), WAIT, || {
            tcp_check(&client.netns, addr, Duration::from_secs(2))
        })?;
        conns.push(connect(&client.netns, addr, Duration::from_secs(5))?);
    }
    let traffic = Traffic::start(conns);

    // A graceful restart of c2/n1 (hosting the remote echo) and a crash of c1/n1 (hosting the
    // client), each brought back.
    mesh.stop_agent("c2", "n1")?;
    std::thread::sleep(Duration::from_millis(500));
    mesh.start_agent("c2", "n1")?;
    mesh.kill_agent("c1", "n1")?;
    std::thread::sleep(Duration::from_millis(500));
    mesh.start_agent("c1", "n1")?;
    mesh.wait_all_ready(WAIT)?;
    std::thread::sleep(Duration::from_secs(2));

    let (failures, rounds) = traffic.finish();
    assert_eq!(
        failures,
        0,
        "connections broke during restarts; {}",
        mesh.logs()
    );
    assert!(
        rounds > 30,
        "too little traffic to prove anything: {rounds} rounds"
    );
    // The restarted agents recovered their endpoints rather than recreating them.
    let listed = mesh.meshd("c1", "n1", &["endpoint", "list", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&listed)?;
    let ips: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["ip"].as_str())
        .collect();
    assert!(ips.contains(&client.ip.to_string().as_str()), "{listed}");
    assert!(
        ips.contains(&local_echo.ip.to_string().as_str()),
        "{listed}"
    );
    // The address allocation survived too: a new endpoint gets an address no one holds.
    let fresh = mesh.add_endpoint("c1", "n1", "after-restart", "app=web")?;
    assert!(![client.ip, local_echo.ip].contains(&fresh.ip), "{fresh:?}");
    Ok(())
}
