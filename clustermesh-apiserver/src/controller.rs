//! The leader's work: keep `meshd/state/services/v1/<cluster>/...` equal to what the applied
//! services and the cluster's endpoints say, and delete identities nobody used for the grace
//! period. Level-triggered: the view is fed by the kvstore's list-then-watch of each prefix it
//! reads (raw, so the revisions that guard the writes come along; relists with mark-and-sweep
//! after a compaction or a lost connection), and after every batch of events the records are
//! converged from the whole view; a resync tick converges again (and retries writes that lost
//! a race), so a missed write is never permanent.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use meshd_kvstore::{watch_raw, EtcdStore, RawWatchEvent, RawWatchHandle, WatchConfig};
use meshd_manifest::{Kind, ObjectRef};
use meshd_state::{
    encode, ClusterName, IdentityKey, IpcacheEntry, Resource, ServiceRecord, SyncCanary,
    SyncCanaryKey,
};

use crate::error::ApiserverError;
use crate::keys::{identity_index_key, object_key};
use crate::leader::Leader;
use crate::store::txn_call;
use crate::view::{ClusterView, IdentityGc, RecordChange};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub cluster: ClusterName,
    /// How long an identity must go unused before it is deleted.
    pub identity_gc_grace: Duration,
    /// How often garbage is looked for and the records re-converged.
    pub resync_interval: Duration,
    /// Identities in this leader's view, for `/metrics`; -1 until this replica has led.
    pub identities: Arc<AtomicI64>,
}

/// The list-then-watches the leader's view is built from, one per prefix of
/// [`ClusterView::prefixes`].
struct Sources {
    watches: [RawWatchHandle; 4],
    synced: [bool; 4],
    /// The revision up to which the view holds every change of the cluster's ipcache: what
    /// identity GC guards with.
    ipcache_seen: i64,
}

/// The position of the cluster's ipcache in [`ClusterView::prefixes`].
const IPCACHE: usize = 1;

impl Sources {
    fn start(store: &EtcdStore, view: &ClusterView) -> Self {
        Self {
            watches: view
                .prefixes()
                .map(|prefix| watch_raw(store.clone(), prefix, WatchConfig::default())),
            synced: [false; 4],
            ipcache_seen: 0,
        }
    }

    fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// Waits for the next event of any watch and applies it to the view.
    async fn next(&mut self, view: &mut ClusterView) -> Result<(), ApiserverError> {
        let [services, ipcache, identities, records] = &mut self.watches;
        let (source, event) = tokio::select! {
            ev = services.next() => (0, ev),
            ev = ipcache.next() => (1, ev),
            ev = identities.next() => (2, ev),
            ev = records.next() => (3, ev),
        };
        // The watch tasks retry every failure themselves; one ends only if it panicked.
        let event = event.ok_or_else(|| ApiserverError::WatchEnded {
            reason: "a watch task ended".into(),
        })?;
        self.apply(source, event, view);
        Ok(())
    }

    /// Applies every event already delivered: one convergence for a burst of endpoint changes,
    /// not one per event.
    fn drain(&mut self, view: &mut ClusterView) {
        for source in 0..self.watches.len() {
            while let Some(event) = self.watches[source].try_next() {
                self.apply(source, event, view);
            }
        }
    }

    fn apply(&mut self, source: usize, event: RawWatchEvent, view: &mut ClusterView) {
        match event {
            RawWatchEvent::Event(e) => view.apply(&e),
            RawWatchEvent::Synced { revision } | RawWatchEvent::Progress { revision } => {
                if matches!(event, RawWatchEvent::Synced { .. }) {
                    self.synced[source] = true;
                }
                if source == IPCACHE {
                    self.ipcache_seen = self.ipcache_seen.max(revision);
                }
            }
        }
    }
}

/// Runs one leadership term: returns on an etcd error of a write (the caller starts a new
/// term). Watch failures do not end it: the watches relist by themselves, and the view keeps
/// its last state meanwhile (the writes' guards keep stale decisions from landing).
pub async fn run_term(
    store: &EtcdStore,
    leader: &Leader,
    config: &ControllerConfig,
) -> Result<(), ApiserverError> {
    let mut view = ClusterView::new(config.cluster.clone());
    let mut sources = Sources::start(store, &view);
    // Nothing is written before every prefix is listed: a record computed from half a view
    // would withdraw backends that are there.
    while !sources.all_synced() {
        sources.next(&mut view).await?;
    }
    sources.drain(&mut view);
    tracing::info!(
        services = view.services.len(),
        endpoints = view.ipcache.len(),
        identities = view.identities.len(),
        revision = sources.ipcache_seen,
        "leader view listed"
    );
    converge(store, leader, &mut view).await?;
    write_canary(store, leader, &config.cluster).await?;

    config
        .identities
        .store(view.identities.len() as i64, Ordering::Relaxed);
    let mut gc = IdentityGc::default();
    let mut tick = tokio::time::interval(config.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = sources.next(&mut view) => {
                r?;
                sources.drain(&mut view);
                converge(store, leader, &mut view).await?;
                config.identities.store(view.identities.len() as i64, Ordering::Relaxed);
            }
            _ = tick.tick() => {
                converge(store, leader, &mut view).await?;
                collect_identities(store, leader, &view, sources.ipcache_seen, &mut gc, config.identity_gc_grace).await?;
            }
        }
    }
}

fn service_config_key(key: &meshd_state::ServiceKey) -> String {
    object_key(&ObjectRef {
        kind: Kind::Service,
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    })
}

/// Writes the record changes the view asks for, each in its own guarded transaction. A write
/// whose guard fails is skipped: the change that made it fail is on its way through the watch.
async fn converge(
    store: &EtcdStore,
    leader: &Leader,
    view: &mut ClusterView,
) -> Result<(), ApiserverError> {
    for change in view.record_changes() {
        match change {
            RecordChange::Put {
                key,
                record,
                config_revision,
            } => {
                let value = encode::<ServiceRecord>(&key, &record)?;
                let config_key = service_config_key(&key);
                let txn = Txn::new()
                    .when(vec![
                        leader.guard(),
                        Compare::mod_revision(
                            config_key.as_str(),
                            CompareOp::Equal,
                            config_revision,
                        ),
                    ])
                    .and_then(vec![TxnOp::put(key.to_string(), value, None)]);
                if txn_call(store, txn, "publish service").await?.succeeded() {
                    tracing::debug!(key = %key, backends = record.backends.len(), "service published");
                    view.records.insert((key.namespace, key.name), record);
                } else {
                    tracing::debug!(key = %key, "service publish lost a race; will converge again");
                }
            }
            RecordChange::Delete { key } => {
                let config_key = service_config_key(&key);
                let txn = Txn::new()
                    .when(vec![
                        leader.guard(),
                        Compare::create_revision(config_key.as_str(), CompareOp::Equal, 0),
                    ])
                    .and_then(vec![TxnOp::delete(key.to_string(), None)]);
                if txn_call(store, txn, "withdraw service").await?.succeeded() {
                    tracing::debug!(key = %key, "service withdrawn");
                    view.records.remove(&(key.namespace, key.name));
                }
            }
        }
    }
    Ok(())
}

/// `meshd/synced/<cluster>/services`: this cluster's service records are complete, so remote
/// readers may act on them (and on the absence of a service).
async fn write_canary(
    store: &EtcdStore,
    leader: &Leader,
    cluster: &ClusterName,
) -> Result<(), ApiserverError> {
    let key = SyncCanaryKey {
        cluster: cluster.clone(),
        resource: ServiceRecord::KIND.to_owned(),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let value = encode(&key, &SyncCanary { synced_at_ms: now })?;
    let txn = Txn::new()
        .when(vec![leader.guard()])
        .and_then(vec![TxnOp::put(key.to_string(), value, None)]);
    txn_call(store, txn, "sync canary").await?;
    Ok(())
}

/// Deletes identities no endpoint used for the grace period. The delete is guarded by the
/// identity key's revision, so an identity re-written meanwhile (re-allocated by an agent)
/// survives, and by "no ipcache entry of the cluster was written after `seen`" (the revision
/// the view reflects): an endpoint published with this identity since then, which the view
/// has not seen yet, keeps it alive. Under constant endpoint churn collection is retried at
/// the next tick; it is never unsafe.
async fn collect_identities(
    store: &EtcdStore,
    leader: &Leader,
    view: &ClusterView,
    seen: i64,
    gc: &mut IdentityGc,
    grace: Duration,
) -> Result<(), ApiserverError> {
    let in_use = view.identities_in_use();
    let garbage = gc.collect(
        Instant::now(),
        grace,
        view.identities.keys().copied(),
        &in_use,
    );
    let ipcache_prefix = IpcacheEntry::cluster_prefix(view.cluster());
    for id in garbage {
        let Some(known) = view.identities.get(&id) else {
            continue;
        };
        let key = IdentityKey {
            cluster: view.cluster().clone(),
            id,
        }
        .to_string();
        // The index entry goes too, but only if it still names this number (a nested
        // transaction: an identity whose index is gone or re-pointed is still collected).
        let index = identity_index_key(view.cluster(), &known.labels);
        let drop_index = Txn::new()
            .when(vec![Compare::value(
                index.as_str(),
                CompareOp::Equal,
                id.get().to_string(),
            )])
            .and_then(vec![TxnOp::delete(index.as_str(), None)]);
        let txn = Txn::new()
            .when(vec![
                leader.guard(),
                Compare::mod_revision(key.as_str(), CompareOp::Equal, known.mod_revision),
                Compare::mod_revision(ipcache_prefix.as_str(), CompareOp::Less, seen + 1)
                    .with_prefix(),
            ])
            .and_then(vec![
                TxnOp::delete(key.as_str(), None),
                TxnOp::txn(drop_index),
            ]);
        if txn_call(store, txn, "identity gc").await?.succeeded() {
            tracing::info!(key = %key, labels = %known.labels, "deleted unused identity");
            // The watch delivers the delete to the view; forget the clock now.
            gc.forget(id);
        } else {
            tracing::debug!(key = %key, "identity gc skipped: endpoints changed meanwhile");
        }
    }
    Ok(())
}
