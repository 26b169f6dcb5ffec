//! Network namespaces for tests: uniquely named per test, torn down on drop (also when the
//! test panics), with every process still inside killed first. Built with `meshd-topology`,
//! the builder the lab uses too; this module adds the unique names and test conveniences.
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
use ipnet::Ipv4Net;
use meshd_topology::{
    self as topology, FarHostSpec, HostSpec, OutsideSpec, Topology, UnderlaySpec,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix>-<pid>-<n>`: unique across parallel tests and test processes, and not taken by a
/// namespace left over by a crashed run of a process with the same pid.
pub fn unique_name(prefix: &str) -> String {
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        if !topology::netns::exists(&name) {
            return name;
        }
    }
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop unless a [`Topology`]
/// owns it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Creates a namespace named [`unique_name`]`(prefix)`, with `lo` up.
    pub fn new(prefix: &str) -> anyhow::Result<Netns> {
        let name = unique_name(prefix);
        topology::netns::create(&name)
            .with_context(|| format!("creating network namespace {name}"))?;
        Ok(Netns { name, owned: true })
    }

    /// A handle on a namespace someone else (a [`Topology`]) owns and removes.
    fn owned_by_topology(name: &str) -> Netns {
        Netns {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// The namespace's name, as `ip -n` takes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        topology::netns::path(&self.name)
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
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            topology::netns::kill_processes(&self.name);
            let _ = topology::netns::delete(&self.name);
        }
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

/// A shared L2 underlay: a namespace holding a bridge that every node's `ul0` veth plugs into,
/// built and owned by a [`Topology`] (the lab's builder), with unique names.
#[derive(Debug)]
pub struct Underlay {
    nodes: Vec<Netns>,
    bridge: Netns,
    /// Owns every namespace above; removes them on drop.
    topology: Topology,
}

/// Name of each node's underlay interface.
pub const UNDERLAY_IFNAME: &str = topology::UNDERLAY_IFNAME;

impl Underlay {
    /// Creates the bridge namespace. `mtu` is the underlay MTU of every node.
    pub fn new(prefix: &str, mtu: u32) -> anyhow::Result<Underlay> {
        Self::build(prefix, mtu, None)
    }

    /// Like [`Underlay::new`], with `address` on the bridge itself.
    pub fn with_bridge_address(
        prefix: &str,
        mtu: u32,
        address: Ipv4Net,
    ) -> anyhow::Result<Underlay> {
        Self::build(prefix, mtu, Some(address))
    }

    fn build(prefix: &str, mtu: u32, bridge_address: Option<Ipv4Net>) -> anyhow::Result<Underlay> {
        let name = unique_name(&format!("{prefix}-br"));
        let topology = Topology::create(UnderlaySpec {
            netns: name.clone(),
            bridge_address,
            mtu,
        })
        .with_context(|| format!("creating the underlay {name}"))?;
        Ok(Underlay {
            nodes: Vec::new(),
            bridge: Netns::owned_by_topology(&name),
            topology,
        })
    }

    /// Adds a node namespace with `ul0` = `ip/24` on the bridge; returns its index.
    pub fn add_node(&mut self, prefix: &str, ip: Ipv4Addr) -> anyhow::Result<usize> {
        let index = self.nodes.len();
        let name = unique_name(prefix);
        self.topology
            .add_host(&HostSpec {
                netns: name.clone(),
                bridge_port: format!("n{index}"),
                address: Ipv4Net::new(ip, 24)?,
            })
            .with_context(|| format!("adding node {name} to the underlay"))?;
        self.nodes.push(Netns::owned_by_topology(&name));
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
        self.topology.underlay().mtu
    }
}

/// Outside the mesh (DESIGN.md, "Test topology"): a router namespace with a leg on the
/// underlay and, behind it on its own link, an external host with an address from a
/// documentation range, built by the topology as the lab builds its own. Nodes reach it
/// through a route via [`External::router_ip`]; the router knows nothing of pod CIDRs unless
/// told ([`External::route_to`]).
#[derive(Debug)]
pub struct External {
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
        &mut self,
        prefix: &str,
        router_ip: Ipv4Addr,
        router_side_mtu: u32,
    ) -> anyhow::Result<External> {
        let [a, b, c] = EXTERNAL_NET;
        let host_ip = Ipv4Addr::new(a, b, c, 10);
        let spec = OutsideSpec {
            router_netns: unique_name(&format!("{prefix}-rt")),
            bridge_port: "rt".into(),
            router_address: Ipv4Net::new(router_ip, 24)?,
            host_netns: unique_name(&format!("{prefix}-ext")),
            net: Ipv4Net::new(Ipv4Addr::new(a, b, c, 0), 24)?,
            host_ip,
            router_side_mtu,
            routes: Vec::new(),
            strict_rp_filter: true,
        };
        self.topology
            .add_outside(&spec)
            .with_context(|| format!("adding the outside {}", spec.router_netns))?;
        Ok(External {
            host: Netns::owned_by_topology(&spec.host_netns),
            router: Netns::owned_by_topology(&spec.router_netns),
            router_ip,
            host_ip,
        })
    }
}

impl Underlay {
    /// Adds a node namespace behind `external`'s router, on a link of its own (`net`: the
    /// router is .1, the node .2, its uplink `ul0`; the router's side has `router_side_mtu`)
    /// instead of on the bridge: the router routes `pod_cidr` to it (a static route standing in
    /// for a routing protocol), and its default route is the router. Strict rp_filter on both
    /// ends. Returns its index among the nodes and its address.
    pub fn add_node_behind_router(
        &mut self,
        prefix: &str,
        external: &External,
        net: Ipv4Net,
        router_side_mtu: u32,
        pod_cidr: Ipv4Net,
    ) -> anyhow::Result<(usize, Ipv4Addr)> {
        let index = self.nodes.len();
        let name = unique_name(prefix);
        let at = |k: u32| -> anyhow::Result<Ipv4Net> {
            Ok(Ipv4Net::new(
                Ipv4Addr::from(u32::from(net.network()) + k),
                net.prefix_len(),
            )?)
        };
        let address = at(2)?;
        self.topology
            .add_host_behind_router(&FarHostSpec {
                router_netns: external.router.name().to_owned(),
                router_port: format!("far{index}"),
                netns: name.clone(),
                router_address: at(1)?,
                address,
                mtu: self.mtu(),
                router_side_mtu,
                routed: vec![pod_cidr],
                strict_rp_filter: true,
            })
            .with_context(|| format!("adding node {name} behind the router"))?;
        self.nodes.push(Netns::owned_by_topology(&name));
        Ok((index, address.addr()))
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
