//! `meshd endpoint add|del|list`: endpoints of the local node, through the agent's API.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use meshd_api::pb;

use super::output::{Format, OutputArgs};

/// Where the agent listens.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// The agent's API socket.
    #[arg(long, value_name = "PATH", default_value = meshd_api::DEFAULT_SOCKET, env = "MESHD_API_SOCKET")]
    pub socket: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Create an endpoint: a network namespace with an address from the node's pod CIDR and
    /// an identity from its labels.
    Add(AddArgs),
    /// Delete an endpoint and its network namespace.
    #[command(alias = "delete")]
    Del(DelArgs),
    /// List this node's endpoints.
    #[command(alias = "ls")]
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Endpoint name (unique on the node).
    name: String,
    /// Labels, e.g. app=web,tier=front.
    #[arg(long, value_delimiter = ',', value_name = "K=V,...")]
    labels: Vec<String>,
    /// Namespace (becomes the label meshd.io/namespace).
    #[arg(long, default_value = "default")]
    namespace: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    name: String,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn parse_labels(pairs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for p in pairs.iter().filter(|p| !p.is_empty()) {
        let Some((k, v)) = p.split_once('=') else {
            bail!("label {p:?} is not KEY=VALUE");
        };
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The gRPC status message, without tonic's decoration.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

pub fn run(cmd: EndpointCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            EndpointCommand::Add(a) => {
                let labels = parse_labels(&a.labels)?;
                let mut client = meshd_api::connect(&a.socket.socket).await?;
                let ep = client
                    .add_endpoint(pb::AddEndpointRequest {
                        name: a.name,
                        namespace: a.namespace,
                        labels,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                print_endpoints(&[ep], a.output.format, false)
            }
            EndpointCommand::Del(d) => {
                let mut client = meshd_api::connect(&d.socket.socket).await?;
                let resp = client
                    .delete_endpoint(pb::DeleteEndpointRequest { name: d.name })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let eps: Vec<pb::Endpoint> = resp.deleted.into_iter().collect();
                print_endpoints(&eps, d.output.format, false)
            }
            EndpointCommand::List(l) => {
                let mut client = meshd_api::connect(&l.socket.socket).await?;
                let resp = client
                    .list_endpoints(pb::ListEndpointsRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner();
                print_endpoints(&resp.endpoints, l.output.format, true)
            }
        }
    })
}

/// JSON form of an endpoint (stable field names for scripts and tests).
pub fn endpoint_json(e: &pb::Endpoint) -> serde_json::Value {
    let labels: std::collections::BTreeMap<&String, &String> = e.labels.iter().collect();
    serde_json::json!({
        "name": e.name,
        "namespace": e.namespace,
        "labels": labels,
        "ip": e.ip,
        "identity": e.identity,
        "netns": e.netns,
        "host_ifname": e.host_ifname,
        "host_ifindex": e.host_ifindex,
        "mac": e.mac,
        "mtu": e.mtu,
        "created_ms": e.created_ms,
    })
}

pub fn user_labels(e: &pb::Endpoint) -> String {
    let mut l: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    l.join(",")
}

fn print_endpoints(eps: &[pb::Endpoint], format: Format, list: bool) -> anyhow::Result<ExitCode> {
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = eps.iter().map(endpoint_json).collect();
            if list {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(v.first().unwrap_or(&serde_json::Value::Null))?
                );
            }
        }
        Format::Table => {
            println!(
                "{:<20} {:<12} {:<15} {:<10} {:<30} LABELS",
                "NAME", "NAMESPACE", "IP", "IDENTITY", "NETNS"
            );
            for e in eps {
                println!(
                    "{:<20} {:<12} {:<15} {:<10} {:<30} {}",
                    e.name,
                    e.namespace,
                    e.ip,
                    e.identity,
                    e.netns,
                    user_labels(e)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let l = parse_labels(&["app=web".into(), "tier=front".into()]).unwrap();
        assert_eq!(l["app"], "web");
        assert!(parse_labels(&["app".into()]).is_err());
    }
}
