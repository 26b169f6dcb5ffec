//! A client of a replicated (3-member) etcd: when the member it talks to dies or freezes, it
//! moves to another one, and because revisions are the cluster's, a watch resumed there from
//! the last revision seen misses nothing.

use std::time::Duration;

use futures::StreamExt;
use meshd_kvstore::{connect, is_transient, Backend, EtcdConfig, EtcdStore, KvError, WatchMessage};
use meshd_testing::etcd::EtcdOptions;
use meshd_testing::etcd_cluster::EtcdCluster;

const PREFIX: &str = "meshd/test/";

fn config(etcd: &EtcdCluster) -> EtcdConfig {
    EtcdConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        // Short keepalives, so a frozen member is given up quickly.
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(2),
        ..EtcdConfig::new(etcd.endpoints())
    }
}

/// `(key, value)` of every event a watch from `revision` delivers up to `until`.
async fn events_until(store: &EtcdStore, revision: i64, until: i64) -> Vec<(String, String)> {
    let mut watch = store.watch(PREFIX, revision).await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("events within 30 s")
            .expect("watch open")
            .unwrap();
        let WatchMessage::Events { events, .. } = msg else {
            panic!("compacted: {msg:?}");
        };
        for e in events {
            let done = e.kv.mod_revision >= until;
            seen.push((e.kv.key, String::from_utf8(e.kv.value).unwrap()));
            if done {
                return seen;
            }
        }
    }
}

/// A put, repeated while it fails transiently (as publishers do): the first request on a
/// connection found dead fails with it, the next one dials another member.
async fn put(store: &EtcdStore, key: &str, value: &str) -> meshd_kvstore::Header {
    let mut attempts = 0;
    loop {
        match store.put(key, value.as_bytes().to_vec(), None).await {
            Ok(h) => return h,
            Err(KvError::Etcd { source, .. }) if is_transient(&source) && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put {key}: {e}"),
        }
    }
}

/// Runs a fault against the member the client uses (the first: the connector dials in order),
/// and checks the client carries on through the others.
async fn survives(fault: impl FnOnce(&mut EtcdCluster)) {
    let mut etcd = EtcdCluster::start(3, EtcdOptions::default()).unwrap();
    let store = connect(&config(&etcd)).await.unwrap();
    let first = store
        .put("meshd/test/a", b"1".to_vec(), None)
        .await
        .unwrap();
    let mut watch = store.watch(PREFIX, first.revision + 1).await.unwrap();

    fault(&mut etcd);
    // The open watch ends (error or end of stream) rather than hanging.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch on the failed member did not end");

    // Writes are not retried by the client (not every write is safe to repeat): wait until the
    // others have a leader, in case the failed member led (etcdctl, blocking: nothing else needs
    // this runtime meanwhile), and repeat a put that meets the dead connection.
    etcd.wait_leader(Duration::from_secs(30)).unwrap();
    // Writes and reads go through the members that answer.
    put(&store, "meshd/test/a", "2").await;
    let last = put(&store, "meshd/test/b", "3").await;
    let page = store.range(PREFIX, None, 0, 10).await.unwrap();
    let values: Vec<&[u8]> = page.kvs.iter().map(|kv| kv.value.as_slice()).collect();
    assert_eq!(values, [b"2".as_slice(), b"3".as_slice()]);
    // A watch resumed from the last revision seen before the fault delivers exactly what came
    // after it.
    let seen = events_until(&store, first.revision + 1, last.revision).await;
    assert_eq!(
        seen,
        [
            ("meshd/test/a".to_owned(), "2".to_owned()),
            ("meshd/test/b".to_owned(), "3".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_killed_member_is_left_for_another_and_the_watch_resumes() {
    if !meshd_testing::require_etcd() {
        return;
    }
    survives(|etcd| etcd.member_mut(0).kill()).await;
}

#[tokio::test]
async fn a_frozen_member_is_left_for_another_and_the_watch_resumes() {
    if !meshd_testing::require_etcd() {
        return;
    }
    survives(|etcd| etcd.member_mut(0).pause()).await;
}
