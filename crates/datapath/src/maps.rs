//! Typed access to the pinned maps of a node's datapath.
//!
//! [`DatapathMaps`] opens the maps from their pins, so any process (the agent's reconciler, a
//! `meshd monitor`, a test) can drive or read them without loading programs.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf,
};
use ipnet::Ipv4Net;
use meshd_ebpf::{abi, maps as names};

use crate::error::{DatapathError, Result};

/// Where an ipcache prefix lives: the view's type (one name for the concept).
pub use meshd_mesh::IpcacheTarget;

/// An endpoint on this node, as the datapath delivers to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// ifindex of the host side of its veth (in the node's namespace).
    pub ifindex: u32,
    pub identity: u32,
    /// The endpoint's own MAC.
    pub mac: [u8; 6],
    /// MAC of the host side of its veth, the endpoint's gateway.
    pub node_mac: [u8; 6],
}

/// Policy (and counter) direction: the view's own type, one name for the concept.
pub use meshd_mesh::{Direction, Verdict};

fn direction_raw(d: Direction) -> u8 {
    match d {
        Direction::Ingress => abi::DIR_INGRESS,
        Direction::Egress => abi::DIR_EGRESS,
    }
}

fn direction_from_raw(raw: u8) -> Direction {
    if raw == abi::DIR_EGRESS {
        Direction::Egress
    } else {
        Direction::Ingress
    }
}

/// One policy key: which traffic of `subject` towards/from `peer` it is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub subject: u32,
    /// `None` = any peer.
    pub peer: Option<u32>,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP); `None` = any protocol.
    pub proto: Option<u8>,
    /// Destination port (TCP/UDP only); `None` = any port.
    pub dport: Option<u16>,
    pub direction: Direction,
}

impl PolicyEntry {
    fn key(&self) -> Result<abi::PolicyKey> {
        if self.dport.is_some() && self.proto.is_none() {
            return Err(DatapathError::Invalid {
                what: "policy entry",
                detail: format!("{self:?}: a port needs a protocol"),
            });
        }
        Ok(abi::PolicyKey {
            subject_identity: self.subject,
            peer_identity: self.peer.unwrap_or(0),
            dport: self.dport.unwrap_or(0),
            proto: self.proto.unwrap_or(0),
            direction: direction_raw(self.direction),
        })
    }
}

/// A counter of METRICS summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    pub direction: Direction,
    /// `abi::FWD_*` (>0) or `abi::DROP_*` (<0).
    pub reason: i32,
    pub packets: u64,
    pub bytes: u64,
}

/// What an EVENTS record reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVerdict {
    /// The first packet of a new connection went through; `reason` is the `abi::FWD_*` of how.
    Forwarded,
    /// A packet was dropped; `reason` is the `abi::DROP_*`.
    Dropped,
}

/// A new connection or a dropped packet, as reported by the EVENTS ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub verdict: FlowVerdict,
    pub timestamp_ns: u64,
    pub reason: i32,
    pub direction: Direction,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// After service translation: the backend, not the frontend.
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ifindex: u32,
    /// The service frontend the packet was sent to, if it was load-balanced.
    pub service: Option<SocketAddrV4>,
}

impl FlowRecord {
    /// Whether it reports a drop (what `meshd monitor` shows).
    pub fn is_drop(&self) -> bool {
        self.verdict == FlowVerdict::Dropped
    }
}

/// How many events the datapath may send (EVENT_LIMIT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimit {
    /// Events per second per CPU; 0 = unlimited.
    pub rate_per_cpu: u32,
    /// Whether new connections are reported (drops always are, within the rate).
    pub flows: bool,
}

/// A service frontend as SERVICES and BACKENDS key it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbFrontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// IP protocol number: 6 TCP or 17 UDP.
    pub proto: u8,
}

impl LbFrontend {
    fn key(&self) -> Result<abi::ServiceKey> {
        if self.proto != 6 && self.proto != 17 {
            return Err(DatapathError::Invalid {
                what: "service frontend",
                detail: format!("{self:?}: only TCP (6) and UDP (17) are balanced"),
            });
        }
        Ok(abi::ServiceKey {
            addr: abi::ip_to_be(self.addr),
            port: self.port.to_be(),
            proto: self.proto,
            pad: 0,
        })
    }

    fn from_key(k: &abi::ServiceKey) -> LbFrontend {
        LbFrontend {
            addr: abi::ip_from_be(k.addr),
            port: u16::from_be(k.port),
            proto: k.proto,
        }
    }
}

impl std::fmt::Display for LbFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Where a frontend's slot sends new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub cluster_id: u8,
}

/// Node-wide settings the programs read from CONFIG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// ifindex of the VXLAN device (external mode) in the node's namespace.
    pub vxlan_ifindex: u32,
    pub node_ip: Ipv4Addr,
    pub cluster_id: u8,
}

/// The pinned maps of one node's datapath.
pub struct DatapathMaps {
    pin_dir: PathBuf,
    ipcache: LpmTrie<MapData, u32, abi::IpcacheValue>,
    ipcache_hosts: HashMap<MapData, abi::IpcacheHostKey, abi::IpcacheValue>,
    endpoints: HashMap<MapData, abi::EndpointKey, abi::EndpointValue>,
    nodes: HashMap<MapData, abi::NodeKey, abi::NodeValue>,
    policy: HashMap<MapData, abi::PolicyKey, abi::PolicyValue>,
    ct: HashMap<MapData, abi::CtKey, abi::CtValue>,
    metrics: PerCpuArray<MapData, abi::MetricsValue>,
    pub(crate) config: Array<MapData, abi::DatapathConfig>,
    events: RingBuf<MapData>,
    event_limit: Array<MapData, abi::EventLimit>,
    event_budget: PerCpuArray<MapData, abi::EventBudget>,
    services: HashMap<MapData, abi::ServiceKey, abi::ServiceValue>,
    backends: HashMap<MapData, abi::BackendKey, abi::BackendValue>,
    pub(crate) nat: HashMap<MapData, abi::NatKey, abi::NatValue>,
    pub(crate) no_masq: LpmTrie<MapData, u32, abi::NoMasqValue>,
    /// Inside [`DatapathMaps::defer_forward_revision`]: whether a write has to be followed by
    /// a forward revision bump at [`DatapathMaps::flush_forward_revision`].
    forward_deferred: bool,
    forward_pending: bool,
    /// Set by [`DatapathMaps::own_config`]: CONFIG's value as this instance last wrote or read
    /// it, used instead of reading it back before each read-modify-write.
    owned_config: Option<Option<abi::DatapathConfig>>,
}

impl std::fmt::Debug for DatapathMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatapathMaps")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn open(pin_dir: &Path, name: &'static str) -> Result<Map> {
    let path = pin_dir.join("maps").join(name);
    let err = |source| DatapathError::OpenMap {
        map: name,
        path: path.clone(),
        source: Box::new(source),
    };
    Map::from_map_data(MapData::from_pin(&path).map_err(err)?).map_err(err)
}

fn typed<T>(pin_dir: &Path, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    // TryFrom checks the pinned map's type and key/value sizes against the Rust mirror.
    T::try_from(open(pin_dir, name)?).map_err(|source| DatapathError::OpenMap {
        map: name,
        path: pin_dir.join("maps").join(name),
        source: Box::new(source),
    })
}

pub(crate) fn op_err(
    op: &'static str,
    map: &'static str,
    key: impl std::fmt::Display,
) -> impl FnOnce(MapError) -> DatapathError {
    let key = key.to_string();
    move |source| DatapathError::MapOp {
        op,
        map,
        key,
        source: Box::new(source),
    }
}

/// Removing a key that is not there is success: every delete is idempotent.
pub(crate) fn ignore_missing(
    r: std::result::Result<(), MapError>,
) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl DatapathMaps {
    /// Opens the maps pinned under `pin_dir/maps` by [`crate::Datapath::load`].
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self> {
        let pin_dir = pin_dir.as_ref();
        Ok(DatapathMaps {
            pin_dir: pin_dir.to_owned(),
            ipcache: typed(pin_dir, names::IPCACHE)?,
            ipcache_hosts: typed(pin_dir, names::IPCACHE_HOSTS)?,
            endpoints: typed(pin_dir, names::ENDPOINTS)?,
            nodes: typed(pin_dir, names::NODES)?,
            policy: typed(pin_dir, names::POLICY)?,
            ct: typed(pin_dir, names::CT)?,
            metrics: typed(pin_dir, names::METRICS)?,
            config: typed(pin_dir, names::CONFIG)?,
            events: typed(pin_dir, names::EVENTS)?,
            event_limit: typed(pin_dir, names::EVENT_LIMIT)?,
            event_budget: typed(pin_dir, names::EVENT_BUDGET)?,
            services: typed(pin_dir, names::SERVICES)?,
            backends: typed(pin_dir, names::BACKENDS)?,
            nat: typed(pin_dir, names::NAT)?,
            no_masq: typed(pin_dir, names::NO_MASQ)?,
            forward_deferred: false,
            forward_pending: false,
            owned_config: None,
        })
    }

    /// CONFIG's one value, for a read-modify-write: the agent's single map owner is its only
    /// writer, so the two calls do not race.
    pub(crate) fn config_value(&self) -> Result<abi::DatapathConfig> {
        if let Some(Some(value)) = self.owned_config {
            return Ok(value);
        }
        self.config
            .get(&0, 0)
            .map_err(op_err("get", names::CONFIG, 0))
    }

    pub(crate) fn write_config(&mut self, value: abi::DatapathConfig) -> Result<()> {
        self.config
            .set(0, value, 0)
            .map_err(op_err("set", names::CONFIG, 0))?;
        if let Some(owned) = &mut self.owned_config {
            *owned = Some(value);
        }
        Ok(())
    }

    /// Declares this instance CONFIG's only writer from now on (the agent's map owner, once
    /// the start-up settings are written): its read-modify-writes (the forward revision bump
    /// after each round of ipcache writes) then use the value it last wrote or read instead of
    /// reading CONFIG back first, one syscall less per round. Nothing else may write CONFIG
    /// afterwards, or its change would be overwritten.
    pub fn own_config(&mut self) {
        self.owned_config = Some(None);
    }

    /// Writes the node-wide settings (keeping the policy revision and the egress settings of
    /// [`DatapathMaps::set_egress`], bumping the forward revision: cached forwarding answers
    /// may depend on the node IP).
    pub fn set_config(&mut self, config: NodeConfig) -> Result<()> {
        let current = self.config_value()?;
        let value = abi::DatapathConfig {
            vxlan_ifindex: config.vxlan_ifindex,
            node_ip: abi::ip_to_be(config.node_ip),
            cluster_id: u32::from(config.cluster_id),
            flags: current.flags,
            policy_revision: current.policy_revision,
            forward_revision: current.forward_revision.wrapping_add(1),
            nat_port_min: current.nat_port_min,
            nat_port_max: current.nat_port_max,
            tunnel_port: current.tunnel_port,
            pad: 0,
        };
        self.write_config(value)
    }

    /// Makes the programs re-check established connections against POLICY. Every policy
    /// operation of this type calls it after writing; the agent's single map owner is the only
    /// writer, so the read-modify-write does not race.
    pub fn bump_policy_revision(&mut self) -> Result<u32> {
        let mut value = self.config_value()?;
        value.policy_revision = value.policy_revision.wrapping_add(1);
        self.write_config(value)?;
        Ok(value.policy_revision)
    }

    /// Makes from_endpoint forget the forwarding answers cached in CT entries (see
    /// `lib/fwd_cache.h`). Every ENDPOINTS and IPCACHE operation of this type calls it after
    /// writing, or once at [`DatapathMaps::flush_forward_revision`] inside a deferred batch.
    pub fn bump_forward_revision(&mut self) -> Result<u32> {
        let mut value = self.config_value()?;
        value.forward_revision = value.forward_revision.wrapping_add(1);
        self.write_config(value)?;
        Ok(value.forward_revision)
    }

    /// The current forward revision.
    pub fn forward_revision(&self) -> Result<u32> {
        Ok(self
            .config
            .get(&0, 0)
            .map_err(op_err("get", names::CONFIG, 0))?
            .forward_revision)
    }

    /// Starts a batch of ENDPOINTS and IPCACHE writes that bumps the forward revision once,
    /// at [`DatapathMaps::flush_forward_revision`], instead of after every write (two CONFIG
    /// syscalls per write would slow an initial sync of 100k ipcache entries by about a
    /// third). Until the flush, packets of established connections may still follow answers
    /// the batch already changed, as if they had come before it.
    pub fn defer_forward_revision(&mut self) {
        self.forward_deferred = true;
    }

    /// Ends a batch started by [`DatapathMaps::defer_forward_revision`]: bumps the forward
    /// revision if the batch wrote anything.
    pub fn flush_forward_revision(&mut self) -> Result<()> {
        self.forward_deferred = false;
        if self.forward_pending {
            self.bump_forward_revision()?;
            self.forward_pending = false;
        }
        Ok(())
    }

    fn forward_changed(&mut self) -> Result<()> {
        if self.forward_deferred {
            self.forward_pending = true;
            return Ok(());
        }
        self.bump_forward_revision().map(|_| ())
    }

    /// The current policy revision.
    pub fn policy_revision(&self) -> Result<u32> {
        Ok(self
            .config
            .get(&0, 0)
            .map_err(op_err("get", names::CONFIG, 0))?
            .policy_revision)
    }

    /// Inserts or replaces the ipcache entry of `prefix`. /32 prefixes go to IPCACHE_HOSTS
    /// (a hash, looked up first), all others to the IPCACHE trie.
    /// The datapath is IPv4 only: an IPv6 tunnel endpoint is refused.
    pub fn upsert_ipcache(&mut self, prefix: Ipv4Net, target: IpcacheTarget) -> Result<()> {
        let identity = target.identity.get();
        // A local-scope identity (a prefix policies name) is never tunneled, so never put in
        // a VNI; every other identity may be.
        let untunneled_local = target.identity.is_local_scope() && target.tunnel_endpoint.is_none();
        if identity > abi::IDENTITY_MAX && !untunneled_local {
            return Err(DatapathError::Invalid {
                what: "identity",
                detail: format!("{identity} for {prefix} does not fit a 24-bit VNI"),
            });
        }
        let tunnel_endpoint = match target.tunnel_endpoint {
            None => 0,
            Some(IpAddr::V4(ip)) => abi::ip_to_be(ip),
            Some(IpAddr::V6(ip)) => {
                return Err(DatapathError::Invalid {
                    what: "tunnel endpoint",
                    detail: format!("{ip} for {prefix}: the datapath tunnels over IPv4 only"),
                })
            }
        };
        let value = abi::IpcacheValue {
            identity,
            tunnel_endpoint,
            flags: if target.local {
                abi::IPCACHE_F_LOCAL
            } else {
                0
            },
        };
        match host_key(prefix) {
            Some(key) => self.ipcache_hosts.insert(key, value, 0).map_err(op_err(
                "insert",
                names::IPCACHE_HOSTS,
                prefix,
            )),
            None => self
                .ipcache
                .insert(&ipcache_key(prefix), value, 0)
                .map_err(op_err("insert", names::IPCACHE, prefix)),
        }?;
        self.forward_changed()
    }

    /// Removes the ipcache entry of `prefix` (exact prefix, not longest match).
    pub fn delete_ipcache(&mut self, prefix: Ipv4Net) -> Result<()> {
        match host_key(prefix) {
            Some(key) => ignore_missing(self.ipcache_hosts.remove(&key)).map_err(op_err(
                "remove",
                names::IPCACHE_HOSTS,
                prefix,
            )),
            None => ignore_missing(self.ipcache.remove(&ipcache_key(prefix))).map_err(op_err(
                "remove",
                names::IPCACHE,
                prefix,
            )),
        }?;
        self.forward_changed()
    }

    /// The ipcache entry of exactly `prefix`, if any. An entry no view could have written
    /// (an identity that is not one) is an error naming it.
    pub fn ipcache_entry(&self, prefix: Ipv4Net) -> Result<Option<IpcacheTarget>> {
        self.ipcache_value(prefix)?
            .map(|v| {
                ipcache_target(&v).ok_or_else(|| DatapathError::Invalid {
                    what: "ipcache entry",
                    detail: format!("{prefix}: identity {} is not one", v.identity),
                })
            })
            .transpose()
    }

    /// The raw value of exactly `prefix` (the read-back needs it to find invalid entries).
    pub(crate) fn ipcache_value(&self, prefix: Ipv4Net) -> Result<Option<abi::IpcacheValue>> {
        let found = match host_key(prefix) {
            Some(key) => self.ipcache_hosts.get(&key, 0),
            None => self.ipcache.get(&ipcache_key(prefix), 0),
        };
        match found {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(op_err("get", names::IPCACHE, prefix)(e)),
        }
    }

    /// Every ipcache prefix, /32s included (for level-triggered reconciliation: diff desired
    /// against actual).
    pub fn ipcache_prefixes(&self) -> Result<Vec<Ipv4Net>> {
        let mut out = Vec::new();
        for k in self.ipcache_hosts.keys() {
            let k = k.map_err(op_err("iterate", names::IPCACHE_HOSTS, "*"))?;
            out.push(Ipv4Net::from(abi::ip_from_be(k.addr)));
        }
        for k in self.ipcache.keys() {
            let k = k.map_err(op_err("iterate", names::IPCACHE, "*"))?;
            out.push(
                Ipv4Net::new(abi::ip_from_be(k.data()), k.prefix_len() as u8).map_err(|e| {
                    DatapathError::Invalid {
                        what: "ipcache key",
                        detail: e.to_string(),
                    }
                })?,
            );
        }
        Ok(out)
    }

    /// Inserts or replaces the local endpoint with address `ip`.
    pub fn upsert_endpoint(&mut self, ip: Ipv4Addr, endpoint: LocalEndpoint) -> Result<()> {
        if endpoint.identity > abi::IDENTITY_MAX {
            return Err(DatapathError::Invalid {
                what: "identity",
                detail: format!(
                    "{} of endpoint {ip} does not fit a 24-bit VNI",
                    endpoint.identity
                ),
            });
        }
        let key = abi::EndpointKey {
            addr: abi::ip_to_be(ip),
        };
        let value = abi::EndpointValue {
            ifindex: endpoint.ifindex,
            identity: endpoint.identity,
            mac: endpoint.mac,
            node_mac: endpoint.node_mac,
            flags: 0,
        };
        self.endpoints
            .insert(key, value, 0)
            .map_err(op_err("insert", names::ENDPOINTS, ip))?;
        self.forward_changed()
    }

    /// Removes the local endpoint with address `ip`.
    pub fn delete_endpoint(&mut self, ip: Ipv4Addr) -> Result<()> {
        let key = abi::EndpointKey {
            addr: abi::ip_to_be(ip),
        };
        ignore_missing(self.endpoints.remove(&key)).map_err(op_err(
            "remove",
            names::ENDPOINTS,
            ip,
        ))?;
        self.forward_changed()
    }

    /// Every local endpoint address.
    pub fn endpoint_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        self.endpoints
            .keys()
            .map(|k| {
                k.map(|k| abi::ip_from_be(k.addr))
                    .map_err(op_err("iterate", names::ENDPOINTS, "*"))
            })
            .collect()
    }

    /// The local endpoint with address `ip`, if any.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<LocalEndpoint>> {
        let key = abi::EndpointKey {
            addr: abi::ip_to_be(ip),
        };
        match self.endpoints.get(&key, 0) {
            Ok(v) => Ok(Some(LocalEndpoint {
                ifindex: v.ifindex,
                identity: v.identity,
                mac: v.mac,
                node_mac: v.node_mac,
            })),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(op_err("get", names::ENDPOINTS, ip)(e)),
        }
    }

    /// Every known node and its cluster id.
    pub fn nodes(&self) -> Result<Vec<(Ipv4Addr, u8)>> {
        self.nodes
            .iter()
            .map(|item| {
                item.map(|(k, v)| (abi::ip_from_be(k.addr), v.cluster_id as u8))
                    .map_err(op_err("iterate", names::NODES, "*"))
            })
            .collect()
    }

    /// The drop-event ring buffer's fd, to wait for events (e.g. with tokio's `AsyncFd`)
    /// before [`DatapathMaps::drain_drop_events`].
    pub fn drop_events_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.events.as_fd()
    }

    /// Accepts overlay packets from node `ip` carrying identities of cluster `cluster_id`.
    pub fn upsert_node(&mut self, ip: Ipv4Addr, cluster_id: u8) -> Result<()> {
        if cluster_id == 0 {
            return Err(DatapathError::Invalid {
                what: "cluster id",
                detail: format!("0 for node {ip} (cluster ids are 1-255)"),
            });
        }
        let key = abi::NodeKey {
            addr: abi::ip_to_be(ip),
        };
        let value = abi::NodeValue {
            cluster_id: u32::from(cluster_id),
            flags: 0,
        };
        self.nodes
            .insert(key, value, 0)
            .map_err(op_err("insert", names::NODES, ip))
    }

    /// Stops accepting overlay packets from node `ip`.
    pub fn delete_node(&mut self, ip: Ipv4Addr) -> Result<()> {
        let key = abi::NodeKey {
            addr: abi::ip_to_be(ip),
        };
        ignore_missing(self.nodes.remove(&key)).map_err(op_err("remove", names::NODES, ip))
    }

    /// Inserts or replaces a policy entry.
    pub fn upsert_policy(
        &mut self,
        entry: PolicyEntry,
        verdict: Verdict,
        cookie: u32,
    ) -> Result<()> {
        let key = entry.key()?;
        let value = abi::PolicyValue {
            verdict: match verdict {
                Verdict::Allow => abi::VERDICT_ALLOW,
                Verdict::Deny => abi::VERDICT_DENY,
            },
            cookie,
        };
        self.policy.insert(key, value, 0).map_err(op_err(
            "insert",
            names::POLICY,
            format!("{entry:?}"),
        ))?;
        self.bump_policy_revision().map(|_| ())
    }

    /// Removes a policy entry.
    pub fn delete_policy(&mut self, entry: PolicyEntry) -> Result<()> {
        let key = entry.key()?;
        ignore_missing(self.policy.remove(&key)).map_err(op_err(
            "remove",
            names::POLICY,
            format!("{entry:?}"),
        ))?;
        self.bump_policy_revision().map(|_| ())
    }

    /// Turns default-deny on (`true`) or off for one direction of `subject`.
    pub fn set_policy_enabled(
        &mut self,
        subject: u32,
        direction: Direction,
        enabled: bool,
    ) -> Result<()> {
        let key = abi::PolicyKey {
            subject_identity: subject,
            direction: direction_raw(direction) | abi::POLICY_F_MARKER,
            ..Default::default()
        };
        let what = format!("marker {subject}/{direction:?}");
        if enabled {
            let value = abi::PolicyValue {
                verdict: abi::VERDICT_ENABLED,
                cookie: 0,
            };
            self.policy
                .insert(key, value, 0)
                .map_err(op_err("insert", names::POLICY, what))?;
        } else {
            ignore_missing(self.policy.remove(&key)).map_err(op_err(
                "remove",
                names::POLICY,
                what,
            ))?;
        }
        self.bump_policy_revision().map(|_| ())
    }

    /// Every policy entry with its verdict and cookie (markers excluded), for diffing.
    pub fn policy_entries(&self) -> Result<Vec<(PolicyEntry, Verdict, u32)>> {
        let mut out = Vec::new();
        for item in self.policy.iter() {
            let (k, v) = item.map_err(op_err("iterate", names::POLICY, "*"))?;
            if k.direction & abi::POLICY_F_MARKER != 0 {
                continue;
            }
            let entry = PolicyEntry {
                subject: k.subject_identity,
                peer: (k.peer_identity != 0).then_some(k.peer_identity),
                proto: (k.proto != 0).then_some(k.proto),
                dport: (k.dport != 0).then_some(k.dport),
                direction: direction_from_raw(k.direction),
            };
            let verdict = if v.verdict == abi::VERDICT_DENY {
                Verdict::Deny
            } else {
                Verdict::Allow
            };
            out.push((entry, verdict, v.cookie));
        }
        Ok(out)
    }

    /// Every (subject, direction) whose policy is enabled (default-deny).
    pub fn policy_enabled(&self) -> Result<Vec<(u32, Direction)>> {
        let mut out = Vec::new();
        for k in self.policy.keys() {
            let k = k.map_err(op_err("iterate", names::POLICY, "*"))?;
            if k.direction & abi::POLICY_F_MARKER != 0 {
                out.push((
                    k.subject_identity,
                    direction_from_raw(k.direction & !abi::POLICY_F_MARKER),
                ));
            }
        }
        Ok(out)
    }

    /// Inserts or replaces a service frontend with `count` backends (slots `0..count` of
    /// BACKENDS, which should be written first; see the ABI header) and its `SERVICE_F_*`
    /// flags (0 for a VIP).
    pub fn upsert_service(&mut self, frontend: LbFrontend, count: u32, flags: u32) -> Result<()> {
        let key = frontend.key()?;
        let value = abi::ServiceValue { count, flags };
        self.services
            .insert(key, value, 0)
            .map_err(op_err("insert", names::SERVICES, frontend))
    }

    /// Removes a service frontend (new connections to it are no longer balanced).
    pub fn delete_service(&mut self, frontend: LbFrontend) -> Result<()> {
        let key = frontend.key()?;
        ignore_missing(self.services.remove(&key)).map_err(op_err(
            "remove",
            names::SERVICES,
            frontend,
        ))
    }

    /// Every service frontend with its backend count and flags.
    pub fn services(&self) -> Result<Vec<(LbFrontend, u32, u32)>> {
        self.services
            .iter()
            .map(|item| {
                item.map(|(k, v)| (LbFrontend::from_key(&k), v.count, v.flags))
                    .map_err(op_err("iterate", names::SERVICES, "*"))
            })
            .collect()
    }

    /// Inserts or replaces slot `slot` of a frontend's backends.
    pub fn upsert_backend(
        &mut self,
        frontend: LbFrontend,
        slot: u32,
        backend: LbBackend,
    ) -> Result<()> {
        if backend.cluster_id == 0 || backend.port == 0 {
            return Err(DatapathError::Invalid {
                what: "service backend",
                detail: format!("{backend:?} of {frontend}: cluster id and port must not be 0"),
            });
        }
        let key = abi::BackendKey {
            frontend: frontend.key()?,
            slot,
        };
        let value = abi::BackendValue {
            addr: abi::ip_to_be(backend.addr),
            port: backend.port.to_be(),
            pad: 0,
            cluster_id: u32::from(backend.cluster_id),
        };
        self.backends.insert(key, value, 0).map_err(op_err(
            "insert",
            names::BACKENDS,
            format!("{frontend} slot {slot}"),
        ))
    }

    /// Removes slot `slot` of a frontend's backends.
    pub fn delete_backend(&mut self, frontend: LbFrontend, slot: u32) -> Result<()> {
        let key = abi::BackendKey {
            frontend: frontend.key()?,
            slot,
        };
        ignore_missing(self.backends.remove(&key)).map_err(op_err(
            "remove",
            names::BACKENDS,
            format!("{frontend} slot {slot}"),
        ))
    }

    /// Every backend slot: (frontend, slot, backend).
    pub fn backends(&self) -> Result<Vec<(LbFrontend, u32, LbBackend)>> {
        self.backends
            .iter()
            .map(|item| {
                item.map(|(k, v)| {
                    (
                        LbFrontend::from_key(&k.frontend),
                        k.slot,
                        LbBackend {
                            addr: abi::ip_from_be(v.addr),
                            port: u16::from_be(v.port),
                            cluster_id: v.cluster_id as u8,
                        },
                    )
                })
                .map_err(op_err("iterate", names::BACKENDS, "*"))
            })
            .collect()
    }

    /// Number of conntrack entries (walks the map; for tests and status, not hot paths).
    pub fn ct_len(&self) -> usize {
        self.ct.keys().filter(|k| k.is_ok()).count()
    }

    /// Removes every conntrack entry.
    pub fn flush_ct(&mut self) -> Result<()> {
        let keys: Vec<abi::CtKey> = self.ct.keys().filter_map(|k| k.ok()).collect();
        for key in keys {
            ignore_missing(self.ct.remove(&key)).map_err(op_err("remove", names::CT, "*"))?;
        }
        Ok(())
    }

    /// Every non-zero counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        let mut out = Vec::new();
        for index in 0..abi::METRICS_MAX {
            let per_cpu =
                self.metrics
                    .get(&index, 0)
                    .map_err(op_err("get", names::METRICS, index))?;
            let (packets, bytes) = per_cpu
                .iter()
                .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
            if packets == 0 {
                continue;
            }
            let direction = direction_from_raw((index / abi::REASONS) as u8);
            let slot = (index % abi::REASONS) as i32;
            // Slots below 128 hold forwards, the others drops (whose codes are negative).
            let reason = if slot < 128 { slot } else { -slot };
            out.push(Counter {
                direction,
                reason,
                packets,
                bytes,
            });
        }
        Ok(out)
    }

    /// Packets counted for `reason` in `direction`, summed over CPUs.
    pub fn counter(&self, direction: Direction, reason: i32) -> Result<u64> {
        let index = abi::metrics_index(direction_raw(direction), reason);
        let per_cpu = self
            .metrics
            .get(&index, 0)
            .map_err(op_err("get", names::METRICS, index))?;
        Ok(per_cpu.iter().map(|v| v.packets).sum())
    }

    /// Takes every event waiting in the ring buffer and returns the drops among them.
    pub fn drain_drop_events(&mut self) -> Vec<FlowRecord> {
        let mut events = self.drain_events();
        events.retain(FlowRecord::is_drop);
        events
    }

    /// Takes every event (drops and new connections) waiting in the ring buffer.
    pub fn drain_events(&mut self) -> Vec<FlowRecord> {
        drain(&mut self.events)
    }

    /// Sets how many events the programs may send.
    pub fn set_event_limit(&mut self, limit: EventLimit) -> Result<()> {
        let value = abi::EventLimit {
            rate: limit.rate_per_cpu,
            flags: if limit.flows {
                abi::EVENT_LIMIT_F_FLOWS
            } else {
                0
            },
        };
        self.event_limit
            .set(0, value, 0)
            .map_err(op_err("set", names::EVENT_LIMIT, 0))
    }

    /// Events the programs did not send (over the limit, or the ring buffer full), summed over
    /// CPUs, since the maps were created.
    pub fn events_lost(&self) -> Result<u64> {
        let per_cpu =
            self.event_budget
                .get(&0, 0)
                .map_err(op_err("get", names::EVENT_BUDGET, 0))?;
        Ok(per_cpu.iter().map(|b| b.lost).sum())
    }
}

/// The EVENTS ring buffer on its own, for its one reader: it can be polled for readiness
/// (`AsFd`, e.g. with tokio's `AsyncFd`) instead of on a timer.
pub struct DatapathEvents {
    ring: RingBuf<MapData>,
}

impl DatapathEvents {
    /// Opens the ring buffer pinned under `pin_dir/maps` by [`crate::Datapath::load`].
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self> {
        Ok(DatapathEvents {
            ring: typed(pin_dir.as_ref(), names::EVENTS)?,
        })
    }

    /// Takes every event waiting.
    pub fn drain(&mut self) -> Vec<FlowRecord> {
        drain(&mut self.ring)
    }
}

impl std::os::fd::AsFd for DatapathEvents {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl std::os::fd::AsRawFd for DatapathEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<abi::FlowEvent>() {
            continue;
        }
        // SAFETY: the record is at least size_of::<FlowEvent>() bytes and FlowEvent is a
        // plain-old-data mirror of the C struct (checked by meshd-ebpf's layout test);
        // read_unaligned copes with any alignment of the ring buffer slot.
        let ev: abi::FlowEvent =
            unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<abi::FlowEvent>()) };
        let verdict = match ev.event_type {
            abi::EVENT_DROP => FlowVerdict::Dropped,
            abi::EVENT_FLOW => FlowVerdict::Forwarded,
            _ => continue,
        };
        out.push(FlowRecord {
            verdict,
            service: (ev.svc_addr != 0)
                .then(|| SocketAddrV4::new(abi::ip_from_be(ev.svc_addr), ev.svc_port)),
            timestamp_ns: ev.timestamp_ns,
            reason: i32::from(ev.reason),
            direction: direction_from_raw(ev.direction),
            src_identity: ev.src_identity,
            dst_identity: ev.dst_identity,
            saddr: abi::ip_from_be(ev.saddr),
            daddr: abi::ip_from_be(ev.daddr),
            sport: ev.sport,
            dport: ev.dport,
            proto: ev.proto,
            ifindex: ev.ifindex,
        });
    }
    out
}

fn host_key(prefix: Ipv4Net) -> Option<abi::IpcacheHostKey> {
    (prefix.prefix_len() == 32).then(|| abi::IpcacheHostKey {
        addr: abi::ip_to_be(prefix.addr()),
    })
}

fn ipcache_key(prefix: Ipv4Net) -> LpmKey<u32> {
    let prefix = prefix.trunc();
    LpmKey::new(u32::from(prefix.prefix_len()), abi::ip_to_be(prefix.addr()))
}

/// The view's shape of an ipcache value; `None` for an identity no view could write.
pub(crate) fn ipcache_target(v: &abi::IpcacheValue) -> Option<IpcacheTarget> {
    Some(IpcacheTarget {
        identity: meshd_state::NumericIdentity::from_datapath(v.identity).ok()?,
        tunnel_endpoint: (v.tunnel_endpoint != 0)
            .then(|| IpAddr::V4(abi::ip_from_be(v.tunnel_endpoint))),
        local: v.flags & abi::IPCACHE_F_LOCAL != 0,
    })
}
