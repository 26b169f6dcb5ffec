//! The apiserver on a replicated (3-member) etcd: when the member it talks to is killed, and
//! then when the next one freezes, it moves to a member that answers and keeps publishing what
//! the cluster's endpoints say.

mod common;

use std::time::Duration;

use clustermesh_apiserver::pb;
use common::*;
use meshd_kvstore::{EtcdConfig, EtcdStore};
use meshd_testing::etcd::EtcdOptions;
use meshd_testing::etcd_cluster::EtcdCluster;

/// A store on the members that answer now (the test's own writes should not wait out the
/// faults it makes for the apiserver).
async fn live_store(etcd: &EtcdCluster) -> EtcdStore {
    let live: Vec<String> = etcd
        .members()
        .iter()
        .filter(|m| m.is_live())
        .map(|m| m.endpoint())
        .collect();
    meshd_kvstore::connect(&EtcdConfig::new(live))
        .await
        .expect("connect to the members that answer")
}

async fn published(etcd: &EtcdCluster, want: &[&str]) {
    let store = live_store(etcd).await;
    eventually(
        &format!("echo published with backends {want:?}"),
        || async { record(&store, "echo").await.filter(|r| backends(r) == want) },
    )
    .await;
}

/// Waits for a leader among the members that answer, so the test's own writes do not meet the
/// election its fault started (the apiserver's requests must, and cope).
fn settle(etcd: &EtcdCluster) {
    tokio::task::block_in_place(|| etcd.wait_leader(Duration::from_secs(30)).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_then_a_frozen_member_are_left_and_publishing_goes_on() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let certs = Certs::new();
    let mut etcd = EtcdCluster::start(3, EtcdOptions::default()).unwrap();
    let mut config = config(etcd.member(0), &certs, false);
    config.etcd.endpoints = etcd.endpoints();
    // Short keepalives, so a frozen member is given up within the test's deadline.
    config.etcd.keepalive_interval = Duration::from_secs(1);
    config.etcd.keepalive_timeout = Duration::from_secs(2);
    let server = start(config).await;
    let mut api = admin(&server, &certs).await;
    add_endpoint(&live_store(&etcd).await, "10.1.0.5", 300, "echo", "default").await;
    api.apply(pb::ApplyRequest {
        documents: vec![pb::SourceDocument {
            file: "echo.yaml".into(),
            index: 1,
            text: service_yaml("echo", "echo", "", ""),
        }],
        dry_run: false,
    })
    .await
    .unwrap();
    published(&etcd, &["10.1.0.5:8080"]).await;

    // The member the apiserver dialed first dies.
    etcd.member_mut(0).kill();
    settle(&etcd);
    add_endpoint(&live_store(&etcd).await, "10.1.0.6", 300, "echo", "default").await;
    published(&etcd, &["10.1.0.5:8080", "10.1.0.6:8080"]).await;

    // It comes back; the member the apiserver moved to freezes.
    etcd.member_mut(0).restart().unwrap();
    etcd.member_mut(1).pause();
    settle(&etcd);
    add_endpoint(&live_store(&etcd).await, "10.1.0.7", 300, "echo", "default").await;
    published(&etcd, &["10.1.0.5:8080", "10.1.0.6:8080", "10.1.0.7:8080"]).await;
    etcd.member_mut(1).resume();
    server.shutdown().await.unwrap();
}
