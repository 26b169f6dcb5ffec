//! Running code inside a network namespace.
//!
//! Attaching tc programs and resolving interface names happen in the calling thread's network
//! namespace. `setns` changes only the calling thread, so the work runs on a fresh thread that
//! enters the namespace and exits afterwards; the caller's namespace is never changed. Only the
//! network namespace is entered (not the mount namespace, unlike `ip netns exec`), so bpffs
//! under /sys/fs/bpf stays visible.

use std::{fs::File, os::fd::AsRawFd, path::Path};

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
    let file = File::open(netns_path)
        .map_err(|source| DatapathError::Netns {
            path: netns_path.to_owned(),
            source,
        })
        .map_err(E::from)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: a valid namespace fd; CLONE_NEWNET affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(E::from(DatapathError::Netns {
                        path: netns_path.to_owned(),
                        source: std::io::Error::last_os_error(),
                    }));
                }
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Path of a named network namespace (as made by `ip netns add NAME`).
pub fn named_path(name: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(name)
}
