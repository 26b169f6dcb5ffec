//! The mirror (`--kvstoremesh`): one component per cluster that keeps every remote cluster's
//! shared state in the local etcd, so the cluster's agents read remote clusters there
//! (`remote_source: cache`) instead of each holding a watch on every remote etcd.
//!
//! Per remote cluster (the directory of remote cluster files the agents use, one
//! `<cluster>.yaml` per remote, read with this cluster's `remote-<cluster>` certificate), the
//! mirror lists then watches the remote's `meshd/state/`, `meshd/synced/` and
//! `meshd/cluster-config/<cluster>`, and writes each key byte for byte to
//! `meshd/cache/<cluster>/` + the key less its leading `meshd/`
//! ([`meshd_state::keys::cache_key`]). Its view of the remote is written to
//! `meshd/cache-status/v1/<cluster>` ([`meshd_state::CacheStatus`]) and shown in metrics.
//!
//! - **Order.** After a list: the remote's cluster config, then its state entries, then the
//!   sweep (cache keys the list no longer has are deleted), then its sync canaries. A canary in
//!   the cache therefore means the cache holds the list it marks. Watch events are written as
//!   they arrive, one etcd transaction per batch of at most `batch` operations: each key's
//!   changes in order, and within one batch entries before canaries. etcd gives no common
//!   order across the three watched prefixes, so a canary that appears while the mirror
//!   watches (a publisher's first sync) is not copied from the watch: it makes the mirror list
//!   again, which writes it after its entries. A rewrite of a canary the cache already holds
//!   (a publisher's restart) is copied as it comes.
//! - **Restart.** Each list (first start, reconnect, compaction, a different etcd cluster id)
//!   compares with what the cache holds and writes only the difference: leftovers of an earlier
//!   run are swept, nothing is written twice.
//! - **Fail-static.** While a remote is unreachable (or refuses this cluster's certificate) its
//!   entries stay; the status says `connected: false` and `stale_since`.
//! - **Checks.** The remote's cluster config must name the remote's file name (an etcd of
//!   another cluster is refused and drained) and must not carry the local cluster's id. A
//!   remote whose cluster id changed is drained, then mirrored again. Keys of another cluster
//!   (`meshd/state/<kind>/<version>/<other>/...`, `meshd/synced/<other>/...`) are refused:
//!   a remote publishes only its own state.
//! - **Limit.** At most `limit` keys per remote (default [`DEFAULT_LIMIT`]), admitted in key
//!   order (cluster config, state, canaries); the rest are refused and counted (`rejected`, and
//!   apart in `over_limit`: while not zero the remote shows degraded in agents' status),
//!   and the canary of each resource that lost an entry is withheld, so the cache never claims
//!   a list it does not hold (`ready: false`). Values over the size bound agents hold values
//!   to ([`meshd_kvstore::MAX_VALUE_BYTES`]) are neither copied nor counted against the limit
//!   (`rejected`, and apart in `oversized`); an older value of the key in the cache goes.
//! - **Drain.** A removed file drains its cluster: canaries first, then every cache key, then
//!   the status. A cache whose file is gone while the mirror was down is drained at start.
//!
//! Every replica that runs `--kvstoremesh` mirrors (writes are idempotent copies and converge);
//! one replica is enough.

mod cluster;
mod metrics;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshd_kvstore::remote_file;
use meshd_kvstore::{Backend, BackoffConfig, KvError, TxnOp};
use meshd_state::keys::{cache_prefix, cache_status_key, CACHE_STATUS_PREFIX};
use meshd_state::{CacheStatus, ClusterId, ClusterName};

pub use cluster::ClusterMirror;
pub use metrics::MirrorMetrics;

/// Keys mirrored from one remote at most, unless configured (`--kvstoremesh-limit`): the same
/// default as the agents' `remote_entry_limit` (the scale goal's whole mesh from one cluster),
/// so a remote is cut at the same size through the cache as read directly. 600k keys of typical
/// size (200-500 bytes) are 120-300 MB in the local etcd.
pub const DEFAULT_LIMIT: u64 = meshd_kvstore::DEFAULT_ENTRY_LIMIT;
/// Operations per etcd transaction: within etcd's `--max-txn-ops` (128 by default).
pub const MAX_BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// The remote cluster files (the agents' `remote-clusters-dir`).
    pub dir: PathBuf,
    pub local: ClusterName,
    pub local_id: ClusterId,
    /// Keys per remote at most.
    pub limit: u64,
    /// Operations per transaction.
    pub batch: usize,
    /// How often the directory is read again.
    pub rescan: Duration,
    /// How often a watched remote is probed (a one-key read: reachable and still readable with
    /// this cluster's certificate), and a changed status written.
    pub probe: Duration,
    /// A status whose state (connected, ready, stale, error, limit) is unchanged and whose
    /// counters and times moved is written at most this often: every agent of the cluster
    /// watches the status keys, and a mesh of 255 clusters under churn rewrote 254 of them
    /// every second, for figures nobody reads that often.
    pub status_refresh: Duration,
    /// Keys per range read of a remote.
    pub page_size: usize,
    pub backoff: BackoffConfig,
}

impl MirrorConfig {
    pub fn new(dir: PathBuf, local: ClusterName, local_id: ClusterId) -> Self {
        Self {
            dir,
            local,
            local_id,
            limit: DEFAULT_LIMIT,
            batch: MAX_BATCH,
            rescan: Duration::from_secs(2),
            probe: Duration::from_secs(1),
            status_refresh: Duration::from_secs(5),
            page_size: 5000,
            backoff: BackoffConfig::default(),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs `ops` in order, `batch` to a transaction.
pub(crate) async fn write_batches<L: Backend>(
    local: &L,
    ops: Vec<TxnOp>,
    batch: usize,
) -> Result<(), KvError> {
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let then: Vec<TxnOp> = ops.by_ref().take(batch.max(1)).collect();
        local
            .txn(meshd_kvstore::Txn {
                when: vec![],
                then,
                otherwise: vec![],
            })
            .await?;
    }
    Ok(())
}

/// Deletes everything of `cluster` from the cache: its canaries first (nothing claims a list
/// any more), then every key, then its status. Returns the keys deleted.
pub async fn drain<L: Backend>(local: &L, cluster: &str, batch: usize) -> Result<u64, KvError> {
    let prefix = cache_prefix(cluster);
    let canaries = format!("{prefix}synced/");
    let mut deleted = 0;
    for p in [canaries.as_str(), prefix.as_str()] {
        loop {
            let page = local.range(p, None, 0, 1000).await?;
            if page.kvs.is_empty() {
                break;
            }
            deleted += page.kvs.len() as u64;
            let ops = page
                .kvs
                .into_iter()
                .map(|kv| TxnOp::delete(kv.key))
                .collect();
            write_batches(local, ops, batch).await?;
        }
    }
    local.delete(&cache_status_key(cluster)).await?;
    Ok(deleted)
}

/// Writes `status` to `meshd/cache-status/v1/<cluster>`.
pub(crate) async fn write_status<L: Backend>(
    local: &L,
    status: &CacheStatus,
) -> Result<(), KvError> {
    let value = serde_json::to_vec(status).expect("a status serializes");
    local
        .put(&cache_status_key(&status.cluster), value, None)
        .await
        .map(drop)
}

/// The clusters with a status in the local etcd (every cluster the mirror ever wrote to the
/// cache: the status is written before any entry).
async fn cached_clusters<L: Backend>(local: &L) -> Result<BTreeSet<String>, KvError> {
    Ok(meshd_kvstore::list_prefix(local, CACHE_STATUS_PREFIX)
        .await?
        .into_iter()
        .filter_map(|kv| kv.key.strip_prefix(CACHE_STATUS_PREFIX).map(str::to_owned))
        .collect())
}

struct Running {
    text: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Mirrors the remote clusters of `config.dir` into `local` until aborted.
pub async fn run<L: Backend>(local: L, config: MirrorConfig, metrics: MirrorMetrics) {
    let config = Arc::new(config);
    let mut running: BTreeMap<ClusterName, Running> = BTreeMap::new();
    // Clusters to drain (file removed); retried each round until the local etcd took it.
    let mut to_drain: BTreeSet<String> = BTreeSet::new();
    let mut orphans_checked = false;
    let mut tick = tokio::time::interval(config.rescan);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(dir = %config.dir.display(), limit = config.limit, "mirroring remote clusters (kvstoremesh)");
    loop {
        tick.tick().await;
        let present = remote_file::read_dir(&config.dir);
        running.retain(|cluster, r| match present.get(cluster) {
            Some((_, text)) if *text == r.text => true,
            Some(_) => {
                tracing::info!(%cluster, "remote cluster file changed; mirroring it again");
                false
            }
            None => {
                tracing::info!(%cluster, "remote cluster file removed; draining its cache");
                to_drain.insert(cluster.to_string());
                false
            }
        });
        if !orphans_checked {
            // A cache whose file went away while no mirror ran.
            match cached_clusters(&local).await {
                Ok(cached) => {
                    orphans_checked = true;
                    to_drain.extend(
                        cached
                            .into_iter()
                            .filter(|c| !present.keys().any(|p| p.as_str() == c)),
                    );
                }
                Err(e) => tracing::warn!(error = %e, "reading the cache status; retrying"),
            }
        }
        for cluster in std::mem::take(&mut to_drain) {
            if present.keys().any(|p| p.as_str() == cluster) {
                continue;
            }
            match drain(&local, &cluster, config.batch).await {
                Ok(n) => {
                    tracing::info!(%cluster, keys = n, "cache drained");
                    metrics.forget(&cluster);
                }
                Err(e) => {
                    tracing::warn!(%cluster, error = %e, "draining the cache; retrying");
                    to_drain.insert(cluster);
                }
            }
        }
        for (cluster, (path, text)) in present {
            if running.contains_key(&cluster) {
                continue;
            }
            if cluster == config.local {
                // No status for the local cluster: nothing of it is ever cached.
                tracing::error!(path = %path.display(), "a remote cluster file names the local cluster; ignored");
                running.insert(cluster, Running { text, task: None });
                continue;
            }
            let task = match remote_file::load(&cluster, &path, &text, &config.local) {
                Err(e) => {
                    // Fail-static: what the cache holds stays; the status says why.
                    tracing::error!(%cluster, error = %e, "remote cluster file refused");
                    let local = local.clone();
                    let cluster = cluster.to_string();
                    let limit = config.limit;
                    let metrics = metrics.clone();
                    Some(tokio::spawn(async move {
                        cluster::refused_file(local, cluster, limit, e, metrics).await
                    }))
                }
                Ok(etcd) => match meshd_kvstore::connect_lazy(&etcd).await {
                    Err(e) => {
                        tracing::error!(%cluster, error = %e, "remote cluster refused");
                        let local = local.clone();
                        let cluster = cluster.to_string();
                        let limit = config.limit;
                        let metrics = metrics.clone();
                        let e = e.to_string();
                        Some(tokio::spawn(async move {
                            cluster::refused_file(local, cluster, limit, e, metrics).await
                        }))
                    }
                    Ok(remote) => {
                        tracing::info!(%cluster, endpoints = etcd.describe(), "mirroring remote cluster");
                        let m = ClusterMirror::new(
                            cluster.clone(),
                            remote,
                            local.clone(),
                            config.clone(),
                            metrics.clone(),
                        );
                        Some(tokio::spawn(m.run()))
                    }
                },
            };
            running.insert(cluster, Running { text, task });
        }
    }
}
