//! Prometheus in the lab: the scrape configuration of every agent and apiserver, and the check
//! that asks the lab's Prometheus (its HTTP API) whether it scrapes them all: every target
//! `up`, and `meshd_` series from every one.
//!
//! The namespace lab runs the server in the host namespace when a `prometheus` binary is
//! installed; the docker lab runs it as a container (docker-compose.yml, the image's Debian
//! `prometheus` package, lab/docker/prometheus.yml).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::check::CheckResult;
use crate::state::LabState;

/// Port of the lab's Prometheus (on the host's underlay address in the namespace lab).
pub const PROMETHEUS_PORT: u16 = 9090;
/// How often the lab's Prometheus scrapes (short: the lab's check waits for a scrape).
pub const SCRAPE_INTERVAL: &str = "2s";
pub const AGENT_JOB: &str = "meshd-agent";
pub const APISERVER_JOB: &str = "clustermesh-apiserver";

/// One endpoint Prometheus scrapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub job: &'static str,
    /// `ip:port` (Prometheus' `instance` label).
    pub instance: String,
    pub cluster: String,
    /// The node, for agents.
    pub node: Option<String>,
}

impl Target {
    fn name(&self) -> String {
        match &self.node {
            Some(node) => format!("{}/{node} {}", self.cluster, self.instance),
            None => format!("{}/apiserver {}", self.cluster, self.instance),
        }
    }
}

/// `host:port` of a metrics URL (`http://host:port/metrics`).
fn instance_of(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    Some(rest.split('/').next()?.to_owned())
}

/// Every agent and apiserver of the lab whose metrics URL it records.
pub fn targets(state: &LabState) -> Vec<Target> {
    let mut out = Vec::new();
    for c in &state.clusters {
        let apiserver = (APISERVER_JOB, c.apiserver_metrics.as_deref(), None);
        let agents = c
            .nodes
            .iter()
            .map(|n| (AGENT_JOB, n.metrics.as_deref(), Some(n.name.clone())));
        for (job, url, node) in std::iter::once(apiserver).chain(agents) {
            if let Some(instance) = url.and_then(instance_of) {
                out.push(Target {
                    job,
                    instance,
                    cluster: c.name.clone(),
                    node,
                });
            }
        }
    }
    out
}

/// Prometheus' configuration scraping `targets` (one static target each, labelled with its
/// cluster and node).
pub fn config(targets: &[Target]) -> String {
    let mut yaml = format!(
        "# Written by the meshd lab: every agent and apiserver of the lab.\nglobal:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\nscrape_configs:\n"
    );
    for job in [AGENT_JOB, APISERVER_JOB] {
        let of_job: Vec<&Target> = targets.iter().filter(|t| t.job == job).collect();
        if of_job.is_empty() {
            continue;
        }
        let _ = writeln!(yaml, "  - job_name: {job}\n    static_configs:");
        for t in of_job {
            let _ = writeln!(
                yaml,
                "      - targets: ['{}']\n        labels: {{cluster: '{}'{}}}",
                t.instance,
                t.cluster,
                t.node
                    .as_ref()
                    .map(|n| format!(", node: '{n}'"))
                    .unwrap_or_default()
            );
        }
    }
    yaml
}

/// Percent-encodes a query parameter's value (everything but unreserved characters).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The body of a plain HTTP/1.0 GET of `http://HOST:PORT/PATH`, which must answer 200.
pub fn http_get(url: &str, timeout: Duration) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: not an http:// URL"))?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("{url}: the host is not IP:PORT"))?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).with_context(|| url.to_owned())?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| url.to_owned())?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url}: no HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{url}: {status}: {body}");
    }
    Ok(body.to_owned())
}

/// An instant query against Prometheus at `base` (`http://IP:PORT`): the result vector's
/// samples, as (labels, value).
pub fn query(base: &str, promql: &str) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
    let url = format!(
        "{}/api/v1/query?query={}",
        base.trim_end_matches('/'),
        encode(promql)
    );
    let body = http_get(&url, Duration::from_secs(5))?;
    let doc: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("{url}: not JSON: {body}"))?;
    if doc["status"] != "success" {
        bail!("{url}: {body}");
    }
    let mut out = Vec::new();
    for sample in doc["data"]["result"].as_array().into_iter().flatten() {
        let labels = serde_json::from_value(sample["metric"].clone()).unwrap_or_default();
        let value = sample["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        out.push((labels, value));
    }
    Ok(out)
}

/// What the lab's Prometheus says of each target: `up` and its number of `meshd_` series.
#[derive(Debug, Default, Clone)]
struct Seen {
    up: Option<f64>,
    meshd_series: f64,
}

fn observe(base: &str, targets: &[Target]) -> anyhow::Result<BTreeMap<String, Seen>> {
    let mut seen: BTreeMap<String, Seen> = targets
        .iter()
        .map(|t| (t.instance.clone(), Seen::default()))
        .collect();
    for (labels, value) in query(base, "up")? {
        if let Some(s) = labels.get("instance").and_then(|i| seen.get_mut(i)) {
            s.up = Some(value);
        }
    }
    for (labels, value) in query(base, r#"count by (instance) ({__name__=~"meshd_.+"})"#)? {
        if let Some(s) = labels.get("instance").and_then(|i| seen.get_mut(i)) {
            s.meshd_series = value;
        }
    }
    Ok(seen)
}

/// Asks the lab's Prometheus (`base`, `http://IP:PORT`) for every target: `up` is 1 and it
/// has `meshd_` series. Waits up to `wait` for the first scrapes of every target. Two results
/// per target: `prometheus up` and `prometheus series`.
pub fn check(base: &str, targets: &[Target], wait: Duration) -> Vec<CheckResult> {
    let deadline = Instant::now() + wait;
    let all_seen = |seen: &BTreeMap<String, Seen>| {
        seen.values()
            .all(|s| s.up == Some(1.0) && s.meshd_series > 0.0)
    };
    let observed = loop {
        let observed = observe(base, targets);
        match &observed {
            Ok(seen) if all_seen(seen) => break observed,
            _ if Instant::now() >= deadline => break observed,
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let mut results = Vec::new();
    for t in targets {
        let result = |check: &str, pass: bool, detail: String| CheckResult {
            check: check.into(),
            from: format!(
                "prometheus {}",
                instance_of(&format!("{base}/")).unwrap_or_default()
            ),
            to: t.name(),
            expect: "up".into(),
            pass,
            detail,
        };
        match &observed {
            Err(e) => {
                results.push(result("prometheus up", false, format!("{e:#}")));
                results.push(result("prometheus series", false, format!("{e:#}")));
            }
            Ok(seen) => {
                let s = seen.get(&t.instance).cloned().unwrap_or_default();
                results.push(result(
                    "prometheus up",
                    s.up == Some(1.0),
                    match s.up {
                        Some(v) => format!("job {} up {v}", t.job),
                        None => format!("job {}: no `up` series (not scraped)", t.job),
                    },
                ));
                results.push(result(
                    "prometheus series",
                    s.meshd_series > 0.0,
                    format!("{} meshd_ series", s.meshd_series),
                ));
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{LabCluster, LabNode};

    fn node(name: &str, metrics: Option<&str>) -> LabNode {
        LabNode {
            name: name.into(),
            netns: String::new(),
            ip: String::new(),
            agent_pid: 0,
            api_socket: Default::default(),
            metrics: metrics.map(str::to_owned),
            etcd: Default::default(),
            container: None,
        }
    }

    #[test]
    fn targets_and_config_name_every_recorded_metrics_endpoint() {
        let state = LabState {
            clusters: vec![LabCluster {
                name: "c1".into(),
                id: 1,
                context: String::new(),
                etcd: Default::default(),
                admin: Default::default(),
                apiserver: String::new(),
                apiserver_metrics: Some("http://10.77.0.101:9963/metrics".into()),
                nodes: vec![
                    node("n1", Some("http://10.77.1.1:9962/metrics")),
                    node("n2", None),
                ],
            }],
            ..LabState::default()
        };
        let targets = targets(&state);
        assert_eq!(
            targets
                .iter()
                .map(|t| (t.job, t.instance.as_str(), t.node.as_deref()))
                .collect::<Vec<_>>(),
            [
                (APISERVER_JOB, "10.77.0.101:9963", None),
                (AGENT_JOB, "10.77.1.1:9962", Some("n1")),
            ]
        );
        let yaml = config(&targets);
        assert!(
            yaml.contains(
                "  - job_name: meshd-agent\n    static_configs:\n      - targets: ['10.77.1.1:9962']\n        labels: {cluster: 'c1', node: 'n1'}\n"
            ),
            "{yaml}"
        );
        assert!(
            yaml.contains("targets: ['10.77.0.101:9963']\n        labels: {cluster: 'c1'}\n"),
            "{yaml}"
        );
    }

    #[test]
    fn config_passes_promtool_check_config() {
        if !meshd_testing::require(
            "promtool on PATH (scripts/install-deps.sh)",
            meshd_testing::have_binary("promtool"),
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prometheus.yml");
        let targets = [
            Target {
                job: AGENT_JOB,
                instance: "10.77.1.1:9962".into(),
                cluster: "c1".into(),
                node: Some("n1".into()),
            },
            Target {
                job: APISERVER_JOB,
                instance: "10.77.0.101:9963".into(),
                cluster: "c1".into(),
                node: None,
            },
        ];
        std::fs::write(&path, config(&targets)).unwrap();
        let out = std::process::Command::new("promtool")
            .args(["check", "config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            encode(r#"count by (instance) ({__name__=~"meshd_.+"})"#),
            "count%20by%20%28instance%29%20%28%7B__name__%3D~%22meshd_.%2B%22%7D%29"
        );
    }
}
