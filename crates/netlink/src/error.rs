//! Errors of netlink and namespace operations, each naming what was done, to which link (or
//! route, or namespace), and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// A netlink request the kernel (or the library) refused.
    #[error("{op} {target} in {netns}: {source}")]
    Request {
        op: &'static str,
        target: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("no link {link} in {netns}")]
    NoSuchLink { link: String, netns: String },
    #[error("link {link} in {netns}: {detail}")]
    BadLink {
        link: String,
        netns: String,
        detail: String,
    },
    #[error("network namespace {name} already exists")]
    NetnsExists { name: String },
    #[error("{what} {}: {source}", path.display())]
    Netns {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening a netlink socket in {netns}: {source}")]
    Socket {
        netns: String,
        source: std::io::Error,
    },
}

impl NetlinkError {
    /// True when the kernel refused a request with EEXIST (e.g. a route for that destination is
    /// already in the table).
    pub fn is_exists(&self) -> bool {
        matches!(self, NetlinkError::Request { source, .. } if source.raw_os_error() == Some(libc::EEXIST))
    }
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

/// The kernel's answer as an `io::Error` (errno and its text), whatever rtnetlink wrapped it in.
pub(crate) fn io_error(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

/// True when the kernel answered ENODEV (no such link).
pub(crate) fn is_no_such_device(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(msg) if msg.raw_code().abs() == libc::ENODEV)
}
