//! `meshd certs ...` run as a binary: issue, inspect, check, rotate, and the bad-input errors.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{meshd, Mesh};

const CA: [&str; 4] = ["--ca", "mesh-ca/ca.pem", "--ca-key", "mesh-ca/ca-key.pem"];

fn json(run: &common::Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
}

#[test]
fn help_documents_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let help = meshd(dir.path(), &["certs", "--help"]).ok().stdout;
    for sub in ["ca", "issue", "rotate", "inspect", "check"] {
        assert!(help.contains(sub), "certs --help lacks {sub}: {help}");
    }
    let issue = meshd(dir.path(), &["certs", "issue", "--help"]).ok().stdout;
    assert!(
        issue.contains("CN remote-<cluster>")
            && issue.contains("CN node-<cluster>-<node>")
            && issue.contains("--force"),
        "{issue}"
    );
    let bootstrap = meshd(dir.path(), &["etcd", "bootstrap", "--help"])
        .ok()
        .stdout;
    assert!(
        bootstrap.contains("--client-cert-auth") && bootstrap.contains("meshd/synced/"),
        "{bootstrap}"
    );
}

#[test]
fn issue_inspect_and_check_a_cluster() {
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    for kind in ["server", "admin", "remote"] {
        let mode = std::fs::metadata(c1.join(format!("{kind}-key.pem")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{kind} key mode");
    }
    let server = json(
        &mesh
            .run(&["certs", "inspect", "-o", "json", "c1/server.pem"])
            .ok(),
    );
    let cert = &server["certificates"][0];
    assert_eq!(cert["common_name"], "etcd.c1");
    assert_eq!(cert["organizational_unit"], "c1");
    assert_eq!(cert["ip_addresses"][0], "127.0.0.1");
    assert_eq!(cert["dns_names"][0], "localhost");
    assert!(cert["extended_key_usage"]
        .as_array()
        .unwrap()
        .contains(&"serverAuth".into()));
    assert_eq!(cert["issuer"], "CN=meshd mesh CA, O=meshd");
    assert!(cert["not_after"].as_str().unwrap() > cert["not_before"].as_str().unwrap());

    let table = mesh.run(&["certs", "inspect", "c1/remote.pem"]).ok().stdout;
    assert!(
        table.contains("CN=remote-c1, O=meshd, OU=c1") && table.contains("clientAuth"),
        "{table}"
    );
    // A node's certificate names its cluster and node; without --node there is none to issue.
    let node_args = |node: Option<&str>| {
        let mut args = vec![
            "certs",
            "issue",
            "node",
            "--cluster",
            "c1",
            "--out-dir",
            "c1/n1",
            "--ca",
            "mesh-ca/ca.pem",
            "--ca-key",
            "mesh-ca/ca-key.pem",
        ];
        if let Some(n) = node {
            args.extend(["--node", n]);
        }
        mesh.run(&args)
    };
    node_args(None).fails_saying(&["--node"]);
    node_args(Some("N_1")).fails_saying(&["--node", "N_1"]);
    node_args(Some("n1")).ok();
    let node = json(
        &mesh
            .run(&["certs", "inspect", "-o", "json", "c1/n1/node.pem"])
            .ok(),
    );
    assert_eq!(node["certificates"][0]["common_name"], "node-c1-n1");
    assert_eq!(node["certificates"][0]["organizational_unit"], "c1");
    assert!(c1.join("n1/ca.pem").exists());

    mesh.run(&[
        "certs",
        "check",
        "--ca",
        "c1/ca.pem",
        "--cert",
        "c1/server.pem",
        "--key",
        "c1/server-key.pem",
        "--role",
        "server",
        "--name",
        "127.0.0.1",
        "--name",
        "localhost",
    ])
    .ok();
    mesh.run(&[
        "certs",
        "check",
        "--ca",
        "c1/ca.pem",
        "--cert",
        "c1/remote.pem",
        "--key",
        "c1/remote-key.pem",
    ])
    .ok();
}

#[test]
fn keys_are_not_overwritten_without_force() {
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let before = std::fs::read(c1.join("remote-key.pem")).unwrap();
    let mut args = vec![
        "certs",
        "issue",
        "remote",
        "--cluster",
        "c1",
        "--out-dir",
        "c1",
    ];
    args.extend(CA);
    mesh.run(&args)
        .fails_saying(&["c1/remote-key.pem", "already exists", "--force"]);
    assert_eq!(std::fs::read(c1.join("remote-key.pem")).unwrap(), before);
    mesh.run(&["certs", "ca", "create", "--out-dir", "mesh-ca"])
        .fails_saying(&["mesh-ca/ca-key.pem", "already exists"]);

    args.push("--force");
    mesh.run(&args).ok();
    assert_ne!(std::fs::read(c1.join("remote-key.pem")).unwrap(), before);
}

#[test]
fn issue_refuses_bad_requests() {
    let mesh = Mesh::new();
    let mut args = vec![
        "certs",
        "issue",
        "server",
        "--cluster",
        "c1",
        "--out-dir",
        "c1",
    ];
    args.extend(CA);
    mesh.run(&args).fails_saying(&["--dns", "--ip"]);
    let mut args = vec![
        "certs",
        "issue",
        "remote",
        "--cluster",
        "Bad_Name",
        "--out-dir",
        "x",
    ];
    args.extend(CA);
    mesh.run(&args).fails_saying(&["not a valid cluster name"]);
    let mut args = vec![
        "certs",
        "issue",
        "admin",
        "--cluster",
        "c1",
        "--out-dir",
        "c1",
        "--ip",
        "10.0.0.1",
    ];
    args.extend(CA);
    mesh.run(&args).fails_saying(&["server certificates only"]);
    let args = [
        "certs",
        "issue",
        "admin",
        "--cluster",
        "c1",
        "--out-dir",
        "c1",
        "--ca",
        "mesh-ca/ca.pem",
        "--ca-key",
        "mesh-ca/nope.pem",
    ];
    mesh.run(&args)
        .fails_saying(&["mesh-ca/nope.pem", "cannot read"]);
}

#[test]
fn rotate_replaces_key_and_certificate_and_keeps_the_subject() {
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let before = json(
        &mesh
            .run(&["certs", "inspect", "-o", "json", "c1/server.pem"])
            .ok(),
    )["certificates"][0]
        .clone();
    let key_before = std::fs::read(c1.join("server-key.pem")).unwrap();
    let mut args = vec!["certs", "rotate", "server", "--out-dir", "c1", "-o", "json"];
    args.extend(CA);
    let rotated = json(&mesh.run(&args).ok());
    assert_eq!(rotated[0]["kind"], "server");
    let after = json(
        &mesh
            .run(&["certs", "inspect", "-o", "json", "c1/server.pem"])
            .ok(),
    )["certificates"][0]
        .clone();
    assert_ne!(after["serial"], before["serial"]);
    for same in ["subject", "dns_names", "ip_addresses", "extended_key_usage"] {
        assert_eq!(after[same], before[same], "{same} kept");
    }
    assert_ne!(
        std::fs::read(c1.join("server-key.pem")).unwrap(),
        key_before
    );
    assert_eq!(
        std::fs::metadata(c1.join("server-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    mesh.run(&[
        "certs",
        "check",
        "--ca",
        "c1/ca.pem",
        "--cert",
        "c1/server.pem",
        "--key",
        "c1/server-key.pem",
        "--role",
        "server",
        "--name",
        "127.0.0.1",
    ])
    .ok();

    // Rotating under another CA is refused: the directory's certificates are not its own.
    meshd(
        mesh.path(),
        &[
            "certs",
            "ca",
            "create",
            "--out-dir",
            "other-ca",
            "--name",
            "other CA",
        ],
    )
    .ok();
    mesh.run(&[
        "certs",
        "rotate",
        "all",
        "--out-dir",
        "c1",
        "--ca",
        "other-ca/ca.pem",
        "--ca-key",
        "other-ca/ca-key.pem",
    ])
    .fails_saying(&["c1/server.pem", "not signed by the CA in other-ca/ca.pem"]);
    let mut args = vec!["certs", "rotate", "remote", "--out-dir", "c9"];
    args.extend(CA);
    mesh.run(&args)
        .fails_saying(&["c9/remote.pem", "nothing to rotate"]);
}

#[test]
fn check_names_the_file_and_the_reason() {
    let mesh = Mesh::new();
    mesh.issue_cluster("c1");
    let check = |ca: &str, cert: &str, key: &str, extra: &[&str]| {
        let mut args = vec!["certs", "check", "--ca", ca, "--cert", cert, "--key", key];
        args.extend(extra);
        mesh.run(&args)
    };
    check("c1/ca.pem", "c1/missing.pem", "c1/remote-key.pem", &[])
        .fails_saying(&["c1/missing.pem", "No such file"]);
    check("c1/ca.pem", "c1/remote-key.pem", "c1/remote.pem", &[])
        .fails_saying(&["c1/remote-key.pem", "holds a private key"]);
    check("c1/ca.pem", "c1/remote.pem", "c1/admin-key.pem", &[]).fails_saying(&[
        "c1/admin-key.pem",
        "does not match certificate file c1/remote.pem",
    ]);
    check(
        "c1/ca.pem",
        "c1/admin.pem",
        "c1/admin-key.pem",
        &["--role", "server"],
    )
    .fails_saying(&[
        "c1/admin.pem",
        "incompatible key usage",
        "without serverAuth",
    ]);
    check(
        "c1/ca.pem",
        "c1/server.pem",
        "c1/server-key.pem",
        &["--role", "server", "--name", "10.9.9.9"],
    )
    .fails_saying(&[
        "c1/server.pem",
        "not valid for \"10.9.9.9\"",
        "ip:127.0.0.1",
    ]);

    // A cluster of another mesh.
    meshd(
        mesh.path(),
        &[
            "certs",
            "ca",
            "create",
            "--out-dir",
            "other-ca",
            "--name",
            "other CA",
        ],
    )
    .ok();
    mesh.run(&[
        "certs",
        "issue",
        "remote",
        "--cluster",
        "x",
        "--out-dir",
        "x",
        "--ca",
        "other-ca/ca.pem",
        "--ca-key",
        "other-ca/ca-key.pem",
    ])
    .ok();
    check("c1/ca.pem", "x/remote.pem", "x/remote-key.pem", &[]).fails_saying(&[
        "x/remote.pem",
        "not signed by the CA in c1/ca.pem",
        "other CA",
    ]);

    // An expired certificate (issued through the library: the CLI issues from now on).
    let ca = meshd_certs::MeshCa::load(
        &mesh.path().join("mesh-ca/ca.pem"),
        &mesh.path().join("mesh-ca/ca-key.pem"),
    )
    .unwrap();
    let mut req = meshd_certs::LeafRequest::new(meshd_certs::LeafKind::Remote, "old", 1);
    req.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    req.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    ca.write_ca_copy(&mesh.path().join("old"), false).unwrap();
    ca.issue(&req)
        .unwrap()
        .write(&mesh.path().join("old"), false)
        .unwrap();
    check("old/ca.pem", "old/remote.pem", "old/remote-key.pem", &[])
        .fails_saying(&["old/remote.pem", "certificate expired at"]);
}

#[test]
fn check_warns_of_certificates_expiring_soon() {
    let mesh = Mesh::new();
    let mut args = vec![
        "certs",
        "issue",
        "remote",
        "--cluster",
        "c1",
        "--out-dir",
        "c1",
        "--days",
        "10",
    ];
    args.extend(CA);
    mesh.run(&args).ok();
    let check = |min: &str| {
        mesh.run(&[
            "certs",
            "check",
            "--ca",
            "c1/ca.pem",
            "--cert",
            "c1/remote.pem",
            "--key",
            "c1/remote-key.pem",
            "--min-days",
            min,
            "-o",
            "json",
        ])
    };
    let ok = json(&check("5").ok());
    assert!(ok["days_left"].as_i64().unwrap() >= 9, "{ok}");
    check("30").fails_saying(&["c1/remote.pem", "expires at", "--min-days 30"]);
    // The CA (3650 days) is checked too.
    check("4000").fails_saying(&["CA file c1/ca.pem", "meshd mesh CA"]);
}

#[test]
fn moving_a_cluster_to_a_new_ca_goes_through_a_bundle() {
    let mesh = Mesh::new();
    mesh.issue_cluster("c1");
    mesh.run(&[
        "certs",
        "ca",
        "create",
        "--out-dir",
        "new-ca",
        "--name",
        "new CA",
    ])
    .ok();
    let rotate = || {
        mesh.run(&[
            "certs",
            "rotate",
            "remote",
            "--out-dir",
            "c1",
            "--ca",
            "new-ca/ca.pem",
            "--ca-key",
            "new-ca/ca-key.pem",
            "--change-ca",
        ])
    };
    // Peers would refuse certificates of a CA their ca.pem does not trust yet.
    rotate().fails_saying(&["does not trust", "meshd certs ca trust"]);
    // Nor can the last CA go.
    mesh.run(&[
        "certs",
        "ca",
        "trust",
        "--file",
        "c1/ca.pem",
        "--remove",
        "mesh-ca/ca.pem",
    ])
    .fails_saying(&["trusting none"]);
    let added = json(
        &mesh
            .run(&[
                "certs",
                "ca",
                "trust",
                "--file",
                "c1/ca.pem",
                "--add",
                "new-ca/ca.pem",
                "-o",
                "json",
            ])
            .ok(),
    );
    assert_eq!(added["added"], 1, "{added}");
    assert_eq!(added["trusted"].as_array().unwrap().len(), 2, "{added}");
    rotate().ok();
    let remote = json(
        &mesh
            .run(&["certs", "inspect", "-o", "json", "c1/remote.pem"])
            .ok(),
    );
    assert_eq!(
        remote["certificates"][0]["issuer"], "CN=new CA, O=meshd",
        "{remote}"
    );
    assert_eq!(
        remote["certificates"][0]["common_name"], "remote-c1",
        "{remote}"
    );
    // The bundle stays as it is when the new CA issues into the directory.
    let bundle = std::fs::read_to_string(mesh.path().join("c1/ca.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    let removed = json(
        &mesh
            .run(&[
                "certs",
                "ca",
                "trust",
                "--file",
                "c1/ca.pem",
                "--remove",
                "mesh-ca/ca.pem",
                "-o",
                "json",
            ])
            .ok(),
    );
    assert_eq!(removed["removed"], 1, "{removed}");
    assert_eq!(
        removed["trusted"],
        serde_json::json!(["CN=new CA, O=meshd"]),
        "{removed}"
    );
}
