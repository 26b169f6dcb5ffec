//! `up` builds the lab step by step, recording each created thing in the state file before
//! moving on; `down` removes what the state file records (and, as a safety net, every process
//! that carries the lab's marker in its environment).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use meshd_certs::{LeafKind, MeshCa};
use meshd_netlink::{with_netlink, Route};
use meshd_topology::etcd::{EtcdMember, EtcdServerTls};
use meshd_topology::underlay::host_address;
use meshd_topology::{FarHostSpec, HostSpec, OutsideSpec, RootLinkSpec, Topology, UnderlaySpec};

use crate::otlp;
use crate::proc::{self, run, spawn_daemon, wait_for};
use crate::prometheus;
use crate::spec::{
    ClusterSpec, LabSpec, NodeSpec, AGENT_METRICS_PORT, APISERVER_METRICS_PORT, ECHO_PORT,
};
use crate::state::{
    LabCluster, LabEndpoint, LabEtcd, LabEtcdMember, LabExternal, LabNode, LabOtlp, LabProcess,
    LabPrometheus, LabState, TlsPaths,
};

/// Environment variable set on every process the lab starts; its value is the run dir.
pub const LAB_MARKER: &str = "MESHD_LAB_RUN_DIR";

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub spec: LabSpec,
    /// Certificates, configs, logs, etcd data and the state file.
    pub run_dir: PathBuf,
    /// Directory holding the `meshd` and `clustermesh-apiserver` binaries.
    pub bin_dir: PathBuf,
    /// bpffs directory for every node's pins.
    pub bpffs_dir: PathBuf,
    /// Manifests applied once the mesh is ready (services, policies); none if `None`.
    pub manifests: Option<PathBuf>,
}

impl UpOptions {
    pub fn new(spec: LabSpec, run_dir: PathBuf, bin_dir: PathBuf) -> Self {
        let bpffs_dir = PathBuf::from("/sys/fs/bpf").join(&spec.prefix);
        UpOptions {
            spec,
            run_dir,
            bin_dir,
            bpffs_dir,
            manifests: None,
        }
    }

    fn meshd(&self) -> PathBuf {
        self.bin_dir.join("meshd")
    }

    fn apiserver(&self) -> PathBuf {
        self.bin_dir.join("clustermesh-apiserver")
    }

    fn otlp_collector(&self) -> PathBuf {
        self.bin_dir.join(otlp::COLLECTOR_PROGRAM)
    }
}

/// Builds the lab. `progress` receives one line per step.
pub fn up(opts: &UpOptions, progress: &mut dyn FnMut(&str)) -> anyhow::Result<LabState> {
    preflight(opts)?;
    if LabState::load(&opts.run_dir)?.is_some() {
        progress("a lab is already recorded in the run dir: removing it first");
        down(&opts.run_dir, progress)?;
    }
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating {}", opts.run_dir.display()))?;
    let mut state = LabState {
        run_dir: opts.run_dir.clone(),
        bpffs_dir: opts.bpffs_dir.clone(),
        cli_config: opts.run_dir.join("meshd-cli.yaml"),
        masquerade: opts.spec.masquerade,
        routing: opts.spec.routing,
        kvstoremesh: opts.spec.kvstoremesh,
        service_lb_mode: opts.spec.service_lb_mode.to_string(),
        ..LabState::default()
    };
    state.save()?;
    let result = build(opts, &mut state, progress);
    // Whatever happened, the state file says what exists, so `down` can remove it.
    state.save()?;
    result.map(|()| state)
}

fn preflight(opts: &UpOptions) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for bin in [opts.meshd(), opts.apiserver()] {
        if !bin.is_file() {
            missing.push(format!(
                "{} (build with `cargo build --release`)",
                bin.display()
            ));
        }
    }
    for tool in ["etcd", "nsenter"] {
        if run(
            None,
            Path::new("sh"),
            &["-c".into(), format!("command -v {tool}")],
        )
        .is_err()
        {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    if !meshd_datapath::bpffs::is_bpffs(Path::new("/sys/fs/bpf")) {
        missing.push("bpffs mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)".into());
    }
    if !missing.is_empty() {
        bail!("the lab needs root and:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

fn build(
    opts: &UpOptions,
    state: &mut LabState,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let spec = &opts.spec;
    progress("certificates: mesh CA and per-cluster server, admin and remote certificates");
    issue_certs(opts)?;

    progress("network: underlay bridge namespace and the host link");
    let mut topology = Topology::create(UnderlaySpec {
        netns: spec.underlay_netns(),
        bridge_address: None,
        mtu: spec.mtu,
    })?;
    // The state file owns what the topology builds: `down` removes it, also after a failed
    // `up`, and the lab outlives this process.
    let result = build_on(opts, state, &mut topology, progress);
    record_topology(state, &topology)?;
    topology.disown();
    result
}

/// Records the topology's namespaces and host links in the state file.
fn record_topology(state: &mut LabState, topology: &Topology) -> anyhow::Result<()> {
    state.netns = topology.namespaces().to_vec();
    state.host_links = topology.root_links().to_vec();
    state.save()
}

fn build_on(
    opts: &UpOptions,
    state: &mut LabState,
    topology: &mut Topology,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let spec = &opts.spec;
    record_topology(state, topology)?;
    let host_link = topology.add_root_link(&RootLinkSpec {
        name: spec.host_link(),
        bridge_port: "host".into(),
        address: host_address(spec.host_ip, spec.underlay),
    });
    record_topology(state, topology)?;
    host_link?;
    if spec.has_far_nodes() {
        // The host scrapes every agent's metrics, those behind the router too. The routes go
        // with the host link at `lab down`.
        route_far_nets_via_router(spec, None)?;
    }

    progress(&format!(
        "network: router {} and external host {} ({}) behind it",
        spec.external.router_ip,
        spec.external.ip,
        spec.external_netns()
    ));
    let external = build_external(spec, topology);
    record_topology(state, topology)?;
    external?;
    start_external_echo(opts, state)?;

    start_otlp_collector(opts, state, progress)?;
    for cluster in &spec.clusters {
        start_control_plane(opts, state, topology, cluster, progress)?;
    }
    write_cli_config(opts, state)?;
    for cluster in &spec.clusters {
        for node in &cluster.nodes {
            start_node(opts, state, topology, cluster, node, progress)?;
        }
    }
    if spec.service_lb_mode.uses_dsr() {
        progress("router: loose reverse-path filtering (direct server return)");
        loosen_router_rp_filter(spec)?;
    }
    start_prometheus(opts, state, progress)?;
    for cluster in &spec.clusters {
        for node in &cluster.nodes {
            add_endpoints(opts, state, cluster, node, progress)?;
        }
    }
    if let Some(manifests) = &opts.manifests {
        for cluster in &spec.clusters {
            progress(&format!(
                "{}: applying {}",
                cluster.name,
                manifests.display()
            ));
            meshd(
                opts,
                state,
                &[
                    "apply".into(),
                    "-f".into(),
                    manifests.display().to_string(),
                    "--context".into(),
                    spec.context(cluster),
                ],
            )?;
        }
    }
    progress("waiting for every node to see every cluster ready");
    wait_mesh_ready(opts, state)?;
    Ok(())
}

/// The router on the underlay and the external host behind it (see
/// [`ExternalSpec`](crate::spec::ExternalSpec)), built by the topology as the e2e tests build
/// theirs, with strict reverse-path filtering. With masquerade off or native routing the router
/// routes every node's pod CIDR to the node, as a network that carries pod addresses does;
/// otherwise it knows nothing of them. (Nodes behind the router get theirs with their link, see
/// `attach_behind_router`.)
fn build_external(spec: &LabSpec, topology: &mut Topology) -> anyhow::Result<()> {
    let ext = &spec.external;
    let routes = if !spec.pods_routable() {
        Vec::new()
    } else {
        spec.clusters
            .iter()
            .flat_map(|c| &c.nodes)
            .filter(|n| !n.behind_router)
            .map(|n| (n.pod_cidr, n.ip))
            .collect()
    };
    topology.add_outside(&OutsideSpec {
        router_netns: spec.router_netns(),
        bridge_port: "v-router".into(),
        router_address: host_address(ext.router_ip, spec.underlay),
        host_netns: spec.external_netns(),
        net: ext.net,
        host_ip: ext.ip,
        router_side_mtu: spec.mtu,
        routes,
        strict_rp_filter: true,
    })?;
    Ok(())
}

/// Direct server return: a backend's node answers an outside client with the address of the
/// node the connection came in by, from its own link, which the router's strict reverse-path
/// filter drops as a martian when the two nodes sit on different links of it (a node behind the
/// router and one on the underlay). A network carrying DSR replies checks sources loosely (the
/// source must be routable at all), as the router does then on every link.
fn loosen_router_rp_filter(spec: &LabSpec) -> anyhow::Result<()> {
    let script = "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 2 > \"$f\"; done";
    run(
        Some(&spec.router_netns()),
        Path::new("sh"),
        &["-c".into(), script.into()],
    )
    .context("loose rp_filter on the router")?;
    Ok(())
}

/// The lab's HTTP echo (`meshd workload echo` on ECHO_PORT) in `netns`, answering as
/// `[cluster, node, endpoint]`; its pid.
fn spawn_echo(
    opts: &UpOptions,
    netns: &str,
    [cluster, node, endpoint]: [&str; 3],
    log: &Path,
) -> anyhow::Result<u32> {
    let args: Vec<String> = [
        "workload",
        "echo",
        "--listen",
        &format!("0.0.0.0:{ECHO_PORT}"),
        "--cluster",
        cluster,
        "--node",
        node,
        "--endpoint",
        endpoint,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    spawn_daemon(Some(netns), &opts.meshd(), &args, &marker(opts), log)
}

/// The HTTP echo on the external host (it answers with the client address it saw).
fn start_external_echo(opts: &UpOptions, state: &mut LabState) -> anyhow::Result<()> {
    let spec = &opts.spec;
    let netns = spec.external_netns();
    let log = opts.run_dir.join("external-echo.log");
    let pid = spawn_echo(opts, &netns, ["external"; 3], &log)?;
    record(state, pid, "workload", "", "external", &log);
    state.external = Some(LabExternal {
        netns,
        ip: spec.external.ip.to_string(),
        port: ECHO_PORT,
        router_netns: spec.router_netns(),
        router_ip: spec.external.router_ip.to_string(),
        container: None,
        router_container: None,
    });
    state.save()
}

fn certs_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("certs")
}

fn cluster_certs(run_dir: &Path, cluster: &str) -> PathBuf {
    certs_dir(run_dir).join(cluster)
}

fn tls_paths(run_dir: &Path, cluster: &str, kind: LeafKind) -> TlsPaths {
    let dir = cluster_certs(run_dir, cluster);
    TlsPaths {
        ca: dir.join(meshd_certs::CA_CERT_FILE),
        cert: kind.cert_path(&dir),
        key: kind.key_path(&dir),
    }
}

/// The certificates of a node's agent: `certs/<cluster>/<node>/node.pem` (node-<cluster>-<node>).
fn node_tls_paths(run_dir: &Path, cluster: &str, node: &str) -> TlsPaths {
    let dir = cluster_certs(run_dir, cluster).join(node);
    TlsPaths {
        ca: dir.join(meshd_certs::CA_CERT_FILE),
        cert: LeafKind::Node.cert_path(&dir),
        key: LeafKind::Node.key_path(&dir),
    }
}

fn issue_certs(opts: &UpOptions) -> anyhow::Result<()> {
    let ca = MeshCa::create("meshd-lab", 3650)?;
    ca.write(&certs_dir(&opts.run_dir), true)?;
    for cluster in &opts.spec.clusters {
        let dir = cluster_certs(&opts.run_dir, &cluster.name);
        // etcd and the apiserver share the control-plane address and the server certificate.
        ca.issue_cluster_set(
            &dir,
            &cluster.name,
            365,
            &[cluster.control_plane_ip.into(), [127, 0, 0, 1].into()],
            &[format!("etcd.{}", cluster.name), "localhost".into()],
            true,
        )?;
        for node in &cluster.nodes {
            ca.issue_node(&dir.join(&node.name), &cluster.name, &node.name, 365, true)?;
        }
    }
    Ok(())
}

/// Starts every member of a cluster's etcd in its control-plane namespace (peers on loopback
/// there), then waits for each to listen: a member of a replicated cluster waits for the
/// others before it serves, so all are launched before any is waited for.
fn start_etcd(
    opts: &UpOptions,
    state: &mut LabState,
    cluster: &ClusterSpec,
    cp: &str,
    dir: &Path,
    server: &TlsPaths,
) -> anyhow::Result<Vec<LabEtcdMember>> {
    // The first member keeps the names a one-member lab always had.
    let suffix = |m: u8| {
        if m == 0 {
            String::new()
        } else {
            format!("-{m}")
        }
    };
    let members: Vec<LabEtcdMember> = (0..cluster.etcd_members)
        .map(|m| {
            let (client, peer) = cluster.etcd_member_ports(m);
            LabEtcdMember {
                name: format!("{}{}", cluster.name, suffix(m)),
                endpoint: format!("https://{}:{client}", cluster.control_plane_ip),
                peer_url: format!("http://127.0.0.1:{peer}"),
                pid: 0,
                data_dir: dir.join(format!("etcd-data{}", suffix(m))),
                log: dir.join(format!("etcd{}.log", suffix(m))),
            }
        })
        .collect();
    let initial_cluster = meshd_topology::etcd::initial_cluster(
        members
            .iter()
            .map(|m| (m.name.as_str(), m.peer_url.as_str())),
    );
    let token = format!("{}-{}", opts.spec.prefix, cluster.name);
    let mut started = Vec::new();
    for member in members {
        let launch = EtcdMember {
            name: member.name.clone(),
            data_dir: member.data_dir.clone(),
            client_url: member.endpoint.clone(),
            peer_url: member.peer_url.clone(),
            initial_cluster: initial_cluster.clone(),
            cluster_token: token.clone(),
            tls: Some(EtcdServerTls {
                ca: server.ca.clone(),
                cert: server.cert.clone(),
                key: server.key.clone(),
                client_cert_auth: true,
            }),
            extra_args: Vec::new(),
        };
        let pid = spawn_daemon(
            Some(cp),
            Path::new(meshd_topology::etcd::ETCD_PROGRAM),
            &launch.args(),
            &marker(opts),
            &member.log,
        )?;
        let name = if cluster.etcd_members > 1 {
            member.name.as_str()
        } else {
            ""
        };
        record(state, pid, "etcd", &cluster.name, name, &member.log);
        state.save()?;
        started.push(LabEtcdMember { pid, ..member });
    }
    for (m, member) in started.iter().enumerate() {
        let (client, _) = cluster.etcd_member_ports(m as u8);
        let addr = SocketAddr::from((cluster.control_plane_ip, client));
        wait_for(
            &format!("etcd {} of {} on {addr}", member.name, cluster.name),
            Duration::from_secs(30),
            || proc::tcp_open(addr),
        )
        .with_context(|| format!("etcd log:\n{}", proc::log_tail(&member.log, 20)))?;
    }
    Ok(started)
}

fn record(state: &mut LabState, pid: u32, role: &str, cluster: &str, name: &str, log: &Path) {
    state.processes.push(LabProcess {
        pid,
        role: role.into(),
        cluster: cluster.into(),
        name: name.into(),
        log: log.to_owned(),
    });
}

fn marker(opts: &UpOptions) -> Vec<(&'static str, String)> {
    vec![(LAB_MARKER, opts.run_dir.display().to_string())]
}

/// The environment of an agent or apiserver: the lab's marker and, while the lab runs a trace
/// collector, the exporter's endpoint and the daemon's `host.name`.
fn daemon_env(opts: &UpOptions, state: &LabState, host: &str) -> Vec<(&'static str, String)> {
    let mut env = marker(opts);
    if let Some(collector) = &state.otlp {
        env.extend(otlp::exporter_env(&collector.endpoint, host));
    }
    env
}

fn start_control_plane(
    opts: &UpOptions,
    state: &mut LabState,
    topology: &mut Topology,
    cluster: &ClusterSpec,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let spec = &opts.spec;
    let cp = spec.control_plane_netns(cluster);
    progress(&format!(
        "{}: control plane namespace {cp}: etcd, apiserver",
        cluster.name
    ));
    attach_to_underlay(
        spec,
        state,
        topology,
        &cp,
        &format!("v-{}-cp", cluster.name),
        cluster.control_plane_ip,
    )?;

    if spec.has_far_nodes() {
        // Agents behind the router reach etcd and the apiserver through it.
        route_far_nets_via_router(spec, Some(&cp))?;
    }

    let dir = opts.run_dir.join(&cluster.name);
    std::fs::create_dir_all(&dir)?;
    let server = tls_paths(&opts.run_dir, &cluster.name, LeafKind::Server);
    let admin = tls_paths(&opts.run_dir, &cluster.name, LeafKind::Admin);
    let members = start_etcd(opts, state, cluster, &cp, &dir, &server)?;
    let endpoints = cluster.etcd_endpoints().join(",");

    let as_admin = [
        "--endpoints".to_string(),
        endpoints.clone(),
        "--ca".into(),
        admin.ca.display().to_string(),
        "--cert".into(),
        admin.cert.display().to_string(),
        "--key".into(),
        admin.key.display().to_string(),
    ];
    let nodes: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut bootstrap: Vec<String> = vec!["etcd".into(), "bootstrap".into()];
    bootstrap.extend(as_admin.iter().cloned());
    bootstrap.extend(["--node".into(), nodes.join(",")]);
    meshd(opts, state, &bootstrap)
        .with_context(|| format!("bootstrapping etcd of {}", cluster.name))?;
    // Every other cluster of the lab may read this one (user remote-<other>).
    for other in spec.clusters.iter().filter(|c| c.name != cluster.name) {
        let mut connect: Vec<String> = vec!["clustermesh".into(), "connect".into()];
        connect.push(other.name.clone());
        connect.extend(as_admin.iter().cloned());
        meshd(opts, state, &connect)
            .with_context(|| format!("connecting {} to {}", other.name, cluster.name))?;
    }

    let mut api_args_mirror: Vec<String> = Vec::new();
    if spec.kvstoremesh {
        // The mirror reads the other clusters as this cluster's agents would (the same remote
        // files), and its agents read them from its etcd.
        let remotes = dir.join("clusters");
        write_remote_files(opts, spec, cluster, &remotes)?;
        api_args_mirror.extend([
            "--kvstoremesh".into(),
            "--kvstoremesh-clusters-dir".into(),
            remotes.display().to_string(),
        ]);
    }
    let api_log = dir.join("apiserver.log");
    let api_addr = SocketAddr::from((cluster.control_plane_ip, cluster.apiserver_port));
    let health_addr = SocketAddr::from((cluster.control_plane_ip, cluster.apiserver_health_port));
    let metrics_addr = SocketAddr::from((cluster.control_plane_ip, APISERVER_METRICS_PORT));
    let api_args: Vec<String> = [
        "--cluster-name".into(),
        cluster.name.clone(),
        "--cluster-id".into(),
        cluster.id.to_string(),
        "--etcd-endpoints".into(),
        endpoints,
        "--etcd-ca".into(),
        admin.ca.display().to_string(),
        "--etcd-cert".into(),
        admin.cert.display().to_string(),
        "--etcd-key".into(),
        admin.key.display().to_string(),
        "--listen".into(),
        api_addr.to_string(),
        "--tls-ca".into(),
        server.ca.display().to_string(),
        "--tls-cert".into(),
        server.cert.display().to_string(),
        "--tls-key".into(),
        server.key.display().to_string(),
        "--health-listen".into(),
        health_addr.to_string(),
        "--metrics-addr".into(),
        metrics_addr.to_string(),
        "--service-cidr".into(),
        cluster.service_cidr.to_string(),
        "--routing-mode".into(),
        spec.routing.to_string(),
    ]
    .into_iter()
    .chain(api_args_mirror)
    .collect();
    let pid = spawn_daemon(
        Some(&cp),
        &opts.apiserver(),
        &api_args,
        &daemon_env(opts, state, &otlp::apiserver_host(&cluster.name)),
        &api_log,
    )?;
    record(state, pid, "apiserver", &cluster.name, "", &api_log);
    state.save()?;
    wait_for(
        &format!("apiserver of {} on {api_addr}", cluster.name),
        Duration::from_secs(30),
        || proc::tcp_open(api_addr),
    )
    .with_context(|| format!("apiserver log:\n{}", proc::log_tail(&api_log, 20)))?;

    state.clusters.push(LabCluster {
        name: cluster.name.clone(),
        id: cluster.id,
        context: spec.context(cluster),
        etcd: LabEtcd {
            endpoints: cluster.etcd_endpoints(),
            netns: cp,
            pid: members.first().map_or(0, |m| m.pid),
            members,
            remote: tls_paths(&opts.run_dir, &cluster.name, LeafKind::Remote),
            admin: admin.clone(),
        },
        admin,
        apiserver: api_addr.to_string(),
        apiserver_metrics: Some(format!("http://{metrics_addr}/metrics")),
        nodes: Vec::new(),
    });
    state.save()
}

/// Creates namespace `netns` with `ul0` on the underlay bridge at `ip`, recorded in the state
/// file whether or not every step succeeds.
fn attach_to_underlay(
    spec: &LabSpec,
    state: &mut LabState,
    topology: &mut Topology,
    netns: &str,
    bridge_port: &str,
    ip: std::net::Ipv4Addr,
) -> anyhow::Result<()> {
    let added = topology.add_host(&HostSpec {
        netns: netns.to_owned(),
        bridge_port: bridge_port.to_owned(),
        address: host_address(ip, spec.underlay),
    });
    record_topology(state, topology)?;
    Ok(added?)
}

/// Routes every far net (the links of the nodes behind the router) via the router, in `netns`
/// (None: the host namespace, through the lab's host link).
fn route_far_nets_via_router(spec: &LabSpec, netns: Option<&str>) -> anyhow::Result<()> {
    let dev = match netns {
        Some(_) => "ul0".to_owned(),
        None => spec.host_link(),
    };
    with_netlink(netns, |nl| {
        for c in spec
            .clusters
            .iter()
            .filter(|c| c.nodes.iter().any(|n| n.behind_router))
        {
            nl.add_route(
                &Route {
                    destination: spec.far_net(c.id),
                    dev: &dev,
                    gateway: Some(spec.external.router_ip),
                    link_scope: false,
                },
                true,
            )?;
        }
        Ok(())
    })
    .with_context(|| {
        format!(
            "{}: routes to the nodes behind the router",
            netns.unwrap_or("host namespace")
        )
    })
}

/// A node behind the router: its namespace, a link `ul0` from the router (`far_net`: router
/// .1, node .2), its default route via the router, and on the router a route to its pod CIDR
/// (built by the topology, as the e2e tests build theirs).
fn attach_behind_router(
    spec: &LabSpec,
    state: &mut LabState,
    topology: &mut Topology,
    cluster: &ClusterSpec,
    node: &NodeSpec,
    netns: &str,
) -> anyhow::Result<()> {
    let far = spec.far_net(cluster.id);
    let added = topology.add_host_behind_router(&FarHostSpec {
        router_netns: spec.router_netns(),
        router_port: format!("far-{}", cluster.name),
        netns: netns.to_owned(),
        router_address: host_address(spec.far_router_ip(cluster.id), far),
        address: host_address(node.ip, far),
        mtu: spec.mtu,
        router_side_mtu: spec.mtu,
        routed: vec![node.pod_cidr],
        strict_rp_filter: false,
    });
    record_topology(state, topology)?;
    Ok(added?)
}

fn write_cli_config(opts: &UpOptions, state: &LabState) -> anyhow::Result<()> {
    let mut yaml =
        String::from("# meshd CLI contexts of the lab (written by `meshd lab up`)\ncontexts:\n");
    for c in &state.clusters {
        writeln!(
            yaml,
            "  - name: {}\n    server: https://{}\n    ca: {}\n    cert: {}\n    key: {}",
            c.context,
            c.apiserver,
            c.etcd.admin.ca.display(),
            c.etcd.admin.cert.display(),
            c.etcd.admin.key.display()
        )?;
    }
    if let Some(first) = state.clusters.first() {
        writeln!(yaml, "current-context: {}", first.context)?;
    }
    std::fs::write(&state.cli_config, yaml)
        .with_context(|| format!("writing {}", state.cli_config.display()))?;
    let _ = opts;
    Ok(())
}

fn node_dir(opts: &UpOptions, cluster: &ClusterSpec, node: &NodeSpec) -> PathBuf {
    opts.run_dir.join(&cluster.name).join(&node.name)
}

fn api_socket(opts: &UpOptions, cluster: &ClusterSpec, node: &NodeSpec) -> PathBuf {
    node_dir(opts, cluster, node).join("agent.sock")
}

fn start_node(
    opts: &UpOptions,
    state: &mut LabState,
    topology: &mut Topology,
    cluster: &ClusterSpec,
    node: &NodeSpec,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let spec = &opts.spec;
    let netns = spec.node_netns(cluster, node);
    progress(&format!(
        "{}: node {} ({netns}, {}): meshd agent",
        cluster.name, node.name, node.ip
    ));
    if node.behind_router {
        attach_behind_router(spec, state, topology, cluster, node, &netns)?;
    } else {
        attach_to_underlay(
            spec,
            state,
            topology,
            &netns,
            &format!("v-{}-{}", cluster.name, node.name),
            node.ip,
        )?;
        // The outside is reached through the router (a node's default route would do as
        // well; this one leaves the host's own routing alone).
        with_netlink(Some(&netns), |nl| {
            nl.add_route(
                &Route {
                    destination: spec.external.net,
                    dev: "ul0",
                    gateway: Some(spec.external.router_ip),
                    link_scope: false,
                },
                false,
            )
        })
        .with_context(|| format!("{netns}: route to the external network"))?;
        if spec.has_far_nodes() {
            // The nodes behind the router and their pod CIDRs: through the router, as a
            // routing protocol would have told this node.
            let far_pods: Vec<Ipv4Net> = spec
                .clusters
                .iter()
                .flat_map(|c| &c.nodes)
                .filter(|n| n.behind_router)
                .map(|n| n.pod_cidr)
                .collect();
            route_far_nets_via_router(spec, Some(&netns))?;
            with_netlink(Some(&netns), |nl| {
                for pod in &far_pods {
                    nl.add_route(
                        &Route {
                            destination: *pod,
                            dev: "ul0",
                            gateway: Some(spec.external.router_ip),
                            link_scope: false,
                        },
                        false,
                    )?;
                }
                Ok(())
            })
            .with_context(|| format!("{netns}: routes to the pods behind the router"))?;
        }
    }

    let dir = node_dir(opts, cluster, node);
    let remotes = dir.join("clusters");
    write_remote_files(opts, spec, cluster, &remotes)?;
    let etcd = node_tls_paths(&opts.run_dir, &cluster.name, &node.name);
    let config = format!(
        "cluster: {c}\ncluster_id: {id}\nnode: {n}\nnode_ip: {ip}\npod_cidr: {pod}\netcd:\n  endpoints: [{ep}]\n  ca: {ca}\n  cert: {cert}\n  key: {key}\nremote_clusters_dir: {remotes}\nbpffs_dir: {bpffs}\ntunnel_port: {port}\nunderlay_device: ul0\nmasquerade: {masq}\nmetrics_addr: {metrics}\napi_socket: {sock}\nstate_dir: {state}\nendpoint_netns_prefix: {netns}-\n",
        c = cluster.name,
        id = cluster.id,
        n = node.name,
        ip = node.ip,
        pod = node.pod_cidr,
        ep = cluster.etcd_endpoints().join(", "),
        ca = etcd.ca.display(),
        cert = etcd.cert.display(),
        key = etcd.key.display(),
        remotes = remotes.display(),
        bpffs = opts.bpffs_dir.display(),
        port = spec.tunnel_port,
        sock = api_socket(opts, cluster, node).display(),
        masq = spec.masquerade,
        metrics = SocketAddr::from((node.ip, AGENT_METRICS_PORT)),
        state = dir.join("state").display(),
        // Endpoint namespaces carry the lab's prefix (through the node's), so two labs (a
        // user's and a test's) never fight over one name.
        netns = spec.node_netns(cluster, node),
    );
    let config = if spec.routing == meshd_state::RoutingMode::Native {
        format!(
            "{config}routing_mode: native\nnative_routing_cidr: {}\nauto_direct_node_routes: true\nservice_lb_mode: {}\n",
            spec.native_routing_cidr(),
            spec.service_lb_mode
        )
    } else {
        config
    };
    let config_path = dir.join("agent.yaml");
    std::fs::write(&config_path, config)?;
    let log = dir.join("agent.log");
    let pid = spawn_daemon(
        Some(&netns),
        &opts.meshd(),
        &[
            "agent".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
        &daemon_env(opts, state, &otlp::node_host(&cluster.name, &node.name)),
        &log,
    )?;
    record(state, pid, "agent", &cluster.name, &node.name, &log);
    let socket = api_socket(opts, cluster, node);
    let lab_cluster = state
        .clusters
        .iter_mut()
        .find(|c| c.name == cluster.name)
        .context("control plane recorded before nodes")?;
    lab_cluster.nodes.push(LabNode {
        name: node.name.clone(),
        netns: netns.clone(),
        ip: node.ip.to_string(),
        agent_pid: pid,
        api_socket: socket.clone(),
        metrics: Some(format!("http://{}:{AGENT_METRICS_PORT}/metrics", node.ip)),
        etcd,
        container: None,
    });
    state.save()?;
    wait_for(
        &format!("meshd agent of {}/{}", cluster.name, node.name),
        Duration::from_secs(60),
        || agent_status(opts, &socket).is_ok() || !proc::is_alive(pid),
    )?;
    if !proc::is_alive(pid) {
        bail!(
            "meshd agent of {}/{} exited; log:\n{}",
            cluster.name,
            node.name,
            proc::log_tail(&log, 30)
        );
    }
    Ok(())
}

/// The lab's trace collector in the host namespace (which every agent and apiserver reaches), on
/// the host's underlay address; when its binary is not next to `meshd` the state says so and
/// the daemons export nothing.
fn start_otlp_collector(
    opts: &UpOptions,
    state: &mut LabState,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let program = opts.otlp_collector();
    if !program.exists() {
        let why = format!(
            "no {} (cargo build -p meshd-otlp-collector)",
            program.display()
        );
        progress(&format!("otlp collector: not started: {why}"));
        state.otlp_absent = Some(why);
        return state.save();
    }
    let dir = opts.run_dir.join("otlp");
    std::fs::create_dir_all(&dir)?;
    let grpc = SocketAddr::from((opts.spec.host_ip, otlp::OTLP_PORT));
    let api = SocketAddr::from((opts.spec.host_ip, otlp::OTLP_API_PORT));
    let spans = dir.join("spans.jsonl");
    progress(&format!(
        "otlp collector on {grpc}: every agent's and apiserver's traces (http://{api}/api/spans)"
    ));
    let log = dir.join("collector.log");
    let args: Vec<String> = vec![
        "--listen".into(),
        grpc.to_string(),
        "--api-addr".into(),
        api.to_string(),
        "--output".into(),
        spans.display().to_string(),
    ];
    let pid = spawn_daemon(None, &program, &args, &marker(opts), &log)?;
    record(state, pid, "otlp-collector", "", "", &log);
    state.otlp = Some(LabOtlp {
        endpoint: format!("http://{grpc}"),
        api: format!("http://{api}"),
        pid,
        spans: Some(spans),
        container: None,
    });
    state.otlp_absent = None;
    state.save()?;
    wait_for(
        &format!("otlp collector on {grpc}"),
        Duration::from_secs(30),
        || (proc::tcp_open(grpc) && proc::tcp_open(api)) || !proc::is_alive(pid),
    )?;
    if !proc::is_alive(pid) {
        bail!("otlp collector exited; log:\n{}", proc::log_tail(&log, 30));
    }
    Ok(())
}

/// The lab's Prometheus in the host namespace (which reaches every agent and apiserver), on
/// the host's underlay address, scraping every one; when no `prometheus` binary is installed
/// the state says so instead.
fn start_prometheus(
    opts: &UpOptions,
    state: &mut LabState,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let found = run(
        None,
        Path::new("sh"),
        &["-c".into(), "command -v prometheus".into()],
    );
    let program = match found {
        Ok(path) if !path.trim().is_empty() => PathBuf::from(path.trim()),
        _ => {
            let why = "no `prometheus` binary on PATH (scripts/install-deps.sh installs Debian's)";
            progress(&format!("prometheus: not started: {why}"));
            state.prometheus_absent = Some(why.into());
            return state.save();
        }
    };
    let dir = opts.run_dir.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, prometheus::config(&prometheus::targets(state)))
        .with_context(|| format!("writing {}", config.display()))?;
    let addr = SocketAddr::from((opts.spec.host_ip, prometheus::PROMETHEUS_PORT));
    progress(&format!(
        "prometheus on {addr}: scraping every agent and apiserver"
    ));
    let log = dir.join("prometheus.log");
    let args: Vec<String> = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        "--storage.tsdb.retention.time=1d".into(),
        format!("--web.listen-address={addr}"),
    ];
    let pid = spawn_daemon(None, &program, &args, &marker(opts), &log)?;
    record(state, pid, "prometheus", "", "", &log);
    state.prometheus = Some(LabPrometheus {
        url: format!("http://{addr}"),
        pid,
        config,
        container: None,
    });
    state.prometheus_absent = None;
    state.save()?;
    wait_for(
        &format!("prometheus on {addr}"),
        Duration::from_secs(30),
        || proc::tcp_open(addr) || !proc::is_alive(pid),
    )?;
    if !proc::is_alive(pid) {
        bail!("prometheus exited; log:\n{}", proc::log_tail(&log, 30));
    }
    Ok(())
}

fn agent_status(opts: &UpOptions, socket: &Path) -> anyhow::Result<serde_json::Value> {
    let out = run(
        None,
        &opts.meshd(),
        &[
            "status".into(),
            "--socket".into(),
            socket.display().to_string(),
            "-o".into(),
            "json".into(),
        ],
    )?;
    Ok(serde_json::from_str(&out)?)
}

fn add_endpoints(
    opts: &UpOptions,
    state: &mut LabState,
    cluster: &ClusterSpec,
    node: &NodeSpec,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let socket = api_socket(opts, cluster, node);
    for ep in &node.endpoints {
        progress(&format!(
            "{}/{}: endpoint {}",
            cluster.name, node.name, ep.name
        ));
        let labels = ep
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let out = run(
            None,
            &opts.meshd(),
            &[
                "endpoint".into(),
                "add".into(),
                ep.name.clone(),
                "--labels".into(),
                labels,
                "--namespace".into(),
                ep.namespace.clone(),
                "--socket".into(),
                socket.display().to_string(),
                "-o".into(),
                "json".into(),
            ],
        )?;
        let added: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("`meshd endpoint add -o json` printed {out:?}"))?;
        let ip = added["ip"]
            .as_str()
            .context("endpoint without ip")?
            .to_owned();
        let netns_path = added["netns"].as_str().context("endpoint without netns")?;
        let netns = Path::new(netns_path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let labels: BTreeMap<String, String> = added["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        state.endpoints.push(LabEndpoint {
            name: ep.name.clone(),
            namespace: ep.namespace.clone(),
            cluster: cluster.name.clone(),
            node: node.name.clone(),
            netns: netns.clone(),
            ip,
            labels,
            container: None,
        });
        state.save()?;
        if ep.echo {
            let log = node_dir(opts, cluster, node).join(format!("{}.log", ep.name));
            let pid = spawn_echo(opts, &netns, [&cluster.name, &node.name, &ep.name], &log)?;
            record(state, pid, "workload", &cluster.name, &ep.name, &log);
            state.save()?;
        }
    }
    Ok(())
}

/// Runs the `meshd` CLI with the lab's CLI config.
fn meshd(opts: &UpOptions, state: &LabState, args: &[String]) -> anyhow::Result<String> {
    let out = std::process::Command::new(opts.meshd())
        .args(args)
        .env("MESHD_CONFIG", &state.cli_config)
        .output()
        .with_context(|| format!("running meshd {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`meshd {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_mesh_ready(opts: &UpOptions, state: &LabState) -> anyhow::Result<()> {
    let want = opts.spec.clusters.len();
    for cluster in &state.clusters {
        for node in &cluster.nodes {
            let mut last = String::new();
            wait_for(
                &format!(
                    "{}/{} to see all {want} clusters ready",
                    cluster.name, node.name
                ),
                Duration::from_secs(90),
                || match agent_status(opts, &node.api_socket) {
                    Ok(status) => {
                        let ready = status["clusters"]
                            .as_array()
                            .map(|cs| cs.iter().filter(|c| c["ready"] == true).count())
                            .unwrap_or(0);
                        last = status["clusters"].to_string();
                        ready >= want
                    }
                    Err(e) => {
                        last = format!("{e:#}");
                        false
                    }
                },
            )
            .with_context(|| format!("last status: {last}"))?;
        }
    }
    Ok(())
}

/// What `down` removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct DownReport {
    pub processes: usize,
    pub netns: usize,
    pub pins_removed: bool,
}

/// Removes the lab recorded in `run_dir`. Safe to run when nothing (or half a lab) exists.
pub fn down(run_dir: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<DownReport> {
    let mut report = DownReport::default();
    let Some(state) = LabState::load(run_dir)? else {
        // Nothing recorded; still stop stray processes carrying this run dir's marker.
        report.processes = kill_marked(run_dir);
        return Ok(report);
    };
    progress("stopping workloads, agents, apiservers and etcd");
    // Reverse creation order: workloads before their agents, agents before etcd.
    for p in state.processes.iter().rev() {
        if proc::is_alive(p.pid) {
            proc::terminate(p.pid, Duration::from_secs(5));
            report.processes += 1;
        }
    }
    report.processes += kill_marked(run_dir);

    progress("removing endpoint, node, control-plane and underlay namespaces");
    let mut netns: Vec<String> = state.endpoints.iter().map(|e| e.netns.clone()).collect();
    // Endpoints added later with `meshd endpoint add` are not in the state file; their
    // namespaces carry the node's namespace name as prefix (the agents'
    // `endpoint_netns_prefix`).
    let node_prefixes: Vec<String> = state
        .clusters
        .iter()
        .flat_map(|c| c.nodes.iter().map(|n| format!("{}-", n.netns)))
        .collect();
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if node_prefixes.iter().any(|p| name.starts_with(p)) && !netns.contains(&name) {
            netns.push(name);
        }
    }
    // Creation order: the lab's own namespaces, then the endpoints' (removed first).
    let mut all = state.netns.clone();
    all.extend(netns.into_iter().filter(|n| !n.is_empty()));
    report.netns = all
        .iter()
        .filter(|n| meshd_topology::netns::exists(n))
        .count();
    meshd_topology::underlay::remove(&all, &state.host_links)?;
    if state.bpffs_dir.starts_with("/sys/fs/bpf") && state.bpffs_dir.exists() {
        progress(&format!(
            "removing pinned maps and links under {}",
            state.bpffs_dir.display()
        ));
        std::fs::remove_dir_all(&state.bpffs_dir)
            .with_context(|| format!("removing {}", state.bpffs_dir.display()))?;
        report.pins_removed = true;
    }
    std::fs::remove_dir_all(run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
    Ok(report)
}

/// Kills every process whose environment carries `LAB_MARKER=<run_dir>`.
fn kill_marked(run_dir: &Path) -> usize {
    let needle = format!("{LAB_MARKER}={}", run_dir.display());
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
        {
            proc::terminate(pid, Duration::from_secs(5));
            killed += 1;
        }
    }
    killed
}

/// One file per other cluster in `remotes`, read with this cluster's own remote certificate
/// (remote-<cluster>), which each other cluster let in with `meshd clustermesh connect`: the
/// agents' remote files, and the mirror's.
fn write_remote_files(
    opts: &UpOptions,
    spec: &LabSpec,
    cluster: &ClusterSpec,
    remotes: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(remotes)?;
    let remote = tls_paths(&opts.run_dir, &cluster.name, LeafKind::Remote);
    for other in spec.clusters.iter().filter(|c| c.name != cluster.name) {
        let file = format!(
            "# etcd of cluster {name}, read with {own}'s read-only `remote` certificate\nendpoints: [{ep}]\nca: {ca}\ncert: {cert}\nkey: {key}\n",
            own = cluster.name,
            name = other.name,
            ep = other.etcd_endpoints().join(", "),
            ca = remote.ca.display(),
            cert = remote.cert.display(),
            key = remote.key.display(),
        );
        std::fs::write(remotes.join(&other.name), file)?;
    }
    Ok(())
}
