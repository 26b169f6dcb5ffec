//! `meshd etcd ...`: preparing a cluster's etcd for the mesh.
//!
//! etcd must run with TLS and client-certificate auth against the mesh CA, e.g.
//!
//! ```text
//! etcd --client-cert-auth --trusted-ca-file c1/ca.pem \
//!      --cert-file c1/server.pem --key-file c1/server-key.pem \
//!      --listen-client-urls https://10.0.0.1:2379 --advertise-client-urls https://10.0.0.1:2379
//! ```
//!
//! `meshd etcd bootstrap` then connects with the cluster's admin certificate (CN
//! `admin-<cluster>`) and creates the users and roles of `etcd_auth::desired`, then enables auth.
//! From then on etcd takes each client certificate's CN as the user: `admin-<cluster>` may do
//! everything, `node-<cluster>-<node>` may publish what agents publish, and `remote-<other>` —
//! added by `meshd clustermesh connect <other>` — may only read the shared prefixes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use etcd_client::{Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions};
use meshd_certs::TlsFiles;
use meshd_kvstore::EtcdConfig;

use meshd_certs::{Principal, Role};

use super::etcd_auth::{self, Access, AuthState, Grant, Step};
use super::output::{Format, OutputArgs};

#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// Create the cluster's etcd users and roles and enable auth (idempotent).
    ///
    /// Connects as the cluster's admin certificate (CN admin-<cluster>; the cluster is read
    /// from it). Creates:
    ///   user root              role root   (etcd requires it; no certificate carries this CN)
    ///   user admin-<cluster>   role root   (the apiserver and operators)
    ///   role node              write the cluster's ipcache, identities, identity index and the
    ///                          agents' sync canaries; read meshd/state/, meshd/synced/,
    ///                          meshd/cluster-config/, meshd/config/policies/, meshd/cache/,
    ///                          meshd/cache-status/ (the last two written by the apiserver's
    ///                          mirror, --kvstoremesh, and never readable by remote clusters)
    ///   user node-<cluster>-<node>, role node-<cluster>-<node>   per --node: role node, and
    ///                          its own node record meshd/state/nodes/v1/<cluster>/<node>
    ///   role remote            read meshd/state/, meshd/synced/, meshd/cluster-config/ only;
    ///                          held by remote-<other> users (`meshd clustermesh connect`)
    /// It deletes the users `admin` and `remote` and the role `admin` of meshd before
    /// per-cluster names (their certificates were valid in every cluster). Users have no
    /// password: etcd started with --client-cert-auth maps a client certificate's CN to the
    /// user. Finally `auth enable`. Running it again changes nothing, and revokes permissions
    /// added to these roles by hand; users and roles it does not name are left alone.
    ///
    /// etcd must be started with TLS against the mesh CA:
    ///   etcd --client-cert-auth --trusted-ca-file DIR/ca.pem \
    ///        --cert-file DIR/server.pem --key-file DIR/server-key.pem \
    ///        --listen-client-urls https://IP:2379 --advertise-client-urls https://IP:2379
    #[command(verbatim_doc_comment)]
    Bootstrap(BootstrapArgs),
}

/// How to reach a cluster's etcd as its admin.
#[derive(Debug, Args)]
pub struct EtcdAdminArgs {
    /// etcd client URLs, comma separated (https://IP:PORT).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        env = "MESHD_ETCD_ENDPOINTS"
    )]
    endpoints: Vec<String>,
    /// CA certificate (the mesh CA).
    #[arg(long, value_name = "FILE", env = "MESHD_ETCD_CA")]
    ca: PathBuf,
    /// The cluster's admin client certificate (CN admin-<cluster>), e.g. c1/admin.pem.
    #[arg(long, value_name = "FILE", env = "MESHD_ETCD_CERT")]
    cert: PathBuf,
    /// Its key, e.g. c1/admin-key.pem.
    #[arg(long, value_name = "FILE", env = "MESHD_ETCD_KEY")]
    key: PathBuf,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    etcd: EtcdAdminArgs,
    /// A node of the cluster whose agent gets a user (node-<cluster>-<node>); repeatable or
    /// comma separated. Its certificate: `meshd certs issue node --node NAME`.
    #[arg(long = "node", value_name = "NAME", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Only print the steps, change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The remote cluster that may read (connect) or may no longer read (disconnect) this one.
    #[arg(value_name = "CLUSTER")]
    cluster: String,
    #[command(flatten)]
    etcd: EtcdAdminArgs,
    /// Only print the steps, change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: OutputArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(cmd: EtcdCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EtcdCommand::Bootstrap(args) => runtime()?.block_on(bootstrap(&args)),
    }
}

/// A cluster's etcd, reached as that cluster's admin.
struct AdminSession {
    cluster: String,
    endpoints: String,
    auth: etcd_client::AuthClient,
}

impl EtcdAdminArgs {
    /// Checks the certificate before connecting: with auth on, etcd takes the CN as the user,
    /// and only a root-role user may manage users and roles. The cluster is the one the CA wrote
    /// into the certificate, so an admin certificate cannot be pointed at another cluster by a
    /// flag.
    async fn connect(&self) -> anyhow::Result<AdminSession> {
        let files = TlsFiles::new(&self.ca, &self.cert, &self.key);
        let info = files.validate_client()?;
        let principal = Principal::from_cert(&info)
            .with_context(|| format!("certificate file {}", self.cert.display()))?;
        if principal.role != Role::Admin {
            bail!(
                "certificate file {}: {principal} is a {} certificate; managing etcd users takes the cluster's admin certificate (admin-{}, `meshd certs issue admin`)",
                self.cert.display(),
                principal.role,
                principal.cluster
            );
        }
        if let Some(plain) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
            bail!("endpoint {plain}: needs https:// (etcd with TLS and --client-cert-auth)");
        }
        let config = EtcdConfig::new(self.endpoints.clone()).with_tls(files);
        let store = meshd_kvstore::connect(&config)
            .await
            .map_err(connect_error)?;
        Ok(AdminSession {
            cluster: principal.cluster,
            endpoints: config.describe(),
            auth: store.client().auth_client(),
        })
    }
}

impl AdminSession {
    async fn read_state(&mut self) -> anyhow::Result<AuthState> {
        read_state(&mut self.auth).await.map_err(|e| {
            let hint = if e.to_string().contains("permission denied") {
                format!(
                    " (is user admin-{} in this etcd? a cluster's admin certificate opens that cluster's etcd only)",
                    self.cluster
                )
            } else {
                String::new()
            };
            e.context(format!(
                "etcd {}: reading users and roles{hint}",
                self.endpoints
            ))
        })
    }

    async fn apply_all(&mut self, steps: &[Step], dry_run: bool) -> anyhow::Result<()> {
        if dry_run {
            return Ok(());
        }
        for step in steps {
            apply(&mut self.auth, step)
                .await
                .with_context(|| format!("etcd {}: {step}", self.endpoints))?;
            tracing::debug!(endpoints = %self.endpoints, "{step}");
        }
        Ok(())
    }
}

fn print_steps(
    steps: &[Step],
    dry_run: bool,
    output: &OutputArgs,
    json: serde_json::Value,
    nothing: &str,
) -> anyhow::Result<()> {
    let changes = steps
        .iter()
        .filter(|s| !matches!(s, Step::EnableAuth))
        .count();
    match output.format {
        Format::Json => {
            let mut json = json;
            json["dry_run"] = dry_run.into();
            json["changes"] = changes.into();
            json["steps"] = serde_json::to_value(steps)?;
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Format::Table => {
            let verb = if dry_run { "would" } else { "did" };
            for step in steps {
                println!("{verb}: {step}");
            }
            if changes == 0 {
                println!("{nothing}");
            }
        }
    }
    Ok(())
}

async fn bootstrap(args: &BootstrapArgs) -> anyhow::Result<ExitCode> {
    let mut session = args.etcd.connect().await?;
    for node in &args.nodes {
        meshd_state::check_dns_subdomain("--node", node)?;
    }
    let current = session.read_state().await?;
    let steps =
        etcd_auth::plan_bootstrap(&current, &etcd_auth::desired(&session.cluster, &args.nodes));
    session.apply_all(&steps, args.dry_run).await?;
    print_steps(
        &steps,
        args.dry_run,
        &args.output,
        serde_json::json!({
            "endpoints": args.etcd.endpoints,
            "cluster": session.cluster,
            "nodes": args.nodes,
        }),
        &format!(
            "etcd {}: already bootstrapped, nothing changed",
            session.endpoints
        ),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `meshd clustermesh connect CLUSTER`: lets CLUSTER's agents (user remote-CLUSTER) read this
/// cluster's shared state.
pub fn connect(args: &ConnectArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(connect_or_disconnect(args, true))
}

/// `meshd clustermesh disconnect CLUSTER`: removes user remote-CLUSTER.
pub fn disconnect(args: &ConnectArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(connect_or_disconnect(args, false))
}

async fn connect_or_disconnect(args: &ConnectArgs, connect: bool) -> anyhow::Result<ExitCode> {
    meshd_state::ClusterName::new(args.cluster.as_str())
        .map_err(|e| anyhow::anyhow!("cluster {:?}: {e}", args.cluster))?;
    let mut session = args.etcd.connect().await?;
    if session.cluster == args.cluster {
        bail!(
            "cluster {} is this etcd's own cluster (the admin certificate's); connect names another cluster",
            args.cluster
        );
    }
    let current = session.read_state().await?;
    let steps = if connect {
        etcd_auth::plan(&current, &etcd_auth::connected(&args.cluster))
    } else {
        etcd_auth::plan_disconnect(&current, &args.cluster)
    };
    session.apply_all(&steps, args.dry_run).await?;
    let mut connected = etcd_auth::connected_clusters(&current);
    if !args.dry_run {
        connected.retain(|c| c != &args.cluster);
        if connect {
            connected.push(args.cluster.clone());
            connected.sort();
        }
    }
    let user = Principal::remote(&args.cluster).common_name();
    let nothing = if connect {
        format!(
            "{}: {} may already read {} (user {user}), nothing changed",
            session.endpoints, args.cluster, session.cluster
        )
    } else {
        format!(
            "{}: {} is not connected (no user {user}), nothing changed",
            session.endpoints, args.cluster
        )
    };
    print_steps(
        &steps,
        args.dry_run,
        &args.output,
        serde_json::json!({
            "endpoints": args.etcd.endpoints,
            "cluster": session.cluster,
            "remote": args.cluster,
            "connected": connected,
        }),
        &nothing,
    )?;
    if !connect && !steps.is_empty() && args.output.format == Format::Table {
        // etcd 3.4 checks permissions when a request or a watch starts, not while a watch
        // runs: meshd agents re-check their access periodically and stop, but a client that
        // does not keeps its open watches until its connection ends.
        println!(
            "note: {} can no longer read {}; meshd agents notice within a second or two and keep its last state (fail-static). A watch another client already holds open lasts until its connection ends (restart etcd's members to end it at once).",
            args.cluster, session.cluster
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A connection failure as one line: etcd-client repeats the transport error in its message,
/// its status and its source, and the connector's message already says what failed and why
/// (e.g. which CA file does not trust the server).
fn connect_error(e: meshd_kvstore::KvError) -> anyhow::Error {
    match &e {
        meshd_kvstore::KvError::Etcd {
            endpoints,
            source: etcd_client::Error::GRpcStatus(status),
            ..
        } if status.code() == tonic::Code::Unavailable => {
            anyhow::anyhow!("etcd {endpoints}: cannot connect: {}", status.message())
        }
        _ => e.into(),
    }
}

/// Timeout per auth call: bootstrap is interactive, a hung etcd should not hang it.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CALL_TIMEOUT:?}"))??)
}

async fn read_state(auth: &mut etcd_client::AuthClient) -> anyhow::Result<AuthState> {
    let mut state = AuthState::default();
    let roles = timed(auth.role_list()).await?.roles().to_vec();
    for role in roles {
        let resp = timed(auth.role_get(role.clone())).await?;
        let grants = resp
            .permissions()
            .iter()
            .map(|p| {
                let access = match PermissionType::try_from(p.get_type()) {
                    Ok(PermissionType::Read) => Access::Read,
                    Ok(PermissionType::Write) => Access::Write,
                    _ => Access::ReadWrite,
                };
                Grant {
                    access,
                    key: String::from_utf8_lossy(p.key()).into_owned(),
                    range_end: String::from_utf8_lossy(p.range_end()).into_owned(),
                }
            })
            .collect();
        state.roles.insert(role, grants);
    }
    let users = timed(auth.user_list()).await?.users().to_vec();
    let mut by_user = BTreeMap::new();
    for user in users {
        let resp = timed(auth.user_get(user.clone())).await?;
        by_user.insert(user, resp.roles().iter().cloned().collect());
    }
    state.users = by_user;
    Ok(state)
}

async fn apply(auth: &mut etcd_client::AuthClient, step: &Step) -> anyhow::Result<()> {
    match step {
        Step::AddRole { role } => {
            timed(auth.role_add(role.clone())).await?;
        }
        Step::GrantPermission { role, grant } => {
            let perm = match grant.access {
                Access::Read => Permission::read(grant.key.clone()),
                Access::Write => Permission::write(grant.key.clone()),
                Access::ReadWrite => Permission::read_write(grant.key.clone()),
            }
            .with_range_end(grant.range_end.clone());
            timed(auth.role_grant_permission(role.clone(), perm)).await?;
        }
        Step::RevokePermission { role, grant } => {
            let opts = RoleRevokePermissionOptions::new().with_range_end(grant.range_end.clone());
            timed(auth.role_revoke_permission(role.clone(), grant.key.clone(), Some(opts))).await?;
        }
        Step::AddUser { user } => {
            let opts = UserAddOptions::new().with_no_pwd();
            timed(auth.user_add(user.clone(), "", Some(opts))).await?;
        }
        Step::DeleteUser { user } => {
            timed(auth.user_delete(user.clone())).await?;
        }
        Step::DeleteRole { role } => {
            timed(auth.role_delete(role.clone())).await?;
        }
        Step::GrantRole { user, role } => {
            timed(auth.user_grant_role(user.clone(), role.clone())).await?;
        }
        Step::RevokeRole { user, role } => {
            timed(auth.user_revoke_role(user.clone(), role.clone())).await?;
        }
        Step::EnableAuth => {
            timed(auth.auth_enable()).await?;
        }
    }
    Ok(())
}
