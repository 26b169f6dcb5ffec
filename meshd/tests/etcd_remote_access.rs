//! A real etcd with TLS and client-certificate auth, bootstrapped by `meshd etcd bootstrap`:
//! what another cluster's `remote` certificate may do once connected, what a node certificate
//! may do, that one cluster's credentials open no other cluster, disconnecting, who is refused,
//! and rotation under a running watcher.

mod common;

use std::time::Duration;

use common::{as_admin, bootstrapped_etcd, clustermesh, connect, files, Mesh};
use etcd_client::{GetOptions, WatchOptions};

const DEADLINE: Duration = Duration::from_secs(30);

/// The keys of the schema the tests read and write, one per prefix.
const NODE: &str = "meshd/state/nodes/v1/c1/n1";
const SYNCED: &str = "meshd/synced/c1/nodes";
const CLUSTER_CONFIG: &str = "meshd/cluster-config/c1";
const POLICY: &str = "meshd/config/policies/v1/default/p";

async fn seed(admin: &mut etcd_client::Client) {
    for key in [NODE, SYNCED, CLUSTER_CONFIG, POLICY] {
        admin
            .put(key, "{}", None)
            .await
            .unwrap_or_else(|e| panic!("admin put {key}: {e}"));
    }
}

/// etcd refused: "permission denied", or for auth management by a CN that is no user, "user
/// name not found".
fn is_denied(r: Result<impl std::fmt::Debug, etcd_client::Error>) -> bool {
    match r {
        Err(e) => {
            let e = e.to_string();
            e.contains("permission denied") || e.contains("user name not found")
        }
        Ok(v) => panic!("expected permission denied, got {v:?}"),
    }
}

/// Waits for a put of `key` on the watch stream.
async fn next_put(stream: &mut etcd_client::WatchStream, key: &str) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let resp = stream
                .message()
                .await
                .expect("watch stream")
                .expect("watch stream open");
            assert!(!resp.canceled(), "watch canceled: {}", resp.cancel_reason());
            if resp
                .events()
                .iter()
                .any(|e| e.kv().map(|kv| kv.key()) == Some(key.as_bytes()))
            {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event for {key}"));
}

#[tokio::test(flavor = "current_thread")]
async fn remote_lists_and_watches_shared_state_and_nothing_else() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let c2 = mesh.issue_cluster("c2");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    // Bootstrap is idempotent: a second run changes nothing.
    let again = as_admin(
        &mesh,
        &etcd,
        &c1,
        &["etcd", "bootstrap", "--node", "n1", "-o", "json"],
    )
    .ok();
    let again: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(again["changes"], 0, "{again}");

    let mut admin = connect(&etcd, files(&c1, "admin")).await.unwrap().client();
    seed(&mut admin).await;
    // c2 reads c1 with its own remote certificate (remote-c2), once c1 connected it.
    let mut remote = connect(&etcd, files(&c2, "remote"))
        .await
        .expect("remote connects")
        .client();
    assert!(is_denied(remote.get(NODE, None).await), "not connected yet");
    let connected = clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    let connected: serde_json::Value = serde_json::from_str(&connected.stdout).unwrap();
    assert_eq!(
        connected["connected"],
        serde_json::json!(["c2"]),
        "{connected}"
    );

    // Reads of the shared prefixes.
    let listed = remote
        .get("meshd/state/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(listed.kvs().len(), 1);
    assert_eq!(listed.kvs()[0].key(), NODE.as_bytes());
    for prefix in ["meshd/synced/", "meshd/cluster-config/"] {
        let got = remote
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(got.kvs().len(), 1, "{prefix}");
    }
    // Watch from after the list, then see the admin's next write.
    let mut watch = remote
        .watch(
            "meshd/state/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(listed.header().unwrap().revision() + 1),
            ),
        )
        .await
        .unwrap();
    admin
        .put("meshd/state/nodes/v1/c1/n2", "{}", None)
        .await
        .unwrap();
    next_put(&mut watch, "meshd/state/nodes/v1/c1/n2").await;

    // Nothing else: no writes anywhere, no reads outside the shared prefixes.
    for key in [NODE, SYNCED, CLUSTER_CONFIG, POLICY, "elsewhere"] {
        assert!(is_denied(remote.put(key, "x", None).await), "put {key}");
        assert!(is_denied(remote.delete(key, None).await), "delete {key}");
    }
    assert!(is_denied(
        remote
            .get("meshd/config/", Some(GetOptions::new().with_prefix()))
            .await
    ));
    assert!(is_denied(remote.get(POLICY, None).await));
    assert!(
        is_denied(
            remote
                .get("meshd/", Some(GetOptions::new().with_prefix()))
                .await
        ),
        "the whole tree is not readable"
    );
    // A watch outside the shared prefixes is canceled by etcd.
    let mut denied = remote
        .watch("meshd/config/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, denied.message())
        .await
        .unwrap();
    match resp {
        Ok(Some(r)) => assert!(
            r.canceled(),
            "watch of meshd/config/ must be canceled: {r:?}"
        ),
        Ok(None) => {}
        Err(e) => assert!(e.to_string().contains("permission denied"), "{e}"),
    }
    // The admin still writes everywhere.
    admin.put(POLICY, "{\"v\":2}", None).await.unwrap();

    // The mesh CA no longer issues a client certificate whose name is valid in every cluster.
    for cn in ["root", "remote", "admin", "admin-c2"] {
        mesh.run(&[
            "certs",
            "issue",
            "admin",
            "--cn",
            cn,
            "--cluster",
            "c1",
            "--out-dir",
            "c1-component",
            "--ca",
            "mesh-ca/ca.pem",
            "--ca-key",
            "mesh-ca/ca-key.pem",
        ])
        .fails_saying(&[cn]);
    }
}

/// The cache of remote clusters (`meshd/cache/`, written by the apiserver's mirror with the
/// admin certificate) and the mirror's status: nodes read both and write neither; a connected
/// remote cluster reads neither (the cache is never re-exported).
#[tokio::test(flavor = "current_thread")]
async fn the_cache_is_read_locally_and_never_exported() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let c2 = mesh.issue_cluster("c2");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    let cached = "meshd/cache/c3/state/nodes/v1/c3/n1";
    let status = "meshd/cache-status/v1/c3";
    let mut admin = connect(&etcd, files(&c1, "admin")).await.unwrap().client();
    seed(&mut admin).await;
    for key in [cached, status] {
        admin
            .put(key, "{}", None)
            .await
            .unwrap_or_else(|e| panic!("admin (the mirror) put {key}: {e}"));
    }
    let n1 = issue_node(&mesh, "c1", "n1");
    let mut node = connect(&etcd, files(&n1, "node")).await.unwrap().client();
    let mut remote = connect(&etcd, files(&c2, "remote")).await.unwrap().client();
    // The remote reads the shared state (it is connected)...
    remote
        .get(NODE, None)
        .await
        .expect("connected remote reads");
    for (key, prefix) in [(cached, "meshd/cache/"), (status, "meshd/cache-status/")] {
        let got = node
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("node lists {prefix}: {e}"));
        assert_eq!(got.kvs().len(), 1, "{prefix}");
        assert!(is_denied(node.put(key, "x", None).await), "node put {key}");
        // ... and nothing of the cache.
        assert!(is_denied(remote.get(key, None).await), "remote get {key}");
        assert!(
            is_denied(
                remote
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
            ),
            "remote lists {prefix}"
        );
        assert!(
            is_denied(remote.put(key, "x", None).await),
            "remote put {key}"
        );
    }
}

/// The etcd of a second cluster, from the same mesh CA, bootstrapped with node n1.
fn second_cluster(mesh: &Mesh) -> (std::path::PathBuf, meshd_testing::etcd::Etcd) {
    let c2 = mesh.issue_cluster("c2");
    let etcd = bootstrapped_etcd(mesh, &c2);
    (c2, etcd)
}

/// `meshd certs issue node` of `node` in `cluster`, into `<cluster>/<node>/`.
fn issue_node(mesh: &Mesh, cluster: &str, node: &str) -> std::path::PathBuf {
    let dir = format!("{cluster}/{node}");
    mesh.run(&[
        "certs",
        "issue",
        "node",
        "--cluster",
        cluster,
        "--node",
        node,
        "--out-dir",
        &dir,
        "--ca",
        "mesh-ca/ca.pem",
        "--ca-key",
        "mesh-ca/ca-key.pem",
    ])
    .ok();
    mesh.path().join(dir)
}

#[tokio::test(flavor = "current_thread")]
async fn one_clusters_credentials_open_no_other_cluster() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let etcd1 = bootstrapped_etcd(&mesh, &c1);
    let (c2, etcd2) = second_cluster(&mesh);
    let mut admin1 = connect(&etcd1, files(&c1, "admin")).await.unwrap().client();
    seed(&mut admin1).await;

    // c2's admin certificate, from the same CA, neither reads nor writes c1.
    let mut admin2_in_c1 = connect(&etcd1, files(&c2, "admin")).await.unwrap().client();
    assert!(is_denied(admin2_in_c1.get(NODE, None).await));
    assert!(is_denied(
        admin2_in_c1.put("meshd/state/attack", "x", None).await
    ));
    assert!(is_denied(admin2_in_c1.put(POLICY, "x", None).await));
    assert!(is_denied(
        admin2_in_c1.auth_client().user_add("x", "", None).await
    ));
    // ... while c1's admin does everything in c1, and nothing in c2.
    admin1.put("meshd/state/attack", "x", None).await.unwrap();
    admin1.delete("meshd/state/attack", None).await.unwrap();
    let mut admin1_in_c2 = connect(&etcd2, files(&c1, "admin")).await.unwrap().client();
    assert!(is_denied(
        admin1_in_c2.put("meshd/state/attack", "x", None).await
    ));
    assert!(is_denied(admin1_in_c2.get(NODE, None).await));

    // Node n1 of c1: its own records and the cluster's endpoints and identities.
    let n1 = issue_node(&mesh, "c1", "n1");
    let mut node = connect(&etcd1, files(&n1, "node")).await.unwrap().client();
    for key in [
        "meshd/state/nodes/v1/c1/n1",
        "meshd/state/ip/v1/c1/10.1.1.5",
        "meshd/state/identities/v1/c1/id/300",
        "meshd/state/identity-labels/v1/c1/app=web",
        "meshd/synced/c1/nodes",
        "meshd/synced/c1/ip",
        "meshd/synced/c1/identities",
    ] {
        node.put(key, "{}", None)
            .await
            .unwrap_or_else(|e| panic!("node put {key}: {e}"));
        node.delete(key, None)
            .await
            .unwrap_or_else(|e| panic!("node delete {key}: {e}"));
    }
    // It reads what agents watch: state, canaries, cluster config, policies.
    for key in [NODE, SYNCED, CLUSTER_CONFIG, POLICY] {
        node.get(key, None)
            .await
            .unwrap_or_else(|e| panic!("node get {key}: {e}"));
    }
    // And writes nothing else: no config, services, cluster config, other nodes, the
    // apiserver's canary, users.
    for key in [
        POLICY,
        "meshd/config/services/v1/default/web",
        CLUSTER_CONFIG,
        "meshd/state/services/v1/c1/default/web",
        "meshd/state/nodes/v1/c1/n2",
        "meshd/synced/c1/services",
        "meshd/state/ip/v1/c2/10.2.1.5",
        "elsewhere",
    ] {
        assert!(is_denied(node.put(key, "x", None).await), "node put {key}");
    }
    assert!(is_denied(
        node.get(
            "meshd/config/services/",
            Some(GetOptions::new().with_prefix())
        )
        .await
    ));
    assert!(is_denied(node.auth_client().role_add("sneaky").await));
    // Nothing at all in c2.
    let mut node_in_c2 = connect(&etcd2, files(&n1, "node")).await.unwrap().client();
    assert!(is_denied(node_in_c2.get(NODE, None).await));
    assert!(is_denied(
        node_in_c2
            .put("meshd/state/nodes/v1/c1/n1", "x", None)
            .await
    ));
    assert!(is_denied(
        node_in_c2
            .put("meshd/state/nodes/v1/c2/n1", "x", None)
            .await
    ));
    // A node the cluster never added has no user.
    let n9 = issue_node(&mesh, "c1", "n9");
    let mut stranger = connect(&etcd1, files(&n9, "node")).await.unwrap().client();
    assert!(is_denied(stranger.get(NODE, None).await));
}

#[tokio::test(flavor = "current_thread")]
async fn disconnect_cuts_off_one_cluster_and_connect_restores_it() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let c2 = mesh.issue_cluster("c2");
    let c3 = mesh.issue_cluster("c3");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    let mut admin = connect(&etcd, files(&c1, "admin")).await.unwrap().client();
    seed(&mut admin).await;
    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    clustermesh(&mesh, &etcd, &c1, "connect", "c3").ok();
    let mut r2 = connect(&etcd, files(&c2, "remote")).await.unwrap().client();
    let mut r3 = connect(&etcd, files(&c3, "remote")).await.unwrap().client();
    r2.get(NODE, None).await.expect("c2 reads c1");
    r3.get(NODE, None).await.expect("c3 reads c1");

    let out = clustermesh(&mesh, &etcd, &c1, "disconnect", "c2").ok();
    let out: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(out["changes"], 1, "{out}");
    assert_eq!(out["connected"], serde_json::json!(["c3"]), "{out}");
    assert!(is_denied(r2.get(NODE, None).await), "c2 is cut off");
    // A new watch is canceled by etcd.
    let mut denied = r2
        .watch("meshd/state/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    match tokio::time::timeout(DEADLINE, denied.message())
        .await
        .unwrap()
    {
        Ok(Some(r)) => assert!(r.canceled(), "watch after disconnect: {r:?}"),
        Ok(None) => {}
        Err(e) => assert!(e.to_string().contains("permission denied"), "{e}"),
    }
    r3.get(NODE, None).await.expect("c3 still reads c1");
    // Again: nothing to do, and it says so.
    let again = clustermesh(&mesh, &etcd, &c1, "disconnect", "c2").ok();
    let again: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(again["changes"], 0, "{again}");
    // A cluster cannot disconnect itself.
    clustermesh(&mesh, &etcd, &c1, "disconnect", "c1").fails_saying(&["own cluster"]);

    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    r2.get(NODE, None).await.expect("c2 reads c1 again");
}

#[tokio::test(flavor = "current_thread")]
async fn certificates_from_before_per_cluster_names_are_refused() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    let legacy = mesh.path().join("legacy");
    for (cn, stem) in [("root", "admin"), ("remote", "remote")] {
        meshd_testing::legacy_certs::issue_client(
            &mesh.path().join("mesh-ca/ca.pem"),
            &mesh.path().join("mesh-ca/ca-key.pem"),
            cn,
            "c1",
            &legacy,
            stem,
        )
        .unwrap();
    }
    std::fs::copy(c1.join("ca.pem"), legacy.join("ca.pem")).unwrap();
    // Our commands refuse them before connecting, naming the command that re-issues them.
    let run = mesh.run(&[
        "etcd",
        "bootstrap",
        "--endpoints",
        &etcd.endpoint(),
        "--ca",
        "legacy/ca.pem",
        "--cert",
        "legacy/admin.pem",
        "--key",
        "legacy/admin-key.pem",
    ]);
    run.fails_saying(&["legacy/admin.pem", "meshd certs issue admin --cluster c1"]);
    // etcd itself: bootstrap removed meshd's old users, so the old remote certificate reads
    // nothing. (User root stays, as etcd requires; the mesh issues no certificate named root.)
    etcd.etcdctl(&["user", "add", "remote", "--no-password"])
        .unwrap();
    etcd.etcdctl(&["user", "grant-role", "remote", "remote"])
        .unwrap();
    let mut old = connect(&etcd, files(&legacy, "remote"))
        .await
        .unwrap()
        .client();
    old.get(NODE, None)
        .await
        .expect("the old user reads before the upgrade");
    let out = as_admin(&mesh, &etcd, &c1, &["etcd", "bootstrap", "--node", "n1"]).ok();
    assert!(out.stdout.contains("delete user remote"), "{}", out.stdout);
    assert!(is_denied(old.get(NODE, None).await));
}

#[tokio::test(flavor = "current_thread")]
async fn other_ca_and_plaintext_clients_are_refused() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let etcd = bootstrapped_etcd(&mesh, &c1);

    // A client of another mesh, even named like this cluster's admin: our own check refuses it
    // before connecting...
    mesh.run(&[
        "certs",
        "ca",
        "create",
        "--out-dir",
        "evil-ca",
        "--name",
        "evil CA",
    ])
    .ok();
    mesh.run(&[
        "certs",
        "issue",
        "admin",
        "--cluster",
        "c1",
        "--out-dir",
        "evil",
        "--ca",
        "evil-ca/ca.pem",
        "--ca-key",
        "evil-ca/ca-key.pem",
    ])
    .ok();
    let mut foreign = files(&mesh.path().join("evil"), "admin");
    foreign.ca = c1.join("ca.pem");
    let err = connect(&etcd, foreign.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("evil/admin.pem") && err.contains("not signed by the CA"),
        "{err}"
    );
    // ... and etcd refuses it in the handshake (etcdctl does no such check of its own).
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "--dial-timeout=3s",
            "--command-timeout=5s",
        ])
        .arg("--cacert")
        .arg(&foreign.ca)
        .arg("--cert")
        .arg(&foreign.cert)
        .arg("--key")
        .arg(&foreign.key)
        .args(["get", NODE])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "etcd accepted a certificate of another CA"
    );
    // Control: the same etcdctl call with our admin certificate works.
    etcd.etcdctl(&["get", NODE]).unwrap();
    // The other way round: a consistent set of another mesh does not trust this etcd, and the
    // error says so with the file, not just "UnknownIssuer".
    let run = mesh.run(&[
        "etcd",
        "bootstrap",
        "--endpoints",
        &etcd.endpoint(),
        "--ca",
        "evil/ca.pem",
        "--cert",
        "evil/admin.pem",
        "--key",
        "evil/admin-key.pem",
    ]);
    run.fails_saying(&["the certificate of 127.0.0.1 is not signed by the CA in evil/ca.pem"]);

    // Plaintext gRPC to the TLS port.
    let plain = format!("http://127.0.0.1:{}", etcd.client_url_port());
    let result = tokio::time::timeout(DEADLINE, async {
        let mut client = etcd_client::Client::connect([plain.as_str()], None).await?;
        client.get(NODE, None).await
    })
    .await
    .expect("plaintext attempt ends");
    assert!(
        result.is_err(),
        "plaintext client got an answer: {result:?}"
    );
    // Our client refuses a plaintext endpoint with TLS files configured.
    let config = meshd_kvstore::EtcdConfig::new([plain]).with_tls(files(&c1, "admin"));
    assert!(meshd_kvstore::connect(&config).await.is_err());
    // TLS without a client certificate.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "--dial-timeout=3s",
            "--command-timeout=5s",
        ])
        .arg("--cacert")
        .arg(c1.join("ca.pem"))
        .args(["get", NODE])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "etcd answered a client without certificate"
    );
}

/// The remote certificate is rotated while a watcher runs on a connection made with the old one.
/// The old certificate expires soon after, so a connection that succeeds afterwards proves the
/// new files were used; the old connection's watch keeps delivering events.
#[tokio::test(flavor = "current_thread")]
async fn rotation_under_a_running_watcher() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    // c2 reads c1; its remote certificate is replaced with one that expires in a few seconds.
    let c2 = mesh.issue_cluster("c2");
    let ca = meshd_certs::MeshCa::load(
        &mesh.path().join("mesh-ca/ca.pem"),
        &mesh.path().join("mesh-ca/ca-key.pem"),
    )
    .unwrap();
    let mut short = meshd_certs::LeafRequest::new(meshd_certs::LeafKind::Remote, "c2", 1);
    // Long enough for etcd's start, bootstrap, connect and the first watch on a loaded CI
    // machine (the reader must connect before it expires); the test waits it out below.
    let old_not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(15);
    short.not_after = old_not_after;
    ca.issue(&short).unwrap().write(&c2, true).unwrap();
    let old_copy = mesh.path().join("old");
    std::fs::create_dir_all(&old_copy).unwrap();
    for f in ["ca.pem", "remote.pem", "remote-key.pem"] {
        std::fs::copy(c2.join(f), old_copy.join(f)).unwrap();
    }

    let etcd = bootstrapped_etcd(&mesh, &c1);
    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    let mut admin = connect(&etcd, files(&c1, "admin")).await.unwrap().client();
    seed(&mut admin).await;

    // A remote reader, as another cluster's agent would run it: its client stays up throughout.
    let reader = connect(&etcd, files(&c2, "remote")).await.unwrap();
    let mut watch = reader
        .client()
        .watch("meshd/state/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    admin
        .put("meshd/state/nodes/v1/c1/before", "{}", None)
        .await
        .unwrap();
    next_put(&mut watch, "meshd/state/nodes/v1/c1/before").await;

    mesh.run(&[
        "certs",
        "rotate",
        "remote",
        "--out-dir",
        "c2",
        "--ca",
        "mesh-ca/ca.pem",
        "--ca-key",
        "mesh-ca/ca-key.pem",
    ])
    .ok();

    // Wait until the old certificate has expired.
    while time::OffsetDateTime::now_utc() <= old_not_after + time::Duration::seconds(1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Control: etcd now refuses the old certificate.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "--dial-timeout=3s",
            "--command-timeout=5s",
        ])
        .arg("--cacert")
        .arg(old_copy.join("ca.pem"))
        .arg("--cert")
        .arg(old_copy.join("remote.pem"))
        .arg("--key")
        .arg(old_copy.join("remote-key.pem"))
        .args(["get", NODE])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "etcd still accepts the expired certificate"
    );

    // The running watcher, on its connection made with the old certificate, keeps working.
    admin
        .put("meshd/state/nodes/v1/c1/after", "{}", None)
        .await
        .unwrap();
    next_put(&mut watch, "meshd/state/nodes/v1/c1/after").await;

    // A new connection from the same files uses the rotated certificate.
    let mut fresh = connect(&etcd, files(&c2, "remote"))
        .await
        .expect("connects with the rotated files")
        .client();
    let got = fresh.get(NODE, None).await.unwrap();
    assert_eq!(got.kvs().len(), 1);

    // The long-running reader reconnects after etcd restarts, with the rotated files, without
    // being rebuilt.
    let mut etcd = etcd;
    etcd.restart().unwrap();
    let mut client = reader.client();
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            match client.get(NODE, None).await {
                Ok(r) => return r,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("reader reconnects with the rotated certificate");
    assert_eq!(got.kvs().len(), 1);
}

/// Bootstrap converges: a permission granted to the remote role by hand is revoked by the next
/// run, and --dry-run only reports.
#[tokio::test(flavor = "current_thread")]
async fn bootstrap_repairs_a_widened_remote_role() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let c2 = mesh.issue_cluster("c2");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    clustermesh(&mesh, &etcd, &c1, "connect", "c2").ok();
    // Someone widens the remote role (the harness etcdctl runs as root).
    etcd.etcdctl(&[
        "role",
        "grant-permission",
        "remote",
        "--prefix=true",
        "readwrite",
        "meshd/",
    ])
    .unwrap();
    let mut remote = connect(&etcd, files(&c2, "remote")).await.unwrap().client();
    remote
        .put("meshd/config/x", "widened", None)
        .await
        .expect("the widened role writes");

    let bootstrap = |extra: &[&str]| {
        let mut args = vec!["etcd", "bootstrap", "--node", "n1", "-o", "json"];
        args.extend(extra);
        let run = as_admin(&mesh, &etcd, &c1, &args).ok();
        serde_json::from_str::<serde_json::Value>(&run.stdout).unwrap()
    };
    let dry = bootstrap(&["--dry-run"]);
    assert_eq!(dry["changes"], 1, "{dry}");
    assert_eq!(dry["steps"][0]["step"], "revoke_permission", "{dry}");
    remote
        .put("meshd/config/x", "still", None)
        .await
        .expect("dry run changed nothing");

    let fixed = bootstrap(&[]);
    assert_eq!(fixed["changes"], 1, "{fixed}");
    assert!(is_denied(remote.put("meshd/config/x", "again", None).await));
    remote
        .get(NODE, None)
        .await
        .expect("reads of the shared prefixes stay");
    assert_eq!(bootstrap(&[])["changes"], 0);
}
