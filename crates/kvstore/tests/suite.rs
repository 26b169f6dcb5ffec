//! The kvstore suite: every case runs against the in-memory store (`memory::`) and against a
//! real etcd (`etcd::`), through the same generic test bodies.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use meshd_kvstore::{
    resolve_identity, wait_for_canaries, watch_cluster, watch_raw, Backend, Compare, EventKind,
    Publisher, PublisherConfig, RawWatchEvent, RawWatchHandle, Txn, TxnOp, WatchConfig,
    WatchMessage,
};
use meshd_state::{
    ClusterId, IdentityKey, IpcacheEntry, Labels, NumericIdentity, SyncCanary, SyncCanaryKey,
};

fn small_pages() -> WatchConfig {
    WatchConfig {
        page_size: 1000,
        ..WatchConfig::default()
    }
}

fn publisher_config(ttl_secs: u64) -> PublisherConfig {
    PublisherConfig {
        ttl: Duration::from_secs(ttl_secs),
        ..PublisherConfig::default()
    }
}

async fn publish_watch_round_trip<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let publisher = Publisher::start(f.writer(), c1(), publisher_config(10))
        .await
        .unwrap();
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "initial sync of an empty prefix", |m| m.synced == 1)
        .await;
    assert!(m.state.is_empty());

    let records: Vec<_> = (1..=3).map(|n| ip(n, 1)).collect();
    for (k, v) in &records {
        publisher.publish(k, v).await.unwrap();
    }
    m.until(&mut w, "3 records", |m| m.state.len() == 3).await;
    assert_eq!(m.state[&records[0].0.to_string()], records[0].1);

    let (k2, v2) = ip(2, 7);
    publisher.publish(&k2, &v2).await.unwrap();
    publisher
        .delete::<IpcacheEntry>(&records[0].0)
        .await
        .unwrap();
    m.until(&mut w, "update and delete", |m| {
        m.state.len() == 2 && m.state.get(&k2.to_string()) == Some(&v2)
    })
    .await;
    assert!(m.deleted(&records[0].0.to_string()));
    assert_eq!(w.stats().malformed(), 0);
    publisher.close().await.unwrap();
    m.until(&mut w, "close removes everything", |m| m.state.is_empty())
        .await;
}

async fn lease_expiry_removes_dead_publisher_keys<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let alive = Publisher::start(f.writer(), c1(), publisher_config(10))
        .await
        .unwrap();
    let (ka, va) = ip(100, 1);
    alive.publish(&ka, &va).await.unwrap();
    // etcd raises TTLs below its minimum (about 2 s for default timings) to that minimum.
    let dying = Publisher::start(f.writer(), c1(), publisher_config(2))
        .await
        .unwrap();
    for n in 1..=5 {
        let (k, v) = ip(n, 1);
        dying.publish(&k, &v).await.unwrap();
    }
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "6 records", |m| m.state.len() == 6).await;

    // A crash: no revoke, the keep-alive just stops.
    drop(dying);
    m.until(&mut w, "the dead publisher's records to expire", |m| {
        m.state.len() == 1
    })
    .await;
    assert_eq!(
        m.keys(),
        vec![ka.to_string()],
        "the live publisher's record stays"
    );
}

async fn restart_resumes_and_misses_nothing<F: Fixture>() {
    let Some(mut f) = F::new().await else { return };
    let writer = f.writer();
    let recs: Vec<_> = (1..=3).map(|n| ip(n, 1)).collect();
    for (k, v) in &recs {
        put(&writer, k, v).await;
    }
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "initial list", |m| m.synced == 1).await;
    assert_eq!(m.state.len(), 3);
    // Seeing a put proves the watch is established, so the restart below interrupts it.
    let (k3, v3) = ip(3, 2);
    put(&writer, &k3, &v3).await;
    m.until(&mut w, "a put through the watch", |m| {
        m.state.get(&k3.to_string()) == Some(&v3)
    })
    .await;

    f.restart().await;
    let (k4, v4) = ip(4, 1);
    put(&writer, &k4, &v4).await;
    delete(&writer, &recs[0].0.to_string()).await;
    let (k2, v2) = ip(2, 9);
    put(&writer, &k2, &v2).await;
    m.until(&mut w, "changes after the restart", |m| {
        m.state.len() == 3
            && m.state.contains_key(&k4.to_string())
            && m.state.get(&k2.to_string()) == Some(&v2)
            && !m.state.contains_key(&recs[0].0.to_string())
    })
    .await;
    assert!(
        w.stats().lists() >= 2,
        "a restart drops the watch, so the watcher relists"
    );
}

async fn compaction_while_disconnected_relists_with_the_right_deletes<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let writer = f.writer();
    let recs: Vec<_> = (1..=4).map(|n| ip(n, 1)).collect();
    for (k, v) in &recs {
        put(&writer, k, v).await;
    }
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "initial list", |m| m.synced == 1).await;

    f.cut();
    delete(&writer, &recs[0].0.to_string()).await;
    delete(&writer, &recs[2].0.to_string()).await;
    for id in 2..6 {
        let (k, v) = ip(2, id);
        put(&writer, &k, &v).await;
    }
    let (k5, v5) = ip(5, 1);
    put(&writer, &k5, &v5).await;
    f.compact_now().await;
    f.heal();

    let expected = keys_of(&[recs[1].0.clone(), recs[3].0.clone(), k5.clone()]);
    m.until(&mut w, "state after the relist", |m| {
        m.synced >= 2 && m.keys() == expected
    })
    .await;
    assert_eq!(
        m.state[&recs[1].0.to_string()],
        ip(2, 5).1,
        "latest value wins"
    );
    assert!(m.deleted(&recs[0].0.to_string()));
    assert!(m.deleted(&recs[2].0.to_string()));
}

async fn compaction_between_list_and_watch_relists<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let writer = f.writer();
    let recs: Vec<_> = (1..=3).map(|n| ip(n, 1)).collect();
    for (k, v) in &recs {
        put(&writer, k, v).await;
    }
    // After the first list, before its watch starts: a delete, a put, and a compaction past
    // them, so the watch from list revision + 1 is refused as compacted.
    let hook_writer = writer.clone();
    let deleted = recs[0].0.to_string();
    let (k9, v9) = ip(9, 1);
    let (hk, hv) = (k9.clone(), v9.clone());
    let compact = Arc::new(tokio::sync::Notify::new());
    let compact_done = Arc::new(tokio::sync::Notify::new());
    let (c, d) = (compact.clone(), compact_done.clone());
    let hook = Box::pin(async move {
        delete(&hook_writer, &deleted).await;
        put(&hook_writer, &hk, &hv).await;
        c.notify_one();
        d.notified().await;
    });
    let reader = BeforeFirstWatch {
        inner: f.reader(),
        hook: Arc::new(Mutex::new(Some(hook))),
    };
    let mut w = watch_cluster::<IpcacheEntry, _>(reader, &c1(), WatchConfig::default());
    compact.notified().await;
    f.compact_now().await;
    compact_done.notify_one();

    let mut m = Model::default();
    let expected = keys_of(&[recs[1].0.clone(), recs[2].0.clone(), k9.clone()]);
    m.until(&mut w, "relist after compaction", |m| {
        m.synced >= 2 && m.keys() == expected
    })
    .await;
    assert!(m.deleted(&recs[0].0.to_string()));
    assert!(w.stats().lists() >= 2);
}

async fn delete_during_disconnect_arrives_after_reconnect<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let writer = f.writer();
    let (k1, v1) = ip(1, 1);
    let (k2, v2) = ip(2, 1);
    put(&writer, &k1, &v1).await;
    put(&writer, &k2, &v2).await;
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "initial list", |m| {
        m.synced == 1 && m.state.len() == 2
    })
    .await;

    f.cut();
    delete(&writer, &k1.to_string()).await;
    // Give the watcher time to notice the cut and fail a few reconnects (not asserted).
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.heal();
    m.until(&mut w, "the delete", |m| m.deleted(&k1.to_string()))
        .await;
    assert_eq!(m.keys(), vec![k2.to_string()]);
}

async fn malformed_values_are_skipped_and_counted<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let writer = f.writer();
    let (k1, v1) = ip(1, 1);
    put(&writer, &k1, &v1).await;
    put_raw(
        &writer,
        "meshd/state/ip/v1/c1/10.0.0.2",
        b"{not json".to_vec(),
    )
    .await;
    put_raw(
        &writer,
        "meshd/state/ip/v1/c1/10.0.0.3",
        br#"{"prefix":"10.0.0.3/32","identity":"web","host_ip":"192.168.0.1"}"#.to_vec(),
    )
    .await;
    put_raw(
        &writer,
        "meshd/state/ip/v1/c1/not-an-address",
        b"{}".to_vec(),
    )
    .await;
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "initial list", |m| m.synced == 1).await;
    assert_eq!(m.keys(), vec![k1.to_string()]);
    assert_eq!(w.stats().malformed(), 3);

    // While watching: a bad value for a new key, then good ones; the watch goes on.
    put_raw(&writer, "meshd/state/ip/v1/c1/10.0.0.4", b"[1,2]".to_vec()).await;
    let (k5, v5) = ip(5, 1);
    put(&writer, &k5, &v5).await;
    m.until(&mut w, "the good record after a bad one", |m| {
        m.state.len() == 2
    })
    .await;
    assert!(w.stats().malformed() >= 4);
    // A malformed update of a held key removes just that key.
    put_raw(&writer, &k1.to_string(), b"null".to_vec()).await;
    m.until(&mut w, "the key with a malformed update to go", |m| {
        m.keys() == vec![k5.to_string()]
    })
    .await;
}

async fn ten_thousand_keys_listed_and_watched<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let writer = f.writer();
    const N: u32 = 10_000;
    write_many(&writer, 0).await;
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), small_pages());
    let mut m = Model::default();
    m.until(&mut w, "10k listed", |m| m.synced == 1).await;
    assert_eq!(m.state.len(), N as usize);
    assert_eq!(w.stats().lists(), 1);

    write_many(&writer, 1).await;
    m.until(&mut w, "10k updates", |m| {
        m.state.values().all(|v| v.identity.local() == 257)
    })
    .await;
    assert_eq!(m.state.len(), N as usize);
    assert_eq!(m.state[&ip(4242, 1).0.to_string()], ip(4242, 1).1);
}

async fn write_many<B: Backend>(writer: &B, id: u16) {
    futures::stream::iter(0..10_000u32)
        .map(|n| {
            let writer = writer.clone();
            async move {
                let (k, v) = ip(n, id);
                put(&writer, &k, &v).await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

async fn publisher_republishes_after_lease_loss<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let publisher = Publisher::start(f.writer(), c1(), publisher_config(3))
        .await
        .unwrap();
    let recs: Vec<_> = (1..=3).map(|n| ip(n, 1)).collect();
    for (k, v) in &recs {
        publisher.publish(k, v).await.unwrap();
    }
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "3 records", |m| m.state.len() == 3).await;

    // The lease disappears behind the publisher's back (as after a long partition).
    let lost = publisher.lease().await;
    f.writer().revoke_lease(lost).await.unwrap();
    m.until(&mut w, "the records to go with the lease", |m| {
        m.state.is_empty()
    })
    .await;
    m.until(&mut w, "the records to come back", |m| m.state.len() == 3)
        .await;
    assert_ne!(publisher.lease().await, lost);
    assert!(
        publisher
            .stats()
            .leases
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    // New publishes go under the new lease.
    let (k4, v4) = ip(4, 1);
    publisher.publish(&k4, &v4).await.unwrap();
    m.until(&mut w, "a publish after the renewal", |m| {
        m.state.len() == 4
    })
    .await;
}

async fn partition_longer_than_ttl_republishes<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    // The publisher sits behind the partition; the watcher does not.
    let publisher = Publisher::start(f.reader(), c1(), publisher_config(2))
        .await
        .unwrap();
    let recs: Vec<_> = (1..=3).map(|n| ip(n, 1)).collect();
    for (k, v) in &recs {
        publisher.publish(k, v).await.unwrap();
    }
    let mut w = watch_cluster::<IpcacheEntry, _>(f.writer(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "3 records", |m| m.state.len() == 3).await;

    f.cut();
    m.until(&mut w, "the lease to expire during the partition", |m| {
        m.state.is_empty()
    })
    .await;
    // Written while partitioned: kept, and published once the partition heals.
    let (k4, v4) = ip(4, 1);
    assert!(publisher.publish(&k4, &v4).await.is_err());
    f.heal();
    m.until(&mut w, "everything re-published under a new lease", |m| {
        m.state.len() == 4
    })
    .await;
    assert!(
        publisher
            .stats()
            .leases
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

async fn writes_during_a_paginated_list_are_not_lost<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let writer = f.writer();
    futures::stream::iter(0..5000u32)
        .map(|n| {
            let writer = writer.clone();
            async move {
                let (k, v) = ip(n, 0);
                put(&writer, &k, &v).await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    // Updates, deletes and new keys race with a list of small pages: pages are read at the
    // first page's revision and the watch resumes right after it, so nothing falls between.
    let churn = {
        let writer = writer.clone();
        tokio::spawn(async move {
            for round in 1..=3u16 {
                for n in (0..5000u32).step_by(7) {
                    let (k, v) = ip(n, round);
                    put(&writer, &k, &v).await;
                    if n % 3 == 0 {
                        delete(&writer, &ip(n + 1, 0).0.to_string()).await;
                    }
                    let (k, v) = ip(10_000 + n, round);
                    put(&writer, &k, &v).await;
                }
            }
        })
    };
    let page = WatchConfig {
        page_size: 200,
        ..WatchConfig::default()
    };
    let mut w = watch_cluster::<IpcacheEntry, _>(f.reader(), &c1(), page);
    let mut m = Model::default();
    m.until(&mut w, "the first list", |m| m.synced >= 1).await;
    churn.await.unwrap();

    // Ground truth: what etcd holds now.
    let mut truth = std::collections::BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = writer
            .range("meshd/state/ip/v1/c1/", after.as_deref(), 0, 1000)
            .await
            .unwrap();
        for kv in &page.kvs {
            let (_, v) = meshd_state::decode::<IpcacheEntry>(&kv.key, &kv.value).unwrap();
            truth.insert(kv.key.clone(), v);
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more {
            break;
        }
    }
    m.until(&mut w, "the watcher to match etcd", |m| m.state == truth)
        .await;
}

async fn sync_canaries_are_written_and_awaited<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let publisher = Publisher::start(f.writer(), c1(), publisher_config(10))
        .await
        .unwrap();
    let (k, v) = ip(1, 1);
    publisher.publish(&k, &v).await.unwrap();
    let reader = f.reader();
    let waiter =
        tokio::spawn(async move { wait_for_canaries(reader, &c1(), &["ip", "nodes"]).await });
    publisher.mark_synced::<IpcacheEntry>().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the nodes canary is still missing");
    publisher
        .mark_synced::<meshd_state::NodeRecord>()
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("canaries seen")
        .unwrap();

    let page = f
        .reader()
        .range("meshd/synced/c1/", None, 0, 10)
        .await
        .unwrap();
    let keys: Vec<&str> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["meshd/synced/c1/ip", "meshd/synced/c1/nodes"]);
    let (key, canary) =
        meshd_state::decode::<SyncCanary>(&page.kvs[0].key, &page.kvs[0].value).unwrap();
    assert_eq!(
        key,
        SyncCanaryKey {
            cluster: c1(),
            resource: "ip".into()
        }
    );
    assert!(canary.synced_at_ms > 0);
}

/// Compare-and-swap: `Absent` holds only for a missing key, `ModRevision` only for the
/// revision last written; the failing branch applies `otherwise`; the writes of one
/// transaction share one revision and reach a watcher together.
async fn transactions_compare_and_swap<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let b = f.writer();
    let create = |key: &str, value: &str| Txn {
        when: vec![Compare::absent(key)],
        then: vec![TxnOp::put(key, value)],
        otherwise: vec![TxnOp::put("tx/lost", key)],
    };
    let start = b.range("tx/", None, 0, 1).await.unwrap().header.revision;
    let mut w = b.watch("tx/", start + 1).await.unwrap();

    let first = b.txn(create("tx/a", "1")).await.unwrap();
    assert!(first.succeeded);
    let again = b.txn(create("tx/a", "2")).await.unwrap();
    assert!(!again.succeeded, "the key exists: the compare fails");
    let page = b.range("tx/", None, 0, 10).await.unwrap();
    let kvs: Vec<(&str, &[u8])> = page
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(
        kvs,
        [("tx/a", b"1".as_slice()), ("tx/lost", b"tx/a".as_slice())]
    );
    let a_rev = page.kvs[0].mod_revision;
    assert_eq!(a_rev, first.header.revision);

    let stale = Txn {
        when: vec![Compare::ModRevision {
            key: "tx/a".into(),
            revision: a_rev - 1,
        }],
        then: vec![TxnOp::delete("tx/a")],
        otherwise: Vec::new(),
    };
    assert!(!b.txn(stale).await.unwrap().succeeded);
    let both = Txn {
        when: vec![
            Compare::ModRevision {
                key: "tx/a".into(),
                revision: a_rev,
            },
            Compare::absent("tx/b"),
        ],
        then: vec![
            TxnOp::delete("tx/a"),
            TxnOp::put("tx/b", "1"),
            TxnOp::put("tx/c", "1"),
        ],
        otherwise: Vec::new(),
    };
    let done = b.txn(both).await.unwrap();
    assert!(done.succeeded);
    let keys: Vec<String> = b
        .range("tx/", None, 0, 10)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["tx/b", "tx/c", "tx/lost"]);

    // Seen by a watcher: a, lost, then the three writes of the last transaction at its revision.
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while seen.len() < 5 {
            match w.next().await {
                Some(Ok(WatchMessage::Events { events, .. })) => seen.extend(events),
                other => panic!("watch ended: {other:?}"),
            }
        }
    })
    .await
    .expect("the transactions' events within the deadline");
    let last: Vec<(EventKind, &str, i64)> = seen[2..]
        .iter()
        .map(|e| (e.kind, e.kv.key.as_str(), e.kv.mod_revision))
        .collect();
    let r = done.header.revision;
    assert_eq!(
        last,
        [
            (EventKind::Delete, "tx/a", r),
            (EventKind::Put, "tx/b", r),
            (EventKind::Put, "tx/c", r)
        ]
    );
}

/// Concurrent allocations of one label set (as two nodes adding endpoints with the same
/// labels) all get one number; of different label sets, different numbers; and a collected
/// identity key comes back with the same number.
async fn racing_nodes_agree_on_identity_numbers<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let id1 = ClusterId::new(1).unwrap();
    let same = Labels::from_pairs([("app", "web"), ("meshd.io/cluster", "c1")]);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (b, same) = (f.writer(), same.clone());
            tokio::spawn(async move { resolve_identity(&b, &c1(), id1, &same).await.unwrap() })
        })
        .collect();
    let mut ids: Vec<NumericIdentity> = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(ids[0].cluster_id(), Some(id1));

    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let b = f.writer();
            let labels = Labels::from_pairs([("app", format!("svc{i}"))]);
            tokio::spawn(async move { resolve_identity(&b, &c1(), id1, &labels).await.unwrap() })
        })
        .collect();
    let mut distinct = std::collections::BTreeSet::new();
    for t in tasks {
        assert!(
            distinct.insert(t.await.unwrap()),
            "a number was handed out twice"
        );
    }
    assert!(!distinct.contains(&ids[0]));

    // The identity key garbage-collected behind our back: the index brings back the same
    // number and the key is written again.
    let key = IdentityKey {
        cluster: c1(),
        id: ids[0],
    }
    .to_string();
    let b = f.writer();
    b.delete(&key).await.unwrap();
    assert_eq!(
        resolve_identity(&b, &c1(), id1, &same).await.unwrap(),
        ids[0]
    );
    let page = b.range(&key, None, 0, 10).await.unwrap();
    assert_eq!(page.kvs.iter().filter(|kv| kv.key == key).count(), 1);
}

/// What a raw watch's events add up to.
#[derive(Default)]
struct RawModel {
    revisions: BTreeMap<String, i64>,
    synced: i64,
    progress: i64,
}

impl RawModel {
    async fn until(&mut self, w: &mut RawWatchHandle, what: &str, done: impl Fn(&Self) -> bool) {
        tokio::time::timeout(DEADLINE, async {
            while !done(self) {
                match w.next().await.expect("the watch runs") {
                    RawWatchEvent::Event(e) if e.kind == EventKind::Put => {
                        self.revisions.insert(e.kv.key, e.kv.mod_revision);
                    }
                    RawWatchEvent::Event(e) => {
                        self.revisions.remove(&e.kv.key);
                    }
                    RawWatchEvent::Synced { revision } => self.synced = revision,
                    RawWatchEvent::Progress { revision } => self.progress = revision,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {DEADLINE:?}"));
    }
}

/// The raw watch: puts with their revisions (an identical rewrite included), progress after
/// each response, and a relist after compaction that sweeps a delete missed meanwhile.
async fn raw_watch_reports_revisions_and_relists<F: Fixture>() {
    let Some(f) = F::new().await else { return };
    let b = f.writer();
    let first = b.put("raw/a", b"1".to_vec(), None).await.unwrap().revision;
    b.put("raw/b", b"1".to_vec(), None).await.unwrap();
    let mut w = watch_raw(f.reader(), "raw/".into(), small_pages());
    let mut m = RawModel::default();
    m.until(&mut w, "initial list", |m| m.synced > 0).await;
    assert_eq!(m.revisions.len(), 2);
    assert_eq!(m.revisions["raw/a"], first);

    let again = b.put("raw/a", b"1".to_vec(), None).await.unwrap().revision;
    m.until(&mut w, "identical rewrite", |m| {
        m.revisions["raw/a"] == again && m.progress >= again
    })
    .await;

    f.cut();
    b.delete("raw/b").await.unwrap();
    let c = b.put("raw/c", b"1".to_vec(), None).await.unwrap().revision;
    f.compact_now().await;
    f.heal();
    m.until(&mut w, "relist after the cut", |m| {
        m.synced >= c && !m.revisions.contains_key("raw/b")
    })
    .await;
    assert_eq!(m.revisions.keys().collect::<Vec<_>>(), ["raw/a", "raw/c"]);
    assert_eq!(m.revisions["raw/c"], c);
}

macro_rules! suite {
    ($name:ident, $fixture:ty) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn publish_watch_round_trip() {
                super::publish_watch_round_trip::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_expiry_removes_dead_publisher_keys() {
                super::lease_expiry_removes_dead_publisher_keys::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn restart_resumes_and_misses_nothing() {
                super::restart_resumes_and_misses_nothing::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn compaction_while_disconnected_relists_with_the_right_deletes() {
                super::compaction_while_disconnected_relists_with_the_right_deletes::<$fixture>()
                    .await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn compaction_between_list_and_watch_relists() {
                super::compaction_between_list_and_watch_relists::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delete_during_disconnect_arrives_after_reconnect() {
                super::delete_during_disconnect_arrives_after_reconnect::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn malformed_values_are_skipped_and_counted() {
                super::malformed_values_are_skipped_and_counted::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ten_thousand_keys_listed_and_watched() {
                super::ten_thousand_keys_listed_and_watched::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn publisher_republishes_after_lease_loss() {
                super::publisher_republishes_after_lease_loss::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn partition_longer_than_ttl_republishes() {
                super::partition_longer_than_ttl_republishes::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writes_during_a_paginated_list_are_not_lost() {
                super::writes_during_a_paginated_list_are_not_lost::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sync_canaries_are_written_and_awaited() {
                super::sync_canaries_are_written_and_awaited::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn raw_watch_reports_revisions_and_relists() {
                super::raw_watch_reports_revisions_and_relists::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transactions_compare_and_swap() {
                super::transactions_compare_and_swap::<$fixture>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn racing_nodes_agree_on_identity_numbers() {
                super::racing_nodes_agree_on_identity_numbers::<$fixture>().await
            }
        }
    };
}

suite!(memory, MemoryFixture);
suite!(etcd, EtcdFixture);

/// Only the in-memory store can change the cluster id inside one open watch stream, which
/// exercises the response-header check; a real etcd cluster is only replaced across a
/// reconnect (`etcd_replaced_by_another_cluster_relists_and_sweeps`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_cluster_id_relists_and_sweeps() {
    let store = meshd_kvstore::MemoryStore::new();
    let writer = store.new_handle();
    let (k1, v1) = ip(1, 1);
    put(&writer, &k1, &v1).await;
    let mut w = watch_cluster::<IpcacheEntry, _>(store.new_handle(), &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "initial list", |m| m.synced == 1).await;

    store.replace_cluster();
    let (k2, v2) = ip(2, 1);
    put(&writer, &k2, &v2).await;
    m.until(&mut w, "the new cluster's state", |m| {
        m.keys() == vec![k2.to_string()]
    })
    .await;
    assert!(m.deleted(&k1.to_string()));
}

#[tokio::test]
async fn publisher_refuses_records_of_another_cluster() {
    let store = meshd_kvstore::MemoryStore::new();
    let publisher = Publisher::start(store.clone(), c1(), publisher_config(10))
        .await
        .unwrap();
    let (mut k, v) = ip(1, 1);
    k.cluster = meshd_state::ClusterName::new("c2").unwrap();
    let err = publisher.publish(&k, &v).await.unwrap_err();
    assert!(err.to_string().contains("cluster c2"), "{err}");
    assert!(store
        .range("meshd/", None, 0, 10)
        .await
        .unwrap()
        .kvs
        .is_empty());
}

/// A real etcd replaced by another etcd cluster behind the same address: after the reconnect
/// the watcher relists against the new cluster (lower revisions, other cluster id) and deletes
/// what only the old one had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_replaced_by_another_cluster_relists_and_sweeps() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let old = tokio::task::block_in_place(meshd_testing::etcd::Etcd::start).unwrap();
    let new = tokio::task::block_in_place(meshd_testing::etcd::Etcd::start).unwrap();
    let config = |endpoint: String| meshd_kvstore::EtcdConfig {
        request_timeout: Duration::from_secs(5),
        ..meshd_kvstore::EtcdConfig::new([endpoint])
    };
    let old_writer = meshd_kvstore::connect(&config(old.endpoint()))
        .await
        .unwrap();
    let new_writer = meshd_kvstore::connect(&config(new.endpoint()))
        .await
        .unwrap();
    let old_id = old_writer.status().await.unwrap().cluster_id;
    let new_id = new_writer.status().await.unwrap().cluster_id;
    assert_ne!(old_id, new_id, "two etcd clusters with distinct ids");

    // The old cluster has more history, so the new one's revisions are lower.
    for id in 0..20 {
        for n in 1..=3 {
            let (k, v) = ip(n, id);
            put(&old_writer, &k, &v).await;
        }
    }
    let (k2, v2) = ip(2, 100);
    let (k4, v4) = ip(4, 100);
    put(&new_writer, &k2, &v2).await;
    put(&new_writer, &k4, &v4).await;

    let proxy = Proxy::start(old.client_url_port()).await;
    let reader = meshd_kvstore::connect(&config(format!("http://127.0.0.1:{}", proxy.port)))
        .await
        .unwrap();
    let mut w = watch_cluster::<IpcacheEntry, _>(reader, &c1(), WatchConfig::default());
    let mut m = Model::default();
    m.until(&mut w, "the old cluster's state", |m| {
        m.synced == 1 && m.state.len() == 3
    })
    .await;

    proxy.retarget(new.client_url_port());
    proxy.cut();
    proxy.heal();
    let expected = keys_of(&[k2.clone(), k4.clone()]);
    m.until(&mut w, "the new cluster's state", |m| {
        m.keys() == expected && m.state[&k2.to_string()] == v2
    })
    .await;
    assert!(m.deleted(&ip(1, 0).0.to_string()));
    assert!(m.deleted(&ip(3, 0).0.to_string()));
}
