//! `meshd config`, `meshd apply`, `meshd get` and `meshd delete` against a real apiserver on a
//! TLS etcd bootstrapped with RBAC, as an operator uses them.

mod common;

use clustermesh_apiserver::{Apiserver, ConfigArgs};
use common::*;

fn run(mesh: &Mesh, args: &[&str]) -> Run {
    // The CLI blocks; the apiserver runs on the other workers meanwhile.
    tokio::task::block_in_place(|| mesh.run(args))
}

const ECHO: &str = r#"apiVersion: meshd.io/v1
kind: Service
metadata:
  name: echo
  annotations:
    service.meshd.io/global: "true"
    service.meshd.io/affinity: "local"
spec:
  selector: { app: echo }
  ports: [ { name: http, port: 80, targetPort: 8080, protocol: TCP } ]
---
apiVersion: meshd.io/v1
kind: NetworkPolicy
metadata: { name: echo-from-clients }
spec:
  endpointSelector: { matchLabels: { app: echo } }
  ingress:
    - fromEndpoints: [ { matchLabels: { app: client } } ]
      toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
"#;

const BAD: &str = r#"apiVersion: meshd.io/v1
kind: Service
metadata: { name: web }
spec:
  selector: { app: web }
  ports: [ { port: 80 } ]
---
apiVersion: meshd.io/v1
kind: Service
metadata:
  name: web2
  annotations: { service.cilium.io/affinity: "closest" }
spec:
  selector: { app: web }
  ports: [ { port: 80 } ]
"#;

/// Policies users bring from Cilium and Kubernetes (from their documentation).
const CROSS_CLUSTER: &str = include_str!("../../examples/policies/cilium-cross-cluster.yaml");
const DB_FROM_FRONTEND: &str =
    include_str!("../../examples/policies/kubernetes-db-from-frontend.yaml");

const FQDN: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: { name: to-example }
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [ { matchName: example.com } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_get_delete_through_a_context() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    let admin = files(&c1, "admin");
    let server = files(&c1, "server");
    let config = ConfigArgs {
        cluster_name: Some("c1".into()),
        cluster_id: Some(1),
        etcd_endpoints: vec![etcd.endpoint()],
        etcd_ca: Some(admin.ca.clone()),
        etcd_cert: Some(admin.cert.clone()),
        etcd_key: Some(admin.key.clone()),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        tls_ca: Some(server.ca.clone()),
        tls_cert: Some(server.cert.clone()),
        tls_key: Some(server.key.clone()),
        service_cidr: Some("10.96.0.0/24".into()),
        resync_interval: Some("200ms".into()),
        leader_lease_ttl: Some("2s".into()),
        ..Default::default()
    }
    .build()
    .unwrap();
    let apiserver = Apiserver::start(config).await.unwrap();
    let url = format!("https://{}", apiserver.api_addr);

    let cfg = mesh.path().join("meshd-config.yaml");
    let cfg = cfg.to_str().unwrap();
    run(
        &mesh,
        &[
            "config",
            "set-context",
            "c1",
            "--server",
            &url,
            "--ca",
            "c1/ca.pem",
            "--cert",
            "c1/admin.pem",
            "--key",
            "c1/admin-key.pem",
            "--meshd-config",
            cfg,
        ],
    )
    .ok();
    // A context with the read-only certificate: the apiserver refuses it.
    run(
        &mesh,
        &[
            "config",
            "set-context",
            "ro",
            "--server",
            &url,
            "--ca",
            "c1/ca.pem",
            "--cert",
            "c1/remote.pem",
            "--key",
            "c1/remote-key.pem",
            "--meshd-config",
            cfg,
        ],
    )
    .ok();
    let contexts = run(&mesh, &["config", "get-contexts", "--meshd-config", cfg]).ok();
    assert!(
        contexts.stdout.contains("*        c1"),
        "{}",
        contexts.stdout
    );

    std::fs::create_dir(mesh.path().join("m")).unwrap();
    std::fs::write(mesh.path().join("m/echo.yaml"), ECHO).unwrap();
    std::fs::write(mesh.path().join("m/web.yaml"), BAD).unwrap();

    // One bad document in the directory: nothing of it is applied, the field is named.
    let bad = run(&mesh, &["apply", "-f", "m", "--meshd-config", cfg]);
    assert_eq!(bad.code, 65, "{}", bad.stderr);
    let bad = bad.fails_saying(&[
        "m/web.yaml: document 2 (Service default/web2): field metadata.annotations[\"service.cilium.io/affinity\"]",
        "nothing applied",
    ]);
    assert!(bad.stdout.is_empty());
    let listed = run(
        &mesh,
        &["get", "services", "-o", "json", "--meshd-config", cfg],
    )
    .ok();
    let items: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(items["items"].as_array().unwrap().len(), 0);

    // The good file alone goes in whole.
    let applied = run(
        &mesh,
        &["apply", "-f", "m/echo.yaml", "--meshd-config", cfg],
    )
    .ok();
    assert!(
        applied
            .stdout
            .contains("service/default/echo created (VIP 10.96.0.1)"),
        "{}",
        applied.stdout
    );
    assert!(applied
        .stdout
        .contains("networkpolicy/default/echo-from-clients created"));

    let listed = run(&mesh, &["get", "svc", "-o", "json", "--meshd-config", cfg]).ok();
    let list: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let item = &list["items"][0];
    assert_eq!(item["spec"]["clusterIP"], "10.96.0.1");
    assert_eq!(item["metadata"]["name"], "echo");
    let yaml = run(
        &mesh,
        &["get", "policies", "-o", "yaml", "--meshd-config", cfg],
    )
    .ok();
    assert!(
        yaml.stdout.contains("name: echo-from-clients"),
        "{}",
        yaml.stdout
    );
    let table = run(&mesh, &["get", "services", "--meshd-config", cfg]).ok();
    assert!(table.stdout.contains("10.96.0.1"), "{}", table.stdout);

    run(
        &mesh,
        &["get", "services", "--context", "ro", "--meshd-config", cfg],
    )
    .fails_saying(&["may not use this API"]);

    // Cilium's and Kubernetes' policies go in as meshd's, and are shown in the stored form.
    std::fs::write(
        mesh.path().join("brought.yaml"),
        format!("{CROSS_CLUSTER}---\n{DB_FROM_FRONTEND}"),
    )
    .unwrap();
    std::fs::write(mesh.path().join("fqdn.yaml"), FQDN).unwrap();
    let refused = run(&mesh, &["apply", "-f", "fqdn.yaml", "--meshd-config", cfg]);
    assert_eq!(refused.code, 65, "{}", refused.stderr);
    refused.fails_saying(&[
        "fqdn.yaml: document 1 (CiliumNetworkPolicy default/to-example): field spec.egress[0].toFQDNs: DNS-based policy is not supported",
    ]);
    let applied = run(
        &mesh,
        &["apply", "-f", "brought.yaml", "--meshd-config", cfg],
    )
    .ok();
    for created in [
        "networkpolicy/default/allow-cross-cluster created",
        "networkpolicy/default/db-from-frontend created",
    ] {
        assert!(applied.stdout.contains(created), "{}", applied.stdout);
    }
    let listed = run(
        &mesh,
        &["get", "policies", "-o", "json", "--meshd-config", cfg],
    )
    .ok();
    let list: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let stored = |name: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
    };
    let cnp = stored("allow-cross-cluster");
    assert_eq!(cnp["apiVersion"], "meshd.io/v1", "{cnp}");
    assert_eq!(
        cnp["metadata"]["annotations"]["meshd.io/source"],
        "cilium.io/v2/CiliumNetworkPolicy"
    );
    assert_eq!(
        cnp["spec"]["egress"][0]["toEndpoints"][0]["matchLabels"]["meshd.io/cluster"], "cluster2",
        "{cnp}"
    );
    let np = stored("db-from-frontend");
    assert_eq!(
        np["spec"]["ingress"][0]["fromEndpoints"][0]["matchLabels"]["role"], "frontend",
        "{np}"
    );
    assert_eq!(
        np["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"],
        6379
    );
    let yaml = run(
        &mesh,
        &[
            "get",
            "networkpolicies",
            "-o",
            "yaml",
            "--meshd-config",
            cfg,
        ],
    )
    .ok();
    assert!(
        yaml.stdout
            .contains("meshd.io/source: cilium.io/v2/CiliumNetworkPolicy"),
        "{}",
        yaml.stdout
    );
    let deleted = run(
        &mesh,
        &["delete", "-f", "brought.yaml", "--meshd-config", cfg],
    )
    .ok();
    assert!(
        deleted
            .stdout
            .contains("networkpolicy/default/allow-cross-cluster deleted"),
        "{}",
        deleted.stdout
    );

    let deleted = run(
        &mesh,
        &["delete", "-f", "m/echo.yaml", "--meshd-config", cfg],
    )
    .ok();
    assert!(
        deleted.stdout.contains("service/default/echo deleted"),
        "{}",
        deleted.stdout
    );
    let listed = run(
        &mesh,
        &["get", "services", "-o", "json", "--meshd-config", cfg],
    )
    .ok();
    let list: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    apiserver.shutdown().await.unwrap();
}
