//! Configuration: command-line flags, optionally on top of a YAML file (`--config`) using the
//! same names (`cluster-name: c1`); a flag wins over the file. Parsed in one place, and every
//! problem is reported at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use meshd_certs::TlsFiles;
use meshd_kvstore::EtcdConfig;
use meshd_state::{ClusterId, ClusterName, RoutingMode};
use serde::Deserialize;

use crate::node_ports::NodePortRange;
use crate::vip::ServiceCidr;

/// Settings as given (flags, or the file); all optional until merged and checked.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigArgs {
    /// Cluster name (`^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$`).
    #[arg(long, env = "MESHD_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Cluster id, 1-255, unique in the mesh.
    #[arg(long, env = "MESHD_CLUSTER_ID")]
    pub cluster_id: Option<u32>,
    /// etcd client URLs of this cluster, comma separated (https://IP:PORT).
    #[arg(long, value_delimiter = ',', env = "MESHD_ETCD_ENDPOINTS")]
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// CA of etcd's server certificate (the mesh CA).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd: the cluster's admin certificate (CN root).
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// gRPC API address (mTLS).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// CA that client certificates of the API must be signed by (the mesh CA).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Server certificate of the API (serverAuth, SANs the clients dial).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Client certificate CNs allowed to use the API besides admin-<cluster>, comma separated;
    /// their certificates must still be of this cluster (OU).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub admin_cn: Vec<String>,
    /// Range service VIPs are allocated from, e.g. 10.96.0.0/16.
    #[arg(long, value_name = "CIDR")]
    pub service_cidr: Option<String>,
    /// Range node ports of NodePort and LoadBalancer services are allocated from, FIRST-LAST
    /// [default: 30000-32767].
    #[arg(long, value_name = "FIRST-LAST")]
    pub node_port_range: Option<String>,
    /// How long an identity must go unused before it is deleted [default: 15m].
    #[arg(long, value_name = "DURATION")]
    pub identity_gc_grace: Option<String>,
    /// How often the leader looks for garbage and re-converges [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub resync_interval: Option<String>,
    /// TTL of the leader lease: how long a dead leader blocks the others [default: 15s].
    #[arg(long, value_name = "DURATION")]
    pub leader_lease_ttl: Option<String>,
    /// HTTP address of /healthz and /readyz; none when absent.
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,
    /// HTTP address of Prometheus /metrics; none when absent.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// etcd's --max-txn-ops: the largest batch one apply can be [default: 128].
    #[arg(long)]
    pub max_txn_ops: Option<usize>,
    /// Routing mode of the cluster's agents (`tunnel` or `native`), announced in the cluster
    /// config; remote clusters announcing another one are refused [default: tunnel].
    #[arg(long, value_name = "MODE")]
    pub routing_mode: Option<String>,
    /// Mirror every remote cluster of --kvstoremesh-clusters-dir into this cluster's etcd
    /// (`meshd/cache/<cluster>/`, status in `meshd/cache-status/v1/<cluster>`), for agents
    /// with `remote_source: cache`.
    #[arg(long)]
    #[serde(default)]
    pub kvstoremesh: bool,
    /// The remote cluster files the mirror reads (the agents' `remote_clusters_dir`: one
    /// `<cluster>.yaml` per remote, read with this cluster's remote certificate).
    #[arg(long, value_name = "DIR")]
    pub kvstoremesh_clusters_dir: Option<PathBuf>,
    /// Keys mirrored from one remote cluster at most; the rest are refused and counted
    /// [default: 600000].
    #[arg(long, value_name = "N")]
    pub kvstoremesh_limit: Option<u64>,
}

/// The mirror's settings (`--kvstoremesh`).
#[derive(Debug, Clone)]
pub struct KvstoremeshConfig {
    pub clusters_dir: PathBuf,
    pub limit: u64,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cluster: ClusterName,
    pub cluster_id: ClusterId,
    pub etcd: EtcdConfig,
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    pub admins: Vec<String>,
    pub service_cidr: ServiceCidr,
    pub node_port_range: NodePortRange,
    pub identity_gc_grace: Duration,
    pub resync_interval: Duration,
    pub leader_lease_ttl: Duration,
    pub health_listen: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub max_txn_ops: usize,
    /// Announced in the cluster config.
    pub routing_mode: RoutingMode,
    /// Unique per process: the value of the leader key while this replica leads.
    pub replica_id: String,
    /// `--kvstoremesh`: mirror the remote clusters into the local etcd.
    pub kvstoremesh: Option<KvstoremeshConfig>,
}

/// `500ms`, `30s`, `15m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 15m, 2h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    if secs <= 0.0 {
        return Err(format!("{text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl ConfigArgs {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        Self::from_text(path, &text)
    }

    /// Parses the text of the config file at `path` (named in the error). Pure.
    pub fn from_text(path: &Path, text: &str) -> Result<Self, String> {
        serde_yaml::from_str(text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Flags over file: every field set in `self` wins.
    pub fn over(self, file: ConfigArgs) -> ConfigArgs {
        fn vec(a: Vec<String>, b: Vec<String>) -> Vec<String> {
            if a.is_empty() {
                b
            } else {
                a
            }
        }
        ConfigArgs {
            cluster_name: self.cluster_name.or(file.cluster_name),
            cluster_id: self.cluster_id.or(file.cluster_id),
            etcd_endpoints: vec(self.etcd_endpoints, file.etcd_endpoints),
            etcd_ca: self.etcd_ca.or(file.etcd_ca),
            etcd_cert: self.etcd_cert.or(file.etcd_cert),
            etcd_key: self.etcd_key.or(file.etcd_key),
            listen: self.listen.or(file.listen),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            admin_cn: vec(self.admin_cn, file.admin_cn),
            service_cidr: self.service_cidr.or(file.service_cidr),
            node_port_range: self.node_port_range.or(file.node_port_range),
            identity_gc_grace: self.identity_gc_grace.or(file.identity_gc_grace),
            resync_interval: self.resync_interval.or(file.resync_interval),
            leader_lease_ttl: self.leader_lease_ttl.or(file.leader_lease_ttl),
            health_listen: self.health_listen.or(file.health_listen),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            max_txn_ops: self.max_txn_ops.or(file.max_txn_ops),
            routing_mode: self.routing_mode.or(file.routing_mode),
            kvstoremesh: self.kvstoremesh || file.kvstoremesh,
            kvstoremesh_clusters_dir: self
                .kvstoremesh_clusters_dir
                .or(file.kvstoremesh_clusters_dir),
            kvstoremesh_limit: self.kvstoremesh_limit.or(file.kvstoremesh_limit),
        }
    }

    /// Checks everything; the error lists every problem, one per line.
    pub fn build(self) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let mut need = |name: &str, v: bool| {
            if !v {
                errors.push(format!("--{name} is required"));
            }
        };
        need("cluster-name", self.cluster_name.is_some());
        need("cluster-id", self.cluster_id.is_some());
        need("etcd-endpoints", !self.etcd_endpoints.is_empty());
        need("listen", self.listen.is_some());
        need("tls-ca", self.tls_ca.is_some());
        need("tls-cert", self.tls_cert.is_some());
        need("tls-key", self.tls_key.is_some());
        need("service-cidr", self.service_cidr.is_some());
        let cluster = self
            .cluster_name
            .as_deref()
            .map(ClusterName::new)
            .transpose()
            .map_err(|e| errors.push(format!("--cluster-name: {}", e.reason)))
            .ok()
            .flatten();
        let cluster_id = self
            .cluster_id
            .map(ClusterId::new)
            .transpose()
            .map_err(|e| errors.push(format!("--cluster-id: {}", e.reason)))
            .ok()
            .flatten();
        let service_cidr = self
            .service_cidr
            .as_deref()
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .map_err(|e| format!("{s:?}: {e}"))
                    .and_then(ServiceCidr::new)
            })
            .transpose()
            .map_err(|e| errors.push(format!("--service-cidr: {e}")))
            .ok()
            .flatten();
        let node_port_range = match self.node_port_range.as_deref().map(str::parse) {
            None => NodePortRange::default(),
            Some(Ok(range)) => range,
            Some(Err(e)) => {
                errors.push(format!("--node-port-range: {e}"));
                NodePortRange::default()
            }
        };
        let mut duration = |name: &str, v: &Option<String>, default: Duration| match v {
            None => default,
            Some(text) => parse_duration(text).unwrap_or_else(|e| {
                errors.push(format!("--{name}: {e}"));
                default
            }),
        };
        let identity_gc_grace = duration(
            "identity-gc-grace",
            &self.identity_gc_grace,
            Duration::from_secs(15 * 60),
        );
        let resync_interval = duration(
            "resync-interval",
            &self.resync_interval,
            Duration::from_secs(30),
        );
        let leader_lease_ttl = duration(
            "leader-lease-ttl",
            &self.leader_lease_ttl,
            Duration::from_secs(15),
        );
        if leader_lease_ttl < Duration::from_secs(2) {
            errors.push(
                "--leader-lease-ttl: must be at least 2s (etcd leases have 1s granularity)".into(),
            );
        }
        let etcd_tls = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles::new(ca, cert, key)),
            _ => {
                errors.push("--etcd-ca, --etcd-cert and --etcd-key go together".into());
                None
            }
        };
        for cn in &self.admin_cn {
            if meshd_certs::LEGACY_COMMON_NAMES.contains(&cn.as_str()) {
                errors.push(format!(
                    "--admin-cn {cn}: this name is valid in every cluster (etcd's root, or a name without its cluster) and no longer accepted; the cluster's admin certificate (admin-<cluster>) is always allowed"
                ));
            }
        }
        let routing_mode = match self.routing_mode.as_deref().map(str::parse::<RoutingMode>) {
            None => RoutingMode::default(),
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                errors.push(format!("--routing-mode: {e}"));
                RoutingMode::default()
            }
        };
        let max_txn_ops = self.max_txn_ops.unwrap_or(128);
        if max_txn_ops < 4 {
            errors.push("--max-txn-ops: must be at least 4".into());
        }
        let kvstoremesh = match (self.kvstoremesh, self.kvstoremesh_clusters_dir) {
            (false, None) => None,
            (false, Some(_)) => {
                errors.push("--kvstoremesh-clusters-dir: only with --kvstoremesh".into());
                None
            }
            (true, None) => {
                errors.push("--kvstoremesh needs --kvstoremesh-clusters-dir".into());
                None
            }
            (true, Some(dir)) => Some(KvstoremeshConfig {
                clusters_dir: dir,
                limit: self
                    .kvstoremesh_limit
                    .unwrap_or(crate::mirror::DEFAULT_LIMIT),
            }),
        };
        if self.kvstoremesh_limit == Some(0) {
            errors.push("--kvstoremesh-limit: must be at least 1".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut etcd = EtcdConfig::new(self.etcd_endpoints);
        if let Some(tls) = etcd_tls {
            etcd = etcd.with_tls(tls);
        }
        Ok(Config {
            cluster: cluster.expect("checked"),
            cluster_id: cluster_id.expect("checked"),
            etcd,
            listen: self.listen.expect("checked"),
            tls: TlsFiles::new(
                self.tls_ca.expect("checked"),
                self.tls_cert.expect("checked"),
                self.tls_key.expect("checked"),
            ),
            admins: self.admin_cn,
            service_cidr: service_cidr.expect("checked"),
            node_port_range,
            identity_gc_grace,
            resync_interval,
            leader_lease_ttl,
            health_listen: self.health_listen,
            metrics_addr: self.metrics_addr,
            max_txn_ops,
            routing_mode,
            replica_id: replica_id(),
            kvstoremesh,
        })
    }
}

fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("xs").is_err());
    }

    #[test]
    fn every_problem_is_reported_and_flags_win() {
        let errors = ConfigArgs {
            cluster_name: Some("C_1".into()),
            cluster_id: Some(0),
            service_cidr: Some("10.96.0.1/16".into()),
            node_port_range: Some("32767-30000".into()),
            identity_gc_grace: Some("soon".into()),
            etcd_ca: Some("ca.pem".into()),
            admin_cn: vec!["root".into()],
            ..Default::default()
        }
        .build()
        .unwrap_err();
        let text = errors.join("\n");
        for needle in [
            "--admin-cn root",
            "--cluster-name",
            "--cluster-id",
            "--service-cidr",
            "--node-port-range: 32767-30000: the first port is above the last",
            "--identity-gc-grace",
            "--etcd-ca, --etcd-cert and --etcd-key",
            "--listen is required",
            "--tls-cert is required",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }

        let file: ConfigArgs = serde_yaml::from_str(
            "cluster-name: c1\ncluster-id: 1\netcd-endpoints: [http://127.0.0.1:2379]\n\
             listen: 127.0.0.1:9443\ntls-ca: ca.pem\ntls-cert: s.pem\ntls-key: s-key.pem\n\
             service-cidr: 10.96.0.0/16\n",
        )
        .unwrap();
        let flags = ConfigArgs {
            cluster_id: Some(2),
            ..Default::default()
        };
        let config = flags.over(file).build().unwrap();
        assert_eq!(config.cluster_id.get(), 2);
        assert_eq!(config.cluster.as_str(), "c1");
        assert_eq!(config.node_port_range, NodePortRange::default());
        let ranged = ConfigArgs {
            node_port_range: Some("31000-31999".into()),
            ..Default::default()
        }
        .over(
            ConfigArgs::from_text(Path::new("f.yaml"), "node-port-range: 30000-30010\n").unwrap(),
        );
        assert_eq!(ranged.node_port_range.as_deref(), Some("31000-31999"));
        // No extra admins by default: admin-<cluster> is always allowed (see grpc::authorize).
        assert!(config.admins.is_empty());
        assert!(serde_yaml::from_str::<ConfigArgs>("clustr-name: x\n").is_err());
        assert!(config.kvstoremesh.is_none());
    }

    #[test]
    fn kvstoremesh_needs_its_directory() {
        let base = || {
            ConfigArgs::from_text(
                Path::new("f.yaml"),
                "cluster-name: c1\ncluster-id: 1\netcd-endpoints: [http://127.0.0.1:2379]\n\
                 listen: 127.0.0.1:9443\ntls-ca: ca.pem\ntls-cert: s.pem\ntls-key: s-key.pem\n\
                 service-cidr: 10.96.0.0/16\nkvstoremesh: true\n",
            )
            .unwrap()
        };
        let errors = base().build().unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("--kvstoremesh-clusters-dir")),
            "{errors:?}"
        );
        let config = ConfigArgs {
            kvstoremesh_clusters_dir: Some("/etc/meshd/clusters".into()),
            ..Default::default()
        }
        .over(base())
        .build()
        .unwrap();
        let m = config.kvstoremesh.unwrap();
        assert_eq!(m.clusters_dir, PathBuf::from("/etc/meshd/clusters"));
        assert_eq!(m.limit, crate::mirror::DEFAULT_LIMIT);
        let errors = ConfigArgs {
            kvstoremesh_clusters_dir: Some("/d".into()),
            kvstoremesh_limit: Some(0),
            ..Default::default()
        }
        .over(base())
        .build()
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains("--kvstoremesh-limit")),
            "{errors:?}"
        );
    }
}
