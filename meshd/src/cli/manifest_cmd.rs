//! `meshd apply`, `meshd delete` and `meshd get`: manifests against a cluster's
//! clustermesh-apiserver, chosen by context (see `context`).
//!
//! Every file is loaded and validated here first; if any document is bad, every problem is
//! printed (file, document, field) and nothing is sent. The apiserver validates again and
//! stores the whole batch in one etcd transaction, so a batch lands whole or not at all.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use meshd_api::apiserver::pb;
use meshd_api::apiserver::{self as client, Client};
use serde_json::Value;

use super::context::ContextArgs;

/// Exit code when manifests are invalid (EX_DATAERR): nothing was applied.
const EXIT_INVALID: u8 = 65;

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file or directory (its .yaml, .yml and .json files); repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR"
    )]
    pub files: Vec<PathBuf>,
    /// Validate and show what would change (VIPs included) without storing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Manifest file or directory naming the objects to delete; repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR"
    )]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "policy", alias = "networkpolicies", alias = "netpol")]
    Policies,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum GetFormat {
    #[default]
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list.
    #[arg(value_enum)]
    pub resource: Resource,
    /// Only this namespace [default: all].
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = GetFormat::Table)]
    pub format: GetFormat,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn connect(ctx: &ContextArgs) -> anyhow::Result<Client> {
    let ctx = ctx.resolve()?;
    client::connect(&ctx.server, &ctx.tls)
        .await
        .with_context(|| format!("context {:?}", ctx.name))
}

/// Loads and validates the files; prints every problem and returns `None` when any is bad.
fn load(files: &[PathBuf]) -> Option<Vec<meshd_manifest::SourcedDocument>> {
    match meshd_manifest::load_paths(files) {
        Ok(docs) => Some(docs),
        Err(errors) => {
            for e in errors.errors() {
                eprintln!("error: {e}");
            }
            eprintln!(
                "nothing applied: {} invalid document(s)",
                errors.errors().len()
            );
            None
        }
    }
}

/// The apiserver's refusal, line by line, with what it means for the batch.
fn report_status(status: &client::Status) -> ExitCode {
    for line in status.message().lines() {
        eprintln!("error: {}", line.trim());
    }
    if status.code() == client::Code::InvalidArgument {
        eprintln!("nothing applied");
        ExitCode::from(EXIT_INVALID)
    } else {
        ExitCode::FAILURE
    }
}

fn print_results(results: &[pb::ObjectResult], dry_run: bool) {
    let suffix = if dry_run { " (dry run)" } else { "" };
    for r in results {
        let o = r.object.clone().unwrap_or_default();
        let node_ports: Vec<String> = r.node_ports.iter().map(u32::to_string).collect();
        let vip = match (r.vip.is_empty(), node_ports.is_empty()) {
            (true, _) => String::new(),
            (false, true) => format!(" (VIP {})", r.vip),
            (false, false) => format!(" (VIP {}, node ports {})", r.vip, node_ports.join(",")),
        };
        println!(
            "{}/{}/{} {}{vip}{suffix}",
            o.kind.to_lowercase(),
            o.namespace,
            o.name,
            r.action
        );
    }
}

pub fn apply(args: ApplyArgs, context: &ContextArgs) -> anyhow::Result<ExitCode> {
    let Some(docs) = load(&args.files) else {
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    runtime()?.block_on(async {
        let mut api = connect(context).await?;
        let req = pb::ApplyRequest {
            documents: docs.iter().map(client::source_document).collect(),
            dry_run: args.dry_run,
        };
        match api.apply(req).await {
            Ok(resp) => {
                print_results(&resp.into_inner().results, args.dry_run);
                Ok(ExitCode::SUCCESS)
            }
            Err(status) => Ok(report_status(&status)),
        }
    })
}

pub fn delete(args: DeleteArgs, context: &ContextArgs) -> anyhow::Result<ExitCode> {
    let Some(docs) = load(&args.files) else {
        return Ok(ExitCode::from(EXIT_INVALID));
    };
    runtime()?.block_on(async {
        let mut api = connect(context).await?;
        let objects = docs
            .iter()
            .map(|d| client::object_ref(&d.document.object_ref()))
            .collect();
        match api.delete(pb::DeleteRequest { objects }).await {
            Ok(resp) => {
                print_results(&resp.into_inner().results, false);
                Ok(ExitCode::SUCCESS)
            }
            Err(status) => Ok(report_status(&status)),
        }
    })
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A service as `get -o json|yaml` shows it: the stored manifest, plus a `status` with what
/// the apiserver published for this cluster.
fn service_object(s: &pb::ServiceInfo) -> Value {
    let mut obj = parse_json(&s.manifest_json);
    let record = (!s.record_json.is_empty()).then(|| parse_json(&s.record_json));
    if let Value::Object(map) = &mut obj {
        let status = match record {
            Some(r) => serde_json::json!({
                "published": true,
                "frontends": r.get("frontends").cloned().unwrap_or(Value::Null),
                "backends": r.get("backends").cloned().unwrap_or(Value::Null),
                "global": r.get("global").cloned().unwrap_or(Value::Null),
                "shared": r.get("shared").cloned().unwrap_or(Value::Null),
                "affinity": r.get("affinity").cloned().unwrap_or(Value::Null),
            }),
            None => serde_json::json!({ "published": false }),
        };
        map.insert("status".into(), status);
    }
    obj
}

fn print_list(items: Vec<Value>, format: GetFormat) -> anyhow::Result<()> {
    let list = serde_json::json!({ "apiVersion": meshd_manifest::API_VERSION, "kind": "List", "items": items });
    let text = match format {
        GetFormat::Json => serde_json::to_string_pretty(&list)? + "\n",
        GetFormat::Yaml => serde_yaml::to_string(&list)?,
        GetFormat::Table => unreachable!("tables are printed per resource"),
    };
    write_stdout(&text)
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly instead of panicking.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// `80:30080/TCP` for a port with a node port (as kubectl shows it), `80/TCP` otherwise.
fn port_text(p: &Value) -> String {
    let port = p.get("port").and_then(Value::as_u64).unwrap_or(0);
    let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
    match p.get("nodePort").and_then(Value::as_u64) {
        Some(node_port) => format!("{port}:{node_port}/{protocol}"),
        None => format!("{port}/{protocol}"),
    }
}

/// The addresses outside the mesh a service answers on, from its manifest's `spec`: its
/// external IPs, then its load balancer IP.
pub(crate) fn external_addresses(spec: &Value) -> Vec<String> {
    spec.get("externalIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(spec.get("loadBalancerIP"))
        .filter_map(|ip| ip.as_str().map(str::to_owned))
        .collect()
}

/// [`external_addresses`] comma separated; `<none>` as kubectl shows it.
fn external_text(spec: &Value) -> String {
    let ips = external_addresses(spec);
    if ips.is_empty() {
        "<none>".into()
    } else {
        ips.join(",")
    }
}

fn services_table(services: &[pb::ServiceInfo]) {
    println!(
        "{:<15} {:<25} {:<12} {:<16} {:<16} {:<20} {:<7} {:<7} {:<9} BACKENDS",
        "NAMESPACE", "NAME", "TYPE", "VIP", "EXTERNAL-IP", "PORTS", "GLOBAL", "SHARED", "AFFINITY"
    );
    for s in services {
        let obj = service_object(s);
        let spec = obj.get("spec").cloned().unwrap_or(Value::Null);
        let ports: Vec<String> = spec
            .get("ports")
            .and_then(Value::as_array)
            .map(|ports| ports.iter().map(port_text).collect())
            .unwrap_or_default();
        let service_type = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP");
        let status = obj.get("status").cloned().unwrap_or(Value::Null);
        let flag = |k: &str| match status.get(k) {
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::String(s)) => s.clone(),
            _ => "-".into(),
        };
        let backends = match status.get("backends").and_then(Value::as_array) {
            Some(b) => b.len().to_string(),
            None => "-".into(),
        };
        println!(
            "{:<15} {:<25} {:<12} {:<16} {:<16} {:<20} {:<7} {:<7} {:<9} {backends}",
            s.namespace,
            s.name,
            service_type,
            s.vip,
            external_text(&spec),
            ports.join(","),
            flag("global"),
            flag("shared"),
            flag("affinity"),
        );
    }
}

pub fn get(args: GetArgs, context: &ContextArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut api = connect(context).await?;
        let req = pb::ListRequest {
            namespace: args.namespace.clone().unwrap_or_default(),
        };
        match args.resource {
            Resource::Services => {
                let services = match api.list_services(req).await {
                    Ok(r) => r.into_inner().services,
                    Err(status) => return Ok(report_status(&status)),
                };
                match args.format {
                    GetFormat::Table => services_table(&services),
                    f => print_list(services.iter().map(service_object).collect(), f)?,
                }
            }
            Resource::Policies => {
                let policies = match api.list_policies(req).await {
                    Ok(r) => r.into_inner().policies,
                    Err(status) => return Ok(report_status(&status)),
                };
                match args.format {
                    GetFormat::Table => {
                        println!("{:<15} NAME", "NAMESPACE");
                        for p in &policies {
                            println!("{:<15} {}", p.namespace, p.name);
                        }
                    }
                    f => print_list(
                        policies
                            .iter()
                            .map(|p| parse_json(&p.manifest_json))
                            .collect(),
                        f,
                    )?,
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
