//! The `Resource` trait ties a record type to its key type, its prefix and its validation, so the
//! kvstore can publish and watch any of them generically.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{FieldError, StateError};
use crate::identity::IdentityRecord;
use crate::keys::{
    ClusterConfigKey, IdentityKey, IpcacheKey, NetworkPolicyKey, NodeKey, ResourceKey, ServiceKey,
    SyncCanaryKey, CLUSTER_CONFIG_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX, NODES_PREFIX,
    POLICIES_PREFIX, SERVICES_PREFIX, SYNCED_PREFIX,
};
use crate::names::ClusterName;
use crate::policy::NetworkPolicy;
use crate::records::{ClusterConfig, IpcacheEntry, NodeRecord, ServiceRecord, SyncCanary};

/// A record type stored in etcd as JSON under keys of type `Key`.
pub trait Resource:
    Serialize + DeserializeOwned + Clone + PartialEq + fmt::Debug + Send + Sync + 'static
{
    type Key: ResourceKey;
    /// Short name, used in sync canary keys (`meshd/synced/<cluster>/<KIND>`), logs and metrics.
    const KIND: &'static str;
    /// Every key of this resource, of every cluster, starts with this.
    const PREFIX: &'static str;

    /// Checks the fields and that they agree with the key (e.g. a node record's name and the
    /// node segment of its key).
    fn validate(&self, key: &Self::Key) -> Result<(), FieldError>;

    /// The prefix holding exactly the keys of `cluster`. Ends in `/` for every resource but
    /// cluster config, where it is the one key of the cluster.
    fn cluster_prefix(cluster: &ClusterName) -> String {
        format!("{}{}/", Self::PREFIX, cluster)
    }
}

/// Parses the key, decodes the JSON value and validates it. Pure, so the kvstore's handling of
/// malformed data is tested without etcd.
pub fn decode<R: Resource>(key: &str, value: &[u8]) -> Result<(R::Key, R), StateError> {
    let parsed = R::Key::parse(key)?;
    let record: R = serde_json::from_slice(value).map_err(|e| StateError::Json {
        key: key.to_owned(),
        kind: R::KIND,
        reason: e.to_string(),
    })?;
    record
        .validate(&parsed)
        .map_err(|e| StateError::field(key, e))?;
    Ok((parsed, record))
}

/// Validates and encodes a record for `key`; refuses to write what readers would reject.
pub fn encode<R: Resource>(key: &R::Key, record: &R) -> Result<Vec<u8>, StateError> {
    record
        .validate(key)
        .map_err(|e| StateError::field(key.to_string(), e))?;
    serde_json::to_vec(record).map_err(|e| StateError::Json {
        key: key.to_string(),
        kind: R::KIND,
        reason: e.to_string(),
    })
}

fn same<T: PartialEq + fmt::Display + ?Sized>(
    field: &str,
    value: &T,
    in_key: &T,
) -> Result<(), FieldError> {
    if value == in_key {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:} differs from {in_key} in the key"),
        ))
    }
}

impl Resource for ClusterConfig {
    type Key = ClusterConfigKey;
    const KIND: &'static str = "cluster-config";
    const PREFIX: &'static str = CLUSTER_CONFIG_PREFIX;

    fn validate(&self, key: &Self::Key) -> Result<(), FieldError> {
        same("name", &self.name, &key.cluster)
    }

    fn cluster_prefix(cluster: &ClusterName) -> String {
        ClusterConfigKey {
            cluster: cluster.clone(),
        }
        .to_string()
    }
}

impl Resource for NodeRecord {
    type Key = NodeKey;
    const KIND: &'static str = "nodes";
    const PREFIX: &'static str = NODES_PREFIX;

    fn validate(&self, key: &Self::Key) -> Result<(), FieldError> {
        self.validate()?;
        same("name", self.name.as_str(), key.node.as_str())?;
        same("cluster", &self.cluster, &key.cluster)
    }
}

impl Resource for IpcacheEntry {
    type Key = IpcacheKey;
    const KIND: &'static str = "ip";
    const PREFIX: &'static str = IPCACHE_PREFIX;

    fn validate(&self, key: &Self::Key) -> Result<(), FieldError> {
        self.validate()?;
        same("prefix", &self.prefix, &key.prefix)
    }
}

impl Resource for IdentityRecord {
    type Key = IdentityKey;
    const KIND: &'static str = "identities";
    const PREFIX: &'static str = IDENTITIES_PREFIX;

    fn validate(&self, key: &Self::Key) -> Result<(), FieldError> {
        self.validate(key.cluster.as_str())
    }
}

impl Resource for ServiceRecord {
    type Key = ServiceKey;
    const KIND: &'static str = "services";
    const PREFIX: &'static str = SERVICES_PREFIX;

    fn validate(&self, key: &Self::Key) -> Result<(), FieldError> {
        self.validate()?;
        same("namespace", self.namespace.as_str(), key.namespace.as_str())?;
        same("name", self.name.as_str(), key.name.as_str())
    }
}

impl Resource for SyncCanary {
    type Key = SyncCanaryKey;
    const KIND: &'static str = "synced";
    const PREFIX: &'static str = SYNCED_PREFIX;

    fn validate(&self, _key: &Self::Key) -> Result<(), FieldError> {
        Ok(())
    }
}

/// Stored as the manifest the user applied (JSON), checked in full (every problem of the
/// document, reported as one `spec` field error) and against its key.
impl Resource for NetworkPolicy {
    type Key = NetworkPolicyKey;
    const KIND: &'static str = "policies";
    const PREFIX: &'static str = POLICIES_PREFIX;

    fn validate(&self, key: &Self::Key) -> Result<(), FieldError> {
        NetworkPolicy::validate(self).map_err(|e| FieldError::new("spec", e.to_string()))?;
        let meta = &self.metadata;
        if meta.namespace != key.namespace || meta.name != key.name {
            return Err(FieldError::new(
                "metadata",
                format!(
                    "{}/{} differs from {}/{} in the key",
                    meta.namespace, meta.name, key.namespace, key.name
                ),
            ));
        }
        Ok(())
    }
}
