//! Crash safety of endpoint add and delete (issue 17, item 5): the agent is SIGKILLed at a
//! random point while `meshd endpoint add` or `del` runs, started again, and the node must then
//! be consistent: every endpoint the agent lists has its namespace, veth, address, routes,
//! ipcache record in etcd and map entry; and nothing exists that no listed endpoint owns (no
//! namespace, veth, /32 route, etcd record or map entry of this node without an endpoint, no
//! address held twice). The interrupted request, repeated, then completes.
//!
//! `MESHD_CRASH_TRIALS` (default 12) and `MESHD_CRASH_SEED` (default 1) choose the run; a failure
//! prints the seed, the trial and how to replay it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use meshd_e2e::mesh::{Mesh, MeshOptions};
use meshd_e2e::trials::{env_u64, Rng};
use meshd_e2e::wait_for;

const C: &str = "c1";
const N: &str = "n1";
const SETTLE: Duration = Duration::from_secs(30);
const LABELS: &str = "app=crash";
/// The kill falls this long after the request starts, at most: an add or a delete takes
/// 40-170 ms here (printed at the start of a run), so some kills land after it completed.
/// A fixed window (rather than one scaled to the measured time) lets a seed replay the same
/// delays; where they land in the request still depends on the machine's load.
const KILL_WINDOW: Duration = Duration::from_millis(150);

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j ARGS` inside the node's namespace.
fn ip_json(node_netns: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = output(
        Command::new("nsenter")
            .arg(format!("--net={}", node_netns.display()))
            .args(["--", "ip", "-j"])
            .args(args),
    )?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    Ok(serde_json::from_str(&out)?)
}

#[derive(Debug, Clone)]
struct Listed {
    ip: Ipv4Addr,
    identity: u32,
    netns: String,
    host_ifname: String,
    host_ifindex: u64,
}

fn listed(mesh: &Mesh) -> anyhow::Result<BTreeMap<String, Listed>> {
    let out = mesh.meshd(C, N, &["endpoint", "list", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut all = BTreeMap::new();
    for e in v.as_array().context("a list")? {
        let name = e["name"].as_str().context("name")?.to_owned();
        all.insert(
            name,
            Listed {
                ip: e["ip"].as_str().context("ip")?.parse()?,
                identity: e["identity"].as_u64().context("identity")? as u32,
                netns: e["netns"]
                    .as_str()
                    .context("netns")?
                    .trim_start_matches("/run/netns/")
                    .to_owned(),
                host_ifname: e["host_ifname"].as_str().context("ifname")?.to_owned(),
                host_ifindex: e["host_ifindex"].as_u64().unwrap_or(0),
            },
        );
    }
    Ok(all)
}

/// Every invariant of the node at once; the error lists each one broken.
fn check_node(mesh: &Mesh) -> anyhow::Result<BTreeMap<String, Listed>> {
    let eps = listed(mesh)?;
    let node = mesh.node(C, N)?;
    let mut problems = Vec::new();

    let mut ips = BTreeSet::new();
    for (name, e) in &eps {
        if !ips.insert(e.ip) {
            problems.push(format!("{name}: address {} is held twice", e.ip));
        }
        if e.host_ifindex == 0 {
            problems.push(format!("{name}: listed without a link"));
        }
    }

    // Namespaces of this node's endpoints.
    let prefix = format!("{}-ep-{C}{N}-", mesh.prefix);
    let mut namespaces = BTreeSet::new();
    for entry in std::fs::read_dir("/run/netns")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            namespaces.insert(name);
        }
    }
    let want_ns: BTreeSet<String> = eps.values().map(|e| e.netns.clone()).collect();
    for ns in namespaces.difference(&want_ns) {
        problems.push(format!("orphan namespace {ns}"));
    }
    for ns in want_ns.difference(&namespaces) {
        problems.push(format!("namespace {ns} of a listed endpoint is missing"));
    }

    // Host-side veths and /32 routes in the node's namespace.
    let links = ip_json(&node.netns, &["link", "show"])?;
    let lxc: BTreeSet<String> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("lxc"))
        .map(str::to_owned)
        .collect();
    let want_lxc: BTreeSet<String> = eps.values().map(|e| e.host_ifname.clone()).collect();
    for l in lxc.difference(&want_lxc) {
        problems.push(format!("orphan veth {l}"));
    }
    for l in want_lxc.difference(&lxc) {
        problems.push(format!("veth {l} of a listed endpoint is missing"));
    }
    let routes = ip_json(&node.netns, &["-4", "route", "show"])?;
    let mut host_routes = BTreeMap::new();
    for r in routes.as_array().into_iter().flatten() {
        let dev = r["dev"].as_str().unwrap_or_default();
        if dev.starts_with("lxc") {
            let dst = r["dst"].as_str().unwrap_or_default();
            host_routes.insert(dst.trim_end_matches("/32").to_owned(), dev.to_owned());
        }
    }
    for e in eps.values() {
        match host_routes.remove(&e.ip.to_string()) {
            Some(dev) if dev == e.host_ifname => {}
            other => problems.push(format!("route to {} is {other:?}", e.ip)),
        }
    }
    for (dst, dev) in host_routes {
        problems.push(format!("orphan route {dst} dev {dev}"));
    }

    // Inside each endpoint: its address and default route.
    for (name, e) in &eps {
        if !namespaces.contains(&e.netns) {
            continue;
        }
        let ns = Path::new("/run/netns").join(&e.netns);
        let addrs = ip_json(&ns, &["-4", "addr", "show", "dev", "eth0"])?;
        let has = addrs.as_array().into_iter().flatten().any(|a| {
            a["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["local"].as_str() == Some(&e.ip.to_string()))
        });
        if !has {
            problems.push(format!("{name}: eth0 lacks {}: {addrs}", e.ip));
        }
        let routes = ip_json(&ns, &["-4", "route", "show", "default"])?;
        if routes.as_array().is_none_or(|r| r.is_empty()) {
            problems.push(format!("{name}: no default route"));
        }
    }

    // The cluster's etcd: exactly the listed endpoints have records on this node.
    let want: BTreeMap<ipnet::Ipv4Net, u32> = eps
        .values()
        .map(|e| (ipnet::Ipv4Net::from(e.ip), e.identity))
        .collect();
    let etcd: BTreeMap<ipnet::Ipv4Net, u32> = mesh
        .etcd_ipcache()?
        .into_iter()
        .filter(|(_, (_, host))| *host == node.ip)
        .map(|(p, (id, _))| (p, id))
        .collect();
    if etcd != want {
        problems.push(format!(
            "etcd records of the node {etcd:?}, endpoints {want:?}"
        ));
    }
    // The node's own maps.
    let maps: BTreeMap<ipnet::Ipv4Net, u32> = mesh
        .map_endpoints(C, N)?
        .into_iter()
        .map(|(p, (id, _))| (p, id))
        .collect();
    if maps != want {
        problems.push(format!("ipcache map {maps:?}, endpoints {want:?}"));
    }

    if !problems.is_empty() {
        bail!("{} problems:\n{}", problems.len(), problems.join("\n"));
    }
    Ok(eps)
}

/// Starts `meshd endpoint ARGS` in the background.
fn spawn_meshd(mesh: &Mesh, args: &[&str]) -> anyhow::Result<std::process::Child> {
    let node = mesh.node(C, N)?;
    Ok(Command::new(meshd_e2e::mesh::meshd_binary()?)
        .args(args)
        .arg("--socket")
        .arg(&node.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

#[test]
fn agent_killed_during_endpoint_add_and_delete_leaves_nothing_behind() -> anyhow::Result<()> {
    if !meshd_e2e::mesh::prerequisites() {
        return Ok(());
    }
    let trials = env_u64("MESHD_CRASH_TRIALS", 12)?;
    let seed = env_u64("MESHD_CRASH_SEED", 1)?;
    eprintln!("crash trials: {trials} trials, seed {seed}");
    let mut mesh = Mesh::start(MeshOptions::clusters(1, 1))?;

    // How long an uninterrupted add and delete take here (for the log: see KILL_WINDOW).
    let t0 = Instant::now();
    let probe = mesh.add_endpoint(C, N, "probe", LABELS)?;
    let add_time = t0.elapsed();
    let t0 = Instant::now();
    mesh.delete_endpoint(&probe)?;
    let del_time = t0.elapsed();
    eprintln!("add takes {add_time:?}, delete {del_time:?}");
    check_node(&mesh)?;

    let mut rng = Rng(seed);
    let mut next = 0u64;
    for trial in 0..trials {
        let eps = listed(&mesh)?;
        let delete = !eps.is_empty() && (eps.len() >= 4 || rng.below(2) == 0);
        let (args, name) = if delete {
            let names: Vec<&String> = eps.keys().collect();
            let name = names[rng.below(names.len() as u64) as usize].clone();
            (vec!["endpoint", "del", "-o", "json"], name)
        } else {
            next += 1;
            (
                vec!["endpoint", "add", "--labels", LABELS, "-o", "json"],
                format!("crash{next}"),
            )
        };
        let delay = Duration::from_micros(rng.below(KILL_WINDOW.as_micros() as u64));
        let what = format!(
            "trial {trial}: {} {name}, agent killed after {delay:?}",
            if delete { "delete" } else { "add" }
        );
        eprintln!("{what}");
        let result = (|| -> anyhow::Result<()> {
            let mut full = args.clone();
            full.insert(2, &name);
            let mut child = spawn_meshd(&mesh, &full)?;
            std::thread::sleep(delay);
            mesh.kill_agent(C, N)?;
            let finished = child.wait()?;
            mesh.start_agent(C, N)?;
            let after = wait_for("the node consistent after the restart", SETTLE, || {
                check_node(&mesh)
            })
            .map_err(|e| e.context(mesh.log_tail(C, N, 40)))?;
            eprintln!(
                "  request {}; after the restart the endpoint is {}",
                if finished.success() {
                    "completed"
                } else {
                    "failed"
                },
                if after.contains_key(&name) {
                    "there"
                } else {
                    "gone"
                }
            );
            // The request, repeated, completes, and the node stays consistent.
            if delete {
                if after.contains_key(&name) {
                    mesh.meshd(C, N, &["endpoint", "del", &name])?;
                }
            } else {
                mesh.add_endpoint(C, N, &name, LABELS)?;
            }
            let done = wait_for("the node consistent after the repeat", SETTLE, || {
                check_node(&mesh)
            })?;
            ensure!(
                done.contains_key(&name) != delete,
                "repeated request had no effect: {done:?}"
            );
            Ok(())
        })();
        if let Err(e) = result {
            bail!(
                "{what}: {e:#}\nreplay: MESHD_CRASH_SEED={seed} MESHD_CRASH_TRIALS={} cargo test -p meshd-e2e --test crash_safety -- --nocapture",
                trial + 1
            );
        }
    }
    // How often the restarts found an add or a delete half done (the agent logs each).
    let log = std::fs::read_to_string(&mesh.node(C, N)?.log)?;
    eprintln!(
        "crash trials: {trials} trials of seed {seed} passed; restarts remade {} interrupted adds and finished {} interrupted deletes",
        log.matches("its add was interrupted").count(),
        log.matches("finishing a delete interrupted by a crash").count()
    );
    Ok(())
}
