//! meshd manifests: the documents users apply to a cluster's apiserver, in Kubernetes-style
//! YAML: `Service` (defined here) and `NetworkPolicy` (defined by the mesh crate, with its
//! compilation to datapath rules). Cilium's `CiliumNetworkPolicy` and Kubernetes'
//! `NetworkPolicy` are accepted too, rewritten into meshd's policy (see `foreign.rs`).
//!
//! Loading is pure (files in, typed documents out) and reports every problem of every document
//! at once, each naming the file, the document's position and the field:
//!
//! ```
//! let text = "apiVersion: meshd.io/v1\nkind: Service\nmetadata: { name: echo }\n\
//!             spec: { selector: { app: echo }, ports: [ { port: 0 } ] }\n";
//! let err = meshd_manifest::parse_str("echo.yaml", text).unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "echo.yaml: document 1 (Service default/echo): field spec.ports[0].port: must be 1-65535"
//! );
//! ```

mod annotations;
mod document;
mod error;
mod foreign;
mod load;
mod meta;
mod policy;
mod service;

pub use annotations::{ServiceOptions, AFFINITY, GLOBAL, MESHD_PREFIX, SHARED};
pub use document::{Document, Kind, ObjectRef};
pub use error::{DocumentError, ManifestErrors};
pub use foreign::{canonical_label_key, SOURCE_ANNOTATION};
pub use load::{
    check_unique, expand_paths, load_paths, parse_document, parse_str, parse_value, SourcedDocument,
};
pub use meta::{ObjectMeta, API_VERSION, DEFAULT_NAMESPACE};
pub use policy::NetworkPolicy;
pub use service::{Service, ServicePort, ServiceSpec, TargetPort};

#[cfg(test)]
mod foreign_tests;
#[cfg(test)]
mod tests;
