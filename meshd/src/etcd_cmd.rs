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
//! `meshd etcd bootstrap` then connects with the cluster's admin certificate (CN `root`) and
//! creates the users and roles of `etcd_auth::desired`, then enables auth. From then on etcd
//! takes each client certificate's CN as the user: `root` may do everything, `remote` may only
//! read the shared prefixes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use etcd_client::{Permission, PermissionType, RoleRevokePermissionOptions, UserAddOptions};
use meshd_certs::TlsFiles;
use meshd_kvstore::EtcdConfig;

use crate::etcd_auth::{self, Access, AuthState, Grant, Step};
use crate::output::{Format, OutputArgs};

#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// Create the mesh's etcd users and roles and enable auth (idempotent).
    ///
    /// Connects as the cluster's admin certificate, whose CN must be `root`. Creates role
    /// `root` and user `root`; role `admin` (read-write on meshd/) and user `admin`; role
    /// `remote` with read on meshd/state/, meshd/synced/ and meshd/cluster-config/ only, and
    /// user `remote`. Users have no password: etcd started with --client-cert-auth maps a
    /// client certificate's CN to the user. Finally `auth enable`. Running it again changes
    /// nothing, and revokes permissions added to these roles by hand.
    ///
    /// etcd must be started with TLS against the mesh CA:
    ///   etcd --client-cert-auth --trusted-ca-file DIR/ca.pem \
    ///        --cert-file DIR/server.pem --key-file DIR/server-key.pem \
    ///        --listen-client-urls https://IP:2379 --advertise-client-urls https://IP:2379
    #[command(verbatim_doc_comment)]
    Bootstrap(BootstrapArgs),
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// etcd client URLs, comma separated (https://IP:PORT).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        env = "MESHD_ETCD_ENDPOINTS"
    )]
    endpoints: Vec<String>,
    /// CA certificate (the mesh CA).
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Admin client certificate (CN=root), e.g. c1/admin.pem.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// Its key, e.g. c1/admin-key.pem.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Only print the steps, change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(cmd: EtcdCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cmd {
        EtcdCommand::Bootstrap(args) => runtime.block_on(bootstrap(&args)),
    }
}

async fn bootstrap(args: &BootstrapArgs) -> anyhow::Result<ExitCode> {
    let files = TlsFiles::new(&args.ca, &args.cert, &args.key);
    // Checked before connecting: with auth on, etcd takes the CN as the user, and only `root`
    // may manage users and roles. Bootstrapping as anyone else would lock the admin out.
    let info = files.validate_client()?;
    if info.common_name.as_deref() != Some(meshd_certs::ADMIN_USER) {
        bail!(
            "certificate file {}: CN is {:?}, but bootstrap must connect as etcd user {:?} \
             (use the admin certificate: `meshd certs issue admin`)",
            args.cert.display(),
            info.common_name.as_deref().unwrap_or(""),
            meshd_certs::ADMIN_USER
        );
    }
    if let Some(plain) = args.endpoints.iter().find(|e| !e.starts_with("https://")) {
        bail!("endpoint {plain}: bootstrap needs https:// (etcd with TLS and --client-cert-auth)");
    }
    let config = EtcdConfig::new(args.endpoints.clone()).with_tls(files);
    let store = meshd_kvstore::connect(&config)
        .await
        .map_err(connect_error)?;
    let mut auth = store.client().auth_client();
    let endpoints = config.describe();

    let current = read_state(&mut auth)
        .await
        .with_context(|| format!("etcd {endpoints}: reading users and roles"))?;
    let steps = etcd_auth::plan(&current, &etcd_auth::desired());
    if !args.dry_run {
        for step in &steps {
            apply(&mut auth, step)
                .await
                .with_context(|| format!("etcd {endpoints}: {step}"))?;
            tracing::debug!(endpoints = %endpoints, "{step}");
        }
    }
    let changes = steps.len() - 1;
    match args.output.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "endpoints": args.endpoints,
                "dry_run": args.dry_run,
                "changes": changes,
                "steps": steps,
            }))?
        ),
        Format::Table => {
            let verb = if args.dry_run { "would" } else { "did" };
            for step in &steps {
                println!("{verb}: {step}");
            }
            if changes == 0 {
                println!("etcd {endpoints}: already bootstrapped, nothing changed");
            }
        }
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
