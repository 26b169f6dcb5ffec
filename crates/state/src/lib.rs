//! meshd's state model: the typed records every cluster keeps in its etcd, and the typed keys
//! they live under. Pure data and validation, no I/O; the kvstore crate moves these in and out
//! of etcd. The schema is documented in this crate's README.md.
//!
//! Reading a stored entry is one call, which parses the key, decodes the JSON and validates it:
//!
//! ```
//! use meshd_state::{decode, IpcacheEntry, ResourceKey};
//! let (key, entry) = decode::<IpcacheEntry>(
//!     "meshd/state/ip/v1/c1/10.1.0.5",
//!     br#"{"prefix":"10.1.0.5/32","identity":65836,"host_ip":"192.168.0.1"}"#,
//! )
//! .unwrap();
//! assert_eq!(key.cluster().as_str(), "c1");
//! assert_eq!(entry.identity.local(), 300);
//! ```

pub mod compact;
mod error;
mod identity;
pub mod keys;
mod labels;
mod names;
pub mod policy;
mod records;
mod resource;

pub use error::{FieldError, StateError};
pub use identity::{IdentityRecord, NumericIdentity, LOCAL_SCOPE_FLAG, MIN_LOCAL_ID};
pub use keys::{
    ClusterConfigKey, IdentityKey, IpcacheKey, NetworkPolicyKey, NodeKey, ResourceKey, ServiceKey,
    SyncCanaryKey,
};
pub use labels::{Labels, CLUSTER_LABEL, NAMESPACE_LABEL};
pub use names::{check_dns_label, check_dns_subdomain, ClusterId, ClusterName};
pub use policy::{NetworkPolicy, PolicyError, PolicyErrors};
pub use records::{
    Affinity, CacheStatus, Capabilities, ClusterConfig, IpcacheEntry, NodeRecord, Protocol,
    RoutingMode, ServiceBackend, ServiceFrontend, ServiceRecord, ServiceType, SyncCanary,
    TrafficPolicy,
};
pub use resource::{decode, encode, Resource};

#[cfg(test)]
mod tests;
