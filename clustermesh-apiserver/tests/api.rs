//! The gRPC API end to end: mTLS, apply/list/delete, all-or-nothing batches, validation on the
//! server, authorization, health and the cluster config key. Real etcd, real TLS.

mod common;

use clustermesh_apiserver::pb;
use common::*;
use meshd_certs::{LeafKind, TlsFiles};
use tonic::Code;

#[tokio::test]
async fn apply_list_delete_round_trip_over_tls_etcd() {
    let certs = Certs::new();
    let Some(etcd) = etcd(Some(&certs)) else {
        return;
    };
    let server = start(config(&etcd, &certs, true)).await;
    let store = store(&etcd, &certs, true).await;
    let mut api = admin(&server, &certs).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "echo.yaml",
        &format!(
            "{}---\n{POLICY}",
            service_yaml("echo", "echo", "service.meshd.io/global: \"true\"", "")
        ),
    );

    let resp = api
        .apply(pb::ApplyRequest {
            documents: documents(std::slice::from_ref(&file)),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<(String, String, String)> = resp
        .results
        .iter()
        .map(|r| {
            (
                r.object.as_ref().unwrap().kind.clone(),
                r.action.clone(),
                r.vip.clone(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("Service".into(), "created".into(), "10.96.0.1".into()),
            ("NetworkPolicy".into(), "created".into(), String::new()),
        ]
    );
    assert!(resp.revision > 0);

    // Stored where the design says, with the VIP filled in.
    let stored = get(&store, "meshd/config/services/v1/default/echo")
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&stored).contains("\"clusterIP\":\"10.96.0.1\""));
    assert!(
        get(&store, "meshd/config/policies/v1/default/echo-from-clients")
            .await
            .is_some()
    );
    assert!(get(&store, "meshd/config/service-ips/v1/10.96.0.1")
        .await
        .is_some());

    // Applying the same file again changes nothing.
    let again = api
        .apply(pb::ApplyRequest {
            documents: documents(std::slice::from_ref(&file)),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.results.iter().all(|r| r.action == "unchanged"));
    assert_eq!(again.revision, 0, "nothing written");

    let services = api
        .list_services(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1);
    assert_eq!(
        (services[0].name.as_str(), services[0].vip.as_str()),
        ("echo", "10.96.0.1")
    );
    // The leader publishes the record (no endpoints yet: no backends).
    let rec = eventually("service record", || async { record(&store, "echo").await }).await;
    assert!(rec.global && rec.shared && rec.backends.is_empty());
    let policies = api
        .list_policies(pb::ListRequest {
            namespace: "default".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert_eq!(policies.len(), 1);
    assert!(policies[0].manifest_json.contains("endpointSelector"));
    let other_ns = api
        .list_policies(pb::ListRequest {
            namespace: "prod".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(other_ns.is_empty());

    // Delete both, plus one that does not exist.
    let refs: Vec<pb::ObjectRef> = meshd_manifest::load_paths(&[file])
        .unwrap()
        .iter()
        .map(|d| meshd_api::apiserver::object_ref(&d.document.object_ref()))
        .chain([pb::ObjectRef {
            kind: "Service".into(),
            namespace: "default".into(),
            name: "ghost".into(),
        }])
        .collect();
    let deleted = api
        .delete(pb::DeleteRequest { objects: refs })
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = deleted.results.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["deleted", "deleted", "not found"]);
    assert!(keys(&store, "meshd/config/").await.is_empty());
    assert!(record(&store, "echo").await.is_none());
    assert!(api
        .list_services(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services
        .is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_bad_document_refuses_the_whole_batch_naming_file_document_and_field() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let store = store(&etcd, &certs, false).await;
    let mut api = admin(&server, &certs).await;
    let good_a = service_yaml("a", "a", "", "");
    let good_b = service_yaml("b", "b", "", "");
    let cases = [
        (
            service_yaml("c", "c", "service.meshd.io/affinity: nearest", ""),
            "metadata.annotations[\"service.meshd.io/affinity\"]",
        ),
        (
            service_yaml("c", "c", "service.cilium.io/global: \"yes\"", ""),
            "metadata.annotations[\"service.cilium.io/global\"]",
        ),
        (
            service_yaml("c", "c", "", "").replace("port: 80,", "port: 70000,"),
            "spec.ports[0].port",
        ),
        (
            service_yaml("c", "c", "", "").replace("port: 80,", "port: 0,"),
            "spec.ports[0].port",
        ),
        (service_yaml("c", "-c", "", ""), "spec.selector[\"app\"]"),
        (
            "apiVersion: meshd.io/v1\nkind: Deployment\nmetadata: { name: c }\n".to_string(),
            "kind",
        ),
        (
            POLICY.replace("\"8080\"", "\"http\""),
            "spec.ingress[0].toPorts[0].ports[0].port",
        ),
    ];
    for (bad, field) in cases {
        let text = format!("{good_a}---\n{bad}---\n{good_b}");
        // Client side: the loader refuses and names the document and the field.
        let errs = meshd_manifest::parse_str("batch.yaml", &text).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].document, 2, "{errs}");
        assert_eq!(errs.0[0].field, field, "{errs}");
        // Server side, bypassing the client's checks: the same refusal, nothing stored.
        let documents = text
            .split("---\n")
            .enumerate()
            .map(|(i, t)| pb::SourceDocument {
                file: "batch.yaml".into(),
                index: i as u32 + 1,
                text: t.to_owned(),
            })
            .collect();
        let status = api
            .apply(pb::ApplyRequest {
                documents,
                dry_run: false,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let msg = status.message();
        assert!(
            msg.contains("batch.yaml: document 2") && msg.contains(field),
            "{field}: {msg}"
        );
        assert!(
            keys(&store, "meshd/config/").await.is_empty(),
            "{field}: something was applied"
        );
    }

    // A VIP conflict found only by the server (against stored state) also refuses everything.
    api.apply(pb::ApplyRequest {
        documents: vec![pb::SourceDocument {
            file: "a.yaml".into(),
            index: 1,
            text: good_a.clone(),
        }],
        dry_run: false,
    })
    .await
    .unwrap();
    let clash = service_yaml("d", "d", "", "  clusterIP: 10.96.0.1\n");
    let status = api
        .apply(pb::ApplyRequest {
            documents: vec![
                pb::SourceDocument {
                    file: "x.yaml".into(),
                    index: 1,
                    text: good_b.clone(),
                },
                pb::SourceDocument {
                    file: "x.yaml".into(),
                    index: 2,
                    text: clash,
                },
            ],
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("x.yaml: document 2")
            && status.message().contains("spec.clusterIP")
            && status.message().contains("Service default/a"),
        "{}",
        status.message()
    );
    assert_eq!(
        keys(&store, "meshd/config/services/").await,
        ["meshd/config/services/v1/default/a"]
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_the_admin_certificate_of_its_own_cluster_may_use_the_api() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    // Denied with a status that says who was refused and why.
    async fn denied(server: &clustermesh_apiserver::Apiserver, files: &TlsFiles) -> String {
        let mut client = connect(server, files).await;
        let status = client
            .list_services(pb::ListRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        status.message().to_owned()
    }

    // The remote (read-only) certificate is from the right CA but may not use the API.
    let msg = denied(&server, &certs.files(LeafKind::Remote)).await;
    assert!(
        msg.contains("remote-c1") && msg.contains("remote certificate"),
        "{msg}"
    );

    // Another cluster's admin certificate, from the same mesh CA.
    let c2 = certs.path().join("c2");
    certs
        .ca
        .issue_cluster_set(&c2, "c2", 10, &["127.0.0.1".parse().unwrap()], &[], false)
        .unwrap();
    let msg = denied(&server, &TlsFiles::in_dir(&c2, "admin")).await;
    assert!(
        msg.contains("admin-c2") && msg.contains("cluster c2") && msg.contains("serves cluster c1"),
        "{msg}"
    );

    // A node certificate of this very cluster: agents make no apiserver calls.
    let n1 = certs.path().join("n1");
    certs.ca.issue_node(&n1, "c1", "n1", 10, false).unwrap();
    let msg = denied(&server, &TlsFiles::in_dir(&n1, "node")).await;
    assert!(
        msg.contains("node-c1-n1") && msg.contains("node certificate"),
        "{msg}"
    );

    // A certificate from before per-cluster names (CN root): refused, saying how to re-issue.
    let ca_dir = certs.path().join("mesh-ca");
    certs.ca.write(&ca_dir, false).unwrap();
    let legacy = certs.path().join("legacy");
    meshd_testing::legacy_certs::issue_client(
        &ca_dir.join("ca.pem"),
        &ca_dir.join("ca-key.pem"),
        "root",
        "c1",
        &legacy,
        "admin",
    )
    .unwrap();
    std::fs::copy(ca_dir.join("ca.pem"), legacy.join("ca.pem")).unwrap();
    let msg = denied(&server, &TlsFiles::in_dir(&legacy, "admin")).await;
    assert!(
        msg.contains("\"root\"") && msg.contains("meshd certs issue admin --cluster c1"),
        "{msg}"
    );

    // Control: this cluster's admin certificate works.
    admin(&server, &certs)
        .await
        .list_services(pb::ListRequest::default())
        .await
        .expect("admin-c1 may use c1's apiserver");

    // Every refusal is counted.
    let (code, body) = http_get(server.health_addr.unwrap(), "/counters").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"api_requests_refused\":4"), "{body}");
    // And shown on /metrics, with every answer by method and code.
    let (code, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(code, 200, "{body}");
    for line in [
        "meshd_apiserver_requests_refused_total 4",
        "meshd_apiserver_requests_total{method=\"ListServices\",code=\"PERMISSION_DENIED\"} 4",
        "meshd_apiserver_requests_total{method=\"ListServices\",code=\"OK\"} 1",
        "meshd_apiserver_request_duration_seconds_count{method=\"ListServices\"} 5",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "{line} missing from\n{body}"
        );
    }
    // A real apiserver's exposition (the body, after the response's head), as Prometheus
    // reads it.
    let (_, exposition) = body.split_once("\r\n\r\n").expect("an HTTP response");
    meshd_testing::require(
        "promtool on PATH (scripts/install-deps.sh)",
        meshd_testing::promtool_check(exposition).unwrap(),
    );

    // A certificate of another CA does not get through the handshake.
    let stranger = Certs::named("another CA");
    let refused = match meshd_api::apiserver::connect(
        &format!("https://{}", server.api_addr),
        &stranger.files(LeafKind::Admin),
    )
    .await
    {
        Err(_) => true,
        Ok(mut c) => c.list_services(pb::ListRequest::default()).await.is_err(),
    };
    assert!(refused, "a certificate of another CA was accepted");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_cluster_config() {
    let certs = Certs::new();
    let Some(mut etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let health = server.health_addr.unwrap();
    assert_eq!(http_get(health, "/healthz").await.0, 200);
    eventually("ready", || async {
        (http_get(health, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let store = store(&etcd, &certs, false).await;
    let (_, config) = meshd_state::decode::<meshd_state::ClusterConfig>(
        "meshd/cluster-config/c1",
        &get(&store, "meshd/cluster-config/c1").await.unwrap(),
    )
    .unwrap();
    assert_eq!((config.name.as_str(), config.id.get()), ("c1", 1));

    // Another apiserver claiming the same cluster with another id is refused.
    let mut other = config_with_id(&etcd, &certs, 2);
    other.health_listen = None;
    let mut conflicting = start(other).await;
    let err = conflicting.wait().await.unwrap_err();
    assert!(err.to_string().contains("id 1"), "{err}");

    // etcd gone: not ready, but alive.
    etcd.stop();
    eventually("not ready", || async {
        let (code, body) = http_get(health, "/readyz").await;
        (code == 503 && body.contains("etcd")).then_some(())
    })
    .await;
    assert_eq!(http_get(health, "/healthz").await.0, 200);
    drop(store);
    server.shutdown().await.unwrap();
}

fn config_with_id(
    etcd: &meshd_testing::etcd::Etcd,
    certs: &Certs,
    id: u32,
) -> clustermesh_apiserver::Config {
    let mut c = config(etcd, certs, false);
    c.cluster_id = meshd_state::ClusterId::new(id).unwrap();
    c
}

#[tokio::test]
async fn dry_run_plans_without_writing() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let store = store(&etcd, &certs, false).await;
    let mut api = admin(&server, &certs).await;
    let resp = api
        .apply(pb::ApplyRequest {
            documents: vec![pb::SourceDocument {
                file: "a.yaml".into(),
                index: 1,
                text: service_yaml("a", "a", "", ""),
            }],
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results[0].action, "created");
    assert_eq!(resp.results[0].vip, "10.96.0.1");
    assert!(keys(&store, "meshd/config/").await.is_empty());

    // `ab` stored: `a` (whose key is a prefix of `ab`'s) is still new, `ab` unchanged.
    let one = |name: &str, dry_run: bool| pb::ApplyRequest {
        documents: vec![pb::SourceDocument {
            file: format!("{name}.yaml"),
            index: 1,
            text: service_yaml(name, name, "", ""),
        }],
        dry_run,
    };
    api.apply(one("ab", false)).await.unwrap();
    let a = api.apply(one("a", true)).await.unwrap().into_inner();
    assert_eq!(a.results[0].action, "created");
    assert_eq!(a.results[0].vip, "10.96.0.2");
    let ab = api.apply(one("ab", true)).await.unwrap().into_inner();
    assert_eq!(ab.results[0].action, "unchanged");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_larger_than_one_transaction_is_refused_whole() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let mut cfg = config(&etcd, &certs, false);
    cfg.max_txn_ops = 4;
    let server = start(cfg).await;
    let store = store(&etcd, &certs, false).await;
    let mut api = admin(&server, &certs).await;
    // Three services: six guards (service key + VIP key each), over the limit of four.
    let documents = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| pb::SourceDocument {
            file: "big.yaml".into(),
            index: i as u32 + 1,
            text: service_yaml(n, n, "", ""),
        })
        .collect();
    let status = api
        .apply(pb::ApplyRequest {
            documents,
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max-txn-ops"), "{status:?}");
    assert!(keys(&store, "meshd/config/").await.is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rotated_server_certificate_is_used_by_the_next_connection() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let admin_files = certs.files(LeafKind::Admin);
    let by_ip = format!("https://{}", server.api_addr);
    let by_name = format!("https://localhost:{}", server.api_addr.port());
    let mut before = meshd_api::apiserver::connect(&by_ip, &admin_files)
        .await
        .unwrap();
    before
        .list_services(pb::ListRequest::default())
        .await
        .unwrap();

    // The new server certificate names only `localhost`: dialing the IP must now fail, which
    // shows the files are read again for each connection, without a restart.
    let mut req = meshd_certs::LeafRequest::new(LeafKind::Server, "c1", 10);
    req.dns_names = vec!["localhost".into()];
    certs
        .ca
        .issue(&req)
        .unwrap()
        .write(certs.path(), true)
        .unwrap();
    let mut after = meshd_api::apiserver::connect(&by_name, &admin_files)
        .await
        .unwrap();
    after
        .list_services(pb::ListRequest::default())
        .await
        .unwrap();
    let refused = match meshd_api::apiserver::connect(&by_ip, &admin_files).await {
        Err(_) => true,
        Ok(mut c) => c.list_services(pb::ListRequest::default()).await.is_err(),
    };
    assert!(refused, "the old certificate is still served");
    // The connection made before the rotation goes on.
    before
        .list_services(pb::ListRequest::default())
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_metrics_port_in_use_is_a_start_error_naming_the_field() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config(&etcd, &certs, false);
    config.metrics_addr = Some(taken.local_addr().unwrap());
    let Err(e) = clustermesh_apiserver::Apiserver::start(config).await else {
        panic!("started with its metrics port taken");
    };
    assert!(e.to_string().contains("metrics-addr"), "{e}");
}
