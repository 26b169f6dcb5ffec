//! A typed document of any kind meshd accepts, and the reference naming one object.

use std::fmt;
use std::str::FromStr;

use meshd_state::FieldError;
use serde::{Deserialize, Serialize};

use crate::policy;
use crate::{NetworkPolicy, Service};

/// The kinds of documents meshd accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Service,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Service, Kind::NetworkPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// Accepted `apiVersion`s, ours first. A Service may keep Kubernetes' `v1`, so Kubernetes
    /// manifests apply unchanged.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &[crate::API_VERSION, "v1"],
            // Kubernetes' and Cilium's policies are rewritten into ours before this check.
            Kind::NetworkPolicy => &[crate::API_VERSION],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown kind {s:?} (expected Service, NetworkPolicy or CiliumNetworkPolicy)"
                )
            })
    }
}

/// Names one object: what `delete` needs, and the identity of a document in a batch.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// One typed document. Few exist at a time (one per manifest document), so the size
/// difference between the variants does not matter.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Document {
    Service(Service),
    NetworkPolicy(NetworkPolicy),
}

impl Document {
    pub fn kind(&self) -> Kind {
        match self {
            Document::Service(_) => Kind::Service,
            Document::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        let (namespace, name) = match self {
            Document::Service(s) => (s.namespace(), s.name()),
            Document::NetworkPolicy(p) => (policy::namespace(p), policy::name(p)),
        };
        ObjectRef {
            kind: self.kind(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Every rule of the kind; a Service reports its first problem, a NetworkPolicy all.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        match self {
            Document::Service(s) => s.validate().map_err(|e| vec![e]),
            Document::NetworkPolicy(p) => policy::validate(p),
        }
    }

    /// The document as JSON (how the apiserver stores it).
    pub fn to_json(&self) -> Vec<u8> {
        // Both types are plain data with string keys: serialising cannot fail.
        match self {
            Document::Service(s) => serde_json::to_vec(s),
            Document::NetworkPolicy(p) => serde_json::to_vec(p),
        }
        .expect("manifests serialise to JSON")
    }
}
