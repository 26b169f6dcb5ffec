//! The apiserver's etcd I/O: consistent reads of its prefixes, plans executed as single
//! transactions, and the cluster config key.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use meshd_kvstore::{Backend, EtcdStore, KeyValue, KvError};
use meshd_manifest::ObjectRef;
use meshd_state::{
    decode, encode, ClusterConfig, ClusterConfigKey, ClusterName, NodeRecord, Resource,
};
use serde::de::DeserializeOwned;

use crate::error::ApiserverError;
use crate::keys::{
    object_key, parse_node_port_key, parse_vip_key, ServiceOwner, NODE_PORTS_PREFIX,
    SERVICE_IPS_PREFIX,
};
use crate::plan::{ClusterNodes, Guard, Plan, Snapshot, StoredObject, Write};

/// Keys per range request: well under etcd-client's 4 MiB response limit for our values.
const PAGE: usize = 500;

/// Every key under `prefix` at `revision` (0: latest), paginated. Returns the revision read.
pub async fn range_all(
    store: &EtcdStore,
    prefix: &str,
    revision: i64,
) -> Result<(Vec<KeyValue>, i64), KvError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    let mut rev = revision;
    loop {
        let page = store.range(prefix, after.as_deref(), rev, PAGE).await?;
        // Later pages are read at the first page's revision: one consistent snapshot.
        if rev == 0 {
            rev = page.header.revision;
        }
        after = page.kvs.last().map(|kv| kv.key.clone());
        out.extend(page.kvs);
        if !page.more || after.is_none() {
            return Ok((out, rev));
        }
    }
}

/// Every allocation key under `prefix` at `revision`, parsed; malformed ones are logged and
/// skipped (they hold nothing a plan could honour).
async fn allocations<K: Ord, V: DeserializeOwned>(
    store: &EtcdStore,
    prefix: &str,
    revision: i64,
    parse_key: impl Fn(&str) -> Option<K>,
) -> Result<(std::collections::BTreeMap<K, V>, i64), KvError> {
    let (kvs, rev) = range_all(store, prefix, revision).await?;
    let mut out = std::collections::BTreeMap::new();
    for kv in kvs {
        let (Some(k), Ok(v)) = (parse_key(&kv.key), serde_json::from_slice::<V>(&kv.value)) else {
            tracing::warn!(key = %kv.key, "ignoring malformed allocation");
            continue;
        };
        out.insert(k, v);
    }
    Ok((out, rev))
}

/// The node IPs and pod CIDRs of the cluster's published nodes, at `revision`.
async fn cluster_nodes(
    store: &EtcdStore,
    cluster: &ClusterName,
    revision: i64,
) -> Result<ClusterNodes, ApiserverError> {
    let (kvs, _) = range_all(store, &NodeRecord::cluster_prefix(cluster), revision).await?;
    let mut nodes = ClusterNodes::default();
    for kv in kvs {
        match decode::<NodeRecord>(&kv.key, &kv.value) {
            Ok((_, node)) => {
                nodes.node_ips.insert(node.node_ip, node.name.clone());
                for cidr in node.pod_cidrs {
                    nodes.pod_cidrs.push((cidr, node.name.clone()));
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring malformed node record"),
        }
    }
    Ok(nodes)
}

/// Reads `objects` (as stored, if they are), every VIP and node port allocation and, with
/// `with_nodes`, the cluster's nodes, at one revision. Only the request's objects are read, so
/// an apply costs the same in a cluster of ten services as in one of ten thousand (the
/// allocations are small); the nodes only when the request gives external addresses.
pub async fn read_snapshot(
    store: &EtcdStore,
    cluster: &ClusterName,
    objects: &[ObjectRef],
    with_nodes: bool,
) -> Result<Snapshot, ApiserverError> {
    let mut snapshot = Snapshot::default();
    let (vips, rev) =
        allocations::<_, ServiceOwner>(store, SERVICE_IPS_PREFIX, 0, parse_vip_key).await?;
    snapshot.revision = rev;
    snapshot.vips = vips;
    (snapshot.node_ports, _) =
        allocations::<_, ServiceOwner>(store, NODE_PORTS_PREFIX, rev, parse_node_port_key).await?;
    if with_nodes {
        snapshot.nodes = cluster_nodes(store, cluster, rev).await?;
    }
    for object in objects {
        let key = object_key(object);
        // The key is its own first match as a prefix (shorter keys sort first); longer keys
        // sharing the prefix (`a` and `ab`) are filtered out.
        let page = store.range(&key, None, rev, 1).await?;
        let Some(kv) = page.kvs.into_iter().find(|kv| kv.key == key) else {
            continue;
        };
        let text = String::from_utf8_lossy(&kv.value);
        let document = meshd_manifest::parse_document(&kv.key, 1, &text)
            .map_err(|e| tracing::warn!(error = %e, "stored object does not validate"))
            .ok();
        snapshot.objects.insert(
            object.clone(),
            StoredObject {
                document,
                json: kv.value,
                mod_revision: kv.mod_revision,
            },
        );
    }
    Ok(snapshot)
}

fn compare(guard: &Guard) -> Compare {
    match guard {
        Guard::Absent(key) => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        Guard::Unchanged(key, rev) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev),
    }
}

fn op(write: &Write) -> TxnOp {
    match write {
        Write::Put(key, value) => TxnOp::put(key.as_str(), value.clone(), None),
        Write::Delete(key) => TxnOp::delete(key.as_str(), None),
    }
}

/// Runs a plan as one transaction. `Ok(None)`: a guard failed, nothing was written.
pub async fn execute(
    store: &EtcdStore,
    plan: &Plan,
    max_txn_ops: usize,
) -> Result<Option<i64>, ApiserverError> {
    if plan.guards.is_empty() && plan.writes.is_empty() {
        return Ok(Some(0));
    }
    if plan.guards.len() > max_txn_ops || plan.writes.len() > max_txn_ops {
        return Err(ApiserverError::TooLarge {
            ops: plan.guards.len().max(plan.writes.len()),
            max: max_txn_ops,
        });
    }
    let txn = Txn::new()
        .when(plan.guards.iter().map(compare).collect::<Vec<_>>())
        .and_then(plan.writes.iter().map(op).collect::<Vec<_>>());
    // With nothing to write the guards still run: they say whether the plan's view (and so
    // the outcome reported) was current. Nothing changed, so no revision is reported.
    let resp = txn_call(store, txn, "apply").await?;
    let revision = if plan.writes.is_empty() {
        0
    } else {
        resp.header().map(|h| h.revision()).unwrap_or(0)
    };
    Ok(resp.succeeded().then_some(revision))
}

/// One transaction, errors naming the store and what it was for.
pub async fn txn_call(
    store: &EtcdStore,
    txn: Txn,
    what: &'static str,
) -> Result<etcd_client::TxnResponse, ApiserverError> {
    let timeout = store.config().request_timeout;
    let mut kv = store.client().kv_client();
    match tokio::time::timeout(timeout, kv.txn(txn)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(source)) => Err(ApiserverError::Txn {
            endpoints: store.describe(),
            what,
            reason: source.to_string(),
        }),
        Err(_) => Err(ApiserverError::Txn {
            endpoints: store.describe(),
            what,
            reason: format!("timed out after {timeout:?}"),
        }),
    }
}

/// Writes the cluster config key, or checks that the one there is ours. Every replica does this
/// at start; they agree, so they never fight. A key naming another id means two clusters share
/// a name (or the id was changed): refused, since identities embed the id.
pub async fn ensure_cluster_config(
    store: &EtcdStore,
    config: &ClusterConfig,
) -> Result<(), ApiserverError> {
    let key = ClusterConfigKey {
        cluster: config.name.clone(),
    };
    let key_text = key.to_string();
    let value = encode(&key, config)?;
    for _ in 0..5 {
        let page = store.range(&key_text, None, 0, 1).await?;
        let existing = page.kvs.into_iter().find(|kv| kv.key == key_text);
        let guard = match &existing {
            None => Compare::create_revision(key_text.as_str(), CompareOp::Equal, 0),
            Some(kv) => {
                let (_, stored) = decode::<ClusterConfig>(&kv.key, &kv.value)?;
                if stored.id != config.id {
                    return Err(ApiserverError::ClusterConfigConflict {
                        key: key_text,
                        stored: stored.id.get(),
                        configured: config.id.get(),
                    });
                }
                if stored == *config {
                    return Ok(());
                }
                Compare::mod_revision(key_text.as_str(), CompareOp::Equal, kv.mod_revision)
            }
        };
        let txn = Txn::new().when(vec![guard]).and_then(vec![TxnOp::put(
            key_text.as_str(),
            value.clone(),
            None,
        )]);
        if txn_call(store, txn, "cluster config").await?.succeeded() {
            tracing::info!(key = %key_text, id = %config.id, "cluster config written");
            return Ok(());
        }
    }
    Err(ApiserverError::Contended {
        what: "cluster config",
    })
}
