//! The lab's trace collector (`meshd-otlp-collector`): every agent and apiserver exports its
//! spans to it over OTLP/gRPC, each marked with its node (`host.name` = `CLUSTER-NODE`, from
//! `OTEL_RESOURCE_ATTRIBUTES`), and `meshd lab check` asks its HTTP API for each agent's
//! propagation traces.
//!
//! The namespace lab runs it in the host namespace on the host's underlay address, next to the
//! lab's Prometheus; the docker lab runs it as the `otlp-collector` container.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::check::CheckResult;
use crate::prometheus::http_get;
use crate::state::LabState;

/// The OTLP/gRPC port (the protocol's registered one).
pub const OTLP_PORT: u16 = 4317;
/// The collector's HTTP API (`/api/spans`): Jaeger's query port, where operators look for one.
pub const OTLP_API_PORT: u16 = 16686;
/// The binary, next to `meshd`.
pub const COLLECTOR_PROGRAM: &str = "meshd-otlp-collector";
/// The root span of one change propagated into a node's maps (meshd-telemetry's propagation).
const PROPAGATION_SPAN: &str = "meshd.propagation";

/// What a lab daemon exports as: the collector's endpoint and the `host.name` its spans carry.
pub fn exporter_env(endpoint: &str, host: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_RESOURCE_ATTRIBUTES", format!("host.name={host}")),
    ]
}

/// The `host.name` of a lab node's agent.
pub fn node_host(cluster: &str, node: &str) -> String {
    format!("{cluster}-{node}")
}

/// The number of `meshd.propagation` spans the collector at `api` (`http://IP:PORT`) holds from
/// `host`.
fn propagation_spans(api: &str, host: &str) -> anyhow::Result<usize> {
    let url = format!(
        "{}/api/spans?service=meshd&host={host}&name={PROPAGATION_SPAN}&limit=100",
        api.trim_end_matches('/')
    );
    let body = http_get(&url, Duration::from_secs(5))?;
    let spans: Vec<serde_json::Value> =
        serde_json::from_str(&body).with_context(|| format!("{url}: not JSON: {body}"))?;
    Ok(spans.len())
}

/// One row per agent: the collector holds at least one of its propagation traces. Waits up to
/// `wait` for every agent's (exporters send in batches every few seconds).
pub fn check(api: &str, state: &LabState, wait: Duration) -> Vec<CheckResult> {
    let hosts: Vec<(String, String)> = state
        .clusters
        .iter()
        .flat_map(|c| {
            c.nodes.iter().map(|n| {
                (
                    format!("{}/{}", c.name, n.name),
                    node_host(&c.name, &n.name),
                )
            })
        })
        .collect();
    let deadline = Instant::now() + wait;
    let observe = || {
        hosts
            .iter()
            .map(|(_, host)| propagation_spans(api, host))
            .collect::<Vec<_>>()
    };
    let observed = loop {
        let observed = observe();
        let all = observed.iter().all(|r| matches!(r, Ok(n) if *n > 0));
        if all || Instant::now() >= deadline {
            break observed;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    hosts
        .into_iter()
        .zip(observed)
        .map(|((to, host), seen)| {
            let (pass, detail) = match seen {
                Ok(0) => (
                    false,
                    format!("no {PROPAGATION_SPAN} span from host.name={host} yet"),
                ),
                Ok(n) => (
                    true,
                    format!("{n} {PROPAGATION_SPAN} spans (at most 100 asked)"),
                ),
                Err(e) => (false, format!("{e:#}")),
            };
            CheckResult {
                check: "otlp traces".into(),
                from: format!("otlp-collector {api}"),
                to,
                expect: "traced".into(),
                pass,
                detail,
            }
        })
        .collect()
}
