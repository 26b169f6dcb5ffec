//! Errors of building or tearing down a topology, each naming what it was doing and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("`{command}` failed in {netns}: {stderr}")]
    Command {
        command: String,
        netns: String,
        stderr: String,
    },
    #[error("running `{command}` in {netns}: {source}")]
    Spawn {
        command: String,
        netns: String,
        source: std::io::Error,
    },
    #[error("network namespace {name} already exists")]
    NetnsExists { name: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = TopologyError> = std::result::Result<T, E>;
