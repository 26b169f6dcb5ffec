//! The meshd eBPF datapath: C programs under `bpf/` built by `build.rs` with clang and embedded
//! here, plus [`abi`], the Rust mirror of `bpf/include/meshd_abi.h`.
//!
//! Objects (each loaded with aya; maps are pinned by name, so objects loaded with the same pin
//! directory share them):
//! - [`FROM_ENDPOINT`]: programs `from_endpoint` (attach) and `from_endpoint_probe` (test-run),
//! - [`FROM_OVERLAY`]: programs `from_overlay` (attach) and `from_overlay_probe` (test-run),
//! - [`FROM_NETDEV`]: program `from_netdev` (attach; also test-run as it is),
//! - [`BASELINE`]: program `baseline`, an empty classifier for benchmarks,
//! - [`ABI_LAYOUT`]: never loaded; its BTF describes every shared struct for the layout test.

pub mod abi;

/// Embeds a file with 8-byte alignment, as ELF parsers (and aya) expect of object bytes.
macro_rules! include_bytes_aligned {
    ($path:expr) => {{
        #[repr(C, align(8))]
        struct Aligned<B: ?Sized>(B);
        static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!($path));
        &ALIGNED.0
    }};
}

/// Object holding `from_endpoint` (tc ingress of endpoint veths).
pub static FROM_ENDPOINT: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_endpoint.bpf.o"));
/// Object holding `from_overlay` (tc ingress of the VXLAN device).
pub static FROM_OVERLAY: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_overlay.bpf.o"));
/// Object holding `from_netdev` (tc ingress of the node's uplink).
pub static FROM_NETDEV: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_netdev.bpf.o"));
/// Object holding `baseline`, the empty program benchmarks compare against.
pub static BASELINE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline.bpf.o"));
/// Object whose BTF describes every ABI struct and enum; only inspected by tests.
pub static ABI_LAYOUT: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/abi_layout.bpf.o"));

/// Program names inside the objects.
pub mod programs {
    pub const FROM_ENDPOINT: &str = "from_endpoint";
    pub const FROM_ENDPOINT_PROBE: &str = "from_endpoint_probe";
    pub const FROM_OVERLAY: &str = "from_overlay";
    pub const FROM_OVERLAY_PROBE: &str = "from_overlay_probe";
    pub const FROM_NETDEV: &str = "from_netdev";
    pub const BASELINE: &str = "baseline";
}

/// Map names (pinned under these names in the node's bpffs directory).
pub mod maps {
    pub const IPCACHE: &str = "IPCACHE";
    pub const IPCACHE_HOSTS: &str = "IPCACHE_HOSTS";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const NODES: &str = "NODES";
    pub const POLICY: &str = "POLICY";
    pub const CT: &str = "CT";
    pub const FRAGS: &str = "FRAGS";
    pub const METRICS: &str = "METRICS";
    pub const CONFIG: &str = "CONFIG";
    pub const EVENTS: &str = "EVENTS";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const NAT: &str = "NAT";
    pub const NO_MASQ: &str = "NO_MASQ";
    pub const EVENT_LIMIT: &str = "EVENT_LIMIT";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    /// Every pinned map.
    pub const ALL: [&str; 16] = [
        IPCACHE,
        IPCACHE_HOSTS,
        ENDPOINTS,
        NODES,
        POLICY,
        CT,
        FRAGS,
        METRICS,
        CONFIG,
        EVENTS,
        SERVICES,
        BACKENDS,
        NAT,
        NO_MASQ,
        EVENT_LIMIT,
        EVENT_BUDGET,
    ];
}
