//! `meshd troubleshoot clustermesh` against a real etcd with TLS and client-certificate auth:
//! one test per cause it must name (missing read permission, wrong cluster id, wrong CA, expired
//! certificate, unreachable endpoint), and a clean bill once everything is right.

mod common;

use std::path::Path;

use common::{bootstrapped_etcd, clustermesh, Mesh, Run};

/// c1's etcd, as its apiserver and agents leave it: the cluster config and every sync canary.
fn seeded_c1(mesh: &Mesh) -> (std::path::PathBuf, meshd_testing::etcd::Etcd) {
    let c1 = mesh.issue_cluster("c1");
    let etcd = bootstrapped_etcd(mesh, &c1);
    etcd.etcdctl(&["put", "meshd/cluster-config/c1", r#"{"name":"c1","id":1}"#])
        .unwrap();
    for kind in ["nodes", "ip", "identities", "services"] {
        etcd.etcdctl(&[
            "put",
            &format!("meshd/synced/c1/{kind}"),
            r#"{"synced_at_ms":1}"#,
        ])
        .unwrap();
    }
    (c1, etcd)
}

/// c2's agent config and its remote file for c1 (read with c2's remote certificate).
fn c2_node(mesh: &Mesh, endpoint: &str, cluster_id: u32, ca: &Path) -> std::path::PathBuf {
    let c2 = mesh.path().join("c2");
    let remotes = mesh.path().join("c2-remotes");
    std::fs::create_dir_all(&remotes).unwrap();
    std::fs::write(
        remotes.join("c1"),
        format!(
            "endpoints: [{endpoint}]\nca: {}\ncert: {}\nkey: {}\n",
            ca.display(),
            c2.join("remote.pem").display(),
            c2.join("remote-key.pem").display()
        ),
    )
    .unwrap();
    let config = mesh.path().join("c2-agent.yaml");
    std::fs::write(
        &config,
        format!(
            "cluster: c2\ncluster_id: {cluster_id}\nremote_clusters_dir: {}\n",
            remotes.display()
        ),
    )
    .unwrap();
    config
}

fn troubleshoot(mesh: &Mesh, config: &Path) -> (Run, Vec<serde_json::Value>) {
    let run = mesh.run(&[
        "troubleshoot",
        "clustermesh",
        "--config",
        config.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let checks: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", run.stdout, run.stderr));
    let checks = checks["checks"].as_array().unwrap().clone();
    (run, checks)
}

/// The failed checks, as `check: detail / fix` lines.
fn failures(checks: &[serde_json::Value]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| format!("{}: {} / {}", c["check"], c["detail"], c["fix"]))
        .collect()
}

#[test]
fn permission_then_a_clean_bill_then_a_duplicate_id() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let (c1, etcd) = seeded_c1(&mesh);
    mesh.issue_cluster("c2");
    let config = c2_node(&mesh, &etcd.endpoint(), 2, &mesh.path().join("c2/ca.pem"));

    // c1 never connected c2: the reads are refused, and the fix names the command.
    let (run, checks) = troubleshoot(&mesh, &config);
    assert_ne!(run.code, 0);
    let failed = failures(&checks);
    assert!(
        failed.iter().any(|f| f.contains("read meshd/state/")
            && f.contains("permission denied")
            && f.contains("meshd clustermesh connect c2")),
        "{failed:?}"
    );
    // DNS, TCP and TLS passed on the way there.
    for check in ["remote file", "certificate"] {
        assert!(
            checks
                .iter()
                .any(|c| c["check"] == check && c["ok"] == true),
            "{check}: {checks:?}"
        );
    }
    assert!(checks
        .iter()
        .any(|c| c["check"].as_str().unwrap().starts_with("tls ") && c["ok"] == true));

    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    let (run, checks) = troubleshoot(&mesh, &config);
    assert_eq!(run.code, 0, "{:?}", failures(&checks));
    // The table says the same, keys never appear.
    let table = mesh.run(&[
        "troubleshoot",
        "clustermesh",
        "c1",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(table.code, 0, "{}", table.stdout);
    assert!(table.stdout.contains("sync canaries"), "{}", table.stdout);
    assert!(!table.stdout.contains("PRIVATE KEY"), "{}", table.stdout);

    // This node's cluster claims c1's id.
    let config = c2_node(&mesh, &etcd.endpoint(), 1, &mesh.path().join("c2/ca.pem"));
    let (run, checks) = troubleshoot(&mesh, &config);
    assert_ne!(run.code, 0);
    let failed = failures(&checks);
    assert!(
        failed
            .iter()
            .any(|f| f.contains("cluster config") && f.contains("own id")),
        "{failed:?}"
    );
}

#[test]
fn wrong_ca_expired_certificate_and_unreachable_endpoint() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let (c1, etcd) = seeded_c1(&mesh);
    mesh.issue_cluster("c2");
    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();

    // A CA file of another mesh.
    mesh.run(&["certs", "ca", "create", "--out-dir", "other-ca"])
        .ok();
    let config = c2_node(
        &mesh,
        &etcd.endpoint(),
        2,
        &mesh.path().join("other-ca/ca.pem"),
    );
    let (run, checks) = troubleshoot(&mesh, &config);
    assert_ne!(run.code, 0);
    let failed = failures(&checks);
    assert!(
        failed
            .iter()
            .any(|f| f.contains("other-ca/ca.pem") && f.contains("not signed by the CA")),
        "{failed:?}"
    );

    // Nobody listens on that port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = c2_node(
        &mesh,
        &format!("https://127.0.0.1:{port}"),
        2,
        &mesh.path().join("c2/ca.pem"),
    );
    let (run, checks) = troubleshoot(&mesh, &config);
    assert_ne!(run.code, 0);
    let failed = failures(&checks);
    assert!(
        failed
            .iter()
            .any(|f| f.contains(&format!("tcp 127.0.0.1:{port}")) && f.contains("refused")),
        "{failed:?}"
    );

    // c2's remote certificate expired yesterday.
    let ca = meshd_certs::MeshCa::load(
        &mesh.path().join("mesh-ca/ca.pem"),
        &mesh.path().join("mesh-ca/ca-key.pem"),
    )
    .unwrap();
    let mut old = meshd_certs::LeafRequest::new(meshd_certs::LeafKind::Remote, "c2", 1);
    let now = time::OffsetDateTime::now_utc();
    old.not_before = now - time::Duration::days(3);
    old.not_after = now - time::Duration::days(1);
    ca.issue(&old)
        .unwrap()
        .write(&mesh.path().join("c2"), true)
        .unwrap();
    let config = c2_node(&mesh, &etcd.endpoint(), 2, &mesh.path().join("c2/ca.pem"));
    let (run, checks) = troubleshoot(&mesh, &config);
    assert_ne!(run.code, 0);
    let failed = failures(&checks);
    assert!(
        failed.iter().any(|f| f.contains("certificate")
            && f.contains("expired")
            && f.contains("meshd certs rotate remote")),
        "{failed:?}"
    );
}
