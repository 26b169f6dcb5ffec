//! The etcd keys the apiserver owns besides those of the state schema (`meshd_state::keys`):
//! the desired state users applied, VIP allocations and the leader lease. None of them is
//! readable by remote clusters (they live outside `meshd/state/`). Policies are read by the
//! agents too, so their key is the schema's (`meshd_state::NetworkPolicyKey`).
//!
//! ```text
//! meshd/config/services/v1/<namespace>/<name>   Service manifest (JSON), spec.clusterIP filled in
//! meshd/config/policies/v1/<namespace>/<name>   NetworkPolicy manifest (JSON)
//! meshd/config/service-ips/v1/<ip>              ServiceOwner {namespace, name}: the VIP is taken
//! meshd/config/node-ports/v1/<port>             ServiceOwner {namespace, name}: the node port
//!                                               (a port's, or a health check's) is taken
//! meshd/leader/clustermesh-apiserver/<cluster>  replica id, under the leader's lease
//! ```
//!
//! It also deletes, on identity GC, the agents' index entry of the identity
//! (`meshd/state/identity-labels/v1/<cluster>/<labels>`).

use std::net::IpAddr;

use meshd_manifest::{Kind, ObjectRef};
use meshd_state::{ClusterName, NetworkPolicyKey, ResourceKey};
use serde::{Deserialize, Serialize};

pub const SERVICES_CONFIG_PREFIX: &str = "meshd/config/services/v1/";
pub use meshd_state::keys::POLICIES_PREFIX;
pub const SERVICE_IPS_PREFIX: &str = "meshd/config/service-ips/v1/";
pub const NODE_PORTS_PREFIX: &str = "meshd/config/node-ports/v1/";
pub const LEADER_PREFIX: &str = "meshd/leader/clustermesh-apiserver/";
pub use meshd_state::keys::identity_index_key;

pub fn kind_prefix(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => SERVICES_CONFIG_PREFIX,
        Kind::NetworkPolicy => POLICIES_PREFIX,
    }
}

/// Where an applied object is stored.
pub fn object_key(r: &ObjectRef) -> String {
    match r.kind {
        Kind::NetworkPolicy => NetworkPolicyKey::new(&r.namespace, &r.name).to_string(),
        Kind::Service => format!("{SERVICES_CONFIG_PREFIX}{}/{}", r.namespace, r.name),
    }
}

/// The object stored under `key`, if it is one of ours.
pub fn parse_object_key(key: &str) -> Option<ObjectRef> {
    if let Ok(k) = NetworkPolicyKey::parse(key) {
        return Some(ObjectRef {
            kind: Kind::NetworkPolicy,
            namespace: k.namespace,
            name: k.name,
        });
    }
    let (namespace, name) = key.strip_prefix(SERVICES_CONFIG_PREFIX)?.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then(|| ObjectRef {
        kind: Kind::Service,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

pub fn vip_key(ip: IpAddr) -> String {
    format!("{SERVICE_IPS_PREFIX}{ip}")
}

pub fn parse_vip_key(key: &str) -> Option<IpAddr> {
    key.strip_prefix(SERVICE_IPS_PREFIX)?.parse().ok()
}

pub fn node_port_key(port: u16) -> String {
    format!("{NODE_PORTS_PREFIX}{port}")
}

pub fn parse_node_port_key(key: &str) -> Option<u16> {
    key.strip_prefix(NODE_PORTS_PREFIX)?
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

pub fn leader_key(cluster: &ClusterName) -> String {
    format!("{LEADER_PREFIX}{cluster}")
}

/// The value of a VIP or node port allocation key: which service holds the address or port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOwner {
    pub namespace: String,
    pub name: String,
}

impl ServiceOwner {
    pub fn is(&self, object: &ObjectRef) -> bool {
        self.namespace == object.namespace && self.name == object.name
    }
}

impl std::fmt::Display for ServiceOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Service {}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_round_trip() {
        for kind in Kind::ALL {
            let r = ObjectRef {
                kind,
                namespace: "default".into(),
                name: "echo".into(),
            };
            assert_eq!(parse_object_key(&object_key(&r)), Some(r));
        }
        assert_eq!(
            object_key(&ObjectRef {
                kind: Kind::NetworkPolicy,
                namespace: "ns".into(),
                name: "p".into()
            }),
            "meshd/config/policies/v1/ns/p"
        );
        assert_eq!(parse_object_key("meshd/config/services/v1/a"), None);
        assert_eq!(parse_object_key("meshd/config/services/v1/a/b/c"), None);
        let ip: IpAddr = "10.96.0.1".parse().unwrap();
        assert_eq!(parse_vip_key(&vip_key(ip)), Some(ip));
        assert_eq!(parse_node_port_key(&node_port_key(30080)), Some(30080));
        assert_eq!(node_port_key(30080), "meshd/config/node-ports/v1/30080");
        assert_eq!(parse_node_port_key("meshd/config/node-ports/v1/0"), None);
        assert_eq!(parse_node_port_key("meshd/config/node-ports/v1/x"), None);
    }
}
