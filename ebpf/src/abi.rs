//! Rust mirror of `bpf/include/meshd_abi.h`. Every struct is `#[repr(C)]` with its padding
//! spelled out, so `aya::Pod` is sound and a zeroed value is a valid map key;
//! `tests/abi_layout.rs` checks sizes, offsets and constants against the compiled BTF.
//!
//! Byte order follows the header: IPv4 addresses are network byte order (use [`ip_to_be`] and
//! [`ip_from_be`]), ports are network byte order in [`CtKey`] and host byte order in
//! [`PolicyKey`] and [`FlowEvent`], identities are host byte order.

use std::net::Ipv4Addr;

/// An IPv4 address as the datapath stores it: the four octets in memory order.
pub fn ip_to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Inverse of [`ip_to_be`].
pub fn ip_from_be(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// `MESHD_SERVICE_LOOPBACK_ADDR`: the source address of hairpin service connections (a client
/// load-balanced to itself), as the client's backend side sees them.
pub const SERVICE_LOOPBACK_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

// enum meshd_limits
pub const IPCACHE_MAX: u32 = 512_000;
pub const IPCACHE_HOSTS_MAX: u32 = 1_048_576;
pub const ENDPOINTS_MAX: u32 = 65_536;
pub const NODES_MAX: u32 = 16_384;
pub const POLICY_MAX: u32 = 262_144;
pub const CT_MAX: u32 = 262_144;
pub const FRAGS_MAX: u32 = 8192;
pub const SERVICES_MAX: u32 = 65_536;
pub const BACKENDS_MAX: u32 = 262_144;
pub const NAT_MAX: u32 = 262_144;
pub const NO_MASQ_MAX: u32 = 1024;
pub const EVENTS_BYTES: u32 = 1 << 20;

// enum meshd_identity
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
pub const IDENTITY_REMOTE_NODE: u32 = 6;
pub const IDENTITY_CLUSTER_SHIFT: u32 = 16;
pub const IDENTITY_CLUSTER_MASK: u32 = 0xff;
pub const IDENTITY_MAX: u32 = 0xff_ffff;
pub const IDENTITY_LOCAL_SCOPE: u32 = 0x100_0000;

// enum meshd_dir
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;
pub const DIR_COUNT: u32 = 2;

// enum meshd_reason: forwards (>= 0) and drops (< 0).
pub const FWD_LOCAL: i32 = 1;
pub const FWD_TUNNEL: i32 = 2;
pub const FWD_STACK: i32 = 3;
pub const FWD_WORLD: i32 = 4;
pub const FWD_NATIVE: i32 = 5;
pub const FWD_FRAG_NEEDED: i32 = 6;
pub const DROP_INVALID_PACKET: i32 = -130;
pub const DROP_UNSUPPORTED_L3: i32 = -131;
pub const DROP_INVALID_SOURCE: i32 = -132;
pub const DROP_UNKNOWN_DEST: i32 = -133;
pub const DROP_POLICY: i32 = -134;
pub const DROP_POLICY_DENY: i32 = -135;
pub const DROP_UNKNOWN_NODE: i32 = -136;
pub const DROP_INVALID_IDENTITY: i32 = -137;
pub const DROP_NO_TUNNEL_KEY: i32 = -138;
pub const DROP_NO_CONFIG: i32 = -139;
pub const DROP_WRITE_ERROR: i32 = -140;
pub const DROP_FRAG_NOT_FOUND: i32 = -141;
pub const DROP_NO_SERVICE_BACKEND: i32 = -142;
pub const DROP_NAT_NO_PORT: i32 = -143;
pub const DROP_NO_LOCAL_BACKEND: i32 = -144;

// enum meshd_metrics_layout
pub const REASONS: u32 = 256;
pub const METRICS_MAX: u32 = DIR_COUNT * REASONS;

// enum meshd_ipcache_flags
pub const IPCACHE_F_LOCAL: u32 = 1;
// enum meshd_policy_flags
pub const POLICY_F_MARKER: u8 = 0x80;
// enum meshd_verdict
pub const VERDICT_ALLOW: u32 = 1;
pub const VERDICT_DENY: u32 = 2;
pub const VERDICT_ENABLED: u32 = 3;
// enum meshd_ct_flags
pub const CT_F_REPLY: u32 = 1;
pub const CT_F_CLOSING: u32 = 2;
pub const CT_F_SERVICE: u32 = 4;
pub const CT_F_REV_NAT: u32 = 8;
pub const CT_F_DSR: u32 = 16;
// enum meshd_service_flags
pub const SERVICE_F_NODE_PORT: u32 = 1;
pub const SERVICE_F_EXTERNAL_IP: u32 = 2;
pub const SERVICE_F_LOCAL: u32 = 4;
// enum meshd_event_type
pub const EVENT_DROP: u32 = 1;
pub const EVENT_FLOW: u32 = 2;
// enum meshd_event_limit_flags
pub const EVENT_LIMIT_F_FLOWS: u32 = 1;
// enum meshd_config_flags
pub const CONFIG_F_WORLD: u32 = 1;
pub const CONFIG_F_MASQUERADE: u32 = 2;
pub const CONFIG_F_NATIVE: u32 = 4;
pub const CONFIG_F_DSR_TCP: u32 = 8;
pub const CONFIG_F_DSR_UDP: u32 = 16;
pub const CONFIG_F_TUNNEL_PROGRAM: u32 = 32;
// enum meshd_nat
pub const NAT_RETRIES: u32 = 64;
// enum meshd_dsr
pub const DSR_OPT_TYPE: u8 = 0x9e;
pub const DSR_OPT_LEN: u8 = 8;

/// Every constant above with its C name, for the layout test.
pub const CONSTANTS: &[(&str, i64)] = &[
    ("MESHD_IPCACHE_MAX", IPCACHE_MAX as i64),
    ("MESHD_IPCACHE_HOSTS_MAX", IPCACHE_HOSTS_MAX as i64),
    ("MESHD_ENDPOINTS_MAX", ENDPOINTS_MAX as i64),
    ("MESHD_NODES_MAX", NODES_MAX as i64),
    ("MESHD_POLICY_MAX", POLICY_MAX as i64),
    ("MESHD_CT_MAX", CT_MAX as i64),
    ("MESHD_FRAGS_MAX", FRAGS_MAX as i64),
    ("MESHD_SERVICES_MAX", SERVICES_MAX as i64),
    ("MESHD_BACKENDS_MAX", BACKENDS_MAX as i64),
    ("MESHD_NAT_MAX", NAT_MAX as i64),
    ("MESHD_NO_MASQ_MAX", NO_MASQ_MAX as i64),
    ("MESHD_EVENTS_BYTES", EVENTS_BYTES as i64),
    ("MESHD_IDENTITY_HOST", IDENTITY_HOST as i64),
    ("MESHD_IDENTITY_WORLD", IDENTITY_WORLD as i64),
    ("MESHD_IDENTITY_REMOTE_NODE", IDENTITY_REMOTE_NODE as i64),
    (
        "MESHD_IDENTITY_CLUSTER_SHIFT",
        IDENTITY_CLUSTER_SHIFT as i64,
    ),
    ("MESHD_IDENTITY_CLUSTER_MASK", IDENTITY_CLUSTER_MASK as i64),
    ("MESHD_IDENTITY_MAX", IDENTITY_MAX as i64),
    ("MESHD_IDENTITY_LOCAL_SCOPE", IDENTITY_LOCAL_SCOPE as i64),
    ("MESHD_DIR_INGRESS", DIR_INGRESS as i64),
    ("MESHD_DIR_EGRESS", DIR_EGRESS as i64),
    ("MESHD_DIR_COUNT", DIR_COUNT as i64),
    ("MESHD_FWD_LOCAL", FWD_LOCAL as i64),
    ("MESHD_FWD_TUNNEL", FWD_TUNNEL as i64),
    ("MESHD_FWD_STACK", FWD_STACK as i64),
    ("MESHD_FWD_WORLD", FWD_WORLD as i64),
    ("MESHD_FWD_NATIVE", FWD_NATIVE as i64),
    ("MESHD_FWD_FRAG_NEEDED", FWD_FRAG_NEEDED as i64),
    ("MESHD_DROP_INVALID_PACKET", DROP_INVALID_PACKET as i64),
    ("MESHD_DROP_UNSUPPORTED_L3", DROP_UNSUPPORTED_L3 as i64),
    ("MESHD_DROP_INVALID_SOURCE", DROP_INVALID_SOURCE as i64),
    ("MESHD_DROP_UNKNOWN_DEST", DROP_UNKNOWN_DEST as i64),
    ("MESHD_DROP_POLICY", DROP_POLICY as i64),
    ("MESHD_DROP_POLICY_DENY", DROP_POLICY_DENY as i64),
    ("MESHD_DROP_UNKNOWN_NODE", DROP_UNKNOWN_NODE as i64),
    ("MESHD_DROP_INVALID_IDENTITY", DROP_INVALID_IDENTITY as i64),
    ("MESHD_DROP_NO_TUNNEL_KEY", DROP_NO_TUNNEL_KEY as i64),
    ("MESHD_DROP_NO_CONFIG", DROP_NO_CONFIG as i64),
    ("MESHD_DROP_WRITE_ERROR", DROP_WRITE_ERROR as i64),
    ("MESHD_DROP_FRAG_NOT_FOUND", DROP_FRAG_NOT_FOUND as i64),
    (
        "MESHD_DROP_NO_SERVICE_BACKEND",
        DROP_NO_SERVICE_BACKEND as i64,
    ),
    ("MESHD_DROP_NAT_NO_PORT", DROP_NAT_NO_PORT as i64),
    ("MESHD_DROP_NO_LOCAL_BACKEND", DROP_NO_LOCAL_BACKEND as i64),
    ("MESHD_REASONS", REASONS as i64),
    ("MESHD_METRICS_MAX", METRICS_MAX as i64),
    ("MESHD_IPCACHE_F_LOCAL", IPCACHE_F_LOCAL as i64),
    ("MESHD_POLICY_F_MARKER", POLICY_F_MARKER as i64),
    ("MESHD_VERDICT_ALLOW", VERDICT_ALLOW as i64),
    ("MESHD_VERDICT_DENY", VERDICT_DENY as i64),
    ("MESHD_VERDICT_ENABLED", VERDICT_ENABLED as i64),
    ("MESHD_CT_F_REPLY", CT_F_REPLY as i64),
    ("MESHD_CT_F_CLOSING", CT_F_CLOSING as i64),
    ("MESHD_CT_F_SERVICE", CT_F_SERVICE as i64),
    ("MESHD_CT_F_REV_NAT", CT_F_REV_NAT as i64),
    ("MESHD_CT_F_DSR", CT_F_DSR as i64),
    ("MESHD_SERVICE_F_NODE_PORT", SERVICE_F_NODE_PORT as i64),
    ("MESHD_SERVICE_F_EXTERNAL_IP", SERVICE_F_EXTERNAL_IP as i64),
    ("MESHD_SERVICE_F_LOCAL", SERVICE_F_LOCAL as i64),
    ("MESHD_EVENT_DROP", EVENT_DROP as i64),
    ("MESHD_EVENT_FLOW", EVENT_FLOW as i64),
    ("MESHD_EVENT_LIMIT_F_FLOWS", EVENT_LIMIT_F_FLOWS as i64),
    ("MESHD_CONFIG_F_WORLD", CONFIG_F_WORLD as i64),
    ("MESHD_CONFIG_F_MASQUERADE", CONFIG_F_MASQUERADE as i64),
    ("MESHD_CONFIG_F_NATIVE", CONFIG_F_NATIVE as i64),
    ("MESHD_CONFIG_F_DSR_TCP", CONFIG_F_DSR_TCP as i64),
    ("MESHD_CONFIG_F_DSR_UDP", CONFIG_F_DSR_UDP as i64),
    (
        "MESHD_CONFIG_F_TUNNEL_PROGRAM",
        CONFIG_F_TUNNEL_PROGRAM as i64,
    ),
    ("MESHD_NAT_RETRIES", NAT_RETRIES as i64),
    ("MESHD_DSR_OPT_TYPE", DSR_OPT_TYPE as i64),
    ("MESHD_DSR_OPT_LEN", DSR_OPT_LEN as i64),
];

/// Human name of a reason code (forward or drop), for logs and `meshd monitor`.
pub fn reason_name(code: i32) -> &'static str {
    match code {
        FWD_LOCAL => "forwarded-local",
        FWD_TUNNEL => "forwarded-tunnel",
        FWD_STACK => "forwarded-stack",
        FWD_WORLD => "forwarded-world",
        FWD_NATIVE => "forwarded-native",
        FWD_FRAG_NEEDED => "answered-frag-needed",
        DROP_INVALID_PACKET => "invalid-packet",
        DROP_UNSUPPORTED_L3 => "unsupported-l3",
        DROP_INVALID_SOURCE => "invalid-source",
        DROP_UNKNOWN_DEST => "unknown-destination",
        DROP_POLICY => "policy-denied",
        DROP_POLICY_DENY => "policy-deny-rule",
        DROP_UNKNOWN_NODE => "unknown-node",
        DROP_INVALID_IDENTITY => "invalid-identity",
        DROP_NO_TUNNEL_KEY => "no-tunnel-key",
        DROP_NO_CONFIG => "no-config",
        DROP_WRITE_ERROR => "write-error",
        DROP_FRAG_NOT_FOUND => "fragment-without-first",
        DROP_NO_SERVICE_BACKEND => "no-service-backend",
        DROP_NAT_NO_PORT => "nat-no-port",
        DROP_NO_LOCAL_BACKEND => "no-local-backend",
        _ => "unknown-reason",
    }
}

/// Index of a reason's counter in METRICS.
pub fn metrics_index(direction: u8, code: i32) -> u32 {
    u32::from(direction & 1) * REASONS + (code.unsigned_abs() & (REASONS - 1))
}

/// Key of IPCACHE (an LPM trie key: prefix length, then the address).
/// aya's `LpmTrie` wraps the data in its own `Key { prefix_len, data }`; [`IpcacheKey`] is that
/// whole layout, kept for the layout test and for raw reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    pub prefixlen: u32,
    pub addr: u32,
}

/// Key of IPCACHE_HOSTS, the /32 part of the ipcache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheHostKey {
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Node IP (network byte order); 0 hands packets to the local stack.
    pub tunnel_endpoint: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointValue {
    pub ifindex: u32,
    pub identity: u32,
    pub mac: [u8; 6],
    pub node_mac: [u8; 6],
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeKey {
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeValue {
    pub cluster_id: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub subject_identity: u32,
    /// 0 = any peer.
    pub peer_identity: u32,
    /// Host byte order; 0 = any port.
    pub dport: u16,
    /// IPPROTO_*; 0 = any protocol.
    pub proto: u8,
    /// DIR_*, or'ed with [`POLICY_F_MARKER`] for the "policy enabled" marker.
    pub direction: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub verdict: u32,
    pub cookie: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub last_seen_ns: u64,
    pub flags: u32,
    pub policy_revision: u32,
    /// Network byte order: the backend of a [`CT_F_SERVICE`] entry, the frontend of the
    /// entries of a translated connection; 0 otherwise.
    pub nat_addr: u32,
    /// Network byte order.
    pub nat_port: u16,
    /// A [`CT_F_SERVICE`] entry: the `BACKENDS` slot its backend was last seen in; 0 otherwise.
    pub backend_slot: u16,
    /// from_endpoint's forwarding cache of this direction (see the header): valid while
    /// [`DatapathConfig::forward_revision`] equals `fwd_revision`.
    pub fwd_revision: u32,
    pub fwd_ifindex: u32,
    pub fwd_src_identity: u32,
    pub fwd_dst_identity: u32,
    /// Network byte order; 0 = empty cache.
    pub fwd_tunnel_endpoint: u32,
    pub fwd_pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IPv4 identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    /// Network byte order.
    pub sport: u16,
    pub dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    pub vxlan_ifindex: u32,
    /// Network byte order.
    pub node_ip: u32,
    pub cluster_id: u32,
    pub flags: u32,
    /// Bumped after every POLICY change; CT entries remember the revision they were checked at.
    pub policy_revision: u32,
    /// Bumped after ENDPOINTS, IPCACHE and CONFIG changes; empties the CT forwarding caches.
    pub forward_revision: u32,
    /// SNAT port range of masquerade, host byte order, inclusive.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The VXLAN UDP port, network byte order (in-program encapsulation, see
    /// [`CONFIG_F_TUNNEL_PROGRAM`]).
    pub tunnel_port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    /// `EVENT_DROP` or `EVENT_FLOW`.
    pub event_type: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: u32,
    pub daddr: u32,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    /// `DROP_*` of a drop, `FWD_*` of a new connection.
    pub reason: i16,
    pub ifindex: u32,
    /// Service frontend, network byte order; 0 if none.
    pub svc_addr: u32,
    /// Host byte order.
    pub svc_port: u16,
    pub pad: u16,
    pub pad2: u32,
}

/// Value of EVENT_LIMIT.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventLimit {
    /// Events per second per CPU; 0 = unlimited.
    pub rate: u32,
    /// `EVENT_LIMIT_F_*`.
    pub flags: u32,
}

/// Per-CPU value of EVENT_BUDGET.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventBudget {
    pub window_ns: u64,
    pub used: u32,
    pub pad: u32,
    /// Events not sent (over the limit or ring buffer full) since the map was created.
    pub lost: u64,
}

/// Key of SERVICES: a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backends in slots `0..count` of BACKENDS; 0 refuses new connections.
    pub count: u32,
    /// `SERVICE_F_*`; 0 for a VIP frontend.
    pub flags: u32,
}

/// Key of BACKENDS: one slot of a frontend's backend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub frontend: ServiceKey,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
    pub cluster_id: u32,
}

/// Key of NAT: a flow's tuple (forward entry: the endpoint's as sent; reverse entry: the
/// replies' as they arrive at node_ip).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub saddr: u32,
    pub daddr: u32,
    /// Network byte order; ICMP echo: identifier in sport (request) or dport (reply).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatValue {
    /// Forward: node_ip; reverse: the endpoint. Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
}

/// Key of NO_MASQ (an LPM trie key, like [`IpcacheKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NoMasqKey {
    pub prefixlen: u32,
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NoMasqValue {
    pub flags: u32,
}

/// The DSR option on the wire (see DSR in the header): the frontend a client outside the mesh
/// connected to, carried from the entry node to the backend's node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DsrOption {
    /// [`DSR_OPT_TYPE`].
    pub kind: u8,
    /// [`DSR_OPT_LEN`].
    pub len: u8,
    /// Network byte order.
    pub port: u16,
    /// Network byte order.
    pub addr: u32,
}

// SAFETY: every type is `#[repr(C)]`, made only of integers and byte arrays, with all padding
// spelled out as fields (checked by tests/abi_layout.rs), so any bit pattern is valid and no
// byte is uninitialised.
unsafe impl aya::Pod for IpcacheKey {}
unsafe impl aya::Pod for IpcacheHostKey {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for EndpointKey {}
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for NodeKey {}
unsafe impl aya::Pod for NodeValue {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragValue {}
unsafe impl aya::Pod for MetricsValue {}
unsafe impl aya::Pod for DatapathConfig {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for EventLimit {}
unsafe impl aya::Pod for EventBudget {}
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for ServiceValue {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for NatKey {}
unsafe impl aya::Pod for NatValue {}
unsafe impl aya::Pod for NoMasqKey {}
unsafe impl aya::Pod for NoMasqValue {}
unsafe impl aya::Pod for DsrOption {}

/// One mirrored struct: C name, Rust size, and every field's name and offset.
pub struct Layout {
    pub c_name: &'static str,
    pub size: usize,
    pub fields: Vec<(&'static str, usize)>,
}

macro_rules! layout {
    ($c:literal, $t:ident { $($f:ident),* $(,)? }) => {{
        // An exhaustive destructuring: the list must name every field of the Rust struct, or
        // this does not compile.
        let _exhaustive = |v: $t| {
            let $t { $($f: _),* } = v;
        };
        Layout {
            c_name: $c,
            size: core::mem::size_of::<$t>(),
            fields: vec![$((stringify!($f), core::mem::offset_of!($t, $f))),*],
        }
    }};
}

/// Layouts of every mirrored struct, for the test against the objects' BTF.
pub fn layouts() -> Vec<Layout> {
    vec![
        layout!("ipcache_key", IpcacheKey { prefixlen, addr }),
        layout!("ipcache_host_key", IpcacheHostKey { addr }),
        layout!(
            "ipcache_value",
            IpcacheValue {
                identity,
                tunnel_endpoint,
                flags
            }
        ),
        layout!("endpoint_key", EndpointKey { addr }),
        layout!(
            "endpoint_value",
            EndpointValue {
                ifindex,
                identity,
                mac,
                node_mac,
                flags
            }
        ),
        layout!("node_key", NodeKey { addr }),
        layout!("node_value", NodeValue { cluster_id, flags }),
        layout!(
            "policy_key",
            PolicyKey {
                subject_identity,
                peer_identity,
                dport,
                proto,
                direction
            }
        ),
        layout!("policy_value", PolicyValue { verdict, cookie }),
        layout!(
            "ct_key",
            CtKey {
                saddr,
                daddr,
                sport,
                dport,
                proto,
                pad
            }
        ),
        layout!(
            "ct_value",
            CtValue {
                last_seen_ns,
                flags,
                policy_revision,
                nat_addr,
                nat_port,
                backend_slot,
                fwd_revision,
                fwd_ifindex,
                fwd_src_identity,
                fwd_dst_identity,
                fwd_tunnel_endpoint,
                fwd_pad
            }
        ),
        layout!(
            "frag_key",
            FragKey {
                saddr,
                daddr,
                id,
                proto,
                pad
            }
        ),
        layout!("frag_value", FragValue { sport, dport }),
        layout!("metrics_value", MetricsValue { packets, bytes }),
        layout!(
            "datapath_config",
            DatapathConfig {
                vxlan_ifindex,
                node_ip,
                cluster_id,
                flags,
                policy_revision,
                forward_revision,
                nat_port_min,
                nat_port_max,
                tunnel_port,
                pad
            }
        ),
        layout!(
            "flow_event",
            FlowEvent {
                timestamp_ns,
                event_type,
                src_identity,
                dst_identity,
                saddr,
                daddr,
                sport,
                dport,
                proto,
                direction,
                reason,
                ifindex,
                svc_addr,
                svc_port,
                pad,
                pad2
            }
        ),
        layout!("event_limit", EventLimit { rate, flags }),
        layout!(
            "event_budget",
            EventBudget {
                window_ns,
                used,
                pad,
                lost
            }
        ),
        layout!(
            "service_key",
            ServiceKey {
                addr,
                port,
                proto,
                pad
            }
        ),
        layout!("service_value", ServiceValue { count, flags }),
        layout!("backend_key", BackendKey { frontend, slot }),
        layout!(
            "backend_value",
            BackendValue {
                addr,
                port,
                pad,
                cluster_id
            }
        ),
        layout!(
            "nat_key",
            NatKey {
                saddr,
                daddr,
                sport,
                dport,
                proto,
                pad
            }
        ),
        layout!("nat_value", NatValue { addr, port, pad }),
        layout!("no_masq_key", NoMasqKey { prefixlen, addr }),
        layout!("no_masq_value", NoMasqValue { flags }),
        layout!(
            "dsr_option",
            DsrOption {
                kind,
                len,
                port,
                addr
            }
        ),
    ]
}
