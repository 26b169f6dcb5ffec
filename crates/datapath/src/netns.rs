//! Running code inside a network namespace.
//!
//! Attaching tc programs and resolving interface names happen in the calling thread's network
//! namespace. `setns` changes only the calling thread, so the work runs on a fresh thread that
//! enters the namespace and exits afterwards; the caller's namespace is never changed. Only the
//! network namespace is entered (not the mount namespace, unlike `ip netns exec`), so bpffs
//! under /sys/fs/bpf stays visible.

use std::path::Path;

use crate::error::{DatapathError, Result};

/// Runs `f` on a thread inside the network namespace at `netns_path` (e.g. /run/netns/NAME)
/// and returns its result. Sockets created by `f` stay in that namespace and may be used from
/// any thread afterwards.
pub fn run_in<T, E, F>(netns_path: &Path, f: F) -> Result<T, E>
where
    F: FnOnce() -> Result<T, E> + Send,
    T: Send,
    E: From<DatapathError> + Send,
{
    meshd_netlink::netns::run_in(Some(netns_path), f)
        .map_err(|e| E::from(DatapathError::from(e)))?
}

/// Path of a named network namespace (as made by `ip netns add NAME`).
pub fn named_path(name: &str) -> std::path::PathBuf {
    meshd_netlink::netns::path(name)
}
