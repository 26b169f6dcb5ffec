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

/// Runs the CLI, which must succeed and print every one of `parts`.
fn run_saying(mesh: &Mesh, args: &[&str], parts: &[&str]) -> Run {
    let out = run(mesh, args).ok();
    for part in parts {
        assert!(out.stdout.contains(part), "{part} not in {}", out.stdout);
    }
    out
}

/// Starts cluster c1's apiserver on `etcd` and makes it the current context of a meshd config
/// file, whose path is returned.
async fn serve(
    mesh: &Mesh,
    c1: &std::path::Path,
    etcd: &meshd_testing::etcd::Etcd,
    node_port_range: Option<&str>,
) -> (Apiserver, String) {
    let admin = files(c1, "admin");
    let server = files(c1, "server");
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
        node_port_range: node_port_range.map(Into::into),
        resync_interval: Some("200ms".into()),
        leader_lease_ttl: Some("2s".into()),
        ..Default::default()
    }
    .build()
    .unwrap();
    let apiserver = Apiserver::start(config).await.unwrap();
    let url = format!("https://{}", apiserver.api_addr);
    let cfg = mesh.path().join("meshd-config.yaml");
    let cfg = cfg.to_str().unwrap().to_owned();
    run(
        mesh,
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
            &cfg,
        ],
    )
    .ok();
    (apiserver, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_get_delete_through_a_context() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    let (apiserver, cfg) = serve(&mesh, &c1, &etcd, None).await;
    let cfg = cfg.as_str();
    let url = format!("https://{}", apiserver.api_addr);
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

/// A NodePort and a LoadBalancer service. `web` asks for no node port; `lb` gives one, its
/// external addresses, and `Local` policy (so it gets a health check node port too).
const PUBLIC: &str = r#"apiVersion: v1
kind: Service
metadata: { name: web }
spec:
  type: NodePort
  selector: { app: web }
  ports: [ { name: http, port: 80, targetPort: 8080 }, { name: dns, port: 53, protocol: UDP } ]
---
apiVersion: v1
kind: Service
metadata: { name: lb }
spec:
  type: LoadBalancer
  selector: { app: lb }
  ports: [ { port: 443, nodePort: 30005 } ]
  externalIPs: [ 203.0.113.10 ]
  loadBalancerIP: 198.51.100.7
  externalTrafficPolicy: Local
"#;

/// The node port allocations in etcd: port -> owning service name.
async fn node_ports(store: &meshd_kvstore::EtcdStore) -> Vec<(u16, String)> {
    use meshd_kvstore::Backend;
    let page = store
        .range("meshd/config/node-ports/v1/", None, 0, 1000)
        .await
        .unwrap();
    let mut out: Vec<(u16, String)> = page
        .kvs
        .iter()
        .map(|kv| {
            let port = kv.key.rsplit('/').next().unwrap().parse().unwrap();
            let owner: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
            (port, owner["name"].as_str().unwrap().to_owned())
        })
        .collect();
    out.sort();
    out
}

/// `meshd apply` allocates node ports from the apiserver's range, unique in the cluster, keeps
/// them across re-applies, refuses taken ones and the cluster's own addresses with nothing
/// applied, and `meshd delete` frees them; `meshd get services` shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_ports_are_allocated_kept_refused_and_freed() {
    use meshd_kvstore::Backend;
    if !meshd_testing::require_etcd() {
        return;
    }
    let mesh = Mesh::new();
    let c1 = mesh.issue_cluster("c1");
    let etcd = bootstrapped_etcd(&mesh, &c1);
    let (apiserver, cfg) = serve(&mesh, &c1, &etcd, Some("30000-30009")).await;
    let cfg = cfg.as_str();
    let store = connect(&etcd, files(&c1, "admin")).await.unwrap();
    // A node of the cluster, as its agent publishes it: external addresses may not be its.
    let node = meshd_state::NodeRecord {
        name: "n1".into(),
        cluster: meshd_state::ClusterName::new("c1").unwrap(),
        cluster_id: meshd_state::ClusterId::new(1).unwrap(),
        node_ip: "192.168.1.1".parse().unwrap(),
        pod_cidrs: vec!["10.1.1.0/24".parse().unwrap()],
        labels: Default::default(),
        boot_id: "b".into(),
    };
    let key = meshd_state::NodeKey {
        cluster: node.cluster.clone(),
        node: "n1".into(),
    };
    store
        .put(
            &key.to_string(),
            meshd_state::encode(&key, &node).unwrap(),
            None,
        )
        .await
        .unwrap();
    let write = |name: &str, text: &str| std::fs::write(mesh.path().join(name), text).unwrap();
    let get_json = || -> serde_json::Value {
        let listed = run(
            &mesh,
            &["get", "services", "-o", "json", "--meshd-config", cfg],
        )
        .ok();
        serde_json::from_str(&listed.stdout).unwrap()
    };

    write("public.yaml", PUBLIC);
    run(
        &mesh,
        &["apply", "-f", "public.yaml", "--meshd-config", cfg],
    )
    .ok();
    // lb's given port is kept; web's ports and lb's health check port are the lowest free.
    let allocated = node_ports(&store).await;
    assert_eq!(
        allocated,
        [
            (30000, "web".to_owned()),
            (30001, "web".to_owned()),
            (30002, "lb".to_owned()),
            (30005, "lb".to_owned()),
        ]
    );
    let list = get_json();
    let item = |name: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == name)
            .cloned()
            .unwrap()
    };
    let web = item("web");
    assert_eq!(web["spec"]["type"], "NodePort");
    assert_eq!(web["spec"]["ports"][0]["nodePort"], 30000);
    assert_eq!(web["spec"]["ports"][1]["nodePort"], 30001);
    let lb = item("lb");
    assert_eq!(lb["spec"]["healthCheckNodePort"], 30002, "{lb}");
    assert_eq!(lb["spec"]["externalIPs"][0], "203.0.113.10");
    assert_eq!(lb["spec"]["loadBalancerIP"], "198.51.100.7");
    assert_eq!(lb["spec"]["externalTrafficPolicy"], "Local");
    let yaml = run(
        &mesh,
        &["get", "services", "-o", "yaml", "--meshd-config", cfg],
    )
    .ok();
    assert!(yaml.stdout.contains("nodePort: 30005"), "{}", yaml.stdout);
    let table = run(&mesh, &["get", "services", "--meshd-config", cfg]).ok();
    let row = |name: &str| {
        table
            .stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("{name} not in {}", table.stdout))
            .to_owned()
    };
    assert!(table.stdout.starts_with("NAMESPACE"), "{}", table.stdout);
    for header in ["TYPE", "EXTERNAL-IP", "PORTS"] {
        assert!(table.stdout.lines().next().unwrap().contains(header));
    }
    let web_row = row("web");
    assert!(web_row.contains("NodePort"), "{web_row}");
    assert!(web_row.contains("80:30000/TCP,53:30001/UDP"), "{web_row}");
    assert!(web_row.contains("<none>"), "{web_row}");
    let lb_row = row("lb");
    assert!(lb_row.contains("LoadBalancer"), "{lb_row}");
    assert!(lb_row.contains("203.0.113.10,198.51.100.7"), "{lb_row}");
    assert!(lb_row.contains("443:30005/TCP"), "{lb_row}");

    // Re-applying the same file changes nothing: the same ports, nothing rewritten.
    run_saying(
        &mesh,
        &["apply", "-f", "public.yaml", "--meshd-config", cfg],
        &[
            "service/default/web unchanged",
            "service/default/lb unchanged",
        ],
    );
    assert_eq!(node_ports(&store).await, allocated);

    // Refused, each with its field named, and nothing of the batch applied (the good `other`
    // service included): a port another service holds, a port outside the range, an external
    // IP that is a node's, a load balancer IP inside a pod CIDR, a node port on a ClusterIP
    // service.
    let other = "apiVersion: v1\nkind: Service\nmetadata: { name: other }\n\
                 spec: { type: NodePort, selector: { app: o }, ports: [ { port: 80 } ] }\n---\n";
    let bad = |name: &str, spec: &str| {
        format!(
            "{other}apiVersion: v1\nkind: Service\nmetadata: {{ name: {name} }}\n\
             spec: {{ selector: {{ app: x }}, {spec} }}\n"
        )
    };
    for (text, says) in [
        (
            bad(
                "taken",
                "type: NodePort, ports: [ { port: 80, nodePort: 30005 } ]",
            ),
            "field spec.ports[0].nodePort: 30005 is already allocated to Service default/lb",
        ),
        (
            bad(
                "outside",
                "type: NodePort, ports: [ { port: 80, nodePort: 31000 } ]",
            ),
            "field spec.ports[0].nodePort: 31000 is outside the node port range 30000-30009",
        ),
        (
            bad(
                "nodeip",
                "type: NodePort, ports: [ { port: 80 } ], externalIPs: [ 192.168.1.1 ]",
            ),
            "field spec.externalIPs[0]: 192.168.1.1 is the IP of node n1",
        ),
        (
            bad(
                "podip",
                "type: LoadBalancer, ports: [ { port: 80 } ], loadBalancerIP: 10.1.1.7",
            ),
            "field spec.loadBalancerIP: 10.1.1.7 is inside the pod CIDR 10.1.1.0/24 of node n1",
        ),
        (
            bad("clusterip", "ports: [ { port: 80, nodePort: 30007 } ]"),
            "field spec.ports[0].nodePort: a ClusterIP service has no node ports",
        ),
    ] {
        write("bad.yaml", &text);
        let refused = run(&mesh, &["apply", "-f", "bad.yaml", "--meshd-config", cfg]);
        assert_eq!(refused.code, 65, "{}", refused.stderr);
        refused.fails_saying(&["bad.yaml: document 2", says, "nothing applied"]);
        assert_eq!(node_ports(&store).await, allocated, "{says}");
        assert_eq!(get_json()["items"].as_array().unwrap().len(), 2, "{says}");
    }

    // web turns ClusterIP: its node ports are freed by the same apply.
    write(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: { name: web }\n\
         spec: { selector: { app: web }, ports: [ { name: http, port: 80, targetPort: 8080 }, \
         { name: dns, port: 53, protocol: UDP } ] }\n",
    );
    run(&mesh, &["apply", "-f", "web.yaml", "--meshd-config", cfg]).ok();
    assert_eq!(
        node_ports(&store).await,
        [(30002, "lb".to_owned()), (30005, "lb".to_owned())]
    );
    // Deleting lb frees its ports.
    run_saying(
        &mesh,
        &["delete", "-f", "public.yaml", "--meshd-config", cfg],
        &["service/default/lb deleted"],
    );
    assert_eq!(node_ports(&store).await, []);
    apiserver.shutdown().await.unwrap();
}
