//! How fast a service record follows its endpoints: an ipcache entry written or deleted (as an
//! agent does) -> the updated record observed by a watcher (as every agent is). Prints p50 and
//! max over 20 trials each way; asserts only that every change arrives (no timing asserts).
//! This is the apiserver's share of the failover benchmark (last local backend deleted ->
//! agents see the record without it).

mod common;

use std::time::{Duration, Instant};

use clustermesh_apiserver::pb;
use common::*;
use futures::StreamExt;
use meshd_kvstore::{Backend, WatchMessage};

const TRIALS: usize = 20;

fn summary(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "p50 {:.2} ms, max {:.2} ms",
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    )
}

/// Waits for a record event with `want` backends.
async fn wait_for(watch: &mut meshd_kvstore::WatchStream, want: usize) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), watch.next())
            .await
            .expect("record update within the deadline")
            .expect("watch open")
            .expect("watch ok");
        if let WatchMessage::Events { events, .. } = msg {
            for e in events {
                let (_, r) =
                    meshd_state::decode::<meshd_state::ServiceRecord>(&e.kv.key, &e.kv.value)
                        .unwrap();
                if r.backends.len() == want {
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn endpoint_change_to_published_record() {
    let certs = Certs::new();
    let Some(etcd) = etcd(None) else {
        return;
    };
    let mut cfg = config(&etcd, &certs, false);
    // Long resync: every update below must come from the watch path, not the periodic one.
    cfg.resync_interval = Duration::from_secs(3600);
    let server = start(cfg).await;
    let store = store(&etcd, &certs, false).await;
    let mut api = admin(&server, &certs).await;
    add_endpoint(&store, "10.1.0.5", 300, "echo", "default").await;
    api.apply(pb::ApplyRequest {
        documents: vec![pb::SourceDocument {
            file: "echo.yaml".into(),
            index: 1,
            text: service_yaml("echo", "echo", "service.meshd.io/global: \"true\"", ""),
        }],
        dry_run: false,
    })
    .await
    .unwrap();
    eventually("published", || async {
        record(&store, "echo")
            .await
            .filter(|r| r.backends.len() == 1)
    })
    .await;

    let key = "meshd/state/services/v1/c1/default/echo";
    let rev = store.range(key, None, 0, 1).await.unwrap().header.revision;
    let mut watch = store.watch(key, rev + 1).await.unwrap();
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for _ in 0..TRIALS {
        let t = Instant::now();
        add_endpoint(&store, "10.1.0.6", 300, "echo", "default").await;
        wait_for(&mut watch, 2).await;
        added.push(t.elapsed());
        let t = Instant::now();
        remove_endpoint(&store, "10.1.0.6").await;
        wait_for(&mut watch, 1).await;
        removed.push(t.elapsed());
    }
    println!(
        "endpoint added -> record: {}; endpoint removed -> record: {} ({TRIALS} trials, local etcd)",
        summary(added),
        summary(removed)
    );
    server.shutdown().await.unwrap();
}
