//! meshd's pure core: no I/O, no clocks, no async. The agent's watchers feed events in, the
//! reconciler takes datapath operations out; everything in between is plain data and plain
//! functions, unit-tested here.
//!
//! # Public API (what the agent consumes)
//!
//! ```text
//! MeshView::new(LocalNode { cluster, cluster_id, node_name, node_ip, pod_cidrs })
//! view.apply(ClusterEvent { cluster, kind }) -> Applied      // one watcher event
//! view.apply_policy(PolicyEvent::Upsert(p) | Delete{..}) -> bool  // local policies
//! view.desired() -> DesiredDatapath                           // full desired state (clone)
//! view.desired_ipcache() / desired_nodes() -> &BTreeMap       // borrowed, maintained incrementally
//! view.compile_policy() -> CompiledPolicy                     // policy part only
//! view.status() -> Vec<ClusterStatus>; view.cluster_status(&name); view.rejections(&name)
//! view.identities() -> &BTreeMap<NumericIdentity, Labels>      // admitted, all clusters
//! view.services() -> iterator of (cluster, &ServiceRecord)    // stored for the services issue
//!
//! diff(&actual, &desired) -> Vec<DatapathOp>                  // ordered, idempotent
//! diff_policy(&actual, &desired) -> Vec<DatapathOp>           // policy maps only
//! DesiredDatapath::apply_ops(&mut self, &[DatapathOp])         // what a map writer does, in memory
//!
//! NetworkPolicy::from_yaml(&str) / from_json(&str) -> Result<NetworkPolicy, PolicyErrors>
//! NetworkPolicy::validate(&self) -> Result<(), PolicyErrors>
//! compile(policies, &identities, local_cluster_id) -> CompiledPolicy
//! ```
//!
//! ## Events
//!
//! [`ClusterEvent`] = `{ cluster: ClusterName, kind: EventKind }` with `EventKind` one of
//! `UpsertNode(NodeRecord)`, `DeleteNode { name }`, `UpsertIpcache(IpcacheEntry)`,
//! `DeleteIpcache { prefix }`, `UpsertIdentity { id, record }`, `DeleteIdentity { id }`,
//! `UpsertService(ServiceRecord)`, `DeleteService { namespace, name }`, `Synced(ResourceKind)`,
//! `ClusterConfig(ClusterConfig)` and `ClusterRemoved`. Events of the local cluster (the name in
//! [`LocalNode`]) go through the same `apply`: the local etcd's nodes, ipcache and identities
//! are a cluster like the others, only trusted for overlap and never refused.
//!
//! [`Applied`] says what one event did: `ops` (ipcache and node-map operations, already the exact
//! incremental diff of the maintained desired state, in safe order), `rejected` (each a
//! [`Rejection`] naming cluster, etcd key and reason: log it), `pending` (ipcache entries waiting
//! for their node), `policy_inputs_changed` (identities changed: recompile policy), and `cluster`
//! (a cluster-level refusal, e.g. a conflicting cluster id).
//!
//! ## Rules of the merged view
//!
//! * A remote cluster's data is held back (pending) until its `ClusterConfig` arrives; a remote
//!   whose published name differs from the configured one, whose id equals the local id, or
//!   whose id is already used by another accepted remote is *refused*: nothing of it enters
//!   the desired state. The incumbent keeps its id (a newcomer cannot evict a working
//!   cluster); when the incumbent goes or changes id, refused clusters are re-examined.
//! * Identities (ipcache entries and identity records) must carry the cluster bits of their
//!   cluster's id. No reserved identity (1-255) is accepted from any cluster's ipcache: host,
//!   world and remote-node are meanings this node assigns itself (node IPs get remote-node or
//!   host from the node records), never claims a cluster may publish.
//! * A remote ipcache prefix that overlaps (contains or is contained in) a local prefix (this
//!   node's IP and pod CIDRs, every prefix in the local cluster's ipcache, every local node's
//!   IP and pod CIDRs) is rejected. The same exact prefix from two remotes: the lower cluster id
//!   wins, the other is rejected (deterministic, whatever the arrival order).
//! * An ipcache entry whose `host_ip` is not an admitted node of its cluster is *pending*, not
//!   rejected: watchers deliver nodes and ipcache on independent streams, so an entry may come
//!   before its node. It is admitted the moment the node appears and withdrawn (pending again)
//!   when the node goes. Pending entries are counted in status.
//! * Node records must carry their cluster's id; a remote node whose IP is a local node's IP,
//!   or another remote's (lower id wins), is rejected.
//! * Every decision is a function of the current content of the view, never of the order of
//!   events: a rejected key is re-examined whenever something it depends on changes, and a
//!   later valid update of the same key replaces the rejection.
//!
//! ## Desired datapath
//!
//! * ipcache: every admitted endpoint prefix; entries on this node have no tunnel endpoint and
//!   the `local` flag; every other entry tunnels to its `host_ip`. Node IPs are entries too:
//!   this node's IP -> host (1, local), every other admitted node's IP -> remote-node (6), no
//!   tunnel (delivered by the underlay), unless an endpoint entry has the same prefix.
//! * nodes: every admitted node's IP -> its cluster id, except this node itself.
//! * policy: see [`policy`]. `policy_enabled` markers are per (subject identity, direction).
//!
//! IPv6 prefixes are kept in the view and the desired state; the IPv4-only datapath of today
//! skips them when mapping (the agent's job).

pub mod desired;
pub mod policy;
mod prefix;
pub mod reject;
pub mod view;

pub use desired::{
    diff, diff_ipcache, diff_nodes, diff_policy, DatapathOp, DesiredDatapath, Direction, IpProto,
    IpcacheTarget, PolicyKey, PolicyValue, Verdict,
};
pub use policy::{compile, CompiledPolicy, NetworkPolicy, PolicyError, PolicyErrors};
pub use reject::{ClusterRefusal, PendingEntry, RejectReason, RejectedKey, Rejection};
pub use view::{
    Applied, ClusterEvent, ClusterStatus, EventKind, KindCounts, LocalNode, MeshView, PolicyEvent,
    ResourceKind,
};
