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
//! * Entities (`fromEntities` / `toEntities`, Cilium's names): `world` (everything outside
//!   the mesh), `host` (the endpoint's node), `remote-node` (the other nodes of the mesh),
//!   `cluster` (the local cluster's endpoints, its nodes and the host), `all` (any peer).
//! * CIDRs (`fromCIDR` / `toCIDR`: prefixes or bare addresses; `fromCIDRSet` / `toCIDRSet`:
//!   `{cidr, except: [...]}`) match addresses outside the mesh. Addresses of the mesh's
//!   endpoints are matched by identity, never by CIDR, even inside a named prefix (as in
//!   Cilium). See `peers.rs` for how prefixes become identities.
//! * A rule's peers are the union of its peer fields; a rule without any allows any peer.
//! * Reserved identities: the host (1) is always allowed both ways for an enforced subject,
//!   so the node's health checks and the replies to them pass. World (2) and remote-node (6)
//!   are reached by entities, CIDRs (`0.0.0.0/0` is `world`) and rules without peers.
//! * The datapath is stateful: replies of allowed connections pass without a policy entry.

mod compile;
mod index;
mod peers;

pub use compile::{compile, rule_cookie, CompiledPolicy, BUILTIN_COOKIE};
pub use index::PolicyIndex;
pub use meshd_state::policy::{
    CidrRule, EgressRule, EndpointSelector, Entity, IngressRule, L4Protocol, NetworkPolicy,
    Operator, PolicyError, PolicyErrors, PolicyMetadata, PolicySpec, PortProtocol, PortRule,
    PortSpec, SelectorRequirement, API_VERSION, DEFAULT_NAMESPACE, KIND,
};
pub use peers::{
    cidr_labels, egress_peers, ingress_peers, reserved_identities, CidrIdentities, PeerSet,
    CIDR_LABEL,
};

#[cfg(test)]
mod tests;
