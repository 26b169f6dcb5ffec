//! Every etcd key of the schema, in one place. Each key type renders itself (`Display`) and
//! parses itself (`ResourceKey::parse`); no other code builds or splits key strings.
//!
//! ```text
//! meshd/cluster-config/<cluster>
//! meshd/state/nodes/v1/<cluster>/<node>
//! meshd/state/ip/v1/<cluster>/<ip>            host prefixes: the bare address
//! meshd/state/ip/v1/<cluster>/<ip>/<len>      other prefixes
//! meshd/state/identities/v1/<cluster>/id/<id>
//! meshd/state/services/v1/<cluster>/<namespace>/<name>
//! meshd/synced/<cluster>/<resource>
//! meshd/config/policies/v1/<namespace>/<name>
//! meshd/cache/<cluster>/<remote key without its leading meshd/>   (the kvstoremesh mirror)
//! meshd/cache-status/v1/<cluster>                                 (the mirror's CacheStatus)
//! ```

use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::LazyLock;

use ipnet::IpNet;

use crate::error::{FieldError, StateError};
use crate::identity::NumericIdentity;
use crate::names::{check_dns_label, check_dns_subdomain, ClusterName};

/// Root of everything meshd stores.
pub const ROOT: &str = "meshd/";
pub const CLUSTER_CONFIG_PREFIX: &str = "meshd/cluster-config/";
pub const NODES_PREFIX: &str = "meshd/state/nodes/v1/";
pub const IPCACHE_PREFIX: &str = "meshd/state/ip/v1/";
pub const IDENTITIES_PREFIX: &str = "meshd/state/identities/v1/";
pub const SERVICES_PREFIX: &str = "meshd/state/services/v1/";
pub const SYNCED_PREFIX: &str = "meshd/synced/";
/// What remote clusters may read (together with `meshd/synced/`).
pub const STATE_PREFIX: &str = "meshd/state/";
/// The kinds of a cluster's state that other clusters read, in key order. Readers ask for
/// each one under the cluster's own name (`<prefix><cluster>/`) instead of all of
/// `meshd/state/`: an etcd that holds several clusters' state (a shared etcd, or a benchmark's
/// simulated clusters) would otherwise send every reader every cluster's changes.
pub const SHARED_STATE_PREFIXES: [&str; 4] = [
    IDENTITIES_PREFIX,
    IPCACHE_PREFIX,
    NODES_PREFIX,
    SERVICES_PREFIX,
];
/// NetworkPolicy manifests of the local cluster (written by the apiserver, read by its agents;
/// not readable by remote clusters).
pub const POLICIES_PREFIX: &str = "meshd/config/policies/v1/";
/// The label-set index of identities: `<prefix><cluster>/<labels as k=v,k=v>` -> the number.
/// Agents allocate through it (two nodes with one label set get one number); identity GC in
/// the apiserver deletes an identity's index entry with it, or a later allocation could hand
/// the same number to another label set while the stale index still maps the old one to it.
pub const IDENTITY_INDEX_PREFIX: &str = "meshd/state/identity-labels/v1/";

/// The local cache of remote clusters' shared state, written by `clustermesh-apiserver
/// --kvstoremesh`: `meshd/cache/<cluster>/` + the remote key with its leading `meshd/` removed.
/// Readable by the local cluster's agents, never exported to remote clusters.
pub const CACHE_PREFIX: &str = "meshd/cache/";
/// `meshd/cache-status/v1/<cluster>`: the mirror's [`crate::CacheStatus`] of one remote.
pub const CACHE_STATUS_PREFIX: &str = "meshd/cache-status/v1/";

/// `meshd/cache/<cluster>/`: everything mirrored from `cluster` (ends in `/`).
pub fn cache_prefix(cluster: &str) -> String {
    format!("{CACHE_PREFIX}{cluster}/")
}

/// The cache key of `remote_key` (a key of `cluster`'s own etcd, under `meshd/`):
/// `meshd/state/nodes/v1/c2/n1` of `c2` -> `meshd/cache/c2/state/nodes/v1/c2/n1`. `None` for a
/// key outside `meshd/` (never mirrored).
pub fn cache_key(cluster: &str, remote_key: &str) -> Option<String> {
    let rest = remote_key.strip_prefix(ROOT)?;
    Some(format!("{CACHE_PREFIX}{cluster}/{rest}"))
}

/// The inverse of [`cache_key`]: `meshd/cache/c2/state/x` -> `("c2", "meshd/state/x")`.
pub fn remote_key_of_cache(cache_key: &str) -> Option<(&str, String)> {
    let rest = cache_key.strip_prefix(CACHE_PREFIX)?;
    let (cluster, key) = rest.split_once('/')?;
    if cluster.is_empty() || key.is_empty() {
        return None;
    }
    Some((cluster, format!("{ROOT}{key}")))
}

/// `meshd/cache-status/v1/<cluster>`
pub fn cache_status_key(cluster: &str) -> String {
    format!("{CACHE_STATUS_PREFIX}{cluster}")
}

/// Index key of `labels` in `cluster` (labels render sorted, so the key is canonical).
pub fn identity_index_key(cluster: &crate::ClusterName, labels: &crate::Labels) -> String {
    format!("{IDENTITY_INDEX_PREFIX}{cluster}/{labels}")
}

/// A key type of the schema.
pub trait ResourceKey:
    Sized
    + Clone
    + PartialEq
    + Eq
    + PartialOrd
    + Ord
    + Hash
    + fmt::Debug
    + fmt::Display
    + Send
    + Sync
    + 'static
{
    /// Parses a full etcd key; the error names the key.
    fn parse(key: &str) -> Result<Self, StateError>;
    /// The cluster whose state this key belongs to.
    fn cluster(&self) -> &ClusterName;
}

/// Splits `key` after `prefix` into exactly `n` non-empty `/`-separated segments.
fn segments<'k>(
    key: &'k str,
    prefix: &str,
    n: usize,
    shape: &str,
) -> Result<Vec<&'k str>, StateError> {
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| StateError::key(key, format!("does not start with {prefix:?}")))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() != n || parts.iter().any(|p| p.is_empty()) {
        return Err(StateError::key(key, format!("expected {prefix}{shape}")));
    }
    Ok(parts)
}

fn cluster_segment(key: &str, s: &str) -> Result<ClusterName, StateError> {
    ClusterName::new(s).map_err(|e| StateError::key(key, e.to_string()))
}

/// Whether `value` displays as exactly `text`, compared piece by piece as it is formatted: a
/// key's canonical form is checked for every watch event, and building the string to compare
/// was an allocation per event.
fn displays_as(value: &impl fmt::Display, text: &str) -> bool {
    /// What of `text` is still to be matched.
    struct Rest<'a>(&'a str);
    impl fmt::Write for Rest<'_> {
        fn write_str(&mut self, piece: &str) -> fmt::Result {
            self.0 = self.0.strip_prefix(piece).ok_or(fmt::Error)?;
            Ok(())
        }
    }
    let mut rest = Rest(text);
    fmt::write(&mut rest, format_args!("{value}")).is_ok() && rest.0.is_empty()
}

fn check_segment(key: &str, r: Result<(), FieldError>) -> Result<(), StateError> {
    r.map_err(|e| StateError::key(key, e.to_string()))
}

/// `meshd/cluster-config/<cluster>`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterConfigKey {
    pub cluster: ClusterName,
}

impl fmt::Display for ClusterConfigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{CLUSTER_CONFIG_PREFIX}{}", self.cluster)
    }
}

impl ResourceKey for ClusterConfigKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let s = segments(key, CLUSTER_CONFIG_PREFIX, 1, "<cluster>")?;
        Ok(Self {
            cluster: cluster_segment(key, s[0])?,
        })
    }
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
}

/// `meshd/state/nodes/v1/<cluster>/<node>`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey {
    pub cluster: ClusterName,
    pub node: String,
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{NODES_PREFIX}{}/{}", self.cluster, self.node)
    }
}

impl ResourceKey for NodeKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let s = segments(key, NODES_PREFIX, 2, "<cluster>/<node>")?;
        let cluster = cluster_segment(key, s[0])?;
        check_segment(key, check_dns_subdomain("node", s[1]))?;
        Ok(Self {
            cluster,
            node: s[1].to_owned(),
        })
    }
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
}

/// `meshd/state/ip/v1/<cluster>/<ip>` for a host prefix (/32, /128), `<ip>/<len>` otherwise.
/// The prefix is always canonical (no host bits set), so one prefix has exactly one key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheKey {
    pub cluster: ClusterName,
    pub prefix: IpNet,
}

impl IpcacheKey {
    /// The key of a single endpoint address.
    pub fn host(cluster: ClusterName, ip: IpAddr) -> Self {
        Self {
            cluster,
            prefix: IpNet::from(ip),
        }
    }
}

impl fmt::Display for IpcacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.prefix_len() == self.prefix.max_prefix_len() {
            write!(f, "{IPCACHE_PREFIX}{}/{}", self.cluster, self.prefix.addr())
        } else {
            write!(f, "{IPCACHE_PREFIX}{}/{}", self.cluster, self.prefix)
        }
    }
}

impl ResourceKey for IpcacheKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let rest = key.strip_prefix(IPCACHE_PREFIX).ok_or_else(|| {
            StateError::key(key, format!("does not start with {IPCACHE_PREFIX:?}"))
        })?;
        let (cluster, ip) = rest.split_once('/').ok_or_else(|| {
            StateError::key(key, format!("expected {IPCACHE_PREFIX}<cluster>/<ip>"))
        })?;
        let cluster = cluster_segment(key, cluster)?;
        let prefix =
            if ip.contains('/') {
                ip.parse::<IpNet>()
                    .map_err(|e| StateError::key(key, format!("{ip:?} is not a prefix: {e}")))?
            } else {
                IpNet::from(ip.parse::<IpAddr>().map_err(|e| {
                    StateError::key(key, format!("{ip:?} is not an IP address: {e}"))
                })?)
            };
        if prefix.trunc() != prefix {
            return Err(StateError::key(
                key,
                format!(
                    "prefix {prefix} has host bits set (expected {})",
                    prefix.trunc()
                ),
            ));
        }
        let me = Self { cluster, prefix };
        // One prefix, one key: `10.0.0.1/32` must be written `10.0.0.1`.
        if !displays_as(&me, key) {
            return Err(StateError::key(
                key,
                format!("not in canonical form (expected {me})"),
            ));
        }
        Ok(me)
    }
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
}

/// `meshd/state/identities/v1/<cluster>/id/<id>`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub cluster: ClusterName,
    pub id: NumericIdentity,
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{IDENTITIES_PREFIX}{}/id/{}", self.cluster, self.id)
    }
}

impl ResourceKey for IdentityKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let s = segments(key, IDENTITIES_PREFIX, 3, "<cluster>/id/<id>")?;
        let cluster = cluster_segment(key, s[0])?;
        if s[1] != "id" {
            return Err(StateError::key(
                key,
                format!("expected {IDENTITIES_PREFIX}<cluster>/id/<id>"),
            ));
        }
        let n: u32 = s[2]
            .parse()
            .map_err(|_| StateError::key(key, format!("identity {:?} is not a number", s[2])))?;
        let id = NumericIdentity::new(n).map_err(|e| StateError::key(key, e.to_string()))?;
        if id.is_reserved() {
            return Err(StateError::key(
                key,
                format!("identity {id} is reserved and never stored"),
            ));
        }
        Ok(Self { cluster, id })
    }
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
}

/// `meshd/state/services/v1/<cluster>/<namespace>/<name>`
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub cluster: ClusterName,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SERVICES_PREFIX}{}/{}/{}",
            self.cluster, self.namespace, self.name
        )
    }
}

impl ResourceKey for ServiceKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let s = segments(key, SERVICES_PREFIX, 3, "<cluster>/<namespace>/<name>")?;
        let cluster = cluster_segment(key, s[0])?;
        check_segment(key, check_dns_label("namespace", s[1]))?;
        check_segment(key, check_dns_label("name", s[2]))?;
        Ok(Self {
            cluster,
            namespace: s[1].to_owned(),
            name: s[2].to_owned(),
        })
    }
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
}

/// `meshd/synced/<cluster>/<resource>`: the initial sync of `resource` (a `Resource::KIND`) of
/// `cluster` is complete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SyncCanaryKey {
    pub cluster: ClusterName,
    pub resource: String,
}

impl fmt::Display for SyncCanaryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SYNCED_PREFIX}{}/{}", self.cluster, self.resource)
    }
}

impl ResourceKey for SyncCanaryKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let s = segments(key, SYNCED_PREFIX, 2, "<cluster>/<resource>")?;
        let cluster = cluster_segment(key, s[0])?;
        check_segment(key, check_dns_label("resource", s[1]))?;
        Ok(Self {
            cluster,
            resource: s[1].to_owned(),
        })
    }
    fn cluster(&self) -> &ClusterName {
        &self.cluster
    }
}

/// `meshd/config/policies/v1/<namespace>/<name>`: a NetworkPolicy of the local cluster.
/// Policies are configuration of one cluster, not state a remote reads: the key carries no
/// cluster, so [`ResourceKey::cluster`] names a placeholder (`local`) and watches of it are
/// unscoped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetworkPolicyKey {
    pub namespace: String,
    pub name: String,
}

impl NetworkPolicyKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NetworkPolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{POLICIES_PREFIX}{}/{}", self.namespace, self.name)
    }
}

impl ResourceKey for NetworkPolicyKey {
    fn parse(key: &str) -> Result<Self, StateError> {
        let bad = || StateError::key(key, format!("expected {POLICIES_PREFIX}<namespace>/<name>"));
        let (namespace, name) = key
            .strip_prefix(POLICIES_PREFIX)
            .and_then(|r| r.split_once('/'))
            .ok_or_else(bad)?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        Ok(Self::new(namespace, name))
    }

    fn cluster(&self) -> &ClusterName {
        static UNSCOPED: LazyLock<ClusterName> =
            LazyLock::new(|| ClusterName::new("local").expect("a valid name"));
        &UNSCOPED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c1() -> ClusterName {
        ClusterName::new("c1").unwrap()
    }

    fn round_trip<K: ResourceKey>(key: &K, text: &str) {
        assert_eq!(key.to_string(), text);
        assert_eq!(&K::parse(text).unwrap(), key);
    }

    #[test]
    fn keys_render_and_parse() {
        round_trip(
            &ClusterConfigKey { cluster: c1() },
            "meshd/cluster-config/c1",
        );
        round_trip(
            &NodeKey {
                cluster: c1(),
                node: "n1".into(),
            },
            "meshd/state/nodes/v1/c1/n1",
        );
        round_trip(
            &IpcacheKey::host(c1(), "10.1.0.5".parse().unwrap()),
            "meshd/state/ip/v1/c1/10.1.0.5",
        );
        round_trip(
            &IpcacheKey::host(c1(), "fd00::5".parse().unwrap()),
            "meshd/state/ip/v1/c1/fd00::5",
        );
        round_trip(
            &IpcacheKey {
                cluster: c1(),
                prefix: "10.1.0.0/16".parse().unwrap(),
            },
            "meshd/state/ip/v1/c1/10.1.0.0/16",
        );
        round_trip(
            &IdentityKey {
                cluster: c1(),
                id: NumericIdentity::new((1 << 16) | 300).unwrap(),
            },
            "meshd/state/identities/v1/c1/id/65836",
        );
        round_trip(
            &ServiceKey {
                cluster: c1(),
                namespace: "default".into(),
                name: "echo".into(),
            },
            "meshd/state/services/v1/c1/default/echo",
        );
        round_trip(
            &SyncCanaryKey {
                cluster: c1(),
                resource: "nodes".into(),
            },
            "meshd/synced/c1/nodes",
        );
    }

    #[test]
    fn displays_as_compares_the_whole_text() {
        let key = IpcacheKey::host(c1(), "10.0.0.1".parse().unwrap());
        assert!(displays_as(&key, "meshd/state/ip/v1/c1/10.0.0.1"));
        for other in [
            "",
            "meshd/state/ip/v1/c1/10.0.0.",
            "meshd/state/ip/v1/c1/10.0.0.10",
            "meshd/state/ip/v1/c1/10.0.0.1/32",
            "meshd/state/ip/v1/c2/10.0.0.1",
        ] {
            assert!(!displays_as(&key, other), "{other:?}");
        }
    }

    #[test]
    fn bad_keys_are_rejected_with_the_key_named() {
        type Parse = fn(&str) -> Result<(), StateError>;
        let bad: &[(&str, Parse)] = &[
            ("meshd/state/nodes/v1/c1", |k| NodeKey::parse(k).map(drop)),
            ("meshd/state/nodes/v1/c1/n1/extra", |k| {
                NodeKey::parse(k).map(drop)
            }),
            ("meshd/state/nodes/v1/C1/n1", |k| {
                NodeKey::parse(k).map(drop)
            }),
            ("meshd/state/nodes/v1//n1", |k| NodeKey::parse(k).map(drop)),
            ("other/nodes/v1/c1/n1", |k| NodeKey::parse(k).map(drop)),
            ("meshd/state/ip/v1/c1/10.0.0.300", |k| {
                IpcacheKey::parse(k).map(drop)
            }),
            ("meshd/state/ip/v1/c1/10.0.0.1/16", |k| {
                IpcacheKey::parse(k).map(drop)
            }),
            ("meshd/state/ip/v1/c1/10.0.0.1/32", |k| {
                IpcacheKey::parse(k).map(drop)
            }),
            ("meshd/state/ip/v1/c1", |k| IpcacheKey::parse(k).map(drop)),
            // Parse, but are not written the one way their prefix is.
            ("meshd/state/ip/v1/c1/0:0:0:0:0:0:0:1", |k| {
                IpcacheKey::parse(k).map(drop)
            }),
            ("meshd/state/ip/v1/c1/10.0.0.0/08", |k| {
                IpcacheKey::parse(k).map(drop)
            }),
            ("meshd/state/identities/v1/c1/id/abc", |k| {
                IdentityKey::parse(k).map(drop)
            }),
            ("meshd/state/identities/v1/c1/id/2", |k| {
                IdentityKey::parse(k).map(drop)
            }),
            ("meshd/state/identities/v1/c1/xx/65836", |k| {
                IdentityKey::parse(k).map(drop)
            }),
            ("meshd/state/services/v1/c1/default", |k| {
                ServiceKey::parse(k).map(drop)
            }),
            ("meshd/state/services/v1/c1/Default/echo", |k| {
                ServiceKey::parse(k).map(drop)
            }),
            ("meshd/synced/c1", |k| SyncCanaryKey::parse(k).map(drop)),
            ("meshd/cluster-config/c1/x", |k| {
                ClusterConfigKey::parse(k).map(drop)
            }),
        ];
        for (key, parse) in bad {
            let err = parse(key).unwrap_err();
            assert!(matches!(err, StateError::Key { .. }), "{key}: {err}");
            assert_eq!(err.key_str(), *key);
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn policy_keys_round_trip_and_reject_garbage() {
        let k = NetworkPolicyKey::parse("meshd/config/policies/v1/default/echo").unwrap();
        assert_eq!((k.namespace.as_str(), k.name.as_str()), ("default", "echo"));
        assert_eq!(k.to_string(), "meshd/config/policies/v1/default/echo");
        for bad in [
            "meshd/config/policies/v1/default",
            "meshd/config/policies/v1//x",
            "meshd/config/policies/v1/a/b/c",
            "other/a/b",
        ] {
            assert!(NetworkPolicyKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_keys_drop_the_remote_root() {
        for (remote, local) in [
            (
                "meshd/state/nodes/v1/c2/n1",
                "meshd/cache/c2/state/nodes/v1/c2/n1",
            ),
            ("meshd/synced/c2/nodes", "meshd/cache/c2/synced/c2/nodes"),
            (
                "meshd/cluster-config/c2",
                "meshd/cache/c2/cluster-config/c2",
            ),
        ] {
            assert_eq!(cache_key("c2", remote).as_deref(), Some(local));
            assert_eq!(remote_key_of_cache(local), Some(("c2", remote.to_owned())));
            assert!(local.starts_with(&cache_prefix("c2")));
        }
        assert_eq!(cache_key("c2", "other/x"), None);
        assert_eq!(remote_key_of_cache("meshd/state/x"), None);
        assert_eq!(cache_status_key("c2"), "meshd/cache-status/v1/c2");
    }

    #[test]
    fn index_keys_are_canonical() {
        let c1 = ClusterName::new("c1").unwrap();
        let a = crate::Labels::from_pairs([("b", "2"), ("a", "1")]);
        let b = crate::Labels::from_pairs([("a", "1"), ("b", "2")]);
        assert_eq!(identity_index_key(&c1, &a), identity_index_key(&c1, &b));
        assert_eq!(
            identity_index_key(&c1, &a),
            "meshd/state/identity-labels/v1/c1/a=1,b=2"
        );
    }
}
