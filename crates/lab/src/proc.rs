//! Processes of the lab: long-running daemons started detached (own process group, output to a
//! log file, optionally inside a network namespace), and short commands whose failure is an
//! error naming the command and what it printed.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Path of a named network namespace, for `nsenter --net=`.
///
/// `nsenter --net` rather than `ip netns exec`: the latter remounts /sys, which hides
/// /sys/fs/bpf from the agent (DESIGN.md).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A command that runs `program args` inside `netns` (or here when `None`).
pub fn command_in(netns: Option<&str>, program: &Path, args: &[String]) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", netns_path(ns).display()))
                .arg("--")
                .arg(program)
                .args(args);
            cmd
        }
        None => {
            let mut cmd = Command::new(program);
            cmd.args(args);
            cmd
        }
    }
}

/// Starts a daemon detached from the caller (own process group, so a Ctrl-C of `make lab`
/// does not reach it), stdout and stderr appended to `log`. Returns its pid.
pub fn spawn_daemon(
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
) -> anyhow::Result<u32> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let mut cmd = command_in(netns, program, args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} {}", program.display(), args.join(" ")))?;
    // The child is reaped by init once we exit; nobody waits for it here on purpose.
    Ok(child.id())
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(netns: Option<&str>, program: &Path, args: &[String]) -> anyhow::Result<String> {
    let out = command_in(netns, program, args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", program.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn terminate(pid: u32, grace: Duration) {
    if !is_alive(pid) {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status();
}

/// Waits until `ready` returns true, or fails after `timeout` naming `what`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn tcp_open(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
