//! `ip` (iproute2) for the few steps a topology needs.

use std::process::Command;

use crate::error::{Result, TopologyError};

/// Runs `ip [-n netns] args...`, returning stdout; `None` is the caller's namespace.
pub(crate) fn ip(netns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut full: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        full.extend(["-n", ns]);
    }
    full.extend_from_slice(args);
    let command = format!("ip {}", full.join(" "));
    let where_ = netns.unwrap_or("the host namespace").to_owned();
    let out = Command::new("ip")
        .args(&full)
        .output()
        .map_err(|source| TopologyError::Spawn {
            command: command.clone(),
            netns: where_.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TopologyError::Command {
            command,
            netns: where_,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
