//! Errors of the datapath crate: each names the object, program, map, interface or path involved.

use std::path::PathBuf;

/// Loading, attaching and driving the eBPF datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{path} is not on a bpffs mount (mount it with `mount -t bpf bpf {path}`)")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading eBPF object {object} with maps pinned under {pin_dir}: {source}")]
    LoadObject {
        object: &'static str,
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {program} is missing from eBPF object {object}")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attaching program {program} to tc ingress of {ifname}: {source}")]
    Attach {
        program: &'static str,
        ifname: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("link pinned at {path}: {source}")]
    Link {
        path: PathBuf,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("replacing the program of the link pinned at {path} with {program}: {source}")]
    ReplaceLink {
        program: &'static str,
        path: PathBuf,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinning link at {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
    #[error("opening pinned map {map} at {path}: {source}")]
    OpenMap {
        map: &'static str,
        path: PathBuf,
        source: Box<aya::maps::MapError>,
    },
    #[error("pinned map {map} at {path} does not fit this build: {detail} (remove it, or load with replace_incompatible_maps)")]
    IncompatibleMap {
        map: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{op} in map {map} (key {key}): {source}")]
    MapOp {
        op: &'static str,
        map: &'static str,
        key: String,
        source: Box<aya::maps::MapError>,
    },
    /// Entering a network namespace (or another netlink step) failed; names the namespace.
    #[error(transparent)]
    Netlink(#[from] meshd_netlink::NetlinkError),
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// Result alias of this crate.
pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
