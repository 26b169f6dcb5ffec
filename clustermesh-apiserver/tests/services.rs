//! Service records follow the cluster's endpoints; VIPs are unique. Endpoints are written
//! straight into etcd, as the agents publish them.

mod common;

use std::collections::BTreeSet;

use clustermesh_apiserver::pb;
use common::*;
use meshd_state::{Affinity, Protocol};

async fn apply(api: &mut meshd_api::apiserver::Client, file: &str, text: &str) {
    let docs = meshd_manifest::parse_str(file, text).unwrap();
    api.apply(pb::ApplyRequest {
        documents: docs
            .iter()
            .map(meshd_api::apiserver::source_document)
            .collect(),
        dry_run: false,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn backends_follow_endpoints_as_they_come_and_go() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let store = store(&etcd, &certs, false).await;
    let mut api = admin(&server, &certs).await;

    // Endpoints before the service: the first record already has them.
    add_endpoint(&store, "10.1.0.5", 300, "echo", "default").await;
    add_endpoint(&store, "10.1.0.9", 301, "client", "default").await;
    add_endpoint(&store, "10.1.0.7", 302, "echo", "prod").await;
    apply(
        &mut api,
        "echo.yaml",
        &service_yaml(
            "echo",
            "echo",
            "service.cilium.io/global: \"true\", service.cilium.io/affinity: local",
            "",
        ),
    )
    .await;
    let rec = eventually("first backend", || async {
        record(&store, "echo")
            .await
            .filter(|r| backends(r) == ["10.1.0.5:8080"])
    })
    .await;
    assert!(rec.global && rec.shared);
    assert_eq!(rec.affinity, Affinity::Local);
    assert_eq!(rec.frontends.len(), 1);
    assert_eq!(
        (rec.frontends[0].ip.to_string(), rec.frontends[0].port),
        ("10.96.0.1".to_string(), 80)
    );
    assert_eq!(rec.frontends[0].protocol, Protocol::Tcp);
    assert!(rec
        .backends
        .iter()
        .all(|b| b.ready && b.port_name == "http"));

    // A second endpoint comes.
    add_endpoint(&store, "10.1.0.6", 300, "echo", "default").await;
    eventually("two backends", || async {
        record(&store, "echo")
            .await
            .filter(|r| backends(r) == ["10.1.0.5:8080", "10.1.0.6:8080"])
    })
    .await;

    // Both go: the service stays, with no backend.
    remove_endpoint(&store, "10.1.0.5").await;
    remove_endpoint(&store, "10.1.0.6").await;
    eventually("no backends", || async {
        record(&store, "echo")
            .await
            .filter(|r| r.backends.is_empty())
    })
    .await;

    // Re-labelled endpoint (new identity) starts matching.
    add_endpoint(&store, "10.1.0.9", 303, "echo", "default").await;
    eventually("relabelled backend", || async {
        record(&store, "echo")
            .await
            .filter(|r| backends(r) == ["10.1.0.9:8080"])
    })
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_service_without_the_global_annotation_is_published_as_local_only() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let server = start(config(&etcd, &certs, false)).await;
    let store = store(&etcd, &certs, false).await;
    let mut api = admin(&server, &certs).await;
    add_endpoint(&store, "10.1.0.5", 300, "web", "default").await;
    apply(
        &mut api,
        "web.yaml",
        &(service_yaml("web", "web", "service.meshd.io/shared: \"true\"", "")
            + "---\n"
            + &service_yaml(
                "api",
                "web",
                "io.cilium/global-service: \"true\", service.meshd.io/shared: \"false\"",
                "",
            )),
    )
    .await;
    let web = eventually("web record", || async {
        record(&store, "web")
            .await
            .filter(|r| !r.backends.is_empty())
    })
    .await;
    // Agents of c1 use it; remote agents ignore it (not global, not shared).
    assert!(!web.global && !web.shared);
    assert_eq!(backends(&web), ["10.1.0.5:8080"]);
    let api_rec = eventually("api record", || async { record(&store, "api").await }).await;
    assert!(api_rec.global && !api_rec.shared);
    // The sync canary tells remote readers the records are complete.
    assert!(get(&store, "meshd/synced/c1/services").await.is_some());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn vips_are_unique_under_concurrent_applies() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    // Two replicas, four clients each applying services at the same time.
    let a = start(config(&etcd, &certs, false)).await;
    let b = start(config(&etcd, &certs, false)).await;
    let mut tasks = Vec::new();
    for client in 0..8 {
        let server = if client % 2 == 0 { &a } else { &b };
        let mut api = admin(server, &certs).await;
        tasks.push(tokio::spawn(async move {
            let mut vips = Vec::new();
            for i in 0..5 {
                let name = format!("s{client}-{i}");
                let text = service_yaml(&name, "x", "", "");
                let resp = api
                    .apply(pb::ApplyRequest {
                        documents: vec![pb::SourceDocument {
                            file: format!("{name}.yaml"),
                            index: 1,
                            text,
                        }],
                        dry_run: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                vips.push(resp.results[0].vip.clone());
            }
            vips
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), 40, "duplicate VIPs: {all:?}");
    let store = store(&etcd, &certs, false).await;
    assert_eq!(keys(&store, "meshd/config/service-ips/").await.len(), 40);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
