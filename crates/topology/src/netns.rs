//! Named network namespaces, as `ip netns` keeps them: a bind mount of the namespace at
//! `/run/netns/NAME`.
//!
//! Commands run in a namespace with `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the
//! latter remounts /sys, which hides /sys/fs/bpf (DESIGN.md, "Facts found").

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, TopologyError};
use crate::ip::ip;

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

/// `/run/netns/NAME`, for `setns` or `nsenter --net=`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// True when the named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Creates the named namespace with `lo` up; fails if it exists already (it would belong to
/// someone else).
pub fn create(name: &str) -> Result<()> {
    if exists(name) {
        return Err(TopologyError::NetnsExists {
            name: name.to_owned(),
        });
    }
    ip(None, &["netns", "add", name])?;
    ip(Some(name), &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes the named namespace (idempotent). Its links go with it; processes still inside keep
/// it alive until they exit (see [`kill_processes`]).
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    ip(None, &["netns", "del", name]).map(|_| ())
}

/// Process ids of every process whose network namespace is the named one.
pub fn pids(name: &str) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(path(name)) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        })
        .collect()
}

/// SIGKILLs every process inside the named namespace (but never the caller); returns how many.
pub fn kill_processes(name: &str) -> usize {
    let own = std::process::id();
    let mut killed = 0;
    for pid in pids(name).into_iter().filter(|p| *p != own) {
        // SAFETY: kill(2) on a pid read from /proc; a pid that exited meanwhile gets ESRCH.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
            killed += 1;
        }
    }
    killed
}
