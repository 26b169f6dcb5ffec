//! Waiting for a cluster's sync canaries: a remote cluster's state is complete only once its
//! publishers wrote `meshd/synced/<cluster>/<resource>` for every resource a reader needs.

use std::collections::BTreeSet;

use meshd_state::{ClusterName, SyncCanary};

use crate::backend::Backend;
use crate::reflection::WatchEvent;
use crate::watcher::{watch_cluster, WatchConfig};

/// Returns once every resource in `kinds` (values of `Resource::KIND`) has a canary in
/// `cluster`. Waits indefinitely (through reconnects); bound it with a timeout if needed.
pub async fn wait_for_canaries<B: Backend>(backend: B, cluster: &ClusterName, kinds: &[&str]) {
    let mut missing: BTreeSet<&str> = kinds.iter().copied().collect();
    if missing.is_empty() {
        return;
    }
    let mut watch = watch_cluster::<SyncCanary, B>(backend, cluster, WatchConfig::default());
    while let Some(ev) = watch.next().await {
        if let WatchEvent::Upsert { key, .. } = ev {
            missing.remove(key.resource.as_str());
            if missing.is_empty() {
                return;
            }
        }
    }
}
