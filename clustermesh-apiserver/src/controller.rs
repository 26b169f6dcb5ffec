//! The leader's work: keep `meshd/state/services/v1/<cluster>/...` equal to what the applied
//! services and the cluster's endpoints say, and delete identities nobody used for the grace
//! period. Level-triggered: each round lists, then watches from the listed revision, and after
//! every batch of events converges the records from the whole view; a resync tick converges
//! again (and retries writes that lost a race), so a missed write is never permanent.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::{FutureExt, StreamExt};
use meshd_kvstore::{Backend, EtcdStore, EventKind, RawEvent, WatchMessage};
use meshd_manifest::{Kind, ObjectRef};
use meshd_state::keys::ROOT;
use meshd_state::{
    encode, ClusterName, IdentityKey, IpcacheEntry, Resource, ServiceRecord, SyncCanary,
    SyncCanaryKey,
};

use crate::error::ApiserverError;
use crate::keys::{identity_index_key, object_key};
use crate::leader::Leader;
use crate::store::{range_all, txn_call};
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

/// Runs one leadership term: returns on a watch failure or compaction (the caller starts a new
/// term, which lists again) or an etcd error.
pub async fn run_term(
    store: &EtcdStore,
    leader: &Leader,
    config: &ControllerConfig,
) -> Result<(), ApiserverError> {
    let mut view = ClusterView::new(config.cluster.clone());
    let mut revision = 0;
    for prefix in view.prefixes() {
        let (kvs, rev) = range_all(store, &prefix, revision).await?;
        revision = rev;
        for kv in kvs {
            view.apply(&RawEvent {
                kind: EventKind::Put,
                kv,
            });
        }
    }
    tracing::info!(
        services = view.services.len(),
        endpoints = view.ipcache.len(),
        identities = view.identities.len(),
        revision,
        "leader view listed"
    );
    // One watch over everything the view reads, from right after the listed revision: no
    // event is lost between the list and the watch.
    let mut watch = store.watch(ROOT, revision + 1).await?;
    let mut seen = revision;
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
            msg = watch.next() => {
                handle(&mut view, &mut seen, msg)?;
                // Take everything already delivered before converging: one write per service
                // for a burst of endpoint changes, not one per event.
                while let Some(msg) = watch.next().now_or_never() {
                    handle(&mut view, &mut seen, msg)?;
                }
                converge(store, leader, &mut view).await?;
                config.identities.store(view.identities.len() as i64, Ordering::Relaxed);
            }
            _ = tick.tick() => {
                converge(store, leader, &mut view).await?;
                collect_identities(store, leader, &view, seen, &mut gc, config.identity_gc_grace).await?;
            }
        }
    }
}

/// Applies one watch message; `seen` becomes the revision the view now reflects completely.
fn handle(
    view: &mut ClusterView,
    seen: &mut i64,
    msg: Option<Result<WatchMessage, meshd_kvstore::KvError>>,
) -> Result<(), ApiserverError> {
    match msg {
        Some(Ok(WatchMessage::Events { header, events })) => {
            for e in &events {
                view.apply(e);
            }
            *seen = (*seen).max(header.revision);
            Ok(())
        }
        Some(Ok(WatchMessage::Compacted { compact_revision })) => {
            tracing::info!(compact_revision, "watch compacted; listing again");
            Err(ApiserverError::WatchEnded {
                reason: format!("compacted at revision {compact_revision}"),
            })
        }
        Some(Err(e)) => Err(e.into()),
        None => Err(ApiserverError::WatchEnded {
            reason: "stream closed".into(),
        }),
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
