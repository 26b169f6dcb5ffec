//! Global services end to end, in a namespace lab of two clusters (real etcd, apiservers, agents
//! and eBPF datapath), driven the way a user does: `meshd apply -f` against a cluster's
//! apiserver, `meshd endpoint add|del` on a node, and HTTP requests to a service VIP from a
//! client endpoint (`meshd lab exec ... meshd workload request -o json`, which counts answers by
//! the cluster of the backend that answered).
//!
//! Each test brings up its own lab (own prefix, underlay and run dir) and takes it down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn meshd_bin() -> PathBuf {
    meshd_testing::workspace_bin("meshd")
}

fn prerequisites() -> bool {
    meshd_testing::require_root()
        && meshd_testing::require_etcd()
        && meshd_testing::require_bpffs()
        && meshd_testing::require_workspace_bins(&["meshd", "clustermesh-apiserver"])
}

/// A running lab; taken down on drop, with the extra endpoints and workloads a test added.
struct Lab {
    _tmp: tempfile::TempDir,
    run_dir: PathBuf,
    state: Value,
    extra: Vec<ExtraEndpoint>,
}

struct ExtraEndpoint {
    socket: String,
    name: String,
    echo: Option<Child>,
}

impl Lab {
    fn up(prefix: &str, underlay: &str) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("lab");
        let out = Command::new(meshd_bin())
            .args(["lab", "up", "--prefix", prefix, "--underlay", underlay])
            .arg("--run-dir")
            .arg(&run_dir)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
            .output()
            .expect("running meshd lab up");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lab = Lab {
            state: serde_json::from_slice(
                &std::fs::read(run_dir.join("lab.json")).unwrap_or_default(),
            )
            .unwrap_or_default(),
            _tmp: tmp,
            run_dir,
            extra: Vec::new(),
        };
        assert!(
            out.status.success() && stdout.contains(" 0 failed"),
            "lab up failed\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    fn meshd(&self, args: &[&str]) -> std::process::Output {
        Command::new(meshd_bin())
            .args(args)
            .env("MESHD_CONFIG", self.run_dir.join("meshd-cli.yaml"))
            .env("MESHD_LAB_RUN_DIR", &self.run_dir)
            .output()
            .expect("running meshd")
    }

    fn meshd_ok(&self, args: &[&str]) -> String {
        let out = self.meshd(args);
        assert!(
            out.status.success(),
            "meshd {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `meshd apply -f` of `yaml` against cluster `cluster`'s apiserver.
    fn apply(&self, cluster: &str, yaml: &str) {
        let file = self
            .run_dir
            .join(format!("extra-{cluster}-{}.yaml", fnv(yaml)));
        std::fs::write(&file, yaml).unwrap();
        self.meshd_ok(&[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--context",
            &format!("lab-{cluster}"),
        ]);
    }

    /// The VIP the apiserver of `cluster` allocated for service `name`.
    fn vip(&self, cluster: &str, name: &str) -> String {
        let out = self.meshd_ok(&[
            "get",
            "services",
            "-o",
            "json",
            "--context",
            &format!("lab-{cluster}"),
        ]);
        let doc: Value = serde_json::from_str(&out).unwrap();
        doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["metadata"]["name"] == name)
            .and_then(|s| s["spec"]["clusterIP"].as_str())
            .unwrap_or_else(|| panic!("service {name} in {cluster}: {out}"))
            .to_owned()
    }

    /// `n` HTTP requests from endpoint `from` (CLUSTER/NAME) to `vip:80`: the workload's summary.
    fn requests(&self, from: &str, vip: &str, n: u32) -> Summary {
        let url = format!("http://{vip}:80/");
        let count = n.to_string();
        let out = self.meshd(&[
            "lab",
            "exec",
            from,
            "--",
            meshd_bin().to_str().unwrap(),
            "workload",
            "request",
            &url,
            "-n",
            &count,
            "--timeout-ms",
            "2000",
            "-o",
            "json",
        ]);
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Summary {
            ok: doc["ok"].as_u64().unwrap_or(0),
            by_cluster: doc["by_cluster"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
            errors: doc["errors"].to_string(),
        }
    }

    /// Requests batches until `ok` holds for one (the change has reached the datapath), or
    /// panics after a generous deadline with the last summary.
    fn wait_for(&self, what: &str, from: &str, vip: &str, ok: impl Fn(&Summary) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.requests(from, vip, 20);
            if ok(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: last summary {s:?} (errors: {})",
                s.errors
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn node_socket(&self, cluster: &str, node: &str) -> String {
        self.state["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == cluster)
            .and_then(|c| c["nodes"].as_array()?.iter().find(|n| n["name"] == node))
            .and_then(|n| n["api_socket"].as_str())
            .unwrap_or_else(|| panic!("node {cluster}/{node} in lab.json"))
            .to_owned()
    }

    /// Adds endpoint `name` with `labels` on `cluster/node` and starts an echo workload in it
    /// on `port`; returns what `endpoint add -o json` printed.
    fn add_backend(
        &mut self,
        cluster: &str,
        node: &str,
        name: &str,
        labels: &str,
        port: u16,
    ) -> Value {
        let added = self.add_endpoint(cluster, node, name, labels);
        let netns = added["netns"].as_str().unwrap().to_owned();
        let socket = self.node_socket(cluster, node);
        let echo = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg("--")
            .arg(meshd_bin())
            .args(["workload", "echo", "--listen", &format!("0.0.0.0:{port}")])
            .args(["--cluster", cluster, "--node", node, "--endpoint", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting an echo workload");
        let extra = self
            .extra
            .iter_mut()
            .find(|e| e.socket == socket && e.name == name)
            .expect("added above");
        extra.echo = Some(echo);
        added
    }

    /// Adds endpoint `name` with `labels` on `cluster/node`; returns what `endpoint add -o
    /// json` printed (ip, netns, ...).
    fn add_endpoint(&mut self, cluster: &str, node: &str, name: &str, labels: &str) -> Value {
        let socket = self.node_socket(cluster, node);
        let out = self.meshd_ok(&[
            "endpoint", "add", name, "--labels", labels, "--socket", &socket, "-o", "json",
        ]);
        let added: Value = serde_json::from_str(&out).unwrap();
        self.extra
            .retain(|e| !(e.socket == socket && e.name == name));
        self.extra.push(ExtraEndpoint {
            socket,
            name: name.to_owned(),
            echo: None,
        });
        added
    }

    fn del_endpoint(&mut self, cluster: &str, node: &str, name: &str) {
        let socket = self.node_socket(cluster, node);
        self.meshd_ok(&["endpoint", "del", name, "--socket", &socket]);
        for e in self
            .extra
            .iter_mut()
            .filter(|e| e.socket == socket && e.name == name)
        {
            if let Some(mut child) = e.echo.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for e in std::mem::take(&mut self.extra) {
            if let Some(mut child) = e.echo {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = self.meshd(&["endpoint", "del", &e.name, "--socket", &e.socket]);
        }
        let run_dir = self.run_dir.to_string_lossy().into_owned();
        let _ = self.meshd(&["lab", "down", "--run-dir", &run_dir]);
    }
}

#[derive(Debug)]
struct Summary {
    ok: u64,
    by_cluster: BTreeMap<String, u64>,
    errors: String,
}

impl Summary {
    fn only(&self, cluster: &str) -> bool {
        self.ok > 0 && self.by_cluster.keys().eq([cluster])
    }

    fn from(&self, cluster: &str) -> u64 {
        self.by_cluster.get(cluster).copied().unwrap_or(0)
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fn service(name: &str, app: &str, annotations: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: meshd.io/v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n"
    );
    if !annotations.is_empty() {
        yaml.push_str("  annotations:\n");
        for (k, v) in annotations {
            yaml.push_str(&format!("    {k}: \"{v}\"\n"));
        }
    }
    yaml.push_str(&format!(
        "spec:\n  selector: {{ app: {app} }}\n  ports:\n    - {{ name: http, port: 80, targetPort: 8080, protocol: TCP }}\n"
    ));
    yaml
}

const GLOBAL: &str = "service.meshd.io/global";
const SHARED: &str = "service.meshd.io/shared";
const AFFINITY: &str = "service.meshd.io/affinity";

/// The lab's global `echo` spreads over both clusters; a cluster that does not share uses the
/// others' backends but exports none; a service without the global annotation stays home.
#[test]
fn global_shared_and_local_services() {
    if !prerequisites() {
        return;
    }
    let mut lab = Lab::up("svcg", "10.82.0.0/24");

    // Logs written to files carry no terminal colour codes (they used to be full of them).
    let log = std::fs::read_to_string(lab.run_dir.join("c1/n1/agent.log")).unwrap();
    assert!(
        !log.is_empty() && !log.contains('\x1b'),
        "escape codes in agent.log"
    );

    // The lab's `echo`: global, shared, no affinity; two echo backends per cluster.
    let vip = lab.vip("c1", "echo");
    let s = lab.requests("c1/client-c1-n1", &vip, 200);
    assert_eq!(s.ok, 200, "{s:?}");
    assert!(
        s.from("c1") >= 40 && s.from("c2") >= 40,
        "both clusters serve at least 20%: {s:?}"
    );

    // `split`: global in both, but c2 does not share.
    lab.apply("c1", &service("split", "echo", &[(GLOBAL, "true")]));
    lab.apply(
        "c2",
        &service("split", "echo", &[(GLOBAL, "true"), (SHARED, "false")]),
    );
    let (vip1, vip2) = (lab.vip("c1", "split"), lab.vip("c2", "split"));
    lab.wait_for(
        "c2 clients see both clusters",
        "c2/client-c2-n1",
        &vip2,
        |s| s.ok == 20 && s.from("c1") > 0 && s.from("c2") > 0,
    );
    let s = lab.requests("c2/client-c2-n2", &vip2, 100);
    assert!(s.ok == 100 && s.from("c1") > 0 && s.from("c2") > 0, "{s:?}");
    let s = lab.requests("c1/client-c1-n1", &vip1, 100);
    assert!(s.ok == 100 && s.only("c1"), "c1 sees only c1: {s:?}");

    // Cilium's documentation example, a Kubernetes `v1` Service with
    // `service.cilium.io/global`, applied unchanged in both clusters: its backends (port 80,
    // no targetPort) of both clusters answer behind each cluster's VIP.
    let rebel_base = include_str!("../../../examples/services/cilium-global-service.yaml");
    lab.add_backend("c1", "n2", "rebel-base-c1", "name=rebel-base", 80);
    lab.add_backend("c2", "n1", "rebel-base-c2", "name=rebel-base", 80);
    lab.apply("c1", rebel_base);
    lab.apply("c2", rebel_base);
    let (vip1, vip2) = (lab.vip("c1", "rebel-base"), lab.vip("c2", "rebel-base"));
    for (from, vip) in [("c1/client-c1-n1", &vip1), ("c2/client-c2-n2", &vip2)] {
        lab.wait_for("rebel-base from both clusters", from, vip, |s| {
            s.ok == 20 && s.from("c1") > 0 && s.from("c2") > 0
        });
    }

    // `home`: no global annotation in either cluster.
    lab.apply("c1", &service("home", "echo", &[]));
    lab.apply("c2", &service("home", "echo", &[]));
    let (vip1, vip2) = (lab.vip("c1", "home"), lab.vip("c2", "home"));
    lab.wait_for("home answers in c1", "c1/client-c1-n2", &vip1, |s| {
        s.ok == 20
    });
    lab.wait_for("home answers in c2", "c2/client-c2-n1", &vip2, |s| {
        s.ok == 20
    });
    for (from, vip, cluster) in [
        ("c1/client-c1-n1", &vip1, "c1"),
        ("c1/client-c1-n2", &vip1, "c1"),
        ("c2/client-c2-n1", &vip2, "c2"),
        ("c2/client-c2-n2", &vip2, "c2"),
    ] {
        let s = lab.requests(from, vip, 60);
        assert!(s.ok == 60 && s.only(cluster), "{from}: {s:?}");
    }
}

/// Affinity `local`: c1's clients stay in c1 while c1 has a ready backend, fail over to c2 by
/// themselves when c1's last backend goes, and come back when it returns.
#[test]
fn affinity_local_fails_over_and_back() {
    if !prerequisites() {
        return;
    }
    let mut lab = Lab::up("svca", "10.83.0.0/24");
    lab.add_backend("c1", "n2", "aff-c1", "app=aff", 8080);
    lab.add_backend("c2", "n1", "aff-c2", "app=aff", 8080);
    lab.add_backend("c2", "n2", "aff-c2b", "app=aff", 8080);
    lab.apply(
        "c1",
        &service("aff", "aff", &[(GLOBAL, "true"), (AFFINITY, "local")]),
    );
    lab.apply("c2", &service("aff", "aff", &[(GLOBAL, "true")]));
    let vip = lab.vip("c1", "aff");
    let client = "c1/client-c1-n1";
    lab.wait_for("aff answers", client, &vip, |s| s.ok == 20);
    // c2's records may still be on their way: c1's clients must stay in c1 all along.
    let s = lab.requests(client, &vip, 100);
    assert!(s.ok == 100 && s.only("c1"), "local affinity: {s:?}");
    // c2's own clients (affinity none there) use both.
    let vip2 = lab.vip("c2", "aff");
    lab.wait_for("c2 clients see both", "c2/client-c2-n1", &vip2, |s| {
        s.from("c1") > 0 && s.from("c2") > 0
    });

    lab.del_endpoint("c1", "n2", "aff-c1");
    lab.wait_for("failover to c2", client, &vip, |s| {
        s.ok == 20 && s.only("c2")
    });
    let s = lab.requests(client, &vip, 100);
    assert!(s.ok == 100 && s.only("c2"), "served by c2: {s:?}");

    lab.add_backend("c1", "n2", "aff-c1", "app=aff", 8080);
    lab.wait_for("back to c1", client, &vip, |s| s.ok == 20 && s.only("c1"));
    let s = lab.requests(client, &vip, 100);
    assert!(s.ok == 100 && s.only("c1"), "back in c1: {s:?}");
}

// ---- benchmarks (`scripts/bench.d/services-*.sh`; ignored by `cargo test`) ----

/// The netns path of a lab endpoint (CLUSTER/NAME) from lab.json.
fn endpoint_netns(lab: &Lab, target: &str) -> PathBuf {
    let (cluster, name) = target.split_once('/').unwrap();
    let ep = lab.state["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cluster"] == cluster && e["name"] == name)
        .unwrap_or_else(|| panic!("endpoint {target} in lab.json"));
    meshd_datapath::netns::named_path(ep["netns"].as_str().unwrap())
}

/// One HTTP GET on a new connection; the answering cluster, or None if it failed.
fn get_cluster(addr: std::net::SocketAddr, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let at = body.find("\"cluster\":\"")? + 11;
    Some(body[at..].split('"').next()?.to_owned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Failover: with affinity local and one local backend, the local backend is deleted while a
/// client keeps opening connections to the VIP; the figure is the time from the deletion
/// command to the first answer of a remote backend, over 20 trials.
#[test]
#[ignore = "benchmark: scripts/bench.d/services-failover.sh"]
fn bench_failover() {
    if !prerequisites() {
        return;
    }
    let trials: usize = std::env::var("SERVICES_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut lab = Lab::up("svcbf", "10.84.0.0/24");
    lab.add_backend("c2", "n1", "fo-c2", "app=fo", 8080);
    lab.apply(
        "c1",
        &service("fo", "fo", &[(GLOBAL, "true"), (AFFINITY, "local")]),
    );
    lab.apply("c2", &service("fo", "fo", &[(GLOBAL, "true")]));
    let vip: std::net::IpAddr = lab.vip("c1", "fo").parse().unwrap();
    let client = "c1/client-c1-n1";
    let netns = endpoint_netns(&lab, client);
    let mut failover_ms = Vec::new();
    let mut delete_ms = Vec::new();
    for trial in 0..trials {
        lab.add_backend("c1", "n2", "fo-c1", "app=fo", 8080);
        lab.wait_for("c1 backend serving", client, &vip.to_string(), |s| {
            s.ok == 20 && s.only("c1")
        });
        let stop = std::sync::atomic::AtomicBool::new(false);
        let t0 = std::sync::Mutex::new(None::<Instant>);
        let first_remote = std::thread::scope(|scope| {
            let prober = scope.spawn(|| {
                meshd_datapath::netns::run_in(&netns, || -> anyhow::Result<Option<Instant>> {
                    let addr = std::net::SocketAddr::new(vip, 80);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let answer = get_cluster(addr, Duration::from_millis(50));
                        let started = t0.lock().unwrap().is_some();
                        if started && answer.as_deref() == Some("c2") {
                            return Ok(Some(Instant::now()));
                        }
                    }
                    Ok(None)
                })
                .unwrap()
            });
            // Let the prober run against the local backend first.
            std::thread::sleep(Duration::from_millis(100));
            let start = Instant::now();
            *t0.lock().unwrap() = Some(start);
            lab.del_endpoint("c1", "n2", "fo-c1");
            delete_ms.push(start.elapsed().as_secs_f64() * 1e3);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !prober.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            prober.join().unwrap().map(|t| t - start)
        });
        let d = first_remote.unwrap_or_else(|| panic!("trial {trial}: no remote answer in 30 s"));
        failover_ms.push(d.as_secs_f64() * 1e3);
        println!(
            "trial {trial}: first remote answer {:.1} ms after the deletion started (deletion command {:.1} ms)",
            failover_ms.last().unwrap(),
            delete_ms.last().unwrap()
        );
    }
    failover_ms.sort_by(f64::total_cmp);
    delete_ms.sort_by(f64::total_cmp);
    println!(
        "failover over {trials} trials: p50 {:.1} ms, p90 {:.1} ms, min {:.1}, max {:.1} (goal p50 < 200 ms); \
         baseline (the `meshd endpoint del` command alone): p50 {:.1} ms",
        percentile(&failover_ms, 0.5),
        percentile(&failover_ms, 0.9),
        failover_ms[0],
        failover_ms[failover_ms.len() - 1],
        percentile(&delete_ms, 0.5),
    );
}

/// New-connection rate through a VIP versus straight to a backend's IP, in the same run: two
/// clients on one node open connections at the same time (connect, GET, read to close; 4
/// threads each), one to the VIP of a one-backend service, one to the IP of a twin backend
/// beside that backend, on another node of the clients' cluster.
#[test]
#[ignore = "benchmark: scripts/bench.d/services-connrate.sh"]
fn bench_connection_rate() {
    if !prerequisites() {
        return;
    }
    let runs: usize = 7;
    let per_thread: usize = std::env::var("SERVICES_CONNRATE_PER_THREAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let threads: usize = std::env::var("SERVICES_CONNRATE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut lab = Lab::up("svcbr", "10.85.0.0/24");
    lab.add_backend("c1", "n2", "one-c1", "app=one", 8080);
    lab.apply("c1", &service("one", "one", &[]));
    let vip: std::net::IpAddr = lab.vip("c1", "one").parse().unwrap();
    let client = "c1/client-c1-n1";
    lab.wait_for("one answers", client, &vip.to_string(), |s| s.ok == 20);
    // The direct target is a twin backend on the same node (its own echo server, not in the
    // service), so neither side waits for the other's server. The direct connections come
    // from a second client on the client's node: after DNAT, a VIP connection and a direct one
    // from one client could share a 4-tuple at a backend (the client's kernel picks their
    // source ports independently), and TIME_WAIT collisions would be measured, not the
    // datapath.
    let twin = lab.add_backend("c1", "n2", "two-c1", "app=two", 8080);
    let backend: std::net::IpAddr = twin["ip"].as_str().unwrap().parse().unwrap();
    let direct_client = lab.add_endpoint("c1", "n1", "cr-direct", "app=client");
    let vip_netns = endpoint_netns(&lab, client);
    let direct_netns = PathBuf::from(direct_client["netns"].as_str().unwrap());
    let (vip_addr, direct_addr) = (
        std::net::SocketAddr::new(vip, 80),
        std::net::SocketAddr::new(backend, 8080),
    );
    // Both clients run at once, `threads` connection loops each, so load drift on this shared
    // machine hits both alike; a target's rate is its connections over its wall time.
    let connect_loop = |netns: &Path, addr: std::net::SocketAddr| -> f64 {
        meshd_datapath::netns::run_in(netns, || -> anyhow::Result<f64> {
            let failed = std::sync::atomic::AtomicUsize::new(0);
            let start = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|| {
                        for _ in 0..per_thread {
                            if get_cluster(addr, Duration::from_secs(2)).is_none() {
                                failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let failed = failed.load(std::sync::atomic::Ordering::Relaxed);
            anyhow::ensure!(failed == 0, "{failed} connections to {addr} failed");
            Ok((threads * per_thread) as f64 / start.elapsed().as_secs_f64())
        })
        .unwrap()
    };
    let run = || -> (f64, f64) {
        std::thread::scope(|scope| {
            let v = scope.spawn(|| connect_loop(&vip_netns, vip_addr));
            let d = scope.spawn(|| connect_loop(&direct_netns, direct_addr));
            (v.join().unwrap(), d.join().unwrap())
        })
    };
    let (mut via_vip, mut direct, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let (v, d) = run();
        println!(
            "run {r}: via VIP {v:.0} conn/s, direct {d:.0} conn/s = {:.2}x",
            v / d
        );
        via_vip.push(v);
        direct.push(d);
        ratios.push(v / d);
    }
    via_vip.sort_by(f64::total_cmp);
    direct.sort_by(f64::total_cmp);
    ratios.sort_by(f64::total_cmp);
    println!(
        "new connections/s, median of {runs} runs x {} connections each way: via VIP {:.0} [{:.0}..{:.0}], \
         direct to the backend {:.0} [{:.0}..{:.0}]; ratio median {:.2}x [{:.2}..{:.2}] (goal >= 0.9x)",
        threads * per_thread,
        percentile(&via_vip, 0.5),
        via_vip[0],
        via_vip[runs - 1],
        percentile(&direct, 0.5),
        direct[0],
        direct[runs - 1],
        percentile(&ratios, 0.5),
        ratios[0],
        ratios[runs - 1],
    );
}
