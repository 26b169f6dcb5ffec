//! Test harness: real etcd processes and (with the datapath) network namespaces.
//!
//! Everything here is unique per call (ports, directories, names), so tests run in parallel,
//! and is torn down on drop, also when a test panics.

pub mod etcd;
pub mod etcd_cluster;
pub mod legacy_certs;
pub mod netns;
pub mod trials;

/// Checks a prerequisite of a test (root, a binary, bpffs, ...).
///
/// Returns `true` when the test can run. When it cannot: under `CI=true` this panics, because
/// CI must never pass by skipping; elsewhere it prints why and returns `false` so the test can
/// return early.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: prerequisite missing: {what}");
    false
}

/// etcd and etcdctl on PATH: every test against a real etcd server.
pub fn require_etcd() -> bool {
    require(
        "etcd and etcdctl on PATH (apt install etcd-server etcd-client)",
        have_binary("etcd") && have_binary("etcdctl"),
    )
}

/// Root: network namespaces, eBPF programs and bpffs pins.
pub fn require_root() -> bool {
    require("root (namespaces, eBPF, bpffs)", is_root())
}

/// A bpffs mounted at /sys/fs/bpf, where the datapath pins its maps.
pub fn require_bpffs() -> bool {
    require(
        "bpffs at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)",
        is_mounted("/sys/fs/bpf", "bpf"),
    )
}

/// Workspace binaries (`meshd`, `clustermesh-apiserver`) built next to the test executable,
/// which end-to-end tests run the way a user does.
pub fn require_workspace_bins(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| !workspace_bin(name).is_file())
        .collect();
    require(
        &format!(
            "{} built next to the tests (cargo build --workspace --bins, or make test)",
            missing.join(" and ")
        ),
        missing.is_empty(),
    )
}

/// Where cargo puts the workspace binary `name` of the profile this test was built with: the
/// test runs as target/<profile>/deps/<test>-<hash>, the binaries sit in target/<profile>.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    exe.parent()
        .and_then(std::path::Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .join(name)
}

/// True when /proc/self/mounts lists a filesystem of type `fstype` mounted at `mount_point`.
fn is_mounted(mount_point: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(mount_point) && fields.next() == Some(fstype)
        })
    })
}

/// True when running as root (needed for namespaces, eBPF and bpffs).
pub fn is_root() -> bool {
    // Read from /proc rather than calling geteuid(): no libc dependency for one number.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// True when `name` is an executable on PATH.
pub fn have_binary(name: &str) -> bool {
    which(name).is_some()
}

/// Full path of `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tag of this run's names, from `MESHD_E2E_PREFIX` (1-8 lowercase letters or digits), or
/// `None` when unset: the people sharing a machine each set their own (e.g. `s11f`), so what a
/// run creates (network namespaces, bpffs and etcd directories) carries it, cannot be taken for
/// another's, and can be cleaned up by its owner alone. Names also carry the pid.
pub fn run_tag() -> anyhow::Result<Option<String>> {
    let Ok(tag) = std::env::var("MESHD_E2E_PREFIX") else {
        return Ok(None);
    };
    anyhow::ensure!(
        !tag.is_empty()
            && tag.len() <= 8
            && tag
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "MESHD_E2E_PREFIX={tag:?}: want 1-8 lowercase letters or digits"
    );
    Ok(Some(tag))
}

/// A loopback TCP port that was free a moment ago. The OS hands out ephemeral ports in a
/// rotating order, so a port just released is unlikely to be handed to another test at once;
/// callers that bind it later must still retry on "address in use".
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// `promtool check metrics` (format and Prometheus' naming lints) on an exposition `text`;
/// `Ok(false)` when promtool is not installed (`scripts/install-deps.sh` installs it).
pub fn promtool_check(text: &str) -> anyhow::Result<bool> {
    use anyhow::Context;
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return Ok(false);
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(true)
}
