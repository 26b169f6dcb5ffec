//! `meshd troubleshoot clustermesh [CLUSTER]`: why a remote cluster does not connect, step by
//! step, from the files the agent uses: the remote file, its certificate, DNS, TCP, the TLS
//! handshake, etcd's authorization of each shared prefix, the remote's cluster config and its
//! sync canaries. Each failure says its likely cause and the command that fixes it. Keys are
//! never printed; a broken remote file is itself a finding, not an error of the command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use meshd_certs::{CertInfo, TlsFiles};
use meshd_kvstore::{Backend, EtcdConfig, EtcdStore};
use meshd_state::keys::{CLUSTER_CONFIG_PREFIX, STATE_PREFIX, SYNCED_PREFIX};
use meshd_state::{ClusterConfig, ClusterName};
use serde::{Deserialize, Serialize};

use super::output::{Format, OutputArgs};
use meshd_agent::remotes;

/// One network step (DNS, TCP, TLS) may take this long before it counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum TroubleshootCommand {
    /// Check every remote cluster of this node (or one): the remote file, its certificate,
    /// DNS, TCP, the TLS handshake (which CA, which names, expiry), etcd's authorization of
    /// each shared prefix, the remote's cluster config and id, its sync canaries. Exits 1 when
    /// a check fails; each failure names its likely cause and the command that fixes it.
    Clustermesh(ClustermeshArgs),
}

#[derive(Debug, Args)]
pub struct ClustermeshArgs {
    /// Only this remote cluster.
    #[arg(value_name = "CLUSTER")]
    cluster: Option<String>,
    /// The agent's config file: this node's cluster, its id and the remote-clusters directory.
    #[arg(long, value_name = "FILE", default_value = "/etc/meshd/agent.yaml")]
    config: PathBuf,
    /// The remote-clusters directory instead of the config's `remote_clusters_dir`.
    #[arg(long, value_name = "DIR")]
    remote_clusters_dir: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

/// The fields of the agent's config troubleshooting needs. Read leniently: a config the agent
/// refuses for another reason must not stop the diagnosis of the remotes.
#[derive(Debug, Default, Deserialize)]
struct AgentFields {
    cluster: Option<String>,
    cluster_id: Option<u32>,
    remote_clusters_dir: Option<PathBuf>,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub cluster: String,
    pub check: String,
    pub ok: bool,
    pub detail: String,
    /// The likely cause and what to run, for a failed check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

struct Findings {
    cluster: String,
    checks: Vec<Check>,
}

impl Findings {
    fn pass(&mut self, check: &str, detail: impl Into<String>) {
        self.checks.push(Check {
            cluster: self.cluster.clone(),
            check: check.to_owned(),
            ok: true,
            detail: detail.into(),
            fix: None,
        });
    }

    fn fail(&mut self, check: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.checks.push(Check {
            cluster: self.cluster.clone(),
            check: check.to_owned(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }
}

pub fn run(cmd: TroubleshootCommand) -> anyhow::Result<ExitCode> {
    let TroubleshootCommand::Clustermesh(args) = cmd;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let checks = runtime.block_on(clustermesh(&args))?;
    match args.output.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "checks": checks }))?
        ),
        Format::Table => print_table(&checks),
    }
    Ok(if checks.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(checks: &[Check]) {
    println!("{:<12} {:<26} {:<6} DETAIL", "CLUSTER", "CHECK", "RESULT");
    for c in checks {
        println!(
            "{:<12} {:<26} {:<6} {}",
            c.cluster,
            c.check,
            if c.ok { "ok" } else { "FAIL" },
            c.detail
        );
        if let Some(fix) = &c.fix {
            println!("{:<12} {:<26} {:<6} fix: {fix}", "", "", "");
        }
    }
}

async fn clustermesh(args: &ClustermeshArgs) -> anyhow::Result<Vec<Check>> {
    let fields: AgentFields = match std::fs::read_to_string(&args.config) {
        Ok(text) => serde_yaml::from_str(&text)
            .with_context(|| format!("agent config {}", args.config.display()))?,
        Err(e) if args.remote_clusters_dir.is_some() => {
            tracing::debug!(error = %e, "no agent config; using the flags");
            AgentFields::default()
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "agent config {}: {e} (pass --config, or --remote-clusters-dir)",
                args.config.display()
            ))
        }
    };
    let dir = args
        .remote_clusters_dir
        .clone()
        .or(fields.remote_clusters_dir)
        .context("no remote-clusters directory: the agent config has no remote_clusters_dir and --remote-clusters-dir is not given")?;
    let local = fields
        .cluster
        .as_deref()
        .map(ClusterName::new)
        .transpose()
        .map_err(|e| anyhow::anyhow!("agent config {}: cluster: {e}", args.config.display()))?;
    let mut files: Vec<(ClusterName, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading the remote-clusters directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| remotes::cluster_of(&p).map(|c| (c, p)))
        .collect();
    files.sort();
    if let Some(only) = &args.cluster {
        files.retain(|(c, _)| c.as_str() == only);
        if files.is_empty() {
            anyhow::bail!(
                "no file for cluster {only} in {} (one file per remote cluster, named after it)",
                dir.display()
            );
        }
    }
    let mut all = Vec::new();
    for (cluster, path) in files {
        let mut f = Findings {
            cluster: cluster.to_string(),
            checks: Vec::new(),
        };
        check_remote(&mut f, &cluster, &path, local.as_ref(), fields.cluster_id).await;
        all.extend(f.checks);
    }
    Ok(all)
}

async fn check_remote(
    f: &mut Findings,
    cluster: &ClusterName,
    path: &Path,
    local: Option<&ClusterName>,
    local_id: Option<u32>,
) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return f.fail(
                "remote file",
                format!("{}: {e}", path.display()),
                "make the file readable by the agent",
            )
        }
    };
    let config = match remotes::parse(path, &text) {
        Ok(c) => c,
        Err(e) => {
            return f.fail(
                "remote file",
                e,
                "fix the file: endpoints: [https://HOST:PORT], and ca, cert and key (paths relative to its directory)",
            )
        }
    };
    f.pass(
        "remote file",
        format!("{}: {}", path.display(), config.describe()),
    );
    let Some(tls) = config.tls.clone() else {
        f.fail(
            "certificate",
            "the file names no ca, cert and key: plaintext etcd",
            "add ca, cert and key (this cluster's remote certificate): remote etcds require client certificates",
        );
        return;
    };
    if !certificate_ok(f, &config, &tls, path, local) {
        return;
    }
    let mut reachable = false;
    for endpoint in &config.endpoints {
        reachable |= check_endpoint(f, endpoint, &tls).await;
    }
    if !reachable {
        return;
    }
    check_etcd(f, cluster, &config, local, local_id).await;
}

/// The remote certificate: readable, valid, of this CA, and this cluster's `remote-<cluster>`.
fn certificate_ok(
    f: &mut Findings,
    config: &EtcdConfig,
    tls: &TlsFiles,
    path: &Path,
    local: Option<&ClusterName>,
) -> bool {
    let info = match tls.validate_client() {
        Ok(info) => info,
        Err(e) => {
            let fix = match &e {
                meshd_certs::CertError::Expired { .. } => format!(
                    "rotate it: `meshd certs rotate remote --out-dir {} --ca CA --ca-key CA-KEY`",
                    tls.cert.parent().unwrap_or(Path::new(".")).display()
                ),
                _ => "fix the file it names (`meshd certs check --ca ... --cert ... --key ...` tells more)".into(),
            };
            f.fail("certificate", e.to_string(), fix);
            return false;
        }
    };
    if let Some(local) = local {
        if let Err(e) = remotes::check_remote_certificate(path, config, local) {
            f.fail(
                "certificate",
                e,
                format!("issue this cluster's remote certificate: `meshd certs issue remote --cluster {local} ...`"),
            );
            return false;
        }
    }
    f.pass(
        "certificate",
        format!(
            "{} ({}), expires {}",
            tls.cert.display(),
            info.subject,
            rfc3339(&info)
        ),
    );
    true
}

fn rfc3339(info: &CertInfo) -> String {
    info.not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// DNS, TCP and TLS to one endpoint; `true` when all three passed.
async fn check_endpoint(f: &mut Findings, endpoint: &str, tls: &TlsFiles) -> bool {
    let Some(hostport) = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
    else {
        f.fail(
            "endpoint",
            format!("{endpoint}: no https:// scheme"),
            "write endpoints as https://HOST:PORT",
        );
        return false;
    };
    let hostport = hostport.trim_end_matches('/');
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => hostport.to_owned(),
    };
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host(hostport)).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                f.fail(
                    &format!("dns {hostport}"),
                    e.to_string(),
                    "check the name in the remote file and this node's resolver",
                );
                return false;
            }
            Err(_) => {
                f.fail(
                    &format!("dns {hostport}"),
                    format!("no answer within {STEP_TIMEOUT:?}"),
                    "check this node's resolver",
                );
                return false;
            }
        };
    let Some(addr) = addrs.first().copied() else {
        f.fail(
            &format!("dns {hostport}"),
            "no address",
            "check the name in the remote file",
        );
        return false;
    };
    f.pass(&format!("dns {hostport}"), format!("{addr}"));
    let tcp = match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            f.fail(
                &format!("tcp {addr}"),
                e.to_string(),
                "is the remote etcd running and listening there (--listen-client-urls), and does a firewall let this node through?",
            );
            return false;
        }
        Err(_) => {
            f.fail(
                &format!("tcp {addr}"),
                format!("no answer within {STEP_TIMEOUT:?}"),
                "a firewall or routing drops the connection",
            );
            return false;
        }
    };
    f.pass(&format!("tcp {addr}"), "connected");
    let check = format!("tls {hostport}");
    let config = match tls.client_config() {
        Ok(c) => c,
        Err(e) => {
            f.fail(&check, e.to_string(), "fix the file it names");
            return false;
        }
    };
    let name = match rustls::pki_types::ServerName::try_from(host.clone()) {
        Ok(n) => n,
        Err(e) => {
            f.fail(
                &check,
                format!("{host}: {e}"),
                "write a valid host name or IP address",
            );
            return false;
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => {
            let server = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| {
                    CertInfo::from_der("server certificate", Path::new("<peer>"), der).ok()
                });
            let detail = match server {
                Some(s) => format!(
                    "server {} ({}), expires {}, trusted by {}",
                    s.subject,
                    s.sans_display(),
                    rfc3339(&s),
                    tls.ca.display()
                ),
                None => "handshake done".into(),
            };
            f.pass(&check, detail);
            true
        }
        Ok(Err(e)) => {
            let explained =
                meshd_certs::explain_tls_error(&e, tls, &host).unwrap_or_else(|| e.to_string());
            f.fail(
                &check,
                explained,
                "the remote's etcd and this file must share the mesh CA; the server certificate must name the address dialed; a client certificate must be valid",
            );
            false
        }
        Err(_) => {
            f.fail(
                &check,
                format!("no handshake within {STEP_TIMEOUT:?}"),
                "is this port etcd's TLS client port?",
            );
            false
        }
    }
}

/// Authorization of each shared prefix, the cluster config and id, the sync canaries.
async fn check_etcd(
    f: &mut Findings,
    cluster: &ClusterName,
    config: &EtcdConfig,
    local: Option<&ClusterName>,
    local_id: Option<u32>,
) {
    let store = match meshd_kvstore::connect(config).await {
        Ok(s) => s,
        Err(e) => {
            f.fail("etcd", e.to_string(), "see the TLS check above");
            return;
        }
    };
    let this = local.map_or("<this cluster>".to_owned(), |l| l.to_string());
    let mut denied = false;
    for prefix in [STATE_PREFIX, SYNCED_PREFIX, CLUSTER_CONFIG_PREFIX] {
        let check = format!("read {prefix}");
        match store.check_read(prefix).await {
            Ok(_) => f.pass(&check, "allowed"),
            Err(e) if e.is_permission_denied() => {
                denied = true;
                f.fail(
                    &check,
                    format!("permission denied for user remote-{this}"),
                    format!(
                        "{cluster} has not connected {this}, or disconnected it: run `meshd clustermesh connect {this}` against {cluster}'s etcd with its admin certificate"
                    ),
                );
            }
            Err(e) => f.fail(
                &check,
                e.to_string(),
                "etcd answered with an error; see its log",
            ),
        }
    }
    if denied {
        return;
    }
    check_cluster_config(f, &store, cluster, local_id).await;
    check_canaries(f, &store, cluster).await;
}

async fn check_cluster_config(
    f: &mut Findings,
    store: &EtcdStore,
    cluster: &ClusterName,
    local_id: Option<u32>,
) {
    let key = format!("{CLUSTER_CONFIG_PREFIX}{cluster}");
    let page = match store.range(&key, None, 0, 1).await {
        Ok(p) => p,
        Err(e) => return f.fail("cluster config", e.to_string(), "see etcd's log"),
    };
    let Some(kv) = page.kvs.into_iter().find(|kv| kv.key == key) else {
        // What does that etcd publish instead? A file named after the wrong cluster shows here.
        let others = store
            .range(CLUSTER_CONFIG_PREFIX, None, 0, 10)
            .await
            .map(|p| {
                p.kvs
                    .into_iter()
                    .map(|kv| kv.key)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let fix = if others.is_empty() {
            format!("{cluster}'s clustermesh-apiserver writes it at start: is it running?")
        } else {
            format!("that etcd publishes {others}: is the file named after the right cluster?")
        };
        return f.fail("cluster config", format!("{key} is missing"), fix);
    };
    let config: ClusterConfig = match meshd_state::decode::<ClusterConfig>(&key, &kv.value) {
        Ok((_, c)) => c,
        Err(e) => {
            return f.fail(
                "cluster config",
                e.to_string(),
                "the apiserver of that cluster writes it; check its version",
            )
        }
    };
    if config.name != *cluster {
        return f.fail(
            "cluster config",
            format!("{key} names cluster {}", config.name),
            "rename the remote file after the cluster it points at",
        );
    }
    let id = u32::from(config.id);
    if local_id == Some(id) {
        return f.fail(
            "cluster config",
            format!("cluster id {id} is this cluster's own id"),
            "cluster ids must be unique in the mesh: give one of the clusters another id (--cluster-id of its apiserver and agents)",
        );
    }
    f.pass("cluster config", format!("{cluster}, id {id}"));
}

async fn check_canaries(f: &mut Findings, store: &EtcdStore, cluster: &ClusterName) {
    let prefix = format!("{SYNCED_PREFIX}{cluster}/");
    let keys: Vec<String> = match store.range(&prefix, None, 0, 100).await {
        Ok(p) => p
            .kvs
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_owned))
            .collect(),
        Err(e) => return f.fail("sync canaries", e.to_string(), "see etcd's log"),
    };
    let missing: Vec<&str> = ["nodes", "ip", "identities", "services"]
        .into_iter()
        .filter(|k| !keys.iter().any(|have| have == k))
        .collect();
    if missing.is_empty() {
        f.pass("sync canaries", keys.join(", "));
    } else {
        f.fail(
            "sync canaries",
            format!("missing {}", missing.join(", ")),
            format!("{cluster} is not ready until its agents (nodes, ip, identities) and its apiserver (services) finished their first sync: are they running?"),
        );
    }
}
