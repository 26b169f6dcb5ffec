//! The lab's trace collector (`meshd-otlp-collector`): every agent and apiserver exports its
//! spans to it over OTLP/gRPC, each marked with its node (`host.name` = `CLUSTER-NODE`, from
//! `OTEL_RESOURCE_ATTRIBUTES`), and `meshd lab check` asks its HTTP API for each agent's
//! propagation traces and each apiserver's API call spans.
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
/// An apiserver's span of one API call (the lab's `meshd apply` of its manifests makes some).
const APISERVER_SPAN: &str = "apiserver.request";

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

/// The `host.name` of a lab cluster's apiserver.
pub fn apiserver_host(cluster: &str) -> String {
    format!("{cluster}-apiserver")
}

/// What one `otlp traces` row looks for: spans named `span` from `service` on `host`.
struct Traced {
    /// The row's `to`: `c1/n1`, `c1/apiserver`.
    to: String,
    service: &'static str,
    host: String,
    span: &'static str,
}

/// The number of `span` spans the collector at `api` (`http://IP:PORT`) holds from `service`
/// on `host` (at most 100 asked).
fn spans(api: &str, t: &Traced) -> anyhow::Result<usize> {
    let url = format!(
        "{}/api/spans?service={}&host={}&name={}&limit=100",
        api.trim_end_matches('/'),
        t.service,
        t.host,
        t.span
    );
    let body = http_get(&url, Duration::from_secs(5))?;
    let spans: Vec<serde_json::Value> =
        serde_json::from_str(&body).with_context(|| format!("{url}: not JSON: {body}"))?;
    Ok(spans.len())
}

/// One row per agent (the collector holds at least one of its propagation traces) and one per
/// apiserver (at least one of its API calls' spans). Waits up to `wait` for all of them
/// (exporters send in batches every few seconds).
pub fn check(api: &str, state: &LabState, wait: Duration) -> Vec<CheckResult> {
    let mut wanted: Vec<Traced> = Vec::new();
    for c in &state.clusters {
        wanted.extend(c.nodes.iter().map(|n| Traced {
            to: format!("{}/{}", c.name, n.name),
            service: "meshd",
            host: node_host(&c.name, &n.name),
            span: PROPAGATION_SPAN,
        }));
        wanted.push(Traced {
            to: format!("{}/apiserver", c.name),
            service: "clustermesh-apiserver",
            host: apiserver_host(&c.name),
            span: APISERVER_SPAN,
        });
    }
    let deadline = Instant::now() + wait;
    let observe = || wanted.iter().map(|t| spans(api, t)).collect::<Vec<_>>();
    let observed = loop {
        let observed = observe();
        let all = observed.iter().all(|r| matches!(r, Ok(n) if *n > 0));
        if all || Instant::now() >= deadline {
            break observed;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    wanted
        .into_iter()
        .zip(observed)
        .map(|(t, seen)| {
            let (pass, detail) = match seen {
                Ok(0) => (
                    false,
                    format!("no {} span from host.name={} yet", t.span, t.host),
                ),
                Ok(n) => (true, format!("{n} {} spans (at most 100 asked)", t.span)),
                Err(e) => (false, format!("{e:#}")),
            };
            CheckResult {
                check: "otlp traces".into(),
                from: format!("otlp-collector {api}"),
                to: t.to,
                expect: "traced".into(),
                pass,
                detail,
            }
        })
        .collect()
}
