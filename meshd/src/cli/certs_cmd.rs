//! `meshd certs ...`: the mesh CA and the certificates of each cluster.
//!
//! Layout on disk (the defaults every other command and the README assume):
//!
//! ```text
//! mesh-ca/ca.pem  mesh-ca/ca-key.pem                 the mesh CA (keep the key offline)
//! c1/ca.pem                                          copy of the CA certificate
//! c1/server.pem   c1/server-key.pem                  etcd server of cluster c1
//! c1/admin.pem    c1/admin-key.pem                   c1's apiserver and operators (admin-c1)
//! c1/remote.pem   c1/remote-key.pem                  what c1's agents read other clusters with
//!                                                    (remote-c1)
//! c1/n1/node.pem  c1/n1/node-key.pem  c1/n1/ca.pem   node n1's agent (node-c1-n1)
//! ```

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use meshd_certs::{CertInfo, LeafKind, LeafRequest, MeshCa, TlsFiles, Usage};
use time::OffsetDateTime;

use super::output::{Format, OutputArgs};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the mesh CA (one per mesh; every cluster trusts it).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue certificates of a cluster, signed by the mesh CA or any existing CA
    ///
    /// Writes KIND.pem and KIND-key.pem (mode 0600) into --out-dir, plus ca.pem, a copy of the CA
    /// certificate, so the directory holds complete CA/certificate/key sets. An existing key is
    /// never replaced without --force.
    ///
    /// Kinds (client certificates carry their cluster in the CN, which etcd takes as the user,
    /// and in the OU):
    ///   server  the etcd server certificate (serverAuth; SANs from --dns and --ip, every name
    ///           and address clients dial)
    ///   admin   CN admin-<cluster>: the cluster's apiserver and operators; root of that
    ///           cluster's etcd and nothing elsewhere
    ///   remote  CN remote-<cluster>: what this cluster's agents read other clusters with;
    ///           each other cluster lets it in with `meshd clustermesh connect <cluster>`
    ///   node    CN node-<cluster>-<node> (needs --node): one node's agent; publishes that
    ///           node's records in its own cluster (`meshd etcd bootstrap --node <node>`)
    ///   all     server, admin and remote
    #[command(verbatim_doc_comment)]
    Issue(IssueArgs),
    /// Replace leaf certificates with new keys and certificates under the same CA.
    ///
    /// The subject and SANs are kept from the existing certificate. Key and certificate are
    /// written to temporary files and renamed over the old ones, so running components pick up
    /// the new pair on their next connection, without a restart.
    Rotate(RotateArgs),
    /// Show what a certificate file says: subject, SANs, issuer, key usage, validity.
    Inspect(InspectArgs),
    /// Validate a CA/certificate/key set before using it: readable files, key matching the
    /// certificate, validity period, signed by the CA, key usage for the role, and (for servers)
    /// the SANs clients will dial.
    Check(CheckArgs),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new self-signed mesh CA: ca.pem and ca-key.pem (mode 0600) in --out-dir.
    Create(CaCreateArgs),
    /// Add CAs to, or remove CAs from, a CA file (ca.pem) that peers trust: how a mesh moves to
    /// a new CA without a moment in which one side refuses the other.
    ///
    /// Moving to a new CA, on every cluster:
    ///   1. `meshd certs ca trust --file DIR/ca.pem --add new-ca/ca.pem` on every ca.pem (the
    ///      cluster's, each node's), then restart etcd (it reads its CA file at start only);
    ///   2. `meshd certs rotate KIND --out-dir DIR --ca new-ca/ca.pem --ca-key new-ca/ca-key.pem
    ///      --change-ca` for every certificate (server, admin, remote, each node);
    ///   3. `meshd certs ca trust --file DIR/ca.pem --remove old-ca/ca.pem` everywhere, and
    ///      restart etcd again. Certificates of the old CA (also any named root) are refused
    ///      from then on.
    ///
    /// meshd and the apiserver read the files on every new connection: nothing else restarts.
    #[command(verbatim_doc_comment)]
    Trust(CaTrustArgs),
}

#[derive(Debug, Args)]
pub struct CaTrustArgs {
    /// The CA file to change (written atomically).
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// A CA file whose CAs to trust as well (repeatable).
    #[arg(long = "add", value_name = "CA_FILE")]
    add: Vec<PathBuf>,
    /// A CA file whose CAs to trust no longer (repeatable).
    #[arg(long = "remove", value_name = "CA_FILE")]
    remove: Vec<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct CaCreateArgs {
    /// Directory for ca.pem and ca-key.pem (created if missing).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// Subject CN of the CA.
    #[arg(long, default_value = "meshd mesh CA")]
    name: String,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Replace an existing CA (every certificate it issued stops being trusted).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    output: OutputArgs,
}

/// The CA that signs: the mesh CA made by `meshd certs ca create`, or an existing one.
#[derive(Debug, Args)]
pub struct CaFilesArgs {
    /// CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// CA private key (PEM, PKCS#8).
    #[arg(long, value_name = "FILE")]
    ca_key: PathBuf,
}

impl CaFilesArgs {
    fn load(&self) -> anyhow::Result<MeshCa> {
        Ok(MeshCa::load(&self.ca, &self.ca_key)?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Server,
    Admin,
    Remote,
    Node,
    All,
}

impl KindArg {
    fn kinds(self) -> Vec<LeafKind> {
        match self {
            KindArg::Server => vec![LeafKind::Server],
            KindArg::Admin => vec![LeafKind::Admin],
            KindArg::Remote => vec![LeafKind::Remote],
            KindArg::Node => vec![LeafKind::Node],
            KindArg::All => LeafKind::ALL.to_vec(),
        }
    }
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Which certificate(s).
    #[arg(value_enum)]
    kind: KindArg,
    /// Cluster name (recorded as the subject OU and in client CNs).
    #[arg(long)]
    cluster: String,
    /// The node of a `node` certificate.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    #[command(flatten)]
    ca: CaFilesArgs,
    /// Directory for the certificates (created if missing).
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// DNS name SAN of the server certificate (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// IP address SAN of the server certificate (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    ip: Vec<IpAddr>,
    /// Subject CN instead of the kind's default (etcd.<cluster>, admin-<cluster>,
    /// remote-<cluster>, node-<cluster>-<node>). For a client certificate the CN is the etcd
    /// user; `root` and names of another cluster are refused.
    #[arg(long, value_name = "NAME")]
    cn: Option<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Replace existing keys and certificates.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Which certificate(s); each must exist in --out-dir.
    #[arg(value_enum)]
    kind: KindArg,
    #[command(flatten)]
    ca: CaFilesArgs,
    /// Directory holding the certificates to rotate.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// Validity of the new certificates in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Re-issue under --ca although the existing certificates were issued by another CA (moving
    /// the mesh to a new CA; see `meshd certs ca trust --help`). The directory's ca.pem must
    /// already trust --ca, so peers accept the new certificates at once.
    #[arg(long)]
    change_ca: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// PEM file with one or more certificates.
    file: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A TLS client certificate (clientAuth).
    Client,
    /// A TLS server certificate (serverAuth).
    Server,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// CA certificate the peer trusts.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Certificate to check.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// Its private key.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// What the certificate is used for.
    #[arg(long, value_enum, default_value_t = RoleArg::Client)]
    role: RoleArg,
    /// For a server: a DNS name or IP address clients dial; the certificate must cover it
    /// (repeatable).
    #[arg(long = "name", value_name = "NAME_OR_IP")]
    names: Vec<String>,
    /// Fail when the certificate or the CA expires within this many days (for monitoring and
    /// before a rollout: rotate in time, not after the outage).
    #[arg(long, value_name = "DAYS")]
    min_days: Option<u32>,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCommand::Ca(CaCommand::Create(args)) => ca_create(&args),
        CertsCommand::Ca(CaCommand::Trust(args)) => ca_trust(&args),
        CertsCommand::Issue(args) => issue(&args),
        CertsCommand::Rotate(args) => rotate(&args),
        CertsCommand::Inspect(args) => inspect(&args),
        CertsCommand::Check(args) => check(&args),
    }
}

fn ca_create(args: &CaCreateArgs) -> anyhow::Result<ExitCode> {
    let ca = MeshCa::create(&args.name, args.days)?;
    let (cert, key) = ca.write(&args.out_dir, args.force)?;
    let written = vec![Written {
        kind: "ca",
        cert,
        key,
        info: ca.info().clone(),
    }];
    print_written(&written, args.output.format)
}

fn ca_trust(args: &CaTrustArgs) -> anyhow::Result<ExitCode> {
    if args.add.is_empty() && args.remove.is_empty() {
        bail!("nothing to do: pass --add CA_FILE and/or --remove CA_FILE");
    }
    let mut bundle = meshd_certs::TrustBundle::read(&args.file)?;
    let mut added = 0;
    for path in &args.add {
        added += bundle.add(&meshd_certs::TrustBundle::read(path)?);
    }
    let mut removed = 0;
    for path in &args.remove {
        removed += bundle.remove(&meshd_certs::TrustBundle::read(path)?, &args.file)?;
    }
    if added + removed > 0 {
        bundle.write(&args.file)?;
    }
    let trusted = bundle.subjects(&args.file)?;
    match args.output.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "file": args.file,
                "added": added,
                "removed": removed,
                "trusted": trusted,
            }))?
        ),
        Format::Table => println!(
            "{}: {added} added, {removed} removed; trusts {}",
            args.file.display(),
            trusted.join("; ")
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// One certificate and key written by issue, rotate or ca create.
#[derive(Debug, serde::Serialize)]
struct Written {
    kind: &'static str,
    cert: PathBuf,
    key: PathBuf,
    #[serde(flatten)]
    info: CertInfo,
}

fn print_written(written: &[Written], format: Format) -> anyhow::Result<ExitCode> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(written)?),
        Format::Table => {
            for w in written {
                println!(
                    "{:<6} {} (key {})\n       subject {}, SANs {}, serial {}, expires {}",
                    w.kind,
                    w.cert.display(),
                    w.key.display(),
                    w.info.subject,
                    w.info.sans_display(),
                    w.info.serial,
                    rfc3339(w.info.not_after),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn issue(args: &IssueArgs) -> anyhow::Result<ExitCode> {
    meshd_state::ClusterName::new(args.cluster.as_str())?;
    let kinds = args.kind.kinds();
    let sans_given = !args.dns.is_empty() || !args.ip.is_empty();
    if sans_given && !kinds.contains(&LeafKind::Server) {
        bail!(
            "--dns and --ip apply to server certificates only; client certificates carry no SANs"
        );
    }
    if args.cn.is_some() && kinds.len() > 1 {
        bail!("--cn applies to one certificate; name the kind (server, admin, remote or node)");
    }
    match (&args.node, kinds.contains(&LeafKind::Node)) {
        (None, true) => bail!("a node certificate needs the node's name: pass --node NAME"),
        (Some(_), false) => bail!("--node applies to `meshd certs issue node` only"),
        (Some(node), true) => meshd_state::check_dns_subdomain("--node", node)?,
        (None, false) => {}
    }
    if kinds.contains(&LeafKind::Server) && !sans_given {
        bail!(
            "a server certificate needs the names and addresses clients dial: pass --dns NAME and/or --ip ADDR"
        );
    }
    let ca = args.ca.load()?;
    // Refuse before writing anything when one of the keys exists: a half-issued set is worse
    // than none.
    if !args.force {
        for kind in &kinds {
            for path in [kind.key_path(&args.out_dir), kind.cert_path(&args.out_dir)] {
                if path.exists() {
                    return Err(meshd_certs::CertError::Exists {
                        what: "certificate or key",
                        path,
                    }
                    .into());
                }
            }
        }
    }
    ca.write_ca_copy(&args.out_dir, args.force)?;
    let mut written = Vec::new();
    for kind in kinds {
        let mut req = LeafRequest::new(kind, &args.cluster, args.days);
        req.common_name = args.cn.clone();
        req.node = args.node.clone();
        if kind == LeafKind::Server {
            req.dns_names = args.dns.clone();
            req.ip_addresses = args.ip.clone();
        }
        let leaf = ca.issue(&req)?;
        let (cert, key) = leaf.write(&args.out_dir, args.force)?;
        written.push(written_entry(kind, cert, key)?);
    }
    print_written(&written, args.output.format)
}

fn written_entry(kind: LeafKind, cert: PathBuf, key: PathBuf) -> anyhow::Result<Written> {
    let info = meshd_certs::inspect_file(&cert)?.remove(0);
    Ok(Written {
        kind: kind.file_stem(),
        cert,
        key,
        info,
    })
}

fn rotate(args: &RotateArgs) -> anyhow::Result<ExitCode> {
    let ca = args.ca.load()?;
    let kinds = args.kind.kinds();
    // Check everything first, so a rotation of `all` is not left half done by a bad file.
    let mut renewals = Vec::new();
    for kind in kinds {
        let cert_path = kind.cert_path(&args.out_dir);
        if !cert_path.exists() {
            bail!(
                "nothing to rotate: {} does not exist (issue it with `meshd certs issue {}`)",
                cert_path.display(),
                kind.file_stem()
            );
        }
        let chain = meshd_certs::read_certs("certificate", &cert_path)?;
        let existing = CertInfo::from_der("certificate", &cert_path, &chain[0])?;
        let ca_ders = meshd_certs::read_certs("CA", &args.ca.ca)?;
        if args.change_ca {
            // The peers of these certificates read the directory's ca.pem: it must trust the
            // new CA before anything it signed is put in place.
            let trusted =
                meshd_certs::read_certs("CA", &args.out_dir.join(meshd_certs::CA_CERT_FILE))?;
            if !ca_ders.iter().any(|c| trusted.contains(c)) {
                bail!(
                    "{}/ca.pem does not trust {} yet: add it first (`meshd certs ca trust --file {}/ca.pem --add {}`)",
                    args.out_dir.display(),
                    args.ca.ca.display(),
                    args.out_dir.display(),
                    args.ca.ca.display()
                );
            }
        } else {
            // Rotation stays under the same CA: a certificate of another CA here means the
            // directory or the --ca flag is wrong.
            meshd_certs::check_signed_by(
                "certificate",
                &cert_path,
                &chain[0],
                &args.ca.ca,
                &ca_ders,
            )?;
        }
        renewals.push(LeafRequest::renewal_of(kind, &existing, args.days));
    }
    ca.write_ca_copy(&args.out_dir, false)?;
    let mut written = Vec::new();
    for req in renewals {
        let leaf = ca.issue(&req)?;
        let (cert, key) = leaf.write(&args.out_dir, true)?;
        written.push(written_entry(req.kind, cert, key)?);
    }
    print_written(&written, args.output.format)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let certs = meshd_certs::inspect_file(&args.file)?;
    match args.output.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "file": args.file,
                "certificates": certs,
            }))?
        ),
        Format::Table => {
            let now = OffsetDateTime::now_utc();
            for (i, c) in certs.iter().enumerate() {
                if certs.len() > 1 {
                    println!(
                        "{} (certificate {} of {})",
                        args.file.display(),
                        i + 1,
                        certs.len()
                    );
                } else {
                    println!("{}", args.file.display());
                }
                print_info(c, now);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(c: &CertInfo, now: OffsetDateTime) {
    let status = if now > c.not_after {
        "EXPIRED".to_string()
    } else if now < c.not_before {
        "NOT YET VALID".to_string()
    } else {
        format!("valid, {} days left", (c.not_after - now).whole_days())
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    for (label, value) in [
        ("subject", c.subject.clone()),
        ("issuer", c.issuer.clone()),
        ("serial", c.serial.clone()),
        ("not before", rfc3339(c.not_before)),
        ("not after", format!("{} ({status})", rfc3339(c.not_after))),
        ("CA", if c.is_ca { "yes" } else { "no" }.to_string()),
        ("key usage", list(&c.key_usage)),
        ("ext key usage", list(&c.extended_key_usage)),
        ("SANs", c.sans_display()),
        ("public key", c.public_key_algorithm.clone()),
    ] {
        println!("  {:<15}{value}", format!("{label}:"));
    }
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let files = TlsFiles::new(&args.ca, &args.cert, &args.key);
    let (usage, role) = match args.role {
        RoleArg::Client => (Usage::Client, "client"),
        RoleArg::Server => (Usage::Server, "server"),
    };
    if usage == Usage::Client && !args.names.is_empty() {
        bail!("--name applies to --role server: client certificates are not checked against names");
    }
    let info = files.load(usage, &args.names)?.info;
    let now = OffsetDateTime::now_utc();
    let days_left = (info.not_after - now).whole_days();
    if let Some(min) = args.min_days {
        let mut expiring = Vec::new();
        if days_left < i64::from(min) {
            expiring.push(format!(
                "certificate file {} expires at {}, in {days_left} days (rotate it: `meshd certs rotate`)",
                args.cert.display(),
                rfc3339(info.not_after)
            ));
        }
        for ca in meshd_certs::inspect_file(&args.ca)? {
            let ca_days = (ca.not_after - now).whole_days();
            if ca_days < i64::from(min) {
                expiring.push(format!(
                    "CA file {} (\"{}\") expires at {}, in {ca_days} days",
                    args.ca.display(),
                    ca.subject,
                    rfc3339(ca.not_after)
                ));
            }
        }
        if !expiring.is_empty() {
            bail!("{} (--min-days {min})", expiring.join("; "));
        }
    }
    match args.output.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": true,
                "role": role,
                "ca": args.ca,
                "cert": args.cert,
                "key": args.key,
                "days_left": days_left,
                "certificate": info,
            }))?
        ),
        Format::Table => println!(
            "ok: {} is a valid {role} certificate (subject {}, SANs {}) signed by {}, key {} matches, expires {}",
            args.cert.display(),
            info.subject,
            info.sans_display(),
            args.ca.display(),
            args.key.display(),
            rfc3339(info.not_after)
        ),
    }
    Ok(ExitCode::SUCCESS)
}
