//! What a running lab is made of, recorded in `<run dir>/lab.json` as it is created.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "lab.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabState {
    pub run_dir: PathBuf,
    /// bpffs directory holding every node's pinned maps and links.
    pub bpffs_dir: PathBuf,
    /// CLI config file holding the lab's contexts.
    pub cli_config: PathBuf,
    /// Network namespaces, in creation order.
    pub netns: Vec<String>,
    /// Links created in the host namespace.
    pub host_links: Vec<String>,
    pub processes: Vec<LabProcess>,
    pub clusters: Vec<LabCluster>,
    pub endpoints: Vec<LabEndpoint>,
    /// Whether the agents masquerade world-bound traffic (labs before this field: true).
    #[serde(default = "masquerade_default")]
    pub masquerade: bool,
    /// The external host outside the mesh (absent in labs made before it existed).
    #[serde(default)]
    pub external: Option<LabExternal>,
    /// The clusters' routing mode (labs before this field: tunnel).
    #[serde(default)]
    pub routing: meshd_state::RoutingMode,
    /// The lab's Prometheus, scraping every agent and apiserver; `None` when it runs none
    /// (`prometheus_absent` says why).
    #[serde(default)]
    pub prometheus: Option<LabPrometheus>,
    /// Why the lab runs no Prometheus (no `prometheus` binary installed, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_absent: Option<String>,
    /// The lab's trace collector, receiving every agent's and apiserver's spans; `None` when
    /// it runs none (`otlp_absent` says why; labs before this field: none).
    #[serde(default)]
    pub otlp: Option<LabOtlp>,
    /// Why the lab runs no trace collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_absent: Option<String>,
    /// Every cluster runs a mirror (`--kvstoremesh`) and its agents read remote clusters from
    /// it (labs before this field: no).
    #[serde(default)]
    pub kvstoremesh: bool,
    /// The agents' `service_lb_mode`: `snat`, `dsr` or `hybrid` (labs before this field: snat).
    #[serde(default = "service_lb_mode_default")]
    pub service_lb_mode: String,
}

fn service_lb_mode_default() -> String {
    "snat".into()
}

/// The lab's Prometheus server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabPrometheus {
    /// Base URL of its web UI and HTTP API (`/api/v1/...`), reachable from the host.
    pub url: String,
    /// Its process (0 in the docker lab, where `container` names it).
    pub pid: u32,
    pub config: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// The lab's trace collector (`meshd-otlp-collector`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabOtlp {
    /// Where exporters send spans (OTLP/gRPC), `http://IP:PORT`.
    pub endpoint: String,
    /// Base URL of its HTTP API (`/api/spans`), reachable from the host.
    pub api: String,
    /// Its process (0 in the docker lab, where `container` names it).
    pub pid: u32,
    /// The spans as JSON lines (the docker lab: `docker logs` of the container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spans: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

fn masquerade_default() -> bool {
    true
}

/// The host outside the mesh, behind the underlay router, running the HTTP echo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabExternal {
    pub netns: String,
    pub ip: String,
    pub port: u16,
    pub router_netns: String,
    pub router_ip: String,
    /// Docker lab: the external host's and the router's containers (`netns` and `router_netns`
    /// are then [`CONTAINER_NETNS`]); `None` in the namespace lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_container: Option<String>,
}

/// The network namespace of a docker lab container itself (its first process's), as the lab's
/// records name it: commands for it run with `docker exec` alone.
pub const CONTAINER_NETNS: &str = "/proc/1/ns/net";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabProcess {
    pub pid: u32,
    /// `etcd`, `apiserver`, `agent` or `workload`.
    pub role: String,
    pub cluster: String,
    /// Node or endpoint name, empty for cluster-wide processes.
    pub name: String,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabCluster {
    pub name: String,
    pub id: u8,
    pub context: String,
    pub etcd: LabEtcd,
    /// The cluster's admin certificate (admin-<cluster>): its apiserver, the CLI, operators.
    #[serde(default)]
    pub admin: TlsPaths,
    pub apiserver: String,
    /// URL of the apiserver's Prometheus metrics, reachable from the host (labs before: none).
    #[serde(default)]
    pub apiserver_metrics: Option<String>,
    pub nodes: Vec<LabNode>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabEtcd {
    /// Client URL of every member, in member order.
    pub endpoints: Vec<String>,
    /// Namespace the endpoints are reachable from (also reachable from the host namespace).
    pub netns: String,
    /// Process id of the first member (of every member: `members`).
    pub pid: u32,
    /// Every member of the cluster's etcd (one unless `lab up --etcd-members N`).
    #[serde(default)]
    pub members: Vec<LabEtcdMember>,
    /// The cluster's read-only `remote` certificate (remote-<cluster>): what its agents read
    /// the other clusters with.
    pub remote: TlsPaths,
    /// The cluster's admin certificate (also `LabCluster::admin`).
    pub admin: TlsPaths,
}

/// One member of a cluster's etcd.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabEtcdMember {
    /// etcd's `--name` (the cluster's name, with `-<m>` after it beyond the first member).
    pub name: String,
    pub endpoint: String,
    pub peer_url: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub agent_pid: u32,
    pub api_socket: PathBuf,
    /// URL of the agent's Prometheus metrics, reachable from the host (labs before: none).
    #[serde(default)]
    pub metrics: Option<String>,
    /// The credentials the node's agent uses for its own cluster's etcd (node-<cluster>-<node>).
    #[serde(default)]
    pub etcd: TlsPaths,
    /// Docker lab: the node's container (`netns` is then [`CONTAINER_NETNS`]); `None` in the
    /// namespace lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabEndpoint {
    pub name: String,
    pub namespace: String,
    pub cluster: String,
    pub node: String,
    /// Name of the endpoint's network namespace (usable with `ip netns exec`).
    pub netns: String,
    pub ip: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Docker lab: the node container the endpoint lives in (commands run through
    /// `docker exec`); `None` in the namespace lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl LabState {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(STATE_FILE)
    }

    pub fn load(run_dir: &Path) -> anyhow::Result<Option<LabState>> {
        let path = Self::path(run_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{}: not a lab state file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written after every step, atomically, so a crash mid-way leaves a usable record.
    pub fn save(&self) -> anyhow::Result<()> {
        let path = Self::path(&self.run_dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
    }

    pub fn cluster(&self, name: &str) -> Option<&LabCluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    pub fn endpoint(&self, cluster: &str, name: &str) -> Option<&LabEndpoint> {
        self.endpoints
            .iter()
            .find(|e| e.cluster == cluster && e.name == name)
    }
}
