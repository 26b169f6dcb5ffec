//! Network namespaces for tests: uniquely named per test, torn down on drop (also when the
//! test panics), with every process still inside killed first.
//!
//! Commands run in a namespace with `nsenter --net=/run/netns/NAME`, not `ip netns exec`:
//! the latter remounts /sys, which hides /sys/fs/bpf (DESIGN.md, "Facts found").

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<prefix>-<pid>-<n>`, unique across parallel tests and test
    /// processes, with `lo` up.
    pub fn new(prefix: &str) -> anyhow::Result<Netns> {
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{}-{n}", std::process::id());
            if PathBuf::from("/run/netns").join(&name).exists() {
                continue; // left over by a crashed run of a process with the same pid
            }
            run(Command::new("ip").args(["netns", "add", &name]))
                .with_context(|| format!("creating network namespace {name}"))?;
            let ns = Netns { name };
            ns.ip(&["link", "set", "lo", "up"])?;
            return Ok(ns);
        }
    }

    /// The namespace's name, as `ip -n` takes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME args...`; fails with the command and its stderr on error.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A `Command` for `program args...` inside the namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs `program args...` inside the namespace, returning its output whatever its status.
    pub fn output(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program, args)
            .output()
            .with_context(|| format!("running {program} {args:?} in {}", self.name))
    }

    /// Runs `program args...` inside the namespace; fails unless it exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.command(program, args)).with_context(|| format!("in netns {}", self.name))
    }

    /// Starts `program args...` inside the namespace (stdout/stderr piped); killed on drop of
    /// the returned guard, and in any case when the namespace is dropped.
    pub fn spawn(&self, program: &str, args: &[&str]) -> anyhow::Result<ChildGuard> {
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {program} {args:?} in {}", self.name))?;
        Ok(ChildGuard(Some(child)))
    }

    fn kill_all(&self) {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return;
        };
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// The child, e.g. to read its output or wait for it.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until drop")
    }

    /// Waits for the child and returns its output (stdout, stderr, status).
    pub fn wait_output(mut self) -> anyhow::Result<Output> {
        let child = self.0.take().expect("child present until drop");
        child.wait_with_output().context("waiting for child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A shared L2 underlay: a namespace holding a bridge that every node's `ul0` veth plugs into.
/// Nodes are namespaces too, so nothing touches the root namespace (where Docker's FORWARD
/// policy would drop bridged traffic).
#[derive(Debug)]
pub struct Underlay {
    /// Nodes first, so they are deleted before the bridge.
    nodes: Vec<Netns>,
    bridge: Netns,
    mtu: u32,
}

/// Name of each node's underlay interface.
pub const UNDERLAY_IFNAME: &str = "ul0";

impl Underlay {
    /// Creates the bridge namespace. `mtu` is the underlay MTU of every node.
    pub fn new(prefix: &str, mtu: u32) -> anyhow::Result<Underlay> {
        let bridge = Netns::new(&format!("{prefix}-br"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        Ok(Underlay {
            nodes: Vec::new(),
            bridge,
            mtu,
        })
    }

    /// Adds a node namespace with `ul0` = `ip/24` on the bridge; returns its index.
    pub fn add_node(&mut self, prefix: &str, ip: Ipv4Addr) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let node = Netns::new(prefix)?;
        let port = format!("n{index}");
        let mtu = self.mtu.to_string();
        node.ip(&[
            "link",
            "add",
            UNDERLAY_IFNAME,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "mtu",
            &mtu,
            "netns",
            self.bridge.name(),
        ])?;
        self.bridge.ip(&["link", "set", &port, "master", "br0"])?;
        self.bridge.ip(&["link", "set", &port, "up"])?;
        node.ip(&["addr", "add", &format!("{ip}/24"), "dev", UNDERLAY_IFNAME])?;
        node.ip(&["link", "set", UNDERLAY_IFNAME, "up"])?;
        self.nodes.push(node);
        Ok(index)
    }

    /// The node namespace at `index`.
    pub fn node(&self, index: usize) -> &Netns {
        &self.nodes[index]
    }

    /// The bridge namespace.
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    /// The underlay MTU.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
