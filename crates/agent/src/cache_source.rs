//! Remote clusters read from the local etcd's cache (`remote_source: cache`).
//!
//! The cluster's mirror (`clustermesh-apiserver --kvstoremesh`) keeps every remote cluster under
//! `meshd/cache/<cluster>/` and its own view of each one under `meshd/cache-status/v1/<cluster>`.
//! Here the status keys say which remote clusters exist: each one present gets the same
//! [`ClusterWatcher`] as direct mode, over [`CachedCluster`] (so every check of hostile data
//! runs unchanged), and a status that goes away drains the cluster from the view, as a removed
//! remote file does in direct mode. Nodes hold no remote credentials and open no connection
//! outside their cluster: one watch per remote on their own etcd.
//!
//! Connection state comes from the mirror's status (connected, stale since, its last error),
//! taken from the same watch of the status keys, and from this node's connection to its local
//! etcd (the local cluster's probe): a node cut off from its etcd is stale too. No per-remote
//! polling: a node costs its etcd one watch of the status prefix, whatever the mesh's size.

use std::collections::BTreeMap;
use std::sync::Arc;

use meshd_kvstore::{watch_raw, Backend, CachedCluster, EtcdStore, RawWatchEvent, WatchConfig};
use meshd_mesh::{ClusterEvent, EventKind};
use meshd_state::keys::CACHE_STATUS_PREFIX;
use meshd_state::{CacheStatus, ClusterName};
use tokio::sync::watch;

use crate::inputs::InputQueues;
use crate::now_ms;
use crate::remotes::{Registry, RemoteEntry};
use crate::watcher::{ClusterWatcher, Connection, Probe, RemoteLimits, ViewInput};

/// The cluster a status key names, if it is a well-formed remote (not the local cluster).
fn cluster_of_status(key: &str, local: &ClusterName) -> Option<ClusterName> {
    let name = key.strip_prefix(CACHE_STATUS_PREFIX)?;
    ClusterName::new(name).ok().filter(|c| c != local)
}

/// The remote clusters the cache holds now (for the start-up gate): one range read, retried
/// until the local etcd answers (the agent cannot sync its own cluster without it either).
pub async fn configured(local_store: &EtcdStore, local: &ClusterName) -> Vec<ClusterName> {
    let mut backoff = meshd_kvstore::Backoff::new(Default::default());
    loop {
        match meshd_kvstore::list_prefix(local_store, CACHE_STATUS_PREFIX).await {
            Ok(kvs) => {
                return kvs
                    .iter()
                    .filter_map(|kv| cluster_of_status(&kv.key, local))
                    .collect()
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot list the cached remote clusters");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

struct Running {
    task: tokio::task::JoinHandle<()>,
    connection: watch::Sender<Connection>,
    /// The mirror's status as last seen (or why it could not be read).
    status: Result<CacheStatus, String>,
}

impl Running {
    /// Recomputes the connection from the last status and the local etcd's state.
    fn update(&self, cluster: &ClusterName, local: &Connection) {
        let read = if local.connected {
            self.status.clone().map(Some)
        } else {
            Err(local
                .last_error
                .clone()
                .unwrap_or_else(|| "unreachable".into()))
        };
        self.connection.send_if_modified(|c| {
            let next = connection_from(read, cluster, c, now_ms());
            if c.connected && !next.connected {
                tracing::warn!(%cluster, error = ?next.last_error, "cached remote cluster unreachable; keeping its last known state");
            }
            let changed = next != *c;
            *c = next;
            changed
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the cache's remote clusters until the agent stops.
pub async fn run(
    store: EtcdStore,
    local: ClusterName,
    queues: InputQueues,
    registry: watch::Sender<Arc<Registry>>,
    mut local_connection: watch::Receiver<Connection>,
    limits: RemoteLimits,
) {
    let mut statuses = watch_raw(
        store.clone(),
        CACHE_STATUS_PREFIX.to_owned(),
        WatchConfig::default(),
    );
    let mut running: BTreeMap<ClusterName, Running> = BTreeMap::new();
    let mut entries: Registry = BTreeMap::new();
    loop {
        let ev = tokio::select! {
            ev = statuses.next() => match ev {
                Some(ev) => ev,
                None => return,
            },
            changed = local_connection.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = local_connection.borrow_and_update().clone();
                for (cluster, r) in &running {
                    r.update(cluster, &now);
                }
                continue;
            }
        };
        let RawWatchEvent::Event(ev) = ev else {
            continue;
        };
        let Some(cluster) = cluster_of_status(&ev.kv.key, &local) else {
            continue;
        };
        match ev.kind {
            meshd_kvstore::EventKind::Put => {
                let status = serde_json::from_slice::<CacheStatus>(&ev.kv.value)
                    .map_err(|e| format!("{}: {e}", ev.kv.key));
                if let Some(r) = running.get_mut(&cluster) {
                    r.status = status;
                    r.update(&cluster, &local_connection.borrow());
                    continue;
                }
                tracing::info!(%cluster, "reading remote cluster from the local cache");
                let (conn_tx, conn_rx) = watch::channel(Connection::default());
                let watcher = ClusterWatcher {
                    cluster: cluster.clone(),
                    backend: CachedCluster::new(store.clone(), cluster.clone()),
                    probe: Probe::Fed,
                    local: false,
                    tx: queues.sender(&cluster),
                    connection: conn_tx.clone(),
                    limits: limits.clone(),
                };
                let r = Running {
                    task: tokio::spawn(watcher.run()),
                    connection: conn_tx,
                    status,
                };
                r.update(&cluster, &local_connection.borrow());
                running.insert(cluster.clone(), r);
                entries.insert(
                    cluster,
                    RemoteEntry {
                        endpoints: format!("cache in {}", store.describe()),
                        config_error: None,
                        connection: Some(conn_rx),
                        tls: None,
                    },
                );
            }
            meshd_kvstore::EventKind::Delete => {
                if running.remove(&cluster).is_none() {
                    continue;
                }
                entries.remove(&cluster);
                tracing::info!(%cluster, "remote cluster gone from the cache; draining");
                // The cluster's own queue: after whatever its watcher queued.
                let tx = queues.sender(&cluster);
                let ev = ClusterEvent::new(cluster, EventKind::ClusterRemoved);
                if tx.send(ViewInput::Cluster(ev)).await.is_err() {
                    return;
                }
            }
        }
        registry.send_replace(Arc::new(entries.clone()));
    }
}

/// The connection state of `cluster` as the mirror's status and this node's read of it say.
/// A pure function of the two, so every combination is unit-tested.
pub fn connection_from(
    read: Result<Option<CacheStatus>, String>,
    cluster: &ClusterName,
    before: &Connection,
    now: u64,
) -> Connection {
    let mut c = before.clone();
    if let Ok(status) = &read {
        c.cache = status.clone();
    }
    let (connected, stale_since, error, denied) = match read {
        Err(e) => {
            let denied = e.contains("permission denied");
            let error = if denied {
                format!("local etcd refuses the cache: {e}; this node's role needs read on meshd/cache/ and meshd/cache-status/ (`meshd etcd bootstrap`)")
            } else {
                format!("local etcd: {e}")
            };
            (false, None, Some(error), denied)
        }
        Ok(None) => (
            false,
            None,
            Some(format!(
                "the cache has no status of {cluster}: is `clustermesh-apiserver --kvstoremesh` running with a remote file for it?"
            )),
            false,
        ),
        Ok(Some(s)) => (s.connected, s.stale_since, s.last_error, false),
    };
    if !connected && (c.connected || c.last_error.is_none()) {
        c.failures += 1;
    }
    c.stale_since_ms = match (connected, stale_since) {
        (true, _) => 0,
        (false, Some(since)) => since,
        (false, None) if c.stale_since_ms != 0 => c.stale_since_ms,
        (false, None) => now,
    };
    c.connected = connected;
    c.access_denied = denied;
    c.last_error = if connected {
        None
    } else {
        error.or(Some("unreachable".into()))
    };
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c2() -> ClusterName {
        ClusterName::new("c2").unwrap()
    }

    fn status(connected: bool, stale_since: Option<u64>) -> CacheStatus {
        CacheStatus {
            cluster: "c2".into(),
            connected,
            ready: connected,
            stale_since,
            last_error: (!connected).then(|| "dial tcp: connection refused".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_mirrors_view_of_the_remote_is_the_connection() {
        let up = connection_from(
            Ok(Some(status(true, None))),
            &c2(),
            &Connection::default(),
            5,
        );
        assert!(up.connected);
        assert_eq!((up.stale_since_ms, up.failures), (0, 0));
        assert_eq!(up.last_error, None);

        let down = connection_from(Ok(Some(status(false, Some(3)))), &c2(), &up, 9);
        assert!(!down.connected);
        assert_eq!(down.stale_since_ms, 3, "the mirror's time, not this node's");
        assert_eq!(down.failures, 1);
        assert!(down.last_error.unwrap().contains("refused"));

        // Still down: one failure, not one per probe.
        let still = connection_from(Ok(Some(status(false, Some(3)))), &c2(), &down_again(), 10);
        assert_eq!(still.failures, 1);
    }

    fn down_again() -> Connection {
        connection_from(
            Ok(Some(status(false, Some(3)))),
            &c2(),
            &connection_from(
                Ok(Some(status(true, None))),
                &c2(),
                &Connection::default(),
                1,
            ),
            2,
        )
    }

    #[test]
    fn a_node_cut_off_from_its_etcd_or_a_missing_status_is_stale_with_the_cause() {
        let up = connection_from(
            Ok(Some(status(true, None))),
            &c2(),
            &Connection::default(),
            1,
        );
        let cut = connection_from(Err("deadline exceeded".into()), &c2(), &up, 7);
        assert!(!cut.connected);
        assert_eq!(cut.stale_since_ms, 7);
        assert!(cut.last_error.unwrap().starts_with("local etcd"));

        let denied = connection_from(Err("etcdserver: permission denied".into()), &c2(), &up, 7);
        assert!(denied.access_denied);
        assert!(denied.last_error.unwrap().contains("meshd/cache/"));

        let missing = connection_from(Ok(None), &c2(), &Connection::default(), 4);
        assert!(!missing.connected);
        assert!(missing
            .last_error
            .as_deref()
            .unwrap()
            .contains("--kvstoremesh"));
        // The time it was first seen missing stays while it stays missing.
        let later = connection_from(Ok(None), &c2(), &missing, 40);
        assert_eq!(later.stale_since_ms, 4);
    }

    #[test]
    fn status_keys_name_remote_clusters_only() {
        let c1 = ClusterName::new("c1").unwrap();
        assert_eq!(
            cluster_of_status("meshd/cache-status/v1/c2", &c1),
            Some(c2())
        );
        assert_eq!(cluster_of_status("meshd/cache-status/v1/c1", &c1), None);
        assert_eq!(
            cluster_of_status("meshd/cache-status/v1/Bad_Name", &c1),
            None
        );
    }
}
