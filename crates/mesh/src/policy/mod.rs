//! Network policy: its compilation into policy map entries. The manifest itself (the
//! `NetworkPolicy` document, its selectors and its validation) is part of the state model,
//! `meshd_state::policy`, re-exported here; what it means is decided here.
//!
//! ```yaml
//! apiVersion: meshd.io/v1
//! kind: NetworkPolicy
//! metadata: { name: echo-from-c1-clients, namespace: default }
//! spec:
//!   endpointSelector: { matchLabels: { app: echo } }
//!   ingress:
//!     - fromEndpoints: [ { matchLabels: { app: client, meshd.io/cluster: c1 } } ]
//!       toPorts: [ { ports: [ { port: "8080", protocol: TCP } ] } ]
//! ```
//!
//! Semantics (chosen to match Cilium, so users can bring their manifests):
//!
//! * Subjects: the local cluster's identities whose `meshd.io/namespace` label equals the
//!   policy's namespace (an identity without the label is in `default`) and that match
//!   `endpointSelector`.
//! * A direction is enforced for a subject as soon as one policy selecting it has that section
//!   (`ingress:` / `egress:`), even empty (`ingress: []` denies all ingress). Then the direction
//!   is default-deny except what the rules of all such policies allow (their union). A policy
//!   must have at least one of the two sections.
//! * Peers (`fromEndpoints` / `toEndpoints`): selectors over the labels of every admitted
//!   identity of every cluster, each carrying `meshd.io/cluster`. A selector that does not
//!   mention `meshd.io/namespace` matches peers of the policy's own namespace only (Cilium's
//!   default); mention it (`matchLabels` or `matchExpressions`, e.g. `Exists`) to reach other
//!   namespaces. A rule without the field allows any peer, inside the mesh or not (world).
//!   An empty list is refused (omit the field instead): its meaning differs between
//!   Kubernetes and Cilium.
//! * Ports (`toPorts[].ports[]`): `port` is a number or a numeric string, `0` or absent means
//!   every port; `protocol` is `TCP`, `UDP`, `ICMP` or `ANY` (the default: TCP and UDP when a
//!   port is given, every protocol otherwise). ICMP takes no port. A rule without `toPorts`
//!   allows every protocol and port.
//! * Reserved identities: the host (1) is always allowed both ways for an enforced subject,
//!   so the node's health checks and the replies to them pass. World (2) and remote-node (6)
//!   are only reached by rules without peers.
//! * The datapath is stateful: replies of allowed connections pass without a policy entry.

mod compile;
mod index;

pub use compile::{compile, rule_cookie, CompiledPolicy, BUILTIN_COOKIE};
pub use index::PolicyIndex;
pub use meshd_state::policy::{
    EgressRule, EndpointSelector, IngressRule, L4Protocol, NetworkPolicy, Operator, PolicyError,
    PolicyErrors, PolicyMetadata, PolicySpec, PortProtocol, PortRule, PortSpec,
    SelectorRequirement, API_VERSION, DEFAULT_NAMESPACE, KIND,
};

#[cfg(test)]
mod tests;
