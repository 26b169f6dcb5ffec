//! The one-machine topology of DESIGN.md ("Test topology on one machine"), built once for the
//! lab (`meshd lab up`), the end-to-end tests and the datapath tests:
//!
//! - [`Topology`]: one owner that builds network namespaces on an underlay bridge from a typed
//!   description ([`UnderlaySpec`], [`HostSpec`], [`RootLinkSpec`]) and tears down what it
//!   built, in reverse order;
//! - [`outside`]: a router on the underlay, an external host behind it ([`OutsideSpec`]) and
//!   hosts (nodes) behind it on links of their own ([`FarHostSpec`]);
//! - [`netns`]: named network namespaces (`/run/netns/NAME`);
//! - [`etcd`]: the command line of one etcd member, which the lab starts as a daemon and the
//!   test harness as a child it owns.
//!
//! Namespaces, links, addresses and routes go through netlink (`meshd-netlink`), as the
//! agent's own plumbing does.
//!
//! Nothing here is test-only: the lab is a user-facing command. Test conveniences (unique
//! names, processes killed with the test) live in `meshd-testing`, on top of this crate.

pub mod error;
pub mod etcd;
pub mod netns;
pub mod outside;
pub mod underlay;

pub use error::{Result, TopologyError};
pub use outside::{FarHostSpec, OutsideSpec};
pub use underlay::{
    HostSpec, RootLinkSpec, Topology, UnderlaySpec, BRIDGE_IFNAME, UNDERLAY_IFNAME,
};
