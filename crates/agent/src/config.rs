//! `meshd agent` configuration: a YAML or JSON file, overridden field by field by flags, checked
//! in one place. Every problem is collected and reported together (exit code 64), each naming
//! its field, so a broken config is fixed in one round.
//!
//! ```yaml
//! cluster: c1
//! cluster_id: 1
//! node: n1
//! node_ip: 192.168.60.1
//! pod_cidr: 10.1.1.0/24
//! etcd:
//!   endpoints: [https://192.168.60.100:2379]
//!   ca: /etc/meshd/c1/ca.pem
//!   cert: /etc/meshd/c1/n1/node.pem           # node-c1-n1: `meshd certs issue node`
//!   key: /etc/meshd/c1/n1/node-key.pem
//! remote_clusters_dir: /etc/meshd/clusters   # one file per remote cluster; watched, changes apply at once
//! remote_source: cache                        # or direct; absent: cache when the cluster config says a cache runs
//! remote_entry_limit: 600000                  # keys held per remote cluster at most (see below); 0 = no limit
//! bpffs_dir: /sys/fs/bpf/meshd                # pins under <bpffs_dir>/<cluster>/<node>
//! tunnel_port: 8472
//! tunnel_encap: device                        # or program: VXLAN written by the eBPF programs (tunnel mode)
//! underlay_device: eth0                       # its MTU is used unless underlay_mtu is set
//! underlay_mtu: 1500
//! api_socket: /run/meshd/agent.sock
//! state_dir: /var/lib/meshd/n1                # endpoints and IP allocations
//! lease_ttl_secs: 15
//! startup_sync_timeout_secs: 30               # see below
//! resync_interval_secs: 300                   # the maps' safety-net full diff
//! event_moderation_us: 3000                   # under churn, gather events into fewer wake-ups (moderation.rs); 0 = off
//! cert_expiry_warning_days: 30                # status warns of certificates expiring sooner
//! metrics_addr: 0.0.0.0:9962                   # Prometheus /metrics; off when absent
//! flow_events: true                           # new connections reported to `meshd observe`
//! flow_event_rate: 1000                       # datapath events (flows + drops) per second per CPU; 0 = no limit
//! flow_history: 4096                          # flows kept for `meshd observe --since`
//! masquerade: true                            # leaving the mesh: see egress.rs
//! non_masquerade_cidrs: []
//! snat_port_range: 61000-65535
//! routing_mode: tunnel                        # or native: see routing.rs
//! native_routing_cidr: 10.0.0.0/8             # native mode: required, covers pod_cidr
//! auto_direct_node_routes: false              # native mode: routes to nodes on the segment
//! service_lb_mode: snat                       # or dsr / hybrid (native mode only): see routing.rs
//! ```
//!
//! At start the agent leaves its maps as they are until every cluster configured then has
//! synced (its canaries seen), so a restart never withdraws entries it has not re-read yet; an
//! unreachable cluster holds that up for at most `startup_sync_timeout_secs`.
//!
//! A remote cluster is written by its own admins, so what it publishes is bounded here: at most
//! `remote_entry_limit` keys of it are held (nodes, ipcache, identities, services, canaries and
//! cluster configs together; default [`meshd_kvstore::DEFAULT_ENTRY_LIMIT`], the scale goal's
//! whole mesh in one cluster). New keys past it are refused, counted and the cluster shown
//! `degraded`, never stored; values over [`meshd_kvstore::MAX_VALUE_BYTES`] are refused unread.
//! Every remote cluster's keys together are also bounded by the room the maps have for them
//! ([`crate::watcher::remote_room`], shared out by [`meshd_kvstore::EntryRoom`]: a share each,
//! the other half to whoever needs it first), so that several clusters at their limits cannot
//! overflow the maps; `remote_entry_limit: 0` turns both off.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use ipnet::Ipv4Net;
use meshd_certs::TlsFiles;
use meshd_datapath::TunnelEncap;
use meshd_state::{ClusterId, ClusterName};
use serde::Deserialize;

use super::egress::{self, EgressSettings};
use super::routing::{self, RoutingSettings};

/// Flags of `meshd agent`; each overrides the same field of the file.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// Configuration file (YAML or JSON).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Name of this node's cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Id of this node's cluster (1-255, unique in the mesh).
    #[arg(long)]
    pub cluster_id: Option<u32>,
    /// Name of this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Underlay IPv4 address of this node (the tunnel endpoint of its endpoints).
    #[arg(long)]
    pub node_ip: Option<String>,
    /// IPv4 prefix endpoints of this node get their addresses from.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// Local etcd client URLs, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// CA of the local etcd.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for the local etcd.
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// Directory with one file per remote cluster (file name = cluster name).
    #[arg(long, value_name = "DIR")]
    pub remote_clusters_dir: Option<PathBuf>,
    /// Where remote clusters are read: `direct` (each remote etcd, with the files of
    /// --remote-clusters-dir) or `cache` (the local etcd's copy that the cluster's
    /// `clustermesh-apiserver --kvstoremesh` keeps) [default: cache when the cluster config
    /// announces a cache, else direct].
    #[arg(long, value_name = "SOURCE")]
    pub remote_source: Option<String>,
    /// bpffs directory; the node's pins go under <dir>/<cluster>/<node>.
    #[arg(long, value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,
    /// VXLAN UDP port.
    #[arg(long)]
    pub tunnel_port: Option<u16>,
    /// Tunnel mode: who writes and takes off the VXLAN headers, `device` (the node's VXLAN
    /// device) or `program` (the eBPF programs, straight to and from the uplink; same wire
    /// format) [default: device].
    #[arg(long, value_name = "MODE")]
    pub tunnel_encap: Option<String>,
    /// Underlay device (its MTU is read unless --underlay-mtu is given).
    #[arg(long)]
    pub underlay_device: Option<String>,
    /// Underlay MTU; endpoints get this minus 50 (VXLAN overhead).
    #[arg(long)]
    pub underlay_mtu: Option<u32>,
    /// Unix socket of the agent API.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Directory for the agent's own state (endpoints, IP allocations).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// TTL of the lease the node's records live under, in seconds.
    #[arg(long)]
    pub lease_ttl_secs: Option<u64>,
    /// How long, in seconds, the maps stay as they are at start while a configured cluster has
    /// not synced yet [default: 30].
    #[arg(long)]
    pub startup_sync_timeout_secs: Option<u64>,
    /// Period, in seconds, of the safety-net diff of the maps against the view [default: 300].
    #[arg(long)]
    pub resync_interval_secs: Option<u64>,
    /// Under churn, the runtime worker sleeps this many microseconds before it parks when it
    /// last woke less than that ago, so that one wake-up finds several events: less CPU per
    /// event, up to this much more latency per change while changes keep coming; 0 = off, at
    /// most 10000 [default: 3000].
    #[arg(long, value_name = "US")]
    pub event_moderation_us: Option<u64>,
    /// Prefix of endpoint network namespace names (default meshd-<cluster>-<node>-).
    #[arg(long)]
    pub endpoint_netns_prefix: Option<String>,
    /// `meshd status` and `clustermesh status` warn of certificates and CAs in use that expire
    /// within this many days [default: 30].
    #[arg(long)]
    pub cert_expiry_warning_days: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless set).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Report new connections (not only drops) to `meshd observe` [default: true].
    #[arg(long, value_name = "BOOL")]
    pub flow_events: Option<bool>,
    /// Events (new connections and drops) the datapath may send per second per CPU; the rest
    /// are counted as lost; 0 = no limit [default: 1000].
    #[arg(long, value_name = "N")]
    pub flow_event_rate: Option<u32>,
    /// Flows the agent keeps for `meshd observe --since` [default: 4096].
    #[arg(long, value_name = "N")]
    pub flow_history: Option<usize>,
    /// Keys of one remote cluster held at most; new ones past it are refused, counted and the
    /// cluster shown degraded; 0 = no limit [default: 600000].
    #[arg(long, value_name = "N")]
    pub remote_entry_limit: Option<u64>,
    /// Masquerade endpoints' traffic to destinations outside the mesh to the node IP
    /// [default: true].
    #[arg(long, value_name = "BOOL")]
    pub masquerade: Option<bool>,
    /// Destinations never masqueraded (IPv4 prefixes, comma separated).
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    pub non_masquerade_cidrs: Option<Vec<String>>,
    /// Ports masqueraded flows take, LOW-HIGH; must not overlap the node's ephemeral range
    /// [default: 61000-65535].
    #[arg(long, value_name = "LOW-HIGH")]
    pub snat_port_range: Option<String>,
    /// How endpoint traffic crosses the underlay: `tunnel` (VXLAN) or `native` (routed, no
    /// encapsulation; the underlay must be trusted) [default: tunnel].
    #[arg(long, value_name = "MODE")]
    pub routing_mode: Option<String>,
    /// Native mode: the prefix the underlay routes without masquerade (must cover the pod
    /// CIDR).
    #[arg(long, value_name = "CIDR")]
    pub native_routing_cidr: Option<String>,
    /// Native mode: route every other node's pod CIDR to its node IP where that node is on
    /// the uplink's segment [default: false].
    #[arg(long, value_name = "BOOL")]
    pub auto_direct_node_routes: Option<bool>,
    /// How NodePort / external IP connections reach a backend on another node: `snat` (via
    /// this node), `dsr` (direct server return: the backend's node answers the client; native
    /// routing only) or `hybrid` (DSR for TCP, SNAT for UDP) [default: snat].
    #[arg(long, value_name = "MODE")]
    pub service_lb_mode: Option<String>,
}

/// The file, as written. Every field optional here: what is missing is reported by `resolve`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub cluster: Option<String>,
    pub cluster_id: Option<u32>,
    pub node: Option<String>,
    pub node_ip: Option<String>,
    pub pod_cidr: Option<String>,
    #[serde(default)]
    pub etcd: EtcdSection,
    pub remote_clusters_dir: Option<PathBuf>,
    pub remote_source: Option<String>,
    pub bpffs_dir: Option<PathBuf>,
    pub tunnel_port: Option<u16>,
    pub tunnel_encap: Option<String>,
    pub underlay_device: Option<String>,
    pub underlay_mtu: Option<u32>,
    pub api_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub lease_ttl_secs: Option<u64>,
    pub startup_sync_timeout_secs: Option<u64>,
    pub resync_interval_secs: Option<u64>,
    pub event_moderation_us: Option<u64>,
    pub endpoint_netns_prefix: Option<String>,
    pub cert_expiry_warning_days: Option<u32>,
    pub metrics_addr: Option<String>,
    pub flow_events: Option<bool>,
    pub flow_event_rate: Option<u32>,
    pub flow_history: Option<usize>,
    pub remote_entry_limit: Option<u64>,
    pub masquerade: Option<bool>,
    pub non_masquerade_cidrs: Option<Vec<String>>,
    pub snat_port_range: Option<String>,
    pub routing_mode: Option<String>,
    pub native_routing_cidr: Option<String>,
    pub auto_direct_node_routes: Option<bool>,
    pub service_lb_mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    pub endpoints: Option<Vec<String>>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    pub etcd_endpoints: Vec<String>,
    /// None only for plaintext `http://` endpoints (development).
    pub etcd_tls: Option<TlsFiles>,
    pub remote_clusters_dir: Option<PathBuf>,
    /// None: decided at start by the cluster config (`kvstoremesh`).
    pub remote_source: Option<RemoteSource>,
    pub bpffs_dir: PathBuf,
    pub tunnel_port: u16,
    /// Tunnel mode: VXLAN by the device or by the programs (always the device's in native
    /// routing, which has no tunnel).
    pub tunnel_encap: TunnelEncap,
    pub underlay_device: Option<String>,
    /// None: read from `underlay_device` at start.
    pub underlay_mtu: Option<u32>,
    pub api_socket: PathBuf,
    pub state_dir: PathBuf,
    pub lease_ttl: Duration,
    /// Longest wait at start for every configured cluster to sync before the maps are driven.
    pub startup_sync_timeout: Duration,
    /// Period of the reconciler's safety-net full diff.
    pub resync_interval: Duration,
    /// The runtime worker's nap under churn (`crate::moderation`); zero: off.
    pub event_moderation: Duration,
    /// Endpoint `NAME` lives in network namespace `<prefix><NAME>`.
    pub endpoint_netns_prefix: String,
    /// Status warns of certificates expiring within this many days.
    pub cert_expiry_warning_days: u32,
    /// Where `/metrics` is served; None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Datapath events: whether new connections are reported, and the per-CPU rate limit.
    pub flow_events: bool,
    pub flow_event_rate: u32,
    /// Flows kept in memory for `meshd observe --since`.
    pub flow_history: usize,
    /// Keys held per remote cluster at most (None: no limit).
    pub remote_entry_limit: Option<u64>,
    /// Leaving the mesh: masquerade and its exceptions.
    pub egress: EgressSettings,
    /// Tunnel or native routing.
    pub routing: RoutingSettings,
}

/// Where an agent reads remote clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteSource {
    /// Each remote cluster's etcd, over mTLS, with the files of `remote_clusters_dir`.
    Direct,
    /// The local etcd's cache of every remote cluster (`meshd/cache/<cluster>/`), kept by the
    /// cluster's mirror: one watch per remote on the local etcd, no remote credentials on nodes.
    Cache,
}

impl std::str::FromStr for RemoteSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Self::Direct),
            "cache" => Ok(Self::Cache),
            other => Err(format!("{other:?}: expected direct or cache")),
        }
    }
}

impl fmt::Display for RemoteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Cache => "cache",
        })
    }
}

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/meshd";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
pub const DEFAULT_LEASE_TTL_SECS: u64 = 15;
pub const DEFAULT_STARTUP_SYNC_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
pub const DEFAULT_RESYNC_INTERVAL_SECS: u64 = 300;
pub const DEFAULT_CERT_EXPIRY_WARNING_DAYS: u32 = 30;
/// 3 ms: under churn at 1,000 events/s on 500k entries, 44-53 us of CPU per event against
/// 80-89 without (2 ms: 54-60 us; 37.6-38.6 us on session 14's machine), the churn's changes
/// waiting up to the window; changes made one at a time: median 0.8-1.2 ms against 0.9-1.0
/// (BENCHMARKS.md, issue 11, sessions 13 and 14). A change after a quiet spell does not wait.
pub const DEFAULT_EVENT_MODERATION_US: u64 = 3_000;
/// 10 ms: past that the latency it adds would rival etcd's own.
pub const MAX_EVENT_MODERATION_US: u64 = 10_000;
/// Per CPU: a node handling well over a thousand new connections a second per CPU is reported
/// on a sample; the datapath stays within its budget and the loss is counted.
pub const DEFAULT_FLOW_EVENT_RATE: u32 = 1000;
pub const DEFAULT_FLOW_HISTORY: usize = 4096;
const MAX_FLOW_HISTORY: usize = 1 << 20;

impl AgentConfig {
    /// Where this node's maps and links are pinned.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs_dir.join(self.cluster.as_str()).join(&self.node)
    }
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Every problem found, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub source_file: Option<PathBuf>,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source_file {
            Some(p) => writeln!(f, "invalid agent configuration ({}):", p.display())?,
            None => writeln!(f, "invalid agent configuration:")?,
        }
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Reads the file (if any), applies the flags and checks the result.
pub fn load(args: &AgentArgs) -> Result<AgentConfig, ConfigErrors> {
    let file = match &args.config {
        None => ConfigFile::default(),
        Some(path) => parse_file(path).map_err(|reason| ConfigErrors {
            source_file: Some(path.clone()),
            problems: vec![ConfigProblem {
                field: "config".into(),
                reason,
            }],
        })?,
    };
    resolve(file, args).map_err(|problems| ConfigErrors {
        source_file: args.config.clone(),
        problems,
    })
}

fn parse_file(path: &Path) -> Result<ConfigFile, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_text(path, &text)
}

/// Parses the text of the config file at `path` (named in the error). Pure.
pub fn parse_text(path: &Path, text: &str) -> Result<ConfigFile, String> {
    // YAML is a superset of JSON: one parser reads both.
    serde_yaml::from_str(text).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Merges flags over the file and checks every field. Pure.
pub fn resolve(file: ConfigFile, args: &AgentArgs) -> Result<AgentConfig, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let mut problem = |field: &str, reason: String| {
        problems.push(ConfigProblem {
            field: field.to_owned(),
            reason,
        })
    };
    let missing = "required (in the file or as a flag)".to_string();

    let cluster = match args.cluster.clone().or(file.cluster) {
        None => {
            problem("cluster", missing.clone());
            None
        }
        Some(c) => ClusterName::new(c)
            .map_err(|e| problem("cluster", e.reason.clone()))
            .ok(),
    };
    let cluster_id = match args.cluster_id.or(file.cluster_id) {
        None => {
            problem("cluster_id", missing.clone());
            None
        }
        Some(id) => ClusterId::new(id)
            .map_err(|e| problem("cluster_id", e.reason.clone()))
            .ok(),
    };
    let node = match args.node.clone().or(file.node) {
        None => {
            problem("node", missing.clone());
            None
        }
        Some(n) => match meshd_state::check_dns_subdomain("node", &n) {
            Ok(()) if n.len() <= 40 => Some(n),
            // The node name is part of pin paths and endpoint namespace names.
            Ok(()) => {
                problem("node", format!("{n:?} is longer than 40 characters"));
                None
            }
            Err(e) => {
                problem("node", e.reason.clone());
                None
            }
        },
    };
    let node_ip = match args.node_ip.clone().or(file.node_ip) {
        None => {
            problem("node_ip", missing.clone());
            None
        }
        Some(s) => match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if !ip.is_unspecified() && !ip.is_loopback() => Some(ip),
            Ok(ip) => {
                problem(
                    "node_ip",
                    format!("{ip} is not a usable IPv4 underlay address (the datapath is IPv4)"),
                );
                None
            }
            Err(e) => {
                problem("node_ip", format!("{s:?} is not an IP address: {e}"));
                None
            }
        },
    };
    let pod_cidr = match args.pod_cidr.clone().or(file.pod_cidr) {
        None => {
            problem("pod_cidr", missing.clone());
            None
        }
        Some(s) => match s.parse::<Ipv4Net>() {
            Ok(net) if net.trunc() != net => {
                problem(
                    "pod_cidr",
                    format!("{net} has host bits set (expected {})", net.trunc()),
                );
                None
            }
            Ok(net) if net.prefix_len() > 30 => {
                problem("pod_cidr", format!("{net} is too small (at most /30)"));
                None
            }
            Ok(net) => Some(net),
            Err(e) => {
                problem("pod_cidr", format!("{s:?} is not an IPv4 prefix: {e}"));
                None
            }
        },
    };
    if let (Some(ip), Some(cidr)) = (node_ip, pod_cidr) {
        if cidr.contains(&ip) {
            problem(
                "pod_cidr",
                format!("{cidr} contains the node IP {ip}; endpoints and nodes must not overlap"),
            );
        }
    }

    let etcd_endpoints = args
        .etcd_endpoints
        .clone()
        .or(file.etcd.endpoints)
        .unwrap_or_default();
    if etcd_endpoints.is_empty() {
        problem("etcd.endpoints", missing.clone());
    }
    let mut https = false;
    for (i, ep) in etcd_endpoints.iter().enumerate() {
        if let Some(rest) = ep.strip_prefix("https://") {
            https = true;
            if rest.is_empty() {
                problem(
                    &format!("etcd.endpoints[{i}]"),
                    format!("{ep:?} has no host"),
                );
            }
        } else if !ep.starts_with("http://") {
            problem(
                &format!("etcd.endpoints[{i}]"),
                format!("{ep:?} must start with https:// (or http:// without TLS)"),
            );
        }
    }
    let ca = args.etcd_ca.clone().or(file.etcd.ca);
    let cert = args.etcd_cert.clone().or(file.etcd.cert);
    let key = args.etcd_key.clone().or(file.etcd.key);
    let etcd_tls = match (ca, cert, key) {
        (None, None, None) => {
            if https {
                problem(
                    "etcd.ca",
                    "https:// endpoints need etcd.ca, etcd.cert and etcd.key".into(),
                );
            }
            None
        }
        (ca, cert, key) => {
            let mut files = Vec::new();
            for (field, value) in [("etcd.ca", ca), ("etcd.cert", cert), ("etcd.key", key)] {
                match value {
                    None => problem(field, "required together with the other TLS files".into()),
                    Some(p) if !p.is_file() => {
                        problem(field, format!("{} is not a readable file", p.display()))
                    }
                    Some(p) => files.push(p),
                }
            }
            if files.len() == 3 {
                let key = files.pop().expect("three");
                let cert = files.pop().expect("three");
                let ca = files.pop().expect("three");
                if let (Some(cluster), Some(node)) = (&cluster, &node) {
                    if let Err(reason) = check_node_certificate(&cert, cluster, node) {
                        problem("etcd.cert", reason);
                    }
                }
                Some(TlsFiles::new(ca, cert, key))
            } else {
                None
            }
        }
    };

    let remote_clusters_dir = args
        .remote_clusters_dir
        .clone()
        .or(file.remote_clusters_dir);
    if let Some(dir) = &remote_clusters_dir {
        if dir.exists() && !dir.is_dir() {
            problem(
                "remote_clusters_dir",
                format!("{} is not a directory", dir.display()),
            );
        }
    }
    let remote_source = match args.remote_source.clone().or(file.remote_source) {
        None => None,
        Some(s) => match s.parse::<RemoteSource>() {
            Ok(v) => Some(v),
            Err(e) => {
                problem("remote_source", e);
                None
            }
        },
    };
    let bpffs_dir = args
        .bpffs_dir
        .clone()
        .or(file.bpffs_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR));
    if !bpffs_dir.is_absolute() {
        problem(
            "bpffs_dir",
            format!("{} must be an absolute path", bpffs_dir.display()),
        );
    }
    let tunnel_port = args
        .tunnel_port
        .or(file.tunnel_port)
        .unwrap_or(meshd_datapath::plumbing::DEFAULT_VXLAN_PORT);
    if tunnel_port == 0 {
        problem("tunnel_port", "must not be 0".into());
    }
    let tunnel_encap = match args
        .tunnel_encap
        .clone()
        .or(file.tunnel_encap)
        .as_deref()
        .map(str::parse::<TunnelEncap>)
    {
        None => TunnelEncap::default(),
        Some(Ok(encap)) => encap,
        Some(Err(e)) => {
            problem("tunnel_encap", e);
            TunnelEncap::default()
        }
    };
    let underlay_device = args.underlay_device.clone().or(file.underlay_device);
    if let Some(dev) = &underlay_device {
        if dev.is_empty() || dev.len() > 15 || dev.contains('/') {
            problem(
                "underlay_device",
                format!("{dev:?} is not an interface name"),
            );
        }
    }
    let underlay_mtu = args.underlay_mtu.or(file.underlay_mtu);
    if let Some(mtu) = underlay_mtu {
        if !(626..=65535).contains(&mtu) {
            problem(
                "underlay_mtu",
                format!(
                    "{mtu} out of range (626-65535: endpoints need at least 576 after VXLAN's 50)"
                ),
            );
        }
    }
    let underlay_mtu = match (underlay_mtu, &underlay_device) {
        (Some(mtu), _) => Some(mtu),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_UNDERLAY_MTU),
    };
    let api_socket = args
        .api_socket
        .clone()
        .or(file.api_socket)
        .unwrap_or_else(|| PathBuf::from(meshd_api::DEFAULT_SOCKET));
    let state_dir = args
        .state_dir
        .clone()
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let lease_ttl_secs = args
        .lease_ttl_secs
        .or(file.lease_ttl_secs)
        .unwrap_or(DEFAULT_LEASE_TTL_SECS);
    if !(2..=3600).contains(&lease_ttl_secs) {
        problem(
            "lease_ttl_secs",
            format!("{lease_ttl_secs} out of range (2-3600)"),
        );
    }

    let startup_sync_timeout_secs = args
        .startup_sync_timeout_secs
        .or(file.startup_sync_timeout_secs)
        .unwrap_or(DEFAULT_STARTUP_SYNC_TIMEOUT_SECS);
    if !(1..=3600).contains(&startup_sync_timeout_secs) {
        problem(
            "startup_sync_timeout_secs",
            format!("{startup_sync_timeout_secs} out of range (1-3600)"),
        );
    }

    let resync_interval_secs = args
        .resync_interval_secs
        .or(file.resync_interval_secs)
        .unwrap_or(DEFAULT_RESYNC_INTERVAL_SECS);
    if !(1..=86_400).contains(&resync_interval_secs) {
        problem(
            "resync_interval_secs",
            format!("{resync_interval_secs} out of range (1-86400)"),
        );
    }

    let event_moderation_us = args
        .event_moderation_us
        .or(file.event_moderation_us)
        .unwrap_or(DEFAULT_EVENT_MODERATION_US);
    if event_moderation_us > MAX_EVENT_MODERATION_US {
        problem(
            "event_moderation_us",
            format!("{event_moderation_us} out of range (0-{MAX_EVENT_MODERATION_US})"),
        );
    }

    let endpoint_netns_prefix = args
        .endpoint_netns_prefix
        .clone()
        .or(file.endpoint_netns_prefix);
    if let Some(p) = &endpoint_netns_prefix {
        if p.contains('/') || p.len() > 100 {
            problem(
                "endpoint_netns_prefix",
                format!("{p:?} must be at most 100 characters without '/'"),
            );
        }
    }

    let cert_expiry_warning_days = args
        .cert_expiry_warning_days
        .or(file.cert_expiry_warning_days)
        .unwrap_or(DEFAULT_CERT_EXPIRY_WARNING_DAYS);
    if cert_expiry_warning_days > 3650 {
        problem(
            "cert_expiry_warning_days",
            format!("{cert_expiry_warning_days} out of range (0-3650)"),
        );
    }

    let metrics_addr = match args.metrics_addr.clone().or(file.metrics_addr) {
        None => None,
        Some(a) => match a.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problem(
                    "metrics_addr",
                    format!("{a:?} is not an IP:PORT address: {e}"),
                );
                None
            }
        },
    };

    let flow_events = args.flow_events.or(file.flow_events).unwrap_or(true);
    let flow_event_rate = args
        .flow_event_rate
        .or(file.flow_event_rate)
        .unwrap_or(DEFAULT_FLOW_EVENT_RATE);
    let remote_entry_limit = match args
        .remote_entry_limit
        .or(file.remote_entry_limit)
        .unwrap_or(meshd_kvstore::DEFAULT_ENTRY_LIMIT)
    {
        0 => None,
        n => Some(n),
    };
    let flow_history = args
        .flow_history
        .or(file.flow_history)
        .unwrap_or(DEFAULT_FLOW_HISTORY);
    if flow_history > MAX_FLOW_HISTORY {
        problem(
            "flow_history",
            format!("{flow_history} out of range (0-{MAX_FLOW_HISTORY})"),
        );
    }

    let egress = egress::resolve(
        args.masquerade.or(file.masquerade),
        args.non_masquerade_cidrs
            .clone()
            .or(file.non_masquerade_cidrs),
        args.snat_port_range.clone().or(file.snat_port_range),
        egress::node_ephemeral_range(),
        &mut problems,
    );

    let routing = routing::resolve(
        args.routing_mode.clone().or(file.routing_mode),
        args.native_routing_cidr
            .clone()
            .or(file.native_routing_cidr),
        args.auto_direct_node_routes
            .or(file.auto_direct_node_routes),
        args.service_lb_mode.clone().or(file.service_lb_mode),
        pod_cidr,
        &mut problems,
    );
    if tunnel_encap == TunnelEncap::Program && routing.native() {
        problems.push(ConfigProblem {
            field: "tunnel_encap".into(),
            reason: "program needs routing_mode: tunnel (native routing has no tunnel)".into(),
        });
    }

    match (cluster, cluster_id, node, node_ip, pod_cidr) {
        (Some(cluster), Some(cluster_id), Some(node), Some(node_ip), Some(pod_cidr))
            if problems.is_empty() =>
        {
            Ok(AgentConfig {
                cluster: cluster.clone(),
                cluster_id,
                node: node.clone(),
                node_ip,
                pod_cidr,
                etcd_endpoints,
                etcd_tls,
                remote_clusters_dir,
                remote_source,
                bpffs_dir,
                tunnel_port,
                tunnel_encap,
                underlay_device,
                underlay_mtu,
                api_socket,
                state_dir,
                lease_ttl: Duration::from_secs(lease_ttl_secs),
                startup_sync_timeout: Duration::from_secs(startup_sync_timeout_secs),
                resync_interval: Duration::from_secs(resync_interval_secs),
                event_moderation: Duration::from_micros(event_moderation_us),
                endpoint_netns_prefix: endpoint_netns_prefix
                    .unwrap_or_else(|| format!("meshd-{cluster}-{node}-")),
                cert_expiry_warning_days,
                metrics_addr,
                flow_events,
                flow_event_rate,
                flow_history,
                remote_entry_limit,
                egress,
                routing,
            })
        }
        _ => Err(problems),
    }
}

/// The local etcd takes this node's own certificate, `node-<cluster>-<node>`: it may publish
/// only what agents publish. The cluster's admin certificate would make every node root of its
/// cluster, and one compromised node its owner.
fn check_node_certificate(cert: &Path, cluster: &ClusterName, node: &str) -> Result<(), String> {
    let want = meshd_certs::Principal::node(cluster.as_str(), node);
    let reissue = format!(
        "issue this node's certificate with `meshd certs issue node --cluster {cluster} --node {node}` (and add its user with `meshd etcd bootstrap --node {node}`)"
    );
    match meshd_certs::Principal::read_file(cert)? {
        p if p == want => Ok(()),
        p => Err(format!(
            "{}: certificate {p} is not this node's ({want}); {reissue}",
            cert.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> ConfigFile {
        serde_yaml::from_str(yaml).unwrap()
    }

    const GOOD: &str = "
cluster: c1
cluster_id: 1
node: n1
node_ip: 192.168.60.1
pod_cidr: 10.1.1.0/24
etcd:
  endpoints: [http://127.0.0.1:2379]
";

    #[test]
    fn a_good_file_resolves_with_defaults() {
        let cfg = resolve(file(GOOD), &AgentArgs::default()).unwrap();
        assert_eq!(cfg.cluster.as_str(), "c1");
        assert_eq!(cfg.cluster_id.get(), 1);
        assert_eq!(cfg.tunnel_port, 8472);
        assert_eq!(cfg.underlay_mtu, Some(1500));
        assert_eq!(cfg.api_socket, PathBuf::from(meshd_api::DEFAULT_SOCKET));
        assert_eq!(cfg.pin_dir(), PathBuf::from("/sys/fs/bpf/meshd/c1/n1"));
        assert_eq!(cfg.lease_ttl, Duration::from_secs(15));
        assert_eq!(cfg.startup_sync_timeout, Duration::from_secs(30));
    }

    #[test]
    fn json_is_read_too() {
        let json = r#"{"cluster":"c1","cluster_id":1,"node":"n1","node_ip":"192.168.60.1",
            "pod_cidr":"10.1.1.0/24","etcd":{"endpoints":["http://127.0.0.1:2379"]}}"#;
        resolve(file(json), &AgentArgs::default()).unwrap();
    }

    #[test]
    fn flags_override_the_file() {
        let args = AgentArgs {
            node: Some("n2".into()),
            tunnel_port: Some(4789),
            startup_sync_timeout_secs: Some(5),
            ..Default::default()
        };
        let cfg = resolve(
            file(&format!("{GOOD}startup_sync_timeout_secs: 90\n")),
            &args,
        )
        .unwrap();
        assert_eq!(cfg.node, "n2");
        assert_eq!(cfg.tunnel_port, 4789);
        assert_eq!(cfg.startup_sync_timeout, Duration::from_secs(5));
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        assert_eq!(
            resolve(file(GOOD), &AgentArgs::default())
                .unwrap()
                .metrics_addr,
            None
        );
        let cfg = resolve(
            file(&format!("{GOOD}metrics_addr: 127.0.0.1:9962\n")),
            &AgentArgs::default(),
        )
        .unwrap();
        assert_eq!(cfg.metrics_addr, Some("127.0.0.1:9962".parse().unwrap()));
        let args = AgentArgs {
            metrics_addr: Some("localhost".into()),
            ..Default::default()
        };
        let problems = resolve(file(GOOD), &args).unwrap_err();
        assert_eq!(problems[0].field, "metrics_addr");
    }

    #[test]
    fn the_remote_entry_limit_has_a_default_a_key_a_flag_and_an_off_switch() {
        let limit = |text: &str, flag: Option<u64>| {
            let args = AgentArgs {
                remote_entry_limit: flag,
                ..Default::default()
            };
            resolve(file(&format!("{GOOD}{text}")), &args)
                .unwrap()
                .remote_entry_limit
        };
        assert_eq!(limit("", None), Some(meshd_kvstore::DEFAULT_ENTRY_LIMIT));
        assert_eq!(limit("remote_entry_limit: 2000\n", None), Some(2000));
        assert_eq!(limit("remote_entry_limit: 2000\n", Some(5)), Some(5));
        assert_eq!(limit("remote_entry_limit: 0\n", None), None);
    }

    #[test]
    fn event_moderation_has_a_default_a_key_a_flag_an_off_switch_and_a_bound() {
        let resolved = |text: &str, flag: Option<u64>| {
            let args = AgentArgs {
                event_moderation_us: flag,
                ..Default::default()
            };
            resolve(file(&format!("{GOOD}{text}")), &args)
        };
        let window = |text: &str, flag| resolved(text, flag).unwrap().event_moderation;
        assert_eq!(
            window("", None),
            Duration::from_micros(DEFAULT_EVENT_MODERATION_US)
        );
        assert_eq!(
            window("event_moderation_us: 500\n", None),
            Duration::from_micros(500)
        );
        assert_eq!(
            window("event_moderation_us: 500\n", Some(0)),
            Duration::ZERO
        );
        let problems = resolved("event_moderation_us: 10001\n", None).unwrap_err();
        assert_eq!(problems[0].field, "event_moderation_us");
        assert!(
            problems[0].reason.contains("0-10000"),
            "{}",
            problems[0].reason
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_naming_its_field() {
        let bad = "
cluster: C_1
cluster_id: 300
node_ip: 10.1.1.7
pod_cidr: 10.1.1.1/24
etcd:
  endpoints: [ftp://x]
  ca: /nonexistent/ca.pem
tunnel_port: 0
lease_ttl_secs: 1
startup_sync_timeout_secs: 0
";
        let problems = resolve(file(bad), &AgentArgs::default()).unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "cluster",
            "cluster_id",
            "node",
            "pod_cidr",
            "etcd.endpoints[0]",
            "etcd.ca",
            "etcd.cert",
            "etcd.key",
            "tunnel_port",
            "lease_ttl_secs",
            "startup_sync_timeout_secs",
        ] {
            assert!(fields.contains(&f), "{f} missing from {problems:?}");
        }
    }

    #[test]
    fn pod_cidr_must_not_hold_the_node_ip() {
        let args = AgentArgs {
            node_ip: Some("10.1.1.9".into()),
            ..Default::default()
        };
        let problems = resolve(file(GOOD), &args).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "pod_cidr");
    }

    #[test]
    fn unknown_file_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, format!("{GOOD}\nnode_name: x\n")).unwrap();
        let err = load(&AgentArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("node_name"), "{err}");
    }

    #[test]
    fn tunnel_encap_is_device_unless_program_is_asked_for_in_tunnel_mode() {
        let encap = |yaml: &str| resolve(file(&format!("{GOOD}{yaml}")), &AgentArgs::default());
        assert_eq!(encap("").unwrap().tunnel_encap, TunnelEncap::Device);
        assert_eq!(
            encap("tunnel_encap: program\n").unwrap().tunnel_encap,
            TunnelEncap::Program
        );
        let problems = encap("tunnel_encap: kernel\n").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "tunnel_encap");
        let problems =
            encap("tunnel_encap: program\nrouting_mode: native\nnative_routing_cidr: 10.0.0.0/8\n")
                .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .to_string()
                .contains("needs routing_mode: tunnel"),
            "{problems:?}"
        );
        let args = AgentArgs {
            tunnel_encap: Some("program".into()),
            ..Default::default()
        };
        let cfg = resolve(file(&format!("{GOOD}tunnel_encap: device\n")), &args).unwrap();
        assert_eq!(cfg.tunnel_encap, TunnelEncap::Program, "the flag wins");
    }

    #[test]
    fn native_mode_without_a_covering_native_routing_cidr_names_the_field() {
        let problems = resolve(
            file(&format!("{GOOD}routing_mode: native\n")),
            &AgentArgs::default(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "native_routing_cidr");
        let args = AgentArgs {
            routing_mode: Some("native".into()),
            native_routing_cidr: Some("10.0.0.0/8".into()),
            auto_direct_node_routes: Some(true),
            ..Default::default()
        };
        let cfg = resolve(file(GOOD), &args).unwrap();
        assert!(cfg.routing.native() && cfg.routing.auto_direct_node_routes);
    }

    #[test]
    fn https_needs_tls_files() {
        let args = AgentArgs {
            etcd_endpoints: Some(vec!["https://127.0.0.1:2379".into()]),
            ..Default::default()
        };
        let problems = resolve(file(GOOD), &args).unwrap_err();
        assert_eq!(problems[0].field, "etcd.ca");
    }
}
