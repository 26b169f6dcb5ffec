//! The mesh CA and the leaf certificates it issues per cluster.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::inspect::CertInfo;
use crate::pem_files::{
    certs_from_pem as read_certs_pem, read, read_certs, write_all_atomic, write_atomic, CERT_MODE,
    KEY_MODE,
};
use crate::principal::Principal;
use crate::validate::check_validity;
use crate::{CertError, CA_CERT_FILE, CA_KEY_FILE};

/// Certificates start to be valid a little in the past, so a host whose clock is slightly behind
/// the issuer's does not reject a certificate issued a moment ago.
const BACKDATE: Duration = Duration::hours(1);
/// The Organization of every certificate the mesh issues.
pub const ORGANIZATION: &str = "meshd";

/// The leaf certificates of a cluster: a server, an admin and a remote certificate per cluster
/// (`ALL`), and one node certificate per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeafKind {
    /// The cluster's etcd server.
    Server,
    /// The cluster's apiserver and its operators: etcd user `admin-<cluster>` (role root) in
    /// that cluster's etcd only. Never given to agents.
    Admin,
    /// What the cluster's agents present to read other clusters' etcd: etcd user
    /// `remote-<cluster>` there, read-only, added by `meshd clustermesh connect <cluster>`.
    Remote,
    /// One node's agent: etcd user `node-<cluster>-<node>`, which may publish only what agents
    /// publish, in its own cluster.
    Node,
}

impl LeafKind {
    /// The certificates `meshd certs issue all` issues: one each per cluster.
    pub const ALL: [LeafKind; 3] = [LeafKind::Server, LeafKind::Admin, LeafKind::Remote];

    /// File stem in an issue directory: `server.pem`/`server-key.pem`, ...
    pub fn file_stem(self) -> &'static str {
        match self {
            LeafKind::Server => "server",
            LeafKind::Admin => "admin",
            LeafKind::Remote => "remote",
            LeafKind::Node => "node",
        }
    }

    /// The subject CN (`node` only for `Node`). etcd with `--client-cert-auth` takes a client
    /// certificate's CN as the user name, so client CNs are the etcd users `meshd etcd
    /// bootstrap` and `meshd clustermesh connect` create, and carry their cluster (see
    /// `Principal`).
    pub fn common_name(self, cluster: &str, node: Option<&str>) -> String {
        match self {
            LeafKind::Server => format!("etcd.{cluster}"),
            LeafKind::Admin => Principal::admin(cluster).common_name(),
            LeafKind::Remote => Principal::remote(cluster).common_name(),
            LeafKind::Node => Principal::node(cluster, node.unwrap_or("")).common_name(),
        }
    }

    pub fn cert_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.pem", self.file_stem()))
    }

    pub fn key_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}-key.pem", self.file_stem()))
    }
}

impl std::str::FromStr for LeafKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LeafKind::ALL
            .into_iter()
            .chain([LeafKind::Node])
            .find(|k| k.file_stem() == s)
            .ok_or_else(|| {
                format!("unknown certificate kind {s:?} (server, admin, remote or node)")
            })
    }
}

/// What to put into a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRequest {
    pub kind: LeafKind,
    pub cluster: String,
    /// The node of a `Node` certificate.
    pub node: Option<String>,
    /// Subject CN; `None` means the kind's default (see `LeafKind::common_name`).
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafRequest {
    /// Valid from about now for `days` days.
    pub fn new(kind: LeafKind, cluster: &str, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafRequest {
            kind,
            cluster: cluster.to_owned(),
            node: None,
            common_name: None,
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + Duration::days(days.into()),
        }
    }

    /// The same subject and SANs as an existing certificate, valid from now for `days` days: what
    /// a rotation issues.
    pub fn renewal_of(kind: LeafKind, existing: &CertInfo, days: u32) -> Self {
        let mut req = LeafRequest::new(
            kind,
            existing.organizational_unit.as_deref().unwrap_or(""),
            days,
        );
        req.common_name = existing.common_name.clone();
        if kind == LeafKind::Node {
            req.node = Principal::from_cert(existing).ok().and_then(|p| p.node);
        }
        req.dns_names = existing.dns_names.clone();
        req.ip_addresses = existing.ip_addresses.clone();
        req
    }

    fn common_name(&self) -> String {
        self.common_name
            .clone()
            .unwrap_or_else(|| self.kind.common_name(&self.cluster, self.node.as_deref()))
    }
}

/// A freshly issued certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub kind: LeafKind,
    pub cert_pem: String,
    pub key_pem: String,
}

impl IssuedLeaf {
    /// Writes `KIND.pem` and `KIND-key.pem` into `dir`. The key is written first, then the
    /// certificate, each atomically; without `overwrite` an existing key or certificate is an
    /// error and nothing is written.
    pub fn write(&self, dir: &Path, overwrite: bool) -> Result<(PathBuf, PathBuf), CertError> {
        let cert = self.kind.cert_path(dir);
        let key = self.kind.key_path(dir);
        // A reader between the two renames sees a mismatching pair and re-reads
        // (`TlsFiles::load`); it never sees a half-written file.
        write_all_atomic(
            &[
                ("key", &key, self.key_pem.as_bytes(), KEY_MODE),
                ("certificate", &cert, self.cert_pem.as_bytes(), CERT_MODE),
            ],
            overwrite,
        )?;
        Ok((cert, key))
    }
}

/// The mesh CA: one self-signed certificate and its key, trusted by every cluster.
pub struct MeshCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    info: CertInfo,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("subject", &self.info.subject)
            .finish_non_exhaustive()
    }
}

fn issue_err(subject: &str, e: impl std::fmt::Display) -> CertError {
    CertError::Issue {
        subject: subject.to_owned(),
        reason: e.to_string(),
    }
}

impl MeshCa {
    /// A new self-signed CA named `name`, valid for `days` days, with an ECDSA P-256 key.
    pub fn create(name: &str, days: u32) -> Result<Self, CertError> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        // Path length 0: the mesh CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(days.into());
        let key = KeyPair::generate().map_err(|e| issue_err(name, e))?;
        let cert = params.self_signed(&key).map_err(|e| issue_err(name, e))?;
        let info = CertInfo::from_der("CA", Path::new("<new CA>"), cert.der())?;
        Ok(MeshCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            info,
        })
    }

    /// An existing CA (ours or one made elsewhere, e.g. with openssl): its certificate must be a
    /// CA valid now, and the key must be its key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let certs = read_certs("CA", cert_path)?;
        let der = &certs[0];
        let info = CertInfo::from_der("CA", cert_path, der)?;
        if !info.is_ca {
            return Err(CertError::Invalid {
                what: "CA",
                path: cert_path.to_owned(),
                reason: format!("certificate \"{}\" is not a CA certificate", info.subject),
            });
        }
        check_validity("CA", cert_path, &info, OffsetDateTime::now_utc())?;
        let key_der = crate::pem_files::read_key("CA key", key_path)?;
        crate::validate::check_key_matches(cert_path, der, key_path, &key_der)?;
        let key_pem = String::from_utf8_lossy(&read("CA key", key_path)?).into_owned();
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Invalid {
            what: "CA key",
            path: key_path.to_owned(),
            reason: format!("unsupported private key (PKCS#8 ECDSA, Ed25519 or RSA expected): {e}"),
        })?;
        let issuer = Issuer::from_ca_cert_der(der, key).map_err(|e| CertError::Invalid {
            what: "CA",
            path: cert_path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(MeshCa {
            cert_pem: pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())),
            issuer,
            info,
        })
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca-key.pem` into `dir`; refuses to replace an existing key unless
    /// `overwrite`.
    pub fn write(&self, dir: &Path, overwrite: bool) -> Result<(PathBuf, PathBuf), CertError> {
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        let key_pem = self.issuer.key().serialize_pem();
        write_all_atomic(
            &[
                ("CA key", &key, key_pem.as_bytes(), KEY_MODE),
                ("CA", &cert, self.cert_pem.as_bytes(), CERT_MODE),
            ],
            overwrite,
        )?;
        Ok((cert, key))
    }

    /// Copies the CA certificate into an issue directory as `ca.pem`, so the directory holds a
    /// complete `TlsFiles` triple per leaf. An existing `ca.pem` that already trusts this CA is
    /// kept as it is, also when it is a bundle of several CAs (during a CA rotation, see
    /// `TrustBundle`). One that does not is an error unless `overwrite`: the certificates next
    /// to it were issued by another CA.
    pub fn write_ca_copy(&self, dir: &Path, overwrite: bool) -> Result<PathBuf, CertError> {
        let path = dir.join(CA_CERT_FILE);
        if path.exists() {
            if let Ok(existing) = read_certs("CA", &path) {
                let mine = read_certs_pem("CA", &path, self.cert_pem.as_bytes())?;
                if existing.iter().any(|c| mine.contains(c)) {
                    return Ok(path);
                }
            }
            if !overwrite {
                return Err(CertError::Invalid {
                    what: "CA",
                    path,
                    reason: "holds a different CA than the one issuing now; certificates in this directory were issued by it (pass --force to replace it, or `meshd certs ca trust --add` to trust both while rotating the CA)".into(),
                });
            }
        }
        write_atomic("CA", &path, self.cert_pem.as_bytes(), CERT_MODE, true)?;
        Ok(path)
    }

    /// A cluster's whole set in `dir`: a copy of this CA and the server (valid for
    /// `server_ips` and `server_dns`), admin and remote certificates, each valid `days`.
    pub fn issue_cluster_set(
        &self,
        dir: &Path,
        cluster: &str,
        days: u32,
        server_ips: &[IpAddr],
        server_dns: &[String],
        overwrite: bool,
    ) -> Result<(), CertError> {
        self.write_ca_copy(dir, overwrite)?;
        for kind in LeafKind::ALL {
            let mut req = LeafRequest::new(kind, cluster, days);
            if kind == LeafKind::Server {
                req.ip_addresses = server_ips.to_vec();
                req.dns_names = server_dns.to_vec();
            }
            self.issue(&req)?.write(dir, overwrite)?;
        }
        Ok(())
    }

    /// The node certificate of `node` in `cluster`, in `dir` (`node.pem`, `node-key.pem` and a
    /// copy of this CA): what that node's agent uses for its own cluster's etcd.
    pub fn issue_node(
        &self,
        dir: &Path,
        cluster: &str,
        node: &str,
        days: u32,
        overwrite: bool,
    ) -> Result<(), CertError> {
        self.write_ca_copy(dir, overwrite)?;
        let mut req = LeafRequest::new(LeafKind::Node, cluster, days);
        req.node = Some(node.to_owned());
        self.issue(&req)?.write(dir, overwrite)?;
        Ok(())
    }

    /// Issues one leaf certificate with a new key.
    pub fn issue(&self, req: &LeafRequest) -> Result<IssuedLeaf, CertError> {
        let cn = req.common_name();
        if req.kind == LeafKind::Node && req.node.as_deref().unwrap_or("").is_empty() {
            return Err(issue_err(
                &cn,
                "a node certificate needs the node's name (--node)",
            ));
        }
        // etcd maps a client certificate's CN to its user, and user `root` exists in every
        // cluster's etcd (etcd refuses `auth enable` without it). Under one mesh CA a certificate
        // named root would be root of every cluster, so the mesh never issues one.
        if req.kind != LeafKind::Server && crate::LEGACY_COMMON_NAMES.contains(&cn.as_str()) {
            return Err(issue_err(
                &cn,
                "this CN is valid in every cluster's etcd (user root, or a name without its cluster); client certificates are named per cluster (leave out --cn)",
            ));
        }
        // A hand-picked CN in the mesh's own shape must name the certificate's cluster: etcd
        // reads only the CN, so `admin-c1` issued "for c2" would be root of c1.
        if req.kind != LeafKind::Server
            && ["admin-", "node-", "remote-"]
                .iter()
                .any(|p| cn.starts_with(p))
        {
            if let Err(e) = Principal::parse(&cn, &req.cluster) {
                return Err(issue_err(&cn, e));
            }
        }
        if req.kind == LeafKind::Server && req.dns_names.is_empty() && req.ip_addresses.is_empty() {
            return Err(issue_err(
                &cn,
                "a server certificate needs at least one SAN (--dns or --ip): clients verify the name or IP they dial",
            ));
        }
        if req.not_after <= req.not_before {
            return Err(issue_err(&cn, "not-after is not after not-before"));
        }
        if req.not_after > self.info.not_after {
            return Err(issue_err(
                &cn,
                format!(
                    "would outlive the CA, which expires at {}; use fewer --days or a new CA",
                    crate::inspect::rfc3339(self.info.not_after)
                ),
            ));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, cn.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        if !req.cluster.is_empty() {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, req.cluster.as_str());
        }
        for dns in &req.dns_names {
            let name = dns
                .clone()
                .try_into()
                .map_err(|e| issue_err(&cn, format!("DNS name {dns:?}: {e}")))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in &req.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        // ECDSA keys only sign (the TLS 1.3 CertificateVerify); keyEncipherment is an RSA
        // key-transport bit.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match req.kind {
            // etcd 3.4's gRPC gateway dials its own gRPC port with the server certificate as client
            // certificate; without clientAuth it logs "incompatible key usage" for every dial. The
            // server's CN is no etcd user, so this grants nothing.
            LeafKind::Server => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafKind::Admin | LeafKind::Remote | LeafKind::Node => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = req.not_before;
        params.not_after = req.not_after;
        let key = KeyPair::generate().map_err(|e| issue_err(&cn, e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| issue_err(&cn, e))?;
        Ok(IssuedLeaf {
            kind: req.kind,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
