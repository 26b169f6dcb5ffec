//! `meshd observe` in a real two-cluster mesh: c2 lets only `app=client` into `app=echo` on TCP
//! 8080. On echo's node, observe shows the client's connection (forwarded, live and from the
//! agent's history) and web's denied one (dropped), each with both sides' labels, as JSON that
//! parses, and only what its filters select.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshd_e2e::mesh::{EndpointInfo, LineStream, Mesh, MeshOptions};
use meshd_e2e::netns_io::{spawn_echo, tcp_check};
use meshd_e2e::wait_for;
use serde_json::Value;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);
const POLICY_KEY: &str = "meshd/config/policies/v1/default/echo-from-clients";
const POLICY: &str = r#"{"apiVersion":"meshd.io/v1","kind":"NetworkPolicy",
  "metadata":{"name":"echo-from-clients","namespace":"default"},
  "spec":{"endpointSelector":{"matchLabels":{"app":"echo"}},
          "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"client"}}],
                      "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

fn reach(from: &EndpointInfo, to: &EndpointInfo) -> anyhow::Result<()> {
    tcp_check(
        &from.netns,
        SocketAddr::from((to.ip, PORT)),
        Duration::from_secs(2),
    )
}

/// A running `meshd observe -o json ARGS` on an endpoint's node.
fn observe(mesh: &Mesh, ep: &EndpointInfo, args: &[&str]) -> anyhow::Result<LineStream> {
    let argv: Vec<&str> = ["observe", "-o", "json"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    mesh.meshd_stream(&ep.cluster, &ep.node, &argv)
}

/// The first flow an observer prints, calling `poke` (traffic) until one comes.
fn first(o: &LineStream, what: &str, mut poke: impl FnMut()) -> anyhow::Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(line) = o.lines.recv_timeout(Duration::from_millis(300)) {
            return serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("observe printed no JSON ({e}): {line}"));
        }
        anyhow::ensure!(Instant::now() < deadline, "observe showed no {what}");
        poke();
    }
}

fn labels(side: &Value) -> Vec<String> {
    let mut out: Vec<String> = side["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The flow is `from -> to` on TCP 8080, seen at `to`'s node on ingress, with both label sets.
fn check_sides(flow: &Value, from: &EndpointInfo, to: &EndpointInfo, from_app: &str) {
    assert_eq!(flow["direction"], "ingress", "{flow}");
    assert_eq!(flow["protocol"], "tcp", "{flow}");
    let (src, dst) = (&flow["source"], &flow["destination"]);
    assert_eq!(src["address"], from.ip.to_string(), "{flow}");
    assert_eq!(dst["address"], to.ip.to_string(), "{flow}");
    assert_eq!(dst["port"], PORT, "{flow}");
    assert_eq!(src["identity"], from.identity, "{flow}");
    assert_eq!(dst["identity"], to.identity, "{flow}");
    assert_eq!(src["cluster"], "c1", "{flow}");
    assert_eq!(dst["cluster"], "c2", "{flow}");
    let (s, d) = (labels(src), labels(dst));
    assert!(
        s.contains(&format!("app={from_app}")) && s.contains(&"meshd.io/cluster=c1".to_string()),
        "source labels {s:?} in {flow}"
    );
    assert!(
        d.contains(&"app=echo".to_string()) && d.contains(&"meshd.io/cluster=c2".to_string()),
        "destination labels {d:?} in {flow}"
    );
}

#[test]
fn observe_shows_an_allowed_and_a_denied_cross_cluster_connection() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let mesh = Mesh::start(MeshOptions::clusters(2, 1))?;
    mesh.cluster("c2")?
        .etcd
        .etcdctl(&["put", POLICY_KEY, POLICY])?;
    let client = mesh.add_endpoint("c1", "n1", "client", "app=client")?;
    let web = mesh.add_endpoint("c1", "n1", "web", "app=web")?;
    let echo = mesh.add_endpoint("c2", "n1", "echo", "app=echo")?;
    spawn_echo(&echo.netns, PORT)?;
    wait_for("client -> echo", WAIT, || reach(&client, &echo))
        .map_err(|e| e.context(mesh.logs()))?;
    wait_for("the policy to shut web out", WAIT, || {
        match reach(&web, &echo) {
            Ok(()) => anyhow::bail!("web still reaches echo"),
            Err(_) => Ok(()),
        }
    })
    .map_err(|e| e.context(mesh.logs()))?;

    // Live: the client's next connection, as it opens, on echo's node.
    let live = observe(
        &mesh,
        &echo,
        &[
            "--verdict",
            "forwarded",
            "--from-label",
            "app=client",
            "--to-label",
            "app=echo",
            "--protocol",
            "tcp",
            "--port",
            "8080",
        ],
    )?;
    let allowed = first(&live, "new connection of the client", || {
        let _ = reach(&client, &echo);
    })?;
    assert_eq!(allowed["verdict"], "forwarded", "{allowed}");
    assert_eq!(allowed["reason_name"], "forwarded-local", "{allowed}");
    check_sides(&allowed, &client, &echo, "client");
    drop(live);

    // From the agent's history: web's denied connection, already over.
    let denied = observe(
        &mesh,
        &echo,
        &[
            "--since",
            "10m",
            "--verdict",
            "dropped",
            "--from-label",
            "app=web",
            "--cluster",
            "c1",
            "--count",
            "1",
        ],
    )?;
    let dropped = first(&denied, "drop of web's connection", || {})?;
    assert_eq!(dropped["verdict"], "dropped", "{dropped}");
    assert_eq!(dropped["reason_name"], "policy-denied", "{dropped}");
    check_sides(&dropped, &web, &echo, "web");
    drop(denied);

    // Filters exclude: echo's node saw no connection opened towards the client (its packets
    // there are replies), and no flow of a cluster c9.
    for args in [
        &["--since", "10m", "--to-label", "app=client"][..],
        &["--since", "10m", "--cluster", "c9"][..],
    ] {
        let none = observe(&mesh, &echo, args)?;
        let shown = none.lines.recv_timeout(Duration::from_secs(2));
        assert!(shown.is_err(), "observe {args:?} showed {shown:?}");
    }
    Ok(())
}
