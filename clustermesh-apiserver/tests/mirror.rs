//! The mirror (`--kvstoremesh`) against real etcds: a remote cluster c2 and the local one. The
//! cache must equal the remote's shared state, byte for byte, under every change: watch
//! events, a relist after the mirror was down (sweep), an unreachable remote (fail-static), a
//! removed file (drain), a changed cluster id, the per-cluster limit, compaction.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use clustermesh_apiserver::mirror::{self, MirrorConfig, MirrorMetrics};
use common::eventually;
use meshd_kvstore::{Backend, BackoffConfig, EtcdConfig, EtcdStore};
use meshd_state::keys::{cache_key, cache_prefix, cache_status_key};
use meshd_state::{CacheStatus, ClusterId, ClusterName};
use meshd_testing::etcd::Etcd;

const C2_CONFIG: &str = "meshd/cluster-config/c2";

fn config_value(id: u32) -> Vec<u8> {
    format!(r#"{{"name":"c2","id":{id}}}"#).into_bytes()
}

async fn connect(etcd: &Etcd) -> EtcdStore {
    meshd_kvstore::connect(&EtcdConfig::new([etcd.endpoint()]))
        .await
        .expect("connect to etcd")
}

/// Every key under `prefix` with its value.
async fn dump(store: &EtcdStore, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .range(prefix, after.as_deref(), 0, 1000)
            .await
            .unwrap();
        let next = page
            .more
            .then(|| page.kvs.last().map(|kv| kv.key.clone()))
            .flatten();
        for kv in page.kvs {
            out.insert(kv.key, kv.value);
        }
        match next {
            Some(k) => after = Some(k),
            None => return out,
        }
    }
}

/// What the cache must hold: the remote's shared keys of c2, under their cache keys.
async fn expected(remote: &EtcdStore) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for prefix in ["meshd/state/", "meshd/synced/", C2_CONFIG] {
        for (k, v) in dump(remote, prefix).await {
            // Only c2's own keys of the kinds other clusters read:
            // meshd/state/<kind>/<version>/c2/..., meshd/synced/c2/..., its config.
            let parts: Vec<&str> = k.split('/').collect();
            let wanted = match parts.as_slice() {
                ["meshd", "state", kind, _, "c2", rest @ ..] => {
                    ["identities", "ip", "nodes", "services"].contains(kind)
                        && !rest.concat().is_empty()
                }
                ["meshd", "synced", "c2", _] => true,
                _ => k == C2_CONFIG,
            };
            if wanted {
                out.insert(cache_key("c2", &k).unwrap(), v);
            }
        }
    }
    out
}

async fn cache(local: &EtcdStore) -> BTreeMap<String, Vec<u8>> {
    dump(local, &cache_prefix("c2")).await
}

async fn status(local: &EtcdStore) -> Option<CacheStatus> {
    let key = cache_status_key("c2");
    let page = local.range(&key, None, 0, 1).await.unwrap();
    page.kvs
        .into_iter()
        .find(|kv| kv.key == key)
        .map(|kv| serde_json::from_slice(&kv.value).expect("a CacheStatus"))
}

/// Waits until the cache equals the remote (and the status says ready and connected); on
/// the deadline, fails showing the difference.
async fn converged(local: &EtcdStore, remote: &EtcdStore) -> BTreeMap<String, Vec<u8>> {
    let start = std::time::Instant::now();
    loop {
        let want = expected(remote).await;
        let have = cache(local).await;
        let s = status(local).await;
        if have == want
            && s.as_ref()
                .is_some_and(|s| s.connected && s.ready && s.entries == want.len() as u64)
        {
            return want;
        }
        if start.elapsed() > common::DEADLINE {
            let missing: Vec<_> = want
                .keys()
                .filter(|k| have.get(*k) != want.get(*k))
                .collect();
            let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
            panic!("the cache never equalled the remote: status {s:?}, missing or different {missing:?}, extra {extra:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Remote c2 (id 2) with `n` nodes and `n` ipcache entries, odd bytes included, and the
/// canaries of both.
async fn seed(remote: &EtcdStore, n: usize) {
    remote.put(C2_CONFIG, config_value(2), None).await.unwrap();
    // Another cluster's config in the same etcd is not mirrored.
    for i in 0..n {
        remote
            .put(
                &format!("meshd/state/nodes/v1/c2/n{i:04}"),
                format!(r#"{{"name":"n{i:04}","cluster":"c2"}}"#).into_bytes(),
                None,
            )
            .await
            .unwrap();
        remote
            .put(
                &format!("meshd/state/ip/v1/c2/10.2.{}.{}", i / 250, i % 250),
                vec![0, 0xff, b'{', i as u8, b'\n'],
                None,
            )
            .await
            .unwrap();
    }
    for kind in ["nodes", "ip"] {
        remote
            .put(
                &format!("meshd/synced/c2/{kind}"),
                br#"{"synced_at_ms":1}"#.to_vec(),
                None,
            )
            .await
            .unwrap();
    }
}

struct Harness {
    local_etcd: Etcd,
    remote_etcd: Etcd,
    local: EtcdStore,
    remote: EtcdStore,
    dir: tempfile::TempDir,
    metrics: MirrorMetrics,
    limit: u64,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    async fn new(limit: u64) -> Option<Harness> {
        Self::with_local(limit, common::etcd(None)?).await
    }

    async fn with_local(limit: u64, local_etcd: Etcd) -> Option<Harness> {
        let remote_etcd = common::etcd(None)?;
        let local = connect(&local_etcd).await;
        let remote = connect(&remote_etcd).await;
        let dir = tempfile::tempdir().unwrap();
        let h = Harness {
            local_etcd,
            remote_etcd,
            local,
            remote,
            dir,
            metrics: MirrorMetrics::default(),
            limit,
            task: None,
        };
        h.write_file();
        Some(h)
    }

    fn write_file(&self) {
        std::fs::write(
            self.dir.path().join("c2.yaml"),
            format!("endpoints: [{}]\n", self.remote_etcd.endpoint()),
        )
        .unwrap();
    }

    fn start(&mut self) {
        let mut config = MirrorConfig::new(
            self.dir.path().to_owned(),
            ClusterName::new("c1").unwrap(),
            ClusterId::new(1).unwrap(),
        );
        config.limit = self.limit;
        config.rescan = Duration::from_millis(100);
        config.probe = Duration::from_millis(200);
        // Small pages and batches: paging and batching are exercised with few keys.
        config.page_size = 40;
        config.batch = 16;
        config.backoff = BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        };
        self.task = Some(tokio::spawn(mirror::run(
            self.local.clone(),
            config,
            self.metrics.clone(),
        )));
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The mirror's metrics as `/metrics` shows them.
fn render(metrics: &MirrorMetrics) -> String {
    let mut r = prometheus_client::registry::Registry::with_prefix("meshd_apiserver");
    metrics.register(&mut r);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
    out
}

/// The local etcd revision each cache key was last written at.
async fn revisions(local: &EtcdStore) -> BTreeMap<String, i64> {
    let page = local
        .range(&cache_prefix("c2"), None, 0, 10_000)
        .await
        .unwrap();
    page.kvs
        .into_iter()
        .map(|kv| (kv.key, kv.mod_revision))
        .collect()
}

#[tokio::test]
async fn list_and_watch_are_mirrored_byte_for_byte_canaries_last() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 120).await;
    h.remote
        .put("meshd/cluster-config/c9", b"{}".to_vec(), None)
        .await
        .unwrap();
    // A key of another cluster in c2's etcd, and one of a kind no remote reader consumes:
    // never read (the mirror reads only c2's own prefixes of the shared kinds), so neither
    // mirrored nor counted. A malformed key under c2's own prefix: refused, counted.
    for key in [
        "meshd/state/nodes/v1/c3/x",
        "meshd/state/identity-labels/v1/c2/app=x",
        "meshd/state/nodes/v1/c2/",
    ] {
        h.remote.put(key, b"{}".to_vec(), None).await.unwrap();
    }
    h.start();
    let want = converged(&h.local, &h.remote).await;
    assert_eq!(want.len(), 1 + 240 + 2);
    let cached = cache(&h.local).await;
    assert!(!cached.contains_key("meshd/cache/c2/state/nodes/v1/c3/x"));
    assert!(!cached.contains_key("meshd/cache/c2/state/identity-labels/v1/c2/app=x"));
    let s = status(&h.local).await.unwrap();
    assert!(!cached.contains_key("meshd/cache/c2/state/nodes/v1/c2/"));
    assert_eq!((s.rejected, s.limit), (1, mirror::DEFAULT_LIMIT));
    assert_eq!(s.stale_since, None);
    assert!(s.last_sync_unix_ms > 0);

    // Canaries were written after every entry of the list.
    let revs = revisions(&h.local).await;
    let (canaries, entries): (Vec<_>, Vec<_>) =
        revs.iter().partition(|(k, _)| k.contains("/synced/"));
    let first_canary = canaries.iter().map(|(_, r)| **r).min().unwrap();
    let last_entry = entries.iter().map(|(_, r)| **r).max().unwrap();
    assert!(
        last_entry < first_canary,
        "entries up to revision {last_entry}, canaries from {first_canary}"
    );

    // Watch: puts, overwrites, deletes, in a burst larger than one transaction.
    for i in 0..60 {
        let key = format!("meshd/state/services/v1/c2/default/s{i}");
        h.remote.put(&key, vec![i as u8; 3], None).await.unwrap();
        if i % 3 == 0 {
            h.remote.delete(&key).await.unwrap();
        }
    }
    for i in 0..30 {
        h.remote
            .delete(&format!("meshd/state/nodes/v1/c2/n{i:04}"))
            .await
            .unwrap();
    }
    h.remote
        .put("meshd/state/ip/v1/c2/10.2.0.1", b"changed".to_vec(), None)
        .await
        .unwrap();
    let want = converged(&h.local, &h.remote).await;
    assert_eq!(
        want.get("meshd/cache/c2/state/ip/v1/c2/10.2.0.1")
            .map(Vec::as_slice),
        Some(&b"changed"[..])
    );
    // A canary that appears during the watch (a publisher's first sync completing) reaches
    // the cache after the entries the remote wrote before it.
    let txn = |from: usize| meshd_kvstore::Txn {
        when: vec![],
        then: (from..from + 100)
            .map(|i| {
                meshd_kvstore::TxnOp::put(
                    format!("meshd/state/identities/v1/c2/id/{}", 70000 + i),
                    b"{}".to_vec(),
                )
            })
            .collect(),
        otherwise: vec![],
    };
    for from in (0..500).step_by(100) {
        h.remote.txn(txn(from)).await.unwrap();
    }
    h.remote
        .put("meshd/synced/c2/identities", b"{}".to_vec(), None)
        .await
        .unwrap();
    let want = converged(&h.local, &h.remote).await;
    let revs = revisions(&h.local).await;
    let canary = revs["meshd/cache/c2/synced/c2/identities"];
    let last_identity = revs
        .iter()
        .filter(|(k, _)| k.contains("/identities/"))
        .map(|(_, r)| *r)
        .max()
        .unwrap();
    assert!(
        last_identity < canary,
        "identities up to revision {last_identity}, their new canary at {canary}"
    );

    let text = render(&h.metrics);
    for line in [
        format!(
            "meshd_apiserver_mirror_entries{{cluster=\"c2\"}} {}",
            want.len()
        ),
        "meshd_apiserver_mirror_connected{cluster=\"c2\"} 1".to_string(),
        "meshd_apiserver_mirror_ready{cluster=\"c2\"} 1".to_string(),
        "meshd_apiserver_mirror_rejected{cluster=\"c2\"} 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("meshd_apiserver_mirror_events_total{cluster=\"c2\"} ")),
        "{text}"
    );
}

#[tokio::test]
async fn a_relist_after_a_restart_sweeps_and_writes_only_the_difference() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 50).await;
    h.start();
    converged(&h.local, &h.remote).await;
    h.stop();
    // While the mirror is down: deletes, a new key, a changed value, and junk in the cache.
    for i in 0..10 {
        h.remote
            .delete(&format!("meshd/state/nodes/v1/c2/n{i:04}"))
            .await
            .unwrap();
    }
    h.remote
        .put("meshd/state/nodes/v1/c2/new", b"new".to_vec(), None)
        .await
        .unwrap();
    h.remote
        .put("meshd/state/nodes/v1/c2/n0049", b"v2".to_vec(), None)
        .await
        .unwrap();
    h.local
        .put("meshd/cache/c2/state/nodes/v1/c2/junk", b"x".to_vec(), None)
        .await
        .unwrap();
    let before = revisions(&h.local).await;
    h.start();
    let want = converged(&h.local, &h.remote).await;
    assert!(!want.contains_key("meshd/cache/c2/state/nodes/v1/c2/n0000"));
    // Unchanged keys were not written again.
    let after = revisions(&h.local).await;
    let unchanged = "meshd/cache/c2/state/nodes/v1/c2/n0020";
    assert_eq!(before.get(unchanged), after.get(unchanged));
    assert_ne!(
        before.get("meshd/cache/c2/state/nodes/v1/c2/n0049"),
        after.get("meshd/cache/c2/state/nodes/v1/c2/n0049")
    );
}

/// The mirror stopped in the middle of its first list (the cache holds part of it): no canary
/// is in the cache before every entry of its list is, and the next start converges.
#[tokio::test]
async fn a_mirror_stopped_mid_list_never_shows_a_canary_early_and_converges() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 3000).await;
    let want = expected(&h.remote).await;
    h.start();
    // Stop it as soon as part of the list is in (6,000 keys in batches of 16: hundreds of
    // transactions, so it is stopped well before the end).
    eventually("part of the list in the cache", || async {
        (cache(&h.local).await.len() > 20).then_some(())
    })
    .await;
    h.stop();
    let have = cache(&h.local).await;
    assert!(
        have.len() < want.len(),
        "the list finished before the mirror was stopped"
    );
    let canaries: Vec<_> = have.keys().filter(|k| k.contains("/synced/")).collect();
    assert!(
        canaries.is_empty(),
        "canaries {canaries:?} in a cache holding {} of {} keys",
        have.len(),
        want.len()
    );
    // Whatever was written is the remote's, byte for byte.
    for (k, v) in &have {
        assert_eq!(want.get(k), Some(v), "{k}");
    }
    h.start();
    converged(&h.local, &h.remote).await;
}

/// The local etcd stops answering (SIGSTOP: a slow or hung etcd) while the remote changes; once
/// it answers again the cache ends exactly equal to the remote.
#[tokio::test]
async fn a_hung_local_etcd_delays_the_cache_and_it_converges() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 50).await;
    h.start();
    converged(&h.local, &h.remote).await;
    h.local_etcd.pause();
    for i in 0..30 {
        h.remote
            .delete(&format!("meshd/state/nodes/v1/c2/n{i:04}"))
            .await
            .unwrap();
        h.remote
            .put(
                &format!("meshd/state/ip/v1/c2/10.2.9.{i}"),
                b"while the local etcd hung".to_vec(),
                None,
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.local_etcd.resume();
    let want = converged(&h.local, &h.remote).await;
    assert!(want.contains_key("meshd/cache/c2/state/ip/v1/c2/10.2.9.29"));
    assert!(!want.contains_key("meshd/cache/c2/state/nodes/v1/c2/n0000"));
}

/// The local etcd runs out of space (its quota) in the middle of the mirror's list: nothing is
/// lost or invented (whatever the cache holds is the remote's, no canary of the unfinished
/// list), the mirror keeps running, and once an operator makes room (the quota
/// raised and the alarm disarmed) the cache ends exactly equal to the remote.
#[tokio::test]
async fn a_full_local_etcd_loses_nothing_and_converges_once_there_is_room() {
    if !meshd_testing::require_etcd() {
        return;
    }
    let local_etcd = Etcd::start_with(meshd_testing::etcd::EtcdOptions {
        // A few hundred KB of values fill it.
        extra_args: vec!["--quota-backend-bytes=1048576".into()],
        ..Default::default()
    })
    .expect("local etcd with a small quota");
    let Some(mut h) = Harness::with_local(mirror::DEFAULT_LIMIT, local_etcd).await else {
        return;
    };
    // 4,000 entries of 4 KB: many times what the local quota holds (etcd checks the quota
    // against its file size, which grows as its batched commits land, so a fast writer
    // overshoots it by what one commit interval carries).
    h.remote
        .put(C2_CONFIG, config_value(2), None)
        .await
        .unwrap();
    for chunk in (0..4000).collect::<Vec<u32>>().chunks(100) {
        let then = chunk
            .iter()
            .map(|i| {
                meshd_kvstore::TxnOp::put(
                    format!("meshd/state/ip/v1/c2/10.2.{}.{}", i / 250, i % 250),
                    vec![b'x'; 4096],
                )
            })
            .collect();
        h.remote
            .txn(meshd_kvstore::Txn {
                then,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    h.remote
        .put(
            "meshd/synced/c2/ip",
            br#"{"synced_at_ms":1}"#.to_vec(),
            None,
        )
        .await
        .unwrap();
    let want = expected(&h.remote).await;
    h.start();
    eventually("the local etcd to report no space", || async {
        let out = h.local_etcd.etcdctl(&["alarm", "list"]).unwrap_or_default();
        out.contains("NOSPACE").then_some(())
    })
    .await;
    // Give the mirror time to retry against the full store.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let have = cache(&h.local).await;
    assert!(have.len() < want.len(), "the quota did not fill");
    for (k, v) in &have {
        assert_eq!(want.get(k), Some(v), "{k}: not the remote's");
    }
    assert!(
        !have.keys().any(|k| k.contains("/synced/")),
        "a canary of a list the cache does not hold"
    );
    assert!(h.task.as_ref().is_some_and(|t| !t.is_finished()));

    // Room again: the operator raises the quota (a restart) and disarms the alarm; the cache
    // becomes exactly the remote.
    h.local_etcd
        .restart_with_args(vec!["--quota-backend-bytes=268435456".into()])
        .unwrap();
    h.local_etcd.etcdctl(&["alarm", "disarm"]).unwrap();
    converged(&h.local, &h.remote).await;
}

#[tokio::test]
async fn an_unreachable_remote_keeps_its_entries_and_is_stale() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 20).await;
    h.start();
    let want = converged(&h.local, &h.remote).await;
    h.remote_etcd.stop();
    let s = eventually("the status to go stale", || async {
        status(&h.local)
            .await
            .filter(|s| !s.connected && s.stale_since.is_some())
    })
    .await;
    assert!(s.last_error.is_some(), "{s:?}");
    assert_eq!(cache(&h.local).await, want, "fail-static: the entries stay");
    assert_eq!(s.entries, want.len() as u64);

    // The mirror restarts while the remote is down: it stays what it was (ready, stale since
    // the same time, every entry), not an empty, never-synced cluster.
    h.stop();
    h.metrics = MirrorMetrics::default();
    h.start();
    let entries = format!(
        "meshd_apiserver_mirror_entries{{cluster=\"c2\"}} {}",
        want.len()
    );
    eventually("the restarted mirror to find the remote down", || async {
        let text = render(&h.metrics);
        text.lines()
            .any(|l| l == "meshd_apiserver_mirror_connected{cluster=\"c2\"} 0")
            .then_some(text)
    })
    .await;
    let text = render(&h.metrics);
    assert!(
        text.lines().any(|l| l == entries),
        "{entries} missing from\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "meshd_apiserver_mirror_ready{cluster=\"c2\"} 1"),
        "{text}"
    );
    let after = status(&h.local).await.unwrap();
    assert_eq!(
        (after.ready, after.stale_since, after.entries),
        (true, s.stale_since, want.len() as u64)
    );
    assert_eq!(cache(&h.local).await, want);

    // Back, with a change made meanwhile (the remote restarted on its data).
    h.remote_etcd.restart().unwrap();
    h.remote
        .put("meshd/state/nodes/v1/c2/after", b"a".to_vec(), None)
        .await
        .unwrap();
    converged(&h.local, &h.remote).await;
    let s = status(&h.local).await.unwrap();
    assert_eq!((s.stale_since, s.last_error), (None, None));
}

#[tokio::test]
async fn a_removed_file_drains_the_cluster_and_a_restart_drains_leftovers() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 20).await;
    h.start();
    converged(&h.local, &h.remote).await;
    std::fs::remove_file(h.dir().join("c2.yaml")).unwrap();
    eventually("the cache of c2 to be drained", || async {
        (cache(&h.local).await.is_empty() && status(&h.local).await.is_none()).then_some(())
    })
    .await;

    // Mirrored again; then the file goes while the mirror is down.
    h.write_file();
    converged(&h.local, &h.remote).await;
    h.stop();
    std::fs::remove_file(h.dir().join("c2.yaml")).unwrap();
    h.start();
    eventually(
        "leftovers of a removed file to be drained at start",
        || async {
            (cache(&h.local).await.is_empty() && status(&h.local).await.is_none()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_changed_cluster_id_drains_then_mirrors_again() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 20).await;
    h.start();
    converged(&h.local, &h.remote).await;

    // Live: the remote is rebuilt under another id.
    for (k, _) in dump(&h.remote, "meshd/").await {
        h.remote.delete(&k).await.unwrap();
    }
    h.remote
        .put(C2_CONFIG, config_value(3), None)
        .await
        .unwrap();
    h.remote
        .put("meshd/state/nodes/v1/c2/rebuilt", b"r".to_vec(), None)
        .await
        .unwrap();
    h.remote
        .put("meshd/synced/c2/nodes", b"{}".to_vec(), None)
        .await
        .unwrap();
    let want = converged(&h.local, &h.remote).await;
    assert_eq!(want.len(), 3);
    assert_eq!(
        want["meshd/cache/c2/cluster-config/c2"],
        config_value(3),
        "the new id"
    );

    // While the mirror is down: id 4 and other keys; the old ones go at the next start.
    h.stop();
    h.remote
        .put(C2_CONFIG, config_value(4), None)
        .await
        .unwrap();
    h.remote
        .put("meshd/state/nodes/v1/c2/four", b"4".to_vec(), None)
        .await
        .unwrap();
    h.start();
    let want = converged(&h.local, &h.remote).await;
    assert_eq!(want["meshd/cache/c2/cluster-config/c2"], config_value(4));
    assert!(want.contains_key("meshd/cache/c2/state/nodes/v1/c2/four"));

    // The local cluster's id is refused, and what the cache held is drained.
    h.remote
        .put(C2_CONFIG, config_value(1), None)
        .await
        .unwrap();
    let s = eventually("the local id to be refused", || async {
        status(&h.local).await.filter(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("local cluster's id"))
        })
    })
    .await;
    assert!(!s.ready);
    eventually("the refused cluster's cache to be drained", || async {
        cache(&h.local).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_limit_is_enforced_counted_and_withholds_canaries() {
    let Some(mut h) = Harness::new(10).await else {
        return;
    };
    // 1 config + 8 nodes + 8 ip + 2 canaries = 19 keys; in key order the config, the 8 ip
    // entries (state/ip < state/nodes) and one node fit.
    seed(&h.remote, 8).await;
    h.start();
    let s = eventually("the list over the limit", || async {
        status(&h.local)
            .await
            .filter(|s| s.connected && s.entries == 10 && s.rejected == 9)
    })
    .await;
    assert!(!s.ready, "a canary over a refused entry is withheld");
    assert_eq!(s.over_limit, 9, "every refusal was for the limit");
    let cached = cache(&h.local).await;
    assert_eq!(cached.len(), 10);
    assert!(
        !cached.keys().any(|k| k.contains("/synced/")),
        "no canary: {cached:?}"
    );
    // A new key through the watch is refused too.
    h.remote
        .put("meshd/state/nodes/v1/c2/more", b"m".to_vec(), None)
        .await
        .unwrap();
    eventually("the watched put to be refused", || async {
        status(&h.local)
            .await
            .filter(|s| s.rejected == 10 && s.over_limit == 10)
    })
    .await;
    assert_eq!(cache(&h.local).await.len(), 10);
}

/// A value over the size bound is neither copied nor held against the limit, in the list and
/// through the watch, and the older value of a key rewritten with one leaves the cache.
#[tokio::test]
async fn values_over_the_size_bound_are_not_copied() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 2).await;
    let big = vec![b' '; meshd_kvstore::MAX_VALUE_BYTES + 1];
    h.remote
        .put("meshd/state/nodes/v1/c2/big", big.clone(), None)
        .await
        .unwrap();
    h.start();
    let s = eventually("the list without the big value", || async {
        status(&h.local)
            .await
            .filter(|s| s.connected && s.ready && s.oversized == 1)
    })
    .await;
    assert_eq!((s.rejected, s.over_limit), (1, 0));
    let held = "meshd/cache/c2/state/nodes/v1/c2/n0000";
    let cached = cache(&h.local).await;
    assert!(!cached.contains_key("meshd/cache/c2/state/nodes/v1/c2/big"));
    assert!(cached.contains_key(held));
    h.remote
        .put("meshd/state/nodes/v1/c2/n0000", big, None)
        .await
        .unwrap();
    eventually("the rewritten key to leave the cache", || async {
        let gone = !cache(&h.local).await.contains_key(held);
        let counted = status(&h.local).await.is_some_and(|s| s.oversized == 2);
        (gone && counted).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_remote_compacted_while_the_mirror_was_away_converges() {
    let Some(mut h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 30).await;
    h.start();
    converged(&h.local, &h.remote).await;
    h.stop();
    for i in 0..15 {
        h.remote
            .delete(&format!("meshd/state/nodes/v1/c2/n{i:04}"))
            .await
            .unwrap();
        h.remote
            .put(&format!("meshd/state/nodes/v1/c2/m{i}"), vec![i], None)
            .await
            .unwrap();
    }
    h.remote_etcd.compact_now().unwrap();
    h.start();
    converged(&h.local, &h.remote).await;

    // And with the remote itself down then back, compacted after more changes.
    h.remote_etcd.stop();
    eventually("stale", || async {
        status(&h.local).await.filter(|s| !s.connected)
    })
    .await;
    h.remote_etcd.restart().unwrap();
    for i in 15..30 {
        h.remote
            .delete(&format!("meshd/state/nodes/v1/c2/n{i:04}"))
            .await
            .unwrap();
    }
    h.remote_etcd.compact_now().unwrap();
    let want = converged(&h.local, &h.remote).await;
    assert!(!want.keys().any(|k| k.contains("/n00")));
}

/// `--kvstoremesh` in a running apiserver: the mirror runs with the apiserver's local etcd
/// client, the cluster config announces the cache, and `/metrics` shows the mirror.
#[tokio::test]
async fn the_apiserver_runs_the_mirror_with_kvstoremesh() {
    let Some(h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 10).await;
    let certs = common::Certs::new();
    let mut config = common::config(&h.local_etcd, &certs, false);
    config.kvstoremesh = Some(clustermesh_apiserver::config::KvstoremeshConfig {
        clusters_dir: h.dir().to_owned(),
        limit: 1000,
    });
    let server = common::start(config).await;
    let want = converged(&h.local, &h.remote).await;
    assert_eq!(status(&h.local).await.unwrap().limit, 1000);
    let own = common::get(&h.local, "meshd/cluster-config/c1")
        .await
        .unwrap();
    let own: meshd_state::ClusterConfig = serde_json::from_slice(&own).unwrap();
    assert!(own.capabilities.cached, "{own:?}");
    let (code, body) = common::http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        format!(
            "meshd_apiserver_mirror_entries{{cluster=\"c2\"}} {}",
            want.len()
        ),
        "meshd_apiserver_mirror_ready{cluster=\"c2\"} 1".to_string(),
        "meshd_apiserver_mirror_limit{cluster=\"c2\"} 1000".to_string(),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "{line} missing from\n{body}"
        );
    }
    let text = body.split("\r\n\r\n").nth(1).unwrap_or(&body);
    meshd_testing::require(
        "promtool on PATH (scripts/install-deps.sh)",
        meshd_testing::promtool_check(text).unwrap(),
    );
    server.shutdown().await.unwrap();
}

/// Two replicas with `--kvstoremesh`: only the leader mirrors (one writer of the cache), and
/// when it goes the other takes over and the cache keeps following the remote.
#[tokio::test]
async fn only_the_leader_mirrors_and_its_successor_takes_over() {
    let Some(h) = Harness::new(mirror::DEFAULT_LIMIT).await else {
        return;
    };
    seed(&h.remote, 10).await;
    let certs = common::Certs::new();
    let replica = || {
        let mut config = common::config(&h.local_etcd, &certs, false);
        config.kvstoremesh = Some(clustermesh_apiserver::config::KvstoremeshConfig {
            clusters_dir: h.dir().to_owned(),
            limit: 1000,
        });
        config
    };
    let a = common::start(replica()).await;
    let b = common::start(replica()).await;
    converged(&h.local, &h.remote).await;
    let mirroring = |server: &clustermesh_apiserver::Apiserver| {
        let addr = server.metrics_addr.unwrap();
        async move {
            let (code, body) = common::http_get(addr, "/metrics").await;
            assert_eq!(code, 200);
            body.lines()
                .any(|l| l.starts_with("meshd_apiserver_mirror_connected{cluster=\"c2\"} 1"))
        }
    };
    let leader_key = "meshd/leader/clustermesh-apiserver/c1";
    // Exactly one replica mirrors, and it is the leader (read together, and again until they
    // agree: leadership may move on a loaded machine).
    let a_leads = eventually("exactly one replica mirroring: the leader", || async {
        let (ma, mb) = (mirroring(&a).await, mirroring(&b).await);
        let a_leads = common::get(&h.local, leader_key).await? == a.replica_id.as_bytes();
        (ma != mb && ma == a_leads).then_some(a_leads)
    })
    .await;
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    leader.shutdown().await.unwrap();
    h.remote
        .put("meshd/state/nodes/v1/c2/late", b"late".to_vec(), None)
        .await
        .unwrap();
    let want = converged(&h.local, &h.remote).await;
    assert!(want.contains_key("meshd/cache/c2/state/nodes/v1/c2/late"));
    eventually("the successor mirroring", || async {
        mirroring(&follower).await.then_some(())
    })
    .await;
    follower.shutdown().await.unwrap();
}
