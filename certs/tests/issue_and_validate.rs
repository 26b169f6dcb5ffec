//! Issuing, inspecting and validating certificate files; every bad input fails with an error that
//! names the file and the reason.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use meshd_certs::{CertError, LeafKind, LeafRequest, MeshCa, TlsFiles};
use time::{Duration, OffsetDateTime};

struct Mesh {
    dir: tempfile::TempDir,
    ca: MeshCa,
}

impl Mesh {
    /// A CA in `DIR/ca` and the three leaves of cluster c1 in `DIR/c1`.
    fn new() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::create("test mesh CA", 30).unwrap();
        ca.write(&dir.path().join("ca"), false).unwrap();
        let mesh = Mesh { dir, ca };
        for kind in LeafKind::ALL {
            mesh.issue(kind, |_| {});
        }
        mesh
    }

    fn c1(&self) -> std::path::PathBuf {
        self.dir.path().join("c1")
    }

    fn issue(&self, kind: LeafKind, edit: impl FnOnce(&mut LeafRequest)) {
        let mut req = LeafRequest::new(kind, "c1", 10);
        if kind == LeafKind::Server {
            req.dns_names = vec!["etcd.c1.mesh".into(), "localhost".into()];
            req.ip_addresses = vec!["127.0.0.1".parse().unwrap()];
        }
        edit(&mut req);
        self.ca.write_ca_copy(&self.c1(), false).unwrap();
        self.ca
            .issue(&req)
            .unwrap()
            .write(&self.c1(), true)
            .unwrap();
    }

    fn files(&self, kind: LeafKind) -> TlsFiles {
        TlsFiles::in_dir(&self.c1(), kind.file_stem())
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn assert_names(err: &CertError, path: &Path, reason: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    assert!(msg.contains(reason), "error does not say {reason:?}: {msg}");
}

#[test]
fn issued_leaves_carry_subject_sans_and_usages() {
    let mesh = Mesh::new();
    let server = meshd_certs::inspect_file(&LeafKind::Server.cert_path(&mesh.c1())).unwrap();
    let server = &server[0];
    assert_eq!(server.common_name.as_deref(), Some("etcd.c1"));
    assert_eq!(server.organizational_unit.as_deref(), Some("c1"));
    assert_eq!(server.dns_names, vec!["etcd.c1.mesh", "localhost"]);
    assert_eq!(
        server.ip_addresses,
        vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
    );
    assert!(server
        .extended_key_usage
        .contains(&"serverAuth".to_string()));
    assert!(!server.is_ca);
    assert_eq!(server.issuer, mesh.ca.info().subject);

    let admin = &meshd_certs::inspect_file(&LeafKind::Admin.cert_path(&mesh.c1())).unwrap()[0];
    assert_eq!(admin.common_name.as_deref(), Some("admin-c1"));
    assert_eq!(admin.extended_key_usage, vec!["clientAuth"]);
    let remote = &meshd_certs::inspect_file(&LeafKind::Remote.cert_path(&mesh.c1())).unwrap()[0];
    assert_eq!(remote.common_name.as_deref(), Some("remote-c1"));
    assert_eq!(remote.extended_key_usage, vec!["clientAuth"]);
    assert!(remote.dns_names.is_empty() && remote.ip_addresses.is_empty());
    assert!(remote.not_after > OffsetDateTime::now_utc() + Duration::days(9));

    let ca = &meshd_certs::inspect_file(&mesh.dir.path().join("ca/ca.pem")).unwrap()[0];
    assert!(ca.is_ca);
    assert!(ca.key_usage.contains(&"keyCertSign".to_string()));

    // Every issued triple validates for its role.
    mesh.files(LeafKind::Admin).validate_client().unwrap();
    mesh.files(LeafKind::Remote).validate_client().unwrap();
    mesh.files(LeafKind::Server)
        .validate_server(&["127.0.0.1".into(), "etcd.c1.mesh".into()])
        .unwrap();
}

#[test]
fn keys_are_private_and_never_overwritten_without_force() {
    let mesh = Mesh::new();
    for kind in LeafKind::ALL {
        assert_eq!(mode(&kind.key_path(&mesh.c1())), 0o600, "{kind:?} key");
        assert_eq!(mode(&kind.cert_path(&mesh.c1())), 0o644, "{kind:?} cert");
    }
    assert_eq!(mode(&mesh.dir.path().join("ca/ca-key.pem")), 0o600);

    let key_path = LeafKind::Remote.key_path(&mesh.c1());
    let before = std::fs::read(&key_path).unwrap();
    let leaf = mesh
        .ca
        .issue(&LeafRequest::new(LeafKind::Remote, "c1", 1))
        .unwrap();
    let err = leaf.write(&mesh.c1(), false).unwrap_err();
    assert!(matches!(err, CertError::Exists { .. }), "{err}");
    assert_names(&err, &key_path, "--force");
    assert_eq!(std::fs::read(&key_path).unwrap(), before, "key untouched");

    let err = MeshCa::create("other", 1)
        .unwrap()
        .write(&mesh.dir.path().join("ca"), false)
        .unwrap_err();
    assert!(matches!(err, CertError::Exists { .. }), "{err}");

    leaf.write(&mesh.c1(), true).unwrap();
    assert_ne!(
        std::fs::read(&key_path).unwrap(),
        before,
        "--force replaces the key"
    );
    assert_eq!(mode(&key_path), 0o600);
    mesh.files(LeafKind::Remote).validate_client().unwrap();
}

#[test]
fn an_existing_ca_loaded_from_files_issues_valid_leaves() {
    let mesh = Mesh::new();
    let ca_dir = mesh.dir.path().join("ca");
    let loaded = MeshCa::load(&ca_dir.join("ca.pem"), &ca_dir.join("ca-key.pem")).unwrap();
    assert_eq!(loaded.info().subject, mesh.ca.info().subject);
    let out = mesh.dir.path().join("c2");
    loaded.write_ca_copy(&out, false).unwrap();
    loaded
        .issue(&LeafRequest::new(LeafKind::Remote, "c2", 5))
        .unwrap()
        .write(&out, false)
        .unwrap();
    TlsFiles::in_dir(&out, "remote").validate_client().unwrap();

    // The CA key of another CA does not go with this CA certificate.
    let other = tempfile::tempdir().unwrap();
    MeshCa::create("other", 1)
        .unwrap()
        .write(other.path(), false)
        .unwrap();
    let err = MeshCa::load(&ca_dir.join("ca.pem"), &other.path().join("ca-key.pem")).unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    // A leaf is no CA.
    let err = MeshCa::load(
        &LeafKind::Admin.cert_path(&mesh.c1()),
        &LeafKind::Admin.key_path(&mesh.c1()),
    )
    .unwrap_err();
    assert_names(
        &err,
        &LeafKind::Admin.cert_path(&mesh.c1()),
        "not a CA certificate",
    );
}

#[test]
fn server_certificate_without_sans_is_refused_at_issue() {
    let ca = MeshCa::create("ca", 1).unwrap();
    let err = ca
        .issue(&LeafRequest::new(LeafKind::Server, "c1", 1))
        .unwrap_err();
    assert!(err.to_string().contains("at least one SAN"), "{err}");
    let err = ca
        .issue(&LeafRequest::new(LeafKind::Remote, "c1", 10))
        .unwrap_err();
    assert!(err.to_string().contains("outlive the CA"), "{err}");
}

#[test]
fn missing_and_unreadable_files_are_named() {
    let mesh = Mesh::new();
    let mut files = mesh.files(LeafKind::Remote);
    files.cert = mesh.c1().join("nope.pem");
    let err = files.validate_client().unwrap_err();
    assert!(matches!(err, CertError::Read { .. }), "{err}");
    assert_names(&err, &files.cert, "No such file");

    let mut files = mesh.files(LeafKind::Remote);
    files.ca = mesh.c1().join("missing-ca.pem");
    assert_names(
        &files.validate_client().unwrap_err(),
        &files.ca,
        "cannot read CA file",
    );

    let garbage = mesh.c1().join("garbage.pem");
    std::fs::write(&garbage, "hello\n").unwrap();
    let mut files = mesh.files(LeafKind::Remote);
    files.cert = garbage.clone();
    assert_names(
        &files.validate_client().unwrap_err(),
        &garbage,
        "no CERTIFICATE block",
    );

    // Key and certificate swapped.
    let mut files = mesh.files(LeafKind::Remote);
    std::mem::swap(&mut files.cert, &mut files.key);
    assert_names(
        &files.validate_client().unwrap_err(),
        &files.cert,
        "holds a private key",
    );
}

#[test]
fn key_not_matching_its_certificate() {
    let mesh = Mesh::new();
    let mut files = mesh.files(LeafKind::Remote);
    files.key = LeafKind::Admin.key_path(&mesh.c1());
    let err = files.validate_client().unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    assert_names(&err, &files.key, "does not match certificate file");
    assert_names(&err, &files.cert, "does not match");
    // client_config validates too, before any connection.
    assert!(matches!(
        files.client_config().unwrap_err(),
        CertError::KeyMismatch { .. }
    ));
}

#[test]
fn expired_and_not_yet_valid_certificates() {
    let mesh = Mesh::new();
    let now = OffsetDateTime::now_utc();
    mesh.issue(LeafKind::Remote, |r| {
        r.not_before = now - Duration::days(10);
        r.not_after = now - Duration::days(1);
    });
    let files = mesh.files(LeafKind::Remote);
    let err = files.validate_client().unwrap_err();
    assert!(matches!(err, CertError::Expired { .. }), "{err}");
    assert_names(&err, &files.cert, "certificate expired at");

    mesh.issue(LeafKind::Remote, |r| {
        r.not_before = now + Duration::days(1);
        r.not_after = now + Duration::days(2);
    });
    let err = files.client_config().unwrap_err();
    assert!(matches!(err, CertError::NotYetValid { .. }), "{err}");
    assert_names(&err, &files.cert, "not valid before");
}

#[test]
fn certificate_from_another_ca() {
    let mesh = Mesh::new();
    let other = tempfile::tempdir().unwrap();
    let other_ca = MeshCa::create("some other CA", 5).unwrap();
    other_ca.write_ca_copy(other.path(), false).unwrap();
    other_ca
        .issue(&LeafRequest::new(LeafKind::Remote, "c9", 1))
        .unwrap()
        .write(other.path(), false)
        .unwrap();
    // The other CA's leaf, checked against our CA.
    let files = TlsFiles::new(
        mesh.c1().join("ca.pem"),
        other.path().join("remote.pem"),
        other.path().join("remote-key.pem"),
    );
    let err = files.validate_client().unwrap_err();
    assert!(matches!(err, CertError::UnknownIssuer { .. }), "{err}");
    assert_names(&err, &files.cert, "is not signed by the CA in");
    assert!(
        err.to_string().contains("some other CA"),
        "names the actual issuer: {err}"
    );

    // A directory with another CA's ca.pem is not silently replaced.
    let err = mesh.ca.write_ca_copy(other.path(), false).unwrap_err();
    assert_names(&err, &other.path().join("ca.pem"), "different CA");
}

#[test]
fn wrong_san_for_the_target() {
    let mesh = Mesh::new();
    let files = mesh.files(LeafKind::Server);
    for wrong in ["10.1.2.3", "etcd.c2.mesh"] {
        let err = files.validate_server(&[wrong.to_string()]).unwrap_err();
        assert!(matches!(err, CertError::WrongName { .. }), "{err}");
        assert_names(&err, &files.cert, &format!("not valid for \"{wrong}\""));
        assert!(
            err.to_string().contains("ip:127.0.0.1"),
            "lists the SANs: {err}"
        );
    }
}

#[test]
fn wrong_key_usage() {
    let mesh = Mesh::new();
    // A client certificate used as server certificate: no serverAuth.
    let admin = mesh.files(LeafKind::Admin);
    let err = admin.validate_server(&[]).unwrap_err();
    assert!(matches!(err, CertError::WrongUsage { .. }), "{err}");
    assert_names(&err, &admin.cert, "without serverAuth");
    assert!(admin.server_config().is_err());

    // A server-only certificate (as another tool might issue) used as client: no clientAuth.
    let dir = mesh.c1();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let ca_dir = mesh.dir.path().join("ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("serveronly.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("serveronly-key.pem"), key.serialize_pem()).unwrap();
    let files = TlsFiles::in_dir(&dir, "serveronly");
    files.validate_server(&["127.0.0.1".into()]).unwrap();
    let err = files.validate_client().unwrap_err();
    assert!(matches!(err, CertError::WrongUsage { .. }), "{err}");
    assert_names(&err, &files.cert, "without clientAuth");

    // The CA certificate given as client certificate.
    let files = TlsFiles::new(
        ca_dir.join("ca.pem"),
        ca_dir.join("ca.pem"),
        ca_dir.join("ca-key.pem"),
    );
    assert_names(
        &files.validate_client().unwrap_err(),
        &files.cert,
        "CA certificate, not a leaf",
    );
}
