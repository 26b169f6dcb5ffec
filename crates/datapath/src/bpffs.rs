//! The bpffs mount the datapath pins its maps and links under.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use crate::error::{DatapathError, Result};

/// `BPF_FS_MAGIC` from <linux/magic.h>.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The conventional bpffs mount point.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf";

/// True when `path` exists and lives on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `root` is a bpffs mount, mounting one there if it is not (the daemon's mount
/// namespace may lack it, e.g. under `ip netns exec`, which remounts /sys).
pub fn ensure_mounted(root: &Path) -> Result<()> {
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| DatapathError::Io {
        what: "creating bpffs mount point",
        path: root.to_owned(),
        source,
    })?;
    let target = CString::new(root.as_os_str().as_bytes()).map_err(|e| DatapathError::Invalid {
        what: "bpffs path",
        detail: e.to_string(),
    })?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is NULL.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::MountBpffs {
            path: root.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Creates `dir` (and parents) on bpffs, failing clearly if it would not be on bpffs.
pub fn create_pin_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
        what: "creating pin directory",
        path: dir.to_owned(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(DatapathError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(dir.to_owned())
}

/// A uniquely named pin directory under the bpffs root, removed (with every pin in it) on
/// drop: for tests and benchmarks, so parallel runs never share maps.
#[derive(Debug)]
pub struct ScratchPinDir {
    path: PathBuf,
}

impl ScratchPinDir {
    /// Creates `<root>/<prefix>-<pid>-<n>` (mounting bpffs at `root` if needed).
    pub fn new(root: &Path, prefix: &str) -> Result<ScratchPinDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        ensure_mounted(root)?;
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = root.join(format!("{prefix}-{}-{n}", std::process::id()));
            if path.exists() {
                continue;
            }
            create_pin_dir(&path)?;
            return Ok(ScratchPinDir { path });
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchPinDir {
    fn drop(&mut self) {
        // Unpinning a link detaches it unless some process still holds its fd.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
