//! The namespace lab as a user runs it: `meshd lab up` (every check must pass), `meshd lab
//! status -o json`, `meshd lab down`, and nothing left behind. Uses its own prefix, underlay and
//! run dir, so it runs beside a user's `make lab`.

use std::path::Path;
use std::process::Command;

fn prerequisites() -> bool {
    meshd_testing::require_root()
        && meshd_testing::require_etcd()
        && meshd_testing::require_bpffs()
        && meshd_testing::require_workspace_bins(&[
            "meshd",
            "clustermesh-apiserver",
            "meshd-otlp-collector",
        ])
}

fn meshd(args: &[&str]) -> std::process::Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    Command::new(meshd_testing::workspace_bin("meshd"))
        .args(args)
        .current_dir(repo)
        .output()
        .expect("running meshd")
}

const PREFIX: &str = "mltest";

fn leftovers(run_dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) {
            left.push(format!("netns {name}"));
        }
    }
    if Path::new("/sys/fs/bpf").join(PREFIX).exists() {
        left.push(format!("pins /sys/fs/bpf/{PREFIX}"));
    }
    if run_dir.exists() {
        left.push(format!("run dir {}", run_dir.display()));
    }
    let marker = format!("MESHD_LAB_RUN_DIR={}", run_dir.display());
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(env) = std::fs::read(entry.path().join("environ")) {
            if env.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
                left.push(format!("process {}", entry.file_name().to_string_lossy()));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines().filter(|l| l.contains(PREFIX)) {
        left.push(format!("mount {line}"));
    }
    left
}

#[test]
fn lab_up_check_status_down_twice() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("lab");
    let run = run_dir.to_str().unwrap();
    let up_args = [
        "lab",
        "up",
        "--prefix",
        PREFIX,
        "--underlay",
        "10.79.0.0/24",
        "--run-dir",
        run,
    ];
    // The lab runs a Prometheus when one is installed (under CI=true it must be).
    let prometheus = meshd_testing::require(
        "prometheus on PATH (scripts/install-deps.sh installs Debian's)",
        meshd_testing::have_binary("prometheus"),
    );
    // Direct server return needs native routing: refused before anything is made.
    let mut args = up_args.to_vec();
    args.extend(["--service-lb-mode", "dsr"]);
    let refused = meshd(&args);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("--routing native"),
        "{stderr}"
    );
    assert!(leftovers(&run_dir).is_empty(), "{:?}", leftovers(&run_dir));
    // Twice in a row: the second `up` replaces the first lab, without masquerade, in native
    // routing mode with direct server return and every cluster's remote clusters read through
    // its cache.
    for round in 1..=2 {
        let mut args = up_args.to_vec();
        if round == 2 {
            args.extend(["--no-masquerade", "--routing", "native", "--kvstoremesh"]);
            args.extend(["--service-lb-mode", "dsr"]);
        }
        let up = meshd(&args);
        let stdout = String::from_utf8_lossy(&up.stdout);
        let stderr = String::from_utf8_lossy(&up.stderr);
        if !up.status.success() {
            let _ = meshd(&["lab", "down", "--run-dir", run]);
            panic!("round {round}: lab up failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
        assert!(stdout.contains(" 0 failed"), "round {round}: {stdout}");
        assert!(stdout.contains("cross-cluster"), "round {round}: {stdout}");
        // The check asked the lab's Prometheus about every agent and apiserver (2 x 3 targets).
        for row in ["prometheus up ", "prometheus series "] {
            let ok = stdout
                .lines()
                .filter(|l| l.starts_with(row) && l.contains(" ok "))
                .count();
            assert_eq!(
                ok,
                if prometheus { 6 } else { 0 },
                "round {round}: {stdout}"
            );
        }
        // Every agent's propagation traces and every apiserver's API call spans reached the
        // lab's trace collector.
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.starts_with("otlp traces ") && l.contains(" ok "))
                .count(),
            6,
            "round {round}: {stdout}"
        );
        // The external host answered every client (and saw the address the mode implies).
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.starts_with("external ") && l.contains(" ok "))
                .count(),
            4,
            "round {round}: {stdout}"
        );
        // Public endpoints: the external host reaches every node (2 x 2) at the node port of
        // `web` and at the one of `web-local` (externalTrafficPolicy Local), in each cluster.
        // With DSR the `web` rows also check the router's record of the replies' path.
        let web_row = if round == 2 {
            "nodeport dsr"
        } else {
            "nodeport"
        };
        for row in [web_row, "nodeport local"] {
            // The CHECK column, padded with spaces (names have single spaces inside).
            let rows: Vec<&str> = stdout
                .lines()
                .filter(|l| l.split("  ").next() == Some(row))
                .collect();
            assert_eq!(rows.len(), 4, "round {round}: {row}: {stdout}");
            assert!(rows.iter().all(|l| l.contains(" ok ")), "{stdout}");
        }
        // Native: the external host reaches the echo endpoints as world, and the lab's policy
        // (only clients into echo) turns it away; the web endpoints' policy admits it.
        let from_external: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("from external "))
            .collect();
        if round == 2 {
            assert_eq!(from_external.len(), 8, "{stdout}");
            assert!(from_external.iter().all(|l| l.contains(" ok ")), "{stdout}");
            for (app, expect, count) in [("/echo-", " deny ", 4), ("/web-", " allow ", 4)] {
                let rows = from_external.iter().filter(|l| l.contains(app));
                assert_eq!(
                    rows.filter(|l| l.contains(expect)).count(),
                    count,
                    "{app}: {stdout}"
                );
            }
        } else {
            assert!(from_external.is_empty(), "{stdout}");
        }
    }

    let status = meshd(&["lab", "status", "--run-dir", run, "-o", "json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let clusters = doc["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 2);
    // `meshd lab status | head -0`: a reader that goes away ends the command as SIGPIPE ends
    // any Unix tool, not with a panic about the broken pipe.
    let mut piped = Command::new(meshd_testing::workspace_bin("meshd"))
        .args(["lab", "status", "--run-dir", run])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running meshd lab status");
    drop(piped.stdout.take());
    let closed = piped
        .wait_with_output()
        .expect("waiting for meshd lab status");
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(
        !stderr.contains("panicked") && closed.status.code() != Some(101),
        "meshd lab status with its reader gone: {:?} {stderr}",
        closed.status
    );
    for c in clusters {
        assert!(c["etcd"]["pid"].as_u64().unwrap() > 0, "{c}");
        assert!(Path::new(c["etcd"]["remote"]["cert"].as_str().unwrap()).is_file());
        assert_eq!(c["nodes"].as_array().unwrap().len(), 2);
    }
    // Every agent's and apiserver's metrics answer from the host.
    for c in clusters {
        let mut urls = vec![c["apiserver_metrics"].as_str().unwrap().to_owned()];
        for n in c["nodes"].as_array().unwrap() {
            urls.push(n["metrics"].as_str().unwrap().to_owned());
        }
        for url in urls {
            let body = http_get(&url);
            assert!(body.contains("# HELP meshd_"), "{url}: {body}");
        }
    }
    // The lab's trace collector, asked from the host: each node's propagation traces, one a
    // change from the other cluster, marked with the node and its cluster.
    let api = doc["otlp"]["api"].as_str().expect("otlp api URL");
    assert!(
        doc["otlp"]["endpoint"].as_str().unwrap().ends_with(":4317"),
        "{doc}"
    );
    for (cluster, peer) in [("c1", "c2"), ("c2", "c1")] {
        for node in ["n1", "n2"] {
            let body = http_get(&format!(
                "{api}/api/spans?host={cluster}-{node}&name=meshd.propagation"
            ));
            let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let spans: Vec<serde_json::Value> =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert!(
                spans
                    .iter()
                    .any(|s| s["service"] == "meshd" && s["attributes"]["meshd.cluster"] == peer),
                "{cluster}-{node}: no propagation trace of a {peer} change: {body}"
            );
        }
    }
    // The lab's Prometheus, asked from the host: every agent and apiserver up.
    if prometheus {
        let url = doc["prometheus"].as_str().expect("prometheus URL");
        let body = http_get(&format!("{url}/api/v1/query?query=up"));
        let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let up: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {body}"));
        let up: Vec<(String, String)> = up["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["metric"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    r["value"][1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        for c in clusters {
            let mut urls = vec![c["apiserver_metrics"].as_str().unwrap()];
            urls.extend(
                c["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n["metrics"].as_str().unwrap()),
            );
            for metrics in urls {
                let instance = metrics
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics");
                assert!(
                    up.contains(&(instance.to_owned(), "1".to_owned())),
                    "{instance} not up in {up:?}"
                );
            }
        }
    } else {
        assert!(doc["prometheus"].is_null(), "{doc}");
        assert!(
            doc["prometheus_absent"]
                .as_str()
                .unwrap()
                .contains("prometheus"),
            "{doc}"
        );
    }
    assert_eq!(doc["masquerade"], false, "{doc}");
    assert_eq!(doc["routing"], "native", "{doc}");
    assert_eq!(doc["kvstoremesh"], true, "{doc}");
    assert_eq!(doc["service_lb_mode"], "dsr", "{doc}");
    // One node per cluster behind the router: the others route to it through the router, not
    // with a direct route, and say so.
    let c1 = &clusters[0]["nodes"];
    assert_eq!(c1[1]["ip"], "10.79.1.2", "{doc}");
    let agent = meshd(&[
        "status",
        "-o",
        "json",
        "--socket",
        c1[0]["api_socket"].as_str().unwrap(),
    ]);
    let agent: serde_json::Value = serde_json::from_slice(&agent.stdout).unwrap();
    let remote = agent["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "c2")
        .unwrap();
    assert_eq!(remote["source"], "cache", "{remote}");
    assert_eq!(remote["state"], "ready", "{remote}");
    let routing = &agent["routing"];
    assert_eq!(routing["routes_installed"], 1, "{routing}");
    let skipped = routing["skipped_nodes"].to_string();
    assert!(
        skipped.contains("c1/n2 (10.79.1.2)") && skipped.contains("c2/n2 (10.79.2.2)"),
        "{routing}"
    );
    assert_eq!(doc["external"]["ip"], "203.0.113.10", "{doc}");
    assert_eq!(doc["external"]["port"], 8080, "{doc}");
    let ext_netns = doc["external"]["netns"].as_str().unwrap();
    assert!(Path::new("/run/netns").join(ext_netns).exists(), "{doc}");
    let endpoints = doc["endpoints"].as_array().unwrap();
    // Per node: echo, client and web.
    assert_eq!(endpoints.len(), 12);
    for e in endpoints {
        let netns = e["netns"].as_str().unwrap();
        assert!(Path::new("/run/netns").join(netns).exists(), "{e}");
    }
    let services = doc["services"].as_array().unwrap();
    assert!(
        services
            .iter()
            .any(|s| s["name"] == "echo" && s["cluster"] == "c1"),
        "{services:?}"
    );
    // The public services, in both clusters, with their node ports; echo has none.
    for cluster in ["c1", "c2"] {
        let svc = |name: &str| {
            services
                .iter()
                .find(|s| s["name"] == name && s["cluster"] == cluster)
                .unwrap_or_else(|| panic!("{name} in {cluster}: {services:?}"))
        };
        assert_eq!(svc("echo")["type"], "ClusterIP", "{services:?}");
        assert!(svc("echo")["node_port"].is_null(), "{services:?}");
        for (name, port, policy) in [("web", 30080, "Cluster"), ("web-local", 30081, "Local")] {
            let s = svc(name);
            assert_eq!(s["type"], "NodePort", "{s}");
            assert_eq!(s["node_port"], port, "{s}");
            assert_eq!(s["external_traffic_policy"], policy, "{s}");
            assert_eq!(s["external_ips"], serde_json::json!([]), "{s}");
            assert!(
                s["vip"].is_string(),
                "a NodePort service keeps its VIP: {s}"
            );
        }
    }

    let exec = meshd(&[
        "lab",
        "exec",
        "--run-dir",
        run,
        "c1/client-c1-n1",
        "--",
        "ip",
        "-4",
        "-o",
        "addr",
    ]);
    assert!(exec.status.success());
    let client_ip = endpoints
        .iter()
        .find(|e| e["name"] == "client-c1-n1")
        .unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(String::from_utf8_lossy(&exec.stdout).contains(&client_ip));

    for round in 1..=2 {
        let down = meshd(&["lab", "down", "--run-dir", run]);
        assert!(
            down.status.success(),
            "down round {round}: {}",
            String::from_utf8_lossy(&down.stderr)
        );
    }
    let left = leftovers(&run_dir);
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// The body of a plain HTTP GET of `url` (`http://IP:PORT/PATH`).
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (addr, path) = rest.split_once('/').expect("a path");
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{url}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
