//! Named network namespaces, kept as `ip netns` keeps them (so both tools see the same ones):
//! the namespace bind-mounted at `/run/netns/NAME`, with `/run/netns` a shared mount.
//!
//! Commands run in a namespace with `nsenter --net=/run/netns/NAME`, not `ip netns exec`: the
//! latter remounts /sys, which hides /sys/fs/bpf (DESIGN.md, "Facts found").

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{NetlinkError, Result};

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

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths hold no NUL byte")
}

fn last_error(what: &'static str, path: &Path) -> NetlinkError {
    NetlinkError::Netns {
        what,
        path: path.to_owned(),
        source: std::io::Error::last_os_error(),
    }
}

/// Makes /run/netns a shared mount point (as iproute2 does), so a namespace mounted there is
/// seen in every mount namespace that shares it.
fn prepare_netns_dir() -> Result<()> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(|source| NetlinkError::Netns {
        what: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let c_dir = cstr(dir);
    let none = c"none";
    let mut bound = false;
    loop {
        // SAFETY: valid C strings; a propagation change takes no data.
        let rc = unsafe {
            libc::mount(
                c"".as_ptr(),
                c_dir.as_ptr(),
                none.as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) || bound {
            return Err(NetlinkError::Netns {
                what: "making a shared mount of",
                path: dir.to_owned(),
                source: err,
            });
        }
        // Not a mount point yet: bind it onto itself, then share it.
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::mount(
                c_dir.as_ptr(),
                c_dir.as_ptr(),
                none.as_ptr(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(last_error("bind-mounting", dir));
        }
        bound = true;
    }
}

/// Creates the named namespace with `lo` up; fails if it exists already (it belongs to someone
/// else).
pub fn create(name: &str) -> Result<()> {
    if exists(name) {
        return Err(NetlinkError::NetnsExists {
            name: name.to_owned(),
        });
    }
    prepare_netns_dir()?;
    let target = path(name);
    // The mount point only: an empty file nobody may open for its contents (as iproute2 makes
    // it). Root creating it may still write to the returned descriptor.
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&target)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => NetlinkError::NetnsExists {
                name: name.to_owned(),
            },
            _ => NetlinkError::Netns {
                what: "creating",
                path: target.clone(),
                source,
            },
        })?;
    // A fresh thread unshares into a new namespace and pins it by bind-mounting its own
    // namespace file; the thread then ends and the caller's namespace was never touched.
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                // SAFETY: unshare(2) of the network namespace affects only this thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(last_error("unsharing a network namespace for", &target));
                }
                let own = cstr(Path::new("/proc/thread-self/ns/net"));
                let c_target = cstr(&target);
                // SAFETY: valid C strings; a bind mount takes no data.
                let rc = unsafe {
                    libc::mount(
                        own.as_ptr(),
                        c_target.as_ptr(),
                        c"none".as_ptr(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                };
                if rc != 0 {
                    return Err(last_error("bind-mounting the namespace at", &target));
                }
                Ok(())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&target);
        return Err(e);
    }
    crate::with_netlink(Some(name), |nl| nl.set_up("lo"))
}

/// Deletes the named namespace (idempotent). Its links go with it once no process is left
/// inside (see [`kill_processes`]).
pub fn delete(name: &str) -> Result<()> {
    let target = path(name);
    if !target.exists() {
        return Ok(());
    }
    let c_target = cstr(&target);
    // SAFETY: valid C string. A lazy unmount, as `ip netns del` does.
    if unsafe { libc::umount2(c_target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = std::io::Error::last_os_error();
        // EINVAL: not mounted (a namespace whose creation failed half way); just unlink.
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(NetlinkError::Netns {
                what: "unmounting",
                path: target,
                source: err,
            });
        }
    }
    std::fs::remove_file(&target).map_err(|source| NetlinkError::Netns {
        what: "removing",
        path: target,
        source,
    })
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

/// SIGKILLs every process inside the named namespace (never the caller); returns how many.
pub fn kill_processes(name: &str) -> usize {
    let own = std::process::id();
    let mut killed = 0;
    for pid in pids(name).into_iter().filter(|p| *p != own) {
        // SAFETY: kill(2) on a pid read from /proc; one that exited meanwhile gets ESRCH.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
            killed += 1;
        }
    }
    killed
}

/// Runs `f` on a fresh thread inside the network namespace at `path` (None: the caller's) and
/// returns its result. `setns` changes only the calling thread, so the caller's namespace is
/// never changed; sockets `f` opens stay in that namespace and may be used from any thread
/// afterwards. Only the network namespace is entered (not the mount namespace, unlike `ip
/// netns exec`), so bpffs under /sys/fs/bpf stays visible.
pub fn run_in<T, F>(path: Option<&Path>, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(path) = path {
                    enter(path)?;
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(|source| NetlinkError::Netns {
        what: "opening",
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(last_error("entering", path));
    }
    Ok(())
}

/// An open namespace file, for moving a link into it (`IFLA_NET_NS_FD`).
pub(crate) fn open(name: &str) -> Result<File> {
    let p = path(name);
    File::open(&p).map_err(|source| NetlinkError::Netns {
        what: "opening",
        path: p,
        source,
    })
}
