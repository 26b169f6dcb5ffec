//! Errors of building or tearing down a topology, each naming what it was doing and where.

use meshd_netlink::NetlinkError;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{what}: {source}")]
    Step {
        /// The step, e.g. "adding host mlab-c1-n1 to the underlay mlab-ul".
        what: String,
        source: NetlinkError,
    },
    /// A netlink error that already says what and where (e.g. a namespace that exists).
    #[error(transparent)]
    Netlink(NetlinkError),
}

pub type Result<T, E = TopologyError> = std::result::Result<T, E>;

/// Names the step a netlink error happened in.
pub(crate) trait StepContext<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> StepContext<T> for std::result::Result<T, NetlinkError> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TopologyError::Step {
            what: what(),
            source,
        })
    }
}
