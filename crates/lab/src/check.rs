//! The lab's connectivity check: real requests from inside endpoints, a table of pass/fail.
//!
//! - every `app=client` endpoint reaches every `app=echo` endpoint over HTTP (the answer must
//!   come from the endpoint that was asked: same node, other node, other cluster), and every
//!   other client by ping;
//! - where a policy selects the echo endpoints, a non-client endpoint (another echo) is denied;
//! - every service a cluster knows answers from each of that cluster's clients; a global one
//!   with backends in several clusters answers from more than one cluster;
//! - every client reaches the external host (which must have seen the client's node address
//!   with masquerade on, the client's own without), pings it, and pings its own node;
//! - where pod addresses are routable (native routing, or masquerade off), the external host
//!   reaches every echo endpoint as `world`, unless the lab's policy selects it (denied), and
//!   every web endpoint (the lab's policy admits `world` there);
//! - public endpoints: the external host reaches every node's IP at every node port of a
//!   cluster's services (`web`: answers from every cluster with backends, each seeing the
//!   client's own address when it runs on the node asked and that node's address otherwise;
//!   `externalTrafficPolicy: Local`, `web-local`: answers only from the node's own backends,
//!   all seeing the client's own address);
//! - where the lab runs a Prometheus, it scrapes every agent and apiserver (each `up`, each with
//!   `meshd_` series), asked through its HTTP API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde::Serialize;

use crate::proc::netns_path;
use crate::spec::ECHO_PORT;
use crate::state::{LabEndpoint, LabExternal, LabState, CONTAINER_NETNS};

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub check: String,
    pub from: String,
    pub to: String,
    /// `allow` or `deny`; `up` for the lab's Prometheus' view of a metrics endpoint.
    pub expect: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub results: Vec<CheckResult>,
    pub passed: usize,
    pub failed: usize,
}

impl CheckReport {
    pub fn all_passed(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<20} {:<18} {:<26} {:<6} {:<5} {}\n",
            "CHECK", "FROM", "TO", "EXPECT", "PASS", "DETAIL"
        );
        for r in &self.results {
            out.push_str(&format!(
                "{:<20} {:<18} {:<26} {:<6} {:<5} {}\n",
                r.check,
                r.from,
                r.to,
                r.expect,
                if r.pass { "ok" } else { "FAIL" },
                r.detail
            ));
        }
        out.push_str(&format!("{} passed, {} failed\n", self.passed, self.failed));
        out
    }
}

/// How long the check waits for the lab's Prometheus to have scraped every target.
const PROMETHEUS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Exporters send every few seconds; the lab's own changes made the traces long before.
const OTLP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A service as `meshd get services -o json` lists it.
#[derive(Debug, Clone)]
pub struct ServiceTarget {
    pub cluster: String,
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub global: bool,
    pub clusters_with_backends: usize,
    /// The first port's node port (NodePort and LoadBalancer services).
    pub node_port: Option<u16>,
    /// `externalTrafficPolicy: Local`: a node port serves only the node's own backends.
    pub local_traffic_policy: bool,
}

struct Pending {
    result: CheckResult,
    child: Child,
    kind: Kind,
}

enum Kind {
    /// The reply must name this endpoint.
    Http {
        endpoint: String,
    },
    Ping,
    /// Answered by the external host, which saw this client address.
    External {
        seen: String,
    },
    /// Must fail.
    Denied,
    /// All requests answered; `min_clusters` distinct clusters among the answers.
    Service {
        min_clusters: usize,
    },
    /// From outside to a node port of node `entry` (CLUSTER/NODE at `entry_ip`): all requests
    /// answered, from at least `min_clusters` clusters, and each backend saw the client's own
    /// address `client` if it runs on `entry`, the entry node's otherwise (SNAT). With `local`
    /// every answer must come from `entry` itself.
    ///
    /// With direct server return (`dsr`) every backend sees the client's own address, and the
    /// router's capture (`crate::capture`) must have seen replies from `entry` only for the
    /// connections its own backend served.
    NodePort {
        entry: String,
        entry_ip: String,
        client: String,
        min_clusters: usize,
        local: bool,
        dsr: bool,
    },
}

/// A command run inside `ep`'s network namespace: through `nsenter` here, or inside the node
/// container first in the docker lab.
fn in_endpoint(ep: &LabEndpoint, program: &Path, args: &[&str]) -> Command {
    in_netns(&ep.netns, ep.container.as_deref(), program, args)
}

/// A command run inside network namespace `netns` (a name or a path), in `container` first if
/// given.
fn in_netns(netns: &str, container: Option<&str>, program: &Path, args: &[&str]) -> Command {
    let netns = if netns.starts_with('/') {
        PathBuf::from(netns)
    } else {
        netns_path(netns)
    };
    let net = format!("--net={}", netns.display());
    let mut cmd = match container {
        Some(container) => {
            let mut c = Command::new("docker");
            c.args(["exec", container]);
            // The container's own namespace needs no nsenter (whose setns asks for
            // CAP_SYS_ADMIN, which the external host's container does not have).
            if netns != Path::new(CONTAINER_NETNS) {
                c.args(["nsenter", &net, "--"]);
            }
            // Inside the container the binaries are on PATH (/usr/local/bin).
            c.arg(program.file_name().map(Path::new).unwrap_or(program));
            c
        }
        None => {
            let mut c = Command::new("nsenter");
            c.args([&net, "--"]).arg(program);
            c
        }
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn request(
    meshd: &Path,
    from: &LabEndpoint,
    url: &str,
    count: u32,
    timeout_ms: u64,
) -> anyhow::Result<Child> {
    request_in(
        meshd,
        &from.netns,
        from.container.as_deref(),
        url,
        (count, 1),
        timeout_ms,
    )
    .with_context(|| format!("running a request from {}", from.name))
}

/// `count` requests, each tried on up to `attempts` connections.
fn request_in(
    meshd: &Path,
    netns: &str,
    container: Option<&str>,
    url: &str,
    (count, attempts): (u32, u32),
    timeout_ms: u64,
) -> anyhow::Result<Child> {
    let count = count.to_string();
    let attempts = attempts.to_string();
    let timeout = timeout_ms.to_string();
    let args = [
        "workload",
        "request",
        url,
        "-n",
        &count,
        "--attempts",
        &attempts,
        "--timeout-ms",
        &timeout,
        "-o",
        "json",
    ];
    Ok(in_netns(netns, container, meshd, &args).spawn()?)
}

fn ping(from: &LabEndpoint, to: &str) -> anyhow::Result<Child> {
    let args = ["-c", "2", "-i", "0.2", "-W", "2", to];
    in_endpoint(from, Path::new("ping"), &args)
        .spawn()
        .with_context(|| format!("running ping from {}", from.name))
}

/// A row whose `count` requests to `url` run on the external host, each tried on up to
/// `attempts` connections; `row` is its CHECK, TO and EXPECT.
fn from_external(
    meshd: &Path,
    ext: &LabExternal,
    (check, to, expect): (&str, String, &str),
    url: &str,
    count: (u32, u32),
    timeout_ms: u64,
    kind: Kind,
) -> anyhow::Result<Pending> {
    Ok(Pending {
        result: CheckResult {
            check: check.into(),
            from: format!("external {}", ext.ip),
            to,
            expect: expect.into(),
            pass: false,
            detail: String::new(),
        },
        child: request_in(
            meshd,
            &ext.netns,
            ext.container.as_deref(),
            url,
            count,
            timeout_ms,
        )?,
        kind,
    })
}

fn label(ep: &LabEndpoint) -> String {
    format!("{}/{}", ep.cluster, ep.name)
}

fn where_(from: &LabEndpoint, to: &LabEndpoint) -> &'static str {
    if from.cluster != to.cluster {
        "cross-cluster"
    } else if from.node != to.node {
        "cross-node"
    } else {
        "same-node"
    }
}

/// Runs every check. `policy_denies_echo_to_echo`: a policy lets only clients into echo.
pub fn run_check(
    meshd: &Path,
    state: &LabState,
    services: &[ServiceTarget],
    policy_denies_echo_to_echo: bool,
) -> anyhow::Result<CheckReport> {
    let has = |ep: &LabEndpoint, app: &str| ep.labels.get("app").map(String::as_str) == Some(app);
    let clients: Vec<&LabEndpoint> = state
        .endpoints
        .iter()
        .filter(|e| has(e, "client"))
        .collect();
    let echos: Vec<&LabEndpoint> = state.endpoints.iter().filter(|e| has(e, "echo")).collect();
    let mut pending = Vec::new();
    for from in &clients {
        for to in &echos {
            let url = format!("http://{}:{ECHO_PORT}/", to.ip);
            pending.push(Pending {
                result: result(
                    format!("http {}", where_(from, to)),
                    from,
                    &label(to),
                    "allow",
                ),
                child: request(meshd, from, &url, 2, 3000)?,
                kind: Kind::Http {
                    endpoint: to.name.clone(),
                },
            });
        }
        // ICMP between clients: no policy selects them (the lab's policy lets only TCP 8080
        // into the echo endpoints).
        for to in clients.iter().filter(|t| t.name != from.name) {
            pending.push(Pending {
                result: result(
                    format!("ping {}", where_(from, to)),
                    from,
                    &label(to),
                    "allow",
                ),
                child: ping(from, &to.ip)?,
                kind: Kind::Ping,
            });
        }
    }
    // Leaving the mesh: the external host answers and names the address it saw (the node's
    // with masquerade, the endpoint's without); ICMP to it and to the client's own node.
    if let Some(ext) = &state.external {
        for from in &clients {
            let node_ip = state
                .cluster(&from.cluster)
                .and_then(|c| c.nodes.iter().find(|n| n.name == from.node))
                .map(|n| n.ip.clone())
                .unwrap_or_default();
            let seen = if state.masquerade {
                node_ip.clone()
            } else {
                from.ip.clone()
            };
            let url = format!("http://{}:{}/", ext.ip, ext.port);
            pending.push(Pending {
                result: result(
                    "external".into(),
                    from,
                    &format!("external {}:{}", ext.ip, ext.port),
                    "allow",
                ),
                child: request(meshd, from, &url, 2, 3000)?,
                kind: Kind::External { seen },
            });
            pending.push(Pending {
                result: result("ping external".into(), from, &ext.ip, "allow"),
                child: ping(from, &ext.ip)?,
                kind: Kind::Ping,
            });
            pending.push(Pending {
                result: result(
                    "ping its node".into(),
                    from,
                    &format!("{}/{} {node_ip}", from.cluster, from.node),
                    "allow",
                ),
                child: ping(from, &node_ip)?,
                kind: Kind::Ping,
            });
        }
    }
    // Pod addresses the network routes (native routing, or masquerade off): the external host
    // reaches the echo endpoints, which see it as `world`: allowed where no policy selects
    // them, denied by the lab's policy (it lets only clients in); and the web endpoints, which
    // are public (the lab's policy admits `world` there).
    let webs: Vec<&LabEndpoint> = state.endpoints.iter().filter(|e| has(e, "web")).collect();
    if let Some(ext) = state
        .external
        .as_ref()
        .filter(|_| state.routing == meshd_state::RoutingMode::Native || !state.masquerade)
    {
        let targets = echos
            .iter()
            .map(|e| (e, policy_denies_echo_to_echo))
            .chain(webs.iter().map(|e| (e, false)));
        for (to, deny) in targets {
            let url = format!("http://{}:{ECHO_PORT}/", to.ip);
            let (expect, timeout_ms, kind) = if deny {
                ("deny", 1500, Kind::Denied)
            } else {
                let endpoint = to.name.clone();
                ("allow", 3000, Kind::Http { endpoint })
            };
            let row = ("from external", label(to), expect);
            pending.push(from_external(
                meshd,
                ext,
                row,
                &url,
                (1, 1),
                timeout_ms,
                kind,
            )?);
        }
    }
    if policy_denies_echo_to_echo {
        // One echo asks another in its own cluster and one in another cluster: not a client.
        if let Some(from) = echos.first() {
            for to in echos.iter().filter(|t| t.name != from.name) {
                if to.cluster == from.cluster && to.node == from.node {
                    continue;
                }
                let url = format!("http://{}:{ECHO_PORT}/", to.ip);
                pending.push(Pending {
                    result: result(
                        format!("policy {}", where_(from, to)),
                        from,
                        &label(to),
                        "deny",
                    ),
                    child: request(meshd, from, &url, 1, 1500)?,
                    kind: Kind::Denied,
                });
            }
        }
    }
    // Public endpoints: from the external host to every node's IP at every node port of its
    // cluster's services. With direct server return (TCP in `dsr` and `hybrid`) the router
    // records which replies pass back through the node a connection came in by.
    let dsr = matches!(state.service_lb_mode.as_str(), "dsr" | "hybrid");
    if dsr {
        let watched: Vec<crate::capture::Watched> = services
            .iter()
            .filter(|s| !s.local_traffic_policy)
            .filter_map(|s| Some((state.cluster(&s.cluster)?, s.node_port?)))
            .flat_map(|(c, node_port)| {
                c.nodes.iter().map(move |n| crate::capture::Watched {
                    netns: n.netns.clone(),
                    ip: n.ip.clone(),
                    node_port,
                })
            })
            .collect();
        crate::capture::start(state, &watched)?;
    }
    if let Some(ext) = &state.external {
        for svc in services {
            let Some(node_port) = svc.node_port else {
                continue;
            };
            let Some(cluster) = state.cluster(&svc.cluster) else {
                continue;
            };
            for node in &cluster.nodes {
                let url = format!("http://{}:{node_port}/", node.ip);
                let local = svc.local_traffic_policy;
                let kind = Kind::NodePort {
                    entry: format!("{}/{}", cluster.name, node.name),
                    entry_ip: node.ip.clone(),
                    client: ext.ip.clone(),
                    min_clusters: if local || !svc.global {
                        1
                    } else {
                        svc.clusters_with_backends.max(1)
                    },
                    local,
                    dsr: dsr && !local,
                };
                let row = (
                    match (local, dsr) {
                        (true, _) => "nodeport local",
                        (false, true) => "nodeport dsr",
                        (false, false) => "nodeport",
                    },
                    format!("{}/{} {}:{node_port}", cluster.name, node.name, node.ip),
                    "allow",
                );
                let count = if local { 6 } else { 20 };
                // Two connections per request: a node-port connection through direct server
                // return once went unanswered about one in a thousand (a client port reused
                // through another node's node port, fixed in the datapath: RELIABILITY.md). A
                // retry keeps a lab up and shows in the row's detail, where any is worth a look.
                pending.push(from_external(
                    meshd,
                    ext,
                    row,
                    &url,
                    (count, 2),
                    3000,
                    kind,
                )?);
            }
        }
    }
    for svc in services {
        for from in clients.iter().filter(|c| c.cluster == svc.cluster) {
            let url = format!("http://{}:{}/", svc.vip, svc.port);
            let min_clusters = if svc.global {
                svc.clusters_with_backends.max(1)
            } else {
                1
            };
            pending.push(Pending {
                result: result(
                    if svc.global {
                        "service global".into()
                    } else {
                        "service".into()
                    },
                    from,
                    &format!("{}/{} {}:{}", svc.cluster, svc.name, svc.vip, svc.port),
                    "allow",
                ),
                child: request(meshd, from, &url, 40, 3000)?,
                kind: Kind::Service { min_clusters },
            });
        }
    }

    let mut results = Vec::new();
    // The lab's Prometheus scrapes every agent and apiserver (meanwhile the requests run).
    if let Some(prom) = &state.prometheus {
        results.extend(crate::prometheus::check(
            &prom.url,
            &crate::prometheus::targets(state),
            PROMETHEUS_WAIT,
        ));
    }
    // Every agent's propagation traces reached the lab's collector.
    if let Some(collector) = &state.otlp {
        results.extend(crate::otlp::check(&collector.api, state, OTLP_WAIT));
    }
    for p in pending {
        let Pending {
            mut result,
            child,
            kind,
        } = p;
        let out = child.wait_with_output().context("waiting for a check")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
        match kind {
            Kind::Http { endpoint } => {
                let answered: Vec<String> = summary["by_endpoint"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                result.pass = out.status.success()
                    && answered.len() == 1
                    && answered[0].ends_with(&format!("/{endpoint}"));
                result.detail = if result.pass {
                    format!("{} answers", summary["ok"])
                } else {
                    format!("answered by {answered:?}; errors {}", summary["errors"])
                };
            }
            Kind::External { seen } => {
                let clients: Vec<String> = summary["replies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| r["client"].as_str().unwrap_or("-").to_owned())
                    .collect();
                let from_ip = |c: &String| c.rsplit_once(':').map(|(ip, _)| ip.to_owned());
                result.pass = out.status.success()
                    && !clients.is_empty()
                    && clients
                        .iter()
                        .all(|c| from_ip(c).as_deref() == Some(seen.as_str()));
                result.detail = format!("seen as {clients:?} (expected {seen})");
            }
            Kind::Ping => {
                result.pass = out.status.success();
                result.detail = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find(|l| l.contains("packets transmitted"))
                    .unwrap_or("")
                    .to_owned();
            }
            Kind::Denied => {
                result.pass = !out.status.success() && summary["ok"] == 0;
                result.detail = if result.pass {
                    "no answer (dropped by policy)".into()
                } else {
                    format!("answered: {}", summary["by_endpoint"])
                };
            }
            Kind::NodePort {
                entry,
                entry_ip,
                client,
                min_clusters,
                local,
                dsr,
            } => {
                let replies: Vec<serde_json::Value> =
                    summary["replies"].as_array().cloned().unwrap_or_default();
                let (mut pass, mut detail) = judge_node_port(
                    &replies,
                    &entry,
                    &entry_ip,
                    &client,
                    min_clusters,
                    local,
                    dsr,
                );
                if dsr {
                    let (ok, seen) = judge_return_path(
                        &replies,
                        &entry,
                        crate::capture::ports_through(state, &entry_ip),
                    );
                    pass &= ok;
                    detail.push_str(&format!("; {seen}"));
                }
                if summary["retried"].as_u64().unwrap_or(0) > 0 {
                    detail.push_str(&format!(
                        "; {} retried after {}",
                        summary["retried"], summary["retry_errors"]
                    ));
                }
                result.pass = out.status.success() && pass;
                result.detail = if out.status.success() {
                    detail
                } else {
                    format!(
                        "{}/{} answered; errors {}",
                        summary["ok"], summary["sent"], summary["errors"]
                    )
                };
            }
            Kind::Service { min_clusters } => {
                let clusters = summary["by_cluster"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                result.pass = out.status.success() && clusters.len() >= min_clusters;
                result.detail = format!(
                    "{}/{} answered, by cluster {}",
                    summary["ok"],
                    summary["sent"],
                    serde_json::Value::Object(clusters)
                );
            }
        }
        results.push(result);
    }
    if dsr {
        crate::capture::stop(state);
    }
    let passed = results.iter().filter(|r| r.pass).count();
    let failed = results.len() - passed;
    Ok(CheckReport {
        results,
        passed,
        failed,
    })
}

/// Whether the replies to requests from outside through node `entry`'s node port are right
/// (see [`Kind::NodePort`]), and a line saying what was seen.
fn judge_node_port(
    replies: &[serde_json::Value],
    entry: &str,
    entry_ip: &str,
    client: &str,
    min_clusters: usize,
    local: bool,
    dsr: bool,
) -> (bool, String) {
    let mut clusters = std::collections::BTreeSet::new();
    let mut by_node = std::collections::BTreeMap::<String, usize>::new();
    let mut wrong = Vec::new();
    for reply in replies {
        let Some(cluster) = reply["cluster"].as_str() else {
            wrong.push("no answer".to_owned());
            continue;
        };
        let node = format!("{cluster}/{}", reply["node"].as_str().unwrap_or("-"));
        let seen = reply["client"]
            .as_str()
            .and_then(|c| c.rsplit_once(':'))
            .map_or("-", |(ip, _)| ip);
        // A backend on the node asked keeps the client's address; one elsewhere sees the
        // node's (SNAT) unless the node returns nothing (DSR), and Local never sends elsewhere.
        let expected = if node == entry || dsr {
            client
        } else {
            entry_ip
        };
        if (local && node != entry) || seen != expected {
            wrong.push(format!("{node} saw {seen}"));
        }
        clusters.insert(cluster.to_owned());
        *by_node.entry(node).or_default() += 1;
    }
    let pass = !replies.is_empty() && wrong.is_empty() && clusters.len() >= min_clusters;
    let mut detail = format!(
        "{}/{} by node {by_node:?}",
        replies.len() - wrong.iter().filter(|w| *w == "no answer").count(),
        replies.len()
    );
    if !wrong.is_empty() {
        detail.push_str(&format!("; wrong: {wrong:?}"));
    }
    if clusters.len() < min_clusters {
        detail.push_str(&format!(
            "; {} cluster(s), {min_clusters} expected",
            clusters.len()
        ));
    }
    (pass, detail)
}

/// Direct server return: whether the replies that passed back through node `entry` (their
/// client ports, as the router recorded them) are exactly those of the connections its own
/// backend served; and a line saying so.
fn judge_return_path(
    replies: &[serde_json::Value],
    entry: &str,
    through_entry: anyhow::Result<std::collections::BTreeSet<u16>>,
) -> (bool, String) {
    let through_entry = match through_entry {
        Ok(ports) => ports,
        Err(e) => return (false, format!("router capture: {e:#}")),
    };
    let (mut own, mut elsewhere) = (std::collections::BTreeSet::new(), 0);
    for reply in replies.iter().filter(|r| r["cluster"].is_string()) {
        let node = format!(
            "{}/{}",
            reply["cluster"].as_str().unwrap_or("-"),
            reply["node"].as_str().unwrap_or("-")
        );
        let port = reply["client"]
            .as_str()
            .and_then(|c| c.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok());
        match port {
            Some(port) if node == entry => {
                own.insert(port);
            }
            _ => elsewhere += 1,
        }
    }
    let strays = through_entry.difference(&own).count();
    let pass = elsewhere > 0 && strays == 0 && through_entry == own;
    (
        pass,
        format!(
            "router: replies of {} connection(s) came back through {entry} ({} served there, {strays} served elsewhere; {elsewhere} connection(s) served by other nodes)",
            through_entry.len(),
            own.len()
        ),
    )
}

fn result(check: String, from: &LabEndpoint, to: &str, expect: &str) -> CheckResult {
    CheckResult {
        check,
        from: label(from),
        to: to.to_owned(),
        expect: expect.to_owned(),
        pass: false,
        detail: String::new(),
    }
}

/// Default run dir of the lab.
pub fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/meshd-lab")
}

#[cfg(test)]
mod tests {
    use super::{judge_node_port, judge_return_path};
    use serde_json::{json, Value};

    fn reply(cluster: &str, node: &str, client: &str) -> Value {
        json!({"cluster": cluster, "node": node, "endpoint": format!("web-{cluster}-{node}"),
               "client": format!("{client}:40000"), "server": "10.1.1.3:8080"})
    }

    const EXT: &str = "203.0.113.10";
    const N1: &str = "10.77.0.11";

    #[test]
    fn a_node_port_keeps_the_client_for_its_own_backend_and_snats_for_others() {
        let good = [
            reply("c1", "n1", EXT),
            reply("c1", "n2", N1),
            reply("c2", "n1", N1),
        ];
        let (pass, detail) = judge_node_port(&good, "c1/n1", N1, EXT, 2, false, false);
        assert!(pass, "{detail}");
        // Answers from one cluster only, where two have backends.
        let (pass, _) = judge_node_port(&good[..2], "c1/n1", N1, EXT, 2, false, false);
        assert!(!pass);
        // A remote backend that saw the client (no SNAT), or the local one that saw the node.
        for bad in [reply("c1", "n2", EXT), reply("c1", "n1", N1)] {
            let (pass, detail) = judge_node_port(&[bad], "c1/n1", N1, EXT, 1, false, false);
            assert!(!pass && detail.contains("wrong"), "{detail}");
        }
        // A failed request among the answers.
        let (pass, detail) = judge_node_port(
            &[good[0].clone(), Value::Null],
            "c1/n1",
            N1,
            EXT,
            1,
            false,
            false,
        );
        assert!(!pass && detail.starts_with("1/2"), "{detail}");
        assert!(!judge_node_port(&[], "c1/n1", N1, EXT, 1, false, false).0);
    }

    #[test]
    fn a_local_node_port_answers_only_from_the_node_with_the_client_kept() {
        let own = [reply("c1", "n1", EXT), reply("c1", "n1", EXT)];
        assert!(judge_node_port(&own, "c1/n1", N1, EXT, 1, true, false).0);
        let (pass, detail) =
            judge_node_port(&[reply("c1", "n2", N1)], "c1/n1", N1, EXT, 1, true, false);
        assert!(!pass && detail.contains("c1/n2"), "{detail}");
    }

    #[test]
    fn with_dsr_every_backend_keeps_the_client_and_only_the_own_backend_answers_through_the_node() {
        let mut served = [
            reply("c1", "n1", EXT),
            reply("c1", "n2", EXT),
            reply("c2", "n1", EXT),
        ];
        served[0]["client"] = json!(format!("{EXT}:40001"));
        assert!(judge_node_port(&served, "c1/n1", N1, EXT, 2, false, true).0);
        // A remote backend that saw the node: SNAT, not DSR.
        let snat = [reply("c1", "n2", N1)];
        assert!(!judge_node_port(&snat, "c1/n1", N1, EXT, 1, false, true).0);

        let through = |ports: &[u16]| Ok(ports.iter().copied().collect());
        let (pass, detail) = judge_return_path(&served, "c1/n1", through(&[40001]));
        assert!(pass, "{detail}");
        // A reply of a connection served elsewhere came back through the node.
        let (pass, detail) = judge_return_path(&served, "c1/n1", through(&[40000, 40001]));
        assert!(!pass && detail.contains("1 served elsewhere"), "{detail}");
        // Nothing recorded for the own backend's connection: the capture saw nothing.
        assert!(!judge_return_path(&served, "c1/n1", through(&[])).0);
        // No connection served elsewhere: nothing shows the direct path.
        assert!(!judge_return_path(&served[..1], "c1/n1", through(&[40001])).0);
        let (pass, detail) = judge_return_path(&served, "c1/n1", Err(anyhow::anyhow!("no nft")));
        assert!(!pass && detail.contains("no nft"), "{detail}");
    }
}
