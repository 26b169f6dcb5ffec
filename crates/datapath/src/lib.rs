//! meshd's eBPF datapath from user space: load and attach the programs of `meshd-ebpf` so
//! they survive the agent ([`Datapath`]), drive and read their pinned maps ([`DatapathMaps`]),
//! and the network plumbing around them ([`plumbing`], [`netns`]).
//!
//! A typical agent start on a node:
//! 1. [`bpffs::ensure_mounted`], then [`Datapath::load`] with the node's pin directory (maps
//!    are reused and pinned links get the new programs atomically);
//! 2. [`plumbing::create_vxlan`], [`DatapathMaps::set_config`], [`Datapath::attach_overlay`]
//!    (and [`DatapathMaps::set_tunnel_encap`] with from_netdev on the uplink for in-program
//!    encapsulation);
//! 3. per endpoint: [`plumbing::create_endpoint`], [`DatapathMaps::upsert_endpoint`],
//!    [`Datapath::attach_endpoint`];
//! 4. the reconciler keeps IPCACHE, NODES, POLICY, SERVICES and BACKENDS equal to the merged
//!    view, through the typed seam of [`seam`]: [`DatapathMaps::apply`] and
//!    [`DatapathMaps::apply_service`] take the view's operations, [`DatapathMaps::read_back`]
//!    returns the maps in the view's shape for the full diff.

pub mod bpffs;
pub mod error;
pub mod loader;
pub mod maps;
pub mod masquerade;
pub mod netns;
pub mod plumbing;
pub mod seam;
pub mod service_lb;
pub mod tunnel_encap;

pub use error::{DatapathError, Result};
pub use loader::{AttachPoint, Datapath, LoadOptions};
pub use maps::{
    Counter, DatapathEvents, DatapathMaps, Direction, EventLimit, FlowRecord, FlowVerdict,
    IpcacheTarget, LbBackend, LbFrontend, LocalEndpoint, NodeConfig, PolicyEntry, Verdict,
};
pub use masquerade::{EgressConfig, NatMapping};
pub use seam::ipv4_only;
pub use service_lb::ServiceLbMode;
pub use tunnel_encap::TunnelEncap;
