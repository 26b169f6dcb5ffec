//! Loading the eBPF objects and attaching their programs so that they outlive the loader.
//!
//! Layout of a node's pin directory (on bpffs):
//! ```text
//! <pin_dir>/maps/<MAP>                 every map, pinned by name, reused by the next load
//! <pin_dir>/links/endpoint-<ifname>    TCX link of from_endpoint on an endpoint's host veth
//! <pin_dir>/links/overlay-<ifname>     TCX link of from_overlay on the VXLAN device
//! <pin_dir>/links/netdev-<ifname>      TCX link of from_netdev on the node's uplink
//! ```
//! On this kernel aya attaches tc programs as TCX links, and a TCX link lives only as long as a
//! file descriptor or a bpffs pin refers to it, so every link is pinned. A later load (a new
//! agent process) finds the pinned links and swaps its freshly loaded programs into them with
//! `BPF_LINK_UPDATE`, which is atomic: no packet sees an interface without a program.

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use meshd_ebpf::programs;
use tracing::{info, warn};

use crate::{
    bpffs,
    error::{DatapathError, Result},
};

/// Which program a link runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// from_endpoint on the host side of an endpoint's veth.
    Endpoint,
    /// from_overlay on the node's VXLAN device.
    Overlay,
    /// from_netdev on the node's uplink (reverse masquerade, traffic from outside the mesh).
    Netdev,
}

impl AttachPoint {
    fn prefix(self) -> &'static str {
        match self {
            AttachPoint::Endpoint => "endpoint-",
            AttachPoint::Overlay => "overlay-",
            AttachPoint::Netdev => "netdev-",
        }
    }

    fn program(self) -> &'static str {
        match self {
            AttachPoint::Endpoint => programs::FROM_ENDPOINT,
            AttachPoint::Overlay => programs::FROM_OVERLAY,
            AttachPoint::Netdev => programs::FROM_NETDEV,
        }
    }

    fn from_pin_name(name: &str) -> Option<(AttachPoint, &str)> {
        [
            AttachPoint::Endpoint,
            AttachPoint::Overlay,
            AttachPoint::Netdev,
        ]
        .into_iter()
        .find_map(|p| name.strip_prefix(p.prefix()).map(|ifname| (p, ifname)))
    }
}

/// Options of [`Datapath::load_with`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Also load the `*_probe` test-run entry points (never attached; for BPF_PROG_RUN tests
    /// and benchmarks).
    pub probes: bool,
    /// Replace pinned maps whose layout differs from this build's (their contents are lost:
    /// the agent must write them again) instead of failing.
    pub replace_incompatible_maps: bool,
}

/// The shape every pinned map must have for this build's programs, from the Rust mirror of
/// the ABI header (whose sizes a test checks against the C layout).
struct MapShape {
    name: &'static str,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

/// The shape of a hash/array map with key `K` and value `V`.
fn shape<K, V>(name: &'static str, max_entries: u32) -> MapShape {
    MapShape {
        name,
        key_size: std::mem::size_of::<K>(),
        value_size: std::mem::size_of::<V>(),
        max_entries,
    }
}

fn expected_maps() -> [MapShape; 16] {
    use meshd_ebpf::{abi, maps as m};
    [
        shape::<abi::IpcacheKey, abi::IpcacheValue>(m::IPCACHE, abi::IPCACHE_MAX),
        shape::<abi::IpcacheHostKey, abi::IpcacheValue>(m::IPCACHE_HOSTS, abi::IPCACHE_HOSTS_MAX),
        shape::<abi::EndpointKey, abi::EndpointValue>(m::ENDPOINTS, abi::ENDPOINTS_MAX),
        shape::<abi::NodeKey, abi::NodeValue>(m::NODES, abi::NODES_MAX),
        shape::<abi::PolicyKey, abi::PolicyValue>(m::POLICY, abi::POLICY_MAX),
        shape::<abi::CtKey, abi::CtValue>(m::CT, abi::CT_MAX),
        shape::<abi::FragKey, abi::FragValue>(m::FRAGS, abi::FRAGS_MAX),
        shape::<u32, abi::MetricsValue>(m::METRICS, abi::METRICS_MAX),
        shape::<u32, abi::DatapathConfig>(m::CONFIG, 1),
        // A ring buffer has no key or value; its size is its max_entries.
        shape::<(), ()>(m::EVENTS, abi::EVENTS_BYTES),
        shape::<abi::ServiceKey, abi::ServiceValue>(m::SERVICES, abi::SERVICES_MAX),
        shape::<abi::BackendKey, abi::BackendValue>(m::BACKENDS, abi::BACKENDS_MAX),
        shape::<abi::NatKey, abi::NatValue>(m::NAT, abi::NAT_MAX),
        shape::<abi::NoMasqKey, abi::NoMasqValue>(m::NO_MASQ, abi::NO_MASQ_MAX),
        shape::<u32, abi::EventLimit>(m::EVENT_LIMIT, 1),
        shape::<u32, abi::EventBudget>(m::EVENT_BUDGET, 1),
    ]
}

/// aya reuses a map pinned under the same name without comparing its layout; a map left by
/// a build with another ABI would be misread. Checks (or replaces) every pinned map first.
fn check_pinned_maps(maps_dir: &Path, replace: bool) -> Result<()> {
    for shape in expected_maps() {
        let path = maps_dir.join(shape.name);
        if !path.exists() {
            continue;
        }
        let info =
            aya::maps::MapInfo::from_pin(&path).map_err(|source| DatapathError::OpenMap {
                map: shape.name,
                path: path.clone(),
                source: Box::new(source),
            })?;
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        let want = (shape.key_size, shape.value_size, shape.max_entries);
        if found == want {
            continue;
        }
        let detail = format!("pinned (key, value, entries) = {found:?}, this build needs {want:?}");
        if !replace {
            return Err(DatapathError::IncompatibleMap {
                map: shape.name,
                path,
                detail,
            });
        }
        warn!(map = shape.name, %detail, "replacing pinned map with an incompatible layout");
        std::fs::remove_file(&path).map_err(|source| DatapathError::Io {
            what: "removing incompatible pinned map",
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The loaded programs of one node. Dropping it leaves everything attached and pinned.
pub struct Datapath {
    pin_dir: PathBuf,
    from_endpoint: Ebpf,
    from_overlay: Ebpf,
    from_netdev: Ebpf,
    replaced_at_load: Vec<(AttachPoint, String)>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the datapath with its maps pinned (or reused) under `pin_dir/maps`, and swaps the
    /// new programs into every link pinned under `pin_dir/links` by an earlier load.
    pub fn load(pin_dir: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(pin_dir, LoadOptions::default())
    }

    /// [`Datapath::load`] with options.
    pub fn load_with(pin_dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let pin_dir = pin_dir.as_ref().to_owned();
        let maps_dir = bpffs::create_pin_dir(&pin_dir.join("maps"))?;
        bpffs::create_pin_dir(&pin_dir.join("links"))?;
        check_pinned_maps(&maps_dir, options.replace_incompatible_maps)?;

        let mut endpoint_programs = vec![programs::FROM_ENDPOINT];
        let mut overlay_programs = vec![programs::FROM_OVERLAY];
        if options.probes {
            endpoint_programs.push(programs::FROM_ENDPOINT_PROBE);
            overlay_programs.push(programs::FROM_OVERLAY_PROBE);
        }
        let from_endpoint = load_object(
            "from_endpoint",
            meshd_ebpf::FROM_ENDPOINT,
            &maps_dir,
            &endpoint_programs,
        )?;
        let from_overlay = load_object(
            "from_overlay",
            meshd_ebpf::FROM_OVERLAY,
            &maps_dir,
            &overlay_programs,
        )?;
        let from_netdev = load_object(
            "from_netdev",
            meshd_ebpf::FROM_NETDEV,
            &maps_dir,
            &[programs::FROM_NETDEV],
        )?;
        let mut datapath = Datapath {
            pin_dir,
            from_endpoint,
            from_overlay,
            from_netdev,
            replaced_at_load: Vec::new(),
        };
        datapath.replaced_at_load = datapath.replace_pinned_links()?;
        Ok(datapath)
    }

    /// The node's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Links pinned by an earlier load whose programs this load replaced.
    pub fn replaced_at_load(&self) -> &[(AttachPoint, String)] {
        &self.replaced_at_load
    }

    /// A loaded program by name (see [`meshd_ebpf::programs`]), e.g. for BPF_PROG_RUN.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier> {
        let ebpf = if name.starts_with("from_endpoint") {
            &self.from_endpoint
        } else if name.starts_with("from_netdev") {
            &self.from_netdev
        } else {
            &self.from_overlay
        };
        let program = ebpf.program(name).ok_or(DatapathError::MissingProgram {
            object: "datapath",
            program: name,
        })?;
        program
            .try_into()
            .map_err(|source: ProgramError| DatapathError::Program {
                program: name,
                source: Box::new(source),
            })
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        let ebpf = if name.starts_with("from_endpoint") {
            &mut self.from_endpoint
        } else if name.starts_with("from_netdev") {
            &mut self.from_netdev
        } else {
            &mut self.from_overlay
        };
        let program = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram {
                object: "datapath",
                program: name,
            })?;
        program
            .try_into()
            .map_err(|source: ProgramError| DatapathError::Program {
                program: name,
                source: Box::new(source),
            })
    }

    fn link_path(&self, point: AttachPoint, ifname: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{}{ifname}", point.prefix()))
    }

    /// Attaches from_endpoint to tc ingress of an endpoint's host-side veth `ifname` (resolved
    /// in the calling thread's network namespace, see [`crate::netns::run_in`]).
    pub fn attach_endpoint(&mut self, ifname: &str) -> Result<()> {
        self.attach(AttachPoint::Endpoint, ifname)
    }

    /// Attaches from_overlay to tc ingress of the VXLAN device `ifname`.
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<()> {
        self.attach(AttachPoint::Overlay, ifname)
    }

    /// Attaches from_netdev to tc ingress of the node's uplink `ifname`.
    pub fn attach_netdev(&mut self, ifname: &str) -> Result<()> {
        self.attach(AttachPoint::Netdev, ifname)
    }

    /// Detaches from_netdev from `ifname` (a no-op if it was not attached).
    pub fn detach_netdev(&mut self, ifname: &str) -> Result<()> {
        self.detach(AttachPoint::Netdev, ifname)
    }

    /// Detaches from_endpoint from `ifname` (a no-op if it was not attached).
    pub fn detach_endpoint(&mut self, ifname: &str) -> Result<()> {
        self.detach(AttachPoint::Endpoint, ifname)
    }

    /// Detaches from_overlay from `ifname` (a no-op if it was not attached).
    pub fn detach_overlay(&mut self, ifname: &str) -> Result<()> {
        self.detach(AttachPoint::Overlay, ifname)
    }

    /// Attaches (or, if a link is pinned for this interface, atomically replaces the program
    /// of) the program of `point` on `ifname`, and pins the link.
    pub fn attach(&mut self, point: AttachPoint, ifname: &str) -> Result<()> {
        if ifname.is_empty() || ifname.len() > 15 || ifname.contains('/') {
            return Err(DatapathError::Invalid {
                what: "interface name",
                detail: ifname.to_owned(),
            });
        }
        let path = self.link_path(point, ifname);
        if self.replace_pinned(point, &path)? {
            return Ok(());
        }
        let program_name = point.program();
        let program = self.program_mut(program_name)?;
        let attach_err = |source| DatapathError::Attach {
            program: program_name,
            ifname: ifname.to_owned(),
            source: Box::new(source),
        };
        let link_id = program
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(link_id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
            path: path.clone(),
            source: Box::new(source),
        })?;
        // The pin keeps the link (and so the attachment) alive after this process exits.
        fd_link
            .pin(&path)
            .map_err(|source| DatapathError::PinLink {
                path: path.clone(),
                source: Box::new(source),
            })?;
        info!(program = program_name, ifname, "attached");
        Ok(())
    }

    fn detach(&mut self, point: AttachPoint, ifname: &str) -> Result<()> {
        let path = self.link_path(point, ifname);
        match std::fs::remove_file(&path) {
            // With the pin gone and no fd held (this crate never keeps link fds), the kernel
            // releases the link, which detaches the program.
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Io {
                what: "removing pinned link",
                path,
                source,
            }),
        }
    }

    /// Swaps this datapath's program into the link pinned at `path`. Returns false when there
    /// is no usable pinned link (none, or its interface is gone: then the stale pin is removed).
    fn replace_pinned(&mut self, point: AttachPoint, path: &Path) -> Result<bool> {
        let pinned = match PinnedLink::from_pin(path) {
            Ok(pinned) => pinned,
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(false)
            }
            Err(source) => {
                return Err(DatapathError::Link {
                    path: path.to_owned(),
                    source: Box::new(source),
                })
            }
        };
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
            DatapathError::Link {
                path: path.to_owned(),
                source: Box::new(source),
            }
        })?;
        let program_name = point.program();
        let program = self.program_mut(program_name)?;
        match program.attach_to_link(link) {
            Ok(link_id) => {
                // Close our fd right away: the pin alone keeps the link, so removing the pin
                // later detaches the program.
                if let Ok(link) = program.take_link(link_id) {
                    drop(FdLink::try_from(link));
                }
                Ok(true)
            }
            Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOLINK) =>
            {
                warn!(path = %path.display(), "pinned link's interface is gone; removing the pin");
                std::fs::remove_file(path).map_err(|source| DatapathError::Io {
                    what: "removing stale pinned link",
                    path: path.to_owned(),
                    source,
                })?;
                Ok(false)
            }
            Err(source) => Err(DatapathError::ReplaceLink {
                program: program_name,
                path: path.to_owned(),
                source: Box::new(source),
            }),
        }
    }

    /// Swaps the programs of every link pinned by an earlier load. Returns the interfaces
    /// whose programs were replaced.
    pub fn replace_pinned_links(&mut self) -> Result<Vec<(AttachPoint, String)>> {
        let links_dir = self.pin_dir.join("links");
        let entries = std::fs::read_dir(&links_dir).map_err(|source| DatapathError::Io {
            what: "listing pinned links",
            path: links_dir.clone(),
            source,
        })?;
        let mut replaced = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| DatapathError::Io {
                what: "listing pinned links",
                path: links_dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((point, ifname)) = AttachPoint::from_pin_name(&name) else {
                warn!(name, "ignoring unknown pin in links directory");
                continue;
            };
            if self.replace_pinned(point, &entry.path())? {
                replaced.push((point, ifname.to_owned()));
            }
        }
        if !replaced.is_empty() {
            info!(count = replaced.len(), "replaced programs of pinned links");
        }
        Ok(replaced)
    }
}

/// Interfaces with a link pinned under `pin_dir`, by attach point (without loading anything).
pub fn pinned_links(pin_dir: &Path) -> Result<Vec<(AttachPoint, String)>> {
    let links_dir = pin_dir.join("links");
    let entries = std::fs::read_dir(&links_dir).map_err(|source| DatapathError::Io {
        what: "listing pinned links",
        path: links_dir.clone(),
        source,
    })?;
    let mut links: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            AttachPoint::from_pin_name(&name).map(|(p, i)| (p, i.to_owned()))
        })
        .collect();
    links.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(links)
}

fn load_object(
    object: &'static str,
    bytes: &[u8],
    maps_dir: &Path,
    program_names: &[&'static str],
) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .load(bytes)
        .map_err(|source| DatapathError::LoadObject {
            object,
            pin_dir: maps_dir.to_owned(),
            source: Box::new(source),
        })?;
    for &name in program_names {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram {
                object,
                program: name,
            })?
            .try_into()
            .map_err(|source: ProgramError| DatapathError::Program {
                program: name,
                source: Box::new(source),
            })?;
        program.load().map_err(|source| DatapathError::Program {
            program: name,
            source: Box::new(source),
        })?;
    }
    Ok(ebpf)
}
