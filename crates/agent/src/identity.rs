//! Cluster-scoped identity allocation in the local etcd.
//!
//! Two keys per identity:
//! - `meshd/state/identities/v1/<cluster>/id/<id>`: the label set (what every node watches);
//! - `meshd/state/identity-labels/v1/<cluster>/<labels>`: the number, an index so a label set is
//!   found without scanning every identity. Outside the identities prefix, so watchers of
//!   identities never see it.
//!
//! A new label set takes the lowest free local id in one transaction that creates both keys
//! only if neither exists (compare create_revision == 0). Two nodes racing for the same label
//! set compute the same candidate; one transaction wins, the other fails its compare, re-reads
//! the index and gets the same number. Racing for different label sets, the loser retries with
//! the next free id.

use meshd_state::{
    encode, ClusterId, ClusterName, IdentityKey, IdentityRecord, Labels, NumericIdentity,
    MIN_LOCAL_ID,
};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use meshd_kvstore::retry_transient;

/// How long one etcd request of an allocation waits out a leader election or a failover to
/// another member before the allocation fails.
/// An election takes about one election timeout (1 s by default), a failover one reconnect; with
/// every member down, the endpoint add should fail soon rather than at the CLI's deadline.
const TRANSIENT_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity of {labels} in cluster {cluster}: etcd {op} {key}: {source}")]
    Etcd {
        cluster: ClusterName,
        labels: Labels,
        op: &'static str,
        key: String,
        source: etcd_client::Error,
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

/// The index key of a label set. Labels render canonically (sorted, `k=v,k=v`), so equal sets
/// have equal keys.
pub fn index_key(cluster: &ClusterName, labels: &Labels) -> String {
    meshd_state::keys::identity_index_key(cluster, labels)
}

/// The lowest local id not in `used`.
pub fn lowest_free(used: &std::collections::BTreeSet<u16>) -> Option<u16> {
    (MIN_LOCAL_ID..=u16::MAX).find(|id| !used.contains(id))
}

/// Returns the identity of `labels` in `cluster`, allocating it if no node did yet.
pub async fn resolve(
    client: &mut etcd_client::Client,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    labels: &Labels,
) -> Result<NumericIdentity, IdentityError> {
    const ATTEMPTS: u32 = 32;
    let etcd = |op: &'static str, key: &str| {
        let (cluster, labels, key) = (cluster.clone(), labels.clone(), key.to_owned());
        move |source| IdentityError::Etcd {
            cluster,
            labels,
            op,
            key,
            source,
        }
    };
    let invalid = |reason: String| IdentityError::Invalid {
        cluster: cluster.clone(),
        labels: labels.clone(),
        reason,
    };
    let record = IdentityRecord {
        labels: labels.clone(),
    };
    let index = index_key(cluster, labels);

    // Every request below is safe to repeat (reads, and transactions guarded by a compare), so
    // a leader election or the loss of the member this node talks to is waited out rather than
    // failing the endpoint that needs the identity.
    let get = |key: &str, opts: Option<GetOptions>| {
        let (c, key) = (client.clone(), key.to_owned());
        retry_transient(TRANSIENT_BUDGET, move || {
            let (mut c, key, opts) = (c.clone(), key.clone(), opts.clone());
            async move { c.get(key, opts).await }
        })
    };
    let txn = |txn: Txn| {
        let c = client.clone();
        retry_transient(TRANSIENT_BUDGET, move || {
            let (mut c, txn) = (c.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
    };
    for _ in 0..ATTEMPTS {
        let found = get(&index, None).await.map_err(etcd("get", &index))?;
        if let Some(kv) = found.kvs().first() {
            let n: u32 = std::str::from_utf8(kv.value())
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
            }
            .to_string();
            // The identity key may have been garbage collected while the index stayed:
            // recreate it (same number, so every published ipcache entry stays right).
            let value = encode(
                &IdentityKey {
                    cluster: cluster.clone(),
                    id,
                },
                &record,
            )
            .map_err(|e| invalid(e.to_string()))?;
            let recreate = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.as_str(), value, None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            txn(recreate).await.map_err(etcd("txn", &key))?;
            return Ok(id);
        }

        let prefix = format!("meshd/state/identities/v1/{cluster}/id/");
        let existing = get(
            &prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .map_err(etcd("list", &prefix))?;
        let used = existing
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok())
            .filter_map(|k| k.strip_prefix(prefix.as_str()))
            .filter_map(|id| id.parse::<u32>().ok())
            .map(|n| (n & 0xffff) as u16)
            .collect();
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
        let allocate = Txn::new()
            .when([
                Compare::create_revision(id_key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(index.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(id_key.as_str(), value, None),
                TxnOp::put(index.as_str(), id.get().to_string(), None),
            ]);
        let resp = txn(allocate).await.map_err(etcd("txn", &id_key))?;
        if resp.succeeded() {
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
    use std::collections::BTreeSet;

    #[test]
    fn index_keys_are_canonical() {
        let c1 = ClusterName::new("c1").unwrap();
        let a = Labels::from_pairs([("b", "2"), ("a", "1")]);
        let b = Labels::from_pairs([("a", "1"), ("b", "2")]);
        assert_eq!(index_key(&c1, &a), index_key(&c1, &b));
        assert_eq!(
            index_key(&c1, &a),
            "meshd/state/identity-labels/v1/c1/a=1,b=2"
        );
    }

    /// Real etcd: concurrent allocations of one label set (as two nodes adding endpoints with
    /// the same labels) all get one number; of different label sets, different numbers; and a
    /// collected identity key comes back with the same number.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_nodes_agree_on_numbers() {
        if !meshd_testing::require_etcd() {
            return;
        }
        let etcd = meshd_testing::etcd::Etcd::start().unwrap();
        let client = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .unwrap();
        let c1 = ClusterName::new("c1").unwrap();
        let id1 = ClusterId::new(1).unwrap();
        let same = Labels::from_pairs([("app", "web"), ("meshd.io/cluster", "c1")]);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (mut client, c1, same) = (client.clone(), c1.clone(), same.clone());
                tokio::spawn(async move { resolve(&mut client, &c1, id1, &same).await.unwrap() })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(ids[0].cluster_id(), Some(id1));

        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (mut client, c1) = (client.clone(), c1.clone());
                let labels = Labels::from_pairs([("app", format!("svc{i}"))]);
                tokio::spawn(async move { resolve(&mut client, &c1, id1, &labels).await.unwrap() })
            })
            .collect();
        let mut distinct = BTreeSet::new();
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
            cluster: c1.clone(),
            id: ids[0],
        }
        .to_string();
        let mut c = client.clone();
        c.delete(key.as_str(), None).await.unwrap();
        assert_eq!(resolve(&mut c, &c1, id1, &same).await.unwrap(), ids[0]);
        assert_eq!(c.get(key.as_str(), None).await.unwrap().kvs().len(), 1);
    }

    #[test]
    fn lowest_free_skips_reserved_and_used() {
        assert_eq!(lowest_free(&BTreeSet::new()), Some(256));
        assert_eq!(lowest_free(&BTreeSet::from([256, 257, 259])), Some(258));
        let all: BTreeSet<u16> = (256..=u16::MAX).collect();
        assert_eq!(lowest_free(&all), None);
    }
}
