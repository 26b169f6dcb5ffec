//! `meshd lab ...`: the multi-cluster lab in network namespaces (see crates/lab).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use meshd_lab::check::{default_run_dir, ServiceTarget};
use meshd_lab::state::CONTAINER_NETNS;
use meshd_lab::{LabSpec, LabState, UpOptions};

use super::output::{Format, OutputArgs};

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build and start the lab: certificates, clusters c1 and c2 (2 nodes each) with etcd
    /// (TLS, client-certificate auth) and an apiserver, a meshd agent per node, echo, client and
    /// web endpoints, the lab's manifests (global `echo` service, the public `web` and
    /// `web-local` NodePort services, policies); then run the check.
    /// An existing lab in the run dir is removed first.
    Up(UpArgs),
    /// Remove everything the lab created: processes, namespaces, pinned maps, files.
    Down(RunDirArgs),
    /// Describe the running lab (clusters, nodes, endpoints, services).
    Status(StatusArgs),
    /// Run the connectivity check against the running lab and print a table of checks.
    Check(CheckArgs),
    /// Run a command inside an endpoint's network namespace: `meshd lab exec c1/client-c1-n1 -- ping 10.2.1.2`.
    Exec(ExecArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunDirArgs {
    /// Where the lab keeps certificates, configs, logs and its state file.
    #[arg(long, default_value_os_t = default_run_dir(), env = "MESHD_LAB_RUN_DIR")]
    run_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    run: RunDirArgs,
    /// Manifests applied to every cluster once it runs (file or directory).
    #[arg(long, default_value = "lab/manifests")]
    manifests: PathBuf,
    /// Apply no manifests.
    #[arg(long)]
    no_manifests: bool,
    /// Do not run the connectivity check at the end.
    #[arg(long)]
    no_check: bool,
    /// Prefix of the lab's namespaces, host link and bpffs directory (a second lab beside the
    /// first needs another prefix, underlay and run dir).
    #[arg(long, default_value = "mlab")]
    prefix: String,
    /// Number of clusters (c1, c2, c3, ...; two nodes each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=meshd_lab::spec::MAX_CLUSTERS as i64))]
    clusters: u8,
    /// Members of each cluster's etcd (3 for a replicated etcd, as production runs it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=meshd_lab::spec::MAX_ETCD_MEMBERS as i64))]
    etcd_members: u8,
    /// Agents do not masquerade traffic leaving the mesh: the external host sees endpoint
    /// addresses, and the lab's router routes every pod CIDR to its node.
    #[arg(long)]
    no_masquerade: bool,
    /// Routing mode of every cluster: `tunnel` (VXLAN) or `native` (no encapsulation; the
    /// router routes pod CIDRs, the agents route their segment's).
    #[arg(long, default_value = "tunnel", value_name = "MODE")]
    routing: meshd_state::RoutingMode,
    /// Every cluster mirrors the others into its etcd (its apiserver with `--kvstoremesh`) and
    /// its agents read remote clusters there [default: on from 3 clusters].
    #[arg(long, overrides_with = "no_kvstoremesh")]
    kvstoremesh: bool,
    /// Agents read every remote cluster's etcd directly, whatever the number of clusters.
    #[arg(long)]
    no_kvstoremesh: bool,
    /// How a node port connection reaches a backend on another node: `snat` (through the node
    /// it came in by), `dsr` (direct server return: the backend's node answers the client) or
    /// `hybrid` (DSR for TCP); DSR needs `--routing native`.
    #[arg(long, default_value = "snat", value_name = "MODE")]
    service_lb_mode: meshd_lab::spec::ServiceLbMode,
    /// Underlay /24 shared by nodes and control planes; the host namespace gets its .1.
    #[arg(long, default_value = meshd_lab::spec::DEFAULT_UNDERLAY)]
    underlay: ipnet::Ipv4Net,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    run: RunDirArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// The docker-compose lab (compose project PROJECT) instead of the namespace lab.
    #[arg(long, value_name = "PROJECT", num_args = 0..=1, default_missing_value = "meshd-lab")]
    docker: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    run: RunDirArgs,
    /// CLUSTER/ENDPOINT, e.g. c1/client-c1-n1.
    target: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(cmd: LabCommand, contexts: &super::context::ContextArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Up(args) => {
            let code = up(&args)?;
            merge_contexts(&args.run.run_dir, contexts, true);
            Ok(code)
        }
        LabCommand::Down(args) => {
            merge_contexts(&args.run_dir, contexts, false);
            let report = meshd_lab::down(&args.run_dir, &mut |s| eprintln!("lab down: {s}"))?;
            eprintln!(
                "lab down: done ({} processes stopped, {} namespaces removed)",
                report.processes, report.netns
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status(args) => status(args),
        LabCommand::Check(args) => {
            let (state, clis) = running_lab(&args.status)?;
            check(&state, &clis, args.status.output.format)
        }
        LabCommand::Exec(args) => exec(args),
    }
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the meshd binary")?;
    Ok(exe
        .parent()
        .context("meshd binary has no directory")?
        .to_owned())
}

/// The lab `lab status` and `lab check` look at: the docker lab with `--docker`, else the
/// namespace lab in the run dir.
fn running_lab(args: &StatusArgs) -> anyhow::Result<(LabState, Clis)> {
    match &args.docker {
        Some(project) => docker_lab(project),
        None => Ok((load(&args.run.run_dir)?, Clis::Local)),
    }
}

fn load(run_dir: &std::path::Path) -> anyhow::Result<LabState> {
    LabState::load(run_dir)?.with_context(|| {
        format!(
            "no lab is running (no state in {}); start one with `make lab`",
            run_dir.display()
        )
    })
}

/// The lab in the default run directory merges its contexts into the user's contexts file (as
/// `kind` does with kubeconfig), so `meshd --context lab-c2 get services` works without
/// exporting anything, and `lab down` takes them back. Labs in other run directories (tests,
/// a second lab) leave the user's file alone: their context names would collide. A failure here
/// is reported, never fatal: the lab's own file still works.
fn merge_contexts(run_dir: &std::path::Path, contexts: &super::context::ContextArgs, add: bool) {
    use super::context::ContextFile;
    if run_dir != default_run_dir() {
        return;
    }
    let lab_file = run_dir.join("meshd-cli.yaml");
    let result = (|| -> anyhow::Result<Option<(PathBuf, Vec<String>)>> {
        let target = contexts.path()?;
        if target == lab_file || !lab_file.exists() {
            return Ok(None);
        }
        let lab = ContextFile::load(&lab_file)?;
        let mut user = ContextFile::load(&target)?;
        let names = if add {
            user.merge(&lab)
        } else {
            user.unmerge(&lab)
        };
        if !names.is_empty() {
            user.save(&target)?;
        }
        Ok(Some((target, names)))
    })();
    match (result, add) {
        (Ok(Some((target, names))), true) => eprintln!(
            "lab up: contexts {} merged into {} (`meshd --context {} get services`)",
            names.join(", "),
            target.display(),
            names.last().map(String::as_str).unwrap_or("lab-c1")
        ),
        (Ok(Some((target, names))), false) if !names.is_empty() => eprintln!(
            "lab down: contexts {} removed from {}",
            names.join(", "),
            target.display()
        ),
        (Err(e), _) => eprintln!("lab: the contexts file was not updated: {e:#}"),
        _ => {}
    }
}

fn up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    if args.underlay.prefix_len() != 24 {
        bail!("--underlay {}: the lab needs a /24", args.underlay);
    }
    if args.service_lb_mode.uses_dsr() && args.routing != meshd_state::RoutingMode::Native {
        bail!(
            "--service-lb-mode {}: direct server return needs native routing (add --routing native); the tunnel always brings replies back through the node a connection came in by",
            args.service_lb_mode
        );
    }
    let mut opts = UpOptions::new(
        LabSpec::with_clusters(&args.prefix, args.underlay, args.clusters)
            .with_etcd_members(args.etcd_members)
            .with_masquerade(!args.no_masquerade)
            .with_routing(args.routing)
            .with_service_lb_mode(args.service_lb_mode)
            .with_kvstoremesh(match (args.kvstoremesh, args.no_kvstoremesh) {
                (true, _) => true,
                (_, true) => false,
                _ => args.clusters >= 3,
            }),
        args.run.run_dir.clone(),
        bin_dir()?,
    );
    if !args.no_manifests {
        if !args.manifests.exists() {
            bail!(
                "manifests {} not found (run from the repository root, or pass --manifests or --no-manifests)",
                args.manifests.display()
            );
        }
        opts.manifests = Some(args.manifests.canonicalize()?);
    }
    let state = meshd_lab::up(&opts, &mut |s| eprintln!("lab up: {s}")).with_context(|| {
        format!(
            "the lab did not come up; logs are in {}; `make lab-down` removes what was created",
            args.run.run_dir.display()
        )
    })?;
    eprintln!(
        "lab up: running. Contexts for `meshd --context NAME`: {} (export MESHD_CONFIG={})",
        state
            .clusters
            .iter()
            .map(|c| c.context.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        state.cli_config.display()
    );
    if args.no_check {
        return Ok(ExitCode::SUCCESS);
    }
    check(&state, &Clis::Local, args.output.format)
}

/// Where the `meshd` CLI runs against a cluster's apiserver: here with the lab's CLI config,
/// or inside a node container of the docker lab (which has the config in MESHD_CONFIG).
enum Clis {
    Local,
    /// Cluster name -> a node container of that cluster.
    Docker(std::collections::BTreeMap<String, String>),
}

/// The docker lab as `lab status` and the check see it: its clusters and nodes (from the node
/// containers' environment, as node.sh reads it), their endpoints (each agent's list), and the
/// external host and its router.
fn docker_lab(project: &str) -> anyhow::Result<(LabState, Clis)> {
    let out = std::process::Command::new("docker")
        .args(["ps", "--filter"])
        .arg(format!("label=com.docker.compose.project={project}"))
        .args([
            "--format",
            "{{.Names}} {{.Label \"com.docker.compose.service\"}}",
        ])
        .output()
        .context("running docker ps")?;
    if !out.status.success() {
        bail!(
            "docker ps failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let containers: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(c, s)| (c.to_owned(), s.to_owned()))
        .collect();
    let envs = container_envs(containers.iter().map(|(c, _)| c.as_str()))?;
    let env = |container: &str, key: &str| -> anyhow::Result<String> {
        envs.get(container)
            .and_then(|e| e.get(key))
            .cloned()
            .with_context(|| format!("container {container}: no {key} in its environment"))
    };
    // node.sh writes no `masquerade` into the agent's config: the agents run with the default,
    // on.
    let mut state = LabState {
        masquerade: true,
        ..LabState::default()
    };
    let mut clusters = std::collections::BTreeMap::<String, meshd_lab::state::LabCluster>::new();
    let mut clis = std::collections::BTreeMap::new();
    let (mut external, mut router) = (None, None);
    // Metrics endpoints as node.sh and apiserver.sh serve them (METRICS_PORT, else the
    // scripts' default, the namespace lab's ports).
    let metrics_url = |container: &str, ip: &str, default: u16| {
        let port = env(container, "METRICS_PORT").unwrap_or_else(|_| default.to_string());
        format!("http://{ip}:{port}/metrics")
    };
    let mut apiserver_metrics = std::collections::BTreeMap::new();
    for (container, service) in &containers {
        match service.as_str() {
            "external" => external = Some(container),
            "router" => router = Some(container),
            "otlp-collector" => {
                let ip = env(container, "IP")?;
                state.otlp = Some(meshd_lab::state::LabOtlp {
                    endpoint: format!("http://{ip}:{}", meshd_lab::otlp::OTLP_PORT),
                    api: format!("http://{ip}:{}", meshd_lab::otlp::OTLP_API_PORT),
                    pid: 0,
                    spans: None,
                    container: Some(container.to_owned()),
                });
            }
            "prometheus" => {
                let (ip, port) = (env(container, "IP")?, env(container, "PORT")?);
                state.prometheus = Some(meshd_lab::state::LabPrometheus {
                    url: format!("http://{ip}:{port}"),
                    pid: 0,
                    config: PROMETHEUS_CONFIG_IN_IMAGE.into(),
                    container: Some(container.to_owned()),
                });
            }
            _ => {}
        }
        if let Some(cluster) = service.strip_suffix("-apiserver") {
            let ip = env(container, "IP")?;
            apiserver_metrics.insert(
                cluster.to_owned(),
                metrics_url(container, &ip, meshd_lab::spec::APISERVER_METRICS_PORT),
            );
            continue;
        }
        // Node services are named CLUSTER-NODE (c1-n1); etcd and apiservers are not nodes.
        let Some((cluster, node)) = service.split_once('-') else {
            continue;
        };
        if !node.starts_with('n') || !node[1..].chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        clis.entry(cluster.to_owned())
            .or_insert_with(|| container.to_owned());
        let (id, etcd) = (env(container, "CLUSTER_ID")?, env(container, "ETCD")?);
        let id: u8 = id.parse().with_context(|| {
            format!("container {container}: CLUSTER_ID={id:?} is no cluster id")
        })?;
        clusters
            .entry(cluster.to_owned())
            .or_insert_with(|| meshd_lab::state::LabCluster {
                name: cluster.to_owned(),
                id,
                context: format!("lab-{cluster}"),
                etcd: meshd_lab::state::LabEtcd {
                    endpoints: vec![etcd],
                    ..Default::default()
                },
                admin: Default::default(),
                apiserver: String::new(),
                apiserver_metrics: None,
                nodes: Vec::new(),
            })
            .nodes
            .push(meshd_lab::state::LabNode {
                name: node.to_owned(),
                netns: CONTAINER_NETNS.to_owned(),
                ip: env(container, "NODE_IP")?,
                agent_pid: 0,
                api_socket: "/run/meshd/agent.sock".into(),
                metrics: Some(metrics_url(
                    container,
                    &env(container, "NODE_IP")?,
                    meshd_lab::spec::AGENT_METRICS_PORT,
                )),
                etcd: Default::default(),
                container: Some(container.to_owned()),
            });
        let listed = std::process::Command::new("docker")
            .args(["exec", container, "meshd", "endpoint", "list", "-o", "json"])
            .output()
            .with_context(|| format!("listing endpoints in {container}"))?;
        if !listed.status.success() {
            bail!(
                "{container}: meshd endpoint list failed: {}",
                String::from_utf8_lossy(&listed.stderr).trim()
            );
        }
        let eps: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout)
            .with_context(|| format!("{container}: endpoint list is not JSON"))?;
        for ep in eps {
            state.endpoints.push(meshd_lab::state::LabEndpoint {
                name: ep["name"].as_str().unwrap_or_default().to_owned(),
                namespace: ep["namespace"].as_str().unwrap_or_default().to_owned(),
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                netns: ep["netns"].as_str().unwrap_or_default().to_owned(),
                ip: ep["ip"].as_str().unwrap_or_default().to_owned(),
                labels: serde_json::from_value(ep["labels"].clone()).unwrap_or_default(),
                container: Some(container.to_owned()),
            });
        }
    }
    if clis.is_empty() {
        bail!("no node containers of compose project {project} are running (make lab-docker)");
    }
    state.clusters = clusters.into_values().collect();
    // `docker ps` lists in no useful order.
    for c in &mut state.clusters {
        c.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        c.apiserver_metrics = apiserver_metrics.remove(&c.name);
    }
    if state.otlp.is_none() {
        state.otlp_absent = Some(format!(
            "no otlp-collector container in compose project {project} (docker-compose.yml runs one)"
        ));
    }
    if state.prometheus.is_none() {
        state.prometheus_absent = Some(format!(
            "no prometheus container in compose project {project} (docker-compose.yml runs one)"
        ));
    }
    // The external host and its router as docker-compose.yml gives them their addresses.
    if let Some(external) = external {
        let router = router.with_context(|| {
            format!("the external host {external} runs, but no router of compose project {project}")
        })?;
        let port = env(external, "PORT")?;
        state.external = Some(meshd_lab::state::LabExternal {
            netns: CONTAINER_NETNS.to_owned(),
            ip: env(external, "IP")?,
            port: port
                .parse()
                .with_context(|| format!("container {external}: PORT={port:?} is no port"))?,
            router_netns: CONTAINER_NETNS.to_owned(),
            router_ip: env(router, "IP")?,
            container: Some(external.clone()),
            router_container: Some(router.clone()),
        });
    }
    Ok((state, Clis::Docker(clis)))
}

/// Where the docker lab's image holds the Prometheus configuration (lab/docker/prometheus.yml).
const PROMETHEUS_CONFIG_IN_IMAGE: &str = "/etc/meshd-lab/prometheus.yml";

/// A container's environment, by variable name.
type ContainerEnv = std::collections::BTreeMap<String, String>;

/// Each container's environment (`docker inspect`), by container name.
fn container_envs<'a>(
    containers: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<std::collections::BTreeMap<String, ContainerEnv>> {
    let containers: Vec<&str> = containers.into_iter().collect();
    if containers.is_empty() {
        return Ok(Default::default());
    }
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", INSPECT_ENV_FORMAT])
        .args(&containers)
        .output()
        .context("running docker inspect")?;
    if !out.status.success() {
        bail!(
            "docker inspect {} failed: {}",
            containers.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_container_envs(&String::from_utf8_lossy(&out.stdout))
}

/// One line per container: its name, then its environment as a JSON list of `KEY=VALUE`.
const INSPECT_ENV_FORMAT: &str = "{{.Name}} {{json .Config.Env}}";

fn parse_container_envs(
    inspected: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, ContainerEnv>> {
    inspected
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (name, env) = line
                .split_once(' ')
                .with_context(|| format!("docker inspect: {line:?} is not NAME ENV"))?;
            // The engine names containers with a leading slash.
            let name = name.trim_start_matches('/').to_owned();
            // `null` when a container has no environment at all.
            let vars: Option<Vec<String>> = serde_json::from_str(env)
                .with_context(|| format!("docker inspect {name}: environment {env:?}"))?;
            let vars = vars
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            Ok((name, vars))
        })
        .collect()
}

fn check(state: &LabState, clis: &Clis, format: Format) -> anyhow::Result<ExitCode> {
    let services = services(state, clis)?;
    // A global service answers from every cluster that publishes ready backends for it.
    let backend_clusters = |name: &str| {
        services
            .iter()
            .filter(|s| s.name == name && s.shared && s.ready_backends > 0)
            .count()
    };
    let targets: Vec<ServiceTarget> = services
        .iter()
        .filter_map(|s| {
            Some(ServiceTarget {
                cluster: s.cluster.clone(),
                name: s.name.clone(),
                vip: s.vip.clone()?,
                port: *s.ports.first()?,
                global: s.global,
                clusters_with_backends: backend_clusters(&s.name),
                node_port: s.node_port,
                local_traffic_policy: s.external_traffic_policy == "Local",
            })
        })
        .collect();
    let policy = policies(state, clis)?;
    let exe = bin_dir()?.join("meshd");
    let mut report = meshd_lab::run_check(&exe, state, &targets, policy)?;
    // docker-compose.yml runs a Prometheus: its absence from the docker lab is a failure (the
    // namespace lab runs one only where `prometheus` is installed).
    if let (Clis::Docker(_), None) = (clis, &state.prometheus) {
        report.results.push(meshd_lab::CheckResult {
            check: "prometheus up".into(),
            from: "prometheus".into(),
            to: "every agent and apiserver".into(),
            expect: "up".into(),
            pass: false,
            detail: state.prometheus_absent.clone().unwrap_or_default(),
        });
        report.failed += 1;
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Table => print!("{}", report.table()),
    }
    Ok(if report.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the `meshd` CLI against a lab cluster's apiserver.
fn cli(
    state: &LabState,
    clis: &Clis,
    cluster: &str,
    context: &str,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = match clis {
        Clis::Local => {
            let mut c = std::process::Command::new(bin_dir()?.join("meshd"));
            c.env("MESHD_CONFIG", &state.cli_config);
            c
        }
        Clis::Docker(nodes) => {
            let container = nodes
                .get(cluster)
                .with_context(|| format!("no node container of cluster {cluster}"))?;
            let mut c = std::process::Command::new("docker");
            c.args(["exec", container.as_str(), "meshd"]);
            c
        }
    };
    let out = cmd
        .args(args)
        .arg("--context")
        .arg(context)
        .output()
        .context("running meshd")?;
    if !out.status.success() {
        bail!(
            "`meshd {} --context {context}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`meshd {}` did not print JSON", args.join(" ")))
}

/// A service as one cluster's apiserver lists it.
#[derive(Debug, Clone, serde::Serialize)]
struct LabService {
    name: String,
    namespace: String,
    cluster: String,
    /// None until the apiserver published the service.
    vip: Option<String>,
    ports: Vec<u16>,
    /// `ClusterIP`, `NodePort` or `LoadBalancer`.
    #[serde(rename = "type")]
    service_type: String,
    /// The first port's node port (NodePort and LoadBalancer services), once allocated.
    node_port: Option<u16>,
    /// External IPs and the load balancer IP: addresses the service answers on from outside.
    external_ips: Vec<String>,
    /// `Cluster` or `Local`.
    external_traffic_policy: String,
    global: bool,
    shared: bool,
    ready_backends: usize,
}

/// Every service every cluster knows (`meshd get services -o json` per cluster).
fn services(state: &LabState, clis: &Clis) -> anyhow::Result<Vec<LabService>> {
    let mut all = Vec::new();
    for c in &state.clusters {
        let listed = cli(
            state,
            clis,
            &c.name,
            &c.context,
            &["get", "services", "-o", "json"],
        )?;
        for item in listed["items"].as_array().into_iter().flatten() {
            let status = &item["status"];
            let spec = &item["spec"];
            let frontends = status["frontends"].as_array().cloned().unwrap_or_default();
            all.push(LabService {
                name: item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                namespace: item["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                cluster: c.name.clone(),
                vip: frontends
                    .first()
                    .and_then(|f| f["ip"].as_str())
                    .map(str::to_owned),
                ports: frontends
                    .iter()
                    .filter_map(|f| f["port"].as_u64().map(|p| p as u16))
                    .collect(),
                service_type: spec["type"].as_str().unwrap_or("ClusterIP").to_owned(),
                node_port: spec["ports"][0]["nodePort"].as_u64().map(|p| p as u16),
                external_ips: super::manifest_cmd::external_addresses(spec),
                external_traffic_policy: spec["externalTrafficPolicy"]
                    .as_str()
                    .unwrap_or("Cluster")
                    .to_owned(),
                global: status["global"].as_bool().unwrap_or(false),
                shared: status["shared"].as_bool().unwrap_or(false),
                ready_backends: status["backends"]
                    .as_array()
                    .map(|b| b.iter().filter(|b| b["ready"] == true).count())
                    .unwrap_or(0),
            });
        }
    }
    Ok(all)
}

/// True when some cluster has a policy (the lab's selects the echo endpoints).
fn policies(state: &LabState, clis: &Clis) -> anyhow::Result<bool> {
    for c in &state.clusters {
        let listed = cli(
            state,
            clis,
            &c.name,
            &c.context,
            &["get", "policies", "-o", "json"],
        )?;
        if listed["items"].as_array().is_some_and(|a| !a.is_empty()) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let (state, clis) = running_lab(&args)?;
    let services = services(&state, &clis)?;
    let doc = serde_json::json!({
        "run_dir": state.run_dir,
        "cli_config": state.cli_config,
        "clusters": state.clusters.iter().map(|c| serde_json::json!({
            "name": c.name,
            "id": c.id,
            "context": c.context,
            "apiserver": c.apiserver,
            "etcd": {
                "endpoints": c.etcd.endpoints,
                "netns": c.etcd.netns,
                "pid": c.etcd.pid,
                "remote": c.etcd.remote,
                "members": c.etcd.members.iter().map(|m| serde_json::json!({
                    "name": m.name,
                    "endpoint": m.endpoint,
                    "peer_url": m.peer_url,
                    "pid": m.pid,
                    "log": m.log,
                })).collect::<Vec<_>>(),
            },
            "admin": c.admin,
            "apiserver_metrics": c.apiserver_metrics,
            "nodes": c.nodes.iter().map(|n| serde_json::json!({
                "name": n.name,
                "netns": n.netns,
                "ip": n.ip,
                "agent_pid": n.agent_pid,
                "api_socket": n.api_socket,
                "metrics": n.metrics,
                "etcd": n.etcd,
                "container": n.container,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "endpoints": state.endpoints,
        "masquerade": state.masquerade,
        "routing": state.routing,
        "prometheus": state.prometheus.as_ref().map(|p| &p.url),
        "prometheus_absent": state.prometheus_absent,
        "otlp": state.otlp.as_ref().map(|o| serde_json::json!({
            "endpoint": o.endpoint,
            "api": o.api,
            "spans": o.spans,
            "container": o.container,
        })),
        "otlp_absent": state.otlp_absent,
        "kvstoremesh": state.kvstoremesh,
        "service_lb_mode": state.service_lb_mode,
        "external": state.external.as_ref().map(|e| serde_json::json!({
            "netns": e.netns,
            "ip": e.ip,
            "port": e.port,
            "router_netns": e.router_netns,
            "router_ip": e.router_ip,
            "container": e.container,
            "router_container": e.router_container,
        })),
        "services": services.iter().map(|s| serde_json::json!({
            "name": s.name,
            "namespace": s.namespace,
            "cluster": s.cluster,
            "vip": s.vip,
            "ports": s.ports,
            "global": s.global,
            "type": s.service_type,
            "node_port": s.node_port,
            "external_ips": s.external_ips,
            "external_traffic_policy": s.external_traffic_policy,
        })).collect::<Vec<_>>(),
    });
    match args.output.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Format::Table => {
            match &args.docker {
                Some(project) => println!("docker lab (compose project {project})"),
                None => println!(
                    "lab in {} (MESHD_CONFIG={})",
                    state.run_dir.display(),
                    state.cli_config.display()
                ),
            }
            if let Some(e) = &state.external {
                println!(
                    "external host {}:{} ({}) behind router {}; masquerade {}; routing {}",
                    e.ip,
                    e.port,
                    e.container.as_ref().unwrap_or(&e.netns),
                    e.router_ip,
                    if state.masquerade { "on" } else { "off" },
                    state.routing
                );
            }
            match (&state.prometheus, &state.prometheus_absent) {
                (Some(p), _) => {
                    println!("prometheus {} (every agent and apiserver scraped)", p.url)
                }
                (None, Some(why)) => println!("prometheus: none ({why})"),
                (None, None) => println!("prometheus: none"),
            }
            match (&state.otlp, &state.otlp_absent) {
                (Some(o), _) => println!(
                    "otlp collector {} (every agent's and apiserver's traces; {}/api/spans)",
                    o.endpoint, o.api
                ),
                (None, Some(why)) => println!("otlp collector: none ({why})"),
                (None, None) => println!("otlp collector: none"),
            }
            if state.kvstoremesh {
                println!("remote clusters read through each cluster's cache (kvstoremesh)");
            }
            for c in &state.clusters {
                println!(
                    "cluster {} (id {}, context {}): etcd {} in {}, apiserver {}",
                    c.name,
                    c.id,
                    c.context,
                    c.etcd.endpoints.join(","),
                    c.etcd.netns,
                    c.apiserver
                );
                for n in &c.nodes {
                    println!(
                        "  node {:<4} {:<12} netns {:<14} agent pid {}",
                        n.name,
                        n.ip,
                        n.container.as_ref().unwrap_or(&n.netns),
                        n.agent_pid
                    );
                }
            }
            println!(
                "{:<18} {:<8} {:<5} {:<12} {:<26} LABELS",
                "ENDPOINT", "CLUSTER", "NODE", "IP", "NETNS"
            );
            for e in &state.endpoints {
                let labels: Vec<String> =
                    e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<18} {:<8} {:<5} {:<12} {:<26} {}",
                    e.name,
                    e.cluster,
                    e.node,
                    e.ip,
                    e.netns,
                    labels.join(",")
                );
            }
            for s in &services {
                let public = match s.node_port {
                    Some(port) => format!(
                        ", {} node port {port}{}",
                        s.service_type,
                        if s.external_traffic_policy == "Local" {
                            " (externalTrafficPolicy Local)"
                        } else {
                            ""
                        }
                    ),
                    None => String::new(),
                };
                let external = if s.external_ips.is_empty() {
                    String::new()
                } else {
                    format!(", external IPs {}", s.external_ips.join(","))
                };
                println!(
                    "service {}/{} in {}: {} ports {:?}{}{public}{external}",
                    s.namespace,
                    s.name,
                    s.cluster,
                    s.vip.as_deref().unwrap_or("(no VIP yet)"),
                    s.ports,
                    if s.global { " (global)" } else { "" }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let state = load(&args.run.run_dir)?;
    let (cluster, name) = args
        .target
        .split_once('/')
        .with_context(|| format!("{:?}: expected CLUSTER/ENDPOINT", args.target))?;
    let ep = state.endpoint(cluster, name).with_context(|| {
        format!(
            "no endpoint {name} in cluster {cluster}; endpoints: {}",
            state
                .endpoints
                .iter()
                .map(|e| format!("{}/{}", e.cluster, e.name))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let status = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ep.netns))
        .arg("--")
        .args(&args.command)
        .status()
        .with_context(|| format!("running {:?} in {}", args.command, ep.netns))?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_envs_parse_docker_inspect_lines() {
        let inspected = concat!(
            "/meshd-lab_c1-n1_1 [\"CLUSTER=c1\",\"REMOTES=c2=https://10.78.0.102:2379\",\"NODE_IP=10.78.0.11\"]\n",
            "/meshd-lab_router_1 null\n",
        );
        let envs = parse_container_envs(inspected).unwrap();
        let node = &envs["meshd-lab_c1-n1_1"];
        assert_eq!(node["NODE_IP"], "10.78.0.11");
        // Only the first `=` separates the name: values keep theirs.
        assert_eq!(node["REMOTES"], "c2=https://10.78.0.102:2379");
        assert!(envs["meshd-lab_router_1"].is_empty());
        let err = parse_container_envs("/x [\"A=1\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("docker inspect x"), "{err:#}");
    }
}
