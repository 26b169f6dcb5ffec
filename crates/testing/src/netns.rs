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

/// Outside the mesh (DESIGN.md, "Test topology"): a router namespace with a leg on the
/// underlay and, behind it on its own link, an external host with an address from a
/// documentation range. Nodes reach it through a route via [`External::router_ip`]; the
/// router knows nothing of pod CIDRs unless told ([`External::route_to`]).
#[derive(Debug)]
pub struct External {
    /// Deleted before the router.
    pub host: Netns,
    pub router: Netns,
    /// The router's address on the underlay.
    pub router_ip: Ipv4Addr,
    /// The external host's address.
    pub host_ip: Ipv4Addr,
}

/// The external link: the router is .1, the host .10 (TEST-NET-3).
pub const EXTERNAL_NET: [u8; 3] = [203, 0, 113];

impl Underlay {
    /// Adds a router at `router_ip` (on the underlay's /24) and an external host behind it.
    /// `router_side_mtu` is the MTU of the router's interface towards the host (the host keeps
    /// the underlay's MTU), so a smaller one makes the router send "fragmentation needed" for
    /// big DF packets going out. Both the router and the host run strict reverse-path
    /// filtering (rp_filter = 1), as a careful network would.
    pub fn add_external(
        &self,
        prefix: &str,
        router_ip: Ipv4Addr,
        router_side_mtu: u32,
    ) -> anyhow::Result<External> {
        let router = Netns::new(&format!("{prefix}-rt"))?;
        let host = Netns::new(&format!("{prefix}-ext"))?;
        let mtu = self.mtu.to_string();
        let ext_mtu = router_side_mtu.to_string();
        router.ip(&[
            "link",
            "add",
            "rt0",
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "rtp0",
            "mtu",
            &mtu,
            "netns",
            self.bridge.name(),
        ])?;
        self.bridge.ip(&["link", "set", "rtp0", "master", "br0"])?;
        self.bridge.ip(&["link", "set", "rtp0", "up"])?;
        router.ip(&["addr", "add", &format!("{router_ip}/24"), "dev", "rt0"])?;
        router.ip(&["link", "set", "rt0", "up"])?;
        router.ip(&[
            "link",
            "add",
            "ext0",
            "mtu",
            &ext_mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &mtu,
            "netns",
            host.name(),
        ])?;
        let [a, b, c] = EXTERNAL_NET;
        let router_ext = Ipv4Addr::new(a, b, c, 1);
        let host_ip = Ipv4Addr::new(a, b, c, 10);
        router.ip(&["addr", "add", &format!("{router_ext}/24"), "dev", "ext0"])?;
        router.ip(&["link", "set", "ext0", "up"])?;
        host.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        host.ip(&["route", "add", "default", "via", &router_ext.to_string()])?;
        for (ns, keys) in [
            (
                &router,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=1",
                    "net.ipv4.conf.rt0.rp_filter=1",
                    "net.ipv4.conf.ext0.rp_filter=1",
                ][..],
            ),
            (
                &host,
                &[
                    "net.ipv4.conf.all.rp_filter=1",
                    "net.ipv4.conf.eth0.rp_filter=1",
                ][..],
            ),
        ] {
            for key in keys {
                ns.run("sysctl", &["-qw", key])?;
            }
        }
        Ok(External {
            host,
            router,
            router_ip,
            host_ip,
        })
    }
}

impl External {
    /// Makes the router route `prefix` via `next_hop` (a node), as a network that carries
    /// pod addresses unmasqueraded does.
    pub fn route_to(&self, prefix: &str, next_hop: Ipv4Addr) -> anyhow::Result<()> {
        self.router
            .ip(&["route", "replace", prefix, "via", &next_hop.to_string()])?;
        Ok(())
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
