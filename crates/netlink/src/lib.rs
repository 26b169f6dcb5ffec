//! Linux networking through netlink (the `rtnetlink` crate) instead of `ip` subprocesses:
//! named network namespaces ([`netns`]) and, inside one, links, addresses, routes and
//! neighbours ([`Netlink`]).
//!
//! A netlink socket acts in the network namespace it was opened in. [`with_netlink`] opens it
//! on a dedicated thread that entered the namespace with `setns` (which changes only that
//! thread), drives it with a current-thread runtime there, and returns; the caller's thread
//! and namespace are never changed, and the caller may itself run inside a tokio runtime.
//! Every error names the operation, the link and the namespace.

pub mod error;
pub mod link;
pub mod netns;

pub use error::{NetlinkError, Result};
pub use link::{with_netlink, LinkInfo, Netlink, OwnedRoute, Route};
