//! `metadata` of every manifest, as in Kubernetes.

use std::collections::BTreeMap;

use meshd_state::{check_dns_label, FieldError, Labels};
use serde::{Deserialize, Serialize};

/// The API version of meshd's own documents.
pub const API_VERSION: &str = "meshd.io/v1";
/// Namespace of an object whose metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Name, namespace, labels and annotations of an object. Other Kubernetes metadata
/// (`uid`, `resourceVersion`, ...) is accepted and dropped, so exported manifests apply as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

impl ObjectMeta {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// Names are DNS labels: they become segments of etcd keys.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_dns_label("metadata.name", &self.name)?;
        check_dns_label("metadata.namespace", &self.namespace)?;
        Labels::from_pairs(self.labels.clone()).validate("metadata.labels")?;
        Ok(())
    }
}
