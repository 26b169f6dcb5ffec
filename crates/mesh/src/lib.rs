//! meshd's pure core: no I/O, no clocks, no async. The agent's watchers feed events in, the
//! reconciler takes datapath operations out; everything in between is plain data and plain
//! functions, unit-tested here.
//!
//! # Public API (what the agent consumes)
//!
//! ```text
//! MeshView::new(LocalNode { cluster, cluster_id, node_name, node_ip, pod_cidrs, non_masquerade, routing_mode })
//! view.apply(ClusterEvent { cluster, kind }) -> Applied       // one watcher event
//! view.apply_batch(events) -> Applied                          // a burst (initial list): faster, net report
//! view.apply_policy(PolicyEvent::Upsert(p) | Delete{..}) -> Result<bool /*changed*/, PolicyErrors>
//! view.update_policy(event) -> Result<Applied, PolicyErrors>   // the same, with its policy map ops
//! view.desired() -> DesiredDatapath                            // a copy of the maintained state (for full diffs)
//! view.desired_counts() -> DesiredCounts                       // sizes, O(1)
//! view.desired_from_scratch() -> DesiredDatapath               // tests only: the oracle (replay + compile + desired_services)
//! view.desired_ipcache() / desired_nodes() -> &BTreeMap        // borrowed, maintained incrementally
//! view.compile_policy() -> CompiledPolicy                      // policy part only
//! view.status() -> Vec<ClusterStatus>; view.cluster_status(&name)
//! view.rejections(&name) -> Vec<Rejection>; view.pending(&name) -> Vec<PendingEntry>
//! view.identities() -> &BTreeMap<NumericIdentity, Labels>       // admitted, all clusters
//! view.services() -> iterator of (&ClusterName, &ServiceRecord) // as published, admitted clusters
//! view.desired_services() -> DesiredServices                   // SERVICES/BACKENDS (see [`services`])
//! diff_services(&actual, &desired) -> Vec<ServiceOp>           // ordered, idempotent
//!
//! diff(&actual, &desired) -> Vec<DatapathOp>                   // ordered, idempotent
//! diff_ipcache / diff_nodes (into a Vec) ; diff_policy(&actual, &desired)
//! DesiredDatapath::apply_ops(&mut self, &[DatapathOp])          // what a map writer does, in memory
//!
//! NetworkPolicy::from_yaml(&str) / from_json(&str) -> Result<NetworkPolicy, PolicyErrors>  // meshd_state's, re-exported
//! NetworkPolicy::validate(&self) -> Result<(), PolicyErrors>
//! compile(policies, &identities, local_cluster_id) -> CompiledPolicy
//! ```
//!
//! How the agent drives the maps: incrementally, applying `Applied::ops` and
//! `Applied::service_ops` as they come (the exact diff of that event: about 1 us per ipcache or
//! node event at 100k entries; a service event looks at that service only; an identity event at
//! the policy rules its labels enter or leave, see [`policy::PolicyIndex`]); level-triggered,
//! `diff(&read_back, &view.desired())`, at start against the pinned maps (so wanted entries
//! are left untouched), after a failed write and on a slow safety-net timer.
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
//! [`Applied`] says what one call did: `ops` (ipcache, node and policy map operations, the
//! exact diff of the maintained desired maps before and after, in safe order), `service_ops`
//! (SERVICES/BACKENDS, likewise), `rejected` (each a [`Rejection`] naming cluster, etcd key
//! and reason: log it), `pending` (ipcache entries now waiting for their node), `refusals` (a
//! cluster refused, e.g. a conflicting cluster id, or the local cluster's published config
//! disagreeing with the node's), and `policy_inputs_changed` (admitted identities changed;
//! the policy followed, its operations are in `ops`). Only net changes are reported: within
//! a batch, an entry that waits for a node listed later is not reported as pending.
//!
//! A cluster is `ready` ([`ClusterStatus::ready`]) once its config is accepted (remote) and
//! `Synced` was seen for nodes, ipcache and identities.
//!
//! ## Rules of the merged view
//!
//! * A remote cluster's data is held back (pending) until its `ClusterConfig` arrives; a remote
//!   whose published name differs from the configured one, whose id equals the local id, or
//!   whose id is already used by another accepted remote is *refused*: nothing of it enters
//!   the desired state, identities included. The incumbent keeps its id (a newcomer cannot
//!   evict a working cluster); when the incumbent goes or changes id, refused clusters are
//!   re-examined in name order. This is the one decision that depends on history.
//! * Identities (ipcache entries and identity records) must carry the cluster bits of their
//!   cluster's id. No reserved identity (1-255) is accepted from any cluster's ipcache: host,
//!   world and remote-node are meanings this node assigns itself (node IPs get remote-node or
//!   host from the node records), never claims a cluster may publish. Identity records whose
//!   `meshd.io/cluster` label names another cluster are rejected; where the label is missing
//!   the view adds it.
//! * A remote ipcache prefix that overlaps (contains or is contained in) a local prefix (this
//!   node's IP and pod CIDRs, every prefix in the local cluster's ipcache, every local node's
//!   IP and pod CIDRs) is rejected. The same exact prefix from two remotes: the lower cluster id
//!   wins, the other is rejected (deterministic, whatever the arrival order).
//! * An ipcache entry whose `host_ip` is not an admitted node of its cluster is *pending*, not
//!   rejected: watchers deliver nodes and ipcache on independent streams, so an entry may come
//!   before its node. It is admitted the moment the node appears and withdrawn (pending again)
//!   when the node goes (lease expiry). Pending entries are counted in status and listed by
//!   [`MeshView::pending`].
//! * Node records must carry their cluster's name and id; a remote node whose IP is a local
//!   node's IP, or another remote's (lower id wins), is rejected.
//! * Apart from cluster-id incumbency, every decision is a function of the current content of
//!   the view, never of the order of events: a rejected key is re-examined whenever something
//!   it depends on changes, and a later valid update of the same key replaces the rejection.
//!   (Tests check after every event that the maintained state equals a recomputation from
//!   scratch.)
//!
//! ## Desired datapath
//!
//! * ipcache: every admitted endpoint prefix; entries on this node have no tunnel endpoint and
//!   the `local` flag; every other entry tunnels to its `host_ip`. Node IPs are entries too:
//!   this node's IP -> host (1, local), every other admitted node's IP -> remote-node (6), no
//!   tunnel (delivered by the underlay), unless an endpoint entry has the same prefix.
//! * nodes: every admitted node's IP -> its cluster id, except this node itself.
//! * policy: see [`policy`] for the semantics. `policy_enabled` markers are per (subject
//!   identity, direction); the host identity is always allowed for an enforced subject.
//!
//! IPv6 prefixes are kept in the view and the desired state; the IPv4-only datapath of today
//! skips them when mapping (`meshd_datapath::seam`).
//!
//! ## Cost (release build, this 2-core machine under load; `cargo test --release -p meshd-mesh
//! measure -- --ignored --nocapture`)
//!
//! 100k remote ipcache entries over 100 nodes: `apply_batch` about 110-130 ms (a plain
//! `BTreeMap` insert of the same records: about 30 ms in the same run), `desired()` (a copy, for
//! full diffs only) about 2 ms, `diff(empty, desired)` about 2 ms, `diff(x, x)` about 1 ms; one
//! more upsert on top, operations included: about 1 us (p99 about 2 us); the view holds about
//! 26 MB of heap. The agent applies each event's operations, so the per-event cost is the
//! upsert's, whatever the size of the mesh (BENCHMARKS.md, issue 11).
//!
//! ## Not covered yet
//!
//! Remote prefixes overlapping another *remote* cluster's pod CIDRs or node IPs are accepted
//! (only exact prefix collisions are resolved); overlapping pod CIDRs between clusters are a
//! later issue of the design.

pub mod desired;
pub mod policy;
mod prefix;
pub mod reject;
pub mod services;
pub mod view;

pub use desired::{
    diff, diff_ipcache, diff_nodes, diff_policy, DatapathOp, DesiredDatapath, Direction, IpProto,
    IpcacheTarget, PolicyKey, PolicyValue, Verdict,
};
pub use policy::{compile, CompiledPolicy, NetworkPolicy, PolicyError, PolicyErrors};
pub use reject::{ClusterRefusal, PendingEntry, RejectReason, RejectedKey, Rejection};
pub use services::{
    desired_services, diff_services, health_check, Backend, BackendSlot, ClusterService,
    DesiredServices, Exposure, Frontend, FrontendValue, HealthCheck, ServiceNode, ServiceOp,
};
pub use view::{
    Applied, ClusterEvent, ClusterStatus, DesiredCounts, EventKind, KindCounts, LocalNode,
    MeshView, PeerNode, PolicyEvent, ResourceKind,
};
