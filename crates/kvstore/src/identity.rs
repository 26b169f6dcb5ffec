//! Cluster-scoped identity allocation, through any [`Backend`].
//!
//! Two keys per identity:
//! - `meshd/state/identities/v1/<cluster>/id/<id>`: the label set (what every node watches);
//! - `meshd/state/identity-labels/v1/<cluster>/<labels>`: the number, an index so a label set is
//!   found without scanning every identity. Outside the identities prefix, so watchers of
//!   identities never see it.
//!
//! A new label set takes the lowest free local id in one transaction that creates both keys
//! only if neither exists ([`Compare::Absent`]). Two nodes racing for the same label set
//! compute the same candidate; one transaction wins, the other fails its compare, re-reads the
//! index and gets the same number. Racing for different label sets, the loser retries with the
//! next free id.

use std::collections::BTreeSet;

use meshd_state::keys::identity_index_key;
use meshd_state::{
    encode, ClusterId, ClusterName, IdentityKey, IdentityRecord, Labels, NumericIdentity, Resource,
    MIN_LOCAL_ID,
};

use crate::backend::{Backend, Compare, KeyValue, Txn, TxnOp};
use crate::error::KvError;

/// Attempts before an allocation that keeps losing races gives up.
const ATTEMPTS: u32 = 32;
/// Page size of the read of a cluster's identities (at most 65280 of them).
const PAGE: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity of {labels} in cluster {cluster}: {source}")]
    Store {
        cluster: ClusterName,
        labels: Labels,
        #[source]
        source: KvError,
    },
    #[error("identity of {labels} in cluster {cluster}: {reason}")]
    Invalid {
        cluster: ClusterName,
        labels: Labels,
        reason: String,
    },
    #[error("identity of {labels} in cluster {cluster}: no free id left (256-65535 all used)")]
    Exhausted {
        cluster: ClusterName,
        labels: Labels,
    },
    #[error(
        "identity of {labels} in cluster {cluster}: gave up after {attempts} contended attempts"
    )]
    Contended {
        cluster: ClusterName,
        labels: Labels,
        attempts: u32,
    },
}

/// The lowest local id not in `used`.
pub fn lowest_free(used: &BTreeSet<u16>) -> Option<u16> {
    (MIN_LOCAL_ID..=u16::MAX).find(|id| !used.contains(id))
}

/// The value of exactly `key`, if it exists (a range read of `key` as a prefix starts with
/// `key` itself when it exists; longer keys sharing the prefix come after it).
async fn get<B: Backend>(backend: &B, key: &str) -> Result<Option<KeyValue>, KvError> {
    let page = backend.range(key, None, 0, 1).await?;
    Ok(page.kvs.into_iter().find(|kv| kv.key == key))
}

/// The local ids used in `cluster`, read page by page at one revision.
async fn used_local_ids<B: Backend>(
    backend: &B,
    cluster: &ClusterName,
) -> Result<BTreeSet<u16>, KvError> {
    let prefix = IdentityRecord::cluster_prefix(cluster);
    let mut used = BTreeSet::new();
    let mut after: Option<String> = None;
    let mut revision = 0;
    loop {
        let page = backend
            .range(&prefix, after.as_deref(), revision, PAGE)
            .await?;
        revision = page.header.revision;
        used.extend(
            page.kvs
                .iter()
                .filter_map(|kv| kv.key.strip_prefix(prefix.as_str()))
                .filter_map(|rest| rest.strip_prefix("id/"))
                .filter_map(|id| id.parse::<u32>().ok())
                .map(|n| (n & 0xffff) as u16),
        );
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more || after.is_none() {
            return Ok(used);
        }
    }
}

/// Returns the identity of `labels` in `cluster`, allocating it if no node did yet.
///
/// Every request is safe to repeat (reads, and transactions guarded by a compare), and the
/// backend waits out transient refusals (a leader election, the loss of the member this node
/// talks to) rather than failing the endpoint that needs the identity.
pub async fn resolve_identity<B: Backend>(
    backend: &B,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    labels: &Labels,
) -> Result<NumericIdentity, IdentityError> {
    let store = |source| IdentityError::Store {
        cluster: cluster.clone(),
        labels: labels.clone(),
        source,
    };
    let invalid = |reason: String| IdentityError::Invalid {
        cluster: cluster.clone(),
        labels: labels.clone(),
        reason,
    };
    let record = IdentityRecord {
        labels: labels.clone(),
    };
    let index = identity_index_key(cluster, labels);

    for _ in 0..ATTEMPTS {
        if let Some(kv) = get(backend, &index).await.map_err(store)? {
            let n: u32 = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| invalid(format!("index key {index} holds no number")))?;
            let id = NumericIdentity::new(n).map_err(|e| invalid(e.to_string()))?;
            if id.cluster_id() != Some(cluster_id) {
                return Err(invalid(format!(
                    "index key {index} names {id}, which is not an identity of cluster id {cluster_id}"
                )));
            }
            let key = IdentityKey {
                cluster: cluster.clone(),
                id,
            };
            // The identity key may have been garbage collected while the index stayed:
            // recreate it (same number, so every published ipcache entry stays right).
            let value = encode(&key, &record).map_err(|e| invalid(e.to_string()))?;
            let key = key.to_string();
            let recreate = Txn {
                when: vec![Compare::absent(&key)],
                then: vec![TxnOp::put(&key, value)],
                otherwise: Vec::new(),
            };
            backend.txn(recreate).await.map_err(store)?;
            return Ok(id);
        }

        let used = used_local_ids(backend, cluster).await.map_err(store)?;
        let local = lowest_free(&used).ok_or_else(|| IdentityError::Exhausted {
            cluster: cluster.clone(),
            labels: labels.clone(),
        })?;
        let id =
            NumericIdentity::allocated(cluster_id, local).map_err(|e| invalid(e.to_string()))?;
        let id_key = IdentityKey {
            cluster: cluster.clone(),
            id,
        };
        let value = encode(&id_key, &record).map_err(|e| invalid(e.to_string()))?;
        let id_key = id_key.to_string();
        let allocate = Txn {
            when: vec![Compare::absent(&id_key), Compare::absent(&index)],
            then: vec![
                TxnOp::put(&id_key, value),
                TxnOp::put(&index, id.get().to_string()),
            ],
            otherwise: Vec::new(),
        };
        if backend.txn(allocate).await.map_err(store)?.succeeded {
            tracing::info!(%cluster, identity = %id, %labels, "allocated identity");
            return Ok(id);
        }
        // Someone took the id or allocated this label set: look again.
    }
    Err(IdentityError::Contended {
        cluster: cluster.clone(),
        labels: labels.clone(),
        attempts: ATTEMPTS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_skips_reserved_and_used() {
        assert_eq!(lowest_free(&BTreeSet::new()), Some(256));
        assert_eq!(lowest_free(&BTreeSet::from([256, 257, 259])), Some(258));
        let all: BTreeSet<u16> = (256..=u16::MAX).collect();
        assert_eq!(lowest_free(&all), None);
    }
}
