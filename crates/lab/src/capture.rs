//! Which replies pass back through a node: an nftables set in the router's namespace (which
//! carries every packet between the nodes and the external host) records, for each watched
//! node, the client port of every packet that node sends from a node port, told apart from the
//! other nodes' packets by the node's MAC address. With direct server return only the node's
//! own backend answers through it; a backend elsewhere answers from its own node.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context};

use crate::proc::run;
use crate::state::LabState;

const TABLE: &str = "meshd_lab_check";
const SET: &str = "through_entry";

/// A node whose replies from `node_port` are recorded.
pub struct Watched {
    pub netns: String,
    pub ip: String,
    pub node_port: u16,
}

fn router_netns(state: &LabState) -> anyhow::Result<&str> {
    match &state.external {
        Some(ext) if ext.router_container.is_none() => Ok(&ext.router_netns),
        _ => bail!("no router namespace to capture in (the docker lab's router is a container)"),
    }
}

fn in_netns(netns: &str, program: &str, args: &[String]) -> anyhow::Result<String> {
    run(Some(netns), Path::new(program), args)
}

/// The MAC address of `ul0`, the node's link towards the router.
fn uplink_mac(netns: &str) -> anyhow::Result<String> {
    let out = in_netns(
        netns,
        "ip",
        &["-j".into(), "link".into(), "show".into(), "ul0".into()],
    )?;
    let links: serde_json::Value = serde_json::from_str(&out)?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{netns}: no address of ul0 in {out}"))
}

/// Starts recording (again, from nothing) in the router's namespace.
pub fn start(state: &LabState, watched: &[Watched]) -> anyhow::Result<()> {
    let router = router_netns(state)?;
    let mut rules = String::new();
    for w in watched {
        let mac = uplink_mac(&w.netns)?;
        rules.push_str(&format!(
            "    ip saddr {} ether saddr {mac} tcp sport {} add @{SET} {{ ip saddr . tcp dport }}\n",
            w.ip, w.node_port
        ));
    }
    // Declaring the table first makes the delete succeed on a first run too.
    let script = format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n  set {SET} {{\n    type ipv4_addr . inet_service\n    flags dynamic\n  }}\n  chain pre {{\n    type filter hook prerouting priority -300; policy accept;\n{rules}  }}\n}}\n"
    );
    let file = state.run_dir.join("check-capture.nft");
    std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
    in_netns(router, "nft", &["-f".into(), file.display().to_string()])
        .context("installing the router's capture (nft)")?;
    Ok(())
}

/// The client ports of the replies `ip` sent through the router since [`start`].
pub fn ports_through(state: &LabState, ip: &str) -> anyhow::Result<BTreeSet<u16>> {
    let router = router_netns(state)?;
    let out = in_netns(
        router,
        "nft",
        &["-j", "list", "set", "ip", TABLE, SET].map(String::from),
    )?;
    let doc: serde_json::Value = serde_json::from_str(&out)?;
    let mut ports = BTreeSet::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        for elem in item["set"]["elem"].as_array().into_iter().flatten() {
            // A plain element, or one with its own data ({"elem": {"val": ...}}).
            let concat = elem["concat"]
                .as_array()
                .or_else(|| elem["elem"]["val"]["concat"].as_array());
            if let Some([addr, port]) = concat.map(Vec::as_slice) {
                if addr.as_str() == Some(ip) {
                    ports.extend(port.as_u64().map(|p| p as u16));
                }
            }
        }
    }
    Ok(ports)
}

/// Removes the capture (best effort: a lab down removes the router anyway).
pub fn stop(state: &LabState) {
    if let Ok(router) = router_netns(state) {
        let _ = in_netns(
            router,
            "nft",
            &["delete", "table", "ip", TABLE].map(String::from),
        );
    }
}
