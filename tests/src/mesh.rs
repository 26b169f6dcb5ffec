//! A multi-cluster mesh in network namespaces, driven through the real `meshd` binary.
//!
//! Layout (addresses inside namespaces this harness creates; nothing leaves the machine):
//! - one underlay bridge namespace, `br0` = 192.168.77.254/24, where a [`Proxy`] per etcd
//!   member listens on port 2379 + cluster id + 100 * member and relays to that member on the
//!   host loopback;
//! - per cluster: etcd (one member, or a replicated cluster of [`MeshOptions::etcd_members`])
//!   with TLS, client-certificate auth and the RBAC of `meshd etcd bootstrap`; agents and
//!   remote-cluster files list every member;
//! - per node: a namespace with `ul0` = 192.168.77.(10 * cluster id + node)/24, pod CIDR
//!   10.<cluster id>.<node>.0/24, running `meshd agent` (maps pinned under a per-mesh bpffs
//!   directory), with the other clusters in its remote-clusters directory; a node behind the
//!   router ([`MeshOptions::node_behind_router`]) has `ul0` = 192.168.(100 + cluster id).2/24
//!   on a link of its own to the router instead;
//! - endpoints made with `meshd endpoint add`, in namespaces named `<prefix>-ep-...`.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use meshd_certs::LeafKind;
use meshd_testing::etcd::{EtcdOptions, EtcdTls};
use meshd_testing::etcd_cluster::EtcdCluster;
use meshd_testing::netns::{External, Underlay};

/// The router's address on the underlay, when the mesh has an outside.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 253);

use crate::pki::Pki;
use crate::proxy::Proxy;
use crate::wait_for;

/// Address of the underlay bridge, where nodes reach their etcd.
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 254);
pub const UNDERLAY_MTU: u32 = 1500;

/// What to build.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// (cluster name, cluster id, number of nodes)
    pub clusters: Vec<(String, u8, u8)>,
    /// TTL of each agent's lease: how long a dead node's records outlive it.
    pub lease_ttl_secs: u64,
    /// Period of each agent's safety-net diff of its maps; `None`: the agent's default.
    pub resync_interval_secs: Option<u64>,
    /// Each agent serves `/metrics` on 127.0.0.1:PORT inside its node's namespace.
    pub metrics_port: Option<u16>,
    /// Members of each cluster's etcd (1, or 3 for a replicated one).
    pub etcd_members: usize,
    /// Outside the mesh: a router on the underlay (every node's default route, strict
    /// rp_filter on every uplink) and an external host behind it, on a link whose router side
    /// has this MTU. `None`: no outside.
    pub external_mtu: Option<u32>,
    /// Lines appended to every agent's config file (e.g. `masquerade: false`).
    pub agent_config: Vec<String>,
    /// The routing mode each cluster's config announces (as its apiserver's `--routing-mode`
    /// would); clusters not listed announce the agents' mode ([`MeshOptions::native`]).
    pub announced_routing: BTreeMap<String, meshd_state::RoutingMode>,
    /// The agents' routing mode.
    pub routing: meshd_state::RoutingMode,
    /// Wait for every node to see every cluster ready at start (false: a test that expects a
    /// refusal checks for itself).
    pub wait_ready: bool,
    /// Clusters whose last node sits behind the router (needs [`MeshOptions::external`]), on a
    /// link of its own ([`far_net`]) whose router side has the given MTU, as the lab's native
    /// mode does: no other node reaches it directly, the router routes its pod CIDR.
    pub behind_router: BTreeMap<String, u32>,
    /// Every cluster runs a mirror (`clustermesh-apiserver --kvstoremesh`, in the underlay's
    /// bridge namespace, reading the cluster's remote files) and announces it in its config, so
    /// its agents read remote clusters from their own etcd's cache.
    pub kvstoremesh: bool,
    /// Flags added to every mirror's command line (e.g. `--kvstoremesh-limit 2500`).
    pub mirror_args: Vec<String>,
}

/// The link between the router (.1) and cluster `id`'s node behind it (.2).
pub fn far_net(id: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(192, 168, 100 + id, 0), 24).expect("/24")
}

impl MeshOptions {
    /// `n` clusters c1..cn with `nodes` nodes each.
    pub fn clusters(n: u8, nodes: u8) -> Self {
        Self {
            clusters: (1..=n).map(|i| (format!("c{i}"), i, nodes)).collect(),
            lease_ttl_secs: 4,
            resync_interval_secs: None,
            metrics_port: None,
            etcd_members: 1,
            external_mtu: None,
            agent_config: Vec::new(),
            announced_routing: BTreeMap::new(),
            routing: meshd_state::RoutingMode::Tunnel,
            wait_ready: true,
            behind_router: BTreeMap::new(),
            kvstoremesh: false,
            mirror_args: Vec::new(),
        }
    }

    /// With a mirror per cluster (see [`MeshOptions::kvstoremesh`]).
    pub fn kvstoremesh(mut self) -> Self {
        self.kvstoremesh = true;
        self
    }

    /// Native routing: every agent routes unencapsulated within 10.0.0.0/8 (every pod CIDR of
    /// the harness) with auto-direct node routes, and every cluster announces it.
    pub fn native(mut self) -> Self {
        self.routing = meshd_state::RoutingMode::Native;
        self.agent_config.extend([
            "routing_mode: native".to_owned(),
            "native_routing_cidr: 10.0.0.0/8".to_owned(),
            "auto_direct_node_routes: true".to_owned(),
        ]);
        self
    }

    /// `cluster`'s config announces `mode` whatever its agents run; the mesh does not wait
    /// for every cluster to be ready at start (a mismatch is refused).
    pub fn announce(mut self, cluster: &str, mode: meshd_state::RoutingMode) -> Self {
        self.announced_routing.insert(cluster.to_owned(), mode);
        self.wait_ready = false;
        self
    }

    /// The routing mode `cluster`'s config announces.
    pub fn routing_mode_of(&self, cluster: &str) -> meshd_state::RoutingMode {
        self.announced_routing
            .get(cluster)
            .copied()
            .unwrap_or(self.routing)
    }

    /// With an external host behind a router (see [`MeshOptions::external_mtu`]).
    pub fn external(mut self, router_side_mtu: u32) -> Self {
        self.external_mtu = Some(router_side_mtu);
        self
    }

    /// `cluster`'s last node behind the router (see [`MeshOptions::behind_router`]).
    pub fn node_behind_router(mut self, cluster: &str, router_side_mtu: u32) -> Self {
        self.behind_router
            .insert(cluster.to_owned(), router_side_mtu);
        self
    }

    /// With `line` in every agent's config file.
    pub fn agent_config(mut self, line: &str) -> Self {
        self.agent_config.push(line.to_owned());
        self
    }

    /// Each cluster's etcd replicated on `members` members.
    pub fn etcd_members(mut self, members: usize) -> Self {
        self.etcd_members = members;
        self
    }
}

pub struct Node {
    pub cluster: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    /// The node's network namespace.
    pub netns: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pin_dir: PathBuf,
    /// Behind the router, on a link of its own ([`MeshOptions::behind_router`]).
    pub behind_router: bool,
    agent: Option<Child>,
    /// Where the agent's readiness notifications arrive (its NOTIFY_SOCKET, as under systemd).
    notify: Option<std::os::unix::net::UnixDatagram>,
}

pub struct Cluster {
    pub name: String,
    pub id: u8,
    pub etcd: EtcdCluster,
    /// One relay per etcd member, in member order.
    proxies: Vec<Proxy>,
    pub nodes: Vec<Node>,
    /// The cluster's mirror ([`MeshOptions::kvstoremesh`]) while it runs.
    mirror: Option<Child>,
}

impl Cluster {
    /// etcd as nodes dial it: every member, in member order.
    pub fn etcd_urls(&self) -> Vec<String> {
        self.proxies
            .iter()
            .map(|p| format!("https://{}", p.addr()))
            .collect()
    }
}

/// An endpoint as `meshd endpoint add -o json` described it.
#[derive(Debug, Clone)]
pub struct EndpointInfo {
    pub cluster: String,
    pub node: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub netns: PathBuf,
}

pub struct Mesh {
    pub prefix: String,
    meshd: PathBuf,
    bpffs_root: PathBuf,
    pub clusters: Vec<Cluster>,
    pub underlay: Underlay,
    /// The router and external host of [`MeshOptions::external_mtu`].
    pub external: Option<External>,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    metrics_port: Option<u16>,
    /// Relays of [`Mesh::relay`].
    relays: Vec<Proxy>,
    /// [`MeshOptions::mirror_args`].
    mirror_args: Vec<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The `meshd` binary next to this test executable (target/<profile>/meshd): `make test`
/// (`cargo test --workspace`) builds it before running tests.
pub fn meshd_binary() -> anyhow::Result<PathBuf> {
    let bin = meshd_testing::workspace_bin("meshd");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (`cargo build -p meshd`, or run `make test`)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Checks what an end-to-end test needs; false (after printing why) when it cannot run here.
pub fn prerequisites() -> bool {
    meshd_testing::require_root()
        && meshd_testing::require_etcd()
        && meshd_testing::require("nsenter on PATH", meshd_testing::have_binary("nsenter"))
        && meshd_testing::require_bpffs()
        && meshd_testing::require_workspace_bins(&["meshd"])
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Mesh {
    /// Builds the mesh, starts every agent and waits until every node sees every cluster
    /// ready.
    pub fn start(opts: MeshOptions) -> anyhow::Result<Mesh> {
        let meshd = meshd_binary()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // `MESHD_E2E_PREFIX` (see `meshd_testing::run_tag`), else `m`.
        let tag = meshd_testing::run_tag()?.unwrap_or_else(|| "m".to_owned());
        let prefix = format!("{tag}{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("meshd-e2e-{prefix}-"))
            .tempdir()?;
        let bpffs_root = PathBuf::from("/sys/fs/bpf").join(format!("meshd-e2e-{prefix}"));
        let pki = Pki::new(dir.path())?;
        let underlay =
            Underlay::with_bridge_address(&prefix, UNDERLAY_MTU, Ipv4Net::new(CONTROL_IP, 24)?)?;

        let mut mesh = Mesh {
            prefix: prefix.clone(),
            meshd,
            bpffs_root,
            clusters: Vec::new(),
            underlay,
            external: None,
            pki,
            dir,
            metrics_port: opts.metrics_port,
            relays: Vec::new(),
            mirror_args: opts.mirror_args.clone(),
        };

        if let Some(mtu) = opts.external_mtu {
            mesh.external = Some(mesh.underlay.add_external(&prefix, ROUTER_IP, mtu)?);
        }
        for (name, id, nodes) in &opts.clusters {
            mesh.pki
                .issue_cluster(name, &[IpAddr::from([127, 0, 0, 1]), CONTROL_IP.into()])?;
            let server = mesh.pki.files(name, LeafKind::Server);
            let admin = mesh.pki.files(name, LeafKind::Admin);
            let etcd = EtcdCluster::start(
                opts.etcd_members,
                EtcdOptions {
                    tls: Some(EtcdTls {
                        ca: server.ca.clone(),
                        cert: server.cert.clone(),
                        key: server.key.clone(),
                        client_cert_auth: true,
                        etcdctl_client: Some((admin.cert.clone(), admin.key.clone())),
                    }),
                    extra_args: Vec::new(),
                },
            )?;
            let node_names: Vec<String> = (1..=*nodes).map(|k| format!("n{k}")).collect();
            for node in &node_names {
                mesh.pki.issue_node(name, node)?;
            }
            run(Command::new(&mesh.meshd)
                .args(["etcd", "bootstrap", "--node", &node_names.join(",")])
                .args(admin_args(&etcd.endpoints().join(","), &admin)))
            .with_context(|| format!("bootstrapping etcd of {name}"))?;
            // What the cluster's apiserver writes at start (this harness runs none); agents
            // read it and may not write it.
            let config_key = meshd_state::ClusterConfigKey {
                cluster: meshd_state::ClusterName::new(name.as_str())?,
            };
            let config = meshd_state::ClusterConfig {
                name: config_key.cluster.clone(),
                id: meshd_state::ClusterId::new(u32::from(*id))?,
                capabilities: meshd_state::Capabilities {
                    cached: opts.kvstoremesh,
                    ..Default::default()
                },
                routing_mode: opts.routing_mode_of(name),
            };
            let value = meshd_state::encode(&config_key, &config)?;
            etcd.etcdctl(&["put", &config_key.to_string(), std::str::from_utf8(&value)?])
                .with_context(|| format!("writing the cluster config of {name}"))?;
            let proxies = etcd
                .members()
                .iter()
                .enumerate()
                .map(|(m, member)| {
                    Proxy::start(
                        &mesh.underlay.bridge().path(),
                        SocketAddr::from((CONTROL_IP, 2379 + u16::from(*id) + 100 * m as u16)),
                        SocketAddr::from(([127, 0, 0, 1], member.client_url_port())),
                    )
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut cluster = Cluster {
                name: name.clone(),
                id: *id,
                etcd,
                proxies,
                nodes: Vec::new(),
                mirror: None,
            };
            for k in 1..=*nodes {
                let node_name = format!("n{k}");
                let pod_cidr = Ipv4Net::new(Ipv4Addr::new(10, *id, k, 0), 24)?;
                let ns_prefix = format!("{prefix}-{name}{node_name}");
                let far_mtu = opts.behind_router.get(name).filter(|_| k == *nodes);
                let (index, ip) = match (far_mtu, &mesh.external) {
                    (Some(&mtu), Some(ext)) => mesh.underlay.add_node_behind_router(
                        &ns_prefix,
                        ext,
                        far_net(*id),
                        mtu,
                        pod_cidr,
                    )?,
                    (Some(_), None) => bail!("a node behind the router needs an outside"),
                    (None, _) => {
                        let ip = Ipv4Addr::new(192, 168, 77, 10 * id + k);
                        (mesh.underlay.add_node(&ns_prefix, ip)?, ip)
                    }
                };
                let netns = mesh.underlay.node(index).path();
                if opts.external_mtu.is_some() && far_mtu.is_none() {
                    let ns = mesh.underlay.node(index);
                    ns.ip(&["route", "add", "default", "via", &ROUTER_IP.to_string()])?;
                    for key in [
                        "net.ipv4.conf.all.rp_filter=1",
                        "net.ipv4.conf.ul0.rp_filter=1",
                    ] {
                        ns.run("sysctl", &["-qw", key])?;
                    }
                }
                let node_dir = mesh.dir.path().join(format!("{name}-{node_name}"));
                fs::create_dir_all(&node_dir)?;
                cluster.nodes.push(Node {
                    cluster: name.clone(),
                    name: node_name.clone(),
                    ip,
                    pod_cidr,
                    netns,
                    config: node_dir.join("agent.yaml"),
                    socket: node_dir.join("agent.sock"),
                    log: node_dir.join("agent.log"),
                    pin_dir: mesh.bpffs_root.join(name).join(&node_name),
                    behind_router: far_mtu.is_some(),
                    agent: None,
                    notify: None,
                });
            }
            mesh.clusters.push(cluster);
        }

        if !opts.behind_router.is_empty() {
            // The router carries the pod addresses of the nodes on the segment to and from the
            // nodes behind it; the bridge (where etcd's relays listen) reaches those through it.
            let ext = mesh
                .external
                .as_ref()
                .context("behind_router needs an outside")?;
            for (c, n) in mesh
                .clusters
                .iter()
                .flat_map(|c| c.nodes.iter().map(move |n| (c, n)))
            {
                if n.behind_router {
                    mesh.underlay.bridge().ip(&[
                        "route",
                        "add",
                        &far_net(c.id).to_string(),
                        "via",
                        &ROUTER_IP.to_string(),
                    ])?;
                } else {
                    ext.route_to(&n.pod_cidr.to_string(), n.ip)?;
                }
            }
        }
        // Every cluster lets every other one read it (user remote-<other>).
        for c in &mesh.clusters {
            for other in mesh.clusters.iter().filter(|o| o.name != c.name) {
                mesh.clustermesh(&c.name, "connect", &other.name)?;
            }
        }
        // Remote-cluster directories: every other cluster, read with this cluster's remote
        // certificate.
        for c in &mesh.clusters {
            let remotes = mesh.remotes_dir(&c.name);
            fs::create_dir_all(&remotes)?;
            for other in mesh.clusters.iter().filter(|o| o.name != c.name) {
                mesh.write_remote_file(&c.name, &other.name)?;
            }
        }
        for ci in 0..mesh.clusters.len() {
            for ni in 0..mesh.clusters[ci].nodes.len() {
                mesh.write_config(ci, ni, &opts)?;
            }
        }
        if opts.kvstoremesh {
            let names: Vec<String> = mesh.clusters.iter().map(|c| c.name.clone()).collect();
            for c in names {
                mesh.start_mirror(&c)?;
            }
        }
        for ci in 0..mesh.clusters.len() {
            for ni in 0..mesh.clusters[ci].nodes.len() {
                let (c, n) = (
                    mesh.clusters[ci].name.clone(),
                    mesh.clusters[ci].nodes[ni].name.clone(),
                );
                mesh.start_agent(&c, &n)?;
            }
        }
        if opts.wait_ready {
            mesh.wait_all_ready(Duration::from_secs(60))?;
        }
        Ok(mesh)
    }

    /// Starts (or restarts) `cluster`'s mirror: `clustermesh-apiserver --kvstoremesh` in the
    /// underlay's bridge namespace (where every cluster's etcd relays listen), with the
    /// cluster's admin certificate locally and its remote files for the others. Waits until its
    /// API answers.
    pub fn start_mirror(&mut self, cluster: &str) -> anyhow::Result<()> {
        let bin = meshd_testing::workspace_bin("clustermesh-apiserver");
        anyhow::ensure!(
            bin.is_file(),
            "{} not found: build it first (`cargo build --workspace --bins`, or `make test`)",
            bin.display()
        );
        self.stop_mirror(cluster)?;
        let bridge = self.underlay.bridge().path();
        let remotes = self.remotes_dir(cluster);
        let log_path = self.dir.path().join(format!("mirror-{cluster}.log"));
        let admin = self.pki.files(cluster, LeafKind::Admin);
        let server = self.pki.files(cluster, LeafKind::Server);
        let c = self.cluster(cluster)?;
        let api = SocketAddr::from((CONTROL_IP, 9100 + u16::from(c.id)));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", bridge.display()))
            .arg("--")
            .arg(&bin)
            .args(["--cluster-name", cluster, "--cluster-id", &c.id.to_string()])
            .args(["--etcd-endpoints", &c.etcd_urls().join(",")])
            .arg("--etcd-ca")
            .arg(&admin.ca)
            .arg("--etcd-cert")
            .arg(&admin.cert)
            .arg("--etcd-key")
            .arg(&admin.key)
            .args(["--listen", &api.to_string()])
            .arg("--tls-ca")
            .arg(&server.ca)
            .arg("--tls-cert")
            .arg(&server.cert)
            .arg("--tls-key")
            .arg(&server.key)
            .args(["--service-cidr", &format!("172.20.{}.0/24", c.id)])
            // Only the leader mirrors: a mirror restarted after a SIGKILL waits for its dead
            // predecessor's lease to expire before it writes again (15 s by default).
            .args(["--leader-lease-ttl", "5s"])
            .arg("--kvstoremesh")
            .arg("--kvstoremesh-clusters-dir")
            .arg(&remotes)
            .args(&self.mirror_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning clustermesh-apiserver --kvstoremesh")?;
        self.cluster_mut(cluster)?.mirror = Some(child);
        wait_for(
            &format!("mirror of {cluster} answering on {api}"),
            Duration::from_secs(30),
            || {
                crate::netns_io::connect(&bridge, api, Duration::from_secs(1))?;
                Ok(())
            },
        )
        .with_context(|| format!("mirror log:\n{}", tail(&log_path, 40)))?;
        Ok(())
    }

    /// SIGTERM to `cluster`'s mirror, then wait for it to exit.
    pub fn stop_mirror(&mut self, cluster: &str) -> anyhow::Result<()> {
        if let Some(mut child) = self.cluster_mut(cluster)?.mirror.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// SIGKILL to `cluster`'s mirror (a crash, in the middle of whatever it was writing).
    pub fn kill_mirror(&mut self, cluster: &str) -> anyhow::Result<()> {
        if let Some(mut child) = self.cluster_mut(cluster)?.mirror.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// `meshd apply -f` of `manifest` to `cluster`'s apiserver (the mirror's process: the
    /// mesh must run with [`MeshOptions::kvstoremesh`]), as the cluster's admin, from the
    /// underlay's bridge namespace where the apiserver listens.
    pub fn apply_manifest(&self, cluster: &str, manifest: &str) -> anyhow::Result<String> {
        let c = self.cluster(cluster)?;
        anyhow::ensure!(c.mirror.is_some(), "{cluster} runs no apiserver");
        let admin = self.pki.files(cluster, LeafKind::Admin);
        let contexts = self.dir.path().join(format!("contexts-{cluster}.yaml"));
        fs::write(
            &contexts,
            format!(
                "current-context: {cluster}\ncontexts:\n  - name: {cluster}\n    server: https://{CONTROL_IP}:{port}\n    ca: {ca}\n    cert: {cert}\n    key: {key}\n",
                port = 9100 + u16::from(c.id),
                ca = admin.ca.display(),
                cert = admin.cert.display(),
                key = admin.key.display(),
            ),
        )?;
        let file = self.dir.path().join(format!("manifest-{cluster}.yaml"));
        fs::write(&file, manifest)?;
        run(Command::new("nsenter")
            .arg(format!("--net={}", self.underlay.bridge().path().display()))
            .arg("--")
            .arg(&self.meshd)
            .arg("--meshd-config")
            .arg(&contexts)
            .args(["apply", "-f"])
            .arg(&file))
    }

    /// A relay on the underlay's bridge (where mirrors and nodes dial etcd) to `target` on
    /// this process's loopback (an extra etcd a test started); its address there.
    pub fn relay(&mut self, target: SocketAddr) -> anyhow::Result<SocketAddr> {
        // Clear of the cluster etcds' relays (2379 + id + 100 * member).
        let port = 24000 + self.relays.len() as u16;
        let listen = SocketAddr::from((CONTROL_IP, port));
        self.relays.push(Proxy::start(
            &self.underlay.bridge().path(),
            listen,
            target,
        )?);
        Ok(listen)
    }

    pub fn remotes_dir(&self, cluster: &str) -> PathBuf {
        self.dir.path().join(format!("{cluster}-remotes"))
    }

    /// `meshd clustermesh connect|disconnect <other>` against `cluster`'s etcd, as its admin.
    pub fn clustermesh(&self, cluster: &str, verb: &str, other: &str) -> anyhow::Result<String> {
        let c = self.cluster(cluster)?;
        let admin = self.pki.files(cluster, LeafKind::Admin);
        run(Command::new(&self.meshd)
            .args(["clustermesh", verb, other])
            .args(admin_args(&c.etcd.endpoints().join(","), &admin)))
        .with_context(|| format!("meshd clustermesh {verb} {other} in {cluster}"))
    }

    /// Writes `<cluster>-remotes/<other>`, connecting `cluster`'s nodes to `other`: `other`'s
    /// etcd, read with `cluster`'s own remote certificate.
    pub fn write_remote_file(&self, cluster: &str, other: &str) -> anyhow::Result<()> {
        let o = self.cluster(other)?;
        let remote = self.pki.files(cluster, LeafKind::Remote);
        fs::write(
            self.remotes_dir(cluster).join(other),
            format!(
                "endpoints: [{}]\nca: {}\ncert: {}\nkey: {}\n",
                o.etcd_urls().join(", "),
                remote.ca.display(),
                remote.cert.display(),
                remote.key.display()
            ),
        )?;
        Ok(())
    }

    fn write_config(&self, ci: usize, ni: usize, opts: &MeshOptions) -> anyhow::Result<()> {
        let c = &self.clusters[ci];
        let n = &c.nodes[ni];
        let etcd = self.pki.node_files(&c.name, &n.name);
        let state = n.config.parent().expect("node dir").join("state");
        let mut text = format!(
            "cluster: {cluster}\ncluster_id: {id}\nnode: {node}\nnode_ip: {ip}\npod_cidr: {pod}\n\
             etcd:\n  endpoints: [{etcd}]\n  ca: {ca}\n  cert: {cert}\n  key: {key}\n\
             remote_clusters_dir: {remotes}\nbpffs_dir: {bpffs}\ntunnel_port: 8472\n\
             underlay_mtu: {mtu}\napi_socket: {sock}\nstate_dir: {state}\n\
             lease_ttl_secs: {ttl}\nendpoint_netns_prefix: {prefix}-ep-{cluster}{node}-\n",
            cluster = c.name,
            id = c.id,
            node = n.name,
            ip = n.ip,
            pod = n.pod_cidr,
            etcd = c.etcd_urls().join(", "),
            ca = etcd.ca.display(),
            cert = etcd.cert.display(),
            key = etcd.key.display(),
            remotes = self.remotes_dir(&c.name).display(),
            bpffs = self.bpffs_root.display(),
            mtu = UNDERLAY_MTU,
            sock = n.socket.display(),
            state = state.display(),
            ttl = opts.lease_ttl_secs,
            prefix = self.prefix,
        );
        if let Some(secs) = opts.resync_interval_secs {
            text.push_str(&format!("resync_interval_secs: {secs}\n"));
        }
        if let Some(port) = opts.metrics_port {
            text.push_str(&format!("metrics_addr: 127.0.0.1:{port}\n"));
        }
        for line in &opts.agent_config {
            text.push_str(line);
            text.push('\n');
        }
        fs::write(&n.config, text)?;
        Ok(())
    }

    pub fn cluster(&self, name: &str) -> anyhow::Result<&Cluster> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("no cluster {name}"))
    }

    pub fn cluster_mut(&mut self, name: &str) -> anyhow::Result<&mut Cluster> {
        self.clusters
            .iter_mut()
            .find(|c| c.name == name)
            .with_context(|| format!("no cluster {name}"))
    }

    pub fn node(&self, cluster: &str, node: &str) -> anyhow::Result<&Node> {
        self.cluster(cluster)?
            .nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {cluster}/{node}"))
    }

    fn node_mut(&mut self, cluster: &str, node: &str) -> anyhow::Result<&mut Node> {
        self.cluster_mut(cluster)?
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .with_context(|| format!("no node {cluster}/{node}"))
    }

    /// Every (cluster, node) pair.
    pub fn node_names(&self) -> Vec<(String, String)> {
        self.clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| (c.name.clone(), n.name.clone())))
            .collect()
    }

    /// Starts (or restarts) the agent of a node, inside its namespace, logging to its log file.
    pub fn start_agent(&mut self, cluster: &str, node: &str) -> anyhow::Result<()> {
        let meshd = self.meshd.clone();
        let n = self.node_mut(cluster, node)?;
        if let Some(mut old) = n.agent.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        // A fresh socket per start, so a notification read later is this start's.
        let notify_path = n.config.with_file_name("notify.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
        notify.set_nonblocking(true)?;
        n.notify = Some(notify);
        let child = Command::new("nsenter")
            .env("NOTIFY_SOCKET", &notify_path)
            .arg(format!("--net={}", n.netns.display()))
            .arg("--")
            .arg(&meshd)
            .args(["--log-level", "info,meshd=debug", "agent", "--config"])
            .arg(&n.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning meshd agent")?;
        n.agent = Some(child);
        let socket = n.socket.clone();
        let log = n.log.clone();
        let meshd = self.meshd.clone();
        wait_for(
            &format!("agent of {cluster}/{node} answering"),
            Duration::from_secs(30),
            || {
                run(Command::new(&meshd)
                    .args(["status", "-o", "json", "--socket"])
                    .arg(&socket))
            },
        )
        .with_context(|| format!("agent log:\n{}", tail(&log, 40)))?;
        Ok(())
    }

    /// The agent's `/metrics` text, fetched from inside its node's namespace (the mesh must
    /// have been started with `metrics_port`).
    pub fn metrics(&self, cluster: &str, node: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let port = self
            .metrics_port
            .context("the mesh was started without metrics_port")?;
        let n = self.node(cluster, node)?;
        let mut tcp = crate::netns_io::connect(
            &n.netns,
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        tcp.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no end of HTTP headers")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        anyhow::ensure!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        Ok(body.to_owned())
    }

    /// Process id of a node's running agent.
    /// The readiness notifications (systemd's sd_notify protocol) the node's agent sent since
    /// it was last started, one message per entry.
    pub fn notifications(&self, cluster: &str, node: &str) -> anyhow::Result<Vec<String>> {
        let n = self.node(cluster, node)?;
        let mut out = Vec::new();
        if let Some(socket) = &n.notify {
            let mut buf = [0u8; 1024];
            while let Ok(len) = socket.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        }
        Ok(out)
    }

    /// Rewrites a node's `remote_source` (`direct` or `cache`) and restarts its agent.
    pub fn set_remote_source(
        &mut self,
        cluster: &str,
        node: &str,
        source: &str,
    ) -> anyhow::Result<()> {
        let config = self.node(cluster, node)?.config.clone();
        let text = fs::read_to_string(&config)?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("remote_source:"))
            .collect();
        fs::write(
            &config,
            format!("{}\nremote_source: {source}\n", kept.join("\n")),
        )?;
        self.start_agent(cluster, node)
    }

    /// Resident memory of a node's running agent.
    pub fn agent_rss_bytes(&self, cluster: &str, node: &str) -> anyhow::Result<u64> {
        rss_bytes(self.agent_pid(cluster, node).context("no agent running")?)
    }

    /// Resident memory of a cluster's running mirror.
    pub fn mirror_rss_bytes(&self, cluster: &str) -> anyhow::Result<u64> {
        let pid = self.cluster(cluster)?.mirror.as_ref().map(|c| c.id());
        rss_bytes(pid.context("no mirror running")?)
    }

    /// A node's agent's resident memory by kind, from `/proc/PID/status`: (anonymous (the
    /// heap, stacks), file-backed (the binary's pages touched so far), shared memory), bytes.
    pub fn agent_rss_parts(&self, cluster: &str, node: &str) -> anyhow::Result<(u64, u64, u64)> {
        let pid = self.agent_pid(cluster, node).context("no agent running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| name.to_owned())?;
            Ok(kb * 1024)
        };
        Ok((field("RssAnon:")?, field("RssFile:")?, field("RssShmem:")?))
    }

    /// The pid of a cluster's running mirror.
    pub fn mirror_pid(&self, cluster: &str) -> Option<u32> {
        self.cluster(cluster).ok()?.mirror.as_ref().map(|c| c.id())
    }

    pub fn agent_pid(&self, cluster: &str, node: &str) -> Option<u32> {
        self.node(cluster, node)
            .ok()?
            .agent
            .as_ref()
            .map(|c| c.id())
    }

    /// SIGKILL: the agent dies without a word; its lease runs out on its own.
    pub fn kill_agent(&mut self, cluster: &str, node: &str) -> anyhow::Result<()> {
        let n = self.node_mut(cluster, node)?;
        if let Some(mut child) = n.agent.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait for the agent to exit.
    pub fn stop_agent(&mut self, cluster: &str, node: &str) -> anyhow::Result<()> {
        let n = self.node_mut(cluster, node)?;
        if let Some(mut child) = n.agent.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// Runs `meshd ARGS --socket <node's socket>`.
    pub fn meshd(&self, cluster: &str, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let n = self.node(cluster, node)?;
        run(Command::new(&self.meshd)
            .args(args)
            .arg("--socket")
            .arg(&n.socket))
    }

    /// Starts `meshd ARGS --socket <node's socket>`, a command that streams lines (`monitor`,
    /// `observe`); killed when the returned value drops.
    pub fn meshd_stream(
        &self,
        cluster: &str,
        node: &str,
        args: &[&str],
    ) -> anyhow::Result<LineStream> {
        let n = self.node(cluster, node)?;
        LineStream::spawn(
            Command::new(&self.meshd)
                .args(args)
                .arg("--socket")
                .arg(&n.socket),
        )
    }

    pub fn status(&self, cluster: &str, node: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.meshd(
            cluster,
            node,
            &["status", "-o", "json"],
        )?)?)
    }

    /// The status of `of` as seen by a node.
    pub fn cluster_status(
        &self,
        cluster: &str,
        node: &str,
        of: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let s = self.status(cluster, node)?;
        s["clusters"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == of))
            .cloned()
            .with_context(|| format!("{cluster}/{node} does not list cluster {of}: {s}"))
    }

    /// Checks that every node's uplink runs strict reverse-path filtering (rp_filter = 1 for
    /// `all` and `ul0`, as [`MeshOptions::external`] sets it), so a test's pass cannot come
    /// from a loose setting.
    pub fn check_strict_rp_filter(&self) -> anyhow::Result<()> {
        for node in self.clusters.iter().flat_map(|c| &c.nodes) {
            for key in ["all", "ul0"] {
                let path = format!("/proc/sys/net/ipv4/conf/{key}/rp_filter");
                let value = run(Command::new("nsenter")
                    .arg(format!("--net={}", node.netns.display()))
                    .args(["--", "cat", &path]))?;
                anyhow::ensure!(
                    value.trim() == "1",
                    "{}/{}: {path} = {value:?}",
                    node.cluster,
                    node.name
                );
            }
        }
        Ok(())
    }

    /// What explains a stalled transfer over a narrow router link, for its failure message: the
    /// node's datapath counters, the sender's route to `dst` (a learned path MTU or not), the
    /// router's ICMP and fragmentation counters, and the agents' logs.
    pub fn frag_needed_diagnostics(
        &self,
        cluster: &str,
        node: &str,
        from: &Path,
        dst: Ipv4Addr,
    ) -> String {
        let counters = self
            .status(cluster, node)
            .map(|s| s["datapath"]["counters"].to_string())
            .unwrap_or_else(|e| format!("{e:#}"));
        let route = crate::netns_io::route_get(from, dst).unwrap_or_else(|e| format!("{e:#}"));
        let router = self
            .external
            .as_ref()
            .map(|ext| {
                ext.router
                    .output("nstat", &["-az", "IcmpOutDestUnreachs", "IpFragFails"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_else(|e| format!("{e:#}"))
            })
            .unwrap_or_default();
        format!(
            "counters: {counters}\nroute: {route}\nrouter: {router}\n{}",
            self.logs()
        )
    }

    pub fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        for (c, n) in self.node_names() {
            wait_for(
                &format!("{c}/{n} sees every cluster ready"),
                timeout,
                || {
                    let s = self.status(&c, &n)?;
                    let clusters = s["clusters"].as_array().cloned().unwrap_or_default();
                    if clusters.len() != self.clusters.len() {
                        bail!("{c}/{n} lists {} clusters: {s}", clusters.len());
                    }
                    for cl in clusters {
                        if cl["state"] != "ready" {
                            bail!("{c}/{n}: cluster {} is {}: {cl}", cl["name"], cl["state"]);
                        }
                    }
                    Ok(())
                },
            )
            .with_context(|| format!("agent log:\n{}", self.log_tail(&c, &n, 30)))?;
        }
        Ok(())
    }

    pub fn log_tail(&self, cluster: &str, node: &str, lines: usize) -> String {
        self.node(cluster, node)
            .map(|n| tail(&n.log, lines))
            .unwrap_or_default()
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        let mirrors = self.clusters.iter().filter_map(|c| {
            let log = self.dir.path().join(format!("mirror-{}.log", c.name));
            log.is_file()
                .then(|| format!("--- mirror of {} ---\n{}", c.name, tail(&log, 25)))
        });
        self.node_names()
            .iter()
            .map(|(c, n)| format!("--- {c}/{n} ---\n{}", self.log_tail(c, n, 25)))
            .chain(mirrors)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stores the policy documents of `text` (meshd's, Cilium's or Kubernetes' kind) in
    /// `cluster`'s etcd as its apiserver does: parsed and rewritten into meshd's policy by the
    /// manifest crate, then written under the policy's key.
    pub fn apply_policy(&self, cluster: &str, text: &str) -> anyhow::Result<()> {
        for d in meshd_manifest::parse_str("policy.yaml", text)? {
            let meshd_manifest::Document::NetworkPolicy(p) = &d.document else {
                anyhow::bail!("{:?} is not a policy", d.document.kind());
            };
            let key = format!(
                "meshd/config/policies/v1/{}/{}",
                p.metadata.namespace, p.metadata.name
            );
            let json = String::from_utf8(d.document.to_json())?;
            self.cluster(cluster)?.etcd.etcdctl(&["put", &key, &json])?;
        }
        Ok(())
    }

    /// Packets a node's datapath counted under `reason_name` (both directions), as `meshd
    /// status` shows them.
    pub fn counted(&self, cluster: &str, node: &str, reason_name: &str) -> anyhow::Result<u64> {
        let status = self.status(cluster, node)?;
        Ok(status["datapath"]["counters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|c| c["reason_name"] == reason_name)
            .filter_map(|c| c["packets"].as_u64())
            .sum())
    }

    /// Writes a service record into `cluster`'s etcd as its apiserver publishes one (the
    /// e2e mesh runs no apiserver).
    pub fn publish_service(
        &self,
        cluster: &str,
        record: &meshd_state::ServiceRecord,
    ) -> anyhow::Result<()> {
        let key = meshd_state::ServiceKey {
            cluster: meshd_state::ClusterName::new(cluster)?,
            namespace: record.namespace.clone(),
            name: record.name.clone(),
        };
        let value = meshd_state::encode(&key, record)?;
        self.cluster(cluster)?
            .etcd
            .etcdctl(&["put", &key.to_string(), std::str::from_utf8(&value)?])
            .with_context(|| format!("publishing service {key}"))?;
        Ok(())
    }

    /// `meshd endpoint add NAME --labels ... ` on a node.
    pub fn add_endpoint(
        &self,
        cluster: &str,
        node: &str,
        name: &str,
        labels: &str,
    ) -> anyhow::Result<EndpointInfo> {
        let out = self.meshd(
            cluster,
            node,
            &["endpoint", "add", name, "--labels", labels, "-o", "json"],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(EndpointInfo {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            name: name.to_owned(),
            ip: v["ip"]
                .as_str()
                .context("no ip")?
                .parse()
                .with_context(|| format!("ip in {v}"))?,
            identity: v["identity"].as_u64().context("no identity")? as u32,
            netns: PathBuf::from(v["netns"].as_str().context("no netns")?),
        })
    }

    pub fn delete_endpoint(&self, ep: &EndpointInfo) -> anyhow::Result<()> {
        self.meshd(&ep.cluster, &ep.node, &["endpoint", "del", &ep.name])?;
        Ok(())
    }

    /// The source of truth for the maps: the union of every cluster's ipcache records in its
    /// etcd, prefix -> (identity, host node IP), read as each cluster's admin.
    pub fn etcd_ipcache(&self) -> anyhow::Result<BTreeMap<Ipv4Net, (u32, Ipv4Addr)>> {
        let mut all = BTreeMap::new();
        for c in &self.clusters {
            let out = c
                .etcd
                .etcdctl(&["get", "--prefix", "meshd/state/ip/v1/"])
                .with_context(|| format!("reading the ipcache of {}", c.name))?;
            // etcdctl prints key and value on alternate lines; values are one-line JSON.
            let lines: Vec<&str> = out.lines().collect();
            for pair in lines.chunks(2) {
                let [key, value] = pair else {
                    bail!("odd etcdctl output from {}: {out}", c.name);
                };
                let (_, entry) =
                    meshd_state::decode::<meshd_state::IpcacheEntry>(key, value.as_bytes())?;
                let (ipnet::IpNet::V4(prefix), IpAddr::V4(host)) = (entry.prefix, entry.host_ip)
                else {
                    bail!("{key}: not IPv4: {value}");
                };
                all.insert(prefix, (entry.identity.get(), host));
            }
        }
        Ok(all)
    }

    /// A node's ipcache map entries of endpoints: the prefixes inside a pod CIDR of the mesh,
    /// prefix -> (identity, tunnel endpoint).
    pub fn map_endpoints(
        &self,
        cluster: &str,
        node: &str,
    ) -> anyhow::Result<BTreeMap<Ipv4Net, (u32, Option<Ipv4Addr>)>> {
        let pod_cidrs: Vec<Ipv4Net> = self
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().map(|n| n.pod_cidr))
            .collect();
        let n = self.node(cluster, node)?;
        let maps = meshd_datapath::DatapathMaps::open(&n.pin_dir)?;
        let mut out = BTreeMap::new();
        for prefix in maps.ipcache_prefixes()? {
            if !pod_cidrs.iter().any(|p| p.contains(&prefix)) {
                continue;
            }
            if let Some(e) = maps.ipcache_entry(prefix)? {
                let tunnel = match e.tunnel_endpoint {
                    Some(std::net::IpAddr::V4(ip)) => Some(ip),
                    _ => None,
                };
                out.insert(prefix, (e.identity.get(), tunnel));
            }
        }
        Ok(out)
    }

    /// Checks every node's map against the etcd contents once: each node holds exactly the
    /// endpoints of every cluster's etcd, with their identity, tunnelled to their node unless
    /// they are its own. The error lists every difference, node by node.
    pub fn check_maps_match_etcd(&self) -> anyhow::Result<()> {
        let truth = self.etcd_ipcache()?;
        let mut problems = Vec::new();
        for (c, n) in self.node_names() {
            let here = self.node(&c, &n)?.ip;
            let want: BTreeMap<Ipv4Net, (u32, Option<Ipv4Addr>)> = truth
                .iter()
                .map(|(p, (id, host))| (*p, (*id, (*host != here).then_some(*host))))
                .collect();
            let got = self.map_endpoints(&c, &n)?;
            for (p, w) in &want {
                match got.get(p) {
                    Some(g) if g == w => {}
                    other => problems.push(format!("{c}/{n}: {p} is {other:?}, etcd says {w:?}")),
                }
            }
            for (p, g) in &got {
                if !want.contains_key(p) {
                    problems.push(format!("{c}/{n}: {p} = {g:?} is in no etcd"));
                }
            }
        }
        if !problems.is_empty() {
            bail!(
                "{} differences between the maps and etcd ({} records):\n{}",
                problems.len(),
                truth.len(),
                problems.join("\n")
            );
        }
        Ok(())
    }

    /// Waits until every node's map matches the etcd contents ([`Mesh::check_maps_match_etcd`]).
    pub fn wait_maps_match_etcd(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("every node's maps equal to etcd", timeout, || {
            self.check_maps_match_etcd()
        })
        .map_err(|e| e.context(self.logs()))
    }

    /// The members of `of`'s etcd that a node's agent holds established connections to (read
    /// with `ss` in the node's namespace: each member has its own relay port).
    pub fn etcd_members_in_use(
        &self,
        cluster: &str,
        node: &str,
        of: &str,
    ) -> anyhow::Result<Vec<usize>> {
        let n = self.node(cluster, node)?;
        let o = self.cluster(of)?;
        let out = run(Command::new("nsenter")
            .arg(format!("--net={}", n.netns.display()))
            .args(["--", "ss", "-Htn", "state", "established"]))?;
        let mut members = Vec::new();
        for line in out.lines() {
            // Recv-Q Send-Q Local:Port Peer:Port
            let Some(peer) = line.split_whitespace().nth(3) else {
                continue;
            };
            let Ok(peer) = peer.parse::<SocketAddr>() else {
                continue;
            };
            if let Some(m) = o.proxies.iter().position(|p| p.addr() == peer) {
                members.push(m);
            }
        }
        members.sort_unstable();
        members.dedup();
        Ok(members)
    }

    /// The ipcache map entry of exactly `ip/32` on a node (read from its pinned maps).
    pub fn ipcache_entry(
        &self,
        cluster: &str,
        node: &str,
        ip: Ipv4Addr,
    ) -> anyhow::Result<Option<meshd_datapath::IpcacheTarget>> {
        let n = self.node(cluster, node)?;
        let maps = meshd_datapath::DatapathMaps::open(&n.pin_dir)?;
        Ok(maps.ipcache_entry(Ipv4Net::from(ip))?)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for c in &mut self.clusters {
            if let Some(mut child) = c.mirror.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            for n in &mut c.nodes {
                if let Some(mut child) = n.agent.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        // Endpoint namespaces the agents made.
        let ep_prefix = format!("{}-ep-", self.prefix);
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&ep_prefix) {
                    let _ = meshd_topology::netns::delete(&name);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.bpffs_root);
    }
}

/// VmRSS of a process.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

/// Pings `to` once from inside `netns` (ICMP echo, 1 s timeout).
/// The flags that reach a cluster's etcd as its admin (`meshd etcd ...`, `meshd clustermesh
/// connect|disconnect`).
fn admin_args(endpoint: &str, admin: &meshd_certs::TlsFiles) -> Vec<String> {
    vec![
        "--endpoints".into(),
        endpoint.to_owned(),
        "--ca".into(),
        admin.ca.display().to_string(),
        "--cert".into(),
        admin.cert.display().to_string(),
        "--key".into(),
        admin.key.display().to_string(),
    ]
}

pub fn ping(netns: &Path, to: Ipv4Addr) -> anyhow::Result<()> {
    crate::netns_io::icmp_ping(netns, to, Duration::from_secs(1))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running meshd command's output, line by line as it comes (see [`Mesh::meshd_stream`]).
pub struct LineStream {
    child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl LineStream {
    /// Starts `cmd` (stdout read line by line, stderr dropped).
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<LineStream> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(LineStream { child, lines })
    }

    /// Stops the command; the lines it printed and nobody received yet.
    pub fn finish(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader ends at the pipe's end, once the command is gone.
        self.lines.iter().collect()
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
